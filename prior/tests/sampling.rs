//! Best-of-N selection, and the errors sampling, the forward pass and loading give for bad input.

use tch::{Device, Kind, Tensor, nn};
use unclip_core::testing::{fixture_path, max_abs_diff};
use unclip_prior::{
    Error, PriorBatch, PriorConfig, PriorTrainer, PriorTransformer, SampleOptions,
    TextConditioning, TrainOptions, sample, sample_best_of_n, sampling,
};
use unclip_scheduler::{NoiseSource, TorchNoise};

const CPU: (Kind, Device) = (Kind::Float, Device::Cpu);

/// Tests seed libtorch's global generator; one at a time keeps them reproducible.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Noise keyed by (draw number, row): row r of the k-th draw is the same whatever the number of
/// rows, so candidate 0 of a best-of-N batch (rows 0..B) sees exactly the draws of N = 1. A
/// SplitMix64 + Box-Muller generator, independent of libtorch's global one.
struct RowNoise {
    draws: u64,
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl NoiseSource for RowNoise {
    fn randn(&mut self, shape: &[i64], kind: Kind, device: Device) -> Tensor {
        let (rows, cols) = (shape[0], shape[1..].iter().product::<i64>());
        let mut v = Vec::with_capacity((rows * cols) as usize);
        for r in 0..rows {
            let mut s = (self.draws << 32) | r as u64;
            for _ in 0..cols {
                let u1 = ((splitmix(&mut s) >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
                let u2 = (splitmix(&mut s) >> 11) as f64 / (1u64 << 53) as f64;
                v.push(((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32);
            }
        }
        self.draws += 1;
        Tensor::from_slice(&v).reshape(shape).to_device(device).to_kind(kind)
    }
}

fn tiny() -> (nn::VarStore, PriorTransformer) {
    PriorTransformer::from_pretrained(&fixture_path("prior/tiny"), Device::Cpu, Kind::Float)
        .unwrap()
}

fn text(b: i64, n: i64, e: i64, len: i64, seed: i64) -> TextConditioning {
    tch::manual_seed(seed);
    let mask = Tensor::arange(n, (Kind::Int64, Device::Cpu)).lt(len).unsqueeze(0).repeat([b, 1]);
    TextConditioning::new(Tensor::randn([b, e], CPU), Tensor::randn([b, n, e], CPU), mask).unwrap()
}

#[test]
fn best_of_n_never_loses_to_n_equals_one() {
    let _guard = RNG.lock().unwrap_or_else(|e| e.into_inner());
    // A freshly initialised small prior: its output depends on the noisy latent enough for the
    // candidates to differ (the tiny diffusers fixture barely looks at it).
    tch::manual_seed(21);
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = PriorConfig {
        num_attention_heads: 2,
        attention_head_dim: 8,
        num_layers: 2,
        embedding_dim: 16,
        num_embeddings: 6,
        ..PriorConfig::default()
    };
    let model = PriorTransformer::new(vs.root(), &cfg).unwrap();
    let (n, e) = (cfg.num_embeddings, cfg.embedding_dim);
    let cond = text(3, n, e, 4, 11);
    let uncond = text(1, n, e, 2, 12);
    let opts = SampleOptions { num_inference_steps: 4, guidance_scale: 4.0 };
    let mut sched = sampling::karlo_prior_scheduler().unwrap();

    let one = sample(&model, &mut sched, &cond, Some(&uncond), &opts, &mut RowNoise { draws: 0 })
        .unwrap();
    let one_sim = Tensor::cosine_similarity(&one, &cond.text_embeds, 1, 1e-8);
    let best = sample_best_of_n(
        &model,
        &mut sched,
        &cond,
        Some(&uncond),
        &opts,
        5,
        &mut RowNoise { draws: 0 },
    )
    .unwrap();
    assert_eq!(best.candidates.size(), [5, 3, e]);
    // Candidate 0 is the N = 1 sample.
    assert!(max_abs_diff(&best.candidates.get(0), &one) < 1e-5);
    // The kept candidate scores highest among all candidates, hence never below N = 1's.
    let best_sim = Tensor::cosine_similarity(&best.image_embeds, &cond.text_embeds, 1, 1e-8);
    let max_sim = best.scores.amax([0], false);
    assert!(max_abs_diff(&best_sim, &max_sim) < 1e-6);
    let lost = (&one_sim - &best_sim).max().double_value(&[]);
    assert!(lost <= 1e-5, "best-of-N lost {lost} similarity to N = 1");
    // The candidates really differ and some prompt keeps a later one (the test is not vacuous).
    assert!(best.scores.std_dim(0, true, false).min().double_value(&[]) > 1e-3);
    assert!(best.chosen.ne(0).any().int64_value(&[]) == 1);
    assert!(matches!(
        sample_best_of_n(
            &model,
            &mut sched,
            &cond,
            Some(&uncond),
            &opts,
            0,
            &mut RowNoise { draws: 0 }
        ),
        Err(Error::Input(_))
    ));
}

#[test]
fn bad_sampling_input_is_an_error() {
    let _guard = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let (_vs, model) = tiny();
    let cfg = model.config().clone();
    let (n, e) = (cfg.num_embeddings, cfg.embedding_dim);
    let cond = text(2, n, e, 5, 1);
    let uncond = text(1, n, e, 2, 2);
    let mut sched = sampling::karlo_prior_scheduler().unwrap();
    let mut noise = TorchNoise::new(0);
    let mut run = |cond: &TextConditioning, uncond: Option<&TextConditioning>, steps, g| {
        let opts = SampleOptions { num_inference_steps: steps, guidance_scale: g };
        sample(&model, &mut sched, cond, uncond, &opts, &mut noise)
    };
    for g in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(matches!(run(&cond, Some(&uncond), 2, g), Err(Error::Input(_))), "guidance {g}");
    }
    assert!(matches!(run(&cond, Some(&uncond), 0, 4.0), Err(Error::Input(_))));
    // Guidance needs the unconditional branch; scale 1 does not.
    assert!(matches!(run(&cond, None, 2, 4.0), Err(Error::Input(_))));
    assert_eq!(run(&cond, None, 2, 1.0).unwrap().size(), [2, e]);
    // Unconditional batch neither 1 nor B.
    assert!(matches!(run(&cond, Some(&text(3, n, e, 2, 3)), 2, 4.0), Err(Error::Input(_))));
    // Wrong embedding width and token count.
    assert!(matches!(run(&text(2, n, e + 1, 5, 4), Some(&uncond), 2, 4.0), Err(Error::Input(_))));
    assert!(matches!(run(&text(2, n - 1, e, 5, 4), Some(&uncond), 2, 4.0), Err(Error::Input(_))));
    // Conditioning parts with different batch sizes.
    let bad = TextConditioning::new(
        Tensor::randn([2, e], CPU),
        Tensor::randn([3, n, e], CPU),
        Tensor::ones([2, n], (Kind::Bool, Device::Cpu)),
    );
    assert!(matches!(bad, Err(Error::Input(_))));
}

#[test]
fn bad_forward_input_is_an_error() {
    let _guard = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let (_vs, model) = tiny();
    let cfg = model.config().clone();
    let (n, e) = (cfg.num_embeddings, cfg.embedding_dim);
    let (x, emb, hid) =
        (Tensor::randn([2, e], CPU), Tensor::randn([2, e], CPU), Tensor::randn([2, n, e], CPU));
    let mask = Tensor::ones([2, n], (Kind::Bool, Device::Cpu));
    let t = Tensor::from(10i64);
    let f = |x: &Tensor, t: &Tensor, emb: &Tensor, hid: &Tensor, m: &Tensor| {
        model.forward(x, t, emb, hid, Some(m))
    };
    assert_eq!(f(&x, &t, &emb, &hid, &mask).unwrap().size(), [2, e]);
    let bad = [
        f(&Tensor::randn([2, e + 1], CPU), &t, &emb, &hid, &mask),
        f(&Tensor::randn([2, 1, e], CPU), &t, &emb, &hid, &mask),
        f(&x, &Tensor::from_slice(&[1i64, 2, 3]), &emb, &hid, &mask),
        f(&x, &t, &Tensor::randn([3, e], CPU), &hid, &mask),
        f(&x, &t, &emb, &Tensor::randn([2, n + 1, e], CPU), &mask),
        f(&x, &t, &emb, &Tensor::randn([1, n, e], CPU), &mask),
        f(&x, &t, &emb, &hid, &Tensor::ones([2, n + 4], (Kind::Bool, Device::Cpu))),
    ];
    for (i, r) in bad.into_iter().enumerate() {
        assert!(matches!(r, Err(Error::Input(_))), "case {i}: {r:?}");
    }
}

#[test]
fn bad_training_input_is_an_error() {
    let _guard = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let (_vs, model) = tiny();
    let cfg = model.config().clone();
    let (n, e) = (cfg.num_embeddings, cfg.embedding_dim);
    let uncond = text(1, n, e, 2, 5);
    let opts = |p| TrainOptions { cond_drop_prob: p };
    for p in [-0.1, 1.5, f64::NAN] {
        assert!(PriorTrainer::karlo(uncond.clone(), opts(p)).is_err(), "drop prob {p}");
    }
    assert!(PriorTrainer::karlo(text(2, n, e, 2, 5), opts(0.1)).is_err());
    let trainer = PriorTrainer::karlo(uncond, opts(0.1)).unwrap();
    let mut noise = TorchNoise::new(0);
    let batch = |b_img: i64, c: i64| PriorBatch {
        image_embeds: Tensor::randn([b_img, c], CPU),
        text: text(2, n, e, 4, 6),
    };
    assert!(trainer.loss(&model, &batch(2, e), &mut noise).is_ok());
    assert!(matches!(trainer.loss(&model, &batch(3, e), &mut noise), Err(Error::Input(_))));
    assert!(matches!(trainer.loss(&model, &batch(2, e + 2), &mut noise), Err(Error::Input(_))));
}

#[test]
fn save_load_round_trip_and_checkpoint_errors() {
    let _guard = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let (vs, model) = tiny();
    let dir = std::env::temp_dir().join(format!("unclip-prior-rt-{}", std::process::id()));
    model.save_pretrained(&vs, &dir, None).unwrap();
    let (_vs2, back) = PriorTransformer::from_pretrained(&dir, Device::Cpu, Kind::Float).unwrap();
    assert_eq!(back.config(), model.config());
    let cfg = model.config().clone();
    let (n, e) = (cfg.num_embeddings, cfg.embedding_dim);
    let c = text(2, n, e, 4, 7);
    let x = Tensor::randn([2, e], CPU);
    let t = Tensor::from(321i64);
    let a = model.forward(&x, &t, &c.text_embeds, &c.hidden_states, Some(&c.mask)).unwrap();
    let b = back.forward(&x, &t, &c.text_embeds, &c.hidden_states, Some(&c.mask)).unwrap();
    assert!(a.equal(&b));

    // The tiny weights under the deep config: the error names what does not fit.
    let vs3 = nn::VarStore::new(Device::Cpu);
    let deep = PriorConfig::from_file(&fixture_path("prior/deep/config.json")).unwrap();
    let _m = PriorTransformer::new(vs3.root(), &deep).unwrap();
    let err = unclip_core::weights::load_file(
        &vs3,
        &dir.join(unclip_prior::model::WEIGHTS_NAME),
        unclip_core::weights::Unexpected::Error,
    )
    .unwrap_err();
    assert!(matches!(err, unclip_core::Error::MissingTensors { .. }), "{err}");
    // A config that this crate refuses.
    std::fs::write(dir.join("config.json"), r#"{"added_emb_type": null}"#).unwrap();
    assert!(matches!(
        PriorTransformer::from_pretrained(&dir, Device::Cpu, Kind::Float),
        Err(Error::Config(_))
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every tensor name and shape of the real Karlo prior checkpoint, against a model built from
/// Karlo's config (1.02 G parameters).
/// Built in f16 (about 2 GB; tch has no meta device) so it fits any test machine.
#[test]
fn karlo_layout_matches_checkpoint_names() {
    let text = std::fs::read_to_string(fixture_path("prior/karlo-prior-tensors.txt")).unwrap();
    let mut expected: Vec<(String, Vec<i64>)> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (name, shape) = l.split_once('\t').unwrap();
            let dims = shape.trim_matches(|c| c == '[' || c == ']');
            (name.to_string(), dims.split(", ").map(|d| d.parse().unwrap()).collect())
        })
        .collect();
    expected.sort();
    let mut vs = nn::VarStore::new(Device::Cpu);
    vs.set_kind(tch::Kind::Half);
    let _model = tch::no_grad(|| PriorTransformer::new(vs.root(), &PriorConfig::karlo()).unwrap());
    let mut ours: Vec<(String, Vec<i64>)> =
        vs.variables().into_iter().map(|(n, t)| (n, t.size())).collect();
    ours.sort();
    assert_eq!(ours.len(), 338);
    assert_eq!(ours, expected);
}
