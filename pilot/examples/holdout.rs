//! The pilot's first evaluation: records traces of the four DyNNs, trains the pilot on three
//! and measures next-use bucket accuracy on the held-out one (the Evoformer by default), with
//! idiom features and with one-hot op names side by side.
//!
//! ```text
//! cargo run --release -p dynn-pilot --example holdout -- [steps=24] [holdout=evoformer] [--no-hint]
//! ```
//!
//! About ten seconds on two cores. The last stdout line is `{"pilot":{"accuracy_trained",
//! "accuracy_holdout","accuracy_trained_onehot","accuracy_holdout_onehot","majority_holdout",
//! "predict_us_p50",...}}`: `accuracy_trained` is on the last third of the steps of the three
//! trained DyNNs (never trained on), `accuracy_holdout` on every step of the held-out one.

use dynn_pilot::bucket::NAMES;
use dynn_pilot::eval::{Holdout, WORKLOADS, ablation, holdout, record};
use dynn_pilot::{FeatureConfig, LabelConfig, ModelConfig};
use std::time::Instant;

fn show(h: &Holdout) {
    let t = &h.trained;
    println!(
        "{:<7} train {:.3}  valid {:.3} (majority {:.3}, {} rows)  holdout {} {:.3} (majority {:.3}, {} rows)  trained in {:.1}s, predict p50 {:.2} µs",
        h.encoding.as_str(),
        t.accuracy_train,
        t.accuracy_valid,
        t.majority_valid,
        t.rows_valid,
        h.holdout,
        h.accuracy_holdout,
        h.majority_holdout,
        h.rows_holdout,
        t.seconds,
        h.predict_us_p50
    );
    println!("  hold-out confusion (rows: true bucket, columns: predicted)");
    println!("  {:>7} {}", "", NAMES.map(|n| format!("{n:>7}")).join(" "));
    for (i, row) in h.confusion_holdout.iter().enumerate() {
        println!(
            "  {:>7} {}",
            NAMES[i],
            row.map(|c| format!("{c:>7}")).join(" ")
        );
    }
}

fn main() -> dynn_core::Result<()> {
    // Kernels run partly on this thread (see `init_threads`).
    dynn_ops::cpu::init_threads();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let steps: u64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(24);
    let held = args.get(1).map(String::as_str).unwrap_or("evoformer");
    let hint = !args.iter().any(|a| a == "--no-hint");
    let started = Instant::now();
    let mut workloads = Vec::new();
    for name in WORKLOADS {
        let t = Instant::now();
        let w = record(name, steps)?;
        println!(
            "{name:<11} {} ops in {} steps, {} graphs, recorded in {:.1}s",
            w.trace.ops.len(),
            w.trace.steps.len(),
            w.trace.distinct_graphs(),
            t.elapsed().as_secs_f64()
        );
        workloads.push(w);
    }
    let base = FeatureConfig {
        hint,
        ..Default::default()
    };
    let model = ModelConfig::default();
    let mut results = Vec::new();
    for features in ablation(base) {
        let labels = LabelConfig {
            features,
            ..Default::default()
        };
        let h = holdout(&workloads, held, &labels, &model, 0.34)?;
        show(&h);
        results.push(h);
    }
    println!("total {:.1}s", started.elapsed().as_secs_f64());
    println!(
        "{{\"pilot\":{{\"holdout\":\"{held}\",\"steps\":{steps},\"hint\":{hint},\"accuracy_trained\":{:.4},\"accuracy_holdout\":{:.4},\"accuracy_trained_onehot\":{:.4},\"accuracy_holdout_onehot\":{:.4},\"majority_holdout\":{:.4},\"predict_us_p50\":{:.3},\"predict_us_p50_onehot\":{:.3}}}}}",
        results[0].trained.accuracy_valid,
        results[0].accuracy_holdout,
        results[1].trained.accuracy_valid,
        results[1].accuracy_holdout,
        results[0].majority_holdout,
        results[0].predict_us_p50,
        results[1].predict_us_p50
    );
    Ok(())
}
