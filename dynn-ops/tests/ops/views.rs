//! Tests of the views (reshape, transpose, permute, narrow, broadcast_as, squeeze, unsqueeze)
//! and `contiguous`: gradient checks in f64 on contiguous and non-contiguous inputs and on
//! chains of views followed by a non-linear op, and forward/backward comparisons with candle in
//! f32 and f16 (which also run `narrow_backward` on contiguous and strided gradients).

use crate::common::*;
use candle_core as cc;
use dynn_core::{DType, Result, Tensor};
use dynn_ops::prelude::*;

type F = fn(&[Tensor]) -> Result<Tensor>;
type CF = fn(&[cc::Tensor]) -> cc::Result<cc::Tensor>;

/// `(description, input shape, dynn function, candle function)` for one view op.
type ViewCase = (&'static str, &'static [usize], F, CF);

const RESHAPE: &[ViewCase] = &[
    (
        "(3,4) -> (2,6)",
        &[3, 4],
        |v| v[0].reshape((2, 6)),
        |v| v[0].reshape((2, 6)),
    ),
    (
        "(2,3,4) -> (24,)",
        &[2, 3, 4],
        |v| v[0].reshape(24),
        |v| v[0].reshape(24),
    ),
    (
        "(6,) -> rank 0 via (1,) ",
        &[1],
        |v| v[0].reshape(()),
        |v| v[0].reshape(()),
    ),
    (
        "transposed (4,3) -> (2,6) copies",
        &[4, 3],
        |v| v[0].t()?.reshape((2, 6)),
        |v| v[0].t()?.reshape((2, 6)),
    ),
    (
        "flatten_from(1)",
        &[2, 3, 4],
        |v| v[0].flatten_from(1),
        |v| v[0].flatten_from(1),
    ),
];

const TRANSPOSE: &[ViewCase] = &[
    (
        "(2,3,4) 0<->2",
        &[2, 3, 4],
        |v| v[0].transpose(0, 2),
        |v| v[0].transpose(0, 2),
    ),
    ("t() of (3,5)", &[3, 5], |v| v[0].t(), |v| v[0].t()),
    (
        "negative dims",
        &[2, 3, 4],
        |v| v[0].transpose(-1i32, -3i32),
        |v| v[0].transpose(2, 0),
    ),
    (
        "transpose then exp",
        &[3, 4],
        |v| v[0].t()?.exp(),
        |v| v[0].t()?.exp(),
    ),
];

const PERMUTE: &[ViewCase] = &[
    (
        "(2,3,4) [1,2,0]",
        &[2, 3, 4],
        |v| v[0].permute(&[1, 2, 0]),
        |v| v[0].permute((1, 2, 0)),
    ),
    (
        "(2,3,4,5) [3,1,0,2]",
        &[2, 3, 4, 5],
        |v| v[0].permute(&[3, 1, 0, 2]),
        |v| v[0].permute((3, 1, 0, 2)),
    ),
    (
        "permute of permute, then sin",
        &[2, 3, 4],
        |v| v[0].permute(&[2, 0, 1])?.permute(&[2, 0, 1])?.sin(),
        |v| v[0].permute((2, 0, 1))?.permute((2, 0, 1))?.sin(),
    ),
];

const NARROW: &[ViewCase] = &[
    (
        "(5,4) dim 0 1..4",
        &[5, 4],
        |v| v[0].narrow(0, 1, 3),
        |v| v[0].narrow(0, 1, 3),
    ),
    (
        "(3,7) dim 1 2..6",
        &[3, 7],
        |v| v[0].narrow(1, 2, 4),
        |v| v[0].narrow(1, 2, 4),
    ),
    (
        "whole dim",
        &[3, 4],
        |v| v[0].narrow(1, 0, 4),
        |v| v[0].narrow(1, 0, 4),
    ),
    (
        "narrow of transposed",
        &[4, 6],
        |v| v[0].t()?.narrow(1, 1, 2),
        |v| v[0].t()?.narrow(1, 1, 2),
    ),
    // The gradient reaching narrow's backward is a transposed (strided) view.
    (
        "narrow then t",
        &[4, 6],
        |v| v[0].narrow(1, 1, 3)?.t(),
        |v| v[0].narrow(1, 1, 3)?.t(),
    ),
    (
        "narrow twice then tanh",
        &[6, 5],
        |v| v[0].narrow(0, 1, 4)?.narrow(1, 2, 2)?.tanh(),
        |v| v[0].narrow(0, 1, 4)?.narrow(1, 2, 2)?.tanh(),
    ),
    (
        "negative dim",
        &[3, 5],
        |v| v[0].narrow(-1i32, 4, 1),
        |v| v[0].narrow(1, 4, 1),
    ),
];

