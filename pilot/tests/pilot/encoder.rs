//! Encoder shapes and values; the tracker's window and candidate features.

use crate::common::{act, op, param, synthetic};
use dynn_pilot::encoder::{
    CAND_DIM_IDIOMS, CandidateView, Encoding, FeatureConfig, OP_DIM_IDIOMS, OP_DIM_ONEHOT,
    OP_SLOTS, OpView, Producer, StepPosition, candidate_features, encode_op, op_features, op_slot,
};
use dynn_pilot::plan::PlanDistance;
use dynn_pilot::tracker::Query;
use dynn_pilot::{LabelConfig, Tracker, label_trace};

#[test]
fn op_features_hold_idioms_sizes_phase_and_position() {
    let r = op(0, 3, 1, "matmul", &[param(1), act(10, 0)], &[act(11, 1)]);
    let v = OpView::of_record(&r);
    assert_eq!(v.idioms, [0, 0, 0, 1, 1, 0]);
    assert_eq!(
        (v.in_bytes, v.out_bytes, v.inputs, v.outputs),
        (5120, 1024, 2, 1)
    );
    let at = StepPosition {
        position: 0.25,
        progress: 0.5,
    };
    let f = op_features(&v, at);
    assert_eq!(f.len(), OP_DIM_IDIOMS);
    assert!((f[0] - (5121f32).log2() / 32.0).abs() < 1e-6);
    assert!((f[1] - (1025f32).log2() / 32.0).abs() < 1e-6);
    assert_eq!(&f[2..9], &[0.5, 0.25, 0.0, 1.0, 0.0, 0.25, 0.5]);
    assert_eq!(&f[9..], &[0.0, 0.0, 0.0, 0.5, 0.5, 0.0]);

    let mut onehot = [0.0f32; OP_DIM_ONEHOT];
    encode_op(Encoding::OneHot, &v, at, &mut onehot);
    assert_eq!(&onehot[..9], &f[..9]);
    let slot = op_slot("matmul") as usize;
    assert_eq!(onehot[9..].iter().sum::<f32>(), 1.0);
    assert_eq!(onehot[9 + slot], 1.0);
    let names: Vec<&str> = dynn_ops::op_table().iter().map(|o| o.name).collect();
    assert!(
        names.len() < OP_SLOTS,
        "the op table outgrew the one-hot slots"
    );
    assert_eq!(names.iter().position(|n| *n == "matmul"), Some(slot));
    assert_eq!(op_slot("no_such_op") as usize, OP_SLOTS - 1);
}

