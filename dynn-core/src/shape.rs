//! Shapes, dimension indices and broadcasting.

use crate::{Error, Result};
use smallvec::SmallVec;

/// Inline storage for dims and strides: no heap allocation up to rank 4.
pub type Dims = SmallVec<[usize; 4]>;

/// The extents of a tensor, outermost first.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Shape(Dims);

impl Shape {
    /// A shape from its dims.
    pub fn new(dims: &[usize]) -> Self {
        Shape(Dims::from_slice(dims))
    }

    /// The scalar shape (rank 0).
    pub fn scalar() -> Self {
        Shape(Dims::new())
    }

    /// The dims.
    #[inline]
    pub fn dims(&self) -> &[usize] {
        &self.0
    }

    /// Rank (number of dims).
    #[inline]
    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// Number of elements.
    #[inline]
    pub fn elem_count(&self) -> usize {
        self.0.iter().product()
    }

    /// Row-major strides of a contiguous tensor of this shape.
    pub fn contiguous_strides(&self) -> Dims {
        let mut strides = Dims::from_elem(0, self.rank());
        let mut acc = 1;
        for (s, d) in strides.iter_mut().zip(self.0.iter()).rev() {
            *s = acc;
            acc *= *d;
        }
        strides
    }

    /// The size of dim `d`, resolved with [`Dim`].
    pub fn dim<D: Dim>(&self, d: D, op: &'static str) -> Result<usize> {
        Ok(self.0[d.index(self, op)?])
    }

    /// The shape both `self` and `rhs` broadcast to (numpy rules), or a shape-mismatch error.
    pub fn broadcast_with(&self, rhs: &Shape, op: &'static str) -> Result<Shape> {
        let (l, r) = (self.dims(), rhs.dims());
        let rank = l.len().max(r.len());
        let mut out = Dims::from_elem(0, rank);
        for i in 0..rank {
            let a = if i + l.len() >= rank {
                l[i + l.len() - rank]
            } else {
                1
            };
            let b = if i + r.len() >= rank {
                r[i + r.len() - rank]
            } else {
                1
            };
            out[i] = match (a, b) {
                (a, b) if a == b => a,
                (1, b) => b,
                (a, 1) => a,
                _ => return Err(Error::shape_mismatch(op, self, rhs)),
            };
        }
        Ok(Shape(out))
    }

    /// Dims as a vector (convenience for tests and messages).
    pub fn to_vec(&self) -> Vec<usize> {
        self.0.to_vec()
    }

    pub(crate) fn dims_mut(&mut self) -> &mut Dims {
        &mut self.0
    }
}

impl std::fmt::Debug for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.dims())
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.dims())
    }
}

impl From<&[usize]> for Shape {
    fn from(d: &[usize]) -> Self {
        Shape::new(d)
    }
}
impl From<Vec<usize>> for Shape {
    fn from(d: Vec<usize>) -> Self {
        Shape(Dims::from_vec(d))
    }
}
impl<const N: usize> From<[usize; N]> for Shape {
    fn from(d: [usize; N]) -> Self {
        Shape::new(&d)
    }
}
impl<const N: usize> From<&[usize; N]> for Shape {
    fn from(d: &[usize; N]) -> Self {
        Shape::new(d)
    }
}
impl From<()> for Shape {
    fn from(_: ()) -> Self {
        Shape::scalar()
    }
}
impl From<usize> for Shape {
    fn from(d: usize) -> Self {
        Shape::new(&[d])
    }
}
impl From<(usize, usize)> for Shape {
    fn from(d: (usize, usize)) -> Self {
        Shape::new(&[d.0, d.1])
    }
}
impl From<(usize, usize, usize)> for Shape {
    fn from(d: (usize, usize, usize)) -> Self {
        Shape::new(&[d.0, d.1, d.2])
    }
}
impl From<(usize, usize, usize, usize)> for Shape {
    fn from(d: (usize, usize, usize, usize)) -> Self {
        Shape::new(&[d.0, d.1, d.2, d.3])
    }
}
impl From<&Shape> for Shape {
    fn from(s: &Shape) -> Self {
        s.clone()
    }
}

/// A dimension index: a `usize` counts from the front, a negative `i32`/`i64` from the back
/// (`-1` is the last dim).
pub trait Dim: Copy {
    /// Resolves to a dim index of `shape`, or [`Error::DimOutOfRange`] naming `op`.
    fn index(self, shape: &Shape, op: &'static str) -> Result<usize>;
    /// Resolves for a shape of rank `rank + 1` (the position of a new dim, as in `unsqueeze`).
    fn index_for_insert(self, shape: &Shape, op: &'static str) -> Result<usize>;
}

fn resolve(d: i64, rank: usize, shape: &Shape, op: &'static str) -> Result<usize> {
    let r = rank as i64;
    let i = if d < 0 { d + r } else { d };
    if i < 0 || i >= r {
        return Err(Error::DimOutOfRange {
            op,
            dim: d,
            rank: shape.rank(),
            shape: shape.clone(),
        });
    }
    Ok(i as usize)
}

macro_rules! dim_int {
    ($($t:ty),*) => {$(
        impl Dim for $t {
            fn index(self, shape: &Shape, op: &'static str) -> Result<usize> {
                resolve(self as i64, shape.rank(), shape, op)
            }
            fn index_for_insert(self, shape: &Shape, op: &'static str) -> Result<usize> {
                resolve(self as i64, shape.rank() + 1, shape, op)
            }
        }
    )*};
}
dim_int!(usize, i32, i64, isize);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_rules() {
        let a = Shape::new(&[4, 1, 3]);
        let b = Shape::new(&[5, 1]);
        assert_eq!(a.broadcast_with(&b, "t").unwrap().dims(), &[4, 5, 3]);
        assert!(
            Shape::new(&[2, 3])
                .broadcast_with(&Shape::new(&[4]), "add")
                .is_err()
        );
    }

    #[test]
    fn negative_dims() {
        let s = Shape::new(&[2, 3, 4]);
        assert_eq!((-1i32).index(&s, "t").unwrap(), 2);
        assert_eq!(0usize.index(&s, "t").unwrap(), 0);
        let e = 3usize.index(&s, "sum").unwrap_err().to_string();
        assert!(e.contains("sum") && e.contains("dimension 3"), "{e}");
        assert_eq!((-1i32).index_for_insert(&s, "t").unwrap(), 3);
    }
}
