//! The executor on its own (no dynn-ops: the core names no op, so these tests define two tiny
//! ones): hook events for ops, views and in-place updates, tape recording and grad mode,
//! recipes, and kernels that break their contract.

#![allow(clippy::result_large_err)] // dynn_core::Error is the crate's one error type

use dynn_core::smallvec::smallvec;
use dynn_core::{
    BackwardCtx, CpuStorage, DType, Device, Error, Idioms, InplaceOp, InputGrads, KernelArg,
    Layout, MemoryHooks, Op, OpEvent, Outputs, Phase, Result, Specs, Tensor, TensorSpec, ViewOp,
    WeakRecipe, execute, execute_inplace, execute_view, execute1, install_memory_hooks, no_grad,
    run_backward,
};
use std::sync::{Arc, Mutex};

fn f32s(t: &KernelArg<'_>, op: &'static str) -> Result<Vec<f32>> {
    let v = t.cpu(op)?.as_slice::<f32>(op)?;
    Ok(t.layout.indices().map(|i| v[i]).collect())
}

fn out(v: Vec<f32>) -> Outputs {
    smallvec![Box::new(CpuStorage::F32(v)) as Box<dyn dynn_core::DeviceStorage>]
}

/// y = s·x (f32). `bad_len` makes the kernel return one element too many; `cut` makes its
/// backward give x no gradient (a cut in the graph that backward still reaches).
#[derive(Default)]
struct Scale {
    s: f32,
    bad_len: bool,
    cut: bool,
}

impl Op for Scale {
    fn name(&self) -> &'static str {
        "scale"
    }
    fn idioms(&self) -> Idioms {
        Idioms::MAP
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        Ok(smallvec![TensorSpec::new(
            inputs[0].shape().clone(),
            DType::F32
        )])
    }
    fn forward(&self, inputs: &[KernelArg<'_>], _: &[TensorSpec]) -> Result<Outputs> {
        let mut v: Vec<f32> = f32s(&inputs[0], "scale")?
            .iter()
            .map(|x| x * self.s)
            .collect();
        if self.bad_len {
            v.push(0.0);
        }
        Ok(out(v))
    }
    fn backward(&self, ctx: &BackwardCtx<'_>) -> Result<InputGrads> {
        if self.cut {
            return Ok(smallvec![None]);
        }
        Ok(smallvec![Some(scale(ctx.grad(0)?, self.s)?)])
    }
}

fn scale(x: &Tensor, s: f32) -> Result<Tensor> {
    execute1(
        Scale {
            s,
            ..Default::default()
        },
        &[x],
    )
}

/// a + b (same shapes, f32); backward passes the gradient to both.
struct Add;

impl Op for Add {
    fn name(&self) -> &'static str {
        "add"
    }
    fn idioms(&self) -> Idioms {
        Idioms::MAP
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        if inputs[0].shape() != inputs[1].shape() {
            return Err(Error::shape_mismatch(
                "add",
                inputs[0].shape(),
                inputs[1].shape(),
            ));
        }
        Ok(smallvec![TensorSpec::new(
            inputs[0].shape().clone(),
            DType::F32
        )])
    }
    fn forward(&self, inputs: &[KernelArg<'_>], _: &[TensorSpec]) -> Result<Outputs> {
        let (a, b) = (f32s(&inputs[0], "add")?, f32s(&inputs[1], "add")?);
        Ok(out(a.iter().zip(&b).map(|(x, y)| x + y).collect()))
    }
    fn backward(&self, ctx: &BackwardCtx<'_>) -> Result<InputGrads> {
        let g = ctx.grad(0)?;
        Ok(smallvec![Some(g.clone()), Some(g.clone())])
    }
}

fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    execute1(Add, &[a, b])
}

/// target += input, in place.
struct AddInto;

impl InplaceOp for AddInto {
    fn name(&self) -> &'static str {
        "add_into"
    }
    fn idioms(&self) -> Idioms {
        Idioms([0, 1, 0, 0, 1, 0])
    }
    fn check(&self, target: &Tensor, inputs: &[&Tensor]) -> Result<()> {
        if target.shape() != inputs[0].shape() {
            return Err(Error::shape_mismatch(
                "add_into",
                target.shape(),
                inputs[0].shape(),
            ));
        }
        Ok(())
    }
    fn forward(
        &self,
        target: &mut dyn dynn_core::DeviceStorage,
        layout: &Layout,
        inputs: &[KernelArg<'_>],
    ) -> Result<()> {
        let src = f32s(&inputs[0], "add_into")?;
        let dst = target
            .cpu_mut("add_into")?
            .as_mut_slice::<f32>("add_into")?;
        for (i, s) in layout.indices().zip(src) {
            dst[i] += s;
        }
        Ok(())
    }
}

