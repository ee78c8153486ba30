//! Tests of the comparisons (eq, ne, lt, le, gt, ge), `where_cond` (+ `where_backward`) and
//! `masked_fill`: candle oracles with broadcasting in f32, f16, i64 and u8 (masks are U8 0/1; masks of other dtypes and strided masks
//! too),
//! gradient checks of the value inputs in f64 (broadcast and strided), and typed errors.

use crate::common::*;
use candle_core as cc;
use dynn_core::{DType, Device, Error, Result, Tensor};
use dynn_ops::prelude::*;

type CmpFn = fn(&cc::Tensor, &cc::Tensor) -> cc::Result<cc::Tensor>;

const CANDLE_CMP: [(CmpOp, CmpFn); 6] = [
    (CmpOp::Eq, |a, b| a.broadcast_eq(b)),
    (CmpOp::Ne, |a, b| a.broadcast_ne(b)),
    (CmpOp::Lt, |a, b| a.broadcast_lt(b)),
    (CmpOp::Le, |a, b| a.broadcast_le(b)),
    (CmpOp::Gt, |a, b| a.broadcast_gt(b)),
    (CmpOp::Ge, |a, b| a.broadcast_ge(b)),
];

/// Values in {-1, -0.5, 0, 0.5, 1} so that equal elements are common.
fn coarse(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let mut r = Rng::new(seed);
    let v: Vec<f64> = (0..shape.iter().product::<usize>()).map(|_| (r.next_u64() % 5) as f64 * 0.5 - 1.0).collect();
    from_f64(&v, shape, dtype).expect("coarse")
}

fn oracle_compare() -> Result<()> {
    for (k, cf) in CANDLE_CMP {
        for dtype in [DType::F32, DType::F16, DType::I64, DType::U8] {
            let (a, b) = match dtype {
                DType::I64 | DType::U8 => (rand_dtype(&[3, 4], 1, dtype), rand_dtype(&[4], 2, dtype)),
                _ => (coarse(&[3, 4], 1, dtype), coarse(&[4], 2, dtype)),
            };
            oracle(&[a.clone(), b.clone()], move |v| v[0].compare(&v[1], k), move |v| cf(&v[0], &v[1]), 0.0)
                .ctx(format!("{} {dtype} (3,4) vs (4)", k.name()))?;
            let (c, d) = (coarse(&[2, 1, 5], 3, DType::F32), coarse(&[3, 1], 4, DType::F32));
            oracle(&[c, d], move |v| v[0].compare(&v[1], k), move |v| cf(&v[0], &v[1]), 0.0).ctx(format!("{} (2,1,5) vs (3,1)", k.name()))?;
            oracle(&[a.t()?, a.t()?.narrow(1, 1, 1)?], move |v| v[0].compare(&v[1], k), move |v| cf(&v[0], &v[1]), 0.0)
                .ctx(format!("{} {dtype} strided", k.name()))?;
        }
        let (a, b) = (coarse(&[256, 200], 5, DType::F32), coarse(&[256, 1], 6, DType::F32));
        oracle(&[a.clone(), b], move |v| v[0].compare(&v[1], k), move |v| cf(&v[0], &v[1]), 0.0).ctx(format!("{} large", k.name()))?;
        oracle(std::slice::from_ref(&a), move |v| v[0].compare_scalar(0.5, k), move |v| cf(&v[0], &cc::Tensor::new(0.5f32, v[0].device())?), 0.0)
            .ctx(format!("{} scalar", k.name()))?;
    }
    Ok(())
}

fn candle_where(v: &[cc::Tensor]) -> cc::Result<cc::Tensor> {
    let shape = v[0].shape().broadcast_shape_binary_op(v[1].shape(), "w")?.broadcast_shape_binary_op(v[2].shape(), "w")?;
    v[0].broadcast_as(&shape)?.where_cond(&v[1].broadcast_as(&shape)?, &v[2].broadcast_as(&shape)?)
}

