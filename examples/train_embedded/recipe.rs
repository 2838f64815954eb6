//! Sizes, step counts and optimizer settings of every stage, and the component configs built from
//! them. The recipe is stored in `<out>/recipe.json`; resuming with a different one is refused,
//! since it would silently change the run.

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::path::Path;
use unclip::core::train::{AdamWConfig, EmaConfig, LoopConfig, LrSchedule};

/// One stage's optimization settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Optim {
    pub steps: u64,
    pub batch: usize,
    pub lr: f64,
    pub warmup: u64,
    pub weight_decay: f64,
    pub ema_decay: f64,
    pub checkpoint_every: u64,
}

impl Optim {
    /// The same settings for another step count (warmup and checkpoint interval follow it).
    pub fn with_steps(&self, steps: u64) -> Self {
        optim(steps, self.batch, self.lr, self.ema_decay)
    }

    /// The core training loop's settings: warmup, cosine decay to a tenth, clipping at 1.
    pub fn loop_config(&self, seed: u64) -> LoopConfig {
        LoopConfig {
            total_steps: self.steps,
            seed,
            schedule: LrSchedule::WarmupCosine {
                peak: self.lr,
                floor: self.lr * 0.1,
                warmup_steps: self.warmup.min(self.steps),
                total_steps: self.steps,
            },
            optimizer: AdamWConfig {
                lr: self.lr,
                weight_decay: self.weight_decay,
                ..Default::default()
            },
            ema: Some(EmaConfig { decay: self.ema_decay, warmup: true }),
            max_grad_norm: Some(1.0),
            checkpoint_every: self.checkpoint_every,
            keep_last: 2,
        }
    }
}

/// Everything that determines a run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Recipe {
    pub seed: u64,
    /// Training scenes are indices `0..train_scenes` of the train split's generator.
    pub train_scenes: usize,
    /// Decoder resolution and upsampler output resolution.
    pub low_res: i64,
    pub high_res: i64,
    /// Token budget of every caption (the longest shapes caption has 19 tokens).
    pub context_length: usize,
    /// Target vocabulary size of the trained BPE (256 bytes x 2 + merges + 2 specials).
    pub vocab_size: usize,
    /// CLIP width (text hidden = projection = prior and decoder conditioning width).
    pub clip_dim: i64,
    pub clip_layers: i64,
    pub vision_patch: i64,
    /// CLIP batches are made of groups of this many scenes: an example and its counterparts
    /// (`Scene::pick_counterparts`), so shape, place, size and binding are needed to match them.
    /// 1: plain random batches (this recipe's default); the shipped model used 4 (README).
    pub clip_group: usize,
    pub prior_layers: i64,
    pub decoder_channels: Vec<i64>,
    pub decoder_layers_per_block: i64,
    /// The decoder sees each pixel's coordinates (`coordinate_channels` of its config): without
    /// them the shipped decoder put every object where chance did, whatever the caption said.
    #[serde(default)]
    pub decoder_coordinates: bool,
    /// Probability that a decoder example's caption is replaced by the empty one (unCLIP: 0.5).
    #[serde(default = "half")]
    pub decoder_text_dropout: f64,
    /// Share of decoder examples whose timestep is drawn from `decoder_high_noise_from..T`
    /// (`Timesteps::HighNoise`; 0: uniform).
    #[serde(default)]
    pub decoder_high_noise: f64,
    #[serde(default = "high_noise_from")]
    pub decoder_high_noise_from: i64,
    /// Weights a fresh decoder stage starts from (a finished run's `decoder/weights.safetensors`):
    /// a fine-tune. Coordinate inputs missing there start at zero.
    #[serde(default)]
    pub decoder_init: Option<std::path::PathBuf>,
    pub upsampler_channels: Vec<i64>,
    /// Side of the random high-res crops the upsampler trains on.
    pub upsampler_crop: i64,
    pub clip: Optim,
    pub prior: Optim,
    pub decoder: Optim,
    pub upsampler: Optim,
}

