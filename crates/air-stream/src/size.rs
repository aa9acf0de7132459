//! Memory sizes as people write them (`512MiB`, `4GiB`, `30GB`), and the machine's free memory.

use std::fmt;
use std::str::FromStr;

/// A number of bytes, parsed from text with an optional unit: `B`; decimal `KB`, `MB`, `GB`,
/// `TB` (powers of 1000); binary `KiB`, `MiB`, `GiB`, `TiB` and the one-letter `K`, `M`, `G`,
/// `T` (powers of 1024). Units are case-insensitive and the number may have a fraction
/// (`1.5GiB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(u64);

/// Why a text is not a size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a size: {reason} (examples: 512MiB, 4GiB, 30GB)")]
pub struct ByteSizeError {
    text: String,
    reason: &'static str,
}

impl ByteSize {
    /// `bytes` bytes.
    pub const fn new(bytes: u64) -> Self {
        Self(bytes)
    }

    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = ByteSizeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = |reason| ByteSizeError { text: text.to_string(), reason };
        let trimmed = text.trim();
        let split = trimmed.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(trimmed.len());
        let (number, unit) = trimmed.split_at(split);
        let value: f64 = number.parse().map_err(|_| error("it does not start with a number"))?;
        let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "tb" => 1_000_000_000_000,
            "k" | "kib" => 1 << 10,
            "m" | "mib" => 1 << 20,
            "g" | "gib" => 1 << 30,
            "t" | "tib" => 1 << 40,
            _ => return Err(error("unknown unit")),
        };
        let bytes = value * multiplier as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(error("too large"));
        }
        Ok(Self(bytes.round() as u64))
    }
}

impl fmt::Display for ByteSize {
    /// Binary units with two decimals (`1.50 GiB`), bytes below 1 KiB.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
        if self.0 < 1024 {
            return write!(f, "{} B", self.0);
        }
        let mut value = self.0 as f64 / 1024.0;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        write!(f, "{value:.2} {}", UNITS[unit])
    }
}

/// Memory available for new allocations without swapping: the kernel's `MemAvailable`
/// (/proc/meminfo), or less when this process's cgroup (v2) has a memory limit, as in a container:
/// the limit minus the cgroup's anonymous memory (its page cache can be reclaimed).
pub fn available_memory() -> Option<ByteSize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let available = kib_field(&meminfo, "MemAvailable:")? * 1024;
    Some(ByteSize(cgroup_room().map_or(available, |room| room.min(available))))
}

/// The second field of the line of `text` starting with `key`, as a number.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()
}

/// Room left under the cgroup v2 memory limit of this process, if it has one.
fn cgroup_room() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    let limit: u64 = std::fs::read_to_string(dir.join("memory.max")).ok()?.trim().parse().ok()?;
    let stat = std::fs::read_to_string(dir.join("memory.stat")).ok()?;
    let anon: u64 = stat.lines().find_map(|l| l.strip_prefix("anon "))?.trim().parse().ok()?;
    Some(limit.saturating_sub(anon))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_units_people_write() {
        let bytes = |s: &str| s.parse::<ByteSize>().map(ByteSize::bytes);
        assert_eq!(bytes("512MiB"), Ok(512 << 20));
        assert_eq!(bytes("4GiB"), Ok(4 << 30));
        assert_eq!(bytes("30GB"), Ok(30_000_000_000));
        assert_eq!(bytes("1.5g"), Ok(3 << 29));
        assert_eq!(bytes("100"), Ok(100));
        assert_eq!(bytes(" 2 kb "), Ok(2000));
    }

    #[test]
    fn rejects_what_is_not_a_size() {
        for bad in ["", "GiB", "-1GiB", "4 parsecs", "1e99TB", "1.2.3MB"] {
            let err = bad.parse::<ByteSize>().unwrap_err();
            assert!(err.to_string().contains("is not a size"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn displays_in_binary_units() {
        assert_eq!(ByteSize(1536 << 20).to_string(), "1.50 GiB");
        assert_eq!(ByteSize(100).to_string(), "100 B");
    }

    #[test]
    fn reads_available_memory() {
        assert!(available_memory().is_some_and(|m| m.bytes() > 0));
    }
}
