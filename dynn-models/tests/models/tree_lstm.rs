//! The ListOps Tree-LSTM: gradients, level batching, dynamic graphs and config errors.

use dynn_core::{DType, Device, Result};
use dynn_models::data::listops::{self, ListOpsBatch, Node, Tree};
use dynn_models::gradcheck::GradCheck;
use dynn_models::models::tree_lstm::{LevelPlan, TreeLstm, TreeLstmConfig, TreeLstmTask};
use dynn_models::nn::{Module, ParamBuilder};
use dynn_models::train::{Defaults, TrainArgs, train};

fn tiny() -> TreeLstmConfig {
    TreeLstmConfig {
        embed: 3,
        hidden: 4,
        max_depth: 3,
        max_args: 3,
        max_nodes: 12,
        eval_trees: 20,
        // Small, so wide levels are split and the chunked gather is what the tests check.
        level_chunk: 3,
    }
}

fn parse(exprs: &[&str]) -> Result<ListOpsBatch> {
    let trees = exprs
        .iter()
        .map(|s| Tree::parse(s))
        .collect::<Result<Vec<_>>>()?;
    let labels = trees.iter().map(Tree::value).collect();
    Ok(ListOpsBatch { trees, labels })
}

const EXPRS: [&str; 3] = [
    "[MAX 2 [MIN 4 7 ] 0 ]",
    "[SM 1 2 ]",
    "[MED [SM 3 [MAX 1 2 ] ] 5 6 ]",
];

#[test]
fn gradients_match_finite_differences() -> Result<()> {
    let b = ParamBuilder::new(DType::F64, Device::Cpu, 3);
    let model = TreeLstm::new(&b, &tiny())?;
    let batch = parse(&EXPRS)?;
    // The graph is fixed by the trees, so the loss is smooth in every parameter.
    let report = GradCheck {
        max_elems_per_param: 4,
        ..Default::default()
    }
    .check(&model.params(), || model.loss(&batch))?;
    assert!(report.checked >= 30, "{report:?}");
    Ok(())
}

#[test]
fn levels_gather_the_right_children_and_batching_changes_nothing() -> Result<()> {
    let batch = parse(&EXPRS)?;
    let plan = LevelPlan::new(&batch.trees)?;
    assert_eq!(plan.sizes, vec![11, 3, 2, 1]);
    assert_eq!(plan.offsets, vec![0, 11, 14, 16]);
    // Level 3 is the MED root; its children are the SM at level 2 and the digits 5, 6.
    assert_eq!(plan.child_parent[3], vec![0, 0, 0]);
    assert_eq!(plan.roots.len(), 3);
    assert_eq!(
        plan.tokens[plan.roots[1] as usize],
        i64::from(listops::OP_SM)
    );
    for (k, rows) in plan.child_rows.iter().enumerate() {
        assert!(rows.iter().all(|&r| (r as usize) < plan.offsets[k]));
    }

    let b = ParamBuilder::new(DType::F64, Device::Cpu, 4);
    let model = TreeLstm::new(&b, &tiny())?;
    let together = model.forward(&batch.trees)?.to_vec::<f64>()?;
    for (i, t) in batch.trees.iter().enumerate() {
        let alone = model.forward(std::slice::from_ref(t))?.to_vec::<f64>()?;
        for (a, b) in alone.iter().zip(&together[i * 10..(i + 1) * 10]) {
            assert!((a - b).abs() < 1e-12, "tree {i}: {a} vs {b}");
        }
    }
    Ok(())
}

#[test]
fn different_batches_make_different_graphs() -> Result<()> {
    let args = TrainArgs {
        steps: Some(5),
        batch: Some(4),
        quiet: true,
        ..Default::default()
    };
    let defaults = Defaults {
        steps: 5,
        batch: 4,
        lr: 1e-2,
    };
    let out = train(&args, defaults, || {
        TreeLstmTask::new(tiny(), 0, Device::Cpu)
    })?;
    assert!(out.summary.distinct_graphs >= 2, "{:?}", out.summary);
    assert_eq!(out.summary.eval_metric, "accuracy");
    assert!((0.0..=1.0).contains(&out.summary.eval_value));
    assert!(out.losses.iter().all(|l| l.is_finite()));
    Ok(())
}

#[test]
fn bad_configs_and_inputs_are_errors() -> Result<()> {
    let bad = [
        TreeLstmConfig {
            hidden: 0,
            ..tiny()
        },
        TreeLstmConfig { embed: 0, ..tiny() },
        TreeLstmConfig {
            max_depth: 0,
            ..tiny()
        },
        TreeLstmConfig {
            max_args: 1,
            ..tiny()
        },
        TreeLstmConfig {
            max_nodes: 6,
            ..tiny()
        },
        TreeLstmConfig {
            eval_trees: 0,
            ..tiny()
        },
    ];
    for cfg in bad {
        assert!(cfg.validate().is_err(), "{cfg:?}");
        assert!(TreeLstmTask::new(cfg, 0, Device::Cpu).is_err());
    }
    tiny().validate()?;
    TreeLstmConfig::default().validate()?;

    let b = ParamBuilder::new(DType::F32, Device::Cpu, 0);
    let model = TreeLstm::new(&b, &tiny())?;
    assert!(model.forward(&[]).is_err());
    let cyclic = Tree {
        nodes: vec![
            Node {
                token: 1,
                children: vec![],
            },
            Node {
                token: listops::OP_MAX,
                children: vec![0, 2],
            },
            Node {
                token: 2,
                children: vec![],
            },
        ],
        root: 2,
    };
    assert!(model.forward(&[cyclic]).is_err());
    let mut batch = parse(&EXPRS)?;
    batch.labels.pop();
    assert!(model.loss(&batch).is_err());
    Ok(())
}
