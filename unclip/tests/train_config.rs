//! Run configs of `unclip::train` are checked before any work: every error names the file, the
//! key and what was expected.

use std::path::{Path, PathBuf};
use unclip::train::{RunConfig, Trainer};

const MINIMAL: &str = r#"
[run]
out = "runs/x"
conditioning = "models/shapes"

[data]
source = "webdataset"
path = "data/shards"

[decoder]
resolution = 32
[decoder.model]
channels = [16, 32]
[decoder.train]
steps = 10
batch_size = 2
lr = 1e-4
"#;

fn file() -> PathBuf {
    PathBuf::from("run.toml")
}

fn error(text: &str, sets: &[&str]) -> String {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    RunConfig::parse(text, &file(), &sets).unwrap_err().to_string()
}

#[test]
fn a_minimal_config_parses_with_defaults() {
    let cfg = RunConfig::parse(MINIMAL, &file(), &[]).unwrap();
    let t = &cfg.decoder.as_ref().unwrap().train;
    assert_eq!((t.steps, t.batch_size, t.ema_decay, t.warmup_steps()), (10, 2, 0.999, 1));
    assert_eq!(cfg.stages(), vec!["decoder"]);
    // The effective config round-trips.
    let again = RunConfig::parse(&cfg.to_toml(), &file(), &[]).unwrap();
    assert_eq!(again, cfg);
}

#[test]
fn an_unknown_key_is_named() {
    let e = error(&MINIMAL.replace("lr = 1e-4", "lr = 1e-4\nlearning_rate = 3"), &[]);
    assert!(e.starts_with("run.toml: key `decoder.train"), "{e}");
    assert!(e.contains("unknown field `learning_rate`") && e.contains("expected one of"), "{e}");
    let e = error(MINIMAL, &["decoder.trian.steps=3"]);
    assert!(e.contains("`decoder") && e.contains("unknown field `trian`"), "{e}");
}

#[test]
fn a_wrong_type_is_named() {
    let e = error(&MINIMAL.replace("steps = 10", "steps = \"many\""), &[]);
    assert!(e.contains("run.toml: key `decoder.train.steps`"), "{e}");
    assert!(e.contains("invalid type: string \"many\"") && e.contains("u64"), "{e}");
    let e = error(MINIMAL, &["decoder.train.batch_size=-3"]);
    assert!(e.contains("key `decoder.train.batch_size`"), "{e}");
}

#[test]
fn impossible_values_are_named() {
    for (set, key) in [
        ("decoder.train.lr=-1", "decoder.train.lr"),
        ("decoder.train.steps=0", "decoder.train.steps"),
        ("decoder.train.ema_decay=1.5", "decoder.train.ema_decay"),
        ("decoder.resolution=2", "decoder.resolution"),
        ("decoder.text_dropout=nan", "decoder.text_dropout"),
        ("decoder.edge_weight=-1", "decoder.edge_weight"),
        ("run.threads=0", "run.threads"),
        ("run.device=abacus", "run.device"),
        ("decoder.train.accumulate=0", "decoder.train.accumulate"),
        ("run.precision=f16", "run.precision"),
    ] {
        let e = error(MINIMAL, &[set]);
        assert!(e.contains(&format!("run.toml: key `{key}`: ")), "{set}: {e}");
    }
}

/// `data.kind_weights` sets the shapes generator's prompt-kind mix; it needs the shapes source,
/// and four weights not all zero.
#[test]
fn kind_weights_are_checked() {
    let shapes = MINIMAL.replace(
        "source = \"webdataset\"\npath = \"data/shards\"",
        "source = \"shapes\"\nitems = 100",
    );
    let cfg =
        RunConfig::parse(&shapes, &file(), &["data.kind_weights=[20, 25, 40, 15]".into()]).unwrap();
    assert_eq!(cfg.data.kind_weights, Some([20, 25, 40, 15]));
    for set in ["data.kind_weights=[0, 0, 0, 0]", "data.kind_weights=[1, 2, 3, 4000]"] {
        let e = error(&shapes, &[set]);
        assert!(e.contains("key `data.kind_weights`: "), "{set}: {e}");
    }
    let e = error(MINIMAL, &["data.kind_weights=[1, 1, 1, 1]"]);
    assert!(e.contains("key `data.kind_weights`: ") && e.contains("shapes"), "{e}");
    let e = error(&shapes, &["data.kind_weights=[1, 1, 1]"]);
    assert!(e.contains("data.kind_weights"), "{e}");
}

