//! Tests of cross_entropy: gradient checks (label smoothing, ignore_index, every reduction,
//! (B, T, C) logits, non-contiguous logits), forward + backward against
//! `candle_nn::loss::cross_entropy` (plain options) and against a composition of candle ops
//! (log_softmax, gather, mean) for label smoothing, ignore_index and the other reductions,
//! and typed errors.

use crate::common::*;
use candle_core as cc;
use dynn_core::{DType, Device, Error, Result, Tensor};
use dynn_ops::prelude::*;

pub const GRAD_CASES: &[Case] = &[(&["cross_entropy"], grad_cross_entropy)];

pub const ORACLE_CASES: &[Case] = &[
    (&["cross_entropy", "cross_entropy_backward"], oracle_plain),
    (&["cross_entropy", "cross_entropy_backward"], oracle_options),
];

fn targets(v: &[i64]) -> Tensor {
    Tensor::from_vec(v.to_vec(), v.len(), Device::Cpu).expect("targets")
}

fn opts(
    ignore_index: Option<i64>,
    label_smoothing: f64,
    reduction: LossReduction,
) -> CrossEntropyOpts {
    CrossEntropyOpts {
        ignore_index,
        label_smoothing,
        reduction,
    }
}

fn grad_cross_entropy() -> Result<()> {
    let t = targets(&[0, 3, 1, 2, 3]);
    let cases = [
        (
            randn(&[5, 4], 1),
            opts(None, 0.0, LossReduction::Mean),
            "plain",
        ),
        (
            randn(&[4, 5], 2).t()?,
            opts(Some(1), 0.1, LossReduction::Mean),
            "transposed, smoothing, ignore",
        ),
        (
            randn(&[5, 6], 3).narrow(1, 1, 4)?,
            opts(None, 0.2, LossReduction::Sum),
            "narrowed, sum",
        ),
        (
            randn(&[5, 4], 4),
            opts(Some(3), 0.0, LossReduction::None),
            "no reduction, ignore",
        ),
    ];
    for (x, o, what) in cases {
        gradcheck_some(&[x, t.clone()], &[true, false], |xs| {
            xs[0].cross_entropy(&xs[1], o)
        })
        .ctx(what)?;
    }
    // (B, T, C) logits with (B, T) targets of u32.
    let t3 = Tensor::from_vec(vec![0u32, 2, 1, 1, 0, 2], (2, 3), Device::Cpu)?;
    gradcheck_some(&[randn(&[2, 3, 3], 5), t3], &[true, false], |xs| {
        xs[0].cross_entropy(&xs[1], CrossEntropyOpts::default())
    })
    .ctx("(B, T, C) logits")?;
    Ok(())
}

/// The candle reference by composition: per-row `-(1-ε)·logp[t] - ε·mean(logp)` on `(N, C)`
/// logits (targets captured, ignored rows masked), then the reduction.
fn candle_ce(x: &cc::Tensor, t: &[i64], o: CrossEntropyOpts) -> cc::Result<cc::Tensor> {
    let c = x.dim(cc::D::Minus1)?;
    let x = x.reshape(((), c))?;
    let n = x.dim(0)?;
    let dev = x.device();
    let lsm = candle_nn::ops::log_softmax(&x, 1)?;
    let safe: Vec<i64> = t
        .iter()
        .map(|&v| if Some(v) == o.ignore_index { 0 } else { v })
        .collect();
    let mask: Vec<f64> = t
        .iter()
        .map(|&v| if Some(v) == o.ignore_index { 0.0 } else { 1.0 })
        .collect();
    let count: f64 = mask.iter().sum();
    let picked = lsm
        .gather(&cc::Tensor::from_vec(safe, (n, 1), dev)?, 1)?
        .squeeze(1)?;
    let smooth = lsm.mean_keepdim(1)?.squeeze(1)?;
    let eps = o.label_smoothing;
    let per_row = (picked.affine(-(1.0 - eps), 0.0)? - smooth.affine(eps, 0.0)?)?;
    let per_row = (per_row * cc::Tensor::from_vec(mask, n, dev)?.to_dtype(x.dtype())?)?;
    match o.reduction {
        LossReduction::Mean => per_row.sum_all()?.affine(1.0 / count, 0.0),
        LossReduction::Sum => per_row.sum_all(),
        LossReduction::None => Ok(per_row),
    }
}

