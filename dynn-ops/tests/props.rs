//! Property tests of the shape, broadcast and view logic against naive references computed from
//! coordinates: `Shape::broadcast_with`, every `Layout` view (transpose, permute, narrow,
//! broadcast_as, reshape, squeeze, unsqueeze) and its index iteration and block split, and the
//! kernels over random views (`contiguous`, a unary map, a broadcast binary op, a sum).

use dynn_core::{Layout, Shape};
use dynn_ops::prelude::*;
use proptest::prelude::*;

const CASES: u32 = 64;

// ----- broadcasting -----

/// numpy's rule, written out: align right, pad with 1s, each pair equal or one of them 1.
fn naive_broadcast(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    let pad = |s: &[usize]| -> Vec<usize> {
        std::iter::repeat_n(1, rank - s.len())
            .chain(s.iter().copied())
            .collect()
    };
    let (a, b) = (pad(a), pad(b));
    a.iter()
        .zip(&b)
        .map(|(&x, &y)| match (x, y) {
            _ if x == y => Some(x),
            (1, y) => Some(y),
            (x, 1) => Some(x),
            _ => None,
        })
        .collect()
}

fn small_shape(max_rank: usize) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(0usize..4, 0..=max_rank)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn broadcast_is_commutative_and_matches_numpy(a in small_shape(4), b in small_shape(4)) {
        let (sa, sb) = (Shape::new(&a), Shape::new(&b));
        let ab = sa.broadcast_with(&sb, "t").ok().map(|s| s.to_vec());
        let ba = sb.broadcast_with(&sa, "t").ok().map(|s| s.to_vec());
        prop_assert_eq!(&ab, &ba);
        prop_assert_eq!(&ab, &naive_broadcast(&a, &b));
        if let Some(out) = ab {
            // Both operands broadcast to the result as layouts.
            let out = Shape::new(&out);
            prop_assert!(Layout::contiguous(sa.clone()).broadcast_as(&out).is_ok());
            prop_assert!(Layout::contiguous(sb.clone()).broadcast_as(&out).is_ok());
            prop_assert_eq!(out.broadcast_with(&out, "t").unwrap(), out);
        }
    }

    #[test]
    fn broadcast_with_itself_and_with_scalar_is_identity(a in small_shape(5)) {
        let s = Shape::new(&a);
        prop_assert_eq!(s.broadcast_with(&s, "t").unwrap(), s.clone());
        prop_assert_eq!(s.broadcast_with(&Shape::scalar(), "t").unwrap(), s.clone());
        prop_assert_eq!(Shape::scalar().broadcast_with(&s, "t").unwrap(), s);
    }
}

// ----- views against a coordinate reference -----

/// A view as a naive reference: its dims and, in row-major order, the buffer index of each
/// element.
#[derive(Debug, Clone)]
struct Naive {
    dims: Vec<usize>,
    idx: Vec<usize>,
}

fn unravel(mut flat: usize, dims: &[usize]) -> Vec<usize> {
    let mut c = vec![0; dims.len()];
    for d in (0..dims.len()).rev() {
        c[d] = flat % dims[d];
        flat /= dims[d];
    }
    c
}

fn ravel(c: &[usize], dims: &[usize]) -> usize {
    c.iter().zip(dims).fold(0, |acc, (&i, &d)| acc * d + i)
}

impl Naive {
    fn contiguous(dims: &[usize]) -> Self {
        Naive {
            dims: dims.to_vec(),
            idx: (0..dims.iter().product()).collect(),
        }
    }
    /// A new view whose element at coordinates `c` is the old element at `src(c)`.
    fn map(&self, dims: Vec<usize>, src: impl Fn(&[usize]) -> Vec<usize>) -> Self {
        let n = dims.iter().product();
        let idx = (0..n)
            .map(|f| self.idx[ravel(&src(&unravel(f, &dims)), &self.dims)])
            .collect();
        Naive { dims, idx }
    }
}

/// One view step with raw random parameters, resolved against the current shape.
#[derive(Debug, Clone)]
enum Step {
    Transpose(usize, usize),
    Permute(u64),
    Narrow(usize, usize, usize),
    Broadcast(usize, u64),
    Reshape(usize, usize),
    Squeeze(usize),
    Unsqueeze(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0usize..8, 0usize..8).prop_map(|(a, b)| Step::Transpose(a, b)),
        any::<u64>().prop_map(Step::Permute),
        (0usize..8, 0usize..8, 0usize..8).prop_map(|(d, s, l)| Step::Narrow(d, s, l)),
        (0usize..3, any::<u64>()).prop_map(|(k, m)| Step::Broadcast(k, m)),
        (0usize..3, 0usize..8).prop_map(|(k, d)| Step::Reshape(k, d)),
        (0usize..8).prop_map(Step::Squeeze),
        (0usize..8).prop_map(Step::Unsqueeze),
    ]
}

