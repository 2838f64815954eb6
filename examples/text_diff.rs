//! Text diffs (unCLIP paper, section 3): move an image's CLIP embedding toward
//! normalize(z(new caption) - z(caption)) by each theta and decode.
//!
//! `cargo run --release --example text_diff -- --model karlo-v1-alpha-image-variations --image cat.png --caption "a photo of a cat" --target "an anime drawing of a super saiyan cat"`

use clap::Parser;
use unclip::{DecodeOptions, Start};
use unclip_examples::{DecodeArgs, ModelArgs, Progress, save};

#[derive(Parser)]
#[command(about = "Edits an image along the difference of two captions' CLIP embeddings")]
struct Cli {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    image: std::path::PathBuf,
    /// A description of the image as it is.
    #[arg(long)]
    caption: String,
    /// The description to move toward.
    #[arg(long)]
    target: String,
    /// Interpolation positions (comma separated); 0 is the image itself.
    #[arg(long, value_delimiter = ',', default_value = "0,0.25,0.5")]
    thetas: Vec<f64>,
    /// Start every frame from the DDIM inversion of the image (keeps its layout).
    #[arg(long)]
    ddim_inversion: bool,
    #[command(flatten)]
    sampling: DecodeArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let image = unclip::output::open_image(&cli.image)?;
    let mut model = cli.model.load()?;
    let opts = DecodeOptions { seed: Some(cli.model.seed), ..cli.sampling.resolve(&model) };
    let start = if cli.ddim_inversion { Start::DdimInversion { eta: 0.0 } } else { Start::Noise };
    let mut bar = Progress::default();
    let g = model.text_diff(
        &image,
        &cli.caption,
        &cli.target,
        &cli.thetas,
        start,
        &opts,
        &mut |s| bar.update(s),
    )?;
    bar.finish();
    save(&g, &cli.model.out, "diff-")
}