fn oracle_where() -> Result<()> {
    for dtype in [DType::F32, DType::F16] {
        let t = tol(dtype);
        let m = rand_dtype(&[3, 4], 10, DType::U8); // 0..4: mostly nonzero, some zero
        oracle(&[m.clone(), rand_dtype(&[3, 4], 11, dtype), rand_dtype(&[3, 4], 12, dtype)], |v| v[0].where_cond(&v[1], &v[2]), candle_where, t)
            .ctx(format!("{dtype} same shapes"))?;
        oracle(&[m.clone(), rand_dtype(&[4], 13, dtype), rand_dtype(&[3, 1], 14, dtype)], |v| v[0].where_cond(&v[1], &v[2]), candle_where, t)
            .ctx(format!("{dtype} broadcast values"))?;
        let m1 = rand_dtype(&[2, 1, 4], 15, DType::I64);
        oracle(&[m1, rand_dtype(&[3, 1], 16, dtype), rand_dtype(&[4, 3], 17, dtype).t()?], |v| v[0].where_cond(&v[1], &v[2]), candle_where, t)
            .ctx(format!("{dtype} broadcast mask, transposed value"))?;
        let mt = rand_dtype(&[4, 3], 9, DType::U8).t()?;
        oracle(&[mt, rand_dtype(&[3, 4], 8, dtype), rand_dtype(&[1], 7, dtype)], |v| v[0].where_cond(&v[1], &v[2]), candle_where, t)
            .ctx(format!("{dtype} transposed u8 mask"))?;
        let m32 = rand_dtype(&[3, 4], 6, DType::U32);
        oracle(&[m32, rand_dtype(&[3, 4], 5, dtype), rand_dtype(&[3, 4], 4, dtype)], |v| v[0].where_cond(&v[1], &v[2]), candle_where, t)
            .ctx(format!("{dtype} u32 mask"))?;
    }
    oracle(&[m_u8(), rand_dtype(&[3, 4], 3, DType::U8), rand_dtype(&[4], 2, DType::U8)], |v| v[0].where_cond(&v[1], &v[2]), candle_where, 0.0)
        .ctx("u8 values")?;
    let m = rand_dtype(&[300, 200], 18, DType::U8);
    oracle(&[m.clone(), rand_f32(&[300, 200], 19), rand_f32(&[200], 20)], |v| v[0].where_cond(&v[1], &v[2]), candle_where, tol(DType::F32))
        .ctx("large")?;
    oracle(&[m, rand_f32(&[300, 200], 21), rand_f32(&[300, 200], 22)], |v| v[0].where_cond(&v[1], &v[2]), candle_where, tol(DType::F32))
        .ctx("large contiguous")?;
    Ok(())
}

/// A (3, 4) U8 mask with values in 0..4.
fn m_u8() -> Tensor {
    rand_dtype(&[3, 4], 1, DType::U8)
}

fn candle_masked_fill(x: &cc::Tensor, m: &cc::Tensor, value: f64) -> cc::Result<cc::Tensor> {
    let fill = cc::Tensor::full(value as f32, x.shape(), x.device())?.to_dtype(x.dtype())?;
    m.broadcast_as(x.shape())?.where_cond(&fill, x)
}

fn oracle_masked_fill() -> Result<()> {
    for dtype in [DType::F32, DType::BF16] {
        let t = tol(dtype);
        let x = rand_dtype(&[3, 5], 30, dtype);
        oracle(&[x.clone(), rand_dtype(&[3, 5], 31, DType::U8)], |v| v[0].masked_fill(&v[1], -2.5), |v| candle_masked_fill(&v[0], &v[1], -2.5), t)
            .ctx(format!("{dtype} full mask"))?;
        oracle(&[x.clone(), rand_dtype(&[5], 32, DType::U32)], |v| v[0].masked_fill(&v[1], 7.0), |v| candle_masked_fill(&v[0], &v[1], 7.0), t)
            .ctx(format!("{dtype} broadcast mask"))?;
        oracle(&[x.t()?, rand_dtype(&[5, 1], 33, DType::I64)], |v| v[0].masked_fill(&v[1], 0.0), |v| candle_masked_fill(&v[0], &v[1], 0.0), t)
            .ctx(format!("{dtype} transposed input"))?;
        oracle(&[x.clone(), rand_dtype(&[5, 3], 34, DType::U8).t()?], |v| v[0].masked_fill(&v[1], 1.5), |v| candle_masked_fill(&v[0], &v[1], 1.5), t)
            .ctx(format!("{dtype} transposed u8 mask"))?;
    }
    Ok(())
}

