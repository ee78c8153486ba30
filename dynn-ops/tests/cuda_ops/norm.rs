//! Layer norm and RMS norm on the GPU: row lengths on every kernel plan, with and without
//! weight and bias, f32, f64, f16 and bf16, contiguous, transposed and narrowed, 3-d; forward and the
//! fused backward (dx, dweight, dbias); the parameter gradients are bit-identical between runs.

use crate::harness::*;
use dynn_core::{DType, Result, Tensor};
use dynn_ops::prelude::*;

fn tol(dtype: DType) -> f64 {
    tol_of(dtype)
}

/// `kind`: 0 layer norm (weight, bias), 1 layer norm (weight), 2 layer norm (none),
/// 3 RMS norm (weight), 4 RMS norm (none). `v` = [x, weight, bias].
fn norm(kind: usize, x: &Tensor, v: &[Tensor]) -> Result<Tensor> {
    match kind {
        0 => x.layer_norm(Some(&v[1]), Some(&v[2]), 1e-5),
        1 => x.layer_norm(Some(&v[1]), None, 1e-5),
        2 => x.layer_norm(None, None, 1e-5),
        3 => x.rms_norm(Some(&v[1]), 1e-6),
        _ => x.rms_norm(None, 1e-6),
    }
}

const KINDS: [&str; 5] = [
    "layer_norm w+b",
    "layer_norm w",
    "layer_norm",
    "rms_norm w",
    "rms_norm",
];

#[test]
fn norms() {
    let mut cases = Vec::new();
    for dtype in FLOATS {
        // 7/129: single elements; 128/1000/1024: 16-byte warp plans; 2001: block, single
        // elements; 4096: block, 16-byte loads. 2100 rows: several rows per chunk.
        for (rows, len) in [
            (37usize, 7usize),
            (37, 128),
            (37, 129),
            (33, 1000),
            (2100, 64),
            (16, 1024),
            (300, 2001),
            (9, 4096),
        ] {
            let x = rand_dtype(&[rows, len], len as u64, dtype);
            let w = rand_dtype(&[len], 2, dtype);
            let b = rand_dtype(&[len], 3, dtype);
            let ins = [x, w, b];
            for (kind, kname) in KINDS.iter().enumerate() {
                let what = |s: &str| format!("{kname} {dtype:?} {rows}x{len} {s}");
                cases.push((
                    what("contiguous"),
                    check(kname, &ins, |v| norm(kind, &v[0], v), tol(dtype), true),
                ));
                cases.push((
                    what("rows narrowed (offset)"),
                    check(
                        kname,
                        &ins,
                        |v| norm(kind, &v[0].narrow(0, 1, rows - 2)?, v),
                        tol(dtype),
                        true,
                    ),
                ));
                if len <= 1024 && rows <= 64 {
                    // Rows with stride: x.t() of a (len, rows) tensor.
                    let xt = rand_dtype(&[len, rows], 5, dtype);
                    cases.push((
                        what("transposed"),
                        check(
                            kname,
                            &[xt, ins[1].clone(), ins[2].clone()],
                            |v| norm(kind, &v[0].t()?, v),
                            tol(dtype),
                            true,
                        ),
                    ));
                }
            }
        }
        // 3-d input and narrowed (strided) parameters.
        let x = rand_dtype(&[4, 6, 96], 9, dtype);
        let wide = rand_dtype(&[2, 96], 10, dtype);
        for (kind, kname) in KINDS.iter().enumerate() {
            cases.push((
                format!("{kname} {dtype:?} 3-d"),
                check(
                    kname,
                    &[x.clone(), wide.clone(), wide.clone()],
                    |v| {
                        let w = v[1].narrow(0, 0, 1)?.reshape([96])?;
                        let b = v[2].narrow(0, 1, 1)?.reshape([96])?;
                        norm(kind, &v[0], &[v[0].clone(), w, b])
                    },
                    tol(dtype),
                    true,
                ),
            ));
        }
    }
    run("norms", cases);
}

/// The fused backward's weight and bias gradients add fixed chunks of rows in a fixed order:
/// two runs give the same bits.
#[test]
fn norm_grads_are_deterministic() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    for (rows, len) in [(4096usize, 1024usize), (700, 2001)] {
        let x = randn(&[rows, len], 1).to_device(dev)?;
        let w = randn(&[len], 2).to_device(dev)?;
        let b = randn(&[len], 3).to_device(dev)?;
        let seed = randn(&[rows, len], 4).to_device(dev)?;
        let grads = || -> Result<Vec<Vec<f64>>> {
            let (x, w, b) = (
                x.clone().set_requires_grad(true),
                w.clone().set_requires_grad(true),
                b.clone().set_requires_grad(true),
            );
            x.layer_norm(Some(&w), Some(&b), 1e-5)?
                .backward_with(seed.clone())?;
            [x, w, b]
                .iter()
                .map(|t| {
                    t.grad()
                        .ok_or_else(|| dynn_core::Error::Msg("no gradient".into()))?
                        .to_f64_vec()
                })
                .collect()
        };
        let (a, b) = (grads()?, grads()?);
        for (i, (ga, gb)) in a.iter().zip(&b).enumerate() {
            let same = ga.iter().zip(gb).all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(same, "{rows}x{len}: gradient {i} differs between two runs");
        }
    }
    Ok(())
}

/// Large rows on the CPU oracle too (the benchmark's shape), forward and backward.
#[test]
fn layer_norm_4096x1024() -> Result<()> {
    let x = randn(&[4096, 1024], 1);
    let w = randn(&[1024], 2);
    let b = randn(&[1024], 3);
    check(
        "layer_norm",
        &[x, w, b],
        |v| v[0].layer_norm(Some(&v[1]), Some(&v[2]), 1e-5),
        1e-4,
        true,
    )
}
