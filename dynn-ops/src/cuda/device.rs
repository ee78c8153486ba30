//! [`CudaDevice`]: one GPU's context, streams, compiled kernels and cuBLAS handle, and its
//! registration as the dynn-core backend of `Device::Cuda(ordinal)`.

use super::arena::{Arena, ArenaStats, Block, Place, Stream};
use super::compile::{Arch, compile_ptx, family_scalar, library_loadable};
use super::events::EventPool;
use super::pinned::{PinnedHost, PinnedPool};
use super::{CudaSource, CudaStorage};
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::{
    self,
    CUmemPool_attribute::{CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, CU_MEMPOOL_ATTR_USED_MEM_HIGH},
};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaModule, CudaStream, DriverError, result,
};
use dynn_core::{Backend, CpuStorage, DType, Device, DeviceStorage, Error, HostStorage, Result};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// Key of a compiled function: family, scalar type, kernel name.
type FnKey = (&'static str, &'static str, &'static str);

/// One GPU: a context, a compute stream, one copy stream per direction, the kernels compiled
/// so far and a cuBLAS handle on the compute stream.
pub struct CudaDevice {
    ordinal: usize,
    name: String,
    arch: Arch,
    ctx: Arc<CudaContext>,
    compute: Arc<CudaStream>,
    upload: Arc<CudaStream>,
    download: Arc<CudaStream>,
    events: Arc<EventPool>,
    pinned: Arc<PinnedPool>,
    /// Buffers' memory, once [`CudaDevice::reserve`] has given it regions (until then, and
    /// whenever it has no free block that fits, buffers come from the driver's pool).
    arena: Mutex<Arena<CudaEvent>>,
    /// Whether the arena has regions (read without its lock).
    has_arena: AtomicBool,
    modules: Mutex<HashMap<(&'static str, &'static str), Arc<CudaModule>>>,
    functions: Mutex<HashMap<FnKey, CudaFunction>>,
    blas: Mutex<Option<Arc<CudaBlas>>>,
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        // Every storage holds the device, so no block is in use now.
        let _ = self.ctx.bind_to_thread();
        let _ = self.ctx.synchronize();
        if let Ok(arena) = self.arena.get_mut() {
            for &(base, _) in arena.regions() {
                // SAFETY: `base` came from `malloc_sync` in `reserve`, and nothing uses it.
                let _ = unsafe { result::free_sync(base) };
            }
        }
    }
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaDevice(cuda:{} {} {})",
            self.ordinal, self.name, self.arch
        )
    }
}

/// True when the CUDA driver library (libcuda.so) can be loaded.
pub fn driver_available() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| library_loadable("cuda"))
}

fn no_driver(ordinal: usize) -> Error {
    Error::Device {
        op: "cuda",
        msg: format!(
            "no CUDA driver found (libcuda.so could not be loaded) while asking for cuda:{ordinal}"
        ),
    }
}

/// The number of CUDA devices (0 when there is no driver).
pub fn device_count() -> usize {
    if !driver_available() {
        return 0;
    }
    CudaContext::device_count()
        .map(|n| n.max(0) as usize)
        .unwrap_or(0)
}

fn devices() -> &'static Mutex<HashMap<usize, Arc<CudaDevice>>> {
    static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<CudaDevice>>>> = OnceLock::new();
    DEVICES.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Opens GPU `ordinal` (once) and registers it as the backend of `Device::Cuda(ordinal)`.
/// Without a driver or with no such GPU this is a clear [`Error::Device`], never a panic.
pub fn init(ordinal: usize) -> Result<Arc<CudaDevice>> {
    let mut map = devices()
        .lock()
        .map_err(|_| Error::Msg("CUDA device table poisoned".into()))?;
    if let Some(d) = map.get(&ordinal) {
        return Ok(d.clone());
    }
    if !driver_available() {
        return Err(no_driver(ordinal));
    }
    let count = CudaContext::device_count().map_err(|e| Error::Device {
        op: "cuda",
        msg: format!(
            "the CUDA driver failed to count devices ({e}) while asking for cuda:{ordinal}"
        ),
    })?;
    if ordinal >= count.max(0) as usize {
        return Err(Error::Device {
            op: "cuda",
            msg: format!("cuda:{ordinal} asked for, but the driver reports {count} device(s)"),
        });
    }
    let dev = Arc::new(CudaDevice::open(ordinal)?);
    if let ArenaRequest::Bytes(n) = arena_request()? {
        dev.reserve(n)?;
    }
    dynn_core::register_backend(Arc::new(CudaBackend(dev.clone())))?;
    tracing::info!(device = ?dev, "CUDA device ready");
    map.insert(ordinal, dev.clone());
    Ok(dev)
}

