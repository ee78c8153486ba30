//! Every CUDA kernel compiles with NVRTC for sm_80 (A100) and sm_90 (H100/H200), in f32 and
//! f64, and in f16 and bf16 for the families that take them. Needs only the NVRTC library, no
//! GPU. Skipped with a notice when NVRTC is missing, unless `DYNN_REQUIRE_NVRTC=1` (set by
//! CI), which turns a missing NVRTC into a failure.

use dynn_ops::cuda::{Arch, compile_ptx_fresh, nvrtc_available, nvrtc_version};

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if !nvrtc_available() {
        assert!(
            std::env::var("DYNN_REQUIRE_NVRTC").as_deref() != Ok("1"),
            "DYNN_REQUIRE_NVRTC=1 but libnvrtc could not be loaded (check LD_LIBRARY_PATH)"
        );
        eprintln!("skipped: NVRTC not found (set LD_LIBRARY_PATH to a folder with libnvrtc.so)");
        return;
    }
    let (major, minor) = nvrtc_version().expect("nvrtc version");
    eprintln!("NVRTC {major}.{minor}");
    let mut failures = Vec::new();
    let mut compiled = 0;
    // DYNN_KERNEL_FAMILIES=unary,binary compiles only those families (while editing them);
    // DYNN_PTX_DIR=dir keeps the PTX (scripts/ptxas-check.sh assembles it).
    let ptx_dir = std::env::var_os("DYNN_PTX_DIR").map(std::path::PathBuf::from);
    if let Some(d) = &ptx_dir {
        std::fs::create_dir_all(d).expect("creating DYNN_PTX_DIR");
    }
    let only = std::env::var("DYNN_KERNEL_FAMILIES").ok();
    let wanted = |name: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|f| f == name))
    };
    for source in dynn_ops::cuda_sources()
        .into_iter()
        .filter(|s| wanted(s.name))
    {
        for arch in [Arch::SM80, Arch::SM90] {
            let halves: &[&str] = if source.half { &["h16", "b16"] } else { &[] };
            for &scalar in ["float", "double"].iter().chain(halves) {
                match compile_ptx_fresh(source, scalar, arch) {
                    Ok(ptx) => {
                        assert!(
                            ptx.contains(".entry"),
                            "{}: PTX without kernels",
                            source.name
                        );
                        if let Some(dir) = &ptx_dir {
                            let file = dir.join(format!("{}-{scalar}-{arch}.ptx", source.name));
                            std::fs::write(&file, &ptx).expect("writing PTX to DYNN_PTX_DIR");
                        }
                        compiled += 1;
                    }
                    Err(e) => failures.push(e.to_string()),
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} compile failure(s):\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    eprintln!("{compiled} modules compiled");
}

#[test]
fn a_compile_error_is_reported_with_the_log() {
    if !nvrtc_available() {
        return;
    }
    static BROKEN: dynn_ops::cuda::CudaSource = dynn_ops::cuda::CudaSource {
        name: "broken",
        code: "extern \"C\" __global__ void k(scalar* x) { x[0] = undefined_name; }",
        half: false,
    };
    let err = compile_ptx_fresh(&BROKEN, "float", Arch::SM90)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("broken") && err.contains("undefined_name"),
        "{err}"
    );
}
