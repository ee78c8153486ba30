//! NVRTC: an op family's CUDA C → PTX for one architecture and scalar type, cached on disk
//! (keyed by source hash, architecture, scalar type and NVRTC version). Works without a GPU.

use super::CudaSource;
use dynn_core::{DType, Error, Result};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;

/// A GPU architecture (compute capability), as NVRTC names it: `sm_80`, `sm_90`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Arch {
    /// Major compute capability.
    pub major: u32,
    /// Minor compute capability.
    pub minor: u32,
}

impl Arch {
    /// A100 (Ampere).
    pub const SM80: Arch = Arch { major: 8, minor: 0 };
    /// H100/H200 (Hopper).
    pub const SM90: Arch = Arch { major: 9, minor: 0 };
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sm_{}{}", self.major, self.minor)
    }
}

/// True when one of the names cudarc would try for the shared library `lib` (`cuda`,
/// `nvrtc`, `cublas`) loads. Checked before any cudarc call, whose loader panics otherwise.
pub fn library_loadable(lib: &str) -> bool {
    cudarc::get_lib_name_candidates(lib).iter().any(|name| {
        // SAFETY: loading a CUDA library runs only its initialisers, which have no
        // preconditions; the handle is dropped at once (cudarc keeps its own).
        unsafe { libloading::Library::new(name) }.is_ok()
    })
}

/// True when the NVRTC library loads and answers (needed to compile kernels; no GPU needed).
pub fn nvrtc_available() -> bool {
    nvrtc_version().is_ok()
}

fn nvrtc_missing(op: &'static str) -> Error {
    Error::Device {
        op,
        msg: "the NVRTC library (libnvrtc.so) was not found: install the CUDA toolkit or the \
              `nvidia-cuda-nvrtc-cu12` wheel and add its lib folder to LD_LIBRARY_PATH"
            .into(),
    }
}

/// NVRTC's (major, minor) version, asked through our own handle with a plain integer status:
/// a link-time stub (CUDA's `stubs` folder on the library path) answers with garbage, which
/// is reported here instead of reaching cudarc's typed bindings.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    use std::sync::OnceLock;
    static VERSION: OnceLock<std::result::Result<(i32, i32), String>> = OnceLock::new();
    let probe = || -> std::result::Result<(i32, i32), String> {
        type VersionFn = unsafe extern "C" fn(*mut i32, *mut i32) -> i32;
        for name in cudarc::get_lib_name_candidates("nvrtc") {
            // SAFETY: loading NVRTC runs only its initialisers; the symbol has the C signature
            // `nvrtcResult nvrtcVersion(int*, int*)` (nvrtcResult is a C enum: an int).
            let Ok(lib) = (unsafe { libloading::Library::new(&name) }) else {
                continue;
            };
            let Ok(f) = (unsafe { lib.get::<VersionFn>(b"nvrtcVersion\0") }) else {
                return Err(format!("{name} has no nvrtcVersion"));
            };
            let (mut major, mut minor) = (0, 0);
            // SAFETY: both pointers are valid for writes; `lib` outlives the call.
            let status = unsafe { f(&mut major, &mut minor) };
            if status != 0 || major <= 0 {
                return Err(format!(
                    "{name} answered nvrtcVersion with status {status} (a CUDA stub library on \
                     LD_LIBRARY_PATH?)"
                ));
            }
            return Ok((major, minor));
        }
        Err(String::new())
    };
    match VERSION.get_or_init(probe) {
        Ok(v) => Ok(*v),
        Err(msg) if msg.is_empty() => Err(nvrtc_missing("nvrtc_version")),
        Err(msg) => Err(Error::Device {
            op: "nvrtc_version",
            msg: msg.clone(),
        }),
    }
}

/// The C type a family is compiled for when its data has `dtype`: `float` and `double`
/// (kernels compute in it), `h16` and `bf16`'s `b16` (kernels compute in f32; only the families
/// marked [`CudaSource::half`] take them).
pub fn scalar_type(op: &'static str, dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("float"),
        DType::F64 => Ok("double"),
        DType::F16 => Ok("h16"),
        DType::BF16 => Ok("b16"),
        other => Err(Error::Device {
            op,
            msg: format!("CUDA kernels run on float data, got {other:?}: cast first"),
        }),
    }
}

