//! The nn modules: finite-difference gradient checks at f64, mask semantics, the batched
//! Tree-LSTM against per-node calls, and errors (not panics) on bad input.

use dynn_models::SeedStream;
use dynn_models::gradcheck::{GradCheck, GradReport};
use dynn_models::nn::{
    AttentionMask, ChildStates, Forward, LayerNorm, Linear, LstmCell, LstmState, Mlp, Module,
    MultiHeadAttention, Param, ParamBuilder, RmsNorm, SwiGlu, TransformerBlock, TreeLstmCell,
    scaled_dot_product_attention,
};
use dynn_ops::prelude::*;

const DEV: Device = Device::Cpu;

fn builder(seed: u64) -> ParamBuilder {
    ParamBuilder::new(DType::F64, DEV, seed)
}

fn randn(shape: impl Into<Shape>, seed: u64) -> Result<Tensor> {
    rand_normal(shape, 0.0, 1.0, DType::F64, seed, DEV)
}

/// `Σ out ⊙ r` for a fixed random `r`: a loss whose gradient reaches every output element
/// with a different weight (a plain sum would give zero gradients through norms and softmax).
struct Probe(Tensor);

impl Probe {
    fn new(shape: impl Into<Shape>, seed: u64) -> Result<Self> {
        Ok(Probe(randn(shape, seed)?))
    }
    fn loss(&self, out: &Tensor) -> Result<Tensor> {
        out.mul(&self.0)?.sum_all()
    }
}

/// The module's parameters plus `inputs` as extra leaves (so input gradients are checked too).
fn with_inputs(m: &impl Module, inputs: &[(&str, &Tensor)]) -> Vec<Param> {
    let mut ps = m.params();
    ps.extend(inputs.iter().map(|(n, t)| Param::new(*n, (*t).clone())));
    ps
}

fn leaf(shape: impl Into<Shape>, seed: u64) -> Result<Tensor> {
    Ok(randn(shape, seed)?.set_requires_grad(true))
}

fn check(params: &[Param], loss: impl Fn() -> Result<Tensor>) -> Result<GradReport> {
    let gc = GradCheck {
        max_elems_per_param: 8,
        ..GradCheck::default()
    };
    let r = gc.check(params, loss)?;
    assert!(r.checked > 0);
    assert!(r.max_abs_err < 1e-6, "{r:?}");
    Ok(r)
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (a.to_f64_vec()?, b.to_f64_vec()?);
    Ok(a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max))
}

// ----- gradient checks of every module -----

#[test]
fn gradcheck_linear() -> Result<()> {
    let m = Linear::new(&builder(1), 5, 3)?;
    let x = leaf((4, 5), 2)?;
    let p = Probe::new((4, 3), 3)?;
    check(&with_inputs(&m, &[("x", &x)]), || p.loss(&m.forward(&x)?))?;
    // A vector input, as PyTorch's `nn.Linear` takes: (in,) → (out,), the row's output.
    let v = leaf(5, 5)?;
    let y = m.forward(&v)?;
    assert_eq!(y.dims(), [3]);
    assert_eq!(
        y.to_vec::<f64>()?,
        m.forward(&v.unsqueeze(0)?)?.to_vec::<f64>()?
    );
    let pv = Probe::new(3, 6)?;
    check(&with_inputs(&m, &[("x", &v)]), || pv.loss(&m.forward(&v)?))?;
    Ok(())
}

