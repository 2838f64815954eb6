//! Build-script helper for crates and apps that use unclip-rs (and so tch / libtorch).
//!
//! tch links libtorch dynamically, and cargo never hands a dependency's linker arguments on to the
//! final binary: an app that depends on `unclip` gets no rpath to libtorch and fails before `main`
//! with `libtorch_cpu.so: cannot open shared object file`. One line in the app's `build.rs` fixes it:
//!
//! ```no_run
//! // build.rs of an app with `unclip` in [dependencies] and `unclip-build` in [build-dependencies]
//! fn main() {
//!     unclip_build::link_libtorch();
//! }
//! ```
//!
//! [`Libtorch::find`] also serves build scripts that compile C++ against libtorch
//! ([`Libtorch::include_dirs`], [`Libtorch::cxx_flags`]). Every unclip-rs crate's own build script
//! calls [`for_library`].

// The doc example is a whole build.rs, `fn main` included.
#![allow(clippy::needless_doctest_main)]

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the libtorch was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `DEP_<LINKS>_LIBTORCH_LIB`, exported by torch-sys (`DEP_TCH_LIBTORCH_LIB`) or an
    /// unclip-rs crate (`DEP_UNCLIP_LIBTORCH_LIB`, ...) to the build scripts of its direct
    /// dependents: the very libtorch tch was built against.
    Dependency(String),
    /// `LIBTORCH` (with `LIBTORCH_LIB` / `LIBTORCH_INCLUDE` overrides), as torch-sys reads it.
    Env,
    /// `LIBTORCH_USE_PYTORCH=1`: the torch package of the active Python.
    Python,
    /// A system install (`/usr/lib/libtorch.so`).
    System,
}

/// A libtorch installation: what a build script needs to link, run and compile against it.
#[derive(Debug, Clone)]
pub struct Libtorch {
    lib_dir: PathBuf,
    include_dirs: Vec<PathBuf>,
    cxx11_abi: bool,
    source: Source,
}

/// No libtorch was found; the message lists every place looked at and what to do.
#[derive(Debug, Clone)]
pub struct NotFound {
    looked: Vec<String>,
}

impl fmt::Display for NotFound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "no libtorch found. Looked at:")?;
        for l in &self.looked {
            writeln!(f, "  - {l}")?;
        }
        write!(
            f,
            "Fix one of:\n  \
             - add `unclip` (or another unclip-rs crate) to [dependencies]: its build exports the \
             libtorch tch linked to this build script;\n  \
             - export LIBTORCH=/path/to/libtorch (a libtorch 2.13 folder with lib/ and include/, or \
             a torch 2.13 package folder, e.g. .venv/libtorch made by unclip-rs' `make setup`);\n  \
             - export LIBTORCH_USE_PYTORCH=1 with a Python that has torch 2.13 first on PATH."
        )
    }
}

impl std::error::Error for NotFound {}

impl Libtorch {
    /// Finds the libtorch of this build, in order: `DEP_*_LIBTORCH_LIB` (torch-sys or an
    /// unclip-rs crate among the direct dependencies), `LIBTORCH`, `LIBTORCH_USE_PYTORCH`,
    /// `/usr/lib/libtorch.so`. Prints the `rerun-if-env-changed` lines for what it read.
    pub fn find() -> Result<Self, NotFound> {
        for name in ["LIBTORCH", "LIBTORCH_LIB", "LIBTORCH_INCLUDE", "LIBTORCH_USE_PYTORCH"] {
            println!("cargo:rerun-if-env-changed={name}");
        }
        println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
        let mut looked = Vec::new();

        let mut deps: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k.starts_with("DEP_") && k.ends_with("_LIBTORCH_LIB"))
            .collect();
        // torch-sys' own value first, then ours in a stable order.
        deps.sort_by_key(|(k, _)| (k != "DEP_TCH_LIBTORCH_LIB", k.clone()));
        for (key, value) in &deps {
            println!("cargo:rerun-if-env-changed={key}");
            let lib = PathBuf::from(value);
            if lib.is_dir() {
                return Ok(Self::from_lib_dir(lib, Source::Dependency(key.clone())));
            }
            looked.push(format!("{key}={value} (not a folder)"));
        }
        if deps.is_empty() {
            looked.push(
                "DEP_*_LIBTORCH_LIB (none: no direct dependency exports a libtorch to this build script)"
                    .into(),
            );
        }

