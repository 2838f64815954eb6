//! Training on a small synthetic set of (text, image embedding) pairs: the loss falls and sampled
//! embeddings land nearer their own targets than other pairs' targets.

use std::sync::Mutex;
use tch::{Device, Kind, Tensor, nn, nn::OptimizerConfig};
use unclip_core::testing::max_abs_diff;
use unclip_prior::{
    PriorBatch, PriorConfig, PriorTrainer, PriorTransformer, SampleOptions, TextConditioning,
    TrainOptions, clip_stats, fit_clip_stats, sample, sampling,
};
use unclip_scheduler::TorchNoise;

/// The tests draw from libtorch's global generator; one at a time keeps them reproducible.
static RNG: Mutex<()> = Mutex::new(());

const CPU: (Kind, Device) = (Kind::Float, Device::Cpu);

fn small_config() -> PriorConfig {
    PriorConfig {
        num_attention_heads: 4,
        attention_head_dim: 8,
        num_layers: 2,
        embedding_dim: 16,
        num_embeddings: 8,
        ..PriorConfig::default()
    }
}

fn text(b: i64, n: i64, e: i64, lengths: &[i64]) -> TextConditioning {
    let mask = Tensor::arange(n, (Kind::Int64, Device::Cpu))
        .unsqueeze(0)
        .lt_tensor(&Tensor::from_slice(lengths).unsqueeze(1));
    TextConditioning::new(Tensor::randn([b, e], CPU), Tensor::randn([b, n, e], CPU), mask).unwrap()
}

#[test]
fn training_fits_pairs_and_samples_land_near_their_targets() {
    let _guard = RNG.lock().unwrap_or_else(|e| e.into_inner());
    // The tensors are tiny: one intra-op thread avoids thread-pool overhead on a busy machine.
    tch::set_num_threads(1);
    tch::manual_seed(0);
    let cfg = small_config();
    let (k, n, e) = (6, cfg.num_embeddings, cfg.embedding_dim);
    let cond = text(k, n, e, &[3, 4, 5, 6, 7, 8]);
    let uncond = text(1, n, e, &[2]);
    // Image embeddings: a fixed linear function of the text embedding, off-centre and scaled, so
    // the stored statistics matter.
    let w = Tensor::randn([e, e], CPU) / (e as f64).sqrt();
    let targets = cond.text_embeds.matmul(&w) * 3.0 + 1.5;

    let vs = nn::VarStore::new(Device::Cpu);
    let mut model = PriorTransformer::new(vs.root(), &cfg).unwrap();
    fit_clip_stats(&mut model, &targets).unwrap();
    let normalized = model.normalize(&targets).unwrap();
    assert!(normalized.mean_dim(0, false, Kind::Float).abs().max().double_value(&[]) < 1e-5);

    // Untrained, the samples do not know their targets.
    let (own, _) = nearest_own_target(&model, &cond, &uncond, &targets, 1.0);
    assert!(own < k, "an untrained prior already matched {own}/{k}");

    let trainer = PriorTrainer::karlo(uncond.clone(), TrainOptions::default()).unwrap();
    let mut opt = nn::Adam::default().build(&vs, 2e-3).unwrap();
    let batch = PriorBatch { image_embeds: targets.shallow_clone(), text: cond.clone() };
    let mut rng = TorchNoise::new(1);
    let losses: Vec<f64> =
        (0..400).map(|_| trainer.step(&model, &mut opt, &batch, &mut rng).unwrap()).collect();
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&losses[..20]), mean(&losses[380..]));
    assert!(last < 0.2 * first, "loss went from {first:.4} to {last:.4}");

    for guidance in [1.0, 3.0] {
        let (own, worst) = nearest_own_target(&model, &cond, &uncond, &targets, guidance);
        assert_eq!(own, k, "guidance {guidance}: only {own}/{k} samples nearest their own target");
        assert!(worst > 0.9, "guidance {guidance}: a sample has cosine {worst:.3} to its target");
    }
}

