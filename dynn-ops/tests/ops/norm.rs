//! Tests of layer_norm and rms_norm: gradient checks of x, weight and bias (with and without
//! the optional parameters, non-contiguous inputs), forward against candle-nn's fused
//! `layer_norm` / `rms_norm`, and forward + backward against candle-nn's composed
//! `layer_norm_slow` / `rms_norm_slow` (the fused candle ops have no backward), in f32, f64,
//! f16 and bf16.

use crate::common::*;
use candle_core as cc;
use dynn_core::{DType, Device, Error, Result, Tensor};
use dynn_ops::prelude::*;

pub const GRAD_CASES: &[Case] = &[
    (&["layer_norm"], grad_layer_norm),
    (&["rms_norm"], grad_rms_norm),
];

pub const ORACLE_CASES: &[Case] = &[
    (&["layer_norm", "layer_norm_backward"], oracle_layer_norm),
    (&["rms_norm", "rms_norm_backward"], oracle_rms_norm),
];

/// Exactly representable in every float dtype, so dynn and candle add the same eps.
const EPS: f64 = 1.0 / 65536.0;

fn grad_layer_norm() -> Result<()> {
    let (x, w, b) = (randn(&[3, 6], 1), randn(&[6], 2), randn(&[6], 3));
    gradcheck(&[x.clone(), w.clone(), b.clone()], |t| {
        t[0].layer_norm(Some(&t[1]), Some(&t[2]), EPS)
    })
    .ctx("x, w, b")?;
    gradcheck(&[x.clone(), w.clone()], |t| {
        t[0].layer_norm(Some(&t[1]), None, EPS)
    })
    .ctx("x, w")?;
    gradcheck(&[x.clone(), b.clone()], |t| {
        t[0].layer_norm(None, Some(&t[1]), EPS)
    })
    .ctx("x, b")?;
    gradcheck(&[randn(&[5, 4], 4).t()?], |t| {
        t[0].layer_norm(None, None, EPS)
    })
    .ctx("transposed x, no params")?;
    let x3 = randn(&[2, 3, 9], 5).narrow(2, 2, 5)?;
    let w3 = randn(&[8], 6).narrow(0, 1, 5)?;
    gradcheck(&[x3, w3, randn(&[5], 7)], |t| {
        t[0].layer_norm(Some(&t[1]), Some(&t[2]), EPS)
    })
    .ctx("narrowed rank-3 x and w")?;
    // Only the weight wants a gradient.
    gradcheck_some(&[x, w, b], &[false, true, false], |t| {
        t[0].layer_norm(Some(&t[1]), Some(&t[2]), EPS)
    })
    .ctx("w only")?;
    Ok(())
}

fn grad_rms_norm() -> Result<()> {
    let (x, w) = (randn(&[4, 7], 11), randn(&[7], 12));
    gradcheck(&[x.clone(), w.clone()], |t| t[0].rms_norm(Some(&t[1]), EPS)).ctx("x, w")?;
    gradcheck(&[x], |t| t[0].rms_norm(None, EPS)).ctx("x")?;
    gradcheck(
        &[randn(&[6, 3, 2], 13).permute(&[2, 1, 0])?, randn(&[6], 14)],
        |t| t[0].rms_norm(Some(&t[1]), EPS),
    )
    .ctx("permuted x")?;
    Ok(())
}

fn shapes() -> Vec<Vec<usize>> {
    vec![vec![4, 7], vec![2, 3, 37], vec![64, 1024], vec![1, 5]]
}

fn ones_like_last(x: &cc::Tensor) -> cc::Result<cc::Tensor> {
    cc::Tensor::ones(x.dim(cc::D::Minus1)?, x.dtype(), x.device())
}

fn oracle_layer_norm() -> Result<()> {
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        for (i, s) in shapes().iter().enumerate() {
            let c = *s.last().unwrap_or(&1);
            let x = rand_dtype(s, 20 + i as u64, dtype);
            let w = rand_dtype(&[c], 30 + i as u64, dtype);
            let b = rand_dtype(&[c], 40 + i as u64, dtype);
            let what = format!("layer_norm {dtype} shape {s:?}");
            oracle(
                &[x.clone(), w.clone(), b.clone()],
                |t| t[0].layer_norm(Some(&t[1]), Some(&t[2]), EPS),
                |t| candle_nn::ops::layer_norm_slow(&t[0], &t[1], &t[2], EPS as f32),
                tol(dtype),
            )
            .ctx(&what)?;
            oracle(
                std::slice::from_ref(&x),
                |t| t[0].layer_norm(None, None, EPS),
                |t| {
                    candle_nn::ops::layer_norm_slow(
                        &t[0],
                        &ones_like_last(&t[0])?,
                        &ones_like_last(&t[0])?.zeros_like()?,
                        EPS as f32,
                    )
                },
                tol(dtype),
            )
            .ctx(format!("{what} without weight and bias"))?;
            // The fused candle kernel (forward only; it has no f64 kernel).
            if dtype == DType::F64 {
                continue;
            }
            let (cx, cw, cb) = (
                reference_input(&x),
                reference_input(&w),
                reference_input(&b),
            );
            let want = ce(candle_nn::ops::layer_norm(&cx, &cw, &cb, EPS as f32))?;
            assert_close(&x.layer_norm(Some(&w), Some(&b), EPS)?, &want, tol(dtype))
                .ctx(format!("{what} vs fused candle"))?;
        }
    }
    // A transposed input.
    let x = rand_f32(&[9, 6], 50).t()?;
    let w = rand_f32(&[9], 51);
    oracle(
        &[x, w],
        |t| t[0].layer_norm(Some(&t[1]), None, EPS),
        |t| candle_nn::ops::layer_norm_slow(&t[0], &t[1], &t[1].zeros_like()?, EPS as f32),
        tol(DType::F32),
    )
    .ctx("layer_norm transposed x")?;
    Ok(())
}

