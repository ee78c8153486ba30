//! Plain host memory holding one buffer's elements.

use crate::{DType, Element, Error, Result};
use half::{bf16, f16};

/// A typed vector of elements in host memory: the CPU backend's device storage and every
/// backend's host tier.
///
/// Dropping one hands a large allocation to the [host cache](crate::host_cache), and
/// [`vec_from_fill`] takes from it, so a training loop's steps reuse each other's memory.
#[derive(Debug, PartialEq)]
pub enum CpuStorage {
    /// f32 elements.
    F32(Vec<f32>),
    /// f16 elements.
    F16(Vec<f16>),
    /// bf16 elements.
    BF16(Vec<bf16>),
    /// f64 elements.
    F64(Vec<f64>),
    /// i64 elements.
    I64(Vec<i64>),
    /// u32 elements.
    U32(Vec<u32>),
    /// u8 elements (masks).
    U8(Vec<u8>),
}

/// Runs `$body` with `$v` bound to the typed vector inside a [`CpuStorage`] (by reference).
#[macro_export]
macro_rules! with_cpu_storage {
    ($s:expr, $v:ident => $body:expr) => {
        match $s {
            $crate::CpuStorage::F32($v) => $body,
            $crate::CpuStorage::F16($v) => $body,
            $crate::CpuStorage::BF16($v) => $body,
            $crate::CpuStorage::F64($v) => $body,
            $crate::CpuStorage::I64($v) => $body,
            $crate::CpuStorage::U32($v) => $body,
            $crate::CpuStorage::U8($v) => $body,
        }
    };
}

impl Drop for CpuStorage {
    fn drop(&mut self) {
        with_cpu_storage!(self, v => crate::host_cache::give(std::mem::take(v)));
    }
}

impl Clone for CpuStorage {
    fn clone(&self) -> Self {
        fn copy<T: Copy>(v: &[T]) -> Vec<T> {
            vec_from_fill(v.len(), |out| {
                for (o, &x) in out.iter_mut().zip(v) {
                    o.write(x);
                }
            })
        }
        match self {
            CpuStorage::F32(v) => CpuStorage::F32(copy(v)),
            CpuStorage::F16(v) => CpuStorage::F16(copy(v)),
            CpuStorage::BF16(v) => CpuStorage::BF16(copy(v)),
            CpuStorage::F64(v) => CpuStorage::F64(copy(v)),
            CpuStorage::I64(v) => CpuStorage::I64(copy(v)),
            CpuStorage::U32(v) => CpuStorage::U32(copy(v)),
            CpuStorage::U8(v) => CpuStorage::U8(copy(v)),
        }
    }
}

/// A Rust element type that can be stored in (and borrowed out of) a [`CpuStorage`].
pub trait CpuElement: Element {
    /// Borrows the typed slice when the storage holds this type.
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    /// Mutably borrows the typed slice when the storage holds this type.
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
    /// Wraps a vector.
    fn wrap(v: Vec<Self>) -> CpuStorage;
}

macro_rules! cpu_element {
    ($t:ty, $v:ident) => {
        impl CpuElement for $t {
            #[inline]
            fn slice(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$v(v) => Some(v),
                    _ => None,
                }
            }
            #[inline]
            fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
                match s {
                    CpuStorage::$v(v) => Some(v),
                    _ => None,
                }
            }
            #[inline]
            fn wrap(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$v(v)
            }
        }
    };
}
cpu_element!(f32, F32);
cpu_element!(f16, F16);
cpu_element!(bf16, BF16);
cpu_element!(f64, F64);
cpu_element!(i64, I64);
cpu_element!(u32, U32);
cpu_element!(u8, U8);

impl CpuStorage {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::F64(_) => DType::F64,
            CpuStorage::I64(_) => DType::I64,
            CpuStorage::U32(_) => DType::U32,
            CpuStorage::U8(_) => DType::U8,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        with_cpu_storage!(self, v => v.len())
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `len` zeros of `dtype`.
    pub fn zeros(dtype: DType, len: usize) -> Self {
        match dtype {
            DType::F32 => CpuStorage::F32(vec![0.0; len]),
            DType::F16 => CpuStorage::F16(vec![f16::ZERO; len]),
            DType::BF16 => CpuStorage::BF16(vec![bf16::ZERO; len]),
            DType::F64 => CpuStorage::F64(vec![0.0; len]),
            DType::I64 => CpuStorage::I64(vec![0; len]),
            DType::U32 => CpuStorage::U32(vec![0; len]),
            DType::U8 => CpuStorage::U8(vec![0; len]),
        }
    }

    /// Borrows the elements as `&[T]`, or a dtype error naming `op`.
    pub fn as_slice<T: CpuElement>(&self, op: &'static str) -> Result<&[T]> {
        T::slice(self).ok_or(Error::DTypeMismatch {
            op,
            expected: T::DTYPE,
            got: self.dtype(),
        })
    }

    /// Mutably borrows the elements as `&mut [T]`, or a dtype error naming `op`.
    pub fn as_mut_slice<T: CpuElement>(&mut self, op: &'static str) -> Result<&mut [T]> {
        let got = self.dtype();
        T::slice_mut(self).ok_or(Error::DTypeMismatch {
            op,
            expected: T::DTYPE,
            got,
        })
    }

    /// Every element converted to f64 (for tests and printing).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        with_cpu_storage!(self, v => v.iter().map(|x| x.to_f64()).collect())
    }

    /// Size in bytes.
    pub fn size_in_bytes(&self) -> usize {
        self.len() * self.dtype().size_in_bytes()
    }
}

/// Builds a vector of `len` elements by filling uninitialised memory with `fill`, which must
/// write every element of the slice it is given. Avoids zeroing memory a kernel overwrites,
/// and reuses a freed allocation of the same size from the [host cache](crate::host_cache).
pub fn vec_from_fill<T: Copy>(
    len: usize,
    fill: impl FnOnce(&mut [std::mem::MaybeUninit<T>]),
) -> Vec<T> {
    let mut v: Vec<T> = crate::host_cache::take(len).unwrap_or_else(|| Vec::with_capacity(len));
    fill(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: `fill`'s contract is to initialise all `len` elements, and `T: Copy` has no drop.
    unsafe { v.set_len(len) };
    v
}
