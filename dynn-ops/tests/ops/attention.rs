//! Tests of attention_probs: gradient checks in f64 (with and without a bias, broadcast
//! batches, a broadcast mask, transposed and narrowed inputs) and forward + backward against
//! candle's `broadcast_matmul`, scale, `broadcast_add` and `softmax` in f32, f16 and
//! bf16.

use crate::common::*;
use candle_core as cc;
use dynn_core::{DType, Result, Tensor};
use dynn_ops::prelude::*;

pub const GRAD_CASES: &[Case] = &[(&["attention_probs"], grad_cases)];
pub const ORACLE_CASES: &[Case] = &[(&["attention_probs"], oracle_cases)];

const SCALE: f64 = 0.37;

fn probs(x: &[Tensor]) -> Result<Tensor> {
    x[0].attention_probs(&x[1], x.get(2), SCALE)
}

fn cprobs(x: &[cc::Tensor]) -> cc::Result<cc::Tensor> {
    let mut s = (x[0].broadcast_matmul(&x[1].t()?)? * SCALE)?;
    if let Some(b) = x.get(2) {
        s = s.broadcast_add(b)?;
    }
    // candle's composed softmax (its fused one has no backward), in f32 for the 16-bit types.
    let p = candle_nn::ops::softmax(&s.to_dtype(cc::DType::F32)?, cc::D::Minus1)?;
    p.to_dtype(s.dtype())
}

fn grad_cases() -> Result<()> {
    gradcheck(&[randn(&[3, 4], 1), randn(&[5, 4], 2)], probs).ctx("2d, no bias")?;
    gradcheck(&[randn(&[2, 3, 4], 3), randn(&[2, 5, 4], 4), randn(&[2, 3, 5], 5)], probs).ctx("batched, full bias")?;
    gradcheck(&[randn(&[2, 2, 3, 4], 6), randn(&[2, 2, 5, 4], 7), randn(&[2, 1, 1, 5], 8)], probs).ctx("heads, broadcast mask")?;
    gradcheck(&[randn(&[2, 3, 4], 9), randn(&[5, 4], 10), randn(&[5], 11)], probs).ctx("shared keys, row bias")?;
    gradcheck(&[randn(&[4, 3], 12), randn(&[4, 5], 13), randn(&[3, 7], 14)], |x| {
        x[0].t()?.attention_probs(&x[1].t()?, Some(&x[2].narrow(1, 1, 5)?), SCALE)
    })
    .ctx("transposed q and k, narrowed bias")?;
    Ok(())
}

fn oracle_cases() -> Result<()> {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let t = tol(dtype) * 4.0;
        let r = |s: &[usize], seed| rand_dtype(s, seed, dtype);
        oracle(&[r(&[5, 8], 1), r(&[7, 8], 2)], probs, cprobs, t).ctx(format!("2d {dtype}"))?;
        oracle(&[r(&[2, 3, 6, 8], 3), r(&[2, 3, 9, 8], 4), r(&[2, 1, 1, 9], 5)], probs, cprobs, t).ctx(format!("heads, mask {dtype}"))?;
    }
    let r = |s: &[usize], seed| rand_f32(s, seed);
    oracle(&[r(&[4, 2, 64, 16], 6), r(&[4, 2, 64, 16], 7), r(&[4, 2, 64, 64], 8)], probs, cprobs, 1e-4).ctx("full bias, parallel paths")?;
    Ok(())
}

/// Edge sizes: no inner dim (the scores are the bias alone), one key, and a dense layer with
/// no inputs (the output is the bias).
#[test]
fn empty_products_leave_the_bias() -> Result<()> {
    let q = rand_f32(&[2, 3, 0], 1);
    let k = rand_f32(&[2, 4, 0], 2);
    let bias = rand_f32(&[2, 3, 4], 3);
    let p = q.attention_probs(&k, Some(&bias), 0.5)?;
    let want = bias.softmax(-1)?;
    assert_eq!(p.to_vec::<f32>()?, want.to_vec::<f32>()?);
    let one = rand_f32(&[2, 3, 5], 4).attention_probs(&rand_f32(&[2, 1, 5], 5), None, 0.5)?;
    assert_eq!(one.to_vec::<f32>()?, vec![1.0; 6]);
    let x = rand_f32(&[3, 0], 6);
    let w = rand_f32(&[0, 4], 7);
    let b = rand_f32(&[4], 8);
    let y = x.linear(&w, &b)?;
    assert_eq!(y.dims(), [3, 4]);
    assert_eq!(y.to_vec::<f32>()?, b.to_vec::<f32>()?.repeat(3));
    Ok(())
}
