//! Tests of the reductions: sum (one dim, several adjacent or non-adjacent dims, all, none,
//! keepdim or not, negative dims), max and min (one dim and several in turn, and their shared
//! backward kernels `max_backward`, `min_backward`), argmax, and the composites mean, var and sum_to. Gradient
//! checks in f64 on contiguous and strided inputs; candle comparisons in f32 and f16, and at
//! sizes that take each parallel path of the kernels.

use crate::common::*;
use candle_core as cc;
use dynn_core::{DType, Device, Result, Shape, Tensor};
use dynn_ops::prelude::*;

type F = fn(&[Tensor]) -> Result<Tensor>;
type CF = fn(&[cc::Tensor]) -> cc::Result<cc::Tensor>;
/// `(description, input shape, dynn function, candle function)`.
type RCase = (&'static str, &'static [usize], F, CF);

const SUM: &[RCase] = &[
    ("dim 1 keepdim", &[3, 4, 5], |v| v[0].sum_dims(&[1], true), |v| v[0].sum_keepdim(1)),
    ("dim 1", &[3, 4, 5], |v| v[0].sum_dims(&[1], false), |v| v[0].sum(1)),
    ("dim 0", &[3, 4, 5], |v| v[0].sum_dims(&[0], false), |v| v[0].sum(0)),
    ("last dim", &[3, 4, 5], |v| v[0].sum_dims(&[-1i32], false), |v| v[0].sum(2)),
    ("dims 1,2 (adjacent)", &[3, 4, 5], |v| v[0].sum_dims(&[1, 2], false), |v| v[0].sum((1, 2))),
    ("dims 0,2 (not adjacent)", &[3, 4, 5], |v| v[0].sum_dims(&[2, 0], true), |v| v[0].sum_keepdim((0, 2))),
    ("all", &[3, 4, 5], |v| v[0].sum_all(), |v| v[0].sum_all()),
    ("all of rank 0", &[], |v| v[0].sum_all(), |v| v[0].sum_all()),
    ("no dims", &[2, 3], |v| v[0].sum_dims::<usize>(&[], false), |v| Ok(v[0].clone())),
    ("duplicate dims", &[2, 3], |v| v[0].sum_dims(&[1i32, -1], false), |v| v[0].sum(1)),
    ("sum_keepdim", &[2, 3], |v| v[0].sum_keepdim(0), |v| v[0].sum_keepdim(0)),
    ("dim 1 of transposed", &[5, 4, 3], |v| v[0].permute(&[2, 1, 0])?.sum_dims(&[1], false), |v| {
        v[0].permute((2, 1, 0))?.sum(1)
    }),
    ("dims 0,2 of narrowed", &[3, 6, 5], |v| v[0].narrow(1, 1, 4)?.sum_dims(&[0, 2], false), |v| {
        v[0].narrow(1, 1, 4)?.sum((0, 2))
    }),
    ("of broadcast", &[1, 3], |v| v[0].broadcast_as((4, 3))?.sum_dims(&[0], false), |v| v[0].broadcast_as((4, 3))?.sum(0)),
    ("then exp", &[3, 4], |v| v[0].sum_dims(&[1], true)?.exp(), |v| v[0].sum_keepdim(1)?.exp()),
];

const MAX_MIN: &[RCase] = &[
    ("max dim 1", &[3, 4, 5], |v| v[0].max_dims(&[1], false), |v| v[0].max(1)),
    ("max dim 2 keepdim", &[3, 4, 5], |v| v[0].max_dims(&[2], true), |v| v[0].max_keepdim(2)),
    ("max dim 0", &[3, 4, 5], |v| v[0].max_dims(&[0], false), |v| v[0].max(0)),
    ("max dims 0,2", &[3, 4, 5], |v| v[0].max_dims(&[0, 2], false), |v| v[0].max(2)?.max(0)),
    ("max of transposed", &[4, 3], |v| v[0].t()?.max_dims(&[1], false), |v| v[0].t()?.max(1)),
    ("max of narrowed", &[3, 7], |v| v[0].narrow(1, 2, 4)?.max_dims(&[-1i32], true), |v| v[0].narrow(1, 2, 4)?.max_keepdim(1)),
    ("min dim 1", &[3, 4, 5], |v| v[0].min_dims(&[1], false), |v| v[0].min(1)),
    ("min dims 1,2 keepdim", &[3, 4, 5], |v| v[0].min_dims(&[1, 2], true), |v| v[0].min_keepdim(2)?.min_keepdim(1)),
    ("min of permuted", &[3, 4, 5], |v| v[0].permute(&[1, 2, 0])?.min_dims(&[2], false), |v| v[0].permute((1, 2, 0))?.min(2)),
];

