//! [`Arena`]: the device memory of a GPU as a few large allocations (regions), carved into
//! buffers best-fit on the host, with no driver call per buffer.
//!
//! Streams decide when a freed block may be handed out again:
//! - A block freed on the compute stream can go back to the compute stream at once (the
//!   kernels that used it run first, in stream order), but to a copy stream only once the
//!   compute stream has passed the free. A *marker*, an event recorded on the compute stream,
//!   tells when: once it has completed, every block freed before it was recorded is ready.
//! - A block freed after an offload's copy (on the download stream) is *fenced* by an event
//!   after that copy: nothing reuses it before the event completes.
//!
//! Ready blocks (no stream can still touch them) coalesce with ready neighbours. The arena
//! knows nothing of CUDA: a fence is any `F`, and [`Arena::poll`] is told which have completed,
//! so the bookkeeping is tested on the CPU.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Block sizes and offsets are multiples of this many bytes (kernels load 16-byte vectors;
/// 512 matches the memory manager's pool).
pub const ALIGN: usize = 512;

/// The stream a block is handed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The stream every kernel runs on.
    Compute,
    /// A copy stream (the upload of a fetched buffer).
    Copy,
}

/// Where a block lies: region and byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Place {
    region: u32,
    offset: usize,
}

/// A block handed out: its place, its device address and its (rounded) size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// Where it lies (give it back to [`Arena::free`]).
    pub place: Place,
    /// Device address of its first byte.
    pub ptr: u64,
    /// Size in bytes, a multiple of [`ALIGN`].
    pub size: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Used,
    /// Free; no stream can still touch it.
    Ready,
    /// Free on the compute stream after the free numbered `seq`.
    ComputeFree {
        seq: u64,
    },
    /// Free once its fence completes.
    Fenced,
}

#[derive(Debug, Clone, Copy)]
struct Info {
    size: usize,
    state: State,
    /// Changes with every change of state: a queued entry naming an older generation is stale.
    generation: u64,
}

/// Byte counts of an arena.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArenaStats {
    /// Bytes in regions.
    pub reserved: usize,
    /// Bytes in blocks handed out.
    pub in_use: usize,
    /// Peak of `in_use`.
    pub peak_in_use: usize,
    /// Blocks handed out.
    pub allocations: u64,
    /// Requests no free block could serve, the caller then allocating elsewhere (counted by
    /// `Arena::miss`).
    pub misses: u64,
}

/// The sub-allocator (see the module documentation). `F` is a fence: an event the caller can
/// ask about.
#[derive(Debug)]
pub struct Arena<F> {
    /// Base address and size of each region.
    regions: Vec<(u64, usize)>,
    /// Every block, used or free, by place.
    blocks: BTreeMap<Place, Info>,
    /// Free ready blocks, by size.
    ready: BTreeSet<(usize, Place)>,
    /// Free blocks only the compute stream may take yet, by size.
    compute_free: BTreeSet<(usize, Place)>,
    /// Compute-stream frees not yet known to be passed: `(seq, place, generation)`.
    unmarked: VecDeque<(u64, Place, u64)>,
    /// Markers on the compute stream, oldest first, each with the last free it covers.
    markers: VecDeque<(F, u64)>,
    /// Fenced blocks, oldest first: `(fence, place, generation)`.
    fenced: VecDeque<(F, Place, u64)>,
    /// Compute-stream frees so far, and the last one a marker covers.
    seq: u64,
    marked: u64,
    /// Frees known to be passed by the compute stream.
    passed: u64,
    generation: u64,
    stats: ArenaStats,
}

impl<F> Default for Arena<F> {
    fn default() -> Self {
        Arena {
            regions: Vec::new(),
            blocks: BTreeMap::new(),
            ready: BTreeSet::new(),
            compute_free: BTreeSet::new(),
            unmarked: VecDeque::new(),
            markers: VecDeque::new(),
            fenced: VecDeque::new(),
            seq: 0,
            marked: 0,
            passed: 0,
            generation: 0,
            stats: ArenaStats::default(),
        }
    }
}

impl<F> Arena<F> {
    /// `bytes` rounded up to [`ALIGN`] (at least one unit).
    pub fn rounded(bytes: usize) -> usize {
        bytes.max(1).div_ceil(ALIGN) * ALIGN
    }

    /// Adds the region of `size` bytes at device address `base` (aligned to [`ALIGN`]), free
    /// and ready.
    pub fn add_region(&mut self, base: u64, size: usize) {
        let size = size / ALIGN * ALIGN;
        if size == 0 {
            return;
        }
        let place = Place {
            region: self.regions.len() as u32,
            offset: 0,
        };
        self.regions.push((base, size));
        self.stats.reserved += size;
        self.set(place, size, State::Ready);
    }

