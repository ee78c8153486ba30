//! [`CudaStorage`]: the bytes of one buffer in GPU memory.

use super::CudaDevice;
use super::arena::{Place, Stream};
use super::pinned::{PinnedBlock, PinnedHost};
use cudarc::driver::{CudaEvent, CudaSlice, DevicePtr, DevicePtrMut, DriverError, result};
use dynn_core::{CpuStorage, DType, Device, DeviceStorage, HostStorage, Result};
use std::any::Any;
use std::mem::ManuallyDrop;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// One buffer's elements in GPU memory, untyped bytes plus their dtype.
pub struct CudaStorage {
    dev: Arc<CudaDevice>,
    /// Freed on the compute stream, or on the download stream after an offload's copy (or
    /// given back to the arena, likewise ordered).
    data: ManuallyDrop<CudaSlice<u8>>,
    dtype: DType,
    len: usize,
    /// Set once an offload has queued its copy of these bytes: they are then freed on the
    /// download stream, after the copy (no stream waits for it).
    offloaded: AtomicBool,
    /// Set by a write-back: the bytes stay in use after their copy, so their free is also
    /// ordered after the kernels queued since.
    kept: AtomicBool,
    /// The arena block holding the bytes (`None`: the driver's pool holds them).
    place: Option<Place>,
}

impl Drop for CudaStorage {
    fn drop(&mut self) {
        // SAFETY: `data` is not used after this.
        let data = unsafe { ManuallyDrop::take(&mut self.data) };
        // The free below is a driver call: make this device's context current on this thread.
        let _ = self.dev.context().bind_to_thread();
        let offloaded = *self.offloaded.get_mut();
        if *self.kept.get_mut() {
            // Kernels may have used the bytes after their write-back's copy: order the free
            // after them too (if that fails, wait for them).
            let (down, compute) = (self.dev.download_stream(), self.dev.compute());
            if self.dev.events().join(down, compute).is_err() {
                let _ = compute.synchronize();
            }
        }
        if let Some(place) = self.place {
            // The arena's memory is never freed on its own: the block goes back to the arena.
            data.leak();
            let fence = offloaded.then(|| self.offload_fence()).flatten();
            self.dev.free_block(place, fence);
        } else if offloaded {
            let len = data.len();
            let ptr = data.leak();
            // SAFETY: `ptr` is the allocation of `len` bytes just leaked; dropping the new
            // slice frees it on the download stream, ordered after the offload's copy and so,
            // through the join before that copy (and the one above after a write-back), after
            // every kernel that used it.
            drop(unsafe {
                self.dev
                    .download_stream()
                    .upgrade_device_ptr::<u8>(ptr, len)
            });
        } else {
            // Freed on the compute stream, after the kernels that used it.
            drop(data);
        }
    }
}

impl std::fmt::Debug for CudaStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaStorage({:?} x {} on cuda:{})",
            self.dtype,
            self.len,
            self.dev.ordinal()
        )
    }
}

/// The bytes of a host storage (every dtype is plain old data).
pub(crate) fn host_bytes(host: &CpuStorage) -> &[u8] {
    fn bytes<T>(v: &[T]) -> &[u8] {
        // SAFETY: every CpuStorage element type (f32, f64, f16, bf16, i64, u32, u8) is plain old
        // data without padding, so its memory is valid as bytes for the same lifetime.
        unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
    }
    dynn_core::with_cpu_storage!(host, v => bytes(v))
}

/// The bytes of a host storage, mutable (for downloads).
pub(crate) fn host_bytes_mut(host: &mut CpuStorage) -> &mut [u8] {
    fn bytes<T>(v: &mut [T]) -> &mut [u8] {
        // SAFETY: as in `host_bytes`; every bit pattern is a valid element of these types.
        unsafe {
            std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v))
        }
    }
    dynn_core::with_cpu_storage!(host, v => bytes(v))
}

/// `bytes` of uninitialised memory for the compute stream (the stream that frees it, too): an
/// arena block when one fits, else from the driver's pool.
fn unsafe_alloc(
    dev: &Arc<CudaDevice>,
    bytes: usize,
    op: &'static str,
) -> Result<(CudaSlice<u8>, Option<Place>)> {
    if let Some(b) = dev.take_block(bytes, Stream::Compute) {
        // SAFETY: the block holds at least `bytes` bytes of the arena's memory, this storage's
        // alone until it goes back; the kernels that used it before were queued on the compute
        // stream earlier, so they finish first. Callers write every byte before reading.
        let data = unsafe { dev.compute().upgrade_device_ptr::<u8>(b.ptr, bytes) };
        return Ok((data, Some(b.place)));
    }
    // SAFETY: callers write every byte before anything reads it: an output kernel covers all
    // its elements and an upload copies the whole buffer.
    let data = unsafe { dev.compute().alloc::<u8>(bytes) }.map_err(dev.err(op))?;
    Ok((data, None))
}

