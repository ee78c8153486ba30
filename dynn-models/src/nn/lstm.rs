//! Recurrent cells: the classic `LstmCell` and the child-sum `TreeLstmCell` (Tai et al. 2015),
//! the latter computing a whole tree level in one batched call.

use super::{Forward, Linear, Module, Param, ParamBuilder};
use dynn_core::{DType, Device, Error, Result, Shape, Tensor};
use dynn_ops::prelude::*;

/// The hidden and cell state of a batch of LSTM units (or tree nodes).
#[derive(Clone, Debug)]
pub struct LstmState {
    /// Hidden state, `(batch, hidden)`.
    pub h: Tensor,
    /// Cell state, `(batch, hidden)`.
    pub c: Tensor,
}

impl LstmState {
    /// Zero `h` and `c` of shape `(batch, hidden)`.
    pub fn zeros(batch: usize, hidden: usize, dtype: DType, device: Device) -> Result<Self> {
        Ok(LstmState {
            h: Tensor::zeros((batch, hidden), dtype, device)?,
            c: Tensor::zeros((batch, hidden), dtype, device)?,
        })
    }

    /// The rows `rows` (1-D, U32 or I64) of both `h` and `c` (differentiable).
    pub fn select(&self, rows: &Tensor) -> Result<Self> {
        Ok(LstmState {
            h: self.h.index_select(0, rows)?,
            c: self.c.index_select(0, rows)?,
        })
    }
}

/// Checks that `t` is `(rows, width)` with `rows` given or free; returns the row count.
fn check_2d(
    op: &'static str,
    what: &str,
    t: &Tensor,
    rows: Option<usize>,
    width: usize,
) -> Result<usize> {
    match *t.dims() {
        [r, w] if w == width && rows.is_none_or(|n| n == r) => Ok(r),
        _ => Err(Error::invalid(
            op,
            format!(
                "{what} must be ({}, {width}), got shape {}",
                rows.map_or_else(|| "n".to_string(), |n| n.to_string()),
                t.shape()
            ),
        )),
    }
}

/// One LSTM step (PyTorch's `nn.LSTMCell`, gates in the order input, forget, cell, output):
///
/// ```text
/// [i f g o] = x W_ih + b + h U_hh
/// c' = σ(f) ⊙ c + σ(i) ⊙ tanh(g)
/// h' = σ(o) ⊙ tanh(c')
/// ```
#[derive(Clone, Debug)]
pub struct LstmCell {
    /// Input projection `input → 4·hidden`, with bias.
    pub ih: Linear,
    /// Recurrent projection `hidden → 4·hidden`, without bias.
    pub hh: Linear,
    hidden: usize,
}

impl LstmCell {
    /// A cell `input → hidden`; parameters under `ih` and `hh`.
    pub fn new(b: &ParamBuilder, input: usize, hidden: usize) -> Result<Self> {
        Ok(LstmCell {
            ih: Linear::new(&b.pp("ih"), input, 4 * hidden)?,
            hh: Linear::no_bias(&b.pp("hh"), hidden, 4 * hidden)?,
            hidden,
        })
    }

    /// The input width.
    pub fn input_dim(&self) -> usize {
        self.ih.in_dim()
    }

    /// The hidden width.
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// One step for `x` of shape `(batch, input)` from `state` (`(batch, hidden)` each).
    pub fn forward(&self, x: &Tensor, state: &LstmState) -> Result<LstmState> {
        const OP: &str = "LstmCell::forward";
        let n = check_2d(OP, "x", x, None, self.input_dim())?;
        check_2d(OP, "state.h", &state.h, Some(n), self.hidden)?;
        check_2d(OP, "state.c", &state.c, Some(n), self.hidden)?;
        let gates = self.ih.forward(x)?.add(&self.hh.forward(&state.h)?)?;
        let g = gates.chunk(4, 1)?;
        let [i, f, cell, o] = &g[..] else {
            return Err(Error::Msg(format!("{OP}: expected 4 gate chunks")));
        };
        let c = f
            .sigmoid()?
            .mul(&state.c)?
            .add(&i.sigmoid()?.mul(&cell.tanh()?)?)?;
        let h = o.sigmoid()?.mul(&c.tanh()?)?;
        Ok(LstmState { h, c })
    }
}