    /// The regions, as `(base, size)`.
    pub fn regions(&self) -> &[(u64, usize)] {
        &self.regions
    }

    /// The counters.
    pub fn stats(&self) -> ArenaStats {
        self.stats
    }

    /// A block of at least `bytes` for `stream`, best-fit (`None`: no free block it may take
    /// is large enough; [`Arena::poll`] may free some).
    pub fn alloc(&mut self, bytes: usize, stream: Stream) -> Option<Block> {
        let size = Self::rounded(bytes);
        let fit = |set: &BTreeSet<(usize, Place)>| set.range((size, Place::MIN)..).next().copied();
        let ready = fit(&self.ready);
        let found = match stream {
            Stream::Copy => ready,
            // The compute stream takes its own frees first, leaving ready blocks to the copies.
            Stream::Compute => match (ready, fit(&self.compute_free)) {
                (Some(r), Some(c)) => Some(if c.0 <= r.0 { c } else { r }),
                (r, c) => r.or(c),
            },
        };
        let (free, place) = found?;
        let state = self.blocks.get(&place).map(|i| i.state)?;
        self.unset(place);
        if free > size {
            // The rest stays as free as it was (a compute-stream free keeps its number).
            let rest = Place {
                region: place.region,
                offset: place.offset + size,
            };
            self.set(rest, free - size, state);
        }
        self.set(place, size, State::Used);
        self.stats.allocations += 1;
        self.stats.in_use += size;
        self.stats.peak_in_use = self.stats.peak_in_use.max(self.stats.in_use);
        Some(Block {
            place,
            ptr: self.regions[place.region as usize].0 + place.offset as u64,
            size,
        })
    }

    /// Counts a request the arena could not serve.
    pub fn miss(&mut self) {
        self.stats.misses += 1;
    }

    /// Frees the block at `place`: on the compute stream (`fence` `None`), or once `fence`
    /// completes — a fence that also follows every kernel queued before this call, so that
    /// the block is then ready for any stream. A place not handed out is ignored, and its
    /// fence given back.
    pub fn free(&mut self, place: Place, fence: Option<F>) -> Option<F> {
        let Some(info) = self.blocks.get(&place).copied() else {
            return fence;
        };
        if info.state != State::Used {
            return fence;
        }
        self.stats.in_use -= info.size;
        match fence {
            None => {
                // Merged with free neighbours of the compute stream: the whole block is then
                // ready once a marker covers this free, the newest of its parts.
                self.seq += 1;
                self.unset(place);
                let (start, size) = self.absorb_neighbours(place, info.size, |s| {
                    matches!(s, State::ComputeFree { .. })
                });
                self.set(start, size, State::ComputeFree { seq: self.seq });
            }
            Some(f) => {
                self.set(place, info.size, State::Fenced);
                let generation = self.generation;
                self.fenced.push_back((f, place, generation));
            }
        }
        None
    }

    /// Compute-stream frees since the last marker.
    pub fn unmarked_frees(&self) -> u64 {
        self.seq - self.marked
    }

    /// Whether compute-stream frees wait for a marker (then [`Arena::add_marker`] helps a
    /// copy stream find ready blocks).
    pub fn wants_marker(&self) -> bool {
        self.unmarked_frees() > 0
    }

    /// `fence`, recorded on the compute stream now, covers every compute-stream free so far.
    pub fn add_marker(&mut self, fence: F) {
        self.marked = self.seq;
        self.markers.push_back((fence, self.seq));
    }

    /// Makes ready the blocks whose markers or fences `done` reports completed (asking about
    /// each in order, up to the first that has not), and hands those fences to `recycle`.
    pub fn poll(&mut self, mut done: impl FnMut(&F) -> bool, mut recycle: impl FnMut(F)) {
        while self.markers.front().is_some_and(|(f, _)| done(f)) {
            if let Some((f, seq)) = self.markers.pop_front() {
                self.passed = seq;
                recycle(f);
            }
        }
        while self
            .unmarked
            .front()
            .is_some_and(|&(seq, _, _)| seq <= self.passed)
        {
            if let Some((_, place, generation)) = self.unmarked.pop_front() {
                self.ready_if(place, generation);
            }
        }
        while self.fenced.front().is_some_and(|(f, _, _)| done(f)) {
            if let Some((f, place, generation)) = self.fenced.pop_front() {
                self.ready_if(place, generation);
                recycle(f);
            }
        }
    }

