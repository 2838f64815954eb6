// unclip-core's build script: what every unclip-rs crate does (rpath, libtorch lib dir exported to
// dependents, see unclip-build), plus the CUDA anchor.
//
// The anchor: with a CUDA libtorch, tch's code references no symbol of libtorch_cuda.so, so the
// linker's `--as-needed` (rustc's default) drops it from every final binary and CUDA silently
// never initialises. Linker flags cannot fix that for dependents (cargo passes `rustc-link-arg`
// to this package's own targets only), but a referenced symbol can: `cpp/cuda_anchor.cpp` calls
// one libtorch_cuda function, `device::cuda_available` calls it, so any binary that selects a
// device keeps libtorch_cuda.so NEEDED. The static library and `rustc-link-lib` do propagate.
fn main() {
    let torch = unclip_build::for_library();
    println!("cargo:rustc-check-cfg=cfg(unclip_cuda_anchor)");
    println!("cargo:rerun-if-changed=cpp/cuda_anchor.cpp");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux");
    if linux && torch.gpu_library() == Some("torch_cuda") {
        let mut build = cc::Build::new();
        build.cpp(true).file("cpp/cuda_anchor.cpp").warnings(true);
        for flag in torch.cxx_flags() {
            build.flag(&flag);
        }
        build.compile("unclip_cuda_anchor");
        println!("cargo:rustc-link-search=native={}", torch.lib_dir().display());
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-cfg=unclip_cuda_anchor");
    }
}
