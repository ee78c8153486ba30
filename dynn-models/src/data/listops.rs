//! ListOps (Nangia & Bowman, 2018): nested list operations over digits, the task of the
//! Tree-LSTM trainer. Every tree has its own shape, so the network's graph differs per batch.
//!
//! An expression like `[MAX 2 9 [MIN 4 7 ] 0 ]` evaluates to a digit: MIN, MAX, MED (median,
//! the lower middle for an even count) and SM (sum modulo 10).

use std::fmt;

use dynn_core::{Error, Result};

use crate::rng::Rng;

/// Digits are the token ids `0..DIGITS`.
pub const DIGITS: u32 = 10;
/// Token id of MIN.
pub const OP_MIN: u32 = 10;
/// Token id of MAX.
pub const OP_MAX: u32 = 11;
/// Token id of MED (median; the lower middle for an even count).
pub const OP_MED: u32 = 12;
/// Token id of SM (sum modulo 10).
pub const OP_SM: u32 = 13;
/// The number of token ids (10 digits and 4 operators).
pub const VOCAB: usize = 14;

const OP_NAMES: [&str; 4] = ["MIN", "MAX", "MED", "SM"];

/// How [`generate`] shapes its trees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListOpsConfig {
    /// The deepest a tree gets, in operator levels (a tree's depth is drawn in `1..=max_depth`).
    pub max_depth: usize,
    /// The most children of one operator (at least 2).
    pub max_args: usize,
    /// The most nodes (operators and digits) in one tree.
    pub max_nodes: usize,
}

impl Default for ListOpsConfig {
    fn default() -> Self {
        ListOpsConfig {
            max_depth: 4,
            max_args: 4,
            max_nodes: 40,
        }
    }
}

/// One node: a digit leaf (token `< DIGITS`, no children) or an operator (token
/// `OP_MIN..=OP_SM`, at least one child).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// The token id.
    pub token: u32,
    /// The children, in argument order, as indices into [`Tree::nodes`]; every child index is
    /// smaller than its parent's index.
    pub children: Vec<usize>,
}

/// An expression tree in post-order: children come before their parent in `nodes`, so the
/// root is the last node. [`generate`] and [`Tree::parse`] build trees this way; methods on a
/// tree that breaks this order give unspecified (but non-panicking) results, and
/// [`Tree::validate`] checks it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tree {
    /// The nodes, children before parents.
    pub nodes: Vec<Node>,
    /// The index of the root (the last node).
    pub root: usize,
}

/// The value of operator `op` over digits `args` (empty args give 0).
fn apply(op: u32, args: &mut [u32]) -> u32 {
    if args.is_empty() {
        return 0;
    }
    match op {
        OP_MIN => args.iter().copied().min().unwrap_or(0),
        OP_MAX => args.iter().copied().max().unwrap_or(0),
        OP_MED => {
            args.sort_unstable();
            args[(args.len() - 1) / 2]
        }
        _ => args.iter().sum::<u32>() % 10,
    }
}

