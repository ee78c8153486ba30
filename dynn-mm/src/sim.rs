//! The trace simulator: replays a recorded step under a policy, a budget and a device
//! profile on a virtual clock — one compute stream, one copy stream per direction — so stall
//! time, bytes moved and peak memory are reproducible numbers, not noisy timings.
//!
//! Model: an op's compute time is `launch + max(flops / peak_flops, bytes / mem_bw)`. An op
//! starts when its inputs are resident: a buffer in the host tier is fetched on the
//! host→device stream (a stall), a prefetched one is waited for. Outputs need room: the policy
//! ranks resident, unpinned buffers and victims are copied out on the device→host stream (or
//! dropped while its producer's inputs live, which it then holds, and on next use recomputed
//! from them, brought back first, as the memory manager does). A buffer is freed where the
//! trace recorded its release, or (older traces) after its last access. Device memory is a
//! byte count under the budget or, to predict a measured run, the memory manager's own pool
//! replayed after the step before ([`SimMemory::Pool`], [`simulate_with`]). After each op the
//! inputs of the next [`PREFETCH_HORIZON`] ops that the policy expects are prefetched while
//! there is free room.

use crate::policy::Policy;
use crate::trace::OpRecord;
use dynn_core::{Error, Result};

mod replay;

pub use replay::simulate_with;

/// How many ops ahead the simulator prefetches: inputs of the next few ops only, so that
/// prefetched bytes do not push out what is needed sooner.
pub const PREFETCH_HORIZON: usize = 4;

/// A device as the simulator sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceProfile {
    /// Name (`a100-pcie4`, `h100-pcie5`, `calibrated`).
    pub name: String,
    /// Host→device link bytes per second.
    pub h2d_bytes_per_sec: f64,
    /// Device→host link bytes per second.
    pub d2h_bytes_per_sec: f64,
    /// Peak FLOP/s of the compute stream.
    pub peak_flops: f64,
    /// Device memory bandwidth in bytes per second.
    pub mem_bytes_per_sec: f64,
    /// Fixed cost per op (kernel launch, or on a host-bound run the framework's own work per
    /// op), seconds.
    pub launch_s: f64,
    /// Fixed cost per copy (driver call, synchronisation, the transfer thread's hand-off),
    /// seconds; added to `bytes / bandwidth`.
    pub copy_latency_s: f64,
    /// Host time of one move made on the executor's thread (an eviction or a demand fetch:
    /// choosing victims, the driver calls that queue the copy, the bookkeeping), seconds. On a
    /// host-bound run it delays every later kernel launch; prefetches are issued by the
    /// transfer thread and cost none.
    pub move_host_s: f64,
    /// Host time to repack one live block of the memory manager's pool (a repack, when free
    /// space is too scattered for a request the budget has room for, places every live block
    /// again; [`crate::MemoryStats::repack_block_us`]), seconds. Charged where a replay under
    /// [`SimMemory::Pool`] repacks.
    pub repack_host_s: f64,
    /// Under a budget the run writes stale buffers back in the background while the download
    /// link is idle, as the memory manager does when asked ([`crate::ManagerConfig::write_back`];
    /// off by default in both).
    pub write_back: bool,
    /// Under memory pressure the run writes the policy's next victim back in the background
    /// while the download link is idle, and evicts it once the copy has left unless an op
    /// used it meanwhile, as the memory manager does ([`crate::ManagerConfig::evict_ahead`];
    /// on by default in both): evictions then rarely wait for a copy, and their room is free
    /// for prefetches before an op needs it.
    pub evict_ahead: bool,
}

impl DeviceProfile {
    /// An A100 on PCIe 4 (25 GB/s each way, measured figure; 19.5 TFLOP/s fp32, 1.56 TB/s).
    pub fn a100_pcie4() -> Self {
        DeviceProfile {
            name: "a100-pcie4".into(),
            h2d_bytes_per_sec: 25e9,
            d2h_bytes_per_sec: 25e9,
            peak_flops: 19.5e12,
            mem_bytes_per_sec: 1.555e12,
            launch_s: 5e-6,
            copy_latency_s: 0.0,
            move_host_s: 0.0,
            repack_host_s: 0.0,
            write_back: false,
            evict_ahead: true,
        }
    }

    /// An H100 on PCIe 5 (about 50 GB/s host→device; 51 TFLOP/s fp32, 2 TB/s).
    pub fn h100_pcie5() -> Self {
        DeviceProfile {
            name: "h100-pcie5".into(),
            h2d_bytes_per_sec: 50e9,
            d2h_bytes_per_sec: 50e9,
            peak_flops: 51e12,
            mem_bytes_per_sec: 2.0e12,
            launch_s: 4e-6,
            copy_latency_s: 0.0,
            move_host_s: 0.0,
            repack_host_s: 0.0,
            write_back: false,
            evict_ahead: true,
        }
    }

    /// A profile from figures measured on this machine (e.g. by `benches/kernels.rs`):
    /// matmul FLOP/s, memory bandwidth, and a copy bandwidth for both directions.
    pub fn calibrated(peak_flops: f64, mem_bytes_per_sec: f64, copy_bytes_per_sec: f64) -> Self {
        DeviceProfile {
            name: "calibrated".into(),
            h2d_bytes_per_sec: copy_bytes_per_sec,
            d2h_bytes_per_sec: copy_bytes_per_sec,
            peak_flops,
            mem_bytes_per_sec,
            launch_s: 1e-6,
            copy_latency_s: 0.0,
            move_host_s: 0.0,
            repack_host_s: 0.0,
            write_back: false,
            evict_ahead: true,
        }
    }