const BROADCAST: &[ViewCase] = &[
    (
        "(1,3) -> (4,3)",
        &[1, 3],
        |v| v[0].broadcast_as((4, 3)),
        |v| v[0].broadcast_as((4, 3)),
    ),
    (
        "(3,) -> (2,4,3)",
        &[3],
        |v| v[0].broadcast_as((2, 4, 3)),
        |v| v[0].broadcast_as((2, 4, 3)),
    ),
    (
        "(4,1,3) -> (4,5,3)",
        &[4, 1, 3],
        |v| v[0].broadcast_as((4, 5, 3)),
        |v| v[0].broadcast_as((4, 5, 3)),
    ),
    (
        "rank 0 -> (2,3)",
        &[],
        |v| v[0].broadcast_as((2, 3)),
        |v| v[0].broadcast_as((2, 3)),
    ),
    (
        "same shape",
        &[2, 3],
        |v| v[0].broadcast_as((2, 3)),
        |v| v[0].broadcast_as((2, 3)),
    ),
    (
        "broadcast of transposed, then exp",
        &[1, 3],
        |v| v[0].t()?.broadcast_as((2, 3, 4))?.exp(),
        |v| v[0].t()?.broadcast_as((2, 3, 4))?.exp(),
    ),
];

const SQUEEZE: &[ViewCase] = &[
    (
        "(3,1,4) dim 1",
        &[3, 1, 4],
        |v| v[0].squeeze(1),
        |v| v[0].squeeze(1),
    ),
    (
        "(1,) -> rank 0",
        &[1],
        |v| v[0].squeeze(0),
        |v| v[0].squeeze(0),
    ),
    (
        "(2,3,1) dim -1",
        &[2, 3, 1],
        |v| v[0].squeeze(-1i32),
        |v| v[0].squeeze(2),
    ),
    (
        "squeeze of narrowed",
        &[3, 4],
        |v| v[0].narrow(1, 2, 1)?.squeeze(1),
        |v| v[0].narrow(1, 2, 1)?.squeeze(1),
    ),
];

const UNSQUEEZE: &[ViewCase] = &[
    (
        "(3,4) dim 0",
        &[3, 4],
        |v| v[0].unsqueeze(0),
        |v| v[0].unsqueeze(0),
    ),
    (
        "(3,4) dim 1",
        &[3, 4],
        |v| v[0].unsqueeze(1),
        |v| v[0].unsqueeze(1),
    ),
    (
        "(3,4) dim 2",
        &[3, 4],
        |v| v[0].unsqueeze(2),
        |v| v[0].unsqueeze(2),
    ),
    (
        "(3,4) dim -1",
        &[3, 4],
        |v| v[0].unsqueeze(-1i32),
        |v| v[0].unsqueeze(2),
    ),
    (
        "unsqueeze of transposed, then broadcast",
        &[3, 4],
        |v| v[0].t()?.unsqueeze(1)?.broadcast_as((4, 2, 3)),
        |v| v[0].t()?.unsqueeze(1)?.broadcast_as((4, 2, 3)),
    ),
];

const CONTIGUOUS: &[ViewCase] = &[
    (
        "of transposed",
        &[3, 4],
        |v| v[0].t()?.contiguous(),
        |v| v[0].t()?.contiguous(),
    ),
    (
        "of permuted",
        &[2, 3, 4],
        |v| v[0].permute(&[2, 0, 1])?.contiguous(),
        |v| v[0].permute((2, 0, 1))?.contiguous(),
    ),
    (
        "of narrowed",
        &[4, 5],
        |v| v[0].narrow(1, 1, 3)?.contiguous(),
        |v| v[0].narrow(1, 1, 3)?.contiguous(),
    ),
    (
        "of broadcast",
        &[1, 3],
        |v| v[0].broadcast_as((4, 3))?.contiguous(),
        |v| v[0].broadcast_as((4, 3))?.contiguous(),
    ),
    (
        "of contiguous (no copy)",
        &[2, 3],
        |v| v[0].contiguous(),
        |v| v[0].contiguous(),
    ),
    (
        "then exp",
        &[3, 4],
        |v| v[0].t()?.contiguous()?.exp(),
        |v| v[0].t()?.contiguous()?.exp(),
    ),
];

fn grad_run(cases: &[ViewCase]) -> Result<()> {
    for (i, (what, shape, f, _)) in cases.iter().copied().enumerate() {
        gradcheck(&[randn(shape, 100 + i as u64)], f).ctx(what)?;
    }
    Ok(())
}

fn oracle_run(cases: &[ViewCase]) -> Result<()> {
    for (i, (what, shape, f, cf)) in cases.iter().copied().enumerate() {
        for dtype in [DType::F32, DType::F16] {
            oracle(
                &[rand_dtype(shape, 200 + i as u64, dtype)],
                f,
                cf,
                tol(dtype),
            )
            .ctx(format!("{dtype} {what}"))?;
        }
        // The input itself a non-contiguous view (the leaf is strided).
        if shape.len() == 2 {
            let x = rand_dtype(&[shape[1], shape[0]], 300 + i as u64, DType::F32).t()?;
            oracle(&[x], f, cf, tol(DType::F32)).ctx(format!("transposed leaf, {what}"))?;
        }
    }
    Ok(())
}

