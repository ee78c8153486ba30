//! The pilot policy: LRU until trained, predictions after; registered by name; it drops what is
//! cheaper to recompute than to copy; offloading and dropping under it change no bit of
//! training.

use crate::common::synthetic;
use dynn_core::{BufferId, BufferKind, DType, Device, Error, Result};
use dynn_mm::{Candidate, DeviceProfile, Eviction, Now, OpRecord, Policy, policy, simulate};
use dynn_models::data::{TextDataset, generated_corpus};
use dynn_models::models::early_exit::{EarlyExitConfig, EarlyExitTask};
use dynn_models::nn::Param;
use dynn_models::train::{Defaults, Outcome, TrainArgs, train};
use dynn_pilot::{
    LabelConfig, ModelConfig, OnlineConfig, PilotConfig, PilotPolicy, RecomputeCosts, StatsSink,
    label_trace,
};
use std::sync::{Arc, LazyLock};

fn cand(id: u64, last_use: u64) -> Candidate {
    Candidate {
        id: BufferId(id),
        key: id,
        bytes: 1024,
        kind: BufferKind::Activation,
        last_use,
        uses: 1,
        recompute_flops: None,
    }
}

#[test]
fn untrained_it_ranks_like_lru() {
    let mut p = PilotPolicy::new(PilotConfig {
        online: None,
        ..Default::default()
    });
    let mut c = vec![cand(3, 9), cand(1, 4), cand(2, 4), cand(4, 0)];
    p.rank_victims(Now::default(), &mut c);
    let ids: Vec<u64> = c.iter().map(|c| c.id.0).collect();
    assert_eq!(ids, [4, 1, 2, 3]);
    let mut soon = Vec::new();
    p.upcoming(Now::default(), 8, &mut soon);
    assert!(soon.is_empty());
    assert_eq!(p.stats().lru_rankings, 1);
}

#[test]
fn registered_by_name() -> Result<()> {
    dynn_pilot::register();
    assert_eq!(policy::by_name("pilot")?.name(), "pilot");
    assert!(policy::policy_names().contains(&"pilot"));
    Ok(())
}

#[test]
fn the_registered_pilot_takes_its_device_costs_from_a_profile_name() {
    use dynn_pilot::configured_policy;
    assert!(configured_policy(None, Some("a100-pcie4")).drops());
    assert!(configured_policy(None, Some("calibrated:1e11,2.7e10,1.6e10")).drops());
    // Unset, or a name that does not parse: offload only.
    assert!(!configured_policy(None, None).drops());
    assert!(!configured_policy(None, Some("a100-pcie9")).drops());
    // Weights that do not load: it warms up from scratch.
    let p = configured_policy(
        Some(std::path::Path::new("/nonexistent/pilot.safetensors")),
        None,
    );
    assert!(p.snapshot().is_none());
}

/// The simulated peak of `step` with no budget.
fn unlimited_peak(step: &[OpRecord]) -> Result<usize> {
    let mut none = policy::by_name("none")?;
    let r = simulate(step, none.as_mut(), None, &DeviceProfile::a100_pcie4())?;
    Ok(r.peak_device_bytes)
}

/// Replays the last step of a synthetic trace under a budget; the policy saw the step before.
fn replay(p: &mut dyn Policy, steps: &[Vec<OpRecord>], budget: usize) -> Result<f64> {
    for op in &steps[steps.len() - 2] {
        op.announce_to(p);
        p.observe(op);
    }
    p.step_boundary(steps.len() as u64 - 1);
    let r = simulate(
        &steps[steps.len() - 1],
        p,
        Some(budget),
        &DeviceProfile::a100_pcie4(),
    )?;
    Ok(r.step_ms)
}

#[test]
fn trained_it_predicts_and_survives_the_simulator() -> Result<()> {
    let t = synthetic(16, 6, 9);
    let labels = LabelConfig::default();
    let ds = label_trace(&t, &labels);
    let (tr, va) = ds.split_by_step(0.25);
    let (snap, _) = dynn_pilot::train(&tr, &va, labels.features, &ModelConfig::default())?;
    let steps: Vec<Vec<OpRecord>> = (0..16).map(|s| t.step_ops(s)).collect();
    let peak = unlimited_peak(&steps[15])?;
    for replay_when_matching in [false, true] {
        let mut p = PilotPolicy::with_snapshot(
            snap.clone(),
            PilotConfig {
                online: None,
                replay_when_matching,
                ..Default::default()
            },
        );
        let ms = replay(&mut p, &steps, peak / 2)?;
        let lru = replay(policy::by_name("lru")?.as_mut(), &steps, peak / 2)?;
        println!("pilot {ms:.4} ms, lru {lru:.4} ms, {:?}", p.stats());
        assert!(p.stats().pilot_rankings > 0 && p.stats().lru_rankings == 0);
        if !replay_when_matching {
            assert!(p.stats().predictions > 0);
        }
    }
    Ok(())
}