const MEAN_VAR: &[RCase] = &[
    ("mean dim 1", &[3, 4, 5], |v| v[0].mean_dims(&[1], false), |v| v[0].mean(1)),
    ("mean dims 0,2 keepdim", &[3, 4, 5], |v| v[0].mean_dims(&[0, 2], true), |v| v[0].mean_keepdim((0, 2))),
    ("mean all", &[3, 4], |v| v[0].mean_all(), |v| v[0].mean_all()),
    ("var dim 1 unbiased", &[3, 6], |v| v[0].var_dims(&[1], true, true), |v| v[0].var_keepdim(1)),
    ("var dim 0 unbiased of transposed", &[3, 6], |v| v[0].t()?.var_dims(&[0], false, true), |v| v[0].t()?.var(0)),
    ("var dim 1 biased", &[4, 5], |v| v[0].var_dims(&[1], false, false), |v| {
        let m = v[0].mean_keepdim(1)?;
        v[0].broadcast_sub(&m)?.sqr()?.mean(1)
    }),
    ("var dims 0,2 unbiased", &[3, 4, 5], |v| v[0].var_dims(&[0, 2], false, true), |v| {
        let m = v[0].mean_keepdim((0, 2))?;
        v[0].broadcast_sub(&m)?.sqr()?.sum((0, 2))? / 14.0
    }),
];

const SUM_TO: &[RCase] = &[
    ("(4,5,3) -> (5,3)", &[4, 5, 3], |v| v[0].sum_to(&Shape::new(&[5, 3])), |v| v[0].sum(0)),
    ("(4,5,3) -> (1,3)", &[4, 5, 3], |v| v[0].sum_to(&Shape::new(&[1, 3])), |v| v[0].sum(0)?.sum_keepdim(0)),
    ("(4,5,3) -> (4,1,3)", &[4, 5, 3], |v| v[0].sum_to(&Shape::new(&[4, 1, 3])), |v| v[0].sum_keepdim(1)),
    ("(4,5,3) -> (3,)", &[4, 5, 3], |v| v[0].sum_to(&Shape::new(&[3])), |v| v[0].sum((0, 1))),
    ("(4,5,3) -> ()", &[4, 5, 3], |v| v[0].sum_to(&Shape::scalar()), |v| v[0].sum_all()),
    ("same shape", &[2, 3], |v| v[0].sum_to(&Shape::new(&[2, 3])), |v| Ok(v[0].clone())),
    ("of transposed", &[3, 4], |v| v[0].t()?.sum_to(&Shape::new(&[1, 3])), |v| v[0].t()?.sum_keepdim(0)),
];

fn grad_run(cases: &[RCase]) -> Result<()> {
    for (i, &(what, shape, f, _)) in cases.iter().enumerate() {
        gradcheck(&[randn(shape, 600 + i as u64)], f).ctx(what)?;
    }
    Ok(())
}

fn oracle_run(cases: &[RCase]) -> Result<()> {
    for (i, &(what, shape, f, cf)) in cases.iter().enumerate() {
        for dtype in [DType::F32, DType::F16] {
            oracle(&[rand_dtype(shape, 700 + i as u64, dtype)], f, cf, tol(dtype)).ctx(format!("{dtype} {what}"))?;
        }
    }
    Ok(())
}

