//! A synthetic protein-structure task for the Evoformer-lite: from a multiple sequence
//! alignment (MSA), predict the distogram (binned pairwise residue distances).
//!
//! Each sample hides a compact 3-D chain (a self-avoiding lattice walk with 3.8 Å steps,
//! jittered). Sequence separation alone predicts part of the distances; the rest is in the
//! MSA: residue pairs in contact co-vary (when one mutates, its partner mutates to a fixed
//! complementary residue, the signal an outer-product mean picks up) and buried positions
//! mutate less. Distance bins are quantiles of reference chains, so they are about balanced.

mod fold;
mod msa;

pub use fold::{STEP, bin_edges};

use dynn_core::{Device, Error, Result, Tensor};

use crate::rng::Rng;

/// The number of amino-acid tokens (ids `0..AMINO`).
pub const AMINO: usize = 20;
/// The gap token of the MSA.
pub const GAP: u32 = 20;
/// The MSA vocabulary: 20 amino acids and the gap.
pub const MSA_VOCAB: usize = 21;

/// The size of the task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProteinConfig {
    /// Residues per chain.
    pub len: usize,
    /// Sequences per MSA (the first is the native one).
    pub msa_depth: usize,
    /// Distogram bins.
    pub bins: usize,
}

impl Default for ProteinConfig {
    fn default() -> Self {
        ProteinConfig {
            len: 24,
            msa_depth: 8,
            bins: 8,
        }
    }
}

/// One chain: its MSA and its distogram labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProteinSample {
    /// `msa_depth * len` tokens in `0..MSA_VOCAB`, row-major; row 0 is the native sequence.
    pub msa: Vec<u32>,
    /// `len * len` distance bins in `0..bins`, row-major and symmetric; the diagonal is 0.
    pub distogram: Vec<u32>,
}

fn sample_with(rng: &mut Rng, cfg: &ProteinConfig, edges: &[f64]) -> ProteinSample {
    let f = fold::fold(rng, cfg.len);
    let msa = msa::alignment(rng, &f, cfg.msa_depth);
    let distogram = f
        .distances()
        .into_iter()
        .map(|d| fold::bin_of(d, edges))
        .collect();
    ProteinSample { msa, distogram }
}

/// One random sample. Degenerate sizes give degenerate (empty or all-zero) samples rather
/// than errors; [`batch`] checks them.
pub fn sample(rng: &mut Rng, cfg: &ProteinConfig) -> ProteinSample {
    sample_with(rng, cfg, &bin_edges(cfg.len, cfg.bins))
}

/// `n` samples as tensors on `device`: the MSAs `(n, msa_depth, len)` and the distograms
/// `(n, len, len)`, both U32. An error unless `n >= 1`, `len >= 2`, `msa_depth >= 1` and
/// `bins >= 2`.
pub fn batch(
    rng: &mut Rng,
    cfg: &ProteinConfig,
    n: usize,
    device: Device,
) -> Result<(Tensor, Tensor)> {
    if n == 0 || cfg.len < 2 || cfg.msa_depth == 0 || cfg.bins < 2 {
        return Err(Error::invalid(
            "protein::batch",
            format!("need n >= 1, len >= 2, msa_depth >= 1, bins >= 2; got n = {n}, {cfg:?}"),
        ));
    }
    let edges = bin_edges(cfg.len, cfg.bins);
    let mut msa = Vec::with_capacity(n * cfg.msa_depth * cfg.len);
    let mut dist = Vec::with_capacity(n * cfg.len * cfg.len);
    for _ in 0..n {
        let s = sample_with(rng, cfg, &edges);
        msa.extend_from_slice(&s.msa);
        dist.extend_from_slice(&s.distogram);
    }
    Ok((
        Tensor::from_vec(msa, (n, cfg.msa_depth, cfg.len), device)?,
        Tensor::from_vec(dist, (n, cfg.len, cfg.len), device)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynn_core::DType;

    #[test]
    fn shapes_ranges_and_determinism() {
        let cfg = ProteinConfig::default();
        let (msa, dist) = batch(&mut Rng::new(1), &cfg, 3, Device::Cpu).unwrap();
        assert_eq!(msa.dims(), &[3, 8, 24]);
        assert_eq!(dist.dims(), &[3, 24, 24]);
        assert_eq!((msa.dtype(), dist.dtype()), (DType::U32, DType::U32));
        let (m, d) = (msa.to_vec::<u32>().unwrap(), dist.to_vec::<u32>().unwrap());
        assert!(m.iter().all(|&t| (t as usize) < MSA_VOCAB));
        assert!(d.iter().all(|&b| (b as usize) < cfg.bins));
        for i in 0..24 {
            assert_eq!(d[i * 24 + i], 0);
            for j in 0..24 {
                assert_eq!(d[i * 24 + j], d[j * 24 + i]);
            }
        }
        let (m2, _) = batch(&mut Rng::new(1), &cfg, 3, Device::Cpu).unwrap();
        assert_eq!(m, m2.to_vec::<u32>().unwrap());
        assert_eq!(
            sample(&mut Rng::new(4), &cfg),
            sample(&mut Rng::new(4), &cfg)
        );
        assert_ne!(
            sample(&mut Rng::new(4), &cfg),
            sample(&mut Rng::new(5), &cfg)
        );
    }

    #[test]
    fn bins_are_balanced() {
        let cfg = ProteinConfig::default();
        let mut rng = Rng::new(2);
        let mut hist = vec![0usize; cfg.bins];
        for _ in 0..100 {
            for b in sample(&mut rng, &cfg).distogram {
                hist[b as usize] += 1;
            }
        }
        let total: usize = hist.iter().sum();
        assert!(hist.iter().all(|&h| h * 100 < total * 25), "{hist:?}");
    }

    #[test]
    fn bad_configs() {
        let mut rng = Rng::new(0);
        let ok = ProteinConfig::default();
        assert!(batch(&mut rng, &ok, 0, Device::Cpu).is_err());
        for cfg in [
            ProteinConfig {
                len: 1,
                ..ok.clone()
            },
            ProteinConfig {
                msa_depth: 0,
                ..ok.clone()
            },
            ProteinConfig {
                bins: 1,
                ..ok.clone()
            },
        ] {
            assert!(batch(&mut rng, &cfg, 2, Device::Cpu).is_err());
            let s = sample(&mut rng, &cfg);
            assert_eq!(s.msa.len(), cfg.msa_depth * cfg.len);
            assert_eq!(s.distogram.len(), cfg.len * cfg.len);
        }
        let empty = ProteinConfig { len: 0, ..ok };
        assert!(sample(&mut rng, &empty).msa.is_empty());
    }
}
