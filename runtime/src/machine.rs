//! What this machine can hold: checked before a run allocates, so that a step too large for
//! the machine is refused with both figures instead of being killed by the kernel mid-way.

/// Bytes of memory available to new allocations (`MemAvailable` of /proc/meminfo), if known.
pub fn memory_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// `Err(message)` when `need` bytes (for `what`) exceed the memory available now.
pub fn ensure_available(what: &str, need: u64) -> Result<(), String> {
    match memory_available() {
        Some(have) if need > have => Err(format!(
            "{what} needs {} but this machine has {} available; use a machine with more memory, a smaller model, or more ranks on more machines",
            human(need),
            human(have)
        )),
        _ => Ok(()),
    }
}

/// The most memory this process has held resident so far (`ru_maxrss`), in bytes.
pub fn peak_resident_bytes() -> u64 {
    // SAFETY: getrusage writes the struct it is given and nothing else.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0;
    }
    (usage.ru_maxrss.max(0) as u64).saturating_mul(1024)
}

/// Bytes as GiB (or MiB below 1 GiB).
pub fn human(bytes: u64) -> String {
    let gib = bytes as f64 / (1u64 << 30) as f64;
    if gib >= 1.0 {
        format!("{gib:.1} GiB")
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_than_the_machine_is_refused_with_both_figures() {
        if memory_available().is_none() {
            eprintln!("no /proc/meminfo here: nothing to compare with");
            return;
        }
        let e = ensure_available("the step", u64::MAX / 2).unwrap_err();
        assert!(e.contains("the step needs") && e.contains("GiB available"), "{e}");
        assert!(ensure_available("a byte", 1).is_ok());
    }
}
