//! Online training: a background thread receives finished steps' op records over a crossbeam
//! channel, labels them, trains (then keeps fine-tuning) the pilot with dynn's autograd, and
//! publishes each new snapshot into a [`SnapshotCell`] the policy swaps in between decisions.
//!
//! The thread has no memory hooks installed (hooks are per thread), so its own ops never go
//! through the memory manager it serves.

use crate::labels::{LabelConfig, label_trace};
use crate::model::{ModelConfig, Trainer};
use crate::predictor::Snapshot;
use crossbeam_channel::{Receiver, Sender, unbounded};
use dynn_core::{Error, Result};
use dynn_mm::trace::Access;
use dynn_mm::{Announced, OpRecord, StepRecord, Trace};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// The latest snapshot, swapped whole: readers take an `Arc` clone and never block the
/// trainer for longer than that clone.
#[derive(Debug, Default)]
pub struct SnapshotCell {
    slot: Mutex<Option<Arc<Snapshot>>>,
    version: AtomicU64,
    error: Mutex<Option<String>>,
}

impl SnapshotCell {
    /// An empty cell.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Publishes a new snapshot (readers see it at their next check).
    pub fn publish(&self, s: Snapshot) {
        *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(s));
        self.version.fetch_add(1, Ordering::Release);
    }

    /// How many snapshots were published (a cheap check before [`SnapshotCell::get`]).
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The latest snapshot.
    pub fn get(&self) -> Option<Arc<Snapshot>> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The last training error, if training failed (the policy keeps its fallback then).
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn fail(&self, e: &Error) {
        *self.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
    }
}

/// When and how the background trainer trains.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OnlineConfig {
    /// Steps recorded before the first training.
    pub warmup_steps: usize,
    /// After that, retrain on a fresh pair of steps every this many steps (0: never).
    pub retrain_every: u64,
    /// Recorded steps kept for training (the oldest are dropped).
    pub keep_steps: usize,
    /// Epochs of the first training.
    pub epochs_first: usize,
    /// Epochs of each later fine-tuning.
    pub epochs_more: usize,
    /// Labelling.
    pub labels: LabelConfig,
    /// The network.
    pub model: ModelConfig,
}

impl Default for OnlineConfig {
    fn default() -> Self {
        OnlineConfig {
            warmup_steps: 3,
            retrain_every: 8,
            keep_steps: 8,
            epochs_first: 8,
            epochs_more: 2,
            labels: LabelConfig::default(),
            model: ModelConfig::default(),
        }
    }
}

impl OnlineConfig {
    /// Whether the policy should record step `step` (the `n`-th step it has seen) for the
    /// trainer: every warm-up step, then two consecutive steps every `retrain_every`.
    pub fn records(&self, n: u64) -> bool {
        n < self.warmup_steps as u64 || (self.retrain_every > 0 && n % self.retrain_every < 2)
    }
}

/// One step's ops as the policy records them for the trainer, kept flat: recording an op
/// copies its fixed fields and appends its buffers to one shared list, with no allocation per
/// op on the executor's thread; the trainer's thread rebuilds the records
/// ([`StepRecording::into_records`]).
#[derive(Debug, Default)]
pub struct StepRecording {
    /// The records, their `inputs` and `outputs` left empty.
    ops: Vec<OpRecord>,
    /// How many inputs and outputs each record has, in `accesses`.
    arity: Vec<(u32, u32)>,
    /// Every record's inputs then outputs, record after record.
    accesses: Vec<Access>,
}

impl StepRecording {
    /// An empty recording with room for `ops` ops (the length of the step before, say).
    pub fn with_capacity(ops: usize) -> Self {
        StepRecording {
            ops: Vec::with_capacity(ops),
            arity: Vec::with_capacity(ops),
            accesses: Vec::with_capacity(ops * 3),
        }
    }

