//! Buffers: the movable storage behind tensors.
//!
//! A tensor never holds raw memory, only an `Arc<Buffer>`. The buffer's bytes can be on the
//! device, on the host, or dropped (to be recomputed), and may move at any time between ops,
//! while every tensor, view and tape node that refers to the buffer stays valid.

use crate::{CpuStorage, DType, Device, DeviceStorage, Error, HostStorage, Result};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// A buffer's stable identity, unique within the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BufferId(pub u64);

impl BufferId {
    /// A fresh id.
    pub fn fresh() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        BufferId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl std::fmt::Display for BufferId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// What a buffer is for; memory policies treat the kinds differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum BufferKind {
    /// A trainable parameter.
    Parameter = 0,
    /// A gradient (of a parameter or, during backward, of an activation).
    Gradient = 1,
    /// Optimizer state (momentum, Adam moments).
    OptimizerState = 2,
    /// A forward activation or an input.
    Activation = 3,
    /// A short-lived intermediate.
    Temporary = 4,
}

impl BufferKind {
    /// Every kind, in declaration order.
    pub const ALL: [BufferKind; 5] = [
        BufferKind::Parameter,
        BufferKind::Gradient,
        BufferKind::OptimizerState,
        BufferKind::Activation,
        BufferKind::Temporary,
    ];

    fn from_u8(v: u8) -> Self {
        Self::ALL
            .get(v as usize)
            .copied()
            .unwrap_or(BufferKind::Temporary)
    }

    /// A lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            BufferKind::Parameter => "parameter",
            BufferKind::Gradient => "gradient",
            BufferKind::OptimizerState => "optimizer_state",
            BufferKind::Activation => "activation",
            BufferKind::Temporary => "temporary",
        }
    }
}

/// Where a buffer's bytes are right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Residency {
    /// Not yet written by the op that produces it.
    Unmaterialized,
    /// On the device, usable by kernels.
    Device,
    /// In the host tier; must be fetched before a kernel reads it.
    Host,
    /// Released; must be recomputed before use.
    Dropped,
}

/// The bytes, wherever they are.
#[derive(Debug, Clone)]
pub enum Slot {
    /// Not yet produced.
    Unmaterialized,
    /// Device memory (shared while a kernel reads it).
    Device(Arc<dyn DeviceStorage>),
    /// The host tier (offloaded).
    Host(Arc<dyn HostStorage>),
    /// Released.
    Dropped,
}

impl Slot {
    /// The residency this slot stands for.
    pub fn residency(&self) -> Residency {
        match self {
            Slot::Unmaterialized => Residency::Unmaterialized,
            Slot::Device(_) => Residency::Device,
            Slot::Host(_) => Residency::Host,
            Slot::Dropped => Residency::Dropped,
        }
    }
}

/// Told when a watched buffer is released (its last handle dropped), from whatever thread
/// dropped it. A memory manager watches the buffers it accounts for.
pub trait ReleaseSink: Send + Sync {
    /// Buffer `id` of `bytes` bytes no longer exists.
    fn released(&self, id: BufferId, bytes: usize);
}

/// One allocation's worth of elements with a stable id, kind and residency.
pub struct Buffer {
    id: BufferId,
    dtype: DType,
    len: usize,
    device: Device,
    kind: AtomicU8,
    slot: RwLock<Slot>,
    version: AtomicU64,
    /// The host-tier copy a fetch came from, with the version it holds: while no op has
    /// written the device bytes since, offloading again copies nothing. Locked after `slot`.
    host_copy: Mutex<Option<(u64, Arc<dyn HostStorage>)>>,
    watcher: RwLock<Option<Arc<dyn ReleaseSink>>>,
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer")
            .field("id", &self.id)
            .field("dtype", &self.dtype)
            .field("len", &self.len)
            .field("device", &self.device)
            .field("kind", &self.kind())
            .field("residency", &self.residency())
            .finish()
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let watcher = self
            .watcher
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(w) = watcher {
            w.released(self.id, self.size_in_bytes());
        }
    }
}

