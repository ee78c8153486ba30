//! A cache of freed host allocations, reused by the next allocation of the same size.
//!
//! A training step frees and allocates the same large buffers every step. The system
//! allocator hands freed blocks of a few MiB back to the operating system, and the next
//! allocation then pays a page fault and a zeroed page for every 4 KiB it writes: on a
//! 2-core host, a 16 MiB gradient reallocated each step cost more time in the kernel than
//! the op that filled it. Like PyTorch's CUDA caching allocator, dynn keeps such blocks and
//! hands them out again, for host memory. Only blocks of at least [`MIN_CACHED_BYTES`] are
//! kept (smaller ones stay in the allocator's own arenas), up to a limit on the cache's
//! total ([`set_limit`]; default [`DEFAULT_LIMIT_BYTES`], or `DYNN_HOST_CACHE_MB` from the
//! environment), evicting the longest-cached first. Reused memory is handed out as
//! uninitialised, exactly as a fresh allocation is, so caching never changes a result.

use std::alloc::Layout;
use std::collections::VecDeque;
use std::mem::ManuallyDrop;
use std::ptr::NonNull;
use std::sync::{Mutex, MutexGuard, OnceLock};

/// Blocks smaller than this are freed at once.
pub const MIN_CACHED_BYTES: usize = 1 << 20;

/// The cache's limit unless [`set_limit`] or `DYNN_HOST_CACHE_MB` says otherwise.
pub const DEFAULT_LIMIT_BYTES: usize = 1 << 30;

/// What the cache holds and has done since the process started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostCacheStats {
    /// Blocks held now.
    pub blocks: usize,
    /// Bytes held now.
    pub bytes: usize,
    /// The limit on `bytes`.
    pub limit: usize,
    /// Allocations served from the cache.
    pub hits: u64,
    /// Allocations of a cacheable size that found no block.
    pub misses: u64,
}

