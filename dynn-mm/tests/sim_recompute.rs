//! The simulator recomputes as the memory manager does: a dropped buffer's recipe needs its
//! inputs, which must still live when it is dropped, are held while it is dropped and are
//! brought back before it is recomputed.

use dynn_mm::{Candidate, DeviceProfile, Eviction, Now, OpRecord, Policy, simulate};

/// Evicts in the order of `order` (buffer ids), dropping every victim that can be dropped.
struct DropInOrder {
    order: Vec<u64>,
}

impl Policy for DropInOrder {
    fn name(&self) -> &'static str {
        "drop-in-order"
    }
    fn drops(&self) -> bool {
        true
    }
    fn eviction(&self, c: &Candidate) -> Eviction {
        match c.recompute_flops {
            Some(_) => Eviction::Drop,
            None => Eviction::Offload,
        }
    }
    fn rank_victims(&mut self, _: Now, c: &mut [Candidate]) {
        let rank = |c: &Candidate| self.order.iter().position(|&id| id == c.id.0);
        c.sort_by_key(|c| rank(c).unwrap_or(usize::MAX));
    }
}

/// An op reading `inputs` and writing `outputs` (activations of 1,000 bytes, named by id),
/// with the run releasing `freed` after it.
fn op(index: u32, inputs: &[u64], outputs: &[u64], freed: &[u64]) -> OpRecord {
    let act = |&id: &u64| (id, 1000, 3, id);
    OpRecord {
        t: "op".into(),
        seq: index as u64,
        step: 1,
        index,
        phase: 0,
        op: "exp".into(),
        inputs: inputs.iter().map(act).collect(),
        outputs: outputs.iter().map(act).collect(),
        idioms: [0, 0, 0, 0, 1, 0],
        flops: 5000 + index as u64,
        bytes_read: 1000,
        bytes_written: 1000,
        freed: freed.to_vec(),
        plan: Vec::new(),
        plan_source: String::new(),
        plan_reads: Vec::new(),
    }
}

/// B = f(A) with A made outside the step; C and D make room (under a 2,000-byte budget, A goes
/// first: it has no recipe, so it is offloaded; then B is dropped); then B is read again.
/// `a_freed_after` says after which op the run released A.
fn steps(a_freed_after: Option<u32>) -> Vec<OpRecord> {
    let freed = |i: u32| {
        if a_freed_after == Some(i) {
            vec![1]
        } else {
            vec![]
        }
    };
    vec![
        op(0, &[1], &[2], &freed(0)),
        op(1, &[], &[3], &freed(1)),
        op(2, &[], &[4], &freed(2)),
        // The trace records releases (E's), so buffers live until the run released them.
        op(3, &[2], &[5], &[5]),
    ]
}

fn replay(ops: &[OpRecord]) -> dynn_mm::SimResult {
    let mut policy = DropInOrder {
        order: vec![1, 2, 3, 4, 5],
    };
    simulate(ops, &mut policy, Some(2000), &DeviceProfile::a100_pcie4()).unwrap()
}

#[test]
fn recomputing_a_dropped_buffer_brings_its_recipes_inputs_back_first() {
    let r = replay(&steps(None));
    // B was recomputed with its own op's FLOPs, after A came back from the host.
    assert_eq!(r.recomputed_flops, 5000, "{r:?}");
    assert_eq!(
        r.demand_fetches, 1,
        "A fetched for B's recomputation: {r:?}"
    );
    assert_eq!(r.bytes_h2d, 1000, "{r:?}");
    // Only A was copied out: B was dropped, and what made room for A and B was dropped too
    // where it could be (C and D have recipes with no inputs).
    assert_eq!(r.bytes_d2h, 1000, "{r:?}");
}

#[test]
fn a_buffer_whose_recipe_reads_a_released_buffer_is_offloaded_not_dropped() {
    // The run released A after B was made: B can no longer be recomputed.
    let r = replay(&steps(Some(0)));
    assert_eq!(r.recomputed_flops, 0, "{r:?}");
    // B went to the host and came back: no fetch of A, which is gone.
    assert_eq!(r.bytes_d2h, 1000, "{r:?}");
    assert_eq!(r.bytes_h2d, 1000, "{r:?}");
}

#[test]
fn a_dropped_buffers_recipe_keeps_its_input_after_the_run_releases_it() {
    // A is released after B was dropped (op 2): B's recipe holds it, so B is still
    // recomputed from it, fetched back, as if A were not released.
    let (held, kept) = (replay(&steps(Some(2))), replay(&steps(None)));
    assert_eq!(held.recomputed_flops, 5000, "{held:?}");
    assert_eq!(
        (held.step_ms, held.bytes_h2d, held.bytes_d2h),
        (kept.step_ms, kept.bytes_h2d, kept.bytes_d2h)
    );
    // Once B is back, A goes: E then finds room without evicting it (as it must when the run
    // keeps A).
    assert_eq!(held.evictions + 1, kept.evictions, "{held:?} vs {kept:?}");
}
