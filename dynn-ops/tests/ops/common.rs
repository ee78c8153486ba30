//! Shared helpers of the op test suite.
//!
//! Conventions every family module follows:
//!
//! - **Cases.** A family exposes `GRAD_CASES` and `ORACLE_CASES`, lists of [`Case`]: the op-table
//!   names a case covers and a function running it. `every_op_is_covered` (in `main.rs`) checks
//!   that every op in `dynn_ops::op_table()` appears in some oracle case, and every
//!   differentiable op in some gradient case. List a name only where the case really runs it
//!   (backward kernels such as `exp_backward` run when an oracle case compares gradients).
//! - **Random data.** [`randn`], [`rand_f32`], [`rand_positive`] and [`rand_dtype`] are
//!   deterministic (a splitmix64 stream per seed, no `rand` crate). Float values are uniform in
//!   ±[0.1, 1.0] with a random sign, never near zero (so `relu`, `abs`, `maximum`, `max` are
//!   differentiable at every sample and ties are rare); use [`rand_positive`] ([0.2, 2.0]) for
//!   `log`, `sqrt`, `rsqrt`, `pow`, `powf`. Integer dtypes get values in `0..4`.
//! - **Gradient checks** ([`gradcheck`], [`gradcheck_some`]) run in f64. Inputs may be
//!   non-contiguous views (transposed, narrowed): the leaf keeps the view's layout, and finite
//!   differences perturb the underlying buffer element of each view element. Inputs whose
//!   layout maps two elements to one buffer element (broadcast views) are checked on a
//!   contiguous copy; broadcast *inside* `f` instead to test the broadcast kernels' backward.
//!   The loss is `L = sum(f(x) * R)` with `R` a fixed random tensor, computed by seeding
//!   backward with `R`; numerical gradients are central differences with step [`GRAD_EPS`];
//!   an element passes when `|analytic - numeric| <= GRAD_RTOL * (1 + |numeric|)`.
//! - **Candle oracle** ([`oracle`], built on [`to_candle`], [`assert_close`], [`dynn_grad`],
//!   [`candle_grad`]): the same function is computed by dynn and by candle on the same input
//!   values, forward and the gradient of `sum(f(x) * R)`, compared with [`tol`] of the dtype
//!   under test. For f16/bf16 candle computes in f32 on the (already rounded) half-precision
//!   inputs: dynn's half results are checked against the exact function, not against a chain
//!   of candle's own half-precision roundings.
//! - Helpers return `dynn_core::Result`, with `Error::Msg` carrying the context of a mismatch;
//!   candle-side failures in [`candle_grad`] panic (they are bugs in the test itself).

#![allow(dead_code)]

use candle_core as cc;
use dynn_core::{CpuStorage, DType, Device, Error, Result, Tensor, no_grad};
use dynn_ops::grad::Backward;
use half::{bf16, f16};
use std::cmp::Ordering;

/// `!(x <= bound)`: whether `x` is out of tolerance `bound`. A NaN on either side is out of
/// tolerance (it is not `<=` anything), which the plain `x > bound` would miss.
fn exceeds(x: f64, bound: f64) -> bool {
    !matches!(
        x.partial_cmp(&bound),
        Some(Ordering::Less | Ordering::Equal)
    )
}

/// One test case: the op-table names it covers, and the function that runs it.
pub type Case = (&'static [&'static str], fn() -> dynn_core::Result<()>);

/// Runs every case, panicking with the names of the first one that fails.
pub fn run_cases(cases: &[Case]) {
    let mut failed = Vec::new();
    for (names, f) in cases {
        if let Err(e) = f() {
            failed.push(format!("case {names:?} failed: {e}"));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} cases failed:\n{}",
        failed.len(),
        cases.len(),
        failed.join("\n")
    );
}

// ----- deterministic random data -----

/// A splitmix64 stream.
pub struct Rng(u64);

impl Rng {
    /// A stream for `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in ±[0.1, 1.0].
    pub fn signed(&mut self) -> f64 {
        let m = 0.1 + 0.9 * self.uniform();
        if self.next_u64() & 1 == 1 { -m } else { m }
    }
}

fn values(n: usize, seed: u64, f: impl Fn(&mut Rng) -> f64) -> Vec<f64> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| f(&mut r)).collect()
}

