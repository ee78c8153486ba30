//! The simulator replays a recorded step deterministically; the offline optimum (belady with
//! the step's own profile) is faster and stalls less than lru at budgets below the peak.

mod common;

use common::Mlp;
use dynn_core::{Error, install_memory_hooks};
use dynn_mm::policy::{Belady, Profile};
use dynn_mm::{
    DeviceProfile, ManagerConfig, MemoryManager, OpRecord, SimMemory, SimResult, policy, simulate,
    simulate_with,
};

/// The ops of the second training step of the test MLP, recorded without a budget.
fn recorded_step() -> Vec<OpRecord> {
    let mut cfg = ManagerConfig::new(policy::by_name("none").unwrap(), None);
    cfg.record_trace = true;
    let mm = MemoryManager::new(cfg);
    {
        let _g = install_memory_hooks(mm.clone());
        let m = Mlp::new(48, 8, 1).unwrap();
        m.train(3, 16, 2).unwrap();
    }
    let trace = mm.trace();
    assert_eq!(trace.steps.len(), 3);
    trace.step_ops(1)
}

/// `ops` replayed under the built-in policy `name`.
fn replay(
    ops: &[OpRecord],
    name: &str,
    budget: Option<usize>,
    prof: &DeviceProfile,
) -> dynn_core::Result<SimResult> {
    simulate(ops, policy::by_name(name)?.as_mut(), budget, prof)
}

/// The peak device bytes of `ops` replayed without a budget.
fn unlimited_peak(ops: &[OpRecord], prof: &DeviceProfile) -> usize {
    replay(ops, "none", None, prof).unwrap().peak_device_bytes
}

#[test]
fn replay_is_deterministic_and_free_without_a_budget() {
    let ops = recorded_step();
    let prof = DeviceProfile::a100_pcie4();
    let a = replay(&ops, "none", None, &prof).unwrap();
    let b = replay(&ops, "none", None, &prof).unwrap();
    assert_eq!(a, b);
    assert!(a.step_ms > 0.0 && a.peak_device_bytes > 0);
    assert_eq!(
        (a.stall_ms, a.bytes_h2d, a.bytes_d2h, a.evictions),
        (0.0, 0, 0, 0)
    );
    assert!(
        (a.step_ms - a.compute_ms).abs() < 1e-9,
        "no budget: all time is compute"
    );
}

#[test]
fn none_fails_below_the_peak() {
    let ops = recorded_step();
    let prof = DeviceProfile::a100_pcie4();
    let peak = unlimited_peak(&ops, &prof);
    let err = replay(&ops, "none", Some(peak / 2), &prof).unwrap_err();
    assert!(matches!(err, Error::OutOfMemory { .. }), "{err}");
    assert!(replay(&ops, "none", Some(peak), &prof).is_ok());
}

#[test]
fn belady_beats_lru_below_the_peak() {
    let ops = recorded_step();
    let prof = DeviceProfile::a100_pcie4();
    let peak = unlimited_peak(&ops, &prof);
    for frac in [0.5, 0.25] {
        let bytes = (peak as f64 * frac) as usize;
        let budget = Some(bytes);
        let lru = replay(&ops, "lru", budget, &prof).unwrap();
        let mut belady = Belady::with_profile(Profile::from_ops(&ops));
        let opt = simulate(&ops, &mut belady, budget, &prof).unwrap();
        assert!(lru.peak_device_bytes <= bytes && opt.peak_device_bytes <= bytes);
        assert!(lru.evictions > 0, "{frac}: lru evicted nothing");
        assert!(
            opt.step_ms < lru.step_ms,
            "{frac}: belady {opt:?} vs lru {lru:?}"
        );
        // Prefetching may move more bytes than fetching on demand; what it must cut is waiting.
        assert!(
            opt.stall_ms < lru.stall_ms,
            "{frac}: belady stalled {} ms, lru {} ms",
            opt.stall_ms,
            lru.stall_ms
        );
    }
}

