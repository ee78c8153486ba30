//! A child-sum Tree-LSTM over ListOps parse trees, batched by tree level.
//!
//! Every node's token (a digit or one of the four operators) is embedded; the
//! [`TreeLstmCell`] then runs bottom-up, one call per height: all nodes of height `k` across
//! the whole batch at once, their children gathered (`index_select`) from the states of the
//! lower levels. The roots' hidden states go through a small classifier over the ten values.
//! The number of levels and their sizes follow each batch's trees, so the op sequence — the
//! graph — differs from batch to batch.

use crate::data::listops::{self, DIGITS, ListOpsBatch, ListOpsConfig, Tree, VOCAB};
use crate::nn::{
    ChildStates, Embedding, Forward, Linear, LstmState, Module, Param, ParamBuilder, TreeLstmCell,
};
use crate::rng::Rng;
use crate::train::{Defaults, Eval, StepOut, Task};
use dynn_core::{DType, Device, Error, Result, Tensor, no_grad};
use dynn_ops::prelude::*;

/// The Tree-LSTM's sizes and its ListOps data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeLstmConfig {
    /// Token embedding width.
    pub embed: usize,
    /// Hidden (and cell) state width; also the classifier's hidden width.
    pub hidden: usize,
    /// The deepest training tree, in operator levels (drawn in `1..=max_depth`).
    pub max_depth: usize,
    /// The most arguments of one operator (at least 2).
    pub max_args: usize,
    /// The most nodes in one tree.
    pub max_nodes: usize,
    /// Held-out trees drawn for the evaluation.
    pub eval_trees: usize,
    /// The most nodes one cell call takes: a wider level is computed in chunks, so no single
    /// op's working set grows with the batch (what a tight memory budget needs).
    pub level_chunk: usize,
}

impl Default for TreeLstmConfig {
    fn default() -> Self {
        TreeLstmConfig {
            embed: 32,
            hidden: 64,
            max_depth: 3,
            max_args: 4,
            max_nodes: 30,
            eval_trees: 500,
            level_chunk: 512,
        }
    }
}

impl TreeLstmConfig {
    /// Checks every size: widths and `eval_trees` positive, `max_depth >= 1`,
    /// `max_args >= 2`, and `max_nodes` large enough for a tree of `max_depth` levels
    /// (`2·max_depth + 1`).
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "TreeLstmConfig";
        let positive = [
            ("embed", self.embed),
            ("hidden", self.hidden),
            ("max_depth", self.max_depth),
            ("eval_trees", self.eval_trees),
            ("level_chunk", self.level_chunk),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(Error::invalid(OP, format!("{name} must be positive")));
            }
        }
        if self.max_args < 2 {
            return Err(Error::invalid(
                OP,
                format!("max_args must be at least 2, got {}", self.max_args),
            ));
        }
        let least = self.max_depth.saturating_mul(2).saturating_add(1);
        if self.max_nodes < least {
            return Err(Error::invalid(
                OP,
                format!(
                    "max_nodes {} is too small for trees of depth {} (needs at least {least})",
                    self.max_nodes, self.max_depth
                ),
            ));
        }
        Ok(())
    }

    /// The generator settings of the training and evaluation trees.
    pub fn listops(&self) -> ListOpsConfig {
        ListOpsConfig {
            max_depth: self.max_depth,
            max_args: self.max_args,
            max_nodes: self.max_nodes,
        }
    }
}

/// How a batch of trees is laid out for level-by-level evaluation (host data only).
///
/// Nodes are numbered level-major across the batch: first every leaf of every tree, then
/// every node of height 1, and so on; `offsets[k]..offsets[k] + sizes[k]` are level `k`'s rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LevelPlan {
    /// The token of every row.
    pub tokens: Vec<i64>,
    /// The first row of each level.
    pub offsets: Vec<usize>,
    /// The number of rows of each level.
    pub sizes: Vec<usize>,
    /// Per level (index 0, the leaves, is empty): every child's row among the earlier levels.
    pub child_rows: Vec<Vec<i64>>,
    /// Per level: each child's parent, as a row within the level (`0..sizes[k]`).
    pub child_parent: Vec<Vec<i64>>,
    /// The root row of each tree.
    pub roots: Vec<i64>,
}