/// Argmax (no gradient): candle's u32 indices against dynn's i64, on contiguous and strided
/// inputs, keepdim or not, in f32 and f16.
fn oracle_argmax() -> Result<()> {
    const CASES: &[RCase] = &[
        ("dim 1", &[3, 4, 5], |v| v[0].argmax(1, false), |v| v[0].argmax(1)),
        ("dim 0 keepdim", &[3, 4, 5], |v| v[0].argmax(0, true), |v| v[0].argmax_keepdim(0)),
        ("last dim", &[3, 4, 5], |v| v[0].argmax(-1i32, false), |v| v[0].argmax(2)),
        ("of transposed", &[4, 6], |v| v[0].t()?.argmax(1, false), |v| v[0].t()?.argmax(1)),
        ("of narrowed", &[4, 9], |v| v[0].narrow(1, 3, 5)?.argmax(1, true), |v| v[0].narrow(1, 3, 5)?.argmax_keepdim(1)),
    ];
    for (i, &(what, shape, f, cf)) in CASES.iter().enumerate() {
        for dtype in [DType::F32, DType::F16] {
            let x = rand_dtype(shape, 800 + i as u64, dtype);
            let y = f(std::slice::from_ref(&x))?;
            if y.dtype() != DType::I64 || y.requires_grad() {
                return Err(dynn_core::Error::Msg(format!("argmax {what}: {y:?} is not a plain i64 tensor")));
            }
            oracle(&[x], f, cf, 0.0).ctx(format!("argmax {dtype} {what}"))?;
        }
    }
    Ok(())
}

/// Sizes above the parallel threshold, one per kernel path, in f32 against candle computing
/// in f64 (the sums add 200-300 terms; the f64 reference isolates dynn's own rounding).
fn oracle_large() -> Result<()> {
    let t = 2.0 * tol(DType::F32);
    let x = rand_f32(&[300, 200], 901);
    let y = rand_f32(&[64, 30, 20], 902);
    let f64_ = |v: &cc::Tensor| v.to_dtype(cc::DType::F64);
    // inner == 1: rows reduced in parallel.
    oracle(std::slice::from_ref(&x), |v| v[0].sum_dims(&[1], false), |v| f64_(&v[0])?.sum(1), t).ctx("sum rows")?;
    // outer == 1, inner == 200: columns split across threads.
    oracle(std::slice::from_ref(&x), |v| v[0].sum_dims(&[0], false), |v| f64_(&v[0])?.sum(0), t).ctx("sum columns")?;
    // many outer blocks, inner > 1: parallel over blocks.
    oracle(std::slice::from_ref(&y), |v| v[0].sum_dims(&[1], true), |v| f64_(&v[0])?.sum_keepdim(1), t).ctx("sum middle dim")?;
    // a strided input, non-adjacent dims (permuting copy).
    oracle(std::slice::from_ref(&y), |v| v[0].sum_dims(&[0, 2], false), |v| f64_(&v[0])?.sum((0, 2)), t).ctx("sum dims 0,2")?;
    oracle(std::slice::from_ref(&x), |v| v[0].t()?.sum_dims(&[1], false), |v| f64_(&v[0])?.t()?.sum(1), t).ctx("sum of transposed")?;
    oracle(std::slice::from_ref(&x), |v| v[0].sum_all(), |v| f64_(&v[0])?.sum_all(), t).ctx("sum all")?;
    // max / min / argmax on the same paths (exact results).
    oracle(std::slice::from_ref(&x), |v| v[0].max_dims(&[1], false), |v| v[0].max(1), t).ctx("max rows")?;
    oracle(std::slice::from_ref(&x), |v| v[0].max_dims(&[0], false), |v| v[0].max(0), t).ctx("max columns")?;
    oracle(std::slice::from_ref(&y), |v| v[0].min_dims(&[1], false), |v| v[0].min(1), t).ctx("min middle dim")?;
    oracle(std::slice::from_ref(&x), |v| v[0].argmax(0, false), |v| v[0].argmax(0), 0.0).ctx("argmax columns")?;
    oracle(&[y], |v| v[0].argmax(2, false), |v| v[0].argmax(2), 0.0).ctx("argmax last dim")?;
    Ok(())
}

pub const GRAD_CASES: &[Case] = &[
    (&["sum"], || grad_run(SUM)),
    (&["max", "min"], || grad_run(MAX_MIN)),
    (&["sum", "affine", "sub", "sqr"], || grad_run(MEAN_VAR)),
    (&["sum", "reshape"], || grad_run(SUM_TO)),
];

