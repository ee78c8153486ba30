//! Offloading never changes a bit: training under every policy and budget gives the same
//! parameters and losses as training with unlimited memory.

mod common;

use common::Mlp;
use dynn_core::{Error, install_memory_hooks};
use dynn_mm::{ManagerConfig, MemoryManager, TransferConfig, policy};

const STEPS: usize = 3;
const BATCH: usize = 16;

fn reference() -> (Vec<u32>, Vec<Vec<u32>>) {
    let m = Mlp::new(48, 8, 1).unwrap();
    let losses = m.train(STEPS, BATCH, 2).unwrap();
    (
        losses.into_iter().map(f32::to_bits).collect(),
        m.bits().unwrap(),
    )
}

/// Peak device bytes of the unlimited run, measured by the manager.
fn config(policy_name: &str, budget: Option<usize>) -> dynn_core::Result<ManagerConfig> {
    let mut cfg = ManagerConfig::new(policy::by_name(policy_name)?, budget);
    // Segments sized for a model of a few hundred KiB.
    cfg.segments = (16 << 10, 64 << 10);
    Ok(cfg)
}

fn unlimited_peak() -> usize {
    let mm = MemoryManager::new(config("none", None).unwrap());
    let _g = install_memory_hooks(mm.clone());
    let m = Mlp::new(48, 8, 1).unwrap();
    m.train(STEPS, BATCH, 2).unwrap();
    mm.stats().peak_device_bytes
}

type Run = (Vec<u32>, Vec<Vec<u32>>, dynn_mm::MemoryStats);

fn run(policy_name: &str, budget: usize, transfer: TransferConfig) -> dynn_core::Result<Run> {
    run_with(policy_name, budget, transfer, false)
}

/// [`run`], with background write-backs on or off.
fn run_with(
    policy_name: &str,
    budget: usize,
    transfer: TransferConfig,
    write_back: bool,
) -> dynn_core::Result<Run> {
    let mut cfg = config(policy_name, Some(budget))?;
    cfg.transfer = transfer;
    cfg.write_back = write_back;
    let mm = MemoryManager::new(cfg);
    let _g = install_memory_hooks(mm.clone());
    let m = Mlp::new(48, 8, 1)?;
    let losses = m.train(STEPS, BATCH, 2)?;
    Ok((
        losses.into_iter().map(f32::to_bits).collect(),
        m.bits()?,
        mm.stats(),
    ))
}

#[test]
fn every_policy_and_budget_is_bit_identical() {
    let (ref_losses, ref_params) = reference();
    let peak = unlimited_peak();
    assert!(peak > 0);
    for policy_name in ["lru", "static", "recompute", "belady"] {
        for frac in [1.0, 0.5, 0.25, 0.1] {
            let budget = (peak as f64 * frac) as usize;
            let (losses, params, stats) = run(policy_name, budget, TransferConfig::default())
                .unwrap_or_else(|e| panic!("{policy_name} at {frac}: {e}"));
            assert_eq!(losses, ref_losses, "{policy_name} at {frac}: losses differ");
            assert_eq!(
                params, ref_params,
                "{policy_name} at {frac}: parameters differ"
            );
            assert!(
                stats.peak_device_bytes <= budget,
                "{policy_name} at {frac}: peak {} over budget {budget}",
                stats.peak_device_bytes
            );
            if frac < 1.0 {
                assert!(
                    stats.evictions + stats.drops > 0,
                    "{policy_name} at {frac}: nothing was evicted"
                );
            }
        }
    }
}

#[test]
fn none_fails_below_peak_with_a_report() {
    let peak = unlimited_peak();
    let err = run("none", peak / 2, TransferConfig::default()).unwrap_err();
    let Error::OutOfMemory {
        requested,
        budget,
        msg,
    } = &err
    else {
        panic!("expected OutOfMemory, got {err}")
    };
    assert!(*requested > 0 && *budget == peak / 2);
    assert!(
        msg.contains("largest resident buffers") && msg.contains("hint"),
        "{msg}"
    );
    assert!(
        run("none", peak, TransferConfig::default()).is_ok(),
        "the unlimited peak is enough for `none`"
    );
}

#[test]
fn delayed_transfers_change_nothing() {
    let (ref_losses, ref_params) = reference();
    let peak = unlimited_peak();
    let slow = TransferConfig {
        link_bytes_per_sec: None,
        random_delay_us: Some((9, 300)),
    };
    for policy_name in ["lru", "belady"] {
        let (losses, params, _) = run(policy_name, peak / 4, slow).unwrap();
        assert_eq!(
            (losses, params),
            (ref_losses.clone(), ref_params.clone()),
            "{policy_name}"
        );
    }
}

