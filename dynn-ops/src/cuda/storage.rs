//! [`CudaStorage`]: the bytes of one buffer in GPU memory.

use super::CudaDevice;
use super::pinned::{PinnedBlock, PinnedHost};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, result};
use dynn_core::{CpuStorage, DType, Device, DeviceStorage, HostStorage, Result};
use std::any::Any;
use std::mem::ManuallyDrop;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// One buffer's elements in GPU memory, untyped bytes plus their dtype.
pub struct CudaStorage {
    dev: Arc<CudaDevice>,
    /// Freed on the compute stream, or on the download stream after an offload's copy.
    data: ManuallyDrop<CudaSlice<u8>>,
    dtype: DType,
    len: usize,
    /// Set once an offload has queued its copy of these bytes: they are then freed on the
    /// download stream, after the copy (no stream waits for it). No kernel may be queued on
    /// them after an offload: the buffer's slot no longer holds them.
    offloaded: AtomicBool,
}

impl Drop for CudaStorage {
    fn drop(&mut self) {
        // SAFETY: `data` is not used after this.
        let data = unsafe { ManuallyDrop::take(&mut self.data) };
        // The free below is a driver call: make this device's context current on this thread.
        let _ = self.dev.context().bind_to_thread();
        if *self.offloaded.get_mut() {
            let len = data.len();
            let ptr = data.leak();
            // SAFETY: `ptr` is the allocation of `len` bytes just leaked; dropping the new
            // slice frees it on the download stream, ordered after the offload's copy (and,
            // through the join before that copy, after every kernel that used it).
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

/// `bytes` of uninitialised memory on the compute stream (the stream that frees it, too).
fn unsafe_alloc(dev: &Arc<CudaDevice>, bytes: usize, op: &'static str) -> Result<CudaSlice<u8>> {
    // SAFETY: callers write every byte before anything reads it: an output kernel covers all
    // its elements and an upload copies the whole buffer.
    unsafe { dev.compute().alloc::<u8>(bytes) }.map_err(dev.err(op))
}

impl CudaStorage {
    fn new(dev: &Arc<CudaDevice>, data: CudaSlice<u8>, dtype: DType, len: usize) -> Self {
        CudaStorage {
            dev: dev.clone(),
            data: ManuallyDrop::new(data),
            dtype,
            len,
            offloaded: AtomicBool::new(false),
        }
    }

    /// Uninitialised storage for `len` elements of `dtype` (kernels write every element).
    pub fn alloc(dev: &Arc<CudaDevice>, dtype: DType, len: usize) -> Result<Self> {
        let data = unsafe_alloc(dev, (len * dtype.size_in_bytes()).max(1), "alloc")?;
        Ok(Self::new(dev, data, dtype, len))
    }

    /// Zero-filled storage.
    pub fn zeros(dev: &Arc<CudaDevice>, dtype: DType, len: usize) -> Result<Self> {
        let bytes = (len * dtype.size_in_bytes()).max(1);
        let data = dev
            .compute()
            .alloc_zeros::<u8>(bytes)
            .map_err(dev.err("zeros"))?;
        Ok(Self::new(dev, data, dtype, len))
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
            return Ok(Self::new(dev, unsafe_alloc(dev, 1, op)?, dtype, len));
        }
        let (compute, upload) = (dev.compute(), dev.upload_stream());
        // SAFETY: the copy below writes every byte before anything reads them. Until the
        // compute stream waits for the copy, an error drops the slice on the upload stream,
        // after the copy.
        let mut staged = unsafe { upload.alloc::<u8>(bytes.len()) }.map_err(dev.err(op))?;
        let mut last = pinned.map(PinnedBlock::last_copy);
        if let Some(last) = &last {
            last.order(upload).map_err(dev.err(op))?;
        }
        let (dst, _) = staged.device_ptr_mut(upload);
        // SAFETY: `dst` holds `bytes.len()` bytes, allocated in the upload stream's order just
        // above. The source outlives the copy's use of it: a pageable source is staged by the
        // driver before this call returns, and a pinned block is not handed out again before
        // the event recorded below.
        unsafe { result::memcpy_htod_async(dst, bytes, upload.cu_stream()) }
            .map_err(dev.err(op))?;
        let copied = dev.events().mark_copy(upload).map_err(dev.err(op))?;
        let waited = compute.wait(&copied);
        match &mut last {
            Some(last) => last.replace(copied),
            None => dev.events().recycle(copied),
        }
        waited.map_err(dev.err(op))?;
        let ptr = staged.leak();
        // SAFETY: `ptr` is the allocation of `bytes.len()` bytes just leaked; the compute
        // stream has waited for the copy into it, and now frees it after the kernels that read
        // it.
        let data = unsafe { compute.upgrade_device_ptr::<u8>(ptr, bytes.len()) };
        Ok(Self::new(dev, data, dtype, len))
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
        self.offloaded.store(true, Ordering::Release);
        let copied = self.dev.events().mark_copy(down).map_err(&err)?;
        block.last_copy().replace(copied);
        Ok(Box::new(PinnedHost::new(block, self.dtype, self.len)))
    }
    fn duplicate(&self) -> Result<Box<dyn DeviceStorage>> {
        let data = self
            .dev
            .compute()
            .clone_dtod(&*self.data)
            .map_err(self.dev.err("duplicate"))?;
        Ok(Box::new(Self::new(&self.dev, data, self.dtype, self.len)))
    }
}