impl LevelPlan {
    /// The plan of `trees`; an empty batch or a malformed tree is an error.
    pub fn new(trees: &[Tree]) -> Result<Self> {
        const OP: &str = "LevelPlan::new";
        if trees.is_empty() {
            return Err(Error::invalid(OP, "the batch has no trees"));
        }
        let mut heights = Vec::with_capacity(trees.len());
        for (b, t) in trees.iter().enumerate() {
            t.validate()
                .map_err(|e| Error::invalid(OP, format!("tree {b}: {e}")))?;
            heights.push(t.heights());
        }
        let levels = heights
            .iter()
            .flat_map(|h| h.iter().copied())
            .max()
            .map_or(0, |m| m + 1);
        let mut sizes = vec![0usize; levels];
        for h in &heights {
            for &k in h {
                sizes[k] += 1;
            }
        }
        let mut offsets = Vec::with_capacity(levels);
        let mut total = 0;
        for &s in &sizes {
            offsets.push(total);
            total += s;
        }
        // Row of every node: the next free row of its level.
        let mut next = offsets.clone();
        let mut row_of: Vec<Vec<usize>> = Vec::with_capacity(trees.len());
        let mut tokens = vec![0i64; total];
        for (t, h) in trees.iter().zip(&heights) {
            let rows: Vec<usize> = t
                .nodes
                .iter()
                .zip(h)
                .map(|(n, &k)| {
                    let r = next[k];
                    next[k] += 1;
                    tokens[r] = i64::from(n.token);
                    r
                })
                .collect();
            row_of.push(rows);
        }
        let mut child_rows = vec![Vec::new(); levels];
        let mut child_parent = vec![Vec::new(); levels];
        let mut roots = Vec::with_capacity(trees.len());
        for ((t, h), rows) in trees.iter().zip(&heights).zip(&row_of) {
            for (i, n) in t.nodes.iter().enumerate() {
                let k = h[i];
                for &c in &n.children {
                    child_rows[k].push(rows[c] as i64);
                    child_parent[k].push((rows[i] - offsets[k]) as i64);
                }
            }
            roots.push(rows[t.root] as i64);
        }
        Ok(LevelPlan {
            tokens,
            offsets,
            sizes,
            child_rows,
            child_parent,
            roots,
        })
    }

    /// The number of levels (the deepest tree's depth plus one).
    pub fn levels(&self) -> usize {
        self.sizes.len()
    }

    /// The number of nodes in the batch.
    pub fn nodes(&self) -> usize {
        self.tokens.len()
    }
}

/// Token embedding → child-sum Tree-LSTM, level by level → root hidden → classifier
/// (`hidden → hidden → 10`, tanh).
#[derive(Clone, Debug)]
pub struct TreeLstm {
    /// Embeddings of the 14 ListOps tokens.
    pub embed: Embedding,
    /// The cell run once per tree level.
    pub cell: TreeLstmCell,
    /// Classifier hidden layer.
    pub head: Linear,
    /// Classifier output layer, over the ten values.
    pub out: Linear,
    /// The most nodes one cell call takes (see [`TreeLstmConfig::level_chunk`]).
    pub level_chunk: usize,
}

impl TreeLstm {
    /// A model of `cfg`'s sizes (checked); parameters under `embed`, `cell`, `head`, `out`.
    pub fn new(b: &ParamBuilder, cfg: &TreeLstmConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(TreeLstm {
            embed: Embedding::with_std(&b.pp("embed"), VOCAB, cfg.embed, 0.5)?,
            cell: TreeLstmCell::new(&b.pp("cell"), cfg.embed, cfg.hidden)?,
            head: Linear::new(&b.pp("head"), cfg.hidden, cfg.hidden)?,
            out: Linear::new(&b.pp("out"), cfg.hidden, DIGITS as usize)?,
            level_chunk: cfg.level_chunk,
        })
    }