impl Tree {
    /// Checks the post-order layout: valid tokens, operators with children, digits without,
    /// every child before its parent and used once, the root last.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "Tree::validate";
        if self.nodes.is_empty() || self.root + 1 != self.nodes.len() {
            return Err(Error::invalid(
                OP,
                "the root must be the last of at least one node",
            ));
        }
        let mut used = vec![false; self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            if n.token as usize >= VOCAB {
                return Err(Error::invalid(
                    OP,
                    format!("node {i}: token {} out of range", n.token),
                ));
            }
            if (n.token < DIGITS) != n.children.is_empty() {
                return Err(Error::invalid(
                    OP,
                    format!("node {i}: digits have no children, operators at least one"),
                ));
            }
            for &c in &n.children {
                if c >= i || std::mem::replace(&mut used[c], true) {
                    return Err(Error::invalid(
                        OP,
                        format!("node {i}: child {c} is not an earlier, unused node"),
                    ));
                }
            }
        }
        if used.iter().filter(|&&u| !u).count() != 1 {
            return Err(Error::invalid(
                OP,
                "every node but the root must have a parent",
            ));
        }
        Ok(())
    }

    /// The value of every node (a digit), in node order.
    pub fn node_values(&self) -> Vec<u32> {
        let mut vals = vec![0u32; self.nodes.len()];
        let mut args = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            vals[i] = if n.children.is_empty() {
                n.token % DIGITS
            } else {
                args.clear();
                args.extend(n.children.iter().filter(|&&c| c < i).map(|&c| vals[c]));
                apply(n.token, &mut args)
            };
        }
        vals
    }

    /// The value of the expression, a digit in `0..10`.
    pub fn value(&self) -> u32 {
        self.node_values().get(self.root).copied().unwrap_or(0)
    }

    /// The height of every node: 0 for a leaf, else one more than its highest child.
    pub fn heights(&self) -> Vec<usize> {
        let mut h = vec![0usize; self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            h[i] = n
                .children
                .iter()
                .filter(|&&c| c < i)
                .map(|&c| h[c] + 1)
                .max()
                .unwrap_or(0);
        }
        h
    }

    /// The depth in operator levels: the root's height (`[SM 1 2 ]` has depth 1).
    pub fn depth(&self) -> usize {
        self.heights().get(self.root).copied().unwrap_or(0)
    }

    /// Node indices grouped by height, ascending within a level: level 0 holds the leaves,
    /// level k the nodes whose highest child is at level k - 1. Every node's children are in
    /// earlier levels: the order in which a batched Tree-LSTM evaluates the tree.
    pub fn levels(&self) -> Vec<Vec<usize>> {
        let h = self.heights();
        let mut levels = vec![Vec::new(); h.iter().max().map_or(0, |m| m + 1)];
        for (i, &hi) in h.iter().enumerate() {
            levels[hi].push(i);
        }
        levels
    }

    /// Parses an expression written as [`Tree`]'s `Display` writes it, e.g.
    /// `[MAX 2 9 [MIN 4 7 ] 0 ]` (spaces are optional around brackets). An error names the
    /// byte position of the first problem.
    pub fn parse(s: &str) -> Result<Tree> {
        const OP: &str = "Tree::parse";
        let bytes = s.as_bytes();
        let mut nodes: Vec<Node> = Vec::new();
        // Open operators: (token, byte position of '[', children so far).
        let mut stack: Vec<(u32, usize, Vec<usize>)> = Vec::new();
        let mut root = None;
        let mut pos = 0;
        while pos < bytes.len() {
            let b = bytes[pos];
            if b.is_ascii_whitespace() {
                pos += 1;
                continue;
            }
            if root.is_some() {
                return Err(Error::invalid(
                    OP,
                    format!("unexpected input after the expression at byte {pos}"),
                ));
            }
            let done = match b {
                b'[' => {
                    let start = pos;
                    pos += 1;
                    while pos < bytes.len() && bytes[pos].is_ascii_whitespace() {
                        pos += 1;
                    }
                    let name_start = pos;
                    while pos < bytes.len() && bytes[pos].is_ascii_alphabetic() {
                        pos += 1;
                    }
                    let name = &s[name_start..pos];
                    let Some(k) = OP_NAMES.iter().position(|&n| n == name) else {
                        return Err(Error::invalid(
                            OP,
                            format!("unknown operator {name:?} at byte {name_start}"),
                        ));
                    };
                    stack.push((OP_MIN + k as u32, start, Vec::new()));
                    None
                }
                b']' => {
                    let Some((token, start, children)) = stack.pop() else {
                        return Err(Error::invalid(OP, format!("unmatched ']' at byte {pos}")));
                    };
                    if children.is_empty() {
                        return Err(Error::invalid(
                            OP,
                            format!("operator opened at byte {start} has no arguments"),
                        ));
                    }
                    pos += 1;
                    nodes.push(Node { token, children });
                    Some(nodes.len() - 1)
                }
                b'0'..=b'9' => {
                    if bytes.get(pos + 1).is_some_and(u8::is_ascii_digit) {
                        return Err(Error::invalid(
                            OP,
                            format!("number at byte {pos} has more than one digit"),
                        ));
                    }
                    nodes.push(Node {
                        token: (b - b'0') as u32,
                        children: Vec::new(),
                    });
                    pos += 1;
                    Some(nodes.len() - 1)
                }
                _ => {
                    let c = s[pos..].chars().next().unwrap_or('?');
                    return Err(Error::invalid(
                        OP,
                        format!("unexpected character {c:?} at byte {pos}"),
                    ));
                }
            };
            if let Some(idx) = done {
                match stack.last_mut() {
                    Some(parent) => parent.2.push(idx),
                    None => root = Some(idx),
                }
            }
        }
        if let Some((_, start, _)) = stack.last() {
            return Err(Error::invalid(
                OP,
                format!("'[' at byte {start} is never closed"),
            ));
        }
        match root {
            Some(root) => Ok(Tree { nodes, root }),
            None => Err(Error::invalid(OP, "empty expression")),
        }
    }
}