#[test]
fn linear_epilogues_give_the_bits_of_the_separate_ops() -> Result<()> {
    let b = builder(7);
    let (with_bias, no_bias) = (
        Linear::new(&b.pp("a"), 5, 3)?,
        Linear::no_bias(&b.pp("b"), 5, 3)?,
    );
    for m in [&with_bias, &no_bias] {
        for x in [randn((2, 4, 5), 8)?, randn(5, 9)?] {
            let y = m.forward(&x)?;
            let r = randn(y.dims().to_vec(), 10)?;
            let same = |a: Tensor, b: Tensor| -> Result<()> {
                assert_eq!(a.dims(), b.dims());
                assert_eq!(a.to_vec::<f64>()?, b.to_vec::<f64>()?);
                Ok(())
            };
            same(m.forward_act(&x, Activation::Relu)?, y.relu()?)?;
            same(m.forward_act(&x, Activation::Sigmoid)?, y.sigmoid()?)?;
            same(m.forward_act(&x, Activation::Tanh)?, y.tanh()?)?;
            same(m.forward_residual(&x, &r)?, r.add(&y)?)?;
        }
    }
    // The layers that end in a projection: their residual forms are the same sums.
    let x = randn((2, 3, 4), 14)?;
    let r = randn((2, 3, 4), 15)?;
    let mlp = Mlp::new(&b.pp("mlp"), 4, 7)?;
    let swi = SwiGlu::new(&b.pp("swiglu"), 4, 7)?;
    let attn = MultiHeadAttention::new(&b.pp("attn"), 4, 2)?;
    let same = |a: Tensor, b: Tensor| -> Result<()> {
        assert_eq!(a.to_vec::<f64>()?, b.to_vec::<f64>()?);
        Ok(())
    };
    same(mlp.forward_residual(&x, &r)?, r.add(&mlp.forward(&x)?)?)?;
    same(swi.forward_residual(&x, &r)?, r.add(&swi.forward(&x)?)?)?;
    let mask = AttentionMask::Causal;
    same(
        attn.forward_residual(&x, &mask, &r)?,
        r.add(&attn.forward(&x, &mask)?)?,
    )?;
    // Gradients of the fused forms.
    let x = leaf((4, 5), 11)?;
    let p = Probe::new((4, 3), 12)?;
    let r = leaf((4, 3), 13)?;
    let params = with_inputs(&with_bias, &[("x", &x), ("r", &r)]);
    check(&params, || p.loss(&with_bias.forward_residual(&x, &r)?))?;
    check(&params, || {
        p.loss(&with_bias.forward_act(&x, Activation::Tanh)?)
    })?;
    Ok(())
}

#[test]
fn gradcheck_norms() -> Result<()> {
    let b = builder(4);
    let ln = LayerNorm::new(&b.pp("ln"), 6)?;
    let rms = RmsNorm::new(&b.pp("rms"), 6)?;
    let x = leaf((2, 3, 6), 5)?;
    let p = Probe::new((2, 3, 6), 6)?;
    check(&with_inputs(&ln, &[("x", &x)]), || p.loss(&ln.forward(&x)?))?;
    check(&with_inputs(&rms, &[("x", &x)]), || {
        p.loss(&rms.forward(&x)?)
    })?;
    Ok(())
}

#[test]
fn gradcheck_feed_forwards() -> Result<()> {
    let b = builder(7);
    let mlp = Mlp::new(&b.pp("mlp"), 4, 7)?;
    let swi = SwiGlu::new(&b.pp("swiglu"), 4, 7)?;
    let x = leaf((3, 4), 8)?;
    let p = Probe::new((3, 4), 9)?;
    check(&with_inputs(&mlp, &[("x", &x)]), || {
        p.loss(&mlp.forward(&x)?)
    })?;
    check(&with_inputs(&swi, &[("x", &x)]), || {
        p.loss(&swi.forward(&x)?)
    })?;
    Ok(())
}

fn padding() -> Result<Tensor> {
    Tensor::from_vec(vec![1u32, 1, 1, 0, 0, 1, 1, 1, 1, 1], (2, 5), DEV)
}

#[test]
fn gradcheck_attention_with_every_mask() -> Result<()> {
    let m = MultiHeadAttention::new(&builder(10), 8, 2)?;
    let x = leaf((2, 5, 8), 11)?;
    let p = Probe::new((2, 5, 8), 12)?;
    for mask in [
        AttentionMask::None,
        AttentionMask::Causal,
        AttentionMask::Padding(padding()?),
        AttentionMask::CausalPadding(padding()?),
    ] {
        check(&with_inputs(&m, &[("x", &x)]), || {
            p.loss(&m.forward(&x, &mask)?)
        })?;
    }
    Ok(())
}

