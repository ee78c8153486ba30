//! The op contract: what every operator in `dynn-ops` provides in one place.

use crate::{Cost, DType, DeviceStorage, Idioms, Layout, Result, Shape, Tensor};
use smallvec::SmallVec;

/// Shape and dtype of one output an op will produce.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    /// The output shape (outputs are contiguous).
    pub shape: Shape,
    /// The output dtype.
    pub dtype: DType,
}

impl TensorSpec {
    /// A spec.
    pub fn new(shape: impl Into<Shape>, dtype: DType) -> Self {
        TensorSpec {
            shape: shape.into(),
            dtype,
        }
    }

    /// Size in bytes.
    pub fn size_in_bytes(&self) -> usize {
        self.shape.elem_count() * self.dtype.size_in_bytes()
    }
}

/// Output specs; most ops have one.
pub type Specs = SmallVec<[TensorSpec; 2]>;
/// Output storages returned by a kernel, one per spec.
pub type Outputs = SmallVec<[Box<dyn DeviceStorage>; 2]>;
/// Gradients for each input (`None` where an input gets no gradient).
pub type InputGrads = SmallVec<[Option<Tensor>; 4]>;

/// One input as a kernel sees it: resident storage and the layout over it.
#[derive(Clone, Copy)]
pub struct KernelArg<'a> {
    /// The resident device storage.
    pub storage: &'a dyn DeviceStorage,
    /// The layout of the input over the storage.
    pub layout: &'a Layout,
}

impl<'a> KernelArg<'a> {
    /// The CPU storage, or a device error naming `op`.
    pub fn cpu(&self, op: &'static str) -> Result<&'a crate::CpuStorage> {
        self.storage.cpu(op)
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.storage.dtype()
    }

    /// The shape.
    pub fn shape(&self) -> &'a Shape {
        self.layout.shape()
    }
}

/// Which inputs and outputs an op's backward rule reads (kept alive, offloadable, on the tape).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Save {
    /// Bit `i` set: input `i` is saved.
    pub inputs: u8,
    /// Bit `i` set: output `i` is saved.
    pub outputs: u8,
}

impl Save {
    /// Nothing saved.
    pub const NONE: Save = Save {
        inputs: 0,
        outputs: 0,
    };
    /// Every input saved.
    pub const INPUTS: Save = Save {
        inputs: 0xff,
        outputs: 0,
    };
    /// Output 0 saved.
    pub const OUTPUT: Save = Save {
        inputs: 0,
        outputs: 1,
    };
}

/// What a backward rule gets: the gradient of each output, the saved tensors, and the
/// shapes and dtypes of all inputs.
pub struct BackwardCtx<'a> {
    /// Gradient of each output (`None` for outputs backward did not reach).
    pub grads: &'a [Option<Tensor>],
    /// Saved inputs (per [`Op::save`]); `None` where not saved.
    pub inputs: &'a [Option<Tensor>],
    /// Saved outputs (per [`Op::save`]); `None` where not saved.
    pub outputs: &'a [Option<Tensor>],
    /// Shape and dtype of every input.
    pub input_specs: &'a [TensorSpec],
    /// Whether each input wants a gradient.
    pub needs_grad: &'a [bool],
}

impl BackwardCtx<'_> {
    /// The gradient of output `i`.
    pub fn grad(&self, i: usize) -> Result<&Tensor> {
        self.grads
            .get(i)
            .and_then(|g| g.as_ref())
            .ok_or_else(|| crate::Error::Autograd(format!("no gradient for output {i}")))
    }

    /// Saved input `i`.
    pub fn input(&self, i: usize) -> Result<&Tensor> {
        self.inputs
            .get(i)
            .and_then(|t| t.as_ref())
            .ok_or_else(|| crate::Error::Autograd(format!("input {i} was not saved")))
    }

    /// Saved output `i`.
    pub fn output(&self, i: usize) -> Result<&Tensor> {
        self.outputs
            .get(i)
            .and_then(|t| t.as_ref())
            .ok_or_else(|| crate::Error::Autograd(format!("output {i} was not saved")))
    }

    /// True when input `i` wants a gradient.
    pub fn needs(&self, i: usize) -> bool {
        self.needs_grad.get(i).copied().unwrap_or(false)
    }
}

