//! The GPU op suite's harness: the CPU kernels are the oracle. A case runs the same function
//! on CPU tensors and on copies of them on `cuda:0`, seeds backward with the same random
//! gradient, and compares outputs and every input's gradient within a tolerance.
//! Without a CUDA driver or device every case is skipped with a notice.

#![allow(dead_code)]

use dynn_core::{DType, Device, Error, Result, Tensor};
use dynn_ops::grad::Backward;
use dynn_ops::prelude::*;

/// `cuda:0`, initialised, or `None` (with a notice) when there is no driver or device.
pub fn gpu() -> Option<Device> {
    if !dynn_ops::cuda::driver_available() || dynn_ops::cuda::device_count() == 0 {
        eprintln!("skipped: no CUDA driver or device");
        return None;
    }
    match dynn_ops::cuda::init(0) {
        Ok(_) => Some(Device::Cuda(0)),
        Err(e) => panic!("a CUDA device is present but could not be opened: {e}"),
    }
}

/// A splitmix64 stream for deterministic data.
pub struct Rng(u64);

impl Rng {
    /// A stream for `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Values uniform in ±[0.1, 1.0] (random sign), as an f32 (or `dtype`) CPU tensor.
pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    rand_dtype(shape, seed, DType::F32)
}

/// Like [`randn`] in `dtype` (f32, f64, f16 or bf16).
pub fn rand_dtype(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let mut r = Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| {
            let m = 0.1 + 0.9 * r.uniform();
            if r.uniform() < 0.5 { -m } else { m }
        })
        .collect();
    from_f64(v, shape, dtype)
}

/// Values uniform in [0.2, 2.0].
pub fn rand_positive(shape: &[usize], seed: u64) -> Tensor {
    let mut r = Rng::new(seed);
    let n: usize = shape.iter().product();
    from_f64(
        (0..n).map(|_| 0.2 + 1.8 * r.uniform()).collect(),
        shape,
        DType::F32,
    )
}

/// Integer indices in `0..bound` as an i64 (or u32, or u8: wrapped) CPU tensor.
pub fn indices(shape: &[usize], bound: usize, seed: u64, dtype: DType) -> Tensor {
    let mut r = Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<i64> = (0..n)
        .map(|_| (r.uniform() * bound as f64) as i64 % bound as i64)
        .collect();
    match dtype {
        DType::U32 => Tensor::from_vec(v.iter().map(|&i| i as u32).collect(), shape, Device::Cpu),
        DType::U8 => Tensor::from_vec(v.iter().map(|&i| i as u8).collect(), shape, Device::Cpu),
        _ => Tensor::from_vec(v, shape, Device::Cpu),
    }
    .expect("index tensor")
}

fn from_f64(v: Vec<f64>, shape: &[usize], dtype: DType) -> Tensor {
    match dtype {
        DType::F64 => Tensor::from_vec(v, shape, Device::Cpu),
        DType::F16 | DType::BF16 => {
            Tensor::from_vec(v.iter().map(|&x| x as f32).collect(), shape, Device::Cpu)
                .and_then(|t| t.to_dtype(dtype))
        }
        _ => Tensor::from_vec(v.iter().map(|&x| x as f32).collect(), shape, Device::Cpu),
    }
    .expect("random tensor")
}

/// Compares two tensors element-wise: `|a - b| <= tol * (1 + |b|)`.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) -> Result<()> {
    if got.shape() != want.shape() {
        return Err(Error::Msg(format!(
            "{what}: shape {} on the GPU, {} on the CPU",
            got.shape(),
            want.shape()
        )));
    }
    if got.dtype() != want.dtype() {
        return Err(Error::Msg(format!(
            "{what}: dtype {:?} on the GPU, {:?} on the CPU",
            got.dtype(),
            want.dtype()
        )));
    }
    let (g, w) = (got.to_f64_vec()?, want.to_f64_vec()?);
    let mut worst = (0.0f64, 0usize);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let err = (a - b).abs() / (1.0 + b.abs());
        if err.is_nan() || err > worst.0 {
            worst = (if err.is_nan() { f64::INFINITY } else { err }, i);
        }
    }
    if worst.0 > tol {
        let i = worst.1;
        return Err(Error::Msg(format!(
            "{what}: element {i} is {} on the GPU and {} on the CPU (relative error {:.3e} > {tol:.1e})",
            g[i], w[i], worst.0
        )));
    }
    Ok(())
}

/// The default tolerance for f32 (f64 cases pass 1e-9).
pub const TOL_F32: f64 = 2e-5;

/// The float dtypes the families with 16-bit kernels are checked in.
pub const FLOATS: [DType; 4] = [DType::F32, DType::F64, DType::F16, DType::BF16];

/// The tolerance for a result of `dtype` against the CPU: both compute 16-bit data in f32 and
/// round each op's result once, so they differ by the order of f32 sums and by an ulp where a
/// result straddles a rounding boundary, which a chain of ops can compound (about 4 ulps:
/// f16's is 2^-10, bf16's 2^-7).
pub fn tol_of(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => TOL_F32,
        DType::F16 => 4e-3,
        DType::BF16 => 3.2e-2,
        _ => 1e-9,
    }
}

/// Runs `f` on CPU `inputs` and on their GPU copies; compares outputs, then the gradients of
/// every float input after seeding backward with the same random tensor (when `grads`).
pub fn check(
    name: &str,
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    tol: f64,
    grads: bool,
) -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let leaf = |t: &Tensor| t.clone().set_requires_grad(grads && t.dtype().is_float());
    let cpu_in: Vec<Tensor> = inputs.iter().map(leaf).collect();
    let gpu_in: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_device(dev).map(|g| leaf(&g)))
        .collect::<Result<_>>()?;
    let want = f(&cpu_in).map_err(|e| Error::Msg(format!("{name} on the CPU: {e}")))?;
    let got = f(&gpu_in).map_err(|e| Error::Msg(format!("{name} on the GPU: {e}")))?;
    if got.device() != dev {
        return Err(Error::Msg(format!("{name}: output on {:?}", got.device())));
    }
    assert_close(&format!("{name} forward"), &got, &want, tol)?;
    if !grads || !want.requires_grad() {
        return Ok(());
    }
    let seed = rand_dtype(want.dims(), 99, want.dtype());
    want.backward_with(seed.clone())?;
    got.backward_with(seed.to_device(dev)?)
        .map_err(|e| Error::Msg(format!("{name} backward on the GPU: {e}")))?;
    for (i, (c, g)) in cpu_in.iter().zip(&gpu_in).enumerate() {
        match (c.grad(), g.grad()) {
            (Some(cg), Some(gg)) => {
                assert_close(&format!("{name} grad of input {i}"), &gg, &cg, tol)?
            }
            (None, None) => {}
            (a, b) => {
                return Err(Error::Msg(format!(
                    "{name}: input {i} has a gradient on one device only (cpu {}, gpu {})",
                    a.is_some(),
                    b.is_some()
                )));
            }
        }
    }
    Ok(())
}

/// Runs every case of a family, reporting all failures together.
pub fn run(family: &str, cases: Vec<(String, Result<()>)>) {
    let failed: Vec<String> = cases
        .into_iter()
        .filter_map(|(n, r)| r.err().map(|e| format!("{n}: {e}")))
        .collect();
    assert!(
        failed.is_empty(),
        "{family}: {} case(s) failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}
