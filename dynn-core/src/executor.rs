//! The executor: the one dispatch every op passes through, forward, backward and optimizer.
//!
//! For each op it infers the outputs, reports the op to the installed [`MemoryHooks`] before
//! and after the kernel, runs the kernel on resident storage, and records the op on the tape
//! when gradients are on.

use crate::autograd::{GradMeta, Node, Rule, Saved, next_tape_seq};
use crate::op::{InplaceOp, KernelArg, Op, TensorSpec, ViewOp, WeakRecipe};
use crate::{
    Buffer, BufferKind, Device, DeviceStorage, Error, Layout, OpEvent, Phase, Result, Slot, Tensor,
    context, memory_hooks,
};
use smallvec::SmallVec;
use std::sync::{Arc, Mutex};

/// Output tensors of one op.
pub type Tensors = SmallVec<[Tensor; 2]>;

fn common_device(op: &'static str, inputs: &[&Tensor]) -> Result<Option<Device>> {
    let mut dev = None;
    for t in inputs {
        match dev {
            None => dev = Some(t.device()),
            Some(d) if d != t.device() => {
                return Err(Error::DeviceMismatch {
                    op,
                    lhs: d,
                    rhs: t.device(),
                });
            }
            _ => {}
        }
    }
    Ok(dev)
}

fn output_kind(phase: Phase) -> BufferKind {
    match phase {
        Phase::Forward => BufferKind::Activation,
        Phase::Backward => BufferKind::Gradient,
        Phase::Optimizer => BufferKind::Temporary,
    }
}

/// Runs `op` on `inputs` (all on one device) and returns its outputs.
pub fn execute<O: Op>(op: O, inputs: &[&Tensor]) -> Result<Tensors> {
    let device = common_device(op.name(), inputs)?.ok_or_else(|| {
        Error::invalid(
            op.name(),
            "an op without inputs needs a device: use execute_on",
        )
    })?;
    execute_on(op, inputs, device)
}

/// Runs `op` and returns its single output.
pub fn execute1<O: Op>(op: O, inputs: &[&Tensor]) -> Result<Tensor> {
    let name = op.name();
    execute(op, inputs)?
        .into_iter()
        .next()
        .ok_or_else(|| Error::Msg(format!("{name} produced no output")))
}

