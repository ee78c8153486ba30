//! Scalar math for kernels: vectorizable f32 approximations (accurate to a few ulp) and the
//! exact std functions for f64. Kernels call these through [`FastMath`].
//!
//! Polynomials are evaluated with `mul_add`: one fused instruction per term where the CPU
//! has FMA (every x86-64 kernel path above the baseline, see `simd_task`), and one rounding
//! instead of two, so every path still gives the same bits. Separate multiplies and adds
//! cost gelu 25% and gelu_erf 16% of their time in cache (AVX-512 host).

use dynn_core::AccFloat;

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// `c[0]·x^(N-1) + … + c[N-1]` by Horner's rule, one `mul_add` per term (highest power
/// first).
#[inline(always)]
fn horner_f32<const N: usize>(x: f32, c: [f32; N]) -> f32 {
    const { assert!(N > 0, "a polynomial needs a coefficient") }; // so `c[0]` is in bounds
    c[1..].iter().fold(c[0], |p, &k| p.mul_add(x, k))
}

/// [`horner_f32`] in f64.
#[inline(always)]
fn horner_f64<const N: usize>(x: f64, c: [f64; N]) -> f64 {
    const { assert!(N > 0, "a polynomial needs a coefficient") }; // so `c[0]` is in bounds
    c[1..].iter().fold(c[0], |p, &k| p.mul_add(x, k))
}

/// e^x for f32: range reduction to r in [-ln2/2, ln2/2] (Cody–Waite, fused) and a degree-6
/// polynomial (Cephes), branch-free so loops over it vectorize.
#[inline(always)]
#[allow(clippy::excessive_precision)] // Cephes coefficients, as published.
pub fn exp_f32(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to the nearest integer.
    let xc = x.clamp(-87.3, 88.5);
    let shifted = xc.mul_add(LOG2E, MAGIC);
    let n = shifted - MAGIC;
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, xc));
    let z = r * r;
    let p = horner_f32(
        r,
        [
            1.987_569_1e-4,
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            5.000_000_1e-1,
        ],
    );
    let y = p.mul_add(z, r) + 1.0;
    // n as an integer, read from the mantissa bits the magic addition left it in: integer
    // arithmetic that vectorizes, where the saturating `n as i32` would not (and, as
    // |n| <= 128, the same value). A NaN x gives garbage bits here, replaced below.
    let ni = (shifted.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let scale = f32::from_bits((ni.wrapping_add(127) << 23) as u32);
    let v = y * scale;
    if x > 88.72 {
        f32::INFINITY
    } else if x < -87.33 {
        0.0
    } else if x.is_nan() {
        x
    } else {
        v
    }
}

/// tanh for f32: an odd polynomial near 0 (Cephes), `1 - 2/(e^{2x}+1)` elsewhere.
#[inline(always)]
#[allow(clippy::excessive_precision)] // Cephes coefficients, as published.
pub fn tanh_f32(x: f32) -> f32 {
    let a = x.abs();
    let z = x * x;
    let p = horner_f32(
        z,
        [
            -5.704_988_7e-3,
            2.063_908_9e-2,
            -5.373_971_6e-2,
            1.333_144_5e-1,
            -3.333_328_2e-1,
        ],
    );
    let small = (x * z).mul_add(p, x);
    let e = exp_f32(2.0 * a);
    let big = 1.0 - 2.0 / (e + 1.0);
    let big = if x < 0.0 { -big } else { big };
    if a < 0.625 { small } else { big }
}

