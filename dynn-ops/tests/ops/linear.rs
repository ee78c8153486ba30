//! Tests of the dense layer's ops (`linear`, `linear_relu`, `linear_sigmoid`, `linear_tanh`,
//! `add_linear`): gradient checks in f64 with transposed and narrowed operands; forward and
//! backward against candle's `broadcast_matmul` + `broadcast_add` (+ the activation or the
//! residual) in f32, f16 and bf16, including sizes that take the parallel, batch-folding and
//! parallel bias-filling paths; and the fused ops' bits against the separate ops they fuse.

use crate::common::*;
use candle_core as cc;
use dynn_core::{DType, Result, Tensor};
use dynn_ops::prelude::*;

/// A dynn function of the case's tensors.
type DynnFn = fn(&[Tensor]) -> Result<Tensor>;

/// One variant of the op: how dynn and candle compute it from `(x, w, b[, r])`.
struct Variant {
    name: &'static str,
    dynn: DynnFn,
    candle: fn(&[cc::Tensor]) -> cc::Result<cc::Tensor>,
    /// The same function through the separate ops (`linear` then the epilogue), whose bits
    /// the fused op must give (`None`: nothing to compare, `linear` itself).
    separate: Option<DynnFn>,
    residual: bool,
}

fn clin(x: &[cc::Tensor]) -> cc::Result<cc::Tensor> {
    x[0].broadcast_matmul(&x[1])?.broadcast_add(&x[2])
}

const VARIANTS: [Variant; 5] = [
    Variant {
        name: "linear",
        dynn: |x| x[0].linear(&x[1], &x[2]),
        candle: clin,
        separate: None,
        residual: false,
    },
    Variant {
        name: "linear_relu",
        dynn: |x| x[0].linear_act(&x[1], &x[2], Activation::Relu),
        candle: |x| clin(x)?.relu(),
        separate: Some(|x| x[0].linear(&x[1], &x[2])?.relu()),
        residual: false,
    },
    Variant {
        name: "linear_sigmoid",
        dynn: |x| x[0].linear_act(&x[1], &x[2], Activation::Sigmoid),
        candle: |x| candle_nn::ops::sigmoid(&clin(x)?),
        separate: Some(|x| x[0].linear(&x[1], &x[2])?.sigmoid()),
        residual: false,
    },
    Variant {
        name: "linear_tanh",
        dynn: |x| x[0].linear_act(&x[1], &x[2], Activation::Tanh),
        candle: |x| clin(x)?.tanh(),
        separate: Some(|x| x[0].linear(&x[1], &x[2])?.tanh()),
        residual: false,
    },
    Variant {
        name: "add_linear",
        dynn: |x| x[3].add_linear(&x[0], &x[1], &x[2]),
        candle: |x| x[3].broadcast_add(&clin(x)?),
        separate: Some(|x| x[3].add(&x[0].linear(&x[1], &x[2])?)),
        residual: true,
    },
];

/// `(x, w, b)` of the given shapes plus, for a residual variant, `r` of the output's shape.
fn operands(v: &Variant, x: &[usize], w: &[usize], b: usize, seed: u64, dtype: DType) -> Vec<Tensor> {
    let mut t = vec![rand_dtype(x, seed, dtype), rand_dtype(w, seed + 1, dtype), rand_dtype(&[b], seed + 2, dtype)];
    if v.residual {
        let mut out = x[..x.len() - 1].to_vec();
        out.push(w[1]);
        t.push(rand_dtype(&out, seed + 3, dtype));
    }
    t
}

fn grad_case(v: &Variant) -> Result<()> {
    let f = v.dynn;
    let n = v.name;
    gradcheck(&operands(v, &[3, 4], &[4, 5], 5, 1, DType::F64), f).ctx(format!("{n} 2d"))?;
    gradcheck(&operands(v, &[2, 3, 4], &[4, 2], 2, 4, DType::F64), f).ctx(format!("{n} batch of rows"))?;
    let mut t = operands(v, &[2, 3, 4], &[4, 5], 5, 7, DType::F64);
    t[0] = randn(&[2, 4, 3], 7).transpose(1, 2)?;
    gradcheck(&t, f).ctx(format!("{n} transposed input"))?;
    let mut t = operands(v, &[3, 4], &[4, 5], 5, 10, DType::F64);
    t[1] = randn(&[5, 4], 11).t()?;
    t[2] = randn(&[10], 12).narrow(0, 2, 5)?;
    if v.residual {
        t[3] = randn(&[5, 3], 13).t()?;
    }
    gradcheck(&t, f).ctx(format!("{n} transposed weight, narrowed bias, transposed residual"))?;
    Ok(())
}

fn oracle_case(v: &Variant) -> Result<()> {
    let (f, cf, n) = (v.dynn, v.candle, v.name);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let t = tol(dtype) * 4.0;
        oracle(&operands(v, &[5, 7], &[7, 3], 3, 1, dtype), f, cf, t).ctx(format!("{n} 2d {dtype}"))?;
        oracle(&operands(v, &[4, 6, 8], &[8, 5], 5, 4, dtype), f, cf, t).ctx(format!("{n} folded batch {dtype}"))?;
    }
    oracle(&operands(v, &[2, 96, 80], &[80, 640], 640, 7, DType::F32), f, cf, 1e-4).ctx(format!("{n} parallel bias fill"))?;
    let mut t = operands(v, &[30, 40], &[40, 50], 50, 10, DType::F32);
    t[0] = rand_f32(&[40, 30], 14).t()?;
    t[1] = rand_f32(&[50, 40], 15).t()?;
    oracle(&t, f, cf, 1e-4).ctx(format!("{n} transposed operands"))?;
    Ok(())
}

/// The fused op gives the bits of the separate ops, forward and backward.
fn same_bits_case(v: &Variant) -> Result<()> {
    let Some(separate) = v.separate else {
        return Ok(());
    };
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        for (what, mut t) in [
            ("2d", operands(v, &[6, 9], &[9, 7], 7, 21, dtype)),
            ("batched", operands(v, &[3, 5, 9], &[9, 70], 70, 25, dtype)),
        ] {
            if what == "batched" {
                t[0] = t[0].transpose(0, 1)?.contiguous()?.transpose(0, 1)?;
            }
            let ctx = format!("{} {what} {dtype}", v.name);
            let (fused, apart) = {
                let _g = no_grad();
                ((v.dynn)(&t)?, separate(&t)?)
            };
            assert_bits(&fused, &apart).ctx(format!("{ctx}: forward"))?;
            let r = rand_dtype(fused.dims(), 99, dtype);
            let (gf, gs) = (dynn_grad(&t, v.dynn, &r)?, dynn_grad(&t, separate, &r)?);
            for (i, (a, b)) in gf.iter().zip(&gs).enumerate() {
                assert_bits(a, b).ctx(format!("{ctx}: gradient of input {i}"))?;
            }
        }
    }
    Ok(())
}

fn grad_cases() -> Result<()> {
    VARIANTS.iter().try_for_each(grad_case)
}

fn oracle_cases() -> Result<()> {
    VARIANTS.iter().try_for_each(oracle_case)?;
    VARIANTS.iter().try_for_each(same_bits_case)
}

const NAMES: &[&str] = &["linear", "linear_relu", "linear_sigmoid", "linear_tanh", "add_linear"];

pub const GRAD_CASES: &[Case] = &[(NAMES, grad_cases)];
pub const ORACLE_CASES: &[Case] = &[(NAMES, oracle_cases)];