fn grad_where() -> Result<()> {
    let m = rand_dtype(&[3, 4], 40, DType::U8);
    gradcheck_some(&[m.clone(), randn(&[3, 4], 41), randn(&[3, 4], 42)], &[false, true, true], |v| v[0].where_cond(&v[1], &v[2]))
        .ctx("same shapes")?;
    gradcheck_some(&[m.clone(), randn(&[4], 43), randn(&[3, 1], 44)], &[false, true, true], |v| v[0].where_cond(&v[1], &v[2])?.exp())
        .ctx("broadcast values, then exp")?;
    // A float mask (nonzero is true), and a transposed value.
    let fm = Tensor::from_vec(vec![0.0f64, 1.5, -2.0, 0.0], (4, 1), Device::Cpu)?;
    gradcheck_some(&[fm, randn(&[3, 4], 45).t()?, randn(&[4, 3], 46)], &[false, true, true], |v| v[0].where_cond(&v[1], &v[2]))
        .ctx("float mask, transposed value")?;
    // The same tensor on both sides gets both gradients.
    gradcheck_some(&[m, randn(&[3, 4], 47)], &[false, true], |v| v[0].where_cond(&v[1], &v[1].sqr()?)).ctx("one tensor both sides")?;
    Ok(())
}

fn grad_masked_fill() -> Result<()> {
    gradcheck_some(&[randn(&[3, 5], 50), rand_dtype(&[3, 5], 51, DType::U8)], &[true, false], |v| v[0].masked_fill(&v[1], 3.0)).ctx("full mask")?;
    gradcheck_some(&[randn(&[5, 3], 52).t()?, rand_dtype(&[5], 53, DType::I64)], &[true, false], |v| v[0].masked_fill(&v[1], -1.0)?.sqr())
        .ctx("transposed input, broadcast mask, then sqr")?;
    Ok(())
}

pub const GRAD_CASES: &[Case] = &[(&["where_cond"], grad_where), (&["masked_fill"], grad_masked_fill)];

pub const ORACLE_CASES: &[Case] = &[
    (&["eq", "ne", "lt", "le", "gt", "ge"], oracle_compare),
    (&["where_cond", "where_backward"], oracle_where),
    (&["masked_fill"], oracle_masked_fill),
];

