//! Comparisons and selection on the GPU: every comparison on every dtype (with ties) and
//! layout, `where_cond` (forward and the gradients through `where_backward`) and
//! `masked_fill` with masks of every dtype, broadcast masks and values, strided inputs; the
//! logical ops on masks of every dtype.

use crate::harness::*;
use dynn_core::{DType, Result, Tensor};
use dynn_ops::prelude::*;

const DTYPES: [DType; 7] = DType::ALL;

fn tol(dtype: DType) -> f64 {
    if dtype == DType::F32 { TOL_F32 } else { 1e-9 }
}

/// Small integers (many ties) in `dtype`.
fn ints(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    indices(shape, 4, seed, DType::I64)
        .to_dtype(dtype)
        .expect("cast")
}

/// A 0/1 mask in `dtype`; float masks hold -0.0 (false) and -1.0 (true) when `negative`.
fn mask(shape: &[usize], seed: u64, dtype: DType, negative: bool) -> Tensor {
    let m = indices(shape, 2, seed, DType::I64)
        .to_dtype(dtype)
        .expect("cast");
    if negative {
        m.to_dtype(DType::F32)
            .and_then(|x| x.neg())
            .and_then(|x| x.to_dtype(dtype))
            .expect("negate")
    } else {
        m
    }
}

#[test]
fn comparisons() {
    let mut cases = Vec::new();
    for op in CmpOp::ALL {
        for dtype in DTYPES {
            let a = ints(&[37, 129], 1, dtype);
            let b = ints(&[37, 129], 2, dtype);
            let f = move |v: &[Tensor]| v[0].compare(&v[1], op);
            cases.push((
                format!("{op:?} {dtype:?}"),
                check(op.name(), &[a.clone(), b.clone()], f, 0.0, false),
            ));
            let bt = ints(&[129, 37], 3, dtype);
            let f = move |v: &[Tensor]| v[0].compare(&v[1].t()?, op);
            cases.push((
                format!("{op:?} {dtype:?} transposed rhs"),
                check(op.name(), &[a.clone(), bt], f, 0.0, false),
            ));
            let row = ints(&[129], 4, dtype);
            let f = move |v: &[Tensor]| v[0].narrow(0, 2, 30)?.compare(&v[1], op);
            cases.push((
                format!("{op:?} {dtype:?} narrowed, broadcast row"),
                check(op.name(), &[a.clone(), row], f, 0.0, false),
            ));
            let f = move |v: &[Tensor]| v[0].compare_scalar(2.0, op);
            cases.push((
                format!("{op:?} {dtype:?} scalar"),
                check(op.name(), std::slice::from_ref(&a), f, 0.0, false),
            ));
            // Not a value of an integer dtype: compared in f64.
            let f = move |v: &[Tensor]| v[0].compare_scalar(2.5, op);
            cases.push((
                format!("{op:?} {dtype:?} fractional scalar"),
                check(op.name(), &[a], f, 0.0, false),
            ));
        }
    }
    run("comparisons", cases);
}

/// (what, mask shape, on_true shape, on_false shape)
type Shapes = (
    &'static str,
    &'static [usize],
    &'static [usize],
    &'static [usize],
);

#[test]
fn where_cond() {
    let mut cases = Vec::new();
    for dtype in [DType::F32, DType::F64] {
        let shapes: [Shapes; 7] = [
            ("same shape", &[37, 129], &[37, 129], &[37, 129]),
            // Periodic operands (the packed path): a (T, T) mask shared over a batch.
            ("batched mask", &[64, 64], &[3, 64, 64], &[3, 64, 64]),
            ("batched mask, scalar false", &[64, 64], &[3, 64, 64], &[]),
            ("column mask", &[37, 1], &[37, 129], &[37, 129]),
            ("row values", &[37, 129], &[129], &[37, 129]),
            ("scalar false", &[37, 129], &[37, 129], &[]),
            ("all broadcast", &[37, 1], &[1, 129], &[129]),
        ];
        for (i, (what, ms, ts, fs)) in shapes.into_iter().enumerate() {
            let seed = 10 * i as u64;
            let m = mask(ms, seed, DType::U8, false);
            let t = rand_dtype(ts, seed + 1, dtype);
            let f = rand_dtype(fs, seed + 2, dtype);
            cases.push((
                format!("where_cond {dtype:?} {what}"),
                check(
                    "where_cond",
                    &[m, t, f],
                    |v| v[0].where_cond(&v[1], &v[2]),
                    tol(dtype),
                    true,
                ),
            ));
        }
        // Strided mask and values.
        let m = mask(&[129, 37], 50, DType::U8, false);
        let t = rand_dtype(&[129, 37], 51, dtype);
        let f = rand_dtype(&[37, 140], 52, dtype);
        cases.push((
            format!("where_cond {dtype:?} strided"),
            check(
                "where_cond",
                &[m, t, f],
                |v| v[0].t()?.where_cond(&v[1].t()?, &v[2].narrow(1, 4, 129)?),
                tol(dtype),
                true,
            ),
        ));
        // Masks of every dtype (float masks with -0.0, which is false).
        for mdt in DTYPES {
            for negative in [false, true] {
                if negative && !mdt.is_float() {
                    continue;
                }
                let m = mask(&[37, 129], 60, mdt, negative);
                let t = rand_dtype(&[37, 129], 61, dtype);
                let f = rand_dtype(&[37, 129], 62, dtype);
                cases.push((
                    format!("where_cond {dtype:?} mask {mdt:?} negative={negative}"),
                    check(
                        "where_cond",
                        &[m, t, f],
                        |v| v[0].where_cond(&v[1], &v[2]),
                        tol(dtype),
                        true,
                    ),
                ));
            }
        }
    }
    // Values of every dtype (selection copies bits).
    for dtype in DTYPES {
        let m = mask(&[37, 1], 70, DType::U8, false);
        let t = ints(&[37, 129], 71, dtype);
        let f = ints(&[129], 72, dtype);
        cases.push((
            format!("where_cond values {dtype:?}"),
            check(
                "where_cond",
                &[m, t, f],
                |v| v[0].where_cond(&v[1], &v[2]),
                0.0,
                false,
            ),
        ));
    }
    run("where_cond", cases);
}

