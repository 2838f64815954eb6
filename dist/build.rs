//! Compiles the C++ shim over libtorch's c10d (csrc/dist_shim.cpp) with the flags torch-sys uses for
//! its own C++ (C++17, the wheel's `_GLIBCXX_USE_CXX11_ABI`), Gloo when gloo's headers are found,
//! NCCL when the libtorch has libtorch_cuda and the CUDA/NCCL headers are found. libtorch itself
//! (lib dir, headers, C++ flags, rpath) comes from unclip-build, as for every crate of the
//! workspace.
//!
//! Headers, where they come from:
//! - libtorch's: unclip-build's `Libtorch::include_dirs` (torch-sys' libtorch).
//! - gloo's: PyTorch's wheels ship none, and `ProcessGroupGloo.hpp` includes four of them. The
//!   shim only holds Gloo objects through pointers c10d hands out and calls no gloo function, so
//!   any gloo release's headers compile it: Debian's `libgloo-dev` (/usr/include), or a folder
//!   named by `UNCLIP_DIST_GLOO_INCLUDE`.
//! - CUDA's and NCCL's (NCCL path only): a PyPI torch's `nvidia/*/include` (nvidia-cuda-runtime,
//!   nvidia-nccl; the CUDA headers also need nvidia-cuda-crt and nvidia-cuda-cccl, which
//!   scripts/setup-libtorch.sh installs), `CUDA_HOME`/`CUDA_PATH`, /usr/local/cuda, and the folders
//!   in `UNCLIP_DIST_CUDA_INCLUDE` (`:`-separated).
//!
//! Missing gloo headers leave Gloo out with a warning (`UNCLIP_DIST_GLOO=1` makes that an error).
//! `UNCLIP_DIST_NCCL=0` builds without NCCL; `UNCLIP_DIST_NCCL=1` makes missing NCCL headers an
//! error instead of a warning.

use std::env;
use std::path::{Path, PathBuf};

/// Headers the NCCL path needs, each with the package that ships it in a PyPI layout.
const CUDA_HEADERS: [(&str, &str); 4] = [
    ("cuda_runtime_api.h", "nvidia-cuda-runtime"),
    ("crt/host_config.h", "nvidia-cuda-crt"),
    ("nv/target", "nvidia-cuda-cccl"),
    ("nccl.h", "nvidia-nccl"),
];

fn main() {
    let torch = unclip_build::for_library();
    for var in [
        "UNCLIP_DIST_GLOO",
        "UNCLIP_DIST_GLOO_INCLUDE",
        "UNCLIP_DIST_CUDA_INCLUDE",
        "UNCLIP_DIST_NCCL",
        "CUDA_HOME",
        "CUDA_PATH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=csrc/dist_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/dist_shim.h");

    let lib_dir = torch.lib_dir().to_path_buf();
    let root = lib_dir.parent().map(Path::to_path_buf).unwrap_or_else(|| lib_dir.clone());
    let torch_includes = torch.include_dirs().to_vec();
    if !torch_includes[0].join("torch/csrc/distributed/c10d/ProcessGroupGloo.hpp").is_file() {
        panic!(
            "unclip-dist: {} has no torch/csrc/distributed/c10d/ProcessGroupGloo.hpp; this libtorch \
             was built without the distributed engine",
            torch_includes[0].display()
        );
    }

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .includes(&torch_includes)
        .include("csrc")
        .file("csrc/dist_shim.cpp");
    for flag in torch.cxx_flags() {
        build.flag(&flag);
    }

    // Without gloo's headers the crate still builds (so apps and `make demo` need nothing more),
    // and creating a Gloo group is an error saying what to install.
    let gloo_wanted = env::var("UNCLIP_DIST_GLOO").ok();
    match gloo_include() {
        Some(gloo) => {
            build.include(gloo).define("USE_C10D_GLOO", None);
        }
        None => {
            let msg = "unclip-dist: gloo headers not found (gloo/algorithm.h), so the Gloo (CPU) \
                       backend is left out. PyTorch's wheels ship none; install Debian's libgloo-dev \
                       (`make setup` does, as root) or set UNCLIP_DIST_GLOO_INCLUDE to a folder \
                       holding gloo/";
            if gloo_wanted.as_deref() == Some("1") {
                panic!("{msg}");
            }
            println!("cargo:warning={msg}");
        }
    }
    let has_torch_cuda = torch.gpu_library() == Some("torch_cuda");
    let nccl_wanted = env::var("UNCLIP_DIST_NCCL").ok();
    let mut nccl = false;
    if has_torch_cuda && nccl_wanted.as_deref() != Some("0") {
        match cuda_includes(&root) {
            Ok(dirs) => {
                build.includes(&dirs).define("USE_C10D_NCCL", None);
                nccl = true;
            }
            Err(missing) => {
                let msg = format!(
                    "unclip-dist: libtorch_cuda is present but the NCCL backend is left out: header(s) \
                     not found: {missing}. Install them next to torch (`pip install \
                     nvidia-cuda-crt==13.0.* nvidia-cuda-cccl==13.0.*` for CUDA 13.0; \
                     scripts/setup-libtorch.sh does it for its .venv) or set UNCLIP_DIST_CUDA_INCLUDE"
                );
                if nccl_wanted.as_deref() == Some("1") {
                    panic!("{msg}");
                }
                println!("cargo:warning={msg}");
            }
        }
    }
    build.compile("unclip_dist_shim");

    // The shim's c10d symbols live in these; list them after the static shim.
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    if nccl {
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
    }
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}

fn gloo_include() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = env::var_os("UNCLIP_DIST_GLOO_INCLUDE")
        .map(|v| env::split_paths(&v).collect())
        .unwrap_or_default();
    candidates.extend(["/usr/include", "/usr/local/include"].map(PathBuf::from));
    candidates.into_iter().find(|dir| dir.join("gloo/algorithm.h").is_file())
}

/// The folders holding every header of [`CUDA_HEADERS`], or the names of those not found.
fn cuda_includes(torch_root: &Path) -> Result<Vec<PathBuf>, String> {
    let mut candidates: Vec<PathBuf> = env::var_os("UNCLIP_DIST_CUDA_INCLUDE")
        .map(|v| env::split_paths(&v).collect())
        .unwrap_or_default();
    // A PyPI torch: site-packages/torch next to site-packages/nvidia/<package>/include.
    let nvidia = torch_root.parent().map(|site| site.join("nvidia"));
    if let Some(Ok(entries)) = nvidia.map(std::fs::read_dir) {
        let mut dirs: Vec<PathBuf> =
            entries.flatten().map(|e| e.path().join("include")).filter(|p| p.is_dir()).collect();
        dirs.sort();
        candidates.extend(dirs);
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var) {
            candidates.push(PathBuf::from(home).join("include"));
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));

    let mut found = Vec::new();
    let mut missing = Vec::new();
    for (header, package) in CUDA_HEADERS {
        match candidates.iter().find(|dir| dir.join(header).exists()) {
            Some(dir) => {
                if !found.contains(dir) {
                    found.push(dir.clone());
                }
            }
            None => missing.push(format!("{header} ({package})")),
        }
    }
    if missing.is_empty() { Ok(found) } else { Err(missing.join(", ")) }
}
