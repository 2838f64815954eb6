//! The training recipe of the embedded default model: a small but complete unCLIP trained end to
//! end on the captioned shapes of `unclip::shapes`, with this library's own training steps, in
//! the paper's order: tokenizer, CLIP, prior, decoder (32 px), upsampler (32 -> 64 px).
//!
//! ```sh
//! cargo run --release --example train_embedded -- --stage all --out runs/shapes
//! cargo run --release --example train_embedded -- --stage all --out runs/quick --quick
//! ```
//!
//! Every stage writes into `<out>/<stage>/`: `loss.csv`, `loss.png`, periodic checkpoints
//! (`step-*/`, `latest.json`) and its shipped weights (EMA). Running the same command again
//! resumes each unfinished stage from its newest checkpoint and skips finished ones. At the end
//! the diffusers-layout folder `<out>/model/` is written (f16) and loaded back through
//! `unclip::Unclip::from_pretrained` as a check. Then:
//!
//! ```sh
//! cargo run --release --example train_embedded -- --stage export --out runs/shapes --install models/shapes
//! cargo run --release --example evaluate -- --model models/shapes --out runs/shapes/eval
//! ```
//!
//! `--estimate` measures each stage's seconds per step here and prints the full run's duration.
//! Killing the run at any moment and starting the same command again continues bit for bit
//! (checkpoints are atomic; batches and noise are functions of the step).

mod clip_stage;
mod data;
mod decoder_stage;
mod export;
mod import;
mod prior_stage;
mod recipe;
mod stage;
mod tokenizer;
mod upsampler_stage;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use std::path::PathBuf;
use unclip_examples::RuntimeArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StageArg {
    All,
    Tokenizer,
    Clip,
    Prior,
    Decoder,
    Upsampler,
    Export,
}