#[test]
fn a_budget_below_one_op_is_a_clear_error() {
    let err = run("lru", 4096, TransferConfig::default()).unwrap_err();
    assert!(matches!(err, Error::OutOfMemory { .. }), "{err}");
    assert!(
        err.to_string().contains("in use by this op") || err.to_string().contains("out of memory"),
        "{err}"
    );
}

#[test]
fn accounting_returns_to_zero_when_tensors_are_released() {
    for policy_name in ["lru", "recompute", "belady"] {
        let mm = MemoryManager::new(config(policy_name, Some(200_000)).unwrap());
        {
            let _g = install_memory_hooks(mm.clone());
            let m = Mlp::new(48, 8, 1).unwrap();
            m.train(2, BATCH, 2).unwrap();
        }
        let report = mm.report();
        assert_eq!(report.pool.in_use, 0, "{policy_name}: {report}");
        assert_eq!(report.device_by_kind, [0; 5], "{policy_name}");
        assert_eq!(report.host_bytes, 0, "{policy_name}");
    }
}

#[test]
fn uninstalling_the_manager_brings_every_buffer_back() {
    let peak = unlimited_peak();
    for policy_name in ["lru", "recompute"] {
        let mm = MemoryManager::new(config(policy_name, Some(peak / 4)).unwrap());
        let m = {
            let _g = install_memory_hooks(mm.clone());
            let m = Mlp::new(48, 8, 1).unwrap();
            m.train(STEPS, BATCH, 2).unwrap();
            let moved = m
                .params
                .iter()
                .filter(|p| p.buffer().residency() != dynn_core::Residency::Device);
            assert!(
                moved.count() > 0,
                "{policy_name}: the budget moved no parameter"
            );
            m
        };
        for p in &m.params {
            assert_eq!(
                p.buffer().residency(),
                dynn_core::Residency::Device,
                "{policy_name}"
            );
        }
        // Without hooks, ops on the parameters run (they are resident) and see the same bits.
        let (_, ref_params) = reference();
        assert_eq!(m.bits().unwrap(), ref_params, "{policy_name}");
        let _ = m.train(1, BATCH, 3).unwrap();
    }
}

/// Answers `Drop` for every victim without asking the manager to keep recipes.
struct DropsWithoutRecipes;

impl dynn_mm::Policy for DropsWithoutRecipes {
    fn name(&self) -> &'static str {
        "drops-without-recipes"
    }
    fn rank_victims(&mut self, _: dynn_mm::Now, c: &mut [dynn_mm::Candidate]) {
        c.sort_by_key(|c| (c.last_use, c.id));
    }
    fn eviction(&self, _: &dynn_mm::Candidate) -> dynn_mm::Eviction {
        dynn_mm::Eviction::Drop
    }
}

#[test]
fn a_drop_without_a_recipe_is_offloaded_instead() {
    let (ref_losses, ref_params) = reference();
    let budget = unlimited_peak() / 4;
    let mut cfg = ManagerConfig::new(Box::new(DropsWithoutRecipes), Some(budget));
    cfg.segments = (16 << 10, 64 << 10);
    let mm = MemoryManager::new(cfg);
    let _g = install_memory_hooks(mm.clone());
    let m = Mlp::new(48, 8, 1).unwrap();
    let losses: Vec<u32> = m
        .train(STEPS, BATCH, 2)
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect();
    assert_eq!(losses, ref_losses, "losses");
    assert_eq!(m.bits().unwrap(), ref_params, "parameters");
    let stats = mm.stats();
    assert!(stats.evictions > 0, "the budget forced evictions");
    assert_eq!(stats.drops, 0, "nothing without a recipe was dropped");
}

#[test]
fn background_write_backs_change_nothing() {
    let (ref_losses, ref_params) = reference();
    let peak = unlimited_peak();
    // Delayed copies widen the window in which an op writes a buffer being written back.
    // Write-backs are opportunistic (on a loaded machine the executor may evict or free a
    // buffer before its copy runs): identity must hold however many land; sim.rs checks that
    // they do.
    let slow = TransferConfig {
        link_bytes_per_sec: None,
        random_delay_us: Some((5, 200)),
    };
    for policy_name in ["lru", "belady"] {
        for transfer in [TransferConfig::default(), slow] {
            let (losses, params, stats) = run_with(policy_name, peak / 4, transfer, true).unwrap();
            assert_eq!(
                (losses, params),
                (ref_losses.clone(), ref_params.clone()),
                "{policy_name}, write-backs on, {transfer:?}"
            );
            assert!(stats.evictions > 0, "{policy_name}: {stats:?}");
        }
    }
}