impl Buffer {
    /// A buffer of `len` elements on `device`, not yet materialized.
    pub fn new(dtype: DType, len: usize, device: Device, kind: BufferKind) -> Self {
        Buffer {
            id: BufferId::fresh(),
            dtype,
            len,
            device,
            kind: AtomicU8::new(kind as u8),
            slot: RwLock::new(Slot::Unmaterialized),
            version: AtomicU64::new(0),
            host_copy: Mutex::new(None),
            watcher: RwLock::new(None),
        }
    }

    /// A buffer holding `storage`, resident on its device.
    pub fn from_storage(storage: Box<dyn DeviceStorage>, kind: BufferKind) -> Self {
        let b = Buffer::new(storage.dtype(), storage.len(), storage.device(), kind);
        *b.write_slot() = Slot::Device(Arc::from(storage));
        b
    }

    /// Reports this buffer's release to `sink` (replacing any earlier watcher: one memory
    /// manager accounts for a buffer at a time).
    pub fn watch(&self, sink: Arc<dyn ReleaseSink>) {
        *self.watcher.write().unwrap_or_else(|e| e.into_inner()) = Some(sink);
    }

    /// The stable id.
    pub fn id(&self) -> BufferId {
        self.id
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Size in bytes.
    pub fn size_in_bytes(&self) -> usize {
        self.len * self.dtype.size_in_bytes()
    }

    /// The device it is resident on when resident.
    pub fn device(&self) -> Device {
        self.device
    }

    /// What it is for.
    pub fn kind(&self) -> BufferKind {
        BufferKind::from_u8(self.kind.load(Ordering::Relaxed))
    }

    /// Changes what it is for (e.g. a leaf becomes a parameter).
    pub fn set_kind(&self, kind: BufferKind) {
        self.kind.store(kind as u8, Ordering::Relaxed)
    }

    /// How many in-place updates the bytes have had (recomputation is exact only while the
    /// inputs of a recipe keep the versions they had).
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Where the bytes are.
    pub fn residency(&self) -> Residency {
        self.read_slot().residency()
    }

    fn read_slot(&self) -> RwLockReadGuard<'_, Slot> {
        // A poisoned lock means a panic while replacing the slot, which only assigns a value:
        // the slot is still a valid value, so recover it.
        self.slot.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_slot(&self) -> RwLockWriteGuard<'_, Slot> {
        self.slot.write().unwrap_or_else(|e| e.into_inner())
    }

    /// A clone of the slot (cheap: shares the bytes).
    pub fn slot(&self) -> Slot {
        self.read_slot().clone()
    }

    /// Replaces the slot; used by the executor and the memory manager. New bytes: a kept host
    /// copy no longer matches them.
    pub fn set_slot(&self, slot: Slot) -> Slot {
        let mut guard = self.write_slot();
        self.forget_host_copy();
        std::mem::replace(&mut *guard, slot)
    }

    fn host_copy(&self) -> std::sync::MutexGuard<'_, Option<(u64, Arc<dyn HostStorage>)>> {
        // Only ever assigned whole: a poisoned value is still a valid one.
        self.host_copy.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn forget_host_copy(&self) {
        self.host_copy().take();
    }

    /// True while the bytes are on the device and the host tier still holds an identical
    /// copy (fetched and not written since): offloading them moves nothing.
    pub fn host_copy_is_current(&self) -> bool {
        let version = self.version.load(Ordering::Acquire);
        matches!(*self.host_copy(), Some((v, _)) if v == version)
    }

    /// The device storage for a kernel, or [`Error::NotResident`] naming `op`.
    pub fn storage(&self, op: &'static str) -> Result<Arc<dyn DeviceStorage>> {
        match &*self.read_slot() {
            Slot::Device(s) => Ok(s.clone()),
            other => Err(Error::NotResident {
                op,
                buffer: self.id.0,
                residency: other.residency(),
            }),
        }
    }

    /// Copies the bytes to the host wherever they are (device or host tier).
    pub fn to_host(&self, op: &'static str) -> Result<CpuStorage> {
        match self.slot() {
            Slot::Device(s) => s.to_host(),
            Slot::Host(h) => h.to_cpu(),
            other => Err(Error::NotResident {
                op,
                buffer: self.id.0,
                residency: other.residency(),
            }),
        }
    }

