//! Binary ops on the GPU: every kind in f32, f64, f16 and bf16 with same-shape contiguous (aligned and
//! unaligned), transposed, narrowed and broadcast operands, forward and backward. Gradients
//! of broadcast operands are reduced with `sum_to` (the reduce family's kernels).

use crate::harness::*;
use dynn_core::{DType, Result, Tensor};
use dynn_ops::ops::binary::Binary;
use dynn_ops::prelude::*;

/// An operand: `pow` gets a positive base; everything else values in ±[0.1, 1].
fn operand(k: Binary, shape: &[usize], seed: u64, dtype: DType, lhs: bool) -> Tensor {
    if k == Binary::Pow && lhs {
        rand_positive(shape, seed).to_dtype(dtype).expect("cast")
    } else {
        rand_dtype(shape, seed, dtype)
    }
}

fn tol(dtype: DType) -> f64 {
    tol_of(dtype)
}

/// How the lhs is viewed before the op.
#[derive(Clone, Copy)]
enum View {
    /// As given.
    Plain,
    /// Transposed (the lhs is created with its last two dims swapped).
    Transposed,
    /// `narrow(1, 3, 50)` of the lhs.
    Narrowed,
    /// `narrow(0, 1, len - 2)` of a rank-1 lhs: contiguous at an odd offset (unaligned).
    Offset,
    /// `narrow(0, 4, len - 8)` of a rank-1 lhs: contiguous at an offset of one 16-byte pack.
    AlignedOffset,
}

/// (case name, lhs shape, rhs shape, lhs view).
type Case = (&'static str, &'static [usize], &'static [usize], View);

const CASES: [Case; 15] = [
    ("same shape", &[37, 129], &[37, 129], View::Plain),
    ("odd length", &[1001], &[1001], View::Plain),
    ("unaligned", &[1003], &[1001], View::Offset),
    ("transposed", &[129, 37], &[37, 129], View::Transposed),
    ("narrowed", &[37, 129], &[37, 50], View::Narrowed),
    ("row broadcast", &[37, 129], &[129], View::Plain),
    ("column broadcast", &[37, 129], &[37, 1], View::Plain),
    ("outer broadcast", &[37, 1], &[1, 129], View::Plain),
    ("scalar rhs", &[37, 129], &[], View::Plain),
    ("scalar lhs", &[], &[37, 129], View::Plain),
    ("rank 3", &[4, 33, 65], &[33, 1], View::Plain),
    // Periodic operands (the packed path): bias rows whose width is a multiple of a pack.
    ("bias row, width 128", &[37, 128], &[128], View::Plain),
    ("bias lhs, width 128", &[128], &[37, 128], View::Plain),
    ("rank-3 bias", &[4, 33, 64], &[33, 64], View::Plain),
    ("aligned offset", &[1008], &[1000], View::AlignedOffset),
];

fn view(t: &Tensor, v: View) -> Result<Tensor> {
    match v {
        View::Plain => Ok(t.clone()),
        View::Transposed => t.t(),
        View::Narrowed => t.narrow(1, 3, 50),
        View::Offset => t.narrow(0, 1, t.dims()[0] - 2),
        View::AlignedOffset => t.narrow(0, 4, t.dims()[0] - 8),
    }
}

#[test]
fn binary() {
    let mut cases = Vec::new();
    for k in Binary::ALL {
        for dtype in FLOATS {
            for (i, &(what, sa, sb, l)) in CASES.iter().enumerate() {
                let seed = 10 * i as u64;
                let a = operand(k, sa, seed + 1, dtype, true);
                let b = operand(k, sb, seed + 2, dtype, false);
                let f = move |v: &[Tensor]| view(&v[0], l)?.binary(&v[1], k);
                cases.push((
                    format!("{k:?} {dtype:?} {what}"),
                    check(k.name(), &[a, b], f, tol(dtype), true),
                ));
            }
            // Both operands strided: a transposed lhs and a narrowed rhs.
            let a = operand(k, &[50, 37], 101, dtype, true);
            let b = operand(k, &[37, 60], 102, dtype, false);
            let f = move |v: &[Tensor]| v[0].t()?.binary(&v[1].narrow(1, 5, 50)?, k);
            cases.push((
                format!("{k:?} {dtype:?} both strided"),
                check(k.name(), &[a, b], f, tol(dtype), true),
            ));
        }
    }
    run("binary", cases);
}

/// `maximum` / `minimum` with ties: the gradient goes to `a` on a tie on both devices.
#[test]
fn maximum_minimum_ties() {
    let ints = |shape: &[usize], seed: u64, dtype: DType| {
        indices(shape, 3, seed, DType::I64)
            .to_dtype(dtype)
            .expect("cast")
    };
    let mut cases = Vec::new();
    for k in [Binary::Maximum, Binary::Minimum] {
        for dtype in FLOATS {
            let f = move |v: &[Tensor]| v[0].binary(&v[1], k);
            let (a, b) = (ints(&[41, 67], 5, dtype), ints(&[41, 67], 6, dtype));
            cases.push((
                format!("{k:?} {dtype:?} ties"),
                check(k.name(), &[a, b], f, tol(dtype), true),
            ));
            let (a, c) = (ints(&[41, 67], 7, dtype), ints(&[67], 8, dtype));
            cases.push((
                format!("{k:?} {dtype:?} ties, broadcast"),
                check(k.name(), &[a, c], f, tol(dtype), true),
            ));
        }
    }
    run("binary ties", cases);
}

/// Large operands: the vectorised contiguous path and a bias-style row broadcast.
#[test]
fn large_add_mul_and_bias() -> Result<()> {
    let a = randn(&[1024, 4096], 21);
    let b = randn(&[1024, 4096], 22);
    let bias = randn(&[4096], 23);
    check(
        "add",
        &[a.clone(), b.clone()],
        |v| v[0].add(&v[1]),
        TOL_F32,
        true,
    )?;
    check("mul", &[a.clone(), b], |v| v[0].mul(&v[1]), TOL_F32, true)?;
    check("add bias", &[a, bias], |v| v[0].add(&v[1]), TOL_F32, true)
}
