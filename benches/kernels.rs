//! Kernel benchmarks: dynn against candle on the CPU, in the same process with the same
//! thread count, plus this machine's memory bandwidth for scale.
//!
//! `cargo bench -p dynn --bench kernels -- --json` prints a table and, as its last line, one
//! JSON object: `{"mem_bw_gbs", "threads", "cases":[{"name","dynn_ms","candle_ms","speedup",
//! "dynn_gbs"|"dynn_gflops","mem_bw_gbs"}], "geomean_speedup"}` (speedup = candle time / dynn
//! time, medians of samples taken alternately, so both peers see the same conditions on a
//! shared host). The top-level `mem_bw_gbs` is measured once at the start; each case's is
//! the same probe sampled between that case's runs, the bar its memory-bound figures are
//! read against (the machine's bandwidth drifts by tens of percent within minutes).
//! `-- --quick` runs fewer repetitions; `-- --filter NAME` runs matching cases only;
//! `-- --half` adds element-wise cases in f16 and bf16 (they enter the geomean too, so the
//! issue's figure is the run without it).

use candle_core::{D as CD, Device as CDevice, Tensor as CTensor, Var};
use dynn::prelude::*;
use rayon::prelude::*;
use std::hint::black_box;
use std::time::{Duration, Instant};

type BenchResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Median wall time of `f` over repeated runs (after warm-up).
fn time(quick: bool, mut f: impl FnMut() -> BenchResult<()>) -> BenchResult<f64> {
    for _ in 0..2 {
        f()?;
    }
    let (min_reps, budget) = if quick {
        (3, Duration::from_millis(150))
    } else {
        (10, Duration::from_millis(800))
    };
    let mut samples = Vec::new();
    let start = Instant::now();
    while samples.len() < min_reps || (start.elapsed() < budget && samples.len() < 200) {
        let t = Instant::now();
        f()?;
        samples.push(t.elapsed().as_secs_f64() * 1e3);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

/// Median wall times of `a` and `b`, and of the bandwidth probe, sampled in turn (probe, a,
/// b, probe, b, a, ...) so that both peers and the machine's bandwidth are measured under the
/// same conditions on a shared host.
fn time_pair(
    quick: bool,
    probe: &mut Probe,
    mut a: impl FnMut() -> BenchResult<()>,
    mut b: impl FnMut() -> BenchResult<()>,
) -> BenchResult<(f64, f64, f64)> {
    for _ in 0..2 {
        a()?;
        b()?;
    }
    let (min_reps, budget) = if quick {
        (3, Duration::from_millis(300))
    } else {
        (15, Duration::from_millis(2000))
    };
    let (mut sa, mut sb, mut sp) = (Vec::new(), Vec::new(), Vec::new());
    let start = Instant::now();
    let timed = |f: &mut dyn FnMut() -> BenchResult<()>, samples: &mut Vec<f64>| {
        let t = Instant::now();
        f()?;
        samples.push(t.elapsed().as_secs_f64() * 1e3);
        BenchResult::Ok(())
    };
    while sa.len() < min_reps || (start.elapsed() < budget && sa.len() < 200) {
        sp.push(probe.run());
        // Whoever runs right after the probe evicts its dirty lines (up to a few ms of
        // write-back for a small case): each peer goes first in every other round.
        if sa.len() % 2 == 0 {
            timed(&mut a, &mut sa)?;
            timed(&mut b, &mut sb)?;
        } else {
            timed(&mut b, &mut sb)?;
            timed(&mut a, &mut sa)?;
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok((median(sa), median(sb), probe.gbs(median(sp))))
}

/// The memory bandwidth probe: a multithreaded 3-stream add (a = b + c) over 64 MiB arrays.
struct Probe {
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
}

impl Probe {
    fn new() -> Self {
        let n = 64 << 20 >> 2;
        Probe {
            a: vec![0.0; n],
            b: vec![1.0; n],
            c: vec![2.0; n],
        }
    }

    /// One add; its wall time in ms.
    fn run(&mut self) -> f64 {
        let t = Instant::now();
        self.a
            .par_chunks_mut(1 << 16)
            .zip(self.b.par_chunks(1 << 16))
            .zip(self.c.par_chunks(1 << 16))
            .for_each(|((a, b), c)| {
                for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
                    *a = b + c;
                }
            });
        black_box(&self.a);
        t.elapsed().as_secs_f64() * 1e3
    }

    /// GB/s of bytes read and written by an add that took `ms`.
    fn gbs(&self, ms: f64) -> f64 {
        3.0 * (self.a.len() * 4) as f64 / (ms * 1e-3) / 1e9
    }
}

/// The machine's memory bandwidth (GB/s), from the probe's median time.
fn memory_bandwidth(quick: bool, probe: &mut Probe) -> BenchResult<f64> {
    let ms = time(quick, || {
        probe.run();
        Ok(())
    })?;
    Ok(probe.gbs(ms))
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
            .collect()
    }
}

/// The same data as a dynn and a candle tensor.
fn pair(rng: &mut Rng, shape: &[usize]) -> BenchResult<(Tensor, CTensor)> {
    let v = rng.vec(shape.iter().product());
    Ok((
        Tensor::from_vec(v.clone(), shape, Device::Cpu)?,
        CTensor::from_vec(v, shape, &CDevice::Cpu)?,
    ))
}

/// What a case's throughput is measured in.
enum Work {
    Bytes(f64),
    Flops(f64),
}

struct Case {
    name: String,
    dynn_ms: f64,
    candle_ms: f64,
    /// The probe's bandwidth, sampled between this case's runs.
    bw_gbs: f64,
    work: Work,
}

fn main() -> BenchResult<()> {
    // Kernels run partly on this thread (see `init_threads`).
    dynn::init_threads();
    let args: Vec<String> = std::env::args().collect();
    let json = args.iter().any(|a| a == "--json");
    let quick = args.iter().any(|a| a == "--quick");
    let half = args.iter().any(|a| a == "--half");
    let filter = args
        .iter()
        .position(|a| a == "--filter")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let want = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    let mut rng = Rng(7);
    let mut cases: Vec<Case> = Vec::new();
    let mut probe = Probe::new();
    let mem_bw = memory_bandwidth(quick, &mut probe)?;
    let threads = rayon::current_num_threads();

    macro_rules! case {
        ($name:expr, $work:expr, $dynn:expr, $candle:expr) => {
            let name: String = $name.into();
            if want(&name) {
                let (dynn_ms, candle_ms, bw_gbs) = time_pair(
                    quick,
                    &mut probe,
                    || {
                        black_box($dynn);
                        Ok(())
                    },
                    || {
                        black_box($candle);
                        Ok(())
                    },
                )?;
                eprintln!("{name:<34} dynn {dynn_ms:>9.3} ms   candle {candle_ms:>9.3} ms   speedup {:.2}", candle_ms / dynn_ms);
                cases.push(Case { name, dynn_ms, candle_ms, bw_gbs, work: $work });
            }
        };
    }

    for n in [512usize, 1024, 2048] {
        let (a, ca) = pair(&mut rng, &[n, n])?;
        let (b, cb) = pair(&mut rng, &[n, n])?;
        case!(
            format!("matmul_f32_{n}"),
            Work::Flops(2.0 * (n * n * n) as f64),
            a.matmul(&b)?,
            ca.matmul(&cb)?
        );
    }
    {
        let (a, ca) = pair(&mut rng, &[32, 128, 64])?;
        let (b, cb) = pair(&mut rng, &[32, 64, 128])?;
        case!(
            "bmm_32x128x64x128",
            Work::Flops(2.0 * 32.0 * 128.0 * 64.0 * 128.0),
            a.matmul(&b)?,
            ca.matmul(&cb)?
        );
    }
    let (x, cx) = pair(&mut rng, &[4096, 1024])?;
    let bytes_rw = 2.0 * 4096.0 * 1024.0 * 4.0;
    case!(
        "softmax_4096x1024",
        Work::Bytes(bytes_rw),
        x.softmax(-1)?,
        candle_nn::ops::softmax_last_dim(&cx)?
    );
    {
        let (w, cw) = pair(&mut rng, &[1024])?;
        let (b, cb) = pair(&mut rng, &[1024])?;
        case!(
            "layer_norm_4096x1024",
            Work::Bytes(bytes_rw),
            x.layer_norm(Some(&w), Some(&b), 1e-5)?,
            candle_nn::ops::layer_norm(&cx, &cw, &cb, 1e-5)?
        );
        case!(
            "broadcast_add_4096x1024+1024",
            Work::Bytes(bytes_rw + 4096.0),
            x.add(&b)?,
            cx.broadcast_add(&cb)?
        );
    }
    case!(
        "transpose_copy_4096x1024",
        Work::Bytes(bytes_rw),
        x.t()?.contiguous()?,
        cx.t()?.contiguous()?
    );
    case!(
        "sum_last_dim_4096x1024",
        Work::Bytes(4096.0 * 1024.0 * 4.0 + 4096.0 * 4.0),
        x.sum_dims(&[-1], false)?,
        cx.sum(CD::Minus1)?
    );
    case!(
        "gelu_4096x1024",
        Work::Bytes(bytes_rw),
        x.gelu()?,
        cx.gelu()?
    );
    case!(
        "gelu_erf_4096x1024",
        Work::Bytes(bytes_rw),
        x.gelu_erf()?,
        cx.gelu_erf()?
    );
    {
        // Forward, the sum's backward (a broadcast of ones) and gelu's backward: x read
        // twice, y written and read, dx written. The gradient is cleared before each call,
        // as candle's backward returns a fresh one: accumulating into the last call's
        // gradient would add a pass (read both, write the sum) that candle does not make.
        let xg = x.affine(1.0, 0.0)?.set_requires_grad(true);
        let vx = Var::from_tensor(&cx)?;
        case!(
            "gelu_fwd_bwd_4096x1024",
            Work::Bytes(5.0 * 4096.0 * 1024.0 * 4.0),
            {
                xg.zero_grad();
                xg.gelu()?.sum_all()?.backward()?;
                xg.grad()
            },
            vx.as_tensor().gelu()?.sum_all()?.backward()?
        );
    }
    {
        // A dense layer with a bias: dynn's one-kernel `linear` against candle-nn's way
        // (`Linear::forward` is a matmul, then a broadcast add).
        let (x, cx) = pair(&mut rng, &[2048, 1024])?;
        let (w, cw) = pair(&mut rng, &[1024, 1024])?;
        let (b, cb) = pair(&mut rng, &[1024])?;
        case!(
            "linear_2048x1024x1024+bias",
            Work::Flops(2.0 * 2048.0 * 1024.0 * 1024.0),
            x.linear(&w, &b)?,
            cx.matmul(&cw)?.broadcast_add(&cb)?
        );
    }
    {
        let (table, ctable) = pair(&mut rng, &[50_000, 512])?;
        let ids: Vec<u32> = (0..8192).map(|_| (rng.next() % 50_000) as u32).collect();
        let dids = Tensor::from_vec(ids.clone(), 8192, Device::Cpu)?;
        let cids = CTensor::from_vec(ids, 8192, &CDevice::Cpu)?;
        case!(
            "embedding_50000x512_8192ids",
            Work::Bytes(2.0 * 8192.0 * 512.0 * 4.0),
            table.embedding(&dids)?,
            ctable.embedding(&cids)?
        );
    }
    {
        let (logits, clogits) = pair(&mut rng, &[2048, 8192])?;
        let t: Vec<u32> = (0..2048).map(|_| (rng.next() % 8192) as u32).collect();
        let dt = Tensor::from_vec(t.clone(), 2048, Device::Cpu)?;
        let ct = CTensor::from_vec(t, 2048, &CDevice::Cpu)?;
        case!(
            "cross_entropy_2048x8192",
            Work::Bytes(2048.0 * 8192.0 * 4.0),
            logits.cross_entropy(&dt, Default::default())?,
            candle_nn::loss::cross_entropy(&clogits, &ct)?
        );
    }
    {
        let (x, cx) = pair(&mut rng, &[256, 1024])?;
        let (w1, cw1) = pair(&mut rng, &[1024, 4096])?;
        let (w2, cw2) = pair(&mut rng, &[4096, 1024])?;
        let (w1, w2) = (
            w1.affine(0.03, 0.0)?.set_requires_grad(true),
            w2.affine(0.015, 0.0)?.set_requires_grad(true),
        );
        let (vw1, vw2) = (
            Var::from_tensor(&(cw1 * 0.03)?)?,
            Var::from_tensor(&(cw2 * 0.015)?)?,
        );
        let flops = 3.0 * 2.0 * 2.0 * 256.0 * 1024.0 * 4096.0;
        case!(
            "mlp_1024x4096x1024_b256_fwd_bwd",
            Work::Flops(flops),
            {
                let loss = x.matmul(&w1)?.relu()?.matmul(&w2)?.sqr()?.mean_all()?;
                loss.backward()?;
                (w1.grad(), w2.grad())
            },
            {
                let loss = cx
                    .matmul(vw1.as_tensor())?
                    .relu()?
                    .matmul(vw2.as_tensor())?
                    .sqr()?
                    .mean_all()?;
                loss.backward()?
            }
        );
    }

    if half {
        let (a, ca) = pair(&mut rng, &[4096, 1024])?;
        let (b, cb) = pair(&mut rng, &[1024])?;
        for (dt, cdt, tag) in [
            (DType::F16, candle_core::DType::F16, "f16"),
            (DType::BF16, candle_core::DType::BF16, "bf16"),
        ] {
            let (a, ca) = (a.to_dtype(dt)?, ca.to_dtype(cdt)?);
            let (b, cb) = (b.to_dtype(dt)?, cb.to_dtype(cdt)?);
            // Elements of two bytes: an op reads and writes 8 MiB per (4096, 1024) tensor.
            let mib8 = 4096.0 * 1024.0 * 2.0;
            case!(
                format!("broadcast_add_{tag}_4096x1024+1024"),
                Work::Bytes(2.0 * mib8),
                a.add(&b)?,
                ca.broadcast_add(&cb)?
            );
            case!(
                format!("gelu_{tag}_4096x1024"),
                Work::Bytes(2.0 * mib8),
                a.gelu()?,
                ca.gelu()?
            );
            case!(
                format!("softmax_{tag}_4096x1024"),
                Work::Bytes(2.0 * mib8),
                a.softmax(1)?,
                candle_nn::ops::softmax_last_dim(&ca)?
            );
            case!(
                format!("sum_last_dim_{tag}_4096x1024"),
                Work::Bytes(mib8),
                a.sum_dims(&[-1], false)?,
                ca.sum(CD::Minus1)?
            );
        }
    }

    println!(
        "machine: {threads} threads, memory bandwidth {mem_bw:.1} GB/s (3-stream add, 64 MiB arrays)"
    );
    println!(
        "{:<34} {:>10} {:>10} {:>8} {:>14} {:>16}",
        "case", "dynn ms", "candle ms", "speedup", "dynn rate", "of bw alongside"
    );
    let mut log_sum = 0.0;
    let mut rows = Vec::new();
    for c in &cases {
        let speedup = c.candle_ms / c.dynn_ms;
        log_sum += speedup.ln();
        let (rate, key, unit) = match c.work {
            Work::Bytes(b) => (b / (c.dynn_ms * 1e-3) / 1e9, "dynn_gbs", "GB/s"),
            Work::Flops(f) => (f / (c.dynn_ms * 1e-3) / 1e9, "dynn_gflops", "GFLOP/s"),
        };
        // A memory-bound case against the bandwidth measured between its own runs.
        let share = matches!(c.work, Work::Bytes(_)).then(|| rate / c.bw_gbs);
        println!(
            "{:<34} {:>10.3} {:>10.3} {:>8.2} {:>8.1} {unit} {:>10}",
            c.name,
            c.dynn_ms,
            c.candle_ms,
            speedup,
            rate,
            share.map_or(String::new(), |s| format!(
                "{:.0}% of {:.1}",
                100.0 * s,
                c.bw_gbs
            ))
        );
        rows.push(format!(
            "{{\"name\":\"{}\",\"dynn_ms\":{:.4},\"candle_ms\":{:.4},\"speedup\":{:.3},\"{key}\":{:.2},\"mem_bw_gbs\":{:.2}}}",
            c.name, c.dynn_ms, c.candle_ms, speedup, rate, c.bw_gbs
        ));
    }
    let geomean = (log_sum / cases.len().max(1) as f64).exp();
    println!("geomean speedup over candle: {geomean:.2}");
    if json {
        println!(
            "{{\"mem_bw_gbs\":{mem_bw:.2},\"threads\":{threads},\"cases\":[{}],\"geomean_speedup\":{geomean:.3}}}",
            rows.join(",")
        );
    }
    Ok(())
}
