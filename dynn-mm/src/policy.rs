//! Policies decide what leaves the device and what comes back early; the manager (or the
//! simulator) acts. A policy never touches bytes.
//!
//! | name | decides by | stands for |
//! |---|---|---|
//! | `none` | never evicts: over budget is an out-of-memory error | PyTorch alone |
//! | `lru` | least recently used, fetch on demand | UVM-style paging |
//! | `static` | first step's access order, replayed for prefetch; LRU eviction | vDNN / Capuchin / SwapAdvisor |
//! | `recompute` | DTR's h = cost / (bytes × staleness), activations dropped and recomputed | DTR |
//! | `belady` | exact next use from a recorded step: evict farthest, prefetch soonest | the offline optimum |
//! | `pilot` | next use predicted by the pilot model (the `pilot` crate implements [`Policy`]); given a device's costs, drops activations cheaper to recompute than to copy | DyNN-Offload |

use crate::trace::OpRecord;
use dynn_core::{BufferId, BufferKind, Error, Result};
use std::collections::{HashMap, HashSet};
use std::sync::RwLock;

/// What a policy knows of one resident buffer that could be evicted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// The buffer.
    pub id: BufferId,
    /// Its stable key across steps (see [`crate::trace`]).
    pub key: u64,
    /// Size in bytes.
    pub bytes: usize,
    /// What it is for.
    pub kind: BufferKind,
    /// Op sequence number of its last use.
    pub last_use: u64,
    /// Uses so far.
    pub uses: u32,
    /// FLOPs to recompute it, when it can be dropped and recomputed: its own op's, plus those
    /// of the dropped buffers around it (DTR's evicted neighbourhood: the clusters of dropped
    /// buffers its recipe reads or whose recipes read it, which dropping it would join).
    pub recompute_flops: Option<u64>,
}

/// Where the clock stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Now {
    /// Process-wide op sequence number of the op about to run (or just run).
    pub seq: u64,
    /// Training step.
    pub step: u64,
    /// Op index within the step.
    pub index: u32,
}

/// How an evicted buffer leaves the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    /// Copied to the host tier.
    Offload,
    /// Released, to be recomputed from its recipe on its next use.
    Drop,
}

/// A memory policy.
pub trait Policy: Send {
    /// The policy's name (as on the command line).
    fn name(&self) -> &'static str;
    /// False when the policy never evicts (`none`): over budget is an error.
    fn evicts(&self) -> bool {
        true
    }
    /// Sees every op, in order, after it ran.
    fn observe(&mut self, _op: &OpRecord) {}
    /// A step ended.
    fn step_boundary(&mut self, _step: u64) {}
    /// The coming ops will read these buffers (ids), one group per planned unit of work, in
    /// this order: the backward pass's tape or the optimizer's parameters, announced by
    /// `source` before they run (see `dynn_core::MemoryHooks::plan`).
    fn plan(&mut self, _source: &str, _groups: &[Vec<u64>]) {}
    /// Buffer `id`, made since the last plan, will be read by its group `group`.
    fn plan_read(&mut self, _group: usize, _id: u64) {}
    /// Orders candidates so the preferred victim comes first.
    fn rank_victims(&mut self, now: Now, candidates: &mut [Candidate]);
    /// Whether [`Policy::eviction`] may answer [`Eviction::Drop`]: the manager then keeps
    /// each output's recipe (the op and weak handles to its inputs), so a buffer can be
    /// dropped while its recipe's inputs live and recomputed from them.
    fn drops(&self) -> bool {
        false
    }
    /// How to evict this candidate.
    fn eviction(&self, _c: &Candidate) -> Eviction {
        Eviction::Offload
    }
    /// Predicted ops until the buffer with `key` is used next (`None`: unknown or not soon).
    fn next_use(&mut self, _now: Now, _key: u64) -> Option<u64> {
        None
    }
    /// Appends to `out` the keys of buffers used in the next `horizon` ops, soonest first
    /// (for prefetching; a policy may list a few ops further). Called at most once after each
    /// op, so `out` is the caller's reused buffer.
    fn upcoming(&mut self, _now: Now, _horizon: usize, _out: &mut Vec<u64>) {}
}

/// Builds a policy by name: the built-ins `none`, `lru`, `static`, `recompute`, `belady`, then
/// the policies crates above dynn-mm added with [`register_policy`] (e.g. `pilot`).
pub fn by_name(name: &str) -> Result<Box<dyn Policy>> {
    Ok(match name {
        "none" => Box::new(NoOffload),
        "lru" => Box::new(Lru),
        "static" => Box::new(StaticProfile::default()),
        "recompute" => Box::new(Recompute),
        "belady" => Box::new(Belady::default()),
        other => {
            let registry = REGISTRY.read().unwrap_or_else(|e| e.into_inner());
            if let Some((_, make)) = registry.iter().find(|(n, _)| *n == other) {
                return Ok(make());
            }
            drop(registry);
            let mut hint = String::new();
            if other == "pilot" {
                hint.push_str(
                    " (pilot comes from the pilot crate: call `pilot::register()` first)",
                );
            }
            return Err(Error::invalid(
                "policy",
                format!(
                    "unknown policy {other:?}: choose {}{hint}",
                    policy_names().join(", ")
                ),
            ));
        }
    })
}

