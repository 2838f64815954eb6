//! The CLIP stage: both towers trained with the contrastive loss of `unclip_clip::train` on
//! (caption, image) pairs, the learned temperature clamped as CLIP does. On the shapes source,
//! batches can be groups of counterpart scenes (`clip.counterparts`): hard negatives.
//! Data-parallel, the loss is the global batch's (every caption against every image of all
//! ranks, open_clip's gathered features; [`contrastive_step`]).

use super::super::dist::Dist;
use super::super::loop_::{self, Ctx, MODEL, StageHooks, StageSteps, WEIGHTS};
use super::super::source::{Needs, shapes_generator};
use super::super::{Result, TrainError, write_json};
use super::{component_dir, seed_init};
use crate::data::Batch;
use serde_json::{Value, json};
use std::path::Path;
use tch::{Device, Kind, Tensor};
use unclip_clip::train::MAX_LOGIT_SCALE;
use unclip_clip::{
    AnyConfig, ClipModel, ImageProcessor, ProcessorConfig, Towers, Truncation, contrastive_loss,
    normalize, similarity,
};
use unclip_core::weights::{Unexpected, load_tensors, read_tensors};

/// transformers' `CLIPModel` config: both towers share the width; text hidden = projection, as
/// the prior and the decoder's text projection need.
pub(crate) fn model_config(
    m: &crate::train::config::ClipModelConfig,
    context: usize,
    vocab: usize,
    bos: i64,
    eos: i64,
    pad: i64,
) -> Value {
    let d = m.width;
    json!({
        "model_type": "clip",
        "projection_dim": d,
        "logit_scale_init_value": 2.6592,
        "text_config": {
            "vocab_size": vocab, "hidden_size": d, "intermediate_size": 4 * d, "projection_dim": d,
            "num_hidden_layers": m.layers, "num_attention_heads": m.heads,
            "max_position_embeddings": context, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
            "pad_token_id": pad, "bos_token_id": bos, "eos_token_id": eos,
        },
        "vision_config": {
            "hidden_size": d, "intermediate_size": 4 * d, "projection_dim": d,
            "num_hidden_layers": m.layers, "num_attention_heads": m.heads, "num_channels": 3,
            "image_size": m.image_size, "patch_size": m.patch_size, "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        },
    })
}

/// Both towers from a model folder's `text_encoder` and `image_encoder` (the folder's encoders
/// do not carry CLIP's temperature: it keeps its initial value).
fn from_folder(init: &Path, device: Device) -> Result<ClipModel> {
    let text_dir = component_dir(init, "text_encoder", "clip.init")?;
    let image_dir = text_dir.parent().map(|p| p.join("image_encoder")).filter(|p| p.is_dir());
    let image_dir = image_dir.ok_or_else(|| {
        TrainError::stage(
            "clip",
            format!("clip.init = {}: no image_encoder beside text_encoder", init.display()),
        )
    })?;
    let text: Value = unclip_core::config::read_json(&text_dir.join("config.json"))?;
    let vision: Value = unclip_core::config::read_json(&image_dir.join("config.json"))?;
    let proj = text.get("projection_dim").cloned().unwrap_or(Value::Null);
    let cfg = json!({ "model_type": "clip", "projection_dim": proj, "text_config": text, "vision_config": vision });
    let model = ClipModel::new(AnyConfig::from_value(cfg)?, Towers::Both, device, Kind::Float)?;
    let mut tensors = read_tensors(&text_dir.join("model.safetensors"))?;
    tensors.extend(read_tensors(&image_dir.join("model.safetensors"))?);
    tensors.insert("logit_scale".into(), model.logit_scale()?.detach());
    load_tensors(model.var_store(), &tensors, &init.display().to_string(), Unexpected::Error)?;
    Ok(model)
}

pub(crate) fn run(ctx: &Ctx) -> Result<StageSteps> {
    let stage =
        ctx.cfg.clip.as_ref().ok_or_else(|| TrainError::stage("clip", "no [clip] section"))?;
    let tok = ctx.tokenizer()?;
    let device = ctx.device;
    seed_init(ctx);
    let model = match (&stage.init, &stage.model) {
        (Some(init), _) => {
            println!("clip: started from {}", init.display());
            from_folder(init, device)?
        }
        (None, Some(m)) => {
            let cfg = model_config(
                m,
                tok.context_length(),
                tok.vocab_size(),
                tok.bos_id(),
                tok.eos_id(),
                tok.pad_id(),
            );
            ClipModel::new(AnyConfig::from_value(cfg)?, Towers::Both, device, Kind::Float)?
        }
        (None, None) => {
            return Err(TrainError::stage("clip", "clip.model or clip.init is required"));
        }
    };
    if stage.freeze_image {
        let frozen = freeze(&model, &["vision_model.", "visual_projection."]);
        println!("clip: image tower frozen ({frozen} tensors), text tower trained");
    }
    if stage.freeze_text {
        let frozen = freeze(&model, &["text_model.", "text_projection."]);
        println!("clip: text tower frozen ({frozen} tensors), image tower trained");
    }
    let image_size = model.vision_config().map(|v| v.image_size).unwrap_or(224);
    let dir = ctx.stage_dir("clip");
    std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    let t = &stage.train;
    let needs = |b| Needs {
        batch_size: b,
        resolution: Some(image_size as u32),
        clip_resolution: Some(image_size as u32),
        low_resolution: None,
    };
    if let Some(d) = ctx.dist {
        let share = d.per_rank_batch("clip", t.batch_size)?;
        let g = stage.counterparts;
        if g > 1 && share % g != 0 {
            let w = d.world_size();
            return Err(TrainError::stage(
                "clip",
                format!(
                    "clip.train.batch_size = {} gives each of the {w} processes {share} items, \
                     not whole groups of clip.counterparts = {g} scenes: expected a batch size \
                     that is a multiple of {w} x {g} = {}",
                    t.batch_size,
                    w * g
                ),
            ));
        }
    }
    // The tower as loaded, to measure (and with a weight, limit) how far training moves the
    // image embeddings the folder's decoder was conditioned on.
    let anchor = match (&stage.init, stage.anchor_image > 0.0) {
        (Some(init), true) => {
            let old = from_folder(init, device)?;
            freeze(&old, &[""]); // every variable
            Some(old)
        }
        _ => None,
    };
    let (loader, holdout) = ctx.loaders("clip", needs, t.batch_size)?;
    let groups = (stage.counterparts > 1 || stage.copy_negatives > 0).then(|| Counterparts {
        generator: shapes_generator(&ctx.cfg.data, ctx.seed()),
        side: image_size,
        processor: ImageProcessor::new(ProcessorConfig::clip(image_size as usize)),
    });
    let mut step = |batch: &Batch| -> Result<(Tensor, Vec<f64>)> {
        let (captions, pixels) = match &groups {
            Some(g) => g.batch(&batch.keys, stage.counterparts, stage.copy_negatives)?,
            None => {
                let p = batch
                    .clip_pixels
                    .as_ref()
                    .ok_or_else(|| TrainError::stage("clip", "the batch has no CLIP pixels"))?;
                (batch.captions.clone(), p.shallow_clone())
            }
        };
        let enc = tok.encode_batch(&captions, Truncation::Truncate, device)?;
        let pixels = pixels.f_to_device(device)?;
        let (loss, logits_per_text, image) =
            contrastive_parts(&model, &enc.input_ids, &pixels, ctx.dist)?;
        let mut metrics = Vec::with_capacity(2);
        let loss = match &anchor {
            Some(old) => {
                // 1 - cosine to the loaded tower's embedding, over the captioned images.
                let n = captions.len() as i64;
                let kept = tch::no_grad(|| old.encode_image(&pixels.f_narrow(0, 0, n)?))?;
                let kept = normalize(&kept.image_embeds)?;
                let cos = image.f_narrow(0, 0, n)?.f_mul(&kept)?.f_sum_dim_intlist(
                    1,
                    false,
                    Kind::Float,
                )?;
                let drift = cos.f_mean(Kind::Float)?.f_neg()?.f_add_scalar(1.0)?;
                metrics.push(drift.f_double_value(&[])?);
                loss.f_add(&drift.f_mul_scalar(stage.anchor_image)?)?
            }
            None => loss,
        };
        // Fraction of captions whose own image scores highest in the (global) batch, copy
        // negatives included.
        let acc = tch::no_grad(|| -> Result<f64> {
            let n = logits_per_text.size()[0];
            let hit = logits_per_text
                .f_argmax(1, false)?
                .f_eq_tensor(&Tensor::f_arange(n, (Kind::Int64, device))?)?;
            Ok(hit.f_to_kind(Kind::Float)?.f_mean(Kind::Float)?.f_double_value(&[])?)
        })?;
        metrics.insert(0, acc);
        Ok((loss, metrics))
    };
    let mut after = || -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            let mut s = model.logit_scale()?.shallow_clone();
            let _ = s.f_clamp_(0.0, MAX_LOGIT_SCALE)?;
            Ok(())
        })
    };
    let mut pictures = pictures(ctx, &model, &tok, needs)?;
    let hooks = StageHooks { step: &mut step, after: &mut after, pictures: &mut pictures };
    let steps = loop_::train(
        ctx,
        "clip",
        model.var_store(),
        t,
        if anchor.is_some() { &["batch_acc", "image_drift"] } else { &["batch_acc"] },
        &loader,
        holdout.as_ref(),
        hooks,
    )?;
    if steps.finished && ctx.is_main() {
        write_components(&model, &dir.join(WEIGHTS), &dir.join(MODEL), image_size)?;
    }
    Ok(steps)
}

