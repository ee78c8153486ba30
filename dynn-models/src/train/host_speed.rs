//! A fixed piece of host work, timed between training steps: how fast this process's CPU ran
//! while it trained. Runs of one configuration on a shared machine can differ by more than a
//! memory policy does; dividing host-bound times by this figure compares runs made at
//! different host speeds (`scripts/gpu-check.sh sim` scales the simulator's inputs with it).

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Instant;

/// Repetitions per probe; the probe reports their median.
const REPEATS: usize = 5;
/// Entries of the probe's map and vector: small enough to stay in the L2 cache.
const ENTRIES: u64 = 1024;

/// Microseconds the reference work takes now: the median of a few repetitions of hashing,
/// small allocations and a sort, the kind of work that dispatching an op does.
pub fn host_reference_us() -> f64 {
    let mut times = [0.0; REPEATS];
    for t in &mut times {
        let started = Instant::now();
        black_box(reference_work(black_box(ENTRIES)));
        *t = started.elapsed().as_secs_f64() * 1e6;
    }
    times.sort_by(f64::total_cmp);
    times[REPEATS / 2]
}

/// The work itself: a map filled and read back, a vector of boxed values sorted.
fn reference_work(n: u64) -> u64 {
    let mut map = HashMap::with_capacity(n as usize);
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut boxes = Vec::with_capacity(n as usize);
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        map.insert(x, i);
        boxes.push(Box::new(x));
    }
    boxes.sort_unstable();
    boxes
        .iter()
        .map(|b| map.get(b).copied().unwrap_or(0))
        .fold(0, u64::wrapping_add)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_work_reads_back_every_entry_it_wrote() {
        // Each value 0..n is read once: their sum.
        assert_eq!(reference_work(100), (0..100).sum::<u64>());
    }
}
