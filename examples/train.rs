//! Trains unCLIP's stages from a run config, and exports a run as a model folder.
//!
//! ```sh
//! cargo run --release --bin train -- --config configs/shapes/embedded.toml
//! cargo run --release --bin train -- --config run.toml --set decoder.train.steps=4000
//! cargo run --release --bin train -- export --config run.toml --to models/mine
//! ```
//!
//! Rerunning the same command resumes where the run stopped (bit for bit on the CPU). The
//! effective config is printed and saved as `<run.out>/config.toml`. See `unclip::train`.
//!
//! Data parallel (every stage; rank 0 alone builds the tokenizer): `--nproc N` starts N local
//! ranks (one libtorch thread each unless `run.threads` is set with --set); under torchrun or
//! `srun` (RANK, WORLD_SIZE, ... set) each process is one rank. `batch_size` is then the global
//! batch.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use unclip::dist::{Backend, DistEnv, Options, ProcessGroup};
use unclip::train::{Dist, ExportOptions, RunConfig, RunOptions, Trainer, export};

#[derive(Parser)]
#[command(about = "Trains unCLIP stages from a TOML run config; `export` writes a model folder")]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: ConfigArgs,
    /// Run only this stage (tokenizer, clip, prior, decoder, upsampler).
    #[arg(long)]
    stage: Option<String>,
    /// Stop after this many training steps (rerun to resume).
    #[arg(long)]
    stop_after: Option<u64>,
    /// Train data-parallel with N local processes (Gloo on the CPU, NCCL on CUDA; GPU =
    /// LOCAL_RANK). Not needed under torchrun or srun, which start the ranks themselves.
    #[arg(long, value_name = "N")]
    nproc: Option<usize>,
}

#[derive(clap::Args)]
struct ConfigArgs {
    /// The run config (TOML).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config value: `--set decoder.train.steps=4000` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Writes the run's complete stages as a diffusers-layout model folder.
    Export {
        #[command(flatten)]
        config: ConfigArgs,
        /// The model folder to write. An empty folder or a previous install (its
        /// .unclip-install.json lists everything in it) gets the run's stages swapped in (its
        /// other components are kept); a folder holding anything else is refused, and so are the
        /// run folder and folders inside or around it.
        #[arg(long)]
        to: PathBuf,
        /// Replace --to even when it holds files no install manifest lists (they are deleted).
        #[arg(long)]
        overwrite: bool,
        /// A model folder supplying the components the run did not train (when --to is new).
        #[arg(long)]
        base: Option<PathBuf>,
    },
}

fn load(args: &ConfigArgs) -> anyhow::Result<(RunConfig, PathBuf)> {
    let path = args.config.clone().ok_or_else(|| anyhow::anyhow!("--config <FILE> is required"))?;
    Ok((RunConfig::load(&path, &args.set)?, path))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::Export { config, to, base, overwrite }) => {
            let (cfg, _) = load(config)?;
            let opts = ExportOptions {
                to: to.clone(),
                base: base.clone().or_else(|| cfg.run.conditioning.clone()),
                overwrite: *overwrite,
                half: cfg.export.half,
                decoder_guidance_scale: cfg.export.decoder_guidance_scale,
                decoder_candidates: cfg.export.decoder_candidates,
                drop_first_upsampler: cfg.export.drop_first_upsampler,
            };
            export(&cfg.run.out, &opts)?;
        }
        None if cli.nproc.is_some_and(|n| n > 1) && !DistEnv::launched() => {
            let n = cli.nproc.unwrap_or(1);
            let mut args: Vec<std::ffi::OsString> = Vec::new();
            let mut rest = std::env::args_os().skip(1);
            while let Some(a) = rest.next() {
                match a.to_str() {
                    Some("--nproc") => drop(rest.next()),
                    Some(s) if s.starts_with("--nproc=") => {}
                    _ => args.push(a),
                }
            }
            if !cli.config.set.iter().any(|s| s.trim_start().starts_with("run.threads")) {
                args.extend(["--set".into(), "run.threads=1".into()]);
            }
            unclip::dist::spawn_local(n, std::env::current_exe()?, &args)?;
        }
        None => {
            let (cfg, path) = load(&cli.config)?;
            let env = DistEnv::from_env()?;
            if env.rank == 0 {
                println!("# effective config ({})\n{}", path.display(), cfg.to_toml());
            }
            let trainer = if env.world_size > 1 {
                let device = match unclip::core::parse_device(&cfg.run.device)? {
                    unclip::tch::Device::Cuda(_) => unclip::tch::Device::Cuda(env.local_rank),
                    d => d,
                };
                let opts = Options { backend: Backend::for_device(device), ..Options::default() };
                let pg = ProcessGroup::init(&env, &opts)?;
                Trainer::open_distributed(cfg, &path, device, Dist::new(pg))?
            } else {
                Trainer::open(cfg, &path)?
            };
            let opts = RunOptions { only: cli.stage.clone(), stop_after: cli.stop_after };
            let summary = trainer.run(&opts)?;
            if summary.stopped {
                println!(
                    "stopped; complete: [{}]; rerun the same command to resume",
                    summary.complete.join(", ")
                );
            } else {
                println!(
                    "complete: [{}] in {}",
                    summary.complete.join(", "),
                    trainer.out().display()
                );
            }
        }
    }
    Ok(())
}
