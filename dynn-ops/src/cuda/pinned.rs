//! The GPU's host tier: page-locked (pinned) host memory, which the copy engines move at the
//! link's full speed, recycled by size class so a training step's offloads reuse the blocks
//! of the step before instead of pinning fresh memory each time.
//!
//! Copies into and out of a block are asynchronous: a block carries the event of the last copy
//! that uses it, a reader waits for that event (a stream on the device, the host only when it
//! reads the bytes itself), and a recycled block is handed out again only once its last copy
//! has finished.

use super::EventPool;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream, DriverError, PinnedHostSlice};
use dynn_core::{CpuStorage, DType, HostStorage, Result};
use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Smallest block handed out (one page).
const MIN_BLOCK: usize = 4096;

/// The size class of a request: rounded up to a multiple of an eighth of the largest power of
/// two not above it (at least a page), so a block wastes at most 12.5% beyond that page and
/// similar sizes share blocks.
fn size_class(bytes: usize) -> usize {
    let bytes = bytes.max(MIN_BLOCK);
    let floor_pow2 = 1usize << (usize::BITS - 1 - bytes.leading_zeros());
    let step = (floor_pow2 / 8).max(MIN_BLOCK);
    bytes.div_ceil(step) * step
}

/// A free block: its allocation, its start, and the last copy that used it (`None`: none).
struct FreeBlock {
    slice: PinnedHostSlice<u8>,
    ptr: *mut u8,
    last_copy: Option<CudaEvent>,
}

// SAFETY: `ptr` points into `slice`, which `PinnedHostSlice` already declares Send.
unsafe impl Send for FreeBlock {}

/// Free pinned blocks by size class, on one device's context.
pub struct PinnedPool {
    ctx: Arc<CudaContext>,
    events: Arc<EventPool>,
    free: Mutex<HashMap<usize, Vec<FreeBlock>>>,
}

impl std::fmt::Debug for PinnedPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PinnedPool({} B cached)", self.cached_bytes())
    }
}

impl PinnedPool {
    /// An empty pool on `ctx`, recycling copy events through `events`.
    pub fn new(ctx: Arc<CudaContext>, events: Arc<EventPool>) -> Arc<Self> {
        Arc::new(PinnedPool {
            ctx,
            events,
            free: Mutex::new(HashMap::new()),
        })
    }

    /// A block of at least `bytes`, recycled when one of its size class is free and its last
    /// copy has finished (the host never waits here for a copy in flight).
    pub fn take(self: &Arc<Self>, bytes: usize) -> std::result::Result<PinnedBlock, DriverError> {
        let class = size_class(bytes);
        let reused = self.free.lock().ok().and_then(|mut free| {
            let blocks = free.get_mut(&class)?;
            // The oldest first: its copy is the likeliest to have finished.
            let ready = blocks.iter().position(|b| {
                b.last_copy
                    .as_ref()
                    .is_none_or(|e| e.try_is_complete().unwrap_or(false))
            })?;
            Some(blocks.remove(ready))
        });
        let (slice, ptr) = match reused {
            Some(FreeBlock {
                slice,
                ptr,
                last_copy,
            }) => {
                if let Some(done) = last_copy {
                    self.events.recycle(done);
                }
                (slice, ptr)
            }
            None => {
                // SAFETY: the block's bytes are written by a device → host copy (or by the
                // caller) before anything reads them. Flags 0: cached, readable host memory
                // (not write-combined, which the CPU reads slowly).
                let mut slice = unsafe { self.ctx.alloc_pinned_with_flags::<u8>(class, 0) }?;
                let ptr = slice.as_mut_ptr()?;
                (slice, ptr)
            }
        };
        Ok(PinnedBlock {
            pool: self.clone(),
            slice: Some(slice),
            ptr,
            bytes,
            last_copy: Mutex::new(None),
        })
    }

    /// Bytes held in free blocks.
    pub fn cached_bytes(&self) -> usize {
        self.free
            .lock()
            .map(|f| f.iter().map(|(class, v)| class * v.len()).sum())
            .unwrap_or(0)
    }

    /// Frees cached blocks whose last copy has finished, oldest first within each size class,
    /// until at most `keep` bytes stay cached; returns the bytes freed. Blocks still being
    /// copied stay. The pool never frees on its own: freeing pinned memory waits for the
    /// device, so call this between steps (e.g. after an evaluation or a larger batch left
    /// more cached than training needs), not on the hot path.
    pub fn trim_to(&self, keep: usize) -> usize {
        let Ok(mut free) = self.free.lock() else {
            return 0;
        };
        let mut cached: usize = free.iter().map(|(class, v)| class * v.len()).sum();
        let mut freed = Vec::new();
        let mut classes: Vec<usize> = free.keys().copied().collect();
        // The largest classes first: the fewest frees for the bytes.
        classes.sort_unstable_by(|a, b| b.cmp(a));
        for class in classes {
            let Some(blocks) = free.get_mut(&class) else {
                continue;
            };
            let mut i = 0;
            while cached > keep && i < blocks.len() {
                let done = blocks[i]
                    .last_copy
                    .as_ref()
                    .is_none_or(|e| e.try_is_complete().unwrap_or(false));
                if done {
                    freed.push(blocks.remove(i));
                    cached -= class;
                } else {
                    i += 1;
                }
            }
        }
        free.retain(|_, v| !v.is_empty());
        drop(free);
        let bytes = freed.iter().map(|b| b.slice.len()).sum();
        for b in freed {
            if let Some(done) = b.last_copy {
                self.events.recycle(done);
            }
            // Dropping the slice frees its pinned memory.
        }
        bytes
    }

