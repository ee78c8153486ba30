//! Tests of the binary ops: every kind gradient-checked in f64 with equal shapes, numpy
//! broadcasting ((4,1,3) op (5,3), rank-0 operands on either side), non-contiguous operands and
//! an operand used twice; and compared forward and backward with candle's `broadcast_*` ops in
//! f32, f16 and bf16, including sizes that take the parallel and broadcast fast paths; and
//! `addcmul` the same ways, and against `mul` then `add` bit for bit.

use crate::common::*;
use candle_core as cc;
use dynn_core::{DType, Result, Tensor};
use dynn_ops::ops::binary::Binary;
use dynn_ops::prelude::*;

/// The left operand: positive for `pow` (a real power needs a positive base).
fn lhs(k: Binary, shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    if k == Binary::Pow { rand_positive_dtype(shape, seed, dtype) } else { rand_dtype(shape, seed, dtype) }
}

fn rhs(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    rand_dtype(shape, seed, dtype)
}

/// The same function in candle (broadcasting).
fn candle_binary(k: Binary, a: &cc::Tensor, b: &cc::Tensor) -> cc::Result<cc::Tensor> {
    match k {
        Binary::Add => a.broadcast_add(b),
        Binary::Sub => a.broadcast_sub(b),
        Binary::Mul => a.broadcast_mul(b),
        Binary::Div => a.broadcast_div(b),
        Binary::Pow => a.broadcast_pow(b),
        Binary::Maximum => a.broadcast_maximum(b),
        Binary::Minimum => a.broadcast_minimum(b),
    }
}

/// `(lhs, rhs)` operand pairs of `dtype`: equal shapes, broadcasting both ways, rank 0, and
/// non-contiguous views.
fn pairs(k: Binary, dtype: DType) -> Result<Vec<(&'static str, Tensor, Tensor)>> {
    let a = |s: &[usize], seed| lhs(k, s, seed, dtype);
    let b = |s: &[usize], seed| rhs(s, seed, dtype);
    Ok(vec![
        ("same shape", a(&[3, 4], 1), b(&[3, 4], 2)),
        ("(4,1,3) op (5,3)", a(&[4, 1, 3], 3), b(&[5, 3], 4)),
        ("(5,3) op (4,1,3)", a(&[5, 3], 5), b(&[4, 1, 3], 6)),
        ("(2,3) op rank 0", a(&[2, 3], 7), b(&[], 8)),
        ("rank 0 op (2,3)", a(&[], 9), b(&[2, 3], 10)),
        ("column op row", a(&[3, 1], 11), b(&[1, 4], 12)),
        ("transposed op narrowed", a(&[4, 3], 13).t()?, b(&[3, 8], 14).narrow(1, 2, 4)?),
        ("permuted (4,1,3) op transposed (5,3)", a(&[3, 1, 4], 15).permute(&[2, 1, 0])?, b(&[3, 5], 16).t()?),
        ("narrowed blocks op contiguous", a(&[2, 40], 17).narrow(1, 3, 20)?, b(&[2, 20], 18)),
    ])
}

fn grad_case(k: Binary) -> Result<()> {
    for (what, a, b) in pairs(k, DType::F64)? {
        gradcheck(&[a, b], |v| v[0].binary(&v[1], k)).ctx(format!("{k:?} {what}"))?;
    }
    // The same tensor on both sides: both gradients accumulate into one leaf.
    let x = lhs(k, &[2, 3], 20, DType::F64);
    gradcheck(&[x], |v| v[0].binary(&v[0], k)).ctx(format!("{k:?} x op x"))?;
    // Only one side requires grad.
    let (a, b) = (lhs(k, &[4, 1, 3], 21, DType::F64), rhs(&[5, 3], 22, DType::F64));
    gradcheck_some(&[a.clone(), b.clone()], &[true, false], |v| v[0].binary(&v[1], k)).ctx(format!("{k:?} lhs only"))?;
    gradcheck_some(&[a, b], &[false, true], |v| v[0].binary(&v[1], k)).ctx(format!("{k:?} rhs only"))?;
    Ok(())
}

