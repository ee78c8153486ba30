//! Optimizers against references: AdamW and Adam against candle-nn's `AdamW` (the oracle) on
//! the same parameters and gradients; SGD with momentum and Nesterov against the update rule
//! computed in f64; clipping by global norm, also as taken during the backward pass;
//! parameters without a gradient are left alone.

use candle_core as cc;
use candle_nn::Optimizer as _;
use dynn_core::{DType, Device, Result, Tensor};
use dynn_models::nn::{Init, Module, Param, ParamBuilder};
use dynn_models::optim::{
    Adam, AdamConfig, GradNormWatch, Optimizer, Sgd, SgdConfig, clip_grad_norm, clip_scale,
    grad_norm,
};
use dynn_ops::prelude::*;

fn param(seed: u64, shape: (usize, usize)) -> Result<Param> {
    ParamBuilder::new(DType::F32, Device::Cpu, seed).param(
        "p",
        shape,
        Init::Normal {
            mean: 0.0,
            std: 1.0,
        },
    )
}

fn grads(step: u64, shape: (usize, usize)) -> Result<Tensor> {
    rand_normal(shape, 0.0, 1.0, DType::F32, 1000 + step, Device::Cpu)
}

/// Sets `p`'s gradient to `g` through autograd: the gradient of `sum(p ⊙ g)`.
fn backward_with(p: &Param, g: &Tensor) -> Result<()> {
    p.mul(g)?.sum_all()?.backward()
}

#[test]
fn adamw_matches_candle() -> Result<()> {
    let shape = (5, 7);
    for (wd, lr) in [(0.0, 1e-2), (0.1, 3e-2)] {
        let p = param(1, shape)?;
        let var = cc::Var::from_vec(p.to_vec::<f32>()?, shape, &cc::Device::Cpu).expect("var");
        let mut theirs = candle_nn::AdamW::new(
            vec![var.clone()],
            candle_nn::ParamsAdamW {
                lr,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: wd,
            },
        )
        .expect("candle AdamW");
        let mut ours = Adam::new(AdamConfig {
            weight_decay: wd,
            ..AdamConfig::adamw(lr)
        })?;
        for step in 0..6 {
            let g = grads(step, shape)?;
            backward_with(&p, &g)?;
            ours.step(std::slice::from_ref(&p))?;
            let gc = cc::Tensor::from_vec(g.to_vec::<f32>()?, shape, &cc::Device::Cpu).expect("g");
            let loss = (var.as_tensor() * gc)
                .and_then(|t| t.sum_all())
                .expect("loss");
            theirs.backward_step(&loss).expect("candle step");
        }
        let want: Vec<f32> = var
            .as_tensor()
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .expect("v");
        for (a, b) in p.to_vec::<f32>()?.iter().zip(&want) {
            assert!(
                (a - b).abs() <= 2e-6 * (1.0 + b.abs()),
                "wd {wd}: {a} vs {b}"
            );
        }
    }
    Ok(())
}

#[test]
fn sgd_momentum_and_nesterov_follow_the_rule() -> Result<()> {
    let shape = (3, 4);
    for nesterov in [false, true] {
        let p = param(2, shape)?;
        let mut want: Vec<f64> = p.to_vec::<f32>()?.iter().map(|&v| v as f64).collect();
        let mut buf = vec![0.0f64; want.len()];
        let (lr, mu, wd) = (0.1, 0.9, 0.01);
        let mut sgd = Sgd::new(SgdConfig {
            lr,
            momentum: mu,
            nesterov,
            weight_decay: wd,
        })?;
        for step in 0..4 {
            let g = grads(step, shape)?;
            backward_with(&p, &g)?;
            sgd.step(std::slice::from_ref(&p))?;
            for ((w, b), &gi) in want.iter_mut().zip(&mut buf).zip(&g.to_vec::<f32>()?) {
                let d = gi as f64 + wd * *w;
                *b = if step == 0 { d } else { mu * *b + d };
                *w -= lr * if nesterov { d + mu * *b } else { *b };
            }
        }
        for (a, b) in p.to_vec::<f32>()?.iter().zip(&want) {
            assert!(
                (*a as f64 - b).abs() < 1e-5,
                "nesterov {nesterov}: {a} vs {b}"
            );
        }
        assert!(p.grad().is_none(), "step clears the gradient");
    }
    Ok(())
}

