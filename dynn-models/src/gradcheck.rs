//! Finite-difference gradient checks for whole models, the equivalent of
//! `torch.autograd.gradcheck`: the gradient backward computes for each parameter is compared
//! with central differences of the loss.
//!
//! ```
//! # use dynn_models::gradcheck::GradCheck;
//! # use dynn_models::nn::{Forward, Linear, Module, ParamBuilder};
//! # use dynn_ops::prelude::*;
//! # fn main() -> Result<()> {
//! let b = ParamBuilder::new(DType::F64, Device::Cpu, 0);
//! let lin = Linear::new(&b, 3, 2)?;
//! let x = rand_normal((4, 3), 0.0, 1.0, DType::F64, 1, Device::Cpu)?;
//! let report = GradCheck::default().check(&lin.params(), || lin.forward(&x)?.sqr()?.sum_all())?;
//! assert!(report.checked > 0);
//! # Ok(())
//! # }
//! ```

use crate::nn::Param;
use dynn_core::{DType, Error, Result, Tensor};
use dynn_ops::prelude::*;

/// Settings of a gradient check. An element passes when
/// `|analytic - numeric| <= atol + rtol·|numeric|`.
#[derive(Clone, Debug, PartialEq)]
pub struct GradCheck {
    /// The finite-difference step (default 1e-6).
    pub eps: f64,
    /// Relative tolerance (default 1e-4).
    pub rtol: f64,
    /// Absolute tolerance (default 1e-6).
    pub atol: f64,
    /// At most this many elements of each parameter are perturbed (default 16), spread evenly
    /// over the flattened tensor (first and last included); all of them when it has fewer.
    pub max_elems_per_param: usize,
}

impl Default for GradCheck {
    fn default() -> Self {
        GradCheck {
            eps: 1e-6,
            rtol: 1e-4,
            atol: 1e-6,
            max_elems_per_param: 16,
        }
    }
}

/// What a passing check saw.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GradReport {
    /// Elements compared.
    pub checked: usize,
    /// The largest `|analytic - numeric|`.
    pub max_abs_err: f64,
    /// The element with that error, as `path[i, j]`.
    pub worst: Option<String>,
}

/// The flat indices to check in a tensor of `n` elements: all of them, or `k` spread evenly.
fn sample(n: usize, k: usize) -> Vec<usize> {
    if n <= k {
        return (0..n).collect();
    }
    match k {
        0 => Vec::new(),
        1 => vec![n / 2],
        _ => {
            let mut v: Vec<usize> = (0..k).map(|j| j * (n - 1) / (k - 1)).collect();
            v.dedup();
            v
        }
    }
}

/// `path[i, j, ...]` for flat index `flat` of a tensor with `dims`.
fn element_name(path: &str, dims: &[usize], mut flat: usize) -> String {
    let mut idx = vec![0; dims.len()];
    for (d, &n) in dims.iter().enumerate().rev() {
        if n > 0 {
            idx[d] = flat % n;
            flat /= n;
        }
    }
    let idx: Vec<String> = idx.iter().map(usize::to_string).collect();
    format!("{path}[{}]", idx.join(", "))
}

/// Evaluates `loss` as an f64 scalar.
fn scalar(loss: &impl Fn() -> Result<Tensor>) -> Result<f64> {
    let l = loss()?;
    if l.elem_count() != 1 {
        return Err(Error::invalid(
            "gradcheck",
            format!("the loss must be a scalar, got shape {}", l.shape()),
        ));
    }
    l.to_scalar_f64()
}

