//! The GPU's host tier: a buffer offloaded to pinned host memory and fetched back holds the
//! same bytes in every dtype (and sizes from empty to several MiB), reads correctly on the
//! host while offloaded, and recycled pinned blocks never leak one buffer's bytes into
//! another's.

use crate::harness::*;
use dynn_core::{DType, Residency, Tensor};
use dynn_ops::prelude::*;

/// Values of `dtype` with `n` elements.
fn values(n: usize, seed: u64, dtype: DType) -> Tensor {
    match dtype {
        DType::F32 | DType::F64 => rand_dtype(&[n], seed, dtype),
        DType::F16 | DType::BF16 => rand_dtype(&[n], seed, DType::F32)
            .to_dtype(dtype)
            .expect("cast"),
        _ => indices(&[n], 1 << 20, seed, dtype),
    }
}

#[test]
fn offload_and_fetch_round_trip() {
    let Some(dev) = gpu() else { return };
    let mut cases = Vec::new();
    for dtype in DType::ALL {
        for (i, n) in [0usize, 1, 1000, 4097, 3 << 20].into_iter().enumerate() {
            let case = || -> dynn_core::Result<()> {
                let host = values(n, 7 * i as u64 + 1, dtype);
                let want = host.to_f64_vec()?;
                let t = host.to_device(dev)?;
                let buf = t.buffer().clone();
                for round in 0..3 {
                    buf.offload()?;
                    assert_eq!(buf.residency(), Residency::Host, "round {round}");
                    // Read on the host straight from the pinned tier.
                    assert_eq!(t.to_f64_vec()?, want, "{dtype:?} x {n}: offloaded read");
                    buf.fetch()?;
                    assert_eq!(buf.residency(), Residency::Device);
                    assert_eq!(t.to_f64_vec()?, want, "{dtype:?} x {n}: after fetch");
                    if matches!(dtype, DType::F32 | DType::F64) {
                        // Kernels see the fetched bytes.
                        let twice = t.add(&t)?.to_f64_vec()?;
                        let host_twice = host.add(&host)?.to_f64_vec()?;
                        assert_eq!(twice, host_twice, "{dtype:?} x {n}: kernel after fetch");
                    }
                }
                Ok(())
            };
            cases.push((format!("host tier {dtype:?} x {n}"), case()));
        }
    }
    run("host_tier", cases);
}

#[test]
fn recycled_pinned_blocks_keep_each_buffers_bytes() {
    let Some(dev) = gpu() else { return };
    let case = || -> dynn_core::Result<()> {
        // Offload many same-sized buffers, fetch them back in another order, repeat: blocks
        // are handed from one buffer to the next.
        let hosts: Vec<Tensor> = (0..8).map(|s| randn(&[50_000], 100 + s)).collect();
        let on_gpu: Vec<Tensor> = hosts
            .iter()
            .map(|h| h.to_device(dev))
            .collect::<dynn_core::Result<_>>()?;
        for round in 0..4 {
            for t in &on_gpu {
                t.buffer().offload()?;
            }
            for k in 0..on_gpu.len() {
                let j = (k * 3 + round) % on_gpu.len();
                on_gpu[j].buffer().fetch()?;
            }
            for (h, t) in hosts.iter().zip(&on_gpu) {
                assert_eq!(t.to_f64_vec()?, h.to_f64_vec()?, "round {round}");
            }
        }
        Ok(())
    };
    run("host_tier", vec![("recycled blocks".into(), case())]);
}