#[test]
fn gradcheck_cross_attention_and_pair_bias() -> Result<()> {
    let m = MultiHeadAttention::new(&builder(13), 6, 3)?;
    let q = leaf((2, 3, 6), 14)?;
    let kv = leaf((2, 4, 6), 15)?;
    let p = Probe::new((2, 3, 6), 16)?;
    let pad = Tensor::from_vec(vec![1u32, 1, 0, 1, 1, 1, 1, 0], (2, 4), DEV)?;
    for mask in [AttentionMask::Causal, AttentionMask::Padding(pad)] {
        check(&with_inputs(&m, &[("q", &q), ("kv", &kv)]), || {
            p.loss(&m.forward_kv(&q, &kv, &mask)?)
        })?;
    }
    // The free kernel with a learned bias broadcast over the batch, as Evoformer's pair bias.
    let (qh, kh, vh) = (
        leaf((2, 2, 3, 4), 17)?,
        leaf((2, 2, 5, 4), 18)?,
        leaf((2, 2, 5, 3), 19)?,
    );
    let bias = leaf((1, 2, 3, 5), 20)?;
    let p = Probe::new((2, 2, 3, 3), 21)?;
    let ps = [("q", &qh), ("k", &kh), ("v", &vh), ("bias", &bias)]
        .map(|(n, t)| Param::new(n, t.clone()));
    check(&ps, || {
        p.loss(&scaled_dot_product_attention(&qh, &kh, &vh, Some(&bias))?)
    })?;
    Ok(())
}

#[test]
fn gradcheck_transformer_blocks() -> Result<()> {
    let b = builder(22);
    let x = leaf((2, 4, 8), 23)?;
    let p = Probe::new((2, 4, 8), 24)?;
    let mask = AttentionMask::CausalPadding(Tensor::from_vec(
        vec![1u32, 1, 1, 0, 1, 1, 1, 1],
        (2, 4),
        DEV,
    )?);
    let mlp = TransformerBlock::new(&b.pp("mlp"), 8, 2, 16)?;
    let swi = TransformerBlock::swiglu(&b.pp("swi"), 8, 4, 12)?;
    for blk in [&mlp, &swi] {
        check(&with_inputs(blk, &[("x", &x)]), || {
            p.loss(&blk.forward(&x, &mask)?)
        })?;
    }
    assert_eq!(mlp.params()[0].path(), "mlp.ln1.weight");
    Ok(())
}

#[test]
fn gradcheck_lstm_cell_over_three_steps() -> Result<()> {
    let cell = LstmCell::new(&builder(25), 3, 4)?;
    let xs: Vec<Tensor> = (0..3)
        .map(|t| leaf((2, 3), 26 + t))
        .collect::<Result<_>>()?;
    let h0 = leaf((2, 4), 30)?;
    let c0 = leaf((2, 4), 31)?;
    let (ph, pc) = (Probe::new((2, 4), 32)?, Probe::new((2, 4), 33)?);
    let run = || -> Result<Tensor> {
        let mut s = LstmState {
            h: h0.clone(),
            c: c0.clone(),
        };
        for x in &xs {
            s = cell.forward(x, &s)?;
        }
        ph.loss(&s.h)?.add(&pc.loss(&s.c)?)
    };
    let inputs = [("x0", &xs[0]), ("x2", &xs[2]), ("h0", &h0), ("c0", &c0)];
    check(&with_inputs(&cell, &inputs), run)?;
    Ok(())
}