#[derive(Parser)]
#[command(about = "Trains the embedded shapes unCLIP (tokenizer, CLIP, prior, decoder, upsampler)")]
struct Cli {
    /// Which stage to run (each needs the earlier ones' outputs); `all` runs every unfinished one.
    #[arg(long, value_enum, default_value = "all")]
    stage: StageArg,
    /// Run folder (checkpoints, logs, the exported model).
    #[arg(long, default_value = "runs/shapes")]
    out: PathBuf,
    /// A few steps per stage with the same sizes: checks that everything runs end to end.
    #[arg(long)]
    quick: bool,
    /// Multiply every stage's step count (e.g. 0.5 for a shorter run); each stage must keep more
    /// steps than its warmup.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true, value_parser = unclip_examples::positive_finite)]
    steps_scale: f64,
    /// Only measure seconds per step of each stage (a few steps each in a scratch folder) and
    /// print the estimated duration of the full recipe.
    #[arg(long)]
    estimate: bool,
    /// libtorch CPU threads (keep it small on shared machines), 1 to 1024.
    #[arg(long, default_value_t = 2, allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(unclip_examples::THREADS_RANGE))]
    threads: i32,
    /// CLIP batches of groups of this many counterpart scenes (hard negatives; 1: plain batches).
    #[arg(long)]
    clip_group: Option<usize>,
    /// CLIP training steps (the recipe's when absent), 1 to 10^9.
    #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(u64).range(1..=recipe::MAX_STEPS))]
    clip_steps: Option<u64>,
    /// Decoder training steps (the recipe's when absent), 1 to 10^9.
    #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(u64).range(1..=recipe::MAX_STEPS))]
    decoder_steps: Option<u64>,
    /// Give the decoder pixel-coordinate inputs (see the recipe's `decoder_coordinates`).
    #[arg(long)]
    decoder_coordinates: bool,
    /// Probability of training the decoder on the empty caption (the recipe's 0.5 when absent).
    #[arg(long)]
    decoder_text_dropout: Option<f64>,
    /// Share of decoder timesteps drawn from 500..1000 instead of 0..1000.
    #[arg(long)]
    decoder_high_noise: Option<f64>,
    /// Start the decoder from these weights (another run's decoder/weights.safetensors).
    #[arg(long)]
    decoder_init: Option<PathBuf>,
    /// Start the run from an installed model folder (e.g. models/shapes): its tokenizer, CLIP,
    /// prior and upsampler become finished stages, and the decoder stage starts from its decoder
    /// (as with --decoder-init), to train a shipped model further.
    #[arg(long, conflicts_with = "decoder_init")]
    from: Option<PathBuf>,
    /// Add steps to an existing run: only step counts may differ from its recipe.json; each stage
    /// given more steps resumes from its last checkpoint (a finished one's weights are kept as
    /// `weights-<steps>.safetensors`); finished later stages keep their weights.
    #[arg(long)]
    extend: bool,
    /// Where to install the exported model folder at the end (e.g. models/shapes). The folder is
    /// written beside it and swapped in; a previous install there is replaced, but a target that
    /// holds anything else (or lies inside the run folder, or contains it) is refused before any
    /// work is done.
    #[arg(long)]
    install: Option<PathBuf>,
    /// With --install: replace the target even when it holds files that are not a previous
    /// install (they are deleted after the swap). Never allows the run folder or a folder in it.
    #[arg(long, requires = "install")]
    overwrite: bool,
    #[command(flatten)]
    rt: RuntimeArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tch::set_num_threads(cli.threads);
    tch::set_num_interop_threads(1);
    let device = cli.rt.device()?;
    let mut recipe = if cli.quick { recipe::Recipe::quick() } else { recipe::Recipe::full() };
    recipe.scale_steps(cli.steps_scale)?;
    if let Some(g) = cli.clip_group {
        anyhow::ensure!(g >= 1, "--clip-group must be at least 1");
        recipe.clip_group = g;
    }
    if let Some(n) = cli.clip_steps {
        anyhow::ensure!(n >= 1, "--clip-steps must be at least 1");
        recipe.set_clip_steps(n);
    }
    if let Some(n) = cli.decoder_steps {
        anyhow::ensure!(n >= 1, "--decoder-steps must be at least 1");
        recipe.set_decoder_steps(n);
    }
    recipe.decoder_coordinates |= cli.decoder_coordinates;
    if let Some(p) = cli.decoder_text_dropout {
        anyhow::ensure!((0.0..=1.0).contains(&p), "--decoder-text-dropout must be in [0, 1]");
        recipe.decoder_text_dropout = p;
    }
    if let Some(p) = cli.decoder_high_noise {
        anyhow::ensure!((0.0..=1.0).contains(&p), "--decoder-high-noise must be in [0, 1]");
        recipe.decoder_high_noise = p;
    }
    if let Some(path) = &cli.decoder_init {
        anyhow::ensure!(path.is_file(), "--decoder-init {} is not a file", path.display());
        recipe.decoder_init = Some(path.clone());
    }
    if cli.from.is_some() {
        recipe.decoder_init = Some(import::decoder_path(&cli.out));
    }
    if cli.estimate {
        return stage::estimate(&recipe, &cli.out, device);
    }
    if let Some(dest) = &cli.install {
        // Refused before hours of work, not after.
        unclip::core::fsutil::check_install_target(dest, &[&cli.out], cli.overwrite)?;
    }
    std::fs::create_dir_all(&cli.out).with_context(|| format!("creating {}", cli.out.display()))?;
    for p in unclip::core::fsutil::clean_stale_temps(&cli.out)? {
        println!("removed {} (left by a killed write)", p.display());
    }
    recipe.write_or_check(&cli.out, cli.extend)?;
    let ctx = stage::Ctx::new(cli.out.clone(), recipe, device);
    let all = cli.stage == StageArg::All;
    let started = std::time::Instant::now();
    if let Some(from) = &cli.from {
        import::run(&ctx, from)?;
    }
    if all || cli.stage == StageArg::Tokenizer {
        tokenizer::run(&ctx)?;
    }
    if all || cli.stage == StageArg::Clip {
        clip_stage::run(&ctx)?;
    }
    if all || cli.stage == StageArg::Prior {
        prior_stage::run(&ctx)?;
    }
    if all || cli.stage == StageArg::Decoder {
        decoder_stage::run(&ctx)?;
    }
    if all || cli.stage == StageArg::Upsampler {
        upsampler_stage::run(&ctx)?;
    }
    if all || cli.stage == StageArg::Export {
        let dir = export::run(&ctx)?;
        if let Some(dest) = &cli.install {
            export::install(&dir, dest, &cli.out, cli.overwrite)?;
        }
    }
    println!("done in {:.1} min", started.elapsed().as_secs_f64() / 60.0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(args: &[&str], flag: &str) {
        let mut all = vec!["train_embedded"];
        all.extend_from_slice(args);
        let e = match Cli::try_parse_from(&all) {
            Ok(_) => panic!("{args:?} accepted"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(flag), "{args:?}: {e}");
    }

    /// Numeric flags at their extremes are refused by name (they used to panic inside
    /// libtorch, or silently train an untrained model).
    #[test]
    fn numeric_flags_at_extremes_are_refused() {
        for v in ["0", "-1", "1025", "99999999999"] {
            refused(&["--threads", v], "--threads");
        }
        for v in ["0", "-1", "NaN", "inf", "-0.5", "x"] {
            refused(&["--steps-scale", v], "--steps-scale");
        }
        for v in ["0", "-1", "1000000001", "18446744073709551616"] {
            refused(&["--clip-steps", v], "--clip-steps");
            refused(&["--decoder-steps", v], "--decoder-steps");
        }
        refused(&["--threads=-1"], "--threads");
        refused(&["--overwrite"], "--install");
        let ok = Cli::try_parse_from(["x", "--threads", "4", "--steps-scale", "0.5"]).unwrap();
        assert_eq!((ok.threads, ok.steps_scale), (4, 0.5));
    }
}
