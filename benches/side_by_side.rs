//! Times one sampler step of each stage and the whole text-to-image pipeline of a diffusers-layout
//! unCLIP folder, in the way `scripts/bench_side_by_side.py` times diffusers on the same folder:
//! same dtype (f32 on the CPU unless `--dtype bf16`), same thread count, same steps, one process per configuration so the
//! peak RSS it reports belongs to that configuration alone.
//!
//! A "step" is what one iteration of the sampling loop costs: the model call on the guided batch
//! (prior, decoder) or on the sample with its low-resolution image (upsamplers), guidance, and the
//! scheduler's step. Conditioning that the loop computes once (text encoding, text projection,
//! the upsampled low-resolution image) is prepared before the clock starts, as both pipelines do.
//!
//! `cargo run --release -p unclip-benches --bin side_by_side -- --model DIR [--threads 2]
//!  [--warmup 1] [--sr-warmup N] [--reps 5] [--pipeline-reps 1] [--steps 25,25,7] [--sr-last] [--dtype bf16] --json`

use std::time::Instant;
use tch::{Device, Kind, Tensor};
use unclip::{LoadOptions, Unclip};
use unclip_benches::*;

struct Args {
    model: String,
    threads: i32,
    warmup: usize,
    sr_warmup: Option<usize>,
    reps: usize,
    pipeline_reps: usize,
    steps: [usize; 3],
    sr_last: bool,
    json: bool,
    /// Load the UNets channels-last (`LoadOptions::channels_last`, the CPU default).
    channels_last: bool,
    /// Weights and activations dtype (f32 by default; bf16 to see whether it pays on this CPU).
    kind: Kind,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        model: String::new(),
        threads: 2,
        warmup: 1,
        sr_warmup: None,
        reps: 5,
        pipeline_reps: 1,
        steps: [25, 25, 7],
        sr_last: false,
        json: false,
        channels_last: true,
        kind: Kind::Float,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().ok_or_else(|| anyhow::anyhow!("{k} needs a value"));
        match k.as_str() {
            "--model" => a.model = val()?,
            "--threads" => a.threads = val()?.parse()?,
            "--warmup" => a.warmup = val()?.parse()?,
            "--sr-warmup" => a.sr_warmup = Some(val()?.parse()?),
            "--reps" => a.reps = val()?.parse()?,
            "--pipeline-reps" => a.pipeline_reps = val()?.parse()?,
            "--steps" => {
                let v: Vec<usize> =
                    val()?.split(',').map(str::parse).collect::<std::result::Result<_, _>>()?;
                anyhow::ensure!(v.len() == 3, "--steps takes prior,decoder,super_res");
                a.steps = [v[0], v[1], v[2]];
            }
            "--sr-last" => a.sr_last = true,
            "--no-channels-last" => a.channels_last = false,
            "--dtype" => a.kind = unclip_core::dtype::parse_dtype(&val()?)?,
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

fn main() -> anyhow::Result<()> {
    let a = parse_args()?;
    tch::set_num_threads(a.threads);
    tch::manual_seed(0);
    let t0 = Instant::now();
    let mut m = Unclip::from_pretrained(
        &a.model,
        &LoadOptions::new(Device::Cpu, a.kind).channels_last(a.channels_last),
    )?;
    let load_s = t0.elapsed().as_secs_f64();
    let mut res = serde_json::Map::new();
    let text = guided_text(&m)?;
    if let Some(f) = prior_step(&mut m, &text, a.steps[0])? {
        res.insert("prior_step".into(), time(a.warmup, a.reps, f)?.into());
    }
    let f = decoder_step(&mut m, &text, a.steps[1])?;
    res.insert("decoder_step".into(), time(a.warmup, a.reps, f)?.into());
    let sr_warmup = a.sr_warmup.unwrap_or(a.warmup);
    if let Some(f) = super_res_step(&mut m, a.steps[2], false)? {
        res.insert("super_res_first_step".into(), time(sr_warmup, a.reps, f)?.into());
    }
    if a.sr_last {
        if let Some(f) = super_res_step(&mut m, a.steps[2], true)? {
            res.insert("super_res_last_step".into(), time(sr_warmup, a.reps, f)?.into());
        }
    }
    if let Some(f) = pipeline(&mut m, a.steps)? {
        res.insert("pipeline".into(), time(0, a.pipeline_reps, f)?.into());
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
