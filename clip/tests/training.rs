//! Contrastive training on a small synthetic captioned set lowers the loss and lifts zero-shot
//! accuracy on held-out images far above chance (tiny model, CPU, seconds).

use serde_json::json;
use tch::{Device, Kind, Tensor};
use unclip_clip::train::MAX_LOGIT_SCALE;
use unclip_clip::{
    AnyConfig, ClipModel, ClipPipeline, ClipTokenizer, ClipTrainer, Towers, TrainConfig, Truncation,
};
use unclip_core::testing::fixture_path;

/// libtorch's random generator is global and tests run on parallel threads: tests that seed it
/// hold this lock so their random draws are not interleaved.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

const COLORS: [(&str, [f64; 3]); 6] = [
    ("red", [0.9, 0.1, 0.1]),
    ("green", [0.1, 0.8, 0.2]),
    ("blue", [0.1, 0.2, 0.9]),
    ("yellow", [0.9, 0.9, 0.1]),
    ("purple", [0.6, 0.1, 0.7]),
    ("white", [0.95, 0.95, 0.95]),
];
const TEMPLATES: [&str; 4] =
    ["a {} square", "a photo of something {}", "{} color", "an image that is {}"];

/// (B, 3, 16, 16) images of the given classes in [0, 1]: the class color plus per-pixel noise,
/// with a random darker patch.
fn raw_images(classes: &[usize]) -> Tensor {
    let imgs: Vec<Tensor> = classes
        .iter()
        .map(|&c| {
            let col = Tensor::from_slice(&COLORS[c].1).to_kind(Kind::Float).view([3, 1, 1]);
            let noise = Tensor::randn([3, 16, 16], (Kind::Float, Device::Cpu)) * 0.15;
            let img = col.expand([3, 16, 16], false) + noise;
            let (y, x) = (rand_below(12), rand_below(12));
            let _ = img.narrow(1, y, 4).narrow(2, x, 4).g_mul_scalar_(0.5);
            img.clamp(0.0, 1.0)
        })
        .collect();
    Tensor::stack(&imgs, 0)
}

/// The same, normalized with mean 0.5 and std 0.25 (the test's preprocessor_config.json).
fn images(classes: &[usize], device: Device) -> Tensor {
    ((raw_images(classes) - 0.5) / 0.25).to_device(device)
}

/// Saves the trained model as a checkpoint folder and classifies PNG files through [`ClipPipeline`].
/// With `UNCLIP_CLIP_DEMO_DIR` set, the folder (model, tokenizer, PNGs) is kept there, e.g. to try
/// the `zero_shot` example on it.
fn pipeline_round_trip(m: &ClipModel) {
    let keep = std::env::var_os("UNCLIP_CLIP_DEMO_DIR").map(std::path::PathBuf::from);
    let dir = keep.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("unclip-clip-pipeline-{}", std::process::id()))
    });
    m.save(&dir, None).unwrap();
    ClipTokenizer::from_dir(&fixture_path("clip/tiny_tokenizer")).unwrap().save(&dir).unwrap();
    let pre = json!({"size": 16, "crop_size": 16, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]});
    std::fs::write(dir.join("preprocessor_config.json"), pre.to_string()).unwrap();
    let classes: Vec<usize> = (0..COLORS.len()).collect();
    let raw = raw_images(&classes);
    let imgs: Vec<image::DynamicImage> = (0..classes.len() as i64)
        .map(|i| {
            let hwc =
                (raw.get(i).permute([1, 2, 0]) * 255.0).round().to_kind(Kind::Uint8).contiguous();
            let data = Vec::<u8>::try_from(hwc.flatten(0, -1)).unwrap();
            let path = dir.join(format!("{}.png", COLORS[classes[i as usize]].0));
            image::RgbImage::from_raw(16, 16, data).unwrap().save(&path).unwrap();
            image::open(&path).unwrap()
        })
        .collect();
    let p = ClipPipeline::from_dir(&dir, Device::Cpu, Kind::Float).unwrap();
    assert_eq!(p.tokenizer.context_length(), 16, "limited to max_position_embeddings");
    let labels: Vec<&str> = COLORS.iter().map(|(c, _)| *c).collect();
    let scores = p.classify(&imgs, &labels, "a photo of a {} thing").unwrap();
    let right = scores.iter().zip(&classes).filter(|(s, c)| s[0].label == COLORS[**c].0).count();
    assert!(right >= 5, "pipeline classified {right}/6 PNGs: {scores:?}");
    assert!(p.classify(&imgs, &[], "{}").is_err());
    assert!(p.classify(&imgs, &["red", ""], "{}").is_err());
    assert!(p.classify(&imgs, &["red"], "no slot").is_err());
    if keep.is_none() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

