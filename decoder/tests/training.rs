//! A few hundred optimizer steps on a tiny synthetic image set lower the training loss of the
//! decoder (hybrid MSE + VLB with conditioning dropout) and of the upsampler (random crops,
//! blurred low-res input). The loss is measured before and after on the same draws (same seed).

use tch::{Device, Kind, Tensor, nn, nn::OptimizerConfig};
use unclip_decoder::checkpoint::{Loaded, init};
use unclip_decoder::train::{
    DecoderBatch, DecoderTrainer, EmptyCaption, LowResCorruption, UpsamplerTrainer, train_step,
};
use unclip_decoder::{
    TextProjConfig, UNet2DConditionConfig, UNet2DConditionModel, UNet2DConfig, UNet2DModel,
    UnCLIPTextProjModel,
};
use unclip_scheduler::{NoiseSchedule, NoiseSource, TorchNoise};

/// The tests draw from libtorch's global generator: one at a time, so each run is reproducible.
/// Optimizer steps per test (a few seconds each on 2 idle cores).
const STEPS: usize = 300;

static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

const DEC: &str = r#"{"sample_size": 16, "in_channels": 3, "out_channels": 6,
  "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
  "up_block_types": ["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
  "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "block_out_channels": [8, 16],
  "layers_per_block": 1, "norm_num_groups": 4, "cross_attention_dim": 16, "attention_head_dim": 8,
  "resnet_time_scale_shift": "scale_shift", "class_embed_type": "identity"}"#;
const TP: &str = r#"{"clip_embeddings_dim": 8, "time_embed_dim": 32, "cross_attention_dim": 16}"#;
const SR: &str = r#"{"sample_size": 32, "in_channels": 6, "out_channels": 3, "layers_per_block": 1,
  "down_block_types": ["ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"],
  "up_block_types": ["ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"],
  "block_out_channels": [8, 16], "norm_num_groups": 4}"#;

/// Four images: smooth colour gradients, distinct per image, in [-1, 1].
fn images(size: i64) -> Tensor {
    let opts = (Kind::Float, Device::Cpu);
    let ramp = Tensor::linspace(-1.0, 1.0, size, opts);
    let (yy, xx) = (ramp.view([1, 1, size, 1]), ramp.view([1, 1, 1, size]));
    let imgs: Vec<Tensor> = (0..4)
        .map(|i| {
            let a = i as f64 * 0.8;
            let r = (&yy * a.cos() + &xx * a.sin()).expand([1, 1, size, size], false);
            let g = (&xx * 0.5 - 0.2 * i as f64).expand([1, 1, size, size], false);
            let b = (&yy * &xx * (1.0 - 0.4 * i as f64)).expand([1, 1, size, size], false);
            Tensor::cat(&[r, g, b], 1)
        })
        .collect();
    Tensor::cat(&imgs, 0).clamp(-1.0, 1.0)
}

/// Mean loss over a few fixed draws (no gradients).
fn eval(seed: u64, f: &mut dyn FnMut(&mut dyn NoiseSource) -> f64) -> f64 {
    let mut noise = TorchNoise::new(seed);
    tch::no_grad(|| (0..8).map(|_| f(&mut noise)).sum::<f64>() / 8.0)
}

#[test]
fn decoder_training_lowers_the_loss() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    // Tiny tensors: one thread avoids OpenMP barrier stalls on a busy 2-core machine.
    tch::set_num_threads(1);
    tch::manual_seed(0);
    let dec: Loaded<UNet2DConditionModel> =
        init(&UNet2DConditionConfig::from_json_str(DEC).unwrap(), Device::Cpu, Kind::Float)
            .unwrap();
    let tp: Loaded<UnCLIPTextProjModel> =
        init(&TextProjConfig::from_json_str(TP).unwrap(), Device::Cpu, Kind::Float).unwrap();
    let opts = (Kind::Float, Device::Cpu);
    let x = images(16);
    let image_embeddings = Tensor::randn([4, 8], opts);
    let prompt_embeds = Tensor::randn([4, 8], opts);
    let hidden = Tensor::randn([4, 5, 8], opts);
    let mask = Tensor::from_slice(&[1i64, 1, 1, 0, 0])
        .view([1, 5])
        .expand([4, 5], false)
        .to_kind(Kind::Bool);
    let (e_prompt, e_hidden) = (Tensor::zeros([1, 8], opts), Tensor::randn([1, 5, 8], opts));
    let e_mask = Tensor::from_slice(&[1i64, 1, 0, 0, 0]).view([1, 5]).to_kind(Kind::Bool);
    let batch = DecoderBatch {
        images: &x,
        image_embeddings: &image_embeddings,
        prompt_embeds: &prompt_embeds,
        text_hidden_states: &hidden,
        text_mask: &mask,
        empty_caption: Some(EmptyCaption {
            prompt_embeds: &e_prompt,
            text_hidden_states: &e_hidden,
            text_mask: &e_mask,
        }),
    };
    let trainer = DecoderTrainer::karlo();
    let mut loss_of = |noise: &mut dyn NoiseSource| {
        let l = trainer.loss(&dec.model, &tp.model, &batch, noise).unwrap();
        l.loss.double_value(&[])
    };
    let before = eval(7, &mut loss_of);

    // Both stores train: the null image embedding is learned too.
    let mut opt_dec = nn::Adam::default().build(&dec.vs, 5e-3).unwrap();
    let mut opt_tp = nn::Adam::default().build(&tp.vs, 5e-3).unwrap();
    let mut noise = TorchNoise::new(1);
    for _ in 0..STEPS {
        let l = trainer.loss(&dec.model, &tp.model, &batch, &mut noise).unwrap();
        opt_tp.zero_grad();
        train_step(&mut opt_dec, &l.loss).unwrap();
        opt_tp.step();
    }
    let after = eval(7, &mut loss_of);
    // Image-embedding dropout reached the learned null embedding (initialised to zero).
    let null = tp.model.null_image_embeddings(1).unwrap();
    assert!(null.abs().sum(Kind::Float).double_value(&[]) > 0.0, "null embedding never trained");
    eprintln!("decoder loss {before:.4} -> {after:.4}");
    assert!(after < 0.6 * before, "decoder loss {before} -> {after}");
}

#[test]
fn upsampler_training_lowers_the_loss() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    // Tiny tensors: one thread avoids OpenMP barrier stalls on a busy 2-core machine.
    tch::set_num_threads(1);
    tch::manual_seed(0);
    let sr: Loaded<UNet2DModel> =
        init(&UNet2DConfig::from_json_str(SR).unwrap(), Device::Cpu, Kind::Float).unwrap();
    let x = images(16);
    let trainer =
        UpsamplerTrainer::new(NoiseSchedule::karlo(), 2, 8, LowResCorruption::Blur { sigma: 0.6 })
            .unwrap();
    let mut loss_of = |noise: &mut dyn NoiseSource| {
        trainer.loss(&sr.model, &x, noise).unwrap().loss.double_value(&[])
    };
    let before = eval(7, &mut loss_of);
    let mut opt = nn::Adam::default().build(&sr.vs, 5e-3).unwrap();
    let mut noise = TorchNoise::new(1);
    for _ in 0..STEPS {
        let l = trainer.loss(&sr.model, &x, &mut noise).unwrap();
        train_step(&mut opt, &l.loss).unwrap();
    }
    let after = eval(7, &mut loss_of);
    eprintln!("upsampler loss {before:.4} -> {after:.4}");
    assert!(after < 0.6 * before, "upsampler loss {before} -> {after}");
}
