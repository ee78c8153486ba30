//! What kernels share on the host side: the strided-view descriptor, launch shapes and access
//! to a kernel argument's GPU storage.

use super::{CudaDevice, CudaStorage};
use cudarc::driver::{DeviceRepr, LaunchConfig};
use dynn_core::{Error, KernelArg, Layout, Result, Shape};
use std::sync::Arc;

/// The largest rank a kernel's strided view supports (`DYNN_MAX_RANK` in the prelude).
pub const MAX_RANK: usize = 8;

/// A view over a buffer as kernels read it (`struct Strided` in the prelude): element offset,
/// dims and strides, or the contiguous fast path.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Strided {
    rank: i32,
    contiguous: i32,
    offset: i64,
    dims: [i64; MAX_RANK],
    strides: [i64; MAX_RANK],
}

// SAFETY: `Strided` is `repr(C)` plain data with the same layout as the prelude's struct
// (two ints, then 64-bit fields, so no padding differs between host and device).
unsafe impl DeviceRepr for Strided {}

impl Strided {
    /// The descriptor of `layout`; `op` names the caller in errors.
    pub fn of(op: &'static str, layout: &Layout) -> Result<Self> {
        let dims = layout.dims();
        if dims.len() > MAX_RANK {
            return Err(Error::invalid(
                op,
                format!(
                    "CUDA kernels take rank <= {MAX_RANK}, got shape {}",
                    layout.shape()
                ),
            ));
        }
        let mut s = Strided {
            rank: dims.len() as i32,
            contiguous: layout.is_contiguous() as i32,
            offset: layout.offset() as i64,
            dims: [1; MAX_RANK],
            strides: [0; MAX_RANK],
        };
        for (i, (&d, &st)) in dims.iter().zip(layout.strides()).enumerate() {
            s.dims[i] = d as i64;
            s.strides[i] = st as i64;
        }
        Ok(s)
    }

    /// The descriptor of `layout` broadcast to `shape`.
    pub fn broadcast(op: &'static str, layout: &Layout, shape: &Shape) -> Result<Self> {
        if layout.shape() == shape {
            Self::of(op, layout)
        } else {
            Self::of(op, &layout.broadcast_as(shape)?)
        }
    }
}

/// Threads per block for element-wise kernels.
pub const BLOCK: u32 = 256;

/// A 1-d launch for `n` elements with grid-stride loops (blocks capped; each thread loops).
pub fn grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 16_384) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block of `threads` per row, `rows` blocks.
pub fn rows(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Threads per row for a row-wise kernel over `cols` columns: a power of two in 32..=1024.
pub fn row_threads(cols: usize) -> u32 {
    (cols.div_ceil(4)).next_power_of_two().clamp(32, 1024) as u32
}

/// The GPU storage of a kernel input, if it lives on a GPU.
pub fn cuda_storage<'a>(arg: &KernelArg<'a>) -> Option<&'a CudaStorage> {
    arg.storage.as_any().downcast_ref::<CudaStorage>()
}

/// True when the op's first input lives on a GPU (the executor puts all inputs on one device).
pub fn on_cuda(inputs: &[KernelArg<'_>]) -> bool {
    inputs.first().and_then(cuda_storage).is_some()
}

/// The GPU storage of input `arg`, or a device error naming `op`.
pub fn storage<'a>(op: &'static str, arg: &KernelArg<'a>) -> Result<&'a CudaStorage> {
    cuda_storage(arg).ok_or_else(|| Error::Device {
        op,
        msg: format!(
            "expected GPU storage, found storage on {:?}",
            arg.storage.device()
        ),
    })
}

/// The device of the op's first input (which must be on a GPU).
pub fn device_of(op: &'static str, inputs: &[KernelArg<'_>]) -> Result<Arc<CudaDevice>> {
    let first = inputs
        .first()
        .ok_or_else(|| Error::invalid(op, "a CUDA kernel needs at least one input"))?;
    Ok(storage(op, first)?.dev().clone())
}

/// The error for an op that has no CUDA kernel yet.
pub fn no_kernel(op: &'static str) -> Error {
    Error::Device {
        op,
        msg: format!("`{op}` has no CUDA kernel: run it on the CPU"),
    }
}

/// Launches `f` with `cfg`, pushing each argument in order; maps failures to `op`'s error.
#[macro_export]
#[doc(hidden)]
macro_rules! cuda_launch {
    ($dev:expr, $op:expr, $f:expr, $cfg:expr, [$($arg:expr),* $(,)?]) => {{
        use cudarc::driver::PushKernelArg as _;
        let dev: &$crate::cuda::CudaDevice = &$dev;
        let mut b = dev.compute().launch_builder(&$f);
        $( b.arg($arg); )*
        // SAFETY: each kernel's parameter list matches the arguments its caller pushes (types
        // and order are written side by side in the op's file), and every pointer argument is
        // a live allocation of at least the elements the kernel indexes.
        unsafe { b.launch($cfg) }.map(|_| ()).map_err(dev.err($op))
    }};
}
