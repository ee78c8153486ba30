//! The trace simulator: replays a recorded step under a policy, a budget and a device
//! profile on a virtual clock — one compute stream, one copy stream per direction — so stall
//! time, bytes moved and peak memory are reproducible numbers, not noisy timings.
//!
//! Model: an op's compute time is `launch + max(flops / peak_flops, bytes / mem_bw)`. An op
//! starts when its inputs are resident: a buffer in the host tier is fetched on the
//! host→device stream (a stall), a prefetched one is waited for. Outputs need room: the policy
//! ranks resident, unpinned buffers and victims are copied out on the device→host stream (or
//! dropped and, on next use, recomputed at their producer's cost). A buffer is freed where the
//! trace recorded its release, or (older traces) after its last access. After each op the inputs of the next [`PREFETCH_HORIZON`] ops that
//! the policy expects are prefetched while there is free room.

use crate::policy::{Candidate, Eviction, Now, Policy};
use crate::trace::{OpRecord, kind_of};
use dynn_core::{BufferId, BufferKind, Error, Result};
use std::collections::HashMap;

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
    /// Bytes copied host→device.
    pub bytes_h2d: u64,
    /// Bytes copied device→host.
    pub bytes_d2h: u64,
    /// Peak device bytes.
    pub peak_device_bytes: usize,
    /// Buffers evicted.
    pub evictions: u64,
    /// FLOPs spent recomputing dropped buffers.
    pub recomputed_flops: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Place {
    Device,
    Host,
    /// Arriving on the device at this time.
    Arriving(f64),
    Dropped,
}

struct Buf {
    bytes: usize,
    key: u64,
    kind: u8,
    place: Place,
    last_use: u64,
    uses: u32,
    /// (flops, bytes) of the producing op, for recomputation.
    producer: Option<(u64, u64)>,
}

/// Replays `ops` (one step of a trace, in order) under `policy`, a `budget` in bytes (`None`:
/// unlimited) and `profile`. Deterministic: same inputs, same numbers.
pub fn simulate(
    ops: &[OpRecord],
    policy: &mut dyn Policy,
    budget: Option<usize>,
    profile: &DeviceProfile,
) -> Result<SimResult> {
    let budget = budget.unwrap_or(usize::MAX);
    // A trace that recorded releases frees buffers when the run did; otherwise at last access.
    let frees_recorded = ops.iter().any(|o| !o.freed.is_empty());
    let mut last_access: HashMap<u64, usize> = HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        for a in op.inputs.iter().chain(&op.outputs) {
            last_access.insert(a.0, i);
        }
    }
    let mut bufs: HashMap<u64, Buf> = HashMap::new();
    let mut by_key: HashMap<u64, u64> = HashMap::new();
    let (mut now, mut h2d_free, mut d2h_free) = (0.0f64, 0.0f64, 0.0f64);
    let mut used = 0usize;
    let mut r = SimResult::default();
    let mut upcoming = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let seq = i as u64;
        let clock = Now {
            seq,
            step: op.step,
            index: i as u32,
        };
        op.announce_to(policy);
        let pinned: Vec<u64> = op.inputs.iter().chain(&op.outputs).map(|a| a.0).collect();
        // Makes room for `bytes` more under the budget, evicting what the policy ranks first.
        macro_rules! room {
            ($bytes:expr) => {
                make_room(
                    &mut bufs,
                    &mut used,
                    $bytes,
                    budget,
                    &pinned,
                    policy,
                    clock,
                    profile,
                    &mut now,
                    &mut d2h_free,
                    &mut r,
                )?
            };
        }
        // Inputs: resident, arriving, in the host tier, dropped, or first seen (made outside ops).
        for a in &op.inputs {
            let place = bufs.get(&a.0).map(|b| b.place);
            let start = now;
            match place {
                Some(Place::Device) => {}
                Some(Place::Arriving(t)) => now = now.max(t),
                Some(Place::Host) => {
                    room!(a.1 as usize);
                    let begin = now.max(h2d_free);
                    h2d_free = begin + profile.h2d_s(a.1);
                    now = h2d_free;
                    r.bytes_h2d += a.1;
                    used += a.1 as usize;
                }
                Some(Place::Dropped) => {
                    room!(a.1 as usize);
                    let (flops, bytes) =
                        bufs.get(&a.0).and_then(|b| b.producer).unwrap_or((0, a.1));
                    let t = profile.kernel_s(flops, bytes);
                    now += t;
                    r.compute_ms += t * 1e3;
                    r.recomputed_flops += flops;
                    used += a.1 as usize;
                }
                None => {
                    // Made before the step (parameters, optimizer state, inputs): left on the
                    // device by the previous step if it still fits, else in the host tier.
                    if used + a.1 as usize > budget {
                        room!(a.1 as usize);
                        let begin = now.max(h2d_free);
                        h2d_free = begin + profile.h2d_s(a.1);
                        now = h2d_free;
                        r.bytes_h2d += a.1;
                    }
                    used += a.1 as usize;
                    bufs.insert(
                        a.0,
                        Buf {
                            bytes: a.1 as usize,
                            key: a.3,
                            kind: a.2,
                            place: Place::Device,
                            last_use: seq,
                            uses: 0,
                            producer: None,
                        },
                    );
                    by_key.insert(a.3, a.0);
                }
            }
            if let Some(b) = bufs.get_mut(&a.0) {
                b.place = Place::Device;
            }
            r.stall_ms += (now - start) * 1e3;
        }
        for a in &op.outputs {
            if bufs.contains_key(&a.0) {
                continue; // written in place
            }
            let start = now;
            room!(a.1 as usize);
            r.stall_ms += (now - start) * 1e3;
            used += a.1 as usize;
            bufs.insert(
                a.0,
                Buf {
                    bytes: a.1 as usize,
                    key: a.3,
                    kind: a.2,
                    place: Place::Device,
                    last_use: seq,
                    uses: 0,
                    producer: Some((op.flops, op.bytes_read + op.bytes_written)),
                },
            );
            by_key.insert(a.3, a.0);
        }
        r.peak_device_bytes = r.peak_device_bytes.max(used);
        let t = profile.kernel_s(op.flops, op.bytes_read + op.bytes_written);
        now += t;
        r.compute_ms += t * 1e3;
        policy.observe(op);
        for a in op.inputs.iter().chain(&op.outputs) {
            if let Some(b) = bufs.get_mut(&a.0) {
                b.last_use = seq;
                b.uses += 1;
            }
        }
        // Free what the run released after this op, or (without release records) what the
        // trace never touches again; parameters and optimizer state outlive the step (they
        // stay where they are, evictable).
        let dead: Vec<u64> = if frees_recorded {
            op.freed.clone()
        } else {
            op.inputs
                .iter()
                .chain(&op.outputs)
                .filter(|a| {
                    last_access.get(&a.0) == Some(&i)
                        && !matches!(
                            kind_of(a.2),
                            BufferKind::Parameter | BufferKind::OptimizerState
                        )
                })
                .map(|a| a.0)
                .collect()
        };
        for id in dead {
            if let Some(b) = bufs.remove(&id) {
                if matches!(b.place, Place::Device | Place::Arriving(_)) {
                    used -= b.bytes;
                }
                by_key.remove(&b.key);
            }
        }
        // Prefetch what the policy expects soon, while there is free room.
        let next = Now {
            seq,
            step: op.step,
            index: i as u32,
        };
        upcoming.clear();
        policy.upcoming(next, PREFETCH_HORIZON, &mut upcoming);
        for &key in &upcoming {
            let Some(&id) = by_key.get(&key) else {
                continue;
            };
            let Some(b) = bufs.get_mut(&id) else { continue };
            if b.place != Place::Host {
                continue;
            }
            if used + b.bytes > budget {
                break;
            }
            let begin = now.max(h2d_free);
            h2d_free = begin + profile.h2d_s(b.bytes as u64);
            b.place = Place::Arriving(h2d_free);
            used += b.bytes;
            r.bytes_h2d += b.bytes as u64;
            r.peak_device_bytes = r.peak_device_bytes.max(used);
        }
    }
    r.step_ms = now * 1e3;
    Ok(r)
}

