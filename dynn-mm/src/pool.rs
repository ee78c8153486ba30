//! The device pool: a caching sub-allocator over large segments under a byte budget.
//!
//! Requests are rounded to 512 bytes and served best-fit from free blocks of cached segments
//! (small requests from 2 MiB segments, large ones from 20 MiB segments or their own), split
//! when the remainder is usable and coalesced with free neighbours on release. A new segment
//! is reserved only when no free block fits; empty segments are released when the budget
//! would otherwise be exceeded. When the budget has room for a request but no free block is
//! large enough, the caller may [`DevicePool::compact`] the live blocks, which packs them end to
//! end if segments of the usual sizes would not leave the room. On the CPU backend the pool
//! hands out offsets in a virtual address space (the accounting is exact). On a GPU the bytes
//! live in the CUDA backend's arena, reserved for this budget (`DYNN_CUDA_ARENA=budget`), or
//! in the driver's pool: the pool's accounting is what holds the budget there.

use std::collections::{BTreeMap, BTreeSet};

/// Allocation granularity in bytes.
pub const ALIGN: usize = 512;
/// Requests up to this size are "small" and share small segments.
pub const SMALL_LIMIT: usize = 1 << 20;
/// Size of a small segment.
pub const SMALL_SEGMENT: usize = 2 << 20;
/// Minimum size of a large segment.
pub const LARGE_SEGMENT: usize = 20 << 20;

/// A live allocation: segment, offset and (rounded) size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Block {
    /// Segment index.
    pub segment: u32,
    /// Byte offset in the segment.
    pub offset: usize,
    /// Size in bytes (rounded up to [`ALIGN`]).
    pub size: usize,
}

/// Why an allocation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "device pool: cannot allocate {requested} bytes: {in_use} in use, {reserved} reserved of a {budget}-byte budget (largest free block {largest_free})"
)]
pub struct PoolExhausted {
    /// Bytes asked for.
    pub requested: usize,
    /// Bytes in live blocks.
    pub in_use: usize,
    /// Bytes in segments.
    pub reserved: usize,
    /// The budget.
    pub budget: usize,
    /// Largest free block in any segment.
    pub largest_free: usize,
}

/// Pool statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PoolStats {
    /// Bytes in live blocks.
    pub in_use: usize,
    /// Bytes in reserved segments.
    pub reserved: usize,
    /// Peak of `in_use`.
    pub peak_in_use: usize,
    /// Peak of `reserved`.
    pub peak_reserved: usize,
    /// The budget (`usize::MAX` when unlimited).
    pub budget: usize,
    /// Number of segments.
    pub segments: usize,
    /// Number of allocations served.
    pub allocations: u64,
    /// Number of segments reserved over the pool's life.
    pub segment_allocations: u64,
    /// Largest free block.
    pub largest_free: usize,
    /// 1 − largest free block / free bytes in segments (0 when nothing is free).
    pub fragmentation: f64,
}

#[derive(Debug, Clone)]
struct Segment {
    size: usize,
    small: bool,
    /// offset → (size, free)
    blocks: BTreeMap<usize, (usize, bool)>,
}

/// A free block's key: (small, size, segment, offset), so that a range search finds the
/// smallest free block of a kind that fits.
type FreeKey = (bool, usize, u32, usize);

/// What a repack saves to go back to: the segments, the free blocks and the statistics.
type PoolState = (Vec<Option<Segment>>, BTreeSet<FreeKey>, PoolStats);

/// The caching sub-allocator.
#[derive(Debug)]
pub struct DevicePool {
    budget: usize,
    small_segment: usize,
    large_segment: usize,
    segments: Vec<Option<Segment>>,
    /// (small, size, segment, offset) of every free block.
    free: BTreeSet<FreeKey>,
    stats: PoolStats,
}

fn round_up(n: usize) -> usize {
    n.max(1).div_ceil(ALIGN) * ALIGN
}

impl DevicePool {
    /// A pool with a byte budget (`None`: unlimited) and the default segment sizes.
    pub fn new(budget: Option<usize>) -> Self {
        Self::with_segments(budget, SMALL_SEGMENT, LARGE_SEGMENT)
    }

