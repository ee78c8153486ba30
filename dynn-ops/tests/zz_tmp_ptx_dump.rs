// TEMPORARY (not part of the repo): dumps PTX for inspection.
use dynn_ops::cuda::{Arch, compile_ptx_fresh};
#[test]
fn dump() {
    let want: Vec<String> = std::env::var("PTX_FAMILIES").unwrap_or_default().split(',').map(String::from).collect();
    std::fs::create_dir_all("/tmp/ptx").unwrap();
    for source in dynn_ops::cuda_sources() {
        if !want.iter().any(|w| w == source.name) { continue; }
        for scalar in ["float", "double"] {
            let t = std::time::Instant::now();
            let ptx = compile_ptx_fresh(source, scalar, Arch::SM90).unwrap();
            eprintln!("{} {} {:?}", source.name, scalar, t.elapsed());
            std::fs::write(format!("/tmp/ptx/{}-{}.ptx", source.name, scalar), ptx).unwrap();
        }
    }
}
