//! Times one sampler step of each stage and the whole text-to-image pipeline of a diffusers-layout
//! unCLIP folder, in the way `scripts/bench_side_by_side.py` times diffusers on the same folder:
//! same dtype (f32, CPU), same thread count, same steps, one process per configuration so the
//! peak RSS it reports belongs to that configuration alone.
//!
//! A "step" is what one iteration of the sampling loop costs: the model call on the guided batch
//! (prior, decoder) or on the sample with its low-resolution image (upsamplers), guidance, and the
//! scheduler's step. Conditioning that the loop computes once (text encoding, text projection,
//! the upsampled low-resolution image) is prepared before the clock starts, as both pipelines do.
//!
//! `cargo run --release -p unclip-benches --bin side_by_side -- --model DIR [--threads 2]
//!  [--warmup 1] [--reps 5] [--pipeline-reps 1] [--steps 25,25,7] [--sr-last] --json`

use std::time::Instant;
use tch::{Device, Kind, Tensor};
use unclip::{LoadOptions, TextToImage, Unclip, no_progress};
use unclip_benches::peak_rss_bytes;
use unclip_scheduler::TorchNoise;

struct Args {
    model: String,
    threads: i32,
    warmup: usize,
    reps: usize,
    pipeline_reps: usize,
    steps: [usize; 3],
    sr_last: bool,
    json: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        model: String::new(),
        threads: 2,
        warmup: 1,
        reps: 5,
        pipeline_reps: 1,
        steps: [25, 25, 7],
        sr_last: false,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().ok_or_else(|| anyhow::anyhow!("{k} needs a value"));
        match k.as_str() {
            "--model" => a.model = val()?,
            "--threads" => a.threads = val()?.parse()?,
            "--warmup" => a.warmup = val()?.parse()?,
            "--reps" => a.reps = val()?.parse()?,
            "--pipeline-reps" => a.pipeline_reps = val()?.parse()?,
            "--steps" => {
                let v: Vec<usize> = val()?.split(',').map(str::parse).collect::<Result<_, _>>()?;
                anyhow::ensure!(v.len() == 3, "--steps takes prior,decoder,super_res");
                a.steps = [v[0], v[1], v[2]];
            }
            "--sr-last" => a.sr_last = true,
            "--json" => a.json = true,
            "--bench" => {} // passed by `cargo bench`
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    anyhow::ensure!(!a.model.is_empty(), "--model DIR is required");
    anyhow::ensure!(a.reps > 0 && a.pipeline_reps > 0, "reps must be at least 1");
    Ok(a)
}

/// Median seconds of `reps` calls after `warmup` untimed ones.
fn time(
    warmup: usize,
    reps: usize,
    mut f: impl FnMut() -> anyhow::Result<Tensor>,
) -> anyhow::Result<f64> {
    for _ in 0..warmup {
        let _ = std::hint::black_box(f()?);
    }
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        let out = f()?;
        // Values are computed eagerly on the CPU; touching the result keeps the work honest.
        std::hint::black_box(&out);
        v.push(t0.elapsed().as_secs_f64());
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

fn guide(out: &Tensor, scale: f64, channels: i64) -> anyhow::Result<Tensor> {
    let h = out.f_chunk(2, 0)?;
    let (u, c) = (&h[0], &h[1]);
    let n = c.size()[1];
    if n > channels {
        let (eu, ec) = (u.f_narrow(1, 0, channels)?, c.f_narrow(1, 0, channels)?);
        let eps = eu.f_add(&ec.f_sub(&eu)?.f_mul_scalar(scale)?)?;
        Ok(Tensor::f_cat(&[eps, c.f_narrow(1, channels, n - channels)?], 1)?)
    } else {
        Ok(u.f_add(&c.f_sub(u)?.f_mul_scalar(scale)?)?)
    }
}

fn main() -> anyhow::Result<()> {
    let a = parse_args()?;
    tch::set_num_threads(a.threads);
    tch::manual_seed(0);
    let t0 = Instant::now();
    let mut m = Unclip::from_pretrained(&a.model, &LoadOptions::new(Device::Cpu, Kind::Float))?;
    let load_s = t0.elapsed().as_secs_f64();
    let (prior_g, dec_g) = (4.0, 8.0);
    let mut res = serde_json::Map::new();
    let mut noise = TorchNoise::new(0);

    let cond = m.encode_prompts(&["a high-resolution photograph of a red frog"])?.conditioning;
    let uncond = m.encode_prompts(&[""])?.conditioning;
    let text = uncond.cat(&cond)?;

    // Prior step.
    let emb = if let Some(prior) = m.prior.as_deref() {
        let s = m.prior_scheduler.as_mut();
        s.set_timesteps(a.steps[0])?;
        let t = s.timesteps()[s.timesteps().len() / 2];
        let x = Tensor::f_randn([1, prior.embedding_dim()], (Kind::Float, Device::Cpu))?;
        let secs = time(a.warmup, a.reps, || {
            let out = prior.predict(&Tensor::f_cat(&[&x, &x], 0)?, t, &text)?;
            Ok(s.step(&guide(&out, prior_g, i64::MAX)?, t, &x, &mut noise)?)
        })?;
        res.insert("prior_step".into(), secs.into());
        prior.post_process(&x)?
    } else {
        Tensor::f_randn([1, 768], (Kind::Float, Device::Cpu))?
    };

    // Decoder step with classifier-free guidance (2 rows for 1 image).
    let small = {
        let dec = m.decoder.as_ref();
        let (c, h, w) = dec.sample_shape()?;
        let step = dec.prepare(&emb, &text, true)?;
        let s = m.decoder_scheduler.as_mut();
        s.set_timesteps(a.steps[1])?;
        let t = s.timesteps()[s.timesteps().len() / 2];
        let x = Tensor::f_randn([1, c, h, w], (Kind::Float, Device::Cpu))?;
        let secs = time(a.warmup, a.reps, || {
            let out = step.predict(&Tensor::f_cat(&[&x, &x], 0)?, t)?;
            Ok(s.step(&guide(&out, dec_g, c)?, t, &x, &mut noise)?)
        })?;
        res.insert("decoder_step".into(), secs.into());
        x.f_clamp(-1.0, 1.0)?
    };

    // Upsampler steps (super_res_first; super_res_last on request: the same architecture).
    if let Some(up) = m.upsampler.as_deref() {
        let (c, h, w) = up.sample_shape()?;
        let low = up.condition(&small)?;
        let s = m.super_res_scheduler.as_mut();
        s.set_timesteps(a.steps[2])?;
        let t = s.timesteps()[0];
        let x = Tensor::f_randn([1, c, h, w], (Kind::Float, Device::Cpu))?;
        let secs = time(a.warmup, a.reps, || {
            let out = up.predict(&x, &low, t, false)?;
            Ok(s.step(&out, t, &x, &mut noise)?)
        })?;
        res.insert("super_res_first_step".into(), secs.into());
        if a.sr_last {
            let t = *s.timesteps().last().unwrap_or(&0);
            let secs = time(a.warmup, a.reps, || {
                let out = up.predict(&x, &low, t, true)?;
                Ok(s.step(&out, t, &x, &mut noise)?)
            })?;
            res.insert("super_res_last_step".into(), secs.into());
        }
    }

    // The whole pipeline: prompt to 256 px image, one image, guidance 4 and 8.
    if m.prior.is_some() {
        let req = TextToImage {
            prior_steps: a.steps[0],
            decoder_steps: a.steps[1],
            super_res_steps: a.steps[2],
            prior_guidance_scale: prior_g,
            decoder_guidance_scale: dec_g,
            seed: Some(0),
            ..TextToImage::new("a high-resolution photograph of a red frog")
        };
        let secs =
            time(0, a.pipeline_reps, || Ok(m.text_to_image(&req, &mut no_progress)?.images))?;
        res.insert("pipeline".into(), secs.into());
    }
    res.insert("load_s".into(), load_s.into());
    res.insert("peak_rss_bytes".into(), peak_rss_bytes().unwrap_or(0).into());
    res.insert("threads".into(), tch::get_num_threads().into());
    let v = serde_json::Value::Object(res);
    if a.json {
        println!("{v}");
    } else {
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(())
}