#[test]
fn masked_fill() {
    let mut cases = Vec::new();
    for dtype in [DType::F32, DType::F64] {
        let shapes: [(&str, &[usize]); 4] = [
            ("full mask", &[37, 129]),
            ("column mask", &[37, 1]),
            ("row mask", &[129]),
            ("scalar mask", &[]),
        ];
        for (i, (what, ms)) in shapes.into_iter().enumerate() {
            let x = rand_dtype(&[37, 129], 80 + i as u64, dtype);
            let m = mask(ms, 90 + i as u64, DType::U8, false);
            cases.push((
                format!("masked_fill {dtype:?} {what}"),
                check(
                    "masked_fill",
                    &[x, m],
                    |v| v[0].masked_fill(&v[1], -1e4),
                    tol(dtype),
                    true,
                ),
            ));
        }
        let x = rand_dtype(&[129, 37], 95, dtype);
        let m = mask(&[37, 140], 96, DType::F32, true);
        cases.push((
            format!("masked_fill {dtype:?} strided input and mask"),
            check(
                "masked_fill",
                &[x, m],
                |v| v[0].t()?.masked_fill(&v[1].narrow(1, 2, 129)?, -1e9),
                tol(dtype),
                true,
            ),
        ));
        for mdt in DTYPES {
            let x = rand_dtype(&[37, 129], 97, dtype);
            let m = mask(&[37, 129], 98, mdt, mdt.is_float());
            cases.push((
                format!("masked_fill {dtype:?} mask {mdt:?}"),
                check(
                    "masked_fill",
                    &[x, m],
                    |v| v[0].masked_fill(&v[1], 0.5),
                    tol(dtype),
                    true,
                ),
            ));
        }
    }
    for dtype in DTYPES {
        let x = ints(&[37, 129], 99, dtype);
        let m = mask(&[129], 100, DType::U8, false);
        cases.push((
            format!("masked_fill values {dtype:?}"),
            check(
                "masked_fill",
                &[x, m],
                |v| v[0].masked_fill(&v[1], 7.0),
                0.0,
                false,
            ),
        ));
    }
    run("masked_fill", cases);
}

/// A causal attention mask at a realistic size, through `where_cond` and back.
#[test]
fn large_causal_mask() -> Result<()> {
    let n = 512;
    let rows = Tensor::from_vec((0..n as i64).collect::<Vec<_>>(), &[n, 1][..], Device::Cpu)?;
    let cols = Tensor::from_vec((0..n as i64).collect::<Vec<_>>(), &[1, n][..], Device::Cpu)?;
    let scores = randn(&[8, n, n], 5);
    check(
        "causal where_cond",
        &[rows, cols, scores],
        |v| {
            let keep = v[1].le(&v[0])?;
            let neg = Tensor::full(-1e9, (), v[2].dtype(), v[2].device())?;
            keep.where_cond(&v[2], &neg)
        },
        TOL_F32,
        true,
    )
}

#[test]
fn logical() {
    let mut cases = Vec::new();
    for k in Logic::ALL {
        let f = move |v: &[Tensor]| match k {
            Logic::And => v[0].logical_and(&v[1]),
            Logic::Or => v[0].logical_or(&v[1]),
            Logic::Xor => v[0].logical_xor(&v[1]),
            Logic::Not => v[0].logical_not(),
        };
        // Masks of every dtype (float masks with -0.0, which is false) against a U8 mask.
        for mdt in DTYPES {
            let a = mask(&[37, 129], 110, mdt, mdt.is_float());
            let b = mask(&[37, 129], 111, DType::U8, false);
            cases.push((
                format!("{} {mdt:?}", k.name()),
                check(k.name(), &[a, b], f, 0.0, false),
            ));
        }
        let a = mask(&[129, 37], 112, DType::U8, false);
        let b = mask(&[129], 113, DType::U8, false);
        let g = move |v: &[Tensor]| f(&[v[0].t()?, v[1].clone()]);
        cases.push((
            format!("{} transposed, broadcast row", k.name()),
            check(k.name(), &[a, b], g, 0.0, false),
        ));
    }
    run("logical", cases);
}
