//! Tests of the unary ops: every kind (with `affine` and `powf` at several parameters) is
//! gradient-checked in f64 on contiguous, transposed, narrowed and broadcast inputs, and
//! compared forward and backward with candle in f32, f16 and bf16, including sizes large
//! enough for the parallel kernels.

use crate::common::*;
use candle_core as cc;
use dynn_core::{DType, Result, Tensor};
use dynn_ops::ops::unary::Unary;
use dynn_ops::prelude::*;

/// Kinds whose domain is the positive reals.
fn positive(k: Unary) -> bool {
    matches!(k, Unary::Log | Unary::Sqrt | Unary::Rsqrt | Unary::Powf(_))
}

fn input(k: Unary, shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    if positive(k) { rand_positive_dtype(shape, seed, dtype) } else { rand_dtype(shape, seed, dtype) }
}

/// The same function in candle.
fn candle_unary(k: Unary, x: &cc::Tensor) -> cc::Result<cc::Tensor> {
    match k {
        Unary::Neg => x.neg(),
        Unary::Abs => x.abs(),
        Unary::Exp => x.exp(),
        Unary::Log => x.log(),
        Unary::Sqrt => x.sqrt(),
        Unary::Rsqrt => x.sqrt()?.recip(),
        Unary::Tanh => x.tanh(),
        Unary::Sigmoid => candle_nn::ops::sigmoid(x),
        Unary::Relu => x.relu(),
        Unary::Gelu => x.gelu(),
        Unary::GeluErf => x.gelu_erf(),
        Unary::Silu => x.silu(),
        Unary::Sin => x.sin(),
        Unary::Cos => x.cos(),
        Unary::Sqr => x.sqr(),
        Unary::Recip => x.recip(),
        Unary::Affine { mul, add } => x.affine(mul, add),
        Unary::Powf(e) => x.powf(e),
    }
}

/// Every kind, plus extra parameters of the parameterised ones.
fn kinds_like(k: Unary) -> Vec<Unary> {
    match k {
        Unary::Affine { .. } => vec![k, Unary::Affine { mul: -2.0, add: 0.5 }, Unary::Affine { mul: 0.0, add: 3.0 }],
        Unary::Powf(_) => vec![k, Unary::Powf(-1.5), Unary::Powf(3.0), Unary::Powf(0.5)],
        _ => vec![k],
    }
}

fn grad_case(k: Unary) -> Result<()> {
    for k in kinds_like(k) {
        let x = |s: &[usize], seed: u64| input(k, s, seed, DType::F64);
        let f = |v: &[Tensor]| v[0].unary(k);
        gradcheck(&[x(&[3, 4], 1)], f).ctx(format!("{k:?} contiguous"))?;
        gradcheck(&[x(&[], 2)], f).ctx(format!("{k:?} rank 0"))?;
        gradcheck(&[x(&[4, 3], 3).t()?], f).ctx(format!("{k:?} transposed"))?;
        gradcheck(&[x(&[2, 3, 4], 4).permute(&[2, 0, 1])?], f).ctx(format!("{k:?} permuted"))?;
        // Inner blocks of 20 contiguous elements: the strided block path of the kernels.
        gradcheck(&[x(&[3, 40], 5).narrow(1, 5, 20)?], f).ctx(format!("{k:?} narrowed"))?;
        gradcheck(&[x(&[1, 4], 6)], |v| v[0].broadcast_as((3, 4))?.unary(k)).ctx(format!("{k:?} broadcast inside"))?;
        // A second use of the same input: gradients accumulate.
        gradcheck(&[x(&[5], 7)], |v| v[0].unary(k)?.mul(&v[0].unary(k)?)).ctx(format!("{k:?} used twice"))?;
    }
    Ok(())
}

