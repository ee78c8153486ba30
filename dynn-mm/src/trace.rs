//! Access traces: every op event of a run, in order, in a versioned, documented file format.
//!
//! ## Format (`dynn-trace`, version 1)
//! JSON lines. Line 1 is the header `{"format":"dynn-trace","version":1,"meta":{...}}`.
//! Then one line per op (an [`OpRecord`]) or step boundary (a [`StepRecord`], tagged
//! `"t":"step"`). The last line is the footer `{"t":"end","ops":N,"steps":M}`; a file
//! without it, or whose counts disagree, is truncated. Buffer accesses are arrays
//! `[id, bytes, kind, key]`: `kind` is 0 parameter, 1 gradient, 2 optimizer state,
//! 3 activation, 4 temporary; `key` names the buffer across steps (its id when it existed
//! before the step began, else `2^63 + its creation index in the step`). An op line may carry
//! `"freed":[id,...]`, the buffers released after it, and `"plan":[[id,...],...]`, the reads
//! announced just before it (the backward pass's tape, the optimizer's parameters) with
//! `"plan_source"`, who announced them, and
//! `"plan_reads":[[group,id],...]`, buffers made since that the plan's groups will read; all
//! are absent when empty and in older files.

use dynn_core::{BufferKind, Error, Phase, Result};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::io::{BufRead, Write};

/// The format version this build reads and writes.
pub const TRACE_VERSION: u32 = 1;
const FORMAT: &str = "dynn-trace";

/// One buffer access: `(id, bytes, kind code, stable key)`.
pub type Access = (u64, u64, u8, u64);

/// One op as recorded.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OpRecord {
    /// Record tag (`"op"`). Borrowed when the memory manager makes the record, so an op
    /// costs no allocation for it.
    pub t: Cow<'static, str>,
    /// Process-wide op sequence number.
    pub seq: u64,
    /// Training step.
    pub step: u64,
    /// Position of the op within its step.
    pub index: u32,
    /// 0 forward, 1 backward, 2 optimizer.
    pub phase: u8,
    /// Op name (borrowed from the op when the memory manager makes the record).
    pub op: Cow<'static, str>,
    /// Buffers read, in argument order.
    pub inputs: Vec<Access>,
    /// Buffers written.
    pub outputs: Vec<Access>,
    /// The op's six idiom counts.
    pub idioms: [u8; 6],
    /// Floating-point operations.
    pub flops: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Buffers released (their last tensor dropped) after this op and before the next: when
    /// a trace has these, the simulator frees buffers when the run did, not at last access.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub freed: Vec<u64>,
    /// Reads announced just before this op (the backward pass's tape, the optimizer's
    /// parameters; see `dynn_core::announce_plan`): buffer ids, one group per planned unit
    /// of work, in the order the units run. Empty on most ops and in older files.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plan: Vec<Vec<u64>>,
    /// Who announced `plan` ("backward", "adam", "clip_grad_norm", ...).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub plan_source: String,
    /// Buffers made since the last plan that its groups will read, `(group, id)`, announced
    /// just before this op (where the backward pass sends each gradient it makes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plan_reads: Vec<(u32, u64)>,
}

/// What was announced since the last op (see [`OpRecord::plan`]), kept for that op's record
/// by whoever records ops: the memory manager, the pilot's own recording.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Announced {
    plan: Vec<Vec<u64>>,
    source: String,
    reads: Vec<(u32, u64)>,
}

impl Announced {
    /// A plan of `groups` by `source` was announced; it replaces one not yet recorded.
    pub fn plan(&mut self, source: &str, groups: &[Vec<u64>]) {
        self.plan = groups.to_vec();
        self.source.clear();
        self.source.push_str(source);
    }

    /// Buffer `id` will be read by the plan's group `group`.
    pub fn read(&mut self, group: usize, id: u64) {
        self.reads.push((group as u32, id));
    }

    /// Moves what was announced onto `op`'s record, unless the record carries its own (one
    /// replayed from a trace, whose announcements these are); either way they are used up.
    pub fn attach_to(&mut self, op: &mut OpRecord) {
        let announced = std::mem::take(self);
        if op.plan.is_empty() && op.plan_reads.is_empty() {
            op.plan = announced.plan;
            op.plan_source = announced.source;
            op.plan_reads = announced.reads;
        }
    }
}

impl OpRecord {
    /// Tells `policy` what was announced before this op ran (its plan, then the plan's new
    /// reads), as the memory manager did during the run.
    pub fn announce_to(&self, policy: &mut dyn crate::Policy) {
        if !self.plan.is_empty() {
            policy.plan(&self.plan_source, &self.plan);
        }
        for &(group, id) in &self.plan_reads {
            policy.plan_read(group as usize, id);
        }
    }
}

