//! The one typed error of dynn.

use crate::{DType, Device, Shape};

/// Everything that can go wrong in dynn, with enough context to say what and where.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Two shapes that must agree do not.
    #[error("{op}: shape mismatch: {lhs} vs {rhs}")]
    ShapeMismatch {
        /// The op that found the mismatch.
        op: &'static str,
        /// The first shape.
        lhs: Shape,
        /// The second shape.
        rhs: Shape,
    },
    /// Two dtypes that must agree do not, or a dtype the op does not support.
    #[error("{op}: dtype mismatch: expected {expected:?}, got {got:?}")]
    DTypeMismatch {
        /// The op that found the mismatch.
        op: &'static str,
        /// The dtype it wanted.
        expected: DType,
        /// The dtype it got.
        got: DType,
    },
    /// An op does not support a dtype.
    #[error("{op}: unsupported dtype {dtype:?}{hint}")]
    UnsupportedDType {
        /// The op.
        op: &'static str,
        /// The dtype it got.
        dtype: DType,
        /// Extra context, may be empty.
        hint: String,
    },
    /// Tensors on different devices, or a device that is not available.
    #[error("{op}: device error: {msg}")]
    Device {
        /// The op (or component) that found the problem.
        op: &'static str,
        /// What happened.
        msg: String,
    },
    /// Tensors on different devices were combined.
    #[error("{op}: device mismatch: {lhs:?} vs {rhs:?}")]
    DeviceMismatch {
        /// The op.
        op: &'static str,
        /// The first device.
        lhs: Device,
        /// The second device.
        rhs: Device,
    },
    /// A dimension index outside the tensor's rank.
    #[error("{op}: dimension {dim} out of range for a tensor of rank {rank} (shape {shape})")]
    DimOutOfRange {
        /// The op.
        op: &'static str,
        /// The dimension asked for (may be negative).
        dim: i64,
        /// The rank of the tensor.
        rank: usize,
        /// The shape of the tensor.
        shape: Shape,
    },
    /// An index (in an index tensor or a slice bound) outside its range.
    #[error("{op}: index {index} out of range for size {size}{context}")]
    IndexOutOfRange {
        /// The op.
        op: &'static str,
        /// The offending index.
        index: i64,
        /// The size of the indexed dimension.
        size: usize,
        /// Where the index was, may be empty.
        context: String,
    },
    /// An argument that is invalid for the op.
    #[error("{op}: invalid argument: {msg}")]
    InvalidArgument {
        /// The op.
        op: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// A device pool could not satisfy a request.
    #[error("out of memory: {msg}")]
    OutOfMemory {
        /// Requested bytes.
        requested: usize,
        /// The budget in bytes.
        budget: usize,
        /// A report of what was resident (multi-line).
        msg: String,
    },
    /// A buffer's bytes were accessed while not resident on the device.
    #[error(
        "{op}: buffer {buffer} is not resident on the device (it is {residency:?}); install a memory manager that fetches it"
    )]
    NotResident {
        /// The op that wanted it.
        op: &'static str,
        /// The buffer id.
        buffer: u64,
        /// Where the buffer is.
        residency: crate::Residency,
    },
    /// A checkpoint file that cannot be read, is truncated or corrupt, or does not match the
    /// model (the message names the tensor).
    #[error("checkpoint {path}: {msg}")]
    Checkpoint {
        /// The file.
        path: String,
        /// What is wrong, naming the tensor where one is at fault.
        msg: String,
    },
    /// Autograd was asked for something it cannot do.
    #[error("autograd: {0}")]
    Autograd(String),
    /// A file could not be read or written.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// Anything else, with context.
    #[error("{0}")]
    Msg(String),
}

/// dynn's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::InvalidArgument`] for `op`.
    pub fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        Error::InvalidArgument {
            op,
            msg: msg.into(),
        }
    }

    /// An [`Error::ShapeMismatch`] for `op`.
    pub fn shape_mismatch(op: &'static str, lhs: &Shape, rhs: &Shape) -> Self {
        Error::ShapeMismatch {
            op,
            lhs: lhs.clone(),
            rhs: rhs.clone(),
        }
    }

    /// An [`Error::UnsupportedDType`] for `op`.
    pub fn unsupported_dtype(op: &'static str, dtype: DType) -> Self {
        Error::UnsupportedDType {
            op,
            dtype,
            hint: String::new(),
        }
    }
}
