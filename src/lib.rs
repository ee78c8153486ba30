//! # dynn
//!
//! A Rust training framework for **dynamic neural networks** (Mixture-of-Experts, early exits,
//! recursive nets, recycling) that are larger than the accelerator's memory. dynn owns its
//! tensors, autograd and kernels: every op passes one executor that reports what it touches
//! to a memory manager, so tensors can move between device and host memory ahead of need.
//!
//! ```
//! use dynn::prelude::*;
//!
//! # fn main() -> dynn::Result<()> {
//! // y = relu(x W + b), loss = mean(y²); one SGD step.
//! let dev = Device::Cpu;
//! let x = Tensor::from_vec(vec![0.5f32, -1.0, 2.0, 0.25, 1.5, -0.75], (2, 3), dev)?;
//! let w = Tensor::from_vec(vec![0.1f32, -0.2, 0.3, 0.4, -0.5, 0.6], (3, 2), dev)?.set_requires_grad(true);
//! let b = Tensor::zeros(2, DType::F32, dev)?.set_requires_grad(true);
//! let loss = x.matmul(&w)?.add(&b)?.relu()?.sqr()?.mean_all()?;
//! loss.backward()?;
//! let before = loss.to_scalar::<f32>()?;
//! {
//!     let _g = no_grad();
//!     for p in [&w, &b] {
//!         p.axpy_(-0.1, &p.grad().expect("reached by backward"))?;
//!     }
//! }
//! let after = x.matmul(&w)?.add(&b)?.relu()?.sqr()?.mean_all()?.to_scalar::<f32>()?;
//! assert!(after < before);
//! # Ok(())
//! # }
//! ```
//!
//! ## A dynamic model of your own
//!
//! A module whose forward pass branches on the data, trained with AdamW under a device budget
//! a third of what it needs: the memory manager moves its tensors as the graph changes, and the
//! result is bit-identical to an unlimited run.
//!
//! ```
//! use dynn::prelude::*;
//! use dynn::models::nn::Linear;
//! use dynn::mm::{ManagerConfig, MemoryManager, policy};
//!
//! /// Refines its input 1 to 3 times: as often as the batch's mean square asks for.
//! struct Ponder {
//!     block: Linear,
//!     head: Linear,
//! }
//!
//! impl Ponder {
//!     fn loss(&self, x: &Tensor, y: &Tensor) -> dynn::Result<(Tensor, usize)> {
//!         let energy = {
//!             let _g = no_grad();
//!             x.sqr()?.mean_all()?.to_scalar_f64()?
//!         };
//!         let repeats = 1 + (energy * 300.0) as usize % 3; // the graph follows the data
//!         let mut h = x.clone();
//!         for _ in 0..repeats {
//!             h = h.add(&self.block.forward(&h)?.tanh()?)?;
//!         }
//!         Ok((self.head.forward(&h)?.sub(y)?.sqr()?.mean_all()?, repeats))
//!     }
//! }
//!
//! impl Module for Ponder {
//!     fn visit_params(&self, f: &mut dyn FnMut(&Param)) {
//!         self.block.visit_params(f);
//!         self.head.visit_params(f);
//!     }
//! }
//!
//! # fn main() -> dynn::Result<()> {
//! let b = ParamBuilder::new(DType::F32, Device::Cpu, 0);
//! let model = Ponder {
//!     block: Linear::new(&b.pp("block"), 64, 64)?,
//!     head: Linear::new(&b.pp("head"), 64, 1)?,
//! };
//! let mm = MemoryManager::new(ManagerConfig::new(policy::by_name("lru")?, Some(96 << 10)));
//! let _installed = dynn::core::install_memory_hooks(mm.clone());
//! let mut opt = Adam::new(AdamConfig::adamw(1e-2))?;
//! let mut depths = std::collections::BTreeSet::new();
//! for step in 0..20u64 {
//!     let x = rand_normal((32, 64), 0.0, 0.1 + 0.02 * (step % 5) as f64, DType::F32, step, Device::Cpu)?;
//!     let y = x.sum_keepdim(1)?.tanh()?;
//!     let (loss, depth) = model.loss(&x, &y)?;
//!     loss.backward()?;
//!     opt.step(&model.params())?;
//!     dynn::core::mark_step(step + 1);
//!     depths.insert(depth);
//! }
//! assert!(depths.len() > 1, "the depth changed with the data");
//! assert!(mm.stats().evictions > 0, "the budget forced offloading");
//! # Ok(())
//! # }
//! ```
//!
//! The crates behind this facade: [`core`] (tensors, storage handles, autograd, the executor
//! seam), [`ops`] (every operator: kernels, backward rules, idioms, costs) and [`mm`] (the
//! memory manager: device budget, policies, traces, reports) and [`models`] (modules,
//! optimizers, checkpoints, data and the four dynamic networks with their training loop).

pub use dynn_core as core;
pub use dynn_core::{DType, Device, Error, Result, Shape, Tensor};
pub use dynn_mm as mm;
pub use dynn_models as models;
pub use dynn_ops as ops;
pub use dynn_ops::cpu::init_threads;
pub use dynn_ops::cuda;
pub use dynn_pilot as pilot;

/// Everything a training script needs: tensors, devices, errors and every op's methods.
pub mod prelude {
    pub use dynn_core::{
        BufferKind, DType, Device, Error, Phase, Result, Shape, Tensor, enter_phase, no_grad,
    };
    pub use dynn_models::nn::{Forward, Init, Module, Param, ParamBuilder};
    pub use dynn_models::optim::{Adam, AdamConfig, Optimizer, Sgd, SgdConfig};
    pub use dynn_ops::prelude::*;
}
