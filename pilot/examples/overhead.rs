//! Where the pilot's time goes while a DyNN trains under it: the policy's time on the critical
//! path (observe, rank, upcoming, step boundary) against the step time, for `pilot` and `lru`.
//!
//! ```text
//! cargo run --release -p dynn-pilot --example overhead -- [workload] [steps] [budget] [device]
//! ```
//!
//! `workload` is one of the small evaluation DyNNs (`early_exit`, `moe`, `tree_lstm`,
//! `evoformer`), or one at its example trainer's default size (`early_exit_full`, `moe_full`,
//! `tree_lstm_full`, `evoformer_full`). `device` is `cpu` (the default) or, for the `_full`
//! workloads, `cuda` / `cuda:N` (`scripts/gpu-check.sh pilot`).

use dynn_core::{Device, Result};
use dynn_models::train::{Defaults, Outcome, TrainArgs, train};
use dynn_pilot::{PilotConfig, PilotPolicy, StatsSink};
use std::sync::LazyLock;

/// The counters of the pilot runs, pushed when each run's policy is dropped.
static STATS: LazyLock<StatsSink> = LazyLock::new(StatsSink::default);

/// Trains `steps` steps of a DyNN as its example trainer builds it by default (`*_full`), on
/// `device`.
fn full(name: &str, steps: u64, policy: &str, budget: &str, device: &str) -> Result<Outcome> {
    use dynn_models::models::early_exit::{EarlyExitConfig, EarlyExitTask, TextSource};
    use dynn_models::models::evoformer::{EvoformerConfig, EvoformerTask};
    use dynn_models::models::moe::{MoeConfig, MoeTask};
    use dynn_models::models::tree_lstm::{DEFAULTS, TreeLstmConfig, TreeLstmTask};
    let args = TrainArgs {
        steps: Some(steps),
        policy: Some(policy.to_string()),
        device_budget: budget.to_string(),
        device: device.to_string(),
        quiet: true,
        // NO_EVICT_AHEAD=1: evict only on demand (the trainers' `--no-evict-ahead`).
        no_evict_ahead: std::env::var("NO_EVICT_AHEAD").is_ok_and(|v| v == "1"),
        ..Default::default()
    };
    let dev: Device = device.parse()?;
    // The trainers' own defaults (examples/train_*.rs).
    let lm = Defaults {
        steps,
        batch: 16,
        lr: 3e-3,
    };
    match name {
        "early_exit_full" => train(&args, lm, || {
            let text = TextSource {
                path: None,
                vocab: 512,
            };
            EarlyExitTask::new(&EarlyExitConfig::default(), &text, 0, dev)
        }),
        "moe_full" => train(&args, lm, || {
            MoeTask::new(&MoeConfig::default(), None, 0, dev)
        }),
        "tree_lstm_full" => train(&args, Defaults { steps, ..DEFAULTS }, || {
            TreeLstmTask::new(TreeLstmConfig::default(), 0, dev)
        }),
        "evoformer_full" => {
            let defaults = Defaults {
                steps,
                batch: 8,
                lr: 5e-3,
            };
            train(&args, defaults, || {
                EvoformerTask::new(EvoformerConfig::default(), 0, dev)
            })
        }
        _ if dev != Device::Cpu => Err(dynn_core::Error::invalid(
            "overhead",
            format!("{name} runs on the CPU only; on {device}, use a *_full workload"),
        )),
        _ => dynn_pilot::eval::train_under(name, steps, policy, budget),
    }
}

fn main() -> Result<()> {
    // Kernels run partly on this thread (see `init_threads`).
    dynn_ops::cpu::init_threads();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = args.first().map(String::as_str).unwrap_or("early_exit");
    let steps: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(40);
    let budget = args.get(2).map(String::as_str).unwrap_or("25%");
    let device = args.get(3).map(String::as_str).unwrap_or("cpu");
    dynn_mm::policy::register_policy("pilot-probe", || {
        // As the trainers run it. PILOT_THREAD=1 replays ops on a thread of the pilot's own
        // (`PilotConfig::replay_thread`). PILOT_RETRAIN=0 trains once after the warm-up;
        // unset, the default (every 8 steps).
        let mut cfg = PilotConfig {
            replay_thread: std::env::var("PILOT_THREAD").is_ok_and(|v| v == "1"),
            ..PilotConfig::default()
        };
        if let (Some(o), Some(n)) = (
            cfg.online.as_mut(),
            std::env::var("PILOT_RETRAIN")
                .ok()
                .and_then(|v| v.parse().ok()),
        ) {
            o.retrain_every = n;
        }
        Box::new(PilotPolicy::new(cfg).report_to(STATS.clone()))
    });
    for policy in ["lru", "pilot-probe"] {
        let out = full(name, steps, policy, budget, device)?;
        let step_s = out.summary.step_ms_mean * 1e-3 * steps as f64;
        print!(
            "{name} {policy:<12} {budget}: {:.2} ms/step, {} ops/step, {} evictions, {} demand fetches",
            out.summary.step_ms_mean,
            out.report.stats.ops / steps.max(1),
            out.report.stats.evictions,
            out.report.stats.demand_fetches
        );
        if policy == "pilot-probe" {
            let s = STATS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop()
                .unwrap_or_default();
            println!(
                "\n  pilot: {:.1}% of the run on the critical path (observe {:.1} ms, rank {:.1} ms, upcoming {:.1} ms, boundary {:.1} ms; replay thread {:.1} ms off it); {} predictions, {} rankings ({} LRU before training; {} candidates offered, {} ranked), {} swaps",
                100.0 * s.critical_seconds() / step_s,
                s.observe_ns as f64 * 1e-6,
                s.rank_ns as f64 * 1e-6,
                s.upcoming_ns as f64 * 1e-6,
                s.boundary_ns as f64 * 1e-6,
                s.background_ns as f64 * 1e-6,
                s.predictions,
                s.pilot_rankings,
                s.lru_rankings,
                s.offered,
                s.candidates,
                s.swaps
            );
        } else {
            println!();
        }
    }
    Ok(())
}