/// A freed allocation: `layout` is the one it was allocated with.
struct Block {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: a `Block` owns its allocation exclusively (no other pointer to it survives its
// `Vec`'s hand-over), so it may be moved to and freed on any thread.
unsafe impl Send for Block {}

impl Drop for Block {
    fn drop(&mut self) {
        // SAFETY: `ptr` was allocated by the global allocator with `layout` (a `Vec`'s buffer)
        // and is owned by this block alone.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

struct Cache {
    /// Oldest first.
    blocks: VecDeque<Block>,
    stats: HostCacheStats,
}

fn cache() -> MutexGuard<'static, Cache> {
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    CACHE
        .get_or_init(|| {
            let limit = std::env::var("DYNN_HOST_CACHE_MB")
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .map_or(DEFAULT_LIMIT_BYTES, |mb| mb.saturating_mul(1 << 20));
            Mutex::new(Cache {
                blocks: VecDeque::new(),
                stats: HostCacheStats {
                    limit,
                    ..Default::default()
                },
            })
        })
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

impl Cache {
    /// Drops the oldest blocks until `bytes` more fit under the limit; blocks are returned,
    /// to be freed after the lock is released.
    fn make_room(&mut self, bytes: usize) -> Vec<Block> {
        let mut freed = Vec::new();
        while self.stats.bytes + bytes > self.stats.limit {
            let Some(b) = self.blocks.pop_front() else {
                break;
            };
            self.stats.bytes -= b.layout.size();
            self.stats.blocks -= 1;
            freed.push(b);
        }
        freed
    }
}

/// An empty vector with capacity for exactly `len` elements, from the cache when it holds a
/// block of that size and alignment (the most recently freed one); `None` when it holds none
/// (allocate as usual).
pub(crate) fn take<T: Copy>(len: usize) -> Option<Vec<T>> {
    let layout = Layout::array::<T>(len).ok()?;
    if layout.size() < MIN_CACHED_BYTES {
        return None;
    }
    let mut c = cache();
    // The most recently freed block: its lines are the likeliest to be cached still.
    let Some(at) = c.blocks.iter().rposition(|b| b.layout == layout) else {
        c.stats.misses += 1;
        return None;
    };
    let block = ManuallyDrop::new(c.blocks.remove(at)?);
    c.stats.bytes -= layout.size();
    c.stats.blocks -= 1;
    c.stats.hits += 1;
    // SAFETY: the block was a `Vec`'s buffer allocated by the global allocator with exactly
    // `Layout::array::<T>(len)` (same size and alignment; the element type it held may differ,
    // which `T: Copy` makes harmless: no element is read before it is written, and none is
    // dropped); it is owned by this block alone, whose drop is suppressed.
    Some(unsafe { Vec::from_raw_parts(block.ptr.as_ptr().cast::<T>(), 0, len) })
}

/// Keeps `v`'s allocation for a later [`take`] when it is large enough and fits the limit
/// (evicting older blocks); frees it otherwise.
pub(crate) fn give<T: Copy>(v: Vec<T>) {
    let Ok(layout) = Layout::array::<T>(v.capacity()) else {
        return;
    };
    if layout.size() < MIN_CACHED_BYTES {
        return;
    }
    let mut v = ManuallyDrop::new(v);
    // A `Vec`'s pointer is never null; with a non-zero size it is its allocation.
    let Some(ptr) = NonNull::new(v.as_mut_ptr().cast::<u8>()) else {
        return;
    };
    let block = Block { ptr, layout };
    let freed = {
        let mut c = cache();
        if layout.size() > c.stats.limit {
            drop(c);
            drop(block);
            return;
        }
        let freed = c.make_room(layout.size());
        c.stats.bytes += layout.size();
        c.stats.blocks += 1;
        c.blocks.push_back(block);
        freed
    };
    drop(freed);
}

/// Sets the limit on the bytes the cache holds, freeing the oldest blocks above it; 0 turns
/// caching off.
pub fn set_limit(bytes: usize) {
    let freed = {
        let mut c = cache();
        c.stats.limit = bytes;
        c.make_room(0)
    };
    drop(freed);
}

/// Frees every cached block (PyTorch's `empty_cache`).
pub fn empty() {
    let freed = {
        let mut c = cache();
        c.stats.bytes = 0;
        c.stats.blocks = 0;
        std::mem::take(&mut c.blocks)
    };
    drop(freed);
}

/// What the cache holds now and its hits and misses so far.
pub fn stats() -> HostCacheStats {
    cache().stats
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cache is process-wide: the tests that read its contents run one at a time.
    static SERIAL: Mutex<()> = Mutex::new(());

    #[test]
    fn a_freed_block_serves_the_next_allocation_of_its_size_and_alignment() {
        let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        empty();
        let len = MIN_CACHED_BYTES / 4 + 3;
        let v: Vec<f32> = vec![1.5; len];
        let addr = v.as_ptr() as usize;
        give(v);
        // Another size, or another alignment, does not take it.
        assert!(take::<f32>(len + 1).is_none());
        assert!(take::<u8>(len * 4).is_none());
        // The same size and alignment, as another 4-byte type, does.
        let w = take::<u32>(len).expect("a cached block");
        assert_eq!((w.as_ptr() as usize, w.len(), w.capacity()), (addr, 0, len));
        assert!(take::<u32>(len).is_none(), "a block is handed out once");
        // Of two blocks of one size, the last freed is handed out first.
        let (older, newer): (Vec<f32>, Vec<f32>) =
            (Vec::with_capacity(len), Vec::with_capacity(len));
        let newer_addr = newer.as_ptr() as usize;
        give(older);
        give(newer);
        assert_eq!(
            take::<f32>(len).map(|v| v.as_ptr() as usize),
            Some(newer_addr)
        );
        assert!(take::<f32>(len).is_some());
        drop(w);
    }

    #[test]
    fn the_limit_evicts_the_oldest_blocks_and_zero_turns_caching_off() {
        let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        empty();
        let before = stats().limit;
        let mb = MIN_CACHED_BYTES;
        set_limit(3 * mb + 3 * 64);
        let sizes = [mb + 64, mb + 128, 2 * mb - 64];
        let blocks: Vec<Vec<u8>> = sizes.iter().map(|&n| Vec::with_capacity(n)).collect();
        let addrs: Vec<usize> = blocks.iter().map(|v| v.as_ptr() as usize).collect();
        for v in blocks {
            give(v);
        }
        // The three do not fit 3 MiB: the oldest went.
        assert!(stats().bytes <= 3 * mb + 3 * 64);
        assert!(take::<u8>(sizes[0]).is_none());
        assert_eq!(
            take::<u8>(sizes[1]).map(|v| v.as_ptr() as usize),
            Some(addrs[1])
        );
        assert_eq!(
            take::<u8>(sizes[2]).map(|v| v.as_ptr() as usize),
            Some(addrs[2])
        );
        give(Vec::<u8>::with_capacity(mb));
        set_limit(0);
        assert_eq!(stats().bytes, 0);
        give(Vec::<u8>::with_capacity(mb));
        assert!(take::<u8>(mb).is_none());
        set_limit(before);
    }
}
