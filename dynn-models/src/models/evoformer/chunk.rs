//! AlphaFold-style chunking: a layer applied to slices of rows in turn and the results
//! concatenated, so no intermediate holds more than a bound.

use dynn_core::{Result, Tensor};
use dynn_ops::prelude::*;

/// Rows per chunk: as many rows of `row_bytes` as fit `limit`, at least one and at most
/// `rows` (`None`: all of them).
pub fn rows_per_chunk(limit: Option<usize>, row_bytes: usize, rows: usize) -> usize {
    match limit {
        Some(limit) => (limit / row_bytes.max(1)).clamp(1, rows.max(1)),
        None => rows,
    }
}

/// `f(start, len)` for consecutive chunks of `chunk` rows out of `rows`, concatenated along
/// `dim` (one chunk: `f`'s result as it is).
pub fn map_chunks(
    rows: usize,
    chunk: usize,
    dim: usize,
    mut f: impl FnMut(usize, usize) -> Result<Tensor>,
) -> Result<Tensor> {
    let chunk = chunk.max(1);
    if chunk >= rows {
        return f(0, rows);
    }
    let parts = (0..rows)
        .step_by(chunk)
        .map(|start| f(start, chunk.min(rows - start)))
        .collect::<Result<Vec<_>>>()?;
    cat(&parts.iter().collect::<Vec<_>>(), dim)
}