    /// A pool whose small and large segments have the given sizes (rounded to [`ALIGN`]);
    /// small models are best measured with small segments.
    pub fn with_segments(
        budget: Option<usize>,
        small_segment: usize,
        large_segment: usize,
    ) -> Self {
        let budget = budget.unwrap_or(usize::MAX);
        DevicePool {
            budget,
            small_segment: round_up(small_segment),
            large_segment: round_up(large_segment),
            segments: Vec::new(),
            free: BTreeSet::new(),
            stats: PoolStats {
                budget,
                ..Default::default()
            },
        }
    }

    /// The budget in bytes (`usize::MAX` when unlimited).
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// The size a request of `bytes` occupies.
    pub fn rounded(bytes: usize) -> usize {
        round_up(bytes)
    }

    fn segment_size(&self, size: usize) -> usize {
        if size <= SMALL_LIMIT {
            self.small_segment.max(size)
        } else {
            size.max(self.large_segment).next_multiple_of(ALIGN)
        }
    }

    /// Allocates `bytes` (rounded up to [`ALIGN`]).
    pub fn allocate(&mut self, bytes: usize) -> Result<Block, PoolExhausted> {
        let size = round_up(bytes);
        let small = size <= SMALL_LIMIT;
        let block = match self.take_free(small, size) {
            Some(b) => b,
            None => {
                self.reserve_segment(small, size)?;
                self.take_free(small, size)
                    .ok_or_else(|| self.exhausted(size))?
            }
        };
        self.stats.in_use += block.size;
        self.stats.peak_in_use = self.stats.peak_in_use.max(self.stats.in_use);
        self.stats.allocations += 1;
        Ok(block)
    }

    fn exhausted(&self, requested: usize) -> PoolExhausted {
        PoolExhausted {
            requested,
            in_use: self.stats.in_use,
            reserved: self.stats.reserved,
            budget: self.budget,
            largest_free: self.largest_free(),
        }
    }

    fn take_free(&mut self, small: bool, size: usize) -> Option<Block> {
        let &key = self
            .free
            .range((small, size, 0, 0)..)
            .next()
            .filter(|k| k.0 == small)?;
        self.free.remove(&key);
        let (_, fsize, seg, off) = key;
        let segment = self.segments[seg as usize].as_mut()?;
        let rest = fsize - size;
        if rest >= ALIGN {
            segment.blocks.insert(off, (size, false));
            segment.blocks.insert(off + size, (rest, true));
            self.free.insert((small, rest, seg, off + size));
            Some(Block {
                segment: seg,
                offset: off,
                size,
            })
        } else {
            segment.blocks.insert(off, (fsize, false));
            Some(Block {
                segment: seg,
                offset: off,
                size: fsize,
            })
        }
    }

    fn reserve_segment(&mut self, small: bool, size: usize) -> Result<(), PoolExhausted> {
        let mut seg_size = self.segment_size(size);
        if self.stats.reserved + seg_size > self.budget {
            // Fall back to an exact-size segment, then to releasing cached empty segments.
            seg_size = if small {
                self.small_segment
                    .min(self.budget.saturating_sub(self.stats.reserved))
                    .max(size)
            } else {
                size
            };
            if self.stats.reserved + seg_size > self.budget {
                self.release_empty();
            }
            if self.stats.reserved + seg_size > self.budget {
                return Err(self.exhausted(size));
            }
        }
        self.new_segment(small, seg_size);
        Ok(())
    }

