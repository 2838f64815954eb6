//! Interpolation between two images or prompts: slerp between their CLIP image embeddings,
//! every frame decoded with the same noise.
//!
//! `cargo run --release --example interpolate -- --model karlo-v1-alpha-image-variations --from-image a.png --to-image b.png --frames 6`

use clap::Parser;
use unclip::{DecodeOptions, Endpoint};
use unclip_examples::{DecodeArgs, ModelArgs, Progress, save};

#[derive(Parser)]
#[command(about = "Interpolates between two images or prompts in CLIP image-embedding space")]
struct Cli {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, conflicts_with = "from_prompt", required_unless_present = "from_prompt")]
    from_image: Option<std::path::PathBuf>,
    /// A prompt endpoint (its image embedding comes from the prior; needs a text-to-image model).
    #[arg(long)]
    from_prompt: Option<String>,
    #[arg(long, conflicts_with = "to_prompt", required_unless_present = "to_prompt")]
    to_image: Option<std::path::PathBuf>,
    #[arg(long)]
    to_prompt: Option<String>,
    #[arg(long, default_value_t = 5)]
    frames: usize,
    #[command(flatten)]
    sampling: DecodeArgs,
}

fn endpoint(
    image: &Option<std::path::PathBuf>,
    prompt: &Option<String>,
) -> anyhow::Result<Endpoint> {
    Ok(match (image, prompt) {
        (Some(p), _) => Endpoint::Image(unclip::output::open_image(p)?),
        (None, Some(t)) => Endpoint::Prompt(t.clone()),
        (None, None) => anyhow::bail!("each end needs an image or a prompt"),
    })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let from = endpoint(&cli.from_image, &cli.from_prompt)?;
    let to = endpoint(&cli.to_image, &cli.to_prompt)?;
    let mut model = cli.model.load()?;
    let opts = DecodeOptions { seed: Some(cli.model.seed), ..cli.sampling.resolve(&model) };
    let mut bar = Progress::default();
    let g = model.interpolate(&from, &to, cli.frames, &opts, &mut |s| bar.update(s))?;
    bar.finish();
    save(&g, &cli.model.out, "frame-")
}