#[test]
fn calibrated_profiles_parse_and_bad_ones_are_errors() {
    let p = DeviceProfile::by_name("calibrated:5e13,3e12,5.5e10").unwrap();
    assert_eq!(p.name, "calibrated");
    assert_eq!((p.peak_flops, p.mem_bytes_per_sec), (5e13, 3e12));
    assert_eq!((p.h2d_bytes_per_sec, p.d2h_bytes_per_sec), (5.5e10, 5.5e10));
    for bad in [
        "calibrated:1e12,2e12",
        "calibrated:1e12,x,3",
        "calibrated:0,1,1",
        "h300",
    ] {
        let e = DeviceProfile::by_name(bad).unwrap_err().to_string();
        assert!(e.contains("profile"), "{bad}: {e}");
    }
}

#[test]
fn calibrated_profiles_take_optional_fixed_costs() {
    let p = DeviceProfile::by_name("calibrated:5e13,3e12,5.5e10,2e-5,8e-6").unwrap();
    assert_eq!((p.copy_latency_s, p.launch_s), (2e-5, 8e-6));
    let p = DeviceProfile::by_name("calibrated:5e13,3e12,5.5e10,2e-5").unwrap();
    assert_eq!(p.copy_latency_s, 2e-5);
    for bad in ["calibrated:1,1,1,-1", "calibrated:1,1,1,0,0,0"] {
        let e = DeviceProfile::by_name(bad).unwrap_err().to_string();
        assert!(e.contains("COPY_LATENCY_S"), "{bad}: {e}");
    }
}

/// A three-op chain: op `i` reads the buffer op `i-1` wrote; `freed[i]` is released after op `i`.
fn chain(freed: [Vec<u64>; 3]) -> Vec<OpRecord> {
    let act = |id: u64| (id, 1000, 3, id);
    freed
        .into_iter()
        .enumerate()
        .map(|(i, freed)| {
            let i = i as u64;
            OpRecord {
                t: "op".into(),
                seq: i,
                step: 1,
                index: i as u32,
                phase: 0,
                op: "relu".into(),
                inputs: if i == 0 { vec![] } else { vec![act(i)] },
                outputs: vec![act(i + 1)],
                idioms: [0, 0, 0, 0, 1, 0],
                flops: 1000,
                bytes_read: 1000,
                bytes_written: 1000,
                freed,
                plan: Vec::new(),
                plan_source: String::new(),
                plan_reads: Vec::new(),
            }
        })
        .collect()
}

#[test]
fn recorded_releases_decide_when_bytes_are_freed() {
    let prof = DeviceProfile::a100_pcie4();
    let none = || policy::by_name("none").unwrap();
    // Without release records each buffer dies at its last access: two alive at a time.
    let by_last_access = simulate(
        &chain([vec![], vec![], vec![]]),
        none().as_mut(),
        None,
        &prof,
    );
    assert_eq!(by_last_access.unwrap().peak_device_bytes, 2000);
    // The run released the first buffer only after the third op, and kept the others: all
    // three are alive at the end, as they were in the run.
    let by_release = simulate(
        &chain([vec![], vec![], vec![1]]),
        none().as_mut(),
        None,
        &prof,
    );
    assert_eq!(by_release.unwrap().peak_device_bytes, 3000);
    // A run records its releases in the trace.
    assert!(recorded_step().iter().any(|o| !o.freed.is_empty()));
}

#[test]
fn copy_latency_is_paid_per_copy() {
    let ops = recorded_step();
    let fast = DeviceProfile::by_name("calibrated:2e13,1e12,2.5e10").unwrap();
    let slow = DeviceProfile::by_name("calibrated:2e13,1e12,2.5e10,1e-4").unwrap();
    let peak = unlimited_peak(&ops, &fast);
    let budget = Some(peak / 4);
    let a = replay(&ops, "lru", budget, &fast).unwrap();
    let b = replay(&ops, "lru", budget, &slow).unwrap();
    assert_eq!(a.bytes_h2d, b.bytes_h2d);
    assert!(a.evictions > 0);
    assert!(
        b.stall_ms > a.stall_ms + 0.1 * a.evictions as f64 * 1e-3,
        "{a:?} vs {b:?}"
    );
}