    /// Records op `op`, with what was announced before it (see [`Announced::attach_to`]).
    pub fn push(&mut self, op: &OpRecord, announced: &mut Announced) {
        let mut rec = OpRecord {
            t: op.t.clone(),
            seq: op.seq,
            step: op.step,
            index: op.index,
            phase: op.phase,
            op: op.op.clone(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            idioms: op.idioms,
            flops: op.flops,
            bytes_read: op.bytes_read,
            bytes_written: op.bytes_written,
            freed: op.freed.clone(),
            plan: op.plan.clone(),
            plan_source: op.plan_source.clone(),
            plan_reads: op.plan_reads.clone(),
        };
        announced.attach_to(&mut rec);
        self.ops.push(rec);
        self.arity
            .push((op.inputs.len() as u32, op.outputs.len() as u32));
        self.accesses.extend_from_slice(&op.inputs);
        self.accesses.extend_from_slice(&op.outputs);
    }

    /// Ops recorded.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether no op was recorded.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The records, each with its inputs and outputs again.
    pub fn into_records(self) -> Vec<OpRecord> {
        let mut at = 0;
        let mut ops = self.ops;
        for (op, &(i, o)) in ops.iter_mut().zip(&self.arity) {
            let (i, o) = (i as usize, o as usize);
            let bufs = self.accesses.get(at..at + i + o).unwrap_or_default();
            let (inputs, outputs) = bufs.split_at(i.min(bufs.len()));
            op.inputs = inputs.to_vec();
            op.outputs = outputs.to_vec();
            at += i + o;
        }
        ops
    }
}

enum Msg {
    Step(StepRecording),
    Flush(Sender<()>),
}

/// The background trainer.
pub struct OnlineTrainer {
    tx: Sender<Msg>,
    cell: Arc<SnapshotCell>,
    _handle: JoinHandle<()>,
}

impl std::fmt::Debug for OnlineTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnlineTrainer")
            .field("version", &self.cell.version())
            .finish()
    }
}

impl OnlineTrainer {
    /// Starts the trainer thread, publishing into `cell`; it fine-tunes `start` when given
    /// (its features must be `cfg.labels.features`), else trains a fresh network.
    pub fn spawn(
        cfg: OnlineConfig,
        cell: Arc<SnapshotCell>,
        start: Option<Snapshot>,
    ) -> Result<Self> {
        let (tx, rx) = unbounded();
        let out = cell.clone();
        let handle = std::thread::Builder::new()
            .name("dynn-pilot-trainer".into())
            .spawn(move || in_background(|| run(rx, cfg, out, start)))
            .map_err(|e| Error::Msg(format!("cannot start the pilot trainer: {e}")))?;
        Ok(OnlineTrainer {
            tx,
            cell,
            _handle: handle,
        })
    }

    /// Hands over one finished step's op records (never blocks).
    pub fn send_step(&self, ops: StepRecording) {
        let _ = self.tx.send(Msg::Step(ops));
    }

    /// Waits until every step sent so far has been processed (trained on, when due).
    pub fn flush(&self) {
        let (ack, done) = unbounded();
        if self.tx.send(Msg::Flush(ack)).is_ok() {
            let _ = done.recv();
        }
    }

    /// Where the snapshots appear.
    pub fn cell(&self) -> &Arc<SnapshotCell> {
        &self.cell
    }
}

/// A trace of recorded steps; only steps whose successor was recorded too get a step record
/// (the successor tells which buffers live on and when they are used again).
fn trace_of(steps: &VecDeque<Vec<OpRecord>>) -> Trace {
    let mut t = Trace::default();
    let numbers: Vec<Option<u64>> = steps.iter().map(|s| s.first().map(|o| o.step)).collect();
    for (i, s) in steps.iter().enumerate() {
        if let (Some(Some(n)), Some(Some(next))) = (numbers.get(i), numbers.get(i + 1))
            && *next == n + 1
        {
            t.steps.push(StepRecord {
                t: "step".into(),
                step: *n,
                ops: s.len() as u32,
                signature: 0,
            });
        }
        t.ops.extend(s.iter().cloned());
    }
    t
}

