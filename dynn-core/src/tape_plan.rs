//! The backward pass's reads, known from the tape before it runs: the memory hooks hear which
//! saved buffers each node will read, in the order the engine processes the nodes, and then,
//! as gradients are made, which node reads each one next.

use crate::BufferId;
use crate::autograd::{GradMeta, Node};
use std::collections::HashMap;
use std::sync::Arc;

/// Where a gradient is delivered: a node or a leaf's accumulator, by address (unique while an
/// edge names it, and edges hold what they name).
fn target(meta: &GradMeta) -> usize {
    match meta {
        GradMeta::Node { node, .. } => Arc::as_ptr(node) as usize,
        GradMeta::Leaf(leaf) => Arc::as_ptr(leaf) as usize,
    }
}

/// The plan of one backward pass.
pub(crate) struct TapePlan {
    /// Per node, in processing order: the buffers of the tensors it saved.
    pub(crate) groups: Vec<Vec<BufferId>>,
    /// Node sequence number → its group.
    group_of: HashMap<u64, usize>,
    /// Delivery target → the groups that deliver to it, ascending.
    feeders: HashMap<usize, Vec<usize>>,
}

impl TapePlan {
    /// The plan of `nodes`, the nodes reachable from the root in the order backward processes
    /// them ([`crate::autograd::reachable_nodes`]).
    pub(crate) fn new(nodes: &[Arc<Node>]) -> TapePlan {
        let mut feeders: HashMap<usize, Vec<usize>> = HashMap::new();
        for (g, n) in nodes.iter().enumerate() {
            for edge in n.edges.iter().flatten() {
                feeders.entry(target(edge)).or_default().push(g);
            }
        }
        let groups = nodes
            .iter()
            .map(|n| {
                let saved = n.saved.lock().unwrap_or_else(|e| e.into_inner());
                saved.as_ref().map_or_else(Vec::new, |s| {
                    s.inputs
                        .iter()
                        .chain(&s.outputs)
                        .flatten()
                        .map(|t| t.buffer().id())
                        .collect()
                })
            })
            .collect();
        TapePlan {
            groups,
            group_of: nodes.iter().enumerate().map(|(i, n)| (n.seq, i)).collect(),
            feeders,
        }
    }

    /// The group of the node with sequence number `seq`.
    pub(crate) fn group_of(&self, seq: u64) -> Option<usize> {
        self.group_of.get(&seq).copied()
    }

    /// The group that next reads the gradient just delivered to `to` by group `from` (`None`:
    /// the seed): the next group delivering to the same place (it adds to it), or the
    /// receiving node itself; `None` for a leaf nothing adds to again (the optimizer reads
    /// it).
    pub(crate) fn next_read(&self, from: Option<usize>, to: &GradMeta) -> Option<usize> {
        let after = |g: usize| from.is_none_or(|f| g > f);
        let adds = self
            .feeders
            .get(&target(to))
            .and_then(|gs| gs.iter().copied().find(|&g| after(g)));
        let reads = match to {
            GradMeta::Node { node, .. } => self.group_of(node.seq),
            GradMeta::Leaf(_) => None,
        };
        match (adds, reads) {
            (Some(a), Some(r)) => Some(a.min(r)),
            (a, r) => a.or(r),
        }
    }
}