/// Stops the gradients of the variables whose names start with one of `prefixes` (a tower);
/// returns how many.
fn freeze(model: &ClipModel, prefixes: &[&str]) -> usize {
    let mut frozen = 0;
    for (name, t) in model.var_store().variables() {
        if prefixes.iter().any(|p| name.starts_with(p)) {
            let _ = t.set_requires_grad(false);
            frozen += 1;
        }
    }
    frozen
}

/// CLIP's contrastive loss of a batch (N caption ids, N + M preprocessed images: the first N
/// their pairs, the rest negatives without a caption) and its (texts, images) logits. In a
/// data-parallel training step (`dist`, and the features carry gradients) the batch is the
/// global one: each rank's normalized features all-gathered ([`Dist::gather_global`]),
/// so after the gradient average every rank holds the gradient one process would compute on all
/// ranks' pairs concatenated. Without gradients (held-out loss, rank 0 alone) it stays local.
pub fn contrastive_step(
    model: &ClipModel,
    input_ids: &Tensor,
    pixels: &Tensor,
    dist: Option<&Dist>,
) -> Result<(Tensor, Tensor)> {
    let (loss, logits, _) = contrastive_parts(model, input_ids, pixels, dist)?;
    Ok((loss, logits))
}

/// [`contrastive_step`], and this rank's normalized image embeddings (N + M, D).
fn contrastive_parts(
    model: &ClipModel,
    input_ids: &Tensor,
    pixels: &Tensor,
    dist: Option<&Dist>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let mut text = normalize(&model.encode_text(input_ids, None)?.text_embeds)?;
    let local = normalize(&model.encode_image(pixels)?.image_embeds)?;
    let mut image = local.shallow_clone();
    let (n, all) = (text.size()[0], image.size()[0]);
    if all < n {
        return Err(TrainError::stage(
            "clip",
            format!("{n} captions for {all} images: expected an image per caption, then negatives"),
        ));
    }
    // A frozen tower's features carry no gradient; the other's decide whether this is a step.
    if let Some(d) = dist.filter(|_| text.requires_grad() || image.requires_grad()) {
        text = d.gather_global("clip", &text)?;
        // Pairs of all ranks first, then their negatives: caption i's image stays column i.
        let pairs = d.gather_global("clip", &image.f_narrow(0, 0, n)?)?;
        image = if all > n {
            let negatives = d.gather_global("clip", &image.f_narrow(0, n, all - n)?)?;
            Tensor::f_cat(&[pairs, negatives], 0)?
        } else {
            pairs
        };
    }
    let logits_per_text = similarity(&text, &image, Some(&model.logit_scale()?.f_exp()?))?;
    Ok((contrastive_loss(&logits_per_text)?, logits_per_text, local))
}