pub const ORACLE_CASES: &[Case] = &[
    (&["sum"], || oracle_run(SUM)),
    (&["max", "min", "max_backward", "min_backward"], || oracle_run(MAX_MIN)),
    (&["sum", "affine", "sub", "sqr"], || oracle_run(MEAN_VAR)),
    (&["sum"], || oracle_run(SUM_TO)),
    (&["argmax"], oracle_argmax),
    (&["sum", "max", "min", "max_backward", "argmax"], oracle_large),
];

/// Ties in max/min: the gradient is split evenly between the tied elements (candle gives each
/// the whole gradient, so this is checked directly). Argmax takes the first of ties.
#[test]
fn extremum_ties_split_the_gradient() -> Result<()> {
    let x = Tensor::from_vec(vec![1.0f64, 3.0, 3.0, 2.0, 2.0, 2.0], (2, 3), Device::Cpu)?.set_requires_grad(true);
    x.max_dims(&[1], false)?.sum_all()?.backward()?;
    let g = x.grad().unwrap().to_vec::<f64>()?;
    let third = 1.0 / 3.0;
    assert_eq!(g, vec![0.0, 0.5, 0.5, third, third, third]);
    x.zero_grad();
    x.min_dims(&[1], false)?.sum_all()?.backward()?;
    assert_eq!(x.grad().unwrap().to_vec::<f64>()?, vec![1.0, 0.0, 0.0, third, third, third]);
    assert_eq!(x.argmax(1, false)?.to_vec::<i64>()?, vec![1, 0]);
    Ok(())
}

/// Integer tensors (masks, indices) sum exactly into I64: counting a mask past 255 works.
#[test]
fn integer_sums_count_into_i64() -> Result<()> {
    let a = randn(&[300, 200], 1);
    let mask = a.compare_scalar(0.0, CmpOp::Gt)?;
    let want = a.to_f64_vec()?.iter().filter(|&&x| x > 0.0).count() as i64;
    let all = mask.sum_all()?;
    assert_eq!((all.dtype(), all.to_vec::<i64>()?), (DType::I64, vec![want]));
    let rows = mask.t()?.sum_dims(&[0], false)?.to_vec::<i64>()?;
    assert_eq!(rows.iter().sum::<i64>(), want);
    let i = Tensor::from_vec(vec![-3i64, 4, 5, u32::MAX as i64], (2, 2), Device::Cpu)?;
    assert_eq!(i.sum_dims(&[1], true)?.to_vec::<i64>()?, vec![1, 5 + u32::MAX as i64]);
    let u = Tensor::from_vec(vec![u32::MAX, u32::MAX], 2, Device::Cpu)?;
    assert_eq!(u.sum_all()?.to_vec::<i64>()?, vec![2 * u32::MAX as i64]);
    Ok(())
}

/// Reducing an empty dim: the sum is 0 and the max is -inf.
#[test]
fn empty_reductions() -> Result<()> {
    let x = Tensor::zeros((2, 0), DType::F32, Device::Cpu)?;
    assert_eq!(x.sum_dims(&[1], false)?.to_vec::<f32>()?, vec![0.0, 0.0]);
    assert_eq!(x.max_dims(&[1], false)?.to_vec::<f32>()?, vec![f32::NEG_INFINITY; 2]);
    let y = Tensor::zeros((0, 3), DType::F32, Device::Cpu)?;
    assert_eq!(y.sum_dims(&[0], false)?.to_vec::<f32>()?, vec![0.0; 3]);
    assert_eq!(y.max_dims(&[0], true)?.to_vec::<f32>()?, vec![f32::NEG_INFINITY; 3]);
    let z = Tensor::zeros((3, 0), DType::F32, Device::Cpu)?;
    assert_eq!(z.sum_dims(&[0], false)?.dims(), &[0]);
    assert_eq!(z.min_dims(&[0], false)?.dims(), &[0]);
    Ok(())
}

/// Sums are deterministic: the same input gives the same bits every time, whatever the size.
#[test]
fn sums_are_deterministic() -> Result<()> {
    let x = rand_f32(&[300, 200], 1);
    for dims in [&[0usize][..], &[1], &[0, 1]] {
        let a = x.sum_dims(dims, false)?.to_vec::<f32>()?;
        for _ in 0..3 {
            assert_eq!(x.sum_dims(dims, false)?.to_vec::<f32>()?, a, "dims {dims:?}");
        }
    }
    Ok(())
}