/// Transpose of a rank-2 tensor as a view.
struct T2;

impl ViewOp for T2 {
    fn name(&self) -> &'static str {
        "transpose"
    }
    fn idioms(&self) -> Idioms {
        Idioms::LAYOUT
    }
    fn backward(&self, grad: &Tensor, _: &TensorSpec) -> Result<Tensor> {
        execute_view(T2, grad, grad.layout().transpose(0, 1)?)
    }
}

fn t2(x: &Tensor) -> Result<Tensor> {
    execute_view(T2, x, x.layout().transpose(0, 1)?)
}

#[derive(Debug, Clone, PartialEq)]
struct Ev {
    op: &'static str,
    phase: Phase,
    inputs: Vec<u64>,
    outputs: Vec<u64>,
    recipe: Option<String>,
}

#[derive(Default)]
struct Rec {
    events: Mutex<Vec<Ev>>,
    recipes: bool,
    recomputed: Mutex<Vec<Vec<f32>>>,
    kept: Mutex<Vec<Arc<WeakRecipe>>>,
}

impl MemoryHooks for Rec {
    fn before_op(&self, _: &OpEvent<'_>) -> Result<()> {
        Ok(())
    }
    fn after_op(&self, e: &OpEvent<'_>) -> Result<()> {
        if let Some(r) = e.recipe {
            let strong = r.upgrade().expect("the op's inputs live while it runs");
            let again = strong.recompute()?;
            let v = again[0].to_host()?.as_slice::<f32>("test")?.to_vec();
            assert!(r.is_fresh(), "a recipe is fresh right after its op");
            self.recomputed.lock().unwrap().push(v);
            self.kept.lock().unwrap().push(r.clone());
        }
        self.events.lock().unwrap().push(Ev {
            op: e.op,
            phase: e.phase,
            inputs: e.inputs.iter().map(|b| b.id().0).collect(),
            outputs: e.outputs.iter().map(|b| b.id().0).collect(),
            recipe: e.recipe.map(|r| format!("{r:?}")),
        });
        Ok(())
    }
    fn wants_recipes(&self) -> bool {
        self.recipes
    }
}

fn id(t: &Tensor) -> u64 {
    t.buffer().id().0
}

fn v(data: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(data.to_vec(), shape, Device::Cpu).unwrap()
}

#[test]
fn ops_views_and_backward_report_to_the_hooks() -> Result<()> {
    let rec = Arc::new(Rec::default());
    let _g = install_memory_hooks(rec.clone());
    let x = v(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]).set_requires_grad(true);
    let y = scale(&x, 2.0)?;
    let yt = t2(&y)?; // a view: no event
    let z = add(&t2(&yt)?, &x)?;
    assert_eq!(z.to_vec::<f32>()?, vec![3.0, 6.0, 9.0, 12.0, 15.0, 18.0]);
    assert!(z.requires_grad() && !z.is_leaf());
    run_backward(&z, v(&[1.0; 6], &[2, 3]), &|a, b| add(a, b))?;
    assert_eq!(x.grad().unwrap().to_vec::<f32>()?, vec![3.0; 6]);
    let evs = rec.events.lock().unwrap().clone();
    let ops: Vec<(&str, Phase)> = evs.iter().map(|e| (e.op, e.phase)).collect();
    // Forward: scale, add. Backward in reverse: add's rule runs no kernel, the two views' rules
    // none either, scale's rule one scale; then the two gradients of x are accumulated.
    assert_eq!(
        ops,
        vec![
            ("scale", Phase::Forward),
            ("add", Phase::Forward),
            ("scale", Phase::Backward),
            ("add", Phase::Backward),
        ]
    );
    assert_eq!(evs[0].inputs, vec![id(&x)]);
    assert_eq!(evs[0].outputs, vec![id(&y)]);
    assert_eq!(
        evs[1].inputs,
        vec![id(&y), id(&x)],
        "a view reads its base buffer"
    );
    assert_eq!(evs[1].outputs, vec![id(&z)]);
    assert_eq!(evs[3].outputs, vec![id(&x.grad().unwrap())]);
    assert!(
        evs.iter().all(|e| e.recipe.is_none()),
        "no recipes unless asked for"
    );
    Ok(())
}

