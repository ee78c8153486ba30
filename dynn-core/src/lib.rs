//! # dynn-core
//!
//! The foundation of dynn: tensors whose storage can move between device and host while
//! every handle stays valid, a define-by-run autograd tape, and the executor through which
//! every op passes, calling [`MemoryHooks`] before and after each kernel.
//!
//! The core names no op, policy or model. Operators live in `dynn-ops`, memory management
//! in `dynn-mm`.

#![warn(missing_docs)]

mod autograd;
mod buffer;
mod context;
mod cpu_storage;
mod device;
mod dtype;
mod error;
mod executor;
mod half_bits;
mod hooks;
pub mod host_cache;
mod layout;
mod op;
mod shape;
mod tape_plan;
mod tensor;

pub use autograd::{Accumulate, GradHookHandle, GradReadyHook, Node, run_backward};
pub use buffer::{Buffer, BufferId, BufferKind, ReleaseSink, Residency, Slot};
pub use context::{
    HooksGuard, NoGradGuard, PhaseGuard, announce_plan, enter_phase, install_memory_hooks,
    is_grad_enabled, mark_step, memory_hooks, no_grad, phase, set_memory_hooks,
};
pub use cpu_storage::{CpuElement, CpuStorage, vec_from_fill};
pub use device::{Backend, CpuBackend, Device, DeviceStorage, HostStorage, register_backend};
pub use dtype::{DType, Element, FloatElement, erf, num_like::AccFloat};
pub use error::{Error, Result};
pub use executor::{Tensors, execute, execute_inplace, execute_on, execute_view, execute1};
pub use half_bits::{f16_to_f32, f32_to_f16};
pub use hooks::{Cost, Idioms, MemoryHooks, OpEvent, Phase};
pub use layout::{Layout, StridedIndex};
pub use op::{
    BackwardCtx, InplaceOp, InputGrads, KernelArg, Op, Outputs, Recipe, Save, Specs, TensorSpec,
    ViewOp, WeakRecipe,
};
pub use shape::{Dim, Dims, Shape};
pub use tensor::Tensor;
pub use {half, smallvec};
