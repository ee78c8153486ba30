//! The announced plan: what the backward pass (from its tape) and the optimizer (from its
//! parameters) will read, in order, before they run. The pilot predicts the forward pass;
//! these phases it reads off the plan. A plan lists groups (a tape node's saved buffers, one
//! parameter's update); a cursor follows the ops through them, and the ops each group takes
//! (measured as they run, the previous step's figure before that) turn groups into op
//! distances.

use crate::history::KeyMap;
use dynn_mm::trace::Access;

/// Plans of one step whose ends are kept for the next (a trace without step boundaries
/// would otherwise grow the list without bound).
const MAX_PLANS: usize = 64;

/// Groups run before the measured pace outweighs the previous step's.
const PRIOR_WEIGHT: f64 = 4.0;

/// Where a buffer stands in the active plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanDistance {
    /// Read by the plan about this many ops ahead.
    Within(u64),
    /// Not read by what is left of the plan, which takes about this many more ops.
    Beyond(u64),
    /// Not read by what is left of the plan (or made since it was announced), but used about
    /// this many ops ahead by what follows it: as far past the plan's end as the previous
    /// step, whose same plan ended where this one will, first used it (the optimizer's
    /// parameters after the backward pass and the gradient norm's plans). Given by
    /// [`crate::Tracker::plan_distance`], never by the cursor alone.
    After(u64),
    /// Made after the plan was announced: the plan cannot know it (a gradient flowing
    /// between tape nodes, a leaf's accumulated gradient). The tracker turns it into
    /// [`PlanDistance::After`] where the previous step tells.
    Unplanned,
}

/// Follows one announced plan at a time.
#[derive(Debug, Clone, Default)]
pub struct PlanCursor {
    /// Buffer id → the groups that read it, ascending.
    at: KeyMap<Vec<u32>>,
    /// The same for buffers made since the announcement (they do not move the cursor: a
    /// gradient is read once on its way, by the accumulation, before its group runs).
    added: KeyMap<Vec<u32>>,
    /// The groups, in order, as memory-manager keys (what prefetching asks for).
    groups: Vec<Vec<u64>>,
    /// The group running now.
    cursor: u32,
    /// Tracker index of the op that moved the cursor to its group.
    cursor_since: u32,
    /// Tracker index (ops into the step) when the plan was announced.
    start: u32,
    /// Whether a plan is being followed.
    active: bool,
    /// Who announced the active plan ("backward", "adam", ...).
    source: String,
    /// Plans announced so far this step.
    ordinal: usize,
    /// Ops per group of this step's finished plans, by source (the next step's priors).
    pace: Vec<(String, f64)>,
    /// The previous step's.
    prior: Vec<(String, f64)>,
    /// Plans the previous step announced.
    plans_before: usize,
    /// Source and end (the step's op index after its last op) of each plan of this step
    /// closed so far, in order.
    ends: Vec<(String, u32)>,
    /// The same for the previous step.
    prev_ends: Vec<(String, u32)>,
}

impl PlanCursor {
    /// Whether a plan is being followed.
    pub fn active(&self) -> bool {
        self.active
    }

    /// A plan of buffer ids is announced at op `index` of the step; it replaces the one
    /// before. `key_of` gives a buffer's memory-manager key (unknown buffers are left out of
    /// prefetching).
    pub fn announce(
        &mut self,
        source: &str,
        groups: &[Vec<u64>],
        index: u32,
        key_of: impl Fn(u64) -> Option<u64>,
    ) {
        self.finish(index);
        self.source.clear();
        self.source.push_str(source);
        self.at.clear();
        self.added.clear();
        self.groups.clear();
        self.groups.extend(
            groups
                .iter()
                .map(|g| g.iter().filter_map(|&id| key_of(id)).collect()),
        );
        for (g, ids) in groups.iter().enumerate() {
            for &id in ids {
                let v = self.at.entry(id).or_default();
                if v.last() != Some(&(g as u32)) {
                    v.push(g as u32);
                }
            }
        }
        self.cursor = 0;
        self.cursor_since = index;
        self.start = index;
        self.active = !groups.is_empty();
    }

    /// Buffer `id` will be read by group `group` (made since the plan was announced).
    pub fn add(&mut self, group: usize, id: u64) {
        if !self.active || group >= self.groups.len() {
            return;
        }
        let g = group as u32;
        let v = self.added.entry(id).or_default();
        if let Err(i) = v.binary_search(&g) {
            v.insert(i, g);
        }
    }

