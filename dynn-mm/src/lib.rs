//! # dynn-mm
//!
//! dynn's memory manager: a device pool under a byte budget, a host tier, a transfer engine,
//! the policies that decide what lives on the device, access traces, the trace simulator and
//! memory reports. It plugs into the executor through [`dynn_core::MemoryHooks`]:
//!
//! ```
//! use dynn_mm::{ManagerConfig, MemoryManager, policy};
//! # fn main() -> dynn_core::Result<()> {
//! let mm = MemoryManager::new(ManagerConfig::new(policy::by_name("lru")?, Some(64 << 20)));
//! let _installed = dynn_core::install_memory_hooks(mm.clone());
//! // ... train: every op now runs under a 64 MiB device budget ...
//! println!("{}", mm.report());
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod budget;
pub mod keymap;
pub mod manager;
pub mod policy;
pub mod pool;
pub mod predict;
pub mod report;
pub mod sim;
pub mod trace;
pub mod transfer;

pub use budget::{Budget, human_bytes};
pub use keymap::{KeyHasher, KeyMap};
pub use manager::{ManagerConfig, MemoryManager, MemoryStats, Residency};
pub use policy::{Candidate, Eviction, Now, Policy, Profile};
pub use pool::{Block, DevicePool, PoolExhausted, PoolStats};
pub use predict::Prediction;
pub use report::{MemoryReport, TimelinePoint};
pub use sim::{DeviceProfile, SimMemory, SimResult, simulate, simulate_with};
pub use trace::{Announced, OpRecord, StepRecord, Trace};
pub use transfer::{Direction, TransferConfig, TransferEngine};