#[test]
fn clipping_scales_to_the_global_norm() -> Result<()> {
    let a = param(3, (2, 3))?;
    let b = param(4, (4, 1))?;
    backward_with(&a, &Tensor::full(3.0, (2, 3), DType::F32, Device::Cpu)?)?;
    backward_with(&b, &Tensor::full(4.0, (4, 1), DType::F32, Device::Cpu)?)?;
    let norm = clip_grad_norm(&[a.clone(), b.clone()], 1.0)?;
    let expect = (6.0f64 * 9.0 + 4.0 * 16.0).sqrt();
    assert!((norm - expect).abs() < 1e-4, "{norm} vs {expect}");
    let mut sq = 0.0;
    for p in [&a, &b] {
        sq += p.grad().expect("kept").sqr()?.sum_all()?.to_scalar_f64()?;
    }
    assert!((sq.sqrt() - 1.0).abs() < 1e-4, "clipped norm {}", sq.sqrt());
    // Below the limit nothing changes.
    let before = a.grad().expect("kept").to_vec::<f32>()?;
    clip_grad_norm(&[a.clone(), b.clone()], 10.0)?;
    assert_eq!(a.grad().expect("kept").to_vec::<f32>()?, before);
    // Half-precision gradients whose squares sum past f16's range still have a finite norm.
    let h = ParamBuilder::new(DType::F16, Device::Cpu, 5).param(
        "h",
        (2, 3),
        Init::Normal {
            mean: 0.0,
            std: 1.0,
        },
    )?;
    backward_with(&h, &Tensor::full(300.0, (2, 3), DType::F16, Device::Cpu)?)?;
    let norm = grad_norm(std::slice::from_ref(&h))?;
    let expect = (6.0f64 * 300.0 * 300.0).sqrt();
    assert!((norm - expect).abs() < 1e-3 * expect, "{norm} vs {expect}");
    Ok(())
}

#[test]
fn a_scaled_step_is_the_step_on_scaled_gradients() -> Result<()> {
    let shape = (4, 6);
    let close = |a: &Param, b: &Param, what: &str| -> Result<()> {
        for (x, y) in a.to_vec::<f32>()?.iter().zip(&b.to_vec::<f32>()?) {
            assert!(
                (x - y).abs() <= 1e-6 * (1.0 + y.abs()),
                "{what}: {x} vs {y}"
            );
        }
        Ok(())
    };
    // Adam folds the scale into its moments (with coupled decay it scales first).
    for decoupled in [true, false] {
        let cfg = AdamConfig {
            weight_decay: 0.05,
            decoupled,
            ..AdamConfig::adamw(1e-2)
        };
        let (fused, plain) = (param(7, shape)?, param(7, shape)?);
        let (mut a, mut b) = (Adam::new(cfg)?, Adam::new(cfg)?);
        for step in 0..4 {
            let g = grads(step, shape)?;
            backward_with(&fused, &g)?;
            a.step_scaled(std::slice::from_ref(&fused), 0.3)?;
            backward_with(&plain, &g.scale(0.3)?)?;
            b.step(std::slice::from_ref(&plain))?;
        }
        assert!(fused.grad().is_none(), "the step clears the gradient");
        close(&fused, &plain, &format!("adam, decoupled {decoupled}"))?;
    }
    // SGD takes the default: a pass scaling the gradients, then its step.
    let (scaled, plain) = (param(8, shape)?, param(8, shape)?);
    let cfg = SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        nesterov: false,
        weight_decay: 0.01,
    };
    let (mut a, mut b) = (Sgd::new(cfg)?, Sgd::new(cfg)?);
    for step in 0..3 {
        let g = grads(step, shape)?;
        backward_with(&scaled, &g)?;
        a.step_scaled(std::slice::from_ref(&scaled), 0.5)?;
        backward_with(&plain, &g.scale(0.5)?)?;
        b.step(std::slice::from_ref(&plain))?;
    }
    close(&scaled, &plain, "sgd")?;
    // The factor clipping applies.
    assert_eq!(clip_scale(0.5, 1.0), 1.0);
    assert!((clip_scale(4.0, 1.0) - 1.0 / (4.0 + 1e-6)).abs() < 1e-15);
    assert_eq!(clip_scale(f64::NAN, 1.0), 1.0);
    Ok(())
}

#[test]
fn parameters_without_a_gradient_are_left_alone() -> Result<()> {
    let used = param(5, (2, 2))?;
    let idle = param(6, (2, 2))?;
    let before = idle.to_vec::<f32>()?;
    let mut opt = Adam::new(AdamConfig::adamw(0.1))?;
    for step in 0..3 {
        backward_with(&used, &grads(step, (2, 2))?)?;
        opt.step(&[used.clone(), idle.clone()])?;
    }
    assert_eq!(
        idle.to_vec::<f32>()?,
        before,
        "no gradient, no weight decay either"
    );
    let state: Vec<String> = opt.state().into_iter().map(|(n, _)| n).collect();
    assert!(state.iter().all(|n| n.starts_with("p.")), "{state:?}");
    assert_eq!(
        state.len(),
        3,
        "m, v and the step count of the one used parameter"
    );
    assert!(used.params().len() == 1);
    Ok(())
}

#[test]
fn bad_settings_are_errors() {
    assert!(
        Adam::new(AdamConfig {
            betas: (1.0, 0.9),
            ..AdamConfig::adam(0.1)
        })
        .is_err()
    );
    assert!(
        Sgd::new(SgdConfig {
            nesterov: true,
            ..Default::default()
        })
        .is_err()
    );
    assert!(
        Sgd::new(SgdConfig {
            lr: -1.0,
            ..Default::default()
        })
        .is_err()
    );
}

/// Keeps the plans announced to it; ignores ops.
#[derive(Default)]
struct Plans(std::sync::Mutex<Vec<Vec<Vec<u64>>>>);

