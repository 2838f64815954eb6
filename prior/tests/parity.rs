//! Parity with diffusers 0.42.1 (fixtures/gen_prior.py): forward passes of two tiny random
//! PriorTransformers on a padded batch, and a guided 5-step sampling loop.

use tch::{Device, Kind, Tensor};
use unclip_core::testing::{assert_close, fixture_path, load_fixture, max_abs_diff};
use unclip_prior::{PriorTransformer, SampleOptions, TextConditioning, sample, sampling};
use unclip_scheduler::TorchNoise;

const TOL: f64 = 1e-4;

fn load(name: &str) -> (tch::nn::VarStore, PriorTransformer) {
    PriorTransformer::from_pretrained(
        &fixture_path(&format!("prior/{name}")),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap()
}

fn forward_matches(name: &str) {
    let (_vs, model) = load(name);
    let io = load_fixture(&format!("prior/{name}/io.safetensors"));
    let (x, e, h, m) = (&io["latents"], &io["text_embeds"], &io["text_hidden"], &io["mask"]);
    let mask = m.ne(0);
    let t500 = model.forward(x, &Tensor::from(500i64), e, h, Some(&mask)).unwrap();
    assert_close(&format!("{name} t=500"), &t500, &io["out_t500"], TOL, 0.0);
    // The int64 0/1 mask as saved works as well as a bool one.
    let t500_int = model.forward(x, &Tensor::from(500i64), e, h, Some(m)).unwrap();
    assert_close(&format!("{name} int mask"), &t500_int, &io["out_t500"], TOL, 0.0);
    let rows = model.forward(x, &io["per_row_t"], e, h, Some(&mask)).unwrap();
    assert_close(&format!("{name} per-row t"), &rows, &io["out_per_row_t"], TOL, 0.0);
    let nomask = model.forward(x, &Tensor::from(37i64), e, h, None).unwrap();
    assert_close(&format!("{name} no mask"), &nomask, &io["out_t37_nomask"], TOL, 0.0);
    eprintln!(
        "{name}: max |diff| t=500 {:.1e}, per-row t {:.1e}, no mask {:.1e}",
        max_abs_diff(&t500, &io["out_t500"]),
        max_abs_diff(&rows, &io["out_per_row_t"]),
        max_abs_diff(&nomask, &io["out_t37_nomask"])
    );
    let post = model.post_process_latents(x).unwrap();
    assert_close(&format!("{name} post-process"), &post, &io["post_process_latents"], 1e-6, 0.0);
}

#[test]
fn tiny_forward_matches_diffusers() {
    forward_matches("tiny");
}

#[test]
fn deep_forward_with_input_norms_matches_diffusers() {
    forward_matches("deep");
}

#[test]
fn guided_sampling_matches_diffusers() {
    let (_vs, model) = load("tiny");
    let f = load_fixture("prior/sample.safetensors");
    let cond = TextConditioning::new(
        f["cond_embeds"].shallow_clone(),
        f["cond_hidden"].shallow_clone(),
        f["cond_mask"].shallow_clone(),
    )
    .unwrap();
    let uncond = TextConditioning::new(
        f["uncond_embeds"].shallow_clone(),
        f["uncond_hidden"].shallow_clone(),
        f["uncond_mask"].shallow_clone(),
    )
    .unwrap();
    let opts = SampleOptions {
        num_inference_steps: f["steps"].int64_value(&[]) as usize,
        guidance_scale: f["guidance"].double_value(&[]),
    };
    let mut sched = sampling::karlo_prior_scheduler().unwrap();
    let mut noise = TorchNoise::new(f["seed"].int64_value(&[]) as u64);
    let out = sample(&model, &mut sched, &cond, Some(&uncond), &opts, &mut noise).unwrap();
    let ts: Vec<i64> = Vec::try_from(&f["timesteps"]).unwrap();
    assert_eq!(unclip_scheduler::Scheduler::timesteps(&sched), ts.as_slice());
    eprintln!("sampling: max |diff| {:.1e}", max_abs_diff(&out, &f["image_embeds"]));
    assert_close("image embeddings", &out, &f["image_embeds"], TOL, 0.0);

    // Same seed, same output.
    let mut noise = TorchNoise::new(f["seed"].int64_value(&[]) as u64);
    let again = sample(&model, &mut sched, &cond, Some(&uncond), &opts, &mut noise).unwrap();
    assert!(out.equal(&again));
}

#[test]
fn half_precision_checkpoint_loads_and_stays_close() {
    let dir = fixture_path("prior/tiny");
    let (_vs, model) = PriorTransformer::from_pretrained(&dir, Device::Cpu, Kind::Half).unwrap();
    assert_eq!(model.kind(), Kind::Half);
    let io = load_fixture("prior/tiny/io.safetensors");
    let out = model
        .forward(
            &io["latents"],
            &Tensor::from(500i64),
            &io["text_embeds"],
            &io["text_hidden"],
            Some(&io["mask"]),
        )
        .unwrap();
    assert_eq!(out.kind(), Kind::Half);
    assert_close("f16 forward", &out, &io["out_t500"], 2e-2, 0.0);
}

/// Replays saved draws: `randn` and `randint` hand out the given tensors in order.
struct Replay {
    randn: Vec<Tensor>,
    randint: Vec<Tensor>,
}

impl unclip_scheduler::NoiseSource for Replay {
    fn randn(&mut self, shape: &[i64], kind: Kind, device: Device) -> Tensor {
        let t = self.randn.remove(0);
        assert_eq!(t.size(), shape, "replayed randn shape");
        t.to_device(device).to_kind(kind)
    }
    fn randint(&mut self, _high: i64, shape: &[i64], device: Device) -> Tensor {
        let t = self.randint.remove(0);
        assert_eq!(t.size(), shape, "replayed randint shape");
        t.to_device(device)
    }
}

#[test]
fn training_loss_and_gradients_match_diffusers() {
    use unclip_prior::{PriorBatch, PriorTrainer, TrainOptions};
    let (vs, model) = load("tiny");
    let f = load_fixture("prior/train.safetensors");
    let cond = TextConditioning::new(
        f["text_embeds"].shallow_clone(),
        f["text_hidden"].shallow_clone(),
        f["mask"].shallow_clone(),
    )
    .unwrap();
    let uncond = TextConditioning::new(
        f["uncond_embeds"].shallow_clone(),
        f["uncond_hidden"].shallow_clone(),
        f["uncond_mask"].shallow_clone(),
    )
    .unwrap();
    let trainer = PriorTrainer::karlo(uncond, TrainOptions { cond_drop_prob: 0.5 }).unwrap();
    // Dropped rows draw 0 (< 0.5 * 2^24), kept rows 2^24 - 1.
    let drop_draws = f["dropped"].eq(0).to_kind(Kind::Int64) * ((1i64 << 24) - 1);
    let mut replay = Replay {
        randn: vec![f["noise"].shallow_clone()],
        randint: vec![f["timesteps"].shallow_clone(), drop_draws],
    };
    let batch = PriorBatch { image_embeds: f["image_embeds"].shallow_clone(), text: cond };
    let loss = trainer.loss(&model, &batch, &mut replay).unwrap();
    let reference = f["loss"].double_value(&[]);
    eprintln!("train loss {} vs {reference}", loss.double_value(&[]));
    assert!((loss.double_value(&[]) - reference).abs() <= 1e-4 * reference.abs().max(1.0));
    loss.backward();
    let vars = vs.variables();
    let mut worst = 0f64;
    let mut checked = 0;
    for (name, reference) in f.iter().filter_map(|(k, v)| k.strip_prefix("grad.").map(|n| (n, v))) {
        let grad = vars[name].grad();
        assert!(grad.defined(), "{name} got no gradient");
        assert_close(&format!("grad {name}"), &grad, reference, 1e-4, 1e-4);
        worst = worst.max(max_abs_diff(&grad, reference));
        checked += 1;
    }
    eprintln!("gradients: {checked} tensors, max |diff| {worst:.1e}");
    // Every trainable tensor was compared (clip_mean/clip_std are not trained).
    assert_eq!(checked, vs.trainable_variables().len());
}
