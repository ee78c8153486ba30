//! Device budgets as users write them: bytes (`512MiB`, `2GB`, `1048576`) or a fraction of
//! the same step's unlimited peak (`25%`).

use dynn_core::{Error, Result};

/// A device memory budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// No limit.
    Unlimited,
    /// A fixed number of bytes.
    Bytes(usize),
    /// A fraction (0, 1] of the unlimited run's peak device bytes, resolved after profiling.
    FractionOfPeak(f64),
}

impl Budget {
    /// Resolves to bytes given the unlimited peak (needed only for fractions).
    pub fn resolve(self, unlimited_peak: Option<usize>) -> Result<Option<usize>> {
        match self {
            Budget::Unlimited => Ok(None),
            Budget::Bytes(b) => Ok(Some(b)),
            Budget::FractionOfPeak(f) => {
                let peak = unlimited_peak.ok_or_else(|| {
                    Error::invalid(
                        "budget",
                        format!(
                            "a budget of {:.1}% needs the unlimited peak: profile a step first",
                            f * 100.0
                        ),
                    )
                })?;
                Ok(Some((peak as f64 * f).round() as usize))
            }
        }
    }
}

impl std::str::FromStr for Budget {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim();
        let bad = |why: &str| {
            Error::invalid(
                "budget",
                format!(
                    "cannot parse {s:?} as a device budget: {why} (examples: 512MiB, 2GB, 25%, unlimited)"
                ),
            )
        };
        if t.eq_ignore_ascii_case("unlimited") || t.eq_ignore_ascii_case("none") {
            return Ok(Budget::Unlimited);
        }
        if let Some(p) = t.strip_suffix('%') {
            let v: f64 = p.trim().parse().map_err(|_| bad("not a number before %"))?;
            if !(v > 0.0 && v <= 100.0) {
                return Err(bad("a percentage must be in (0, 100]"));
            }
            return Ok(Budget::FractionOfPeak(v / 100.0));
        }
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let v: f64 = num.parse().map_err(|_| bad("no number"))?;
        let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1.0,
            "k" | "kb" => 1e3,
            "kib" => 1024.0,
            "m" | "mb" => 1e6,
            "mib" => 1024.0 * 1024.0,
            "g" | "gb" => 1e9,
            "gib" => 1024.0 * 1024.0 * 1024.0,
            _ => return Err(bad("unknown unit")),
        };
        Ok(Budget::Bytes((v * mult).round() as usize))
    }
}

/// Formats bytes for people (`1.50 MiB`).
pub fn human_bytes(b: usize) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_budgets() {
        assert_eq!(
            "512MiB".parse::<Budget>().unwrap(),
            Budget::Bytes(512 << 20)
        );
        assert_eq!(
            "2GB".parse::<Budget>().unwrap(),
            Budget::Bytes(2_000_000_000)
        );
        assert_eq!(
            "25%".parse::<Budget>().unwrap(),
            Budget::FractionOfPeak(0.25)
        );
        assert_eq!("1048576".parse::<Budget>().unwrap(), Budget::Bytes(1 << 20));
        assert_eq!("unlimited".parse::<Budget>().unwrap(), Budget::Unlimited);
        let e = "12 parsecs".parse::<Budget>().unwrap_err().to_string();
        assert!(
            e.contains("12 parsecs") && e.contains("unknown unit"),
            "{e}"
        );
        assert!("0%".parse::<Budget>().is_err());
        assert_eq!(
            Budget::FractionOfPeak(0.5).resolve(Some(1000)).unwrap(),
            Some(500)
        );
        assert!(Budget::FractionOfPeak(0.5).resolve(None).is_err());
    }

    #[test]
    fn human() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 19), "1.50 MiB");
    }
}
