//! Variations of images: CLIP image embedding -> decoder -> super-resolution, from noise or from
//! the DDIM inversion of the image.
//!
//! `cargo run --release --example image_variations -- --model karlo-v1-alpha-image-variations --image cat.png`

use clap::Parser;
use unclip::{DecodeOptions, Start, Variations};
use unclip_examples::{ModelArgs, Progress, save};

#[derive(Parser)]
#[command(about = "Generates variations of images with an unCLIP (Karlo) model")]
struct Cli {
    #[command(flatten)]
    model: ModelArgs,
    /// An input image (repeat the flag for several).
    #[arg(long, required = true)]
    image: Vec<std::path::PathBuf>,
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    #[arg(long, default_value_t = 25)]
    decoder_steps: usize,
    #[arg(long, default_value_t = 8.0)]
    decoder_guidance: f64,
    #[arg(long, default_value_t = 7)]
    super_res_steps: usize,
    /// Start the decoder from the DDIM inversion of the image instead of noise.
    #[arg(long)]
    ddim_inversion: bool,
    /// DDIM eta after an inversion (0 reconstructs; larger varies more).
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let images = cli
        .image
        .iter()
        .map(|p| unclip::output::open_image(p))
        .collect::<unclip::Result<Vec<_>>>()?;
    let mut model = cli.model.load()?;
    let opts = Variations {
        num_images_per_image: cli.num_images,
        decode: DecodeOptions {
            decoder_steps: cli.decoder_steps,
            decoder_guidance_scale: cli.decoder_guidance,
            super_res_steps: cli.super_res_steps,
            seed: Some(cli.model.seed),
        },
        start: if cli.ddim_inversion {
            Start::DdimInversion { eta: cli.eta }
        } else {
            Start::Noise
        },
    };
    let mut bar = Progress::default();
    let g = model.variations(&images, &opts, &mut |s| bar.update(s))?;
    bar.finish();
    save(&g, &cli.model.out, "variation-")
}