    /// The roots' hidden states `(trees, hidden)`, computed bottom-up one level (or one chunk
    /// of a wide level) per cell call.
    pub fn encode(&self, plan: &LevelPlan) -> Result<Tensor> {
        let device = self.embed.weight.device();
        let index = |v: Vec<i64>| {
            let n = v.len();
            Tensor::from_vec(v, n, device)
        };
        let join = |v: &[Tensor]| -> Result<Tensor> {
            match v {
                [one] => Ok(one.clone()),
                _ => cat(&v.iter().collect::<Vec<_>>(), 0),
            }
        };
        // Each level is computed in chunks of at most `level_chunk` rows, and every chunk's
        // states stay their own tensors: children are gathered from the chunks they live in,
        // so no op touches more than a chunk's worth of states.
        let chunk = self.level_chunk.max(1);
        let mut done: Vec<(i64, i64, LstmState)> = Vec::new();
        for k in 0..plan.levels() {
            for lo in (0..plan.sizes[k]).step_by(chunk) {
                let hi = (lo + chunk).min(plan.sizes[k]);
                let g0 = plan.offsets[k];
                let x = self
                    .embed
                    .forward(&index(plan.tokens[g0 + lo..g0 + hi].to_vec())?)?;
                let (mut hs, mut cs, mut parents) = (Vec::new(), Vec::new(), Vec::new());
                for (s0, s1, prev) in &done {
                    let (rows, parent): (Vec<i64>, Vec<i64>) = plan.child_rows[k]
                        .iter()
                        .zip(&plan.child_parent[k])
                        .filter(|(r, p)| {
                            (*s0..*s1).contains(*r) && (lo as i64..hi as i64).contains(*p)
                        })
                        .map(|(r, p)| (r - s0, p - lo as i64))
                        .unzip();
                    if rows.is_empty() {
                        continue;
                    }
                    let rows = index(rows)?;
                    hs.push(prev.h.index_select(0, &rows)?);
                    cs.push(prev.c.index_select(0, &rows)?);
                    parents.extend(parent);
                }
                let state = if hs.is_empty() {
                    self.cell.forward(&x, None)?
                } else {
                    let kids = ChildStates::new(join(&hs)?, join(&cs)?, index(parents)?)?;
                    self.cell.forward(&x, Some(&kids))?
                };
                done.push(((g0 + lo) as i64, (g0 + hi) as i64, state));
            }
        }
        // Roots, gathered chunk by chunk, then put back in tree order.
        let (mut picked, mut order) = (Vec::new(), vec![0i64; plan.roots.len()]);
        let mut n = 0;
        for (s0, s1, st) in &done {
            let mut rows = Vec::new();
            for (t, r) in plan.roots.iter().enumerate() {
                if (*s0..*s1).contains(r) {
                    rows.push(r - s0);
                    order[t] = n;
                    n += 1;
                }
            }
            if !rows.is_empty() {
                picked.push(st.h.index_select(0, &index(rows)?)?);
            }
        }
        if picked.is_empty() {
            return Err(Error::invalid("TreeLstm::encode", "empty plan"));
        }
        join(&picked)?.index_select(0, &index(order)?)
    }

    /// Logits `(trees, 10)` over the value of each tree.
    pub fn forward(&self, trees: &[Tree]) -> Result<Tensor> {
        let plan = LevelPlan::new(trees)?;
        let h = self.encode(&plan)?;
        self.out.forward(&self.head.forward(&h)?.tanh()?)
    }

