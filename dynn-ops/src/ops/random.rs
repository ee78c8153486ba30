//! Seeded random initialisers (`rand_uniform`, `rand_normal`) and the counter-based generator
//! behind them and behind dropout.
//!
//! Element `i` of a random tensor is a pure function of `(seed, i)`: a splitmix64 hash of the
//! counter, keyed by the seed. So the values are the same whatever the thread count or the
//! chunking, and regenerating them (dropout's backward, a recomputed activation) gives the
//! same bits.

use crate::cpu::PAR_MIN;
use crate::registry::OpInfo;
use dynn_core::{
    Cost, CpuElement, CpuStorage, DType, Device, Error, Idioms, KernelArg, Op, Outputs, Result,
    Shape, Specs, Tensor, TensorSpec, execute_on, smallvec::smallvec, vec_from_fill,
};
use rayon::prelude::*;
use std::mem::MaybeUninit;

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The splitmix64 finaliser: a bijective 64-bit mix with full avalanche.
#[inline(always)]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A key for [`counter_hash`] from a user seed and a per-op salt (so that, for example,
/// dropout and `rand_uniform` with the same seed draw different bits).
#[inline]
pub fn stream_key(seed: u64, salt: u64) -> u64 {
    mix64(seed ^ mix64(salt))
}

/// The `i`-th 64 random bits of the stream `key`: splitmix64 evaluated at counter `i`.
#[inline(always)]
pub fn counter_hash(key: u64, i: u64) -> u64 {
    mix64(key.wrapping_add(i.wrapping_add(1).wrapping_mul(GAMMA)))
}

/// A uniform f64 in [0, 1) from the top 53 bits.
#[inline(always)]
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Fills `out` in parallel, `f(i)` giving element `i` (chunking does not affect values).
pub(crate) fn fill_indexed<T: Copy + Send>(
    n: usize,
    f: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync,
) -> Vec<T> {
    const CH: usize = 1 << 14;
    vec_from_fill(n, |out| {
        if n < PAR_MIN {
            out.chunks_mut(CH)
                .enumerate()
                .for_each(|(c, o)| f(c * CH, o));
        } else {
            out.par_chunks_mut(CH)
                .enumerate()
                .for_each(|(c, o)| f(c * CH, o));
        }
    })
}

/// The distribution a [`RandInit`] draws from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Distribution {
    /// Uniform on `[lo, hi)` (values equal to `hi` only through rounding to the dtype).
    Uniform {
        /// Lower bound.
        lo: f64,
        /// Upper bound.
        hi: f64,
    },
    /// Normal with the given mean and standard deviation (Box–Muller).
    Normal {
        /// Mean.
        mean: f64,
        /// Standard deviation.
        std: f64,
    },
}

/// A seeded random tensor: a no-input, non-differentiable op run on a device.
#[derive(Debug, Clone, PartialEq)]
pub struct RandInit {
    /// The output shape.
    pub shape: Shape,
    /// The output dtype (a float dtype).
    pub dtype: DType,
    /// The seed.
    pub seed: u64,
    /// What to draw.
    pub dist: Distribution,
}

const UNIFORM_SALT: u64 = 0x756E_6966_6F72_6D00; // "uniform"
const NORMAL_SALT: u64 = 0x6E6F_726D_616C_0000; // "normal"

fn generate<T: CpuElement>(dist: Distribution, seed: u64, n: usize) -> Vec<T> {
    match dist {
        Distribution::Uniform { lo, hi } => {
            let key = stream_key(seed, UNIFORM_SALT);
            let span = hi - lo;
            fill_indexed(n, |start, o| {
                for (k, o) in o.iter_mut().enumerate() {
                    o.write(T::from_f64(
                        lo + span * unit(counter_hash(key, (start + k) as u64)),
                    ));
                }
            })
        }
        Distribution::Normal { mean, std } => {
            let key = stream_key(seed, NORMAL_SALT);
            // Element 2j and 2j+1 are the cosine and sine halves of pair j's Box–Muller draw,
            // from counters 2j and 2j+1.
            let pair = move |j: usize| {
                let u1 = 1.0 - unit(counter_hash(key, 2 * j as u64)); // in (0, 1]
                let u2 = unit(counter_hash(key, 2 * j as u64 + 1));
                let r = (-2.0 * u1.ln()).sqrt();
                let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
                (mean + std * r * c, mean + std * r * s)
            };
            fill_indexed(n, |start, o| {
                // Chunks start at even indices (the chunk length is even).
                for (k, o2) in o.chunks_mut(2).enumerate() {
                    let (a, b) = pair(start / 2 + k);
                    o2[0].write(T::from_f64(a));
                    if let Some(o) = o2.get_mut(1) {
                        o.write(T::from_f64(b));
                    }
                }
            })
        }
    }
}

impl RandInit {
    /// Idioms: one element-wise map (generation writes every element once; nothing is read).
    pub const IDIOMS: Idioms = Idioms::MAP;
}

