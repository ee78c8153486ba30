//! The updates of the pair representation: the outer-product mean (MSA → pair) and the
//! triangle multiplicative updates (pair → pair).

use super::chunk::{map_chunks, rows_per_chunk};
use crate::nn::{Forward, LayerNorm, Linear, Module, Param, ParamBuilder};
use dynn_core::{Error, Result, Tensor};
use dynn_ops::prelude::*;

/// AlphaFold's outer-product mean: `z_ij += W · mean_s (a_si ⊗ b_sj)` with `a`, `b` linear
/// projections of the layer-normed MSA. Co-varying columns `i`, `j` give large entries here.
#[derive(Clone, Debug)]
pub struct OuterProductMean {
    /// Layer norm of the MSA.
    pub norm: LayerNorm,
    /// Left projection `msa_dim → hidden`.
    pub a: Linear,
    /// Right projection `msa_dim → hidden`.
    pub b: Linear,
    /// `hidden² → pair_dim`.
    pub out: Linear,
    /// Channels of each projection.
    pub hidden: usize,
    /// The most bytes one chunk's outer product may take (`None`: one chunk).
    pub chunk_bytes: Option<usize>,
}

impl OuterProductMean {
    /// An outer-product mean from `msa_dim` to `pair_dim` through `hidden` channels.
    pub fn new(b: &ParamBuilder, msa_dim: usize, pair_dim: usize, hidden: usize) -> Result<Self> {
        Ok(OuterProductMean {
            norm: LayerNorm::new(&b.pp("norm"), msa_dim)?,
            a: Linear::new(&b.pp("a"), msa_dim, hidden)?,
            b: Linear::new(&b.pp("b"), msa_dim, hidden)?,
            out: Linear::new(&b.pp("out"), hidden * hidden, pair_dim)?,
            hidden,
            chunk_bytes: None,
        })
    }

    /// The same layer computing its outer product in chunks of residue rows of at most
    /// `chunk_bytes` each (`None`: one chunk).
    pub fn chunked(mut self, chunk_bytes: Option<usize>) -> Self {
        self.chunk_bytes = chunk_bytes;
        self
    }

    /// The pair update `(batch, len, len, pair_dim)` from `m` of shape
    /// `(batch, depth, len, msa_dim)`.
    pub fn forward(&self, m: &Tensor) -> Result<Tensor> {
        self.update(m, None)
    }

    /// `z` plus the pair update from `m` (`z + forward(m)`, the same bits), the residual
    /// added by the output projection itself (one op the memory manager can recompute).
    pub fn forward_residual(&self, m: &Tensor, z: &Tensor) -> Result<Tensor> {
        self.update(m, Some(z))
    }

    /// The update, added to `z` by the output projection when given.
    fn update(&self, m: &Tensor, z: Option<&Tensor>) -> Result<Tensor> {
        let &[bs, s, l, _] = m.dims() else {
            return Err(Error::invalid(
                "OuterProductMean",
                format!("expected (batch, depth, len, dim), got {}", m.shape()),
            ));
        };
        let c = self.hidden;
        let mn = self.norm.forward(m)?;
        let a = self.a.forward(&mn)?;
        let bm = self.b.forward(&mn)?.reshape((bs, s, l * c))?;
        // One residue row of the outer product: (batch, c, len·c) elements.
        let row_bytes = bs * c * l * c * m.dtype().size_in_bytes();
        let rows = rows_per_chunk(self.chunk_bytes, row_bytes, l);
        map_chunks(l, rows, 1, |i0, r| {
            // (b, r·c, s) @ (b, s, l·c): every (i, p, j, q) product of rows i0..i0+r summed
            // over the sequences.
            let ar = a
                .narrow(2, i0, r)?
                .permute(&[0, 2, 3, 1])?
                .reshape((bs, r * c, s))?;
            let outer = ar
                .matmul(&bm)?
                .scale(1.0 / s as f64)?
                .reshape(vec![bs, r, c, l, c])?
                .permute(&[0, 1, 3, 2, 4])?
                .reshape((bs, r, l, c * c))?;
            match z {
                Some(z) => self.out.forward_residual(&outer, &z.narrow(1, i0, r)?),
                None => self.out.forward(&outer),
            }
        })
    }
}

impl Module for OuterProductMean {
    fn visit_params(&self, f: &mut dyn FnMut(&Param)) {
        self.norm.visit_params(f);
        self.a.visit_params(f);
        self.b.visit_params(f);
        self.out.visit_params(f);
    }
}

