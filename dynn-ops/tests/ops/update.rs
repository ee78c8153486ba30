//! Tests of the in-place updates `axpy` and `assign`: compared with candle's arithmetic in
//! f32 and bf16, on contiguous and transposed targets with broadcast sources. They have no
//! backward (refused on tensors that require grad while the tape is on: see errors.rs).

use crate::common::*;
use candle_core as cc;
use dynn_core::{DType, Result, no_grad};
use dynn_ops::prelude::*;

fn oracle_cases() -> Result<()> {
    for dtype in [DType::F32, DType::BF16] {
        let t = tol(dtype);
        let target = rand_dtype(&[6, 5], 1, dtype);
        let x = rand_dtype(&[5], 2, dtype);
        // axpy on a fresh copy: target + 0.5·x (x broadcast over rows).
        let _g = no_grad();
        let out = target.affine(1.0, 0.0)?;
        out.axpy_(0.5, &x)?;
        let want = ce(reference_input(&target).broadcast_add(&ce(reference_input(&x) * 0.5)?))?;
        assert_close(&out, &want, t).ctx(format!("axpy {dtype}"))?;
        // scale_add on a transposed target.
        let tt = rand_dtype(&[5, 6], 3, dtype).affine(1.0, 0.0)?;
        let view = tt.t()?;
        let src = rand_dtype(&[6, 5], 4, dtype);
        view.scale_add_(0.25, -2.0, &src)?;
        let old = ce(reference_input(&rand_dtype(&[5, 6], 3, dtype)).t())?;
        let want = ce((ce(old * 0.25)? + ce(reference_input(&src) * -2.0)?).and_then(|v| v.t()))?;
        assert_close(&tt, &want, t).ctx(format!("scale_add on a transposed target {dtype}"))?;
        // assign.
        let dst = rand_dtype(&[6, 5], 5, dtype).affine(1.0, 0.0)?;
        dst.assign_(&src)?;
        assert_close(&dst, &reference_input(&src), t).ctx(format!("assign {dtype}"))?;
    }
    let big = rand_f32(&[256, 300], 6).affine(1.0, 0.0)?;
    let before = reference_input(&big);
    let x = rand_f32(&[256, 300], 7);
    {
        let _g = no_grad();
        big.axpy_(-0.1, &x)?;
    }
    let want: cc::Tensor = ce(before + ce(reference_input(&x) * -0.1)?)?;
    assert_close(&big, &want, 1e-6).ctx("parallel axpy")?;
    Ok(())
}

pub const GRAD_CASES: &[Case] = &[];
pub const ORACLE_CASES: &[Case] = &[(&["axpy", "assign"], oracle_cases)];