impl Op for RandInit {
    fn name(&self) -> &'static str {
        match self.dist {
            Distribution::Uniform { .. } => "rand_uniform",
            Distribution::Normal { .. } => "rand_normal",
        }
    }
    fn idioms(&self) -> Idioms {
        Self::IDIOMS
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let name = self.name();
        if !inputs.is_empty() {
            return Err(Error::invalid(
                name,
                format!("takes no tensor inputs, got {}", inputs.len()),
            ));
        }
        if !self.dtype.is_float() {
            return Err(Error::unsupported_dtype(name, self.dtype));
        }
        match self.dist {
            Distribution::Uniform { lo, hi } if !(lo.is_finite() && hi.is_finite() && lo <= hi) => {
                return Err(Error::invalid(
                    name,
                    format!("needs finite lo <= hi, got lo {lo}, hi {hi}"),
                ));
            }
            Distribution::Normal { mean, std }
                if !(mean.is_finite() && std.is_finite() && std >= 0.0) =>
            {
                return Err(Error::invalid(
                    name,
                    format!(
                        "needs a finite mean and a finite std >= 0, got mean {mean}, std {std}"
                    ),
                ));
            }
            _ => {}
        }
        Ok(smallvec![TensorSpec::new(self.shape.clone(), self.dtype)])
    }
    fn cost(&self, _: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
        let n = self.shape.elem_count() as u64;
        // The hash (about 8 integer ops) and the affine map; Box–Muller adds ln, sqrt, sin, cos per pair.
        let per = match self.dist {
            Distribution::Uniform { .. } => 10,
            Distribution::Normal { .. } => 20,
        };
        Cost {
            flops: per * n,
            bytes_read: 0,
            bytes_written: outputs.iter().map(|s| s.size_in_bytes() as u64).sum(),
        }
    }
    fn forward(&self, _: &[KernelArg<'_>], specs: &[TensorSpec]) -> Result<Outputs> {
        let n = specs[0].shape.elem_count();
        let s = match self.dtype {
            DType::F32 => CpuStorage::F32(generate(self.dist, self.seed, n)),
            DType::F64 => CpuStorage::F64(generate(self.dist, self.seed, n)),
            DType::F16 => CpuStorage::F16(generate(self.dist, self.seed, n)),
            DType::BF16 => CpuStorage::BF16(generate(self.dist, self.seed, n)),
            other => return Err(Error::unsupported_dtype(self.name(), other)),
        };
        Ok(crate::cpu::one(s))
    }
    fn differentiable(&self) -> bool {
        false
    }
}

fn run(op: RandInit, device: Device) -> Result<Tensor> {
    let name = op.name();
    execute_on(op, &[], device)?
        .into_iter()
        .next()
        .ok_or_else(|| Error::Msg(format!("{name} produced no output")))
}

/// A tensor of `shape` with elements uniform on `[lo, hi)`, a pure function of `seed` and the
/// element index (the same on any thread count). Float dtypes only.
pub fn rand_uniform(
    shape: impl Into<Shape>,
    lo: f64,
    hi: f64,
    dtype: DType,
    seed: u64,
    device: Device,
) -> Result<Tensor> {
    run(
        RandInit {
            shape: shape.into(),
            dtype,
            seed,
            dist: Distribution::Uniform { lo, hi },
        },
        device,
    )
}

/// A tensor of `shape` with normally distributed elements (`mean`, `std`), a pure function of
/// `seed` and the element index. Float dtypes only.
pub fn rand_normal(
    shape: impl Into<Shape>,
    mean: f64,
    std: f64,
    dtype: DType,
    seed: u64,
    device: Device,
) -> Result<Tensor> {
    run(
        RandInit {
            shape: shape.into(),
            dtype,
            seed,
            dist: Distribution::Normal { mean, std },
        },
        device,
    )
}

/// Seeded random constructors as associated functions (`Tensor::rand_uniform(..)`).
pub trait RandomOps: Sized {
    /// See [`rand_uniform`].
    fn rand_uniform(
        shape: impl Into<Shape>,
        lo: f64,
        hi: f64,
        dtype: DType,
        seed: u64,
        device: Device,
    ) -> Result<Self>;
    /// See [`rand_normal`].
    fn rand_normal(
        shape: impl Into<Shape>,
        mean: f64,
        std: f64,
        dtype: DType,
        seed: u64,
        device: Device,
    ) -> Result<Self>;
}

impl RandomOps for Tensor {
    fn rand_uniform(
        shape: impl Into<Shape>,
        lo: f64,
        hi: f64,
        dtype: DType,
        seed: u64,
        device: Device,
    ) -> Result<Self> {
        rand_uniform(shape, lo, hi, dtype, seed, device)
    }
    fn rand_normal(
        shape: impl Into<Shape>,
        mean: f64,
        std: f64,
        dtype: DType,
        seed: u64,
        device: Device,
    ) -> Result<Self> {
        rand_normal(shape, mean, std, dtype, seed, device)
    }
}

/// This file's entries in the op table.
pub(crate) fn ops() -> Vec<OpInfo> {
    let f = |name| OpInfo {
        name,
        idioms: RandInit::IDIOMS,
        differentiable: false,
        family: "random",
    };
    vec![f("rand_uniform"), f("rand_normal")]
}
