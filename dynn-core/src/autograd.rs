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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// Where a gradient goes: a leaf's accumulator, or output `index` of a recorded node.
#[derive(Clone)]
pub(crate) enum GradMeta {
    Leaf(Arc<LeafGrad>),
    Node { node: Arc<Node>, index: usize },
}

/// The gradient accumulated on a leaf, and the hooks that hear when a backward pass has
/// finished it.
#[derive(Default)]
pub(crate) struct LeafGrad {
    grad: Mutex<Option<Tensor>>,
    hooks: Mutex<Vec<(u64, GradReadyHook)>>,
}

/// Called with a leaf's accumulated gradient once a backward pass has delivered its last
/// contribution to it (see [`Tensor::on_grad_ready`]).
pub type GradReadyHook = Arc<dyn Fn(&Tensor) -> Result<()> + Send + Sync>;

/// Hooks registered on any leaf: while none is, backward does not count contributions.
static READY_HOOKS: AtomicUsize = AtomicUsize::new(0);

impl LeafGrad {
    pub(crate) fn get(&self) -> Option<Tensor> {
        self.grad.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    pub(crate) fn set(&self, g: Option<Tensor>) {
        *self.grad.lock().unwrap_or_else(|e| e.into_inner()) = g;
    }
    fn hooks(&self) -> std::sync::MutexGuard<'_, Vec<(u64, GradReadyHook)>> {
        self.hooks.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Registers `hook`; it stays until the returned handle is dropped.
    pub(crate) fn add_hook(self: &Arc<Self>, hook: GradReadyHook) -> GradHookHandle {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        self.hooks().push((id, hook));
        READY_HOOKS.fetch_add(1, Ordering::Relaxed);
        GradHookHandle {
            leaf: Arc::downgrade(self),
            id,
        }
    }
    /// Runs the hooks on the gradient as it stands (none without a gradient).
    fn gradient_ready(&self) -> Result<()> {
        let Some(g) = self.get() else { return Ok(()) };
        let hooks: Vec<GradReadyHook> = self.hooks().iter().map(|(_, h)| h.clone()).collect();
        hooks.iter().try_for_each(|h| h(&g))
    }
}

/// Keeps a hook of [`Tensor::on_grad_ready`] registered; dropping it removes the hook.
#[must_use = "the hook is removed when this handle is dropped"]
pub struct GradHookHandle {
    leaf: Weak<LeafGrad>,
    id: u64,
}

impl Drop for GradHookHandle {
    fn drop(&mut self) {
        if let Some(leaf) = self.leaf.upgrade() {
            leaf.hooks().retain(|(id, _)| *id != self.id);
        }
        READY_HOOKS.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for GradHookHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GradHookHandle")
            .field("id", &self.id)
            .finish()
    }
}

/// The nodes reachable from `root`, in the order backward processes them (decreasing
/// sequence number).
pub(crate) fn reachable_nodes(root: &GradMeta) -> Vec<Arc<Node>> {
    let mut seen: HashMap<u64, Arc<Node>> = HashMap::new();
    let mut stack: Vec<Arc<Node>> = Vec::new();
    let mut visit = |meta: &GradMeta, stack: &mut Vec<Arc<Node>>| {
        if let GradMeta::Node { node, .. } = meta
            && !seen.contains_key(&node.seq)
        {
            seen.insert(node.seq, node.clone());
            stack.push(node.clone());
        }
    };
    visit(root, &mut stack);
    while let Some(node) = stack.pop() {
        for edge in node.edges.iter().flatten() {
            visit(edge, &mut stack);
        }
    }
    let mut nodes: Vec<Arc<Node>> = seen.into_values().collect();
    nodes.sort_unstable_by_key(|n| std::cmp::Reverse(n.seq));
    nodes
}

/// A leaf with ready hooks, as one backward pass counts down to it.
struct Hooked {
    leaf: Arc<LeafGrad>,
    /// Edges that may still deliver to it.
    left: usize,
    /// Whether this pass delivered a gradient to it.
    delivered: bool,
}

/// The leaves with ready hooks that one backward pass reaches, in the order the pass first
/// reaches them (deterministic), and where each is by address.
#[derive(Default)]
struct ReadyCount {
    leaves: Vec<Hooked>,
    at: HashMap<usize, usize>,
}

impl ReadyCount {
    /// Counts the edges that can deliver to each hooked leaf: the root's own (when the root is
    /// such a leaf) and every reachable node's.
    fn new(root: &GradMeta, nodes: &[Arc<Node>]) -> ReadyCount {
        let mut c = ReadyCount::default();
        let edges =
            std::iter::once(root).chain(nodes.iter().flat_map(|n| n.edges.iter().flatten()));
        for edge in edges {
            if let GradMeta::Leaf(leaf) = edge
                && !leaf.hooks().is_empty()
            {
                let k = *c.at.entry(Arc::as_ptr(leaf) as usize).or_insert_with(|| {
                    c.leaves.push(Hooked {
                        leaf: leaf.clone(),
                        left: 0,
                        delivered: false,
                    });
                    c.leaves.len() - 1
                });
                c.leaves[k].left += 1;
            }
        }
        c
    }

    /// One edge to `to` is processed (`delivered`: with a gradient). Runs a hooked leaf's
    /// hooks when that was its last edge.
    fn edge_done(&mut self, to: &GradMeta, delivered: bool) -> Result<()> {
        if let GradMeta::Leaf(leaf) = to
            && let Some(&k) = self.at.get(&(Arc::as_ptr(leaf) as usize))
        {
            let h = &mut self.leaves[k];
            h.left -= 1;
            h.delivered |= delivered;
            if h.left == 0 && h.delivered {
                h.leaf.gradient_ready()?;
            }
        }
        Ok(())
    }

    /// The pass is over: runs the hooks of the leaves some of whose edges belong to nodes no
    /// gradient reached.
    fn finish(self) -> Result<()> {
        self.leaves
            .iter()
            .filter(|h| h.left > 0 && h.delivered)
            .try_for_each(|h| h.leaf.gradient_ready())
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
/// with the tape off. Saved tensors are released as each node is processed. A leaf's ready
/// hooks run as soon as the last edge that can deliver to it has been processed (or at the end,
/// for a leaf some of whose edges were never reached by a gradient).
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
    // Both it and the ready hooks' count need the reachable nodes: one walk serves both.
    let hooks = crate::memory_hooks();
    let counting = READY_HOOKS.load(Ordering::Relaxed) > 0;
    let nodes = match hooks.is_some() || counting {
        true => reachable_nodes(meta),
        false => Vec::new(),
    };
    let mut ready = match counting {
        true => ReadyCount::new(meta, &nodes),
        false => ReadyCount::default(),
    };
    let planned = hooks.map(|h| {
        let plan = TapePlan::new(&nodes);
        h.plan("backward", &plan.groups);
        (h, plan)
    });
    // Not kept through the pass: each node is freed once processed, as before.
    drop(nodes);
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
    ready.edge_done(meta, true)?;
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
            let Some(edge) = edge else { continue };
            let Some(Some(g)) = input_grads.get(i) else {
                ready.edge_done(edge, false)?;
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
            ready.edge_done(edge, true)?;
        }
    }
    ready.finish()
}
