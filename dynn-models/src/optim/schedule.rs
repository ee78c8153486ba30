//! Learning-rate schedules.

/// A learning rate as a function of the step (0-based).
pub trait LrSchedule {
    /// The rate for `step`.
    fn lr_at(&self, step: u64) -> f64;
}

/// Linear warmup from 0 to `peak` over `warmup` steps, then cosine decay to `min_lr` at
/// `total` steps (held after).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WarmupCosine {
    /// The rate at the end of warmup.
    pub peak: f64,
    /// The final rate.
    pub min_lr: f64,
    /// Warmup steps.
    pub warmup: u64,
    /// Total steps.
    pub total: u64,
}

impl LrSchedule for WarmupCosine {
    fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let t = ((step - self.warmup) as f64 / span as f64).min(1.0);
        self.min_lr + 0.5 * (self.peak - self.min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_then_decays_to_the_floor() {
        let s = WarmupCosine {
            peak: 1.0,
            min_lr: 0.1,
            warmup: 10,
            total: 110,
        };
        assert!((s.lr_at(0) - 0.1).abs() < 1e-12);
        assert!((s.lr_at(9) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(60) - 0.55).abs() < 1e-12);
        assert!((s.lr_at(110) - 0.1).abs() < 1e-12);
        assert!((s.lr_at(500) - 0.1).abs() < 1e-12);
        let mut prev = f64::INFINITY;
        for k in 9..=110 {
            assert!(s.lr_at(k) <= prev);
            prev = s.lr_at(k);
        }
    }
}