/// What a step does, resolved for a shape; `None` when it does not apply to that shape.
#[derive(Debug, Clone)]
enum View {
    Transpose(usize, usize),
    Permute(Vec<usize>),
    Narrow(usize, usize, usize),
    Broadcast(Vec<usize>),
    Reshape(Vec<usize>),
    Squeeze(usize),
    Unsqueeze(usize),
}

fn resolve(step: &Step, dims: &[usize]) -> Option<View> {
    let rank = dims.len();
    match *step {
        Step::Transpose(a, b) => (rank > 0).then(|| View::Transpose(a % rank, b % rank)),
        Step::Permute(seed) => {
            let mut p: Vec<usize> = (0..rank).collect();
            let mut s = seed;
            for i in (1..rank).rev() {
                p.swap(i, (s % (i as u64 + 1)) as usize);
                s /= i as u64 + 1;
            }
            Some(View::Permute(p))
        }
        Step::Narrow(d, s, l) => {
            if rank == 0 {
                return None;
            }
            let d = d % rank;
            let start = s % (dims[d] + 1);
            let len = l % (dims[d] - start + 1);
            Some(View::Narrow(d, start, len))
        }
        Step::Broadcast(lead, mask) => {
            if rank + lead > 6 {
                return None;
            }
            let mut out: Vec<usize> = (0..lead)
                .map(|i| 1 + ((mask >> (2 * i)) % 3) as usize)
                .collect();
            for (i, &d) in dims.iter().enumerate() {
                out.push(if d == 1 {
                    1 + ((mask >> (8 + 2 * i)) % 3) as usize
                } else {
                    d
                });
            }
            Some(View::Broadcast(out))
        }
        Step::Reshape(kind, d) => {
            let n: usize = dims.iter().product();
            match kind {
                0 => Some(View::Reshape(vec![n])),
                1 if rank >= 2 => {
                    let d = d % (rank - 1);
                    let mut out = dims[..d].to_vec();
                    out.push(dims[d] * dims[d + 1]);
                    out.extend_from_slice(&dims[d + 2..]);
                    Some(View::Reshape(out))
                }
                2 if (1..6).contains(&rank) => {
                    let d = d % rank;
                    let f = (2..=dims[d]).find(|f| dims[d] % f == 0)?;
                    let mut out = dims[..d].to_vec();
                    out.extend([f, dims[d] / f]);
                    out.extend_from_slice(&dims[d + 1..]);
                    Some(View::Reshape(out))
                }
                _ => None,
            }
        }
        Step::Squeeze(d) => {
            let ones: Vec<usize> = (0..rank).filter(|&i| dims[i] == 1).collect();
            (!ones.is_empty()).then(|| View::Squeeze(ones[d % ones.len()]))
        }
        Step::Unsqueeze(d) => (rank < 6).then(|| View::Unsqueeze(d % (rank + 1))),
    }
}

fn apply_naive(v: &View, n: &Naive) -> Naive {
    match v {
        &View::Transpose(a, b) => {
            let mut dims = n.dims.clone();
            dims.swap(a, b);
            n.map(dims, |c| {
                let mut o = c.to_vec();
                o.swap(a, b);
                o
            })
        }
        View::Permute(p) => {
            let dims = p.iter().map(|&i| n.dims[i]).collect();
            n.map(dims, |c| {
                let mut o = vec![0; c.len()];
                for (i, &pi) in p.iter().enumerate() {
                    o[pi] = c[i];
                }
                o
            })
        }
        &View::Narrow(d, start, len) => {
            let mut dims = n.dims.clone();
            dims[d] = len;
            n.map(dims, |c| {
                let mut o = c.to_vec();
                o[d] += start;
                o
            })
        }
        View::Broadcast(out) => {
            let lead = out.len() - n.dims.len();
            n.map(out.clone(), |c| {
                c[lead..]
                    .iter()
                    .zip(&n.dims)
                    .map(|(&i, &d)| if d == 1 { 0 } else { i })
                    .collect()
            })
        }
        View::Reshape(out) => Naive {
            dims: out.clone(),
            idx: n.idx.clone(),
        },
        &View::Squeeze(d) => {
            let mut dims = n.dims.clone();
            dims.remove(d);
            Naive {
                dims,
                idx: n.idx.clone(),
            }
        }
        &View::Unsqueeze(d) => {
            let mut dims = n.dims.clone();
            dims.insert(d, 1);
            Naive {
                dims,
                idx: n.idx.clone(),
            }
        }
    }
}

/// The layout version; `Ok(None)` for a reshape of a non-contiguous layout (which needs a copy).
fn apply_layout(v: &View, l: &Layout) -> dynn_core::Result<Option<Layout>> {
    Ok(Some(match v {
        &View::Transpose(a, b) => l.transpose(a, b)?,
        View::Permute(p) => l.permute(p)?,
        &View::Narrow(d, s, len) => l.narrow(d, s, len)?,
        View::Broadcast(out) => l.broadcast_as(&Shape::new(out))?,
        View::Reshape(out) => return l.reshape(&Shape::new(out)),
        &View::Squeeze(d) => l.squeeze(d)?,
        &View::Unsqueeze(d) => l.unsqueeze(d)?,
    }))
}