/// A step boundary: the step that ended, its op count and graph signature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Record tag (`"step"`).
    pub t: String,
    /// The step that ended.
    pub step: u64,
    /// Ops in the step.
    pub ops: u32,
    /// FNV-1a hash of the step's op names and output sizes: equal for equal graphs.
    pub signature: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    format: String,
    version: u32,
    meta: serde_json::Value,
}

#[derive(Debug, Serialize, Deserialize)]
struct Footer {
    t: String,
    ops: u64,
    steps: u64,
}

/// A whole trace in memory.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Trace {
    /// Free-form metadata (model, budget, policy...).
    pub meta: serde_json::Value,
    /// Every op, in order.
    pub ops: Vec<OpRecord>,
    /// Every step boundary, in order.
    pub steps: Vec<StepRecord>,
}

/// Phase ↔ code.
pub fn phase_code(p: Phase) -> u8 {
    match p {
        Phase::Forward => 0,
        Phase::Backward => 1,
        Phase::Optimizer => 2,
    }
}

/// Code → phase.
pub fn phase_of(code: u8) -> Phase {
    match code {
        1 => Phase::Backward,
        2 => Phase::Optimizer,
        _ => Phase::Forward,
    }
}

/// Kind → code.
pub fn kind_code(k: BufferKind) -> u8 {
    k as u8
}

/// Code → kind.
pub fn kind_of(code: u8) -> BufferKind {
    BufferKind::ALL
        .get(code as usize)
        .copied()
        .unwrap_or(BufferKind::Temporary)
}

/// FNV-1a over bytes, continuing from `h`.
pub fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The FNV-1a offset basis.
pub const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

impl Trace {
    /// Writes the trace in the documented format.
    pub fn write_to(&self, mut w: impl Write) -> Result<()> {
        let js = |e: serde_json::Error| Error::Msg(format!("trace: {e}"));
        writeln!(
            w,
            "{}",
            serde_json::to_string(&Header {
                format: FORMAT.into(),
                version: TRACE_VERSION,
                meta: self.meta.clone()
            })
            .map_err(js)?
        )?;
        // Interleave steps after their last op so the file reads in time order.
        let mut steps = self.steps.iter().peekable();
        for op in &self.ops {
            while let Some(s) = steps.peek() {
                if s.step < op.step {
                    writeln!(w, "{}", serde_json::to_string(s).map_err(js)?)?;
                    steps.next();
                } else {
                    break;
                }
            }
            writeln!(w, "{}", serde_json::to_string(op).map_err(js)?)?;
        }
        for s in steps {
            writeln!(w, "{}", serde_json::to_string(s).map_err(js)?)?;
        }
        let footer = Footer {
            t: "end".into(),
            ops: self.ops.len() as u64,
            steps: self.steps.len() as u64,
        };
        writeln!(w, "{}", serde_json::to_string(&footer).map_err(js)?)?;
        Ok(())
    }

    /// Saves to a file.
    pub fn save(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        let f = std::fs::File::create(path.as_ref())?;
        let mut w = std::io::BufWriter::new(f);
        self.write_to(&mut w)?;
        w.flush()?;
        Ok(())
    }