fn oracle_case(k: Binary) -> Result<()> {
    let f = |v: &[Tensor]| v[0].binary(&v[1], k);
    let cf = |v: &[cc::Tensor]| candle_binary(k, &v[0], &v[1]);
    for (what, a, b) in pairs(k, DType::F32)? {
        oracle(&[a, b], f, cf, tol(DType::F32)).ctx(format!("{k:?} f32 {what}"))?;
    }
    // Half precision. Broadcast gradients sum several rounded products, so these use equal
    // shapes (the broadcast reductions are covered in f32 above and in the reduce family).
    for dtype in [DType::F16, DType::BF16] {
        let (a, b) = (lhs(k, &[3, 5], 31, dtype), rhs(&[3, 5], 32, dtype));
        let t = tol(dtype);
        oracle(&[a.clone(), b.clone()], f, cf, t).ctx(format!("{k:?} {dtype} same shape"))?;
        oracle(&[a.t()?, b.t()?], f, cf, t).ctx(format!("{k:?} {dtype} transposed"))?;
    }
    // Above the parallel threshold: both contiguous, a broadcast row (rhs constant along the
    // last dim in the kernel's view: stride 0), a broadcast column, and a generic strided pair.
    let t = tol(DType::F32);
    let big = |s: &[usize], seed| lhs(k, s, seed, DType::F32);
    oracle(&[big(&[200, 190], 41), rhs(&[200, 190], 42, DType::F32)], f, cf, t).ctx(format!("{k:?} large"))?;
    oracle(&[big(&[200, 190], 43), rhs(&[190], 44, DType::F32)], f, cf, t).ctx(format!("{k:?} large row"))?;
    oracle(&[big(&[200, 1], 45), rhs(&[200, 190], 46, DType::F32)], f, cf, t).ctx(format!("{k:?} large column"))?;
    oracle(&[big(&[190, 200], 47).t()?, rhs(&[200, 190], 48, DType::F32)], f, cf, t).ctx(format!("{k:?} large transposed"))?;
    Ok(())
}

/// `r + a ⊙ b` through `addcmul` and through `mul` then `add`.
fn addcmul(v: &[Tensor]) -> Result<Tensor> {
    v[0].addcmul(&v[1], &v[2])
}

fn add_mul(v: &[Tensor]) -> Result<Tensor> {
    v[0].add(&v[1].mul(&v[2])?)
}

/// `(r, a, b)` triples: equal shapes, broadcasting each way, and strided views.
fn triples(dtype: DType) -> Result<Vec<(&'static str, Vec<Tensor>)>> {
    let t = |s: &[usize], seed| rand_dtype(s, seed, dtype);
    Ok(vec![
        ("same shape", vec![t(&[3, 4], 1), t(&[3, 4], 2), t(&[3, 4], 3)]),
        ("broadcast gate", vec![t(&[2, 3, 4], 4), t(&[2, 3, 4], 5), t(&[3, 1], 6)]),
        ("broadcast residual", vec![t(&[4], 7), t(&[3, 4], 8), t(&[3, 4], 9)]),
        ("strided", vec![t(&[4, 3], 10).t()?, t(&[3, 8], 11).narrow(1, 2, 4)?, t(&[4, 3], 12).t()?]),
    ])
}

fn addcmul_grad_cases() -> Result<()> {
    for (what, v) in triples(DType::F64)? {
        gradcheck(&v, addcmul).ctx(format!("addcmul {what}"))?;
    }
    Ok(())
}

