//! Tests of dropout. Candle's dropout draws from its own RNG, so the "oracle" here checks the
//! defining properties instead of comparing bits: the same seed gives the same mask (on any
//! thread count and any input layout), another seed another mask, kept values are scaled by
//! 1/(1-p), the kept fraction is 1-p, train=false and p=0 are the identity, p=1 zeroes, and the
//! backward applies exactly the forward's mask (regenerated from the seed, nothing saved).

use crate::common::*;
use dynn_core::{DType, Device, Error, Result, Tensor};
use dynn_ops::prelude::*;

pub const GRAD_CASES: &[Case] = &[(&["dropout"], grad_dropout)];

pub const ORACLE_CASES: &[Case] = &[
    // Statistics and determinism, not a candle comparison (see the module doc).
    (&["dropout", "dropout_backward"], dropout_properties),
];

fn grad_dropout() -> Result<()> {
    gradcheck(&[randn(&[4, 5], 1)], |t| t[0].dropout(0.3, 42, true)).ctx("contiguous")?;
    gradcheck(&[randn(&[5, 3], 2).t()?], |t| t[0].dropout(0.5, 7, true)).ctx("transposed")?;
    gradcheck(&[randn(&[3, 7], 3)], |t| t[0].dropout(0.2, 9, true)?.sqr()).ctx("composed")?;
    Ok(())
}

fn fail(msg: String) -> Error {
    Error::Msg(msg)
}

fn dropout_properties() -> Result<()> {
    let n = 1 << 17;
    let p = 0.3;
    let ones = Tensor::ones(n, DType::F32, Device::Cpu)?;
    let a = ones.dropout(p, 1234, true)?.to_vec::<f32>()?;
    let b = ones.dropout(p, 1234, true)?.to_vec::<f32>()?;
    let c = ones.dropout(p, 1235, true)?.to_vec::<f32>()?;
    if a != b {
        return Err(fail("same seed gave different masks".into()));
    }
    let differ = a.iter().zip(&c).filter(|(x, y)| x != y).count();
    if differ < n / 4 {
        return Err(fail(format!(
            "seeds 1234 and 1235 differ in only {differ} of {n} elements"
        )));
    }
    let scale = (1.0 / (1.0 - p)) as f32;
    if let Some(v) = a.iter().find(|&&v| v != 0.0 && v != scale) {
        return Err(fail(format!(
            "value {v} is neither dropped (0) nor scaled by 1/(1-p) = {scale}"
        )));
    }
    let kept = a.iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
    if (kept - (1.0 - p)).abs() > 0.01 {
        return Err(fail(format!("kept fraction {kept}, expected {}", 1.0 - p)));
    }
    // The mean is preserved (E[dropout(x)] = x).
    let mean = a.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
    if (mean - 1.0).abs() > 0.02 {
        return Err(fail(format!("mean {mean}, expected 1")));
    }
    // Thread count does not change the mask.
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .map_err(|e| fail(e.to_string()))?;
    if one.install(|| ones.dropout(p, 1234, true).and_then(|t| t.to_vec::<f32>()))? != a {
        return Err(fail("the mask depends on the thread count".into()));
    }
    // Layout does not change the mask: a transposed view equals its contiguous copy.
    let x = rand_f32(&[40, 30], 5).t()?;
    let y1 = x.dropout(0.5, 99, true)?.to_vec::<f32>()?;
    let y2 = x.contiguous()?.dropout(0.5, 99, true)?.to_vec::<f32>()?;
    if y1 != y2 {
        return Err(fail(
            "a transposed input got a different mask than its contiguous copy".into(),
        ));
    }
    // train = false and p = 0 are the identity; p = 1 zeroes everything.
    if !x.dropout(0.5, 1, false)?.same_as(&x) || !x.dropout(0.0, 1, true)?.same_as(&x) {
        return Err(fail("train=false or p=0 is not the identity".into()));
    }
    if x.dropout(1.0, 1, true)?
        .to_vec::<f32>()?
        .iter()
        .any(|&v| v != 0.0)
    {
        return Err(fail("p=1 left non-zero values".into()));
    }
    // Backward applies the forward's mask: with x = 1, dL/dx = R * y for L = sum(y * R).
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        let x = Tensor::ones([33, 17], dtype, Device::Cpu)?.set_requires_grad(true);
        let y = x.dropout(0.4, 77, true)?;
        let r = rand_dtype(&[33, 17], 6, dtype);
        y.backward_with(r.clone())?;
        let g = x
            .grad()
            .ok_or_else(|| fail("no gradient".into()))?
            .to_f64_vec()?;
        let want: Vec<f64> = y
            .to_f64_vec()?
            .iter()
            .zip(r.to_f64_vec()?)
            .map(|(a, b)| a * b)
            .collect();
        for (i, (gv, wv)) in g.iter().zip(&want).enumerate() {
            if (gv - wv).abs() > tol(dtype) * (1.0 + wv.abs()) {
                return Err(fail(format!(
                    "{dtype}: gradient element {i} is {gv}, expected {wv}"
                )));
            }
        }
    }
    Ok(())
}

#[test]
fn dropout_errors_are_typed() {
    let x = rand_f32(&[3], 1);
    assert!(matches!(
        x.dropout(1.5, 0, true),
        Err(Error::InvalidArgument { op: "dropout", .. })
    ));
    assert!(matches!(
        x.dropout(-0.1, 0, false),
        Err(Error::InvalidArgument { .. })
    ));
    let i = Tensor::from_vec(vec![1i64], 1, Device::Cpu).unwrap();
    assert!(matches!(
        i.dropout(0.5, 0, true),
        Err(Error::UnsupportedDType { .. })
    ));
}