    /// Frees every cached block whose last copy has finished (see [`PinnedPool::trim_to`]);
    /// returns the bytes freed.
    pub fn trim(&self) -> usize {
        self.trim_to(0)
    }

    fn give_back(&self, slice: PinnedHostSlice<u8>, ptr: *mut u8, last_copy: Option<CudaEvent>) {
        if let Ok(mut free) = self.free.lock() {
            free.entry(slice.len()).or_default().push(FreeBlock {
                slice,
                ptr,
                last_copy,
            });
        }
    }
}

/// A pinned block in use; it goes back to its pool when dropped.
pub struct PinnedBlock {
    pool: Arc<PinnedPool>,
    slice: Option<PinnedHostSlice<u8>>,
    ptr: *mut u8,
    bytes: usize,
    /// The last copy queued into or out of the block (`None`: none).
    last_copy: Mutex<Option<CudaEvent>>,
}

// SAFETY: the block owns its pinned allocation exclusively (`ptr` points into `slice`, which
// `PinnedHostSlice` already declares Send + Sync); shared access only reads it.
unsafe impl Send for PinnedBlock {}
unsafe impl Sync for PinnedBlock {}

impl PinnedBlock {
    /// The `bytes` asked for.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` is the start of an allocation of at least `bytes` bytes that this
        // block owns until it is dropped.
        unsafe { std::slice::from_raw_parts(self.ptr, self.bytes) }
    }

    /// The `bytes` asked for, mutable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.bytes) }
    }

    /// The block's last copy, locked: a copy queued while it is held is ordered after that
    /// copy (`LastCopy::order`) and then replaces it (`LastCopy::replace`), so concurrent
    /// copies of one block stay in order.
    pub fn last_copy(&self) -> LastCopy<'_> {
        LastCopy {
            last: self.last_copy.lock().unwrap_or_else(|e| e.into_inner()),
            events: &self.pool.events,
        }
    }

    /// Waits on the host for the block's last copy.
    pub fn synchronize(&self) -> std::result::Result<(), DriverError> {
        match self.last_copy.lock().ok().as_deref() {
            Some(Some(copy)) => copy.synchronize(),
            _ => Ok(()),
        }
    }
}

/// A pinned block's last copy, locked (see [`PinnedBlock::last_copy`]).
pub struct LastCopy<'a> {
    last: MutexGuard<'a, Option<CudaEvent>>,
    events: &'a EventPool,
}

impl LastCopy<'_> {
    /// Makes `stream` wait for the last copy (no host wait).
    pub fn order(&self, stream: &CudaStream) -> std::result::Result<(), DriverError> {
        match &*self.last {
            Some(copy) => stream.wait(copy),
            None => Ok(()),
        }
    }

    /// Makes `copy` (an event after a copy ordered by [`LastCopy::order`]) the last copy; the
    /// one it follows is recycled.
    pub fn replace(&mut self, copy: CudaEvent) {
        if let Some(before) = self.last.replace(copy) {
            self.events.recycle(before);
        }
    }
}

impl Drop for PinnedBlock {
    fn drop(&mut self) {
        if let Some(slice) = self.slice.take() {
            let last = self.last_copy.get_mut().ok().and_then(Option::take);
            self.pool.give_back(slice, self.ptr, last);
        }
    }
}

/// An offloaded GPU buffer's elements in pinned host memory.
pub struct PinnedHost {
    block: PinnedBlock,
    dtype: DType,
    len: usize,
}

impl std::fmt::Debug for PinnedHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PinnedHost({:?} x {})", self.dtype, self.len)
    }
}

impl PinnedHost {
    /// `len` elements of `dtype` held in `block` (its bytes already written).
    pub fn new(block: PinnedBlock, dtype: DType, len: usize) -> Self {
        PinnedHost { block, dtype, len }
    }

    /// The elements' bytes, for a copy queued after [`PinnedHost::block`]'s last copy (read
    /// them on the host through [`HostStorage::to_cpu`], which waits for it).
    pub fn bytes(&self) -> &[u8] {
        self.block.bytes()
    }

    /// The pinned block holding the bytes.
    pub fn block(&self) -> &PinnedBlock {
        &self.block
    }
}

impl HostStorage for PinnedHost {
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn len(&self) -> usize {
        self.len
    }
    fn to_cpu(&self) -> Result<CpuStorage> {
        self.block
            .synchronize()
            .map_err(|e| dynn_core::Error::Device {
                op: "to_cpu",
                msg: format!("waiting for the copy to the host tier: {e}"),
            })?;
        let mut cpu = CpuStorage::zeros(self.dtype, self.len);
        super::storage::host_bytes_mut(&mut cpu).copy_from_slice(self.bytes());
        Ok(cpu)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_cover_the_request_within_an_eighth() {
        for bytes in [
            0,
            1,
            4096,
            4097,
            65_536,
            100_000,
            1 << 20,
            (1 << 20) + 1,
            3 << 28,
        ] {
            let class = size_class(bytes);
            assert!(class >= bytes.max(4096), "{bytes} -> {class}");
            assert!(class as f64 <= (bytes.max(4096) as f64) * 1.125 + 4096.0);
            assert_eq!(class % 4096, 0);
        }
        assert_eq!(size_class(100_000), size_class(99_000));
    }
}