fn addcmul_oracle_cases() -> Result<()> {
    let cf = |v: &[cc::Tensor]| v[0].broadcast_add(&v[1].broadcast_mul(&v[2])?);
    for (what, v) in triples(DType::F32)? {
        oracle(&v, addcmul, cf, tol(DType::F32)).ctx(format!("addcmul f32 {what}"))?;
    }
    for dtype in [DType::F16, DType::BF16] {
        let v = vec![rand_dtype(&[3, 5], 21, dtype), rand_dtype(&[3, 5], 22, dtype), rand_dtype(&[3, 5], 23, dtype)];
        oracle(&v, addcmul, cf, tol(dtype)).ctx(format!("addcmul {dtype}"))?;
    }
    let v = vec![rand_f32(&[200, 190], 24), rand_f32(&[200, 190], 25), rand_f32(&[190], 26)];
    oracle(&v, addcmul, cf, tol(DType::F32)).ctx("addcmul large")?;
    // The same bits as `mul` then `add`, forward and (shapes equal) backward.
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        for (what, v) in triples(dtype)? {
            let ctx = format!("addcmul {dtype} {what}");
            let (fused, separate) = {
                let _g = no_grad();
                (addcmul(&v)?, add_mul(&v)?)
            };
            assert_bits(&fused, &separate).ctx(format!("{ctx}: forward"))?;
            if what == "same shape" || what == "strided" {
                let r = rand_dtype(fused.dims(), 31, dtype);
                let (gf, gs) = (dynn_grad(&v, addcmul, &r)?, dynn_grad(&v, add_mul, &r)?);
                for (i, (a, b)) in gf.iter().zip(&gs).enumerate() {
                    assert_bits(a, b).ctx(format!("{ctx}: gradient of input {i}"))?;
                }
            }
        }
    }
    Ok(())
}

pub const GRAD_CASES: &[Case] = &[
    (&["addcmul"], addcmul_grad_cases),
    (&["add"], || grad_case(Binary::Add)),
    (&["sub"], || grad_case(Binary::Sub)),
    (&["mul"], || grad_case(Binary::Mul)),
    (&["div"], || grad_case(Binary::Div)),
    (&["pow"], || grad_case(Binary::Pow)),
    (&["maximum"], || grad_case(Binary::Maximum)),
    (&["minimum"], || grad_case(Binary::Minimum)),
];

pub const ORACLE_CASES: &[Case] = &[
    (&["addcmul"], addcmul_oracle_cases),
    (&["add"], || oracle_case(Binary::Add)),
    (&["sub"], || oracle_case(Binary::Sub)),
    (&["mul"], || oracle_case(Binary::Mul)),
    (&["div"], || oracle_case(Binary::Div)),
    (&["pow"], || oracle_case(Binary::Pow)),
    (&["maximum", "maximum_mask"], || oracle_case(Binary::Maximum)),
    (&["minimum", "minimum_mask"], || oracle_case(Binary::Minimum)),
];

/// Ties: dynn's documented rule sends the whole gradient to `a` (candle splits it, so this is
/// checked directly rather than against the oracle).
#[test]
fn maximum_minimum_ties_go_to_lhs() -> Result<()> {
    let a = Tensor::from_vec(vec![1.0f64, 2.0, 3.0], 3, dynn_core::Device::Cpu)?.set_requires_grad(true);
    let b = Tensor::from_vec(vec![1.0f64, 5.0, 0.0], 3, dynn_core::Device::Cpu)?.set_requires_grad(true);
    a.maximum(&b)?.sum_all()?.backward()?;
    assert_eq!(a.grad().unwrap().to_vec::<f64>()?, vec![1.0, 0.0, 1.0]);
    assert_eq!(b.grad().unwrap().to_vec::<f64>()?, vec![0.0, 1.0, 0.0]);
    a.zero_grad();
    b.zero_grad();
    a.minimum(&b)?.sum_all()?.backward()?;
    assert_eq!(a.grad().unwrap().to_vec::<f64>()?, vec![1.0, 1.0, 0.0]);
    assert_eq!(b.grad().unwrap().to_vec::<f64>()?, vec![0.0, 0.0, 1.0]);
    Ok(())
}

/// Every kind has cases.
#[test]
fn cases_cover_every_kind() {
    for k in Binary::ALL {
        assert!(GRAD_CASES.iter().any(|c| c.0.contains(&k.name())), "{} has no gradient case", k.name());
        assert!(ORACLE_CASES.iter().any(|c| c.0.contains(&k.name())), "{} has no oracle case", k.name());
    }
}