impl CudaStorage {
    fn new(
        dev: &Arc<CudaDevice>,
        data: CudaSlice<u8>,
        place: Option<Place>,
        dtype: DType,
        len: usize,
    ) -> Self {
        CudaStorage {
            dev: dev.clone(),
            data: ManuallyDrop::new(data),
            dtype,
            len,
            offloaded: AtomicBool::new(false),
            kept: AtomicBool::new(false),
            place,
        }
    }

    /// Uninitialised storage for `len` elements of `dtype` (kernels write every element).
    pub fn alloc(dev: &Arc<CudaDevice>, dtype: DType, len: usize) -> Result<Self> {
        let (data, place) = unsafe_alloc(dev, (len * dtype.size_in_bytes()).max(1), "alloc")?;
        Ok(Self::new(dev, data, place, dtype, len))
    }

    /// Zero-filled storage.
    pub fn zeros(dev: &Arc<CudaDevice>, dtype: DType, len: usize) -> Result<Self> {
        let bytes = (len * dtype.size_in_bytes()).max(1);
        let (data, place) = unsafe_alloc(dev, bytes, "zeros")?;
        // Built first, so that an error below gives the memory back.
        let mut s = Self::new(dev, data, place, dtype, len);
        dev.compute()
            .memset_zeros(&mut *s.data)
            .map_err(dev.err("zeros"))?;
        Ok(s)
    }

    /// An event on the download stream after an offload's copy of these bytes (and so after
    /// the kernels that used them, as the download stream joined the compute stream before
    /// the copy, and again in `drop` after a write-back), for their arena block to wait on
    /// (`None` if none could be recorded: `mark_copy` has then waited for the stream).
    fn offload_fence(&self) -> Option<CudaEvent> {
        self.dev.events().mark_copy(self.dev.download_stream()).ok()
    }

    /// Copies host elements to the GPU on the device's upload stream, into memory allocated in
    /// that stream's order; the compute stream waits for the copy through an event, so kernels
    /// queued next read the uploaded bytes without the host waiting. (A pageable source may be
    /// dropped on return: the driver has staged it by then.)
    pub fn upload(dev: &Arc<CudaDevice>, host: &CpuStorage) -> Result<Self> {
        Self::copy_in(
            dev,
            host_bytes(host),
            host.dtype(),
            host.len(),
            None,
            "upload",
        )
    }

    /// Copies an offloaded buffer back from pinned host memory on the upload stream, after
    /// the copy that wrote the block, without the host waiting: the compute stream waits for
    /// the copy, and the block is handed out again only once the copy has read it.
    pub fn restore_pinned(dev: &Arc<CudaDevice>, host: &PinnedHost) -> Result<Self> {
        Self::copy_in(
            dev,
            host.bytes(),
            host.dtype(),
            host.len(),
            Some(host.block()),
            "fetch",
        )
    }

    /// `bytes` (`len` elements of `dtype`) copied into a new buffer on the upload stream,
    /// after the last copy of `pinned` (the block that holds `bytes`, if any) and before the
    /// compute stream's next kernel. The memory is allocated in the upload stream's order, so
    /// the copy need not wait for the kernels queued on the compute stream; it belongs to the
    /// compute stream (which frees it) once the compute stream waits for the copy.
    fn copy_in(
        dev: &Arc<CudaDevice>,
        bytes: &[u8],
        dtype: DType,
        len: usize,
        pinned: Option<&PinnedBlock>,
        op: &'static str,
    ) -> Result<Self> {
        if bytes.is_empty() {
            let (data, place) = unsafe_alloc(dev, 1, op)?;
            return Ok(Self::new(dev, data, place, dtype, len));
        }
        let (compute, upload) = (dev.compute(), dev.upload_stream());
        // An arena block no stream can still touch, else memory allocated in the upload
        // stream's order (so the copy need not wait for the kernels queued before it).
        let block = dev.take_block(bytes.len(), Stream::Copy);
        // SAFETY: the copy below writes every byte before anything reads them. Until the
        // compute stream waits for the copy, an error drops pool memory on the upload stream,
        // after the copy; an arena block goes back once the upload stream is idle.
        let mut staged = match block {
            Some(b) => unsafe { upload.upgrade_device_ptr::<u8>(b.ptr, bytes.len()) },
            None => unsafe { upload.alloc::<u8>(bytes.len()) }.map_err(dev.err(op))?,
        };
        if let Err(e) = Self::queue_copy(dev, &mut staged, bytes, pinned) {
            if let Some(b) = block {
                staged.leak();
                let _ = upload.synchronize();
                dev.free_block(b.place, None);
            }
            return Err(dev.err(op)(e));
        }
        let ptr = staged.leak();
        // SAFETY: `ptr` holds `bytes.len()` bytes, leaked just above; the compute stream has
        // waited for the copy into it, and now frees it (or gives its block back) after the
        // kernels that read it.
        let data = unsafe { compute.upgrade_device_ptr::<u8>(ptr, bytes.len()) };
        Ok(Self::new(dev, data, block.map(|b| b.place), dtype, len))
    }

