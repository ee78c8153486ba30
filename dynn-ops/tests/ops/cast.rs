//! Tests of `to_dtype`: candle oracles over pairs of all seven dtypes (forward, and backward
//! between float dtypes), a gradient check through lower precision, truncation toward zero,
//! and the no-copy identity cast.

use crate::common::*;
use dynn_core::{DType, Device, Error, Result, Tensor};
use dynn_ops::grad::Backward;
use dynn_ops::prelude::*;

const ALL: [DType; 7] = DType::ALL;

/// Values in ±[0, 9] with fractions, so float → int truncation and sign matter.
fn wide(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let mut r = Rng::new(seed);
    let v: Vec<f64> = (0..shape.iter().product::<usize>()).map(|_| 9.0 * (2.0 * r.uniform() - 1.0)).collect();
    from_f64(&v, shape, dtype).expect("wide")
}

fn oracle_cast() -> Result<()> {
    for from in ALL {
        for to in ALL {
            // Unsigned targets get non-negative values (negative float → u32 saturates in
            // dynn, candle's `as` does the same; negative i64 → u32 wraps in both).
            let x = match from {
                DType::I64 | DType::U32 | DType::U8 => rand_dtype(&[3, 5], 1, from),
                _ if matches!(to, DType::U32 | DType::U8) => wide(&[3, 5], 2, from).abs()?,
                _ => wide(&[3, 5], 2, from),
            };
            // The reference is candle's cast of the same values; the tolerance is the coarser
            // of the two dtypes (f16 inputs reach candle widened to f32).
            let t = tol(from).max(tol(to));
            let cd = candle_dtype(to);
            oracle(std::slice::from_ref(&x), move |v| v[0].to_dtype(to), move |v| v[0].to_dtype(cd), t).ctx(format!("{from} -> {to}"))?;
            oracle(&[x.t()?], move |v| v[0].to_dtype(to), move |v| v[0].to_dtype(cd), t).ctx(format!("{from} -> {to} transposed"))?;
        }
    }
    let big = rand_f32(&[300, 200], 3);
    oracle(&[big.t()?], |v| v[0].to_dtype(DType::BF16), |v| v[0].to_dtype(candle_core::DType::BF16), tol(DType::BF16)).ctx("large")?;
    Ok(())
}

/// d/dx of `sum(R * f64(c * f32(x)))` is `c * R`: analytic gradients through f32 checked
/// against central differences with a step large enough for f32 rounding (the function is
/// linear, so the step adds no truncation error).
fn grad_cast() -> Result<()> {
    for (mid, eps, rtol) in [(DType::F32, 1e-2, 1e-4), (DType::F16, 0.25, 2e-2)] {
        let x = randn(&[3, 4], 1).t()?;
        let r = randn(&[4, 3], 2);
        let f = |x: &Tensor| -> Result<Tensor> { x.to_dtype(mid)?.scale(1.5)?.to_dtype(DType::F64) };
        let leaf = x.detach().set_requires_grad(true);
        f(&leaf)?.backward_with(r.clone())?;
        let g = leaf.grad().ok_or_else(|| Error::Msg("no gradient".into()))?.to_f64_vec()?;
        let (xv, rv) = (x.to_f64_vec()?, r.to_f64_vec()?);
        for j in 0..xv.len() {
            let loss = |d: f64| -> Result<f64> {
                let mut v = xv.clone();
                v[j] += d;
                let y = f(&Tensor::from_vec(v, (4, 3), Device::Cpu)?)?.to_f64_vec()?;
                Ok(y.iter().zip(&rv).map(|(a, b)| a * b).sum())
            };
            let n = (loss(eps)? - loss(-eps)?) / (2.0 * eps);
            if (g[j] - n).abs() > rtol * (1.0 + n.abs()) {
                return Err(Error::Msg(format!("via {mid}: element {j}: analytic {} numeric {n}", g[j])));
            }
        }
    }
    Ok(())
}

pub const GRAD_CASES: &[Case] = &[(&["to_dtype"], grad_cast)];

pub const ORACLE_CASES: &[Case] = &[(&["to_dtype"], oracle_cast)];

#[test]
fn float_to_int_truncates_toward_zero() -> Result<()> {
    let x = Tensor::from_vec(vec![-2.7f32, -0.5, 0.5, 2.7, 1e10, f32::NAN], 6, Device::Cpu)?;
    assert_eq!(x.to_dtype(DType::I64)?.to_vec::<i64>()?, vec![-2, 0, 0, 2, 10_000_000_000, 0]);
    assert_eq!(x.to_dtype(DType::U32)?.to_vec::<u32>()?, vec![0, 0, 0, 2, u32::MAX, 0]);
    let i = Tensor::from_vec(vec![-1i64, 1 << 33, 7], 3, Device::Cpu)?;
    assert_eq!(i.to_dtype(DType::U32)?.to_vec::<u32>()?, vec![u32::MAX, 0, 7]);
    // u8: floats saturate at 0 and 255, wider integers wrap (Rust's `as`).
    assert_eq!(x.to_dtype(DType::U8)?.to_vec::<u8>()?, vec![0, 0, 0, 2, 255, 0]);
    assert_eq!(i.to_dtype(DType::U8)?.to_vec::<u8>()?, vec![255, 0, 7]);
    let u = Tensor::from_vec(vec![256u32, 300, 5], 3, Device::Cpu)?;
    assert_eq!(u.to_dtype(DType::U8)?.to_vec::<u8>()?, vec![0, 44, 5]);
    let h = Tensor::from_vec(vec![1.0f64 + 1.0 / 2048.0, 65520.0], 2, Device::Cpu)?.to_dtype(DType::F16)?;
    assert_eq!(h.to_f64_vec()?, vec![1.0, f64::INFINITY]); // ties to even; overflow to inf
    Ok(())
}

#[test]
fn identity_cast_is_the_same_tensor() -> Result<()> {
    for d in ALL {
        let x = rand_dtype(&[2, 3], 1, d);
        assert!(x.to_dtype(d)?.same_as(&x));
    }
    // Casts into integers carry no gradient; between floats they do.
    let x = randn(&[3], 2).set_requires_grad(true);
    assert!(x.to_dtype(DType::F32)?.requires_grad());
    assert!(!x.to_dtype(DType::I64)?.requires_grad());
    Ok(())
}
