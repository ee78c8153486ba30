//! Tests of matmul: gradient checks in f64 for plain, batched, batch-broadcast and transposed
//! operands; forward and backward against candle's `broadcast_matmul` in f32, f16 and bf16,
//! including sizes that take the parallel and batch-folding paths.

use crate::common::*;
use candle_core as cc;
use dynn_core::{DType, Result, Tensor};
use dynn_ops::prelude::*;

fn mm(x: &[Tensor]) -> Result<Tensor> {
    x[0].matmul(&x[1])
}

fn cmm(x: &[cc::Tensor]) -> cc::Result<cc::Tensor> {
    x[0].broadcast_matmul(&x[1])
}

fn grad_cases() -> Result<()> {
    gradcheck(&[randn(&[3, 4], 1), randn(&[4, 5], 2)], mm).ctx("2d")?;
    gradcheck(&[randn(&[2, 3, 4], 3), randn(&[2, 4, 2], 4)], mm).ctx("batched")?;
    gradcheck(&[randn(&[2, 1, 3, 4], 5), randn(&[3, 4, 2], 6)], mm).ctx("batch broadcast")?;
    gradcheck(&[randn(&[4, 3], 7), randn(&[5, 4], 8)], |x| x[0].t()?.matmul(&x[1].t()?)).ctx("transposed operands")?;
    gradcheck(&[randn(&[3, 6], 9), randn(&[4, 5], 10)], |x| x[0].narrow(1, 1, 4)?.matmul(&x[1])).ctx("narrowed lhs")?;
    gradcheck(&[randn(&[2, 4, 3], 11), randn(&[4, 5], 12)], |x| x[0].transpose(1, 2)?.matmul(&x[1])).ctx("transposed batch times a weight")?;
    Ok(())
}

fn oracle_cases() -> Result<()> {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let t = tol(dtype) * 4.0;
        oracle(&[rand_dtype(&[5, 7], 1, dtype), rand_dtype(&[7, 3], 2, dtype)], mm, cmm, t).ctx(format!("2d {dtype}"))?;
        oracle(&[rand_dtype(&[4, 6, 8], 3, dtype), rand_dtype(&[8, 5], 4, dtype)], mm, cmm, t).ctx(format!("folded batch {dtype}"))?;
        oracle(&[rand_dtype(&[2, 3, 4, 6], 5, dtype), rand_dtype(&[3, 6, 2], 6, dtype)], mm, cmm, t).ctx(format!("broadcast {dtype}"))?;
    }
    let (a, b) = (rand_f32(&[8, 64, 32], 7), rand_f32(&[8, 32, 64], 8));
    oracle(&[a, b], mm, cmm, 1e-4).ctx("parallel over batches")?;
    let (a, b) = (rand_f32(&[96, 80], 9), rand_f32(&[96, 70], 10));
    oracle(&[a, b], |x| x[0].t()?.matmul(&x[1]), |x| x[0].t()?.matmul(&x[1]), 1e-4).ctx("transposed lhs")?;
    Ok(())
}

pub const GRAD_CASES: &[Case] = &[(&["matmul"], grad_cases)];
pub const ORACLE_CASES: &[Case] = &[(&["matmul"], oracle_cases)];