/// [`scalar_type`] for a kernel of `source`: an error naming the op when the family has no
/// 16-bit kernels and `dtype` is f16 or bf16.
pub fn family_scalar(source: &CudaSource, op: &'static str, dtype: DType) -> Result<&'static str> {
    let scalar = scalar_type(op, dtype)?;
    if matches!(dtype, DType::F16 | DType::BF16) && !source.half {
        return Err(Error::Device {
            op,
            msg: format!(
                "the CUDA `{}` kernels run on f32 and f64 data, got {dtype:?}: cast first",
                source.name
            ),
        });
    }
    Ok(scalar)
}

/// True for the 16-bit storage types, whose kernels compute in f32.
fn is_half(scalar: &str) -> bool {
    matches!(scalar, "h16" | "b16")
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DYNN_KERNEL_CACHE") {
        return Some(PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("dynn").join("kernels"))
}

/// Compiles `source` for `arch` with `scalar` as its element type, returning PTX. A cached PTX
/// is reused when source, architecture, scalar type and NVRTC version all match.
pub fn compile_ptx(source: &CudaSource, scalar: &str, arch: Arch) -> Result<String> {
    compile(source, scalar, arch, true)
}

/// [`compile_ptx`] without the disk cache: always runs NVRTC (for the kernel-compile test).
pub fn compile_ptx_fresh(source: &CudaSource, scalar: &str, arch: Arch) -> Result<String> {
    compile(source, scalar, arch, false)
}

fn compile(source: &CudaSource, scalar: &str, arch: Arch, cached: bool) -> Result<String> {
    let (major, minor) = nvrtc_version()?;
    let code = source.full_source();
    let mut options = vec![
        format!("--gpu-architecture={arch}"),
        format!("-DDYNN_SCALAR={scalar}"),
        "--std=c++17".to_string(),
    ];
    if is_half(scalar) {
        options.push("-DDYNN_ACC=float".to_string());
        options.push("-DDYNN_HALF=1".to_string());
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (&code, &options, major, minor).hash(&mut h);
    let file = cache_dir().filter(|_| cached).map(|d| {
        d.join(format!(
            "{}-{scalar}-{arch}-nvrtc{major}.{minor}-{:016x}.ptx",
            source.name,
            h.finish()
        ))
    });
    if let Some(f) = &file
        && let Ok(ptx) = std::fs::read_to_string(f)
    {
        return Ok(ptx);
    }
    let opts = cudarc::nvrtc::CompileOptions {
        options,
        name: Some(format!("{}.cu", source.name)),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(&code, opts).map_err(|e| {
        let detail = match e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                log.to_string_lossy().into_owned()
            }
            other => format!("{other:?}"),
        };
        Error::Device {
            op: "nvrtc",
            msg: format!(
                "compiling the `{}` kernels for {arch} ({scalar}):\n{detail}",
                source.name
            ),
        }
    })?;
    let text = ptx.to_src();
    if let Some(f) = &file {
        // The cache is an optimisation: a failed write only costs a recompile next time.
        let tmp = f.with_extension(format!("tmp{}", std::process::id()));
        let written = f
            .parent()
            .map(std::fs::create_dir_all)
            .transpose()
            .and_then(|_| std::fs::write(&tmp, &text))
            .and_then(|_| std::fs::rename(&tmp, f));
        if let Err(e) = written {
            tracing::debug!(file = %f.display(), error = %e, "kernel cache not written");
        }
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_data_needs_a_family_with_half_kernels() {
        let with = CudaSource {
            name: "with",
            code: "",
            half: true,
        };
        let without = CudaSource {
            name: "without",
            code: "",
            half: false,
        };
        assert_eq!(family_scalar(&with, "op", DType::BF16).ok(), Some("b16"));
        assert_eq!(family_scalar(&with, "op", DType::F16).ok(), Some("h16"));
        assert_eq!(
            family_scalar(&without, "op", DType::F32).ok(),
            Some("float")
        );
        let e = family_scalar(&without, "op", DType::F16).map(|_| ());
        let msg = e.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("`without`") && msg.contains("F16"), "{msg}");
        assert!(family_scalar(&with, "op", DType::I64).is_err());
    }
}