/// How many of the prompts' samples are nearer (cosine) their own target than any other pair's
/// target, and the lowest cosine of a sample to its own target.
fn nearest_own_target(
    model: &PriorTransformer,
    cond: &TextConditioning,
    uncond: &TextConditioning,
    targets: &Tensor,
    guidance: f64,
) -> (i64, f64) {
    let mut sched = sampling::karlo_prior_scheduler().unwrap();
    let opts = SampleOptions { num_inference_steps: 10, guidance_scale: guidance };
    let out =
        sample(model, &mut sched, cond, Some(uncond), &opts, &mut TorchNoise::new(2)).unwrap();
    // cos[i][j]: sample i against target j.
    let cos = Tensor::cosine_similarity(&out.unsqueeze(1), &targets.unsqueeze(0), 2, 1e-8);
    let own =
        cos.argmax(1, false).eq_tensor(&Tensor::arange(cond.batch(), (Kind::Int64, Device::Cpu)));
    (own.sum(Kind::Int64).int64_value(&[]), cos.diagonal(0, 0, 1).min().double_value(&[]))
}

#[test]
fn dropped_conditioning_is_the_empty_prompt() {
    let _guard = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(3);
    let cfg = small_config();
    let (n, e) = (cfg.num_embeddings, cfg.embedding_dim);
    let cond = text(4, n, e, &[3, 8, 5, 2]);
    let uncond = text(1, n, e, &[2]);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = PriorTransformer::new(vs.root(), &cfg).unwrap();
    let image_embeds = Tensor::randn([4, e], CPU);

    let loss = |text: &TextConditioning, p: f64| {
        let trainer =
            PriorTrainer::karlo(uncond.clone(), TrainOptions { cond_drop_prob: p }).unwrap();
        let batch = PriorBatch { image_embeds: image_embeds.shallow_clone(), text: text.clone() };
        trainer.loss(&model, &batch, &mut TorchNoise::new(9)).unwrap().double_value(&[])
    };
    // Always dropping = training on the empty prompt's conditioning with the same draws.
    let all_uncond = uncond.expand_to(4).unwrap();
    let (dropped, explicit, kept) = (loss(&cond, 1.0), loss(&all_uncond, 0.0), loss(&cond, 0.0));
    assert!((dropped - explicit).abs() < 1e-6, "{dropped} vs {explicit}");
    assert!((dropped - kept).abs() > 1e-4, "conditioning had no effect: {dropped} vs {kept}");
}

#[test]
fn clip_stats_are_per_dimension_mean_and_std() {
    let _guard = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(4);
    let x = Tensor::randn([50, 6], CPU) * Tensor::from_slice(&[1.0f32, 2., 3., 4., 5., 6.]) + 7.0;
    let (mean, std) = clip_stats(&x).unwrap();
    assert_eq!(mean.size(), [1, 6]);
    assert!(max_abs_diff(&mean, &x.mean_dim(0, true, Kind::Float)) < 1e-5);
    assert!(max_abs_diff(&std, &x.std_dim(0, true, true)) < 1e-5);
    assert!(clip_stats(&x.narrow(0, 0, 1)).is_err());
    assert!(clip_stats(&Tensor::ones([5, 6], CPU)).is_err());
    let cfg = PriorConfig { embedding_dim: 6, ..small_config() };
    let vs = nn::VarStore::new(Device::Cpu);
    let mut model = PriorTransformer::new(vs.root(), &cfg).unwrap();
    // A fresh model's un-normalization is the identity.
    assert!(model.post_process_latents(&x).unwrap().equal(&x));
    fit_clip_stats(&mut model, &x).unwrap();
    let z = model.normalize(&x).unwrap();
    assert!((z.std_dim(0, true, false) - 1.0).abs().max().double_value(&[]) < 1e-4);
    assert!(max_abs_diff(&model.post_process_latents(&z).unwrap(), &x) < 1e-4);
    assert!(model.set_clip_stats(&mean, &(-std)).is_err());
}
