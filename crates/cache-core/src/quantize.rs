//! Percentages as exact decimals.
//!
//! A percentage arrives as an `f64` parsed from JSON. Rounding it with float arithmetic
//! (`(x * 1000.0).round()`) gives answers that differ from the decimal the client wrote
//! (`32.4445 * 1000.0` is `32444.499…`). Instead we take Rust's shortest round-trip
//! decimal form of the float, which is the literal the client sent whenever it had at
//! most 17 significant digits, and round that text. Everything after this module works
//! on integer thousandths, so the canonical form is the same on every platform.

use std::fmt;

/// A percentage in thousandths of a percent (`32.5` is `32_500`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Thousandths(pub u32);

impl Thousandths {
    /// Rounds a finite, non-negative value half away from zero to 3 decimals.
    /// Returns `None` for negative, non-finite or absurdly large values.
    pub fn round_from_f64(value: f64) -> Option<Self> {
        if !(0.0..=1_000_000.0).contains(&value) {
            return None;
        }
        // `Display` for f64 prints the shortest decimal that round-trips, never in
        // exponent form, so the text is plain digits with an optional point.
        let text = value.to_string();
        let (int_part, frac_part) = text.split_once('.').unwrap_or((&text, ""));
        let int: u32 = int_part.parse().ok()?;
        let frac = frac_part.as_bytes();
        let digit = |i: usize| frac.get(i).map_or(0, |b| u32::from(b - b'0'));
        let mut thousandths = int * 1000 + digit(0) * 100 + digit(1) * 10 + digit(2);
        if digit(3) >= 5 {
            thousandths += 1;
        }
        Some(Self(thousandths))
    }

    /// Floors to a multiple of `step`.
    pub fn floor_to(self, step: QuantizationStep) -> Self {
        let step = step.thousandths();
        Self(self.0 / step * step)
    }
}

impl fmt::Display for Thousandths {
    /// Shortest decimal text: `32500` prints `32.5`, `32000` prints `32`, `5` prints `0.005`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (int, frac) = (self.0 / 1000, self.0 % 1000);
        if frac == 0 {
            return write!(f, "{int}");
        }
        let digits = format!("{frac:03}");
        write!(f, "{int}.{}", digits.trim_end_matches('0'))
    }
}

/// The bucket width percentages are floored to: a positive number of at most 10 with at
/// most 2 decimals (`0.5` by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuantizationStep {
    hundredths: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("must be a positive number of at most 10 with at most 2 decimals, got {0:?}")]
pub struct InvalidStep(pub String);

impl QuantizationStep {
    pub const DEFAULT: Self = Self { hundredths: 50 };

    pub fn from_hundredths(hundredths: u16) -> Result<Self, InvalidStep> {
        if (1..=1000).contains(&hundredths) {
            Ok(Self { hundredths })
        } else {
            Err(InvalidStep(format!("{hundredths} hundredths")))
        }
    }

    pub fn thousandths(self) -> u32 {
        u32::from(self.hundredths) * 10
    }
}

impl Default for QuantizationStep {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl std::str::FromStr for QuantizationStep {
    type Err = InvalidStep;

    /// Parses decimal text exactly (`"0.5"`, `"1"`, `"2.25"`), without going through f64.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidStep(text.to_owned());
        let (int, frac) = text.trim().split_once('.').unwrap_or((text.trim(), ""));
        let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if int.is_empty()
            || int.len() > 2
            || frac.len() > 2
            || !all_digits(int)
            || !all_digits(frac)
        {
            return Err(invalid());
        }
        let int: u16 = int.parse().map_err(|_| invalid())?;
        let frac: u16 = format!("{frac:0<2}").parse().map_err(|_| invalid())?;
        Self::from_hundredths(int * 100 + frac).map_err(|_| invalid())
    }
}

impl fmt::Display for QuantizationStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Thousandths(self.thousandths()).fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(v: f64, step: &str) -> String {
        let step: QuantizationStep = step.parse().expect("valid step");
        Thousandths::round_from_f64(v)
            .expect("in range")
            .floor_to(step)
            .to_string()
    }

    #[test]
    fn design_examples() {
        assert_eq!(q(32.4, "0.5"), "32");
        assert_eq!(q(32.6, "0.5"), "32.5");
        assert_eq!(q(32.4, "1.0"), "32");
        assert_eq!(q(32.6, "1.0"), "32");
    }

    #[test]
    fn rounds_half_away_from_zero_on_the_decimal_the_client_wrote() {
        // 32.4445 is 32.44449999… as a double; the decimal rounds up.
        assert_eq!(
            Thousandths::round_from_f64(32.4445),
            Some(Thousandths(32_445))
        );
        assert_eq!(
            Thousandths::round_from_f64(32.4444),
            Some(Thousandths(32_444))
        );
        assert_eq!(Thousandths::round_from_f64(0.0005), Some(Thousandths(1)));
        assert_eq!(Thousandths::round_from_f64(0.0004999), Some(Thousandths(0)));
        // Rounding happens before flooring: 32.4996 rounds to 32.5, then stays 32.5.
        assert_eq!(q(32.4996, "0.5"), "32.5");
        assert_eq!(q(1e-7, "0.01"), "0");
    }

    #[test]
    fn rejects_what_is_not_a_percentage() {
        for bad in [-0.1, f64::NAN, f64::INFINITY, 1e300] {
            assert_eq!(Thousandths::round_from_f64(bad), None, "{bad}");
        }
    }

    #[test]
    fn step_parsing_is_exact() {
        let ok = [
            ("0.5", 50),
            ("1", 100),
            ("1.0", 100),
            ("0.01", 1),
            ("10", 1000),
            ("2.25", 225),
        ];
        for (text, hundredths) in ok {
            let step: QuantizationStep = text.parse().expect(text);
            assert_eq!(step.hundredths, hundredths, "{text}");
        }
        for bad in [
            "0", "0.00", "10.01", "11", "-1", "0.125", "abc", "", ".5", "1e0",
        ] {
            assert!(
                bad.parse::<QuantizationStep>().is_err(),
                "{bad:?} should be rejected"
            );
        }
        assert_eq!(QuantizationStep::DEFAULT.to_string(), "0.5");
    }
}
