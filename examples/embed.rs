//! Computes CLIP image and text embeddings of a dataset into safetensors shards (the
//! clip-retrieval step before training a prior or decoder on precomputed embeddings).
//! Rerunning an interrupted run resumes it: finished shards are kept, the rest is done.
//!
//! ```text
//! cargo run --release --example embed -- --webdataset 'data/{00000..00009}.tar' --out emb
//! cargo run --release --example embed -- --folder my_images --model karlo-v1-alpha-image-variations --out emb
//! ```

use anyhow::Context;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::sync::Arc;
use unclip::data::embed::{EmbedOptions, Embedder, embed_dataset};
use unclip::data::{Dataset, ImageFolder, Shapes, WebDataset, WebDatasetOptions};
use unclip_examples::{EMBEDDED_MODEL, RuntimeArgs};

#[derive(Parser)]
#[command(about = "Writes CLIP image + text embedding shards of a dataset (resumable)")]
struct Cli {
    /// An image folder (images with .txt captions or a metadata.jsonl).
    #[arg(long, group = "source")]
    folder: Option<PathBuf>,
    /// Webdataset shards: a brace pattern such as 'data/{00000..00099}.tar'.
    #[arg(long, group = "source")]
    webdataset: Option<String>,
    /// The first N training scenes of the shapes generator (rendered at --shapes-size).
    #[arg(long, group = "source")]
    shapes: Option<usize>,
    #[arg(long, default_value_t = 64)]
    shapes_size: u32,
    /// Image member extensions of webdataset shards, in order of preference.
    #[arg(long, default_value = "jpg;jpeg;png;webp")]
    image_key: String,
    /// Caption member extensions of webdataset shards.
    #[arg(long, default_value = "txt")]
    text_key: String,
    /// An unCLIP folder with text_encoder/ and image_encoder/ (Karlo's layout), or a
    /// transformers CLIPModel folder.
    #[arg(long, default_value = EMBEDDED_MODEL)]
    model: PathBuf,
    /// Output folder of the shards.
    #[arg(long)]
    out: PathBuf,
    /// Source items per output shard.
    #[arg(long, default_value_t = 10_000)]
    shard_size: usize,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Threads reading and decoding images.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Fail when more than this fraction of the items are bad.
    #[arg(long, default_value_t = 0.05)]
    max_bad_fraction: f64,
    /// Stop after writing this many shards (a later run does the rest).
    #[arg(long)]
    max_shards: Option<usize>,
    #[command(flatten)]
    rt: RuntimeArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let dataset: Arc<dyn Dataset> = if let Some(dir) = &cli.folder {
        Arc::new(ImageFolder::open(dir)?)
    } else if let Some(pattern) = &cli.webdataset {
        let opts = WebDatasetOptions::from_lists(&cli.image_key, &cli.text_key)?;
        Arc::new(WebDataset::from_pattern(pattern, &opts)?)
    } else if let Some(n) = cli.shapes {
        Arc::new(Shapes::train(0, n, cli.shapes_size)?)
    } else {
        anyhow::bail!("give a source: --folder, --webdataset or --shapes");
    };
    let (device, kind) = (cli.rt.device()?, cli.rt.dtype()?);
    let embedder = Embedder::load(&cli.model, device, kind)
        .with_context(|| format!("loading CLIP from {}", cli.model.display()))?;
    eprintln!("embedding {} with {}", dataset.describe(), cli.model.display());
    let options = EmbedOptions {
        shard_size: cli.shard_size,
        batch_size: cli.batch_size,
        workers: cli.workers,
        max_bad_fraction: cli.max_bad_fraction,
        max_shards: cli.max_shards,
    };
    let bar = ProgressBar::new(dataset.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} items  {per_sec}  eta {eta}  {msg}")
            .expect("valid template"),
    );
    let summary = embed_dataset(&embedder, dataset.as_ref(), &cli.out, &options, &mut |p| {
        bar.set_position(p.done as u64);
        bar.set_message(format!("{} skipped", p.skipped));
    })?;
    bar.finish_and_clear();
    println!(
        "{} items embedded, {} skipped, {} shards written, {} already done, {} left, {:.1} s -> {}",
        summary.items,
        summary.skipped,
        summary.shards_written,
        summary.shards_resumed,
        summary.shards_left,
        summary.seconds,
        cli.out.display()
    );
    for s in &summary.last_skipped {
        println!("  skipped: {s}");
    }
    Ok(())
}