fn apply_tensor(v: &View, t: &Tensor) -> dynn_core::Result<Tensor> {
    match v {
        &View::Transpose(a, b) => t.transpose(a, b),
        View::Permute(p) => t.permute(p),
        &View::Narrow(d, s, len) => t.narrow(d, s, len),
        View::Broadcast(out) => t.broadcast_as(out.clone()),
        View::Reshape(out) => t.reshape(out.clone()),
        &View::Squeeze(d) => t.squeeze(d),
        &View::Unsqueeze(d) => t.unsqueeze(d),
    }
}

fn base_shape() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..5, 1..=4)
}

/// Checks a layout's iteration, extent, contiguity and block split against the reference.
fn check_layout(l: &Layout, n: &Naive) -> std::result::Result<(), TestCaseError> {
    prop_assert_eq!(l.dims(), &n.dims[..]);
    let got: Vec<usize> = l.indices().collect();
    prop_assert_eq!(&got, &n.idx);
    prop_assert_eq!(l.max_extent(), n.idx.iter().max().map_or(0, |m| m + 1));
    let contiguous_run = n.idx.windows(2).all(|w| w[1] == w[0] + 1);
    if !n.idx.is_empty() {
        prop_assert_eq!(
            l.is_contiguous(),
            contiguous_run,
            "is_contiguous of {:?}",
            l
        );
    }
    if let Some((a, b)) = l.contiguous_range() {
        prop_assert_eq!((a..b).collect::<Vec<_>>(), got.clone());
    }
    let (offsets, block) = l.blocks();
    if !n.idx.is_empty() {
        let from_blocks: Vec<usize> = offsets.iter().flat_map(|&o| o..o + block).collect();
        prop_assert_eq!(from_blocks, got);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// Every layout view maps coordinates to buffer indices as the coordinate reference does.
    #[test]
    fn layout_views_match_coordinates(dims in base_shape(), steps in prop::collection::vec(step(), 1..6)) {
        let mut n = Naive::contiguous(&dims);
        let mut l = Layout::contiguous(Shape::new(&dims));
        check_layout(&l, &n)?;
        for s in &steps {
            let Some(v) = resolve(s, &n.dims) else { continue };
            let next = apply_layout(&v, &l).map_err(|e| TestCaseError::fail(format!("{v:?} on {l:?}: {e}")))?;
            let Some(next) = next else {
                // Reshape refused only where the elements are not one row-major run.
                prop_assert!(!l.is_contiguous(), "reshape refused a contiguous layout {:?}", l);
                continue;
            };
            n = apply_naive(&v, &n);
            l = next;
            check_layout(&l, &n)?;
        }
    }

    /// The tensor views give the reference's elements, and the kernels over them (contiguous,
    /// a unary map, a broadcast binary op, a last-dim sum) compute on the right elements.
    #[test]
    fn kernels_over_random_views_gather_the_right_elements(dims in base_shape(), steps in prop::collection::vec(step(), 1..6)) {
        let count: usize = dims.iter().product();
        let base = Tensor::from_vec((0..count).map(|i| i as f32).collect::<Vec<_>>(), dims.clone(), Device::Cpu).unwrap();
        let mut t = base.clone();
        let mut n = Naive::contiguous(&dims);
        for s in &steps {
            let Some(v) = resolve(s, &n.dims) else { continue };
            t = apply_tensor(&v, &t).map_err(|e| TestCaseError::fail(format!("{v:?} on {t:?}: {e}")))?;
            n = apply_naive(&v, &n);
        }
        let want: Vec<f32> = n.idx.iter().map(|&i| i as f32).collect();
        prop_assert_eq!(t.dims(), &n.dims[..]);
        prop_assert_eq!(&t.to_vec::<f32>().unwrap(), &want);
        let c = t.contiguous().unwrap();
        prop_assert!(c.is_contiguous());
        prop_assert_eq!(&c.to_vec::<f32>().unwrap(), &want);
        let neg = t.neg().unwrap().to_vec::<f32>().unwrap();
        prop_assert_eq!(neg, want.iter().map(|x| -x).collect::<Vec<_>>());
        let doubled = t.add(&c).unwrap().to_vec::<f32>().unwrap();
        prop_assert_eq!(doubled, want.iter().map(|x| 2.0 * x).collect::<Vec<_>>());
        if let Some(&last) = n.dims.last() {
            let rows = t.sum_dims(&[n.dims.len() - 1], false).unwrap().to_vec::<f32>().unwrap();
            prop_assert_eq!(rows.len(), n.dims[..n.dims.len() - 1].iter().product::<usize>());
            if last > 0 {
                prop_assert_eq!(rows, want.chunks(last).map(|r| r.iter().sum()).collect::<Vec<f32>>());
            } else {
                prop_assert!(rows.iter().all(|&r| r == 0.0));
            }
        }
    }
}