fn count(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// f64 values uniform in ±[0.1, 1.0] (random sign, never near zero).
pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::from_vec(values(count(shape), seed, Rng::signed), shape, Device::Cpu).expect("randn")
}

/// f32 values uniform in ±[0.1, 1.0].
pub fn rand_f32(shape: &[usize], seed: u64) -> Tensor {
    rand_dtype(shape, seed, DType::F32)
}

/// f64 values uniform in [0.2, 2.0].
pub fn rand_positive(shape: &[usize], seed: u64) -> Tensor {
    Tensor::from_vec(
        values(count(shape), seed, |r| 0.2 + 1.8 * r.uniform()),
        shape,
        Device::Cpu,
    )
    .expect("rand_positive")
}

/// `shape` of `dtype`: floats as [`randn`] (rounded to the dtype), integers in `0..4`.
pub fn rand_dtype(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let n = count(shape);
    let v = match dtype {
        DType::I64 | DType::U32 | DType::U8 => values(n, seed, |r| (r.next_u64() % 4) as f64),
        _ => values(n, seed, Rng::signed),
    };
    from_f64(&v, shape, dtype).expect("rand_dtype")
}

/// Positive values in [0.2, 2.0] of `dtype` (floats only).
pub fn rand_positive_dtype(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    from_f64(
        &values(count(shape), seed, |r| 0.2 + 1.8 * r.uniform()),
        shape,
        dtype,
    )
    .expect("rand_positive_dtype")
}

/// A tensor of `dtype` from f64 values (rounded to the dtype).
pub fn from_f64(v: &[f64], shape: &[usize], dtype: DType) -> Result<Tensor> {
    let s = match dtype {
        DType::F64 => CpuStorage::F64(v.to_vec()),
        DType::F32 => CpuStorage::F32(v.iter().map(|&x| x as f32).collect()),
        DType::F16 => CpuStorage::F16(v.iter().map(|&x| f16::from_f64(x)).collect()),
        DType::BF16 => CpuStorage::BF16(v.iter().map(|&x| bf16::from_f64(x)).collect()),
        DType::I64 => CpuStorage::I64(v.iter().map(|&x| x as i64).collect()),
        DType::U32 => CpuStorage::U32(v.iter().map(|&x| x as u32).collect()),
        DType::U8 => CpuStorage::U8(v.iter().map(|&x| x as u8).collect()),
    };
    Tensor::from_storage(s, shape, Device::Cpu)
}

/// The tensor converted to another dtype (through f64, on the host; not an op).
pub fn to_dtype(t: &Tensor, dtype: DType) -> Result<Tensor> {
    from_f64(&t.to_f64_vec()?, t.dims(), dtype)
}

// ----- gradient checks -----

/// Finite-difference step of [`gradcheck`].
pub const GRAD_EPS: f64 = 1e-6;
/// Relative tolerance of [`gradcheck`]: `|analytic - numeric| <= GRAD_RTOL * (1 + |numeric|)`.
pub const GRAD_RTOL: f64 = 1e-5;

/// Checks the gradient of every input of `f` (all f64) against central finite differences.
pub fn gradcheck(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>) -> Result<()> {
    gradcheck_some(inputs, &vec![true; inputs.len()], f)
}

