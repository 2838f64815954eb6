//! Flags shared by every example (device and dtype selection).

use clap::Args;
use unclip_core::tch::{Device, Kind};

/// `--device` and `--dtype`, as every example takes them.
#[derive(Debug, Clone, Args)]
pub struct RuntimeArgs {
    /// cpu, cuda, cuda:N or auto (default: the UNCLIP_DEVICE variable, else CUDA when available).
    #[arg(long)]
    pub device: Option<String>,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

impl RuntimeArgs {
    /// The device to run on, or a clear error (e.g. CUDA asked for but absent).
    pub fn device(&self) -> unclip_core::Result<Device> {
        unclip_core::select_device(self.device.as_deref())
    }

    /// The floating-point kind to run in.
    pub fn dtype(&self) -> unclip_core::Result<Kind> {
        unclip_core::parse_dtype(&self.dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        rt: RuntimeArgs,
    }

    #[test]
    fn flags_parse() {
        let cli = Cli::try_parse_from(["x", "--device", "cpu", "--dtype", "bf16"]).unwrap();
        assert_eq!(cli.rt.device().unwrap(), Device::Cpu);
        assert_eq!(cli.rt.dtype().unwrap(), Kind::BFloat16);
        let bad = Cli::try_parse_from(["x", "--device", "quantum"]).unwrap();
        assert!(bad.rt.device().is_err());
    }
}