        match std::env::var_os("LIBTORCH") {
            Some(root) => {
                let root = PathBuf::from(root);
                let lib_root = std::env::var_os("LIBTORCH_LIB").map_or(root.clone(), PathBuf::from);
                let inc_root =
                    std::env::var_os("LIBTORCH_INCLUDE").map_or(root.clone(), PathBuf::from);
                let lib = lib_root.join("lib");
                if lib.is_dir() {
                    let mut found = Self::from_lib_dir(lib, Source::Env);
                    found.include_dirs = standard_include_dirs(&inc_root);
                    return Ok(found);
                }
                looked.push(format!("LIBTORCH={} (no lib/ folder in it)", root.display()));
            }
            None => looked.push("LIBTORCH (unset)".into()),
        }

        if std::env::var_os("LIBTORCH_USE_PYTORCH").is_some() {
            match python_torch() {
                Ok(found) => return Ok(found),
                Err(why) => looked.push(format!("LIBTORCH_USE_PYTORCH: {why}")),
            }
        } else {
            looked.push("LIBTORCH_USE_PYTORCH (unset)".into());
        }

        if Path::new("/usr/lib/libtorch.so").exists() {
            return Ok(Self::from_lib_dir("/usr/lib".into(), Source::System));
        }
        looked.push("/usr/lib/libtorch.so (absent)".into());
        Err(NotFound { looked })
    }

    /// The libtorch whose shared libraries are in `lib_dir` (`<root>/lib`; headers in
    /// `<root>/include`, as in libtorch zips and torch packages). Symlinks are resolved, so the
    /// rpath names the real folder.
    pub fn from_lib_dir(lib_dir: PathBuf, source: Source) -> Self {
        let lib_dir = lib_dir.canonicalize().unwrap_or(lib_dir);
        let root = lib_dir.parent().unwrap_or(&lib_dir).to_path_buf();
        let cxx11_abi = std::env::var("LIBTORCH_CXX11_ABI").map_or(true, |v| v.trim() != "0");
        Self { include_dirs: standard_include_dirs(&root), lib_dir, cxx11_abi, source }
    }

    /// The folder holding `libtorch_cpu.so` and friends.
    pub fn lib_dir(&self) -> &Path {
        &self.lib_dir
    }

    /// Where it was found.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// Header folders for C++ that includes `<torch/torch.h>` or `<ATen/ATen.h>`.
    pub fn include_dirs(&self) -> &[PathBuf] {
        &self.include_dirs
    }

    /// Whether libtorch was built with the C++11 `std::string` ABI (PyPI torch since 2.7, and
    /// libtorch zips "cxx11-abi"); set `LIBTORCH_CXX11_ABI=0` for an old-ABI libtorch.
    pub fn cxx11_abi(&self) -> bool {
        self.cxx11_abi
    }

    /// Compiler flags for C++ built against these headers, the ones torch-sys compiles tch's
    /// wrapper with: `cc::Build::new().cpp(true).includes(t.include_dirs())` plus each flag.
    pub fn cxx_flags(&self) -> Vec<String> {
        vec![
            "-std=c++17".into(),
            format!("-D_GLIBCXX_USE_CXX11_ABI={}", u8::from(self.cxx11_abi)),
            "-DGLOG_USE_GLOG_EXPORT".into(),
        ]
    }

    /// The GPU library this libtorch ships, without `lib` and `.so`: `torch_cuda` (CUDA),
    /// `torch_hip` (ROCm), or `None` for a CPU-only libtorch.
    pub fn gpu_library(&self) -> Option<&'static str> {
        ["torch_cuda", "torch_hip"].into_iter().find(|name| {
            self.lib_dir.join(format!("lib{name}.so")).exists()
                || self.lib_dir.join(format!("{name}.dll")).exists()
        })
    }

    /// The version: `build-version` of a libtorch zip, or `version.py` of a torch package
    /// (e.g. `2.13.0+cu130`); `unknown` when neither says.
    pub fn version(&self) -> String {
        let root = self.lib_dir.parent().unwrap_or(&self.lib_dir);
        if let Ok(v) = std::fs::read_to_string(root.join("build-version")) {
            return v.trim().to_string();
        }
        if let Ok(py) = std::fs::read_to_string(root.join("version.py")) {
            if let Some(v) = parse_version_py(&py) {
                return v;
            }
        }
        "unknown".into()
    }

    /// Prints the linker argument that records the lib dir as the binaries' run path (Linux and
    /// macOS), for every binary, test, example and bench of the package whose build script this
    /// is. On Windows the lib dir must be on `PATH` instead.
    pub fn emit_rpath(&self) {
        match std::env::var("CARGO_CFG_TARGET_OS").as_deref() {
            Ok("linux") | Ok("macos") => {
                println!("cargo:rustc-link-arg=-Wl,-rpath,{}", self.lib_dir.display());
            }
            _ => println!(
                "cargo:warning=unclip-build: no rpath on this OS; put {} on PATH to run",
                self.lib_dir.display()
            ),
        }
    }
}