/// What the `DYNN_CUDA_ARENA` environment variable asks of the device arena
/// ([`CudaDevice::reserve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArenaRequest {
    /// Unset, empty or `0`: buffers come from the driver's pool.
    Off,
    /// A number of MiB: [`init`] reserves that much.
    Bytes(usize),
    /// `budget`: a memory manager's budget, plus headroom ([`arena_for_budget`]), reserved
    /// by whoever sets the budget (the trainers).
    Budget,
}

/// Reads `DYNN_CUDA_ARENA` (see [`ArenaRequest`]); anything else is an error naming it.
pub fn arena_request() -> Result<ArenaRequest> {
    parse_arena(&std::env::var("DYNN_CUDA_ARENA").unwrap_or_default())
}

fn parse_arena(v: &str) -> Result<ArenaRequest> {
    match v.trim() {
        "" | "0" => Ok(ArenaRequest::Off),
        "budget" => Ok(ArenaRequest::Budget),
        n => n
            .parse::<usize>()
            .ok()
            .and_then(|mib| mib.checked_mul(1 << 20))
            .map(ArenaRequest::Bytes)
            .ok_or_else(|| {
                Error::invalid(
                    "cuda",
                    format!("DYNN_CUDA_ARENA={v:?}: expected a number of MiB, `budget` or 0"),
                )
            }),
    }
}

/// The arena reserved for a memory manager's `budget` bytes: the budget, a quarter more for
/// fragmentation (the manager's pool packs its blocks; the arena does not move them) and
/// 64 MiB for the kernels' scratch.
pub fn arena_for_budget(budget: usize) -> usize {
    budget.saturating_add(budget / 4).saturating_add(64 << 20)
}

/// The opened device `ordinal`, or an error saying to call [`init`].
pub fn device(ordinal: usize) -> Result<Arc<CudaDevice>> {
    devices()
        .lock()
        .map_err(|_| Error::Msg("CUDA device table poisoned".into()))?
        .get(&ordinal)
        .cloned()
        .ok_or_else(|| Error::Device {
            op: "cuda",
            msg: format!("cuda:{ordinal} is not initialised: call dynn::cuda::init({ordinal})"),
        })
}

impl CudaDevice {
    fn open(ordinal: usize) -> Result<Self> {
        let e = |what: &str, err: cudarc::driver::DriverError| Error::Device {
            op: "cuda",
            msg: format!("cuda:{ordinal}: {what}: {err}"),
        };
        let ctx = CudaContext::new(ordinal).map_err(|x| e("creating the context", x))?;
        // SAFETY: dynn orders its streams itself (see `CudaStorage`): kernels run on the
        // compute stream, a copy stream waits for the compute stream before reading a buffer,
        // the compute stream waits for a copy before reading what it wrote, and a buffer is
        // freed on the compute stream, or after its offload's copy on the download stream.
        // cudarc's per-slice events (an event record and wait per argument of every launch)
        // are then redundant host work. Called before any slice exists.
        unsafe { ctx.disable_event_tracking() };
        keep_freed_memory(&ctx).map_err(|x| e("configuring the memory pool", x))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|x| e("compute capability", x))?;
        let name = ctx.name().map_err(|x| e("device name", x))?;
        let compute = ctx.new_stream().map_err(|x| e("compute stream", x))?;
        let upload = ctx.new_stream().map_err(|x| e("upload stream", x))?;
        let download = ctx.new_stream().map_err(|x| e("download stream", x))?;
        let events = EventPool::new(ctx.clone());
        let pinned = PinnedPool::new(ctx.clone(), events.clone());
        Ok(CudaDevice {
            ordinal,
            name,
            arch: Arch {
                major: major as u32,
                minor: minor as u32,
            },
            ctx,
            compute,
            upload,
            download,
            events,
            pinned,
            arena: Mutex::new(Arena::default()),
            has_arena: AtomicBool::new(false),
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            blas: Mutex::new(None),
        })
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The GPU's name as the driver reports it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The GPU's architecture (kernels are compiled for it).
    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// The driver context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every kernel runs on.
    pub fn compute(&self) -> &Arc<CudaStream> {
        &self.compute
    }