    /// Moves the bytes from the device to the host tier. Returns the bytes moved: 0 when
    /// already there, or when the host tier kept the copy they were fetched from and no op has
    /// written them since (the device copy is just released).
    pub fn offload(&self) -> Result<usize> {
        let mut slot = self.write_slot();
        match &*slot {
            Slot::Device(s) => {
                let version = self.version.load(Ordering::Acquire);
                if let Some((v, host)) = self.host_copy().take()
                    && v == version
                {
                    *slot = Slot::Host(host);
                    return Ok(0);
                }
                let host = s.offload()?;
                *slot = Slot::Host(Arc::from(host));
                Ok(self.size_in_bytes())
            }
            Slot::Host(_) => Ok(0),
            other => Err(Error::NotResident {
                op: "offload",
                buffer: self.id.0,
                residency: other.residency(),
            }),
        }
    }

    /// Copies the device bytes to the host tier while keeping them on the device (a
    /// background write-back): a later [`Buffer::offload`] then moves nothing, unless an op
    /// writes the buffer first. Returns the bytes copied (0 when not on the device or when the
    /// host copy is already current). A write that races the copy makes the copy stale, and
    /// it is not kept.
    pub fn write_back(&self) -> Result<usize> {
        let (device, version) = match &*self.read_slot() {
            Slot::Device(s) => (s.clone(), self.version.load(Ordering::Acquire)),
            _ => return Ok(0),
        };
        if self.host_copy_is_current() {
            return Ok(0);
        }
        let host: Arc<dyn HostStorage> = Arc::from(device.write_back()?);
        // Writers take the slot's write lock: none can run between this check and the store.
        let slot = self.read_slot();
        if let Slot::Device(now) = &*slot
            && Arc::ptr_eq(now, &device)
            && self.version.load(Ordering::Acquire) == version
        {
            *self.host_copy() = Some((version, host));
        }
        Ok(self.size_in_bytes())
    }

    /// Moves the bytes from the host tier back to the device, keeping the host copy until an
    /// op writes them. Returns the bytes moved.
    pub fn fetch(&self) -> Result<usize> {
        let mut slot = self.write_slot();
        match &*slot {
            Slot::Host(h) => {
                let dev = self.device.backend()?.restore(&**h)?;
                let version = self.version.load(Ordering::Acquire);
                *self.host_copy() = Some((version, h.clone()));
                *slot = Slot::Device(Arc::from(dev));
                Ok(self.size_in_bytes())
            }
            Slot::Device(_) => Ok(0),
            other => Err(Error::NotResident {
                op: "fetch",
                buffer: self.id.0,
                residency: other.residency(),
            }),
        }
    }

    /// Releases the bytes (for recomputation). Returns the bytes released.
    pub fn drop_data(&self) -> usize {
        let mut slot = self.write_slot();
        let freed = match &*slot {
            Slot::Device(_) | Slot::Host(_) => self.size_in_bytes(),
            _ => 0,
        };
        self.forget_host_copy();
        *slot = Slot::Dropped;
        freed
    }

    /// Runs `f` on the device storage with exclusive access (copy-on-write when a kernel or
    /// another reader still shares it). For in-place updates.
    pub fn update<R>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut dyn DeviceStorage) -> Result<R>,
    ) -> Result<R> {
        let mut slot = self.write_slot();
        let Slot::Device(arc) = &mut *slot else {
            return Err(Error::NotResident {
                op,
                buffer: self.id.0,
                residency: slot.residency(),
            });
        };
        if Arc::get_mut(arc).is_none() {
            *arc = Arc::from(arc.duplicate()?);
        }
        // Just made unique above; `get_mut` cannot fail here.
        let storage =
            Arc::get_mut(arc).ok_or_else(|| Error::Msg("buffer storage still shared".into()))?;
        self.version.fetch_add(1, Ordering::AcqRel);
        self.forget_host_copy();
        f(storage)
    }
}
