//! Random initialisers on the GPU: `rand_uniform` and `rand_normal` made on the GPU equal the
//! CPU's tensors bit for bit (same seed), in every float dtype and size.

use crate::harness::*;
use dynn_core::{DType, Device, Error, Result, Tensor};
use dynn_ops::prelude::*;

/// Bit-identical (NaN-free) tensors.
fn same_bits(what: &str, got: &Tensor, want: &Tensor) -> Result<()> {
    if got.device() == Device::Cpu {
        return Err(Error::Msg(format!("{what}: made on the CPU")));
    }
    assert_close(what, got, want, 0.0)
}

#[test]
fn random_matches_the_cpu() {
    let Some(dev) = gpu() else { return };
    let mut cases = Vec::new();
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        for (i, n) in [0usize, 1, 7, 1000, 12_345, 1 << 20]
            .into_iter()
            .enumerate()
        {
            let seed = 17 + i as u64;
            let tag = format!("{dtype:?} n {n}");
            let r = (|| {
                let want = rand_uniform(n, -2.0, 3.0, dtype, seed, Device::Cpu)?;
                let got = rand_uniform(n, -2.0, 3.0, dtype, seed, dev)?;
                same_bits("rand_uniform", &got, &want)
            })();
            cases.push((format!("rand_uniform {tag}"), r));
            let r = (|| {
                let want = rand_normal(n, 1.5, 2.0, dtype, seed, Device::Cpu)?;
                let got = rand_normal(n, 1.5, 2.0, dtype, seed, dev)?;
                same_bits("rand_normal", &got, &want)
            })();
            cases.push((format!("rand_normal {tag}"), r));
        }
        let r = (|| {
            let want = Tensor::rand_uniform([300, 211], 0.0, 1.0, dtype, 5, Device::Cpu)?;
            let got = Tensor::rand_uniform([300, 211], 0.0, 1.0, dtype, 5, dev)?;
            if got.dims() != [300, 211] {
                return Err(Error::Msg(format!("shape {}", got.shape())));
            }
            same_bits("rand_uniform 2-d", &got, &want)
        })();
        cases.push((format!("rand_uniform 2-d {dtype:?}"), r));
    }
    // Errors are the CPU's.
    let r = match rand_uniform(3, 1.0, 0.0, DType::F32, 0, dev) {
        Err(Error::InvalidArgument { .. }) => Ok(()),
        other => Err(Error::Msg(format!("lo > hi: {other:?}"))),
    };
    cases.push(("rand_uniform lo > hi".into(), r));
    run("random", cases);
}
