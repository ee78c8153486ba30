//! Layouts: how a tensor's shape maps onto its buffer (offset + strides), and zero-copy views.

use crate::shape::Dims;
use crate::{Dim, Error, Result, Shape};

/// Where a tensor's elements live in its buffer: element offset of the first element and
/// a stride (in elements) per dim. A stride of 0 broadcasts.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    shape: Shape,
    strides: Dims,
    offset: usize,
}

impl Layout {
    /// A contiguous row-major layout starting at offset 0.
    pub fn contiguous(shape: impl Into<Shape>) -> Self {
        let shape = shape.into();
        let strides = shape.contiguous_strides();
        Layout {
            shape,
            strides,
            offset: 0,
        }
    }

    /// A layout from explicit parts. The caller guarantees it stays inside its buffer.
    pub fn from_parts(shape: Shape, strides: Dims, offset: usize) -> Self {
        Layout {
            shape,
            strides,
            offset,
        }
    }

    /// The shape.
    #[inline]
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The dims.
    #[inline]
    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }

    /// Strides in elements.
    #[inline]
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    /// Offset of the first element, in elements.
    #[inline]
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Number of elements.
    #[inline]
    pub fn elem_count(&self) -> usize {
        self.shape.elem_count()
    }

    /// True when the elements are stored row-major without gaps (any offset).
    pub fn is_contiguous(&self) -> bool {
        let mut acc = 1;
        for (&d, &s) in self.shape.dims().iter().zip(self.strides.iter()).rev() {
            if d != 1 && s != acc {
                return false;
            }
            acc *= d;
        }
        true
    }

    /// `Some((start, end))` element range when contiguous.
    pub fn contiguous_range(&self) -> Option<(usize, usize)> {
        self.is_contiguous()
            .then(|| (self.offset, self.offset + self.elem_count()))
    }

    /// One past the largest element index this layout touches (0 when empty).
    pub fn max_extent(&self) -> usize {
        if self.elem_count() == 0 {
            return 0;
        }
        self.offset
            + self
                .shape
                .dims()
                .iter()
                .zip(self.strides.iter())
                .map(|(&d, &s)| (d - 1) * s)
                .sum::<usize>()
            + 1
    }

    /// Swaps two dims.
    pub fn transpose<A: Dim, B: Dim>(&self, a: A, b: B) -> Result<Layout> {
        let a = a.index(&self.shape, "transpose")?;
        let b = b.index(&self.shape, "transpose")?;
        let mut l = self.clone();
        l.shape.dims_mut().swap(a, b);
        l.strides.swap(a, b);
        Ok(l)
    }

    /// Reorders the dims: output dim `i` is input dim `perm[i]`.
    pub fn permute(&self, perm: &[usize]) -> Result<Layout> {
        let rank = self.shape.rank();
        let mut seen = Dims::from_elem(0, rank);
        if perm.len() != rank
            || perm
                .iter()
                .any(|&p| p >= rank || std::mem::replace(&mut seen[p], 1) == 1)
        {
            return Err(Error::invalid(
                "permute",
                format!(
                    "{perm:?} is not a permutation of 0..{rank} for shape {}",
                    self.shape
                ),
            ));
        }
        let dims: Dims = perm.iter().map(|&p| self.shape.dims()[p]).collect();
        let strides: Dims = perm.iter().map(|&p| self.strides[p]).collect();
        Ok(Layout {
            shape: Shape::new(&dims),
            strides,
            offset: self.offset,
        })
    }

    /// The sub-range `start..start + len` of dim `d`.
    pub fn narrow<D: Dim>(&self, d: D, start: usize, len: usize) -> Result<Layout> {
        let d = d.index(&self.shape, "narrow")?;
        let size = self.shape.dims()[d];
        if start.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::IndexOutOfRange {
                op: "narrow",
                index: i64::try_from(start.saturating_add(len)).unwrap_or(i64::MAX),
                size,
                context: format!(
                    " (start {start} + len {len} on dim {d} of shape {})",
                    self.shape
                ),
            });
        }
        let mut l = self.clone();
        l.shape.dims_mut()[d] = len;
        if len > 0 {
            l.offset += start * self.strides[d];
        }
        Ok(l)
    }

    /// Expands size-1 dims (and new leading dims) to `shape` with stride 0.
    pub fn broadcast_as(&self, shape: &Shape) -> Result<Layout> {
        let (src, dst) = (self.shape.dims(), shape.dims());
        if dst.len() < src.len() {
            return Err(Error::shape_mismatch("broadcast_as", &self.shape, shape));
        }
        let lead = dst.len() - src.len();
        let mut strides = Dims::from_elem(0, dst.len());
        for (i, &d) in dst.iter().enumerate() {
            if i < lead {
                continue;
            }
            let s = src[i - lead];
            strides[i] = if s == d {
                self.strides[i - lead]
            } else if s == 1 {
                0
            } else {
                return Err(Error::shape_mismatch("broadcast_as", &self.shape, shape));
            };
        }
        Ok(Layout {
            shape: shape.clone(),
            strides,
            offset: self.offset,
        })
    }

    /// A new shape over the same elements; only for contiguous layouts (else `None`).
    pub fn reshape(&self, shape: &Shape) -> Result<Option<Layout>> {
        if shape.elem_count() != self.elem_count() {
            return Err(Error::invalid(
                "reshape",
                format!(
                    "cannot reshape {} ({} elements) to {} ({} elements)",
                    self.shape,
                    self.elem_count(),
                    shape,
                    shape.elem_count()
                ),
            ));
        }
        Ok(self.is_contiguous().then(|| Layout {
            shape: shape.clone(),
            strides: shape.contiguous_strides(),
            offset: self.offset,
        }))
    }

    /// Removes dim `d`, which must have size 1.
    pub fn squeeze<D: Dim>(&self, d: D) -> Result<Layout> {
        let d = d.index(&self.shape, "squeeze")?;
        if self.shape.dims()[d] != 1 {
            return Err(Error::invalid(
                "squeeze",
                format!(
                    "dim {d} of shape {} has size {}, not 1",
                    self.shape,
                    self.shape.dims()[d]
                ),
            ));
        }
        let mut l = self.clone();
        l.shape.dims_mut().remove(d);
        l.strides.remove(d);
        Ok(l)
    }

    /// Inserts a size-1 dim at position `d`.
    pub fn unsqueeze<D: Dim>(&self, d: D) -> Result<Layout> {
        let d = d.index_for_insert(&self.shape, "unsqueeze")?;
        let mut l = self.clone();
        let stride = if d < self.strides.len() {
            self.strides[d] * self.shape.dims()[d]
        } else {
            1
        };
        l.shape.dims_mut().insert(d, 1);
        l.strides.insert(d, stride);
        Ok(l)
    }

    /// Iterates over the buffer index of every element, in row-major order of the shape.
    #[inline]
    pub fn indices(&self) -> StridedIndex<'_> {
        StridedIndex::new(self)
    }

    /// The length of the contiguous run its innermost dims make (1 when the last dim is
    /// strided): the block length [`Layout::blocks`] would use, without listing the blocks.
    pub fn contiguous_block(&self) -> usize {
        self.contiguous_tail().1
    }

    /// `(k, block)`: the innermost dims from `k` on are one contiguous run of `block` elements.
    fn contiguous_tail(&self) -> (usize, usize) {
        let dims = self.shape.dims();
        let mut block = 1;
        let mut k = dims.len();
        while k > 0 && (dims[k - 1] == 1 || self.strides[k - 1] == block) {
            block *= dims[k - 1];
            k -= 1;
        }
        (k, block)
    }

    /// Splits the layout into `(outer element count, inner contiguous block length)` when the
    /// innermost `k` dims are contiguous, returning the buffer offsets of each block. Kernels use
    /// this to run contiguous inner loops over strided tensors.
    pub fn blocks(&self) -> (Vec<usize>, usize) {
        let (k, block) = self.contiguous_tail();
        let dims = self.shape.dims();
        let outer = Layout {
            shape: Shape::new(&dims[..k]),
            strides: Dims::from_slice(&self.strides[..k]),
            offset: self.offset,
        };
        (outer.indices().collect(), block)
    }
}

