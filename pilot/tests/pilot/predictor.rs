//! The allocation-free predictor matches the dynn forward; save → load; p50 latency.

use dynn_core::{Device, Tensor};
use dynn_models::Rng;
use dynn_models::nn::Forward;
use dynn_pilot::{FeatureConfig, ModelConfig, PilotNet, Snapshot};
use std::time::Instant;

fn net() -> dynn_core::Result<(PilotNet, Snapshot, FeatureConfig)> {
    let features = FeatureConfig::default();
    let net = PilotNet::new(features.input_dim(), &ModelConfig::default())?;
    let snap = net.snapshot(features)?;
    Ok((net, snap, features))
}

fn inputs(rows: usize, dim: usize) -> Vec<f32> {
    let mut rng = Rng::new(5);
    (0..rows * dim)
        .map(|_| {
            // Mostly-sparse rows in [0, 2), like the encoder's.
            if rng.bernoulli(0.4) {
                (2.0 * rng.uniform()) as f32
            } else {
                0.0
            }
        })
        .collect()
}

#[test]
fn the_predictor_matches_the_dynn_forward_and_reuses_its_scratch() -> dynn_core::Result<()> {
    let (net, snap, features) = net()?;
    let dim = features.input_dim();
    let rows = 16;
    let x = inputs(rows, dim);
    let want = net
        .forward(&Tensor::from_vec(x.clone(), (rows, dim), Device::Cpu)?)?
        .to_vec::<f32>()?;
    let mut scratch = snap.scratch();
    let cap = scratch.capacity();
    for r in 0..rows {
        let got = snap
            .logits(&x[r * dim..(r + 1) * dim], &mut scratch)
            .to_vec();
        for (g, w) in got.iter().zip(&want[r * 5..(r + 1) * 5]) {
            assert!(
                (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "row {r}: {g} vs {w}"
            );
        }
        let best = want[r * 5..(r + 1) * 5]
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|b| b.0 as u8);
        assert_eq!(
            Some(snap.predict(&x[r * dim..(r + 1) * dim], &mut scratch)),
            best
        );
        assert_eq!(
            scratch.capacity(),
            cap,
            "the scratch grew: a call allocated"
        );
    }
    Ok(())
}

#[test]
fn save_then_load_gives_the_same_pilot() -> dynn_core::Result<()> {
    let (_, snap, features) = net()?;
    let path = std::env::temp_dir().join(format!("dynn-pilot-{}.safetensors", std::process::id()));
    snap.save(&path)?;
    let back = Snapshot::load(&path)?;
    assert_eq!(back, snap);
    assert_eq!(back.features, features);
    // Not a pilot: an error, not a panic.
    let mut other = dynn_models::checkpoint::Checkpoint::new();
    other.insert("x", Tensor::zeros(3, dynn_core::DType::F32, Device::Cpu)?);
    other.save(&path)?;
    let e = Snapshot::load(&path).expect_err("another checkpoint is rejected");
    assert!(e.to_string().contains("not a saved pilot"), "{e}");
    std::fs::write(&path, b"garbage")?;
    assert!(Snapshot::load(&path).is_err());
    std::fs::remove_file(&path)?;
    Ok(())
}

#[test]
fn predict_p50_is_measured() -> dynn_core::Result<()> {
    let (_, snap, features) = net()?;
    let dim = features.input_dim();
    let x = inputs(64, dim);
    let mut scratch = snap.scratch();
    let mut times = Vec::with_capacity(2000);
    let mut sink = 0u32;
    for i in 0..2000 {
        let row = &x[(i % 64) * dim..(i % 64 + 1) * dim];
        let t = Instant::now();
        sink += snap.predict(row, &mut scratch) as u32;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    let p50 = times[times.len() / 2];
    println!("predict p50 {p50:.2} µs (input {dim}, sink {sink})");
    // A loose bound that holds in the debug profile; release is far below 10 µs.
    assert!(p50 < 500.0, "p50 {p50} µs");
    Ok(())
}
