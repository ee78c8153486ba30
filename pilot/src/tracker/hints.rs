//! The previous step's answers: when a buffer was used next after the corresponding op, and
//! which buffers the next ops used.

use super::*;

impl Tracker {
    /// Ops until the backward pass reaches a buffer last used at forward position `p`: the
    /// tape replays the forward in reverse, at the previous step's ratio of backward to
    /// forward ops.
    pub(super) fn mirror(&self, p: u32) -> Option<u64> {
        let [fwd_prev, bwd_prev, _] = self.prev_phase_ops;
        let ratio = match (fwd_prev, bwd_prev) {
            (0, _) | (_, 0) => 1.0,
            (f, b) => b as f64 / f as f64,
        };
        let [fwd, bwd, _] = self.phase_ops;
        match self.phase {
            0 => {
                let total = fwd.max(fwd_prev) as f64;
                let rest = total - fwd as f64;
                Some((rest + ratio * (total - p as f64)).max(1.0) as u64)
            }
            1 => Some((ratio * (fwd as f64 - p as f64) - bwd as f64).max(1.0) as u64),
            _ => None,
        }
    }

    /// What the site of candidate `b`'s last use showed last time (see
    /// [`CandidateView::site`]).
    pub(super) fn site_for(&self, b: &Hot) -> Option<Option<u64>> {
        if !b.used_in(self.step) || b.last_site == 0 {
            return None;
        }
        let gap = *self.sites.get(&b.last_site)?;
        let age = self.age(b);
        Some((gap != NEVER).then(|| (gap as u64).saturating_sub(age).max(1)))
    }

    /// The previous step's distance from here to the next use of the buffer with aligned
    /// key `aligned`, from the corresponding op (see [`Tracker::after`]): `None` without a
    /// previous step.
    pub(super) fn hint_aligned(&self, aligned: u64) -> Option<Option<u64>> {
        self.hint_in(self.previous.range_of(aligned))
    }

    /// [`Tracker::hint_aligned`] of the key whose previous uses are `range`.
    pub(super) fn hint_in(&self, range: UseRange) -> Option<Option<u64>> {
        (!self.previous.is_empty()).then(|| self.previous.next_use_in(self.after(), range))
    }

    /// The previous step's distance from here to the next use of the buffer with memory
    /// manager key `key` (see [`Tracker::hint_for`] for a candidate).
    pub fn hint(&self, key: u64) -> Option<Option<u64>> {
        let aligned = match key {
            k if k < PERSISTENT => k,
            k => self
                .by_aligned
                .iter()
                .find(|(_, id)| self.key_of(**id) == Some(k))
                .map_or(k, |(a, _)| *a),
        };
        self.hint_aligned(aligned)
    }

    /// The previous step's prediction for candidate `q` (see [`CandidateView::hint`]). A
    /// buffer last used in its `r`-th use of a phase this step is due when the previous
    /// step's gap from that use to the next one has passed — robust to ops added or removed
    /// elsewhere in the step; one not used yet this step is due where the previous step first
    /// used it, counted from the corresponding op.
    pub fn hint_for(&self, q: &Query) -> Option<Option<u64>> {
        if self.previous.is_empty() {
            return None;
        }
        let state = self.bufs.get(q.id);
        match state.filter(|(b, _)| b.used_in(self.step)) {
            Some((b, c)) => {
                debug_assert_eq!(c.prev, self.previous.range_of(b.aligned));
                let p = (b.last_phase as usize).min(PHASES - 1);
                let there =
                    self.previous
                        .nth_use_in_phase_in(c.prev, b.last_phase, b.phase_uses[p]);
                let Some(there) = there else {
                    return self.hint_in(c.prev);
                };
                Some(
                    self.previous
                        .next_use_in(Some(there), c.prev)
                        .map(|gap| gap.saturating_sub(self.age(b)).max(1)),
                )
            }
            None => match state {
                Some((_, c)) => self.hint_in(c.prev),
                None => self.hint_aligned(q.key),
            },
        }
    }

    /// Appends the memory manager keys of the buffers the previous step used in the next
    /// `horizon` ops from here, soonest first (buffers of this step not made yet are
    /// skipped).
    pub fn upcoming_by_history(&self, horizon: usize, out: &mut Vec<u64>) {
        self.upcoming_in_previous(self.after(), horizon, out);
    }

    /// [`Tracker::upcoming_by_history`] from op `after` of the previous step.
    pub(super) fn upcoming_in_previous(
        &self,
        after: Option<u32>,
        horizon: usize,
        out: &mut Vec<u64>,
    ) {
        let from = out.len();
        self.previous.upcoming(after, horizon, out);
        let mut keep = from;
        for i in from..out.len() {
            let k = out[i];
            let key = if k < PERSISTENT {
                Some(k)
            } else {
                self.by_aligned.get(&k).and_then(|&id| self.key_of(id))
            };
            if let Some(key) = key {
                out[keep] = key;
                keep += 1;
            }
        }
        out.truncate(keep);
    }
}
