//! [`KeyMap`]: hash maps keyed by buffer ids and keys, hashed with one multiply. The memory
//! manager, the simulator and the pilot look such keys up on every op; the keys are already
//! spread, so SipHash's resistance to chosen keys buys nothing there.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Hashes a `u64` key (a buffer id or key) with one multiply and a rotation.
#[derive(Debug, Clone, Copy, Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0 ^ x)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29);
    }
}

/// A hash map keyed by buffer ids or keys (anything that hashes as one `u64`).
pub type KeyMap<K, V> = HashMap<K, V, BuildHasherDefault<KeyHasher>>;

#[cfg(test)]
mod tests {
    use super::KeyMap;
    use dynn_core::BufferId;

    #[test]
    fn ids_and_keys_index_a_map() {
        let mut m: KeyMap<BufferId, u64> = KeyMap::default();
        for i in 0..1000u64 {
            m.insert(BufferId(i * 7919), i);
        }
        assert_eq!(m.len(), 1000);
        assert!((0..1000u64).all(|i| m.get(&BufferId(i * 7919)) == Some(&i)));
        assert_eq!(m.get(&BufferId(1)), None);
    }
}
