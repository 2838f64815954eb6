//! One sampler step of each stage (prior and decoder with guidance, both upsamplers) and the
//! whole text-to-image pipeline, on diffusers' tiny test-sized pipeline
//! (`fixtures/data/pipeline/text2img`) and on the embedded model (`models/shapes/`, skipped when
//! it is not there). Peak RSS is printed per configuration.
//!
//! `cargo bench -p unclip-benches --bench stages` (CPU, f32; threads: `UNCLIP_BENCH_THREADS`,
//! default 1). Karlo-sized steps take seconds to a minute each on a small CPU; they are timed by
//! the `side_by_side` binary (`scripts/bench_side_by_side.py`) instead.

use criterion::{Criterion, criterion_group, criterion_main};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tch::{Device, Kind};
use unclip::{LoadOptions, Unclip};
use unclip_benches::*;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn bench_config(c: &mut Criterion, name: &str, dir: &Path) {
    if !dir.join("model_index.json").is_file() {
        eprintln!("skipping {name}: no pipeline folder at {}", dir.display());
        return;
    }
    let opts = LoadOptions::new(Device::Cpu, Kind::Float);
    let mut m = Unclip::from_pretrained(dir, &opts).expect("load pipeline");
    let text = guided_text(&m).expect("encode prompt");
    let mut g = c.benchmark_group(name);
    g.sample_size(10).warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(2));
    if let Some(mut f) = prior_step(&mut m, &text, 25).unwrap() {
        g.bench_function("prior_step", |b| b.iter(|| f().unwrap()));
    }
    {
        let mut f = decoder_step(&mut m, &text, 25).unwrap();
        g.bench_function("decoder_step", |b| b.iter(|| f().unwrap()));
    }
    for (label, last) in [("super_res_first_step", false), ("super_res_last_step", true)] {
        if let Some(mut f) = super_res_step(&mut m, 7, last).unwrap() {
            g.bench_function(label, |b| b.iter(|| f().unwrap()));
        }
    }
    g.measurement_time(Duration::from_secs(5));
    if let Some(mut f) = pipeline(&mut m, [25, 25, 7]).unwrap() {
        g.bench_function("pipeline_25_25_7", |b| b.iter(|| f().unwrap()));
    }
    g.finish();
    if let Some(p) = peak_rss_bytes() {
        eprintln!("{name}: peak RSS so far {:.0} MiB", p as f64 / (1 << 20) as f64);
    }
}

fn stages(c: &mut Criterion) {
    let threads = std::env::var("UNCLIP_BENCH_THREADS").ok().and_then(|s| s.parse().ok());
    tch::set_num_threads(threads.unwrap_or(1));
    tch::manual_seed(0);
    bench_config(c, "tiny", &root().join("fixtures/data/pipeline/text2img"));
    bench_config(c, "embedded", &root().join("models/shapes"));
}

criterion_group!(benches, stages);
criterion_main!(benches);
