//! What the encoder reads of the tracker: a candidate's view and the model's input.

use super::*;

impl Tracker {
    /// What the encoder reads of candidate `q` now.
    pub fn candidate(&self, q: &Query) -> CandidateView {
        let state = self.bufs.get(q.id);
        let used = state.filter(|(b, _)| b.last_use != u64::MAX);
        CandidateView {
            kind: q.kind,
            bytes: q.bytes,
            age: used.map_or(0, |(b, _)| self.clock.saturating_sub(b.last_use + 1)),
            uses_step: state.map_or(0, |(b, _)| b.uses_step),
            uses_past: state.map_or(0, |(_, c)| c.uses_past),
            created_this_step: state.is_none_or(|(_, c)| c.first_step == self.step),
            // An op of this step used it (use counts restart at every boundary).
            last_use_position: state
                .filter(|(b, _)| b.uses_step > 0)
                .map_or(0.0, |(b, _)| {
                    self.position(b.last_use_index(self.step_start))
                }),
            matching: self.matching,
            hint: self.hint_for(q).filter(|_| self.cfg.hint),
            mirror: state
                .filter(|(b, _)| b.last_forward != NO_FORWARD && b.last_step == self.step)
                .and_then(|(b, _)| self.mirror(b.last_forward)),
            site: state.and_then(|(b, _)| self.site_for(b)),
            plan: self.plan_distance(q),
            plan_last: self.plan.last_of_step(),
            producer: state.and_then(|(_, c)| c.producer),
        }
    }

    /// Writes the model input for candidate `q` into `out` (`cfg.input_dim()` long): the
    /// window's op rows oldest first (zeros before the first ops), then the candidate.
    pub fn features(&self, q: &Query, out: &mut [f32]) {
        debug_assert_eq!(out.len(), self.cfg.input_dim());
        let (ops, cand) = out.split_at_mut(self.cfg.window_dim().min(out.len()));
        self.window_features(ops);
        self.candidate_features(q, cand);
    }

    /// Writes the window part of the model input (the same for every candidate until the
    /// next op) into `out` (`window × op_dim` long).
    pub fn window_features(&self, out: &mut [f32]) {
        let d = self.cfg.encoding.op_dim();
        let (newer, older) = self.ring.split_at(self.next);
        for (row, op) in out.chunks_mut(d).zip(older.iter().chain(newer)) {
            match op {
                Some((view, at)) => encode_op(self.cfg.encoding, view, *at, row),
                None => row.fill(0.0),
            }
        }
    }

    /// Writes the candidate part of the model input for `q` into `out` (`cand_dim` long).
    pub fn candidate_features(&self, q: &Query, out: &mut [f32]) {
        encode_candidate(self.cfg.encoding, &self.candidate(q), out);
    }

    /// The query for a tracked buffer `id` (its current key, kind and size).
    pub fn query(&self, id: u64) -> Option<Query> {
        self.bufs.get(id).map(|(h, c)| Query {
            id,
            key: c.key,
            kind: h.kind,
            bytes: c.bytes,
        })
    }

    /// The encoding in use.
    pub fn encoding(&self) -> Encoding {
        self.cfg.encoding
    }
}
