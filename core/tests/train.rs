//! The training machinery against torch / diffusers / transformers reference numbers
//! (fixtures/gen_train.py), and the checkpoint / resume / log / plot behaviour.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tch::{Device, Kind, Tensor, nn, nn::Module, nn::VarStore};
use unclip_core::testing::{assert_close, load_fixture};
use unclip_core::train::*;

const FIXTURE: &str = "train/reference.safetensors";

/// libtorch's generator is global to the process: tests that seed it or draw from it run one at
/// a time, or parallel tests would interleave their draws.
static RNG: Mutex<()> = Mutex::new(());

fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

/// Same names as fixtures/gen_train.py's `Tiny`: proj_in -> LayerNorm -> tanh -> proj_out.
struct Tiny {
    proj_in: nn::Linear,
    norm: nn::LayerNorm,
    proj_out: nn::Linear,
}

impl Tiny {
    fn new(p: nn::Path, din: i64, hidden: i64, dout: i64) -> Self {
        Self {
            proj_in: nn::linear(&p / "proj_in", din, hidden, Default::default()),
            norm: nn::layer_norm(&p / "norm", vec![hidden], Default::default()),
            proj_out: nn::linear(&p / "proj_out", hidden, dout, Default::default()),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.proj_out.forward(&self.norm.forward(&self.proj_in.forward(x)).tanh())
    }
}

fn reference() -> HashMap<String, Tensor> {
    load_fixture(FIXTURE)
}

/// The fixture model with its initial weights.
fn fixture_model(r: &HashMap<String, Tensor>) -> (VarStore, Tiny) {
    let vs = VarStore::new(Device::Cpu);
    let m = Tiny::new(vs.root(), 4, 8, 3);
    let init: HashMap<String, Tensor> = r
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("init.").map(|n| (n.to_string(), v.shallow_clone())))
        .collect();
    unclip_core::weights::load_tensors(&vs, &init, FIXTURE, Default::default()).unwrap();
    (vs, m)
}

fn mse(m: &Tiny, x: &Tensor, y: &Tensor) -> Tensor {
    m.forward(x).mse_loss(y, tch::Reduction::Mean)
}

fn check_params(vs: &VarStore, r: &HashMap<String, Tensor>, prefix: &str) {
    for (name, var) in vs.variables() {
        assert_close(&format!("{prefix}{name}"), &var, &r[&format!("{prefix}{name}")], 1e-6, 0.0);
    }
}

#[test]
fn adamw_with_no_decay_group_and_schedule_matches_torch() {
    let r = reference();
    let (vs, m) = fixture_model(&r);
    let cfg = AdamWConfig { lr: 0.05, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 };
    let mut opt = AdamW::with_no_decay(&vs, cfg, default_no_decay).unwrap();
    for (name, decays) in [
        ("proj_in.weight", true),
        ("proj_in.bias", false),
        ("norm.weight", false),
        ("norm.bias", false),
        ("proj_out.weight", true),
    ] {
        assert_eq!(opt.decays(name), Some(decays), "{name}");
    }
    let sched =
        LrSchedule::WarmupCosine { peak: 0.05, floor: 0.005, warmup_steps: 2, total_steps: 6 };
    sched.validate().unwrap();
    let ref_lr = Vec::<f64>::try_from(&r["a.lr"]).unwrap();
    for (step, want) in ref_lr.iter().enumerate() {
        let lr = sched.lr(step as u64);
        assert!((lr - want).abs() < 1e-12, "lr at step {step}: {lr} vs {want}");
        opt.set_lr(lr).unwrap();
        let out = opt.backward_step(&mse(&m, &r["x"], &r["y"]), None).unwrap();
        assert!(!out.skipped);
        check_params(&vs, &r, &format!("a.step{}.", step + 1));
    }
    assert_eq!(opt.steps(), ref_lr.len() as i64);
}

