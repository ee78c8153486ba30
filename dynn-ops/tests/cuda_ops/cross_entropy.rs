//! Cross-entropy on the GPU: class counts on every kernel plan, i64 and u32 targets, every
//! reduction, ignore-index and label smoothing, f32, f64, f16 and bf16, 3-d and strided logits, narrowed
//! targets; forward and backward. Bad targets are errors, as on the CPU.

use crate::harness::*;
use dynn_core::{DType, Device, Result, Tensor};
use dynn_ops::prelude::*;

fn tol(dtype: DType) -> f64 {
    tol_of(dtype)
}

/// Targets in `0..classes`; every fourth row gets `ignore` when given.
fn targets(rows: usize, classes: usize, seed: u64, dtype: DType, ignore: Option<i64>) -> Tensor {
    let t = indices(&[rows], classes, seed, DType::I64)
        .to_f64_vec()
        .expect("targets");
    let v: Vec<i64> = t
        .iter()
        .enumerate()
        .map(|(i, &x)| match ignore {
            Some(ig) if i % 4 == 1 => ig,
            _ => x as i64,
        })
        .collect();
    match dtype {
        DType::U32 => Tensor::from_vec(v.iter().map(|&i| i as u32).collect(), [rows], Device::Cpu),
        _ => Tensor::from_vec(v, [rows], Device::Cpu),
    }
    .expect("targets")
}

fn opts(ignore: Option<i64>, smoothing: f64, reduction: LossReduction) -> CrossEntropyOpts {
    CrossEntropyOpts {
        ignore_index: ignore,
        label_smoothing: smoothing,
        reduction,
    }
}

#[test]
fn cross_entropy() {
    let mut cases = Vec::new();
    for dtype in FLOATS {
        // ≤ 1024 classes: a warp per row (16-byte loads when C is a multiple of the vector);
        // more: a block per row. 1025 and 50257 take single elements.
        for (rows, c) in [
            (37usize, 7usize),
            (37, 128),
            (33, 1000),
            (16, 1024),
            (16, 1025),
            (9, 4096),
            (4, 50257),
        ] {
            let x = rand_dtype(&[rows, c], c as u64, dtype)
                .affine(3.0, 0.0)
                .expect("scale");
            for tdt in [DType::I64, DType::U32] {
                // u32 targets cannot be -100: ignore a real class instead.
                let ig = if tdt == DType::I64 { -100 } else { 3 };
                for (ignore, eps) in [(None, 0.0), (Some(ig), 0.0), (None, 0.1), (Some(ig), 0.25)] {
                    let t = targets(rows, c, c as u64 + 1, tdt, ignore);
                    for red in [LossReduction::Mean, LossReduction::Sum, LossReduction::None] {
                        let o = opts(ignore, eps, red);
                        cases.push((
                            format!(
                                "{dtype:?} {rows}x{c} {tdt:?} ignore {ignore:?} eps {eps} {red:?}"
                            ),
                            check(
                                "cross_entropy",
                                &[x.clone(), t.clone()],
                                |v| v[0].cross_entropy(&v[1], o),
                                tol(dtype),
                                true,
                            ),
                        ));
                    }
                }
            }
        }
        // (B, T, C) logits, transposed logits, narrowed targets.
        let x3 = rand_dtype(&[3, 5, 40], 1, dtype);
        let t3 = indices(&[3, 5], 40, 2, DType::I64);
        let o = opts(Some(7), 0.1, LossReduction::Mean);
        cases.push((
            format!("{dtype:?} 3-d"),
            check(
                "cross_entropy",
                &[x3, t3],
                |v| v[0].cross_entropy(&v[1], o),
                tol(dtype),
                true,
            ),
        ));
        let xt = rand_dtype(&[50, 20], 3, dtype);
        let tt = indices(&[24], 50, 4, DType::U32);
        for red in [LossReduction::Mean, LossReduction::None] {
            let o = opts(None, 0.05, red);
            cases.push((
                format!("{dtype:?} transposed logits, narrowed targets {red:?}"),
                check(
                    "cross_entropy",
                    &[xt.clone(), tt.clone()],
                    |v| v[0].t()?.cross_entropy(&v[1].narrow(0, 2, 20)?, o),
                    tol(dtype),
                    true,
                ),
            ));
        }
        // Masked logits (−∞ except the target's class and a few others).
        let mut m = rand_dtype(&[6, 300], 5, DType::F64)
            .to_f64_vec()
            .expect("values");
        for (i, v) in m.iter_mut().enumerate() {
            if i % 300 > 10 {
                *v = f64::NEG_INFINITY;
            }
        }
        let xm = Tensor::from_vec(m, [6, 300], Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .expect("masked");
        let tm = indices(&[6], 10, 6, DType::I64);
        cases.push((
            format!("{dtype:?} masked logits"),
            check(
                "cross_entropy",
                &[xm, tm],
                |v| v[0].cross_entropy(&v[1], CrossEntropyOpts::default()),
                tol(dtype),
                true,
            ),
        ));
    }
    run("cross_entropy", cases);
}

/// Every row ignored: the mean is NaN on both devices, the sum 0.
#[test]
fn cross_entropy_all_ignored() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let x = randn(&[4, 9], 1).to_device(dev)?;
    let t = Tensor::from_vec(vec![-1i64; 4], [4], Device::Cpu)?.to_device(dev)?;
    let mean = x.cross_entropy(&t, opts(Some(-1), 0.0, LossReduction::Mean))?;
    assert!(mean.to_f64_vec()?[0].is_nan());
    let sum = x.cross_entropy(&t, opts(Some(-1), 0.0, LossReduction::Sum))?;
    assert_eq!(sum.to_f64_vec()?, vec![0.0]);
    Ok(())
}

/// A target outside `0..C` is an `IndexOutOfRange` error on the GPU too (never a bad read).
#[test]
fn cross_entropy_bad_target_is_an_error() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let x = randn(&[3, 5], 1).to_device(dev)?;
    for bad in [5i64, -2] {
        let t = Tensor::from_vec(vec![0i64, bad, 1], [3], Device::Cpu)?.to_device(dev)?;
        match x.cross_entropy(&t, CrossEntropyOpts::default()) {
            Err(dynn_core::Error::IndexOutOfRange { index, .. }) => assert_eq!(index, bad),
            other => panic!("target {bad}: expected IndexOutOfRange, got {other:?}"),
        }
    }
    Ok(())
}
