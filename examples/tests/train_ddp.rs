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
use unclip::train::Dist;

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
