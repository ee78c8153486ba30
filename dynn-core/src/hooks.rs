//! The seam between the executor and a memory manager: op events and the hooks trait.

use crate::{Buffer, BufferId, BufferKind, Result, WeakRecipe};
use std::sync::Arc;

/// Which pass an op runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Phase {
    /// The forward pass (and inference).
    #[default]
    Forward,
    /// The backward pass (walking the tape).
    Backward,
    /// Optimizer updates.
    Optimizer,
}

impl Phase {
    /// A lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Forward => "forward",
            Phase::Backward => "backward",
            Phase::Optimizer => "optimizer",
        }
    }
}

/// How many times an op performs each of six memory-access idioms, in this order:
/// layout change/transpose, in-place update, indirect access (gather/scatter), reduction,
/// element-wise map, windowed/stencil access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Idioms(pub [u8; 6]);

impl Idioms {
    /// The names of the six idioms, in vector order.
    pub const NAMES: [&'static str; 6] = [
        "layout",
        "in_place",
        "indirect",
        "reduction",
        "elementwise",
        "window",
    ];
    /// No memory access idiom (a pure copy or a view).
    pub const NONE: Idioms = Idioms([0; 6]);
    /// One layout change.
    pub const LAYOUT: Idioms = Idioms([1, 0, 0, 0, 0, 0]);
    /// One element-wise map.
    pub const MAP: Idioms = Idioms([0, 0, 0, 0, 1, 0]);
    /// One reduction.
    pub const REDUCE: Idioms = Idioms([0, 0, 0, 1, 0, 0]);
}

/// What an op costs: floating-point operations and bytes read and written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Cost {
    /// Floating-point operations.
    pub flops: u64,
    /// Bytes the op must read.
    pub bytes_read: u64,
    /// Bytes the op must write.
    pub bytes_written: u64,
}

/// One op as the memory manager sees it, before and after its kernel.
#[derive(Debug)]
pub struct OpEvent<'a> {
    /// A process-wide sequence number, increasing by one per executed op.
    pub seq: u64,
    /// The op's name (as in the op table).
    pub op: &'static str,
    /// The pass.
    pub phase: Phase,
    /// Buffers the kernel reads, in argument order (a buffer read twice appears twice).
    pub inputs: &'a [Arc<Buffer>],
    /// Buffers the kernel writes: fresh outputs, or an input updated in place.
    pub outputs: &'a [Arc<Buffer>],
    /// The op's idiom signature.
    pub idioms: Idioms,
    /// The op's cost.
    pub cost: Cost,
    /// How to recompute the outputs (only when the hooks ask for recipes).
    pub recipe: Option<&'a Arc<WeakRecipe>>,
}

impl OpEvent<'_> {
    /// `(id, bytes, kind)` of every input.
    pub fn input_info(&self) -> impl Iterator<Item = (BufferId, usize, BufferKind)> + '_ {
        self.inputs
            .iter()
            .map(|b| (b.id(), b.size_in_bytes(), b.kind()))
    }

    /// `(id, bytes, kind)` of every output.
    pub fn output_info(&self) -> impl Iterator<Item = (BufferId, usize, BufferKind)> + '_ {
        self.outputs
            .iter()
            .map(|b| (b.id(), b.size_in_bytes(), b.kind()))
    }
}

/// Called by the executor around every op's kernel, in every phase. A memory manager
/// implements it: make inputs resident and reserve room for outputs in `before_op`; record
/// the access and schedule transfers in `after_op`.
pub trait MemoryHooks: Send + Sync {
    /// Before the kernel: inputs must be resident on the device when this returns `Ok`.
    fn before_op(&self, event: &OpEvent<'_>) -> Result<()>;
    /// After the kernel: outputs are materialized.
    fn after_op(&self, event: &OpEvent<'_>) -> Result<()>;
    /// True when the hooks want a [`WeakRecipe`] with every op event (to drop and recompute).
    fn wants_recipes(&self) -> bool {
        false
    }
    /// Brings a buffer's bytes back (recomputing a dropped one) so the host can read them,
    /// as `Tensor::to_vec` does. The default cannot.
    fn materialize(&self, buffer: &Arc<Buffer>) -> Result<()> {
        Err(crate::Error::NotResident {
            op: "materialize",
            buffer: buffer.id().0,
            residency: buffer.residency(),
        })
    }
    /// A buffer made outside any op (a tensor created from data, a parameter).
    fn buffer_created(&self, _buffer: &Arc<Buffer>) {}
    /// A step boundary, marked by the training loop (`dynn_core::mark_step`).
    fn step_boundary(&self, _step: u64) {}
    /// The coming ops' reads, known before they run (see [`crate::announce_plan`]): one group
    /// of buffer ids per planned unit of work (a tape node's backward, one parameter's
    /// update), in the order the units will run. The backward pass announces its tape this
    /// way (`source` "backward"), the optimizers and gradient clipping their parameters
    /// ("adam", "sgd", "clip_grad_norm", ...).
    fn plan(&self, _source: &'static str, _groups: &[Vec<BufferId>]) {}
    /// Buffer `buffer`, made since the last [`MemoryHooks::plan`], will be read by that
    /// plan's group `group`: the backward pass tells where each gradient it makes goes.
    fn plan_read(&self, _group: usize, _buffer: BufferId) {}
    /// The hooks were just uninstalled (their guard dropped): ops no longer pass through
    /// them, so a manager brings every live buffer it moved or dropped back to the device,
    /// or those tensors would be unusable afterwards.
    fn uninstalled(&self) {}
}
