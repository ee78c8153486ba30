//! The pieces of the policy comparison: recording traces, the workloads, replaying a step
//! under a policy, and the largest-size search.

pub mod record;
pub mod replay;
pub mod search;
pub mod workload;