    /// Queues the copy of `bytes` into `staged` on the upload stream, after the last copy of
    /// `pinned` (the block holding `bytes`, if any), and makes the compute stream wait for it.
    fn queue_copy(
        dev: &Arc<CudaDevice>,
        staged: &mut CudaSlice<u8>,
        bytes: &[u8],
        pinned: Option<&PinnedBlock>,
    ) -> std::result::Result<(), DriverError> {
        let (compute, upload) = (dev.compute(), dev.upload_stream());
        let mut last = pinned.map(PinnedBlock::last_copy);
        if let Some(last) = &last {
            last.order(upload)?;
        }
        let (dst, _) = staged.device_ptr_mut(upload);
        // SAFETY: `dst` holds `bytes.len()` bytes, allocated for the upload stream. The source
        // outlives the copy's use of it: a pageable source is staged by the driver before
        // this call returns, and a pinned block is not handed out again before the event
        // recorded below.
        unsafe { result::memcpy_htod_async(dst, bytes, upload.cu_stream()) }?;
        let copied = dev.events().mark_copy(upload)?;
        let waited = compute.wait(&copied);
        match &mut last {
            Some(last) => last.replace(copied),
            None => dev.events().recycle(copied),
        }
        waited
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when it holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device this storage lives on.
    pub fn dev(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    /// The raw bytes (kernels take them as typed pointers).
    pub fn slice(&self) -> &CudaSlice<u8> {
        &self.data
    }

    /// The raw bytes, mutable (for kernels that write them).
    pub fn slice_mut(&mut self) -> &mut CudaSlice<u8> {
        &mut self.data
    }
}

impl DeviceStorage for CudaStorage {
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn len(&self) -> usize {
        self.len
    }
    fn device(&self) -> Device {
        Device::Cuda(self.dev.ordinal())
    }
    fn to_host(&self) -> Result<CpuStorage> {
        let mut host = CpuStorage::zeros(self.dtype, self.len);
        let dst = host_bytes_mut(&mut host);
        if !dst.is_empty() {
            let n = dst.len();
            let stream = self.dev.download_stream();
            // The copy waits for every kernel queued so far (the writers of these bytes).
            self.dev
                .events()
                .join(stream, self.dev.compute())
                .map_err(self.dev.err("to_host"))?;
            stream
                .memcpy_dtoh(&self.data.slice(..n), dst)
                .map_err(self.dev.err("to_host"))?;
            stream.synchronize().map_err(self.dev.err("to_host"))?;
        }
        Ok(host)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
    /// Copies the elements into a recycled pinned block on the download stream, after every
    /// kernel queued so far (their writers), without the host waiting: readers of the block
    /// wait for the copy's event, and the device memory is freed on the download stream after
    /// the copy, so no stream waits for it. Falls back to pageable memory when no pinned
    /// memory can be had.
    fn offload(&self) -> Result<Box<dyn HostStorage>> {
        let bytes = self.len * self.dtype.size_in_bytes();
        if bytes == 0 {
            return Ok(Box::new(CpuStorage::zeros(self.dtype, 0)));
        }
        let mut block = match self.dev.pinned().take(bytes) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, bytes, "no pinned host memory; offloading to pageable memory");
                return Ok(Box::new(self.to_host()?));
            }
        };
        let err = self.dev.err("offload");
        let (down, compute) = (self.dev.download_stream(), self.dev.compute());
        self.dev.events().join(down, compute).map_err(&err)?;
        let (src, _) = self.data.device_ptr(down);
        // SAFETY: the block holds `bytes` bytes and is not handed out again before the event
        // recorded below; the device slice holds at least as many, and is freed on the
        // download stream, after the copy (`offloaded`, set as soon as the copy is queued).
        unsafe { result::memcpy_dtoh_async(block.bytes_mut(), src, down.cu_stream()) }
            .map_err(&err)?;
        // Without an event, `mark_copy` waits for the copy: the bytes then stay this storage's
        // as before the offload (which failed), freed on the compute stream.
        let copied = self.dev.events().mark_copy(down).map_err(&err)?;
        self.offloaded.store(true, Ordering::Release);
        block.last_copy().replace(copied);
        Ok(Box::new(PinnedHost::new(block, self.dtype, self.len)))
    }
    fn write_back(&self) -> Result<Box<dyn HostStorage>> {
        self.kept.store(true, Ordering::Release);
        self.offload()
    }
    fn duplicate(&self) -> Result<Box<dyn DeviceStorage>> {
        let mut out = Self::alloc(&self.dev, self.dtype, self.len)?;
        self.dev
            .compute()
            .memcpy_dtod(&*self.data, &mut *out.data)
            .map_err(self.dev.err("duplicate"))?;
        Ok(Box::new(out))
    }
}