fn half() -> f64 {
    0.5
}

fn high_noise_from() -> i64 {
    500
}

fn optim(steps: u64, batch: usize, lr: f64, ema_decay: f64) -> Optim {
    Optim {
        steps,
        batch,
        lr,
        warmup: (steps / 20).clamp(1, 500),
        weight_decay: 0.01,
        ema_decay,
        checkpoint_every: (steps / 10).clamp(1, 500),
    }
}

/// The most steps a stage may be given (a larger count is a typo, not a plan).
pub const MAX_STEPS: u64 = 1_000_000_000;

/// The stage names of [`Recipe::stages_mut`], in the same order.
const STAGES: [&str; 4] = ["clip", "prior", "decoder", "upsampler"];

impl Recipe {
    /// Every stage's settings, in training order.
    fn stages_mut(&mut self) -> [&mut Optim; 4] {
        [&mut self.clip, &mut self.prior, &mut self.decoder, &mut self.upsampler]
    }

    /// The base recipe (sized for a few hours on a 2-core CPU). The shipped model came from it
    /// with the flags the README gives: counterpart CLIP batches, a longer decoder, then a
    /// decoder fine-tune with coordinate inputs.
    pub fn full() -> Self {
        Self {
            seed: 0,
            train_scenes: 200_000,
            low_res: 32,
            high_res: 64,
            context_length: 24,
            vocab_size: 1024,
            clip_dim: 128,
            clip_layers: 3,
            vision_patch: 4,
            clip_group: 1,
            prior_layers: 4,
            decoder_channels: vec![32, 64, 128],
            decoder_layers_per_block: 2,
            decoder_coordinates: false,
            decoder_text_dropout: half(),
            decoder_high_noise: 0.0,
            decoder_high_noise_from: high_noise_from(),
            decoder_init: None,
            upsampler_channels: vec![32, 64, 64],
            upsampler_crop: 32,
            // Measured on the shared 2-core CPU (2 threads): clip 0.40 s/step, prior 0.36,
            // decoder 0.87 (1.5 on a day the machine ran at half speed), upsampler 0.27, so about
            // 10 + 12 + 30 + 11 minutes.
            clip: optim(1500, 128, 5e-4, 0.999),
            prior: optim(2000, 128, 5e-4, 0.999),
            decoder: optim(2000, 32, 4e-4, 0.999),
            upsampler: optim(2500, 16, 3e-4, 0.999),
        }
    }

    /// The same model with a few steps per stage.
    pub fn quick() -> Self {
        let mut r = Self::full();
        // Batches in the order of `stages_mut`.
        for (o, batch) in r.stages_mut().into_iter().zip([16, 16, 4, 4, 4]) {
            *o = Optim { steps: 6, batch, warmup: 2, checkpoint_every: 3, ..o.clone() };
        }
        r
    }

    /// CLIP's step count, with the warmup and checkpoint interval that count gets in `full`.
    pub fn set_clip_steps(&mut self, steps: u64) {
        self.clip = self.clip.with_steps(steps);
    }

    /// The decoder's step count, as [`Self::set_clip_steps`] does for CLIP.
    pub fn set_decoder_steps(&mut self, steps: u64) {
        self.decoder = self.decoder.with_steps(steps);
    }

    /// The stages (by name) whose step count grew from `old` to `self`, with the old count, if
    /// nothing but step counts (and what `optim` derives from them) changed and none shrank.
    pub fn extension_of(&self, old: &Recipe) -> anyhow::Result<Vec<(&'static str, u64)>> {
        let mut same = self.clone();
        let mut grown = Vec::new();
        let names = ["clip", "prior", "decoder", "upsampler"];
        for ((name, o), before) in names.into_iter().zip(same.stages_mut()).zip(old.stages()) {
            if o.steps < before.steps {
                bail!(
                    "{name}: {} steps asked, {} already run; --extend only adds steps",
                    o.steps,
                    before.steps
                );
            }
            if o.steps > before.steps {
                grown.push((name, before.steps));
            }
            o.steps = before.steps;
            o.warmup = before.warmup;
            o.checkpoint_every = before.checkpoint_every;
        }
        if &same != old {
            bail!(
                "--extend may change step counts only; other settings differ from the run's recipe.json"
            );
        }
        Ok(grown)
    }

