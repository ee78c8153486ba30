//! Next-use distance buckets: what the pilot predicts for every live buffer.

/// How many buckets there are.
pub const BUCKETS: usize = 5;

/// Upper bounds (inclusive, in ops) of the first four buckets; the fifth is "later, or not
/// this step".
pub const BOUNDS: [u64; BUCKETS - 1] = [1, 8, 32, 128];

/// The bucket "later, or not this step".
pub const LATER: u8 = (BUCKETS - 1) as u8;

/// Printable names of the buckets, in order.
pub const NAMES: [&str; BUCKETS] = ["<=1", "<=8", "<=32", "<=128", "later"];

/// The bucket of a next use `distance` ops ahead (`None`: not again this step).
pub fn bucket(distance: Option<u64>) -> u8 {
    match distance {
        Some(d) => BOUNDS.iter().position(|&b| d <= b).unwrap_or(BUCKETS - 1) as u8,
        None => LATER,
    }
}

/// A distance standing for bucket `b` when ranking: its upper bound, `u64::MAX` for
/// [`LATER`].
pub fn representative(b: u8) -> u64 {
    BOUNDS.get(b as usize).copied().unwrap_or(u64::MAX)
}

/// The smallest distance bucket `b` holds.
pub fn lower_bound(b: u8) -> u64 {
    match b {
        0 => 0,
        b => BOUNDS.get(b as usize - 1).map_or(u64::MAX, |&u| u + 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_follow_the_bounds() {
        let got: Vec<u8> = [1, 2, 8, 9, 32, 33, 128, 129, 10_000]
            .iter()
            .map(|&d| bucket(Some(d)))
            .collect();
        assert_eq!(got, [0, 1, 1, 2, 2, 3, 3, 4, 4]);
        assert_eq!(bucket(None), LATER);
        assert_eq!(lower_bound(2), 9);
        assert_eq!(representative(4), u64::MAX);
    }
}