fn oracle_case(k: Unary) -> Result<()> {
    for k in kinds_like(k) {
        let f = |v: &[Tensor]| v[0].unary(k);
        let cf = |v: &[cc::Tensor]| candle_unary(k, &v[0]);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let t = tol(dtype);
            let x = |s: &[usize], seed: u64| input(k, s, seed, dtype);
            let what = |w: &str| format!("{k:?} {dtype} {w}");
            oracle(&[x(&[2, 3, 5], 11)], f, cf, t).ctx(what("contiguous"))?;
            oracle(&[x(&[5, 3, 2], 12).permute(&[2, 1, 0])?], f, cf, t).ctx(what("permuted"))?;
            oracle(&[x(&[4, 30], 13).narrow(1, 3, 20)?], f, cf, t).ctx(what("narrowed"))?;
        }
        // A broadcast input (stride 0): its gradient sums four products, whose half-precision
        // roundings are not relative to a sum that may cancel, so this one runs in f32.
        let xb = input(k, &[3, 1], 14, DType::F32);
        oracle(&[xb], |v| v[0].broadcast_as((3, 4))?.unary(k), |v| candle_unary(k, &v[0].broadcast_as((3, 4))?), tol(DType::F32))
            .ctx(format!("{k:?} broadcast"))?;
        // Above the parallel threshold (2^15 elements): contiguous, strided blocks, strided rows.
        let t = tol(DType::F32);
        let x = |s: &[usize], seed: u64| input(k, s, seed, DType::F32);
        oracle(&[x(&[190, 190], 15)], f, cf, t).ctx(format!("{k:?} large contiguous"))?;
        oracle(&[x(&[190, 210], 16).narrow(1, 7, 190)?], f, cf, t).ctx(format!("{k:?} large narrowed"))?;
        oracle(&[x(&[190, 190], 17).t()?], f, cf, t).ctx(format!("{k:?} large transposed"))?;
    }
    Ok(())
}

macro_rules! cases {
    ($run:ident: $($kind:expr => [$($name:literal),*]),* $(,)?) => {
        &[$((&[$($name),*], || $run($kind))),*]
    };
}

pub const GRAD_CASES: &[Case] = cases!(grad_case:
    Unary::Neg => ["neg"],
    Unary::Abs => ["abs"],
    Unary::Exp => ["exp"],
    Unary::Log => ["log"],
    Unary::Sqrt => ["sqrt"],
    Unary::Rsqrt => ["rsqrt"],
    Unary::Tanh => ["tanh"],
    Unary::Sigmoid => ["sigmoid"],
    Unary::Relu => ["relu"],
    Unary::Gelu => ["gelu"],
    Unary::GeluErf => ["gelu_erf"],
    Unary::Silu => ["silu"],
    Unary::Sin => ["sin"],
    Unary::Cos => ["cos"],
    Unary::Sqr => ["sqr"],
    Unary::Recip => ["recip"],
    Unary::Affine { mul: 1.5, add: -0.25 } => ["affine"],
    Unary::Powf(2.5) => ["powf"],
);

pub const ORACLE_CASES: &[Case] = cases!(oracle_case:
    Unary::Neg => ["neg", "neg_backward"],
    Unary::Abs => ["abs", "abs_backward"],
    Unary::Exp => ["exp", "exp_backward"],
    Unary::Log => ["log", "log_backward"],
    Unary::Sqrt => ["sqrt", "sqrt_backward"],
    Unary::Rsqrt => ["rsqrt", "rsqrt_backward"],
    Unary::Tanh => ["tanh", "tanh_backward"],
    Unary::Sigmoid => ["sigmoid", "sigmoid_backward"],
    Unary::Relu => ["relu", "relu_backward"],
    Unary::Gelu => ["gelu", "gelu_backward"],
    Unary::GeluErf => ["gelu_erf", "gelu_erf_backward"],
    Unary::Silu => ["silu", "silu_backward"],
    Unary::Sin => ["sin", "sin_backward"],
    Unary::Cos => ["cos", "cos_backward"],
    Unary::Sqr => ["sqr", "sqr_backward"],
    Unary::Recip => ["recip", "recip_backward"],
    Unary::Affine { mul: 1.5, add: -0.25 } => ["affine", "affine_backward"],
    Unary::Powf(2.5) => ["powf", "powf_backward"],
);

/// The case lists cover every kind of `Unary::ALL` (a new kind must get cases).
#[test]
fn cases_cover_every_kind() {
    for k in Unary::ALL {
        assert!(GRAD_CASES.iter().any(|c| c.0.contains(&k.name())), "{} has no gradient case", k.name());
        assert!(ORACLE_CASES.iter().any(|c| c.0.contains(&k.backward_name())), "{} has no oracle case", k.backward_name());
    }
}

/// Integer inputs are refused with a dtype error naming the op, for every kind.
#[test]
fn integer_inputs_are_refused() {
    let x = rand_dtype(&[3], 1, DType::I64);
    for k in Unary::ALL {
        let e = x.unary(k).expect_err("integer input must fail").to_string();
        assert!(e.contains(k.name()) && e.contains("I64"), "{e}");
    }
}
