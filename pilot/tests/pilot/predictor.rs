//! The allocation-free predictor matches the dynn forward; save → load; p50 latency.

use dynn_core::{Device, Tensor};
use dynn_models::Rng;
use dynn_models::nn::Forward;
use dynn_pilot::predictor::Dense;
use dynn_pilot::{BUCKETS, FeatureConfig, ModelConfig, PilotNet, Snapshot};
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
fn candidates_after_shared_window_sums_give_the_same_bits_as_whole_rows() -> dynn_core::Result<()> {
    // 40 wide: one register block of outputs and a tail.
    let features = FeatureConfig::default();
    let cfg = ModelConfig {
        hidden: 40,
        ..ModelConfig::default()
    };
    let snap = PilotNet::new(features.input_dim(), &cfg)?.snapshot(features)?;
    let (dim, split) = (features.input_dim(), features.window_dim());
    let rows = 12;
    let mut x = inputs(rows, dim);
    // Every row shares row 0's window, as the candidates ranked at one op do.
    for r in 1..rows {
        x.copy_within(0..split, r * dim);
    }
    let mut sums = Vec::new();
    snap.window_sums(&x[..split], &mut sums);
    let (mut whole, mut after) = (snap.scratch(), snap.scratch());
    for r in 0..rows {
        let row = &x[r * dim..(r + 1) * dim];
        let predicted = snap.predict_after(&sums, &row[split..], &mut after);
        assert_eq!(predicted, snap.predict(row, &mut whole), "row {r}");
        // The plain forward pass: each output adds its terms in input order.
        let mut want = row.to_vec();
        for (i, l) in snap.layers.iter().enumerate() {
            let mut next = l.b.clone();
            for (o, y) in next.iter_mut().enumerate() {
                for (k, &v) in want.iter().enumerate() {
                    *y += v * l.w[k * l.outputs + o];
                }
            }
            if i + 1 < snap.layers.len() {
                next.iter_mut().for_each(|y| *y = y.max(0.0));
            }
            want = next;
        }
        let got = snap.logits(row, &mut whole);
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "row {r}"
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

#[test]
fn a_snapshot_with_a_zero_width_layer_is_refused() {
    let features = FeatureConfig::default();
    let layers = vec![
        Dense {
            inputs: features.input_dim(),
            outputs: 0,
            w: Vec::new(),
            b: Vec::new(),
        },
        Dense {
            inputs: 0,
            outputs: BUCKETS,
            w: Vec::new(),
            b: vec![0.0; BUCKETS],
        },
    ];
    let err = Snapshot::new(features, layers).expect_err("a zero-width layer");
    assert!(err.to_string().contains("layer 0"), "{err}");
}