/// CLIP's validation hook: over the held-out pairs (`grid::holdout_batch`, EMA weights),
/// caption-to-image and image-to-caption top-1 retrieval in `validation/metrics.csv`, and the
/// similarity picture of the first `validation.grid` pairs (`grid::save_similarity`).
#[allow(clippy::type_complexity)]
fn pictures<'a>(
    ctx: &Ctx,
    model: &'a ClipModel,
    tok: &'a unclip_clip::ClipTokenizer,
    needs: impl Fn(usize) -> Needs,
) -> Result<Box<dyn FnMut(u64, Option<&unclip_core::train::Ema>, &Path) -> Result<()> + 'a>> {
    let held = super::super::grid::holdout_batch(ctx, needs)?;
    let (shown, device) = (ctx.cfg.validation.grid as i64, ctx.device);
    Ok(Box::new(move |done: u64, ema: Option<&unclip_core::train::Ema>, dir: &Path| {
        let Some(b) = &held else { return Ok(()) };
        let Some(pixels) = &b.clip_pixels else { return Ok(()) };
        let averaged;
        let m = match ema {
            Some(e) => {
                averaged =
                    ClipModel::new(model.config().clone(), Towers::Both, device, Kind::Float)?;
                e.copy_to(averaged.var_store())?;
                &averaged
            }
            None => model,
        };
        let enc = tok.encode_batch(&b.captions, Truncation::Truncate, device)?;
        let out = tch::no_grad(|| m.forward(&enc.input_ids, None, &pixels.f_to_device(device)?))?;
        let logits = out.logits_per_text;
        let (t2i, _) = super::super::grid::top1(&logits)?;
        let (i2t, _) = super::super::grid::top1(&logits.f_t_copy()?)?;
        let columns = ["text_to_image_top1", "image_to_text_top1"];
        super::super::grid::log_metrics("clip", dir, done, &columns, &[t2i, i2t])?;
        let g = shown.min(logits.size()[0]);
        match &b.images {
            Some(images) if g >= 2 => {
                let sub = logits.f_narrow(0, 0, g)?.f_narrow(1, 0, g)?;
                super::super::grid::save_similarity(dir, done, &images.f_narrow(0, 0, g)?, &sub)
            }
            _ => Ok(()),
        }
    }))
}