/// Row-major iterator over the buffer indices of a layout. Steps along the innermost dim with
/// one add; carries into the outer dims only at the end of a row.
pub struct StridedIndex<'a> {
    dims: &'a [usize],
    strides: &'a [usize],
    next: Option<usize>,
    counter: Dims,
}

impl<'a> StridedIndex<'a> {
    fn new(layout: &'a Layout) -> Self {
        let next = (layout.elem_count() > 0).then_some(layout.offset);
        StridedIndex {
            dims: layout.shape.dims(),
            strides: &layout.strides,
            next,
            counter: Dims::from_elem(0, layout.shape.rank()),
        }
    }
}

impl Iterator for StridedIndex<'_> {
    type Item = usize;
    #[inline]
    fn next(&mut self) -> Option<usize> {
        let cur = self.next?;
        let (dims, strides) = (self.dims, self.strides);
        let Some(last) = dims.len().checked_sub(1) else {
            // A scalar: one index.
            self.next = None;
            return Some(cur);
        };
        self.counter[last] += 1;
        if self.counter[last] < dims[last] {
            self.next = Some(cur + strides[last]);
            return Some(cur);
        }
        self.counter[last] = 0;
        let mut idx = cur - (dims[last] - 1) * strides[last];
        let mut d = last;
        loop {
            if d == 0 {
                self.next = None;
                break;
            }
            d -= 1;
            self.counter[d] += 1;
            if self.counter[d] < dims[d] {
                idx += strides[d];
                self.next = Some(idx);
                break;
            }
            idx -= (dims[d] - 1) * strides[d];
            self.counter[d] = 0;
        }
        Some(cur)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buffer indices by the definition: offset + Σ index·stride, row-major.
    fn naive(l: &Layout) -> Vec<usize> {
        let dims = l.dims();
        let mut out = Vec::new();
        let mut idx = vec![0usize; dims.len()];
        for _ in 0..l.elem_count() {
            out.push(
                l.offset()
                    + idx
                        .iter()
                        .zip(l.strides())
                        .map(|(i, s)| i * s)
                        .sum::<usize>(),
            );
            for d in (0..dims.len()).rev() {
                idx[d] += 1;
                if idx[d] < dims[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        out
    }

    #[test]
    fn strided_index_matches_the_definition() {
        let base = Layout::contiguous([3, 4, 5]);
        let cases = [
            Layout::contiguous(Shape::new(&[])),
            Layout::contiguous([7]),
            base.clone(),
            base.transpose(0, 2).unwrap(),
            base.transpose(1, 2).unwrap(),
            base.narrow(1, 1, 2).unwrap().narrow(2, 3, 2).unwrap(),
            Layout::contiguous([1, 4, 1, 2]),
            Layout::contiguous([5])
                .broadcast_as(&Shape::new(&[3, 2, 5]))
                .unwrap(),
            Layout::contiguous([3, 1])
                .broadcast_as(&Shape::new(&[3, 6]))
                .unwrap(),
            Layout::contiguous([0, 4]),
        ];
        for l in &cases {
            assert_eq!(l.indices().collect::<Vec<_>>(), naive(l), "{l:?}");
            let (offsets, block) = l.blocks();
            let flat: Vec<usize> = offsets.iter().flat_map(|&o| o..o + block).collect();
            if l.elem_count() > 0 {
                assert_eq!(flat, naive(l), "blocks of {l:?}");
            }
            assert_eq!(l.contiguous_block(), block);
        }
    }

    #[test]
    fn transpose_and_index() {
        let l = Layout::contiguous([2, 3]);
        let t = l.transpose(0, 1).unwrap();
        assert_eq!(t.dims(), &[3, 2]);
        assert!(!t.is_contiguous());
        assert_eq!(t.indices().collect::<Vec<_>>(), vec![0, 3, 1, 4, 2, 5]);
    }

    #[test]
    fn narrow_and_blocks() {
        let l = Layout::contiguous([4, 5]).narrow(1, 1, 3).unwrap();
        assert_eq!(l.offset(), 1);
        let (offs, block) = l.blocks();
        assert_eq!(block, 3);
        assert_eq!(offs, vec![1, 6, 11, 16]);
        assert!(Layout::contiguous([4, 5]).narrow(1, 3, 3).is_err());
    }

    #[test]
    fn broadcast_strides_zero() {
        let l = Layout::contiguous([3])
            .broadcast_as(&Shape::new(&[2, 3]))
            .unwrap();
        assert_eq!(l.strides(), &[0, 1]);
        assert_eq!(l.indices().collect::<Vec<_>>(), vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn unsqueeze_squeeze_roundtrip() {
        let l = Layout::contiguous([2, 3]);
        let u = l.unsqueeze(-1i32).unwrap();
        assert_eq!(u.dims(), &[2, 3, 1]);
        assert_eq!(u.squeeze(2).unwrap(), l);
        assert!(l.squeeze(0).is_err());
    }
}
