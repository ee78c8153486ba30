//! The Mixture-of-Experts feed-forward layer: a linear router, top-k routing with capacity,
//! and one MLP per expert that runs only on the tokens routed to it.

use super::router::{Routing, route};
use crate::nn::{Forward, Linear, Mlp, Module, Param, ParamBuilder};
use dynn_core::{Error, Result, Tensor};
use dynn_ops::prelude::*;

/// A Mixture-of-Experts feed-forward: `y = Σ_{e ∈ topk(x)} p_e(x) · expert_e(x)` over the
/// experts a token was routed to and accepted by (capacity), `0` for a dropped token.
///
/// Parameters: `router.weight` `(dim, experts)` and `experts.<i>.fc1`/`fc2` (a GELU [`Mlp`]
/// each). An expert that receives no token runs no op, so its parameters get no gradient.
#[derive(Clone, Debug)]
pub struct MoeLayer {
    /// The router `dim → experts` (no bias).
    pub router: Linear,
    /// The experts.
    pub experts: Vec<Mlp>,
    /// Experts per token (1 or 2).
    pub top_k: usize,
    /// Capacity per expert = `ceil(capacity_factor · tokens · top_k / experts)`.
    pub capacity_factor: f64,
}

/// What one MoE layer computed for one batch of tokens.
#[derive(Clone, Debug)]
pub struct MoeLayerOut {
    /// The layer's output `(tokens, dim)` (without the residual).
    pub y: Tensor,
    /// The Switch load-balancing loss `experts · Σ_i f_i · P_i` (a scalar).
    pub aux: Tensor,
    /// The routing decision.
    pub routing: Routing,
}

impl MoeLayer {
    /// A layer of width `dim` with `experts` experts of hidden width `hidden`, under `b`
    /// (`router`, `experts.<i>`).
    pub fn new(
        b: &ParamBuilder,
        dim: usize,
        experts: usize,
        hidden: usize,
        top_k: usize,
        capacity_factor: f64,
    ) -> Result<Self> {
        if experts == 0 || top_k == 0 || top_k > experts.min(2) {
            return Err(Error::invalid(
                "MoeLayer::new",
                format!("top_k {top_k} must be 1 or 2 and at most experts {experts}"),
            ));
        }
        if !(capacity_factor.is_finite() && capacity_factor > 0.0) {
            return Err(Error::invalid(
                "MoeLayer::new",
                format!("capacity_factor must be positive and finite, got {capacity_factor}"),
            ));
        }
        let eb = b.pp("experts");
        Ok(MoeLayer {
            router: Linear::no_bias(&b.pp("router"), dim, experts)?,
            experts: (0..experts)
                .map(|i| Mlp::new(&eb.pp(i), dim, hidden))
                .collect::<Result<_>>()?,
            top_k,
            capacity_factor,
        })
    }

    /// The number of experts.
    pub fn num_experts(&self) -> usize {
        self.experts.len()
    }

    /// The model width.
    pub fn dim(&self) -> usize {
        self.router.in_dim()
    }

    /// Expert capacity for `tokens` tokens.
    pub fn capacity(&self, tokens: usize) -> usize {
        let c = self.capacity_factor * (tokens * self.top_k) as f64 / self.num_experts() as f64;
        (c.ceil() as usize).max(1)
    }

    /// Routes and runs the tokens `x` `(tokens, dim)`. Reads the router probabilities to the
    /// host once; then, for each expert with tokens, gathers them (`index_select`), runs the
    /// expert, and the gate-scaled outputs of all experts are scattered back with one
    /// `index_add`.
    pub fn forward(&self, x: &Tensor) -> Result<MoeLayerOut> {
        let (n, d) = match *x.dims() {
            [n, d] if d == self.dim() && n > 0 => (n, d),
            _ => {
                return Err(Error::invalid(
                    "MoeLayer::forward",
                    format!(
                        "expected (tokens > 0, {}), got shape {}",
                        self.dim(),
                        x.shape()
                    ),
                ));
            }
        };
        let e = self.num_experts();
        let dev = x.device();
        let probs = self.router.forward(x)?.softmax(-1)?;
        let host = {
            let _g = no_grad();
            probs.to_f64_vec()?
        };
        let routing = route(&host, n, e, self.top_k, self.capacity(n))?;

        let mut outs = Vec::new();
        let mut ids_all: Vec<u32> = Vec::new();
        let mut gate_idx: Vec<u32> = Vec::new();
        for (ei, toks) in routing.tokens.iter().enumerate() {
            if toks.is_empty() {
                continue;
            }
            let ids = Tensor::from_vec(toks.clone(), toks.len(), dev)?;
            outs.push(self.experts[ei].forward(&x.index_select(0, &ids)?)?);
            ids_all.extend_from_slice(toks);
            // `route` checked that tokens · experts fits u32.
            gate_idx.extend(toks.iter().map(|&t| t * e as u32 + ei as u32));
        }
        let zeros = Tensor::zeros((n, d), x.dtype(), dev)?;
        let y = if outs.is_empty() {
            zeros
        } else {
            let m = ids_all.len();
            let refs: Vec<&Tensor> = outs.iter().collect();
            let gates = probs
                .reshape(n * e)?
                .index_select(0, &Tensor::from_vec(gate_idx, m, dev)?)?
                .reshape((m, 1))?;
            let scaled = cat(&refs, 0)?.mul(&gates)?;
            zeros.index_add(0, &Tensor::from_vec(ids_all, m, dev)?, &scaled)?
        };
        let f = Tensor::from_vec(routing.fraction.clone(), e, dev)?.to_dtype(x.dtype())?;
        let aux = probs
            .mean_dims(&[0], false)?
            .mul(&f)?
            .sum_all()?
            .scale(e as f64)?;
        Ok(MoeLayerOut { y, aux, routing })
    }
}

impl Module for MoeLayer {
    fn visit_params(&self, f: &mut dyn FnMut(&Param)) {
        self.router.visit_params(f);
        self.experts.visit_params(f);
    }
}
