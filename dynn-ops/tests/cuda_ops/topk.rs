//! `topk` on the GPU: values (with gradients through `topk_backward`) and indices, largest and
//! smallest, k from 1 up to the whole line, lines short (a warp per line, the MoE routing
//! case) and long (a block per line), along the last and an inner dim, strided inputs, ties
//! (to the lower index) and NaN (above every number).

use crate::harness::*;
use dynn_core::{DType, Device, Error, Result, Tensor};
use dynn_ops::prelude::*;

fn tol(dtype: DType) -> f64 {
    tol_of(dtype)
}

/// Small integers as floats: many ties.
fn ties(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    indices(shape, 5, seed, DType::I64)
        .to_dtype(dtype)
        .expect("cast")
}

#[test]
fn topk_values_and_indices() {
    let mut cases = Vec::new();
    for dtype in FLOATS {
        let tl = tol(dtype);
        // (shape, k, dim): MoE routing (8 and 64 experts, k 1..2), medium and long lines, all of
        // a line, an inner dim.
        let shapes: [(&[usize], usize, usize); 9] = [
            (&[512, 8], 1, 1),
            (&[512, 8], 2, 1),
            (&[300, 64], 2, 1),
            (&[33, 64], 64, 1),
            (&[16, 300], 5, 1),
            (&[4, 5000], 3, 1),
            (&[3, 20000], 7, 1),
            (&[10, 7, 6], 3, 1),
            (&[10, 7, 6], 4, 0),
        ];
        for (i, &(shape, k, dim)) in shapes.iter().enumerate() {
            for largest in [true, false] {
                let x = rand_dtype(shape, 10 + i as u64, dtype);
                let tag = format!("{shape:?} k {k} dim {dim} largest {largest} {dtype:?}");
                let fv = move |v: &[Tensor]| Ok(v[0].topk(k, dim, largest)?.0);
                cases.push((
                    format!("topk values {tag}"),
                    check("topk", std::slice::from_ref(&x), fv, tl, true),
                ));
                let fi = move |v: &[Tensor]| Ok(v[0].topk(k, dim, largest)?.1);
                cases.push((
                    format!("topk indices {tag}"),
                    check("topk", std::slice::from_ref(&x), fi, 0.0, false),
                ));
                // Ties: the lower index wins on both devices.
                let t = ties(shape, 40 + i as u64, dtype);
                cases.push((
                    format!("topk ties {tag}"),
                    check("topk", std::slice::from_ref(&t), fi, 0.0, false),
                ));
            }
        }
        // Strided input: transposed, top-k along its last dim (a strided line).
        let x = rand_dtype(&[40, 12], 60, dtype);
        let ft = |v: &[Tensor]| v[0].t()?.topk(3, 1, true)?.0.sqr();
        cases.push((
            format!("topk transposed {dtype:?}"),
            check("topk", std::slice::from_ref(&x), ft, tl, true),
        ));
        let fti = |v: &[Tensor]| Ok(v[0].t()?.topk(3, 1, false)?.1);
        cases.push((
            format!("topk transposed indices {dtype:?}"),
            check("topk", &[x], fti, 0.0, false),
        ));
        // k = 0.
        let x = rand_dtype(&[5, 6], 61, dtype);
        cases.push((
            format!("topk k 0 {dtype:?}"),
            check("topk", &[x], |v| Ok(v[0].topk(0, 1, true)?.0), tl, false),
        ));
    }
    run("topk", cases);
}

#[test]
fn topk_nan_is_largest() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let v = vec![
        1.0f32,
        f32::NAN,
        3.0,
        -2.0,
        f32::NAN,
        3.0,
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
    ];
    let x = Tensor::from_vec(v, (1, 10), Device::Cpu)?;
    for largest in [true, false] {
        for k in [1, 3, 10] {
            let (cv, ci) = x.topk(k, 1, largest)?;
            let (gv, gi) = x.to_device(dev)?.topk(k, 1, largest)?;
            let (cv, gv) = (cv.to_vec::<f32>()?, gv.to_vec::<f32>()?);
            let same = cv
                .iter()
                .zip(&gv)
                .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
            if !same || ci.to_vec::<i64>()? != gi.to_vec::<i64>()? {
                return Err(Error::Msg(format!(
                    "k {k} largest {largest}: GPU {gv:?} {:?}, CPU {cv:?} {:?}",
                    gi.to_vec::<i64>()?,
                    ci.to_vec::<i64>()?
                )));
            }
        }
    }
    Ok(())
}