    /// The host → device copy stream.
    pub fn upload_stream(&self) -> &Arc<CudaStream> {
        &self.upload
    }

    /// The device → host copy stream.
    pub fn download_stream(&self) -> &Arc<CudaStream> {
        &self.download
    }

    /// The events that order copies against kernels.
    pub fn events(&self) -> &Arc<EventPool> {
        &self.events
    }

    /// The host tier's pinned memory.
    pub fn pinned(&self) -> &Arc<PinnedPool> {
        &self.pinned
    }

    /// Reserves device memory for buffers up to `bytes` in all (rounded up to 2 MiB), as one
    /// large allocation added to those already reserved: buffers are then carved from it on
    /// the host (`cuda/arena.rs`), with no driver call per buffer, and the device memory
    /// dynn's buffers take is known up front. A buffer that finds no free block that fits
    /// still gets memory, from the driver's stream-ordered pool ([`ArenaStats::misses`]
    /// counts them). A memory manager with a budget reserves the budget, plus headroom for
    /// the kernels' scratch and fragmentation.
    pub fn reserve(&self, bytes: usize) -> Result<()> {
        const GRANULE: usize = 2 << 20;
        let mut arena = self.arena()?;
        let have = arena.stats().reserved;
        if bytes <= have {
            return Ok(());
        }
        let size = (bytes - have).div_ceil(GRANULE) * GRANULE;
        self.ctx.bind_to_thread().map_err(self.err("reserve"))?;
        // The driver's pool keeps what earlier buffers freed (a trainer's unlimited probe):
        // hand it back first, so the reservation has the room.
        self.synchronize()?;
        trim_pool(&self.ctx).map_err(self.err("reserve"))?;
        // SAFETY: a plain device allocation; the arena hands out its bytes only to buffers
        // that write them before reading, and it is freed when the device is dropped.
        let base = unsafe { result::malloc_sync(size) }.map_err(|e| Error::Device {
            op: "reserve",
            msg: format!(
                "cuda:{}: could not reserve {size} bytes of device memory: {e}",
                self.ordinal
            ),
        })?;
        arena.add_region(base, size);
        self.has_arena.store(true, Ordering::Release);
        tracing::info!(
            device = self.ordinal,
            bytes = size,
            reserved = have + size,
            "device memory reserved"
        );
        Ok(())
    }

    /// The arena's counters (all zero before [`CudaDevice::reserve`]).
    pub fn arena_stats(&self) -> ArenaStats {
        self.arena().map(|a| a.stats()).unwrap_or_default()
    }