/// Every buffer of `ops`, as eviction candidates last used where the ops last touched them.
fn candidates(ops: &[OpRecord]) -> Vec<Candidate> {
    let mut last = std::collections::BTreeMap::new();
    for (i, o) in ops.iter().enumerate() {
        for a in o.inputs.iter().chain(&o.outputs) {
            last.insert(a.0, (*a, i as u64));
        }
    }
    last.into_values()
        .map(|(a, i)| Candidate {
            id: BufferId(a.0),
            key: a.3,
            bytes: a.1 as usize,
            kind: dynn_mm::trace::kind_of(a.2),
            last_use: i,
            uses: 1,
            recompute_flops: None,
        })
        .collect()
}

/// Replays `steps` through a pilot that observes each op at once and one that queues four,
/// asking both for rankings and prefetches as the simulator does. Returns how many compared
/// prefetch lists were non-empty.
fn compare_queued(steps: &[Vec<OpRecord>], pilot: impl Fn(usize) -> PilotPolicy) -> usize {
    let (mut each, mut queued) = (pilot(1), pilot(4));
    let (mut soon_each, mut soon_queued) = (Vec::new(), Vec::new());
    let mut compared = 0;
    let late = steps.len() * 2 / 3;
    for (s, ops) in steps.iter().enumerate() {
        for (i, op) in ops.iter().enumerate() {
            for p in [&mut each, &mut queued] {
                op.announce_to(p);
                p.observe(op);
            }
            let now = Now::default();
            // Late steps: no rankings, so replays come only from the queue filling up.
            let ranked = s < late && i % 3 == 0;
            if ranked {
                let mut a = candidates(&ops[..=i]);
                let mut b = a.clone();
                each.rank_victims(now, &mut a);
                queued.rank_victims(now, &mut b);
                assert_eq!(a, b, "step {s}, op {i}: the rankings differ");
            }
            soon_each.clear();
            soon_queued.clear();
            each.upcoming(now, 8, &mut soon_each);
            queued.upcoming(now, 8, &mut soon_queued);
            // Just caught up (by the ranking, or by a plan announced before this op), the
            // queued pilot looks 3 ops further ahead; in between, its list may miss what was
            // announced since.
            if ranked || !op.plan.is_empty() {
                let missing: Vec<_> = soon_each
                    .iter()
                    .filter(|k| !soon_queued.contains(k))
                    .collect();
                assert!(
                    missing.is_empty(),
                    "step {s}, op {i}: {missing:?} not prefetched"
                );
                compared += usize::from(!soon_each.is_empty());
            }
        }
        for p in [&mut each, &mut queued] {
            p.step_boundary(s as u64 + 1);
        }
    }
    assert_eq!(each.stats().predictions, queued.stats().predictions);
    assert_eq!(each.tracker().clock(), queued.tracker().clock());
    assert!(each.stats().pilot_rankings > 0);
    compared
}

#[test]
fn queued_ops_replay_into_the_same_decisions() -> Result<()> {
    // A synthetic DyNN, ranked by a trained snapshot (and by the replayed step).
    let t = synthetic(12, 6, 5);
    let labels = LabelConfig::default();
    let (tr, va) = label_trace(&t, &labels).split_by_step(0.25);
    let (snap, _) = dynn_pilot::train(&tr, &va, labels.features, &ModelConfig::default())?;
    let steps: Vec<Vec<OpRecord>> = (0..12).map(|s| t.step_ops(s)).collect();
    for replay_when_matching in [false, true] {
        let compared = compare_queued(&steps, |batch_ops| {
            PilotPolicy::with_snapshot(
                snap.clone(),
                PilotConfig {
                    online: None,
                    batch_ops,
                    replay_when_matching,
                    ..Default::default()
                },
            )
        });
        assert!(compared > 0, "no prefetch list was compared");
    }
    // A real DyNN's trace, whose backward passes and optimizer steps announce plans and plan
    // reads: untrained, only the plan guides the pilot.
    let w = dynn_pilot::eval::record("tree_lstm", 3)?;
    let steps: Vec<Vec<OpRecord>> = (0..3).map(|s| w.trace.step_ops(s)).collect();
    let compared = compare_queued(&steps, |batch_ops| {
        PilotPolicy::new(PilotConfig {
            online: None,
            batch_ops,
            ..Default::default()
        })
    });
    assert!(compared > 0, "no plan-guided prefetch list was compared");
    Ok(())
}