#[test]
fn clipping_and_ema_match_torch_and_diffusers() {
    let r = reference();
    let (vs, m) = fixture_model(&r);
    let cfg = AdamWConfig { lr: 0.05, weight_decay: 0.01, ..Default::default() };
    let mut opt = AdamW::new(&vs, cfg).unwrap();
    let mut ema = Ema::new(&vs, EmaConfig { decay: 0.9, warmup: true }).unwrap();
    let norms = Vec::<f64>::try_from(&r["b.norm"]).unwrap();
    for (i, want) in norms.iter().enumerate() {
        let out = opt.backward_step(&mse(&m, &r["x"], &r["y"]), Some(0.3)).unwrap();
        assert!(
            (out.grad_norm - want).abs() <= 1e-6 * want,
            "norm {i}: {} vs {want}",
            out.grad_norm
        );
        ema.update(&vs).unwrap();
        let k = i + 1;
        check_params(&vs, &r, &format!("b.step{k}."));
        for (name, _) in vs.variables() {
            let got = ema.get(&name).unwrap();
            assert_close(
                &format!("ema{k}.{name}"),
                got,
                &r[&format!("b.ema{k}.{name}")],
                1e-6,
                0.0,
            );
        }
    }
    // The shipped weights are the EMA's, under the model's names.
    let other = VarStore::new(Device::Cpu);
    let _ = Tiny::new(other.root(), 4, 8, 3);
    ema.copy_to(&other).unwrap();
    for (name, var) in other.variables() {
        assert!(var.equal(ema.get(&name).unwrap()), "{name}");
    }
}