#[test]
fn lstm_cell_matches_the_equations() -> Result<()> {
    let cell = LstmCell::new(&builder(34), 2, 1)?;
    let x = randn((1, 2), 35)?;
    let s = LstmState {
        h: randn((1, 1), 36)?,
        c: randn((1, 1), 37)?,
    };
    let out = cell.forward(&x, &s)?;
    let (w, u) = (
        cell.ih.weight.to_vec2::<f64>()?,
        cell.hh.weight.to_vec2::<f64>()?,
    );
    let bias = cell
        .ih
        .bias
        .as_ref()
        .map(|b| b.to_vec::<f64>())
        .transpose()?;
    let (xv, h, c) = (
        x.to_vec::<f64>()?,
        s.h.to_scalar_f64()?,
        s.c.to_scalar_f64()?,
    );
    let gate = |k: usize| {
        xv[0] * w[0][k] + xv[1] * w[1][k] + h * u[0][k] + bias.as_ref().map_or(0.0, |b| b[k])
    };
    let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
    let c1 = sig(gate(1)) * c + sig(gate(0)) * gate(2).tanh();
    let h1 = sig(gate(3)) * c1.tanh();
    assert!((out.c.to_scalar_f64()? - c1).abs() < 1e-12);
    assert!((out.h.to_scalar_f64()? - h1).abs() < 1e-12);
    Ok(())
}

/// Level 0: leaves 0..4. Level 1: node 0 with children {leaf 0, leaf 2, leaf 1} (3 children,
/// not adjacent in the level's child list), node 1 a leaf, node 2 with child {leaf 3}.
/// Level 2: the root with children {1, 0, 2} of level 1.
struct Tree {
    x0: Tensor,
    x1: Tensor,
    x2: Tensor,
}

impl Tree {
    fn new(input: usize) -> Result<Self> {
        Ok(Tree {
            x0: leaf((4, input), 40)?,
            x1: leaf((3, input), 41)?,
            x2: leaf((1, input), 42)?,
        })
    }
    fn run(&self, cell: &TreeLstmCell) -> Result<(LstmState, LstmState)> {
        let leaves = cell.forward(&self.x0, None)?;
        let rows = Tensor::from_vec(vec![0u32, 3, 2, 1], 4, DEV)?;
        let parent = Tensor::from_vec(vec![0u32, 2, 0, 0], 4, DEV)?;
        let level1 = cell.forward(
            &self.x1,
            Some(&ChildStates::select(&leaves, &rows, parent)?),
        )?;
        let kids = ChildStates::from_parents(level1.h.clone(), level1.c.clone(), &[0, 0, 0])?;
        let root = cell.forward(&self.x2, Some(&kids))?;
        Ok((level1, root))
    }
}

#[test]
fn gradcheck_tree_lstm_on_a_two_level_tree() -> Result<()> {
    let cell = TreeLstmCell::new(&builder(43), 3, 4)?;
    let tree = Tree::new(3)?;
    let (ph, pc) = (Probe::new((1, 4), 44)?, Probe::new((1, 4), 45)?);
    let inputs = [("x0", &tree.x0), ("x1", &tree.x1), ("x2", &tree.x2)];
    check(&with_inputs(&cell, &inputs), || {
        let (_, root) = tree.run(&cell)?;
        ph.loss(&root.h)?.add(&pc.loss(&root.c)?)
    })?;
    Ok(())
}

#[test]
fn batched_tree_level_equals_per_node_calls() -> Result<()> {
    let cell = TreeLstmCell::new(&builder(46), 3, 4)?;
    let tree = Tree::new(3)?;
    let (level1, _) = tree.run(&cell)?;
    let leaves = cell.forward(&tree.x0, None)?;
    let row = |t: &Tensor, i: usize| t.narrow(0, i, 1);
    // Node 0: three children, summed in any order.
    let kids = Tensor::from_vec(vec![1u32, 0, 2], 3, DEV)?;
    let n0 = cell.forward(
        &row(&tree.x1, 0)?,
        Some(&ChildStates::select(
            &leaves,
            &kids,
            Tensor::from_vec(vec![0u32; 3], 3, DEV)?,
        )?),
    )?;
    // Node 1: a leaf, whether given no children or an empty set of them.
    let n1 = cell.forward(&row(&tree.x1, 1)?, None)?;
    // Node 2: one child.
    let n2 = cell.forward(
        &row(&tree.x1, 2)?,
        Some(&ChildStates::from_parents(
            row(&leaves.h, 3)?,
            row(&leaves.c, 3)?,
            &[0],
        )?),
    )?;
    for (i, n) in [n0, n1, n2].iter().enumerate() {
        assert!(max_diff(&row(&level1.h, i)?, &n.h)? < 1e-12, "node {i} h");
        assert!(max_diff(&row(&level1.c, i)?, &n.c)? < 1e-12, "node {i} c");
    }
    // A leaf's cell state is i ⊙ u only: no forget term.
    let lone = cell.forward(&row(&tree.x1, 1)?, None)?;
    assert!(max_diff(&lone.c, &row(&level1.c, 1)?)? == 0.0);
    Ok(())
}

