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
//! The crates behind this facade: [`core`] (tensors, storage handles, autograd, the executor
//! seam), [`ops`] (every operator: kernels, backward rules, idioms, costs) and [`mm`] (the
//! memory manager: device budget, policies, traces, reports) and [`models`] (modules,
//! optimizers, checkpoints, data and the four dynamic networks with their training loop).

pub use dynn_core as core;
pub use dynn_core::{DType, Device, Error, Result, Shape, Tensor};
pub use dynn_mm as mm;
pub use dynn_models as models;
pub use dynn_ops as ops;

/// Everything a training script needs: tensors, devices, errors and every op's methods.
pub mod prelude {
    pub use dynn_core::{
        BufferKind, DType, Device, Error, Phase, Result, Shape, Tensor, enter_phase, no_grad,
    };
    pub use dynn_ops::prelude::*;
}
