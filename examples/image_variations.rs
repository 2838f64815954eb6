//! Variations of images: CLIP image embedding -> decoder -> super-resolution, from noise or from
//! the DDIM inversion of the image.
//!
//! `cargo run --release --example image_variations -- --model karlo-v1-alpha-image-variations --image cat.png`

use clap::Parser;
use unclip::{DecodeOptions, Start, Variations};
use unclip_examples::{DecodeArgs, ModelArgs, Progress, save};

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
    #[command(flatten)]
    sampling: DecodeArgs,
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
        decode: DecodeOptions { seed: Some(cli.model.seed), ..cli.sampling.resolve(&model) },
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