    /// An op, op `index` of its step, read `inputs`: the cursor moves to the furthest group it
    /// read from.
    pub fn observe(&mut self, inputs: &[Access], index: u32) {
        if !self.active {
            return;
        }
        let before = self.cursor;
        for a in inputs {
            if let Some(gs) = self.at.get(&a.0) {
                let i = gs.partition_point(|&g| g < self.cursor);
                if let Some(&g) = gs.get(i) {
                    self.cursor = self.cursor.max(g);
                }
            }
        }
        if self.cursor != before {
            self.cursor_since = index;
        }
    }

    /// The step ended at op `index`: this step's pace becomes the prior.
    pub fn step_boundary(&mut self, index: u32) {
        self.finish(index);
        self.prior = std::mem::take(&mut self.pace);
        self.plans_before = self.ordinal;
        self.ordinal = 0;
        std::mem::swap(&mut self.prev_ends, &mut self.ends);
        self.ends.clear();
    }

    /// A step ended without running an op: whatever it announced is dropped, and the step
    /// before stays the previous one.
    pub fn abandon(&mut self) {
        self.active = false;
        self.ordinal = 0;
        self.pace.clear();
        self.ends.clear();
    }

    /// Closes the active plan at op `index`, keeping its pace.
    fn finish(&mut self, index: u32) {
        if self.active {
            let n = self.groups.len().max(1) as f64;
            let pace = index.saturating_sub(self.start) as f64 / n;
            match self.pace.iter_mut().find(|p| p.0 == self.source) {
                Some(p) => p.1 = pace,
                None => self.pace.push((self.source.clone(), pace)),
            }
            if self.ends.len() < MAX_PLANS {
                self.ends.push((self.source.clone(), index));
            }
            self.ordinal += 1;
        }
        self.active = false;
    }

    /// Whether the active plan is, as in the previous step, the step's last: then nothing
    /// reads a buffer beyond it before the next step.
    pub fn last_of_step(&self) -> bool {
        self.active && self.plans_before > 0 && self.ordinal + 1 >= self.plans_before
    }

    /// Where the previous step's plan in the active plan's place (the same source, announced
    /// as many plans into its step) ended: the index of the op after its last.
    pub fn previous_end(&self) -> Option<u32> {
        let (source, end) = self.prev_ends.get(self.ordinal).filter(|_| self.active)?;
        (*source == self.source).then_some(*end)
    }

    /// Ops per group from the running group on. With a plan from the same source in the
    /// previous step, whose pace was `p` ops per group, this plan's `n` groups are expected to
    /// take `p · n` ops: what that leaves after the groups before the running one, over the
    /// groups from it to the end. (Not the pace so
    /// far: a plan's groups need not cost alike along it. A Tree-LSTM's tape runs its cheap
    /// nodes first, and the pace so far put reads 128 ops away at about 110.) Never below
    /// half of the previous pace blended with the pace so far, for a plan running longer
    /// than expected. Without a previous plan, the pace so far (at least 1).
    fn pace(&self, index: u32) -> f64 {
        let done = self.cursor as f64 + 0.5;
        let now = index.saturating_sub(self.start) as f64 / done;
        match self.prior.iter().find(|p| p.0 == self.source).map(|p| p.1) {
            Some(p) => {
                // From the start of the running group: `distance` takes off what of it ran.
                let (n, cursor) = (self.groups.len() as f64, self.cursor as f64);
                let before = self.cursor_since.saturating_sub(self.start) as f64;
                let blended = (p * PRIOR_WEIGHT + now * done) / (PRIOR_WEIGHT + done);
                ((p * n - before) / (n - cursor).max(1.0)).max(0.5 * blended)
            }
            None => now.max(1.0),
        }
    }

    /// Where buffer `id`, made at op `made` of the step (`None`: before the step) and last
    /// used by op `last_use` of it, stands after op `index - 1` ran (`None`: no plan is
    /// active). The running group still has to read it unless it already did.
    pub fn distance(
        &self,
        id: u64,
        made: Option<u32>,
        last_use: Option<u32>,
        index: u32,
    ) -> Option<PlanDistance> {
        if !self.active {
            return None;
        }
        let made_since = made.is_some_and(|m| m >= self.start);
        let groups = match made_since {
            true => self.added.get(&id),
            false => self.at.get(&id),
        };
        if made_since && groups.is_none() {
            return Some(PlanDistance::Unplanned);
        }
        let ahead = |groups: u32| self.ahead(groups, index);
        let done_here = last_use.is_some_and(|u| u >= self.cursor_since);
        let next = groups.and_then(|gs| {
            let i = match done_here {
                true => gs.partition_point(|&g| g <= self.cursor),
                false => gs.partition_point(|&g| g < self.cursor),
            };
            gs.get(i)
        });
        Some(match next {
            Some(&g) => PlanDistance::Within(ahead(g - self.cursor)),
            None => PlanDistance::Beyond(ahead(self.groups.len() as u32 - self.cursor)),
        })
    }

