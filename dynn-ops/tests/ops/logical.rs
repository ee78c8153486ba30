//! Tests of `logical_and`, `logical_or`, `logical_xor` and `logical_not`: candle oracles (built
//! from candle's comparisons) on masks of several dtypes, with broadcasting and strided views,
//! and the truth of NaN and -0.0.

use crate::common::*;
use candle_core as cc;
use dynn_core::{DType, Device, Result, Tensor};
use dynn_ops::prelude::*;

/// candle's truth of a mask (nonzero), as f32 0/1.
fn truth(t: &cc::Tensor) -> cc::Result<cc::Tensor> {
    t.to_dtype(cc::DType::F32)?.ne(0f32)?.to_dtype(cc::DType::F32)
}

fn candle_logic(k: Logic, v: &[cc::Tensor]) -> cc::Result<cc::Tensor> {
    let a = truth(&v[0])?;
    if k == Logic::Not {
        return a.eq(0f32);
    }
    let b = truth(&v[1])?;
    match k {
        Logic::And => a.broadcast_mul(&b)?.to_dtype(cc::DType::U8),
        Logic::Or => a.broadcast_maximum(&b)?.to_dtype(cc::DType::U8),
        _ => a.broadcast_ne(&b),
    }
}

fn oracle_logical() -> Result<()> {
    for k in Logic::ALL {
        let f = move |v: &[Tensor]| match k {
            Logic::And => v[0].logical_and(&v[1]),
            Logic::Or => v[0].logical_or(&v[1]),
            Logic::Xor => v[0].logical_xor(&v[1]),
            Logic::Not => v[0].logical_not(),
        };
        let c = move |v: &[cc::Tensor]| candle_logic(k, v);
        let name = k.name();
        for (da, db) in [(DType::U8, DType::U8), (DType::F32, DType::U8), (DType::I64, DType::F16)] {
            let (a, b) = (rand_dtype(&[3, 4], 1, da), rand_dtype(&[3, 4], 2, db));
            oracle(&[a.clone(), b.clone()], f, c, 0.0).ctx(format!("{name} {da} {db}"))?;
            let row = rand_dtype(&[4], 3, db);
            oracle(&[a.clone(), row], f, c, 0.0).ctx(format!("{name} {da} {db} broadcast row"))?;
            let at = rand_dtype(&[4, 3], 4, da).t()?;
            oracle(&[at, rand_dtype(&[4, 5], 7, db).narrow(1, 1, 3)?.t()?], f, c, 0.0).ctx(format!("{name} {da} {db} strided"))?;
        }
        let (a, b) = (rand_dtype(&[300, 200], 5, DType::U8), rand_dtype(&[300, 1], 6, DType::U8));
        oracle(&[a, b], f, c, 0.0).ctx(format!("{name} large"))?;
    }
    Ok(())
}

pub const GRAD_CASES: &[Case] = &[];

pub const ORACLE_CASES: &[Case] = &[(&["logical_and", "logical_or", "logical_xor", "logical_not"], oracle_logical)];

#[test]
fn nan_is_true_and_negative_zero_false() -> Result<()> {
    let x = Tensor::from_vec(vec![f32::NAN, -0.0, 0.0, 2.0], 4, Device::Cpu)?;
    assert_eq!(x.logical_not()?.to_vec::<u8>()?, vec![0, 1, 1, 0]);
    let m = Tensor::from_vec(vec![1u8, 1, 0, 0], 4, Device::Cpu)?;
    assert_eq!(x.logical_and(&m)?.to_vec::<u8>()?, vec![1, 0, 0, 0]);
    assert_eq!(x.logical_xor(&m)?.to_vec::<u8>()?, vec![0, 1, 0, 1]);
    let bad = Tensor::zeros(3, DType::U8, Device::Cpu)?;
    assert!(matches!(x.logical_or(&bad), Err(dynn_core::Error::ShapeMismatch { op: "logical_or", .. })));
    Ok(())
}
