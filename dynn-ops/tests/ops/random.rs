//! Tests of the seeded initialisers. Candle's random tensors come from its own generator, so
//! the "oracle" checks the distributions' statistics (range, mean, variance, the normal's
//! one-sigma mass) and determinism (same seed same bits on any thread count, another seed
//! other bits) instead of comparing values. Both ops are non-differentiable.

use crate::common::*;
use dynn_core::{DType, Device, Error, Result, Tensor};
use dynn_ops::prelude::*;

pub const GRAD_CASES: &[Case] = &[];

pub const ORACLE_CASES: &[Case] = &[
    // Statistics and determinism, not a candle comparison (see the module doc).
    (&["rand_uniform"], uniform_properties),
    (&["rand_normal"], normal_properties),
];

fn fail(msg: String) -> Error {
    Error::Msg(msg)
}

fn moments(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    (mean, var)
}

/// Same seed: same bits, also on one thread; another seed: other bits.
fn check_determinism(make: impl Fn(u64) -> Result<Tensor> + Sync) -> Result<()> {
    let a = make(5)?.to_f64_vec()?;
    if make(5)?.to_f64_vec()? != a {
        return Err(fail("same seed gave different values".into()));
    }
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .map_err(|e| fail(e.to_string()))?;
    if one.install(|| make(5))?.to_f64_vec()? != a {
        return Err(fail("values depend on the thread count".into()));
    }
    let b = make(6)?.to_f64_vec()?;
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    if same > a.len() / 100 {
        return Err(fail(format!(
            "seeds 5 and 6 agree on {same} of {} elements",
            a.len()
        )));
    }
    Ok(())
}

fn uniform_properties() -> Result<()> {
    let n = 200_000;
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        let t = rand_uniform(n, -2.0, 3.0, dtype, 1, Device::Cpu)?;
        if t.dtype() != dtype || t.dims() != [n] {
            return Err(fail(format!(
                "got {} {}, expected {dtype} [{n}]",
                t.dtype(),
                t.shape()
            )));
        }
        let v = t.to_f64_vec()?;
        if let Some(x) = v.iter().find(|&&x| !(-2.0..=3.0).contains(&x)) {
            return Err(fail(format!("{dtype}: value {x} outside [-2, 3]")));
        }
        let (mean, var) = moments(&v);
        if (mean - 0.5).abs() > 0.02 || (var - 25.0 / 12.0).abs() > 0.03 {
            return Err(fail(format!(
                "{dtype}: mean {mean} (want 0.5), variance {var} (want {})",
                25.0 / 12.0
            )));
        }
    }
    check_determinism(|s| Tensor::rand_uniform([300, 211], 0.0, 1.0, DType::F32, s, Device::Cpu))
}

fn normal_properties() -> Result<()> {
    let n = 200_001; // odd: the last Box–Muller pair is cut in half
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        let t = rand_normal(n, 1.5, 2.0, dtype, 3, Device::Cpu)?;
        let v = t.to_f64_vec()?;
        if v.iter().any(|x| !x.is_finite()) {
            return Err(fail(format!("{dtype}: non-finite value")));
        }
        let (mean, var) = moments(&v);
        if (mean - 1.5).abs() > 0.03 || (var - 4.0).abs() > 0.08 {
            return Err(fail(format!(
                "{dtype}: mean {mean} (want 1.5), variance {var} (want 4)"
            )));
        }
        let within = v.iter().filter(|&&x| (x - 1.5).abs() < 2.0).count() as f64 / n as f64;
        if (within - 0.6827).abs() > 0.01 {
            return Err(fail(format!(
                "{dtype}: {within} of the mass within one sigma, want 0.6827"
            )));
        }
    }
    check_determinism(|s| Tensor::rand_normal([301, 211], 0.0, 1.0, DType::F64, s, Device::Cpu))
}

#[test]
fn random_errors_are_typed() {
    assert!(matches!(
        rand_uniform(3, 0.0, 1.0, DType::I64, 0, Device::Cpu),
        Err(Error::UnsupportedDType {
            op: "rand_uniform",
            ..
        })
    ));
    assert!(matches!(
        rand_uniform(3, 1.0, 0.0, DType::F32, 0, Device::Cpu),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        rand_normal(3, 0.0, -1.0, DType::F32, 0, Device::Cpu),
        Err(Error::InvalidArgument {
            op: "rand_normal",
            ..
        })
    ));
    assert!(matches!(
        rand_normal(3, f64::NAN, 1.0, DType::F32, 0, Device::Cpu),
        Err(Error::InvalidArgument { .. })
    ));
    // Empty shapes work.
    assert_eq!(
        rand_normal([0, 3], 0.0, 1.0, DType::F32, 0, Device::Cpu)
            .unwrap()
            .elem_count(),
        0
    );
}