fn oracle_rms_norm() -> Result<()> {
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        for (i, s) in shapes().iter().enumerate() {
            let c = *s.last().unwrap_or(&1);
            let x = rand_dtype(s, 60 + i as u64, dtype);
            let w = rand_dtype(&[c], 70 + i as u64, dtype);
            let what = format!("rms_norm {dtype} shape {s:?}");
            oracle(
                &[x.clone(), w.clone()],
                |t| t[0].rms_norm(Some(&t[1]), EPS),
                |t| candle_nn::ops::rms_norm_slow(&t[0], &t[1], EPS as f32),
                tol(dtype),
            )
            .ctx(&what)?;
            oracle(
                std::slice::from_ref(&x),
                |t| t[0].rms_norm(None, EPS),
                |t| candle_nn::ops::rms_norm_slow(&t[0], &ones_like_last(&t[0])?, EPS as f32),
                tol(dtype),
            )
            .ctx(format!("{what} without weight"))?;
            if dtype == DType::F64 {
                continue;
            }
            let want = ce(candle_nn::ops::rms_norm(
                &reference_input(&x),
                &reference_input(&w),
                EPS as f32,
            ))?;
            assert_close(&x.rms_norm(Some(&w), EPS)?, &want, tol(dtype))
                .ctx(format!("{what} vs fused candle"))?;
        }
    }
    let x = rand_f32(&[9, 6], 80).t()?;
    oracle(
        &[x],
        |t| t[0].rms_norm(None, EPS),
        |t| candle_nn::ops::rms_norm_slow(&t[0], &ones_like_last(&t[0])?, EPS as f32),
        tol(DType::F32),
    )
    .ctx("rms_norm transposed x")?;
    Ok(())
}

#[test]
fn norm_errors_are_typed() {
    let x = rand_f32(&[2, 4], 1);
    let e = x
        .layer_norm(Some(&rand_f32(&[3], 2)), None, EPS)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidArgument {
                op: "layer_norm",
                ..
            }
        ) && e.to_string().contains("[4]"),
        "{e}"
    );
    let e = x.rms_norm(Some(&randn(&[4], 3)), EPS).unwrap_err();
    assert!(
        matches!(e, Error::DTypeMismatch { op: "rms_norm", .. }),
        "{e}"
    );
    let i = Tensor::from_vec(vec![1i64, 2], 2, Device::Cpu).unwrap();
    assert!(matches!(
        i.layer_norm(None, None, EPS),
        Err(Error::UnsupportedDType { .. })
    ));
    assert!(matches!(
        x.layer_norm(None, None, -1.0),
        Err(Error::InvalidArgument { .. })
    ));
    let empty = Tensor::zeros([3, 0], DType::F32, Device::Cpu).unwrap();
    assert!(matches!(
        empty.rms_norm(None, EPS),
        Err(Error::InvalidArgument { .. })
    ));
}

/// The weight and bias gradients are sums over rows; they must be bit-identical whatever the
/// thread count.
#[test]
fn norm_backward_is_deterministic() {
    let run = || -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let x = rand_f32(&[300, 512], 3).set_requires_grad(true);
        let w = rand_f32(&[512], 4).set_requires_grad(true);
        let b = rand_f32(&[512], 5).set_requires_grad(true);
        let y = x.layer_norm(Some(&w), Some(&b), EPS).unwrap();
        y.backward_with(rand_f32(&[300, 512], 6)).unwrap();
        let g = |t: &Tensor| t.grad().unwrap().to_vec::<f32>().unwrap();
        (g(&x), g(&w), g(&b))
    };
    let many = run();
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(run);
    let three = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap()
        .install(run);
    assert!(
        many == one && one == three,
        "layer_norm gradients depend on the thread count"
    );
}