/// The trained towers as transformers `CLIP*ModelWithProjection` folders, and the image
/// processor config of the image tower.
fn write_components(model: &ClipModel, weights: &Path, dest: &Path, side: i64) -> Result<()> {
    let AnyConfig::Clip(full) = model.config().clone() else {
        return Err(TrainError::stage("clip", "not a two-tower CLIP"));
    };
    for (towers, cfg, name) in [
        (Towers::Text, AnyConfig::Text(full.text_config.clone()), "text_encoder"),
        (Towers::Vision, AnyConfig::Vision(full.vision_config.clone()), "image_encoder"),
    ] {
        let tower = ClipModel::new(cfg, towers, Device::Cpu, Kind::Float)?;
        tower.load_weights(weights, Unexpected::Ignore)?;
        tower.save(&dest.join(name), None)?;
    }
    write_json(
        &dest.join("feature_extractor").join("preprocessor_config.json"),
        &preprocessor(side),
    )
}

/// CLIP's image processor config at `side` pixels.
pub(crate) fn preprocessor(side: i64) -> Value {
    json!({
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": true, "do_resize": true, "size": {"shortest_edge": side}, "resample": 3,
        "do_center_crop": true, "crop_size": {"height": side, "width": side},
        "do_rescale": true, "rescale_factor": 1.0 / 255.0, "do_normalize": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    })
}