// ----- gradcheck itself -----

#[test]
fn gradcheck_catches_a_wrong_gradient_and_restores_values() -> Result<()> {
    let m = Linear::new(&builder(50), 3, 2)?;
    let x = randn((4, 3), 51)?;
    let before: Vec<Vec<f64>> = m
        .params()
        .iter()
        .map(|p| p.to_vec::<f64>())
        .collect::<Result<_>>()?;
    // y ⊙ detach(y): the analytic gradient misses half of d(y²).
    let err = GradCheck::default()
        .check(&m.params(), || {
            let y = m.forward(&x)?;
            y.mul(&y.detach())?.sum_all()
        })
        .expect_err("a detached factor must be caught");
    let msg = err.to_string();
    assert!(
        msg.contains("weight[0, 0]") && msg.contains("analytic"),
        "{msg}"
    );
    // The honest loss passes.
    let r = GradCheck::default().check(&m.params(), || m.forward(&x)?.sqr()?.sum_all())?;
    assert_eq!(r.checked, 6 + 2);
    assert!(r.worst.is_some());
    let after: Vec<Vec<f64>> = m
        .params()
        .iter()
        .map(|p| p.to_vec::<f64>())
        .collect::<Result<_>>()?;
    assert_eq!(before, after, "values restored bit for bit");
    assert!(m.params().iter().all(|p| p.grad().is_none()));
    Ok(())
}

#[test]
fn gradcheck_samples_large_params_and_handles_unreached_ones() -> Result<()> {
    let b = builder(52);
    let big = Linear::new(&b.pp("big"), 20, 30)?;
    let unused = Linear::new(&b.pp("unused"), 2, 2)?;
    let x = randn((2, 20), 53)?;
    let mut ps = big.params();
    ps.extend(unused.params());
    let gc = GradCheck {
        max_elems_per_param: 5,
        ..GradCheck::default()
    };
    let r = gc.check(&ps, || big.forward(&x)?.tanh()?.sum_all())?;
    assert_eq!(r.checked, 5 + 5 + 4 + 2);
    Ok(())
}

#[test]
fn gradcheck_refuses_f32_params() -> Result<()> {
    let m = Linear::new(&ParamBuilder::new(DType::F32, DEV, 1).pp("lin"), 2, 2)?;
    let x = Tensor::ones((1, 2), DType::F32, DEV)?;
    let err = GradCheck::default()
        .check(&m.params(), || m.forward(&x)?.sum_all())
        .expect_err("f32 is refused");
    assert!(err.to_string().contains("lin.weight"), "{err}");
    Ok(())
}

// ----- mask semantics -----