    fn stages(&self) -> [&Optim; 4] {
        [&self.clip, &self.prior, &self.decoder, &self.upsampler]
    }

    /// Multiplies every stage's step count by `factor` (finite, > 0). Refused when a stage would
    /// be left no more steps than its warmup (it would train at a rising learning rate only, an
    /// untrained model) or more than [`MAX_STEPS`].
    pub fn scale_steps(&mut self, factor: f64) -> anyhow::Result<()> {
        anyhow::ensure!(
            factor.is_finite() && factor > 0.0,
            "--steps-scale must be a finite number > 0, got {factor}"
        );
        if factor == 1.0 {
            return Ok(());
        }
        for (name, o) in STAGES.iter().zip(self.stages_mut()) {
            let scaled = (o.steps as f64 * factor).round();
            anyhow::ensure!(
                scaled <= MAX_STEPS as f64,
                "--steps-scale {factor}: the {name} stage would get {scaled:e} steps, more than \
                 {MAX_STEPS}"
            );
            let steps = scaled as u64;
            anyhow::ensure!(
                steps > o.warmup,
                "--steps-scale {factor}: the {name} stage would get {steps} steps, not more than \
                 its {} warmup steps (it would never reach its learning rate)",
                o.warmup
            );
            o.steps = steps;
            o.checkpoint_every = o.checkpoint_every.min(o.steps);
        }
        Ok(())
    }

    /// Writes `<out>/recipe.json`, or checks that the run there used this recipe. With `extend`,
    /// the recipe may add steps to stages of that run: it is rewritten, and each grown stage that
    /// had finished has its final weights set aside (`weights-<steps>.safetensors`), so the stage
    /// resumes from its last checkpoint (optimizer and EMA state included) up to the new count.
    /// The cosine schedule is then that of the new count from its start: the learning rate
    /// rises again at the resumed step (a warm restart).
    pub fn write_or_check(&self, out: &Path, extend: bool) -> anyhow::Result<()> {
        let path = out.join("recipe.json");
        if path.exists() {
            let old: Recipe = unclip::core::config::read_json(&path)?;
            if &old == self {
                return Ok(());
            }
            if !extend {
                bail!(
                    "{} was started with another recipe (other flags?); use a new --out folder, \
                     or --extend to add steps",
                    path.display()
                );
            }
            for (stage, before) in self.extension_of(&old)? {
                let weights = out.join(stage).join(crate::stage::WEIGHTS);
                if weights.exists() {
                    let kept = out.join(stage).join(format!("weights-{before}.safetensors"));
                    std::fs::rename(&weights, &kept)
                        .with_context(|| format!("setting {} aside", weights.display()))?;
                    println!("{stage}: extending from {before} steps ({} kept)", kept.display());
                }
                // After the weights are set aside (a run killed in between redoes this).
                unclip::core::fsutil::clear_complete(&out.join(stage))?;
            }
        }
        unclip::core::config::write_json(&path, self).context("writing recipe.json")?;
        Ok(())
    }

    /// transformers' `CLIPModel` config (both towers share the width; text hidden = projection,
    /// as the prior and the decoder's text projection need).
    pub fn clip_config(&self, vocab_size: usize, bos: i64, eos: i64, pad: i64) -> Value {
        let d = self.clip_dim;
        json!({
            "model_type": "clip",
            "projection_dim": d,
            "logit_scale_init_value": 2.6592,
            "text_config": {
                "vocab_size": vocab_size,
                "hidden_size": d,
                "intermediate_size": 4 * d,
                "projection_dim": d,
                "num_hidden_layers": self.clip_layers,
                "num_attention_heads": 4,
                "max_position_embeddings": self.context_length,
                "hidden_act": "quick_gelu",
                "layer_norm_eps": 1e-5,
                "pad_token_id": pad,
                "bos_token_id": bos,
                "eos_token_id": eos,
            },
            "vision_config": {
                "hidden_size": d,
                "intermediate_size": 4 * d,
                "projection_dim": d,
                "num_hidden_layers": self.clip_layers,
                "num_attention_heads": 4,
                "num_channels": 3,
                "image_size": self.low_res,
                "patch_size": self.vision_patch,
                "hidden_act": "quick_gelu",
                "layer_norm_eps": 1e-5,
            },
        })
    }

