//! Reproducible randomness: a splitmix64 generator for data and a shared seed stream for
//! dropout, both with a state that checkpoints save and restore.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// splitmix64: small, fast, and its whole state is one `u64` (saved in checkpoints).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng {
            state: seed ^ 0x5DEE_CE66_D1CE_4E5B,
        }
    }
    /// The state (to save).
    pub fn state(&self) -> u64 {
        self.state
    }
    /// A generator resumed from a saved state.
    pub fn from_state(state: u64) -> Self {
        Rng { state }
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in `lo..hi` (`hi > lo`).
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo).max(1) as u64) as usize
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
    /// True with probability `p`.
    pub fn bernoulli(&mut self, p: f64) -> bool {
        self.uniform() < p
    }
}

/// A shared counter handing out seeds (one per dropout call). Clones share the counter; its
/// position is part of a checkpoint's RNG state.
#[derive(Clone, Debug, Default)]
pub struct SeedStream {
    base: u64,
    counter: Arc<AtomicU64>,
}

impl SeedStream {
    /// A stream from `base`.
    pub fn new(base: u64) -> Self {
        SeedStream {
            base,
            counter: Arc::default(),
        }
    }
    /// The next seed.
    pub fn next(&self) -> u64 {
        let i = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut r = Rng::new(self.base ^ i.wrapping_mul(0xA076_1D64_78BD_642F));
        r.next_u64()
    }
    /// How many seeds were drawn (to save).
    pub fn position(&self) -> u64 {
        self.counter.load(Ordering::Relaxed)
    }
    /// Moves the stream to a saved position.
    pub fn set_position(&self, pos: u64) {
        self.counter.store(pos, Ordering::Relaxed)
    }
}
