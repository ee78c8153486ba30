//! The dropped buffers' neighbourhoods, for pricing a drop as DTR does.

use super::*;

/// The dropped buffers grouped into clusters joined by recipe edges (a dropped buffer and the
/// dropped inputs of its recipe), each with the FLOPs to recompute its members: DTR's evicted
/// neighbourhoods. Recomputing any member on access recomputes the members it reads first.
///
/// A union-find over the dropped buffers: dropping a buffer joins the clusters around it. A
/// member that comes back leaves its cluster's cost; when it joined two or more dropped
/// buffers its cluster may have split, and the clusters are rebuilt before they are next
/// used. (Chains come back from the resident end, one end member at a time, so that is rare.)
#[derive(Default)]
pub(super) struct DroppedClusters {
    /// Union-find nodes: parent, and for a root the size of its tree and the FLOPs of its
    /// members still dropped. Nodes of members that came back stay as links.
    nodes: Vec<(u32, u32, u64)>,
    /// Dropped buffer → its node and its FLOPs.
    member: KeyMap<BufferId, (u32, u64)>,
    /// A member came back whose leaving may have split its cluster.
    pub(super) stale: bool,
}

impl DroppedClusters {
    /// The clusters of the dropped buffers in `table`.
    pub(super) fn rebuild(table: &KeyMap<BufferId, Entry>) -> Self {
        let mut c = DroppedClusters::default();
        let dropped = || table.iter().filter(|(_, e)| e.res == Residency::Dropped);
        for (&id, e) in dropped() {
            c.drop(id, e.flops, std::iter::empty());
        }
        for (&id, e) in dropped() {
            for input in e.recipe.iter().flat_map(|r| r.input_ids()) {
                c.join(id, input);
            }
        }
        c
    }

    pub(super) fn root(&self, mut i: u32) -> u32 {
        while self.nodes[i as usize].0 != i {
            i = self.nodes[i as usize].0;
        }
        i
    }

    /// Joins the clusters of two dropped buffers (nothing when either is not dropped).
    pub(super) fn join(&mut self, a: BufferId, b: BufferId) {
        let (Some(&(a, _)), Some(&(b, _))) = (self.member.get(&a), self.member.get(&b)) else {
            return;
        };
        let (ra, rb) = (self.root(a), self.root(b));
        if ra == rb {
            return;
        }
        // Union by size keeps every path short (roots are found without compressing paths).
        let (big, small) = if self.nodes[ra as usize].1 >= self.nodes[rb as usize].1 {
            (ra, rb)
        } else {
            (rb, ra)
        };
        let (_, size, cost) = self.nodes[small as usize];
        self.nodes[small as usize].0 = big;
        let root = &mut self.nodes[big as usize];
        root.1 += size;
        root.2 = root.2.saturating_add(cost);
    }

    /// `x`, recomputed with `flops`, was dropped; `neighbours` are buffers beside it (the
    /// inputs of its recipe, and the buffers whose recipes read it).
    pub(super) fn drop(
        &mut self,
        x: BufferId,
        flops: u64,
        neighbours: impl Iterator<Item = BufferId>,
    ) {
        if self.member.contains_key(&x) {
            return;
        }
        let i = self.nodes.len() as u32;
        self.nodes.push((i, 1, flops));
        self.member.insert(x, (i, flops));
        for n in neighbours {
            self.join(x, n);
        }
    }

    /// `x` is no longer dropped (recomputed, or released); `neighbours` dropped buffers were
    /// beside it. Returns true when the clusters should be rebuilt now: dead links outnumber
    /// the members.
    pub(super) fn restore(&mut self, x: BufferId, neighbours: usize) -> bool {
        let Some((i, flops)) = self.member.remove(&x) else {
            return false;
        };
        let root = self.root(i);
        let cost = &mut self.nodes[root as usize].2;
        *cost = cost.saturating_sub(flops);
        if neighbours >= 2 {
            self.stale = true;
        }
        self.nodes.len() > 2 * self.member.len() + 64
    }

    /// FLOPs to recompute every distinct cluster that one of `ids` belongs to.
    pub(super) fn cost_around(&self, ids: impl Iterator<Item = BufferId>) -> u64 {
        if self.member.is_empty() {
            return 0;
        }
        let mut seen: Vec<u32> = Vec::new();
        let mut total = 0u64;
        for id in ids {
            if let Some(&(i, _)) = self.member.get(&id) {
                let root = self.root(i);
                if !seen.contains(&root) {
                    seen.push(root);
                    total = total.saturating_add(self.nodes[root as usize].2);
                }
            }
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::DroppedClusters;
    use dynn_core::BufferId;

    /// Cluster costs kept incrementally equal those of the connected components of the dropped
    /// buffers, over random drops and returns on a random recipe graph.
    #[test]
    fn clusters_follow_the_dropped_subgraph() {
        const N: usize = 40;
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut rand = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        // Buffer i's recipe reads up to two earlier buffers.
        let inputs: Vec<Vec<usize>> = (0..N)
            .map(|i| (0..2).filter(|_| i > 0).map(|_| rand(i.max(1))).collect())
            .collect();
        let flops = |i: usize| 10 + i as u64;
        let id = |i: usize| BufferId(i as u64);
        let beside = |i: usize| -> Vec<usize> {
            let mut b = inputs[i].clone();
            b.extend((0..N).filter(|&j| inputs[j].contains(&i)));
            b
        };
        let mut dropped = [false; N];
        let mut c = DroppedClusters::default();
        for _ in 0..2000 {
            let x = rand(N);
            if dropped[x] {
                dropped[x] = false;
                let n = beside(x).into_iter().filter(|&j| dropped[j]).count();
                let _ = c.restore(id(x), n);
            } else {
                dropped[x] = true;
                let near: Vec<BufferId> = beside(x).into_iter().map(id).collect();
                c.drop(id(x), flops(x), near.into_iter());
            }
            if c.stale {
                c = DroppedClusters::default();
                for i in (0..N).filter(|&i| dropped[i]) {
                    c.drop(id(i), flops(i), std::iter::empty());
                }
                for i in (0..N).filter(|&i| dropped[i]) {
                    for &j in &inputs[i] {
                        c.join(id(i), id(j));
                    }
                }
            }
            // Brute force: each dropped buffer's component and its cost.
            for start in (0..N).filter(|&i| dropped[i]) {
                let mut seen = vec![start];
                let mut stack = vec![start];
                while let Some(i) = stack.pop() {
                    for j in beside(i) {
                        if dropped[j] && !seen.contains(&j) {
                            seen.push(j);
                            stack.push(j);
                        }
                    }
                }
                let want: u64 = seen.iter().map(|&i| flops(i)).sum();
                assert_eq!(
                    c.cost_around(std::iter::once(id(start))),
                    want,
                    "buffer {start}"
                );
            }
        }
    }
}
