//! The pilot network learns next-use buckets of a synthetic dynamic network.

use crate::common::synthetic;
use dynn_pilot::{LabelConfig, ModelConfig, train};

#[test]
fn the_model_learns_a_synthetic_trace() -> dynn_core::Result<()> {
    let t = synthetic(24, 6, 3);
    let cfg = LabelConfig {
        per_op: 3,
        ..Default::default()
    };
    let ds = dynn_pilot::label_trace(&t, &cfg);
    let (tr, va) = ds.split_by_step(0.25);
    let model = ModelConfig {
        epochs: 12,
        ..Default::default()
    };
    let (_, report) = train(&tr, &va, cfg.features, &model)?;
    println!("{report:?}");
    assert!(report.rows_valid > 100 && report.rows_train > 3 * report.rows_valid / 2);
    assert!(
        report.accuracy_valid > report.majority_valid + 0.2,
        "valid accuracy {:.3} vs majority {:.3}",
        report.accuracy_valid,
        report.majority_valid
    );
    let total: u64 = report.confusion.iter().flatten().sum();
    assert_eq!(total as usize, report.rows_valid);
    // The breakdown by phase and answer covers the same rows and misses; the synthetic
    // network's forward and backward passes both have rows.
    let s = report.sources;
    let rows: u64 = s.rows.iter().flatten().sum();
    let misses: u64 = s.misses.iter().flatten().sum();
    let hits: u64 = (0..report.confusion.len())
        .map(|b| report.confusion[b][b])
        .sum();
    assert_eq!(rows as usize, report.rows_valid);
    assert_eq!(misses, total - hits);
    assert!(s.rows[0].iter().sum::<u64>() > 0 && s.rows[1].iter().sum::<u64>() > 0);
    assert!(s.summary().contains("forward network"), "{}", s.summary());
    Ok(())
}
