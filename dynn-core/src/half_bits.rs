//! f16 ↔ f32 conversions written as integer and float arithmetic with selects, so that a loop
//! over them vectorizes. The `half` crate's own conversions test for the F16C instructions at
//! run time on every call (unless the whole build targets them), which keeps every f16
//! kernel loop scalar. Both give the same bits: IEEE round-to-nearest-even, and NaNs quieted
//! with their payload kept, as F16C does.

use half::f16;

/// f16 → f32, exactly.
#[inline(always)]
pub fn f16_to_f32(h: f16) -> f32 {
    let h = h.to_bits() as u32;
    let sign = (h & 0x8000) << 16;
    let magnitude = h & 0x7fff;
    // Normal: the exponent rebiased from 15 to 127.
    let normal = (magnitude << 13) + ((127 - 15) << 23);
    // Infinity or NaN (a NaN quieted, its payload kept).
    let quiet = if magnitude > 0x7c00 { 0x0040_0000 } else { 0 };
    let special = (magnitude << 13) | 0x7f80_0000 | quiet;
    // Zero or subnormal: the mantissa times 2^-24, exact in f32.
    let small = (magnitude as f32 * f32::from_bits(0x3380_0000)).to_bits();
    let bits = if magnitude < 0x0400 {
        small
    } else if magnitude >= 0x7c00 {
        special
    } else {
        normal
    };
    f32::from_bits(sign | bits)
}

/// f32 → f16, rounded to nearest, ties to even.
#[inline(always)]
pub fn f32_to_f16(x: f32) -> f16 {
    let x = x.to_bits();
    let sign = (x >> 16) & 0x8000;
    let magnitude = x & 0x7fff_ffff;
    // A NaN, quieted, keeps the top of its payload.
    let nan = 0x7e00 | ((magnitude & 0x007f_ffff) >> 13);
    // Normal in f16: rebias the exponent, then round the 13 bits that go (adding one less than
    // half, plus the kept part's lowest bit, rounds ties to even). A carry out of the mantissa
    // steps the exponent, up to infinity (0x7c00) for 65520 and above.
    let rebiased = magnitude.wrapping_sub((127 - 15) << 23);
    let normal = rebiased.wrapping_add(0x0fff + ((rebiased >> 13) & 1)) >> 13;
    // Subnormal or zero in f16 (below 2^-14): adding 0.5 leaves the value's bits at 2^-24
    // steps, rounded by the float unit itself.
    let small = (f32::from_bits(magnitude) + 0.5)
        .to_bits()
        .wrapping_sub(0x3f00_0000);
    let bits = if magnitude > 0x7f80_0000 {
        nan
    } else if magnitude >= 0x4780_0000 {
        0x7c00
    } else if magnitude < 0x3880_0000 {
        small
    } else {
        normal
    };
    f16::from_bits((sign | bits) as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_f16_widens_as_half_does() {
        for bits in 0..=u16::MAX {
            let h = f16::from_bits(bits);
            assert_eq!(
                f16_to_f32(h).to_bits(),
                h.to_f32().to_bits(),
                "f16 bits {bits:#06x}"
            );
        }
    }

    #[test]
    fn f32_narrows_as_half_does_at_every_rounding_boundary() {
        let check = |x: f32| {
            assert_eq!(
                f32_to_f16(x).to_bits(),
                f16::from_f32(x).to_bits(),
                "f32 bits {:#010x}",
                x.to_bits()
            );
        };
        // Around every f16 value, widened: the value, its neighbours, and the points where
        // rounding changes (a half step of the f16's own mantissa, 2^12 in f32 bits, and one
        // either side of it), in both signs.
        for h in 0..=u16::MAX {
            let w = f16::from_bits(h).to_f32().to_bits();
            for d in [0u32, 1, 0x0fff, 0x1000, 0x1001, 0x1fff] {
                check(f32::from_bits(w.wrapping_add(d)));
                check(f32::from_bits(w.wrapping_sub(d)));
            }
        }
        // Far outside f16's range, and a spread of other bit patterns.
        let mut s = 0x9e37_79b9u32;
        for _ in 0..1_000_000 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            check(f32::from_bits(s));
        }
        for x in [
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-30,
            65504.0,
            65519.99,
            65520.0,
            1e10,
        ] {
            check(x);
            check(-x);
        }
    }
}
