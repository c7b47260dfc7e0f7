//! Memory checks before large allocations: a request that cannot fit fails with
//! `OUT_OF_MEMORY` up front instead of the process being killed half-way.

use candle_core::Device;

use crate::{Error, ErrorCode, Result};

/// Bytes the system could give this process now, where we can tell (Linux: `MemAvailable`).
/// GPUs report exhaustion themselves (candle's CUDA errors map to `OUT_OF_MEMORY`).
pub fn available(device: &Device) -> Option<u64> {
    if !device.is_cpu() {
        return None;
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `OUT_OF_MEMORY` when `needed` bytes exceed what the device has available.
pub fn check(needed: u64, device: &Device, what: &str) -> Result<()> {
    match available(device) {
        Some(free) if needed > free => Err(Error::new(
            ErrorCode::OutOfMemory,
            format!(
                "{what} needs about {} of working memory and {} is available; use a smaller size or batch",
                gib(needed),
                gib(free)
            ),
        )),
        _ => Ok(()),
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}
