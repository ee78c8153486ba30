//! One file per op family: kernels, backward rule, idioms and cost in one place.

pub mod addcmul;
pub mod attention;
pub mod binary;
pub mod cast;
pub mod compare;
pub mod concat;
pub mod cross_entropy;
pub mod dropout;
pub mod indexing;
pub mod linear;
pub mod logical;
pub mod matmul;
pub mod norm;
pub mod optim;
pub mod random;
pub mod reduce;
pub mod softmax;
pub mod topk;
pub mod unary;
pub mod update;
pub mod views;

use dynn_core::{Error, Result, Tensor};

/// Checks that every input of `op` has the first one's dtype, and that it is a float dtype.
pub(crate) fn same_float_dtype(op: &'static str, inputs: &[&Tensor]) -> Result<()> {
    let Some(first) = inputs.first() else {
        return Ok(());
    };
    let dtype = first.dtype();
    if let Some(t) = inputs.iter().find(|t| t.dtype() != dtype) {
        return Err(Error::DTypeMismatch {
            op,
            expected: dtype,
            got: t.dtype(),
        });
    }
    if !dtype.is_float() {
        return Err(Error::unsupported_dtype(op, dtype));
    }
    Ok(())
}