/// Runs `op` on `device` (for ops without tensor inputs, such as random initialisers).
pub fn execute_on<O: Op>(op: O, inputs: &[&Tensor], device: Device) -> Result<Tensors> {
    let name = op.name();
    if let Some(d) = common_device(name, inputs)?
        && d != device
    {
        return Err(Error::DeviceMismatch {
            op: name,
            lhs: d,
            rhs: device,
        });
    }
    let specs = op.infer(inputs)?;
    let op: Arc<dyn Op> = Arc::new(op);
    let phase = context::phase();
    let kind = output_kind(phase);
    let in_bufs: SmallVec<[Arc<Buffer>; 4]> = inputs.iter().map(|t| t.buffer().clone()).collect();
    let out_bufs: SmallVec<[Arc<Buffer>; 2]> = specs
        .iter()
        .map(|s| Arc::new(Buffer::new(s.dtype, s.shape.elem_count(), device, kind)))
        .collect();
    let hooks = memory_hooks();
    let recipe = hooks
        .as_ref()
        .filter(|h| h.wants_recipes())
        .map(|_| Arc::new(WeakRecipe::new(op.clone(), inputs, specs.clone())));
    let event = hooks.as_ref().map(|_| OpEvent {
        seq: context::next_op_seq(),
        op: name,
        phase,
        inputs: &in_bufs,
        outputs: &out_bufs,
        idioms: op.idioms(),
        cost: op.cost(inputs, &specs),
        recipe: recipe.as_ref(),
    });
    if let (Some(h), Some(ev)) = (&hooks, &event) {
        h.before_op(ev)?;
    }
    let storages: SmallVec<[Arc<dyn DeviceStorage>; 4]> = in_bufs
        .iter()
        .map(|b| b.storage(name))
        .collect::<Result<_>>()?;
    let args: SmallVec<[KernelArg<'_>; 4]> = storages
        .iter()
        .zip(inputs)
        .map(|(s, t)| KernelArg {
            storage: s.as_ref(),
            layout: t.layout(),
        })
        .collect();
    let outs = op.forward(&args, &specs)?;
    drop(args);
    drop(storages);
    if outs.len() != specs.len() {
        return Err(Error::Msg(format!(
            "{name}: kernel returned {} outputs for {} specs",
            outs.len(),
            specs.len()
        )));
    }
    for ((buf, out), spec) in out_bufs.iter().zip(outs).zip(&specs) {
        if out.len() != spec.shape.elem_count()
            || out.dtype() != spec.dtype
            || out.device() != device
        {
            return Err(Error::Msg(format!(
                "{name}: kernel returned {} {:?} elements on {:?}, expected {} {:?} on {device:?}",
                out.len(),
                out.dtype(),
                out.device(),
                spec.shape.elem_count(),
                spec.dtype
            )));
        }
        buf.set_slot(Slot::Device(Arc::from(out)));
    }
    if let (Some(h), Some(ev)) = (&hooks, &event) {
        h.after_op(ev)?;
    }
    let record = context::is_grad_enabled()
        && op.differentiable()
        && inputs.iter().any(|t| t.requires_grad());
    let layouts = specs.iter().map(|s| Layout::contiguous(s.shape.clone()));
    if !record {
        return Ok(out_bufs
            .into_iter()
            .zip(layouts)
            .map(|(b, l)| Tensor::from_parts(b, l, None))
            .collect());
    }
    let save = op.save();
    let bit = |mask: u8, i: usize| i < 8 && mask & (1 << i) != 0;
    let outputs: Tensors = out_bufs
        .iter()
        .cloned()
        .zip(layouts)
        .map(|(b, l)| Tensor::from_parts(b, l, None))
        .collect();
    let saved = Saved {
        inputs: inputs
            .iter()
            .enumerate()
            .map(|(i, t)| bit(save.inputs, i).then(|| t.detach()))
            .collect(),
        outputs: outputs
            .iter()
            .enumerate()
            .map(|(i, t)| bit(save.outputs, i).then(|| t.detach()))
            .collect(),
    };
    let node = Arc::new(Node {
        seq: next_tape_seq(),
        num_outputs: specs.len(),
        edges: inputs.iter().map(|t| t.grad_meta().cloned()).collect(),
        input_specs: inputs
            .iter()
            .map(|t| TensorSpec::new(t.shape().clone(), t.dtype()))
            .collect(),
        rule: Rule::Op(op),
        saved: Mutex::new(Some(saved)),
    });
    Ok(outputs
        .into_iter()
        .enumerate()
        .map(|(index, t)| {
            t.view_with(
                t.layout().clone(),
                Some(GradMeta::Node {
                    node: node.clone(),
                    index,
                }),
            )
        })
        .collect())
}

/// Runs an in-place op: `target`'s buffer is updated by the kernel. Never recorded on the tape;
/// refused when `target` requires grad and the tape is on.
pub fn execute_inplace<O: InplaceOp>(op: O, target: &Tensor, inputs: &[&Tensor]) -> Result<()> {
    let name = op.name();
    if context::is_grad_enabled() && target.requires_grad() {
        return Err(Error::Autograd(format!(
            "{name}: in-place update of a tensor that requires grad while the tape is on (use no_grad)"
        )));
    }
    let mut all: SmallVec<[&Tensor; 4]> = SmallVec::new();
    all.push(target);
    all.extend_from_slice(inputs);
    common_device(name, &all)?;
    op.check(target, inputs)?;
    let in_bufs: SmallVec<[Arc<Buffer>; 4]> = all.iter().map(|t| t.buffer().clone()).collect();
    let out_bufs = [target.buffer().clone()];
    let hooks = memory_hooks();
    let event = hooks.as_ref().map(|_| OpEvent {
        seq: context::next_op_seq(),
        op: name,
        phase: context::phase(),
        inputs: &in_bufs,
        outputs: &out_bufs,
        idioms: op.idioms(),
        cost: op.cost(target, inputs),
        recipe: None,
    });
    if let (Some(h), Some(ev)) = (&hooks, &event) {
        h.before_op(ev)?;
    }
    let storages: SmallVec<[Arc<dyn DeviceStorage>; 4]> = in_bufs[1..]
        .iter()
        .map(|b| b.storage(name))
        .collect::<Result<_>>()?;
    let args: SmallVec<[KernelArg<'_>; 4]> = storages
        .iter()
        .zip(inputs)
        .map(|(s, t)| KernelArg {
            storage: s.as_ref(),
            layout: t.layout(),
        })
        .collect();
    target
        .buffer()
        .update(name, |dst| op.forward(dst, target.layout(), &args))?;
    drop(args);
    if let (Some(h), Some(ev)) = (&hooks, &event) {
        h.after_op(ev)?;
    }
    Ok(())
}

/// Makes a view of `input` with `layout` (same buffer, no kernel, no memory traffic), recorded
/// on the tape with the view's backward rule when gradients flow.
pub fn execute_view<V: ViewOp>(view: V, input: &Tensor, layout: Layout) -> Result<Tensor> {
    if layout.max_extent() > input.buffer().len() {
        return Err(Error::Msg(format!(
            "{}: view layout {layout:?} exceeds its buffer",
            view.name()
        )));
    }
    if !(context::is_grad_enabled() && input.requires_grad()) {
        return Ok(input.view_with(layout, None));
    }
    let node = Arc::new(Node {
        seq: next_tape_seq(),
        num_outputs: 1,
        edges: smallvec::smallvec![input.grad_meta().cloned()],
        input_specs: smallvec::smallvec![TensorSpec::new(input.shape().clone(), input.dtype())],
        rule: Rule::View(Box::new(view)),
        saved: Mutex::new(Some(Saved {
            inputs: SmallVec::new(),
            outputs: SmallVec::new(),
        })),
    });
    Ok(input.view_with(layout, Some(GradMeta::Node { node, index: 0 })))
}
