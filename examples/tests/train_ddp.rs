//! Data-parallel training over 2 local processes (Gloo on 127.0.0.1).
//!
//! - `averaging_matches_one_process_on_the_whole_batch`: two ranks of `TrainLoop` (AdamW, weight
//!   decay, clipping, EMA) on halves of a fixed batch end bit-identical to each other and within
//!   1e-5 of one process on the whole batch. The loss draws nothing, so the comparison is exact
//!   up to the order of float sums. The workers are this test executable run again
//!   (UNCLIP_DDP_TEST_WORKER), started by unclip-dist's launcher.
//! - `train_nproc_2_trains_the_decoder`: `train --nproc 2` on the committed webdataset trains a
//!   small decoder with both ranks bit-identical at the end, only rank 0 writing; a run stopped
//!   and resumed with 2 ranks ends bit for bit where the uninterrupted one does.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use unclip::core::train::{AdamWConfig, EmaConfig, LoopConfig, LrSchedule, TrainLoop};
use unclip::dist::{DistEnv, LocalLaunch, ProcessGroup};
use unclip::tch::{Device, Kind, Tensor, nn};
use unclip::train::{Dist, RunConfig, RunOptions, Trainer, clip_contrastive_step};

const ROLE: &str = "UNCLIP_DDP_TEST_WORKER";
const OUT: &str = "UNCLIP_DDP_TEST_OUT";
const STEPS: u64 = 6;
const ROWS: i64 = 8;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn loop_config() -> LoopConfig {
    LoopConfig {
        total_steps: STEPS,
        seed: 11,
        schedule: LrSchedule::Constant { lr: 0.05, warmup_steps: 0 },
        optimizer: AdamWConfig { lr: 0.05, weight_decay: 0.1, ..Default::default() },
        ema: Some(EmaConfig { decay: 0.9, warmup: true }),
        // Small enough that clipping acts: it must see the averaged gradients.
        max_grad_norm: Some(0.5),
        checkpoint_every: 3,
        keep_last: 2,
    }
}

/// A fixed regression batch (rows `from..to` of it).
fn batch(from: i64, to: i64) -> (Tensor, Tensor) {
    let x = Tensor::arange(ROWS * 4, (Kind::Float, Device::Cpu)).reshape([ROWS, 4]).sin();
    let y = Tensor::arange(ROWS * 3, (Kind::Float, Device::Cpu)).reshape([ROWS, 3]).cos();
    (x.narrow(0, from, to - from), y.narrow(0, from, to - from))
}

