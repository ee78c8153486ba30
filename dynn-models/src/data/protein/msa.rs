//! A native sequence and its multiple sequence alignment, in which planted contact pairs
//! co-vary and buried positions are conserved.

use super::fold::Fold;
use super::{AMINO, GAP};
use crate::rng::Rng;

/// The partner residue a planted contact requires: a fixed permutation of the 20 amino acids
/// (7 is coprime to 20), like complementary charges.
pub(crate) fn partner(a: u32) -> u32 {
    (a * 7 + 3) % AMINO as u32
}

/// A random amino acid other than `a`.
fn other(rng: &mut Rng, a: u32) -> u32 {
    (a + 1 + rng.range(0, AMINO - 1) as u32) % AMINO as u32
}

/// A random matching among the fold's contacts: the pairs that co-vary.
pub(crate) fn planted_pairs(rng: &mut Rng, fold: &Fold) -> Vec<(usize, usize)> {
    let mut contacts = fold.contacts();
    for i in (1..contacts.len()).rev() {
        contacts.swap(i, rng.range(0, i + 1));
    }
    let mut paired = vec![false; fold.sites.len()];
    contacts.retain(|&(i, j)| {
        let free = !paired[i] && !paired[j];
        if free {
            paired[i] = true;
            paired[j] = true;
        }
        free
    });
    contacts
}

/// The per-position mutation rate: lower for buried residues (more lattice neighbours).
fn mutation_rates(fold: &Fold) -> Vec<f64> {
    let n = fold.sites.len();
    let mut burial = vec![0usize; n];
    for (i, j) in fold.contacts() {
        burial[i] += 1;
        burial[j] += 1;
    }
    burial
        .iter()
        .map(|&b| 0.4 - 0.07 * b.min(4) as f64)
        .collect()
}

/// `depth` rows of `len` tokens, row-major; row 0 is the native sequence. In the other rows
/// each position mutates at its own rate; a planted pair mutates together, the second
/// residue becoming the [`partner`] of the first; and some rows have a short gap.
pub(crate) fn alignment(rng: &mut Rng, fold: &Fold, depth: usize) -> Vec<u32> {
    let len = fold.sites.len();
    let pairs = planted_pairs(rng, fold);
    let mut in_pair = vec![false; len];
    let mut native: Vec<u32> = (0..len).map(|_| rng.range(0, AMINO) as u32).collect();
    for &(i, j) in &pairs {
        native[j] = partner(native[i]);
        in_pair[i] = true;
        in_pair[j] = true;
    }
    let rates = mutation_rates(fold);
    let mut msa = Vec::with_capacity(depth * len);
    for r in 0..depth {
        let mut row = native.clone();
        if r > 0 {
            for &(i, j) in &pairs {
                if rng.bernoulli(0.5 * (rates[i] + rates[j])) {
                    row[i] = other(rng, native[i]);
                    row[j] = partner(row[i]);
                }
            }
            for p in 0..len {
                if !in_pair[p] && rng.bernoulli(rates[p]) {
                    row[p] = other(rng, native[p]);
                }
            }
            if len > 0 && rng.bernoulli(0.3) {
                let start = rng.range(0, len);
                let end = (start + rng.range(1, 4)).min(len);
                row[start..end].fill(GAP);
            }
        }
        msa.extend_from_slice(&row);
    }
    msa
}

#[cfg(test)]
mod tests {
    use super::super::fold::fold;
    use super::*;

    #[test]
    fn pairs_co_vary() {
        let mut rng = Rng::new(9);
        let f = fold(&mut rng, 24);
        let pairs = planted_pairs(&mut rng.clone(), &f);
        let msa = alignment(&mut rng, &f, 16);
        assert_eq!(msa.len(), 16 * 24);
        assert!(!pairs.is_empty());
        for row in msa.chunks(24) {
            for &(i, j) in &pairs {
                if row[i] != GAP && row[j] != GAP {
                    assert_eq!(row[j], partner(row[i]));
                }
            }
        }
        assert!(msa.iter().all(|&t| t <= GAP));
        assert!(!msa[..24].contains(&GAP));
    }

    #[test]
    fn partner_is_a_permutation() {
        let mut seen = [false; AMINO];
        for a in 0..AMINO as u32 {
            seen[partner(a) as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }
}