pub const GRAD_CASES: &[Case] = &[
    (&["reshape", "contiguous"], || grad_run(RESHAPE)),
    (&["transpose"], || grad_run(TRANSPOSE)),
    (&["permute"], || grad_run(PERMUTE)),
    (&["narrow"], || grad_run(NARROW)),
    (&["broadcast_as"], || grad_run(BROADCAST)),
    (&["squeeze"], || grad_run(SQUEEZE)),
    (&["unsqueeze"], || grad_run(UNSQUEEZE)),
    (&["contiguous"], || grad_run(CONTIGUOUS)),
    (
        &["reshape", "narrow", "transpose", "contiguous"],
        grad_leaf_views,
    ),
];

pub const ORACLE_CASES: &[Case] = &[
    (&["reshape", "contiguous"], || oracle_run(RESHAPE)),
    (&["transpose"], || oracle_run(TRANSPOSE)),
    (&["permute"], || oracle_run(PERMUTE)),
    (&["narrow", "narrow_backward"], || oracle_run(NARROW)),
    (&["broadcast_as"], || oracle_run(BROADCAST)),
    (&["squeeze"], || oracle_run(SQUEEZE)),
    (&["unsqueeze"], || oracle_run(UNSQUEEZE)),
    (&["contiguous"], || oracle_run(CONTIGUOUS)),
    (&["contiguous", "narrow_backward"], oracle_large),
];

/// Views of non-contiguous leaves, gradient-checked (the leaf keeps its strided layout).
fn grad_leaf_views() -> Result<()> {
    let xt = randn(&[4, 3], 401).t()?; // (3,4) strided
    gradcheck(std::slice::from_ref(&xt), |v| v[0].reshape(12)).ctx("reshape of a transposed leaf")?;
    gradcheck(std::slice::from_ref(&xt), |v| v[0].narrow(1, 1, 2)).ctx("narrow of a transposed leaf")?;
    gradcheck(std::slice::from_ref(&xt), |v| v[0].t()).ctx("transpose of a transposed leaf")?;
    gradcheck(&[xt], |v| v[0].contiguous()?.sqr()).ctx("contiguous of a transposed leaf")?;
    let xn = randn(&[3, 9], 402).narrow(1, 2, 5)?; // offset and gaps
    gradcheck(std::slice::from_ref(&xn), |v| v[0].reshape(15)).ctx("reshape of a narrowed leaf")?;
    gradcheck(&[xn], |v| v[0].unsqueeze(0)?.squeeze(0))
        .ctx("unsqueeze/squeeze of a narrowed leaf")?;
    Ok(())
}

/// Sizes above the parallel threshold for `contiguous` (all three gather paths) and
/// `narrow_backward`.
fn oracle_large() -> Result<()> {
    let t = tol(DType::F32);
    let x = rand_f32(&[190, 190], 501);
    oracle(
        std::slice::from_ref(&x),
        |v| v[0].t()?.contiguous(),
        |v| v[0].t()?.contiguous(),
        t,
    )
    .ctx("large transposed contiguous")?;
    let y = rand_f32(&[190, 230], 502);
    oracle(
        std::slice::from_ref(&y),
        |v| v[0].narrow(1, 20, 190)?.contiguous(),
        |v| v[0].narrow(1, 20, 190)?.contiguous(),
        t,
    )
    .ctx("large narrowed contiguous")?;
    oracle(
        &[y],
        |v| v[0].narrow(1, 20, 190)?.t(),
        |v| v[0].narrow(1, 20, 190)?.t(),
        t,
    )
    .ctx("large narrow, strided gradient")?;
    Ok(())
}

/// A view shares its input's buffer (no copy), `contiguous` of a contiguous tensor is the same
/// tensor, and `contiguous` of a strided view makes a new buffer.
#[test]
fn views_share_buffers() -> Result<()> {
    let x = randn(&[3, 4], 1);
    for v in [
        x.t()?,
        x.reshape(12)?,
        x.narrow(0, 1, 2)?,
        x.unsqueeze(0)?,
        x.broadcast_as((2, 3, 4))?,
        x.permute(&[1, 0])?,
    ] {
        assert_eq!(v.buffer().id(), x.buffer().id(), "{v:?}");
    }
    assert!(x.contiguous()?.same_as(&x));
    let c = x.t()?.contiguous()?;
    assert_ne!(c.buffer().id(), x.buffer().id());
    assert!(c.is_contiguous());
    assert_eq!(c.to_vec::<f64>()?, x.t()?.to_vec::<f64>()?);
    Ok(())
}