#[test]
fn causal_mask_does_not_look_ahead() -> Result<()> {
    let m = MultiHeadAttention::new(&builder(60), 8, 2)?;
    let blk = TransformerBlock::new(&builder(61), 8, 2, 16)?;
    let x = randn((2, 5, 8), 62)?;
    let mut v = x.to_vec::<f64>()?;
    for b in 0..2 {
        for d in 0..8 {
            v[(b * 5 + 4) * 8 + d] += 3.0; // change only the last token
        }
    }
    let x2 = Tensor::from_vec(v, (2, 5, 8), DEV)?;
    for f in [
        &|x: &Tensor| m.forward(x, &AttentionMask::Causal) as Result<Tensor>,
        &|x: &Tensor| blk.forward(x, &AttentionMask::Causal),
    ] as [&dyn Fn(&Tensor) -> Result<Tensor>; 2]
    {
        let (y, y2) = (f(&x)?, f(&x2)?);
        assert_eq!(
            y.narrow(1, 0, 4)?.to_vec::<f64>()?,
            y2.narrow(1, 0, 4)?.to_vec::<f64>()?
        );
        assert!(max_diff(&y.narrow(1, 4, 1)?, &y2.narrow(1, 4, 1)?)? > 1e-6);
    }
    // Without the mask the future leaks into the past.
    let (y, y2) = (
        m.forward(&x, &AttentionMask::None)?,
        m.forward(&x2, &AttentionMask::None)?,
    );
    assert!(max_diff(&y.narrow(1, 0, 1)?, &y2.narrow(1, 0, 1)?)? > 1e-6);
    Ok(())
}

#[test]
fn a_prepared_mask_gives_the_same_attention() -> Result<()> {
    let m = MultiHeadAttention::new(&builder(65), 8, 2)?;
    let x = randn((2, 5, 8), 66)?;
    for mask in [
        AttentionMask::None,
        AttentionMask::Causal,
        AttentionMask::Padding(padding()?),
        AttentionMask::CausalPadding(padding()?),
    ] {
        let prepared = mask.prepared(2, 5, 5, x.dtype(), x.device())?;
        assert_eq!(
            m.forward(&x, &mask)?.to_vec::<f64>()?,
            m.forward(&x, &prepared)?.to_vec::<f64>()?,
            "{mask:?}"
        );
    }
    // A causal bias is built once for any batch: (1, 1, seq, seq).
    match AttentionMask::Causal.prepared(1, 5, 5, x.dtype(), x.device())? {
        AttentionMask::Bias(t) => assert_eq!(t.dims(), [1, 1, 5, 5]),
        other => panic!("expected a bias, got {other:?}"),
    }
    Ok(())
}

#[test]
fn padding_mask_ignores_padded_keys() -> Result<()> {
    let m = MultiHeadAttention::new(&builder(63), 8, 2)?;
    let x = randn((2, 5, 8), 64)?;
    let y = m.forward(&x, &AttentionMask::Padding(padding()?))?;
    // Sequence 0 has 3 real tokens: its real outputs are those of the 3-token sequence alone.
    let short = m.forward(&x.narrow(0, 0, 1)?.narrow(1, 0, 3)?, &AttentionMask::None)?;
    assert!(max_diff(&y.narrow(0, 0, 1)?.narrow(1, 0, 3)?, &short)? < 1e-12);
    // Sequence 1 is all real.
    let full = m.forward(&x.narrow(0, 1, 1)?, &AttentionMask::None)?;
    assert!(max_diff(&y.narrow(0, 1, 1)?, &full)? < 1e-12);
    // Causal + padding: the real part matches causal attention over the real tokens.
    let yc = m.forward(&x, &AttentionMask::CausalPadding(padding()?))?;
    let short_c = m.forward(&x.narrow(0, 0, 1)?.narrow(1, 0, 3)?, &AttentionMask::Causal)?;
    assert!(max_diff(&yc.narrow(0, 0, 1)?.narrow(1, 0, 3)?, &short_c)? < 1e-12);
    Ok(())
}

#[test]
fn dropout_is_off_in_eval_mode() -> Result<()> {
    let b = builder(65);
    let plain = TransformerBlock::new(&b, 8, 2, 16)?;
    let mut dropped = plain.clone().with_dropout(0.5, SeedStream::new(1))?;
    dropped.attn = dropped.attn.with_dropout(0.5, SeedStream::new(2))?;
    let x = randn((1, 4, 8), 66)?;
    let mask = AttentionMask::None;
    assert!(max_diff(&plain.forward(&x, &mask)?, &dropped.forward(&x, &mask)?)? > 1e-6);
    dropped.set_train(false);
    assert_eq!(
        plain.forward(&x, &mask)?.to_vec::<f64>()?,
        dropped.forward(&x, &mask)?.to_vec::<f64>()?
    );
    Ok(())
}

