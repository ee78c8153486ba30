//! The hot-path predictor: a snapshot of the trained pilot's weights in plain vectors and an
//! MLP forward pass over caller-owned scratch buffers — no dynn tensors, no allocation.
//! Snapshots are saved and loaded as safetensors checkpoints.

use crate::bucket::BUCKETS;
use crate::encoder::{Encoding, FeatureConfig};
use dynn_core::{Device, Error, Result, Tensor};
use dynn_models::checkpoint::Checkpoint;
use dynn_models::nn::Linear;
use dynn_ops::cpu::{SimdTask, simd_task};
use std::path::Path;

/// One dense layer: `y = x W + b`, `W` row-major `(inputs, outputs)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Dense {
    /// Input width.
    pub inputs: usize,
    /// Output width.
    pub outputs: usize,
    /// Weights, `inputs × outputs`, row-major.
    pub w: Vec<f32>,
    /// Biases.
    pub b: Vec<f32>,
}

impl Dense {
    /// A layer from a trained [`Linear`].
    pub fn of_linear(l: &Linear) -> Result<Self> {
        let (inputs, outputs) = (l.in_dim(), l.out_dim());
        let b = match &l.bias {
            Some(b) => b.to_vec::<f32>()?,
            None => vec![0.0; outputs],
        };
        Ok(Dense {
            inputs,
            outputs,
            w: l.weight.to_vec::<f32>()?,
            b,
        })
    }

    /// Adds `x`'s share of `x W`, with `x` as inputs `first..first + x.len()`, to `out`
    /// (`outputs` long). Each output adds its terms in input order, so splitting the inputs
    /// into parts gives the same bits as one call over all of them. Outputs go in blocks of
    /// [`BLOCK`] held in registers across the inputs; zero inputs (one-hot and missing
    /// features) are skipped.
    #[inline(always)]
    fn accumulate(&self, x: &[f32], first: usize, out: &mut [f32]) {
        let n = self.outputs;
        let Some(w) = self
            .w
            .get(first * n..(first + x.len()) * n)
            .filter(|_| n > 0)
        else {
            return;
        };
        let done = n / BLOCK * BLOCK;
        let (blocks, tail) = out.split_at_mut(done.min(out.len()));
        for (k, block) in blocks.chunks_exact_mut(BLOCK).enumerate() {
            let Some(block) = block.first_chunk_mut::<BLOCK>() else {
                continue;
            };
            let mut acc = *block;
            for (row, &xi) in w.chunks_exact(n).zip(x) {
                if xi == 0.0 {
                    continue;
                }
                if let Some(r) = row[k * BLOCK..].first_chunk::<BLOCK>() {
                    for (a, &wv) in acc.iter_mut().zip(r) {
                        *a += xi * wv;
                    }
                }
            }
            *block = acc;
        }
        for (row, &xi) in w.chunks_exact(n).zip(x) {
            if xi != 0.0 {
                for (o, &wv) in tail.iter_mut().zip(&row[done..]) {
                    *o += xi * wv;
                }
            }
        }
    }
}

/// Outputs a dense layer accumulates at once, in registers.
const BLOCK: usize = 32;

#[inline(always)]
fn relu(v: &mut [f32]) {
    for o in v.iter_mut() {
        *o = o.max(0.0);
    }
}

/// Preallocated activations for [`Snapshot::logits`]; make one per snapshot with
/// [`Snapshot::scratch`] and reuse it for every call.
#[derive(Debug, Clone, Default)]
pub struct Scratch {
    a: Vec<f32>,
    b: Vec<f32>,
    /// The window's sums ([`Snapshot::window_sums`]) when [`Snapshot::logits`] computes them.
    sums: Vec<f32>,
}

impl Scratch {
    /// The buffers' capacities in floats (to check that calls do not grow them).
    pub fn capacity(&self) -> (usize, usize, usize) {
        (self.a.capacity(), self.b.capacity(), self.sums.capacity())
    }
}

/// A trained pilot, frozen: the features it reads and its layers (ReLU between them; the
/// last one gives one logit per bucket).
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// What the input vector holds.
    pub features: FeatureConfig,
    /// The layers, input first.
    pub layers: Vec<Dense>,
}

