//! The executor's memory-hook seam as a memory manager sees it: every op reports the buffers
//! it reads (in argument order) and writes, before and after its kernel, in the forward and the
//! backward phase; backward runs the tape in reverse; every buffer an op reads was announced
//! earlier. Also: offloading a buffer to the host tier and fetching it back keeps its values,
//! and a hook that fetches on demand makes training over offloaded buffers give the same bits.

use dynn_core::{
    Buffer, BufferId, BufferKind, MemoryHooks, OpEvent, Phase, Residency, install_memory_hooks,
};
use dynn_ops::prelude::*;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// One op event as recorded.
#[derive(Debug, Clone, PartialEq)]
struct Ev {
    seq: u64,
    op: &'static str,
    phase: Phase,
    inputs: Vec<u64>,
    outputs: Vec<u64>,
    output_kinds: Vec<BufferKind>,
    /// Residency of each output when the event was seen.
    output_residency: Vec<Residency>,
}

#[derive(Debug, Clone)]
enum Entry {
    Before(Ev),
    After(Ev),
    Created(u64),
    Plan(Vec<Vec<u64>>),
}

/// Records everything the executor reports; optionally fetches offloaded inputs on demand.
#[derive(Default)]
struct Recorder {
    log: Mutex<Vec<Entry>>,
    fetch_on_demand: bool,
    fetched: Mutex<Vec<u64>>,
}

fn ev(e: &OpEvent<'_>) -> Ev {
    Ev {
        seq: e.seq,
        op: e.op,
        phase: e.phase,
        inputs: e.inputs.iter().map(|b| b.id().0).collect(),
        outputs: e.outputs.iter().map(|b| b.id().0).collect(),
        output_kinds: e.outputs.iter().map(|b| b.kind()).collect(),
        output_residency: e.outputs.iter().map(|b| b.residency()).collect(),
    }
}

impl MemoryHooks for Recorder {
    fn before_op(&self, e: &OpEvent<'_>) -> Result<()> {
        if self.fetch_on_demand {
            for b in e.inputs {
                if b.residency() == Residency::Host {
                    b.fetch()?;
                    self.fetched.lock().unwrap().push(b.id().0);
                }
            }
        }
        self.log.lock().unwrap().push(Entry::Before(ev(e)));
        Ok(())
    }
    fn after_op(&self, e: &OpEvent<'_>) -> Result<()> {
        self.log.lock().unwrap().push(Entry::After(ev(e)));
        Ok(())
    }
    fn buffer_created(&self, b: &Arc<Buffer>) {
        self.log.lock().unwrap().push(Entry::Created(b.id().0));
    }
    fn plan(&self, _source: &'static str, groups: &[Vec<BufferId>]) {
        let groups = groups
            .iter()
            .map(|g| g.iter().map(|b| b.0).collect())
            .collect();
        self.log.lock().unwrap().push(Entry::Plan(groups));
    }
}

impl Recorder {
    /// The op events (one per op, from `after_op`), checking that each `before_op` came right
    /// before its `after_op` with the same content (apart from output residency).
    fn events(&self) -> Vec<Ev> {
        let log = self.log.lock().unwrap();
        let mut out = Vec::new();
        let mut open: Option<Ev> = None;
        for e in log.iter() {
            match e {
                Entry::Before(b) => {
                    assert!(
                        open.is_none(),
                        "before_op of {} while {:?} is running",
                        b.op,
                        open
                    );
                    assert!(
                        b.output_residency
                            .iter()
                            .all(|&r| r == Residency::Unmaterialized),
                        "{b:?}: outputs exist before the kernel"
                    );
                    open = Some(b.clone());
                }
                Entry::After(a) => {
                    let b = open
                        .take()
                        .unwrap_or_else(|| panic!("after_op of {} without before_op", a.op));
                    assert_eq!(
                        (b.seq, b.op, b.phase, &b.inputs, &b.outputs),
                        (a.seq, a.op, a.phase, &a.inputs, &a.outputs)
                    );
                    assert!(
                        a.output_residency.iter().all(|&r| r == Residency::Device),
                        "{a:?}: outputs not materialized after the kernel"
                    );
                    out.push(a.clone());
                }
                Entry::Created(_) | Entry::Plan(_) => {}
            }
        }
        assert!(open.is_none(), "an op never finished: {open:?}");
        out
    }