#[test]
fn replayed_on_a_thread_of_its_own_it_ranks_the_same() -> Result<()> {
    // A real DyNN's plans and a synthetic one's trained snapshot: every ranking waits for the
    // replays, so only the prefetch lists (computed when the thread is idle) may differ.
    let w = dynn_pilot::eval::record("tree_lstm", 3)?;
    let t = synthetic(12, 6, 5);
    let labels = LabelConfig::default();
    let (tr, va) = label_trace(&t, &labels).split_by_step(0.25);
    let (snap, _) = dynn_pilot::train(&tr, &va, labels.features, &ModelConfig::default())?;
    for (trace, snapshot) in [(&w.trace, None), (&t, Some(&snap))] {
        let pilot = |replay_thread| {
            let cfg = PilotConfig {
                online: None,
                replay_thread,
                ..Default::default()
            };
            match snapshot {
                Some(s) => PilotPolicy::with_snapshot(s.clone(), cfg),
                None => PilotPolicy::new(cfg),
            }
        };
        let (mut here, mut there) = (pilot(false), pilot(true));
        assert!(!here.replays_in_background() && there.replays_in_background());
        let mut soon = Vec::new();
        let steps = trace.steps.len() as u64;
        for s in 0..steps {
            let ops = trace.step_ops(s);
            for (i, op) in ops.iter().enumerate() {
                for p in [&mut here, &mut there] {
                    op.announce_to(p);
                    p.observe(op);
                    p.upcoming(Now::default(), 8, &mut soon);
                }
                if i % 3 == 0 {
                    let mut a = candidates(&ops[..=i]);
                    let mut b = a.clone();
                    here.rank_victims(Now::default(), &mut a);
                    there.rank_victims(Now::default(), &mut b);
                    assert_eq!(a, b, "step {s}, op {i}: the rankings differ");
                }
            }
            for p in [&mut here, &mut there] {
                p.step_boundary(s + 1);
            }
        }
        assert_eq!(here.tracker().clock(), there.tracker().clock());
        assert_eq!(here.stats().predictions, there.stats().predictions);
        assert!(here.stats().pilot_rankings > 0);
    }
    Ok(())
}

#[test]
fn the_announced_plan_guides_it_before_any_training() -> Result<()> {
    // A real DyNN's trace: its backward passes and optimizer steps carry their plans.
    let w = dynn_pilot::eval::record("tree_lstm", 3)?;
    assert!(
        w.trace.ops.iter().any(|o| !o.plan.is_empty()),
        "no plan recorded"
    );
    assert!(
        w.trace.ops.iter().any(|o| !o.plan_reads.is_empty()),
        "no plan reads recorded"
    );
    let steps: Vec<Vec<OpRecord>> = (0..3).map(|s| w.trace.step_ops(s)).collect();
    let peak = unlimited_peak(&steps[2])?;
    for share in [2, 3] {
        let budget = peak / share;
        // No snapshot and no online training: only the plan can guide it.
        let mut p = PilotPolicy::new(PilotConfig {
            online: None,
            ..Default::default()
        });
        let pilot = replay(&mut p, &steps, budget)?;
        let lru = replay(policy::by_name("lru")?.as_mut(), &steps, budget)?;
        println!(
            "1/{share}: plan-guided pilot {pilot:.4} ms, lru {lru:.4} ms, {:?}",
            p.stats()
        );
        assert!(
            p.stats().pilot_rankings > 0,
            "the plan never guided a ranking"
        );
        assert_eq!(p.stats().predictions, 0, "no snapshot, no predictions");
        assert!(pilot <= lru, "1/{share}: {pilot} ms against lru's {lru} ms");
    }
    Ok(())
}

/// The counters of the probes, pushed when each one's policy is dropped.
static STATS: LazyLock<StatsSink> = LazyLock::new(StatsSink::default);

