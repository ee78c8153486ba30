//! The Evoformer-lite: finite-difference gradients at a tiny f64 config (one iteration, and
//! the last iteration given a fixed recycled state), stop-gradient through the earlier
//! iterations, graphs that change with the number of recycles, and bad configs.

use dynn_models::data::protein;
use dynn_models::gradcheck::GradCheck;
use dynn_models::models::evoformer::{Evoformer, EvoformerConfig, EvoformerTask};
use dynn_models::nn::{Module, ParamBuilder};
use dynn_models::rng::Rng;
use dynn_models::train::{Defaults, TrainArgs, train};
use dynn_ops::prelude::*;

fn tiny() -> EvoformerConfig {
    EvoformerConfig {
        msa_dim: 4,
        pair_dim: 4,
        heads: 2,
        blocks: 1,
        max_recycles: 4,
        len: 5,
        msa_depth: 3,
        bins: 4,
        opm_dim: 2,
        tri_dim: 3,
        transition: 2,
        max_rel: 2,
        eval_samples: 2,
        chunk_bytes: None,
    }
}

fn model(cfg: &EvoformerConfig) -> Result<Evoformer> {
    Evoformer::new(&ParamBuilder::new(DType::F64, Device::Cpu, 3), cfg)
}

fn check() -> GradCheck {
    GradCheck {
        max_elems_per_param: 3,
        ..GradCheck::default()
    }
}

#[test]
fn gradients_of_one_iteration() -> Result<()> {
    let cfg = tiny();
    let m = model(&cfg)?;
    let (msa, dist) = protein::batch(&mut Rng::new(1), &cfg.protein(), 2, Device::Cpu)?;
    let r = check().check(&m.params(), || {
        m.loss(&m.forward_with_recycles(&msa, 1)?, &dist)
    })?;
    assert!(r.checked > 100, "{r:?}");
    Ok(())
}

#[test]
fn gradients_of_the_last_iteration_given_a_recycled_state() -> Result<()> {
    let cfg = tiny();
    let m = model(&cfg)?;
    let (msa, dist) = protein::batch(&mut Rng::new(2), &cfg.protein(), 1, Device::Cpu)?;
    let prev = {
        let _g = no_grad();
        m.iteration(&msa, None)?.detach()
    };
    // Only the recycling embeddings and what follows them: the state is fixed data here.
    let r = check().check(&m.params(), || {
        m.loss(&m.distogram(&m.iteration(&msa, Some(&prev))?.pair)?, &dist)
    })?;
    assert!(r.checked > 100, "{r:?}");
    Ok(())
}

#[test]
fn chunking_the_outer_product_mean_keeps_the_loss_and_gradients() -> Result<()> {
    let whole = tiny();
    // At batch 2 in f64, one residue row of the outer product takes 2·2·5·2·8 = 320 bytes and
    // one row of either transition's hidden layer 640: 700 bytes make the outer-product mean
    // run in chunks of 2, 2 and 1 rows and both transitions one row at a time.
    let chunked = EvoformerConfig {
        chunk_bytes: Some(700),
        ..whole.clone()
    };
    let (msa, dist) = protein::batch(&mut Rng::new(5), &whole.protein(), 2, Device::Cpu)?;
    let mut grads = Vec::new();
    for cfg in [&whole, &chunked] {
        let m = model(cfg)?;
        let loss = m.loss(&m.forward_with_recycles(&msa, 2)?, &dist)?;
        loss.backward()?;
        let mut g = vec![loss.to_scalar_f64()?];
        for p in m.params() {
            g.extend(p.grad().expect("every parameter is used").to_f64_vec()?);
        }
        grads.push(g);
    }
    assert_eq!(grads[0].len(), grads[1].len());
    for (i, (a, b)) in grads[0].iter().zip(&grads[1]).enumerate() {
        assert!((a - b).abs() <= 1e-12 * (1.0 + a.abs()), "#{i}: {a} vs {b}");
    }
    assert!(grads[0].iter().skip(1).any(|g| *g != 0.0));
    Ok(())
}

/// Each layer's residual form (the sum added by its last op) gives the bits of `x + layer(x)`,
/// whole and in chunks.
#[test]
fn residual_forms_give_the_bits_of_the_separate_sums() -> Result<()> {
    use dynn_models::models::evoformer::{
        GatedAttention, OuterProductMean, Transition, Triangle, TriangleMultiplication,
    };
    use dynn_models::nn::Forward;
    let b = ParamBuilder::new(DType::F64, Device::Cpu, 4);
    let mut rng = Rng::new(6);
    let mut randn = |dims: &[usize]| -> Result<Tensor> {
        let v: Vec<f64> = (0..dims.iter().product()).map(|_| rng.normal()).collect();
        Tensor::from_vec(v, dims.to_vec(), Device::Cpu)
    };
    let (m, z) = (randn(&[2, 3, 5, 4])?, randn(&[2, 5, 5, 4])?);
    let bias = randn(&[2, 1, 2, 3, 3])?;
    let same = |a: Tensor, b: Tensor| -> Result<()> {
        assert_eq!(a.dims(), b.dims());
        assert_eq!(a.to_f64_vec()?, b.to_f64_vec()?);
        Ok(())
    };
    let attn = GatedAttention::new(&b.pp("attn"), 4, 2)?;
    let mt = m.transpose(1, 2)?;
    same(
        attn.forward_residual(&mt, Some(&bias))?,
        mt.add(&attn.forward(&mt, Some(&bias))?)?,
    )?;
    let (t, opm) = (
        Transition::new(&b.pp("t"), 4, 2)?,
        OuterProductMean::new(&b.pp("opm"), 4, 4, 2)?,
    );
    // 100 bytes: one row per chunk for both.
    for chunk in [None, Some(100)] {
        let t = t.clone().chunked(chunk);
        same(t.forward_residual(&z)?, z.add(&t.forward(&z)?)?)?;
        let opm = opm.clone().chunked(chunk);
        same(opm.forward_residual(&m, &z)?, z.add(&opm.forward(&m)?)?)?;
    }
    for (name, kind) in [("out", Triangle::Outgoing), ("in", Triangle::Incoming)] {
        let tri = TriangleMultiplication::new(&b.pp(name), kind, 4, 3)?;
        same(tri.forward_residual(&z)?, z.add(&tri.forward(&z)?)?)?;
    }
    Ok(())
}