/// Which edges of the triangle `(i, j, k)` a multiplicative update combines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Triangle {
    /// `z_ij += Σ_k a_ik ⊙ b_jk` (edges leaving `i` and `j`).
    Outgoing,
    /// `z_ij += Σ_k a_ki ⊙ b_kj` (edges entering `i` and `j`).
    Incoming,
}

/// AlphaFold's triangle multiplicative update: gated projections `a`, `b` of the layer-normed
/// pair representation multiplied along the third residue of each triangle, layer-normed,
/// projected back and gated.
#[derive(Clone, Debug)]
pub struct TriangleMultiplication {
    /// Which edges it combines.
    pub kind: Triangle,
    /// Input layer norm.
    pub norm: LayerNorm,
    /// `a`'s projection `pair_dim → hidden`.
    pub a: Linear,
    /// `a`'s gate (sigmoid applied).
    pub a_gate: Linear,
    /// `b`'s projection.
    pub b: Linear,
    /// `b`'s gate.
    pub b_gate: Linear,
    /// The output gate `pair_dim → pair_dim`.
    pub gate: Linear,
    /// Layer norm of the product.
    pub out_norm: LayerNorm,
    /// `hidden → pair_dim`.
    pub out: Linear,
    /// Channels of `a` and `b`.
    pub hidden: usize,
}

impl TriangleMultiplication {
    /// An update of `kind` on a pair representation of width `pair_dim` through `hidden`
    /// channels.
    pub fn new(b: &ParamBuilder, kind: Triangle, pair_dim: usize, hidden: usize) -> Result<Self> {
        Ok(TriangleMultiplication {
            kind,
            norm: LayerNorm::new(&b.pp("norm"), pair_dim)?,
            a: Linear::new(&b.pp("a"), pair_dim, hidden)?,
            a_gate: Linear::new(&b.pp("a_gate"), pair_dim, hidden)?,
            b: Linear::new(&b.pp("b"), pair_dim, hidden)?,
            b_gate: Linear::new(&b.pp("b_gate"), pair_dim, hidden)?,
            gate: Linear::new(&b.pp("gate"), pair_dim, pair_dim)?,
            out_norm: LayerNorm::new(&b.pp("out_norm"), hidden)?,
            out: Linear::new(&b.pp("out"), hidden, pair_dim)?,
            hidden,
        })
    }

    /// The update for `z` of shape `(batch, len, len, pair_dim)`.
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let (upd, gate) = self.update_and_gate(z)?;
        upd.mul(&gate)
    }

    /// `z` plus its update (`z + forward(z)`, the same bits), as one `addcmul` the memory
    /// manager can drop and compute again.
    pub fn forward_residual(&self, z: &Tensor) -> Result<Tensor> {
        let (upd, gate) = self.update_and_gate(z)?;
        z.addcmul(&upd, &gate)
    }

    /// The ungated update and its output gate.
    fn update_and_gate(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        if z.rank() != 4 {
            return Err(Error::invalid(
                "TriangleMultiplication",
                format!("expected (batch, len, len, dim), got {}", z.shape()),
            ));
        }
        let zn = self.norm.forward(z)?;
        let gated = |p: &Linear, g: &Linear| {
            p.forward(&zn)?
                .mul(&g.forward_act(&zn, Activation::Sigmoid)?)
        };
        let a = gated(&self.a, &self.a_gate)?;
        let b = gated(&self.b, &self.b_gate)?;
        // Channels first, so the sum over k is a batched matrix product per channel.
        let prod = match self.kind {
            // (b, c, i, k) @ (b, c, k, j)
            Triangle::Outgoing => a
                .permute(&[0, 3, 1, 2])?
                .matmul(&b.permute(&[0, 3, 2, 1])?)?,
            Triangle::Incoming => a
                .permute(&[0, 3, 2, 1])?
                .matmul(&b.permute(&[0, 3, 1, 2])?)?,
        };
        let prod = prod.permute(&[0, 2, 3, 1])?;
        let upd = self.out.forward(&self.out_norm.forward(&prod)?)?;
        Ok((upd, self.gate.forward_act(&zn, Activation::Sigmoid)?))
    }
}

impl Module for TriangleMultiplication {
    fn visit_params(&self, f: &mut dyn FnMut(&Param)) {
        self.norm.visit_params(f);
        self.a.visit_params(f);
        self.a_gate.visit_params(f);
        self.b.visit_params(f);
        self.b_gate.visit_params(f);
        self.gate.visit_params(f);
        self.out_norm.visit_params(f);
        self.out.visit_params(f);
    }
}