/// `upsampler.blur_sigma_max` turns the fixed blur into a per-image range; the range must be
/// ordered, start above zero and stay within the kernel the trainer builds.
#[test]
fn a_blur_range_is_checked() {
    let with = format!(
        "{MINIMAL}\n[upsampler]\nlow_resolution = 32\nresolution = 64\ncrop = 32\nblur_sigma = 0.6\n\
         [upsampler.model]\nchannels = [32, 64]\n[upsampler.train]\nsteps = 1\nbatch_size = 1\nlr = 1e-4\n"
    );
    let cfg = RunConfig::parse(&with, &file(), &["upsampler.blur_sigma_max=1.4".into()]).unwrap();
    assert_eq!(cfg.upsampler.as_ref().unwrap().blur_sigma_max, Some(1.4));
    for set in ["upsampler.blur_sigma_max=0.5", "upsampler.blur_sigma_max=9"] {
        let e = error(&with, &[set]);
        assert!(e.contains("key `upsampler.blur_sigma_max`: "), "{set}: {e}");
    }
    let e = error(&with, &["upsampler.blur_sigma=0", "upsampler.blur_sigma_max=1"]);
    assert!(e.contains("key `upsampler.blur_sigma_max`: "), "{e}");
}

/// `run.precision`: f32 by default; bf16 on the CPU; f16 only on CUDA, refused elsewhere with
/// the key and what to use instead; other values named with the accepted ones.
#[test]
fn precision_is_checked() {
    let cfg = RunConfig::parse(MINIMAL, &file(), &[]).unwrap();
    assert_eq!(cfg.run.precision, unclip::train::Precision::F32);
    let cfg = RunConfig::parse(MINIMAL, &file(), &["run.precision=bf16".into()]).unwrap();
    assert_eq!(cfg.run.precision, unclip::train::Precision::Bf16);
    let e = error(MINIMAL, &["run.precision=f16"]);
    assert!(e.contains("key `run.precision`") && e.contains("needs run.device = \"cuda\""), "{e}");
    let e = error(MINIMAL, &["run.precision=fp8"]);
    assert!(e.contains("key `run.precision`") && e.contains("`f32`, `bf16`, `f16`"), "{e}");
}

#[test]
fn missing_data_is_named() {
    let e = error(&MINIMAL.replace("path = \"data/shards\"", ""), &[]);
    assert!(e.contains("key `data.path`") && e.contains("required"), "{e}");
    let e = error(&MINIMAL.replace("[data]", "[daat]"), &[]);
    assert!(e.contains("unknown field `daat`") || e.contains("missing field `data`"), "{e}");
    // A path that does not exist is refused before any work, naming the key and the path.
    let dir = unclip::core::fsutil::scratch_dir("train-config-missing").unwrap();
    let out = dir.join("run");
    let sets = [
        format!("run.out={:?}", out.display().to_string()),
        format!("data.path={:?}", dir.join("nowhere").display().to_string()),
        format!("run.conditioning={:?}", models_shapes().display().to_string()),
    ];
    let cfg = RunConfig::parse(MINIMAL, &file(), &sets).unwrap();
    let e = Trainer::open(cfg, &file()).unwrap_err().to_string();
    assert!(
        e.contains("run.toml: key `data.path`")
            && e.contains("nowhere")
            && e.contains("does not exist"),
        "{e}"
    );
    assert!(!out.exists(), "nothing written before the checks pass");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_missing_file_and_bad_syntax_are_named() {
    let e = RunConfig::load(Path::new("no/such/run.toml"), &[]).unwrap_err().to_string();
    assert!(e.contains("no/such/run.toml") && e.contains("no such config file"), "{e}");
    let e = error("[run\nout = 1", &[]);
    assert!(e.starts_with("run.toml: ") && e.contains("line 1"), "{e}");
    let e = error(MINIMAL, &["nonsense"]);
    assert!(e.contains("expected key=value"), "{e}");
}

#[test]
fn overrides_apply_before_validation() {
    let cfg = RunConfig::parse(
        MINIMAL,
        &file(),
        &["decoder.train.steps=7".into(), "run.out=elsewhere".into()],
    )
    .unwrap();
    assert_eq!(cfg.decoder.unwrap().train.steps, 7);
    assert_eq!(cfg.run.out, PathBuf::from("elsewhere"));
}

#[test]
fn a_rerun_may_only_grow_steps() {
    let old = RunConfig::parse(MINIMAL, &file(), &[]).unwrap();
    let grown = RunConfig::parse(
        MINIMAL,
        &file(),
        &["decoder.train.steps=20".into(), "run.threads=4".into()],
    )
    .unwrap();
    assert_eq!(grown.compare_with_stored(&old, &file()).unwrap(), vec![("decoder", 10)]);
    let shrunk = RunConfig::parse(MINIMAL, &file(), &["decoder.train.steps=5".into()]).unwrap();
    let e = shrunk.compare_with_stored(&old, &file()).unwrap_err().to_string();
    assert!(e.contains("decoder.train.steps") && e.contains("only grow"), "{e}");
    let other = RunConfig::parse(MINIMAL, &file(), &["decoder.train.lr=0.01".into()]).unwrap();
    let e = other.compare_with_stored(&old, &file()).unwrap_err().to_string();
    assert!(e.contains("key `decoder.train.lr`"), "{e}");
}

/// Every committed shapes config is valid.
#[test]
fn the_shapes_configs_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/shapes");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            RunConfig::load(&p, &[]).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 3, "{n} configs in {}", dir.display());
}

