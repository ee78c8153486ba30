//! GPU benchmarks: dynn's CUDA kernels on `cuda:0`, timed with the device synchronised after
//! each repetition. `benches/gpu_torch.py` times the same cases in PyTorch eager on the same
//! GPU and prints the ratios; `scripts/gpu-check.sh` runs both.
//!
//! `cargo bench -p dynn --bench gpu -- --json` prints a table and, as its last line,
//! `{"device", "cases":[{"name","dynn_ms","flops"|"bytes"}]}`. Without a GPU it says so and
//! exits 0. Shapes: keep them in step with `gpu_torch.py`.

use dynn::models::nn::{AttentionMask, ParamBuilder, TransformerBlock};
use dynn::prelude::*;
use std::time::Instant;

type BenchResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Milliseconds per run of `f`: the median over bursts of [`BURST`] runs queued back to back
/// between two device synchronisations (after warm-up), as PyTorch is timed in
/// `gpu_torch.py`. Host-side cost shows where it exceeds the kernels' time.
fn time<T>(dev: Device, mut f: impl FnMut() -> BenchResult<T>) -> BenchResult<f64> {
    let sync = || dev.backend().and_then(|b| b.synchronize());
    for _ in 0..3 {
        f()?;
    }
    sync()?;
    let mut samples = Vec::new();
    let start = Instant::now();
    while samples.len() < 5 || (start.elapsed().as_secs_f64() < 1.0 && samples.len() < 100) {
        let t = Instant::now();
        for _ in 0..BURST {
            f()?;
        }
        sync()?;
        samples.push(t.elapsed().as_secs_f64() * 1e3 / BURST as f64);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

/// Runs per timed burst.
const BURST: usize = 20;

fn randn(shape: &[usize], seed: u64, dev: Device) -> Result<Tensor> {
    rand_normal(shape, 0.0, 1.0, DType::F32, seed, dev)
}

struct Case {
    name: String,
    ms: f64,
    /// ("flops", n) or ("bytes", n) for the rate column.
    work: (&'static str, f64),
}

/// Element-wise, reduction-row and optimizer kernels: 16M-element operands (4096², f32 unless
/// the name says bf16 or f16), and the row ops over (4096, 1024).
fn elementwise_cases(
    dev: Device,
    want: &dyn Fn(&str) -> bool,
    cases: &mut Vec<Case>,
) -> BenchResult<()> {
    let n = 4096.0 * 4096.0;
    let a = randn(&[4096, 4096], 11, dev)?;
    let b = randn(&[4096, 4096], 12, dev)?;
    let v = rand_uniform([4096, 4096], 0.2, 2.0, DType::F32, 13, dev)?;
    let mask = a.gt(&b)?;
    let t = a.affine(1.0, 0.0)?;
    let x = randn(&[4096, 1024], 14, dev)?;
    let w = randn(&[1024], 15, dev)?;
    let row_bytes = 2.0 * 4096.0 * 1024.0 * 4.0;
    // 16-bit copies (computed in f32, rounded once per op).
    let (a16, b16) = (a.to_dtype(DType::BF16)?, b.to_dtype(DType::BF16)?);
    let ah = a.to_dtype(DType::F16)?;
    let (x16, w16) = (x.to_dtype(DType::BF16)?, w.to_dtype(DType::BF16)?);
    let _g = no_grad();
    type Run<'a> = Box<dyn Fn() -> Result<()> + 'a>;
    let all: Vec<(&str, f64, Run)> = vec![
        ("add_16M", 12.0 * n, Box::new(|| a.add(&b).map(drop))),
        ("mul_16M", 12.0 * n, Box::new(|| a.mul(&b).map(drop))),
        (
            "maximum_16M",
            12.0 * n,
            Box::new(|| a.maximum(&b).map(drop)),
        ),
        (
            "add_transposed_16M",
            12.0 * n,
            Box::new(|| a.t()?.add(&b).map(drop)),
        ),
        // Masks are one byte per element (U8), as PyTorch's bool.
        ("gt_16M", 9.0 * n, Box::new(|| a.gt(&b).map(drop))),
        (
            "where_16M",
            13.0 * n,
            Box::new(|| mask.where_cond(&a, &b).map(drop)),
        ),
        (
            "masked_fill_16M",
            9.0 * n,
            Box::new(|| a.masked_fill(&mask, 0.0).map(drop)),
        ),
        (
            "contiguous_transposed_16M",
            8.0 * n,
            Box::new(|| a.t()?.contiguous().map(drop)),
        ),
        (
            "cast_f32_f64_16M",
            12.0 * n,
            Box::new(|| a.to_dtype(DType::F64).map(drop)),
        ),
        ("axpy_16M", 12.0 * n, Box::new(|| t.axpy_(1e-3, &b))),
        (
            "adam_step_16M",
            20.0 * n,
            Box::new(|| t.adam_step_(1.0, 1e-3, 1e-8, &b, &v)),
        ),
        (
            "log_softmax_4096x1024",
            row_bytes,
            Box::new(|| x.log_softmax(1).map(drop)),
        ),
        (
            "rms_norm_4096x1024",
            row_bytes,
            Box::new(|| x.rms_norm(Some(&w), 1e-5).map(drop)),
        ),
        (
            "sum_rows_4096x1024",
            row_bytes / 2.0,
            Box::new(|| x.sum_keepdim(1).map(drop)),
        ),
        (
            "add_bf16_16M",
            6.0 * n,
            Box::new(|| a16.add(&b16).map(drop)),
        ),
        ("gelu_f16_16M", 4.0 * n, Box::new(|| ah.gelu().map(drop))),
        (
            "log_softmax_bf16_4096x1024",
            row_bytes / 2.0,
            Box::new(|| x16.log_softmax(1).map(drop)),
        ),
        (
            "rms_norm_bf16_4096x1024",
            row_bytes / 2.0,
            Box::new(|| x16.rms_norm(Some(&w16), 1e-5).map(drop)),
        ),
    ];
    for (name, bytes, f) in all {
        if want(name) {
            let ms = time(dev, || Ok(f()?))?;
            cases.push(Case {
                name: name.into(),
                ms,
                work: ("bytes", bytes),
            });
        }
    }
    Ok(())
}

/// One training step (forward, backward, AdamW) of a GPU-sized Mixture-of-Experts LM: width
/// 512, 8 heads, 4 blocks of 8 experts (top-2, hidden 2048, capacity 1.25), 256 tokens, batch
/// 16, on the generated corpus. `gpu_torch.py` builds the same model in PyTorch.
fn moe_step(dev: Device) -> BenchResult<Case> {
    use dynn::models::Rng;
    use dynn::models::models::moe::{MoeConfig, MoeTask};
    use dynn::models::train::Task;
    let cfg = MoeConfig {
        vocab: 512,
        dim: 512,
        heads: 8,
        layers: 4,
        experts: 8,
        top_k: 2,
        expert_hidden: 2048,
        capacity_factor: 1.25,
        aux_loss_weight: 0.01,
        seq: 256,
        dropout: 0.0,
    };
    let mut task = MoeTask::new(&cfg, None, 1, dev)?;
    let params = task.params();
    let mut opt = Adam::new(AdamConfig::adamw(1e-3))?;
    let mut rng = Rng::new(3);
    let ms = time(dev, || {
        let out = task.step(&mut rng, 16)?;
        out.loss.backward()?;
        Ok(opt.step(&params)?)
    })?;
    // Dense-equivalent work per token: attention projections and each token's top-2 experts.
    let tokens = 16.0 * 256.0;
    let flops = 6.0 * tokens * 4.0 * (4.0 * 512.0 * 512.0 + 2.0 * 2.0 * 512.0 * 2048.0);
    Ok(Case {
        name: "moe_train_step".into(),
        ms,
        work: ("flops", flops),
    })
}

/// Host link bandwidth: pinned copies (the link's capability) and dynn's offload path
/// (the memory manager's offload and fetch through the pinned host tier), 256 MiB each way.
fn link_cases(
    cuda: &dynn::cuda::CudaDevice,
    want: &dyn Fn(&str) -> bool,
    cases: &mut Vec<Case>,
) -> BenchResult<()> {
    const BYTES: usize = 256 << 20;
    let dev = Device::Cuda(cuda.ordinal());
    let (up, down) = (cuda.upload_stream().clone(), cuda.download_stream().clone());
    if want("h2d_pinned") || want("d2h_pinned") {
        // SAFETY: the pinned buffer is only used as a copy source/target of BYTES bytes.
        let mut pinned = unsafe { cuda.context().alloc_pinned::<u8>(BYTES) }?;
        let mut on_gpu = up.alloc_zeros::<u8>(BYTES)?;
        let ms = time(dev, || Ok(up.memcpy_htod(&pinned, &mut on_gpu)?))?;
        cases.push(Case {
            name: "h2d_pinned_256MiB".into(),
            ms,
            work: ("bytes", BYTES as f64),
        });
        let ms = time(dev, || Ok(down.memcpy_dtoh(&on_gpu, &mut pinned)?))?;
        cases.push(Case {
            name: "d2h_pinned_256MiB".into(),
            ms,
            work: ("bytes", BYTES as f64),
        });
    }
    if want("offload_path") {
        // The memory manager's own moves: device → pinned host tier and back, each timed to
        // the end of its copy (the moves themselves only queue the copy). Median of repeated
        // pairs; the 64 KiB case is dominated by the fixed cost of one copy.
        let sync = || dev.backend().and_then(|b| b.synchronize());
        for (bytes, label) in [(BYTES, "256MiB"), (64 << 10, "64KiB")] {
            let t = Tensor::zeros([bytes / 4], DType::F32, dev)?;
            let buf = t.buffer().clone();
            let (mut down_ms, mut up_ms) = (Vec::new(), Vec::new());
            let reps = if bytes == BYTES { 12 } else { 200 };
            for rep in 0..reps {
                // Marked written (no kernel): a buffer fetched and not written since leaves
                // the device without a copy, which is not what this case times.
                buf.update("offload_path", |_| Ok(()))?;
                let start = Instant::now();
                buf.offload()?;
                sync()?;
                let mid = Instant::now();
                buf.fetch()?;
                sync()?;
                if rep >= 2 {
                    down_ms.push((mid - start).as_secs_f64() * 1e3);
                    up_ms.push(mid.elapsed().as_secs_f64() * 1e3);
                }
            }
            for (dir, samples) in [("h2d", &mut up_ms), ("d2h", &mut down_ms)] {
                samples.sort_by(f64::total_cmp);
                cases.push(Case {
                    name: format!("{dir}_offload_path_{label}"),
                    ms: samples[samples.len() / 2],
                    work: ("bytes", bytes as f64),
                });
            }
        }
    }
    Ok(())
}

/// The fixed cost of one buffer move through the memory manager: its bookkeeping, the
/// hand-off to the transfer thread and back, and the copy. 64 KiB buffers are updated in place
/// round-robin under a budget of about half of them (lru), so every update evicts one buffer
/// (written, so it is copied out) and fetches another. The case's time is per move: the loop's extra time over the same loop without a
/// budget, divided by the moves the manager counted.
fn manager_move_case(dev: Device, cases: &mut Vec<Case>) -> BenchResult<()> {
    use dynn::mm::{ManagerConfig, MemoryManager, policy};
    const N: usize = 64;
    const BYTES: usize = 64 << 10;
    const REPS: usize = 20;
    let run = |budget: Option<usize>| -> BenchResult<(f64, u64, f64)> {
        let mm = MemoryManager::new(ManagerConfig::new(policy::by_name("lru")?, budget));
        let _hooks = dynn::core::install_memory_hooks(mm.clone());
        let ts = (0..N)
            .map(|_| Tensor::zeros([BYTES / 4], DType::F32, dev))
            .collect::<dynn::core::Result<Vec<_>>>()?;
        let zero = Tensor::zeros([BYTES / 4], DType::F32, dev)?;
        let sync = || dev.backend().and_then(|b| b.synchronize());
        for t in &ts {
            t.scale_add_(1.0, 0.0, &zero)?;
        }
        sync()?;
        let before = mm.report().stats;
        let start = Instant::now();
        for _ in 0..REPS {
            for t in &ts {
                t.scale_add_(1.0, 0.0, &zero)?;
            }
        }
        sync()?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        let after = mm.report().stats;
        let moves =
            (after.evictions - before.evictions) + (after.demand_fetches - before.demand_fetches);
        let host = (after.choose_time + after.copy_call_time)
            .saturating_sub(before.choose_time + before.copy_call_time);
        Ok((ms, moves, host.as_secs_f64() * 1e3))
    };
    let (free_ms, _, _) = run(None)?;
    let (budget_ms, moves, host_ms) = run(Some(N / 2 * BYTES + 4 * BYTES))?;
    if moves > 0 {
        cases.push(Case {
            name: "manager_move_64KiB".into(),
            ms: (budget_ms - free_ms).max(0.0) / moves as f64,
            work: ("bytes", BYTES as f64),
        });
        // The part of it the executor's thread spends choosing victims and in copy calls.
        cases.push(Case {
            name: "manager_move_host_64KiB".into(),
            ms: host_ms / moves as f64,
            work: ("bytes", BYTES as f64),
        });
    }
    Ok(())
}

fn main() -> BenchResult<()> {
    let args: Vec<String> = std::env::args().collect();
    let json = args.iter().any(|a| a == "--json");
    let filter = args
        .iter()
        .position(|a| a == "--filter")
        .and_then(|i| args.get(i + 1).cloned());
    let want = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    let cuda = match dynn::ops::cuda::init(0) {
        Ok(d) => d,
        Err(e) => {
            println!("no GPU benchmark: {e}");
            return Ok(());
        }
    };
    let dev = Device::Cuda(0);
    let mut cases = Vec::new();

    for n in [1024usize, 2048, 4096] {
        let name = format!("matmul_f32_{n}");
        if want(&name) {
            let (a, b) = (randn(&[n, n], 1, dev)?, randn(&[n, n], 2, dev)?);
            let ms = time(dev, || Ok(a.matmul(&b)?))?;
            cases.push(Case {
                name,
                ms,
                work: ("flops", 2.0 * (n * n * n) as f64),
            });
        }
    }
    for (dtype, tag) in [(DType::F16, "f16"), (DType::BF16, "bf16")] {
        let (n, name) = (4096usize, format!("matmul_{tag}_4096"));
        if want(&name) {
            let a = randn(&[n, n], 1, dev)?.to_dtype(dtype)?;
            let b = randn(&[n, n], 2, dev)?.to_dtype(dtype)?;
            let ms = time(dev, || Ok(a.matmul(&b)?))?;
            cases.push(Case {
                name,
                ms,
                work: ("flops", 2.0 * (n * n * n) as f64),
            });
        }
    }
    if want("bmm_32x128x64x128") {
        let (a, b) = (
            randn(&[32, 128, 64], 3, dev)?,
            randn(&[32, 64, 128], 4, dev)?,
        );
        let ms = time(dev, || Ok(a.matmul(&b)?))?;
        let flops = 2.0 * 32.0 * 128.0 * 64.0 * 128.0;
        cases.push(Case {
            name: "bmm_32x128x64x128".into(),
            ms,
            work: ("flops", flops),
        });
    }
    let (rows, cols) = (4096usize, 1024usize);
    let bytes_rw = 2.0 * (rows * cols * 4) as f64;
    let x = randn(&[rows, cols], 5, dev)?;
    if want("softmax_4096x1024") {
        let ms = time(dev, || Ok(x.softmax(1)?))?;
        cases.push(Case {
            name: "softmax_4096x1024".into(),
            ms,
            work: ("bytes", bytes_rw),
        });
    }
    if want("layer_norm_4096x1024") {
        let (w, b) = (randn(&[cols], 6, dev)?, randn(&[cols], 7, dev)?);
        let ms = time(dev, || Ok(x.layer_norm(Some(&w), Some(&b), 1e-5)?))?;
        cases.push(Case {
            name: "layer_norm_4096x1024".into(),
            ms,
            work: ("bytes", bytes_rw),
        });
    }
    if want("add_bcast_4096x1024") {
        let b = randn(&[cols], 8, dev)?;
        let ms = time(dev, || Ok(x.add(&b)?))?;
        cases.push(Case {
            name: "add_bcast_4096x1024".into(),
            ms,
            work: ("bytes", bytes_rw),
        });
    }
    if want("gelu_4096x1024") {
        let ms = time(dev, || Ok(x.gelu()?))?;
        cases.push(Case {
            name: "gelu_4096x1024".into(),
            ms,
            work: ("bytes", bytes_rw),
        });
    }
    elementwise_cases(dev, &want, &mut cases)?;
    if want("transformer_block_fwd_bwd") {
        // batch 8, seq 256, width 512, 8 heads, feed-forward 2048, causal.
        let b = ParamBuilder::new(DType::F32, dev, 9);
        let block = TransformerBlock::new(&b, 512, 8, 2048)?;
        let x = randn(&[8, 256, 512], 10, dev)?;
        let ms = time(dev, || {
            let y = block.forward(&x, &AttentionMask::Causal)?;
            y.sum_all()?.backward()?;
            Ok(())
        })?;
        let flops = 6.0 * 8.0 * 256.0 * (12.0 * 512.0 * 512.0 + 2.0 * 256.0 * 512.0);
        cases.push(Case {
            name: "transformer_block_fwd_bwd".into(),
            ms,
            work: ("flops", flops),
        });
    }

    if want("moe_train_step") {
        cases.push(moe_step(dev)?);
    }
    link_cases(&cuda, &want, &mut cases)?;
    if want("manager_move") {
        manager_move_case(dev, &mut cases)?;
    }

    println!("device: {} ({})", cuda.name(), cuda.arch());
    println!("{:<28} {:>10} {:>14}", "case", "dynn ms", "rate");
    for c in &cases {
        let rate = match c.work {
            ("flops", f) => format!("{:.1} TFLOP/s", f / c.ms / 1e9),
            (_, b) => format!("{:.0} GB/s", b / c.ms / 1e6),
        };
        println!("{:<28} {:>10.4} {:>14}", c.name, c.ms, rate);
    }
    if json {
        let items: Vec<String> = cases
            .iter()
            .map(|c| {
                format!(
                    r#"{{"name":"{}","dynn_ms":{:.6},"{}":{}}}"#,
                    c.name, c.ms, c.work.0, c.work.1
                )
            })
            .collect();
        println!(
            r#"{{"device":"{}","cases":[{}]}}"#,
            cuda.name(),
            items.join(",")
        );
    }
    Ok(())
}
