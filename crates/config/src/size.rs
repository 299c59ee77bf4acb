//! Byte sizes written the way people write them: `512MiB`, `2GB`, `4096`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// A number of bytes, parsed from and printed as a human string (`512MiB`).
///
/// Decimal units (`kB`, `MB`, `GB`, `TB`) are powers of 1000, binary units
/// (`KiB`, `MiB`, `GiB`, `TiB`) powers of 1024; units are case-insensitive
/// and a bare number is bytes. Fractions are allowed (`1.5GiB`) and rounded
/// down to whole bytes.
///
/// ```
/// use ollamacron_config::ByteSize;
///
/// let size: ByteSize = "512MiB".parse()?;
/// assert_eq!(size.bytes(), 512 * 1024 * 1024);
/// assert_eq!(size.to_string(), "512MiB");
/// # Ok::<(), ollamacron_config::ByteSizeParseError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(u64);

/// Why a string is not a [`ByteSize`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{input}` is not a size: {reason} (write e.g. `512MiB`, `2GB` or a number of bytes)")]
pub struct ByteSizeParseError {
    input: String,
    reason: &'static str,
}

const UNITS: &[(&str, u64)] = &[
    ("b", 1),
    ("kb", 1_000),
    ("kib", 1 << 10),
    ("mb", 1_000_000),
    ("mib", 1 << 20),
    ("gb", 1_000_000_000),
    ("gib", 1 << 30),
    ("tb", 1_000_000_000_000),
    ("tib", 1 << 40),
];

/// Units tried when printing a size; the one giving the smallest exact
/// number wins (binary first on a tie), so `512MiB` and `512MB` both print
/// as written.
const DISPLAY_UNITS: &[(&str, u64)] = &[
    ("TiB", 1 << 40),
    ("TB", 1_000_000_000_000),
    ("GiB", 1 << 30),
    ("GB", 1_000_000_000),
    ("MiB", 1 << 20),
    ("MB", 1_000_000),
    ("KiB", 1 << 10),
    ("kB", 1_000),
];

impl ByteSize {
    /// A size of exactly `bytes` bytes.
    #[must_use]
    pub const fn from_bytes(bytes: u64) -> Self {
        Self(bytes)
    }

    /// A size of `mib` mebibytes.
    #[must_use]
    pub const fn from_mib(mib: u64) -> Self {
        Self(mib.saturating_mul(1 << 20))
    }

    /// The number of bytes.
    #[must_use]
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = ByteSizeParseError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason| ByteSizeParseError {
            input: input.to_owned(),
            reason,
        };
        let trimmed = input.trim();
        let split = trimmed
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(trimmed.len());
        let (number, unit) = trimmed.split_at(split);
        if number.is_empty() {
            return Err(err("it does not start with a number"));
        }
        let unit = unit.trim().to_ascii_lowercase();
        let multiplier = if unit.is_empty() {
            1
        } else {
            UNITS
                .iter()
                .find(|(name, _)| *name == unit)
                .map(|(_, m)| *m)
                .ok_or_else(|| err("unknown unit (use B, kB, KiB, MB, MiB, GB, GiB, TB or TiB)"))?
        };
        let bytes = if let Some((whole, frac)) = number.split_once('.') {
            if frac.contains('.') || (whole.is_empty() && frac.is_empty()) {
                return Err(err("the number is malformed"));
            }
            let whole: u128 = if whole.is_empty() {
                0
            } else {
                whole.parse().map_err(|_| err("the number is too large"))?
            };
            // Keep at most 12 fractional digits: enough for TiB precision, and no overflow.
            let frac_digits = &frac[..frac.len().min(12)];
            let frac_value: u128 = if frac_digits.is_empty() {
                0
            } else {
                frac_digits
                    .parse()
                    .map_err(|_| err("the number is malformed"))?
            };
            let scale = 10u128.pow(u32::try_from(frac_digits.len()).unwrap_or(12));
            let m = u128::from(multiplier);
            whole
                .checked_mul(m)
                .and_then(|w| w.checked_add(frac_value * m / scale))
                .ok_or_else(|| err("the size is too large"))?
        } else {
            let whole: u128 = number.parse().map_err(|_| err("the number is too large"))?;
            whole
                .checked_mul(u128::from(multiplier))
                .ok_or_else(|| err("the size is too large"))?
        };
        u64::try_from(bytes)
            .map(Self)
            .map_err(|_| err("the size is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let best = DISPLAY_UNITS
            .iter()
            .filter(|(_, unit)| self.0 != 0 && self.0.is_multiple_of(*unit))
            .min_by_key(|(_, unit)| self.0 / unit);
        match best {
            Some((name, unit)) => write!(f, "{}{name}", self.0 / unit),
            None => write!(f, "{}B", self.0),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as `512MiB` or a number of bytes")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("`{v}` is not a size: it is negative")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_units() {
        assert_eq!("512MiB".parse::<ByteSize>().unwrap().bytes(), 512 << 20);
        assert_eq!("512 mib".parse::<ByteSize>().unwrap().bytes(), 512 << 20);
        assert_eq!("2GB".parse::<ByteSize>().unwrap().bytes(), 2_000_000_000);
        assert_eq!("4096".parse::<ByteSize>().unwrap().bytes(), 4096);
        assert_eq!("1.5KiB".parse::<ByteSize>().unwrap().bytes(), 1536);
        assert_eq!(".5KiB".parse::<ByteSize>().unwrap().bytes(), 512);
    }

    #[test]
    fn rejects_garbage_with_reason() {
        let e = "12 parsecs".parse::<ByteSize>().unwrap_err().to_string();
        assert!(
            e.contains("12 parsecs") && e.contains("unknown unit"),
            "{e}"
        );
        let e = "MiB".parse::<ByteSize>().unwrap_err().to_string();
        assert!(e.contains("does not start with a number"), "{e}");
        let e = "99999999999TiB"
            .parse::<ByteSize>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("too large"), "{e}");
        assert!("1.2.3MiB".parse::<ByteSize>().is_err());
        assert!(".".parse::<ByteSize>().is_err());
    }

    #[test]
    fn displays_largest_exact_binary_unit() {
        assert_eq!(ByteSize::from_mib(512).to_string(), "512MiB");
        assert_eq!(ByteSize::from_bytes(1 << 30).to_string(), "1GiB");
        assert_eq!(ByteSize::from_bytes(1000).to_string(), "1kB");
        assert_eq!(ByteSize::from_bytes(512_000_000).to_string(), "512MB");
        assert_eq!(ByteSize::from_bytes(1001).to_string(), "1001B");
        assert_eq!(ByteSize::from_bytes(0).to_string(), "0B");
    }

    proptest! {
        #[test]
        fn display_round_trips(bytes in any::<u64>()) {
            let size = ByteSize::from_bytes(bytes);
            prop_assert_eq!(size.to_string().parse::<ByteSize>().unwrap(), size);
        }

        #[test]
        fn parse_never_panics(s in ".{0,40}") {
            let _ = s.parse::<ByteSize>();
        }
    }
}
