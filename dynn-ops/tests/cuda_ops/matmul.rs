//! Matmul, linear (with its activation and residual epilogues), addcmul and attention_probs
//! (the bias accumulated into by cuBLAS) on the GPU: plain, transposed operands, batched with broadcasting,
//! narrowed (non-unit strides cuBLAS cannot read directly), f32, f64, f16 and bf16 (f32
//! accumulation on both devices), forward and backward.

use crate::harness::*;
use dynn_core::{DType, Result};
use dynn_ops::prelude::*;

#[test]
fn matmul() {
    let mut cases = Vec::new();
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        // Half-precision results differ by the rounding of the f32 sum (a broadcast batch's
        // gradients add a reduction of rounded products): a few ulps.
        let tol = match dtype {
            DType::F32 => 1e-4,
            _ => tol_of(dtype),
        };
        let r = |s: &[usize], seed| rand_dtype(s, seed, dtype);
        let mut case =
            |name: &str,
             ins: Vec<dynn_core::Tensor>,
             f: fn(&[dynn_core::Tensor]) -> Result<dynn_core::Tensor>| {
                cases.push((format!("{name} {dtype:?}"), check(name, &ins, f, tol, true)));
            };
        case("2d", vec![r(&[33, 70], 1), r(&[70, 45], 2)], |v| {
            v[0].matmul(&v[1])
        });
        case(
            "a transposed",
            vec![r(&[70, 33], 3), r(&[70, 45], 4)],
            |v| v[0].t()?.matmul(&v[1]),
        );
        case(
            "b transposed",
            vec![r(&[33, 70], 5), r(&[45, 70], 6)],
            |v| v[0].matmul(&v[1].t()?),
        );
        case(
            "both transposed",
            vec![r(&[70, 33], 7), r(&[45, 70], 8)],
            |v| v[0].t()?.matmul(&v[1].t()?),
        );
        case(
            "batched",
            vec![r(&[4, 17, 30], 9), r(&[4, 30, 12], 10)],
            |v| v[0].matmul(&v[1]),
        );
        case(
            "batch x weight",
            vec![r(&[3, 5, 17, 30], 11), r(&[30, 12], 12)],
            |v| v[0].matmul(&v[1]),
        );
        case(
            "broadcast batch",
            vec![r(&[4, 1, 8, 9], 13), r(&[3, 9, 6], 14)],
            |v| v[0].matmul(&v[1]),
        );
        case(
            "attention_probs, mask",
            vec![
                r(&[2, 3, 17, 16], 27),
                r(&[2, 3, 20, 16], 28),
                r(&[2, 1, 1, 20], 29),
            ],
            |v| v[0].attention_probs(&v[1], Some(&v[2]), 0.25),
        );
        case(
            "attention_probs, no bias",
            vec![r(&[4, 17, 16], 30), r(&[4, 20, 16], 31)],
            |v| v[0].attention_probs(&v[1], None, 0.25),
        );
        case(
            "linear",
            vec![r(&[3, 17, 30], 21), r(&[30, 12], 22), r(&[12], 23)],
            |v| v[0].linear(&v[1], &v[2]),
        );
        case(
            "linear_relu",
            vec![r(&[3, 17, 30], 32), r(&[30, 12], 33), r(&[12], 34)],
            |v| v[0].linear_act(&v[1], &v[2], Activation::Relu),
        );
        case(
            "linear_sigmoid",
            vec![r(&[17, 30], 35), r(&[30, 12], 36), r(&[12], 37)],
            |v| v[0].linear_act(&v[1], &v[2], Activation::Sigmoid),
        );
        case(
            "linear_tanh",
            vec![r(&[17, 30], 38), r(&[30, 12], 39), r(&[12], 40)],
            |v| v[0].linear_act(&v[1], &v[2], Activation::Tanh),
        );
        case(
            "add_linear, transposed residual",
            vec![
                r(&[17, 30], 41),
                r(&[30, 12], 42),
                r(&[12], 43),
                r(&[12, 17], 44),
            ],
            |v| v[3].t()?.add_linear(&v[0], &v[1], &v[2]),
        );
        case(
            "addcmul, broadcast gate",
            vec![r(&[3, 17, 12], 45), r(&[3, 17, 12], 46), r(&[17, 1], 47)],
            |v| v[0].addcmul(&v[1], &v[2]),
        );
        case(
            "linear, transposed weight",
            vec![r(&[17, 30], 24), r(&[12, 30], 25), r(&[12], 26)],
            |v| v[0].linear(&v[1].t()?, &v[2]),
        );
        case("narrowed", vec![r(&[20, 50], 15), r(&[40, 30], 16)], |v| {
            v[0].narrow(1, 5, 40)?.matmul(&v[1].narrow(1, 2, 20)?)
        });
        case(
            "permuted batch",
            vec![r(&[8, 4, 16], 17), r(&[4, 16, 8], 18)],
            |v| v[0].permute(&[1, 0, 2])?.matmul(&v[1]),
        );
        case("vector rows", vec![r(&[1, 64], 19), r(&[64, 1], 20)], |v| {
            v[0].matmul(&v[1])
        });
    }
    run("matmul", cases);
}

#[test]
fn large_square() -> Result<()> {
    check(
        "1024²",
        &[randn(&[1024, 1024], 21), randn(&[1024, 1024], 22)],
        |v| v[0].matmul(&v[1]),
        1e-4,
        false,
    )
}