// ----- errors, not panics -----

#[test]
fn bad_shapes_are_errors() -> Result<()> {
    let b = builder(70);
    assert!(MultiHeadAttention::new(&b, 10, 3).is_err());
    assert!(MultiHeadAttention::new(&b, 8, 0).is_err());
    let m = MultiHeadAttention::new(&b.pp("mha"), 8, 2)?;
    assert!(
        m.forward(&randn((2, 5, 7), 1)?, &AttentionMask::None)
            .is_err()
    );
    assert!(m.forward(&randn((5, 8), 1)?, &AttentionMask::None).is_err());
    let x = randn((2, 5, 8), 2)?;
    let bad_pad = Tensor::from_vec(vec![1u32; 8], (2, 4), DEV)?;
    assert!(m.forward(&x, &AttentionMask::Padding(bad_pad)).is_err());
    assert!(
        m.forward_kv(
            &randn((2, 4, 8), 3)?,
            &randn((2, 3, 8), 4)?,
            &AttentionMask::Causal
        )
        .is_err()
    );
    assert!(
        m.forward_kv(
            &randn((1, 4, 8), 3)?,
            &randn((2, 4, 8), 4)?,
            &AttentionMask::None
        )
        .is_err()
    );
    assert!(
        scaled_dot_product_attention(
            &randn((2, 3, 4), 5)?,
            &randn((2, 3, 5), 6)?,
            &randn((2, 3, 4), 7)?,
            None
        )
        .is_err()
    );

    let blk = TransformerBlock::new(&b.pp("blk"), 8, 2, 16)?;
    assert!(
        blk.forward(&randn((2, 5, 6), 8)?, &AttentionMask::Causal)
            .is_err()
    );
    let lin = Linear::new(&b.pp("lin"), 4, 3)?;
    assert!(lin.forward(&randn((2, 5), 9)?).is_err());
    assert!(
        LayerNorm::new(&b.pp("ln"), 4)?
            .forward(&randn((2, 5), 9)?)
            .is_err()
    );

    let cell = LstmCell::new(&b.pp("lstm"), 3, 4)?;
    let s = LstmState::zeros(2, 4, DType::F64, DEV)?;
    assert!(cell.forward(&randn((2, 5), 10)?, &s).is_err());
    assert!(cell.forward(&randn((3, 3), 10)?, &s).is_err());
    assert!(
        cell.forward(
            &randn((2, 3), 10)?,
            &LstmState::zeros(2, 5, DType::F64, DEV)?
        )
        .is_err()
    );

    let tree = TreeLstmCell::new(&b.pp("tree"), 3, 4)?;
    let hc = || randn((2, 4), 11);
    assert!(ChildStates::from_parents(hc()?, hc()?, &[0]).is_err());
    assert!(
        ChildStates::new(
            hc()?,
            randn((2, 3), 12)?,
            Tensor::from_vec(vec![0u32, 0], 2, DEV)?
        )
        .is_err()
    );
    assert!(ChildStates::new(hc()?, hc()?, randn(2, 12)?).is_err());
    let far = ChildStates::from_parents(hc()?, hc()?, &[0, 5])?;
    assert!(tree.forward(&randn((2, 3), 13)?, Some(&far)).is_err());
    let kids = ChildStates::from_parents(hc()?, hc()?, &[0, 1])?;
    assert!(tree.forward(&randn((2, 2), 13)?, Some(&kids)).is_err());
    let wide = ChildStates::from_parents(randn((2, 5), 14)?, randn((2, 5), 15)?, &[0, 1])?;
    assert!(tree.forward(&randn((2, 3), 13)?, Some(&wide)).is_err());
    Ok(())
}