    /// Makes the free block at `place` ready, if it is still the one of `generation`, and
    /// merges it with ready neighbours.
    fn ready_if(&mut self, place: Place, generation: u64) {
        let Some(info) = self.blocks.get(&place).copied() else {
            return;
        };
        if info.generation != generation || matches!(info.state, State::Used | State::Ready) {
            return;
        }
        self.unset(place);
        let (start, size) = self.absorb_neighbours(place, info.size, |s| s == State::Ready);
        self.set(start, size, State::Ready);
    }

    /// Forgets the blocks right after and right before the (already forgotten) span of `size`
    /// bytes at `place` whose state passes `joins`, returning the span grown over them.
    fn absorb_neighbours(
        &mut self,
        place: Place,
        size: usize,
        joins: impl Fn(State) -> bool,
    ) -> (Place, usize) {
        let (mut start, mut size) = (place, size);
        let next = Place {
            region: place.region,
            offset: place.offset + size,
        };
        if let Some(n) = self.blocks.get(&next).copied()
            && joins(n.state)
        {
            self.unset(next);
            size += n.size;
        }
        if let Some((&prev, p)) = self.blocks.range(..place).next_back()
            && prev.region == place.region
            && prev.offset + p.size == place.offset
            && joins(p.state)
        {
            let grown = p.size + size;
            self.unset(prev);
            start = prev;
            size = grown;
        }
        (start, size)
    }

    /// Records the block at `place` with `size` bytes in `state`, under a new generation.
    fn set(&mut self, place: Place, size: usize, state: State) {
        self.generation += 1;
        let generation = self.generation;
        self.blocks.insert(
            place,
            Info {
                size,
                state,
                generation,
            },
        );
        match state {
            State::Ready => {
                self.ready.insert((size, place));
            }
            State::ComputeFree { seq } => {
                self.compute_free.insert((size, place));
                self.unmarked.push_back((seq, place, generation));
            }
            State::Used | State::Fenced => {}
        }
    }

    /// Forgets the block at `place` (and its entry in the free sets).
    fn unset(&mut self, place: Place) {
        if let Some(info) = self.blocks.remove(&place) {
            self.ready.remove(&(info.size, place));
            self.compute_free.remove(&(info.size, place));
        }
    }
}