/// Trains the toy model in `dir` on rows `from..to`; returns its weights and EMA, by name.
fn train_toy(dir: &Path, rows: (i64, i64), dist: Option<&Dist>) -> Vec<(String, Tensor)> {
    let vs = nn::VarStore::new(Device::Cpu);
    unclip::tch::manual_seed(rank_of(dist) as i64); // the ranks start apart: the broadcast aligns them
    let lin = nn::linear(vs.root() / "lin", 4, 3, Default::default());
    let params: Vec<Tensor> = {
        let mut v: Vec<_> = vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.into_iter().map(|(_, t)| t).collect()
    };
    if let Some(d) = dist {
        unclip::dist::broadcast_params(d.process_group(), &params, 0).unwrap();
    }
    let dp = dist.map(|d| unclip_data_parallel(d, &vs));
    let meta = serde_json::json!({});
    let mut run =
        TrainLoop::open_data_parallel(dir, &vs, loop_config(), |_| false, &[], meta, "toy", dp)
            .unwrap();
    let (x, y) = batch(rows.0, rows.1);
    for s in run.remaining() {
        run.begin_step(s).unwrap();
        let loss = (x.apply(&lin) - &y).square().mean(Kind::Float);
        let out = run.end_step(s, &vs, &loss, &[]).unwrap();
        assert!(!out.skipped);
    }
    let mut named: Vec<(String, Tensor)> =
        vs.variables().into_iter().map(|(n, t)| (n, t.detach().copy())).collect();
    for (n, t) in run.ema().unwrap().tensors(None).unwrap() {
        named.push((format!("ema.{n}"), t));
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

fn rank_of(dist: Option<&Dist>) -> usize {
    dist.map_or(0, Dist::rank)
}

/// The gradient sync the trainer installs (through its public pieces: buckets + loss mean).
fn unclip_data_parallel(d: &Dist, vs: &nn::VarStore) -> unclip::core::train::DataParallel {
    d.data_parallel("toy", vs).unwrap()
}

#[test]
fn averaging_matches_one_process_on_the_whole_batch() {
    if std::env::var(ROLE).is_ok_and(|r| r == "toy") {
        let env = DistEnv::from_env().unwrap();
        let d = Dist::new(ProcessGroup::from_env().unwrap());
        let out = PathBuf::from(std::env::var(OUT).unwrap());
        let half = ROWS / 2;
        let r = env.rank as i64;
        let named = train_toy(&out.join("dp"), (r * half, (r + 1) * half), Some(&d));
        Tensor::write_safetensors(&named, out.join(format!("rank{r}.safetensors"))).unwrap();
        println!("DONE rank {r}");
        return;
    }
    let dir = unclip::core::fsutil::scratch_dir("train-ddp-toy").unwrap();
    let mut launch = LocalLaunch::new(2, std::env::current_exe().unwrap());
    launch.args = ["--exact", "averaging_matches_one_process_on_the_whole_batch", "--nocapture"]
        .map(Into::into)
        .to_vec();
    launch.envs.push((ROLE.into(), "toy".into()));
    launch.envs.push((OUT.into(), dir.clone().into()));
    launch.capture = true;
    launch.deadline = Some(Duration::from_secs(120));
    let exits = launch.run().unwrap();
    for e in &exits {
        assert!(
            e.status.success() && e.stdout.contains(&format!("DONE rank {}", e.rank)),
            "rank {}: {}\n{}",
            e.rank,
            e.stdout,
            e.stderr
        );
    }
    let single = train_toy(&dir.join("single"), (0, ROWS), None);
    let load = |r: usize| {
        let mut v = Tensor::read_safetensors(dir.join(format!("rank{r}.safetensors"))).unwrap();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let (r0, r1) = (load(0), load(1));
    assert_eq!(r0.len(), single.len());
    for ((n0, t0), ((n1, t1), (ns, ts))) in r0.iter().zip(r1.iter().zip(&single)) {
        assert_eq!((n0, n1), (ns, ns));
        assert!(t0.equal(t1), "{n0}: the ranks differ");
        let diff = (t0 - ts).abs().max().double_value(&[]);
        assert!(diff <= 1e-5, "{n0}: 2 ranks vs one process on the whole batch differ by {diff}");
        println!("{n0}: ranks bit-identical, max |2 ranks - 1 process| = {diff:e}");
    }
    // Rank 0 alone wrote the log and the checkpoints, one row per step.
    let csv = std::fs::read_to_string(dir.join("dp/loss.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + STEPS as usize, "{csv}");
    assert!(dir.join("dp/step-00000006").is_dir());
    std::fs::remove_dir_all(&dir).unwrap();
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn train_nproc_2_trains_the_decoder() {
    let dir = unclip::core::fsutil::scratch_dir("train-ddp-decoder").unwrap();
    let config = dir.join("run.toml");
    let text = format!(
        r#"
[run]
out = "{out}"
seed = 5
conditioning = "{model}"

[data]
source = "webdataset"
path = "{data}"

[validation]
items = 4
grid = 2
sample_steps = 2

[decoder]
resolution = 32
[decoder.model]
channels = [16, 32]
layers_per_block = 1
attention_head_dim = 16
norm_groups = 8
[decoder.train]
steps = 3
batch_size = 4
lr = 1e-4
checkpoint_every = 2
validate_every = 3
"#,
        out = s(&dir.join("run")),
        model = s(&root().join("models/shapes")),
        data = s(&root().join("fixtures/dataset/webdataset")),
    );
    std::fs::write(&config, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_train"))
        .args(["--config", &s(&config), "--nproc", "2"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("decoder: the 2 ranks hold identical parameters"), "{text}");
    assert!(text.contains("complete: [decoder]"), "{text}");
    let run = dir.join("run/decoder");
    let csv = std::fs::read_to_string(run.join("loss.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "one row per step, from rank 0 alone:\n{csv}");
    assert!(run.join(unclip::core::fsutil::COMPLETE_MARKER).is_file());
    assert!(run.join("model/decoder/config.json").is_file());
    assert!(run.join("validation/step-00000003.png").is_file());

    // Stopped after 2 steps and rerun with the same world size: bit for bit the same weights
    // (every rank resumes from rank 0's checkpoint, its shard and its noise seeds).
    let split = format!("run.out={:?}", s(&dir.join("split")));
    let train2 = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_train"))
            .args(["--config", &s(&config), "--nproc", "2", "--set", &split])
            .args(extra)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        text
    };
    assert!(train2(&["--stop-after", "2"]).contains("stopped"));
    assert!(train2(&[]).contains("decoder: resuming at step 2"));
    let w = |run: &str| std::fs::read(dir.join(run).join("decoder/weights.safetensors")).unwrap();
    assert!(w("run") == w("split"), "the resumed 2-rank run differs from the uninterrupted one");

    // An odd global batch does not split over 2 ranks: a clear error naming the key.
    let out = Command::new(env!("CARGO_BIN_EXE_train"))
        .args(["--config", &s(&config), "--nproc", "2", "--set", "decoder.train.batch_size=3"])
        .args(["--set", &format!("run.out={:?}", s(&dir.join("odd")))])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && text.contains("decoder.train.batch_size = 3"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Stages against one process on the concatenated batch, with global draws: every rank draws the
// noise, timesteps, dropout and crops of the whole global batch from the step's shared seed and
// keeps its own items' rows (`Dist::with_global_draws`), so 2 ranks x B train exactly what one
// process on 2B does, up to the order of float sums.
// ---------------------------------------------------------------------------------------------

const CONFIG: &str = "UNCLIP_DDP_TEST_CONFIG";
/// Tolerance of 2 ranks against one process (the issue's): max |difference| of any weight.
const TOL: f64 = 1e-5;

/// Runs this test executable's test `name` as `nproc` ranks with `envs`; returns rank 0's output
/// after checking that every rank finished.
fn launch(name: &str, nproc: usize, envs: &[(&str, String)]) -> String {
    let mut launch = LocalLaunch::new(nproc, std::env::current_exe().unwrap());
    launch.args = ["--exact", name, "--nocapture", "--test-threads", "1"].map(Into::into).to_vec();
    for (k, v) in envs {
        launch.envs.push(((*k).into(), v.into()));
    }
    launch.capture = true;
    launch.stop_on_failure = false; // a dead peer fails the other at once; keep both outputs
    launch.deadline = Some(Duration::from_secs(300));
    let exits = launch.run().unwrap();
    for e in &exits {
        assert!(
            e.status.success() && e.stdout.contains(&format!("DONE rank {}", e.rank)),
            "{name}: rank {} of {nproc}: {}\n{}",
            e.rank,
            e.stdout,
            e.stderr
        );
    }
    exits[0].stdout.clone()
}

/// A worker: this rank of a run of the config in `UNCLIP_DDP_TEST_CONFIG`, with global draws (a
/// world of 1 is a plain run of one process).
fn stage_worker() {
    let path = PathBuf::from(std::env::var(CONFIG).unwrap());
    let cfg = RunConfig::load(&path, &[]).unwrap();
    let d = Dist::new(ProcessGroup::from_env().unwrap()).with_global_draws(true);
    let rank = d.rank();
    let t = Trainer::open_distributed(cfg, &path, Device::Cpu, d).unwrap();
    let summary = t.run(&RunOptions::default()).unwrap();
    println!("complete: {:?}", summary.complete);
    println!("DONE rank {rank}");
}

fn read_sorted(path: &Path) -> Vec<(String, Tensor)> {
    let mut v =
        Tensor::read_safetensors(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Max |a - b| over same-named tensors (the names must match).
fn max_diff(a: &[(String, Tensor)], b: &[(String, Tensor)], what: &str) -> f64 {
    max_diff_except(a, b, what, |_| false)
}

/// [`max_diff`] leaving out the tensors named by `skip`.
fn max_diff_except(
    a: &[(String, Tensor)],
    b: &[(String, Tensor)],
    what: &str,
    skip: impl Fn(&str) -> bool,
) -> f64 {
    assert_eq!(a.len(), b.len(), "{what}: tensor counts differ");
    let mut worst = (0.0f64, String::new());
    for ((na, ta), (nb, tb)) in a.iter().zip(b) {
        assert_eq!(na, nb, "{what}");
        if skip(na) {
            continue;
        }
        let d = (ta.to_kind(Kind::Double) - tb.to_kind(Kind::Double)).abs().max().double_value(&[]);
        if d > worst.0 || worst.1.is_empty() {
            worst = (d, na.clone());
        }
    }
    println!("{what}: max |difference| {:e} ({})", worst.0, worst.1);
    worst.0
}

/// The last held-out loss of a stage's `validation.csv`.
fn heldout(dir: &Path) -> f64 {
    let text = std::fs::read_to_string(dir.join("validation.csv")).unwrap();
    let last = text.lines().last().unwrap();
    last.split(',').nth(1).unwrap().parse().unwrap()
}

/// Trains `config` (with `{out}` in place of the run folder) as 2 ranks with global draws and as
/// one process, and compares every stage of `stages`: the 2 ranks end with identical parameters
/// (their digest check), and the raw weights (last checkpoint), the shipped EMA weights and the
/// held-out loss (rank 0 alone, plain draws) are those of the one process within [`TOL`].
/// `inert(name)` names weights no output depends on (attention key biases: softmax ignores a
/// shift shared by all keys): their exact gradient is zero, the computed one rounding noise that
/// AdamW's normalization turns into steps of up to `lr`, different in any two computations; they
/// are printed, not compared.
fn two_ranks_match_one_process(
    test: &str,
    config: &str,
    stages: &[&str],
    steps: u64,
    inert: fn(&str) -> bool,
) {
    let dir = unclip::core::fsutil::scratch_dir(test).unwrap();
    let mut out = Vec::new();
    for (name, nproc) in [("two", 2), ("one", 1)] {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, config.replace("{out}", &s(&dir.join(name)))).unwrap();
        out.push(launch(test, nproc, &[(ROLE, "stage".into()), (CONFIG, s(&path))]));
    }
    for stage in stages {
        assert!(
            out[0].contains(&format!("{stage}: the 2 ranks hold identical parameters")),
            "{}",
            out[0]
        );
        let (two, one) = (dir.join("two").join(stage), dir.join("one").join(stage));
        let last = format!("step-{steps:08}/model.safetensors");
        let (a, b) = (read_sorted(&two.join(&last)), read_sorted(&one.join(&last)));
        let raw = max_diff_except(&a, &b, stage, inert);
        assert!(raw <= TOL, "{stage}: 2 ranks vs one process differ by {raw:e} > {TOL:e}");
        max_diff_except(&a, &b, "(inert weights, not compared)", |n| !inert(n));
        let ema = read_sorted(&two.join("weights.safetensors"));
        let diff =
            max_diff_except(&ema, &read_sorted(&one.join("weights.safetensors")), "ema", inert);
        assert!(diff <= TOL, "{stage}: the EMA weights differ by {diff:e} > {TOL:e}");
        // The tolerance means something: training moved the weights far more than it.
        let first = read_sorted(&two.join("step-00000001/model.safetensors"));
        let moved = max_diff(&read_sorted(&two.join(&last)), &first, "steps 1 -> last");
        assert!(moved > 100.0 * TOL, "{stage}: the weights barely moved ({moved:e})");
        let (h2, h1) = (heldout(&two), heldout(&one));
        println!("{stage}: held-out loss 2 ranks {h2} / one process {h1}");
        assert!((h2 - h1).abs() <= 1e-4 * h1.abs().max(1.0), "{stage}: {h2} vs {h1}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn decoder_and_upsampler_on_two_ranks_match_one_process_on_the_whole_batch() {
    if std::env::var(ROLE).is_ok_and(|r| r == "stage") {
        return stage_worker();
    }
    // Text dropout, image dropout, timesteps, noise; the upsampler's random crops and noise.
    let config = format!(
        r#"
[run]
out = "{{out}}"
seed = 5
threads = 1
conditioning = "{model}"

[data]
source = "webdataset"
path = "{data}"

[validation]
items = 4
grid = 0

[decoder]
resolution = 32
text_dropout = 0.5
[decoder.model]
channels = [16, 32]
layers_per_block = 1
attention_head_dim = 16
norm_groups = 8
[decoder.train]
steps = 3
batch_size = 4
lr = 1e-3
ema_decay = 0.9
checkpoint_every = 1
keep_checkpoints = 3

[upsampler]
low_resolution = 16
resolution = 32
crop = 16
blur_sigma = 0.6
[upsampler.model]
channels = [16, 32]
layers_per_block = 1
norm_groups = 8
[upsampler.train]
steps = 3
batch_size = 4
lr = 1e-3
ema_decay = 0.9
checkpoint_every = 1
keep_checkpoints = 3
"#,
        model = s(&root().join("models/shapes")),
        data = s(&root().join("fixtures/dataset/webdataset")),
    );
    two_ranks_match_one_process(
        "decoder_and_upsampler_on_two_ranks_match_one_process_on_the_whole_batch",
        &config,
        &["decoder", "upsampler"],
        3,
        |_| false,
    );
}

#[test]
fn clip_on_two_ranks_matches_one_process_on_the_global_batch() {
    if std::env::var(ROLE).is_ok_and(|r| r == "stage") {
        return stage_worker();
    }
    // Groups of 2 counterpart scenes: each rank's 4 items are 2 whole groups.
    let config = format!(
        r#"
[run]
out = "{{out}}"
seed = 3
threads = 1
conditioning = "{model}"

[data]
source = "shapes"
items = 40

[validation]
items = 8
grid = 0

[clip]
counterparts = 2
[clip.model]
width = 32
layers = 1
heads = 2
image_size = 16
patch_size = 8
[clip.train]
steps = 3
batch_size = 8
lr = 1e-3
ema_decay = 0.9
checkpoint_every = 1
keep_checkpoints = 3
"#,
        model = s(&root().join("models/shapes")),
    );
    two_ranks_match_one_process(
        "clip_on_two_ranks_matches_one_process_on_the_global_batch",
        &config,
        &["clip"],
        3,
        |n| n.ends_with("k_proj.bias"),
    );
}

// ---------------------------------------------------------------------------------------------
// CLIP's global-batch gradient, directly: AdamW hides a gradient's scale, so the stage
// comparison above cannot see a wrong factor; this one compares the averaged gradients.
// ---------------------------------------------------------------------------------------------

const PAIRS: i64 = 6; // per rank
const CONTEXT: i64 = 8;
const VOCAB: i64 = 64;

/// A tiny two-tower CLIP, the same on every process (seeded).
fn tiny_clip() -> unclip::clip::ClipModel {
    let cfg = serde_json::json!({
        "model_type": "clip", "projection_dim": 16, "logit_scale_init_value": 2.6592,
        "text_config": {
            "vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 32, "projection_dim": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": CONTEXT,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "pad_token_id": 0,
            "bos_token_id": 1, "eos_token_id": 3,
        },
        "vision_config": {
            "hidden_size": 16, "intermediate_size": 32, "projection_dim": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_channels": 3,
            "image_size": 8, "patch_size": 4, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        },
    });
    unclip::tch::manual_seed(21);
    let cfg = unclip::clip::AnyConfig::from_value(cfg).unwrap();
    unclip::clip::ClipModel::new(cfg, unclip::clip::Towers::Both, Device::Cpu, Kind::Float).unwrap()
}

/// Rows `from..from + n` of a fixed global batch of caption ids (ending in the end token) and
/// pixels.
fn clip_batch(from: i64, n: i64) -> (Tensor, Tensor) {
    let total = 2 * PAIRS;
    let pos = Tensor::arange(total * CONTEXT, (Kind::Int64, Device::Cpu)).reshape([total, CONTEXT]);
    let ids = (pos.multiply_scalar(7919).remainder(VOCAB - 4) + 4).narrow(1, 0, CONTEXT - 1);
    let eos = Tensor::full([total, 1], 3, (Kind::Int64, Device::Cpu));
    let ids = Tensor::cat(&[ids, eos], 1);
    let pixels = Tensor::arange(total * 3 * 64, (Kind::Float, Device::Cpu))
        .reshape([total, 3, 8, 8])
        .multiply_scalar(0.37)
        .sin();
    (ids.narrow(0, from, n), pixels.narrow(0, from, n))
}

/// The model's gradients by name (sorted).
fn grads(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let grad = |t: &Tensor| {
        let g = t.grad();
        if g.defined() { g.detach().copy() } else { t.zeros_like() }
    };
    let mut v: Vec<(String, Tensor)> =
        vs.variables().into_iter().map(|(n, t)| (n, grad(&t))).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn clip_gradient_of_two_ranks_is_the_global_batch_gradient() {
    clip_gradient_check("clip_gradient_of_two_ranks_is_the_global_batch_gradient", 0);
}

/// The same with 2 negative images per rank after its pairs (`clip.copy_negatives`): the global
/// batch is every rank's pairs, then every rank's negatives.
#[test]
fn clip_gradient_with_negatives_of_two_ranks_is_the_global_batch_gradient() {
    clip_gradient_check(
        "clip_gradient_with_negatives_of_two_ranks_is_the_global_batch_gradient",
        2,
    );
}

/// Rows `from..from + n` of a fixed global set of negative images (no caption).
fn clip_negatives(from: i64, n: i64) -> Tensor {
    let total = from + n;
    Tensor::arange(total * 3 * 64, (Kind::Float, Device::Cpu))
        .reshape([total, 3, 8, 8])
        .multiply_scalar(0.53)
        .cos()
        .narrow(0, from, n)
}

/// Test `test` (which calls this with the same `negatives` per rank): gradients of 2 ranks on
/// the global batch against one process's on all of it.
fn clip_gradient_check(test: &str, negatives: i64) {
    if std::env::var(ROLE).is_ok_and(|r| r == "clipgrad") {
        let out = PathBuf::from(std::env::var(OUT).unwrap());
        let d = Dist::new(ProcessGroup::from_env().unwrap());
        let (rank, world) = (d.rank() as i64, d.world_size() as i64);
        let model = tiny_clip();
        let vs = model.var_store();
        let zero = || {
            for (_, t) in vs.variables() {
                let mut g = t.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
        };
        if world == 1 {
            // One process on the whole global batch: all pairs, then all negatives.
            let (ids, pixels) = clip_batch(0, 2 * PAIRS);
            let pixels = Tensor::cat(&[pixels, clip_negatives(0, 2 * negatives)], 0);
            let (loss, _) = clip_contrastive_step(&model, &ids, &pixels, None).unwrap();
            loss.backward();
            Tensor::write_safetensors(&grads(vs), out.join("one.safetensors")).unwrap();
        } else {
            let (ids, pixels) = clip_batch(rank * PAIRS, PAIRS);
            let pixels = Tensor::cat(&[pixels, clip_negatives(rank * negatives, negatives)], 0);
            let mut dp = d.data_parallel("clip", vs).unwrap();
            // The stage's step: the global batch's loss, then the trainer's bucket average.
            let (loss, _) = clip_contrastive_step(&model, &ids, &pixels, Some(&d)).unwrap();
            loss.backward();
            let mean = (dp.sync)(loss.double_value(&[])).unwrap();
            println!("rank {rank}: loss {} mean {mean}", loss.double_value(&[]));
            Tensor::write_safetensors(&grads(vs), out.join(format!("two{rank}.safetensors")))
                .unwrap();
            // What plain per-rank losses would give: each rank's own pairs only.
            zero();
            let (local, _) = clip_contrastive_step(&model, &ids, &pixels, None).unwrap();
            local.backward();
            (dp.sync)(local.double_value(&[])).unwrap();
            Tensor::write_safetensors(&grads(vs), out.join(format!("local{rank}.safetensors")))
                .unwrap();
        }
        println!("DONE rank {rank}");
        return;
    }
    let dir = unclip::core::fsutil::scratch_dir(test).unwrap();
    let envs = [(ROLE, "clipgrad".to_string()), (OUT, s(&dir))];
    launch(test, 2, &envs);
    launch(test, 1, &envs);
    let one = read_sorted(&dir.join("one.safetensors"));
    let (two0, two1) =
        (read_sorted(&dir.join("two0.safetensors")), read_sorted(&dir.join("two1.safetensors")));
    for ((n, a), (_, b)) in two0.iter().zip(&two1) {
        assert!(a.equal(b), "{n}: the ranks' averaged gradients differ");
    }
    let scale = one.iter().map(|(_, g)| g.abs().max().double_value(&[])).fold(0.0, f64::max);
    println!("largest gradient entry of one process: {scale:e}");
    assert!(scale > 1e-3, "the gradients are too small for the check to mean anything");
    let diff = max_diff(&two0, &one, "2 ranks (global batch) vs one process");
    assert!(diff <= TOL, "the 2-rank gradient differs from one process's by {diff:e} > {TOL:e}");
    let temp = |v: &[(String, Tensor)]| {
        v.iter().find(|(n, _)| n == "logit_scale").unwrap().1.reshape([-1]).double_value(&[0])
    };
    println!("logit_scale gradient: 2 ranks {} / one process {}", temp(&two0), temp(&one));
    // Plain per-rank losses give another gradient: the check can tell them apart.
    let local = max_diff(&read_sorted(&dir.join("local0.safetensors")), &one, "per-rank losses");
    assert!(local > 100.0 * TOL, "per-rank losses matched too ({local:e}): the check is blind");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `train --nproc 2` through the whole embedded shapes recipe at a few steps per stage (its real
/// model sizes): the tokenizer (rank 0 alone), CLIP on groups of 4 counterpart scenes, the prior,
/// the decoder and the upsampler, every trained stage ending with bit-identical ranks (each rank
/// with its own draws, the default). A global batch whose per-rank share is not whole groups is
/// refused with the numbers needed.
#[test]
fn train_nproc_2_runs_every_stage_of_the_shapes_recipe() {
    let dir = unclip::core::fsutil::scratch_dir("train-ddp-recipe").unwrap();
    let config = s(&root().join("configs/shapes/embedded.toml"));
    let train = |out: &str, extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_train"));
        cmd.args(["--config", &config, "--nproc", "2"]);
        cmd.args(["--set", &format!("run.out={:?}", s(&dir.join(out)))]);
        for kv in [
            "run.threads=1",
            "data.items=64",
            "validation.items=4",
            "validation.grid=2",
            "validation.sample_steps=2",
            "tokenizer.captions=64",
            "clip.train.steps=3",
            "clip.train.batch_size=8",
            "prior.stat_items=16",
            "prior.train.steps=3",
            "prior.train.batch_size=4",
            "decoder.train.steps=3",
            "decoder.train.batch_size=2",
            "upsampler.train.steps=3",
            "upsampler.train.batch_size=2",
        ]
        .iter()
        .chain(extra)
        {
            cmd.args(["--set", kv]);
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let (ok, text) = train("run", &[]);
    assert!(ok, "{text}");
    assert!(text.contains("complete: [tokenizer, clip, prior, decoder, upsampler]"), "{text}");
    for stage in ["clip", "prior", "decoder", "upsampler"] {
        let line = format!("{stage}: the 2 ranks hold identical parameters");
        assert!(text.contains(&line), "{stage}: {text}");
        let csv = std::fs::read_to_string(dir.join("run").join(stage).join("loss.csv")).unwrap();
        assert_eq!(csv.lines().count(), 4, "{stage}: one row per step from rank 0:\n{csv}");
    }
    let model = dir.join("run");
    for part in [
        "clip/model/text_encoder/config.json",
        "clip/model/image_encoder/model.safetensors",
        "upsampler/model/super_res_first/config.json",
        "upsampler/validation/step-00000003.png",
    ] {
        assert!(model.join(part).is_file(), "{part} missing");
    }

    // 6 pairs over 2 ranks: 3 each, not whole groups of 4.
    let (ok, text) = train("odd", &["clip.train.batch_size=6"]);
    assert!(
        !ok && text.contains("clip.counterparts = 4") && text.contains("multiple of 2 x 4 = 8"),
        "{text}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
