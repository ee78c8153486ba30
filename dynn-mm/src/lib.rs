//! # dynn-mm
//!
//! dynn's memory manager: a device pool under a byte budget, a host tier, a transfer engine,
//! the policies that decide what lives on the device, access traces, the trace simulator and
//! memory reports. It plugs into the executor through [`dynn_core::MemoryHooks`].

#![warn(missing_docs)]

pub mod budget;
pub mod pool;

pub use budget::{Budget, human_bytes};
pub use pool::{Block, DevicePool, PoolExhausted, PoolStats};
