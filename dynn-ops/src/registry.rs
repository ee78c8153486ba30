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
        crate::ops::linear::ops(),
        crate::ops::addcmul::ops(),
        crate::ops::update::ops(),
        crate::ops::optim::ops(),
        crate::ops::indexing::ops(),
        crate::ops::concat::ops(),
        crate::ops::topk::ops(),
        crate::ops::compare::ops(),
        crate::ops::logical::ops(),
        crate::ops::cast::ops(),
        crate::ops::softmax::ops(),
        crate::ops::attention::ops(),
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

/// `docs/IDIOMS.md`: every op of the table with its six idiom counts, generated from the code
/// (a test fails when the committed file differs).
pub fn idioms_markdown() -> String {
    let mut s = String::from(
        "# Operator idioms\n\n\
         Generated from `dynn_ops::op_table()` by `cargo test -p dynn-ops --test idioms` \
         (set `DYNN_BLESS=1` to rewrite this file). Each op declares six counts of the \
         memory-access idioms it performs — the idiom-based representation the pilot model \
         reads instead of the op's name:\n\n\
         | idiom | counts |\n|---|---|\n\
         | layout | transposes and layout changes (strided reads of a permuted view) |\n\
         | in_place | writes into an input's buffer |\n\
         | indirect | reads or writes through an index tensor |\n\
         | reduction | reductions over a dimension |\n\
         | elementwise | element-wise maps |\n\
         | window | sliding windows / stencils |\n\n\
         | op | family | layout | in_place | indirect | reduction | elementwise | window | backward |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for op in op_table() {
        let v = op.idioms.0;
        s.push_str(&format!(
            "| `{}` | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            op.name,
            op.family,
            v[0],
            v[1],
            v[2],
            v[3],
            v[4],
            v[5],
            if op.differentiable { "yes" } else { "—" }
        ));
    }
    s
}

/// Every op family's CUDA C source (each is compiled for every float scalar type). The
/// kernel-compile test compiles them all for sm_80 and sm_90.
pub fn cuda_sources() -> Vec<&'static crate::cuda::CudaSource> {
    vec![
        &crate::ops::unary::CUDA,
        &crate::ops::indexing::CUDA,
        &crate::ops::concat::CUDA,
        &crate::ops::topk::CUDA,
        &crate::ops::dropout::CUDA,
        &crate::ops::random::CUDA,
        &crate::ops::softmax::CUDA,
        &crate::ops::norm::CUDA,
        &crate::ops::cross_entropy::CUDA,
        &crate::ops::reduce::CUDA,
        &crate::ops::binary::CUDA,
        &crate::ops::compare::CUDA,
        &crate::ops::logical::CUDA,
        &crate::ops::views::CUDA,
        &crate::ops::update::CUDA,
        &crate::ops::optim::CUDA,
        &crate::ops::cast::CUDA,
    ]
}
