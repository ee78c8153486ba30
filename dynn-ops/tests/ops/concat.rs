//! Tests of `cat` (and the compositions `stack`, `split`, `chunk`): gradient checks in f64 on
//! contiguous and strided inputs, candle oracles in f32 and f16 (forward and backward, including
//! the three copy paths above the parallel threshold), typed errors and zero-copy splits.

use crate::common::*;
use candle_core as cc;
use dynn_core::{DType, Error, Result, Tensor};
use dynn_ops::prelude::*;

fn grad_cat() -> Result<()> {
    let (a, b, c) = (randn(&[2, 3, 4], 1), randn(&[2, 1, 4], 2), randn(&[2, 2, 4], 3));
    gradcheck(&[a.clone(), b, c], |v| cat(&[&v[0], &v[1], &v[2]], 1)).ctx("dim 1")?;
    gradcheck(&[a.clone(), randn(&[3, 3, 4], 4)], |v| cat(&[&v[0], &v[1]], 0)).ctx("dim 0")?;
    gradcheck(&[a.clone(), randn(&[2, 3, 2], 5)], |v| cat(&[&v[0], &v[1]], -1i32)?.tanh()).ctx("dim -1, then tanh")?;
    // Strided inputs, and one tensor used twice.
    let t = randn(&[4, 2, 3], 6).permute(&[1, 2, 0])?; // (2,3,4)
    gradcheck(&[t, a.clone()], |v| cat(&[&v[0], &v[1], &v[0]], 1)).ctx("permuted input, repeated")?;
    gradcheck(&[randn(&[3, 4], 7)], |v| v[0].cat_with(&[&v[0].t()?.narrow(0, 1, 2)?.t()?], 1)).ctx("cat_with a strided view")?;
    gradcheck(&[a.clone(), randn(&[2, 3, 4], 8)], |v| stack(&[&v[0], &v[1]], 1)).ctx("stack dim 1")?;
    gradcheck(std::slice::from_ref(&a), |v| {
        let p = v[0].chunk(2, 2)?;
        cat(&[&p[1], &p[0]], 2)?.mul(&v[0])
    })
    .ctx("chunk, swap, cat")?;
    gradcheck(&[a], |v| {
        let p = v[0].split(&[1, 2], 1)?;
        p[1].sum_keepdim(1)?.mul(&p[0])
    })
    .ctx("split")?;
    Ok(())
}

fn oracle_cat() -> Result<()> {
    for dtype in [DType::F32, DType::F16] {
        let t = tol(dtype);
        let ins = [rand_dtype(&[2, 3, 4], 10, dtype), rand_dtype(&[2, 1, 4], 11, dtype), rand_dtype(&[2, 2, 4], 12, dtype)];
        oracle(&ins, |v| cat(&[&v[0], &v[1], &v[2]], 1), |v| cc::Tensor::cat(&[&v[0], &v[1], &v[2]], 1), t).ctx(format!("{dtype} dim 1"))?;
        let ins = [rand_dtype(&[2, 3], 13, dtype), rand_dtype(&[4, 3], 14, dtype)];
        oracle(&ins, |v| cat(&[&v[0], &v[1]], 0), |v| cc::Tensor::cat(&[&v[0], &v[1]], 0), t).ctx(format!("{dtype} dim 0"))?;
        let ins = [rand_dtype(&[3, 2], 15, dtype), rand_dtype(&[3, 5], 16, dtype)];
        oracle(&ins, |v| cat(&[&v[0].t()?, &v[1].t()?], 0), |v| cc::Tensor::cat(&[&v[0].t()?, &v[1].t()?], 0), t)
            .ctx(format!("{dtype} transposed inputs"))?;
    }
    let t = tol(DType::F32);
    // One long row (outer 1), long rows (row >= PAR_MIN) and many short rows, all parallel.
    let big = [rand_f32(&[300, 128], 17), rand_f32(&[200, 128], 18)];
    oracle(&big, |v| cat(&[&v[0], &v[1]], 0), |v| cc::Tensor::cat(&[&v[0], &v[1]], 0), t).ctx("large dim 0")?;
    let big = [rand_f32(&[2, 30000], 19), rand_f32(&[2, 10000], 20)];
    oracle(&big, |v| cat(&[&v[0], &v[1]], 1), |v| cc::Tensor::cat(&[&v[0], &v[1]], 1), t).ctx("large long rows")?;
    let big = [rand_f32(&[4000, 7], 21), rand_f32(&[4000, 9], 22)];
    oracle(&big, |v| cat(&[&v[0], &v[1]], 1), |v| cc::Tensor::cat(&[&v[0], &v[1]], 1), t).ctx("large short rows")?;
    Ok(())
}

