//! The transfer engine: a thread that moves buffers between the device and the host tier and
//! reports each completion. Copies are exact, so where a buffer lives never changes a result.
//! Optionally throttled to a link bandwidth, and (for fault tests) delayed at random.

use crossbeam_channel::{Receiver, Sender, unbounded};
use dynn_core::{Buffer, BufferId, Result};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Which way a transfer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Host tier → device.
    ToDevice,
    /// Device → host tier.
    ToHost,
    /// Device → host tier, keeping the device copy ([`dynn_core::Buffer::write_back`]): a
    /// later eviction moves nothing unless an op writes the buffer first.
    WriteBack,
}

/// A background write-back copies buffers of at most `budget / WRITE_BACK_SHARE` bytes: a
/// larger one would hold the download side for long when an eviction that cannot wait
/// arrives.
pub const WRITE_BACK_SHARE: usize = 16;

/// Evicting ahead of need ([`crate::ManagerConfig::evict_ahead`]) starts when less than
/// `budget / EVICT_AHEAD_SHARE` bytes are free, and writes back the victims that would make
/// that much room. (8 against 16 in the simulator: the MoE at 25% under the pilot ran 1.025
/// against 1.038 of its unlimited step.)
pub const EVICT_AHEAD_SHARE: usize = 8;

/// Ops for which the ranking made to evict ahead is walked again (skipping what was used,
/// moved or pinned since) instead of asking the policy anew. Ranking after every op tripled
/// the pilot's rankings (`overhead moe_full 20 25%`: 420 → 1,264; its critical-path share 4.5
/// → 5.1–5.7%); every 4 ops: ~790 and 4.4–4.5%. Every 8 ops cost the early exit's largest
/// batch under the pilot (20 → 16) and the transformer's (32 → 24) in the simulator.
pub const AHEAD_RANKING_OPS: u64 = 4;

/// Whether a buffer of `bytes` may be written back in the background under `budget`.
pub fn write_back_fits(bytes: usize, budget: usize) -> bool {
    bytes > 0 && bytes <= budget / WRITE_BACK_SHARE
}

/// A finished transfer.
#[derive(Debug)]
pub struct Completion {
    /// The buffer moved.
    pub id: BufferId,
    /// Which way.
    pub dir: Direction,
    /// Bytes copied (0 when the buffer was already there or had been released).
    pub bytes: usize,
    /// Time the copy took.
    pub elapsed: Duration,
    /// The copy's outcome.
    pub result: Result<()>,
}

/// Engine settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct TransferConfig {
    /// Throttle copies to this many bytes per second (`None`: as fast as memory allows).
    pub link_bytes_per_sec: Option<f64>,
    /// Fault injection: delay each copy by a pseudo-random 0..=max microseconds (seeded).
    pub random_delay_us: Option<(u64, u64)>,
}

struct Request {
    buffer: std::sync::Weak<Buffer>,
    id: BufferId,
    dir: Direction,
}

/// Handle to the transfer thread.
pub struct TransferEngine {
    requests: Option<Sender<Request>>,
    completions: Receiver<Completion>,
    thread: Option<JoinHandle<()>>,
}

impl TransferEngine {
    /// Starts the transfer thread.
    pub fn start(config: TransferConfig) -> Self {
        let (req_tx, req_rx) = unbounded::<Request>();
        let (done_tx, done_rx) = unbounded::<Completion>();
        let thread = std::thread::Builder::new()
            .name("dynn-transfer".into())
            .spawn(move || run(config, req_rx, done_tx))
            .ok();
        TransferEngine {
            requests: Some(req_tx),
            completions: done_rx,
            thread,
        }
    }

    /// Queues a move of `buffer` in direction `dir`. Holds only a weak handle: a buffer
    /// released meanwhile completes with 0 bytes.
    pub fn submit(&self, buffer: &Arc<Buffer>, dir: Direction) -> bool {
        let req = Request {
            buffer: Arc::downgrade(buffer),
            id: buffer.id(),
            dir,
        };
        match (&self.requests, &self.thread) {
            (Some(tx), Some(_)) => tx.send(req).is_ok(),
            _ => false,
        }
    }

    /// Completions that have arrived, without waiting.
    pub fn poll(&self) -> Vec<Completion> {
        self.completions.try_iter().collect()
    }

    /// Waits for the next completion (`None` when the thread is gone).
    pub fn wait(&self) -> Option<Completion> {
        self.completions.recv().ok()
    }
}

impl Drop for TransferEngine {
    fn drop(&mut self) {
        self.requests.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(config: TransferConfig, requests: Receiver<Request>, done: Sender<Completion>) {
    let mut rng = config.random_delay_us.map(|(seed, _)| seed).unwrap_or(0);
    for req in requests {
        let start = Instant::now();
        if let Some((_, max)) = config.random_delay_us {
            rng = rng
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            std::thread::sleep(Duration::from_micros((rng >> 33) % (max + 1)));
        }
        let (bytes, result) = match req.buffer.upgrade() {
            None => (0, Ok(())),
            Some(buf) => match req.dir {
                Direction::ToHost => match buf.offload() {
                    Ok(b) => (b, Ok(())),
                    Err(e) => (0, Err(e)),
                },
                Direction::ToDevice => match buf.fetch() {
                    Ok(b) => (b, Ok(())),
                    Err(e) => (0, Err(e)),
                },
                Direction::WriteBack => match buf.write_back() {
                    Ok(b) => (b, Ok(())),
                    Err(e) => (0, Err(e)),
                },
            },
        };
        if let Some(bw) = config.link_bytes_per_sec {
            let target = Duration::from_secs_f64(bytes as f64 / bw);
            if let Some(rest) = target.checked_sub(start.elapsed()) {
                std::thread::sleep(rest);
            }
        }
        if done
            .send(Completion {
                id: req.id,
                dir: req.dir,
                bytes,
                elapsed: start.elapsed(),
                result,
            })
            .is_err()
        {
            break;
        }
    }
}