/// Like [`gradcheck`], checking only the inputs with `wants_grad[i]`; the others (index
/// tensors, constants) are passed to `f` unchanged and are not made leaves.
pub fn gradcheck_some(
    inputs: &[Tensor],
    wants_grad: &[bool],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<()> {
    if wants_grad.len() != inputs.len() {
        return Err(Error::Msg(format!(
            "gradcheck: {} inputs but {} wants_grad flags",
            inputs.len(),
            wants_grad.len()
        )));
    }
    for (i, (x, &w)) in inputs.iter().zip(wants_grad).enumerate() {
        if w && x.dtype() != DType::F64 {
            return Err(Error::Msg(format!(
                "gradcheck: input {i} is {}, gradient checks run in f64",
                x.dtype()
            )));
        }
    }
    if !wants_grad.iter().any(|&w| w) {
        return Err(Error::Msg("gradcheck: no input to check".into()));
    }
    // Analytic gradients.
    let leaves: Vec<Tensor> = inputs
        .iter()
        .zip(wants_grad)
        .map(|(x, &w)| {
            if w {
                x.detach().set_requires_grad(true)
            } else {
                x.detach()
            }
        })
        .collect();
    let y = f(&leaves)?;
    if y.dtype() != DType::F64 {
        return Err(Error::Msg(format!(
            "gradcheck: f returned {}, expected f64",
            y.dtype()
        )));
    }
    let r = randn(y.dims(), 0xC0FFEE ^ y.elem_count() as u64);
    let rv = r.to_f64_vec()?;
    if y.requires_grad() {
        y.backward_with(r.clone())?;
    } else {
        return Err(Error::Msg(
            "gradcheck: the output of f does not require grad (is f recorded on the tape?)".into(),
        ));
    }
    let loss = |xs: &[Tensor]| -> Result<f64> {
        let _g = no_grad();
        let out = f(xs)?;
        if out.dims() != y.dims() {
            return Err(Error::Msg(format!(
                "gradcheck: f's output shape changed from {} to {}",
                y.shape(),
                out.shape()
            )));
        }
        Ok(out.to_f64_vec()?.iter().zip(&rv).map(|(a, b)| a * b).sum())
    };
    let plain: Vec<Tensor> = inputs.iter().map(Tensor::detach).collect();
    for (i, x) in inputs.iter().enumerate() {
        if !wants_grad[i] {
            continue;
        }
        let analytic = match leaves[i].grad() {
            Some(g) => {
                if g.dims() != x.dims() {
                    return Err(Error::Msg(format!(
                        "gradcheck: gradient of input {i} has shape {}, input {}",
                        g.shape(),
                        x.shape()
                    )));
                }
                g.to_f64_vec()?
            }
            None => vec![0.0; x.elem_count()],
        };
        // The buffer elements behind each view element; a contiguous copy when they overlap.
        let mut idx: Vec<usize> = x.layout().indices().collect();
        let mut sorted = idx.clone();
        sorted.sort_unstable();
        sorted.dedup();
        let (data, layout) = if sorted.len() == idx.len() {
            (
                x.buffer().to_host("gradcheck")?.to_f64_vec(),
                x.layout().clone(),
            )
        } else {
            idx = (0..x.elem_count()).collect();
            (
                x.to_f64_vec()?,
                dynn_core::Layout::contiguous(x.shape().clone()),
            )
        };
        let mut xs = plain.clone();
        let mut eval = |j: usize, delta: f64| -> Result<f64> {
            let mut d = data.clone();
            d[idx[j]] += delta;
            let base = Tensor::from_vec(d, data.len(), Device::Cpu)?;
            xs[i] = Tensor::from_buffer(base.buffer().clone(), layout.clone())?;
            loss(&xs)
        };
        for (j, &a) in analytic.iter().enumerate() {
            let n = (eval(j, GRAD_EPS)? - eval(j, -GRAD_EPS)?) / (2.0 * GRAD_EPS);
            if exceeds((a - n).abs(), GRAD_RTOL * (1.0 + n.abs())) {
                return Err(Error::Msg(format!(
                    "gradcheck: input {i} (shape {}), element {j}: analytic {a:.10e} vs numeric {n:.10e} (diff {:.3e})",
                    x.shape(),
                    (a - n).abs()
                )));
            }
        }
    }
    Ok(())
}

// ----- candle interop -----

/// The same values as a candle CPU tensor of the same dtype (contiguous).
pub fn to_candle(t: &Tensor) -> cc::Tensor {
    let dev = cc::Device::Cpu;
    let dims = t.dims().to_vec();
    let r = match t.dtype() {
        DType::F32 => cc::Tensor::from_vec(t.to_vec::<f32>().expect("to_vec"), dims, &dev),
        DType::F64 => cc::Tensor::from_vec(t.to_vec::<f64>().expect("to_vec"), dims, &dev),
        DType::F16 => cc::Tensor::from_vec(t.to_vec::<f16>().expect("to_vec"), dims, &dev),
        DType::BF16 => cc::Tensor::from_vec(t.to_vec::<bf16>().expect("to_vec"), dims, &dev),
        DType::I64 => cc::Tensor::from_vec(t.to_vec::<i64>().expect("to_vec"), dims, &dev),
        DType::U32 => cc::Tensor::from_vec(t.to_vec::<u32>().expect("to_vec"), dims, &dev),
        DType::U8 => cc::Tensor::from_vec(t.to_vec::<u8>().expect("to_vec"), dims, &dev),
    };
    r.expect("to_candle")
}

/// The same values as a dynn CPU tensor of the same dtype.
pub fn from_candle(t: &cc::Tensor) -> Tensor {
    let dims = t.dims().to_vec();
    let flat = t.flatten_all().expect("flatten_all");
    let s = match t.dtype() {
        cc::DType::F32 => CpuStorage::F32(flat.to_vec1().expect("to_vec1")),
        cc::DType::F64 => CpuStorage::F64(flat.to_vec1().expect("to_vec1")),
        cc::DType::F16 => CpuStorage::F16(flat.to_vec1().expect("to_vec1")),
        cc::DType::BF16 => CpuStorage::BF16(flat.to_vec1().expect("to_vec1")),
        cc::DType::I64 => CpuStorage::I64(flat.to_vec1().expect("to_vec1")),
        cc::DType::U32 => CpuStorage::U32(flat.to_vec1().expect("to_vec1")),
        cc::DType::U8 => CpuStorage::U8(flat.to_vec1().expect("to_vec1")),
        other => panic!("from_candle: unsupported candle dtype {other:?}"),
    };
    Tensor::from_storage(s, dims, Device::Cpu).expect("from_candle")
}

/// Tolerance for comparing a result of `dtype` with a reference: f64 1e-10, f32 1e-5,
/// f16 2e-3, bf16 2e-2, integers exact.
pub fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-10,
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        DType::BF16 => 2e-2,
        DType::I64 | DType::U32 | DType::U8 => 0.0,
    }
}