impl fmt::Display for Tree {
    /// Writes `[OP a b ... ]` with a space after every argument; digits as themselves.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        enum Item {
            Open(usize),
            Close,
        }
        let mut stack = vec![Item::Open(self.root)];
        let mut first = true;
        while let Some(item) = stack.pop() {
            let sep = if first { "" } else { " " };
            first = false;
            match item {
                Item::Close => f.write_str(" ]")?,
                Item::Open(i) => {
                    let Some(node) = self.nodes.get(i) else {
                        write!(f, "{sep}?")?;
                        continue;
                    };
                    if node.children.is_empty() {
                        write!(f, "{sep}{}", node.token)?;
                    } else {
                        let name = OP_NAMES
                            .get(node.token.wrapping_sub(OP_MIN) as usize)
                            .unwrap_or(&"?");
                        write!(f, "{sep}[{name}")?;
                        stack.push(Item::Close);
                        // Only earlier children: keeps a malformed tree from looping forever.
                        stack.extend(node.children.iter().rev().map(|&c| {
                            if c < i {
                                Item::Open(c)
                            } else {
                                Item::Open(usize::MAX)
                            }
                        }));
                    }
                }
            }
        }
        Ok(())
    }
}

/// The fewest nodes a tree of `depth` operator levels can have: a spine of operators, each
/// with one digit beside the next operator, the last with two digits.
fn min_nodes(depth: usize) -> usize {
    2 * depth + 1
}

/// Builds trees in post-order while keeping to a node budget.
struct Builder<'a> {
    rng: &'a mut Rng,
    max_args: usize,
    nodes: Vec<Node>,
}

impl Builder<'_> {
    fn digit(&mut self) -> usize {
        let token = self.rng.range(0, DIGITS as usize) as u32;
        self.nodes.push(Node {
            token,
            children: Vec::new(),
        });
        self.nodes.len() - 1
    }

    /// An operator subtree of exactly `depth >= 1` levels using at most `budget` nodes
    /// (`budget >= min_nodes(depth)`); returns its root and the nodes used.
    fn op(&mut self, depth: usize, budget: usize) -> (usize, usize) {
        let spine_min = if depth > 1 { min_nodes(depth - 1) } else { 1 };
        // This node, the spine child, and one node per other argument must fit.
        let most_args = (budget - 1 - spine_min + 1).min(self.max_args);
        let nargs = self.rng.range(2, most_args + 1);
        let spine_at = self.rng.range(0, nargs);
        let mut left = budget - 1;
        let mut children = Vec::with_capacity(nargs);
        for a in 0..nargs {
            // What the arguments after this one need at least.
            let later = (a + 1..nargs)
                .map(|b| if b == spine_at { spine_min } else { 1 })
                .sum::<usize>();
            let (idx, used) = if a == spine_at {
                if depth > 1 {
                    self.op(depth - 1, left - later)
                } else {
                    (self.digit(), 1)
                }
            } else {
                let room = left - later;
                // A side branch, shallower than the spine, now and then.
                let sub_depth = if depth > 1 && self.rng.bernoulli(0.35) {
                    self.rng.range(1, depth)
                } else {
                    0
                };
                if sub_depth > 0 && room >= min_nodes(sub_depth) {
                    self.op(sub_depth, room)
                } else {
                    (self.digit(), 1)
                }
            };
            children.push(idx);
            left -= used;
        }
        let token = OP_MIN + self.rng.range(0, 4) as u32;
        self.nodes.push(Node { token, children });
        (self.nodes.len() - 1, budget - left)
    }
}

/// A random tree: the root is an operator, the depth is drawn uniformly in
/// `1..=cfg.max_depth` (lowered when `cfg.max_nodes` is too small for it), every operator has
/// `2..=cfg.max_args` arguments, and there are at most `cfg.max_nodes` nodes. Out-of-range
/// settings are raised to the least that works (depth 1, 2 arguments, 3 nodes).
pub fn generate(rng: &mut Rng, cfg: &ListOpsConfig) -> Tree {
    let max_args = cfg.max_args.max(2);
    let max_nodes = cfg.max_nodes.max(min_nodes(1));
    let deepest = cfg.max_depth.max(1).min((max_nodes - 1) / 2);
    let depth = rng.range(1, deepest + 1);
    let mut b = Builder {
        rng,
        max_args,
        nodes: Vec::new(),
    };
    let (root, _) = b.op(depth, max_nodes);
    Tree {
        nodes: b.nodes,
        root,
    }
}

/// A batch of trees with their values as labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListOpsBatch {
    /// The expressions.
    pub trees: Vec<Tree>,
    /// `trees[i].value()`, in `0..10`.
    pub labels: Vec<u32>,
}

