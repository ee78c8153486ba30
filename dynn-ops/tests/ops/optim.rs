//! Tests of the fused optimizer updates `ema`, `ema_sq` (also with a gradient scale) and
//! `adam_step`: compared with candle's arithmetic on the same values, in f32 and bf16, on
//! contiguous and transposed targets.

use crate::common::*;
use candle_core as cc;
use dynn_core::{DType, Result, no_grad};
use dynn_ops::prelude::*;

fn oracle_cases() -> Result<()> {
    let _g = no_grad();
    for dtype in [DType::F32, DType::BF16] {
        let t = tol(dtype);
        for transposed in [false, true] {
            let fresh = |seed| -> Result<_> {
                let x = rand_dtype(&[7, 5], seed, dtype).affine(1.0, 0.0)?;
                Ok(if transposed { x.t()? } else { x })
            };
            let (m, v, p) = (fresh(1)?, fresh(2)?.sqr()?, fresh(3)?);
            let g = rand_dtype(m.dims(), 4, dtype);
            let (m0, v0, p0) = (reference_input(&m), reference_input(&v), reference_input(&p));
            let gc = reference_input(&g);
            let what = format!("{dtype} transposed={transposed}");

            m.ema_(0.9, &g)?;
            let want_m = ce(ce(&m0 * 0.9)? + ce(&gc * 0.1)?)?;
            assert_close(&m, &want_m, t).ctx(format!("ema {what}"))?;

            v.ema_sq_(0.99, &g)?;
            let want_v = ce(ce(&v0 * 0.99)? + ce(ce(gc.sqr())? * 0.01)?)?;
            assert_close(&v, &want_v, t).ctx(format!("ema_sq {what}"))?;

            // Scaled by a clipping factor in the same pass.
            let (ms, vs) = (fresh(5)?, fresh(6)?.sqr()?);
            let (ms0, vs0) = (reference_input(&ms), reference_input(&vs));
            ms.ema_scaled_(0.9, 0.25, &g)?;
            let want_ms = ce(ce(&ms0 * 0.9)? + ce(&gc * (0.1 * 0.25))?)?;
            assert_close(&ms, &want_ms, t).ctx(format!("ema_scaled {what}"))?;
            vs.ema_sq_scaled_(0.99, 0.25, &g)?;
            let want_vs = ce(ce(&vs0 * 0.99)? + ce(ce(gc.sqr())? * (0.01 * 0.0625))?)?;
            assert_close(&vs, &want_vs, t).ctx(format!("ema_sq_scaled {what}"))?;

            p.adam_step_(0.999, 0.05, 1e-3, &m, &v)?;
            let (mc, vc) = (reference_input(&m), reference_input(&v));
            let step = ce(ce(&mc / ce(ce(vc.sqrt())? + 1e-3)?)? * 0.05)?;
            let want_p = ce(ce(&p0 * 0.999)? - step)?;
            assert_close(&p, &want_p, t).ctx(format!("adam_step {what}"))?;
        }
    }
    // A large contiguous tensor takes the parallel path.
    let p = rand_f32(&[300, 257], 5).affine(1.0, 0.0)?;
    let m = rand_f32(&[300, 257], 6);
    let v = rand_f32(&[300, 257], 7).sqr()?;
    let before = reference_input(&p);
    p.adam_step_(1.0, 0.01, 1e-8, &m, &v)?;
    let step = ce(ce(&reference_input(&m) / ce(ce(reference_input(&v).sqrt())? + 1e-8)?)? * 0.01)?;
    let want: cc::Tensor = ce(before - step)?;
    assert_close(&p, &want, 1e-5).ctx("parallel adam_step")?;
    Ok(())
}

fn shape_mismatch_is_an_error() -> Result<()> {
    let _g = no_grad();
    let m = rand_f32(&[3, 4], 1).affine(1.0, 0.0)?;
    let g = rand_f32(&[4], 2);
    match m.ema_(0.9, &g) {
        Err(dynn_core::Error::ShapeMismatch { .. }) => Ok(()),
        other => Err(dynn_core::Error::Msg(format!("expected a shape mismatch, got {other:?}"))),
    }
}

pub const GRAD_CASES: &[Case] = &[];
pub const ORACLE_CASES: &[Case] = &[
    (&["ema", "ema_sq", "adam_step"], oracle_cases),
    (&[], shape_mismatch_is_an_error),
];
