//! The op table: every op dynn-ops defines, with its idiom signature.

use dynn_core::Idioms;

/// One entry of the op table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OpInfo {
    /// The op's name, as reported in op events.
    pub name: &'static str,
    /// Its six idiom counts.
    pub idioms: Idioms,
    /// False for ops with no backward rule (backward kernels, comparisons, index outputs).
    pub differentiable: bool,
    /// The file (op family) that defines it.
    pub family: &'static str,
}

/// Every op, sorted by name. Tests check that each one has a gradient check (when
/// differentiable) and a candle-oracle check.
pub fn op_table() -> Vec<OpInfo> {
    let mut all: Vec<OpInfo> = [
        crate::ops::unary::ops(),
        crate::ops::binary::ops(),
        crate::ops::views::ops(),
        crate::ops::reduce::ops(),
        crate::ops::matmul::ops(),
        crate::ops::update::ops(),
        crate::ops::optim::ops(),
        crate::ops::indexing::ops(),
        crate::ops::concat::ops(),
        crate::ops::topk::ops(),
        crate::ops::compare::ops(),
        crate::ops::cast::ops(),
        crate::ops::softmax::ops(),
        crate::ops::norm::ops(),
        crate::ops::cross_entropy::ops(),
        crate::ops::dropout::ops(),
        crate::ops::random::ops(),
    ]
    .concat();
    all.sort_by_key(|o| o.name);
    all.dedup_by_key(|o| o.name);
    all
}
