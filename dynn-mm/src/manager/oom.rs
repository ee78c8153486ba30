//! The out-of-memory report: what holds the device and why nothing more could leave it.

use super::*;

impl MemoryManager {
    /// The out-of-memory error: what was asked for and by whom, why nothing more could be
    /// evicted (`why`, or — for an evicting policy — worked out from what holds the device),
    /// and what is resident.
    pub(super) fn oom(
        &self,
        st: &State,
        requested: usize,
        op: &'static str,
        err: &PoolExhausted,
        why: Option<&str>,
    ) -> Error {
        let h = crate::human_bytes;
        // Kinds are read from the live buffers: a leaf may have become a parameter since.
        let live_kind = |e: &Entry| e.buf.upgrade().map_or(e.kind, |b| b.kind());
        let mut resident = [0usize; 5];
        let mut top: Vec<(BufferId, usize, BufferKind, &'static str)> = Vec::new();
        for (&id, e) in st
            .table
            .iter()
            .filter(|(_, e)| matches!(e.res, Residency::Device(_) | Residency::InFlight(..)))
        {
            let kind = live_kind(e);
            resident[kind as usize] += e.bytes;
            top.push((id, e.bytes, kind, e.producer));
        }
        top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut by_kind = String::new();
        for k in BufferKind::ALL {
            by_kind.push_str(&format!(
                "\n    {:<16} {}",
                k.as_str(),
                h(resident[k as usize])
            ));
        }
        let mut holders = String::new();
        for (id, bytes, kind, producer) in top.iter().take(10) {
            holders.push_str(&format!(
                "\n    {id:>8} {:>12} {:<16} made by {producer}",
                h(*bytes),
                kind.as_str()
            ));
        }
        // Who asked: the op itself, or the recomputation of a dropped buffer it needs.
        let who = match st.recomputing.last() {
            Some(r) => format!(
                "{op} needs {} to recompute {} (made by {}; {} recomputation{} deep)",
                h(requested),
                r.id,
                r.producer,
                st.recomputing.len(),
                if st.recomputing.len() == 1 { "" } else { "s" }
            ),
            None => format!("{op} needs {}", h(requested)),
        };
        let why = match why {
            Some(w) => w.to_string(),
            None => self.why_nothing_evicts(st, requested, op, err),
        };
        let hint = if st.policy.evicts() {
            "hint: a larger --device-budget"
        } else {
            "hint: pick an offloading policy (--policy lru|static|recompute|belady) or a larger --device-budget"
        };
        let msg = format!(
            "{who} but the device budget is {} with {} in use ({} reserved, largest free block {}); {why}.\n  resident by kind:{by_kind}\n  largest resident buffers:{holders}\n  {hint}",
            h(err.budget),
            h(err.in_use),
            h(err.reserved),
            h(err.largest_free),
        );
        Error::OutOfMemory {
            requested,
            budget: err.budget,
            msg,
        }
    }

    /// Why an evicting policy found nothing to evict: what pins the resident buffers, and
    /// whether the budget's free bytes would have sufficed had they not been scattered.
    pub(super) fn why_nothing_evicts(
        &self,
        st: &State,
        requested: usize,
        op: &'static str,
        err: &PoolExhausted,
    ) -> String {
        let h = crate::human_bytes;
        let held_by_recompute =
            |id: &BufferId| st.recomputing.iter().any(|r| r.inputs.contains(id));
        let (mut n, mut bytes) = (0usize, 0usize);
        let (mut by_op, mut by_recompute, mut in_flight, mut other) = (0, 0, 0, 0);
        for (id, e) in st
            .table
            .iter()
            .filter(|(_, e)| matches!(e.res, Residency::Device(_) | Residency::InFlight(..)))
        {
            n += 1;
            bytes += e.bytes;
            if matches!(e.res, Residency::InFlight(..)) {
                in_flight += 1;
            } else if st.op_buffers.contains(id) {
                by_op += 1;
            } else if held_by_recompute(id) {
                by_recompute += 1;
            } else {
                other += 1;
            }
        }
        let mut parts = Vec::new();
        if by_op > 0 {
            parts.push(format!("{by_op} as inputs or outputs of {op}"));
        }
        if by_recompute > 0 {
            parts.push(format!(
                "{by_recompute} as inputs of the {} dropped buffer{} being recomputed for it",
                st.recomputing.len(),
                if st.recomputing.len() == 1 { "" } else { "s" }
            ));
        }
        if in_flight > 0 {
            parts.push(format!("{in_flight} with a copy in flight"));
        }
        if other > 0 {
            parts.push(format!("{other} by an enclosing operation"));
        }
        let mut why = match n {
            0 => "nothing is resident to evict".to_string(),
            1 => format!(
                "nothing can be evicted: the one resident buffer ({}) is pinned, {}",
                h(bytes),
                parts.join(", ")
            ),
            _ => format!(
                "nothing can be evicted: all {n} resident buffers ({}) are pinned, {}",
                h(bytes),
                parts.join(", ")
            ),
        };
        let need = DevicePool::rounded(requested);
        let free = err.budget.saturating_sub(err.in_use);
        if free >= need {
            why.push_str(&format!(
                "; {} of the budget is free in total, but scattered (largest free block {}) and repacking the resident buffers could not make a {} block",
                h(free),
                h(err.largest_free),
                h(need)
            ));
        } else {
            why.push_str(&format!("; only {} of the budget is free", h(free)));
        }
        why
    }
}
