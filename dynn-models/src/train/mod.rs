//! The training loop every bundled trainer shares: one `clap` interface ([`TrainArgs`]), a
//! [`Task`] (model plus data) and [`train`], which runs it under a memory budget and policy
//! with a progress bar, checkpoints and a JSON [`Summary`].

mod args;
mod host_speed;
mod runner;
mod summary;
mod task;

pub use args::{Defaults, TrainArgs};
pub use host_speed::host_reference_us;
pub use runner::{Outcome, SEGMENTS, main, periodic_path, print_outcome, train};
pub use summary::Summary;
pub use task::{Eval, StepOut, Task};