/// Contrastive batches of the shapes source: each scene of the batch followed by up to
/// `group - 1` of its counterparts (`Scene::pick_counterparts`), so captions must be matched by
/// shape, place, size and binding too; after all pairs, `copies` negative images per scene
/// (`Scene::copies`), so they must be matched by count as well.
struct Counterparts {
    generator: crate::shapes::SceneGenerator,
    side: i64,
    processor: ImageProcessor,
}

impl Counterparts {
    /// Scene indices from the batch's keys (`shapes/<index>`).
    fn batch(&self, keys: &[String], group: usize, copies: usize) -> Result<(Vec<String>, Tensor)> {
        let mut scenes = Vec::with_capacity(keys.len());
        let mut heads = Vec::new();
        for key in keys {
            if scenes.len() == keys.len() {
                break;
            }
            let i: u64 = key.rsplit('/').next().and_then(|s| s.parse().ok()).ok_or_else(|| {
                TrainError::stage(
                    "clip",
                    format!("clip.counterparts needs shapes items, got key {key:?}"),
                )
            })?;
            let scene = self.generator.scene(i);
            let room = (keys.len() - scenes.len() - 1).min(group.saturating_sub(1));
            let parts = scene.pick_counterparts(room, i);
            heads.push((scenes.len(), i));
            scenes.push(scene);
            scenes.extend(parts);
        }
        // A number fixed by the batch size: data-parallel ranks gather tensors of one shape.
        let want = copies * keys.len().div_ceil(group.max(1));
        let negatives = copy_negatives(&scenes, &heads, copies, want)?;
        let mut captions = Vec::with_capacity(scenes.len());
        let images = scenes.len() + negatives.len();
        let mut bytes = Vec::with_capacity(images * (3 * self.side * self.side) as usize);
        for scene in &scenes {
            captions.push(crate::shapes::caption(scene));
        }
        for scene in scenes.iter().chain(&negatives) {
            bytes.extend_from_slice(crate::shapes::render(scene, self.side as u32).as_raw());
        }
        let b = images as i64;
        let u8s = Tensor::f_from_slice(&bytes)?
            .f_view([b, self.side, self.side, 3])?
            .f_permute([0, 3, 1, 2])?
            .f_contiguous()?;
        Ok((captions, self.processor.preprocess_tensor(&u8s)?))
    }
}