/// The candle dtype matching a dynn dtype.
pub fn candle_dtype(d: DType) -> cc::DType {
    match d {
        DType::F32 => cc::DType::F32,
        DType::F64 => cc::DType::F64,
        DType::F16 => cc::DType::F16,
        DType::BF16 => cc::DType::BF16,
        DType::I64 => cc::DType::I64,
        DType::U32 => cc::DType::U32,
        DType::U8 => cc::DType::U8,
    }
}

/// Checks that `a` (dynn) and `b` (candle) have the same shape and that every element satisfies
/// `|a - b| <= tol * (1 + |b|)` (NaN only matches NaN; infinities must be equal). Dtypes may
/// differ (a half-precision result against an f32 reference).
pub fn assert_close(a: &Tensor, b: &cc::Tensor, tol: f64) -> Result<()> {
    if a.dims() != b.dims() {
        return Err(Error::Msg(format!(
            "assert_close: shape {:?} (dynn) vs {:?} (candle)",
            a.dims(),
            b.dims()
        )));
    }
    let av = a.to_f64_vec()?;
    let bv: Vec<f64> = b
        .to_dtype(cc::DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .map_err(|e| Error::Msg(format!("assert_close: candle: {e}")))?;
    let mut worst: Option<(usize, f64)> = None;
    for (i, (&x, &y)) in av.iter().zip(&bv).enumerate() {
        let excess = if x.is_nan() || y.is_nan() {
            if x.is_nan() && y.is_nan() {
                0.0
            } else {
                f64::INFINITY
            }
        } else if x.is_infinite() || y.is_infinite() {
            if x == y { 0.0 } else { f64::INFINITY }
        } else {
            (x - y).abs() / (1.0 + y.abs())
        };
        if excess > tol && worst.is_none_or(|(_, w)| excess > w) {
            worst = Some((i, excess));
        }
    }
    match worst {
        None => Ok(()),
        Some((i, e)) => Err(Error::Msg(format!(
            "assert_close: shape {:?} {} vs candle {:?}: element {i}: dynn {} vs candle {} (|a-b|/(1+|b|) = {e:.3e} > tol {tol:.1e}); {} of {} elements out of tolerance",
            a.dims(),
            a.dtype(),
            b.dtype(),
            av[i],
            bv[i],
            av.iter()
                .zip(&bv)
                .filter(|(x, y)| exceeds((*x - *y).abs(), tol * (1.0 + y.abs()))
                    && !(x.is_nan() && y.is_nan())
                    && *x != *y)
                .count(),
            av.len()
        ))),
    }
}

/// The gradients of `sum(f(x) * r)` with respect to each input, by candle's autograd. Float
/// inputs become `Var`s; an integer input is passed through and reported as f32 zeros of its
/// shape (as [`dynn_grad`] does). Panics on candle errors.
pub fn candle_grad(
    inputs: &[cc::Tensor],
    f: impl Fn(&[cc::Tensor]) -> cc::Result<cc::Tensor>,
    r: &cc::Tensor,
) -> Vec<cc::Tensor> {
    let is_float = |t: &cc::Tensor| t.dtype().is_float();
    let vars: Vec<cc::Tensor> = inputs
        .iter()
        .map(|t| {
            if is_float(t) {
                cc::Var::from_tensor(t).expect("Var").as_tensor().clone()
            } else {
                t.clone()
            }
        })
        .collect();
    let y = f(&vars).expect("candle forward");
    let loss = y.mul(r).and_then(|p| p.sum_all()).expect("candle loss");
    let grads = loss.backward().expect("candle backward");
    vars.iter()
        .map(|v| {
            if !is_float(v) {
                return cc::Tensor::zeros(v.dims(), cc::DType::F32, &cc::Device::Cpu)
                    .expect("zeros");
            }
            match grads.get(v) {
                Some(g) => g.clone(),
                None => v.zeros_like().expect("zeros_like"),
            }
        })
        .collect()
}

/// The gradients of `sum(f(x) * r)` with respect to each input, by dynn's autograd (backward
/// seeded with `r`). Float inputs become leaves with their own layout (views stay views); an
/// integer input is passed through and reported as f32 zeros of its shape; a float leaf that
/// backward does not reach gets zeros.
pub fn dynn_grad(
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    r: &Tensor,
) -> Result<Vec<Tensor>> {
    let leaves: Vec<Tensor> = inputs
        .iter()
        .map(|t| {
            if t.dtype().is_float() {
                t.detach().set_requires_grad(true)
            } else {
                t.detach()
            }
        })
        .collect();
    let y = f(&leaves)?;
    if y.requires_grad() {
        y.backward_with(r.clone())?;
    }
    leaves
        .iter()
        .map(|l| {
            if !l.dtype().is_float() {
                return Tensor::zeros(l.shape(), DType::F32, Device::Cpu);
            }
            match l.grad() {
                Some(g) => Ok(g),
                None => l.zeros_like(),
            }
        })
        .collect()
}

/// The candle reference for inputs of a dtype under test: half-precision inputs are widened
/// to f32 (same values), others kept.
pub fn reference_input(t: &Tensor) -> cc::Tensor {
    let c = to_candle(t);
    match t.dtype() {
        DType::F16 | DType::BF16 => c.to_dtype(cc::DType::F32).expect("to_dtype"),
        _ => c,
    }
}

/// The candle-oracle check: runs `f` (dynn) and `cf` (candle) on the same input values and
/// compares the forward result with tolerance `tol`, then (when the output is a float) the
/// gradient of `sum(f(x) * R)` of every float input, `R` random of the output's shape and dtype.
/// Inputs may be views; candle gets contiguous copies. See the module doc for half precision.
pub fn oracle(
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    cf: impl Fn(&[cc::Tensor]) -> cc::Result<cc::Tensor>,
    tol: f64,
) -> Result<()> {
    let cin: Vec<cc::Tensor> = inputs.iter().map(reference_input).collect();
    let y = {
        let _g = no_grad();
        f(inputs)?
    };
    let cy = cf(&cin).map_err(|e| Error::Msg(format!("candle forward: {e}")))?;
    assert_close(&y, &cy, tol).map_err(|e| Error::Msg(format!("forward: {e}")))?;
    if !y.dtype().is_float() || !inputs.iter().any(|t| t.dtype().is_float()) {
        return Ok(());
    }
    let r = rand_dtype(y.dims(), 0xBADC0DE ^ y.elem_count() as u64, y.dtype());
    let cr = reference_input(&r)
        .to_dtype(cy.dtype())
        .map_err(|e| Error::Msg(format!("candle: {e}")))?;
    let dg = dynn_grad(inputs, &f, &r)?;
    let cg = candle_grad(&cin, &cf, &cr);
    for (i, (d, c)) in dg.iter().zip(&cg).enumerate() {
        if !inputs[i].dtype().is_float() {
            continue;
        }
        assert_close(d, c, tol).map_err(|e| Error::Msg(format!("gradient of input {i}: {e}")))?;
    }
    Ok(())
}

/// Wraps a candle error as a dynn error (for `?` inside cases).
pub fn ce<T>(r: cc::Result<T>) -> Result<T> {
    r.map_err(|e| Error::Msg(format!("candle: {e}")))
}

/// Adds context to an error (`check(...).ctx("transposed input")?`).
pub trait Ctx<T> {
    /// The error, prefixed with `what`.
    fn ctx(self, what: impl std::fmt::Display) -> Result<T>;
}

impl<T> Ctx<T> for Result<T> {
    fn ctx(self, what: impl std::fmt::Display) -> Result<T> {
        self.map_err(|e| Error::Msg(format!("{what}: {e}")))
    }
}

/// The harness itself must be able to fail: wrong gradients, wrong values and wrong shapes are
/// caught, on contiguous and strided inputs.
mod self_tests {
    use super::*;
    use dynn_core::smallvec::smallvec;
    use dynn_core::{
        BackwardCtx, Idioms, InputGrads, KernelArg, Op, Outputs, Specs, TensorSpec, execute1,
    };
    use dynn_ops::prelude::*;

    /// y = 2x, with a backward that returns `factor * grad`: right for 2, wrong otherwise.
    struct Double {
        factor: f64,
    }

    impl Op for Double {
        fn name(&self) -> &'static str {
            "test_double"
        }
        fn idioms(&self) -> Idioms {
            Idioms::MAP
        }
        fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
            Ok(smallvec![TensorSpec::new(
                inputs[0].shape().clone(),
                inputs[0].dtype()
            )])
        }
        fn forward(&self, inputs: &[KernelArg<'_>], _: &[TensorSpec]) -> Result<Outputs> {
            let v = inputs[0]
                .cpu("test_double")?
                .as_slice::<f64>("test_double")?;
            let out: Vec<f64> = inputs[0].layout.indices().map(|i| 2.0 * v[i]).collect();
            Ok(dynn_ops::cpu::one(CpuStorage::F64(out)))
        }
        fn backward(&self, ctx: &BackwardCtx<'_>) -> Result<InputGrads> {
            Ok(smallvec![Some(ctx.grad(0)?.scale(self.factor)?)])
        }
    }

    fn double(x: &Tensor, factor: f64) -> Result<Tensor> {
        execute1(Double { factor }, &[x])
    }

    #[test]
    fn gradcheck_accepts_a_right_gradient_and_catches_a_wrong_one() {
        let x = randn(&[3, 4], 1);
        gradcheck(std::slice::from_ref(&x), |v| double(&v[0], 2.0)).unwrap();
        gradcheck(&[x.t().unwrap()], |v| double(&v[0], 2.0)).unwrap();
        let e = gradcheck(std::slice::from_ref(&x), |v| double(&v[0], 2.0 + 1e-3))
            .unwrap_err()
            .to_string();
        assert!(e.contains("input 0") && e.contains("element 0"), "{e}");
        let e = gradcheck(&[x.narrow(1, 1, 2).unwrap()], |v| double(&v[0], -2.0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("input 0"), "{e}");
        // Only the checked inputs are checked.
        let y = randn(&[3, 4], 2);
        let f = |v: &[Tensor]| double(&v[0], 2.0)?.add(&double(&v[1], 1.0)?);
        gradcheck_some(&[x.clone(), y.clone()], &[true, false], f).unwrap();
        let e = gradcheck(&[x, y], f).unwrap_err().to_string();
        assert!(e.contains("input 1"), "{e}");
    }

    #[test]
    fn gradcheck_refuses_non_f64_inputs() {
        assert!(gradcheck(&[rand_f32(&[2], 1)], |v| v[0].exp()).is_err());
    }

    #[test]
    fn oracle_catches_wrong_values_and_gradients() {
        let x = rand_f32(&[2, 3], 1);
        oracle(
            std::slice::from_ref(&x),
            |v| v[0].exp(),
            |v| v[0].exp(),
            tol(DType::F32),
        )
        .unwrap();
        let e = oracle(
            std::slice::from_ref(&x),
            |v| v[0].exp(),
            |v| v[0].exp()? * (1.0 + 1e-4),
            tol(DType::F32),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("forward"), "{e}");
        // Same values, no gradient on the candle side.
        let e = oracle(
            std::slice::from_ref(&x),
            |v| v[0].sqr(),
            |v| v[0].detach().sqr(),
            tol(DType::F32),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("gradient of input 0"), "{e}");
        let e = oracle(&[x], |v| v[0].t(), |v| Ok(v[0].clone()), tol(DType::F32))
            .unwrap_err()
            .to_string();
        assert!(e.contains("shape"), "{e}");
    }

    #[test]
    fn assert_close_measures_relative_error() {
        let a = from_f64(&[1.0, 100.0, f64::NAN], &[3], DType::F64).unwrap();
        let ok = candle_core::Tensor::new(
            &[1.0 + 1e-6, 100.0 + 1e-4, f64::NAN],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert_close(&a, &ok, 1e-5).unwrap();
        let bad =
            candle_core::Tensor::new(&[1.0, 100.1, f64::NAN], &candle_core::Device::Cpu).unwrap();
        assert!(
            assert_close(&a, &bad, 1e-5)
                .unwrap_err()
                .to_string()
                .contains("element 1")
        );
        let nan = candle_core::Tensor::new(&[1.0, 100.0, 0.0], &candle_core::Device::Cpu).unwrap();
        assert!(assert_close(&a, &nan, 1e-5).is_err());
    }

    #[test]
    fn random_data_is_deterministic_and_in_range() {
        let a = randn(&[1000], 7).to_vec::<f64>().unwrap();
        assert_eq!(a, randn(&[1000], 7).to_vec::<f64>().unwrap());
        assert_ne!(a, randn(&[1000], 8).to_vec::<f64>().unwrap());
        assert!(a.iter().all(|v| (0.1..=1.0).contains(&v.abs())));
        assert!(a.iter().any(|&v| v < 0.0) && a.iter().any(|&v| v > 0.0));
        let p = rand_positive(&[1000], 7).to_vec::<f64>().unwrap();
        assert!(p.iter().all(|v| (0.2..=2.0).contains(v)));
        let h = rand_dtype(&[10], 3, DType::BF16);
        assert_eq!(h.dtype(), DType::BF16);
        let i = rand_dtype(&[100], 3, DType::I64).to_vec::<i64>().unwrap();
        assert!(i.iter().all(|v| (0..4).contains(v)));
        assert_eq!(rand_f32(&[2, 3], 1).dtype(), DType::F32);
    }

    #[test]
    fn candle_round_trip_keeps_dtype_and_values() {
        for d in [
            DType::F32,
            DType::F64,
            DType::F16,
            DType::BF16,
            DType::I64,
            DType::U32,
        ] {
            let x = rand_dtype(&[2, 3], 5, d).t().unwrap();
            let c = to_candle(&x);
            assert_eq!(c.dtype(), candle_dtype(d));
            let back = from_candle(&c);
            assert_eq!(back.dtype(), d);
            assert_eq!(back.dims(), &[3, 2]);
            assert_eq!(back.to_f64_vec().unwrap(), x.to_f64_vec().unwrap());
        }
    }
}

/// `a` and `b` have the same shape and hold the same values, bit for bit (every dtype widens
/// exactly to f64).
pub fn assert_bits(a: &Tensor, b: &Tensor) -> Result<()> {
    let (va, vb) = (a.to_f64_vec()?, b.to_f64_vec()?);
    if a.dims() != b.dims()
        || va
            .iter()
            .map(|x| x.to_bits())
            .ne(vb.iter().map(|x| x.to_bits()))
    {
        return Err(Error::Msg(format!(
            "{} {:?} differs from {} {:?}",
            a.shape(),
            a.dtype(),
            b.shape(),
            b.dtype()
        )));
    }
    Ok(())
}