#[test]
fn schedules_match_transformers() {
    let r = reference();
    let cosine =
        LrSchedule::WarmupCosine { peak: 1.0, floor: 0.1, warmup_steps: 3, total_steps: 12 };
    let want = Vec::<f64>::try_from(&r["sched.cosine"]).unwrap();
    // transformers' cosine rises again past the end; ours stays at the floor, so compare up to it.
    for (s, w) in want.iter().enumerate().take(13) {
        assert!((cosine.lr(s as u64) - w).abs() < 1e-12, "cosine step {s}");
    }
    assert_eq!(cosine.lr(14), 0.1);
    let linear =
        LrSchedule::WarmupLinear { peak: 1.0, floor: 0.0, warmup_steps: 2, total_steps: 10 };
    for (s, w) in Vec::<f64>::try_from(&r["sched.linear"]).unwrap().iter().enumerate() {
        assert!((linear.lr(s as u64) - w).abs() < 1e-12, "linear step {s}");
    }
    let c = LrSchedule::Constant { lr: 2.0, warmup_steps: 4 };
    assert_eq!([c.lr(0), c.lr(2), c.lr(4), c.lr(100)], [0.0, 1.0, 2.0, 2.0]);
    // Bad schedules are refused, and the enum round-trips through JSON (recipe configs).
    for bad in [
        LrSchedule::WarmupCosine { peak: 1.0, floor: 2.0, warmup_steps: 0, total_steps: 5 },
        LrSchedule::WarmupLinear { peak: 1.0, floor: 0.0, warmup_steps: 6, total_steps: 5 },
        LrSchedule::constant(f64::NAN),
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
    let json = serde_json::to_string(&cosine).unwrap();
    assert_eq!(serde_json::from_str::<LrSchedule>(&json).unwrap(), cosine);
}

#[test]
fn non_finite_steps_are_skipped_without_touching_weights() {
    let _rng = rng_lock();
    tch::manual_seed(1);
    let vs = VarStore::new(Device::Cpu);
    let m = Tiny::new(vs.root(), 4, 8, 3);
    let mut opt = AdamW::new(&vs, AdamWConfig::default()).unwrap();
    let before: Vec<(String, Tensor)> =
        vs.variables().into_iter().map(|(n, t)| (n, t.detach().copy())).collect();
    let x = Tensor::randn([5, 4], (Kind::Float, Device::Cpu));
    // An infinite input gives NaN gradients through the LayerNorm.
    let bad_x = x.copy();
    let _ = bad_x.get(0).get(0).fill_(f64::INFINITY);
    let y = Tensor::zeros([5, 3], (Kind::Float, Device::Cpu));
    let loss = m.forward(&bad_x).nan_to_num(0.0, None, None).mse_loss(&y, tch::Reduction::Mean);
    let out = opt.backward_step(&loss, Some(1.0)).unwrap();
    assert!(out.skipped && !out.grad_norm.is_finite(), "{out:?}");
    let nan_loss = Tensor::from(f64::NAN);
    assert!(opt.backward_step(&nan_loss, Some(1.0)).unwrap().skipped);
    for (n, t) in &before {
        assert!(vs.variables()[n].equal(t), "{n} changed by a skipped step");
    }
    assert_eq!(opt.steps(), 0);
    // Clipping itself: a finite norm above the limit is scaled down to it.
    let out = opt.backward_step(&(mse(&m, &x, &y) * 1e3), Some(0.5)).unwrap();
    assert!(!out.skipped && out.grad_norm > 0.5);
    let after = opt.clip_grad_norm(1e9).unwrap();
    assert!((after.norm - 0.5).abs() < 1e-3, "gradients after clipping have norm {}", after.norm);
    assert!(opt.clip_grad_norm(0.0).is_err());
    assert!(opt.backward_step(&x, None).is_err(), "a non-scalar loss is refused");
    assert!(opt.set_lr(-1.0).is_err());
    let cfg = AdamWConfig { beta1: 1.0, ..Default::default() };
    assert!(AdamW::new(&vs, cfg).is_err());
}

#[test]
fn optimizer_state_round_trips_and_rejects_other_models() {
    let r = reference();
    let (vs, m) = fixture_model(&r);
    let mut opt = AdamW::new(&vs, AdamWConfig::default()).unwrap();
    for _ in 0..2 {
        opt.backward_step(&mse(&m, &r["x"], &r["y"]), None).unwrap();
    }
    let dir = tmp_dir("optstate");
    let path = dir.join("opt.safetensors");
    opt.save(&path).unwrap();
    let mut fresh = AdamW::new(&vs, AdamWConfig::default()).unwrap();
    fresh.load(&path).unwrap();
    assert_eq!(fresh.steps(), 2);
    for ((na, a), (nb, b)) in
        opt.state_tensors().unwrap().iter().zip(fresh.state_tensors().unwrap())
    {
        assert_eq!(na, &nb);
        assert!(a.equal(&b), "{na}");
    }
    let other = VarStore::new(Device::Cpu);
    let _ = Tiny::new(other.root(), 4, 6, 3);
    let mut wrong = AdamW::new(&other, AdamWConfig::default()).unwrap();
    let err = wrong.load(&path).unwrap_err();
    assert!(err.to_string().contains("shape"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("unclip-core-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A tiny training run with everything a recipe uses: per-step seeding, shuffled batches, input
/// noise (draws from libtorch's generator), warmup + cosine, clipping, EMA, CSV log, checkpoints.
struct Run {
    vs: VarStore,
    model: Tiny,
    opt: AdamW,
    ema: Ema,
    ckpt: Checkpointer,
    log: CsvLogger,
    start: u64,
}

const SEED: u64 = 42;
const TOTAL: u64 = 10;

fn data() -> (Tensor, Tensor) {
    let x = Tensor::arange(64 * 4, (Kind::Float, Device::Cpu)).reshape([64, 4]).sin();
    let y = x.narrow(1, 0, 3).cos() * 2.0;
    (x, y)
}

fn sched() -> LrSchedule {
    LrSchedule::WarmupCosine { peak: 0.02, floor: 0.002, warmup_steps: 3, total_steps: TOTAL }
}

/// Builds everything from scratch (with `init_seed` for the initial weights) and resumes from
/// `dir` if it has a checkpoint.
fn open_run(dir: &std::path::Path, init_seed: i64) -> Run {
    tch::manual_seed(init_seed);
    let vs = VarStore::new(Device::Cpu);
    let model = Tiny::new(vs.root(), 4, 16, 3);
    let cfg = AdamWConfig { weight_decay: 0.05, ..Default::default() };
    let mut opt = AdamW::with_no_decay(&vs, cfg, default_no_decay).unwrap();
    let mut ema = Ema::new(&vs, EmaConfig { decay: 0.95, warmup: true }).unwrap();
    let ckpt = Checkpointer::new(dir, 2).unwrap();
    let start = ckpt.resume(&vs, Some(&mut opt), Some(&mut ema)).unwrap().map_or(0, |m| {
        assert_eq!(m.seed, SEED);
        assert_eq!(m.metadata["recipe"], "tiny");
        m.step
    });
    let log = CsvLogger::resume(&dir.join("loss.csv"), &["noise"], start).unwrap();
    Run { vs, model, opt, ema, ckpt, log, start }
}

fn train(run: &mut Run, until: u64) {
    let (x, y) = data();
    let meta = serde_json::json!({ "recipe": "tiny" });
    for step in run.start..until {
        seed_step(SEED, step);
        let idx: Vec<i64> =
            batch_indices(64, 8, SEED, step).unwrap().into_iter().map(|i| i as i64).collect();
        let idx = Tensor::from_slice(&idx);
        let noise = Tensor::randn([8, 4], (Kind::Float, Device::Cpu)) * 0.1;
        let xb = x.index_select(0, &idx) + &noise;
        let loss = mse(&run.model, &xb, &y.index_select(0, &idx));
        run.opt.set_lr(sched().lr(step)).unwrap();
        let out = run.opt.backward_step(&loss, Some(1.0)).unwrap();
        assert!(!out.skipped);
        run.ema.update(&run.vs).unwrap();
        let row = LogRow {
            step: step + 1,
            loss: out.loss,
            lr: run.opt.lr(),
            grad_norm: out.grad_norm,
            secs: 0.0,
            extra: vec![noise.abs().mean(Kind::Float).double_value(&[])],
        };
        run.log.log(&row).unwrap();
        if Checkpointer::is_due(step + 1, 2, TOTAL) {
            let snap = Snapshot {
                model: &run.vs,
                ema: Some(&run.ema),
                optimizer: Some(&run.opt),
                seed: SEED,
                metadata: &meta,
            };
            run.ckpt.save(step + 1, &snap).unwrap();
        }
    }
}

fn snapshot(run: &Run) -> Vec<(String, Tensor)> {
    let mut all: Vec<(String, Tensor)> =
        run.vs.variables().into_iter().map(|(n, t)| (format!("model.{n}"), t.detach())).collect();
    all.extend(run.ema.tensors(None).unwrap().into_iter().map(|(n, t)| (format!("ema.{n}"), t)));
    all.extend(run.opt.state_tensors().unwrap().into_iter().map(|(n, t)| (format!("opt.{n}"), t)));
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

#[test]
fn interrupted_and_resumed_run_is_bit_identical() {
    let _rng = rng_lock();
    let straight_dir = tmp_dir("straight");
    let mut straight = open_run(&straight_dir, 1);
    assert_eq!(straight.start, 0);
    train(&mut straight, TOTAL);

    let dir = tmp_dir("resumed");
    {
        let mut first = open_run(&dir, 1);
        // Crash after step 7: its checkpoint is at 6, the log already has row 7.
        train(&mut first, 7);
    }
    // A crash in the middle of saving step 8: a torn directory that latest.json never named.
    std::fs::create_dir_all(dir.join("step-00000008")).unwrap();
    std::fs::write(dir.join("step-00000008/model.safetensors"), b"torn").unwrap();
    // Different initial weights: everything must come from the checkpoint.
    let mut resumed = open_run(&dir, 999);
    assert_eq!(resumed.start, 6);
    train(&mut resumed, TOTAL);

    let (a, b) = (snapshot(&straight), snapshot(&resumed));
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "{na} differs after resume (max diff {})", (ta - tb).abs().max());
    }

    // The log has each step once, with the same numbers (the secs column is 0 here).
    let la = read_csv(&straight_dir.join("loss.csv")).unwrap();
    let lb = read_csv(&dir.join("loss.csv")).unwrap();
    assert_eq!(la.column("step").unwrap(), (1..=TOTAL).map(|s| s as f64).collect::<Vec<_>>());
    assert_eq!(la, lb);

    // Only the newest two checkpoints remain; the torn one is gone; the EMA is what ships.
    let mut dirs: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    dirs.sort();
    assert_eq!(dirs, ["step-00000008", "step-00000010"]);
    let best = resumed.ckpt.best_weights().unwrap().unwrap();
    assert!(best.ends_with("step-00000010/ema.safetensors"));
    let shipped = VarStore::new(Device::Cpu);
    let _ = Tiny::new(shipped.root(), 4, 16, 3);
    unclip_core::weights::load_file(&shipped, &best, Default::default()).unwrap();
    for (name, var) in shipped.variables() {
        assert!(var.equal(resumed.ema.get(&name).unwrap()), "{name}");
    }

    // The loss curve of the run, for people (target/tmp/.../loss.png).
    let png = dir.join("loss.png");
    plot_loss_csv(&dir.join("loss.csv"), &png, &PlotOptions::default()).unwrap();
    assert!(image::open(&png).is_ok());
    std::fs::remove_dir_all(&straight_dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn checkpoint_errors_are_reported() {
    let _rng = rng_lock();
    let dir = tmp_dir("ckpt-errors");
    tch::manual_seed(3);
    let vs = VarStore::new(Device::Cpu);
    let _ = Tiny::new(vs.root(), 4, 8, 3);
    let ckpt = Checkpointer::new(&dir, 1).unwrap();
    assert!(Checkpointer::new(&dir, 0).is_err());
    let mut opt = AdamW::new(&vs, AdamWConfig::default()).unwrap();
    let mut ema = Ema::new(&vs, EmaConfig::default()).unwrap();
    assert!(ckpt.resume(&vs, Some(&mut opt), Some(&mut ema)).unwrap().is_none());

    // A checkpoint without EMA or optimizer state cannot resume a run that has them.
    let meta = serde_json::Value::Null;
    let snap = Snapshot { model: &vs, ema: None, optimizer: None, seed: 0, metadata: &meta };
    ckpt.save(3, &snap).unwrap();
    assert!(ckpt.resume(&vs, None, Some(&mut ema)).unwrap_err().to_string().contains("EMA"));
    assert!(ckpt.resume(&vs, Some(&mut opt), None).unwrap_err().to_string().contains("optimizer"));
    assert_eq!(ckpt.resume(&vs, None, None).unwrap().unwrap().step, 3);

    // A different model is refused by name / shape.
    let other = VarStore::new(Device::Cpu);
    let _ = Tiny::new(other.root(), 4, 6, 3);
    assert!(matches!(
        ckpt.resume(&other, None, None),
        Err(unclip_core::Error::ShapeMismatch { .. })
    ));
    // A damaged manifest is an error, not a panic.
    std::fs::write(dir.join("latest.json"), "{\"step\": 3").unwrap();
    assert!(ckpt.resume(&vs, None, None).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn csv_logger_resumes_without_duplicates() {
    let dir = tmp_dir("csv");
    let path = dir.join("loss.csv");
    let row = |s: u64| LogRow {
        step: s,
        loss: 1.0 / s as f64,
        lr: 1e-4,
        grad_norm: 0.5,
        secs: s as f64,
        extra: vec![s as f64 * 2.0],
    };
    let mut log = CsvLogger::create(&path, &["kl"]).unwrap();
    for s in 1..=5 {
        log.log(&row(s)).unwrap();
    }
    assert!(log.log(&LogRow { extra: vec![], ..row(6) }).is_err(), "wrong number of extras");
    drop(log);
    // A crash mid-line leaves a torn row.
    std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"6,0.1").unwrap();
    let mut log = CsvLogger::resume(&path, &["kl"], 3).unwrap();
    log.log(&row(4)).unwrap();
    let back = read_csv(&path).unwrap();
    assert_eq!(back.columns, ["step", "loss", "lr", "grad_norm", "secs", "kl"]);
    assert_eq!(back.column("step").unwrap(), [1.0, 2.0, 3.0, 4.0]);
    assert_eq!(back.rows[3], [4.0, 0.25, 1e-4, 0.5, 4.0, 8.0]);
    assert!(CsvLogger::resume(&path, &["other"], 3).is_err(), "header mismatch");
    assert!(CsvLogger::create(&path, &["a,b"]).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn loss_curve_png() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let path = dir.join("unclip-core-loss-curve.png");
    // A noisy decaying loss over 3 decades, with one NaN that must be skipped.
    let points: Vec<(f64, f64)> = (0..600)
        .map(|i| {
            let s = i as f64;
            let noise = 1.0 + 0.5 * ((s * 12.9898).sin() * 43758.5453).fract().abs();
            (s, if i == 300 { f64::NAN } else { 2.0 * (-s / 90.0).exp() * noise + 1e-3 })
        })
        .collect();
    plot_loss_curve(&points, &path, &PlotOptions::default()).unwrap();
    let img = image::open(&path).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (800, 450));
    // Both series are drawn: pixels of the raw and of the average colour inside the plot area.
    let count = |f: &dyn Fn(i32, i32) -> bool| {
        img.pixels().filter(|p| f(p.0[0] as i32, p.0[2] as i32)).count()
    };
    assert!(count(&|r, b| r < 60 && b > 130) > 500, "moving average missing");
    assert!(count(&|r, b| (100..220).contains(&r) && b - r > 25) > 500, "raw series missing");
    assert!(plot_loss_curve(&points[..1], &path, &PlotOptions::default()).is_err());
    // A short run within one decade (labelled at 1, 2, 5, 10).
    let short: Vec<(f64, f64)> = (1..=12).map(|s| (s as f64, 5.0 / (s as f64).sqrt())).collect();
    let opts = PlotOptions { width: 480, height: 300, ..Default::default() };
    plot_loss_curve(&short, &dir.join("unclip-core-loss-short.png"), &opts).unwrap();
    let ma = moving_average(&[1.0, 3.0, 5.0, 7.0], 2);
    assert_eq!(ma, [1.0, 2.0, 4.0, 6.0]);
}

/// A `Write` the test can read back.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn progress_degrades_to_periodic_lines() {
    let buf = Shared::default();
    let mut p = Progress::lines("prior", 10, 20, Box::new(buf.clone()), Duration::from_secs(3600));
    for s in 11..=20 {
        p.update(s, 0.5, 1e-4);
    }
    p.println("checkpoint saved");
    p.finish();
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // The first update, then nothing for an hour except the last step, then the message.
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].starts_with("prior step 11/20 (55%) loss 5.0000e-1 lr 1.00e-4"),
        "{}",
        lines[0]
    );
    assert!(lines[1].starts_with("prior step 20/20 (100%)"), "{}", lines[1]);
    assert_eq!(lines[2], "checkpoint saved");
}

#[test]
fn ema_of_a_half_model_averages_in_f32() {
    let _rng = rng_lock();
    tch::manual_seed(5);
    let mut vs = VarStore::new(Device::Cpu);
    let _ = Tiny::new(vs.root(), 4, 8, 3);
    vs.set_kind(Kind::Half);
    let mut ema = Ema::new(&vs, EmaConfig { decay: 0.9999, warmup: false }).unwrap();
    let w0 = vs.variables()["proj_in.weight"].to_kind(Kind::Float);
    tch::no_grad(|| {
        for (_, mut v) in vs.variables() {
            let _ = v.g_add_scalar_(1.0);
        }
    });
    ema.update(&vs).unwrap();
    // (1 - 0.9999) * 1.0 is below f16 resolution near 0.5, but the f32 shadow keeps it.
    let moved = ema.get("proj_in.weight").unwrap() - &w0;
    assert_eq!(ema.get("proj_in.weight").unwrap().kind(), Kind::Float);
    assert_close("ema step", &moved, &moved.ones_like().g_mul_scalar(1e-4), 1e-6, 0.0);
    ema.copy_to(&vs).unwrap();
    assert_eq!(vs.variables()["proj_in.weight"].kind(), Kind::Half);
    assert!(Ema::new(&vs, EmaConfig { decay: 1.5, warmup: true }).is_err());
}

fn loop_config() -> LoopConfig {
    LoopConfig {
        total_steps: TOTAL,
        seed: SEED,
        schedule: sched(),
        optimizer: AdamWConfig { weight_decay: 0.05, ..Default::default() },
        ema: Some(EmaConfig { decay: 0.95, warmup: true }),
        max_grad_norm: Some(1.0),
        checkpoint_every: 3,
        keep_last: 2,
    }
}

/// Runs a `TrainLoop` in `dir` up to `until` steps (a fresh process each call).
fn loop_run(
    dir: &std::path::Path,
    init_seed: i64,
    until: u64,
) -> (VarStore, Option<Vec<(String, Tensor)>>) {
    tch::manual_seed(init_seed);
    let vs = VarStore::new(Device::Cpu);
    let model = Tiny::new(vs.root(), 4, 16, 3);
    let meta = serde_json::json!({ "recipe": "tiny" });
    let mut run =
        TrainLoop::open(dir, &vs, loop_config(), default_no_decay, &[], meta, "tiny").unwrap();
    assert_eq!(run.metadata()["recipe"], "tiny");
    run.set_progress(Progress::lines(
        "tiny",
        run.start_step(),
        TOTAL,
        Box::new(std::io::sink()),
        Duration::ZERO,
    ));
    let (x, y) = data();
    for step in run.remaining().take_while(|s| *s < until) {
        run.begin_step(step).unwrap();
        let idx: Vec<i64> =
            batch_indices(64, 8, SEED, step).unwrap().into_iter().map(|i| i as i64).collect();
        let idx = Tensor::from_slice(&idx);
        let xb = x.index_select(0, &idx) + Tensor::randn([8, 4], (Kind::Float, Device::Cpu)) * 0.1;
        let loss = mse(&model, &xb, &y.index_select(0, &idx));
        run.end_step(step, &vs, &loss, &[]).unwrap();
    }
    if until < TOTAL {
        return (vs, None);
    }
    let ema = run.ema().unwrap().tensors(None).unwrap();
    run.finish(&vs, &dir.join("shipped.safetensors"), None).unwrap();
    (vs, Some(ema))
}

#[test]
fn train_loop_resumes_exactly_and_ships_the_ema() {
    let _rng = rng_lock();
    let a = tmp_dir("loop-straight");
    let (vs_a, ema_a) = loop_run(&a, 1, TOTAL);
    let b = tmp_dir("loop-resumed");
    let _ = loop_run(&b, 1, 5); // interrupted after step 5; last checkpoint at 3
    let (vs_b, ema_b) = loop_run(&b, 77, TOTAL);
    for (name, t) in vs_a.variables() {
        assert!(t.equal(&vs_b.variables()[&name]), "{name}");
    }
    for ((n, ta), (_, tb)) in ema_a.unwrap().iter().zip(ema_b.as_ref().unwrap()) {
        assert!(ta.equal(tb), "ema {n}");
    }
    // Each step logged once; the shipped file is the EMA under the model's names.
    let log = read_csv(&b.join("loss.csv")).unwrap();
    assert_eq!(log.column("step").unwrap(), (1..=TOTAL).map(|s| s as f64).collect::<Vec<_>>());
    let secs = log.column("secs").unwrap();
    assert!(secs.windows(2).all(|w| w[1] >= w[0]), "secs go on across the resume: {secs:?}");
    assert!(b.join("loss.png").exists());
    let shipped = unclip_core::weights::read_tensors(&b.join("shipped.safetensors")).unwrap();
    for (n, t) in ema_b.unwrap() {
        assert!(shipped[&n].equal(&t), "shipped {n}");
    }
    // Resuming with another seed would not repeat the run: refused.
    let other = LoopConfig { seed: SEED + 1, ..loop_config() };
    let vs = VarStore::new(Device::Cpu);
    let _ = Tiny::new(vs.root(), 4, 16, 3);
    let err = TrainLoop::open(&b, &vs, other, |_| false, &[], serde_json::Value::Null, "x");
    assert!(err.unwrap_err().to_string().contains("seed"));
    std::fs::remove_dir_all(&a).unwrap();
    std::fs::remove_dir_all(&b).unwrap();
}
