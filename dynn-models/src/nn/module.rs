//! The `Module` trait, named parameters and the builder that creates them.

use dynn_core::{BufferKind, DType, Device, Result, Tensor};
use dynn_mm::trace::{FNV_START, fnv1a};
use dynn_ops::prelude::*;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

/// A trainable tensor with its module path (e.g. `blocks.3.moe.experts.17.w1`).
#[derive(Clone, Debug)]
pub struct Param {
    path: Arc<str>,
    tensor: Tensor,
}

impl Param {
    /// Wraps `tensor` (a leaf that requires grad) under `path`.
    pub fn new(path: impl Into<Arc<str>>, tensor: Tensor) -> Self {
        Param {
            path: path.into(),
            tensor,
        }
    }
    /// The module path.
    pub fn path(&self) -> &str {
        &self.path
    }
    /// The tensor.
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }
}

impl std::ops::Deref for Param {
    type Target = Tensor;
    fn deref(&self) -> &Tensor {
        &self.tensor
    }
}

/// A building block of a model: it owns parameters and may behave differently in training
/// and evaluation (dropout).
pub trait Module {
    /// Calls `f` on every parameter of this module and its children, in a fixed order.
    fn visit_params(&self, f: &mut dyn FnMut(&Param));

    /// Switches training (`true`) or evaluation mode. Modules whose forward does not depend on
    /// the mode keep the default; composites forward the call to their children.
    fn set_train(&mut self, train: bool) {
        let _ = train;
    }

    /// Every parameter, in visiting order.
    fn params(&self) -> Vec<Param> {
        let mut v = Vec::new();
        self.visit_params(&mut |p| v.push(p.clone()));
        v
    }

    /// The number of trainable scalars.
    fn param_count(&self) -> usize {
        let mut n = 0;
        self.visit_params(&mut |p| n += p.elem_count());
        n
    }
}

/// A module with one input and one output.
pub trait Forward: Module {
    /// Applies the module to `x`.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
}

impl<M: Module> Module for Vec<M> {
    fn visit_params(&self, f: &mut dyn FnMut(&Param)) {
        self.iter().for_each(|m| m.visit_params(f));
    }
    fn set_train(&mut self, train: bool) {
        self.iter_mut().for_each(|m| m.set_train(train));
    }
}

impl<M: Module> Module for Option<M> {
    fn visit_params(&self, f: &mut dyn FnMut(&Param)) {
        if let Some(m) = self {
            m.visit_params(f)
        }
    }
    fn set_train(&mut self, train: bool) {
        if let Some(m) = self {
            m.set_train(train)
        }
    }
}

impl Module for Param {
    fn visit_params(&self, f: &mut dyn FnMut(&Param)) {
        f(self)
    }
}

/// How a parameter's initial values are drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Every element `v`.
    Const(f64),
    /// Normal with this mean and standard deviation.
    Normal {
        /// Mean.
        mean: f64,
        /// Standard deviation.
        std: f64,
    },
    /// Uniform in `[lo, hi)`.
    Uniform {
        /// Lower bound.
        lo: f64,
        /// Upper bound.
        hi: f64,
    },
    /// PyTorch's `nn.Linear` default: uniform in ±1/√fan_in (fan_in = the first dim).
    KaimingUniform,
}

/// Creates named parameters: the path grows with [`ParamBuilder::pp`], and each parameter's
/// values are drawn from a seed derived from the base seed and its path, so a model's
/// initial weights do not depend on the order its parts are built in.
#[derive(Clone)]
pub struct ParamBuilder {
    path: String,
    dtype: DType,
    device: Device,
    seed: u64,
    created: Rc<RefCell<Vec<Param>>>,
}

impl ParamBuilder {
    /// A builder at the root path for parameters of `dtype` on `device`.
    pub fn new(dtype: DType, device: Device, seed: u64) -> Self {
        ParamBuilder {
            path: String::new(),
            dtype,
            device,
            seed,
            created: Rc::default(),
        }
    }

    /// A builder one level down: `blocks` then `3` gives the prefix `blocks.3.`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let mut b = self.clone();
        b.path = self.full(&name.to_string());
        b
    }

    /// The current path prefix.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The dtype of created parameters.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device of created parameters.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The base seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// A seed for `name` under this path (for modules that draw their own randomness).
    pub fn seed_for(&self, name: &str) -> u64 {
        fnv1a(self.seed ^ FNV_START, self.full(name).as_bytes())
    }

    fn full(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    /// A new parameter `name` of `shape`, initialised by `init`.
    pub fn param(
        &self,
        name: &str,
        shape: impl Into<dynn_core::Shape>,
        init: Init,
    ) -> Result<Param> {
        let shape = shape.into();
        let path = self.full(name);
        if self.created.borrow().iter().any(|p| p.path() == path) {
            return Err(dynn_core::Error::invalid(
                "ParamBuilder::param",
                format!(
                    "a parameter named `{path}` already exists \
                     (optimizer state and checkpoints are keyed by path)"
                ),
            ));
        }
        let seed = self.seed_for(name);
        let (dtype, dev) = (self.dtype, self.device);
        let t = match init {
            Init::Const(v) => Tensor::full(v, shape, dtype, dev)?,
            Init::Normal { mean, std } => rand_normal(shape, mean, std, dtype, seed, dev)?,
            Init::Uniform { lo, hi } => rand_uniform(shape, lo, hi, dtype, seed, dev)?,
            Init::KaimingUniform => {
                let fan_in = shape.dims().first().copied().unwrap_or(1).max(1);
                let b = 1.0 / (fan_in as f64).sqrt();
                rand_uniform(shape, -b, b, dtype, seed, dev)?
            }
        };
        t.set_kind(BufferKind::Parameter);
        let p = Param::new(path, t.set_requires_grad(true));
        self.created.borrow_mut().push(p.clone());
        Ok(p)
    }

    /// Every parameter created through this builder or any builder derived from it.
    pub fn created(&self) -> Vec<Param> {
        self.created.borrow().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_nest_and_seeds_follow_the_path_not_the_order() -> Result<()> {
        let a = ParamBuilder::new(DType::F32, Device::Cpu, 7);
        let x1 = a.pp("blocks").pp(3).param(
            "w",
            (2, 2),
            Init::Normal {
                mean: 0.0,
                std: 1.0,
            },
        )?;
        let _ = a.pp("other").param("w", 4, Init::Const(0.5))?;
        let b = ParamBuilder::new(DType::F32, Device::Cpu, 7);
        let x2 = b.pp("blocks.3").param(
            "w",
            (2, 2),
            Init::Normal {
                mean: 0.0,
                std: 1.0,
            },
        )?;
        assert_eq!(x1.path(), "blocks.3.w");
        assert_eq!(x1.to_vec::<f32>()?, x2.to_vec::<f32>()?);
        assert_eq!(a.created().len(), 2);
        let dup = a.pp("blocks").pp(3).param("w", 1, Init::Const(0.0));
        assert!(dup.is_err(), "a duplicate path is an error");
        assert!(x1.requires_grad());
        assert_eq!(x1.buffer().kind(), BufferKind::Parameter);
        Ok(())
    }
}
