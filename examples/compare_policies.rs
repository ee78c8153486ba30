//! Records the access traces of the bundled workloads and replays them in the simulator under
//! every policy at budgets of 50, 25 and 12.5% of the unlimited peak.
//!
//! ```sh
//! cargo run --release --example compare_policies -- --json
//! ```
//!
//! Each workload trains a few steps with no budget while the memory manager records the trace;
//! the simulator then replays one steady-state step (the second) on a device profile. `static`
//! is first shown the step before (its profiling step); `belady` gets the replayed step's own
//! access order (the offline optimum). The last line with `--json` is
//! `{"rows":[{"model","policy","budget_frac","profile","step_ms","compute_ms","stall_ms",
//! "bytes_h2d","bytes_d2h","peak_device_bytes","slowdown"}]}`; a policy that cannot run a
//! budget (`none` below the peak) has `"oom": true` and no timings.

mod workloads;

use clap::Parser;
use dynn::core::{install_memory_hooks, mark_step};
use dynn::mm::policy::{Belady, POLICIES, Profile};
use dynn::mm::{
    DeviceProfile, ManagerConfig, MemoryManager, OpRecord, SimResult, policy, simulate,
};
use dynn::prelude::*;
use workloads::{MlpConfig, Model, Rng, Transformer, batch, sgd};

/// Compare memory policies on recorded traces.
#[derive(Parser, Debug)]
struct Args {
    /// Device profile: a100-pcie4 or h100-pcie5.
    #[arg(long, default_value = "a100-pcie4")]
    profile: String,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

/// Records `steps` training steps of `train_step` and returns the ops of steps 0 and 1.
fn record(
    steps: u64,
    mut train_step: impl FnMut(u64) -> Result<()>,
) -> Result<(Vec<OpRecord>, Vec<OpRecord>)> {
    let mut cfg = ManagerConfig::new(policy::by_name("none")?, None);
    cfg.record_trace = true;
    let mm = MemoryManager::new(cfg);
    {
        let _hooks = install_memory_hooks(mm.clone());
        for step in 0..steps {
            train_step(step)?;
            mark_step(step + 1);
        }
    }
    let ops = mm.trace().ops;
    let of = |s: u64| {
        ops.iter()
            .filter(|o| o.step == s)
            .cloned()
            .collect::<Vec<_>>()
    };
    Ok((of(0), of(1)))
}

fn early_exit() -> Result<(Vec<OpRecord>, Vec<OpRecord>)> {
    let model = Model::new(&MlpConfig {
        hidden: 128,
        depth: 6,
        seed: 0,
    })?;
    let mut rng = Rng(0);
    record(3, |_| {
        let (x, y) = batch(&mut rng, 128)?;
        let (loss, _) = model.loss(&x, &y, 0.8)?;
        loss.backward()?;
        sgd(&model.params(), 0.05)
    })
}

fn transformer() -> Result<(Vec<OpRecord>, Vec<OpRecord>)> {
    let model = Transformer::new(64, 1)?;
    let mut rng = Rng(1);
    record(3, |_| {
        let (x, y) = model.batch(&mut rng, 8, 32)?;
        let loss = model.loss(&x, &y)?;
        loss.backward()?;
        sgd(&model.params(), 0.01)
    })
}

fn run_policy(
    name: &str,
    warmup: &[OpRecord],
    step: &[OpRecord],
    budget: Option<usize>,
    prof: &DeviceProfile,
) -> Result<SimResult> {
    let mut p: Box<dyn dynn::mm::Policy> = match name {
        "belady" => Box::new(Belady::with_profile(Profile::from_ops(step))),
        other => policy::by_name(other)?,
    };
    // Policies that learn from a profiling step see the step before.
    for op in warmup {
        p.observe(op);
    }
    p.step_boundary(1);
    simulate(step, p.as_mut(), budget, prof)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args = Args::parse();
    let prof = DeviceProfile::by_name(&args.profile)?;
    let mut rows = Vec::new();
    println!(
        "{:<14} {:<10} {:>6} {:>10} {:>10} {:>12} {:>12} {:>9}",
        "model", "policy", "budget", "step ms", "stall ms", "h2d bytes", "d2h bytes", "slowdown"
    );
    for (model, (warmup, step)) in [
        ("early_exit_mlp", early_exit()?),
        ("transformer", transformer()?),
    ] {
        let base = run_policy("none", &warmup, &step, None, &prof)?;
        for frac in [0.5, 0.25, 0.125] {
            let budget = (base.peak_device_bytes as f64 * frac) as usize;
            for name in POLICIES {
                match run_policy(name, &warmup, &step, Some(budget), &prof) {
                    Ok(r) => {
                        let slowdown = r.step_ms / base.step_ms;
                        println!(
                            "{model:<14} {name:<10} {frac:>6} {:>10.4} {:>10.4} {:>12} {:>12} {slowdown:>9.3}",
                            r.step_ms, r.stall_ms, r.bytes_h2d, r.bytes_d2h
                        );
                        rows.push(format!(
                            "{{\"model\":\"{model}\",\"policy\":\"{name}\",\"budget_frac\":{frac},\"profile\":\"{}\",\"step_ms\":{:.6},\"compute_ms\":{:.6},\"stall_ms\":{:.6},\"bytes_h2d\":{},\"bytes_d2h\":{},\"peak_device_bytes\":{},\"slowdown\":{slowdown:.4}}}",
                            prof.name, r.step_ms, r.compute_ms, r.stall_ms, r.bytes_h2d, r.bytes_d2h, r.peak_device_bytes
                        ));
                    }
                    Err(Error::OutOfMemory { .. }) => {
                        println!("{model:<14} {name:<10} {frac:>6} {:>10}", "out of memory");
                        rows.push(format!(
                            "{{\"model\":\"{model}\",\"policy\":\"{name}\",\"budget_frac\":{frac},\"profile\":\"{}\",\"oom\":true}}",
                            prof.name
                        ));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }
    if args.json {
        println!("{{\"rows\":[{}]}}", rows.join(","));
    }
    Ok(())
}
