//! `--from <model folder>`: starts a run from an installed diffusers-layout model (e.g.
//! `models/shapes`) instead of from scratch, so a shipped model can be trained further when its
//! run folder is gone. The tokenizer, CLIP, prior and upsampler become finished stages of the run
//! (f32 copies of the folder's weights); the decoder and its text projection are written to
//! `<out>/import/decoder.safetensors`, where the decoder stage starts from (`Recipe::decoder_init`).
//! Every tensor is checked against the recipe's model shapes; nothing is imported twice.

use crate::decoder_stage::{TEXT_PROJ, UNET};
use crate::stage::{Ctx, WEIGHTS};
use anyhow::Context;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor, nn::VarStore};
use unclip::clip::{AnyConfig, ClipModel, Towers};
use unclip::core::fsutil;
use unclip::core::weights::{Unexpected, load_tensors, read_tensors, save_file};
use unclip::decoder::{UNet2DConfig, UNet2DModel};
use unclip::prior::{PriorConfig, PriorTransformer};

/// Where the imported decoder lies inside a run folder.
pub fn decoder_path(out: &Path) -> PathBuf {
    out.join("import").join("decoder.safetensors")
}

pub fn run(ctx: &Ctx, from: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        from.join("model_index.json").is_file(),
        "--from {}: not a model folder (no model_index.json)",
        from.display()
    );
    tokenizer(ctx, from)?;
    clip(ctx, from)?;
    prior(ctx, from)?;
    upsampler(ctx, from)?;
    decoder(ctx, from)?;
    Ok(())
}

fn tokenizer(ctx: &Ctx, from: &Path) -> anyhow::Result<()> {
    let dir = ctx.out.join("tokenizer");
    if fsutil::is_complete(&dir) {
        return Ok(());
    }
    std::fs::create_dir_all(&dir)?;
    for f in crate::tokenizer::FILES {
        let src = from.join("tokenizer").join(f);
        fsutil::atomic_write(&dir.join(f), |tmp| {
            std::fs::copy(&src, tmp).map(drop).map_err(|e| unclip::core::Error::io(&src, e))
        })
        .with_context(|| format!("copying tokenizer/{f} from {}", from.display()))?;
    }
    // Last: the stage is complete only once every file is there.
    let info =
        serde_json::json!({ "stage": "tokenizer", "imported_from": from.display().to_string() });
    fsutil::mark_complete(&dir, &info)?;
    println!("import: tokenizer from {}", from.display());
    Ok(())
}

/// Both towers in one CLIPModel of the recipe's shape. The folder's encoders do not carry CLIP's
/// temperature (only training uses it): it keeps the recipe's initial value.
fn clip(ctx: &Ctx, from: &Path) -> anyhow::Result<()> {
    let dir = ctx.out.join("clip");
    if dir.join(WEIGHTS).exists() {
        return Ok(());
    }
    let tok = ctx.tokenizer()?;
    let cfg = ctx.recipe.clip_config(tok.vocab_size(), tok.bos_id(), tok.eos_id(), tok.pad_id());
    let model = ClipModel::new(AnyConfig::from_value(cfg)?, Towers::Both, ctx.device, Kind::Float)?;
    let mut tensors = read_tensors(&from.join("text_encoder").join("model.safetensors"))?;
    tensors.extend(read_tensors(&from.join("image_encoder").join("model.safetensors"))?);
    tensors.insert("logit_scale".into(), model.logit_scale()?.detach());
    load_tensors(model.var_store(), &tensors, &from.display().to_string(), Unexpected::Error)?;
    std::fs::create_dir_all(&dir)?;
    let json = serde_json::to_string_pretty(&model.config_json())?;
    crate::stage::write_bytes(&dir.join("config.json"), json.as_bytes())?;
    save_file(model.var_store(), &dir.join(WEIGHTS), Some(Kind::Float))?;
    crate::stage::mark_done(&dir, "clip", ctx.recipe.clip.steps)?;
    println!("import: CLIP (both towers) from {}", from.display());
    Ok(())
}

/// A diffusers component of the folder as the finished stage `stage`: `build` creates the
/// recipe's model in the store, every tensor's name and shape is checked against it, and the
/// weights are written in f32 where the stage writes its own.
fn finished_stage(
    ctx: &Ctx,
    from: &Path,
    stage: &str,
    component: &str,
    build: impl FnOnce(&VarStore) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let dest = ctx.out.join(stage).join(WEIGHTS);
    if dest.exists() {
        return Ok(());
    }
    let vs = VarStore::new(ctx.device);
    build(&vs)?;
    let file = from.join(component).join("diffusion_pytorch_model.safetensors");
    load_tensors(&vs, &read_tensors(&file)?, &file.display().to_string(), Unexpected::Error)?;
    std::fs::create_dir_all(dest.parent().context("no parent folder")?)?;
    save_file(&vs, &dest, Some(Kind::Float))?;
    let steps = if stage == "prior" { ctx.recipe.prior.steps } else { ctx.recipe.upsampler.steps };
    crate::stage::mark_done(dest.parent().context("no parent folder")?, stage, steps)?;
    println!("import: {stage} from {}", file.display());
    Ok(())
}