    /// A named profile: `a100-pcie4`, `h100-pcie5`, or
    /// `calibrated:FLOPS,MEM_BW,COPY_BW[,COPY_LATENCY_S[,OP_S]]` (rates per second; the
    /// optional fixed cost of one copy and of one op, in seconds).
    pub fn by_name(name: &str) -> Result<Self> {
        if let Some(figures) = name.strip_prefix("calibrated:") {
            let v: Vec<f64> = figures
                .split(',')
                .map(|f| f.trim().parse::<f64>())
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| Error::invalid("profile", format!("{name:?}: {e}")))?;
            let bad = || {
                Error::invalid(
                    "profile",
                    format!(
                        "{name:?}: expected calibrated:FLOPS,MEM_BW,COPY_BW[,COPY_LATENCY_S[,OP_S]], rates positive, latencies not negative"
                    ),
                )
            };
            if !(3..=5).contains(&v.len())
                || v[..3].iter().any(|&rate| rate <= 0.0 || rate.is_nan())
                || v[3..].iter().any(|&fixed| fixed < 0.0 || fixed.is_nan())
            {
                return Err(bad());
            }
            let mut p = Self::calibrated(v[0], v[1], v[2]);
            if let Some(&latency) = v.get(3) {
                p.copy_latency_s = latency;
            }
            if let Some(&op) = v.get(4) {
                p.launch_s = op;
            }
            return Ok(p);
        }
        match name {
            "a100-pcie4" => Ok(Self::a100_pcie4()),
            "h100-pcie5" => Ok(Self::h100_pcie5()),
            other => Err(Error::invalid(
                "profile",
                format!("unknown device profile {other:?}: choose a100-pcie4 or h100-pcie5"),
            )),
        }
    }

    /// The executor's clock after it issues one move at `now`.
    fn issue_move(&self, now: &mut f64, r: &mut SimResult) {
        *now += self.move_host_s;
        r.move_host_ms += self.move_host_s * 1e3;
    }

    /// Seconds to copy `bytes` host→device.
    fn h2d_s(&self, bytes: u64) -> f64 {
        self.copy_latency_s + bytes as f64 / self.h2d_bytes_per_sec
    }

    /// Seconds to copy `bytes` device→host.
    fn d2h_s(&self, bytes: u64) -> f64 {
        self.copy_latency_s + bytes as f64 / self.d2h_bytes_per_sec
    }

    /// Seconds for a kernel of `flops` that moves `bytes`: launch plus the roofline bound.
    fn kernel_s(&self, flops: u64, bytes: u64) -> f64 {
        self.launch_s + (flops as f64 / self.peak_flops).max(bytes as f64 / self.mem_bytes_per_sec)
    }
}

/// What one simulated replay cost.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SimResult {
    /// Virtual time of the whole replay, ms.
    pub step_ms: f64,
    /// Time the compute stream was busy (including recomputation), ms.
    pub compute_ms: f64,
    /// Time the compute stream waited for bytes, ms.
    pub stall_ms: f64,
    /// `stall_ms` split by the phase of the op that waited: forward, backward, optimizer.
    pub stall_ms_by_phase: [f64; 3],
    /// Host time the executor spent issuing moves ([`DeviceProfile::move_host_s`] each), ms.
    pub move_host_ms: f64,
    /// Repacks of the pool (under [`SimMemory::Pool`]).
    pub repacks: u64,
    /// Host time they took ([`DeviceProfile::repack_host_s`] per block repacked), ms.
    pub repack_host_ms: f64,
    /// Bytes copied host→device.
    pub bytes_h2d: u64,
    /// Bytes copied device→host.
    pub bytes_d2h: u64,
    /// Peak device bytes.
    pub peak_device_bytes: usize,
    /// Buffers evicted.
    pub evictions: u64,
    /// Of those, buffers whose host copy was current: released without a copy or a host
    /// move charge.
    pub clean_evictions: u64,
    /// Background write-backs (see [`MemoryStats::write_backs`](crate::MemoryStats)).
    pub write_backs: u64,
    /// Inputs fetched from the host tier when an op needed them (not prefetched).
    pub demand_fetches: u64,
    /// FLOPs spent recomputing dropped buffers.
    pub recomputed_flops: u64,
}

impl SimResult {
    /// Host time of the memory manager's own work on the executor's thread: moves and
    /// repacks, ms (not stalls: the compute stream did not wait for bytes).
    fn host_ms(&self) -> f64 {
        self.move_host_ms + self.repack_host_ms
    }
}

/// How the simulator accounts device memory under the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SimMemory {
    /// A byte count: anything fits while the live bytes stay within the budget.
    #[default]
    Bytes,
    /// The memory manager's own [`DevicePool`](crate::pool::DevicePool) with these
    /// `(small, large)` segment sizes: requests are rounded, placed in segments and can fail
    /// on fragmentation, so evictions happen where a real run's do (to predict a measured
    /// run).
    Pool(usize, usize),
}

/// Replays `ops` (one step of a trace, in order) under `policy`, a `budget` in bytes (`None`:
/// unlimited) and `profile`, counting device memory in bytes ([`SimMemory::Bytes`]).
/// Deterministic: same inputs, same numbers.
pub fn simulate(
    ops: &[OpRecord],
    policy: &mut dyn Policy,
    budget: Option<usize>,
    profile: &DeviceProfile,
) -> Result<SimResult> {
    simulate_with(&[], ops, policy, budget, profile, SimMemory::Bytes)
}