#[test]
fn earlier_iterations_pass_no_gradient() -> Result<()> {
    let cfg = tiny();
    let m = model(&cfg)?;
    let (msa, dist) = protein::batch(&mut Rng::new(3), &cfg.protein(), 2, Device::Cpu)?;
    let grads = |loss: Tensor| -> Result<Vec<Vec<f64>>> {
        m.params().iter().for_each(|p| p.zero_grad());
        loss.backward()?;
        m.params()
            .iter()
            .map(|p| {
                p.grad()
                    .map_or(Ok(vec![0.0; p.elem_count()]), |g| g.to_f64_vec())
            })
            .collect()
    };
    let through_loop = grads(m.loss(&m.forward_with_recycles(&msa, 3)?, &dist)?)?;
    let prev = {
        let _g = no_grad();
        let first = m.iteration(&msa, None)?.detach();
        m.iteration(&msa, Some(&first))?.detach()
    };
    let last_only = grads(m.loss(&m.distogram(&m.iteration(&msa, Some(&prev))?.pair)?, &dist)?)?;
    assert_eq!(through_loop, last_only);
    // The recycling embeddings are trained (they get a gradient) once there is a recycle.
    let recycle = m.recycle_pair.weight.grad().expect("reached by backward");
    assert!(recycle.to_f64_vec()?.iter().any(|&g| g != 0.0));
    Ok(())
}

#[test]
fn recycles_change_the_graph() -> Result<()> {
    let cfg = EvoformerConfig {
        msa_dim: 8,
        pair_dim: 8,
        len: 8,
        msa_depth: 4,
        ..tiny()
    };
    let args = TrainArgs {
        steps: Some(5),
        batch: Some(2),
        quiet: true,
        ..Default::default()
    };
    let defaults = Defaults {
        steps: 5,
        batch: 2,
        lr: 1e-3,
    };
    let out = train(&args, defaults, || {
        EvoformerTask::new(cfg.clone(), 0, Device::Cpu)
    })?;
    assert!(out.summary.distinct_graphs >= 2, "{:?}", out.summary);
    assert!(out.losses.iter().all(|l| l.is_finite()));
    assert_eq!(out.summary.eval_metric, "distogram_accuracy");
    assert!((0.0..=1.0).contains(&out.summary.eval_value));
    Ok(())
}

#[test]
fn bad_configs_and_inputs_are_errors() -> Result<()> {
    let ok = tiny();
    assert!(ok.validate().is_ok());
    let bad = [
        EvoformerConfig {
            heads: 3,
            ..ok.clone()
        },
        EvoformerConfig {
            len: 1,
            ..ok.clone()
        },
        EvoformerConfig {
            bins: 1,
            ..ok.clone()
        },
        EvoformerConfig {
            max_recycles: 0,
            ..ok.clone()
        },
        EvoformerConfig {
            blocks: 0,
            ..ok.clone()
        },
        EvoformerConfig {
            msa_depth: 0,
            ..ok.clone()
        },
        EvoformerConfig {
            chunk_bytes: Some(0),
            ..ok.clone()
        },
    ];
    for cfg in bad {
        assert!(cfg.validate().is_err(), "{cfg:?}");
        assert!(EvoformerTask::new(cfg, 0, Device::Cpu).is_err());
    }
    let m = model(&ok)?;
    let (msa, dist) = protein::batch(&mut Rng::new(4), &ok.protein(), 1, Device::Cpu)?;
    assert!(m.forward_with_recycles(&msa, 0).is_err());
    let floats = msa.to_dtype(DType::F64)?;
    assert!(m.forward_with_recycles(&floats, 1).is_err());
    assert!(m.forward_with_recycles(&msa.reshape((3, 5))?, 1).is_err());
    let out_of_vocab = Tensor::full(21.0, (1, 3, 5), DType::U32, Device::Cpu)?;
    assert!(m.forward_with_recycles(&out_of_vocab, 1).is_err());
    let logits = m.forward_with_recycles(&msa, 1)?;
    assert!(m.loss(&logits, &dist.reshape((5, 5))?).is_err());
    Ok(())
}
