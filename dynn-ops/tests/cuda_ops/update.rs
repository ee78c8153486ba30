//! In-place updates on the GPU (`axpy_`, `assign_`, `scale_add_`): the updated tensor is
//! compared, CPU against GPU, with contiguous, strided (narrowed, transposed) and broadcast
//! sources and strided targets (the untouched part of the buffer is compared too).

use crate::harness::*;
use dynn_core::{DType, Result, Tensor};
use dynn_ops::prelude::*;

fn tol(dtype: DType) -> f64 {
    tol_of(dtype)
}

#[derive(Clone, Copy, Debug)]
enum Update {
    Axpy(f64),
    Assign,
    ScaleAdd(f64, f64),
}

fn apply(u: Update, target: &Tensor, x: &Tensor) -> Result<()> {
    let _g = no_grad();
    match u {
        Update::Axpy(a) => target.axpy_(a, x),
        Update::Assign => target.assign_(x),
        Update::ScaleAdd(b, a) => target.scale_add_(b, a, x),
    }
}

#[test]
fn updates() {
    type Pick = fn(&Tensor, &Tensor) -> Result<(Tensor, Tensor)>;
    // (what, target buffer shape, source shape, (target view, source view))
    let layouts: [(&str, &[usize], &[usize], Pick); 6] = [
        ("contiguous", &[37, 129], &[37, 129], |t, x| {
            Ok((t.clone(), x.clone()))
        }),
        ("transposed source", &[37, 129], &[129, 37], |t, x| {
            Ok((t.clone(), x.t()?))
        }),
        ("broadcast source", &[37, 129], &[129], |t, x| {
            Ok((t.clone(), x.clone()))
        }),
        ("narrowed target", &[37, 129], &[37, 50], |t, x| {
            Ok((t.narrow(1, 3, 50)?, x.clone()))
        }),
        ("transposed target", &[129, 37], &[37, 129], |t, x| {
            Ok((t.t()?, x.clone()))
        }),
        ("both strided", &[37, 129], &[50, 37], |t, x| {
            Ok((t.narrow(1, 7, 50)?, x.t()?))
        }),
    ];
    let mut cases = Vec::new();
    for u in [
        Update::Axpy(0.5),
        Update::Assign,
        Update::ScaleAdd(0.9, -0.25),
    ] {
        for dtype in FLOATS {
            for (i, &(what, ts, xs, pick)) in layouts.iter().enumerate() {
                let t = rand_dtype(ts, 2 * i as u64, dtype);
                let x = rand_dtype(xs, 2 * i as u64 + 1, dtype);
                let f = move |v: &[Tensor]| {
                    // A fresh buffer, so the harness's inputs stay as they were.
                    let buf = v[0].affine(1.0, 0.0)?;
                    let (target, src) = pick(&buf, &v[1])?;
                    apply(u, &target, &src)?;
                    Ok(buf)
                };
                cases.push((
                    format!("{u:?} {dtype:?} {what}"),
                    check("axpy", &[t, x], f, tol(dtype), false),
                ));
            }
        }
    }
    run("update", cases);
}

#[test]
fn large_accumulate() -> Result<()> {
    let t = randn(&[1024, 4096], 1);
    let x = randn(&[1024, 4096], 2);
    check(
        "axpy",
        &[t, x],
        |v| {
            let buf = v[0].affine(1.0, 0.0)?;
            apply(Update::Axpy(1.0), &buf, &v[1])?;
            Ok(buf)
        },
        TOL_F32,
        false,
    )
}