/// Runs `work` at the lowest CPU priority, its kernels on one thread of their own: training
/// runs beside the step it serves and must not take the step's cores.
fn in_background(work: impl FnOnce() + Send) {
    lower_priority();
    match rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .thread_name(|_| "dynn-pilot-kernels".into())
        .start_handler(|_| lower_priority())
        .build()
    {
        Ok(pool) => pool.install(work),
        Err(e) => {
            tracing::warn!(
                "pilot trainer: no thread pool of its own ({e}); sharing the global one"
            );
            work()
        }
    }
}

/// Lowers the calling thread's scheduling priority to the least (nice 19), where the platform
/// allows it.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: `setpriority` reads only its integer arguments; on Linux, `who = 0` with
    // PRIO_PROCESS names the calling thread.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
    }
}

fn run(rx: Receiver<Msg>, cfg: OnlineConfig, cell: Arc<SnapshotCell>, start: Option<Snapshot>) {
    let mut steps: VecDeque<Vec<OpRecord>> = VecDeque::new();
    // Trainer objects hold dynn tensors, which stay on this thread: built here.
    let mut trainer: Option<Trainer> = match start.map(|s| Trainer::from_snapshot(&s, cfg.model)) {
        Some(Ok(t)) => Some(t),
        Some(Err(e)) => {
            cell.fail(&e);
            None
        }
        None => None,
    };
    let mut fresh = 0usize;
    for msg in rx {
        match msg {
            Msg::Flush(ack) => {
                let _ = ack.send(());
            }
            Msg::Step(ops) => {
                if ops.is_empty() {
                    continue;
                }
                steps.push_back(ops.into_records());
                while steps.len() > cfg.keep_steps.max(2) {
                    steps.pop_front();
                }
                fresh += 1;
                let due = match trainer {
                    None => steps.len() >= cfg.warmup_steps.max(2),
                    Some(_) => cfg.retrain_every > 0 && fresh >= 2,
                };
                if !due {
                    continue;
                }
                let trace = trace_of(&steps);
                let ds = label_trace(&trace, &cfg.labels);
                if ds.is_empty() {
                    continue;
                }
                let result = (|| -> Result<Snapshot> {
                    let epochs = if trainer.is_some() {
                        cfg.epochs_more
                    } else {
                        cfg.epochs_first
                    };
                    let t = match &mut trainer {
                        Some(t) => t,
                        None => trainer.insert(Trainer::new(cfg.labels.features, cfg.model)?),
                    };
                    t.fit(&ds, epochs)?;
                    t.snapshot()
                })();
                match result {
                    Ok(s) => cell.publish(s),
                    Err(e) => cell.fail(&e),
                }
                fresh = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(index: u32, inputs: &[Access], outputs: &[Access]) -> OpRecord {
        OpRecord {
            t: "op".into(),
            seq: 7 + index as u64,
            step: 3,
            index,
            phase: (index % 3) as u8,
            op: "mul".into(),
            inputs: inputs.to_vec(),
            outputs: outputs.to_vec(),
            idioms: [0, 0, 0, 0, 1, index as u8],
            flops: 10 * index as u64,
            bytes_read: 20,
            bytes_written: 30,
            freed: vec![index as u64],
            ..OpRecord::default()
        }
    }

    #[test]
    fn a_recording_gives_back_the_records_with_their_announcements() {
        let ops = [
            record(0, &[(1, 8, 0, 1), (2, 16, 3, 2)], &[(3, 4, 3, 1 << 63)]),
            record(1, &[], &[(4, 8, 4, (1 << 63) + 1)]),
            record(2, &[(3, 4, 3, 1 << 63)], &[]),
        ];
        let mut announced = Announced::default();
        let mut rec = StepRecording::with_capacity(2);
        rec.push(&ops[0], &mut announced);
        announced.plan("backward", &[vec![3, 1], vec![2]]);
        announced.read(1, 4);
        rec.push(&ops[1], &mut announced);
        rec.push(&ops[2], &mut announced);
        assert_eq!(rec.len(), 3);
        let back = rec.into_records();
        let mut want = ops.to_vec();
        want[1].plan = vec![vec![3, 1], vec![2]];
        want[1].plan_source = "backward".into();
        want[1].plan_reads = vec![(1, 4)];
        assert_eq!(back, want);
    }
}
