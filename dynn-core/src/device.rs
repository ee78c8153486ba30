//! Devices and the backend trait a device implements.

use crate::{CpuStorage, DType, Error, Result};
use std::any::Any;
use std::sync::{Arc, OnceLock, RwLock};

/// Where a tensor's bytes live when resident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// Host CPU memory, computed by the CPU kernels.
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal (needs a registered CUDA backend).
    Cuda(usize),
}

impl Device {
    /// The backend registered for this device, or a clear error.
    pub fn backend(self) -> Result<Arc<dyn Backend>> {
        match self {
            Device::Cpu => Ok(cpu_backend()),
            Device::Cuda(_) => {
                let reg = registry()
                    .read()
                    .map_err(|_| Error::Msg("backend registry poisoned".into()))?;
                reg.iter().find(|b| b.device() == self).cloned().ok_or_else(|| Error::Device {
                    op: "device",
                    msg: format!("no backend registered for {self:?}: the CUDA backend must be initialised first"),
                })
            }
        }
    }

    /// True for the CPU.
    pub fn is_cpu(self) -> bool {
        self == Device::Cpu
    }
}

/// Bytes of one buffer on a device. Kernels downcast it to their backend's concrete type.
pub trait DeviceStorage: Send + Sync + std::fmt::Debug + 'static {
    /// The element type.
    fn dtype(&self) -> DType;
    /// Number of elements.
    fn len(&self) -> usize;
    /// True when empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The device it lives on.
    fn device(&self) -> Device;
    /// Copies the elements to host memory.
    fn to_host(&self) -> Result<CpuStorage>;
    /// For downcasting in kernels.
    fn as_any(&self) -> &dyn Any;
    /// For in-place kernels.
    fn as_any_mut(&mut self) -> &mut dyn Any;
    /// A deep copy on the same device.
    fn duplicate(&self) -> Result<Box<dyn DeviceStorage>>;
    /// Copies the elements into the host tier for offloading. By default plain host memory;
    /// a GPU backend returns page-locked memory the link can copy at full speed.
    fn offload(&self) -> Result<Box<dyn HostStorage>> {
        Ok(Box::new(self.to_host()?))
    }
    /// Copies the elements into the host tier while they stay in use on the device (a
    /// background write-back): as [`DeviceStorage::offload`], but kernels may still read
    /// them afterwards.
    fn write_back(&self) -> Result<Box<dyn HostStorage>> {
        self.offload()
    }
}

/// An offloaded buffer's elements in the host tier: plain [`CpuStorage`], or a backend's own
/// host memory (pinned, for a GPU) that only its [`Backend::restore`] copies back directly.
pub trait HostStorage: Send + Sync + std::fmt::Debug + 'static {
    /// The element type.
    fn dtype(&self) -> DType;
    /// Number of elements.
    fn len(&self) -> usize;
    /// True when empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A plain host copy of the elements (for reading them on the CPU).
    fn to_cpu(&self) -> Result<CpuStorage>;
    /// The elements as CPU storage without a copy, when they are kept that way.
    fn as_cpu(&self) -> Option<&CpuStorage> {
        None
    }
    /// The elements as CPU storage: borrowed when kept that way, else a copy.
    fn cpu(&self) -> Result<std::borrow::Cow<'_, CpuStorage>> {
        Ok(match self.as_cpu() {
            Some(cpu) => std::borrow::Cow::Borrowed(cpu),
            None => std::borrow::Cow::Owned(self.to_cpu()?),
        })
    }
    /// For downcasting in the backend that made it.
    fn as_any(&self) -> &dyn Any;
}

impl HostStorage for CpuStorage {
    fn dtype(&self) -> DType {
        CpuStorage::dtype(self)
    }
    fn len(&self) -> usize {
        CpuStorage::len(self)
    }
    fn to_cpu(&self) -> Result<CpuStorage> {
        Ok(self.clone())
    }
    fn as_cpu(&self) -> Option<&CpuStorage> {
        Some(self)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl dyn DeviceStorage {
    /// The CPU storage inside, or a device error naming `op`.
    pub fn cpu(&self, op: &'static str) -> Result<&CpuStorage> {
        self.as_any()
            .downcast_ref::<CpuStorage>()
            .ok_or_else(|| Error::Device {
                op,
                msg: format!("expected CPU storage, found storage on {:?}", self.device()),
            })
    }

    /// The CPU storage inside (mutable), or a device error naming `op`.
    pub fn cpu_mut(&mut self, op: &'static str) -> Result<&mut CpuStorage> {
        let dev = self.device();
        self.as_any_mut()
            .downcast_mut::<CpuStorage>()
            .ok_or_else(|| Error::Device {
                op,
                msg: format!("expected CPU storage, found storage on {dev:?}"),
            })
    }
}

impl DeviceStorage for CpuStorage {
    fn dtype(&self) -> DType {
        CpuStorage::dtype(self)
    }
    fn len(&self) -> usize {
        CpuStorage::len(self)
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn to_host(&self) -> Result<CpuStorage> {
        Ok(self.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
    fn duplicate(&self) -> Result<Box<dyn DeviceStorage>> {
        Ok(Box::new(self.clone()))
    }
}

/// What a device must provide to the core: moving bytes in and out. Kernels live with their
/// ops in `dynn-ops`; a new backend plugs in by implementing this and registering itself.
pub trait Backend: Send + Sync {
    /// The device this backend drives.
    fn device(&self) -> Device;
    /// Copies host elements onto the device.
    fn upload(&self, host: &CpuStorage) -> Result<Box<dyn DeviceStorage>>;
    /// Copies an offloaded buffer's host-tier elements back onto the device.
    fn restore(&self, host: &dyn HostStorage) -> Result<Box<dyn DeviceStorage>> {
        self.upload(&*host.cpu()?)
    }
    /// Waits for all queued work on the device (a no-op on the CPU).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

/// The CPU backend: device memory is host memory.
#[derive(Debug, Default)]
pub struct CpuBackend;

impl Backend for CpuBackend {
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn upload(&self, host: &CpuStorage) -> Result<Box<dyn DeviceStorage>> {
        Ok(Box::new(host.clone()))
    }
}

fn cpu_backend() -> Arc<dyn Backend> {
    static CPU: OnceLock<Arc<dyn Backend>> = OnceLock::new();
    CPU.get_or_init(|| Arc::new(CpuBackend)).clone()
}

fn registry() -> &'static RwLock<Vec<Arc<dyn Backend>>> {
    static REG: OnceLock<RwLock<Vec<Arc<dyn Backend>>>> = OnceLock::new();
    REG.get_or_init(|| RwLock::new(Vec::new()))
}

/// Registers a backend for a non-CPU device (replacing any earlier one for that device).
pub fn register_backend(backend: Arc<dyn Backend>) -> Result<()> {
    let mut reg = registry()
        .write()
        .map_err(|_| Error::Msg("backend registry poisoned".into()))?;
    reg.retain(|b| b.device() != backend.device());
    reg.push(backend);
    Ok(())
}

impl std::str::FromStr for Device {
    type Err = Error;
    /// `cpu`, `cuda` (ordinal 0) or `cuda:N`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::InvalidArgument {
            op: "device",
            msg: format!("unknown device {s:?}: expected `cpu`, `cuda` or `cuda:N`"),
        };
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(bad),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}