impl dynn_core::MemoryHooks for Plans {
    fn before_op(&self, _: &dynn_core::OpEvent<'_>) -> Result<()> {
        Ok(())
    }
    fn after_op(&self, _: &dynn_core::OpEvent<'_>) -> Result<()> {
        Ok(())
    }
    fn plan(&self, _source: &'static str, groups: &[Vec<dynn_core::BufferId>]) {
        let g = groups.iter().map(|g| g.iter().map(|b| b.0).collect());
        self.0.lock().unwrap().push(g.collect());
    }
}

#[test]
fn optimizers_announce_each_update_s_buffers_in_parameter_order() -> Result<()> {
    let named = |name: &str, shape: (usize, usize)| {
        ParamBuilder::new(DType::F32, Device::Cpu, 4).param(name, shape, Init::Const(0.5))
    };
    let (a, idle, b) = (
        named("a", (2, 3))?,
        named("idle", (2, 3))?,
        named("b", (3, 1))?,
    );
    let id = |t: &Tensor| t.buffer().id().0;
    let mut adam = Adam::new(AdamConfig::adamw(0.1))?;
    let mut sgd = Sgd::new(SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        ..Default::default()
    })?;
    for step in 0..2 {
        backward_with(&a, &grads(step, (2, 3))?)?;
        backward_with(&b, &grads(step + 10, (3, 1))?)?;
        let (ga, gb) = (a.grad().unwrap(), b.grad().unwrap());
        let hooks = std::sync::Arc::new(Plans::default());
        let guard = dynn_core::install_memory_hooks(hooks.clone());
        let params = [a.clone(), idle.clone(), b.clone()];
        if step == 0 {
            adam.step(&params)?;
        } else {
            sgd.step(&params)?;
        }
        drop(guard);
        let plans = hooks.0.lock().unwrap().clone();
        assert_eq!(plans.len(), 1, "one plan per optimizer step");
        let plan = &plans[0];
        // The parameter without a gradient is skipped; each group starts with the parameter
        // and its gradient (optimizer state follows once it exists).
        assert_eq!(plan.len(), 2, "{plan:?}");
        assert_eq!(plan[0][..2], [id(&a), id(&ga)]);
        assert_eq!(plan[1][..2], [id(&b), id(&gb)]);
    }
    Ok(())
}

#[test]
fn the_norm_taken_during_backward_is_grad_norm_bit_for_bit() -> Result<()> {
    let a = param(6, (8, 16))?;
    let b = param(7, (16, 4))?;
    let c = param(8, (3, 3))?; // never reached: no gradient
    let h = ParamBuilder::new(DType::BF16, Device::Cpu, 9).param(
        "h",
        (4, 4),
        Init::Uniform { lo: -1.0, hi: 1.0 },
    )?;
    let d = ParamBuilder::new(DType::F64, Device::Cpu, 10).param(
        "d",
        5,
        Init::Uniform { lo: -1.0, hi: 1.0 },
    )?;
    let params = [a.clone(), b.clone(), c.clone(), h.clone(), d.clone()];
    let watch = GradNormWatch::new(&params)?;
    let x = rand_normal((5, 8), 0.0, 1.0, DType::F32, 11, Device::Cpu)?;
    let loss = |seed: u64| -> Result<Tensor> {
        // a is read twice, so its hook waits for both contributions.
        let y = x.matmul(&a)?.tanh()?.matmul(&b)?;
        let z = x.matmul(&a)?.sum_all()?;
        let hh = h.to_dtype(DType::F32)?.sqr()?.sum_all()?;
        let dd = d.sin()?.sum_all()?.to_dtype(DType::F32)?;
        let w = rand_normal((5, 4), 0.0, 1.0, DType::F32, seed, Device::Cpu)?;
        y.mul(&w)?.sum_all()?.add(&z)?.add(&hh)?.add(&dd)
    };
    loss(1)?.backward()?;
    assert_eq!(watch.norm()?.to_bits(), grad_norm(&params)?.to_bits());
    // Two passes accumulating into the same gradients: the norm of the totals.
    loss(2)?.backward()?;
    loss(3)?.backward()?;
    let n = watch.norm()?;
    assert_eq!(n.to_bits(), grad_norm(&params)?.to_bits());
    assert!(n > 0.0 && c.grad().is_none());
    // A gradient replaced after the pass is read again.
    b.set_grad(Some(b.grad().expect("kept").scale(2.0)?))?;
    loss(4)?.backward()?;
    b.set_grad(Some(b.grad().expect("kept").scale(0.5)?))?;
    assert_eq!(watch.norm()?.to_bits(), grad_norm(&params)?.to_bits());
    // The sums were taken during the pass: a gradient changed in place afterwards (which the
    // watch documents it does not notice) shows that no gradient is read again.
    loss(5)?.backward()?;
    let during = grad_norm(&params)?;
    let ga = a.grad().expect("kept");
    ga.axpy_(1.0, &ga.clone())?;
    assert_eq!(watch.norm()?.to_bits(), during.to_bits());
    assert_ne!(grad_norm(&params)?.to_bits(), during.to_bits());
    Ok(())
}
