//! Whether this process really has libtorch's CUDA, and why not: the one FFI module of
//! unclip-core (the anchor in `cpp/cuda_anchor.cpp`, see `build.rs`), behind a safe API.

use std::path::{Path, PathBuf};

#[cfg(unclip_cuda_anchor)]
mod ffi {
    unsafe extern "C" {
        /// The current CUDA device's warp size, or -1 with libtorch's message written to
        /// `message` (NUL-terminated, at most `capacity` bytes). Catches every C++ exception.
        pub fn unclip_cuda_warp_size(message: *mut std::ffi::c_char, capacity: usize) -> i32;
    }
}

/// Asks libtorch_cuda for the current device's warp size: `Some(Ok(n))` when a CUDA device is
/// usable, `Some(Err(libtorch's reason))` when not, `None` when this build has no anchor (its
/// libtorch had no libtorch_cuda.so at build time).
pub(crate) fn probe() -> Option<Result<i32, String>> {
    #[cfg(unclip_cuda_anchor)]
    {
        let mut buf = [0u8; 512];
        // SAFETY: the buffer outlives the call and its length is passed; the C++ side writes at
        // most `capacity` bytes, NUL-terminated, and never unwinds.
        let n = unsafe { ffi::unclip_cuda_warp_size(buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            return Some(Ok(n));
        }
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        Some(Err(String::from_utf8_lossy(&buf[..end]).trim().to_string()))
    }
    #[cfg(not(unclip_cuda_anchor))]
    None
}

/// What is known about the libtorch of this build and of this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LinkFacts {
    /// The lib dir this crate was built against.
    pub build_lib_dir: PathBuf,
    /// Whether the CUDA anchor was compiled in (the build-time libtorch had libtorch_cuda.so).
    pub built_with_anchor: bool,
    /// The folder of the libtorch_cpu.so this process mapped (None where that cannot be read).
    pub runtime_lib_dir: Option<PathBuf>,
    /// Whether this process mapped a libtorch_cuda.so.
    pub cuda_loaded: bool,
}

impl LinkFacts {
    /// The facts of this process (its mapped libraries, on Linux).
    pub fn of_this_process() -> Self {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        let mapped = |name: &str| -> Option<PathBuf> {
            maps.lines()
                .filter_map(|l| l.split_whitespace().nth(5))
                .map(Path::new)
                .find(|p| p.file_name().is_some_and(|f| f == name))
                .map(Path::to_path_buf)
        };
        LinkFacts {
            build_lib_dir: PathBuf::from(env!("UNCLIP_LIBTORCH_LIB")),
            built_with_anchor: cfg!(unclip_cuda_anchor),
            runtime_lib_dir: mapped("libtorch_cpu.so")
                .and_then(|p| p.parent().map(Path::to_path_buf)),
            cuda_loaded: mapped("libtorch_cuda.so").is_some(),
        }
    }
}