    /// Ops from op `index - 1` to the first op of the group `groups` after the running one:
    /// the rest of the running group, whole groups at the pace, then that op.
    fn ahead(&self, groups: u32, index: u32) -> u64 {
        if groups == 0 {
            return 1;
        }
        let pace = self.pace(index);
        let into = index.saturating_sub(self.cursor_since) as f64;
        (groups as f64 * pace - into.min(pace) + 1.0)
            .round()
            .max(1.0) as u64
    }

    /// Ops from op `index - 1` to the first op after the active plan (`None`: no plan).
    pub fn rest(&self, index: u32) -> Option<u64> {
        let left = (self.groups.len() as u32).saturating_sub(self.cursor);
        self.active.then(|| self.ahead(left, index))
    }

    /// Appends the keys of the buffers the plan reads within about `horizon` ops after op
    /// `index - 1`, soonest first (a key may repeat).
    pub fn upcoming(&self, horizon: usize, index: u32, out: &mut Vec<u64>) {
        if !self.active {
            return;
        }
        let groups = (horizon as f64 / self.pace(index).max(1e-3)).ceil() as usize;
        let first = self.cursor as usize + 1;
        let last = (first + groups.max(1)).min(self.groups.len());
        for g in self.groups.get(first..last).unwrap_or(&[]) {
            out.extend_from_slice(g);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The accesses of an op reading `inputs`.
    fn op(inputs: &[u64]) -> Vec<Access> {
        inputs.iter().map(|&i| (i, 4, 3, i)).collect()
    }

    #[test]
    fn the_cursor_follows_the_ops_and_paces_groups_into_ops() {
        let mut p = PlanCursor::default();
        assert_eq!(p.distance(1, None, None, 0), None);
        // Groups: {1}, {2}, {3, 1}, {4}; announced at op 10, two ops per group.
        p.announce(
            "backward",
            &[vec![1], vec![2], vec![3, 1], vec![4]],
            10,
            |id| Some(id + 100),
        );
        p.observe(&op(&[1]), 10);
        // One op into group 0 (counted as half done): two ops per group so far.
        assert_eq!(p.distance(2, None, None, 11), Some(PlanDistance::Within(2)));
        assert_eq!(
            p.distance(8, Some(10), None, 11),
            Some(PlanDistance::Unplanned)
        );
        p.observe(&op(&[9]), 11);
        p.observe(&op(&[2]), 12);
        // At group 1 after 3 ops: 2 ops per group; buffer 1 is read again by group 2.
        assert!((p.pace(13) - 2.0).abs() < 1e-9);
        assert_eq!(
            p.distance(1, None, Some(10), 13),
            Some(PlanDistance::Within(2))
        );
        assert_eq!(p.distance(4, None, None, 13), Some(PlanDistance::Within(4)));
        assert_eq!(
            p.distance(7, Some(2), None, 13),
            Some(PlanDistance::Beyond(6))
        );
        // Group 1 read buffer 2 already: next it is beyond the plan; unread, it is due now.
        assert_eq!(
            p.distance(2, None, Some(12), 13),
            Some(PlanDistance::Beyond(6))
        );
        assert_eq!(
            p.distance(2, None, Some(3), 13),
            Some(PlanDistance::Within(1))
        );
        let mut out = Vec::new();
        p.upcoming(4, 13, &mut out);
        assert_eq!(out, [103, 101, 104]);
        // The next step starts from this step's pace (8 ops for 4 groups).
        assert!(!p.last_of_step(), "no previous step to tell");
        p.step_boundary(18);
        assert!(!p.active());
        // Priors are per source: none for "adam", 2 ops per group for "backward".
        p.announce("adam", &[vec![5], vec![6]], 0, Some);
        assert!((p.pace(3) - 6.0).abs() < 1e-9, "no prior: the ops so far");
        assert!(p.last_of_step(), "the previous step announced one plan");
        p.announce("backward", &[vec![5], vec![6]], 3, Some);
        // Two groups at 2 ops each are 4 ops, none run: 2 per group from the first on.
        assert!((p.pace(3) - 2.0).abs() < 1e-9);
        // Seven ops in the first group, then the second starts (op 10): past the 4 expected,
        // so the floor, half the previous pace blended with the 8 / 1.5 ops per group so far.
        p.observe(&op(&[5]), 3);
        for i in 4..10 {
            p.observe(&op(&[9]), i);
        }
        p.observe(&op(&[6]), 10);
        let now = 8.0 / 1.5;
        let blended = (2.0 * PRIOR_WEIGHT + now * 1.5) / (PRIOR_WEIGHT + 1.5);
        assert!((p.pace(11) - 0.5 * blended).abs() < 1e-9, "{}", p.pace(11));
    }
}