fn prior(ctx: &Ctx, from: &Path) -> anyhow::Result<()> {
    finished_stage(ctx, from, "prior", "prior", |vs| {
        let cfg: PriorConfig = serde_json::from_value(ctx.recipe.prior_config())?;
        PriorTransformer::new(vs.root(), &cfg)?;
        Ok(())
    })
}

/// The folder's first super-res UNet (the export writes the one upsampler as both).
fn upsampler(ctx: &Ctx, from: &Path) -> anyhow::Result<()> {
    finished_stage(ctx, from, "upsampler", "super_res_first", |vs| {
        let cfg: UNet2DConfig = serde_json::from_value(ctx.recipe.upsampler_config())?;
        UNet2DModel::new(vs.root(), &cfg)?;
        Ok(())
    })
}

/// The decoder and text projection under the decoder stage's two prefixes. Their shapes are
/// checked when the decoder stage starts from them (which may widen `conv_in`).
fn decoder(ctx: &Ctx, from: &Path) -> anyhow::Result<()> {
    let dest = decoder_path(&ctx.out);
    if dest.exists() {
        return Ok(());
    }
    let mut named: Vec<(String, Tensor)> = Vec::new();
    for (folder, prefix) in [("decoder", UNET), ("text_proj", TEXT_PROJ)] {
        let file = from.join(folder).join("diffusion_pytorch_model.safetensors");
        for (name, t) in read_tensors(&file)? {
            named.push((format!("{prefix}.{name}"), t.f_to_kind(Kind::Float)?));
        }
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));
    std::fs::create_dir_all(dest.parent().context("no parent folder")?)?;
    unclip::core::fsutil::atomic_write(&dest, |tmp| Ok(Tensor::write_safetensors(&named, tmp)?))?;
    println!("import: decoder and text projection from {} -> {}", from.display(), dest.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::Recipe;
    use tch::Device;
    use unclip::clip::Truncation;
    use unclip::decoder::{
        TextProjConfig, UNet2DConditionConfig, UNet2DConditionModel, UnCLIPTextProjModel,
    };

    fn shipped() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/shapes")
    }

    /// The shipped model imports into a run of the recipe it was trained with: CLIP computes the
    /// shipped text encoder's embeddings exactly, the decoder stage can start from the decoder, and
    /// a second import changes nothing.
    #[test]
    fn the_embedded_model_imports_into_a_run() {
        let out = unclip::core::fsutil::scratch_dir("import-shapes").unwrap();
        let recipe = Recipe { decoder_coordinates: true, ..Recipe::full() };
        let ctx = Ctx::new(out.clone(), recipe.clone(), Device::Cpu);
        run(&ctx, &shipped()).unwrap();

        let tok = ctx.tokenizer().unwrap();
        let enc = tok.encode_batch(
            &["a red circle on a blue background"],
            Truncation::Truncate,
            Device::Cpu,
        );
        let ids = enc.unwrap().input_ids;
        let ours = ctx.clip().unwrap().encode_text(&ids, None).unwrap().text_embeds;
        let text = shipped().join("text_encoder");
        let theirs = ClipModel::load(&text, Towers::Text, Device::Cpu, Kind::Float).unwrap();
        let theirs = theirs.encode_text(&ids, None).unwrap().text_embeds;
        assert_eq!(
            Vec::<f32>::try_from(ours.flatten(0, -1)).unwrap(),
            Vec::<f32>::try_from(theirs.flatten(0, -1)).unwrap()
        );

        let cfg: UNet2DConditionConfig = serde_json::from_value(recipe.decoder_config()).unwrap();
        let proj: TextProjConfig = serde_json::from_value(recipe.text_proj_config()).unwrap();
        let vs = VarStore::new(Device::Cpu);
        UNet2DConditionModel::new(vs.root() / UNET, &cfg).unwrap();
        UnCLIPTextProjModel::new(vs.root() / TEXT_PROJ, &proj).unwrap();
        crate::decoder_stage::warm_start(&vs, &decoder_path(&out)).unwrap();

        let before =
            std::fs::metadata(out.join("prior").join(WEIGHTS)).unwrap().modified().unwrap();
        run(&ctx, &shipped()).unwrap();
        let after = std::fs::metadata(out.join("prior").join(WEIGHTS)).unwrap().modified().unwrap();
        assert_eq!(before, after);

        let e = run(&ctx, &out).unwrap_err().to_string();
        assert!(e.contains("model_index.json"), "{e}");
    }
}