impl Module for LstmCell {
    fn visit_params(&self, f: &mut dyn FnMut(&Param)) {
        self.ih.visit_params(f);
        self.hh.visit_params(f);
    }
}

/// The children of one tree level, flattened: child `j` has state `h[j]`, `c[j]` and belongs
/// to node `parent[j]` of the level being computed. Children of one parent need not be
/// adjacent, and a node may have any number of children (zero: a leaf).
#[derive(Clone, Debug)]
pub struct ChildStates {
    /// Children's hidden states, `(m, hidden)`.
    pub h: Tensor,
    /// Children's cell states, `(m, hidden)`.
    pub c: Tensor,
    /// For each child, the row of its parent among the level's `n` nodes: 1-D of length `m`,
    /// U32 or I64, values in `0..n`.
    pub parent: Tensor,
}

impl ChildStates {
    /// Children with states `h`, `c` (`(m, hidden)` each) and parent rows `parent` (`(m,)`).
    /// Shapes are checked here; index ranges when the level is computed.
    pub fn new(h: Tensor, c: Tensor, parent: Tensor) -> Result<Self> {
        const OP: &str = "ChildStates::new";
        let [m, hidden] = *h.dims() else {
            return Err(Error::invalid(
                OP,
                format!("h must be (m, hidden), got shape {}", h.shape()),
            ));
        };
        check_2d(OP, "c", &c, Some(m), hidden)?;
        if parent.dims() != [m] {
            return Err(Error::shape_mismatch(
                "ChildStates::new (parent vs children)",
                parent.shape(),
                &Shape::from(m),
            ));
        }
        if !matches!(parent.dtype(), DType::U32 | DType::I64) {
            return Err(Error::unsupported_dtype(OP, parent.dtype()));
        }
        Ok(ChildStates { h, c, parent })
    }

    /// Children taken from an earlier result: rows `rows` (1-D, U32 or I64) of `states`, the
    /// `j`-th of which belongs to node `parent[j]`. The usual way to feed level `l - 1`'s
    /// output (or several earlier levels concatenated) into level `l`.
    pub fn select(states: &LstmState, rows: &Tensor, parent: Tensor) -> Result<Self> {
        let s = states.select(rows)?;
        Self::new(s.h, s.c, parent)
    }

    /// Children from host data: `parent[j]` is the parent row of child `j` (the `j`-th row
    /// of `h` and `c`).
    pub fn from_parents(h: Tensor, c: Tensor, parent: &[usize]) -> Result<Self> {
        let idx: Vec<i64> = parent.iter().map(|&p| p as i64).collect();
        let device = h.device();
        Self::new(h, c, Tensor::from_vec(idx, parent.len(), device)?)
    }

    /// The number of children `m`.
    pub fn len(&self) -> usize {
        self.parent.elem_count()
    }

