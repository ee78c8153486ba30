//! `cat` (and `stack`) on the GPU: every dim, f32 and f64 with gradients (each input's is a
//! narrow view of the output's), strided inputs, row segments that are and are not whole
//! 16-byte vectors, raw copies of the 16-bit and integer dtypes, and a large join.

use crate::harness::*;
use dynn_core::{DType, Tensor};
use dynn_ops::prelude::*;

fn tol(dtype: DType) -> f64 {
    if dtype == DType::F32 { TOL_F32 } else { 1e-9 }
}

#[test]
fn cat_every_dim() {
    let mut cases = Vec::new();
    for dtype in [DType::F32, DType::F64] {
        let tl = tol(dtype);
        for dim in 0..3 {
            // Sizes along `dim` of 3, 5 and 8: segments that are and are not whole vectors.
            let shape = |n: usize| {
                let mut s = vec![4, 6, 8];
                s[dim] = n;
                s
            };
            let parts = vec![
                rand_dtype(&shape(3), 1, dtype),
                rand_dtype(&shape(5), 2, dtype),
                rand_dtype(&shape(8), 3, dtype),
            ];
            let f = move |v: &[Tensor]| cat(&[&v[0], &v[1], &v[2]], dim);
            cases.push((
                format!("cat dim {dim} {dtype:?}"),
                check("cat", &parts, f, tl, true),
            ));
            // Aligned parts (every segment a multiple of 4 elements).
            let aligned = vec![
                rand_dtype(&shape(4), 4, dtype),
                rand_dtype(&shape(8), 5, dtype),
            ];
            let fa = move |v: &[Tensor]| cat(&[&v[0], &v[1]], dim)?.tanh();
            cases.push((
                format!("cat aligned dim {dim} {dtype:?}"),
                check("cat", &aligned, fa, tl, true),
            ));
        }
        // Strided inputs: a transposed part and a narrowed one.
        let parts = vec![
            rand_dtype(&[7, 5], 6, dtype),
            rand_dtype(&[5, 9], 7, dtype),
            rand_dtype(&[5, 12], 8, dtype),
        ];
        let f = |v: &[Tensor]| cat(&[&v[0].t()?, &v[1], &v[2].narrow(1, 3, 6)?], 1);
        cases.push((
            format!("cat strided {dtype:?}"),
            check("cat", &parts, f, tl, true),
        ));
        // One input; an empty input.
        let one = vec![rand_dtype(&[3, 4], 9, dtype)];
        cases.push((
            format!("cat one input {dtype:?}"),
            check("cat", &one, |v| cat(&[&v[0]], 0), tl, true),
        ));
        let with_empty = vec![
            rand_dtype(&[3, 4], 10, dtype),
            rand_dtype(&[0, 4], 11, dtype),
        ];
        cases.push((
            format!("cat empty part {dtype:?}"),
            check("cat", &with_empty, |v| cat(&[&v[0], &v[1]], 0), tl, false),
        ));
        // stack = unsqueeze + cat.
        let same = vec![
            rand_dtype(&[3, 5], 12, dtype),
            rand_dtype(&[3, 5], 13, dtype),
        ];
        cases.push((
            format!("stack {dtype:?}"),
            check("stack", &same, |v| stack(&[&v[0], &v[1]], 1), tl, true),
        ));
        // Large: three (256, 1024) parts along the last dim.
        let big = vec![
            rand_dtype(&[256, 1024], 14, dtype),
            rand_dtype(&[256, 1024], 15, dtype),
            rand_dtype(&[256, 1024], 16, dtype),
        ];
        cases.push((
            format!("cat large {dtype:?}"),
            check("cat", &big, |v| cat(&[&v[0], &v[1], &v[2]], 1), tl, true),
        ));
    }
    run("cat", cases);
}

#[test]
fn cat_other_dtypes() {
    let mut cases = Vec::new();
    for dtype in [DType::F16, DType::BF16, DType::I64, DType::U32, DType::U8] {
        let make = |shape: &[usize], seed| {
            indices(shape, 1000, seed, DType::I64)
                .to_dtype(dtype)
                .expect("cast")
        };
        let parts = vec![make(&[3, 5], 1), make(&[3, 16], 2), make(&[9, 3], 3)];
        for dim in [0usize, 1] {
            let f = move |v: &[Tensor]| {
                let c = v[2].t()?;
                if dim == 1 {
                    cat(&[&v[0], &v[1], &c], 1)
                } else {
                    cat(&[&v[0].t()?, &v[1].t()?, &c.t()?], 0)
                }
            };
            cases.push((
                format!("cat {dtype:?} dim {dim}"),
                check("cat", &parts, f, 0.0, false),
            ));
        }
        // Rows of 16-byte multiples: the vector copy.
        let wide = vec![make(&[4, 16], 4), make(&[4, 32], 5)];
        let f = |v: &[Tensor]| cat(&[&v[0], &v[1]], 1);
        cases.push((
            format!("cat {dtype:?} 16-byte rows"),
            check("cat", &wide, f, 0.0, false),
        ));
    }
    run("cat_other_dtypes", cases);
}
