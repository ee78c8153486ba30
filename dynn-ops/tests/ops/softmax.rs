//! Tests of softmax and log_softmax: gradient checks (any dim, non-contiguous inputs) and
//! forward + backward against `candle_nn::ops::softmax` / `log_softmax` in f32, f16 and bf16.

use crate::common::*;
use candle_core as cc;
use dynn_core::{DType, Error, Result, Tensor};
use dynn_ops::prelude::*;

pub const GRAD_CASES: &[Case] = &[
    (&["softmax"], grad_softmax),
    (&["log_softmax"], grad_log_softmax),
];

pub const ORACLE_CASES: &[Case] = &[
    (&["softmax", "softmax_backward"], oracle_softmax),
    (&["log_softmax", "log_softmax_backward"], oracle_log_softmax),
];

/// Inputs covering: last dim, a middle dim, dim 0, a transposed view, a narrowed view, a row
/// length that is not a multiple of 16, and a single-element dim.
fn grad_inputs() -> Result<Vec<(Tensor, i32)>> {
    Ok(vec![
        (randn(&[3, 5], 1), -1),
        (randn(&[2, 4, 3], 2), 1),
        (randn(&[4, 3], 3), 0),
        (randn(&[5, 3], 4).t()?, -1),
        (randn(&[3, 21], 5).narrow(1, 2, 17)?, 1),
        (randn(&[3, 1], 6), 1),
    ])
}

fn grad_softmax() -> Result<()> {
    for (i, (x, d)) in grad_inputs()?.into_iter().enumerate() {
        gradcheck(&[x], |xs| xs[0].softmax(d)).ctx(format!("softmax input {i}"))?;
    }
    Ok(())
}

fn grad_log_softmax() -> Result<()> {
    for (i, (x, d)) in grad_inputs()?.into_iter().enumerate() {
        gradcheck(&[x], |xs| xs[0].log_softmax(d)).ctx(format!("log_softmax input {i}"))?;
    }
    Ok(())
}

/// `(input, dim)` pairs for the oracle in `dtype`: small, a row not a multiple of 16, a middle
/// dim, a transposed view, and one large enough for the parallel path.
fn oracle_inputs(dtype: DType) -> Result<Vec<(Tensor, usize)>> {
    Ok(vec![
        (rand_dtype(&[4, 7], 11, dtype), 1),
        (rand_dtype(&[3, 37], 12, dtype), 1),
        (rand_dtype(&[2, 5, 3], 13, dtype), 1),
        (rand_dtype(&[6, 4], 14, dtype).t()?, 1),
        (rand_dtype(&[6, 4], 15, dtype).t()?, 0),
        (rand_dtype(&[48, 1031], 16, dtype), 1),
    ])
}

/// `f` applied by candle in f64, the result converted back to `x`'s dtype (differentiable).
fn in_f64(
    x: &cc::Tensor,
    f: impl Fn(&cc::Tensor) -> cc::Result<cc::Tensor>,
) -> cc::Result<cc::Tensor> {
    f(&x.to_dtype(cc::DType::F64)?)?.to_dtype(x.dtype())
}

fn check(log: bool) -> Result<()> {
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        for (i, (x, d)) in oracle_inputs(dtype)?.into_iter().enumerate() {
            let what = format!(
                "{} {dtype} input {i} (shape {}, dim {d})",
                if log { "log_softmax" } else { "softmax" },
                x.shape()
            );
            // candle computes in f64 and rounds to the dtype under test: its composed f32
            // backward (through max_keepdim) leaves rounding residue on each row's argmax.
            let r = if log {
                oracle(
                    &[x],
                    |xs| xs[0].log_softmax(d),
                    |cs| in_f64(&cs[0], |t| candle_nn::ops::log_softmax(t, d)),
                    tol(dtype),
                )
            } else {
                oracle(
                    &[x],
                    |xs| xs[0].softmax(d),
                    |cs| in_f64(&cs[0], |t| candle_nn::ops::softmax(t, d)),
                    tol(dtype),
                )
            };
            r.ctx(what)?;
        }
    }
    // Large logits stay finite (the max is subtracted first).
    let x = from_f64(&[1000.0, 1001.0, 999.0, -1000.0], &[1, 4], DType::F32)?;
    let cx = to_candle(&x);
    assert_close(&x.softmax(1)?, &ce(candle_nn::ops::softmax(&cx, 1))?, 1e-6)
        .ctx("softmax of large logits")?;
    assert_close(
        &x.log_softmax(1)?,
        &ce(candle_nn::ops::log_softmax(&cx, 1))?,
        1e-6,
    )
    .ctx("log_softmax of large logits")?;
    Ok(())
}

fn oracle_softmax() -> Result<()> {
    check(false)
}

fn oracle_log_softmax() -> Result<()> {
    check(true)
}

#[test]
fn softmax_errors_are_typed() {
    let i = Tensor::from_vec(vec![1i64, 2, 3], 3, dynn_core::Device::Cpu).unwrap();
    assert!(matches!(
        i.softmax(0),
        Err(Error::UnsupportedDType { op: "softmax", .. })
    ));
    let x = rand_f32(&[2, 3], 1);
    let e = x.log_softmax(2).unwrap_err();
    assert!(
        matches!(
            e,
            Error::DimOutOfRange {
                op: "log_softmax",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn softmax_is_independent_of_thread_count() {
    let x = rand_f32(&[64, 1000], 7);
    let many = x.softmax(1).unwrap().to_vec::<f32>().unwrap();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let one = pool.install(|| x.softmax(1).unwrap().to_vec::<f32>().unwrap());
    assert_eq!(many, one);
    // Rows sum to one.
    for row in many.chunks(1000) {
        let s: f32 = row.iter().sum();
        assert!((s - 1.0).abs() < 1e-5, "row sums to {s}");
    }
}
