//! Predicting a run's step from its trace: every training step after the first is replayed,
//! the evaluation ops after the last boundary are not, and the per-op cost calibrated from an
//! unlimited run reproduces that run's step.

mod common;

use common::Mlp;
use dynn_core::{Result, install_memory_hooks};
use dynn_mm::predict::{median, per_op_cost, predict, training_steps};
use dynn_mm::{
    DeviceProfile, ManagerConfig, MemoryManager, OpRecord, Policy, SimMemory, Trace, policy,
};

/// The trace of `steps` training steps of the test MLP, then a forward pass after the last
/// step boundary (as a trainer's evaluation), under lru and `budget`.
fn recorded(steps: usize, budget: Option<usize>) -> Trace {
    let mut cfg = ManagerConfig::new(policy::by_name("lru").unwrap(), budget);
    cfg.record_trace = true;
    cfg.segments = (16 << 10, 256 << 10);
    let mm = MemoryManager::new(cfg);
    {
        let _g = install_memory_hooks(mm.clone());
        let m = Mlp::new(48, 8, 1).unwrap();
        m.train(steps, 16, 2).unwrap();
        m.forward_once(16).unwrap();
    }
    mm.trace()
}

fn lru(_: &[OpRecord]) -> Result<Box<dyn Policy>> {
    policy::by_name("lru")
}

#[test]
fn the_first_step_and_the_evaluation_are_left_out() {
    let trace = recorded(4, None);
    assert_eq!(trace.steps.len(), 4);
    let last_step = trace.steps.iter().map(|s| s.step).max().unwrap();
    assert!(
        trace.ops.iter().any(|o| o.step > last_step),
        "the forward pass after the last boundary is recorded"
    );
    let steps = training_steps(&trace).unwrap();
    assert_eq!(steps, (1..=last_step).collect::<Vec<_>>());
    let prof = DeviceProfile::a100_pcie4();
    let p = predict(&trace, &mut lru, None, &prof, SimMemory::Bytes).unwrap();
    assert_eq!(p.steps_ms.len(), 3);
    // The same graph every step, nothing moved: every step takes the same time.
    assert!(
        p.steps_ms.iter().all(|&ms| (ms - p.step_ms).abs() < 1e-9),
        "{p:?}"
    );
    assert_eq!(p.median_step.step_ms, p.step_ms);
}

#[test]
fn the_per_op_cost_reproduces_the_unlimited_step() {
    let trace = recorded(3, None);
    let mut prof = DeviceProfile::h100_pcie5();
    let bare = predict(&trace, &mut lru, None, &prof, SimMemory::Bytes).unwrap();
    let unlimited_ms = bare.step_ms * 3.0 + 0.5;
    prof.launch_s = per_op_cost(&trace, &prof, unlimited_ms).unwrap();
    assert!(prof.launch_s > 0.0);
    let p = predict(&trace, &mut lru, None, &prof, SimMemory::Bytes).unwrap();
    assert!(
        (p.step_ms - unlimited_ms).abs() < 1e-6,
        "{} vs {unlimited_ms}",
        p.step_ms
    );
    // A run faster than the kernels alone leaves no cost per op.
    assert_eq!(per_op_cost(&trace, &prof, 0.0).unwrap(), 0.0);
}

#[test]
fn under_a_budget_the_prediction_is_slower_and_moves_bytes() {
    let free = recorded(3, None);
    let prof = DeviceProfile::a100_pcie4();
    let unlimited = predict(&free, &mut lru, None, &prof, SimMemory::Bytes).unwrap();
    let budget = unlimited.median_step.peak_device_bytes / 3;
    let trace = recorded(3, Some(budget));
    let memory = SimMemory::Pool(16 << 10, 256 << 10);
    let p = predict(&trace, &mut lru, Some(budget), &prof, memory).unwrap();
    assert!(p.step_ms > unlimited.step_ms, "{p:?}");
    assert!(p.median_step.bytes_h2d > 0 && p.median_step.evictions > 0);
}

#[test]
fn a_trace_without_ops_is_an_error() {
    let empty = Trace::default();
    assert!(training_steps(&empty).is_err());
    let prof = DeviceProfile::a100_pcie4();
    assert!(predict(&empty, &mut lru, None, &prof, SimMemory::Bytes).is_err());
}

#[test]
fn median_of_odd_and_even_counts() {
    assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
    assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
    assert_eq!(median(&mut []), 0.0);
}