    /// Reads and validates a trace: another format or version, a corrupt record, or a
    /// missing/disagreeing footer (truncation) is a clear error naming the line.
    pub fn read_from(r: impl BufRead, what: &str) -> Result<Trace> {
        let bad = |line: usize, msg: String| {
            Error::invalid("trace", format!("{what}, line {line}: {msg}"))
        };
        let mut lines = r.lines().enumerate();
        let (_, first) = lines.next().ok_or_else(|| bad(1, "empty file".into()))?;
        let header: Header = serde_json::from_str(&first?)
            .map_err(|e| bad(1, format!("not a dynn trace header ({e})")))?;
        if header.format != FORMAT {
            return Err(bad(
                1,
                format!("format {:?}, expected {FORMAT:?}", header.format),
            ));
        }
        if header.version != TRACE_VERSION {
            return Err(bad(
                1,
                format!(
                    "trace version {} but this dynn reads version {TRACE_VERSION}",
                    header.version
                ),
            ));
        }
        let mut trace = Trace {
            meta: header.meta,
            ..Default::default()
        };
        let mut footer = None;
        for (i, line) in lines {
            let line = line?;
            let n = i + 1;
            if footer.is_some() {
                return Err(bad(n, "data after the end record".into()));
            }
            let v: serde_json::Value =
                serde_json::from_str(&line).map_err(|e| bad(n, format!("corrupt record ({e})")))?;
            match v.get("t").and_then(|t| t.as_str()) {
                Some("op") => trace.ops.push(
                    serde_json::from_value(v)
                        .map_err(|e| bad(n, format!("corrupt op record ({e})")))?,
                ),
                Some("step") => trace.steps.push(
                    serde_json::from_value(v)
                        .map_err(|e| bad(n, format!("corrupt step record ({e})")))?,
                ),
                Some("end") => {
                    footer = Some(
                        serde_json::from_value::<Footer>(v)
                            .map_err(|e| bad(n, format!("corrupt end record ({e})")))?,
                    )
                }
                other => return Err(bad(n, format!("unknown record type {other:?}"))),
            }
        }
        let footer = footer.ok_or_else(|| {
            bad(
                0,
                format!("truncated: no end record after {} ops", trace.ops.len()),
            )
        })?;
        if footer.ops != trace.ops.len() as u64 || footer.steps != trace.steps.len() as u64 {
            return Err(bad(
                0,
                format!(
                    "truncated or corrupt: end record says {} ops / {} steps, file has {} / {}",
                    footer.ops,
                    footer.steps,
                    trace.ops.len(),
                    trace.steps.len()
                ),
            ));
        }
        Ok(trace)
    }

    /// Loads a trace file.
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Trace> {
        let p = path.as_ref();
        let f = std::fs::File::open(p)
            .map_err(|e| Error::invalid("trace", format!("cannot open {}: {e}", p.display())))?;
        Self::read_from(std::io::BufReader::new(f), &p.display().to_string())
    }

    /// The ops of training step `step`, in order.
    pub fn step_ops(&self, step: u64) -> Vec<OpRecord> {
        self.ops
            .iter()
            .filter(|o| o.step == step)
            .cloned()
            .collect()
    }

    /// Distinct graph signatures over the trace's steps.
    pub fn distinct_graphs(&self) -> usize {
        let mut s: Vec<u64> = self.steps.iter().map(|s| s.signature).collect();
        s.sort_unstable();
        s.dedup();
        s.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Trace {
        let op = |seq, step, index| OpRecord {
            t: "op".into(),
            seq,
            step,
            index,
            phase: 0,
            op: "matmul".into(),
            inputs: vec![(1, 64, 0, 1), (2, 32, 3, 2)],
            outputs: vec![(3, 16, 3, 1 << 63)],
            idioms: [0, 0, 0, 1, 1, 0],
            flops: 100,
            bytes_read: 96,
            bytes_written: 16,
            freed: if seq == 1 { vec![3] } else { Vec::new() },
            plan: if seq == 2 {
                vec![vec![3, 1], vec![2]]
            } else {
                Vec::new()
            },
            plan_source: if seq == 2 {
                "backward".into()
            } else {
                String::new()
            },
            plan_reads: if seq == 1 { vec![(1, 3)] } else { Vec::new() },
        };
        Trace {
            meta: serde_json::json!({"model": "test"}),
            ops: vec![op(0, 0, 0), op(1, 0, 1), op(2, 1, 0)],
            steps: vec![
                StepRecord {
                    t: "step".into(),
                    step: 0,
                    ops: 2,
                    signature: 7,
                },
                StepRecord {
                    t: "step".into(),
                    step: 1,
                    ops: 1,
                    signature: 9,
                },
            ],
        }
    }

    fn text(t: &Trace) -> String {
        let mut v = Vec::new();
        t.write_to(&mut v).unwrap();
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn roundtrip() {
        let t = sample();
        let back = Trace::read_from(text(&t).as_bytes(), "mem").unwrap();
        assert_eq!(back, t);
        assert_eq!(back.distinct_graphs(), 2);
    }

    #[test]
    fn truncated_version_and_corrupt_files_are_rejected() {
        let s = text(&sample());
        let cut: String = s.lines().take(3).map(|l| format!("{l}\n")).collect();
        let e = Trace::read_from(cut.as_bytes(), "cut")
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
        let v2 = s.replacen("\"version\":1", "\"version\":2", 1);
        let e = Trace::read_from(v2.as_bytes(), "v2")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("version 2") && e.contains("reads version 1"),
            "{e}"
        );
        let corrupt = s.replacen("\"op\":\"matmul\"", "\"op\":17", 1);
        let e = Trace::read_from(corrupt.as_bytes(), "bad")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("corrupt"), "{e}");
    }
}