fn models_shapes() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/shapes")
}

/// `clip.freeze_image` keeps a loaded image tower as it is, so it needs `clip.init`.
#[test]
fn a_frozen_image_tower_needs_a_folder_to_keep() {
    let clip = |extra: &str| {
        format!(
            "[run]\nout = \"runs/x\"\nconditioning = \"models/shapes\"\n[data]\nsource = \"shapes\"\nitems = 100\n\
             [clip]\n{extra}\n\
             [clip.model]\nwidth = 16\nlayers = 1\nheads = 2\nimage_size = 16\npatch_size = 8\n\
             [clip.train]\nsteps = 1\nbatch_size = 2\nlr = 1e-4\n"
        )
    };
    RunConfig::parse(&clip(""), &file(), &[]).unwrap();
    let e = error(&clip("freeze_image = true"), &[]);
    assert!(e.contains("key `clip.freeze_image`: ") && e.contains("clip.init"), "{e}");
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/shapes/clip-relation.toml");
    assert!(!RunConfig::load(&p, &[]).unwrap().clip.unwrap().freeze_image);
    let frozen = RunConfig::load(&p, &["clip.freeze_image=true".into()]).unwrap();
    assert!(frozen.clip.unwrap().freeze_image);
    // The same for the text tower; and one tower must train.
    let e = error(&clip("freeze_text = true"), &[]);
    assert!(e.contains("key `clip.freeze_text`: ") && e.contains("clip.init"), "{e}");
    let both = ["clip.freeze_image=true".into(), "clip.freeze_text=true".into()];
    let e = RunConfig::load(&p, &both).unwrap_err().to_string();
    assert!(e.contains("key `clip.freeze_text`: ") && e.contains("freeze_image"), "{e}");
}

/// `clip.copy_negatives` adds rendered copy scenes: shapes only, a few per scene;
/// `clip.anchor_image` needs a loaded image tower that trains.
#[test]
fn copy_negatives_and_the_image_anchor_are_checked() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/shapes/clip-relation.toml");
    let anchored = RunConfig::load(&p, &["clip.anchor_image=0.5".into()]).unwrap();
    assert_eq!(anchored.clip.unwrap().anchor_image, 0.5);
    let e = RunConfig::load(&p, &["clip.anchor_image=-1".into()]).unwrap_err().to_string();
    assert!(e.contains("key `clip.anchor_image`: ") && e.contains(">= 0"), "{e}");
    let frozen = ["clip.anchor_image=1".into(), "clip.freeze_image=true".into()];
    let e = RunConfig::load(&p, &frozen).unwrap_err().to_string();
    assert!(e.contains("key `clip.anchor_image`: ") && e.contains("trains"), "{e}");
    let ok = RunConfig::load(&p, &["clip.copy_negatives=1".into()]).unwrap();
    assert_eq!(ok.clip.unwrap().copy_negatives, 1);
    let e = RunConfig::load(&p, &["clip.copy_negatives=9".into()]).unwrap_err().to_string();
    assert!(e.contains("key `clip.copy_negatives`: ") && e.contains("at most 8"), "{e}");
    let folder = "[run]\nout = \"runs/x\"\nconditioning = \"models/shapes\"\n[data]\nsource = \"image_folder\"\npath = \"x\"\n\
                  [clip]\ncopy_negatives = 1\n[clip.model]\nwidth = 16\nlayers = 1\nheads = 2\n\
                  image_size = 16\npatch_size = 8\n[clip.train]\nsteps = 1\nbatch_size = 2\nlr = 1e-4\n";
    let e = error(folder, &[]);
    assert!(e.contains("key `clip.copy_negatives`: ") && e.contains("shapes"), "{e}");
}