fn rand_below(n: i64) -> i64 {
    Tensor::randint(n, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0])
}

fn model(tok: &ClipTokenizer, device: Device) -> ClipModel {
    let cfg = AnyConfig::from_value(json!({
        "model_type": "clip", "projection_dim": 32, "logit_scale_init_value": 2.6592,
        "text_config": {"vocab_size": tok.vocab_size(), "hidden_size": 32, "intermediate_size": 64,
                        "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 16,
                        "bos_token_id": tok.bos_id(), "eos_token_id": tok.eos_id(), "pad_token_id": tok.pad_id()},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "image_size": 16, "patch_size": 4}
    }))
    .unwrap();
    ClipModel::new(cfg, Towers::Both, device, Kind::Float).unwrap()
}

fn zero_shot_accuracy(m: &ClipModel, tok: &ClipTokenizer, device: Device) -> f64 {
    let classes: Vec<usize> = (0..120).map(|i| i % COLORS.len()).collect();
    let px = images(&classes, device);
    let prompts: Vec<String> =
        COLORS.iter().map(|(c, _)| format!("a photo of a {c} thing")).collect();
    let enc = tok.encode_batch(&prompts, Truncation::Error, device).unwrap();
    let probs = m.zero_shot(&px, &enc.input_ids, Some(&enc.attention_mask)).unwrap();
    let pred = Vec::<i64>::try_from(probs.argmax(-1, false).to_device(Device::Cpu)).unwrap();
    pred.iter().zip(&classes).filter(|(p, c)| **p as usize == **c).count() as f64
        / classes.len() as f64
}

fn train_and_check(device: Device) {
    tch::manual_seed(0);
    let tok = ClipTokenizer::from_dir(&fixture_path("clip/tiny_tokenizer"))
        .unwrap()
        .with_context_length(16)
        .unwrap();
    let m = model(&tok, device);
    let before = zero_shot_accuracy(&m, &tok, device);
    let mut trainer = ClipTrainer::new(
        &m,
        TrainConfig { learning_rate: 2e-3, weight_decay: 0.01, max_grad_norm: Some(1.0) },
    )
    .unwrap();
    let (mut first, mut last) = (0.0, 0.0);
    let steps = 40;
    for step in 0..steps {
        // Batches of distinct colors (a repeated color would make two "positives" in a row).
        let perm =
            Vec::<i64>::try_from(Tensor::randperm(COLORS.len() as i64, (Kind::Int64, Device::Cpu)))
                .unwrap();
        let classes: Vec<usize> = perm.iter().map(|&c| c as usize).collect();
        let captions: Vec<String> = classes
            .iter()
            .map(|&c| TEMPLATES[rand_below(4) as usize].replace("{}", COLORS[c].0))
            .collect();
        let enc = tok.encode_batch(&captions, Truncation::Error, device).unwrap();
        let loss = trainer
            .step(&m, &enc.input_ids, Some(&enc.attention_mask), &images(&classes, device))
            .unwrap();
        if step < 10 {
            first += loss / 10.0;
        }
        if step >= steps - 10 {
            last += loss / 10.0;
        }
    }
    let after = zero_shot_accuracy(&m, &tok, device);
    let scale = m.logit_scale().unwrap().double_value(&[]);
    eprintln!(
        "{device:?}: loss {first:.3} -> {last:.3}, zero-shot accuracy {before:.2} -> {after:.2} (chance {:.2}), logit_scale {scale:.3}",
        1.0 / COLORS.len() as f64
    );
    assert!(last < 0.5 * first, "loss did not fall enough: {first} -> {last}");
    assert!(after >= 0.9, "zero-shot accuracy {after} after training (before {before})");
    assert!(scale <= MAX_LOGIT_SCALE + 1e-6);
    if device == Device::Cpu {
        pipeline_round_trip(&m);
    }
}

