//! Helpers shared by the benchmarks.

/// Peak resident set size of this process so far, in bytes (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn peak_rss_grows_with_allocation() {
        if let Some(before) = super::peak_rss_bytes() {
            let v = vec![1u8; 64 << 20];
            std::hint::black_box(&v);
            assert!(super::peak_rss_bytes().unwrap() >= before.max(64 << 20));
        }
    }
}
