//! Softmax and log-softmax on the GPU: row lengths on every kernel plan (warp with 16-byte or
//! single-element loads, block, column), f32, f64, f16 and bf16, contiguous, transposed and narrowed,
//! other dims, masked (−∞) logits; forward and backward.

use crate::harness::*;
use dynn_core::{DType, Device, Result, Tensor};
use dynn_ops::prelude::*;

fn tol(dtype: DType) -> f64 {
    tol_of(dtype)
}

fn name(log: bool) -> &'static str {
    if log { "log_softmax" } else { "softmax" }
}

fn apply(t: &Tensor, dim: isize, log: bool) -> Result<Tensor> {
    if log {
        t.log_softmax(dim)
    } else {
        t.softmax(dim)
    }
}

#[test]
fn softmax_rows() {
    let mut cases = Vec::new();
    for dtype in FLOATS {
        // 7/129: single elements; 128/1000/1024: 16-byte warp plans (1000 is not a power of
        // two); 2000: block with 16-byte loads; 2001: block, single elements; 4096: block.
        for len in [7usize, 128, 129, 1000, 1024, 2000, 2001, 4096] {
            let rows = if len > 1024 { 9 } else { 37 };
            let x = rand_dtype(&[rows, len], len as u64, dtype);
            for log in [false, true] {
                let what = |w: &str| format!("{} {dtype:?} {rows}x{len} {w}", name(log));
                let n = name(log);
                cases.push((
                    what("contiguous"),
                    check(
                        n,
                        std::slice::from_ref(&x),
                        |v| apply(&v[0], -1, log),
                        tol(dtype),
                        true,
                    ),
                ));
                cases.push((
                    what("rows narrowed (offset)"),
                    check(
                        n,
                        std::slice::from_ref(&x),
                        |v| apply(&v[0].narrow(0, 1, rows - 2)?, -1, log),
                        tol(dtype),
                        true,
                    ),
                ));
                cases.push((
                    what("columns narrowed"),
                    check(
                        n,
                        std::slice::from_ref(&x),
                        |v| apply(&v[0].narrow(1, 1, len - 2)?, -1, log),
                        tol(dtype),
                        true,
                    ),
                ));
                cases.push((
                    what("dim 0 (columns)"),
                    check(
                        n,
                        std::slice::from_ref(&x),
                        |v| apply(&v[0], 0, log),
                        tol(dtype),
                        true,
                    ),
                ));
                if len <= 1024 {
                    cases.push((
                        what("transposed rows"),
                        check(
                            n,
                            std::slice::from_ref(&x),
                            |v| apply(&v[0].t()?, -1, log),
                            tol(dtype),
                            true,
                        ),
                    ));
                }
            }
        }
    }
    run("softmax_rows", cases);
}

#[test]
fn softmax_other_dims() {
    let mut cases = Vec::new();
    for dtype in FLOATS {
        let x = rand_dtype(&[3, 50, 6], 7, dtype);
        let y = rand_dtype(&[5, 37, 1, 1], 8, dtype);
        for log in [false, true] {
            let n = name(log);
            for dim in [0isize, 1, 2] {
                cases.push((
                    format!("{n} {dtype:?} [3, 50, 6] dim {dim}"),
                    check(
                        n,
                        std::slice::from_ref(&x),
                        |v| apply(&v[0], dim, log),
                        tol(dtype),
                        true,
                    ),
                ));
            }
            cases.push((
                format!("{n} {dtype:?} permuted, dim 1"),
                check(
                    n,
                    std::slice::from_ref(&x),
                    |v| apply(&v[0].permute(&[2, 1, 0])?, 1, log),
                    tol(dtype),
                    true,
                ),
            ));
            // Trailing size-1 dims: rows along dim 1.
            cases.push((
                format!("{n} {dtype:?} [5, 37, 1, 1] dim 1"),
                check(
                    n,
                    std::slice::from_ref(&y),
                    |v| apply(&v[0], 1, log),
                    tol(dtype),
                    true,
                ),
            ));
        }
    }
    run("softmax_other_dims", cases);
}

/// Attention-style masking: −∞ logits get probability 0 (never NaN) on every plan.
#[test]
fn softmax_masked() {
    let mut cases = Vec::new();
    for len in [7usize, 128, 1000, 2001] {
        let rows = 12;
        let mut v = randn(&[rows, len], 11).to_f64_vec().expect("values");
        for (i, x) in v.iter_mut().enumerate() {
            // Row r keeps its first r + 2 columns except every third one past the first.
            let (r, c) = (i / len, i % len);
            if c > r + 1 || (c > 0 && c % 3 == 0) {
                *x = f64::NEG_INFINITY;
            }
        }
        let x = Tensor::from_vec(v, [rows, len], Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .expect("tensor");
        cases.push((
            format!("softmax masked {rows}x{len}"),
            check("softmax", &[x], |v| v[0].softmax(-1), TOL_F32, true),
        ));
    }
    run("softmax_masked", cases);
}
