//! The hidden geometry: a compact self-avoiding chain on a cubic lattice with 3.8 Å steps
//! (the C-alpha spacing), slightly jittered off the lattice; its contacts and distance bins.

use std::collections::HashSet;

use crate::rng::Rng;

/// The distance between consecutive residues, in Å.
pub const STEP: f64 = 3.8;
/// The standard deviation of the off-lattice jitter per coordinate, in Å.
const JITTER: f64 = 0.3;
/// How strongly the walk prefers sites next to residues already placed (compactness).
const COMPACTNESS: f64 = 1.2;
/// Fresh walks tried before accepting one that crosses itself.
const ATTEMPTS: usize = 64;
const DIRS: [[i32; 3]; 6] = [
    [1, 0, 0],
    [-1, 0, 0],
    [0, 1, 0],
    [0, -1, 0],
    [0, 0, 1],
    [0, 0, -1],
];

/// A folded chain: lattice sites and jittered coordinates in Å.
pub(crate) struct Fold {
    pub sites: Vec<[i32; 3]>,
    pub coords: Vec<[f64; 3]>,
}

fn add(a: [i32; 3], b: [i32; 3]) -> [i32; 3] {
    [a[0] + b[0], a[1] + b[1], a[2] + b[2]]
}

/// Grows one walk; `None` when it traps itself.
fn walk(rng: &mut Rng, len: usize) -> Option<Vec<[i32; 3]>> {
    let mut sites = Vec::with_capacity(len);
    let mut taken = HashSet::with_capacity(len);
    if len == 0 {
        return Some(sites);
    }
    sites.push([0, 0, 0]);
    taken.insert([0, 0, 0]);
    let mut weights = [0.0f64; 6];
    for _ in 1..len {
        let cur = sites[sites.len() - 1];
        for (w, d) in weights.iter_mut().zip(DIRS) {
            let s = add(cur, d);
            *w = if taken.contains(&s) {
                0.0
            } else {
                let near = DIRS
                    .iter()
                    .filter(|&&e| add(s, e) != cur && taken.contains(&add(s, e)))
                    .count();
                (COMPACTNESS * near as f64).exp()
            };
        }
        let total: f64 = weights.iter().sum();
        if total <= 0.0 {
            return None;
        }
        let mut x = rng.uniform() * total;
        // The first open direction whose share covers x (the last open one on rounding).
        let mut pick = None;
        for (k, &w) in weights.iter().enumerate() {
            if w > 0.0 {
                pick = Some(k);
                if x < w {
                    break;
                }
                x -= w;
            }
        }
        let s = add(cur, DIRS[pick?]);
        sites.push(s);
        taken.insert(s);
    }
    Some(sites)
}

/// A random compact chain of `len` residues.
pub(crate) fn fold(rng: &mut Rng, len: usize) -> Fold {
    let sites = (0..ATTEMPTS)
        .find_map(|_| walk(rng, len))
        .unwrap_or_else(|| {
            // Practically unreachable: a plain random walk, which may cross itself.
            let mut s = vec![[0i32; 3]; len];
            for i in 1..len {
                s[i] = add(s[i - 1], DIRS[rng.range(0, 6)]);
            }
            s
        });
    let coords = sites
        .iter()
        .map(|p| p.map(|c| c as f64 * STEP + JITTER * rng.normal()))
        .collect();
    Fold { sites, coords }
}

impl Fold {
    /// The `len * len` pairwise distances in Å, row-major.
    pub fn distances(&self) -> Vec<f64> {
        let n = self.coords.len();
        let mut d = vec![0.0; n * n];
        for i in 0..n {
            for j in i + 1..n {
                let (a, b) = (self.coords[i], self.coords[j]);
                let r =
                    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt();
                d[i * n + j] = r;
                d[j * n + i] = r;
            }
        }
        d
    }

    /// Pairs `i < j`, at least 3 apart in sequence, on neighbouring lattice sites.
    pub fn contacts(&self) -> Vec<(usize, usize)> {
        let s = &self.sites;
        let mut out = Vec::new();
        for i in 0..s.len() {
            for j in i + 3..s.len() {
                let manhattan: i32 = (0..3).map(|k| (s[i][k] - s[j][k]).abs()).sum();
                if manhattan == 1 {
                    out.push((i, j));
                }
            }
        }
        out
    }
}

/// The bin of distance `d` given ascending `edges`: the number of edges at or below `d`.
pub(crate) fn bin_of(d: f64, edges: &[f64]) -> u32 {
    edges.partition_point(|&e| e <= d) as u32
}

/// `bins - 1` ascending distance edges (Å) for chains of `len` residues: quantiles of the
/// off-diagonal distances of reference chains drawn from a fixed seed, so every bin holds
/// about the same share of pairs. Empty when `bins < 2` or `len < 2`.
pub fn bin_edges(len: usize, bins: usize) -> Vec<f64> {
    if bins < 2 || len < 2 {
        return Vec::new();
    }
    let pairs = len * (len - 1) / 2;
    let chains = (8000 / pairs).clamp(4, 64);
    let mut rng = Rng::new(0xD157_0000 ^ len as u64);
    let mut all = Vec::with_capacity(chains * pairs);
    for _ in 0..chains {
        let d = fold(&mut rng, len).distances();
        for i in 0..len {
            all.extend_from_slice(&d[i * len + i + 1..(i + 1) * len]);
        }
    }
    all.sort_by(f64::total_cmp);
    (1..bins).map(|k| all[k * all.len() / bins]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_are_self_avoiding_with_unit_steps() {
        let mut rng = Rng::new(3);
        for _ in 0..50 {
            let f = fold(&mut rng, 24);
            let uniq: HashSet<_> = f.sites.iter().collect();
            assert_eq!(uniq.len(), 24);
            for w in f.sites.windows(2) {
                let m: i32 = (0..3).map(|k| (w[0][k] - w[1][k]).abs()).sum();
                assert_eq!(m, 1);
            }
            let d = f.distances();
            assert!((d[1] - STEP).abs() < 2.0);
            assert!(
                f.contacts()
                    .iter()
                    .all(|&(i, j)| j >= i + 3 && d[i * 24 + j] < 6.0)
            );
        }
    }

    #[test]
    fn edges_ascend() {
        let e = bin_edges(24, 8);
        assert_eq!(e.len(), 7);
        assert!(e.windows(2).all(|w| w[0] < w[1]), "{e:?}");
        assert_eq!(bin_of(0.0, &e), 0);
        assert_eq!(bin_of(1e9, &e), 7);
        assert!(bin_edges(1, 8).is_empty() && bin_edges(24, 1).is_empty());
    }
}
