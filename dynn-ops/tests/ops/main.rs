//! The op test suite: gradient checks against finite differences and forward/backward checks
//! against candle, one module per op family, plus a coverage test over the op table.

mod common;

use common::Case;

macro_rules! families {
    ($($fam:ident),* $(,)?) => {
        $(mod $fam;)*

        /// Every family's gradient-check cases.
        fn all_grad_cases() -> Vec<Case> {
            [$($fam::GRAD_CASES),*].concat()
        }

        /// Every family's candle-oracle cases.
        fn all_oracle_cases() -> Vec<Case> {
            [$($fam::ORACLE_CASES),*].concat()
        }

        mod grad {
            $(#[test] fn $fam() { crate::common::run_cases(crate::$fam::GRAD_CASES); })*
        }

        mod oracle {
            $(#[test] fn $fam() { crate::common::run_cases(crate::$fam::ORACLE_CASES); })*
        }
    };
}

families!(
    unary,
    binary,
    views,
    reduce,
    matmul,
    linear,
    attention,
    update,
    optim,
    softmax,
    norm,
    cross_entropy,
    dropout,
    random,
    indexing,
    concat,
    topk,
    compare,
    logical,
    cast
);

/// Every op in the op table has a candle-oracle case, and every differentiable op a gradient check.
#[test]
fn every_op_is_covered() {
    let grad: Vec<&str> = all_grad_cases()
        .iter()
        .flat_map(|c| c.0.iter().copied())
        .collect();
    let oracle: Vec<&str> = all_oracle_cases()
        .iter()
        .flat_map(|c| c.0.iter().copied())
        .collect();
    let table = dynn_ops::op_table();
    let missing_oracle: Vec<&str> = table
        .iter()
        .map(|o| o.name)
        .filter(|n| !oracle.contains(n))
        .collect();
    let missing_grad: Vec<&str> = table
        .iter()
        .filter(|o| o.differentiable)
        .map(|o| o.name)
        .filter(|n| !grad.contains(n))
        .collect();
    assert!(
        missing_oracle.is_empty(),
        "ops without a candle-oracle case: {missing_oracle:?}"
    );
    assert!(
        missing_grad.is_empty(),
        "differentiable ops without a gradient check: {missing_grad:?}"
    );
}