    /// The mean cross-entropy of the batch's labels.
    pub fn loss(&self, batch: &ListOpsBatch) -> Result<Tensor> {
        if batch.labels.len() != batch.trees.len() {
            return Err(Error::invalid(
                "TreeLstm::loss",
                format!(
                    "{} labels for {} trees",
                    batch.labels.len(),
                    batch.trees.len()
                ),
            ));
        }
        let logits = self.forward(&batch.trees)?;
        let labels: Vec<i64> = batch.labels.iter().map(|&l| i64::from(l)).collect();
        let targets = Tensor::from_vec(labels, batch.labels.len(), logits.device())?;
        logits.cross_entropy(&targets, CrossEntropyOpts::default())
    }

    /// The predicted value of each tree (the argmax of the logits, read under no-grad).
    pub fn predict(&self, trees: &[Tree]) -> Result<Vec<u32>> {
        let _g = no_grad();
        let pred = self.forward(trees)?.argmax(1, false)?.to_vec::<i64>()?;
        Ok(pred.into_iter().map(|p| p as u32).collect())
    }
}

impl Module for TreeLstm {
    fn visit_params(&self, f: &mut dyn FnMut(&Param)) {
        self.embed.visit_params(f);
        self.cell.visit_params(f);
        self.head.visit_params(f);
        self.out.visit_params(f);
    }
}

/// The trainer's defaults: about 25 s on two cores, reaching ~80% held-out accuracy.
pub const DEFAULTS: Defaults = Defaults {
    steps: 3000,
    batch: 64,
    lr: 6e-3,
};

/// Trees per evaluation forward pass.
const EVAL_CHUNK: usize = 128;

/// The Tree-LSTM trained on freshly generated ListOps trees; evaluated by accuracy on held-out
/// trees.
pub struct TreeLstmTask {
    cfg: TreeLstmConfig,
    model: TreeLstm,
}

impl TreeLstmTask {
    /// A task of `cfg` (checked) with F32 parameters drawn from `seed` on `device`.
    pub fn new(cfg: TreeLstmConfig, seed: u64, device: Device) -> Result<Self> {
        let b = ParamBuilder::new(DType::F32, device, seed);
        let model = TreeLstm::new(&b, &cfg)?;
        Ok(TreeLstmTask { cfg, model })
    }

    /// The model.
    pub fn model(&self) -> &TreeLstm {
        &self.model
    }
}

impl Task for TreeLstmTask {
    fn name(&self) -> &'static str {
        "tree_lstm"
    }

    fn config(&self) -> String {
        format!("{:?}", self.cfg)
    }

    fn unit(&self) -> &'static str {
        "trees"
    }

    fn params(&self) -> Vec<Param> {
        self.model.params()
    }

    fn set_train(&mut self, train: bool) {
        self.model.set_train(train);
    }

    fn step(&mut self, rng: &mut Rng, batch: usize) -> Result<StepOut> {
        if batch == 0 {
            return Err(Error::invalid(
                "tree_lstm",
                "the batch size must be positive",
            ));
        }
        let data = listops::batch(rng, &self.cfg.listops(), batch);
        let depth = data.trees.iter().map(Tree::depth).max().unwrap_or(0);
        let nodes: usize = data.trees.iter().map(|t| t.nodes.len()).sum();
        let loss = self.model.loss(&data)?;
        Ok(StepOut {
            loss,
            units: batch,
            note: format!("depth {depth}, {nodes} nodes"),
        })
    }

    fn evaluate(&mut self, rng: &mut Rng) -> Result<Eval> {
        let data = listops::batch(rng, &self.cfg.listops(), self.cfg.eval_trees);
        let mut correct = 0usize;
        for (trees, labels) in data
            .trees
            .chunks(EVAL_CHUNK)
            .zip(data.labels.chunks(EVAL_CHUNK))
        {
            let pred = self.model.predict(trees)?;
            correct += pred.iter().zip(labels).filter(|(p, l)| p == l).count();
        }
        Ok(Eval {
            metric: "accuracy",
            value: correct as f64 / data.trees.len().max(1) as f64,
        })
    }
}