#[test]
fn grad_mode_and_plain_inputs_record_nothing() -> Result<()> {
    let x = v(&[1.0, 2.0], &[2]).set_requires_grad(true);
    {
        let _ng = no_grad();
        assert!(!scale(&x, 3.0)?.requires_grad());
        assert!(!t2(&v(&[1.0; 4], &[2, 2]).set_requires_grad(true))?.requires_grad());
    }
    assert!(scale(&x, 3.0)?.requires_grad());
    assert!(!scale(&x.detach(), 3.0)?.requires_grad());
    let e = run_backward(&scale(&x.detach(), 3.0)?, v(&[1.0, 1.0], &[2]), &|a, b| {
        add(a, b)
    })
    .unwrap_err();
    assert!(matches!(e, Error::Autograd(_)), "{e:?}");
    Ok(())
}

#[test]
fn in_place_updates_report_the_target_as_input_and_output() -> Result<()> {
    let rec = Arc::new(Rec::default());
    let _g = install_memory_hooks(rec.clone());
    let target = v(&[1.0, 2.0, 3.0], &[3]);
    let delta = v(&[0.5, 0.5, 0.5], &[3]);
    let version = target.buffer().version();
    execute_inplace(AddInto, &target, &[&delta])?;
    assert_eq!(target.to_vec::<f32>()?, vec![1.5, 2.5, 3.5]);
    assert_eq!(target.buffer().version(), version + 1);
    let evs = rec.events.lock().unwrap().clone();
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].inputs, vec![id(&target), id(&delta)]);
    assert_eq!(evs[0].outputs, vec![id(&target)]);
    // A leaf that requires grad is refused while the tape is on, allowed under no_grad.
    let p = v(&[1.0], &[1]).set_requires_grad(true);
    let e = execute_inplace(AddInto, &p, &[&v(&[1.0], &[1])]).unwrap_err();
    assert!(
        e.to_string().contains("add_into") && e.to_string().contains("no_grad"),
        "{e}"
    );
    {
        let _ng = no_grad();
        execute_inplace(AddInto, &p, &[&v(&[1.0], &[1])])?;
    }
    assert_eq!(p.to_vec::<f32>()?, vec![2.0]);
    // A shape error comes from check, before any event.
    assert!(execute_inplace(AddInto, &target, &[&v(&[1.0], &[1])]).is_err());
    assert_eq!(rec.events.lock().unwrap().len(), 2);
    Ok(())
}

#[test]
fn a_fetched_or_written_back_buffer_offloads_for_free_until_an_op_writes_it() -> Result<()> {
    let _ng = no_grad();
    let x = v(&[1.0, 2.0, 3.0], &[3]);
    let b = x.buffer();
    let bytes = b.size_in_bytes();
    assert_eq!(b.offload()?, bytes, "the first offload copies");
    assert_eq!(b.fetch()?, bytes);
    assert!(b.host_copy_is_current());
    // Read only: the host copy is current, nothing moves, the bytes are the same.
    assert_eq!(b.offload()?, 0);
    assert_eq!(b.fetch()?, bytes);
    assert_eq!(x.to_vec::<f32>()?, vec![1.0, 2.0, 3.0]);
    // Written in place: the host copy is stale and the next offload copies the new bytes.
    execute_inplace(AddInto, &x, &[&v(&[0.5; 3], &[3])])?;
    assert!(!b.host_copy_is_current());
    assert_eq!(b.offload()?, bytes);
    assert_eq!(b.fetch()?, bytes);
    assert_eq!(x.to_vec::<f32>()?, vec![1.5, 2.5, 3.5]);
    // Written (adding zeros), then written back in the background: still on the device, and
    // the next offload is free.
    assert_eq!(b.write_back()?, 0, "the fetched copy is current");
    execute_inplace(AddInto, &x, &[&v(&[0.0; 3], &[3])])?;
    assert_eq!(b.write_back()?, bytes);
    assert_eq!(b.residency(), dynn_core::Residency::Device);
    assert!(b.host_copy_is_current());
    assert_eq!(b.write_back()?, 0, "already current");
    assert_eq!(b.offload()?, 0);
    assert_eq!(x.to_vec::<f32>()?, vec![1.5, 2.5, 3.5]);
    b.fetch()?;
    // Dropped (for recomputation) and new bytes put in its slot: no host copy either.
    assert_eq!(b.offload()?, 0);
    b.fetch()?;
    b.drop_data();
    assert!(!b.host_copy_is_current());
    b.set_slot(dynn_core::Slot::Device(Arc::from(
        Box::new(CpuStorage::F32(vec![7.0; 3])) as Box<dyn dynn_core::DeviceStorage>,
    )));
    assert!(!b.host_copy_is_current());
    assert_eq!(b.offload()?, bytes);
    b.fetch()?;
    assert_eq!(x.to_vec::<f32>()?, vec![7.0; 3]);
    Ok(())
}