/// erf for f32, branch-free so loops over it vectorize: `x·P(x²)/Q(x²)`, both of degree 5,
/// evaluated in f64 on x clamped to ±3.92 (beyond which erf rounds to ±1 in f32). The
/// coefficients are this project's fit (relative error 1.9e-8 on [0, 3.92]; linearised least
/// squares on 300 Chebyshev nodes, reweighted toward minimax). Evaluating them in f32 would
/// lose ~5 ulp to rounding; in f64 the result is within 4.8e-8 of erf, about one ulp, and
/// 2.3× faster than the erfc-with-exponential form it replaced (AVX2, values in L2). The f64
/// division is the loop's bottleneck on AVX-512, yet an f32 reciprocal refined by a Newton
/// step measured slower (the conversions cost more than the division saves).
#[inline(always)]
#[allow(clippy::excessive_precision)] // Fitted coefficients, as printed by the fit.
pub fn erf_f32(x: f32) -> f32 {
    let x = f64::from(x.clamp(-3.92, 3.92));
    let s = x * x;
    let p = horner_f64(
        s,
        [
            2.050_204_126_256_489_1e-6,
            2.848_692_616_589_279e-4,
            3.765_002_671_737_722_3e-3,
            5.274_684_056_278_784_5e-2,
            1.903_921_006_700_927_4e-1,
            1.128_379_146_570_648_8,
        ],
    );
    let q = horner_f64(
        s,
        [
            3.809_221_738_321_110_3e-5,
            1.162_386_939_737_286_5e-3,
            1.496_799_083_823_115_6e-2,
            1.141_031_867_553_786_7e-1,
            5.020_633_513_470_686_8e-1,
            1.0,
        ],
    );
    (x * p / q) as f32
}

/// Math that kernels need, fast on f32 and exact on f64.
pub trait FastMath: AccFloat {
    /// e^x.
    fn fexp(self) -> Self;
    /// tanh x.
    fn ftanh(self) -> Self;
    /// erf x.
    fn ferf(self) -> Self;
    /// 1 / (1 + e^-x).
    #[inline(always)]
    fn fsigmoid(self) -> Self {
        Self::ONE / (Self::ONE + (-self).fexp())
    }
}

impl FastMath for f32 {
    #[inline(always)]
    fn fexp(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn ftanh(self) -> Self {
        tanh_f32(self)
    }
    #[inline(always)]
    fn ferf(self) -> Self {
        erf_f32(self)
    }
}

impl FastMath for f64 {
    #[inline(always)]
    fn fexp(self) -> Self {
        self.exp()
    }
    #[inline(always)]
    fn ftanh(self) -> Self {
        self.tanh()
    }
    #[inline(always)]
    fn ferf(self) -> Self {
        dynn_core::erf(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let rel = ((exp_f32(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn exp_reads_its_exponent_from_bits_as_the_cast_would() {
        // The power of two taken from the magic sum's bits equals `n as i32`, so exp gives
        // the bits it gave with the (scalar) saturating cast, over the whole clamped range.
        const MAGIC: f32 = 12_582_912.0;
        let mut x = -90.0f32;
        while x < 90.0 {
            let xc = x.clamp(-87.3, 88.5);
            let shifted = xc.mul_add(LOG2E, MAGIC);
            let n = shifted - MAGIC;
            let ni = (shifted.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
            assert_eq!(ni, n as i32, "x = {x}");
            x += 0.003;
        }
    }

    #[test]
    fn erf_is_accurate() {
        let mut x = -7.0f32;
        while x < 7.0 {
            let want = dynn_core::erf(x as f64);
            let err = (erf_f32(x) as f64 - want).abs();
            // About one ulp of 1 (4.8e-8 measured).
            assert!(err <= 6e-8 * want.abs().max(1.0), "erf({x}) err {err}");
            x += 0.001_37;
        }
        for tiny in [1e-30f32, -3e-8, 1e-4] {
            let want = dynn_core::erf(tiny as f64);
            assert!(
                (erf_f32(tiny) as f64 - want).abs() <= 1e-7 * want.abs(),
                "erf({tiny})"
            );
        }
        assert_eq!(erf_f32(f32::INFINITY), 1.0);
        assert_eq!(erf_f32(f32::NEG_INFINITY), -1.0);
        assert!(erf_f32(f32::NAN).is_nan());
    }

    #[test]
    fn tanh_is_accurate() {
        let mut x = -12.0f32;
        while x < 12.0 {
            let want = (x as f64).tanh();
            let err = (tanh_f32(x) as f64 - want).abs();
            assert!(err <= 3e-7 * want.abs().max(1e-3), "tanh({x}) err {err}");
            x += 0.00731;
        }
    }
}