#[test]
fn moves_made_on_the_executor_thread_cost_host_time_and_prefetches_do_not() {
    let ops = recorded_step();
    let free = DeviceProfile::by_name("calibrated:2e13,1e12,2.5e10").unwrap();
    let host = DeviceProfile {
        move_host_s: 1e-4,
        ..free.clone()
    };
    let peak = unlimited_peak(&ops, &free);
    let budget = Some(peak / 4);
    let run = |prof: &DeviceProfile, name: &str| {
        let mut p: Box<dyn dynn_mm::Policy> = match name {
            "belady" => Box::new(Belady::with_profile(Profile::from_ops(&ops))),
            other => policy::by_name(other).unwrap(),
        };
        simulate(&ops, p.as_mut(), budget, prof).unwrap()
    };
    for name in ["lru", "belady"] {
        let (a, b) = (run(&free, name), run(&host, name));
        assert_eq!(a.move_host_ms, 0.0, "{name}");
        assert!(b.evictions > 0 && b.demand_fetches > 0, "{name}: {b:?}");
        // One charge per copying eviction and per demand fetch; the decisions do not change.
        let moves = (b.evictions - b.clean_evictions + b.demand_fetches) as f64;
        // Parameters fetched for the forward pass and evicted before the backward one were
        // not written in between: they leave without a copy.
        assert!(b.clean_evictions > 0, "{name}: {b:?}");
        assert!((b.move_host_ms - 0.1 * moves).abs() < 1e-9, "{name}: {b:?}");
        assert_eq!(
            (a.evictions, a.bytes_h2d),
            (b.evictions, b.bytes_h2d),
            "{name}"
        );
        // The executor's clock carries them: later than without, and never shorter than the
        // kernels plus the host's moves.
        assert!(b.step_ms > a.step_ms, "{name}: {a:?} vs {b:?}");
        // Nothing is dropped: the clock is the kernels, the waits and the host's moves.
        for r in [&a, &b] {
            let parts = r.compute_ms + r.stall_ms + r.move_host_ms;
            assert!((r.step_ms - parts).abs() < 1e-9, "{name}: {r:?}");
            // Every wait is charged to the phase of the op that waited.
            let phases: f64 = r.stall_ms_by_phase.iter().sum();
            assert!((r.stall_ms - phases).abs() < 1e-9, "{name}: {r:?}");
            assert!(
                r.stall_ms_by_phase.iter().all(|s| *s >= 0.0),
                "{name}: {r:?}"
            );
            // The backward pass reads back what the forward pass had to evict.
            assert!(r.stall_ms_by_phase[1] > 0.0, "{name}: {r:?}");
        }
    }
    // Belady prefetches; what it brings back ahead of time is not charged as a demand fetch.
    let belady = run(&host, "belady");
    let lru = run(&host, "lru");
    assert!(
        belady.demand_fetches < lru.demand_fetches,
        "{belady:?} vs {lru:?}"
    );
}

/// What a policy was told, and after how many ops of the step.
#[derive(Debug, Clone, PartialEq)]
enum Told {
    Plan(usize, String, Vec<Vec<u64>>),
    PlanRead(usize, usize, u64),
}

/// LRU that also writes down every plan it is told.
struct Listener {
    step: u64,
    ops: usize,
    told: std::sync::Arc<std::sync::Mutex<Vec<(u64, Told)>>>,
}

impl dynn_mm::Policy for Listener {
    fn name(&self) -> &'static str {
        "listener"
    }
    fn observe(&mut self, _: &OpRecord) {
        self.ops += 1;
    }
    fn step_boundary(&mut self, step: u64) {
        (self.step, self.ops) = (step, 0);
    }
    fn rank_victims(&mut self, _: dynn_mm::Now, c: &mut [dynn_mm::Candidate]) {
        c.sort_by_key(|c| c.last_use);
    }
    fn plan(&mut self, source: &str, groups: &[Vec<u64>]) {
        let t = Told::Plan(self.ops, source.to_string(), groups.to_vec());
        self.told.lock().unwrap().push((self.step, t));
    }
    fn plan_read(&mut self, group: usize, id: u64) {
        let t = Told::PlanRead(self.ops, group, id);
        self.told.lock().unwrap().push((self.step, t));
    }
}

