//! [`EventPool`]: CUDA events recycled for ordering copies against kernels. A copy records an
//! event and another stream waits on it; creating and destroying one per copy would double
//! the driver calls on the memory manager's path.

use cudarc::driver::{CudaContext, CudaEvent, CudaStream, DriverError};
use std::sync::{Arc, Mutex};

/// Free events of one context.
#[derive(Debug)]
pub struct EventPool {
    ctx: Arc<CudaContext>,
    free: Mutex<Vec<CudaEvent>>,
}

impl EventPool {
    /// An empty pool on `ctx`.
    pub fn new(ctx: Arc<CudaContext>) -> Arc<Self> {
        Arc::new(EventPool {
            ctx,
            free: Mutex::new(Vec::new()),
        })
    }

    /// An event recording the work queued so far on `stream`.
    pub fn record(&self, stream: &CudaStream) -> Result<CudaEvent, DriverError> {
        let free = self.free.lock().ok().and_then(|mut f| f.pop());
        let event = match free {
            Some(e) => e,
            None => self.ctx.new_event(None)?,
        };
        event.record(stream)?;
        Ok(event)
    }

    /// An event after the copy just queued on `stream`. If none can be recorded, waits on the
    /// host for the stream's work before returning the error, so that nothing the copy still
    /// uses (its memory, a pinned block) moves on unordered.
    pub fn mark_copy(&self, stream: &CudaStream) -> Result<CudaEvent, DriverError> {
        self.record(stream).inspect_err(|_| {
            let _ = stream.synchronize();
        })
    }

    /// Takes `event` back for reuse. Waits already queued on it are unaffected by a later
    /// record; nothing may wait on it or query it after this.
    pub fn recycle(&self, event: CudaEvent) {
        if let Ok(mut free) = self.free.lock() {
            free.push(event);
        }
    }

    /// Makes `waiter` wait for the work queued so far on `after` (no host wait).
    pub fn join(&self, waiter: &CudaStream, after: &CudaStream) -> Result<(), DriverError> {
        let event = self.record(after)?;
        let waited = waiter.wait(&event);
        self.recycle(event);
        waited
    }
}