#[test]
fn recipes_recompute_the_same_bits_and_go_stale_after_in_place_updates() -> Result<()> {
    let rec = Arc::new(Rec {
        recipes: true,
        ..Default::default()
    });
    let _g = install_memory_hooks(rec.clone());
    let x = v(&[1.0, -2.0, 0.25], &[3]);
    let y = scale(&x, 3.0)?;
    let evs = rec.events.lock().unwrap().clone();
    assert_eq!(
        evs[0].recipe.as_deref(),
        Some("WeakRecipe(scale, 1 inputs)")
    );
    assert_eq!(rec.recomputed.lock().unwrap()[0], y.to_vec::<f32>()?);
    let recipe = rec.kept.lock().unwrap()[0].clone();
    assert!(recipe.is_fresh());
    // After x changes in place, the recipe over x is stale (recomputing would not give y).
    execute_inplace(AddInto, &x, &[&v(&[1.0; 3], &[3])])?;
    assert!(!recipe.is_fresh());
    // The in-place op itself carries no recipe.
    assert_eq!(rec.events.lock().unwrap().last().unwrap().recipe, None);
    // The recipe does not keep its input alive.
    drop(x);
    assert!(recipe.upgrade().is_none());
    Ok(())
}

#[test]
fn broken_kernels_and_missing_devices_are_errors() {
    let x = v(&[1.0, 2.0], &[2]);
    let e = execute1(
        Scale {
            s: 1.0,
            bad_len: true,
            ..Default::default()
        },
        &[&x],
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("scale") && e.to_string().contains("3"),
        "{e}"
    );
    let e = execute(
        Scale {
            s: 1.0,
            ..Default::default()
        },
        &[],
    )
    .unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument { op: "scale", .. }),
        "{e:?}"
    );
    let e = add(&x, &v(&[1.0], &[1])).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { op: "add", .. }), "{e:?}");
    let e = Tensor::zeros(2, DType::F32, Device::Cuda(0)).unwrap_err();
    assert!(matches!(e, Error::Device { .. }), "{e:?}");
    // A view whose layout reaches past its buffer is refused.
    let e = execute_view(T2, &x, Layout::contiguous([3])).unwrap_err();
    assert!(e.to_string().contains("exceeds its buffer"), "{e}");
}

#[test]
fn a_leaf_whose_other_path_gets_no_gradient_is_heard_at_the_end() -> Result<()> {
    // y = w + cut(3·w): the scale node is reachable but never gets a gradient, so one of w's
    // two edges never delivers. Its hook still runs once, with the one contribution.
    let w = v(&[1.0, 2.0], &[2]).set_requires_grad(true);
    let seen: Arc<Mutex<Vec<Vec<f32>>>> = Arc::default();
    let s = seen.clone();
    let _h = w.on_grad_ready(move |g| {
        s.lock().unwrap().push(g.to_vec::<f32>()?);
        Ok(())
    })?;
    let cut = Scale {
        s: 1.0,
        cut: true,
        ..Default::default()
    };
    let y = add(&w, &execute1(cut, &[&scale(&w, 3.0)?])?)?;
    run_backward(&y, v(&[1.0, 1.0], &[2]), &|a, b| add(a, b))?;
    assert_eq!(*seen.lock().unwrap(), vec![vec![1.0, 1.0]]);
    // Not heard again for a pass that does not reach it.
    let u = v(&[0.0, 0.0], &[2]).set_requires_grad(true);
    run_backward(&scale(&u, 2.0)?, v(&[1.0, 1.0], &[2]), &|a, b| add(a, b))?;
    assert_eq!(seen.lock().unwrap().len(), 1);
    Ok(())
}