const FORMAT: &str = "dynn-pilot";

impl Snapshot {
    /// A snapshot of layers; checks that widths chain from `features.input_dim()` to the
    /// bucket count.
    pub fn new(features: FeatureConfig, layers: Vec<Dense>) -> Result<Self> {
        let mut width = features.input_dim();
        for (i, l) in layers.iter().enumerate() {
            if l.inputs != width
                || l.outputs == 0
                || l.w.len() != l.inputs * l.outputs
                || l.b.len() != l.outputs
            {
                return Err(Error::invalid(
                    "pilot snapshot",
                    format!(
                        "layer {i} is {}×{} ({} weights, {} biases) after a width of {width}",
                        l.inputs,
                        l.outputs,
                        l.w.len(),
                        l.b.len()
                    ),
                ));
            }
            width = l.outputs;
        }
        if layers.is_empty() || width != BUCKETS {
            return Err(Error::invalid(
                "pilot snapshot",
                format!("the last layer must give {BUCKETS} logits, not {width}"),
            ));
        }
        Ok(Snapshot { features, layers })
    }

    /// Scratch buffers big enough for this snapshot.
    pub fn scratch(&self) -> Scratch {
        let widest = self.layers.iter().map(|l| l.outputs).max().unwrap_or(0);
        Scratch {
            a: Vec::with_capacity(widest),
            b: Vec::with_capacity(widest),
            sums: Vec::with_capacity(widest),
        }
    }

    /// The first layer's sums over the input's window part `window` (bias included), into
    /// `out`. Every candidate ranked at the same op shares them: [`Snapshot::predict_after`]
    /// adds a candidate's part, giving the same bits as [`Snapshot::logits`] on the whole row.
    pub fn window_sums(&self, window: &[f32], out: &mut Vec<f32>) {
        out.clear();
        if let Some(l) = self.layers.first() {
            out.extend_from_slice(&l.b);
            simd_task(Accumulate {
                layer: l,
                x: window,
                first: 0,
                out,
            });
        }
    }