impl GradCheck {
    /// Checks the gradient of `loss` with respect to every parameter in `params`.
    ///
    /// Every parameter must be an F64 leaf that requires grad. The grads are zeroed, `loss()`
    /// is evaluated and differentiated once (a parameter the loss does not reach has gradient
    /// zero); then each sampled element is set to `x ± eps` in place (off the tape), the loss
    /// re-evaluated, and the element restored bit for bit (also when `loss` fails). `loss`
    /// must be deterministic: put dropout in evaluation mode. The grads are zeroed again at
    /// the end.
    ///
    /// Returns [`Error::Msg`] naming the parameter, element, analytic and numeric values at the
    /// first element out of tolerance.
    pub fn check(&self, params: &[Param], loss: impl Fn() -> Result<Tensor>) -> Result<GradReport> {
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return Err(Error::invalid(
                "gradcheck",
                format!("eps must be positive and finite, got {}", self.eps),
            ));
        }
        for p in params {
            if p.dtype() != DType::F64 {
                return Err(Error::invalid(
                    "gradcheck",
                    format!(
                        "parameter {} is {:?}; finite differences need F64 parameters (build the model with DType::F64)",
                        p.path(),
                        p.dtype()
                    ),
                ));
            }
            if !p.requires_grad() || !p.is_leaf() {
                return Err(Error::invalid(
                    "gradcheck",
                    format!("parameter {} is not a leaf that requires grad", p.path()),
                ));
            }
        }
        let analytic = self.analytic(params, &loss)?;
        let mut report = GradReport::default();
        let _g = no_grad();
        for (p, grad) in params.iter().zip(&analytic) {
            let orig = p.to_vec::<f64>()?;
            for i in sample(orig.len(), self.max_elems_per_param) {
                let numeric = self.numeric(p, &orig, i, &loss);
                let restored = Tensor::from_vec(orig.clone(), p.shape(), p.device())
                    .and_then(|t| p.assign_(&t));
                let numeric = numeric?;
                restored?;
                let (a, err) = (grad[i], (grad[i] - numeric).abs());
                let name = || element_name(p.path(), p.dims(), i);
                // NaN in either value fails too.
                let within = err <= self.atol + self.rtol * numeric.abs();
                if !within {
                    return Err(Error::Msg(format!(
                        "gradcheck: {}: analytic gradient {a:e} vs numeric {numeric:e} (|diff| {err:e} > atol {:e} + rtol {:e} · |numeric|)",
                        name(),
                        self.atol,
                        self.rtol
                    )));
                }
                report.checked += 1;
                if report.worst.is_none() || err > report.max_abs_err {
                    report.max_abs_err = err;
                    report.worst = Some(name());
                }
            }
        }
        params.iter().for_each(|p| p.zero_grad());
        Ok(report)
    }

    /// Backward's gradient of every parameter, flattened (zeros where it was not reached).
    fn analytic(
        &self,
        params: &[Param],
        loss: &impl Fn() -> Result<Tensor>,
    ) -> Result<Vec<Vec<f64>>> {
        params.iter().for_each(|p| p.zero_grad());
        let l = loss()?;
        if l.elem_count() != 1 {
            return Err(Error::invalid(
                "gradcheck",
                format!("the loss must be a scalar, got shape {}", l.shape()),
            ));
        }
        if l.requires_grad() {
            l.backward()?;
        }
        params
            .iter()
            .map(|p| match p.grad() {
                Some(g) => g.to_f64_vec(),
                None => Ok(vec![0.0; p.elem_count()]),
            })
            .collect()
    }

    /// The central difference of `loss` in element `i` of `p` (whose values are `orig`); leaves
    /// `p` perturbed (the caller restores it).
    fn numeric(
        &self,
        p: &Param,
        orig: &[f64],
        i: usize,
        loss: &impl Fn() -> Result<Tensor>,
    ) -> Result<f64> {
        let at = |v: f64| -> Result<f64> {
            let mut vals = orig.to_vec();
            vals[i] = v;
            p.assign_(&Tensor::from_vec(vals, p.shape(), p.device())?)?;
            scalar(loss)
        };
        let (hi, lo) = (orig[i] + self.eps, orig[i] - self.eps);
        let (fp, fm) = (at(hi)?, at(lo)?);
        Ok((fp - fm) / (hi - lo))
    }
}