fn oracle_stack_split_chunk() -> Result<()> {
    for dtype in [DType::F32, DType::F16] {
        let t = tol(dtype);
        let ins = [rand_dtype(&[3, 4], 30, dtype), rand_dtype(&[3, 4], 31, dtype), rand_dtype(&[3, 4], 32, dtype)];
        for dim in 0..3usize {
            oracle(&ins, move |v| stack(&[&v[0], &v[1], &v[2]], dim), move |v| cc::Tensor::stack(&[&v[0], &v[1], &v[2]], dim), t)
                .ctx(format!("{dtype} stack dim {dim}"))?;
        }
        let x = [rand_dtype(&[6, 4], 33, dtype)];
        for k in 0..3 {
            oracle(&x, move |v| v[0].chunk(3, 0)?[k].exp(), move |v| v[0].chunk(3, 0)?[k].exp(), t).ctx(format!("{dtype} chunk {k}"))?;
        }
        oracle(
            &x,
            |v| {
                let p = v[0].split(&[1, 3], 1)?;
                cat(&[&p[1], &p[0]], 1)
            },
            |v| cc::Tensor::cat(&[&v[0].narrow(1, 1, 3)?, &v[0].narrow(1, 0, 1)?], 1),
            t,
        )
        .ctx(format!("{dtype} split"))?;
    }
    Ok(())
}

pub const GRAD_CASES: &[Case] = &[(&["cat"], grad_cat)];

pub const ORACLE_CASES: &[Case] = &[(&["cat"], oracle_cat), (&["cat"], oracle_stack_split_chunk)];

#[test]
fn cat_errors_are_typed() {
    let a = randn(&[2, 3], 1);
    assert!(matches!(cat(&[], 0), Err(Error::InvalidArgument { op: "cat", .. })));
    assert!(matches!(stack(&[], 0), Err(Error::InvalidArgument { op: "stack", .. })));
    assert!(matches!(cat(&[&a, &rand_f32(&[2, 3], 2)], 0), Err(Error::DTypeMismatch { op: "cat", .. })));
    let e = cat(&[&a, &randn(&[3, 3], 3)], 1).unwrap_err().to_string();
    assert!(e.contains("cat") && e.contains("[3, 3]") && e.contains("[2, 3]"), "{e}");
    assert!(matches!(cat(&[&a, &randn(&[6], 4)], 0), Err(Error::InvalidArgument { op: "cat", .. })));
    assert!(matches!(cat(&[&a], 2), Err(Error::DimOutOfRange { .. })));
    assert!(matches!(stack(&[&a, &randn(&[3, 2], 5)], 0), Err(Error::ShapeMismatch { op: "stack", .. })));
    assert!(matches!(a.split(&[1, 1], 1), Err(Error::InvalidArgument { op: "split", .. })));
    assert!(matches!(a.chunk(0, 1), Err(Error::InvalidArgument { op: "chunk", .. })));
}

/// `split` and `chunk` are views (same buffer); `chunk` follows PyTorch's sizes.
#[test]
fn split_and_chunk_are_views() -> Result<()> {
    let x = randn(&[7, 2], 1);
    let sizes = |v: Vec<Tensor>| v.iter().map(|t| t.dims()[0]).collect::<Vec<_>>();
    assert_eq!(sizes(x.chunk(3, 0)?), vec![3, 3, 1]);
    assert_eq!(sizes(x.chunk(4, 0)?), vec![2, 2, 2, 1]);
    assert_eq!(sizes(x.chunk(7, 0)?), vec![1; 7]);
    assert_eq!(sizes(x.chunk(10, 0)?), vec![1; 7]);
    assert_eq!(sizes(x.chunk(6, 0)?), vec![2, 2, 2, 1]);
    let parts = x.split(&[2, 0, 5], 0)?;
    assert_eq!(sizes(parts.clone()), vec![2, 0, 5]);
    for p in parts.iter().chain(x.chunk(3, 1)?.iter()) {
        assert_eq!(p.buffer().id(), x.buffer().id());
    }
    assert_eq!(parts[2].to_vec::<f64>()?, x.narrow(0, 2, 5)?.to_vec::<f64>()?);
    let back = cat(&[&parts[0], &parts[1], &parts[2]], 0)?;
    assert_eq!(back.to_vec::<f64>()?, x.to_vec::<f64>()?);
    // cat of integer tensors works too.
    let i = Tensor::from_vec(vec![1i64, 2, 3], 3, dynn_core::Device::Cpu)?;
    assert_eq!(cat(&[&i, &i], 0)?.to_vec::<i64>()?, vec![1, 2, 3, 1, 2, 3]);
    Ok(())
}
