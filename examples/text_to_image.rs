//! Text to image with an unCLIP folder: prior -> decoder -> super-resolution.
//!
//! `cargo run --release --example text_to_image` (the embedded shapes model, its default prompt)
//! `cargo run --release --example text_to_image -- --model karlo-v1-alpha --prompt "a corgi playing a trumpet"`

use clap::Parser;
use unclip::TextToImage;
use unclip_examples::{ModelArgs, Progress, SamplingArgs, save, save_from};

#[derive(Parser)]
#[command(about = "Generates images from prompts with an unCLIP (Karlo) model")]
struct Cli {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt (repeat the flag for several).
    #[arg(long, default_value = "a red circle on a blue background")]
    prompt: Vec<String>,
    /// The unconditional prompt of classifier-free guidance.
    #[arg(long, default_value = "")]
    negative_prompt: String,
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    /// Generate at most this many images at a time, writing each batch as it is done (any
    /// --num-images then runs in the memory of one batch). Default: all at once.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: Option<u64>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Generate this many per prompt and keep them ordered by CLIP similarity (needs an image
    /// encoder, see --image-encoder).
    #[arg(long)]
    rerank: Option<usize>,
    /// Also write the decoder's 64 px images.
    #[arg(long)]
    save_small: bool,
    /// Also write all images tiled into this PNG (one row per prompt).
    #[arg(long)]
    grid: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut model = cli.model.load()?;
    let req = TextToImage {
        prompts: cli.prompt.clone(),
        negative_prompt: cli.negative_prompt.clone(),
        num_images_per_prompt: cli.num_images,
        prior_candidates: cli.sampling.candidates,
        seed: Some(cli.model.seed),
        ..cli.sampling.resolve(&model).text_to_image("")
    };
    let mut bar = Progress::default();
    if let Some(batch) = cli.batch_size {
        if cli.rerank.is_some() || cli.grid.is_some() {
            anyhow::bail!("--rerank and --grid need all images at once: drop --batch-size");
        }
        let out = &cli.model.out;
        model.text_to_image_chunked(
            &req,
            batch as usize,
            &mut |s| bar.update(s),
            &mut |g, first| {
                save_from(&g, out, "image-", first)
                    .map_err(|e| unclip::Error::Pipeline(e.to_string()))?;
                if cli.save_small {
                    let small = (g.image_small.shallow_clone() * 0.5 + 0.5).clamp(0.0, 1.0);
                    unclip::output::save_pngs_from(&small, out, "small-", first)?;
                }
                Ok(())
            },
        )?;
        bar.finish();
        return Ok(());
    }
    let g = match cli.rerank {
        Some(k) => {
            let r = model.generate_reranked(&req, k, &mut |s| bar.update(s))?;
            for (i, s) in r.scores.iter().enumerate() {
                println!(
                    "image {i}: prompt {} CLIP similarity {s:.4}",
                    r.generation.source_index[i]
                );
            }
            r.generation
        }
        None => model.text_to_image(&req, &mut |s| bar.update(s))?,
    };
    bar.finish();
    save(&g, &cli.model.out, "image-")?;
    if let Some(path) = &cli.grid {
        let per_prompt = g.images.size()[0] as usize / cli.prompt.len().max(1);
        unclip::output::save_grid(&g.images, path, per_prompt.max(1))?;
        println!("grid: {}", path.display());
    }
    if cli.save_small {
        let small = (g.image_small.shallow_clone() * 0.5 + 0.5).clamp(0.0, 1.0);
        unclip::output::save_pngs(&small, &cli.model.out, "small-")?;
    }
    Ok(())
}