fn standard_include_dirs(root: &Path) -> Vec<PathBuf> {
    vec![root.join("include"), root.join("include/torch/csrc/api/include")]
}

fn parse_version_py(py: &str) -> Option<String> {
    for line in py.lines() {
        // `__version__ = '2.13.0+cu130'`, or with a type annotation.
        if let Some((_, value)) = line.strip_prefix("__version__").and_then(|r| r.rsplit_once('='))
        {
            return Some(value.trim().trim_matches(|c| c == '\'' || c == '"').to_string());
        }
    }
    None
}

/// Asks the active Python's torch for its folders and ABI, as torch-sys does for
/// `LIBTORCH_USE_PYTORCH`.
fn python_torch() -> Result<Libtorch, String> {
    let python = if std::env::var_os("VIRTUAL_ENV").is_some() { "python" } else { "python3" };
    let script = "import os, torch\n\
                  print(os.path.join(os.path.dirname(torch.__file__), 'lib'))\n\
                  print(int(torch._C._GLIBCXX_USE_CXX11_ABI))";
    let out = Command::new(python)
        .args(["-c", script])
        .output()
        .map_err(|e| format!("could not run {python}: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("").trim().to_string();
        return Err(format!("{python} could not import torch ({last})"));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let lib = lines.next().map(PathBuf::from).ok_or("no output from python")?;
    let abi = lines.next().map(str::trim) != Some("0");
    let mut found = Libtorch::from_lib_dir(lib, Source::Python);
    found.cxx11_abi = std::env::var("LIBTORCH_CXX11_ABI").map_or(abi, |v| v.trim() != "0");
    Ok(found)
}

/// The one call of an app's `build.rs`: finds the libtorch its `unclip` dependency was built
/// against and sets the binaries' run path to it, so they start without `LD_LIBRARY_PATH`.
/// Stops the build with the list of places looked at and what to do when there is none.
pub fn link_libtorch() -> Libtorch {
    let torch = Libtorch::find().unwrap_or_else(|e| panic!("unclip-build: {e}"));
    torch.emit_rpath();
    torch
}

/// What the build script of every unclip-rs library crate does: [`link_libtorch`] for the
/// crate's own tests, examples and benches; exports the lib dir to the build scripts of direct
/// dependents (`DEP_<LINKS>_LIBTORCH_LIB`, read by [`Libtorch::find`]; the package needs a
/// `links` key); and the libtorch version as `UNCLIP_LIBTORCH_VERSION` at compile time.
pub fn for_library() -> Libtorch {
    let torch = link_libtorch();
    println!("cargo:libtorch_lib={}", torch.lib_dir().display());
    println!("cargo:rustc-env=UNCLIP_LIBTORCH_VERSION={}", torch.version());
    println!("cargo:rustc-env=UNCLIP_LIBTORCH_LIB={}", torch.lib_dir().display());
    torch
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_torch_package_versions() {
        let py = "from typing import Optional\n__version__ = '2.13.0+cu130'\ndebug = False\n";
        assert_eq!(parse_version_py(py).as_deref(), Some("2.13.0+cu130"));
        let typed = "__version__: str = \"2.13.0\"\n";
        assert_eq!(parse_version_py(typed).as_deref(), Some("2.13.0"));
        assert_eq!(parse_version_py("x = 1\n"), None);
    }

    #[test]
    fn a_fabricated_libtorch_folder_is_described() {
        let root = std::env::temp_dir().join(format!("unclip-build-test-{}", std::process::id()));
        let lib = root.join("lib");
        std::fs::create_dir_all(&lib).unwrap();
        std::fs::write(root.join("build-version"), "2.13.0+cpu\n").unwrap();
        let t = Libtorch::from_lib_dir(lib.clone(), Source::Env);
        assert_eq!(t.version(), "2.13.0+cpu");
        assert_eq!(t.gpu_library(), None);
        assert!(t.include_dirs()[0].ends_with("include"));
        assert!(t.include_dirs()[1].ends_with("include/torch/csrc/api/include"));
        std::fs::write(lib.join("libtorch_cuda.so"), b"").unwrap();
        assert_eq!(t.gpu_library(), Some("torch_cuda"));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn not_found_names_every_place_and_the_fixes() {
        let e = NotFound {
            looked: vec!["LIBTORCH (unset)".into(), "/usr/lib/libtorch.so (absent)".into()],
        };
        let s = e.to_string();
        assert!(s.contains("LIBTORCH (unset)") && s.contains("/usr/lib/libtorch.so (absent)"));
        assert!(s.contains("export LIBTORCH=") && s.contains("LIBTORCH_USE_PYTORCH=1"));
    }
}
