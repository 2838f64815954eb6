// Rpath to libtorch for this crate's binaries and tests, and the libtorch lib dir exported to
// dependents (see unclip-build); plus the autocast shim (csrc/autocast.cpp, see
// `train::precision`), compiled with the flags torch-sys uses for tch's own C++.
fn main() {
    let torch = unclip_build::for_library();
    println!("cargo:rerun-if-changed=csrc/autocast.cpp");
    let mut build = cc::Build::new();
    build.cpp(true).file("csrc/autocast.cpp").includes(torch.include_dirs()).warnings(true);
    for flag in torch.cxx_flags() {
        build.flag(&flag);
    }
    build.compile("unclip_autocast");
    println!("cargo:rustc-link-search=native={}", torch.lib_dir().display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
