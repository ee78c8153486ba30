//! Seeded random initialisers (`rand_uniform`, `rand_normal`) and the counter-based generator
//! behind them and behind dropout.
//!
//! Element `i` of a random tensor is a pure function of `(seed, i)`: a splitmix64 hash of the
//! counter, keyed by the seed. So the values are the same whatever the thread count or the
//! chunking, and regenerating them (dropout's backward, a recomputed activation) gives the
//! same bits.

use crate::cpu::PAR_MIN;
use crate::cuda::{self, CudaSource, CudaStorage};
use crate::registry::OpInfo;
use dynn_core::{
    Cost, CpuElement, CpuStorage, DType, Device, DeviceStorage, Error, Idioms, KernelArg, Op,
    Outputs, Result, Shape, Specs, Tensor, TensorSpec, execute_on, smallvec::smallvec,
    vec_from_fill,
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

/// The CUDA C of [`mix64`] and [`counter_hash`], bit for bit the same functions (unsigned
/// 64-bit arithmetic wraps in C as `wrapping_*` does in Rust), for the kernels of every family
/// that draws random bits (`concat!(counter_hash_cuda!(), ...)`).
macro_rules! counter_hash_cuda {
    () => {
        r#"
__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
__device__ __forceinline__ unsigned long long counter_hash(unsigned long long key,
                                                           unsigned long long i) {
    return mix64(key + (i + 1ull) * 0x9E3779B97F4A7C15ull);
}
"#
    };
}
pub(crate) use counter_hash_cuda;

/// The CUDA kernel of `rand_uniform` (f32 and f64): element `i` is the CPU's value bit for bit
/// (the same hash, the same exact 53-bit fraction, then one multiply and one add, each
/// rounded — no fused multiply-add — and one rounding to the dtype). `rand_normal` (whose
/// `ln`, `sqrt`, `sin` and `cos` would not round like the CPU's) and the 16-bit dtypes are
/// generated on the host and uploaded, so they too equal the CPU's values bit for bit.
pub const CUDA: CudaSource = CudaSource {
    name: "random",
    code: concat!(
        counter_hash_cuda!(),
        r#"
extern "C" __global__ void rand_uniform(unsigned long long key, double lo, double span,
                                        scalar* y, i64 n) {
    GRID_LOOP(i, n) {
        double u = (double)(counter_hash(key, (unsigned long long)i) >> 11)
                 * (1.0 / 9007199254740992.0);
        y[i] = (scalar)__dadd_rn(lo, __dmul_rn(span, u));
    }
}
"#
    ),
    half: false,
};

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
    /// The device the tensor is made on (the op has no inputs to tell it).
    pub device: Device,
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

    /// The `n` elements, generated on the host.
    fn host(&self, n: usize) -> Result<CpuStorage> {
        Ok(match self.dtype {
            DType::F32 => CpuStorage::F32(generate(self.dist, self.seed, n)),
            DType::F64 => CpuStorage::F64(generate(self.dist, self.seed, n)),
            DType::F16 => CpuStorage::F16(generate(self.dist, self.seed, n)),
            DType::BF16 => CpuStorage::BF16(generate(self.dist, self.seed, n)),
            other => return Err(Error::unsupported_dtype(self.name(), other)),
        })
    }

    /// The `n` elements on GPU `ordinal`: uniform f32/f64 by the kernel, the rest generated on
    /// the host and uploaded (see [`CUDA`]).
    fn cuda_forward(&self, ordinal: usize, n: usize) -> Result<Box<dyn DeviceStorage>> {
        let name = self.name();
        let dev = cuda::device(ordinal)?;
        let Distribution::Uniform { lo, hi } = self.dist else {
            return Ok(Box::new(CudaStorage::upload(&dev, &self.host(n)?)?));
        };
        if !matches!(self.dtype, DType::F32 | DType::F64) {
            return Ok(Box::new(CudaStorage::upload(&dev, &self.host(n)?)?));
        }
        let mut out = CudaStorage::alloc(&dev, self.dtype, n)?;
        if n > 0 {
            let f = dev.function(&CUDA, self.dtype, "rand_uniform")?;
            let (key, span, n64) = (stream_key(self.seed, UNIFORM_SALT), hi - lo, n as i64);
            crate::cuda_launch!(
                dev,
                name,
                f,
                cuda::grid(n),
                [&key, &lo, &span, out.slice_mut(), &n64]
            )?;
        }
        Ok(Box::new(out))
    }
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
        if let Device::Cuda(ordinal) = self.device {
            return Ok(smallvec![self.cuda_forward(ordinal, n)?]);
        }
        Ok(crate::cpu::one(self.host(n)?))
    }
    fn differentiable(&self) -> bool {
        false
    }
}

fn run(op: RandInit) -> Result<Tensor> {
    let (name, device) = (op.name(), op.device);
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
    run(RandInit {
        shape: shape.into(),
        dtype,
        seed,
        dist: Distribution::Uniform { lo, hi },
        device,
    })
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
    run(RandInit {
        shape: shape.into(),
        dtype,
        seed,
        dist: Distribution::Normal { mean, std },
        device,
    })
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