/// Why CUDA cannot be used, and how to fix it, from the facts and libtorch_cuda's own answer
/// (`probe`, when the anchor is there).
pub(crate) fn diagnose(f: &LinkFacts, probe: Option<Result<i32, String>>) -> String {
    let runtime = f.runtime_lib_dir.as_deref();
    let runtime_has_cuda = runtime.is_some_and(|d| d.join("libtorch_cuda.so").exists());
    if f.cuda_loaded {
        let said = match probe {
            Some(Err(msg)) if !msg.is_empty() => format!(": libtorch says \"{msg}\""),
            _ => String::new(),
        };
        return format!(
            "libtorch's CUDA is loaded but finds no usable GPU{said}. Check that `nvidia-smi` lists \
             a GPU, that the NVIDIA driver supports this libtorch's CUDA version, and that \
             CUDA_VISIBLE_DEVICES does not hide it; or use --device cpu"
        );
    }
    match runtime {
        Some(dir) if runtime_has_cuda => format!(
            "the libtorch this program runs with ({}) has CUDA, but the program did not load its \
             libtorch_cuda.so: it was built against {} ({}), and the linker drops libtorch_cuda.so \
             unless something references it. Rebuild against the libtorch it runs with \
             (LIBTORCH={} cargo build; unclip-core then links its CUDA anchor), or link the \
             library explicitly (RUSTFLAGS=\"-C link-args=-Wl,--no-as-needed,-ltorch_cuda\")",
            dir.display(),
            f.build_lib_dir.display(),
            if f.built_with_anchor { "with CUDA" } else { "a libtorch without CUDA" },
            dir.parent().unwrap_or(dir).display(),
        ),
        Some(dir) => format!(
            "the libtorch this program runs with ({}) is CPU-only (no libtorch_cuda.so): use a CUDA \
             build of libtorch 2.13 (PyPI's torch 2.13.0 for Linux x86_64 carries CUDA) and \
             rebuild, or use --device cpu",
            dir.display()
        ),
        None => "libtorch reports no usable CUDA device (no GPU, no driver, or a CPU-only \
                 libtorch)"
            .into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(runtime: Option<&Path>, cuda_loaded: bool, anchor: bool) -> LinkFacts {
        LinkFacts {
            build_lib_dir: PathBuf::from("/opt/libtorch-cpu/lib"),
            built_with_anchor: anchor,
            runtime_lib_dir: runtime.map(Path::to_path_buf),
            cuda_loaded,
        }
    }

    #[test]
    fn this_process_keeps_libtorch_cuda_when_its_libtorch_has_it() {
        // The mechanism under test: no linker flags here (the build scripts pass none), only the
        // anchor reached from device selection.
        let _ = crate::cuda_available();
        let f = LinkFacts::of_this_process();
        let runtime = f.runtime_lib_dir.clone().expect("libtorch_cpu.so is mapped");
        let has_cuda = runtime.join("libtorch_cuda.so").exists();
        assert_eq!(f.built_with_anchor, has_cuda, "anchor compiled iff libtorch has CUDA");
        assert_eq!(f.cuda_loaded, has_cuda, "libtorch_cuda.so mapped iff libtorch has it: {f:?}");
    }

    #[test]
    fn probe_answers_with_a_warp_size_or_libtorchs_reason() {
        match probe() {
            None => assert!(!LinkFacts::of_this_process().built_with_anchor),
            Some(Ok(n)) => assert!(tch::Cuda::is_available() && (n == 32 || n == 64)),
            Some(Err(msg)) => {
                assert!(!tch::Cuda::is_available());
                assert!(!msg.is_empty() && !msg.contains('\n'), "{msg:?}");
            }
        }
    }

    #[test]
    fn each_cause_gets_its_own_fix() {
        let dir = std::env::temp_dir().join(format!("unclip-cuda-link-{}", std::process::id()));
        let cpu_only = dir.join("cpu/lib");
        let with_cuda = dir.join("cuda/lib");
        std::fs::create_dir_all(&cpu_only).unwrap();
        std::fs::create_dir_all(&with_cuda).unwrap();
        std::fs::write(with_cuda.join("libtorch_cuda.so"), b"").unwrap();

        let loaded = diagnose(
            &facts(Some(&with_cuda), true, true),
            Some(Err("CUDA driver version is insufficient".into())),
        );
        assert!(
            loaded.contains("no usable GPU") && loaded.contains("driver version is insufficient")
        );
        assert!(loaded.contains("nvidia-smi"));

        let dropped = diagnose(&facts(Some(&with_cuda), false, false), None);
        assert!(dropped.contains("did not load its libtorch_cuda.so"), "{dropped}");
        assert!(dropped.contains("/opt/libtorch-cpu/lib") && dropped.contains("without CUDA"));
        assert!(dropped.contains(&format!("LIBTORCH={}", dir.join("cuda").display())));
        assert!(dropped.contains("--no-as-needed"));

        let cpu = diagnose(&facts(Some(&cpu_only), false, false), None);
        assert!(cpu.contains("CPU-only") && cpu.contains(&cpu_only.display().to_string()));

        let unknown = diagnose(&facts(None, false, false), None);
        assert!(unknown.contains("no usable CUDA device"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
