//! Hand-made and synthetic traces.

use dynn_mm::{OpRecord, StepRecord, Trace};

/// A buffer access `(id, bytes, kind, key)`.
pub type A = (u64, u64, u8, u64);

/// A persistent buffer (a parameter): its key is its id.
pub fn param(id: u64) -> A {
    (id, 4096, 0, id)
}

/// A buffer made in the current step: key `2^63 + n`.
pub fn act(id: u64, n: u64) -> A {
    (id, 1024, 3, (1 << 63) + n)
}

/// One op record.
pub fn op(step: u64, index: u32, phase: u8, name: &str, inputs: &[A], outputs: &[A]) -> OpRecord {
    let idioms = dynn_ops::op_table()
        .iter()
        .find(|o| o.name == name)
        .map_or([0; 6], |o| o.idioms.0);
    OpRecord {
        t: "op".into(),
        seq: 0,
        step,
        index,
        phase,
        op: name.to_string().into(),
        inputs: inputs.to_vec(),
        outputs: outputs.to_vec(),
        idioms,
        flops: 1000,
        bytes_read: inputs.iter().map(|a| a.1).sum(),
        bytes_written: outputs.iter().map(|a| a.1).sum(),
        freed: Vec::new(),
        plan: Vec::new(),
        plan_source: String::new(),
        plan_reads: Vec::new(),
    }
}

/// A trace of `steps`, numbering ops and adding step records.
pub fn trace(steps: Vec<Vec<OpRecord>>) -> Trace {
    let mut t = Trace::default();
    let mut seq = 0;
    for (s, ops) in steps.into_iter().enumerate() {
        let n = ops.len() as u32;
        for (i, mut o) in ops.into_iter().enumerate() {
            o.seq = seq;
            o.step = s as u64;
            o.index = i as u32;
            seq += 1;
            t.ops.push(o);
        }
        t.steps.push(StepRecord {
            t: "step".into(),
            step: s as u64,
            ops: n,
            signature: s as u64,
        });
    }
    t
}

/// A synthetic dynamic network: `layers` parameters; each step runs a data-dependent depth
/// (1..=layers) of matmul + relu, a loss, the mirrored backward and an optimizer update of
/// the parameters it used. Activation ids are fresh every step.
pub fn synthetic(steps: usize, layers: usize, seed: u64) -> Trace {
    let mut rng = dynn_models::Rng::new(seed);
    let mut next_id = 1000u64;
    let mut all = Vec::new();
    for _ in 0..steps {
        let depth = rng.range(1, layers + 1);
        let mut ops = Vec::new();
        let mut n = 0u64;
        let mut fresh = |next_id: &mut u64| {
            *next_id += 1;
            n += 1;
            act(*next_id, n)
        };
        let x = fresh(&mut next_id);
        let mut saved = vec![x];
        let mut h = x;
        for l in 0..depth {
            let z = fresh(&mut next_id);
            ops.push(op(0, 0, 0, "matmul", &[h, param(l as u64 + 1)], &[z]));
            let y = fresh(&mut next_id);
            ops.push(op(0, 0, 0, "relu", &[z], &[y]));
            saved.push(z);
            saved.push(y);
            h = y;
        }
        let loss = fresh(&mut next_id);
        ops.push(op(0, 0, 0, "sum", &[h], &[loss]));
        let mut g = fresh(&mut next_id);
        ops.push(op(0, 0, 1, "sum_backward", &[loss], &[g]));
        for l in (0..depth).rev() {
            let z = saved[2 * l + 1];
            let gz = fresh(&mut next_id);
            ops.push(op(0, 0, 1, "relu_backward", &[g, z], &[gz]));
            let gw = (1 << 40) + l as u64;
            ops.push(op(
                0,
                0,
                1,
                "matmul",
                &[saved[2 * l], gz],
                &[(gw, 4096, 1, gw)],
            ));
            let gh = fresh(&mut next_id);
            ops.push(op(0, 0, 1, "matmul", &[gz, param(l as u64 + 1)], &[gh]));
            g = gh;
        }
        for l in 0..depth {
            let p = param(l as u64 + 1);
            let gw = (1 << 40) + l as u64;
            ops.push(op(0, 0, 2, "adam_step", &[p, (gw, 4096, 1, gw)], &[p]));
        }
        all.push(ops);
    }
    trace(all)
}
