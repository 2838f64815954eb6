//! What the load-time checks of `unclip_core::weights` cost on Karlo-sized components: each
//! component of a Karlo-layout folder is loaded (CPU, f32) with the NaN/infinity check of every
//! weight on and off, alternately, and the table prints the times and their ratio. The sizing
//! done before allocation (`nn::measure` + the header comparison) is timed on its own.
//!
//! `cargo run --release -p unclip-benches --bin load_checks -- DIR [--write] [--reps 2]`
//!
//! `--write` first writes DIR as a Karlo-sized folder with random weights (our own
//! initialisation, stored f16 as the published checkpoints are): the real Karlo configs of
//! `fixtures/data/decoder/karlo/` (super_res_last = super_res_first), the prior's defaults
//! (Karlo's) and CLIP ViT-L/14's text tower; tokenizer and scheduler configs from the tiny
//! pipeline fixture. About 6.5 GB; nothing of it is committed.

use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, nn};
use unclip_clip::{AnyConfig, ClipModel, Towers};
use unclip_decoder::checkpoint::{self, Component};
use unclip_decoder::{UNet2DConditionModel, UNet2DModel, UnCLIPTextProjModel};
use unclip_prior::{PriorConfig, PriorTransformer};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn copy_dir(src: &Path, dst: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dst)?;
    for e in std::fs::read_dir(src)? {
        let e = e?;
        std::fs::copy(e.path(), dst.join(e.file_name()))?;
    }
    Ok(())
}

fn write_unet<M: Component>(config: &str, out: &Path) -> anyhow::Result<u128> {
    let dir = root().join("fixtures/data/decoder/karlo").join(config);
    let cfg = checkpoint::read_config::<M>(&dir)?;
    let m = checkpoint::init::<M>(&cfg, Device::Cpu, Kind::Float)?;
    checkpoint::save(&m, out, Some(Kind::Half))?;
    Ok(checkpoint::layout::<M>(&cfg)?.elements)
}

fn write_folder(out: &Path) -> anyhow::Result<()> {
    let tiny = root().join("fixtures/data/pipeline/text2img");
    for n in ["tokenizer", "prior_scheduler", "decoder_scheduler", "super_res_scheduler"] {
        copy_dir(&tiny.join(n), &out.join(n))?;
    }
    std::fs::copy(tiny.join("model_index.json"), out.join("model_index.json"))?;
    tch::manual_seed(0);
    let text: AnyConfig = AnyConfig::from_value(serde_json::json!({
        "model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": 768,
        "intermediate_size": 3072, "projection_dim": 768, "num_hidden_layers": 12,
        "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1
    }))?;
    let clip = ClipModel::new(text, Towers::Text, Device::Cpu, Kind::Float)?;
    clip.save(&out.join("text_encoder"), Some(Kind::Half))?;
    drop(clip);
    let vs = nn::VarStore::new(Device::Cpu);
    let prior = PriorTransformer::new(vs.root(), &PriorConfig::karlo())?;
    prior.save_pretrained(&vs, &out.join("prior"), Some(Kind::Half))?;
    drop((vs, prior));
    write_unet::<UnCLIPTextProjModel>("text_proj", &out.join("text_proj"))?;
    write_unet::<UNet2DConditionModel>("decoder", &out.join("decoder"))?;
    write_unet::<UNet2DModel>("super_res_first", &out.join("super_res_first"))?;
    write_unet::<UNet2DModel>("super_res_first", &out.join("super_res_last"))?;
    Ok(())
}

/// Loads component `name` of `dir` (CPU, f32) and drops it; seconds.
fn load(dir: &Path, name: &str) -> anyhow::Result<f64> {
    let d = dir.join(name);
    let t = Instant::now();
    match name {
        "text_encoder" => drop(ClipModel::load(&d, Towers::Text, Device::Cpu, Kind::Float)?),
        "prior" => drop(PriorTransformer::from_pretrained(&d, Device::Cpu, Kind::Float)?),
        "text_proj" => drop(checkpoint::load::<UnCLIPTextProjModel>(&d, Device::Cpu, Kind::Float)?),
        "decoder" => drop(checkpoint::load::<UNet2DConditionModel>(&d, Device::Cpu, Kind::Float)?),
        _ => drop(checkpoint::load::<UNet2DModel>(&d, Device::Cpu, Kind::Float)?),
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Seconds to size `name` from its config and compare with its checkpoint's header.
fn sizing(dir: &Path, name: &str) -> anyhow::Result<f64> {
    let d = dir.join(name);
    let t = Instant::now();
    let (layout, weights) = match name {
        "text_encoder" => {
            let c = AnyConfig::read(&d.join("config.json"))?;
            (ClipModel::layout(&c, Towers::Text)?, d.join("model.safetensors"))
        }
        "prior" => {
            let c = PriorConfig::from_file(&d.join("config.json"))?;
            (PriorTransformer::layout(&c)?, d.join(checkpoint::WEIGHTS_FILE))
        }
        "text_proj" => (
            checkpoint::layout::<UnCLIPTextProjModel>(&checkpoint::read_config::<
                UnCLIPTextProjModel,
            >(&d)?)?,
            d.join(checkpoint::WEIGHTS_FILE),
        ),
        "decoder" => (
            checkpoint::layout::<UNet2DConditionModel>(&checkpoint::read_config::<
                UNet2DConditionModel,
            >(&d)?)?,
            d.join(checkpoint::WEIGHTS_FILE),
        ),
        _ => (
            checkpoint::layout::<UNet2DModel>(&checkpoint::read_config::<UNet2DModel>(&d)?)?,
            d.join(checkpoint::WEIGHTS_FILE),
        ),
    };
    unclip_core::weights::check_layout(
        &d.join("config.json"),
        &weights,
        &layout,
        unclip_core::weights::Unexpected::Ignore,
        Kind::Float,
        Device::Cpu,
    )?;
    Ok(t.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = PathBuf::from(
        args.first()
            .ok_or_else(|| anyhow::anyhow!("usage: load_checks DIR [--write] [--reps N]"))?,
    );
    let reps: usize = match args.iter().position(|a| a == "--reps") {
        Some(i) => {
            args.get(i + 1).ok_or_else(|| anyhow::anyhow!("--reps needs a value"))?.parse()?
        }
        None => 2,
    };
    if args.iter().any(|a| a == "--write") {
        let t = Instant::now();
        write_folder(&dir)?;
        println!("wrote {} in {:.0} s", dir.display(), t.elapsed().as_secs_f64());
    }
    tch::set_num_threads(2);
    println!(
        "| component | sizing before allocation | load, finite check off | load, check on | on / off |"
    );
    println!("|---|---|---|---|---|");
    let (mut total_off, mut total_on) = (0.0, 0.0);
    for name in
        ["text_encoder", "prior", "text_proj", "decoder", "super_res_first", "super_res_last"]
    {
        let size_s = sizing(&dir, name)?;
        let (mut off, mut on) = (f64::MAX, f64::MAX);
        for _ in 0..reps {
            unclip_core::weights::set_check_finite(false);
            off = off.min(load(&dir, name)?);
            unclip_core::weights::set_check_finite(true);
            on = on.min(load(&dir, name)?);
        }
        total_off += off;
        total_on += on;
        println!("| {name} | {:.3} s | {off:.2} s | {on:.2} s | {:.3} |", size_s, on / off);
    }
    println!("| all | | {total_off:.2} s | {total_on:.2} s | {:.3} |", total_on / total_off);
    Ok(())
}
