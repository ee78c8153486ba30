//! The pieces of the policy comparison: recording traces, the workloads, replaying a step
//! under a policy, the learned pilot, the largest-size search and the plot.

pub mod pilot;
pub mod plot;
pub mod record;
pub mod replay;
pub mod search;
pub mod workload;
