//! The define-by-run tape and the backward engine.
//!
//! Every recorded op becomes a [`Node`] with a tape sequence number. Backward processes nodes
//! in decreasing sequence order, which is exactly the reverse of the forward recording order
//! restricted to what the loss depends on: the backward access order is known as soon as the
//! forward pass ends.

use crate::op::{BackwardCtx, Op, TensorSpec, ViewOp};
use crate::tape_plan::TapePlan;
use crate::{BufferKind, Error, Phase, Result, Tensor};
use smallvec::SmallVec;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Where a gradient goes: a leaf's accumulator, or output `index` of a recorded node.
#[derive(Clone)]
pub(crate) enum GradMeta {
    Leaf(Arc<LeafGrad>),
    Node { node: Arc<Node>, index: usize },
}

/// The gradient accumulated on a leaf.
#[derive(Default)]
pub(crate) struct LeafGrad {
    grad: Mutex<Option<Tensor>>,
}

impl LeafGrad {
    pub(crate) fn get(&self) -> Option<Tensor> {
        self.grad.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    pub(crate) fn set(&self, g: Option<Tensor>) {
        *self.grad.lock().unwrap_or_else(|e| e.into_inner()) = g;
    }
}

/// The backward rule of a node.
pub(crate) enum Rule {
    Op(Arc<dyn Op>),
    View(Box<dyn ViewOp>),
}

impl Rule {
    fn name(&self) -> &'static str {
        match self {
            Rule::Op(o) => o.name(),
            Rule::View(v) => v.name(),
        }
    }
}

/// One recorded op on the tape.
pub struct Node {
    pub(crate) seq: u64,
    pub(crate) rule: Rule,
    pub(crate) edges: SmallVec<[Option<GradMeta>; 4]>,
    pub(crate) input_specs: SmallVec<[TensorSpec; 4]>,
    pub(crate) num_outputs: usize,
    pub(crate) saved: Mutex<Option<Saved>>,
}

/// Tensors a node keeps for its backward rule (detached handles: offloadable buffers).
pub(crate) struct Saved {
    pub(crate) inputs: SmallVec<[Option<Tensor>; 4]>,
    pub(crate) outputs: SmallVec<[Option<Tensor>; 2]>,
}

impl Node {
    /// The node's position on the tape.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The op's name.
    pub fn op_name(&self) -> &'static str {
        self.rule.name()
    }
}

pub(crate) fn next_tape_seq() -> u64 {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    SEQ.fetch_add(1, Ordering::Relaxed)
}

type Pending = HashMap<u64, (Arc<Node>, SmallVec<[Option<Tensor>; 2]>)>;

/// Adds two gradients (supplied by `dynn-ops`, since the core names no op).
pub type Accumulate<'a> = &'a dyn Fn(&Tensor, &Tensor) -> Result<Tensor>;

/// Runs backward from `root`, seeding its gradient with `seed` (same shape as `root`), and
/// accumulates into every reachable leaf that requires grad. Rules run in the backward phase
/// with the tape off. Saved tensors are released as each node is processed.
pub fn run_backward(root: &Tensor, seed: Tensor, accumulate: Accumulate<'_>) -> Result<()> {
    if seed.shape() != root.shape() {
        return Err(Error::shape_mismatch(
            "backward (seed vs root)",
            seed.shape(),
            root.shape(),
        ));
    }
    let Some(meta) = root.grad_meta() else {
        return Err(Error::Autograd(format!(
            "backward called on a tensor of shape {} that does not require grad (did you call set_requires_grad on the inputs?)",
            root.shape()
        )));
    };
    let _phase = crate::enter_phase(Phase::Backward);
    let _nograd = crate::no_grad();
    let mut pending: Pending = HashMap::new();
    let mut heap = BinaryHeap::new();
    // The tape's reads, announced to the memory hooks; then where each gradient made goes.
    let planned = crate::memory_hooks().map(|h| {
        let plan = TapePlan::new(meta);
        h.plan("backward", &plan.groups);
        (h, plan)
    });
    let announce = |from: Option<usize>, to: &GradMeta, g: &Tensor| {
        if let Some((h, plan)) = &planned
            && let Some(group) = plan.next_read(from, to)
        {
            h.plan_read(group, g.buffer().id());
        }
    };
    let deliver = |meta: &GradMeta,
                   g: Tensor,
                   from: Option<usize>,
                   pending: &mut Pending,
                   heap: &mut BinaryHeap<u64>|
     -> Result<()> {
        match meta {
            GradMeta::Leaf(leaf) => {
                let total = match leaf.get() {
                    Some(prev) => accumulate(&prev, &g)?,
                    None => g,
                };
                total.set_kind(BufferKind::Gradient);
                announce(from, meta, &total);
                leaf.set(Some(total));
            }
            GradMeta::Node { node, index } => {
                let entry = pending.entry(node.seq).or_insert_with(|| {
                    heap.push(node.seq);
                    (node.clone(), SmallVec::from_elem(None, node.num_outputs))
                });
                let slot = &mut entry.1[*index];
                let total = match slot.take() {
                    Some(prev) => accumulate(&prev, &g)?,
                    None => g,
                };
                announce(from, meta, &total);
                *slot = Some(total);
            }
        }
        Ok(())
    };
    deliver(meta, seed, None, &mut pending, &mut heap)?;
    while let Some(seq) = heap.pop() {
        let Some((node, grads)) = pending.remove(&seq) else {
            continue;
        };
        let saved = node.saved.lock().unwrap_or_else(|e| e.into_inner()).take().ok_or_else(|| {
            Error::Autograd(format!(
                "the saved tensors of {} were already released by an earlier backward; run the forward again",
                node.op_name()
            ))
        })?;
        let needs: SmallVec<[bool; 4]> = node.edges.iter().map(Option::is_some).collect();
        let input_grads = match &node.rule {
            Rule::Op(op) => op.backward(&BackwardCtx {
                grads: &grads,
                inputs: &saved.inputs,
                outputs: &saved.outputs,
                input_specs: &node.input_specs,
                needs_grad: &needs,
            })?,
            Rule::View(v) => {
                let g = grads[0].as_ref().ok_or_else(|| {
                    Error::Autograd(format!("{}: no gradient for the view", v.name()))
                })?;
                smallvec::smallvec![Some(v.backward(g, &node.input_specs[0])?)]
            }
        };
        drop(saved);
        let from = planned.as_ref().and_then(|(_, p)| p.group_of(node.seq));
        for (i, edge) in node.edges.iter().enumerate() {
            let (Some(edge), Some(Some(g))) = (edge, input_grads.get(i)) else {
                continue;
            };
            let spec = &node.input_specs[i];
            if g.shape() != &spec.shape || g.dtype() != spec.dtype {
                return Err(Error::Autograd(format!(
                    "{}: backward produced a gradient of shape {} {} for input {i} of shape {} {}",
                    node.op_name(),
                    g.shape(),
                    g.dtype(),
                    spec.shape,
                    spec.dtype
                )));
            }
            deliver(edge, g.clone(), from, &mut pending, &mut heap)?;
        }
    }
    Ok(())
}
