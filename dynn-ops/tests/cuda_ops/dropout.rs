//! Dropout on the GPU: the mask is the CPU's bit for bit (same seed, same counter hash), so
//! forward and backward (`dropout_backward` regenerates the mask) must be identical, on every
//! drop probability, odd and even sizes, and strided inputs.

use crate::harness::*;
use dynn_core::{DType, Result, Tensor};
use dynn_ops::prelude::*;

#[test]
fn dropout_is_bit_identical() {
    let mut cases = Vec::new();
    for dtype in FLOATS {
        for (i, p) in [0.1, 0.5, 0.9, 1.0].into_iter().enumerate() {
            let seed = 1000 + i as u64;
            // 37 x 129 is odd: the last element uses the low half of its pair's hash.
            let x = rand_dtype(&[37, 129], i as u64, dtype);
            let f = move |v: &[Tensor]| v[0].dropout(p, seed, true);
            cases.push((
                format!("dropout p {p} {dtype:?}"),
                check("dropout", std::slice::from_ref(&x), f, 0.0, true),
            ));
            let ft = move |v: &[Tensor]| v[0].t()?.dropout(p, seed, true);
            cases.push((
                format!("dropout p {p} transposed {dtype:?}"),
                check("dropout", std::slice::from_ref(&x), ft, 0.0, true),
            ));
            let fnw = move |v: &[Tensor]| v[0].narrow(1, 3, 50)?.dropout(p, seed ^ 7, true);
            cases.push((
                format!("dropout p {p} narrowed {dtype:?}"),
                check("dropout", &[x], fnw, 0.0, true),
            ));
        }
    }
    run("dropout", cases);
}

#[test]
fn large_dropout() -> Result<()> {
    let x = randn(&[1024, 4096], 3);
    check(
        "dropout",
        std::slice::from_ref(&x),
        |v| v[0].dropout(0.1, 42, true),
        0.0,
        true,
    )?;
    let y = rand_dtype(&[1, 1], 4, DType::F64);
    check("dropout", &[y], |v| v[0].dropout(0.5, 5, true), 0.0, true)
}
