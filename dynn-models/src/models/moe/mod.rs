//! A Mixture-of-Experts transformer language model: every block's feed-forward is a set of
//! expert MLPs behind a linear router. Each token goes to its top-k experts (top-1 Switch or
//! top-2), each expert takes at most `ceil(capacity_factor · tokens · k / experts)` tokens and
//! drops the rest (they pass through the residual only), and a Switch load-balancing loss
//! keeps the load even.
//!
//! The routing is read to the host once per layer; only the experts that receive tokens run,
//! on exactly those tokens (`index_select` in, `index_add` out), so the op sequence and the
//! op sizes follow the data and an idle expert's parameters are not touched in that step.

mod config;
mod layer;
mod model;
mod router;
mod stats;
mod task;

pub use config::MoeConfig;
pub use layer::{MoeLayer, MoeLayerOut};
pub use model::{MoeBlock, MoeLm, MoeOutput};
pub use router::{Routing, route};
pub use stats::MoeStats;
pub use task::MoeTask;