    /// True when there are no children.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The child-sum Tree-LSTM cell of Tai, Socher and Manning (2015), batched over the nodes of
/// one tree level (or any set of nodes whose children are already computed). For node `j` with
/// input `x_j` and children `C(j)`:
///
/// ```text
/// h̃_j  = Σ_{k∈C(j)} h_k
/// i_j  = σ(W_i x_j + U_i h̃_j + b_i)      o_j = σ(W_o x_j + U_o h̃_j + b_o)
/// u_j  = tanh(W_u x_j + U_u h̃_j + b_u)
/// f_jk = σ(W_f x_j + U_f h_k + b_f)       (one forget gate per child)
/// c_j  = i_j ⊙ u_j + Σ_{k∈C(j)} f_jk ⊙ c_k
/// h_j  = o_j ⊙ tanh(c_j)
/// ```
///
/// Batched: `x` holds the `n` nodes' inputs `(n, input)`; the children of all of them come as
/// one [`ChildStates`] (`m` rows, each with its parent row). The child sums are `index_add`s
/// into the parents, the per-child forget gates use `index_select` of the parents' `W_f x`.
/// A leaf (no child) gets `h̃ = 0` and no forget term, so a level of leaves only is
/// `forward(x, None)`.
///
/// A tree is computed bottom-up, one call per level:
///
/// ```text
/// let leaves = cell.forward(&x_leaves, None)?;                        // level 0
/// let kids = ChildStates::select(&leaves, &child_rows, parent_rows)?; // who feeds whom
/// let level1 = cell.forward(&x_level1, Some(&kids))?;                 // level 1
/// ```
///
/// Nodes of one level may mix leaves and inner nodes; children may come from any earlier
/// level (concatenate the earlier states and select rows).
#[derive(Clone, Debug)]
pub struct TreeLstmCell {
    /// `W_{i,o,u}`: input `→ 3·hidden` (i, o, u in that order), with bias.
    pub w_iou: Linear,
    /// `U_{i,o,u}`: summed child hidden `→ 3·hidden`, without bias.
    pub u_iou: Linear,
    /// `W_f`: input `→ hidden`, with bias.
    pub w_f: Linear,
    /// `U_f`: child hidden `→ hidden`, without bias.
    pub u_f: Linear,
    hidden: usize,
}

impl TreeLstmCell {
    /// A cell `input → hidden`; parameters under `w_iou`, `u_iou`, `w_f`, `u_f`.
    pub fn new(b: &ParamBuilder, input: usize, hidden: usize) -> Result<Self> {
        Ok(TreeLstmCell {
            w_iou: Linear::new(&b.pp("w_iou"), input, 3 * hidden)?,
            u_iou: Linear::no_bias(&b.pp("u_iou"), hidden, 3 * hidden)?,
            w_f: Linear::new(&b.pp("w_f"), input, hidden)?,
            u_f: Linear::no_bias(&b.pp("u_f"), hidden, hidden)?,
            hidden,
        })
    }

    /// The input width.
    pub fn input_dim(&self) -> usize {
        self.w_iou.in_dim()
    }

    /// The hidden width.
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// The states `(n, hidden)` of `n` nodes with inputs `x` `(n, input)` and the children
    /// `children` (`None`, or an empty set, when every node is a leaf). Row `j` of the result
    /// is node `j` (the row `parent` refers to). A parent row outside `0..n` is an error.
    pub fn forward(&self, x: &Tensor, children: Option<&ChildStates>) -> Result<LstmState> {
        const OP: &str = "TreeLstmCell::forward";
        let n = check_2d(OP, "x", x, None, self.input_dim())?;
        let mut iou = self.w_iou.forward(x)?;
        let mut c_children = None;
        if let Some(ch) = children.filter(|ch| !ch.is_empty()) {
            let m = check_2d(OP, "children.h", &ch.h, None, self.hidden)?;
            check_2d(OP, "children.c", &ch.c, Some(m), self.hidden)?;
            if ch.parent.dims() != [m] {
                return Err(Error::shape_mismatch(
                    "TreeLstmCell::forward (children.parent vs children.h)",
                    ch.parent.shape(),
                    &Shape::from(m),
                ));
            }
            let zeros = Tensor::zeros((n, self.hidden), x.dtype(), x.device())?;
            let h_sum = zeros.index_add(0, &ch.parent, &ch.h)?;
            iou = iou.add(&self.u_iou.forward(&h_sum)?)?;
            let f = self
                .w_f
                .forward(x)?
                .index_select(0, &ch.parent)?
                .add(&self.u_f.forward(&ch.h)?)?
                .sigmoid()?;
            c_children = Some(zeros.index_add(0, &ch.parent, &f.mul(&ch.c)?)?);
        }
        let g = iou.chunk(3, 1)?;
        let [i, o, u] = &g[..] else {
            return Err(Error::Msg(format!("{OP}: expected 3 gate chunks")));
        };
        let mut c = i.sigmoid()?.mul(&u.tanh()?)?;
        if let Some(cc) = c_children {
            c = c.add(&cc)?;
        }
        let h = o.sigmoid()?.mul(&c.tanh()?)?;
        Ok(LstmState { h, c })
    }
}

impl Module for TreeLstmCell {
    fn visit_params(&self, f: &mut dyn FnMut(&Param)) {
        self.w_iou.visit_params(f);
        self.u_iou.visit_params(f);
        self.w_f.visit_params(f);
        self.u_f.visit_params(f);
    }
}
