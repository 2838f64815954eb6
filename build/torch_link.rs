//! Shared build script of every crate that links libtorch (each Cargo.toml points `build` here).
//!
//! Two well-known tch traps are fixed for all of this crate's targets (tests, examples, benches):
//! - an rpath to the libtorch lib dir, so nothing needs LD_LIBRARY_PATH;
//! - libtorch_cuda.so kept as NEEDED: the linker's `--as-needed` drops it because no symbol of it is
//!   referenced directly, and then CUDA silently never initialises.
//!
//! torch-sys (a direct dependency, `links = "tch"`) hands the lib dir over as DEP_TCH_LIBTORCH_LIB.

/// `pub` so that a crate with a build script of its own (unclip-dist) can run this one too.
pub fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=DEP_TCH_LIBTORCH_LIB unset: no rpath to libtorch");
        println!("cargo:rustc-env=UNCLIP_LIBTORCH_VERSION=unknown");
        return;
    };
    let lib = std::path::PathBuf::from(lib);
    let lib = lib.canonicalize().unwrap_or(lib);
    println!("cargo:rustc-env=UNCLIP_LIBTORCH_VERSION={}", libtorch_version(&lib));
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os == "linux" || os == "macos" {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
    if os == "linux" {
        for cuda_lib in ["torch_cuda", "torch_hip"] {
            if lib.join(format!("lib{cuda_lib}.so")).exists() {
                println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
                println!("cargo:rustc-link-arg=-L{}", lib.display());
                println!("cargo:rustc-link-arg=-l{cuda_lib}");
                println!("cargo:rustc-link-arg=-Wl,--as-needed");
            }
        }
    }
}

/// The libtorch version: `build-version` of a libtorch zip, or `version.py` of a torch wheel.
fn libtorch_version(lib: &std::path::Path) -> String {
    let root = lib.parent().unwrap_or(lib);
    if let Ok(v) = std::fs::read_to_string(root.join("build-version")) {
        return v.trim().to_string();
    }
    if let Ok(py) = std::fs::read_to_string(root.join("version.py")) {
        for line in py.lines() {
            if let Some(rest) = line.strip_prefix("__version__") {
                let v = rest.trim_start_matches([' ', '=', ':']).trim_start_matches("str").trim();
                return v.trim_matches(|c| c == '\'' || c == '"').to_string();
            }
        }
    }
    "unknown".into()
}
