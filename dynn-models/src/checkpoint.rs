//! Checkpoints as safetensors files: parameters, optimizer state, the step and the RNG
//! states, so a run resumes bit-exactly.
//!
//! Layout: parameters are stored as `model.<path>`, optimizer state as `optim.<name>`; the
//! header's metadata holds `format` (`dynn-checkpoint`), `version`, `step`, `model`, `config`
//! (the model's settings, compared on resume), `rng.<name>` states, and `hash.<tensor>`: an
//! FNV-1a hash of each tensor's bytes, so a corrupted payload is caught and named, not loaded.

use crate::nn::Param;
use crate::optim::Optimizer;
use dynn_core::{DType, Device, Error, Result, Tensor, no_grad};
use dynn_mm::trace::{FNV_START, fnv1a};
use dynn_ops::prelude::*;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

const FORMAT: &str = "dynn-checkpoint";
const VERSION: &str = "1";

/// Tensors by name plus string metadata: what one checkpoint file holds.
#[derive(Clone, Debug, Default)]
pub struct Checkpoint {
    tensors: BTreeMap<String, Tensor>,
    meta: BTreeMap<String, String>,
}

/// What [`Checkpoint::restore_training`] gives back besides the restored tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct Resumed {
    /// Steps completed when the checkpoint was written.
    pub step: u64,
    /// Saved RNG states by name.
    pub rngs: BTreeMap<String, u64>,
}

fn err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

impl Checkpoint {
    /// An empty checkpoint.
    pub fn new() -> Self {
        Self::default()
    }

    /// The full training state: every parameter, the optimizer's state, the step, named RNG
    /// states, and the model's name and settings (checked on resume).
    pub fn from_training(
        params: &[Param],
        optimizer: &dyn Optimizer,
        step: u64,
        rngs: &[(&str, u64)],
        model: &str,
        config: &str,
    ) -> Self {
        let mut c = Checkpoint::new();
        for p in params {
            c.insert(format!("model.{}", p.path()), p.tensor().clone());
        }
        for (name, t) in optimizer.state() {
            c.insert(format!("optim.{name}"), t);
        }
        c.set_meta("step", step.to_string());
        c.set_meta("model", model);
        c.set_meta("config", config);
        for (name, s) in rngs {
            c.set_meta(&format!("rng.{name}"), s.to_string());
        }
        c
    }

    /// Adds (or replaces) a tensor.
    pub fn insert(&mut self, name: impl Into<String>, t: Tensor) {
        self.tensors.insert(name.into(), t);
    }

    /// A tensor by name.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    /// Sets a metadata entry.
    pub fn set_meta(&mut self, key: &str, value: impl Into<String>) {
        self.meta.insert(key.to_string(), value.into());
    }