fn probe() -> Box<dyn Policy> {
    Box::new(
        PilotPolicy::new(PilotConfig {
            online: Some(OnlineConfig {
                warmup_steps: 2,
                epochs_first: 3,
                model: ModelConfig {
                    hidden: 32,
                    ..Default::default()
                },
                labels: LabelConfig {
                    per_op: 2,
                    ..Default::default()
                },
                ..Default::default()
            }),
            wait_for_training: true,
            // Rank with the model even where the step repeats the previous one.
            replay_when_matching: false,
            // Costs under which the cheapest activations are dropped and recomputed, so both
            // ways out of the device are exercised.
            recompute: Some(RecomputeCosts {
                flops_per_sec: 1e12,
                link_bytes_per_sec: 1e9,
                copy_latency_s: 0.0,
                launch_s: 1e-6,
            }),
            // Ops replayed on the pilot's own thread, inside a real memory manager.
            replay_thread: true,
            ..Default::default()
        })
        .report_to(STATS.clone()),
    )
}

fn values(params: &[Param]) -> Result<Vec<(String, Vec<u32>)>> {
    params
        .iter()
        .map(|p| {
            Ok((
                p.path().to_string(),
                p.to_vec::<f32>()?.iter().map(|v| v.to_bits()).collect(),
            ))
        })
        .collect()
}

#[test]
fn with_device_costs_it_drops_what_is_cheaper_to_recompute() {
    let costs = RecomputeCosts {
        flops_per_sec: 1e12,
        link_bytes_per_sec: 1e10,
        copy_latency_s: 0.0,
        launch_s: 1e-6,
    };
    // A 1 MB buffer takes 100 µs over the link.
    let cand = |kind, flops| Candidate {
        id: BufferId(1),
        key: 1,
        bytes: 1_000_000,
        kind,
        last_use: 0,
        uses: 1,
        recompute_flops: flops,
    };
    let cheap = cand(BufferKind::Activation, Some(1_000_000));
    let costly = cand(BufferKind::Activation, Some(1_000_000_000));
    let param = cand(BufferKind::Parameter, Some(1_000));
    let no_recipe = cand(BufferKind::Activation, None);
    let with = PilotPolicy::new(PilotConfig {
        online: None,
        recompute: Some(costs),
        ..Default::default()
    });
    assert_eq!(with.eviction(&cheap), Eviction::Drop);
    for c in [costly, param, no_recipe] {
        assert_eq!(with.eviction(&c), Eviction::Offload, "{c:?}");
    }
    let without = PilotPolicy::new(PilotConfig {
        online: None,
        ..Default::default()
    });
    assert_eq!(without.eviction(&cheap), Eviction::Offload);
}

#[test]
fn offloading_under_the_pilot_changes_no_bit() -> Result<()> {
    dynn_mm::policy::register_policy("pilot-probe", probe);
    let data = Arc::new(TextDataset::new(&generated_corpus(3, 20_000), 256)?);
    let cfg = EarlyExitConfig {
        dim: 64,
        heads: 2,
        layers: 3,
        seq: 12,
        threshold: 0.012,
        dropout: 0.1,
        ..Default::default()
    };
    let defaults = Defaults {
        steps: 5,
        batch: 8,
        lr: 1e-2,
    };
    let run = |policy: Option<&str>, budget: &str| -> Result<Outcome> {
        let args = TrainArgs {
            policy: policy.map(str::to_string),
            device_budget: budget.to_string(),
            quiet: true,
            ..Default::default()
        };
        let (cfg, data) = (cfg.clone(), data.clone());
        train(&args, defaults, move || {
            EarlyExitTask::with_data(&cfg, data.clone(), 7, DType::F32, Device::Cpu)
        })
    };
    let base = run(None, "unlimited")?;
    let out = run(Some("pilot-probe"), "50%").map_err(|e| Error::Msg(format!("pilot: {e}")))?;
    assert!(out.summary.peak_device_bytes < base.summary.peak_device_bytes);
    let moved = &out.report.stats;
    assert!(moved.evictions > 0, "the budget forced offloading");
    assert!(
        moved.drops > 0 && moved.recomputes > 0,
        "cheap activations were dropped and recomputed: {moved:?}"
    );
    assert!(moved.bytes_d2h > 0, "the others were offloaded: {moved:?}");
    assert_eq!(out.losses, base.losses, "losses");
    assert_eq!(values(&out.params)?, values(&base.params)?, "parameters");
    let stats = STATS.lock().unwrap().pop().expect("the probe was dropped");
    println!("{stats:?}");
    assert!(stats.swaps >= 1, "the online trainer published a snapshot");
    assert!(stats.predictions > 0, "the trained pilot ranked victims");
    assert!(
        stats.background_ns > 0,
        "ops were replayed on the pilot's thread"
    );
    Ok(())
}
