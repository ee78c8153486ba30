//! What the routing did in one forward pass: expert load and dropped tokens.

use super::router::Routing;

/// Routing statistics of one forward pass over all MoE layers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MoeStats {
    /// Tokens each layer routed.
    pub tokens: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Capacity per expert.
    pub capacity: usize,
    /// Tokens each expert processed, per layer: `load[layer][expert]`.
    pub load: Vec<Vec<usize>>,
    /// Token–expert assignments dropped over capacity, summed over layers.
    pub dropped: usize,
    /// (token, layer) pairs that reached no expert.
    pub unrouted: usize,
}

impl MoeStats {
    /// Adds one layer's routing.
    pub fn push(&mut self, r: &Routing, tokens: usize, top_k: usize) {
        self.tokens = tokens;
        self.top_k = top_k;
        self.capacity = r.capacity;
        self.load.push(r.load());
        self.dropped += r.dropped;
        self.unrouted += r.unrouted;
    }

    /// (layer, expert) pairs that processed at least one token.
    pub fn experts_used(&self) -> usize {
        self.load.iter().flatten().filter(|&&n| n > 0).count()
    }

    /// All (layer, expert) pairs.
    pub fn expert_slots(&self) -> usize {
        self.load.iter().map(Vec::len).sum()
    }

    /// The share of token–expert assignments dropped over capacity.
    pub fn drop_rate(&self) -> f64 {
        let asked = self.tokens * self.top_k * self.load.len();
        self.dropped as f64 / asked.max(1) as f64
    }

    /// A short progress-bar note, e.g. `experts 16/16  drop 3.1%`.
    pub fn note(&self) -> String {
        format!(
            "experts {}/{}  drop {:.1}%",
            self.experts_used(),
            self.expert_slots(),
            100.0 * self.drop_rate()
        )
    }
}