/// Exactly `want` copy scenes (`Scene::copies`) for a batch: first `copies` of each group head
/// (at `heads`: index in `scenes`, scene index as seed), then, where a head has none (an empty
/// negation scene) or too few, other scenes' of the batch. The count depends only on the batch
/// size, so every rank of a data-parallel run gathers tensors of one shape.
fn copy_negatives(
    scenes: &[crate::shapes::Scene],
    heads: &[(usize, u64)],
    copies: usize,
    want: usize,
) -> Result<Vec<crate::shapes::Scene>> {
    let mut out = Vec::with_capacity(want);
    for &(at, seed) in heads {
        let room = want - out.len();
        out.extend(scenes[at].copies(copies.min(room), seed));
    }
    // Top up from every scene, one copy each per round, with seeds no head used.
    for round in 1..=4u64 {
        for (k, scene) in scenes.iter().enumerate() {
            if out.len() == want {
                return Ok(out);
            }
            out.extend(scene.copies(1, (round << 48) ^ k as u64));
        }
    }
    if out.len() < want {
        return Err(TrainError::stage(
            "clip",
            format!(
                "clip.copy_negatives: {} copy scenes for a batch that needs {want} (its scenes have \
                 too few objects)",
                out.len()
            ),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shapes::{PromptKind, parse_caption};

    /// Copy negatives come to `copies` per group whatever the scenes: a head without objects
    /// (a negation scene drawing none) is made up for by other scenes of the batch, so every
    /// data-parallel rank gathers the same number; a batch with no object at all is refused.
    #[test]
    fn copy_negatives_have_a_fixed_count() {
        let generator = crate::shapes::SceneGenerator::new(crate::shapes::Split::Train, 3)
            .with_kind_weights([1, 0, 0, 1]);
        let all: Vec<_> = (0..200).map(|i| generator.scene(i)).collect();
        let empty = all.iter().position(|s| s.objects.is_empty()).expect("an empty scene");
        let full = all.iter().position(|s| s.objects.len() == 1).expect("a one-object scene");
        let scenes = vec![all[empty].clone(), all[full].clone(), all[empty].clone()];
        let heads = [(0, empty as u64), (1, full as u64), (2, empty as u64)];
        for (copies, want) in [(1, 3), (2, 6), (1, 1), (0, 0)] {
            let got = copy_negatives(&scenes, &heads, copies, want).unwrap();
            assert_eq!(got.len(), want, "{copies} copies");
            assert!(got.iter().all(|c| c.objects.len() == 2), "a copy of the one object");
        }
        let none = [all[empty].clone()];
        let e = copy_negatives(&none, &[(0, empty as u64)], 1, 1).unwrap_err().to_string();
        assert!(e.contains("clip.copy_negatives") && e.contains("needs 1"), "{e}");
    }

    /// A counterpart group starts with the dataset's own item: the scene the key names under
    /// `data.kind_weights` (here relation scenes only), not the default mix's scene of that index.
    #[test]
    fn counterpart_groups_start_with_the_datasets_item() {
        let text = "[run]\nout = \"runs/x\"\nconditioning = \"models/shapes\"\nseed = 5\n[data]\n\
                    source = \"shapes\"\nitems = 12\nkind_weights = [0, 1, 0, 0]\n[decoder]\n\
                    resolution = 16\n[decoder.model]\nchannels = [16, 32]\n[decoder.train]\n\
                    steps = 1\nbatch_size = 1\nlr = 1e-4\n";
        let cfg = crate::train::RunConfig::parse(text, Path::new("run.toml"), &[]).unwrap();
        let split = super::super::super::source::open(&cfg.data, 5, 16, 0).unwrap();
        let groups = Counterparts {
            generator: shapes_generator(&cfg.data, 5),
            side: 16,
            processor: ImageProcessor::new(ProcessorConfig::clip(16)),
        };
        for i in 0..split.train.len() {
            let item = split.train.item(i).unwrap();
            let (captions, pixels) = groups.batch(std::slice::from_ref(&item.key), 1, 0).unwrap();
            assert_eq!(captions.as_slice(), std::slice::from_ref(&item.caption), "{}", item.key);
            assert_eq!(pixels.size(), [1, 3, 16, 16]);
            let kind = parse_caption(&captions[0]).map(|s| s.kind());
            assert_eq!(kind, Some(PromptKind::Relation), "{}", captions[0]);
        }
        // Groups of 4: the item, then three counterparts.
        let item = split.train.item(0).unwrap();
        let keys = vec![item.key.clone(); 4];
        let (captions, _) = groups.batch(&keys, 4, 0).unwrap();
        assert_eq!(captions.len(), 4);
        assert_eq!(captions[0], item.caption);
        assert!(captions[1..].iter().all(|c| c != &item.caption), "{captions:?}");
        // With two copy negatives: the same captions, then the two copies' images after the pairs.
        let scene = groups.generator.scene(item.key.rsplit('/').next().unwrap().parse().unwrap());
        assert_eq!(scene.objects.len(), 2);
        let (with, pixels) = groups.batch(&keys, 4, 2).unwrap();
        assert_eq!(with, captions);
        assert_eq!(pixels.size(), [6, 3, 16, 16]);
        let (_, plain) = groups.batch(&keys, 4, 0).unwrap();
        assert!(pixels.narrow(0, 0, 4).equal(&plain));
        assert!(!pixels.get(4).equal(&pixels.get(0)) && !pixels.get(4).equal(&pixels.get(5)));
    }
}
