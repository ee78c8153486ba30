//! Layout copies on the GPU: `contiguous` of transposed, permuted, narrowed and broadcast
//! views in every dtype, and `narrow_backward` (the gradient of `narrow`) on every dim with
//! contiguous and strided gradients.

use crate::harness::*;
use dynn_core::{DType, Result, Tensor};
use dynn_ops::prelude::*;

fn tol(dtype: DType) -> f64 {
    if dtype == DType::F32 { TOL_F32 } else { 1e-9 }
}

/// Values of `dtype`: random floats for f32/f64, small integers otherwise.
fn values(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    match dtype {
        DType::F32 | DType::F64 => rand_dtype(shape, seed, dtype),
        DType::F16 | DType::BF16 => rand_dtype(shape, seed, DType::F32)
            .to_dtype(dtype)
            .expect("cast"),
        _ => indices(shape, 1000, seed, dtype),
    }
}

#[test]
fn contiguous() {
    type View = fn(&Tensor) -> Result<Tensor>;
    let views: [(&str, &[usize], View); 6] = [
        ("transposed", &[37, 129], |t| t.t()),
        ("permuted", &[5, 17, 33], |t| t.permute(&[2, 0, 1])),
        ("narrowed", &[37, 129], |t| t.narrow(1, 3, 50)),
        ("narrowed rows", &[37, 129], |t| t.narrow(0, 3, 20)),
        ("broadcast", &[37, 1], |t| t.broadcast_as(&[6, 37, 129][..])),
        ("transposed 4-d", &[3, 4, 5, 6], |t| t.transpose(1, 3)),
    ];
    let mut cases = Vec::new();
    for dtype in DType::ALL {
        for (i, &(what, shape, view)) in views.iter().enumerate() {
            let x = values(shape, i as u64, dtype);
            let grads = matches!(dtype, DType::F32 | DType::F64);
            cases.push((
                format!("contiguous {dtype:?} {what}"),
                check(
                    "contiguous",
                    &[x],
                    move |v| view(&v[0])?.contiguous(),
                    tol(dtype),
                    grads,
                ),
            ));
        }
    }
    run("contiguous", cases);
}

/// (what, input shape, dim, start, len, transpose the narrowed view)
type Narrow = (&'static str, &'static [usize], usize, usize, usize, bool);

#[test]
fn narrow_backward() {
    let cases_: [Narrow; 7] = [
        ("inner dim", &[37, 129], 1, 3, 50, false),
        ("outer dim", &[37, 129], 0, 5, 20, false),
        ("middle dim", &[6, 40, 33], 1, 7, 9, false),
        ("whole dim", &[37, 129], 1, 0, 129, false),
        ("last element", &[37, 129], 1, 128, 1, false),
        ("strided gradient", &[37, 129], 1, 3, 50, true),
        ("strided gradient, outer", &[37, 129], 0, 2, 30, true),
    ];
    let mut cases = Vec::new();
    for dtype in FLOATS {
        for (i, (what, shape, dim, start, len, transpose)) in cases_.into_iter().enumerate() {
            let x = rand_dtype(shape, 20 + i as u64, dtype);
            let f = move |v: &[Tensor]| {
                let y = v[0].narrow(dim, start, len)?;
                // The transpose makes the gradient reaching `narrow_backward` strided.
                if transpose { y.t() } else { y.affine(2.0, 0.0) }
            };
            cases.push((
                format!("narrow_backward {dtype:?} {what}"),
                check("narrow", &[x], f, tol(dtype), true),
            ));
        }
    }
    run("narrow_backward", cases);
}
