//! Zero-shot classification of image files against label prompts with any CLIP checkpoint folder
//! (`config.json` + `model.safetensors` of a transformers `CLIPModel`, plus `tokenizer.json` or
//! `vocab.json` + `merges.txt`, optionally `preprocessor_config.json`; a `tokenizer/` subfolder works too).
//!
//! `cargo run --release --example zero_shot -- --model DIR --image cat.png --labels cat,dog,car`

use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;
use unclip::clip::ClipPipeline;
use unclip_examples::RuntimeArgs;

#[derive(Parser)]
#[command(
    about = "Scores images against label prompts with a CLIP model (zero-shot classification)"
)]
struct Cli {
    /// Checkpoint folder (e.g. a download of openai/clip-vit-base-patch32).
    #[arg(long)]
    model: PathBuf,
    /// Image file(s) to classify (PNG or JPEG).
    #[arg(long, required = true, num_args = 1..)]
    image: Vec<PathBuf>,
    /// Comma-separated labels.
    #[arg(long, value_delimiter = ',', required = true)]
    labels: Vec<String>,
    /// Prompt template; `{}` is replaced by each label.
    #[arg(long, default_value = "a photo of a {}.")]
    template: String,
    /// How many labels to print per image.
    #[arg(long, default_value_t = 5)]
    top: usize,
    #[command(flatten)]
    rt: RuntimeArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (device, kind) = (cli.rt.device()?, cli.rt.dtype()?);
    let pipe = ClipPipeline::from_dir(&cli.model, device, kind)
        .with_context(|| format!("loading CLIP from {}", cli.model.display()))?;
    let images = cli
        .image
        .iter()
        .map(|p| unclip::clip::image::open(p).with_context(|| format!("reading {}", p.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let labels: Vec<&str> = cli.labels.iter().map(|s| s.trim()).collect();
    let scores = pipe.classify(&images, &labels, &cli.template)?;
    for (path, ranked) in cli.image.iter().zip(scores) {
        println!("{}", path.display());
        for s in ranked.iter().take(cli.top) {
            println!("  {:>6.2}%  {}", 100.0 * s.probability, s.label);
        }
    }
    Ok(())
}
