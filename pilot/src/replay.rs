//! Replaying observed ops into the tracker: on the executor's thread, or on a thread of its
//! own ([`crate::PilotConfig::replay_thread`]), so that the executor mostly only queues them.
//!
//! With a thread, the tracker and the batches handed to it share one lock, which the thread
//! holds while it replays a batch. A decision that needs the tracker current (a ranking, a
//! plan, the step boundary) takes the lock — waiting at most for the batch being replayed —
//! and replays whatever the thread has not started itself, in order: it never waits for the
//! thread to be scheduled. Handing a batch over only tries the lock; while the thread holds
//! it, the ops stay queued for the next hand-off.

use crate::encoder::OpView;
use crate::tracker::Tracker;
use dynn_mm::OpRecord;
use dynn_mm::trace::Access;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::Instant;

/// What was observed but not yet replayed into the tracker, in order, kept flat: queueing an
/// op appends to two vectors, which stay small and warm (no allocation per op).
#[derive(Debug, Default)]
pub(crate) struct Backlog {
    /// The pending ops as the encoder reads them.
    views: Vec<OpView>,
    /// Their buffers, op after op: inputs, then outputs.
    accesses: Vec<Access>,
    /// Pending events, in order: an op (`None`: the next pending view) or a plan read
    /// `(group, id)`.
    events: Vec<Option<(usize, u64)>>,
}

impl Backlog {
    /// Queues op `op`.
    pub(crate) fn push(&mut self, op: &OpRecord) {
        self.views.push(OpView::of_record(op));
        self.accesses.extend_from_slice(&op.inputs);
        self.accesses.extend_from_slice(&op.outputs);
        self.events.push(None);
    }

    /// Queues a plan read: buffer `id` will be read by the plan's group `group`.
    pub(crate) fn push_plan_read(&mut self, group: usize, id: u64) {
        self.events.push(Some((group, id)));
    }

    /// Ops queued.
    pub(crate) fn ops(&self) -> usize {
        self.views.len()
    }

    /// Replays everything queued into `tracker`, in order, and empties the queue (keeping its
    /// allocations).
    fn replay_into(&mut self, tracker: &mut Tracker) {
        let mut ops = queued_ops(&self.views, &self.accesses);
        tracker.prefetch_ops(ops.clone().map(|(v, bufs)| (v.phase, bufs)));
        for e in self.events.drain(..) {
            match e {
                Some((group, id)) => tracker.plan_read(group, id),
                None => {
                    let Some((v, bufs)) = ops.next() else { break };
                    if bufs.len() == v.inputs + v.outputs {
                        let (inputs, outputs) = bufs.split_at(v.inputs);
                        tracker.observe_view(v, inputs, outputs);
                    }
                }
            }
        }
        drop(ops);
        self.views.clear();
        self.accesses.clear();
    }
}

/// The queued ops, each with its buffers (inputs, then outputs): each view was queued with
/// them, in order.
fn queued_ops<'a>(
    views: &'a [OpView],
    accesses: &'a [Access],
) -> impl Iterator<Item = (&'a OpView, &'a [Access])> + Clone {
    views.iter().scan(0, move |at, v| {
        let n = v.inputs + v.outputs;
        let bufs = accesses.get(*at..*at + n).unwrap_or_default();
        *at += n;
        Some((v, bufs))
    })
}

/// What the executor and the replay thread share, behind one lock.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The tracker.
    pub(crate) tracker: Tracker,
    /// Batches handed over and not yet replayed, oldest first.
    pending: VecDeque<Backlog>,
    /// Replayed batches, emptied, for reuse.
    free: Vec<Backlog>,
    /// Nanoseconds the replay thread spent replaying.
    busy_ns: u64,
    /// Set when the replay thread is to stop.
    stop: bool,
    /// Set while the replay thread waits for work (only then does a hand-off wake it).
    idle: bool,
}

/// The lock, the replay thread's wake-up, and what is read without the lock.
pub(crate) struct Cell {
    shared: Mutex<Shared>,
    wake: Condvar,
    /// Batches replayed so far (by either thread), written under the lock.
    replayed: AtomicU64,
    /// Set while the executor waits for the lock: the replay thread then lets it in between
    /// two batches rather than taking the lock straight back.
    wanted: AtomicBool,
}

impl Cell {
    /// Replays every pending batch in `shared` (this cell's, locked), oldest first.
    fn drain(&self, shared: &mut Shared) {
        while let Some(mut b) = shared.pending.pop_front() {
            b.replay_into(&mut shared.tracker);
            shared.free.push(b);
            self.replayed.fetch_add(1, Ordering::Release);
        }
    }
}

/// Locks the shared state. A replay thread that panicked mid-batch leaves a tracker that
/// missed some ops: its predictions are then worse, never the results, so the lock is taken
/// anyway.
pub(crate) fn lock(cell: &Cell) -> MutexGuard<'_, Shared> {
    cell.shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// The shared state if the lock is free now (`None`: the replay thread holds it).