    fn arena(&self) -> Result<MutexGuard<'_, Arena<CudaEvent>>> {
        self.arena
            .lock()
            .map_err(|_| Error::Msg("CUDA arena poisoned".into()))
    }

    /// Makes ready the arena blocks whose markers and fences have completed.
    fn poll(&self, arena: &mut Arena<CudaEvent>) {
        // An event the driver cannot answer for stays pending, and with it every marker or
        // fence after it: after such a (sticky) driver error, the arena serves from what is
        // ready and the driver's pool serves the rest.
        arena.poll(
            |e| e.try_is_complete().unwrap_or(false),
            |e| self.events.recycle(e),
        );
    }

    /// A block of at least `bytes` from the arena for `stream` (`None`: no arena, or no free
    /// block that fits).
    pub(crate) fn take_block(&self, bytes: usize, stream: Stream) -> Option<Block> {
        if !self.has_arena.load(Ordering::Acquire) {
            return None;
        }
        let mut arena = self.arena().ok()?;
        if let Some(b) = arena.alloc(bytes, stream) {
            return Some(b);
        }
        self.poll(&mut arena);
        if let Some(b) = arena.alloc(bytes, stream) {
            return Some(b);
        }
        arena.miss();
        if arena.wants_marker() {
            // Lets later requests reuse, and coalesce, what kernels freed before now.
            self.mark(&mut arena);
        }
        None
    }

    /// Records a marker on the compute stream covering its frees so far.
    fn mark(&self, arena: &mut Arena<CudaEvent>) {
        if let Ok(e) = self.events.record(&self.compute) {
            arena.add_marker(e);
        }
    }

    /// Gives back the arena block at `place`: freed on the compute stream (`fence` `None`), or
    /// once `fence` has completed.
    pub(crate) fn free_block(&self, place: Place, fence: Option<CudaEvent>) {
        let Ok(mut arena) = self.arena() else {
            return;
        };
        if let Some(unused) = arena.free(place, fence) {
            self.events.recycle(unused);
        }
        // Frees wait in a queue for a marker: keep it short when nothing asks for one.
        if arena.unmarked_frees() >= 4096 {
            self.mark(&mut arena);
            self.poll(&mut arena);
        }
    }

    /// Maps a driver or library error to [`Error::Device`] naming `op` and this device.
    pub fn err<E: std::fmt::Display>(&self, op: &'static str) -> impl Fn(E) -> Error + '_ {
        move |e| Error::Device {
            op,
            msg: format!("cuda:{}: {e}", self.ordinal),
        }
    }

    /// Waits for all queued work on every stream.
    pub fn synchronize(&self) -> Result<()> {
        self.ctx.synchronize().map_err(self.err("synchronize"))
    }

    /// The kernel `kernel` of `source`, compiled (NVRTC, disk-cached) for this device and the
    /// scalar type of `dtype` on first use.
    pub fn function(
        &self,
        source: &'static CudaSource,
        dtype: DType,
        kernel: &'static str,
    ) -> Result<CudaFunction> {
        let scalar = family_scalar(source, kernel, dtype)?;
        let key = (source.name, scalar, kernel);
        fn lock<G>(_: G) -> Error {
            Error::Msg("CUDA function cache poisoned".into())
        }
        if let Some(f) = self.functions.lock().map_err(lock)?.get(&key) {
            return Ok(f.clone());
        }
        let module = {
            let mut modules = self.modules.lock().map_err(lock)?;
            match modules.get(&(source.name, scalar)) {
                Some(m) => m.clone(),
                None => {
                    let ptx = compile_ptx(source, scalar, self.arch)?;
                    let m = self
                        .ctx
                        .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                        .map_err(self.err("load_module"))?;
                    modules.insert((source.name, scalar), m.clone());
                    m
                }
            }
        };
        let f = module.load_function(kernel).map_err(|e| Error::Device {
            op: kernel,
            msg: format!(
                "kernel `{kernel}` not found in the `{}` module: {e}",
                source.name
            ),
        })?;
        self.functions.lock().map_err(lock)?.insert(key, f.clone());
        Ok(f)
    }

    /// The cuBLAS handle (bound to the compute stream), created on first use.
    pub fn blas(&self) -> Result<Arc<CudaBlas>> {
        let mut slot = self
            .blas
            .lock()
            .map_err(|_| Error::Msg("cuBLAS handle poisoned".into()))?;
        if let Some(b) = &*slot {
            return Ok(b.clone());
        }
        if !library_loadable("cublas") {
            return Err(Error::Device {
                op: "matmul",
                msg: format!(
                    "cuda:{}: the cuBLAS library (libcublas.so) was not found",
                    self.ordinal
                ),
            });
        }
        let b = Arc::new(CudaBlas::new(self.compute.clone()).map_err(self.err("cublas"))?);
        *slot = Some(b.clone());
        Ok(b)
    }

    /// The most device memory dynn's buffers have held at once since the last
    /// [`CudaDevice::reset_memory_high`]: live buffers plus freed ones whose stream-ordered
    /// free has not run yet (the memory a budget must really cover).
    pub fn memory_high(&self) -> Result<usize> {
        pool_attribute(&self.ctx, CU_MEMPOOL_ATTR_USED_MEM_HIGH, None)
            .map(|high| high as usize)
            .map_err(self.err("memory_high"))
    }

    /// Restarts [`CudaDevice::memory_high`] from the memory in use now.
    pub fn reset_memory_high(&self) -> Result<()> {
        pool_attribute(&self.ctx, CU_MEMPOOL_ATTR_USED_MEM_HIGH, Some(0))
            .map(|_| ())
            .map_err(self.err("reset_memory_high"))
    }
}

