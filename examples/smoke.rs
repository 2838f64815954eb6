//! Smoke test of the installation: libtorch version, chosen device, a small computation there.
//!
//! `cargo run --release --example smoke -- --device cuda`

use clap::Parser;
use unclip_core::tch::{self, Kind, Tensor};
use unclip_examples::RuntimeArgs;

#[derive(Parser)]
#[command(about = "Checks that libtorch loads and computes on the chosen device")]
struct Cli {
    #[command(flatten)]
    rt: RuntimeArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let device = cli.rt.device()?;
    let kind = cli.rt.dtype()?;
    println!("libtorch {}", unclip_core::libtorch_version());
    println!(
        "cuda available: {} ({} device(s)), cudnn: {}",
        unclip_core::cuda_available(),
        tch::Cuda::device_count(),
        tch::Cuda::cudnn_is_available()
    );
    if !unclip_core::cuda_available() {
        println!("why not: {}", unclip_core::cuda_unavailable_reason());
    }
    println!(
        "device: {}  dtype: {}",
        unclip_core::device::device_name(device),
        unclip_core::dtype::dtype_name(kind)
    );
    tch::manual_seed(0);
    let a = Tensor::randn([256, 256], (Kind::Float, device)).to_kind(kind);
    let b = a.matmul(&a.transpose(0, 1)).to_kind(Kind::Float);
    // a a^T is symmetric with a non-negative diagonal: check it on the device.
    let asym = (&b - b.transpose(0, 1)).abs().max().double_value(&[]);
    let min_diag = b.diagonal(0, 0, 1).min().double_value(&[]);
    println!(
        "matmul 256x256 on {}: trace {:.3}, asymmetry {asym:.2e}",
        unclip_core::device::device_name(b.device()),
        b.trace().double_value(&[])
    );
    anyhow::ensure!(asym < 1e-2 && min_diag >= 0.0, "unexpected matmul result on {device:?}");
    println!("ok");
    Ok(())
}
