//! Device selection, in one place: CUDA when available, else CPU, overridable with `--device` flags
//! or the `UNCLIP_DEVICE` environment variable.

use crate::{Error, Result};
use tch::Device;

/// Environment variable consulted by [`select_device`] when no explicit choice is given.
pub const DEVICE_ENV: &str = "UNCLIP_DEVICE";

/// Whether libtorch can use a CUDA device here: it reports one, and libtorch_cuda can read its
/// properties. Going through libtorch_cuda here is also what keeps that library linked into every
/// binary that selects a device (see `cuda_link`), with no linker flags on the app's side.
pub fn cuda_available() -> bool {
    tch::Cuda::is_available() && crate::cuda_link::probe().is_none_or(|r| r.is_ok())
}

/// Why CUDA cannot be used here and how to fix it: no GPU or driver (with libtorch's own
/// message), a CPU-only libtorch, or a CUDA libtorch whose libtorch_cuda.so this binary did not
/// load (built against another libtorch).
pub fn cuda_unavailable_reason() -> String {
    crate::cuda_link::diagnose(
        &crate::cuda_link::LinkFacts::of_this_process(),
        crate::cuda_link::probe(),
    )
}

/// Checks that `device` can hold tensors here, before anything is placed on it: libtorch panics
/// (inside tch) when a tensor is created on a CUDA device that is absent, so every constructor
/// that takes a device calls this first and returns the error instead.
pub fn check_device(device: Device) -> Result<()> {
    let name = device_name(device);
    let unavailable =
        |reason: String| Err(Error::CudaUnavailable { requested: name.clone(), reason });
    match device {
        Device::Cpu => Ok(()),
        Device::Cuda(index) => {
            if !cuda_available() {
                return unavailable(cuda_unavailable_reason());
            }
            let count = tch::Cuda::device_count().max(0) as usize;
            if index >= count {
                return unavailable(format!("only {count} CUDA device(s) are present"));
            }
            Ok(())
        }
        Device::Mps | Device::Vulkan => {
            Err(Error::InvalidDevice(format!("{name} (this library runs on cpu or cuda)")))
        }
    }
}

/// Parses `cpu`, `cuda`, `cuda:N`, `gpu` or `auto` (case-insensitive) and checks it can be used.
pub fn parse_device(name: &str) -> Result<Device> {
    let s = name.trim().to_ascii_lowercase();
    let want_cuda = |index: usize| -> Result<Device> {
        if !cuda_available() {
            return Err(Error::CudaUnavailable {
                requested: name.to_string(),
                reason: cuda_unavailable_reason(),
            });
        }
        let count = tch::Cuda::device_count() as usize;
        if index >= count {
            return Err(Error::CudaUnavailable {
                requested: name.to_string(),
                reason: format!("only {count} CUDA device(s) are present"),
            });
        }
        Ok(Device::Cuda(index))
    };
    match s.as_str() {
        "cpu" => Ok(Device::Cpu),
        "auto" | "" => Ok(auto()),
        "cuda" | "gpu" => want_cuda(0),
        _ => match s.strip_prefix("cuda:") {
            Some(idx) => {
                let index = idx.parse::<usize>().map_err(|_| Error::InvalidDevice(name.into()))?;
                want_cuda(index)
            }
            None => Err(Error::InvalidDevice(name.into())),
        },
    }
}

/// The device to run on: an explicit choice (e.g. a `--device` flag) wins, then `UNCLIP_DEVICE`,
/// then CUDA if available, else CPU.
pub fn select_device(explicit: Option<&str>) -> Result<Device> {
    match explicit {
        Some(name) => parse_device(name),
        None => match std::env::var(DEVICE_ENV) {
            Ok(name) if !name.trim().is_empty() => parse_device(&name),
            _ => Ok(auto()),
        },
    }
}

/// CUDA device 0 when [`cuda_available`], else the CPU.
fn auto() -> Device {
    if cuda_available() { Device::Cuda(0) } else { Device::Cpu }
}

/// A short human name: `cpu`, `cuda:0`, ...
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Mps => "mps".into(),
        Device::Vulkan => "vulkan".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rejects_garbage() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert_eq!(parse_device(" CPU ").unwrap(), Device::Cpu);
        assert!(matches!(parse_device("tpu"), Err(Error::InvalidDevice(_))));
        assert!(matches!(parse_device("cuda:x"), Err(Error::InvalidDevice(_))));
    }

    #[test]
    fn cuda_request_matches_availability() {
        match parse_device("cuda") {
            Ok(d) => assert!(cuda_available() && d == Device::Cuda(0)),
            Err(e) => {
                assert!(!cuda_available());
                assert!(matches!(e, Error::CudaUnavailable { .. }));
                assert!(e.to_string().contains("cuda"));
                // The reason is this process's, with a fix (see cuda_link's tests for each one).
                assert!(e.to_string().contains(&cuda_unavailable_reason()));
                eprintln!("{e}");
            }
        }
        // An index past the last device is always an error.
        assert!(matches!(parse_device("cuda:4096"), Err(Error::CudaUnavailable { .. })));
        assert!(matches!(check_device(Device::Cuda(4096)), Err(Error::CudaUnavailable { .. })));
        assert_eq!(check_device(Device::Cuda(0)).is_ok(), cuda_available());
        assert!(check_device(Device::Cpu).is_ok());
        assert!(check_device(Device::Mps).is_err());
    }

    #[test]
    fn auto_picks_cuda_only_when_present() {
        let d = parse_device("auto").unwrap();
        assert_eq!(d.is_cuda(), cuda_available());
        assert_eq!(select_device(Some("cpu")).unwrap(), Device::Cpu);
    }
}