/// The device's default memory pool's `attr`: read, or with `write` set to that value first.
fn pool_attribute(
    ctx: &CudaContext,
    attr: sys::CUmemPool_attribute,
    write: Option<u64>,
) -> std::result::Result<u64, DriverError> {
    ctx.bind_to_thread()?;
    let pool = default_pool(ctx)?;
    let mut value: u64 = write.unwrap_or(0);
    // SAFETY: `pool` is this device's pool; the attribute reads or writes a u64 that lives
    // across the call.
    unsafe {
        let value_ptr = (&mut value as *mut u64).cast();
        match write {
            Some(_) => sys::cuMemPoolSetAttribute(pool, attr, value_ptr),
            None => sys::cuMemPoolGetAttribute(pool, attr, value_ptr),
        }
        .result()?;
    }
    Ok(value)
}

/// The device's default memory pool (the one stream-ordered allocations come from).
fn default_pool(ctx: &CudaContext) -> std::result::Result<sys::CUmemoryPool, DriverError> {
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `pool` is written by the driver for this context's device.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()).result()? };
    Ok(pool)
}

/// Returns the default memory pool's unused memory to the driver (nothing may be queued).
fn trim_pool(ctx: &CudaContext) -> std::result::Result<(), DriverError> {
    let pool = default_pool(ctx)?;
    // SAFETY: `pool` is this device's pool; no allocation of it is in flight (the caller
    // synchronised).
    unsafe { sys::cuMemPoolTrimTo(pool, 0).result() }
}

/// Lets the device's default memory pool keep freed memory instead of returning it to the
/// driver at every synchronisation, so a step's allocations are served from the pool
/// (stream-ordered `cuMemAllocAsync`) rather than mapped afresh each time.
fn keep_freed_memory(ctx: &CudaContext) -> std::result::Result<(), DriverError> {
    pool_attribute(ctx, CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, Some(u64::MAX)).map(|_| ())
}

/// The dynn-core backend of one GPU: uploads on the device's copy stream.
#[derive(Debug)]
struct CudaBackend(Arc<CudaDevice>);

impl Backend for CudaBackend {
    fn device(&self) -> Device {
        Device::Cuda(self.0.ordinal)
    }
    fn upload(&self, host: &CpuStorage) -> Result<Box<dyn DeviceStorage>> {
        Ok(Box::new(CudaStorage::upload(&self.0, host)?))
    }
    fn restore(&self, host: &dyn HostStorage) -> Result<Box<dyn DeviceStorage>> {
        if let Some(pinned) = host.as_any().downcast_ref::<PinnedHost>() {
            return Ok(Box::new(CudaStorage::restore_pinned(&self.0, pinned)?));
        }
        self.upload(&*host.cpu()?)
    }
    fn synchronize(&self) -> Result<()> {
        self.0.synchronize()
    }
}

#[cfg(test)]
mod tests {
    use super::{ArenaRequest, arena_for_budget, parse_arena};

    #[test]
    fn the_arena_variable_parses_or_names_itself() {
        assert_eq!(parse_arena("").unwrap(), ArenaRequest::Off);
        assert_eq!(parse_arena("0").unwrap(), ArenaRequest::Off);
        assert_eq!(parse_arena(" budget").unwrap(), ArenaRequest::Budget);
        assert_eq!(parse_arena("3").unwrap(), ArenaRequest::Bytes(3 << 20));
        let e = parse_arena("2GiB").unwrap_err().to_string();
        assert!(e.contains("DYNN_CUDA_ARENA") && e.contains("2GiB"), "{e}");
        assert_eq!(arena_for_budget(4 << 20), (5 << 20) + (64 << 20));
    }
}