/// An operator, defined in one place: output inference, kernel(s), backward rule, idioms, cost.
///
/// The struct implementing `Op` carries the op's parameters (dims, flags, seeds). It runs
/// through [`crate::execute`], which reports it to the memory hooks and records it on the tape.
pub trait Op: Send + Sync + 'static {
    /// The op's name in the op table.
    fn name(&self) -> &'static str;

    /// The six idiom counts (see [`Idioms`]).
    fn idioms(&self) -> Idioms;

    /// Validates the inputs and returns the output specs. Errors name the op.
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs>;

    /// The op's cost for these inputs and outputs. The default counts one flop per output
    /// element and the bytes of all inputs and outputs.
    fn cost(&self, inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
        let flops: usize = outputs.iter().map(|s| s.shape.elem_count()).sum();
        Cost::streaming(inputs, outputs, flops as u64)
    }

    /// Runs the kernel for the inputs' device, returning one contiguous storage per spec.
    fn forward(&self, inputs: &[KernelArg<'_>], outputs: &[TensorSpec]) -> Result<Outputs>;

    /// Which inputs and outputs backward reads.
    fn save(&self) -> Save {
        Save::NONE
    }

    /// The gradients of the inputs, computed with ops (so they run through the executor in
    /// the backward phase). Non-differentiable ops keep the default, which errors.
    fn backward(&self, _ctx: &BackwardCtx<'_>) -> Result<InputGrads> {
        Err(crate::Error::Autograd(format!(
            "{} is not differentiable",
            self.name()
        )))
    }

    /// False for ops whose outputs never carry gradients (comparisons, argmax, indices).
    fn differentiable(&self) -> bool {
        true
    }
}

/// An op that updates its first input in place (optimizer steps, gradient accumulation).
pub trait InplaceOp: Send + Sync + 'static {
    /// The op's name in the op table.
    fn name(&self) -> &'static str;
    /// The six idiom counts.
    fn idioms(&self) -> Idioms;
    /// Validates the target and the other inputs.
    fn check(&self, target: &Tensor, inputs: &[&Tensor]) -> Result<()>;
    /// The cost (default: read target and inputs, write target).
    fn cost(&self, target: &Tensor, inputs: &[&Tensor]) -> Cost {
        let t = (target.elem_count() * target.dtype().size_in_bytes()) as u64;
        let read: usize = inputs
            .iter()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum();
        Cost {
            flops: target.elem_count() as u64,
            bytes_read: t + read as u64,
            bytes_written: t,
        }
    }
    /// The kernel: updates `target` (with layout `layout`) in place.
    fn forward(
        &self,
        target: &mut dyn DeviceStorage,
        layout: &Layout,
        inputs: &[KernelArg<'_>],
    ) -> Result<()>;
}

/// A zero-copy op: the output shares the input's buffer with a new layout.
pub trait ViewOp: Send + Sync + 'static {
    /// The op's name in the op table.
    fn name(&self) -> &'static str;
    /// The six idiom counts (a view performs no access itself; this describes the layout change).
    fn idioms(&self) -> Idioms;
    /// The gradient of the input from the gradient of the view.
    fn backward(&self, grad: &Tensor, input_spec: &TensorSpec) -> Result<Tensor>;
}

/// How to produce an op's outputs again: the op, handles to its inputs and their versions.
/// A memory manager that drops an activation (to recompute it on its next use) keeps the
/// recipe; recomputation runs the same deterministic kernel, so it gives the same bits.
pub struct Recipe {
    /// The op.
    pub op: std::sync::Arc<dyn Op>,
    /// Its inputs (detached handles; their bytes may themselves be offloaded or dropped).
    pub inputs: SmallVec<[Tensor; 4]>,
    /// The output specs.
    pub specs: Specs,
    /// Each input buffer's version when the op ran (see [`crate::Buffer::version`]).
    pub input_versions: SmallVec<[u64; 4]>,
}

