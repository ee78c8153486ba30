//! Property tests of the device pool: live blocks never overlap, never exceed their segment
//! or the budget, and all accounting returns to zero; `fits` says exactly whether an
//! allocation would succeed, and a successful compaction leaves room for what it was asked.

use dynn_mm::DevicePool;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Step {
    Alloc(usize),
    Free(usize),
    /// Would this many bytes fit? (checked against a real allocation, then released)
    Probe(usize),
    /// Repack every live block, leaving room for this many bytes.
    Compact(usize),
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let size = prop_oneof![
        1usize..4096,
        4096usize..(1 << 20),
        (1usize << 20)..(24 << 20)
    ];
    prop::collection::vec(
        prop_oneof![
            4 => size.clone().prop_map(Step::Alloc),
            4 => (0usize..64).prop_map(Step::Free),
            1 => size.clone().prop_map(Step::Probe),
            1 => prop_oneof![Just(0usize), size].prop_map(Step::Compact),
        ],
        1..120,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    #[test]
    fn pool_invariants(seq in steps(), budget_mib in prop_oneof![Just(None), (8usize..96).prop_map(Some)]) {
        let budget = budget_mib.map(|m| m << 20);
        let mut pool = DevicePool::new(budget);
        let mut live = Vec::new();
        for step in seq {
            match step {
                Step::Alloc(n) => {
                    if let Ok(b) = pool.allocate(n) {
                        prop_assert!(b.size >= n);
                        live.push(b);
                    }
                }
                Step::Free(i) if !live.is_empty() => {
                    let b = live.swap_remove(i % live.len());
                    pool.release(b);
                }
                Step::Free(_) => {}
                Step::Probe(n) => {
                    let fits = pool.fits(n);
                    let got = pool.allocate(n);
                    prop_assert_eq!(fits, got.is_ok(), "fits({}) disagrees with allocate", n);
                    if let Ok(b) = got {
                        pool.release(b);
                    }
                }
                Step::Compact(room) => {
                    let before = pool.live_blocks();
                    match pool.compact(&live, room) {
                        Ok(moved) => {
                            prop_assert_eq!(moved.len(), live.len());
                            for (m, l) in moved.iter().zip(&live) {
                                prop_assert_eq!(m.size, l.size);
                            }
                            live = moved;
                            prop_assert!(room == 0 || pool.fits(room), "no room for {} after compaction", room);
                        }
                        Err(_) => prop_assert_eq!(pool.live_blocks(), before),
                    }
                }
            }
            let stats = pool.stats();
            prop_assert_eq!(stats.in_use, live.iter().map(|b| b.size).sum::<usize>());
            prop_assert!(stats.reserved <= pool.budget());
            prop_assert!(stats.in_use <= stats.reserved);
            let mut blocks = pool.live_blocks();
            blocks.sort();
            prop_assert_eq!(blocks.len(), live.len());
            for w in blocks.windows(2) {
                if w[0].0 == w[1].0 {
                    prop_assert!(w[0].1 + w[0].2 <= w[1].1, "overlap: {:?} and {:?}", w[0], w[1]);
                }
            }
        }
        for b in live.drain(..) {
            pool.release(b);
        }
        prop_assert_eq!(pool.stats().in_use, 0);
        pool.release_empty();
        prop_assert_eq!(pool.stats().reserved, 0);
    }
}
