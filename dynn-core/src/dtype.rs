//! Element types.

use half::{bf16, f16};

/// The element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// 32-bit float, the default.
    F32,
    /// 16-bit IEEE float (computed in f32).
    F16,
    /// 16-bit brain float (computed in f32).
    BF16,
    /// 64-bit float, for gradient checks.
    F64,
    /// 64-bit signed integer, for indices.
    I64,
    /// 32-bit unsigned integer, for indices.
    U32,
    /// 8-bit unsigned integer, for masks: comparisons return 0/1 in it (one byte per element).
    U8,
}

impl DType {
    /// Every dtype.
    pub const ALL: [DType; 7] = [
        DType::F32,
        DType::F64,
        DType::F16,
        DType::BF16,
        DType::I64,
        DType::U32,
        DType::U8,
    ];

    /// Size of one element in bytes.
    pub const fn size_in_bytes(self) -> usize {
        match self {
            DType::U8 => 1,
            DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::U32 => 4,
            DType::F64 | DType::I64 => 8,
        }
    }

    /// True for the floating-point dtypes.
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
    }

    /// True for the integer (index) dtypes: I64 and U32 (U8 is for masks, not indices).
    pub const fn is_int(self) -> bool {
        matches!(self, DType::I64 | DType::U32)
    }

    /// A short lowercase name (`f32`, `bf16`, ...), as used in safetensors and CUDA kernel names.
    pub const fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F64 => "f64",
            DType::I64 => "i64",
            DType::U32 => "u32",
            DType::U8 => "u8",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Rust type that can be a tensor element.
pub trait Element: Copy + Send + Sync + PartialOrd + std::fmt::Debug + Default + 'static {
    /// The matching [`DType`].
    const DTYPE: DType;
    /// Converts to f64 (exact for every float dtype; indices up to 2^53).
    fn to_f64(self) -> f64;
    /// Converts from f64 (rounding to nearest).
    fn from_f64(v: f64) -> Self;
    /// Zero.
    fn zero() -> Self {
        Self::default()
    }
}

/// A floating-point element, computed in its accumulator type (`f32` for the 16-bit types).
pub trait FloatElement: Element {
    /// The type arithmetic is done in.
    type Acc: num_like::AccFloat;
    /// Widens to the accumulator type.
    fn to_acc(self) -> Self::Acc;
    /// Narrows from the accumulator type (round to nearest even).
    fn from_acc(v: Self::Acc) -> Self;
}

macro_rules! element {
    ($t:ty, $d:ident, $to:expr, $from:expr) => {
        impl Element for $t {
            const DTYPE: DType = DType::$d;
            #[inline(always)]
            fn to_f64(self) -> f64 {
                $to(self)
            }
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                $from(v)
            }
        }
    };
}
element!(f32, F32, |v: f32| v as f64, |v: f64| v as f32);
element!(f64, F64, |v: f64| v, |v: f64| v);
element!(
    f16,
    F16,
    |v: f16| crate::f16_to_f32(v) as f64,
    f16::from_f64
);
element!(bf16, BF16, |v: bf16| v.to_f64(), bf16::from_f64);
element!(i64, I64, |v: i64| v as f64, |v: f64| v as i64);
element!(u32, U32, |v: u32| v as f64, |v: f64| v as u32);
element!(u8, U8, |v: u8| v as f64, |v: f64| v as u8);

macro_rules! float_element {
    ($t:ty, $acc:ty, $to:expr, $from:expr) => {
        impl FloatElement for $t {
            type Acc = $acc;
            #[inline(always)]
            fn to_acc(self) -> $acc {
                $to(self)
            }
            #[inline(always)]
            fn from_acc(v: $acc) -> Self {
                $from(v)
            }
        }
    };
}
float_element!(f32, f32, |v: f32| v, |v: f32| v);
float_element!(f64, f64, |v: f64| v, |v: f64| v);
float_element!(f16, f32, crate::f16_to_f32, crate::f32_to_f16);
float_element!(bf16, f32, |v: bf16| v.to_f32(), bf16::from_f32);