/// The names of the built-in policies (see [`policy_names`] for registered ones too).
pub const POLICIES: [&str; 5] = ["none", "lru", "static", "recompute", "belady"];

/// Builds a registered policy.
pub type MakePolicy = fn() -> Box<dyn Policy>;

/// Policies added by crates above dynn-mm, by name.
static REGISTRY: RwLock<Vec<(&'static str, MakePolicy)>> = RwLock::new(Vec::new());

/// Adds (or replaces) a policy [`by_name`] can build, so a crate above dynn-mm (the `pilot`
/// crate) can offer its policy to every trainer's `--policy`. A built-in name cannot be
/// replaced: [`by_name`] consults the built-ins first.
pub fn register_policy(name: &'static str, make: MakePolicy) {
    let mut registry = REGISTRY.write().unwrap_or_else(|e| e.into_inner());
    match registry.iter_mut().find(|(n, _)| *n == name) {
        Some(entry) => entry.1 = make,
        None => registry.push((name, make)),
    }
}

/// Every name [`by_name`] accepts now: the built-ins, then the registered policies in
/// registration order.
pub fn policy_names() -> Vec<&'static str> {
    let registry = REGISTRY.read().unwrap_or_else(|e| e.into_inner());
    POLICIES
        .iter()
        .copied()
        .chain(
            registry
                .iter()
                .map(|(n, _)| *n)
                .filter(|n| !POLICIES.contains(n)),
        )
        .collect()
}

/// Never evicts.
#[derive(Debug, Default)]
pub struct NoOffload;

impl Policy for NoOffload {
    fn name(&self) -> &'static str {
        "none"
    }
    fn evicts(&self) -> bool {
        false
    }
    fn rank_victims(&mut self, _: Now, _: &mut [Candidate]) {}
}

/// Least recently used first; fetch on demand.
#[derive(Debug, Default)]
pub struct Lru;

impl Policy for Lru {
    fn name(&self) -> &'static str {
        "lru"
    }
    fn rank_victims(&mut self, _: Now, c: &mut [Candidate]) {
        c.sort_by_key(|c| (c.last_use, c.id));
    }
}

/// DTR's heuristic: evict the lowest h = recompute cost / (bytes × staleness), the cost taken
/// over the candidate's evicted neighbourhood ([`Candidate::recompute_flops`]), so chains of
/// dropped activations stay short; activations with a fresh recipe are dropped and recomputed,
/// everything else is offloaded.
#[derive(Debug, Default)]
pub struct Recompute;

impl Policy for Recompute {
    fn name(&self) -> &'static str {
        "recompute"
    }
    fn rank_victims(&mut self, now: Now, c: &mut [Candidate]) {
        let h = |c: &Candidate| {
            let staleness = (now.seq.saturating_sub(c.last_use) + 1) as f64;
            // Offloading a non-recomputable buffer costs a round trip: price it as if it were
            // expensive so droppable activations go first.
            let cost = c.recompute_flops.map_or(1e15, |f| f as f64 + 1.0);
            cost / (c.bytes.max(1) as f64 * staleness)
        };
        c.sort_by(|a, b| h(a).total_cmp(&h(b)).then(a.id.cmp(&b.id)));
    }
    fn drops(&self) -> bool {
        true
    }
    fn eviction(&self, c: &Candidate) -> Eviction {
        if c.recompute_flops.is_some() && c.kind == BufferKind::Activation {
            Eviction::Drop
        } else {
            Eviction::Offload
        }
    }
}

/// Uses of each key at op indices within one recorded step.
#[derive(Debug, Clone, Default)]
pub struct Profile {
    /// Op names by index (to detect a different graph).
    pub ops: Vec<std::borrow::Cow<'static, str>>,
    /// Key → sorted op indices where it is read or written.
    pub uses: HashMap<u64, Vec<u32>>,
    /// Keys touched by each op index.
    pub keys: Vec<Vec<u64>>,
}

impl Profile {
    /// A profile from one step's op records.
    pub fn from_ops<'a>(ops: impl IntoIterator<Item = &'a OpRecord>) -> Profile {
        let mut p = Profile::default();
        for (i, op) in ops.into_iter().enumerate() {
            p.ops.push(op.op.clone());
            let keys: Vec<u64> = op.inputs.iter().chain(&op.outputs).map(|a| a.3).collect();
            for &k in &keys {
                let u = p.uses.entry(k).or_default();
                if u.last() != Some(&(i as u32)) {
                    u.push(i as u32);
                }
            }
            p.keys.push(keys);
        }
        p
    }

    /// Ops from `index` (exclusive) to the next use of `key`; uses wrap into the next step for
    /// keys that live across steps.
    pub fn next_use(&self, index: u32, key: u64) -> Option<u64> {
        let uses = self.uses.get(&key)?;
        let pos = uses.partition_point(|&u| u <= index);
        match uses.get(pos) {
            Some(&u) => Some((u - index) as u64),
            None if key < (1 << 63) => uses
                .first()
                // A step longer than the profiled one (a dynamic graph) is past its end.
                .map(|&u| (self.ops.len() as u64).saturating_sub(index as u64) + u as u64),
            None => None,
        }
    }

    /// Appends to `out` the keys used by ops `index+1 ..= index+horizon`, soonest first,
    /// without repeats (`seen` is scratch space, reused from call to call).
    pub fn upcoming(
        &self,
        index: u32,
        horizon: usize,
        seen: &mut HashSet<u64>,
        out: &mut Vec<u64>,
    ) {
        seen.clear();
        let start = index as usize + 1;
        out.extend(
            self.keys
                .iter()
                .skip(start)
                .take(horizon)
                .flatten()
                .copied()
                .filter(|k| seen.insert(*k)),
        );
    }
}