/// Evicts until `bytes` more fit under the budget.
#[allow(clippy::too_many_arguments)]
fn make_room(
    bufs: &mut HashMap<u64, Buf>,
    used: &mut usize,
    bytes: usize,
    budget: usize,
    pinned: &[u64],
    policy: &mut dyn Policy,
    now_clock: Now,
    profile: &DeviceProfile,
    now: &mut f64,
    d2h_free: &mut f64,
    r: &mut SimResult,
) -> Result<()> {
    if *used + bytes <= budget {
        return Ok(());
    }
    if !policy.evicts() {
        return Err(Error::OutOfMemory {
            requested: bytes,
            budget,
            msg: format!(
                "simulated: {bytes} bytes needed with {used} of {budget} in use; the `none` policy never offloads",
                used = *used
            ),
        });
    }
    let mut cands: Vec<Candidate> = bufs
        .iter()
        .filter(|(id, b)| {
            matches!(b.place, Place::Device | Place::Arriving(_)) && !pinned.contains(id)
        })
        .map(|(&id, b)| Candidate {
            id: BufferId(id),
            key: b.key,
            bytes: b.bytes,
            kind: kind_of(b.kind),
            last_use: b.last_use,
            uses: b.uses,
            recompute_flops: b.producer.map(|p| p.0),
        })
        .collect();
    // Candidates come from a hash map: give policies a fixed order, so ties break the same way
    // in every run.
    cands.sort_by_key(|c| c.id);
    policy.rank_victims(now_clock, &mut cands);
    for c in cands {
        if *used + bytes <= budget {
            break;
        }
        let how = policy.eviction(&c);
        let Some(b) = bufs.get_mut(&c.id.0) else {
            continue;
        };
        if let Place::Arriving(t) = b.place {
            // A prefetch still in flight: it can leave once it has landed.
            *now = now.max(t);
        }
        match how {
            Eviction::Drop => b.place = Place::Dropped,
            Eviction::Offload => {
                let begin = now.max(*d2h_free);
                *d2h_free = begin + profile.d2h_s(b.bytes as u64);
                // The space is free once the copy has left the device.
                *now = *d2h_free;
                r.bytes_d2h += b.bytes as u64;
                b.place = Place::Host;
            }
        }
        *used -= b.bytes;
        r.evictions += 1;
    }
    if *used + bytes > budget {
        return Err(Error::OutOfMemory {
            requested: bytes,
            budget,
            msg: format!(
                "simulated: {bytes} bytes do not fit beside the op's own {used} bytes",
                used = *used
            ),
        });
    }
    Ok(())
}
