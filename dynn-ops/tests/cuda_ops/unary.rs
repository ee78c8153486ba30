//! Unary ops on the GPU: every kind in f32, f64, f16 and bf16, contiguous, transposed and narrowed,
//! forward and backward.

use crate::harness::*;
use dynn_core::{DType, Result, Tensor};
use dynn_ops::ops::unary::Unary;
use dynn_ops::prelude::*;

fn input(k: Unary, shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    if matches!(k, Unary::Log | Unary::Sqrt | Unary::Rsqrt | Unary::Powf(_)) {
        rand_positive(shape, seed).to_dtype(dtype).expect("cast")
    } else {
        rand_dtype(shape, seed, dtype)
    }
}

#[test]
fn unary() {
    let mut cases = Vec::new();
    for k in Unary::ALL {
        for dtype in FLOATS {
            let tol = tol_of(dtype);
            let x = input(k, &[37, 129], 1, dtype);
            let f = |v: &[Tensor]| v[0].unary(k);
            cases.push((
                format!("{k:?} {dtype:?}"),
                check(k.name(), std::slice::from_ref(&x), f, tol, true),
            ));
            let t = |v: &[Tensor]| v[0].t()?.unary(k);
            cases.push((
                format!("{k:?} {dtype:?} transposed"),
                check(k.name(), std::slice::from_ref(&x), t, tol, true),
            ));
            let n = |v: &[Tensor]| v[0].narrow(1, 3, 50)?.unary(k);
            cases.push((
                format!("{k:?} {dtype:?} narrowed"),
                check(k.name(), &[x], n, tol, true),
            ));
            // Contiguous rows from row 4 on: the packed path at a non-zero, aligned offset.
            let rows = |v: &[Tensor]| v[0].narrow(0, 4, 30)?.unary(k);
            let x = input(k, &[37, 128], 2, dtype);
            cases.push((
                format!("{k:?} {dtype:?} aligned rows"),
                check(k.name(), &[x], rows, tol, true),
            ));
        }
    }
    run("unary", cases);
}

#[test]
fn large_relu_and_gelu() -> Result<()> {
    let x = randn(&[1024, 4096], 3);
    check(
        "relu",
        std::slice::from_ref(&x),
        |v| v[0].relu(),
        TOL_F32,
        true,
    )?;
    check("gelu", &[x], |v| v[0].gelu(), TOL_F32, true)
}
