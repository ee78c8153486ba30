//! Per-thread execution context: installed memory hooks, the current phase, grad mode.

use crate::{MemoryHooks, Phase};
use std::cell::{Cell, RefCell};
use std::sync::Arc;

thread_local! {
    static HOOKS: RefCell<Option<Arc<dyn MemoryHooks>>> = const { RefCell::new(None) };
    static PHASE: Cell<Phase> = const { Cell::new(Phase::Forward) };
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
    static OP_SEQ: Cell<u64> = const { Cell::new(0) };
}

/// Installs memory hooks for ops run on this thread; returns the ones they replace.
pub fn set_memory_hooks(hooks: Option<Arc<dyn MemoryHooks>>) -> Option<Arc<dyn MemoryHooks>> {
    HOOKS.with(|h| std::mem::replace(&mut *h.borrow_mut(), hooks))
}

/// The memory hooks installed on this thread, if any.
pub fn memory_hooks() -> Option<Arc<dyn MemoryHooks>> {
    HOOKS.with(|h| h.borrow().clone())
}

/// Installs hooks until the guard is dropped, then restores the previous ones.
pub fn install_memory_hooks(hooks: Arc<dyn MemoryHooks>) -> HooksGuard {
    HooksGuard {
        previous: set_memory_hooks(Some(hooks)),
    }
}

/// Restores the previously installed hooks on drop.
#[must_use = "the hooks are uninstalled when the guard is dropped"]
pub struct HooksGuard {
    previous: Option<Arc<dyn MemoryHooks>>,
}

impl Drop for HooksGuard {
    fn drop(&mut self) {
        if let Some(gone) = set_memory_hooks(self.previous.take()) {
            gone.uninstalled();
        }
    }
}

/// The phase ops on this thread are attributed to.
pub fn phase() -> Phase {
    PHASE.with(|p| p.get())
}

/// Sets the phase until the guard is dropped.
pub fn enter_phase(phase: Phase) -> PhaseGuard {
    PhaseGuard {
        previous: PHASE.with(|p| p.replace(phase)),
    }
}

/// Restores the previous phase on drop.
#[must_use = "the phase is restored when the guard is dropped"]
pub struct PhaseGuard {
    previous: Phase,
}

impl Drop for PhaseGuard {
    fn drop(&mut self) {
        PHASE.with(|p| p.set(self.previous));
    }
}

/// True when ops on this thread record the tape.
pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

/// Disables tape recording until the guard is dropped (like `torch.no_grad()`).
pub fn no_grad() -> NoGradGuard {
    NoGradGuard {
        previous: GRAD_ENABLED.with(|g| g.replace(false)),
    }
}

/// Restores the previous grad mode on drop.
#[must_use = "grad mode is restored when the guard is dropped"]
pub struct NoGradGuard {
    previous: bool,
}

impl Drop for NoGradGuard {
    fn drop(&mut self) {
        GRAD_ENABLED.with(|g| g.set(self.previous));
    }
}

/// The next op sequence number on this thread.
pub(crate) fn next_op_seq() -> u64 {
    OP_SEQ.with(|s| {
        let v = s.get();
        s.set(v + 1);
        v
    })
}

/// Tells the installed hooks that a training step ended and step `step` begins.
pub fn mark_step(step: u64) {
    if let Some(h) = memory_hooks() {
        h.step_boundary(step);
    }
}

/// Tells the installed hooks which buffers the coming ops will read, in order: one group per
/// unit of work, announced by `source` (see [`MemoryHooks::plan`]). Nothing happens without
/// hooks; groups are built only when some are installed.
pub fn announce_plan(source: &'static str, groups: impl FnOnce() -> Vec<Vec<crate::BufferId>>) {
    if let Some(h) = memory_hooks() {
        h.plan(source, &groups());
    }
}