#[test]
fn trimming_frees_idle_pinned_blocks_and_the_tier_still_works() {
    let Some(dev) = gpu() else { return };
    let case = || -> dynn_core::Result<()> {
        let cuda = dynn_ops::cuda::device(0)?;
        // A pool of its own, so tests running beside this one do not change its counts.
        let pool = dynn_ops::cuda::PinnedPool::new(cuda.context().clone(), cuda.events().clone());
        let err = |e: cudarc::driver::DriverError| dynn_core::Error::Msg(e.to_string());
        let blocks: Vec<_> = (0..6)
            .map(|_| pool.take(400_000))
            .collect::<std::result::Result<_, _>>()
            .map_err(err)?;
        assert_eq!(pool.cached_bytes(), 0);
        drop(blocks);
        // Six blocks of one size class came back; keeping two of them frees the rest.
        let cached = pool.cached_bytes();
        let block = cached / 6;
        assert!(block >= 400_000 && cached == 6 * block, "{cached} B cached");
        assert_eq!(pool.trim_to(2 * block), 4 * block);
        assert_eq!(pool.cached_bytes(), 2 * block);
        assert_eq!(pool.trim(), 2 * block);
        assert_eq!(pool.cached_bytes(), 0);
        let again = pool.take(400_000).map_err(err)?;
        assert_eq!(again.bytes().len(), 400_000);
        // The device's own tier, trimmed, pins new blocks as needed and keeps every
        // buffer's bytes.
        cuda.pinned().trim();
        let hosts: Vec<Tensor> = (0..6).map(|s| randn(&[100_000], 300 + s)).collect();
        let on_gpu: Vec<Tensor> = hosts
            .iter()
            .map(|h| h.to_device(dev))
            .collect::<dynn_core::Result<_>>()?;
        for round in 0..2 {
            for t in &on_gpu {
                t.buffer().offload()?;
            }
            for t in on_gpu.iter().rev() {
                t.buffer().fetch()?;
            }
            for (h, t) in hosts.iter().zip(&on_gpu) {
                assert_eq!(t.to_f64_vec()?, h.to_f64_vec()?, "round {round}");
            }
            cuda.pinned().trim();
        }
        Ok(())
    };
    run("host_tier", vec![("trimmed pool".into(), case())]);
}

#[test]
fn moves_queued_behind_running_kernels_keep_their_results() {
    let Some(dev) = gpu() else { return };
    let case = || -> dynn_core::Result<()> {
        let a = randn(&[512, 512], 11).to_device(dev)?.scale(0.05)?;
        // Enough queued kernels that each copy is issued while its writers still run.
        let chain = |seed: f64| -> dynn_core::Result<Tensor> {
            let mut y = a.add_scalar(seed)?;
            for _ in 0..12 {
                y = y.matmul(&a)?.tanh()?;
            }
            Ok(y)
        };
        let seeds = [0.1, 0.2, 0.3, 0.4];
        let want: Vec<Vec<f64>> = seeds
            .iter()
            .map(|&s| chain(s)?.to_f64_vec())
            .collect::<dynn_core::Result<_>>()?;
        for round in 0..3 {
            let ys: Vec<Tensor> = seeds
                .iter()
                .map(|&s| chain(s))
                .collect::<dynn_core::Result<_>>()?;
            // Offload all, fetch in another order at once (copies still in flight recycle
            // their blocks), run a kernel on each, offload again, read on the host tier.
            for y in &ys {
                y.buffer().offload()?;
            }
            for k in 0..ys.len() {
                ys[(k + round + 1) % ys.len()].buffer().fetch()?;
            }
            let doubled: Vec<Tensor> = ys
                .iter()
                .map(|y| y.add(y))
                .collect::<dynn_core::Result<_>>()?;
            for y in &ys {
                y.buffer().offload()?;
            }
            for (i, y) in ys.iter().enumerate() {
                assert_eq!(
                    y.to_f64_vec()?,
                    want[i],
                    "round {round}: host-tier read of {i}"
                );
                let twice: Vec<f64> = want[i].iter().map(|v| v + v).collect();
                assert_eq!(
                    doubled[i].to_f64_vec()?,
                    twice,
                    "round {round}: kernel after fetch {i}"
                );
            }
        }
        Ok(())
    };
    run("host_tier", vec![("moves behind kernels".into(), case())]);
}