fn oracle_plain() -> Result<()> {
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        for (i, (n, c)) in [(5usize, 4usize), (7, 37), (64, 1000), (3, 5000)]
            .into_iter()
            .enumerate()
        {
            let x = rand_dtype(&[n, c], 10 + i as u64, dtype).affine(3.0, 0.0)?;
            let tv: Vec<i64> = (0..n).map(|r| ((r * 7 + 3) % c) as i64).collect();
            let t = targets(&tv);
            oracle(
                &[x, t],
                |xs| xs[0].cross_entropy(&xs[1], CrossEntropyOpts::default()),
                |cs| candle_nn::loss::cross_entropy(&cs[0], &cs[1]),
                tol(dtype),
            )
            .ctx(format!("{dtype} ({n}, {c})"))?;
        }
    }
    // Masked (-inf) logits, also filling the whole first block of a long row.
    let mut v: Vec<f64> = (0..3 * 5000)
        .map(|i| ((i * 7919) % 1000) as f64 / 250.0 - 2.0)
        .collect();
    v[..2500].iter_mut().for_each(|x| *x = f64::NEG_INFINITY);
    v[5000..5010]
        .iter_mut()
        .for_each(|x| *x = f64::NEG_INFINITY);
    for dtype in [DType::F32, DType::F64] {
        let x = from_f64(&v, &[3, 5000], dtype)?;
        let t = targets(&[4000, 17, 2]);
        let want = ce(candle_nn::loss::cross_entropy(
            &to_candle(&x),
            &to_candle(&t),
        ))?;
        let got = x.cross_entropy(&t, CrossEntropyOpts::default())?;
        assert_close(&got, &want, tol(dtype)).ctx(format!("{dtype} masked logits"))?;
    }
    // u32 targets and a transposed input.
    let x = rand_f32(&[6, 5], 20).t()?;
    let t = Tensor::from_vec(vec![0u32, 5, 2, 1, 3], 5, Device::Cpu)?;
    oracle(
        &[x, t],
        |xs| xs[0].cross_entropy(&xs[1], CrossEntropyOpts::default()),
        |cs| candle_nn::loss::cross_entropy(&cs[0], &cs[1]),
        tol(DType::F32),
    )
    .ctx("u32 targets, transposed logits")?;
    Ok(())
}

fn oracle_options() -> Result<()> {
    let tv: Vec<i64> = vec![2, -100, 0, 5, 5, 1, -100, 3];
    let variants = [
        opts(Some(-100), 0.0, LossReduction::Mean),
        opts(Some(-100), 0.1, LossReduction::Mean),
        opts(Some(5), 0.25, LossReduction::Sum),
        opts(Some(-100), 0.1, LossReduction::None),
    ];
    for dtype in [DType::F32, DType::F64, DType::BF16] {
        for o in variants {
            let x = rand_dtype(&[8, 6], 30, dtype);
            // Ignored rows carry the ignore value.
            let tv: Vec<i64> = tv
                .iter()
                .map(|&v| {
                    if v == -100 {
                        o.ignore_index.unwrap_or(0)
                    } else {
                        v
                    }
                })
                .collect();
            let tv2 = tv.clone();
            oracle(
                &[x, targets(&tv)],
                |xs| xs[0].cross_entropy(&xs[1], o),
                move |cs| candle_ce(&cs[0], &tv2, o),
                tol(dtype),
            )
            .ctx(format!("{dtype} {o:?}"))?;
        }
    }
    // (B, T, C) logits: rows flattened.
    let x = rand_f32(&[2, 4, 6], 31);
    let t = Tensor::from_vec(tv.clone(), (2, 4), Device::Cpu)?;
    let o = opts(Some(-100), 0.1, LossReduction::Mean);
    oracle(
        &[x, t],
        |xs| xs[0].cross_entropy(&xs[1], o),
        |cs| candle_ce(&cs[0], &tv, o),
        tol(DType::F32),
    )
    .ctx("(B, T, C) logits")?;
    Ok(())
}

#[test]
fn cross_entropy_errors_are_typed() {
    let x = rand_f32(&[4, 3], 1);
    let e = x
        .cross_entropy(&targets(&[0, 1, 7, 2]), CrossEntropyOpts::default())
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::IndexOutOfRange {
                op: "cross_entropy",
                index: 7,
                size: 3,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("row 2"), "{e}");
    let e = x
        .cross_entropy(&targets(&[0, -1, 1, 2]), CrossEntropyOpts::default())
        .unwrap_err();
    assert!(e.to_string().contains("row 1"), "{e}");
    let e = x
        .cross_entropy(&rand_f32(&[4], 2), CrossEntropyOpts::default())
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::UnsupportedDType {
                op: "cross_entropy",
                dtype: DType::F32,
                ..
            }
        ),
        "{e}"
    );
    let e = x
        .cross_entropy(&targets(&[0, 1, 2]), CrossEntropyOpts::default())
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::ShapeMismatch {
                op: "cross_entropy",
                ..
            }
        ),
        "{e}"
    );
    let e = x
        .cross_entropy(
            &targets(&[0, 1, 2, 0]),
            opts(None, 1.5, LossReduction::Mean),
        )
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    // Every row ignored: the mean is NaN (as PyTorch), the sum 0.
    let all = targets(&[-100; 4]);
    assert!(
        x.cross_entropy(&all, opts(Some(-100), 0.0, LossReduction::Mean))
            .unwrap()
            .to_scalar_f64()
            .unwrap()
            .is_nan()
    );
    assert_eq!(
        x.cross_entropy(&all, opts(Some(-100), 0.0, LossReduction::Sum))
            .unwrap()
            .to_scalar_f64()
            .unwrap(),
        0.0
    );
}
