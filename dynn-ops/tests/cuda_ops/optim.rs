//! Fused optimizer updates on the GPU (`ema_`, `ema_sq_`, `adam_step_`): the updated state
//! is compared, CPU against GPU, with contiguous and strided targets and inputs.

use crate::harness::*;
use dynn_core::{DType, Result, Tensor};
use dynn_ops::prelude::*;

fn tol(dtype: DType) -> f64 {
    tol_of(dtype)
}

#[derive(Clone, Copy, Debug)]
enum Rule {
    Ema,
    EmaSq,
    Step,
}

/// Runs `rule` on `target` with inputs `g` (the gradient, or `m`) and `v`.
fn apply(rule: Rule, target: &Tensor, g: &Tensor, v: &Tensor) -> Result<()> {
    let _g = no_grad();
    match rule {
        Rule::Ema => target.ema_(0.9, g),
        Rule::EmaSq => target.ema_sq_(0.999, g),
        Rule::Step => target.adam_step_(1.0 - 1e-3 * 0.01, 1e-3, 1e-8, g, v),
    }
}

#[test]
fn optim() {
    let mut cases = Vec::new();
    for rule in [Rule::Ema, Rule::EmaSq, Rule::Step] {
        for dtype in FLOATS {
            // Inputs: the target, the gradient (or m) and a positive second moment v.
            let t = rand_dtype(&[37, 129], 1, dtype);
            let g = rand_dtype(&[37, 129], 2, dtype);
            let v = rand_positive(&[37, 129], 3).to_dtype(dtype).expect("cast");
            let contiguous = move |x: &[Tensor]| {
                let buf = x[0].affine(1.0, 0.0)?;
                apply(rule, &buf, &x[1], &x[2])?;
                Ok(buf)
            };
            cases.push((
                format!("{rule:?} {dtype:?} contiguous"),
                check("optim", &[t.clone(), g, v], contiguous, tol(dtype), false),
            ));
            // A narrowed target, a transposed gradient and a narrowed v.
            let gt = rand_dtype(&[50, 37], 4, dtype);
            let vw = rand_positive(&[37, 60], 5).to_dtype(dtype).expect("cast");
            let strided = move |x: &[Tensor]| {
                let buf = x[0].affine(1.0, 0.0)?;
                let target = buf.narrow(1, 3, 50)?;
                apply(rule, &target, &x[1].t()?, &x[2].narrow(1, 10, 50)?)?;
                Ok(buf)
            };
            cases.push((
                format!("{rule:?} {dtype:?} strided"),
                check("optim", &[t, gt, vw], strided, tol(dtype), false),
            ));
        }
    }
    run("optim", cases);
}

#[test]
fn large_adam() -> Result<()> {
    let p = randn(&[1024, 4096], 1);
    let m = randn(&[1024, 4096], 2);
    let v = rand_positive(&[1024, 4096], 3);
    check(
        "adam_step",
        &[p, m, v],
        |x| {
            let buf = x[0].affine(1.0, 0.0)?;
            apply(Rule::Step, &buf, &x[1], &x[2])?;
            Ok(buf)
        },
        TOL_F32,
        false,
    )
}