    /// diffusers' `PriorTransformer` config in Karlo's layout.
    pub fn prior_config(&self) -> Value {
        json!({
            "_class_name": "PriorTransformer",
            "num_attention_heads": 4,
            "attention_head_dim": self.clip_dim / 4,
            "num_layers": self.prior_layers,
            "embedding_dim": self.clip_dim,
            "num_embeddings": self.context_length,
            "additional_embeddings": 4,
            "dropout": 0.0,
            "time_embed_act_fn": "silu",
            "norm_in_type": null,
            "embedding_proj_norm_type": null,
            "encoder_hid_proj_type": "linear",
            "added_emb_type": "prd",
            "time_embed_dim": null,
            "embedding_proj_dim": null,
            "clip_embed_dim": null,
        })
    }

    fn time_embed_dim(&self) -> i64 {
        self.decoder_channels[0] * 4
    }

    /// diffusers' `UNet2DConditionModel` config in Karlo's decoder layout (learned variance:
    /// 6 output channels; scale-shift time conditioning; simple cross-attention below the top).
    pub fn decoder_config(&self) -> Value {
        let n = self.decoder_channels.len();
        let down: Vec<&str> = (0..n)
            .map(|i| if i == 0 { "ResnetDownsampleBlock2D" } else { "SimpleCrossAttnDownBlock2D" })
            .collect();
        let up: Vec<&str> = (0..n)
            .map(|i| if i + 1 == n { "ResnetUpsampleBlock2D" } else { "SimpleCrossAttnUpBlock2D" })
            .collect();
        let coords = if self.decoder_coordinates { 2 } else { 0 };
        let mut cfg = json!({
            "_class_name": "UNet2DConditionModel",
            "act_fn": "silu",
            "attention_head_dim": 32,
            "block_out_channels": self.decoder_channels,
            "center_input_sample": false,
            "class_embed_type": "identity",
            "cross_attention_dim": self.clip_dim,
            "down_block_types": down,
            "downsample_padding": 1,
            "dual_cross_attention": false,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
            "in_channels": 3 + coords,
            "layers_per_block": self.decoder_layers_per_block,
            "mid_block_scale_factor": 1,
            "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
            "norm_eps": 1e-5,
            "norm_num_groups": 16,
            "only_cross_attention": false,
            "out_channels": 6,
            "resnet_time_scale_shift": "scale_shift",
            "sample_size": self.low_res,
            "time_embedding_type": "positional",
            "up_block_types": up,
            "upcast_attention": false,
            "use_linear_projection": false,
        });
        if coords > 0 {
            cfg["coordinate_channels"] = json!(coords);
        }
        cfg
    }

    /// diffusers' `UnCLIPTextProjModel` config matching the decoder.
    pub fn text_proj_config(&self) -> Value {
        json!({
            "_class_name": "UnCLIPTextProjModel",
            "clip_embeddings_dim": self.clip_dim,
            "clip_extra_context_tokens": 4,
            "cross_attention_dim": self.clip_dim,
            "time_embed_dim": self.time_embed_dim(),
        })
    }