pub(crate) fn try_lock(cell: &Cell) -> Option<MutexGuard<'_, Shared>> {
    match cell.shared.try_lock() {
        Ok(g) => Some(g),
        Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

/// The tracker and where the queued ops are replayed into it.
pub(crate) struct Replayer {
    cell: Arc<Cell>,
    /// Ops observed since the last hand-off.
    queued: Backlog,
    /// Batches handed over.
    sent: u64,
    thread: Option<JoinHandle<()>>,
}

impl Replayer {
    /// Replays into `tracker` on a thread of its own when `thread` is set (and the system
    /// gives one), else on the caller's.
    pub(crate) fn new(tracker: Tracker, thread: bool) -> Self {
        let cell = Arc::new(Cell {
            shared: Mutex::new(Shared {
                tracker,
                pending: VecDeque::new(),
                free: Vec::new(),
                busy_ns: 0,
                stop: false,
                idle: false,
            }),
            wake: Condvar::new(),
            replayed: AtomicU64::new(0),
            wanted: AtomicBool::new(false),
        });
        let thread = thread.then(|| spawn(cell.clone())).flatten();
        Replayer {
            cell,
            queued: Backlog::default(),
            sent: 0,
            thread,
        }
    }

    /// The ops and plan reads not yet handed over.
    pub(crate) fn queued(&mut self) -> &mut Backlog {
        &mut self.queued
    }

    /// Whether a replay thread runs.
    pub(crate) fn threaded(&self) -> bool {
        self.thread.is_some()
    }

    /// Hands what is queued over: to the replay thread when its lock is free (else it stays
    /// queued for the next hand-off); without a thread, replays it now.
    pub(crate) fn hand_off(&mut self) {
        if self.queued.events.is_empty() {
            return;
        }
        if self.thread.is_none() {
            self.queued.replay_into(&mut lock(&self.cell).tracker);
            self.sent += 1;
            self.cell.replayed.fetch_add(1, Ordering::Release);
            return;
        }
        let Some(mut shared) = try_lock(&self.cell) else {
            return;
        };
        let fresh = shared.free.pop().unwrap_or_default();
        let batch = std::mem::replace(&mut self.queued, fresh);
        shared.pending.push_back(batch);
        self.sent += 1;
        if shared.idle {
            self.cell.wake.notify_one();
        }
    }

    /// Batches replayed so far; every hand-off counts one (read without the lock).
    pub(crate) fn replayed(&self) -> u64 {
        self.cell.replayed.load(Ordering::Acquire)
    }

    /// Replays every op observed so far: takes the lock (the replay thread lets it in after
    /// the batch it is on), replays what it has not started, then what is still queued here.
    /// True when anything was replayed on the caller's thread.
    pub(crate) fn catch_up(&mut self) -> bool {
        if self.queued.events.is_empty() && self.replayed() >= self.sent {
            return false;
        }
        if self.thread.as_ref().is_some_and(|h| h.is_finished()) {
            // It stopped (a panic): from here on everything is replayed here.
            self.thread = None;
        }
        self.cell.wanted.store(true, Ordering::Release);
        let mut shared = lock(&self.cell);
        self.cell.wanted.store(false, Ordering::Release);
        let here = !shared.pending.is_empty() || !self.queued.events.is_empty();
        self.cell.drain(&mut shared);
        self.queued.replay_into(&mut shared.tracker);
        here
    }

    /// The shared state, locked, as it is (its tracker lags the ops observed unless
    /// [`Replayer::catch_up`] ran since).
    pub(crate) fn shared(&self) -> MutexGuard<'_, Shared> {
        lock(&self.cell)
    }

    /// The lock, to hold while the replayer itself is borrowed otherwise.
    pub(crate) fn cell(&self) -> Arc<Cell> {
        self.cell.clone()
    }

    /// Nanoseconds the replay thread spent replaying batches (its waits for the lock and for
    /// a core are not counted).
    pub(crate) fn background_ns(&self) -> u64 {
        lock(&self.cell).busy_ns
    }
}

/// Starts the replay thread (`None` when the system refuses a thread).
fn spawn(cell: Arc<Cell>) -> Option<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("dynn-pilot-replay".into())
        .spawn(move || {
            let mut shared = lock(&cell);
            loop {
                match shared.pending.pop_front() {
                    Some(mut b) => {
                        let t = Instant::now();
                        b.replay_into(&mut shared.tracker);
                        shared.busy_ns += t.elapsed().as_nanos() as u64;
                        shared.free.push(b);
                        cell.replayed.fetch_add(1, Ordering::Release);
                        // Between batches, let a waiting executor in first.
                        drop(shared);
                        while cell.wanted.load(Ordering::Acquire) {
                            std::thread::yield_now();
                        }
                        shared = lock(&cell);
                    }
                    None if shared.stop => return,
                    None => {
                        shared.idle = true;
                        shared = cell.wake.wait(shared).unwrap_or_else(|e| e.into_inner());
                        shared.idle = false;
                    }
                }
            }
        })
        .ok()
}

impl Drop for Replayer {
    fn drop(&mut self) {
        if let Some(h) = self.thread.take() {
            lock(&self.cell).stop = true;
            self.cell.wake.notify_one();
            let _ = h.join();
        }
    }
}

/// The pilot's tracker, locked ([`crate::PilotPolicy::tracker`]): the replay thread waits
/// while it is held.
pub struct TrackerGuard<'a>(pub(crate) MutexGuard<'a, Shared>);

impl std::ops::Deref for TrackerGuard<'_> {
    type Target = Tracker;
    fn deref(&self) -> &Tracker {
        &self.0.tracker
    }
}