impl Place {
    const MIN: Place = Place {
        region: 0,
        offset: 0,
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// A fence that completes when its flag is set.
    type Fence = std::rc::Rc<Cell<bool>>;

    fn fence() -> Fence {
        std::rc::Rc::new(Cell::new(false))
    }

    fn poll(a: &mut Arena<Fence>) -> usize {
        let mut recycled = 0;
        a.poll(|f| f.get(), |_| recycled += 1);
        recycled
    }

    fn arena(size: usize) -> Arena<Fence> {
        let mut a = Arena::default();
        a.add_region(1 << 20, size);
        a
    }

    #[test]
    fn best_fit_splits_and_rounds() {
        let mut a = arena(8 * ALIGN);
        let x = a.alloc(1, Stream::Compute).unwrap();
        assert_eq!((x.ptr, x.size), (1 << 20, ALIGN));
        let y = a.alloc(2 * ALIGN + 1, Stream::Copy).unwrap();
        assert_eq!((y.ptr, y.size), ((1 << 20) + ALIGN as u64, 3 * ALIGN));
        assert_eq!(a.stats().in_use, 4 * ALIGN);
        assert!(a.alloc(5 * ALIGN, Stream::Compute).is_none());
        a.miss();
        assert_eq!(a.stats().misses, 1);
        let z = a.alloc(4 * ALIGN, Stream::Compute).unwrap();
        assert_eq!(z.ptr, (1 << 20) + 4 * ALIGN as u64);
        assert_eq!(a.stats().peak_in_use, 8 * ALIGN);
    }

    #[test]
    fn compute_frees_serve_compute_at_once_and_copies_after_a_marker() {
        let mut a = arena(4 * ALIGN);
        let x = a.alloc(4 * ALIGN, Stream::Compute).unwrap();
        a.free(x.place, None);
        // The copy stream may not write where queued kernels may still read.
        assert!(a.alloc(ALIGN, Stream::Copy).is_none());
        // The compute stream may: its own kernels run in order.
        let y = a.alloc(ALIGN, Stream::Compute).unwrap();
        assert_eq!(y.ptr, x.ptr);
        a.free(y.place, None);
        assert!(a.wants_marker());
        let m = fence();
        a.add_marker(m.clone());
        assert!(!a.wants_marker());
        assert_eq!(poll(&mut a), 0);
        assert!(a.alloc(ALIGN, Stream::Copy).is_none());
        m.set(true);
        assert_eq!(poll(&mut a), 1);
        // Both halves became ready and merged back into the whole region.
        let z = a.alloc(4 * ALIGN, Stream::Copy).unwrap();
        assert_eq!((z.ptr, z.size), (x.ptr, 4 * ALIGN));
    }

    #[test]
    fn a_marker_covers_only_the_frees_before_it() {
        let mut a = arena(3 * ALIGN);
        let x = a.alloc(ALIGN, Stream::Compute).unwrap();
        let _between = a.alloc(ALIGN, Stream::Compute).unwrap();
        let y = a.alloc(ALIGN, Stream::Compute).unwrap();
        a.free(x.place, None);
        let m = fence();
        a.add_marker(m.clone());
        a.free(y.place, None);
        m.set(true);
        poll(&mut a);
        let c = a.alloc(ALIGN, Stream::Copy).unwrap();
        assert_eq!(c.ptr, x.ptr);
        assert!(
            a.alloc(ALIGN, Stream::Copy).is_none(),
            "y's free is after the marker"
        );
        assert!(a.wants_marker());
    }

    #[test]
    fn neighbouring_compute_frees_merge_and_wait_for_the_newest() {
        let mut a = arena(3 * ALIGN);
        let b: Vec<Block> = (0..3)
            .map(|_| a.alloc(ALIGN, Stream::Compute).unwrap())
            .collect();
        a.free(b[0].place, None);
        a.free(b[2].place, None);
        let m = fence();
        a.add_marker(m.clone());
        a.free(b[1].place, None);
        // One block of three for the compute stream at once.
        let x = a.alloc(3 * ALIGN, Stream::Compute).unwrap();
        assert_eq!(x.ptr, b[0].ptr);
        a.free(x.place, None);
        // For a copy only once a marker covers the newest of the three frees.
        m.set(true);
        poll(&mut a);
        assert!(a.alloc(ALIGN, Stream::Copy).is_none());
        assert_eq!(a.unmarked_frees(), 2);
        let n = fence();
        a.add_marker(n.clone());
        n.set(true);
        poll(&mut a);
        assert_eq!(a.alloc(3 * ALIGN, Stream::Copy).unwrap().ptr, b[0].ptr);
    }

    #[test]
    fn a_free_merged_into_the_block_before_leaves_no_trace() {
        let mut a = arena(3 * ALIGN);
        let b: Vec<Block> = (0..3)
            .map(|_| a.alloc(ALIGN, Stream::Compute).unwrap())
            .collect();
        for blk in &b {
            a.free(blk.place, None);
        }
        // Each free joined the one before it: one block of three.
        let x = a.alloc(3 * ALIGN, Stream::Compute).unwrap();
        assert_eq!(x.ptr, b[0].ptr);
        assert_eq!(a.stats().in_use, 3 * ALIGN);
    }

    #[test]
    fn fenced_blocks_wait_for_their_fence_in_order() {
        let mut a = arena(3 * ALIGN);
        let b: Vec<Block> = (0..3)
            .map(|_| a.alloc(ALIGN, Stream::Compute).unwrap())
            .collect();
        let fences: Vec<Fence> = (0..3).map(|_| fence()).collect();
        for (blk, f) in b.iter().zip(&fences) {
            a.free(blk.place, Some(f.clone()));
        }
        assert!(a.alloc(ALIGN, Stream::Compute).is_none());
        fences[1].set(true);
        assert_eq!(poll(&mut a), 0, "fences are asked about in order");
        fences[0].set(true);
        assert_eq!(poll(&mut a), 2);
        let x = a.alloc(2 * ALIGN, Stream::Copy).unwrap();
        assert_eq!(x.ptr, b[0].ptr);
        assert!(a.alloc(ALIGN, Stream::Compute).is_none());
        fences[2].set(true);
        assert_eq!(poll(&mut a), 1, "every fence is given back once done");
        assert_eq!(a.alloc(ALIGN, Stream::Compute).unwrap().ptr, b[2].ptr);
    }

    #[test]
    fn a_reused_block_is_not_made_ready_by_a_stale_entry() {
        let mut a = arena(2 * ALIGN);
        let x = a.alloc(ALIGN, Stream::Compute).unwrap();
        a.free(x.place, None);
        let m = fence();
        a.add_marker(m.clone());
        // Reused by the compute stream before the marker completes.
        let y = a.alloc(ALIGN, Stream::Compute).unwrap();
        assert_eq!(y.ptr, x.ptr);
        m.set(true);
        poll(&mut a);
        let c = a.alloc(ALIGN, Stream::Copy).unwrap();
        assert_ne!(
            c.ptr, y.ptr,
            "the block in use must not be handed to a copy"
        );
        assert_eq!(a.stats().in_use, 2 * ALIGN);
    }

    #[test]
    fn regions_do_not_merge_and_double_frees_are_ignored() {
        let mut a: Arena<Fence> = Arena::default();
        a.add_region(0, 2 * ALIGN);
        a.add_region(2 * ALIGN as u64, 2 * ALIGN);
        assert_eq!(a.stats().reserved, 4 * ALIGN);
        assert!(a.alloc(3 * ALIGN, Stream::Compute).is_none());
        let x = a.alloc(2 * ALIGN, Stream::Compute).unwrap();
        a.free(x.place, None);
        a.free(x.place, None);
        assert_eq!(a.stats().in_use, 0);
        let m = fence();
        a.add_marker(m.clone());
        m.set(true);
        poll(&mut a);
        assert!(a.alloc(3 * ALIGN, Stream::Copy).is_none());
        assert!(a.alloc(2 * ALIGN, Stream::Copy).is_some());
        assert!(a.alloc(2 * ALIGN, Stream::Copy).is_some());
    }

    /// Random traffic against a shadow of what each stream may still touch: a copy is never
    /// handed bytes a kernel may still use or a fenced copy may still read, a kernel never
    /// bytes a fenced copy may still read, and live blocks never overlap.
    #[test]
    fn random_traffic_never_hands_out_bytes_still_in_use() {
        let mut a = arena(64 * ALIGN);
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let base = 1u64 << 20;
        let mut live: Vec<Block> = Vec::new();
        // Hazards: `(start, end, the compute-stream free it waits for)`, and `(start, end,
        // fence, compute-stream frees before it)` (a fence follows the kernels before it).
        let mut kernel_hazards: Vec<(u64, u64, u64)> = Vec::new();
        let mut fence_hazards: Vec<(u64, u64, Fence, u64)> = Vec::new();
        let (mut markers, mut frees, mut passed) = (Vec::<(Fence, u64)>::new(), 0u64, 0u64);
        let overlaps = |s: u64, e: u64, b: &Block| s < b.ptr + b.size as u64 && b.ptr < e;
        for _ in 0..20_000 {
            match next(8) {
                0..=2 => {
                    let stream = if next(3) == 0 {
                        Stream::Copy
                    } else {
                        Stream::Compute
                    };
                    let Some(b) = a.alloc((1 + next(6 * ALIGN as u64)) as usize, stream) else {
                        continue;
                    };
                    assert!(b.ptr >= base && b.ptr + b.size as u64 <= base + 64 * ALIGN as u64);
                    assert!(
                        live.iter()
                            .all(|l| !overlaps(l.ptr, l.ptr + l.size as u64, &b))
                    );
                    assert!(
                        fence_hazards
                            .iter()
                            .all(|(s, e, f, _)| f.get() || !overlaps(*s, *e, &b))
                    );
                    if stream == Stream::Copy {
                        assert!(
                            kernel_hazards
                                .iter()
                                .all(|&(s, e, seq)| seq <= passed || !overlaps(s, e, &b)),
                            "a copy got bytes kernels may still use"
                        );
                    }
                    live.push(b);
                }
                3..=5 if !live.is_empty() => {
                    let b = live.swap_remove(next(live.len() as u64) as usize);
                    let end = b.ptr + b.size as u64;
                    if next(4) == 0 {
                        let f = fence();
                        fence_hazards.push((b.ptr, end, f.clone(), frees));
                        a.free(b.place, Some(f));
                    } else {
                        frees += 1;
                        kernel_hazards.push((b.ptr, end, frees));
                        a.free(b.place, None);
                    }
                }
                6 if a.wants_marker() => {
                    let f = fence();
                    markers.push((f.clone(), frees));
                    a.add_marker(f);
                }
                _ => {
                    // The streams make progress, each in order.
                    if let Some((f, seq)) = markers.iter().find(|(f, _)| !f.get()) {
                        f.set(true);
                        passed = passed.max(*seq);
                    }
                    if let Some((_, _, f, seq)) = fence_hazards.iter().find(|(_, _, f, _)| !f.get())
                    {
                        f.set(true);
                        passed = passed.max(*seq);
                    }
                    poll(&mut a);
                }
            }
            let used: usize = live.iter().map(|b| b.size).sum();
            assert_eq!(a.stats().in_use, used);
        }
        assert!(a.stats().allocations > 1000);
    }
}
