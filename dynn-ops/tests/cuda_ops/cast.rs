//! `to_dtype` on the GPU: every pair of the seven dtypes, contiguous and strided, with the
//! edge cases of float → integer (truncation, saturation, NaN and infinities), integer
//! wrapping and rounding of large integers; gradients between float dtypes.

use crate::harness::*;
use dynn_core::{DType, Error, Result, Tensor};
use dynn_ops::prelude::*;

/// Casts `x` with `to` on the CPU and the GPU and compares element by element: equal (NaN
/// with NaN, infinities included), or within relative `tol`.
fn same(x: &Tensor, to: DType, tol: f64) -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let name = format!("to_dtype {:?} -> {to:?}", x.dtype());
    let want = x.to_dtype(to)?;
    let got = x
        .to_device(dev)?
        .to_dtype(to)
        .map_err(|e| Error::Msg(format!("{name} on the GPU: {e}")))?;
    if got.device() != dev || got.dtype() != to {
        return Err(Error::Msg(format!(
            "{name}: got {:?} on {:?}",
            got.dtype(),
            got.device()
        )));
    }
    let (w, g) = (want.to_f64_vec()?, got.to_f64_vec()?);
    let x = x.to_f64_vec()?;
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let ok = a == b || (a.is_nan() && b.is_nan()) || (a - b).abs() <= tol * (1.0 + b.abs());
        if !ok {
            return Err(Error::Msg(format!(
                "{name}: element {i} ({}) is {a} on the GPU and {b} on the CPU",
                x[i]
            )));
        }
    }
    Ok(())
}

const DTYPES: [DType; 7] = DType::ALL;

/// Values of `dtype` a cast can start from: floats spread over ±1000 (with fractions),
/// integers below 60000 (finite in f16).
fn source(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    match dtype {
        DType::I64 | DType::U32 => indices(shape, 60_000, seed, dtype),
        DType::U8 => indices(shape, 256, seed, DType::I64)
            .to_dtype(dtype)
            .expect("u8 source"),
        _ => rand_dtype(shape, seed, DType::F64)
            .affine(1000.0, 0.0)
            .and_then(|t| t.to_dtype(dtype))
            .expect("source"),
    }
}

/// The tolerance of a cast: exact, except from f64 (or i64, through f64) to the 16-bit
/// floats, where the CPU oracle may be one ulp off the correctly rounded GPU result: `half`
/// rounds f64 to f16 through f32 (two roundings) on x86, and f64 to bf16 from the upper 32
/// bits of the f64 alone (a value just above a tie looks like the tie).
fn tol(from: DType, to: DType) -> f64 {
    match (from, to) {
        (DType::F64 | DType::I64, DType::F16) => 1e-3,
        (DType::F64 | DType::I64, DType::BF16) => 8e-3,
        _ => 0.0,
    }
}

#[test]
fn every_pair() {
    let mut cases = Vec::new();
    for from in DTYPES {
        for to in DTYPES {
            let x = source(&[37, 129], 1, from);
            // Gradients between f32 and f64 (the harness seeds f32/f64 gradients only).
            let wide = |d: DType| matches!(d, DType::F32 | DType::F64);
            let grads = wide(from) && wide(to) && from != to;
            let tol = tol(from, to);
            cases.push((
                format!("{from:?} -> {to:?}"),
                check(
                    "to_dtype",
                    std::slice::from_ref(&x),
                    move |v| v[0].to_dtype(to),
                    tol,
                    grads,
                ),
            ));
            cases.push((
                format!("{from:?} -> {to:?} transposed"),
                check(
                    "to_dtype",
                    std::slice::from_ref(&x),
                    move |v| v[0].t()?.to_dtype(to),
                    tol,
                    grads,
                ),
            ));
            cases.push((
                format!("{from:?} -> {to:?} narrowed"),
                check(
                    "to_dtype",
                    &[x],
                    move |v| v[0].narrow(1, 3, 50)?.to_dtype(to),
                    tol,
                    grads,
                ),
            ));
        }
    }
    run("cast", cases);
}

/// Float → integer: truncation toward zero, saturation at the integer's range, NaN → 0.
#[test]
fn float_to_integer_edges() -> Result<()> {
    let v = vec![
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        -3e9,
        -1.5,
        -0.7,
        -0.0,
        0.0,
        0.7,
        1.5,
        2.5,
        4_294_967_295.0,
        4.5e9,
        9.3e18,
        -9.3e18,
        1e19,
        -1e19,
        1e30,
    ];
    let n = v.len();
    let x64 = Tensor::from_vec(v, &[n][..], Device::Cpu)?;
    let x32 = x64.to_dtype(DType::F32)?;
    let x16 = x32.to_dtype(DType::F16)?;
    let xb16 = x32.to_dtype(DType::BF16)?;
    for x in [x64, x32, x16, xb16] {
        for to in [DType::I64, DType::U32] {
            same(&x, to, 0.0)?;
        }
    }
    Ok(())
}

/// Integer → integer wraps (i64 → u32) or widens; integer → float rounds to nearest.
#[test]
fn integer_edges() -> Result<()> {
    let v: Vec<i64> = vec![
        -1,
        0,
        1,
        (1 << 32) + 5,
        1 << 40,
        -(1 << 33),
        i64::MAX,
        i64::MIN,
        (1 << 53) + 1,
        (1 << 24) + 1,
        65_519,
        65_520,
        123_456_789,
    ];
    let n = v.len();
    let x = Tensor::from_vec(v, &[n][..], Device::Cpu)?;
    for to in [DType::U32, DType::F32, DType::F64, DType::BF16, DType::F16] {
        same(&x, to, if to == DType::F16 { 1e-3 } else { 0.0 })?;
    }
    let u: Vec<u32> = vec![0, 1, 65_535, 16_777_217, 2_147_483_648, 4_294_967_295];
    let n = u.len();
    let x = Tensor::from_vec(u, &[n][..], Device::Cpu)?;
    for to in [DType::I64, DType::F32, DType::F64, DType::BF16, DType::F16] {
        same(&x, to, 0.0)?;
    }
    Ok(())
}

/// f32/f64 → f16/bf16 around the rounding boundaries: ties, subnormals, overflow.
#[test]
fn half_rounding() -> Result<()> {
    let mut v = vec![
        1.0 + 1.0 / 2048.0, // f16 tie, rounds to even (down)
        1.0 + 3.0 / 2048.0, // f16 tie, rounds to even (up)
        1.0 + 1.0 / 256.0,  // bf16 tie
        1.0 + 3.0 / 256.0,  // bf16 tie
        6.0e-8,             // f16 subnormal
        1.0e-40,            // f32 subnormal, bf16 subnormal
        65_504.0,           // f16 max
        65_520.0,           // rounds to f16 infinity
        3.0e38,             // bf16 finite
        3.4e38,             // bf16 infinity
        -2.5,
        0.1,
        -0.0,
    ];
    v.extend((0..200).map(|i| (i as f64 - 100.0) * 0.013_7));
    let n = v.len();
    let x64 = Tensor::from_vec(v, &[n][..], Device::Cpu)?;
    let x32 = x64.to_dtype(DType::F32)?;
    for to in [DType::F16, DType::BF16] {
        same(&x32, to, 0.0)?;
        // From f64 the CPU and GPU may differ by one ulp where the CPU rounds through f32.
        same(&x64, to, if to == DType::F16 { 1e-3 } else { 0.0 })?;
    }
    Ok(())
}
