//! Exact next-use labels on hand-made traces; sampling; the split by step.

use crate::common::{act, op, param, synthetic, trace};
use dynn_pilot::bucket::LATER;
use dynn_pilot::{LabelConfig, exact_labels, label_trace};

#[test]
fn labels_on_a_hand_made_trace_are_exact() {
    let (p, x, y, z, x2) = (param(1), act(10, 0), act(11, 1), act(12, 2), act(20, 0));
    let t = trace(vec![
        vec![
            op(0, 0, 0, "matmul", &[p], &[x]),
            op(0, 0, 0, "relu", &[x], &[y]),
            op(0, 0, 0, "add", &[p, y], &[z]),
        ],
        vec![
            op(0, 0, 0, "matmul", &[p], &[x2]),
            op(0, 0, 0, "sum", &[x2], &[]),
        ],
    ]);
    let got = exact_labels(&t.ops);
    let want: Vec<Vec<(u64, u8)>> = vec![
        // P next used 2 ops later (<=8), X by the next op.
        vec![(1, 1), (10, 0)],
        // X is dead; P and Y are used by the next op.
        vec![(1, 0), (11, 0)],
        // P's next use is in the next step; Z is never used again (not live).
        vec![(1, LATER)],
        // P is never used again; X2 by the next op.
        vec![(20, 0)],
        vec![],
    ];
    assert_eq!(got, want);
}

#[test]
fn long_distances_fall_in_their_buckets() {
    let (p, t0) = (param(1), param(2));
    let mut ops = vec![op(0, 0, 0, "add", &[p, t0], &[])];
    for _ in 1..40 {
        ops.push(op(0, 0, 0, "sum", &[t0], &[]));
    }
    ops.push(op(0, 0, 0, "add", &[p, t0], &[]));
    let labels = exact_labels(&trace(vec![ops]).ops);
    let of = |g: usize| labels[g].iter().find(|l| l.0 == 1).map(|l| l.1);
    assert_eq!(of(0), Some(3)); // 40 ops
    assert_eq!(of(7), Some(3)); // 33
    assert_eq!(of(8), Some(2)); // 32
    assert_eq!(of(31), Some(2)); // 9
    assert_eq!(of(32), Some(1)); // 8
    assert_eq!(of(39), Some(0)); // 1
    assert_eq!(of(40), None); // dead
}

#[test]
fn sampling_keeps_exact_labels_and_splits_by_step() {
    let t = synthetic(9, 4, 1);
    let all = exact_labels(&t.ops);
    let live: usize = all.iter().map(Vec::len).sum();
    let cfg = LabelConfig {
        per_op: 2,
        ..Default::default()
    };
    let ds = label_trace(&t, &cfg);
    assert_eq!(ds.dim, cfg.features.input_dim());
    assert!(
        ds.len() < live && ds.len() > live / 8,
        "{} of {live}",
        ds.len()
    );
    let every = label_trace(
        &t,
        &LabelConfig {
            per_op: usize::MAX,
            ..cfg
        },
    );
    assert_eq!(
        every.len(),
        live,
        "without sampling every live pair is a row"
    );
    // Every sampled label is one of the exact ones at its op (class counts cannot exceed).
    let mut exact = [0u64; 5];
    for v in &all {
        for l in v {
            exact[l.1 as usize] += 1;
        }
    }
    for (b, n) in ds.class_counts().iter().enumerate() {
        assert!(*n <= exact[b]);
    }
    let (train, valid) = ds.split_by_step(0.34);
    assert_eq!(train.len() + valid.len(), ds.len());
    let last_train = train.step.iter().max().copied().unwrap_or(0);
    assert!(valid.step.iter().all(|&s| s > last_train));
    // ceil(9 × 0.34) = 4 steps validate.
    assert_eq!(valid.step.iter().min(), Some(&5));
    // Deterministic given the seed.
    assert_eq!(label_trace(&t, &cfg), ds);
}
