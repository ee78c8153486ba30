//! The routing decision of one MoE layer, made on the host from the router's probabilities:
//! top-k experts per token, then per-expert capacity with token dropping.

use dynn_core::{Error, Result};

/// Which tokens each expert processes, for one layer and one batch of tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    /// For each expert, the token indices it processes, in priority order (first choices in
    /// token order, then second choices). Empty for an expert that runs nothing.
    pub tokens: Vec<Vec<u32>>,
    /// The most tokens one expert may take.
    pub capacity: usize,
    /// Token–expert assignments dropped because the chosen expert was full.
    pub dropped: usize,
    /// Tokens that reached no expert at all (they pass through the residual only).
    pub unrouted: usize,
    /// The share of all top-k choices (before capacity) that went to each expert; sums to 1.
    /// The `f_i` of the Switch load-balancing loss.
    pub fraction: Vec<f64>,
}

impl Routing {
    /// Tokens each expert processes.
    pub fn load(&self) -> Vec<usize> {
        self.tokens.iter().map(Vec::len).collect()
    }
}

/// The `k` largest entries of `row`, largest first; ties go to the lower index and NaN
/// counts as larger than every number (as the `topk` op).
fn top_k(row: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    let key = |v: f64| if v.is_nan() { f64::INFINITY } else { v };
    idx.sort_by(|&a, &b| key(row[b]).total_cmp(&key(row[a])).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Routes `tokens` tokens given their router probabilities `probs` (`tokens × experts`,
/// row-major): each token picks its `top_k` most probable experts; each expert accepts at
/// most `capacity` tokens, first choices before second choices and earlier tokens first, and
/// drops the rest.
pub fn route(
    probs: &[f64],
    tokens: usize,
    experts: usize,
    top_k_: usize,
    capacity: usize,
) -> Result<Routing> {
    const OP: &str = "moe::route";
    if experts == 0 || top_k_ == 0 || top_k_ > experts {
        return Err(Error::invalid(
            OP,
            format!("top_k {top_k_} must be in 1..={experts} (the number of experts)"),
        ));
    }
    if probs.len() != tokens * experts {
        return Err(Error::invalid(
            OP,
            format!(
                "expected {tokens} × {experts} probabilities, got {}",
                probs.len()
            ),
        ));
    }
    if u32::try_from(tokens * experts).is_err() {
        return Err(Error::invalid(
            OP,
            format!("{tokens} tokens × {experts} experts do not fit u32 indices"),
        ));
    }
    let choices: Vec<Vec<usize>> = probs
        .chunks(experts)
        .map(|row| top_k(row, top_k_))
        .collect();
    let mut routed = vec![Vec::new(); experts];
    let mut counts = vec![0usize; experts];
    let mut reached = vec![false; tokens];
    let mut dropped = 0;
    for rank in 0..top_k_ {
        for (t, ch) in choices.iter().enumerate() {
            let e = ch[rank];
            counts[e] += 1;
            if routed[e].len() < capacity {
                routed[e].push(t as u32);
                reached[t] = true;
            } else {
                dropped += 1;
            }
        }
    }
    let total = (tokens * top_k_).max(1) as f64;
    Ok(Routing {
        tokens: routed,
        capacity,
        dropped,
        unrouted: reached.iter().filter(|&&r| !r).count(),
        fraction: counts.iter().map(|&c| c as f64 / total).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top2_with_capacity_drops_late_second_choices() {
        // 4 tokens, 3 experts; everyone prefers expert 0, then 1.
        let p = [
            0.6, 0.3, 0.1, //
            0.5, 0.4, 0.1, //
            0.7, 0.2, 0.1, //
            0.2, 0.2, 0.6, // ties: expert 0 before 1
        ];
        let r = route(&p, 4, 3, 2, 2).unwrap();
        assert_eq!(r.tokens[0], vec![0, 1]);
        assert_eq!(r.tokens[1], vec![0, 1]);
        assert_eq!(r.tokens[2], vec![3]);
        // Token 2's both choices (0, 1) and token 3's second choice (0) were full.
        assert_eq!(r.dropped, 3);
        assert_eq!(r.unrouted, 1);
        assert_eq!(r.load(), vec![2, 2, 1]);
        let s: f64 = r.fraction.iter().sum();
        assert!((s - 1.0).abs() < 1e-12);
        assert!(route(&p, 4, 3, 4, 2).is_err());
        assert!(route(&p[..5], 4, 3, 1, 2).is_err());
    }
}