/// `n` random trees (see [`generate`]) with their values.
pub fn batch(rng: &mut Rng, cfg: &ListOpsConfig, n: usize) -> ListOpsBatch {
    let trees: Vec<Tree> = (0..n).map(|_| generate(rng, cfg)).collect();
    let labels = trees.iter().map(Tree::value).collect();
    ListOpsBatch { trees, labels }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_written_values() {
        for (s, v) in [
            ("[SM 5 6 7 ]", 8),
            ("[MED 1 9 3 4 ]", 3),
            ("[MED 1 9 3 ]", 3),
            ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
            ("[MIN 2 9 [MAX 4 7 ] 1 ]", 1),
            ("[SM [SM 9 9 ] [MED 5 2 ] 3 ]", 3),
            ("[MIN[MAX 3 8]5]", 5),
            ("7", 7),
        ] {
            let t = Tree::parse(s).unwrap();
            t.validate().unwrap();
            assert_eq!(t.value(), v, "{s}");
        }
        let t = Tree::parse("[MAX 2 9 [MIN 4 7 ] 0 ]").unwrap();
        assert_eq!(t.to_string(), "[MAX 2 9 [MIN 4 7 ] 0 ]");
        assert_eq!(t.depth(), 2);
        assert_eq!(t.levels(), vec![vec![0, 1, 2, 3, 5], vec![4], vec![6]]);
    }

    #[test]
    fn parse_errors_have_positions() {
        for (s, want) in [
            ("[MAX 2 x ]", "byte 7"),
            ("[FOO 2 3 ]", "\"FOO\" at byte 1"),
            ("[SM 1 2 ", "byte 0"),
            ("[SM 1 2 ] ]", "byte 10"),
            ("[MIN ]", "no arguments"),
            ("[SM 12 3 ]", "byte 4"),
            ("", "empty"),
            ("]", "byte 0"),
        ] {
            let e = Tree::parse(s).unwrap_err().to_string();
            assert!(e.contains(want), "{s:?}: {e}");
        }
    }

    #[test]
    fn generated_trees_round_trip_and_respect_config() {
        let cfg = ListOpsConfig::default();
        let mut rng = Rng::new(11);
        let mut depths = [0usize; 5];
        for _ in 0..2000 {
            let t = generate(&mut rng, &cfg);
            t.validate().unwrap();
            assert_eq!(Tree::parse(&t.to_string()).unwrap(), t);
            assert!(t.nodes.len() <= cfg.max_nodes);
            assert!(t.nodes[t.root].token >= OP_MIN);
            for n in &t.nodes {
                assert!(n.children.is_empty() || (2..=cfg.max_args).contains(&n.children.len()));
            }
            let levels = t.levels();
            assert_eq!(levels.len(), t.depth() + 1);
            let mut level_of = vec![0; t.nodes.len()];
            for (k, l) in levels.iter().enumerate() {
                for &i in l {
                    level_of[i] = k;
                }
            }
            for (i, n) in t.nodes.iter().enumerate() {
                assert!(n.children.iter().all(|&c| level_of[c] < level_of[i]));
                if !n.children.is_empty() {
                    let top = n.children.iter().map(|&c| level_of[c]).max().unwrap();
                    assert_eq!(top + 1, level_of[i]);
                }
            }
            depths[t.depth()] += 1;
        }
        assert_eq!(depths[0], 0);
        assert!(depths[1..].iter().all(|&d| d > 300), "{depths:?}");
    }

    #[test]
    fn deterministic_and_labels_spread() {
        let cfg = ListOpsConfig::default();
        let a = batch(&mut Rng::new(5), &cfg, 500);
        assert_eq!(a, batch(&mut Rng::new(5), &cfg, 500));
        assert_ne!(a, batch(&mut Rng::new(6), &cfg, 500));
        let mut hist = [0usize; 10];
        for (t, &l) in a.trees.iter().zip(&a.labels) {
            assert_eq!(t.value(), l);
            hist[l as usize] += 1;
        }
        assert!(hist.iter().all(|&h| h > 10 && h < 150), "{hist:?}");
    }

    #[test]
    fn tiny_configs_do_not_panic() {
        let mut rng = Rng::new(0);
        for (d, a, n) in [(0, 0, 0), (10, 2, 5), (1, 10, 3), (6, 9, 13)] {
            let cfg = ListOpsConfig {
                max_depth: d,
                max_args: a,
                max_nodes: n,
            };
            for _ in 0..50 {
                let t = generate(&mut rng, &cfg);
                t.validate().unwrap();
                assert!(t.nodes.len() <= n.max(3));
            }
        }
    }
}