    /// Each announced plan with the number of op events finished before it.
    fn plans(&self) -> Vec<(usize, Vec<Vec<u64>>)> {
        let mut done = 0;
        let mut out = Vec::new();
        for e in self.log.lock().unwrap().iter() {
            match e {
                Entry::After(_) => done += 1,
                Entry::Plan(p) => out.push((done, p.clone())),
                _ => {}
            }
        }
        out
    }

    /// Buffer ids announced through `buffer_created`.
    fn created(&self) -> HashSet<u64> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| {
                if let Entry::Created(id) = e {
                    Some(*id)
                } else {
                    None
                }
            })
            .collect()
    }
}

fn id(t: &Tensor) -> u64 {
    t.buffer().id().0
}

fn leaf(v: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, Device::Cpu)
        .unwrap()
        .set_requires_grad(true)
}

#[test]
fn op_events_report_buffers_phases_and_reverse_tape_order() -> Result<()> {
    let rec = Arc::new(Recorder::default());
    let _g = install_memory_hooks(rec.clone());
    let x = leaf(&[0.5, -1.0, 2.0, 0.25, 1.5, -0.75], &[2, 3]);
    let w = leaf(&[1.0, 2.0, -3.0], &[3]);

    // Forward: every op's inputs are the buffers of its arguments, in order (views share their
    // input's buffer), and its output is the returned tensor's buffer.
    let a = x.exp()?;
    let b = a.sin()?;
    let xt = x.t()?.t()?; // a view of x: no event, same buffer
    let c = b.mul(&w)?; // broadcast
    let d = c.add(&xt)?;
    let l = d.sum_all()?;
    let fwd = rec.events();
    let expect: Vec<(&str, Vec<u64>, u64)> = vec![
        ("exp", vec![id(&x)], id(&a)),
        ("sin", vec![id(&a)], id(&b)),
        ("mul", vec![id(&b), id(&w)], id(&c)),
        ("add", vec![id(&c), id(&x)], id(&d)),
        ("sum", vec![id(&d)], id(&l)),
    ];
    assert_eq!(fwd.len(), expect.len(), "{fwd:#?}");
    for (e, (op, ins, out)) in fwd.iter().zip(&expect) {
        assert_eq!((e.op, &e.inputs, &e.outputs), (*op, ins, &vec![*out]));
        assert_eq!(e.phase, Phase::Forward);
        assert_eq!(e.output_kinds, vec![BufferKind::Activation]);
    }
    assert_eq!(id(&xt), id(&x));
    let created = rec.created();
    assert!(
        created.contains(&id(&x)) && created.contains(&id(&w)),
        "leaves announced through buffer_created"
    );

    l.backward()?;
    let all = rec.events();
    let bwd = &all[fwd.len()..];
    assert!(!bwd.is_empty());
    // Sequence numbers increase by one per op, forward then backward.
    for pair in all.windows(2) {
        assert_eq!(
            pair[1].seq,
            pair[0].seq + 1,
            "{:?} then {:?}",
            pair[0].op,
            pair[1].op
        );
    }
    assert!(bwd.iter().all(|e| e.phase == Phase::Backward), "{bwd:#?}");
    assert!(
        bwd.iter()
            .all(|e| e.output_kinds.iter().all(|&k| k == BufferKind::Gradient)),
        "{bwd:#?}"
    );

    // Backward walks the tape in reverse: each forward op's backward kernels come after those of
    // every later forward op. mul's backward is the first (two products and a sum over the
    // broadcast dim for w), then sin's, then exp's.
    let pos = |name: &str| {
        bwd.iter()
            .position(|e| e.op == name)
            .unwrap_or_else(|| panic!("no {name} in {bwd:#?}"))
    };
    let (p_mul, p_sin, p_exp) = (pos("mul"), pos("sin_backward"), pos("exp_backward"));
    assert!(
        p_mul < p_sin && p_sin < p_exp,
        "backward order {:?}",
        bwd.iter().map(|e| e.op).collect::<Vec<_>>()
    );
    // sin_backward reads the saved input (a) and the gradient computed by mul's backward;
    // exp_backward reads the saved output (a again) and sin_backward's output.
    let (sb, eb) = (&bwd[p_sin], &bwd[p_exp]);
    assert_eq!(sb.inputs[0], id(&a));
    assert!(
        bwd[..p_sin]
            .iter()
            .any(|e| e.outputs.contains(&sb.inputs[1]))
    );
    assert_eq!(eb.inputs, vec![id(&a), sb.outputs[0]]);

    // The leaves' gradients are outputs of backward-phase events.
    let gx = x.grad().expect("x.grad");
    let gw = w.grad().expect("w.grad");
    for g in [&gx, &gw] {
        assert!(
            bwd.iter().any(|e| e.outputs.contains(&id(g))),
            "gradient buffer {} is no backward output",
            id(g)
        );
        assert_eq!(g.buffer().kind(), BufferKind::Gradient);
    }

    // Every buffer an op reads was announced before: created outside ops, or an earlier output.
    let log = rec.log.lock().unwrap().clone();
    let mut known: HashSet<u64> = HashSet::new();
    for e in &log {
        match e {
            Entry::Created(i) => {
                known.insert(*i);
            }
            Entry::Before(ev) => {
                for i in &ev.inputs {
                    assert!(
                        known.contains(i),
                        "{} (seq {}) reads buffer {i}, never announced",
                        ev.op,
                        ev.seq
                    );
                }
            }
            Entry::After(ev) => known.extend(ev.outputs.iter().copied()),
            Entry::Plan(_) => {}
        }
    }

    // And the gradients are right: d/dx = cos(e^x) e^x w + 1, d/dw = Σ_rows sin(e^x).
    let (xv, wv) = (x.to_vec::<f64>()?, w.to_vec::<f64>()?);
    let gxv = gx.to_vec::<f64>()?;
    let gwv = gw.to_vec::<f64>()?;
    for i in 0..6 {
        let want = xv[i].exp().cos() * xv[i].exp() * wv[i % 3] + 1.0;
        assert!(
            (gxv[i] - want).abs() < 1e-12,
            "dx[{i}] {} vs {want}",
            gxv[i]
        );
    }
    for j in 0..3 {
        let want = xv[j].exp().sin() + xv[j + 3].exp().sin();
        assert!(
            (gwv[j] - want).abs() < 1e-12,
            "dw[{j}] {} vs {want}",
            gwv[j]
        );
    }
    Ok(())
}

