//! Reductions on the GPU: sum (any set of dims, keepdim), mean, var, max and min (one or
//! several dims, ties), argmax; f32, f64, f16 and bf16, contiguous, transposed and narrowed, long
//! reductions split into chunks; forward and backward.

use crate::harness::*;
use dynn_core::{DType, Device, Result, Tensor};
use dynn_ops::prelude::*;

fn tol(dtype: DType) -> f64 {
    tol_of(dtype)
}

/// Values with many ties: multiples of 0.25 in [-1, 1].
fn with_ties(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let v: Vec<f64> = rand_dtype(shape, seed, DType::F64)
        .to_f64_vec()
        .expect("values")
        .iter()
        .map(|x| (x * 4.0).round() / 4.0)
        .collect();
    Tensor::from_vec(v, shape, Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .expect("ties")
}

type F = fn(&Tensor, &[usize], bool) -> Result<Tensor>;

const SUMS: [(&str, F); 3] = [
    ("sum", |t, d, k| t.sum_dims(d, k)),
    ("mean", |t, d, k| t.mean_dims(d, k)),
    ("var", |t, d, k| t.var_dims(d, k, true)),
];

const EXTREMA: [(&str, F); 2] = [
    ("max", |t, d, k| t.max_dims(d, k)),
    ("min", |t, d, k| t.min_dims(d, k)),
];

#[test]
fn sums() {
    let mut cases = Vec::new();
    for dtype in FLOATS {
        let x = rand_dtype(&[6, 37, 5], 1, dtype);
        let dim_sets: [&[usize]; 7] = [&[0], &[1], &[2], &[0, 1], &[1, 2], &[0, 2], &[0, 1, 2]];
        for (name, f) in SUMS {
            for dims in dim_sets {
                for keep in [false, true] {
                    cases.push((
                        format!("{name} {dtype:?} [6, 37, 5] dims {dims:?} keepdim {keep}"),
                        check(
                            name,
                            std::slice::from_ref(&x),
                            |v| f(&v[0], dims, keep),
                            tol(dtype),
                            true,
                        ),
                    ));
                }
                cases.push((
                    format!("{name} {dtype:?} permuted dims {dims:?}"),
                    check(
                        name,
                        std::slice::from_ref(&x),
                        |v| f(&v[0].permute(&[2, 0, 1])?, dims, false),
                        tol(dtype),
                        true,
                    ),
                ));
                cases.push((
                    format!("{name} {dtype:?} narrowed dims {dims:?}"),
                    check(
                        name,
                        std::slice::from_ref(&x),
                        |v| f(&v[0].narrow(1, 3, 30)?, dims, true),
                        tol(dtype),
                        true,
                    ),
                ));
            }
        }
        // Row lengths on both row kernels; long rows and columns split into chunks.
        for (rows, len) in [
            (37usize, 7usize),
            (37, 128),
            (33, 1000),
            (9, 4096),
            (2, 50_000),
        ] {
            let x = rand_dtype(&[rows, len], len as u64, dtype);
            for (name, f) in SUMS {
                for dim in [0usize, 1] {
                    cases.push((
                        format!("{name} {dtype:?} {rows}x{len} dim {dim}"),
                        check(
                            name,
                            std::slice::from_ref(&x),
                            |v| f(&v[0], &[dim], false),
                            tol(dtype),
                            true,
                        ),
                    ));
                }
                cases.push((
                    format!("{name} {dtype:?} {rows}x{len} transposed, dim 1"),
                    check(
                        name,
                        std::slice::from_ref(&x),
                        |v| f(&v[0].t()?, &[1], false),
                        tol(dtype),
                        true,
                    ),
                ));
            }
        }
        let tall = rand_dtype(&[3000, 40], 9, dtype);
        cases.push((
            format!("sum {dtype:?} 3000x40 dim 0 (column chunks)"),
            check(
                "sum",
                std::slice::from_ref(&tall),
                |v| v[0].sum_dims(&[0], false),
                tol(dtype),
                true,
            ),
        ));
        if matches!(dtype, DType::F16 | DType::BF16) {
            // Three levels of column chunks (274, 2, 1): the f32 partials of 16-bit data pass
            // through every entry point (`_part`, `_mid`, `_fin`).
            let taller = rand_dtype(&[70_000, 8], 11, dtype);
            cases.push((
                format!("sum {dtype:?} 70000x8 dim 0 (chunks of chunks)"),
                check(
                    "sum",
                    &[taller],
                    |v| v[0].sum_dims(&[0], false),
                    tol(dtype),
                    true,
                ),
            ));
        }
        let big = rand_dtype(&[300, 1000], 10, dtype);
        cases.push((
            format!("sum_all {dtype:?} 300x1000"),
            check(
                "sum_all",
                std::slice::from_ref(&big),
                |v| v[0].sum_all(),
                tol(dtype),
                true,
            ),
        ));
        cases.push((
            format!("mean_all {dtype:?} 300x1000 transposed"),
            check(
                "mean_all",
                &[big],
                |v| v[0].t()?.mean_all(),
                tol(dtype),
                true,
            ),
        ));
        let scalar = rand_dtype(&[], 11, dtype);
        cases.push((
            format!("sum_all {dtype:?} rank 0"),
            check("sum_all", &[scalar], |v| v[0].sum_all(), tol(dtype), true),
        ));
    }
    run("sums", cases);
}

#[test]
fn extrema() {
    let mut cases = Vec::new();
    for dtype in FLOATS {
        for x in [
            rand_dtype(&[6, 37, 5], 1, dtype),
            with_ties(&[6, 37, 5], 2, dtype),
        ] {
            let dim_sets: [&[usize]; 5] = [&[0], &[1], &[2], &[0, 2], &[0, 1, 2]];
            for (name, f) in EXTREMA {
                for dims in dim_sets {
                    for keep in [false, true] {
                        cases.push((
                            format!("{name} {dtype:?} dims {dims:?} keepdim {keep}"),
                            check(
                                name,
                                std::slice::from_ref(&x),
                                |v| f(&v[0], dims, keep),
                                tol(dtype),
                                true,
                            ),
                        ));
                    }
                    cases.push((
                        format!("{name} {dtype:?} permuted dims {dims:?}"),
                        check(
                            name,
                            std::slice::from_ref(&x),
                            |v| f(&v[0].permute(&[1, 2, 0])?, dims, false),
                            tol(dtype),
                            true,
                        ),
                    ));
                }
            }
        }
        for (rows, len) in [(37usize, 7usize), (33, 1000), (9, 4096), (2, 50_000)] {
            let x = with_ties(&[rows, len], len as u64, dtype);
            for (name, f) in EXTREMA {
                for dim in [0usize, 1] {
                    cases.push((
                        format!("{name} {dtype:?} {rows}x{len} dim {dim} (ties)"),
                        check(
                            name,
                            std::slice::from_ref(&x),
                            |v| f(&v[0], &[dim], false),
                            tol(dtype),
                            true,
                        ),
                    ));
                }
                cases.push((
                    format!("{name} {dtype:?} {rows}x{len} narrowed, dim 1"),
                    check(
                        name,
                        std::slice::from_ref(&x),
                        |v| f(&v[0].narrow(1, 1, len - 1)?, &[1], true),
                        tol(dtype),
                        true,
                    ),
                ));
            }
        }
    }
    run("extrema", cases);
}

#[test]
fn argmax() {
    let mut cases = Vec::new();
    for dtype in FLOATS {
        let shapes: [&[usize]; 5] = [&[6, 37, 5], &[37, 7], &[33, 1000], &[3, 5000], &[2, 50_000]];
        for shape in shapes {
            for x in [rand_dtype(shape, 3, dtype), with_ties(shape, 4, dtype)] {
                for dim in 0..shape.len() {
                    for keep in [false, true] {
                        cases.push((
                            format!("argmax {dtype:?} {shape:?} dim {dim} keepdim {keep}"),
                            check(
                                "argmax",
                                std::slice::from_ref(&x),
                                |v| v[0].argmax(dim, keep),
                                0.0,
                                false,
                            ),
                        ));
                    }
                }
                cases.push((
                    format!("argmax {dtype:?} {shape:?} transposed"),
                    check(
                        "argmax",
                        std::slice::from_ref(&x),
                        |v| v[0].t()?.argmax(0, false),
                        0.0,
                        false,
                    ),
                ));
            }
        }
        // NaN wins (the first one), as on the CPU.
        let v = vec![1.0, f64::NAN, 3.0, f64::NAN, 0.5, 2.0, 2.0, -1.0];
        let x = Tensor::from_vec(v, [2, 4], Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .expect("nan");
        for dim in [0usize, 1] {
            cases.push((
                format!("argmax {dtype:?} with NaN dim {dim}"),
                check(
                    "argmax",
                    std::slice::from_ref(&x),
                    |v| v[0].argmax(dim, false),
                    0.0,
                    false,
                ),
            ));
        }
    }
    run("argmax", cases);
}

/// Chunked sums add partials in a fixed order: two runs give the same bits.
#[test]
fn sums_are_deterministic() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let x = randn(&[3, 200_000], 1).to_device(dev)?;
    let y = randn(&[5000, 40], 2).to_device(dev)?;
    let run = || -> Result<Vec<Vec<f64>>> {
        Ok(vec![
            x.sum_dims(&[1], false)?.to_f64_vec()?,
            x.sum_all()?.to_f64_vec()?,
            y.sum_dims(&[0], false)?.to_f64_vec()?,
        ])
    };
    let (a, b) = (run()?, run()?);
    for (i, (p, q)) in a.iter().zip(&b).enumerate() {
        assert!(
            p.iter().zip(q).all(|(s, t)| s.to_bits() == t.to_bits()),
            "sum {i} differs between two runs"
        );
    }
    Ok(())
}

/// Integer tensors sum into I64 (through f64) on the GPU as on the CPU.
#[test]
fn integer_sums() {
    let mut cases = Vec::new();
    for dtype in [DType::U8, DType::U32, DType::I64] {
        let x = indices(&[37, 129], 200, 5, dtype);
        for dims in [&[0usize][..], &[1], &[0, 1]] {
            cases.push((
                format!("sum {dtype:?} dims {dims:?}"),
                check(
                    "sum",
                    std::slice::from_ref(&x),
                    |v| v[0].sum_dims(dims, false),
                    0.0,
                    false,
                ),
            ));
        }
    }
    run("integer_sums", cases);
}