    /// A metadata entry.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.meta.get(key).map(String::as_str)
    }

    /// Writes the file (to a temporary name first, then renamed, so a crash mid-write never
    /// leaves a truncated checkpoint under the real name).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut bytes = Vec::with_capacity(self.tensors.len());
        for (name, t) in &self.tensors {
            let (dtype, data) = to_bytes(t)?;
            bytes.push((name.clone(), dtype, t.dims().to_vec(), data));
        }
        let mut meta: HashMap<String, String> = self.meta.clone().into_iter().collect();
        meta.insert("format".into(), FORMAT.into());
        meta.insert("version".into(), VERSION.into());
        for (name, _, _, data) in &bytes {
            meta.insert(
                format!("hash.{name}"),
                format!("{:016x}", fnv1a(FNV_START, data)),
            );
        }
        let views = bytes
            .iter()
            .map(|(name, dtype, shape, data)| {
                TensorView::new(*dtype, shape.clone(), data)
                    .map(|v| (name.as_str(), v))
                    .map_err(|e| err(path, format!("tensor `{name}`: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let tmp = path.with_extension("safetensors.tmp");
        safetensors::serialize_to_file(views, Some(meta), &tmp)
            .map_err(|e| err(path, format!("cannot write: {e}")))?;
        std::fs::rename(&tmp, path).map_err(|e| err(path, format!("cannot rename: {e}")))?;
        Ok(())
    }

    /// Reads and validates a file: the safetensors structure (a truncated or corrupt file is
    /// an error), the format tag and version, and every tensor's hash.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let data = std::fs::read(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
        let st = SafeTensors::deserialize(&data).map_err(|e| {
            err(
                path,
                format!("not a valid safetensors file (truncated or corrupt?): {e}"),
            )
        })?;
        let (_, header) =
            SafeTensors::read_metadata(&data).map_err(|e| err(path, format!("bad header: {e}")))?;
        let meta: BTreeMap<String, String> = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        match (meta.get("format"), meta.get("version")) {
            (Some(f), Some(v)) if f == FORMAT && v == VERSION => {}
            (Some(f), Some(v)) if f == FORMAT => {
                return Err(err(
                    path,
                    format!("version {v}, this build reads {VERSION}"),
                ));
            }
            _ => {
                return Err(err(
                    path,
                    "not a dynn checkpoint (no `format: dynn-checkpoint`)",
                ));
            }
        }
        let mut tensors = BTreeMap::new();
        for (name, view) in st.iter() {
            let want = meta
                .get(&format!("hash.{name}"))
                .ok_or_else(|| err(path, format!("tensor `{name}` has no hash")))?;
            let got = format!("{:016x}", fnv1a(FNV_START, view.data()));
            if &got != want {
                return Err(err(
                    path,
                    format!("tensor `{name}` is corrupt (hash mismatch)"),
                ));
            }
            let t = from_bytes(view.dtype(), view.shape(), view.data())
                .map_err(|e| err(path, format!("tensor `{name}`: {e}")))?;
            tensors.insert(name.to_string(), t);
        }
        Ok(Checkpoint { tensors, meta })
    }

    /// Copies the saved values into `params` (`model.<path>` entries), onto each parameter's
    /// device. A missing tensor, or one with another shape or dtype, is an error naming it;
    /// nothing is half-restored (all entries are checked before any is copied).
    pub fn restore_params(&self, params: &[Param]) -> Result<()> {
        let here = Path::new("<loaded>");
        let mut pairs = Vec::with_capacity(params.len());
        for p in params {
            let name = format!("model.{}", p.path());
            let t = self
                .get(&name)
                .ok_or_else(|| err(here, format!("tensor `{name}` is missing")))?;
            if t.shape() != p.shape() || t.dtype() != p.dtype() {
                return Err(err(
                    here,
                    format!(
                        "tensor `{name}` is {:?} {}, the model expects {:?} {}",
                        t.dtype(),
                        t.shape(),
                        p.dtype(),
                        p.shape()
                    ),
                ));
            }
            pairs.push((p, t));
        }
        let _g = no_grad();
        for (p, t) in pairs {
            // Loaded tensors are on the CPU: copy each onto its parameter's device (a clone
            // when that is the CPU).
            p.assign_(&t.to_device(p.device())?)?;
        }
        Ok(())
    }

    /// Restores a checkpoint made by [`Checkpoint::from_training`]: checks that it was written
    /// for `model` with the same `config`, restores parameters and optimizer state, and returns
    /// the step and RNG states.
    pub fn restore_training(
        &self,
        params: &[Param],
        optimizer: &mut dyn Optimizer,
        model: &str,
        config: &str,
    ) -> Result<Resumed> {
        let here = Path::new("<loaded>");
        if self.meta("model") != Some(model) {
            return Err(err(
                here,
                format!("written for model {:?}, not {model:?}", self.meta("model")),
            ));
        }
        if self.meta("config") != Some(config) {
            return Err(err(
                here,
                format!(
                    "model settings differ: saved {:?}, now {config:?}",
                    self.meta("config")
                ),
            ));
        }
        let step = self
            .meta("step")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| err(here, "no step in the metadata"))?;
        self.restore_params(params)?;
        optimizer
            .load_state(params, &|name| self.get(&format!("optim.{name}")).cloned())
            .map_err(|e| match e {
                Error::Checkpoint { msg, .. } => err(here, msg),
                e => e,
            })?;
        let mut rngs = BTreeMap::new();
        for (k, v) in &self.meta {
            if let Some(name) = k.strip_prefix("rng.") {
                let s = v
                    .parse()
                    .map_err(|_| err(here, format!("RNG state `{k}` is not a number")))?;
                rngs.insert(name.to_string(), s);
            }
        }
        Ok(Resumed { step, rngs })
    }
}

/// A tensor's elements as little-endian bytes with the safetensors dtype.
fn to_bytes(t: &Tensor) -> Result<(Dtype, Vec<u8>)> {
    fn le<T: dynn_core::CpuElement, const N: usize>(
        t: &Tensor,
        f: impl Fn(T) -> [u8; N],
    ) -> Result<Vec<u8>> {
        Ok(t.to_vec::<T>()?.into_iter().flat_map(f).collect())
    }
    Ok(match t.dtype() {
        DType::F32 => (Dtype::F32, le(t, f32::to_le_bytes)?),
        DType::F64 => (Dtype::F64, le(t, f64::to_le_bytes)?),
        DType::F16 => (Dtype::F16, le(t, half::f16::to_le_bytes)?),
        DType::BF16 => (Dtype::BF16, le(t, half::bf16::to_le_bytes)?),
        DType::I64 => (Dtype::I64, le(t, i64::to_le_bytes)?),
        DType::U32 => (Dtype::U32, le(t, u32::to_le_bytes)?),
        DType::U8 => (Dtype::U8, t.to_vec::<u8>()?),
    })
}

/// A tensor from little-endian bytes.
fn from_bytes(dtype: Dtype, shape: &[usize], data: &[u8]) -> Result<Tensor> {
    fn read<T: dynn_core::CpuElement, const N: usize>(
        data: &[u8],
        shape: &[usize],
        f: impl Fn([u8; N]) -> T,
    ) -> Result<Tensor> {
        let v: Vec<T> = data
            .chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                f(a)
            })
            .collect();
        Tensor::from_vec(v, shape.to_vec(), Device::Cpu)
    }
    match dtype {
        Dtype::F32 => read(data, shape, f32::from_le_bytes),
        Dtype::F64 => read(data, shape, f64::from_le_bytes),
        Dtype::F16 => read(data, shape, half::f16::from_le_bytes),
        Dtype::BF16 => read(data, shape, half::bf16::from_le_bytes),
        Dtype::I64 => read(data, shape, i64::from_le_bytes),
        Dtype::U32 => read(data, shape, u32::from_le_bytes),
        Dtype::U8 => read(data, shape, u8::from_le_bytes),
        d => Err(Error::invalid(
            "checkpoint",
            format!("unsupported dtype {d:?}"),
        )),
    }
}