#[test]
fn the_simulator_tells_a_policy_the_plans_the_run_told() {
    let live = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut cfg = ManagerConfig::new(
        Box::new(Listener {
            step: 0,
            ops: 0,
            told: live.clone(),
        }),
        None,
    );
    cfg.record_trace = true;
    let mm = MemoryManager::new(cfg);
    {
        let _g = install_memory_hooks(mm.clone());
        Mlp::new(16, 3, 1).unwrap().train(3, 4, 2).unwrap();
    }
    let live: Vec<Told> = live
        .lock()
        .unwrap()
        .iter()
        .filter(|(s, _)| *s == 1)
        .map(|(_, t)| t.clone())
        .collect();
    // The tape's plan: one group per node, announced before the first backward op; then the
    // gradients it makes, each bound for a later group.
    let Some(Told::Plan(at, source, groups)) = live.first() else {
        panic!("no plan told in step 1: {live:?}");
    };
    assert_eq!(source, "backward");
    assert!(
        *at > 0 && groups.len() >= 3 * 3,
        "{at} ops, {} groups",
        groups.len()
    );
    assert!(live.iter().any(|t| matches!(t, Told::PlanRead(..))));
    let replayed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut p = Listener {
        step: 1,
        ops: 0,
        told: replayed.clone(),
    };
    simulate(
        &mm.trace().step_ops(1),
        &mut p,
        None,
        &DeviceProfile::a100_pcie4(),
    )
    .unwrap();
    let replayed: Vec<Told> = replayed
        .lock()
        .unwrap()
        .iter()
        .map(|t| t.1.clone())
        .collect();
    assert_eq!(replayed, live);
}

/// Evictions the memory manager makes in step 3 of the test MLP under lru and `budget`, with
/// `segments`, and the recorded trace of that run.
fn managed_run(budget: usize, segments: (usize, usize)) -> (u64, dynn_mm::Trace) {
    let run = |steps: usize| {
        let mut cfg = ManagerConfig::new(policy::by_name("lru").unwrap(), Some(budget));
        cfg.segments = segments;
        cfg.record_trace = true;
        let mm = MemoryManager::new(cfg);
        {
            let _g = install_memory_hooks(mm.clone());
            let m = Mlp::new(48, 8, 1).unwrap();
            m.train(steps, 16, 2).unwrap();
        }
        (mm.stats().evictions, mm.trace())
    };
    let (before, _) = run(2);
    let (after, trace) = run(3);
    (after - before, trace)
}

#[test]
fn replaying_the_pool_after_the_step_before_evicts_where_the_manager_did() {
    let prof = DeviceProfile::a100_pcie4();
    let peak = unlimited_peak(&recorded_step(), &prof);
    let segments = (16 << 10, 256 << 10);
    for budget in [peak / 2, peak / 3] {
        let (real, trace) = managed_run(budget, segments);
        let (warmup, step) = (trace.step_ops(1), trace.step_ops(2));
        let lru = || policy::by_name("lru").unwrap();
        let pooled = simulate_with(
            &warmup,
            &step,
            lru().as_mut(),
            Some(budget),
            &prof,
            SimMemory::Pool(segments.0, segments.1),
        )
        .unwrap();
        let counted = simulate(&step, lru().as_mut(), Some(budget), &prof).unwrap();
        eprintln!(
            "budget {budget}: manager {real} evictions, pooled replay {}, byte count {}",
            pooled.evictions, counted.evictions
        );
        assert!(real > 0);
        assert!(
            pooled.evictions.abs_diff(real) * 10 <= real,
            "budget {budget}: the pooled replay evicts {} times, the manager {real}",
            pooled.evictions
        );
        assert!(
            pooled.evictions.abs_diff(real) < counted.evictions.abs_diff(real),
            "budget {budget}: counting bytes ({}) should miss the manager's evictions ({real}) by more",
            counted.evictions
        );
    }
}