    /// The logits of input `x` (`features.input_dim()` long), computed in `s`. Allocates
    /// nothing when `s` came from [`Snapshot::scratch`].
    pub fn logits<'s>(&self, x: &[f32], s: &'s mut Scratch) -> &'s [f32] {
        debug_assert_eq!(x.len(), self.features.input_dim());
        let (window, cand) = x.split_at(self.features.window_dim().min(x.len()));
        let mut sums = std::mem::take(&mut s.sums);
        self.window_sums(window, &mut sums);
        self.logits_after(&sums, cand, s);
        s.sums = sums;
        &s.a
    }

    /// The logits of the candidate part `cand` after the window's sums `sums`, into `s.a`.
    fn logits_after(&self, sums: &[f32], cand: &[f32], s: &mut Scratch) {
        simd_task(Finish {
            snapshot: self,
            sums,
            cand,
            s,
        });
    }

    /// The predicted bucket of input `x`: the announced plan's where it reads the candidate
    /// ([`FeatureConfig::planned_bucket`]), else the network's ([`Snapshot::predict_net`]).
    pub fn predict(&self, x: &[f32], s: &mut Scratch) -> u8 {
        match self.features.planned_bucket(x) {
            Some(b) => b,
            None => self.predict_net(x, s),
        }
    }

    /// [`Snapshot::predict`] of the row whose window part gave `sums`
    /// ([`Snapshot::window_sums`]) and whose candidate part is `cand`.
    pub fn predict_after(&self, sums: &[f32], cand: &[f32], s: &mut Scratch) -> u8 {
        if let Some(b) = self.features.planned_bucket_of_candidate(cand) {
            return b;
        }
        self.logits_after(sums, cand, s);
        argmax(&s.a)
    }

    /// The network's predicted bucket of input `x`.
    pub fn predict_net(&self, x: &[f32], s: &mut Scratch) -> u8 {
        argmax(self.logits(x, s))
    }

    /// Saves the snapshot as a safetensors checkpoint (`layer.<i>.weight`, `layer.<i>.bias`;
    /// the features in the metadata).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let mut c = Checkpoint::new();
        for (i, l) in self.layers.iter().enumerate() {
            let w = Tensor::from_vec(l.w.clone(), (l.inputs, l.outputs), Device::Cpu)?;
            c.insert(format!("layer.{i}.weight"), w);
            c.insert(
                format!("layer.{i}.bias"),
                Tensor::from_vec(l.b.clone(), l.outputs, Device::Cpu)?,
            );
        }
        c.set_meta("model", FORMAT);
        c.set_meta("pilot.layers", self.layers.len().to_string());
        c.set_meta("pilot.encoding", self.features.encoding.as_str());
        c.set_meta("pilot.window", self.features.window.to_string());
        c.set_meta("pilot.hint", self.features.hint.to_string());
        c.save(path)
    }

    /// Loads a snapshot saved by [`Snapshot::save`]; another file, or one whose layers do
    /// not chain, is an error naming the problem.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let c = Checkpoint::load(path)?;
        let bad = |msg: String| Error::Checkpoint {
            path: path.display().to_string(),
            msg,
        };
        if c.meta("model") != Some(FORMAT) {
            return Err(bad(format!("not a saved pilot ({:?})", c.meta("model"))));
        }
        let meta = |k: &str| {
            c.meta(k)
                .ok_or_else(|| bad(format!("no `{k}` in the metadata")))
        };
        let features = FeatureConfig {
            encoding: Encoding::parse(meta("pilot.encoding")?)
                .ok_or_else(|| bad("unknown pilot.encoding".into()))?,
            window: meta("pilot.window")?
                .parse()
                .map_err(|_| bad("pilot.window is not a number".into()))?,
            hint: meta("pilot.hint")? == "true",
        };
        let n: usize = meta("pilot.layers")?
            .parse()
            .map_err(|_| bad("pilot.layers is not a number".into()))?;
        let mut layers = Vec::with_capacity(n);
        for i in 0..n {
            let get = |name: String| {
                c.get(&name)
                    .ok_or_else(|| bad(format!("tensor `{name}` is missing")))
            };
            let w = get(format!("layer.{i}.weight"))?;
            let b = get(format!("layer.{i}.bias"))?;
            let dims = w.dims().to_vec();
            let [inputs, outputs] = dims[..] else {
                return Err(bad(format!("layer.{i}.weight is not a matrix")));
            };
            layers.push(Dense {
                inputs,
                outputs,
                w: w.to_vec::<f32>()?,
                b: b.to_vec::<f32>()?,
            });
        }
        Snapshot::new(features, layers).map_err(|e| bad(e.to_string()))
    }
}

/// The index of the largest logit (the first of equals).
fn argmax(logits: &[f32]) -> u8 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u8
}

/// [`Dense::accumulate`] as one SIMD task.
struct Accumulate<'a> {
    layer: &'a Dense,
    x: &'a [f32],
    first: usize,
    out: &'a mut [f32],
}

impl SimdTask for Accumulate<'_> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        self.layer.accumulate(self.x, self.first, self.out);
    }
}

/// The forward pass from the first layer's window sums to the logits (in `s.a`), as one
/// SIMD task.
struct Finish<'a> {
    snapshot: &'a Snapshot,
    sums: &'a [f32],
    cand: &'a [f32],
    s: &'a mut Scratch,
}

impl SimdTask for Finish<'_> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        let Finish {
            snapshot,
            sums,
            cand,
            s,
        } = self;
        let last = snapshot.layers.len().saturating_sub(1);
        let first = snapshot.features.window_dim();
        for (i, l) in snapshot.layers.iter().enumerate() {
            // `a` holds the previous layer's output; the new one goes into `b`.
            s.b.clear();
            if i == 0 {
                s.b.extend_from_slice(sums);
                l.accumulate(cand, first, &mut s.b);
            } else {
                s.b.extend_from_slice(&l.b);
                l.accumulate(&s.a, 0, &mut s.b);
            }
            if i < last {
                relu(&mut s.b);
            }
            std::mem::swap(&mut s.a, &mut s.b);
        }
    }
}
