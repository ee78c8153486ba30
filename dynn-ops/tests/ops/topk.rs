//! Tests of `topk` and `topk_backward`: gradient checks of the values in f64 (any dim, largest
//! and smallest, strided input), candle oracles (arg_sort_last_dim + gather) for the values
//! (forward and backward) and the indices in f32 and f16, and the tie-break and NaN rules.

use crate::common::*;
use candle_core as cc;
use dynn_core::{DType, Device, Error, Result, Tensor};
use dynn_ops::prelude::*;

fn grad_topk() -> Result<()> {
    let x = randn(&[4, 6], 1);
    gradcheck(std::slice::from_ref(&x), |v| Ok(v[0].topk(3, 1, true)?.0)).ctx("dim 1 largest")?;
    gradcheck(std::slice::from_ref(&x), |v| Ok(v[0].topk(2, 0, false)?.0)).ctx("dim 0 smallest")?;
    gradcheck(&[x], |v| v[0].topk(6, -1i32, true)?.0.sqr()).ctx("k = n, then sqr")?;
    let xt = randn(&[5, 3, 4], 2).permute(&[1, 2, 0])?; // (3,4,5) strided
    gradcheck(std::slice::from_ref(&xt), |v| Ok(v[0].topk(2, 1, true)?.0)).ctx("permuted, middle dim")?;
    gradcheck(&[xt], |v| Ok(v[0].topk(4, 2, false)?.0)).ctx("permuted, last dim")?;
    Ok(())
}

/// candle's top-k along `dim`: arg-sort the last dim (after moving `dim` there), take `k`, gather.
fn candle_topk(x: &cc::Tensor, k: usize, dim: usize, largest: bool) -> cc::Result<(cc::Tensor, cc::Tensor)> {
    let last = x.rank() - 1;
    let xt = x.transpose(dim, last)?.contiguous()?;
    let idx = xt.arg_sort_last_dim(!largest)?.narrow(last, 0, k)?.contiguous()?;
    let vals = xt.gather(&idx, last)?;
    Ok((vals.transpose(dim, last)?, idx.transpose(dim, last)?))
}

fn oracle_topk() -> Result<()> {
    for dtype in [DType::F32, DType::F16] {
        let t = tol(dtype);
        for (shape, k, dim, largest) in [(&[4usize, 9][..], 3, 1, true), (&[4, 9], 4, 1, false), (&[7, 3, 5], 2, 0, true), (&[3, 8, 5], 8, 1, false)] {
            let x = rand_dtype(shape, 10 + k as u64, dtype);
            let what = format!("{dtype} {shape:?} k {k} dim {dim} largest {largest}");
            oracle(std::slice::from_ref(&x), move |v| Ok(v[0].topk(k, dim, largest)?.0), move |v| Ok(candle_topk(&v[0], k, dim, largest)?.0), t)
                .ctx(format!("values {what}"))?;
            oracle(&[x], move |v| Ok(v[0].topk(k, dim, largest)?.1), move |v| Ok(candle_topk(&v[0], k, dim, largest)?.1), 0.0)
                .ctx(format!("indices {what}"))?;
        }
    }
    // Above the parallel threshold, and a transposed input.
    let x = rand_f32(&[300, 257], 20);
    oracle(std::slice::from_ref(&x), |v| Ok(v[0].topk(10, 1, true)?.0), |v| Ok(candle_topk(&v[0], 10, 1, true)?.0), tol(DType::F32)).ctx("large")?;
    oracle(&[x.t()?], |v| Ok(v[0].topk(5, 0, false)?.1), |v| Ok(candle_topk(&v[0], 5, 0, false)?.1), 0.0).ctx("large transposed")?;
    Ok(())
}

pub const GRAD_CASES: &[Case] = &[(&["topk"], grad_topk)];

pub const ORACLE_CASES: &[Case] = &[(&["topk", "topk_backward"], oracle_topk)];

#[test]
fn ties_go_to_the_lower_index_and_nan_is_largest() -> Result<()> {
    let x = Tensor::from_vec(vec![1f32, 3.0, 3.0, 2.0, 3.0, f32::NAN, 0.0], 7, Device::Cpu)?;
    let (v, i) = x.topk(4, 0, true)?;
    assert_eq!(i.to_vec::<i64>()?, vec![5, 1, 2, 4]);
    let v = v.to_vec::<f32>()?;
    assert!(v[0].is_nan() && v[1..] == [3.0, 3.0, 3.0]);
    let (v, i) = x.topk(3, 0, false)?;
    assert_eq!((v.to_vec::<f32>()?, i.to_vec::<i64>()?), (vec![0.0, 1.0, 2.0], vec![6, 0, 3]));
    // Integer values too; the indices never require grad.
    let n = Tensor::from_vec(vec![4i64, 9, 9, 1], 4, Device::Cpu)?;
    let (v, i) = n.topk(2, 0, true)?;
    assert_eq!((v.to_vec::<i64>()?, i.to_vec::<i64>()?), (vec![9, 9], vec![1, 2]));
    let w = randn(&[5], 1).set_requires_grad(true);
    let (v, i) = w.topk(2, 0, true)?;
    assert!(v.requires_grad() && !i.requires_grad());
    Ok(())
}

#[test]
fn topk_errors_are_typed() -> Result<()> {
    let x = randn(&[3, 4], 1);
    let e = x.topk(5, 1, true).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { op: "topk", .. }) && e.to_string().contains("k = 5"), "{e}");
    assert!(matches!(x.topk(1, 2, true), Err(Error::DimOutOfRange { .. })));
    let (v, i) = x.topk(0, 1, true)?;
    assert_eq!((v.dims(), i.dims()), (&[3, 0][..], &[3, 0][..]));
    Ok(())
}