#[test]
fn candidate_features_hold_kind_size_history_hints_and_producer() {
    let c = CandidateView {
        kind: 3,
        bytes: 1023,
        age: 0,
        uses_step: 1,
        uses_past: 0,
        created_this_step: true,
        last_use_position: 0.5,
        matching: true,
        hint: Some(Some(20)),
        mirror: Some(100),
        site: Some(None),
        plan: Some(PlanDistance::Beyond(40)),
        plan_last: true,
        producer: Some(Producer {
            idioms: [1, 0, 0, 0, 0, 0],
            slot: 0,
            phase: 0,
        }),
    };
    let f = candidate_features(&c);
    assert_eq!(f.len(), CAND_DIM_IDIOMS);
    assert_eq!(&f[..5], &[0.0, 0.0, 0.0, 1.0, 0.0]);
    assert!((f[5] - 10.0 / 32.0).abs() < 1e-6);
    assert_eq!(&f[6..13], &[0.0, 0.125, 0.0, 1.0, 1.0, 0.5, 1.0]);
    // Hint 20 ops → bucket "<=32", mirror 100 → "<=128", the site's "not again" → "later"
    // (each then "unknown"); then the producer's phase and idioms.
    assert_eq!(&f[13..19], &[0.0, 0.0, 1.0, 0.0, 0.0, 0.0]);
    assert_eq!(&f[19..25], &[0.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
    assert_eq!(&f[25..31], &[0.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
    // The plan: beyond it, at least 40 ops away → "<=128" and the "beyond" flag.
    assert_eq!(&f[31..40], &[0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]);
    assert_eq!(&f[40..43], &[1.0, 0.0, 0.0]);
    assert_eq!(&f[43..], &[0.5, 0.0, 0.0, 0.0, 0.0, 0.0]);
    let unknown = candidate_features(&CandidateView {
        hint: None,
        mirror: None,
        site: None,
        plan: None,
        plan_last: false,
        producer: None,
        ..c
    });
    assert_eq!(
        (unknown[18], unknown[24], unknown[30], unknown[38]),
        (1.0, 1.0, 1.0, 1.0)
    );
    assert!(unknown[39..].iter().all(|&x| x == 0.0));
    // Past the plan where the previous step tells: a bucket without flags, answered from the
    // plan (off while the step repeats the previous one, where the network reads the hint).
    let after = CandidateView {
        plan: Some(PlanDistance::After(5)),
        matching: false,
        ..c
    };
    let f = candidate_features(&after);
    assert_eq!(&f[31..40], &[0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]);
    assert_eq!(
        FeatureConfig::default().planned_bucket_of_candidate(&f),
        Some(1)
    );
    let beyond = candidate_features(&CandidateView {
        matching: false,
        ..c
    });
    assert_eq!(
        FeatureConfig::default().planned_bucket_of_candidate(&beyond),
        None
    );
}

#[test]
fn the_tracker_window_is_oldest_first_and_rows_match_the_dataset() {
    let cfg = FeatureConfig {
        window: 3,
        ..Default::default()
    };
    let t = synthetic(3, 3, 2);
    let mut tr = Tracker::new(cfg);
    let d = OP_DIM_IDIOMS;
    let mut row = vec![0.0; cfg.input_dim()];
    let q = Query {
        id: 1,
        key: 1,
        kind: 0,
        bytes: 4096,
    };
    tr.observe(&t.ops[0]);
    tr.features(&q, &mut row);
    // One op seen: two zero rows, then its features.
    assert!(row[..2 * d].iter().all(|&x| x == 0.0));
    let first = StepPosition::default();
    assert_eq!(
        &row[2 * d..3 * d],
        &op_features(&OpView::of_record(&t.ops[0]), first)
    );
    for o in &t.ops[1..4] {
        tr.observe(o);
    }
    tr.features(&q, &mut row);
    for (k, o) in t.ops[1..4].iter().enumerate() {
        let f = op_features(&OpView::of_record(o), first);
        assert_eq!(&row[k * d..(k + 1) * d], &f, "window row {k}");
    }
    // The parameter was used by op 0 (a matmul) and is 3 ops old now.
    let s = tr.state(1).expect("tracked");
    assert_eq!((s.uses_step, s.uses_past), (1, 0));
    assert!(s.producer.is_none(), "parameters are made outside ops");
    let c = tr.candidate(&q);
    assert_eq!(c.age, 3);
    // Step 0 of this trace has depth 1: matmul, relu, sum, then one backward op. Mirrored at a
    // ratio of 1, the use at forward position 0 comes 3 - 0 backward ops in, 1 is done.
    assert_eq!(t.ops[3].phase, 1);
    assert_eq!(c.mirror, Some(3 - 1));

    // The dataset rows are exactly what a tracker replaying the trace encodes.
    let ds = label_trace(
        &t,
        &LabelConfig {
            features: cfg,
            ..Default::default()
        },
    );
    assert_eq!(ds.dim, 3 * d + CAND_DIM_IDIOMS);
    assert!(
        ds.x.iter()
            .all(|x| x.is_finite() && (-0.01..=2.01).contains(x))
    );
}

#[test]
fn hints_stay_exact_when_an_op_is_inserted_earlier_in_the_step() {
    use crate::common::trace;
    let (p1, p2, p3) = (param(1), param(2), param(3));
    let body = |step: u64| {
        vec![
            op(step, 0, 0, "matmul", &[p1], &[]),
            op(step, 0, 0, "matmul", &[p2], &[]),
            op(step, 0, 0, "add", &[p1], &[]),
            op(step, 0, 0, "mul", &[p3], &[]),
            op(step, 0, 0, "sub", &[p1], &[]),
        ]
    };
    let mut second = vec![op(1, 0, 0, "relu", &[act(50, 0)], &[])];
    second.extend(body(1));
    let t = trace(vec![body(0), second]);
    let mut tr = Tracker::new(FeatureConfig::default());
    for o in &t.ops[..5] {
        tr.observe(o);
    }
    tr.step_boundary(1);
    // The extra op, then the first matmul.
    tr.observe(&t.ops[5]);
    tr.observe(&t.ops[6]);
    assert!(!tr.matching(), "the step diverged at its first op");
    let q = |id| tr.query(id).expect("tracked");
    // p1: next used 2 ops later (the add), as in the previous step.
    assert_eq!(tr.hint_for(&q(1)), Some(Some(2)));
    // p3 (not used yet this step): at the mul, 3 ops from the matmul in both steps.
    assert_eq!(tr.hint_for(&q(3)), Some(Some(3)));
    let exact = dynn_pilot::exact_labels(&t.ops);
    let label = |g: usize, id: u64| exact[g].iter().find(|l| l.0 == id).map(|l| l.1);
    assert_eq!(label(6, 1), Some(dynn_pilot::bucket(Some(2))));
    assert_eq!(label(6, 3), Some(dynn_pilot::bucket(Some(3))));
}

#[test]
fn an_empty_step_keeps_the_previous_steps_index() {
    let t = synthetic(2, 2, 5);
    let (first, second): (Vec<_>, Vec<_>) = t.ops.iter().partition(|o| o.step == t.ops[0].step);
    let mut tr = Tracker::new(FeatureConfig::default());
    for o in &first {
        tr.observe(o);
    }
    tr.step_boundary(1);
    let ids: Vec<u64> = first
        .iter()
        .flat_map(|o| o.inputs.iter().map(|a| a.0))
        .collect();
    let hints = |tr: &Tracker| -> Vec<_> {
        ids.iter()
            .filter_map(|&id| tr.query(id))
            .map(|q| tr.hint_for(&q))
            .collect()
    };
    let before = hints(&tr);
    assert!(
        before.iter().any(|h| matches!(h, Some(Some(_)))),
        "{before:?}"
    );
    // A boundary with no op since changes neither the previous step nor what it predicts.
    tr.step_boundary(2);
    assert_eq!(hints(&tr), before);
    for o in &second {
        tr.observe(o);
    }
    tr.step_boundary(3);
    assert!(!tr.previous().is_empty());
}

#[test]
fn a_buffer_past_a_plan_is_due_where_the_previous_step_used_it_after_that_plan() {
    use crate::common::trace;
    // Each step: a "norm" plan reads gradient g, then an "adam" plan reads p1 and g, then p3
    // (and a temporary of the norm pass). The second step's backward runs two ops longer, so
    // only the plans line the steps up.
    let (p1, g, p3) = (param(1), param(2), param(3));
    let step = |s: u64, extra: usize| {
        let tmp = act(11 + 100 * s, 1);
        let mut ops = vec![op(s, 0, 1, "relu", &[act(10, 0)], &[]); extra];
        ops.push(op(s, 0, 2, "matmul", &[g], &[]));
        ops.push(op(s, 0, 2, "add", &[tmp], &[]));
        ops.push(op(s, 0, 2, "mul", &[tmp], &[]));
        ops.push(op(s, 0, 2, "adam_step", &[p1, g], &[p1]));
        ops.push(op(s, 0, 2, "adam_step", &[p3, tmp], &[p3]));
        ops
    };
    let t = trace(vec![step(0, 1), step(1, 3)]);
    let mut tr = Tracker::new(FeatureConfig::default());
    let run = |tr: &mut Tracker, ops: &[dynn_mm::OpRecord], norm_at: usize| {
        for (i, o) in ops.iter().enumerate() {
            if i == norm_at {
                tr.plan("norm", &[vec![2]]);
            }
            if i == norm_at + 3 {
                tr.plan("adam", &[vec![1, 2], vec![3]]);
            }
            tr.observe(o);
        }
    };
    run(&mut tr, &t.ops[..6], 1);
    tr.step_boundary(1);
    // Three backward ops, then the norm plan's read of g (op 3 of the step).
    run(&mut tr, &t.ops[6..10], 3);
    assert_eq!(
        tr.plan_cursor().previous_end(),
        Some(4),
        "the previous step's norm plan ended before its op 4"
    );
    // Not in the norm plan, p1 and p3 were used 1 and 2 ops after its end; this plan ends 3
    // ops after the matmul, so they are due 3 and 4 ops ahead, as they are.
    let due = |tr: &Tracker, id| tr.plan_distance(&tr.query(id).expect("tracked"));
    assert_eq!(due(&tr, 1), Some(PlanDistance::After(3)));
    assert_eq!(due(&tr, 3), Some(PlanDistance::After(4)));
    // Prefetching looks as far past the plan's end: within 2 ops nothing, within 3 the
    // first adam step's p1 and g, within 4 also p3.
    let soon = |h| {
        let mut out = Vec::new();
        tr.upcoming_by_plan(h, &mut out);
        out
    };
    assert!(soon(2).is_empty(), "{:?}", soon(2));
    assert_eq!(soon(3), [1, 2]);
    assert!(soon(4).contains(&3));
    // The temporary, made since the plan: the previous step used it again before the plan
    // ended (the mul), so the plan tells nothing of it.
    tr.observe(&t.ops[10]);
    assert_eq!(due(&tr, 111), Some(PlanDistance::Unplanned));
}

#[test]
fn static_op_slots_match_the_table_lookup() {
    use dynn_pilot::encoder::{op_slot, static_op_slot};
    for o in dynn_ops::op_table() {
        assert_eq!(static_op_slot(o.name), op_slot(o.name), "{}", o.name);
        assert_eq!(static_op_slot(o.name), op_slot(o.name), "{} again", o.name);
    }
    // Two names at one address, told apart by their lengths.
    let long: &'static str = "relu_of_something_unknown";
    assert_eq!(static_op_slot(&long[..4]), op_slot("relu"));
    assert_eq!(static_op_slot(long), op_slot(long));
    assert_ne!(op_slot("relu"), op_slot(long));
    assert_eq!(static_op_slot(&long[..4]), op_slot("relu"));
}