    /// diffusers' `UNet2DModel` config of Karlo's super-resolution UNets (low-res image
    /// concatenated to the noisy sample; no attention, so it can train on crops).
    pub fn upsampler_config(&self) -> Value {
        let n = self.upsampler_channels.len();
        json!({
            "_class_name": "UNet2DModel",
            "act_fn": "silu",
            "add_attention": false,
            "attention_head_dim": null,
            "block_out_channels": self.upsampler_channels,
            "center_input_sample": false,
            "class_embed_type": null,
            "down_block_types": vec!["ResnetDownsampleBlock2D"; n],
            "downsample_padding": 1,
            "dropout": 0.0,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
            "in_channels": 6,
            "layers_per_block": 2,
            "mid_block_scale_factor": 1,
            "mid_block_type": "UNetMidBlock2D",
            "norm_eps": 1e-5,
            "norm_num_groups": 16,
            "out_channels": 3,
            "resnet_time_scale_shift": "scale_shift",
            "sample_size": self.high_res,
            "time_embedding_type": "positional",
            "up_block_types": vec!["ResnetUpsampleBlock2D"; n],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        unclip::core::fsutil::scratch_dir(&format!("recipe-{name}")).unwrap()
    }

    #[test]
    fn extension_lists_grown_stages_only() {
        let old = Recipe::full();
        let mut new = old.clone();
        new.set_decoder_steps(4000);
        assert_eq!(new.extension_of(&old).unwrap(), vec![("decoder", 2000)]);
        assert_eq!(new.decoder.warmup, 200, "warmup follows the new count");

        let mut shrunk = old.clone();
        shrunk.set_clip_steps(100);
        assert!(shrunk.extension_of(&old).is_err());
        let mut other = new.clone();
        other.decoder.lr *= 2.0;
        assert!(other.extension_of(&old).is_err(), "only step counts may change");
    }

    #[test]
    fn extend_rewrites_the_recipe_and_sets_finished_weights_aside() {
        let out = scratch("extend");
        let old = Recipe::full();
        old.write_or_check(&out, false).unwrap();
        std::fs::create_dir_all(out.join("decoder")).unwrap();
        std::fs::write(out.join("decoder").join(crate::stage::WEIGHTS), b"final").unwrap();
        unclip::core::fsutil::mark_complete(&out.join("decoder"), &serde_json::json!({})).unwrap();
        let mut new = old.clone();
        new.set_decoder_steps(3000);

        assert!(new.write_or_check(&out, false).is_err(), "a changed recipe needs --extend");
        assert!(out.join("decoder").join(crate::stage::WEIGHTS).exists());

        new.write_or_check(&out, true).unwrap();
        assert!(!out.join("decoder").join(crate::stage::WEIGHTS).exists());
        assert!(!unclip::core::fsutil::is_complete(&out.join("decoder")), "the stage is redone");
        assert_eq!(std::fs::read(out.join("decoder/weights-2000.safetensors")).unwrap(), b"final");
        let stored: Recipe = unclip::core::config::read_json(&out.join("recipe.json")).unwrap();
        assert_eq!(stored, new);
        new.write_or_check(&out, false).unwrap();
        std::fs::remove_dir_all(&out).unwrap();
    }

    /// --steps-scale at its extremes: 0, negative, NaN, infinite, so small that a stage would
    /// train within its warmup only, or so large the count overflows: each refused, naming the
    /// flag and the stage.
    #[test]
    fn steps_scale_extremes_are_refused() {
        for f in [0.0, -1.0, -0.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1e-9, 1e300] {
            let e = Recipe::full().scale_steps(f).unwrap_err().to_string();
            assert!(e.contains("--steps-scale"), "{f}: {e}");
        }
        let e = Recipe::full().scale_steps(0.001).unwrap_err().to_string();
        assert!(e.contains("clip") && e.contains("warmup"), "{e}");
        let mut r = Recipe::full();
        r.scale_steps(0.5).unwrap();
        for (o, full) in r.stages().iter().zip(Recipe::full().stages()) {
            assert_eq!(o.steps, (full.steps as f64 * 0.5).round() as u64);
            assert!(o.steps > o.warmup && o.checkpoint_every <= o.steps);
        }
        let mut quick = Recipe::quick();
        quick.scale_steps(1.0).unwrap();
        assert_eq!(quick, Recipe::quick());
    }
}