    /// Reserves a segment of `seg_size` bytes (the caller checked the budget), as one free
    /// block. Returns its index.
    fn new_segment(&mut self, small: bool, seg_size: usize) -> usize {
        let idx = match self.segments.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.segments.push(None);
                self.segments.len() - 1
            }
        };
        let mut blocks = BTreeMap::new();
        blocks.insert(0, (seg_size, true));
        self.segments[idx] = Some(Segment {
            size: seg_size,
            small,
            blocks,
        });
        self.free.insert((small, seg_size, idx as u32, 0));
        self.stats.reserved += seg_size;
        self.stats.peak_reserved = self.stats.peak_reserved.max(self.stats.reserved);
        self.stats.segment_allocations += 1;
        idx
    }

    /// Returns a block to the pool, coalescing it with free neighbours.
    pub fn release(&mut self, block: Block) {
        let Some(segment) = self
            .segments
            .get_mut(block.segment as usize)
            .and_then(Option::as_mut)
        else {
            return;
        };
        let Some(&(size, false)) = segment.blocks.get(&block.offset) else {
            return;
        };
        let small = segment.small;
        let (mut off, mut len) = (block.offset, size);
        if let Some((&next_off, &(next_len, true))) = segment.blocks.range(off + len..).next()
            && next_off == off + len
        {
            segment.blocks.remove(&next_off);
            self.free
                .remove(&(small, next_len, block.segment, next_off));
            len += next_len;
        }
        if let Some((&prev_off, &(prev_len, true))) = segment.blocks.range(..off).next_back()
            && prev_off + prev_len == off
        {
            segment.blocks.remove(&off);
            self.free
                .remove(&(small, prev_len, block.segment, prev_off));
            off = prev_off;
            len += prev_len;
        }
        segment.blocks.insert(off, (len, true));
        self.free.insert((small, len, block.segment, off));
        self.stats.in_use -= size;
    }

    /// Repacks `live` (every block still allocated) so that, afterwards, a request of `room`
    /// bytes (0: none) is served: releases them and every segment left empty, then allocates
    /// them again, so free space scattered over several segments becomes one. The repacked
    /// blocks first go into segments of the usual sizes, largest first; when that leaves no
    /// block for `room` (near the budget, where segments are sized to their first block and
    /// each keeps a tail too small to use), they are packed end to end into one segment of
    /// exactly their size plus `room`. Returns the new block of each, in order. The caller
    /// moves the bytes (on the CPU tier the blocks are accounting only, so nothing moves).
    /// Fails, leaving the pool as it was, when the repacked blocks and `room` do not fit.
    pub fn compact(&mut self, live: &[Block], room: usize) -> Result<Vec<Block>, PoolExhausted> {
        let live_bytes: usize = live.iter().map(|b| b.size).sum();
        if live_bytes == self.stats.in_use {
            return self.compact_all(live, room);
        }
        let before = (self.segments.clone(), self.free.clone(), self.stats);
        for b in live {
            self.release(*b);
        }
        self.release_empty();
        let released = (self.segments.clone(), self.free.clone(), self.stats);
        self.place_again(live, room, released, before.2)
            .inspect_err(|_| (self.segments, self.free, self.stats) = before)
    }

    /// [`DevicePool::compact`] where `live` is every allocated block (the usual case): once
    /// they are released no segment is left, so nothing need be released one by one, nor the
    /// pool copied to undo a failure, which the budget decides up front.
    fn compact_all(&mut self, live: &[Block], room: usize) -> Result<Vec<Block>, PoolExhausted> {
        let room_bytes = if room == 0 { 0 } else { round_up(room) };
        if self.stats.in_use + room_bytes > self.budget {
            return Err(self.exhausted(round_up(room)));
        }
        let before = self.stats;
        let slots = self.segments.len();
        self.segments.iter_mut().for_each(|s| *s = None);
        self.free.clear();
        self.stats.in_use = 0;
        self.stats.reserved = 0;
        let released = (vec![None; slots], BTreeSet::new(), self.stats);
        self.place_again(live, room, released, before)
    }

    /// Allocates `live` again into the released pool (`released`: its segments, free blocks
    /// and statistics), largest first, and makes room for `room`; packs them end to end when
    /// that fails. `before`: the statistics before the repack.
    fn place_again(
        &mut self,
        live: &[Block],
        room: usize,
        released: PoolState,
        before: PoolStats,
    ) -> Result<Vec<Block>, PoolExhausted> {
        let mut order: Vec<usize> = (0..live.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(live[i].size));
        let mut out = vec![None; live.len()];
        let mut usual = true;
        for &i in &order {
            match self.allocate(live[i].size) {
                Ok(b) => out[i] = Some(b),
                Err(_) => {
                    usual = false;
                    break;
                }
            }
        }
        if !(usual && (room == 0 || self.fits(room))) {
            (self.segments, self.free, self.stats) = released;
            match self.pack(live, &order, room) {
                Some(packed) => out = packed.into_iter().map(Some).collect(),
                None => return Err(self.exhausted(round_up(room))),
            }
        }
        // Compaction is not a user allocation, and the same bytes were in use before.
        self.stats.allocations = before.allocations;
        self.stats.peak_in_use = before.peak_in_use;
        Ok(out.into_iter().flatten().collect())
    }

    /// Packs `live` (in `order`) end to end into one new segment of their total size plus
    /// `room`, whose free tail serves `room`. `None` when that segment exceeds the budget.
    fn pack(&mut self, live: &[Block], order: &[usize], room: usize) -> Option<Vec<Block>> {
        let room = if room == 0 { 0 } else { round_up(room) };
        let total = live.iter().map(|b| b.size).sum::<usize>() + room;
        if total == 0 {
            return Some(Vec::new());
        }
        if self.stats.reserved + total > self.budget {
            self.release_empty();
            if self.stats.reserved + total > self.budget {
                return None;
            }
        }
        let small = room > 0 && room <= SMALL_LIMIT;
        let idx = self.new_segment(small, total);
        let segment = self.segments[idx].as_mut()?;
        segment.blocks.clear();
        let mut out = vec![None; live.len()];
        let mut off = 0;
        for &i in order {
            let size = live[i].size;
            segment.blocks.insert(off, (size, false));
            out[i] = Some(Block {
                segment: idx as u32,
                offset: off,
                size,
            });
            off += size;
        }
        self.free.remove(&(small, total, idx as u32, 0));
        if room > 0 {
            segment.blocks.insert(off, (room, true));
            self.free.insert((small, room, idx as u32, off));
        }
        self.stats.in_use += total - room;
        Some(out.into_iter().flatten().collect())
    }

    /// True when [`DevicePool::allocate`] of `bytes` would succeed now.
    pub fn fits(&self, bytes: usize) -> bool {
        let size = round_up(bytes);
        let small = size <= SMALL_LIMIT;
        if self
            .free
            .range((small, size, 0, 0)..)
            .next()
            .is_some_and(|k| k.0 == small)
        {
            return true;
        }
        // A new segment of at least `size` bytes, after releasing the empty ones.
        let empty: usize = self
            .segments
            .iter()
            .flatten()
            .filter(|s| s.blocks.len() == 1 && s.blocks.values().all(|b| b.1))
            .map(|s| s.size)
            .sum();
        self.stats.reserved - empty + size <= self.budget
    }

    /// Bytes the budget leaves beyond the live blocks: free blocks in segments plus what is
    /// not reserved. A request this large may still fail when that space is scattered.
    pub fn available(&self) -> usize {
        self.budget.saturating_sub(self.stats.in_use)
    }

    /// Releases every cached segment that holds no live block. Returns the bytes released.
    pub fn release_empty(&mut self) -> usize {
        let mut freed = 0;
        for (i, slot) in self.segments.iter_mut().enumerate() {
            let empty = slot
                .as_ref()
                .is_some_and(|s| s.blocks.len() == 1 && s.blocks.values().all(|b| b.1));
            if empty && let Some(s) = slot.take() {
                self.free.remove(&(s.small, s.size, i as u32, 0));
                freed += s.size;
            }
        }
        self.stats.reserved -= freed;
        freed
    }

    fn largest_free(&self) -> usize {
        self.free.iter().map(|f| f.1).max().unwrap_or(0)
    }

    /// Bytes in live blocks (the one counter the per-op path needs; [`DevicePool::stats`]
    /// also walks the free list).
    pub fn in_use(&self) -> usize {
        self.stats.in_use
    }

    /// Current statistics.
    pub fn stats(&self) -> PoolStats {
        let free_bytes: usize = self.free.iter().map(|f| f.1).sum();
        let largest = self.largest_free();
        PoolStats {
            segments: self.segments.iter().flatten().count(),
            largest_free: largest,
            fragmentation: if free_bytes == 0 {
                0.0
            } else {
                1.0 - largest as f64 / free_bytes as f64
            },
            ..self.stats
        }
    }

    /// Live blocks of every segment, for invariant checks: `(segment, offset, size)`.
    pub fn live_blocks(&self) -> Vec<(u32, usize, usize)> {
        let mut v = Vec::new();
        for (i, s) in self.segments.iter().enumerate() {
            if let Some(s) = s {
                v.extend(
                    s.blocks
                        .iter()
                        .filter(|b| !b.1.1)
                        .map(|(&o, &(l, _))| (i as u32, o, l)),
                );
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_coalesce() {
        let mut p = DevicePool::new(None);
        let a = p.allocate(1000).unwrap();
        let b = p.allocate(1000).unwrap();
        assert_eq!(a.size, 1024);
        assert_eq!((a.segment, b.segment), (0, 0));
        assert_eq!(b.offset, 1024);
        assert_eq!(p.stats().reserved, SMALL_SEGMENT);
        p.release(a);
        p.release(b);
        assert_eq!(p.stats().in_use, 0);
        assert_eq!(
            p.stats().largest_free,
            SMALL_SEGMENT,
            "free neighbours coalesce back into one block"
        );
        assert_eq!(p.release_empty(), SMALL_SEGMENT);
        assert_eq!(p.stats().reserved, 0);
    }

    #[test]
    fn best_fit_reuses_cached_blocks() {
        let mut p = DevicePool::new(None);
        let big = p.allocate(30 << 20).unwrap();
        p.release(big);
        let again = p.allocate(25 << 20).unwrap();
        assert_eq!(again.segment, big.segment, "served from the cached segment");
        assert_eq!(p.stats().segment_allocations, 1);
    }

    #[test]
    fn budget_is_enforced_with_a_clear_error() {
        let mut p = DevicePool::new(Some(4 << 20));
        let a = p.allocate(3 << 20).unwrap();
        let e = p.allocate(2 << 20).unwrap_err();
        assert_eq!(e.requested, 2 << 20);
        assert!(e.to_string().contains("budget"), "{e}");
        p.release(a);
        assert!(
            p.allocate(2 << 20).is_ok(),
            "empty segments are released to make room"
        );
    }

    #[test]
    fn compaction_gathers_scattered_free_space() {
        // Two 64 KiB segments, each holding one small live block: 100 KiB is free in total
        // but no 96 KiB request fits until the live blocks are repacked into one segment.
        let mut p = DevicePool::with_segments(Some(192 << 10), 64 << 10, 1 << 20);
        let a = p.allocate(40 << 10).unwrap();
        let fill = p.allocate(24 << 10).unwrap();
        let b = p.allocate(4 << 10).unwrap();
        p.release(fill);
        assert_ne!(a.segment, b.segment);
        assert!(p.allocate(96 << 10).is_err());
        let moved = p.compact(&[a, b], 0).unwrap();
        assert_eq!(moved.len(), 2);
        assert_eq!(moved[0].size, a.size);
        assert_eq!(moved[1].size, b.size);
        assert_eq!(moved[0].segment, moved[1].segment, "repacked together");
        assert_eq!(p.stats().in_use, a.size + b.size);
        assert!(p.allocate(96 << 10).is_ok());
        assert_eq!(p.live_blocks().len(), 3);
    }

    #[test]
    fn compaction_near_the_budget_packs_blocks_end_to_end() {
        // Evoformer at 25% of its peak: a 9.67 MiB budget, so every large block has a segment
        // of its own and small blocks share 2 MiB segments with unusable tails. 2.55 MiB of the
        // budget is free but no 2.25 MiB block can be had, and repacking into segments of the
        // usual sizes gives the same layout back.
        let budget = 10_139_648;
        let mut p = DevicePool::new(Some(budget));
        let sizes = [
            2304 << 10,
            1152 << 10,
            1152 << 10,
            576 << 10,
            576 << 10,
            576 << 10,
            576 << 10,
            192 << 10,
            192 << 10,
        ];
        let live: Vec<Block> = sizes.iter().map(|&n| p.allocate(n).unwrap()).collect();
        let request = 2304 << 10;
        assert!(!p.fits(request) && p.allocate(request).is_err());
        assert!(p.available() >= request, "the budget has room in total");
        let moved = p.compact(&live, request).unwrap();
        assert_eq!(
            moved.iter().map(|b| b.size).collect::<Vec<_>>(),
            live.iter().map(|b| b.size).collect::<Vec<_>>()
        );
        assert!(p.fits(request));
        p.allocate(request).unwrap();
        let stats = p.stats();
        assert_eq!(stats.in_use, sizes.iter().sum::<usize>() + request);
        assert!(stats.reserved <= budget && stats.peak_reserved <= budget);
        assert_eq!(p.live_blocks().len(), live.len() + 1);
        // When even packed they do not fit, nothing changes.
        let before = p.live_blocks();
        assert!(p.compact(&moved, 1 << 20).is_err());
        assert_eq!(p.live_blocks(), before);
    }
}
