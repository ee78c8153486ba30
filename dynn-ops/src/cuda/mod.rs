//! The CUDA backend: GPU storage, NVRTC-compiled kernels (their CUDA C lives with each op
//! family), cuBLAS for matmul, and one copy stream per direction for the memory manager.
//! The CUDA libraries are loaded at run time, so everything builds without a CUDA toolkit;
//! without a driver, [`init`] returns a clear error.

mod arena;
mod compile;
mod device;
mod events;
mod launch;
mod pinned;
mod source;
mod storage;

pub use arena::ArenaStats;
pub use compile::{
    Arch, compile_ptx, compile_ptx_fresh, family_scalar, library_loadable, nvrtc_available,
    nvrtc_version, scalar_type,
};
pub use device::{
    ArenaRequest, CudaDevice, arena_for_budget, arena_request, device, device_count,
    driver_available, init,
};
pub use events::EventPool;
pub use launch::{
    BLOCK, MAX_RANK, Strided, cuda_storage, device_of, grid, no_kernel, on_cuda, row_threads, rows,
    storage,
};
pub use pinned::{PinnedBlock, PinnedHost, PinnedPool};
pub use source::{CudaSource, PRELUDE};
pub use storage::CudaStorage;