#[test]
fn masks_are_u8_zero_one() -> Result<()> {
    let a = Tensor::from_vec(vec![1.0f32, f32::NAN, 3.0], 3, Device::Cpu)?;
    let b = Tensor::from_vec(vec![1.0f32, f32::NAN, 2.0], 3, Device::Cpu)?;
    let m = a.eq(&b)?;
    assert_eq!(m.dtype(), DType::U8);
    assert_eq!(m.to_vec::<u8>()?, vec![1, 0, 0]);
    assert_eq!(a.ne(&b)?.to_vec::<u8>()?, vec![0, 1, 1]);
    assert_eq!(a.ge(&b)?.to_vec::<u8>()?, vec![1, 0, 1]);
    // Any nonzero byte is true, also in a strided view of the mask.
    let wide = Tensor::from_vec(vec![0u8, 7, 255, 0, 1, 0], (3, 2), Device::Cpu)?;
    let picked = wide.t()?.where_cond(&Tensor::ones((2, 3), DType::F32, Device::Cpu)?, &Tensor::zeros(1, DType::F32, Device::Cpu)?)?;
    assert_eq!(picked.to_vec::<f32>()?, vec![0.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
    // A comparison mask drives where_cond and masked_fill directly.
    let y = m.where_cond(&a, &Tensor::zeros(3, DType::F32, Device::Cpu)?)?;
    assert_eq!(y.to_vec::<f32>()?, vec![1.0, 0.0, 0.0]);
    let z = a.masked_fill(&a.compare_scalar(2.0, CmpOp::Gt)?, -1.0)?;
    assert_eq!(z.to_vec::<f32>()?[2], -1.0);
    Ok(())
}

#[test]
fn u8_masks_move_like_any_dtype() -> Result<()> {
    // The layout and copy ops treat a mask as raw elements.
    let m = Tensor::from_vec((0..12u8).collect::<Vec<_>>(), (3, 4), Device::Cpu)?;
    assert_eq!(m.t()?.contiguous()?.to_vec::<u8>()?, vec![0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]);
    assert_eq!(cat(&[&m, &m.narrow(1, 1, 2)?], 1)?.to_vec::<u8>()?[..6], [0, 1, 2, 3, 1, 2]);
    let ids = Tensor::from_vec(vec![2i64, 0], 2, Device::Cpu)?;
    assert_eq!(m.index_select(0, &ids)?.to_vec::<u8>()?, vec![8, 9, 10, 11, 0, 1, 2, 3]);
    assert_eq!(m.embedding(&ids)?.dims(), &[2, 4]);
    let g = Tensor::from_vec(vec![3i64, 0, 1], (3, 1), Device::Cpu)?;
    assert_eq!(m.gather(1, &g)?.to_vec::<u8>()?, vec![3, 4, 9]);
    assert_eq!(m.where_cond(&m, &m.logical_not()?)?.to_vec::<u8>()?[..3], [1, 1, 2]);
    assert_eq!(m.masked_fill(&m.compare_scalar(5.0, CmpOp::Gt)?, 1.0)?.to_vec::<u8>()?[5..8], [5, 1, 1]);
    Ok(())
}

#[test]
fn integer_tensors_compare_with_any_scalar_exactly() -> Result<()> {
    let u = Tensor::from_vec(vec![0u8, 2, 255], 3, Device::Cpu)?;
    assert_eq!(u.compare_scalar(2.5, CmpOp::Lt)?.to_vec::<u8>()?, vec![1, 1, 0]);
    assert_eq!(u.compare_scalar(256.0, CmpOp::Lt)?.to_vec::<u8>()?, vec![1, 1, 1]);
    assert_eq!(u.compare_scalar(-1.0, CmpOp::Gt)?.to_vec::<u8>()?, vec![1, 1, 1]);
    assert_eq!(u.compare_scalar(2.0, CmpOp::Eq)?.to_vec::<u8>()?, vec![0, 1, 0]);
    assert_eq!(u.compare_scalar(f64::NAN, CmpOp::Ne)?.to_vec::<u8>()?, vec![1, 1, 1]);
    let i = Tensor::from_vec(vec![-3i64, 4], 2, Device::Cpu)?;
    assert_eq!(i.compare_scalar(-2.5, CmpOp::Le)?.to_vec::<u8>()?, vec![1, 0]);
    Ok(())
}

#[test]
fn compare_errors_are_typed() {
    let a = randn(&[2, 3], 1);
    assert!(matches!(a.lt(&rand_f32(&[2, 3], 2)), Err(Error::DTypeMismatch { op: "lt", .. })));
    assert!(matches!(a.gt(&randn(&[4], 3)), Err(Error::ShapeMismatch { op: "gt", .. })));
    let m = rand_dtype(&[2, 3], 4, DType::U8);
    assert!(matches!(m.where_cond(&a, &rand_f32(&[2, 3], 5)), Err(Error::DTypeMismatch { op: "where_cond", .. })));
    assert!(matches!(m.where_cond(&a, &randn(&[3, 3], 6)), Err(Error::ShapeMismatch { op: "where_cond", .. })));
    let e = a.masked_fill(&rand_dtype(&[4, 2, 3], 7, DType::U32), 0.0).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { op: "masked_fill", .. }), "{e}");
}