/// The arithmetic a kernel needs from an accumulator float (`f32` or `f64`).
pub mod num_like {
    /// Float arithmetic used by generic kernels.
    pub trait AccFloat:
        Copy
        + Send
        + Sync
        + PartialOrd
        + std::fmt::Debug
        + std::ops::Add<Output = Self>
        + std::ops::Sub<Output = Self>
        + std::ops::Mul<Output = Self>
        + std::ops::Div<Output = Self>
        + std::ops::Neg<Output = Self>
        + std::ops::AddAssign
        + 'static
    {
        /// 0.
        const ZERO: Self;
        /// 1.
        const ONE: Self;
        /// Negative infinity.
        const NEG_INFINITY: Self;
        /// Positive infinity.
        const INFINITY: Self;
        /// From f64.
        fn of(v: f64) -> Self;
        /// To f64.
        fn f64(self) -> f64;
        /// e^x.
        fn exp(self) -> Self;
        /// ln x.
        fn ln(self) -> Self;
        /// Square root.
        fn sqrt(self) -> Self;
        /// Hyperbolic tangent.
        fn tanh(self) -> Self;
        /// Sine.
        fn sin(self) -> Self;
        /// Cosine.
        fn cos(self) -> Self;
        /// Absolute value.
        fn abs(self) -> Self;
        /// x^y.
        fn powf(self, y: Self) -> Self;
        /// The larger (NaN-propagating is not guaranteed).
        fn max(self, o: Self) -> Self;
        /// The smaller.
        fn min(self, o: Self) -> Self;
        /// Error function.
        fn erf(self) -> Self;
        /// True for NaN.
        fn is_nan(self) -> bool;
    }
    macro_rules! acc {
        ($t:ty) => {
            impl AccFloat for $t {
                const ZERO: Self = 0.0;
                const ONE: Self = 1.0;
                const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
                const INFINITY: Self = <$t>::INFINITY;
                #[inline(always)]
                fn of(v: f64) -> Self {
                    v as $t
                }
                #[inline(always)]
                fn f64(self) -> f64 {
                    self as f64
                }
                #[inline(always)]
                fn exp(self) -> Self {
                    <$t>::exp(self)
                }
                #[inline(always)]
                fn ln(self) -> Self {
                    <$t>::ln(self)
                }
                #[inline(always)]
                fn sqrt(self) -> Self {
                    <$t>::sqrt(self)
                }
                #[inline(always)]
                fn tanh(self) -> Self {
                    <$t>::tanh(self)
                }
                #[inline(always)]
                fn sin(self) -> Self {
                    <$t>::sin(self)
                }
                #[inline(always)]
                fn cos(self) -> Self {
                    <$t>::cos(self)
                }
                #[inline(always)]
                fn abs(self) -> Self {
                    <$t>::abs(self)
                }
                #[inline(always)]
                fn powf(self, y: Self) -> Self {
                    <$t>::powf(self, y)
                }
                #[inline(always)]
                fn max(self, o: Self) -> Self {
                    <$t>::max(self, o)
                }
                #[inline(always)]
                fn min(self, o: Self) -> Self {
                    <$t>::min(self, o)
                }
                #[inline(always)]
                fn is_nan(self) -> bool {
                    <$t>::is_nan(self)
                }
                #[inline(always)]
                fn erf(self) -> Self {
                    super::erf(self as f64) as $t
                }
            }
        };
    }
    acc!(f32);
    acc!(f64);
}

/// The error function, to about 1e-15 (W. J. Cody's rational approximations via erfc).
pub fn erf(x: f64) -> f64 {
    // Abramowitz–Stegun 7.1.26 is too coarse for f64 gradient checks; use a series /
    // continued fraction split that is accurate to double precision.
    if x.is_nan() {
        return x;
    }
    let ax = x.abs();
    let r = if ax < 2.0 {
        // Maclaurin series: erf x = 2/sqrt(pi) * sum (-1)^n x^(2n+1) / (n! (2n+1)).
        let x2 = ax * ax;
        let mut term = ax;
        let mut sum = ax;
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -x2 / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else if ax < 6.0 {
        // Continued fraction for erfc (Lentz), converges fast for x >= 2.
        let x2 = ax * ax;
        let mut f = ax;
        let mut c = ax;
        let mut d = 0.0;
        for k in 1..200 {
            let a = k as f64 / 2.0;
            d = ax + a * d;
            d = 1.0 / d;
            c = ax + a / c;
            let delta = c * d;
            f *= delta;
            if (delta - 1.0).abs() < 1e-16 {
                break;
            }
        }
        1.0 - (-x2).exp() / (f * std::f64::consts::PI.sqrt())
    } else {
        1.0
    };
    if x < 0.0 { -r } else { r }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        let cases = [
            (0.0, 0.0),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.5, 0.999_593_047_982_555),
            (-1.5, -0.966_105_146_475_310_7),
        ];
        for (x, want) in cases {
            assert!(
                (erf(x) - want).abs() < 1e-13,
                "erf({x}) = {} want {want}",
                erf(x)
            );
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(DType::BF16.size_in_bytes(), 2);
        assert_eq!(DType::I64.size_in_bytes(), 8);
        assert!(DType::F16.is_float() && DType::U32.is_int());
    }
}
