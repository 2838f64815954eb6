//! Sizes before allocation: what a tensor or a model would take, what the device has, and a
//! refusal that says both when it does not fit (instead of an abort or the OOM killer).

use crate::{Error, Result};
use tch::{Device, Kind};

/// Bytes of one element of `kind`.
pub fn element_size(kind: Kind) -> u128 {
    match kind {
        Kind::Bool | Kind::Uint8 | Kind::Int8 | Kind::QInt8 | Kind::QUInt8 => 1,
        Kind::Int16 | Kind::Half | Kind::BFloat16 => 2,
        Kind::Int | Kind::Float | Kind::ComplexHalf | Kind::QInt32 => 4,
        Kind::Int64 | Kind::Double | Kind::ComplexFloat => 8,
        Kind::ComplexDouble => 16,
        _ => 8,
    }
}

/// The number of elements of a tensor of shape `dims`, `None` when a dimension is negative or the
/// product overflows (no shape a user gives can wrap around into a small allocation).
pub fn elements(dims: &[i64]) -> Option<u128> {
    dims.iter().try_fold(1u128, |n, &d| if d < 0 { None } else { n.checked_mul(d as u128) })
}

/// Bytes of a tensor of shape `dims` in `kind`, `None` as for [`elements`].
pub fn tensor_bytes(dims: &[i64], kind: Kind) -> Option<u128> {
    elements(dims)?.checked_mul(element_size(kind))
}

/// Memory a new allocation can take on `device`, when known: on the CPU, the kernel's
/// `MemAvailable` plus free swap (Linux; `None` elsewhere). `None` for accelerators (libtorch's
/// own allocation errors are then the guard).
pub fn available(device: Device) -> Option<u128> {
    if device != Device::Cpu {
        return None;
    }
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u128> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kb: u128 = line[name.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
        kb.checked_mul(1024)
    };
    Some(field("MemAvailable:")?.saturating_add(field("SwapFree:").unwrap_or(0)))
}

/// `bytes` in the largest binary unit that keeps it >= 1 (e.g. `3.7 GiB`).
pub fn human(bytes: u128) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{bytes} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// Refuses `what` when its `bytes` exceed the memory `device` has available (see [`available`]);
/// the error says how much it would need and how much there is.
pub fn ensure_fits(what: &str, bytes: u128, device: Device) -> Result<()> {
    match available(device) {
        Some(avail) if bytes > avail => Err(Error::TooLarge {
            what: what.to_string(),
            needed: human(bytes),
            available: format!("{} available on {device:?}", human(avail)),
        }),
        _ => Ok(()),
    }
}

/// [`ensure_fits`] for a tensor of shape `dims` in `kind`; a shape whose size overflows is
/// refused too.
pub fn ensure_tensor_fits(what: &str, dims: &[i64], kind: Kind, device: Device) -> Result<()> {
    match tensor_bytes(dims, kind) {
        Some(b) => ensure_fits(what, b, device),
        None => Err(Error::TooLarge {
            what: what.to_string(),
            needed: format!("a shape {dims:?} whose size does not fit in 128 bits"),
            available: "no device holds it".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_checked() {
        assert_eq!(elements(&[2, 3, 4]), Some(24));
        assert_eq!(elements(&[]), Some(1));
        assert_eq!(elements(&[2, -1]), None);
        assert_eq!(elements(&[i64::MAX, i64::MAX, i64::MAX]), None);
        assert_eq!(tensor_bytes(&[10, 10], Kind::Half), Some(200));
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }

    #[test]
    fn refuses_what_cannot_fit_and_says_how_much() {
        if available(Device::Cpu).is_none() {
            return; // not Linux: nothing to compare with
        }
        // An exabyte-sized request fails on every machine this runs on.
        let err =
            ensure_tensor_fits("the noise", &[1 << 20, 1 << 20, 1 << 20], Kind::Float, Device::Cpu)
                .unwrap_err();
        let s = err.to_string();
        assert!(s.contains("the noise") && s.contains("4.0 EiB"), "{s}");
        let err =
            ensure_tensor_fits("x", &[i64::MAX, i64::MAX, i64::MAX], Kind::Float, Device::Cpu)
                .unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
        ensure_fits("a small thing", 1024, Device::Cpu).unwrap();
    }
}
