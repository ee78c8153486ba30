//! # dynn-pilot
//!
//! DyNN-Offload's pilot for dynn: an **idiom encoder** (each op described by six
//! memory-access idiom counts, not by its name), a small network written with dynn's own
//! modules and autograd that predicts every live buffer's **next-use distance bucket**, an
//! allocation-free predictor for the hot path, an online trainer on a background thread, and
//! the `pilot` memory policy they drive.
//!
//! | module | job |
//! |---|---|
//! | [`bucket`](mod@bucket) | next-use distance buckets |
//! | [`encoder`] | op / candidate → fixed-size features (idioms or one-hot op names) |
//! | [`history`] | one step's access order by key |
//! | [`plan`] | the backward pass's and optimizer's announced reads, followed op by op |
//! | [`tracker`] | replays ops; a candidate's features at this moment |
//! | [`labels`] | exact labels from a recorded trace; datasets; split by step |
//! | [`model`] | the MLP, its training and evaluation |
//! | [`predictor`] | frozen weights, allocation-free forward, save / load |
//! | [`online`] | the background trainer and the hot-swapped snapshot |
//! | [`eval`] | traces of the four DyNNs; hold-out and ablation accuracy |
//! | [`policy`] | [`PilotPolicy`], registered as `--policy pilot` by [`register`] |
//!
//! ```
//! // Every trainer's `--policy pilot`: LRU while the first steps are recorded, then the
//! // trained pilot, fine-tuned online on a background thread.
//! dynn_pilot::register();
//! let policy = dynn_mm::policy::by_name("pilot")?;
//! assert_eq!(policy.name(), "pilot");
//! # Ok::<(), dynn_core::Error>(())
//! ```
//!
//! Offline: label a recorded trace, train, freeze, save, and start a policy from it.
//!
//! ```no_run
//! use dynn_pilot::{LabelConfig, ModelConfig, PilotConfig, PilotPolicy, Snapshot};
//! # fn main() -> dynn_core::Result<()> {
//! let trace = dynn_mm::Trace::load("run.trace")?;
//! let labels = LabelConfig::default();
//! let (train, valid) = dynn_pilot::label_trace(&trace, &labels).split_by_step(0.25);
//! let (snapshot, report) = dynn_pilot::train(&train, &valid, labels.features, &ModelConfig::default())?;
//! println!("valid accuracy {:.3}, confusion {:?}", report.accuracy_valid, report.confusion);
//! snapshot.save("pilot.safetensors")?;
//! let policy = PilotPolicy::with_snapshot(Snapshot::load("pilot.safetensors")?, PilotConfig::default());
//! # let _ = policy;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod bucket;
mod buffers;
pub mod encoder;
pub mod eval;
pub mod history;
mod keyindex;
pub mod labels;
pub mod model;
pub mod online;
pub mod plan;
pub mod policy;
pub mod predictor;
mod replay;
pub mod tracker;

pub use bucket::{BUCKETS, bucket};
pub use encoder::{Encoding, FeatureConfig};
pub use labels::{Dataset, LabelConfig, exact_labels, label_trace};
pub use model::{ModelConfig, PilotNet, Report, Trainer, evaluate, train};
pub use online::{OnlineConfig, OnlineTrainer, SnapshotCell, StepRecording};
pub use policy::{PilotConfig, PilotPolicy, PilotStats, RecomputeCosts, StatsSink};
pub use predictor::{Scratch, Snapshot};
pub use replay::TrackerGuard;
pub use tracker::Tracker;

/// Environment variable naming a saved pilot (see [`Snapshot::save`]) that the registered
/// `pilot` policy starts from instead of warming up as LRU.
pub const WEIGHTS_ENV: &str = "DYNN_PILOT_WEIGHTS";

/// Environment variable naming the device profile (`a100-pcie4`, `h100-pcie5`, or
/// `calibrated:FLOPS,MEM_BW,COPY_BW[,...]`, as `dynn_mm::DeviceProfile::by_name` reads) whose
/// costs the registered `pilot` policy uses to drop activations that are cheaper to
/// recompute than to copy. Unset or empty: every victim is offloaded.
pub const PROFILE_ENV: &str = "DYNN_PILOT_PROFILE";

/// Environment variable that, set to `1`, has the registered `pilot` policy replay ops into
/// its tracker on a thread of its own ([`PilotConfig::replay_thread`]). Off by default: on
/// two cores busy with kernels the thread waits for a core and the executor for it (MoE at
/// 25%: 4.9–5.0% of the run on the critical path, against 2.7–3.1% without).
pub const REPLAY_THREAD_ENV: &str = "DYNN_PILOT_REPLAY_THREAD";

/// The policy `--policy pilot` builds: online training with the default settings, starting
/// from the saved pilot named by [`WEIGHTS_ENV`] when that loads, with the costs of the
/// profile named by [`PROFILE_ENV`] when that parses (see [`configured_policy`]), and
/// replaying ops on a thread of its own where [`REPLAY_THREAD_ENV`] asks.
pub fn default_policy() -> Box<dyn dynn_mm::Policy> {
    let weights = std::env::var_os(WEIGHTS_ENV);
    let profile = std::env::var(PROFILE_ENV).ok().filter(|p| !p.is_empty());
    Box::new(configured_policy(
        weights.as_deref().map(std::path::Path::new),
        profile.as_deref(),
    ))
}

/// The default pilot, starting from the saved pilot at `weights` and using the costs of the
/// device profile named `profile`. A file that does not load or a profile that does not
/// parse is logged and ignored (the pilot then warms up from scratch, or only offloads).
pub fn configured_policy(weights: Option<&std::path::Path>, profile: Option<&str>) -> PilotPolicy {
    let recompute = profile.and_then(|name| match dynn_mm::DeviceProfile::by_name(name) {
        Ok(p) => Some(RecomputeCosts::of_profile(&p)),
        Err(e) => {
            tracing::warn!("{PROFILE_ENV}: {e}; the pilot offloads every victim");
            None
        }
    });
    let cfg = PilotConfig {
        recompute,
        replay_thread: std::env::var(REPLAY_THREAD_ENV).is_ok_and(|v| v == "1"),
        ..PilotConfig::default()
    };
    let saved = weights.and_then(|p| match Snapshot::load(p) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("{WEIGHTS_ENV}: {e}; the pilot warms up from scratch");
            None
        }
    });
    match saved {
        Some(s) => PilotPolicy::with_snapshot(s, cfg),
        None => PilotPolicy::new(cfg),
    }
}

/// Registers the `pilot` policy with dynn-mm, so `dynn_mm::policy::by_name("pilot")` (and
/// every trainer's `--policy pilot`) builds [`default_policy`]. Idempotent.
pub fn register() {
    dynn_mm::policy::register_policy("pilot", default_policy);
}