#[test]
fn contrastive_training_learns_colors_cpu() {
    let _rng = rng_lock();
    train_and_check(Device::Cpu);
}

#[test]
fn contrastive_training_learns_colors_cuda() {
    let _rng = rng_lock();
    if !tch::Cuda::is_available() {
        eprintln!("no CUDA: skipped");
        return;
    }
    train_and_check(Device::Cuda(0));
}

#[test]
fn trainer_checks_input_and_clamps_temperature() {
    let _rng = rng_lock();
    let tok = ClipTokenizer::from_dir(&fixture_path("clip/tiny_tokenizer"))
        .unwrap()
        .with_context_length(16)
        .unwrap();
    let m = model(&tok, Device::Cpu);
    let bad = TrainConfig { learning_rate: f64::NAN, ..Default::default() };
    assert!(ClipTrainer::new(&m, bad).is_err());
    let mut t = ClipTrainer::new(&m, TrainConfig::default()).unwrap();
    let enc = tok
        .encode_batch(&["a red square", "a blue square"], Truncation::Error, Device::Cpu)
        .unwrap();
    assert!(t.step(&m, &enc.input_ids, None, &images(&[0, 1, 2], Device::Cpu)).is_err());
    let one = tok.encode_batch(&["a red square"], Truncation::Error, Device::Cpu).unwrap();
    assert!(t.step(&m, &one.input_ids, None, &images(&[0], Device::Cpu)).is_err());
    // The temperature is clamped to ln 100 after a step, as in CLIP.
    tch::no_grad(|| {
        let _ = m.logit_scale().unwrap().shallow_clone().fill_(7.0);
    });
    t.step(&m, &enc.input_ids, None, &images(&[0, 1], Device::Cpu)).unwrap();
    assert!((m.logit_scale().unwrap().double_value(&[]) - MAX_LOGIT_SCALE).abs() < 1e-6);
    let text_only =
        ClipModel::load(&fixture_path("clip/text_eos"), Towers::Both, Device::Cpu, Kind::Float)
            .unwrap();
    assert!(ClipTrainer::new(&text_only, TrainConfig::default()).is_err());
}

#[test]
fn same_seed_same_training_on_cpu() {
    let _rng = rng_lock();
    let tok = ClipTokenizer::from_dir(&fixture_path("clip/tiny_tokenizer"))
        .unwrap()
        .with_context_length(16)
        .unwrap();
    let run = || {
        tch::manual_seed(7);
        let m = model(&tok, Device::Cpu);
        let mut t = ClipTrainer::new(&m, TrainConfig::default()).unwrap();
        let enc = tok
            .encode_batch(
                &["a red square", "a blue square", "a green square"],
                Truncation::Error,
                Device::Cpu,
            )
            .unwrap();
        let px = images(&[0, 2, 1], Device::Cpu);
        let losses: Vec<f64> = (0..3)
            .map(|_| t.step(&m, &enc.input_ids, Some(&enc.attention_mask), &px).unwrap())
            .collect();
        (losses, m.var_store().variables()["visual_projection.weight"].copy())
    };
    let (a, wa) = run();
    let (b, wb) = run();
    assert_eq!(a, b);
    assert!(wa.equal(&wb));
}