#[test]
fn a_repeated_argument_is_reported_twice() -> Result<()> {
    let rec = Arc::new(Recorder::default());
    let _g = install_memory_hooks(rec.clone());
    let x = Tensor::ones(4, DType::F32, Device::Cpu)?;
    let y = x.mul(&x)?;
    let evs = rec.events();
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].inputs, vec![id(&x), id(&x)]);
    assert_eq!(evs[0].outputs, vec![id(&y)]);
    Ok(())
}

#[test]
fn hooks_are_per_thread_and_restored_by_the_guard() -> Result<()> {
    let rec = Arc::new(Recorder::default());
    let x = Tensor::ones(4, DType::F32, Device::Cpu)?;
    {
        let _g = install_memory_hooks(rec.clone());
        x.exp()?;
        // Another thread has no hooks installed.
        std::thread::spawn(move || x.sqrt().map(|_| ()))
            .join()
            .unwrap()?;
    }
    Tensor::ones(4, DType::F32, Device::Cpu)?.exp()?;
    let ops: Vec<&str> = rec.events().iter().map(|e| e.op).collect();
    assert_eq!(ops, vec!["exp"]);
    Ok(())
}

#[test]
fn offload_and_fetch_keep_values_and_views_wait_for_the_fetch() -> Result<()> {
    let x = Tensor::from_vec(
        (0..12).map(|i| i as f32 * 0.5 - 2.0).collect::<Vec<_>>(),
        (3, 4),
        Device::Cpu,
    )?;
    let before = x.to_vec::<f32>()?;
    let exp_before = x.exp()?.to_vec::<f32>()?;
    let v = x.narrow(1, 1, 2)?.t()?;
    let v_before = v.to_vec::<f32>()?;

    assert_eq!(x.buffer().offload()?, 48);
    assert_eq!(x.buffer().offload()?, 0, "a second offload moves nothing");
    assert_eq!(x.buffer().residency(), Residency::Host);
    // Host-tier bytes can be read, but no kernel runs on them: the view errors too.
    assert_eq!(x.to_vec::<f32>()?, before);
    let e = v.contiguous().unwrap_err();
    assert!(
        matches!(
            e,
            Error::NotResident {
                residency: Residency::Host,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(x.narrow(0, 0, 1)?.exp().is_err());

    assert_eq!(x.buffer().fetch()?, 48);
    assert_eq!(x.buffer().fetch()?, 0);
    assert_eq!(x.buffer().residency(), Residency::Device);
    assert_eq!(x.to_vec::<f32>()?, before);
    assert_eq!(v.contiguous()?.to_vec::<f32>()?, v_before);
    assert_eq!(
        x.exp()?.to_vec::<f32>()?,
        exp_before,
        "same bits after a round trip"
    );
    Ok(())
}

/// One forward/backward, optionally offloading every buffer the tape saved before backward.
fn step(offload: bool, rec: Option<Arc<Recorder>>) -> Result<(Vec<u32>, Vec<u32>, f32)> {
    let _g = rec
        .clone()
        .map(|r| install_memory_hooks(r as Arc<dyn MemoryHooks>));
    let x = Tensor::from_vec(
        (0..12).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>(),
        (3, 4),
        Device::Cpu,
    )?
    .set_requires_grad(true);
    let w =
        Tensor::from_vec(vec![0.5f32, -1.5, 2.0, 0.25], 4, Device::Cpu)?.set_requires_grad(true);
    let h = x.mul(&w)?.tanh()?;
    let s = h.sigmoid()?.mul(&x)?;
    let loss = s.sum_all()?;
    if offload {
        for t in [&x, &w, &h, &s] {
            t.buffer().offload()?;
        }
    }
    loss.backward()?;
    let bits = |t: Tensor| {
        t.to_vec::<f32>()
            .map(|v| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>())
    };
    Ok((
        bits(x.grad().unwrap())?,
        bits(w.grad().unwrap())?,
        loss.to_scalar::<f32>()?,
    ))
}

#[test]
fn fetching_on_demand_gives_the_same_bits_as_never_offloading() -> Result<()> {
    let reference = step(false, None)?;
    // Without a memory manager, backward over offloaded buffers fails cleanly.
    let e = step(true, None).unwrap_err();
    assert!(matches!(e, Error::NotResident { .. }), "{e:?}");
    // With one that fetches what an op is about to read, it matches bit for bit.
    let rec = Arc::new(Recorder {
        fetch_on_demand: true,
        ..Default::default()
    });
    assert_eq!(step(true, Some(rec.clone()))?, reference);
    assert!(
        !rec.fetched.lock().unwrap().is_empty(),
        "backward must have fetched the offloaded buffers"
    );
    Ok(())
}

#[test]
fn backward_announces_its_tape_reads_in_the_order_it_makes_them() -> Result<()> {
    let rec = Arc::new(Recorder::default());
    let _g = install_memory_hooks(rec.clone());
    let x = leaf(&[0.5, -1.0, 2.0, 0.25, 1.5, -0.75], &[2, 3]);
    let w1 = leaf(&[1.0, 2.0, -3.0, 0.5, 0.25, -1.5], &[3, 2]);
    let w2 = leaf(&[0.75, -0.5], &[2, 1]);
    let h = x.matmul(&w1)?.tanh()?;
    let y = h.matmul(&w2)?.sigmoid()?.mul(&h.narrow(1, 0, 1)?)?;
    let l = y.sum_all()?;
    let fwd = rec.events().len();
    assert!(rec.plans().is_empty(), "no plan before backward");
    l.backward()?;
    let plans = rec.plans();
    assert_eq!(plans.len(), 1, "one plan per backward");
    let (at, plan) = &plans[0];
    assert_eq!(
        *at, fwd,
        "announced after the forward, before the first backward op"
    );
    let known: HashSet<u64> = rec.events()[..fwd]
        .iter()
        .flat_map(|e| e.inputs.iter().chain(&e.outputs).copied())
        .collect();
    // Every backward read of a buffer that existed before the pass is in the plan, and the
    // reads walk the plan's groups in order.
    let mut cursor = 0;
    let mut planned_reads = 0;
    for e in &rec.events()[fwd..] {
        for b in e.inputs.iter().filter(|b| known.contains(b)) {
            let g = (cursor..plan.len())
                .find(|&g| plan[g].contains(b))
                .unwrap_or_else(|| {
                    panic!(
                        "{} read {b}, not in the plan from group {cursor}: {plan:?}",
                        e.op
                    )
                });
            cursor = g;
            planned_reads += 1;
        }
    }
    assert!(
        planned_reads >= 6,
        "the tape's saved tensors were read ({planned_reads})"
    );
    Ok(())
}