impl Recipe {
    /// True when no input was updated in place since the op ran (recomputing is exact).
    pub fn is_fresh(&self) -> bool {
        self.inputs
            .iter()
            .zip(&self.input_versions)
            .all(|(t, &v)| t.buffer().version() == v)
    }

    /// Runs the kernel again. Every input must be resident on the device.
    pub fn recompute(&self) -> Result<Outputs> {
        let name = self.op.name();
        let storages: SmallVec<[std::sync::Arc<dyn DeviceStorage>; 4]> = self
            .inputs
            .iter()
            .map(|t| t.buffer().storage(name))
            .collect::<Result<_>>()?;
        let args: SmallVec<[KernelArg<'_>; 4]> = storages
            .iter()
            .zip(&self.inputs)
            .map(|(s, t)| KernelArg {
                storage: s.as_ref(),
                layout: t.layout(),
            })
            .collect();
        self.op.forward(&args, &self.specs)
    }
}

/// A [`Recipe`] that does not keep its inputs alive: what the executor hands the memory
/// hooks with every op when they ask for recipes. A memory manager keeps one for every output
/// and [upgrades](WeakRecipe::upgrade) it only to drop the output: a strong recipe would hold
/// every input of every op for as long as the op's output lives, memory the run had already
/// released.
pub struct WeakRecipe {
    op: std::sync::Arc<dyn Op>,
    inputs: SmallVec<[(crate::BufferId, std::sync::Weak<crate::Buffer>, Layout); 4]>,
    specs: Specs,
    input_versions: SmallVec<[u64; 4]>,
}

impl WeakRecipe {
    /// The recipe of `op` run on `inputs` (their versions as they are now) producing `specs`.
    pub fn new(op: std::sync::Arc<dyn Op>, inputs: &[&Tensor], specs: Specs) -> Self {
        WeakRecipe {
            op,
            inputs: inputs
                .iter()
                .map(|t| {
                    (
                        t.buffer().id(),
                        std::sync::Arc::downgrade(t.buffer()),
                        t.layout().clone(),
                    )
                })
                .collect(),
            specs,
            input_versions: inputs.iter().map(|t| t.buffer().version()).collect(),
        }
    }

    /// The ids of its input buffers, in argument order.
    pub fn input_ids(&self) -> impl Iterator<Item = crate::BufferId> + '_ {
        self.inputs.iter().map(|i| i.0)
    }

    /// True when every input still lives and none was updated in place since the op ran.
    pub fn is_fresh(&self) -> bool {
        self.inputs
            .iter()
            .zip(&self.input_versions)
            .all(|((_, b, _), &v)| b.upgrade().is_some_and(|b| b.version() == v))
    }

    /// The recipe with its inputs held again, or `None` when one of them was released.
    pub fn upgrade(&self) -> Option<Recipe> {
        let inputs = self
            .inputs
            .iter()
            .map(|(_, b, layout)| {
                let buffer = b.upgrade()?;
                Some(Tensor::from_parts(buffer, layout.clone(), None))
            })
            .collect::<Option<SmallVec<[Tensor; 4]>>>()?;
        Some(Recipe {
            op: self.op.clone(),
            inputs,
            specs: self.specs.clone(),
            input_versions: self.input_versions.clone(),
        })
    }
}

impl std::fmt::Debug for WeakRecipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "WeakRecipe({}, {} inputs)",
            self.op.name(),
            self.inputs.len()
        )
    }
}

impl std::fmt::Debug for Recipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Recipe({}, {} inputs)",
            self.op.name(),
            self.inputs.len()
        )
    }
}

impl Cost {
    /// One streaming pass: every input read once, every output written once, and `flops`
    /// operations.
    pub fn streaming(inputs: &[&Tensor], outputs: &[TensorSpec], flops: u64) -> Cost {
        let read: usize = inputs
            .iter()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum();
        let written: usize = outputs.iter().map(TensorSpec::size_in_bytes).sum();
        Cost {
            flops,
            bytes_read: read as u64,
            bytes_written: written as u64,
        }
    }
}