/// Trains the test MLP under `mm` a step at a time, pausing between steps, until a background
/// write-back has spared an eviction its copy (or 200 steps have run); the manager's stats.
fn train_until_written_back(mm: &std::sync::Arc<MemoryManager>) -> dynn_mm::MemoryStats {
    let hooks = install_memory_hooks(mm.clone());
    let m = Mlp::new(48, 8, 1).unwrap();
    for _ in 0..200 {
        m.train(1, 16, 2).unwrap();
        let s = mm.stats();
        if s.write_backs > 0 && s.clean_evictions > 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    drop(hooks);
    mm.stats()
}

#[test]
fn under_a_budget_evictions_are_written_back_ahead_and_cost_no_copy() {
    let ops = recorded_step();
    let prof = DeviceProfile::a100_pcie4();
    let peak = unlimited_peak(&ops, &prof);
    // The manager: write-backs run on the transfer thread while the training runs. On a
    // loaded machine that thread may not run before the executor evicts or frees what it was
    // asked to copy (such a write-back copies nothing); a pause between steps lets the one
    // asked for at a step's end, of a buffer that outlives the step, complete.
    let mut cfg = ManagerConfig::new(policy::by_name("lru").unwrap(), Some(peak / 3));
    cfg.write_back = true;
    cfg.evict_ahead = false;
    let mm = MemoryManager::new(cfg);
    let s = train_until_written_back(&mm);
    assert!(s.write_backs > 0 && s.clean_evictions > 0, "{s:?}");
    // Off by default (and evicting ahead off here: it writes back too).
    let mut cfg = ManagerConfig::new(policy::by_name("lru").unwrap(), Some(peak / 3));
    cfg.evict_ahead = false;
    let off = MemoryManager::new(cfg);
    {
        let _g = install_memory_hooks(off.clone());
        Mlp::new(48, 8, 1).unwrap().train(3, 16, 2).unwrap();
    }
    assert_eq!(off.stats().write_backs, 0);
    assert!(off.stats().evictions > 0);
    let prof = DeviceProfile {
        evict_ahead: false,
        ..prof
    };
    let default = replay(&ops, "lru", Some(peak / 3), &prof).unwrap();
    assert_eq!(default.write_backs, 0);
    // The simulator: the same rule, and never with a budget that is not set.
    let prof = DeviceProfile {
        write_back: true,
        ..prof
    };
    let lru = replay(&ops, "lru", Some(peak / 3), &prof).unwrap();
    assert!(lru.write_backs > 0 && lru.clean_evictions > 0, "{lru:?}");
    let free = replay(&ops, "lru", None, &prof).unwrap();
    assert_eq!(free.write_backs, 0);
}

#[test]
fn evicting_ahead_writes_the_next_victims_back_and_frees_their_room_once_copied() {
    let ops = recorded_step();
    let ahead = DeviceProfile::a100_pcie4();
    assert!(ahead.evict_ahead, "on by default");
    let lazy = DeviceProfile {
        evict_ahead: false,
        ..ahead.clone()
    };
    let peak = unlimited_peak(&ops, &ahead);
    for budget in [peak / 2, peak / 3] {
        let run = |prof: &DeviceProfile, budget| replay(&ops, "lru", budget, prof).unwrap();
        let (a, l) = (run(&ahead, Some(budget)), run(&lazy, Some(budget)));
        // Victims leave after their background copy, without a copy on the compute stream.
        assert!(
            a.write_backs > 0 && a.clean_evictions > 0,
            "budget {budget}: {a:?}"
        );
        assert_eq!(l.write_backs, 0);
        // Fewer stalls, and about the same bytes: only victims are written back.
        assert!(a.stall_ms < l.stall_ms, "budget {budget}: {a:?}\n{l:?}");
        assert!(
            a.bytes_d2h as f64 <= 1.25 * l.bytes_d2h as f64,
            "budget {budget}: {} bytes written against {}",
            a.bytes_d2h,
            l.bytes_d2h
        );
        assert!(a.peak_device_bytes <= budget);
    }
    // Nothing to make room for without a budget, nor under the policy that never evicts.
    let none = replay(&ops, "none", None, &ahead).unwrap();
    assert_eq!(none.write_backs, 0);
    let free = replay(&ops, "lru", None, &ahead).unwrap();
    assert_eq!(free.write_backs, 0);

    // The manager, on by default: the same, on the transfer thread (paused between steps so
    // that a loaded machine's transfer thread gets to run, as above).
    let mm = MemoryManager::new(ManagerConfig::new(
        policy::by_name("lru").unwrap(),
        Some(peak / 3),
    ));
    let s = train_until_written_back(&mm);
    assert!(s.write_backs > 0 && s.clean_evictions > 0, "{s:?}");
    assert!(s.peak_device_bytes <= peak / 3, "{s:?}");
}

#[test]
fn a_replay_after_the_step_before_waits_only_for_its_own_copies() {
    let ops = recorded_step();
    // With background write-backs: the step before runs under the same budget, so it writes
    // buffers back, and their copies end on its clock, which the timed step restarts.
    let prof = DeviceProfile {
        write_back: true,
        ..DeviceProfile::a100_pcie4()
    };
    let peak = unlimited_peak(&ops, &prof);
    for budget in [peak / 2, peak / 3] {
        let r = simulate_with(
            &ops,
            &ops,
            policy::by_name("lru").unwrap().as_mut(),
            Some(budget),
            &prof,
            SimMemory::Bytes,
        )
        .unwrap();
        let copies_ms = (r.bytes_h2d as f64 / prof.h2d_bytes_per_sec
            + r.bytes_d2h as f64 / prof.d2h_bytes_per_sec)
            * 1e3;
        assert!(
            r.write_backs > 0 && r.clean_evictions > 0,
            "budget {budget}: {r:?}"
        );
        assert!(
            r.stall_ms <= copies_ms + 1e-9,
            "budget {budget}: stalled {:.4} ms, longer than all the step's copies ({copies_ms:.4} ms)",
            r.stall_ms
        );
    }
}

#[test]
fn repacks_cost_host_time_per_block_and_change_nothing_else() {
    let free = DeviceProfile::a100_pcie4();
    let peak = unlimited_peak(&recorded_step(), &free);
    let segments = (16 << 10, 256 << 10);
    let (_, trace) = managed_run(peak / 3, segments);
    let (warmup, step) = (trace.step_ops(1), trace.step_ops(2));
    let replay = |prof: &DeviceProfile| {
        simulate_with(
            &warmup,
            &step,
            policy::by_name("lru").unwrap().as_mut(),
            Some(peak / 3),
            prof,
            SimMemory::Pool(segments.0, segments.1),
        )
        .unwrap()
    };
    let base = replay(&free);
    let charged = replay(&DeviceProfile {
        repack_host_s: 1e-5,
        ..free.clone()
    });
    assert!(base.repacks > 0, "the tight pool should repack: {base:?}");
    assert_eq!(base.repack_host_ms, 0.0);
    // The same repacks, evictions and traffic; only the clock moves, by the charged time.
    assert_eq!(
        (
            charged.repacks,
            charged.evictions,
            charged.bytes_h2d,
            charged.bytes_d2h
        ),
        (base.repacks, base.evictions, base.bytes_h2d, base.bytes_d2h)
    );
    // At least one live block per repack, 10 µs each.
    assert!(
        charged.repack_host_ms >= base.repacks as f64 * 1e-2,
        "{charged:?}"
    );
    assert!((charged.step_ms - base.step_ms - charged.repack_host_ms).abs() < 1e-9);
    // Host time, not a stall.
    assert!((charged.stall_ms - base.stall_ms).abs() < 1e-9);
}

#[test]
fn the_manager_times_its_repacks() {
    let prof = DeviceProfile::a100_pcie4();
    let peak = unlimited_peak(&recorded_step(), &prof);
    let mut cfg = ManagerConfig::new(policy::by_name("lru").unwrap(), Some(peak / 3));
    cfg.segments = (16 << 10, 256 << 10);
    let mm = MemoryManager::new(cfg);
    {
        let _g = install_memory_hooks(mm.clone());
        Mlp::new(48, 8, 1).unwrap().train(3, 16, 2).unwrap();
    }
    let s = mm.stats();
    assert!(s.compactions > 0, "{s:?}");
    assert!(s.repacked_blocks >= s.compactions, "{s:?}");
    assert!(s.repack_block_us() > 0.0);
}