/// The offline optimum: evicts the buffer used farthest in the future of a recorded step and
/// prefetches in use order. Live, it follows the previous step (or a profile it is given); in
/// the simulator it reads the trace being replayed.
#[derive(Debug, Default)]
pub struct Belady {
    profile: Profile,
    fixed: bool,
    current: Vec<OpRecord>,
    seen: HashSet<u64>,
}

impl Belady {
    /// Belady with a fixed profile (e.g. a recorded trace of the same step).
    pub fn with_profile(profile: Profile) -> Self {
        Belady {
            profile,
            fixed: true,
            ..Default::default()
        }
    }
}

impl Policy for Belady {
    fn name(&self) -> &'static str {
        "belady"
    }
    fn observe(&mut self, op: &OpRecord) {
        if !self.fixed {
            self.current.push(op.clone());
        }
    }
    fn step_boundary(&mut self, _: u64) {
        if !self.fixed && !self.current.is_empty() {
            self.profile = Profile::from_ops(&self.current);
            self.current.clear();
        }
    }
    fn rank_victims(&mut self, now: Now, c: &mut [Candidate]) {
        // Farthest next use first; unknown (not used again) before everything.
        let far = |c: &Candidate| self.profile.next_use(now.index, c.key).unwrap_or(u64::MAX);
        c.sort_by(|a, b| {
            far(b)
                .cmp(&far(a))
                .then(a.last_use.cmp(&b.last_use))
                .then(a.id.cmp(&b.id))
        });
    }
    fn next_use(&mut self, now: Now, key: u64) -> Option<u64> {
        self.profile.next_use(now.index, key)
    }
    fn upcoming(&mut self, now: Now, horizon: usize, out: &mut Vec<u64>) {
        self.profile
            .upcoming(now.index, horizon, &mut self.seen, out);
    }
}

/// vDNN/Capuchin-style: profiles the first step, then prefetches by replaying its access
/// order while the graph matches (on-demand after a mismatch); evicts least recently used.
#[derive(Debug, Default)]
pub struct StaticProfile {
    profile: Option<Profile>,
    first: Vec<OpRecord>,
    matching: bool,
    seen: HashSet<u64>,
}

impl Policy for StaticProfile {
    fn name(&self) -> &'static str {
        "static"
    }
    fn observe(&mut self, op: &OpRecord) {
        match &self.profile {
            None => self.first.push(op.clone()),
            Some(p) => {
                if p.ops.get(op.index as usize) != Some(&op.op) {
                    self.matching = false;
                }
            }
        }
    }
    fn step_boundary(&mut self, _: u64) {
        if self.profile.is_none() && !self.first.is_empty() {
            self.profile = Some(Profile::from_ops(&self.first));
            self.first.clear();
        }
        self.matching = true;
    }
    fn rank_victims(&mut self, _: Now, c: &mut [Candidate]) {
        c.sort_by_key(|c| (c.last_use, c.id));
    }
    fn next_use(&mut self, now: Now, key: u64) -> Option<u64> {
        self.profile
            .as_ref()
            .filter(|_| self.matching)?
            .next_use(now.index, key)
    }
    fn upcoming(&mut self, now: Now, horizon: usize, out: &mut Vec<u64>) {
        if let Some(p) = self.profile.as_ref().filter(|_| self.matching) {
            p.upcoming(now.index, horizon, &mut self.seen, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_policies_are_built_by_name_and_listed() {
        let e = by_name("registry-test").err().expect("not registered yet");
        assert!(e.to_string().contains("belady"), "{e}");
        register_policy("registry-test", || Box::new(Lru));
        assert_eq!(by_name("registry-test").map(|p| p.name()).ok(), Some("lru"));
        // A built-in name keeps its built-in meaning.
        register_policy("none", || Box::new(Lru));
        assert_eq!(by_name("none").map(|p| p.name()).ok(), Some("none"));
        let names = policy_names();
        assert!(names.contains(&"registry-test") && names.contains(&"static"));
        assert_eq!(names.iter().filter(|n| **n == "none").count(), 1);
        let e = by_name("nope").err().expect("unknown").to_string();
        assert!(
            e.contains("registry-test") && e.contains("recompute"),
            "{e}"
        );
    }
}
