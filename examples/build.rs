// Rpath to libtorch for this crate's binaries and tests, and the libtorch lib dir exported to
// dependents (see unclip-build).
fn main() {
    unclip_build::link_libtorch();
}
