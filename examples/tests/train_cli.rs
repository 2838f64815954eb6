//! The `train` command line end to end: config files in, a resumable run, an exported model
//! folder that `Unclip::from_pretrained` loads and samples from.

use std::path::{Path, PathBuf};
use std::process::Command;
use unclip::tch::{Device, Kind, Tensor};
use unclip::{LoadOptions, TextToImage, Unclip};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `train ARGS` with 2 libtorch threads; returns (success, stdout + stderr).
fn train(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_train")).args(args).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn train_ok(args: &[&str]) -> String {
    let (ok, text) = train(args);
    assert!(ok, "train {args:?} failed:\n{text}");
    text
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// `cp -r from to`: a model folder copy to export into.
fn copy_folder(from: &Path, to: &Path) {
    let status = Command::new("cp").args(["-r", &s(from), &s(to)]).status().unwrap();
    assert!(status.success(), "cp -r {} {}", from.display(), to.display());
}

/// Loads a model folder and samples one image of `prompt` with 2 steps per stage.
fn sample_few_steps(folder: &Path, prompt: &str) -> (Unclip, Tensor) {
    let mut m =
        Unclip::from_pretrained(folder, &LoadOptions::new(Device::Cpu, Kind::Float)).unwrap();
    let req = TextToImage {
        seed: Some(0),
        prior_steps: 2,
        decoder_steps: 2,
        super_res_steps: 2,
        ..m.sampling.text_to_image(prompt)
    };
    let images = m.text_to_image(&req, &mut unclip::no_progress).unwrap().images;
    (m, images)
}

/// A prior and a decoder trained a few steps on the committed webdataset with the shapes model's
/// frozen CLIP: a run stopped after 3 steps and rerun ends bit for bit where an uninterrupted
/// run does (the prior with gradient accumulation: 2 micro-batches of 2 per step); the export swaps both into a copy of the model folder, which loads and samples.
#[test]
fn prior_and_decoder_train_resume_export_and_generate() {
    let dir = unclip::core::fsutil::scratch_dir("train-cli-e2e").unwrap();
    let config = dir.join("run.toml");
    let text = format!(
        r#"
[run]
out = "{out}"
seed = 3
threads = 2
conditioning = "{model}"

[data]
source = "webdataset"
path = "{data}"

[validation]
items = 4
grid = 2
sample_steps = 2

[prior]
stat_items = 16
[prior.model]
layers = 1
[prior.train]
steps = 4
batch_size = 2
accumulate = 2
lr = 1e-4
checkpoint_every = 2
validate_every = 2

[decoder]
resolution = 32
prediction = "v_prediction"
[decoder.model]
channels = [16, 32]
layers_per_block = 1
attention_head_dim = 16
norm_groups = 8
[decoder.train]
steps = 4
batch_size = 2
lr = 1e-4
checkpoint_every = 2
validate_every = 2
"#,
        out = s(&dir.join("whole")),
        model = s(&root().join("models/shapes")),
        data = s(&root().join("fixtures/dataset/webdataset")),
    );
    std::fs::write(&config, text).unwrap();
    let cfg = s(&config);
    let whole = train_ok(&["--config", &cfg]);
    assert!(whole.contains("[run]") && whole.contains("complete: [prior, decoder]"), "{whole}");

    let split_out = format!("run.out={:?}", s(&dir.join("split")));
    let first = train_ok(&["--config", &cfg, "--set", &split_out, "--stop-after", "3"]);
    assert!(first.contains("stopped"), "{first}");
    assert!(!dir.join("split/prior/complete.json").exists());
    let second = train_ok(&["--config", &cfg, "--set", &split_out]);
    assert!(second.contains("prior: resuming at step 2"), "{second}");
    for stage in ["prior", "decoder"] {
        let w = format!("{stage}/weights.safetensors");
        assert_eq!(
            bytes(&dir.join("whole").join(&w)),
            bytes(&dir.join("split").join(&w)),
            "{stage}"
        );
        assert!(dir.join("split").join(stage).join("complete.json").is_file());
    }
    assert!(dir.join("split/decoder/validation/step-00000004.png").is_file());
    // The prior's validation: nearest held-out images to its samples, retrieval numbers.
    assert!(dir.join("split/prior/validation/step-00000004.png").is_file());
    let metrics = std::fs::read_to_string(dir.join("split/prior/validation/metrics.csv")).unwrap();
    assert!(metrics.starts_with("step,mean_cosine,top1_retrieval\n2,"), "{metrics}");
    assert_eq!(metrics.lines().count(), 3, "{metrics}");
    let csv = std::fs::read_to_string(dir.join("split/decoder/validation.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
    let stored = std::fs::read_to_string(dir.join("whole/config.toml")).unwrap();
    assert!(stored.contains("conditioning") && stored.contains("max_nonfinite = 10"), "{stored}");

    // Export: a new folder from the run plus the conditioning model's other components.
    let model = dir.join("model");
    train_ok(&["export", "--config", &cfg, "--to", &s(&model)]);
    let prior_out = model.join("prior/diffusion_pytorch_model.safetensors");
    let shipped = root().join("models/shapes/prior/diffusion_pytorch_model.safetensors");
    assert_ne!(bytes(&prior_out), bytes(&shipped));
    let (_, images) = sample_few_steps(&model, "a red circle on a white background");
    // The shipped folder's upsamplers came along: 32 -> 64 -> 256 px.
    assert_eq!(images.size(), vec![1, 3, 256, 256]);
    assert!(bool::try_from(images.isfinite().all()).unwrap());

    // Exporting again swaps into the previous install; so does an export after one killed
    // between its two renames (the previous folder, set aside, is put back first), and after
    // one killed while building its copy in the run folder.
    assert!(model.join(".unclip-install.json").is_file());
    train_ok(&["export", "--config", &cfg, "--to", &s(&model)]);
    assert!(model.join("model_index.json").is_file());
    let aside = dir.join(".model.old-4999999");
    std::fs::rename(&model, &aside).unwrap();
    let staging = dir.join("whole/.export.tmp-4999999");
    std::fs::create_dir_all(staging.join("prior")).unwrap();
    train_ok(&["export", "--config", &cfg, "--to", &s(&model)]);
    assert!(model.join("model_index.json").is_file() && !aside.exists() && !staging.exists());
    // A file the user added to the install makes it theirs: refused, kept, named; with
    // --overwrite it is replaced.
    std::fs::write(model.join("prior/notes.txt"), b"mine").unwrap();
    let (ok, text) = train(&["export", "--config", &cfg, "--to", &s(&model)]);
    assert!(!ok && text.contains("prior/notes.txt") && text.contains("overwrite"), "{text}");
    assert_eq!(bytes(&model.join("prior/notes.txt")), b"mine");
    train_ok(&["export", "--config", &cfg, "--to", &s(&model), "--overwrite"]);
    assert!(!model.join("prior/notes.txt").exists());

    // Never deletes what it did not write: a folder with the user's files, the run folder, a
    // folder inside it, and one containing it are refused, naming the paths.
    let mine = dir.join("mine");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), b"mine").unwrap();
    std::fs::write(mine.join("model_index.json"), b"{}").unwrap();
    let (ok, text) = train(&["export", "--config", &cfg, "--to", &s(&mine)]);
    assert!(!ok && text.contains("notes.txt") && text.contains(&s(&mine)), "{text}");
    assert_eq!(bytes(&mine.join("notes.txt")), b"mine");
    assert_eq!(bytes(&mine.join("model_index.json")), b"{}");
    let run = dir.join("whole");
    let before = bytes(&run.join("prior/weights.safetensors"));
    for bad in [run.clone(), run.join("prior"), run.join("sub"), dir.clone()] {
        for flags in [&[][..], &["--overwrite"][..]] {
            let to = s(&bad);
            let args = [&["export", "--config", &cfg, "--to", &to][..], flags].concat();
            let (ok, text) = train(&args);
            assert!(!ok && text.contains(&s(&bad)) && text.contains(&s(&run)), "{text}");
        }
    }
    assert_eq!(bytes(&run.join("prior/weights.safetensors")), before);
    assert!(run.join("decoder/complete.json").is_file() && !run.join("sub").exists());
    assert!(mine.join("notes.txt").is_file() && model.join("model_index.json").is_file());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A decoder fine-tuned from a diffusers-layout folder (the tiny fixtures) starts from exactly
/// the folder's weights, and trains.
#[test]
fn a_decoder_fine_tune_starts_from_the_folder_weights() {
    let dir = unclip::core::fsutil::scratch_dir("train-cli-finetune").unwrap();
    let folder = root().join("fixtures/data/pipeline/variation");
    let config = dir.join("run.toml");
    let text = format!(
        r#"
[run]
out = "{out}"
conditioning = "{folder}"
[data]
source = "shapes"
items = 12
[validation]
items = 2
grid = 2
sample_steps = 2
[decoder]
init = "{folder}/decoder"
resolution = 16
[decoder.train]
steps = 2
batch_size = 2
lr = 1e-4
"#,
        out = s(&dir.join("run")),
        folder = s(&folder),
    );
    std::fs::write(&config, text).unwrap();
    let cfg = unclip::train::RunConfig::load(&config, &[]).unwrap();
    let trainer = unclip::train::Trainer::open(cfg, &config).unwrap();
    let start = trainer.initial_decoder_weights().unwrap();
    let mut expected = unclip::core::weights::read_tensors(
        &folder.join("decoder/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    for (k, t) in unclip::core::weights::read_tensors(
        &folder.join("text_proj/diffusion_pytorch_model.safetensors"),
    )
    .unwrap()
    {
        expected.insert(format!("text_proj.{k}"), t);
    }
    assert_eq!(start.len(), expected.len());
    for (name, t) in &start {
        let key = name.strip_prefix("decoder.").unwrap_or(name);
        let want: &Tensor = expected.get(key).unwrap_or_else(|| panic!("{name} not in the folder"));
        assert!(
            t.to_kind(Kind::Float).equal(&want.to_kind(Kind::Float)),
            "{name} differs from the folder's"
        );
    }
    let out = train_ok(&["--config", &s(&config)]);
    assert!(out.contains("decoder: started from") && out.contains("complete: [decoder]"), "{out}");
    let trained = unclip::core::weights::read_tensors(
        &dir.join("run/decoder/model/decoder/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    assert_eq!(
        trained.len(),
        expected.len() - start.iter().filter(|(n, _)| n.starts_with("text_proj.")).count()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Config errors come out of the command line named, with a failing exit status.
#[test]
fn config_errors_fail_the_command_with_the_key() {
    let (ok, text) = train(&[
        "--config",
        &s(&root().join("configs/shapes/base.toml")),
        "--set",
        "decoder.train.stepz=3",
    ]);
    assert!(
        !ok && text.contains("base.toml: key `decoder.train") && text.contains("stepz"),
        "{text}"
    );
    let (ok, text) = train(&[
        "--config",
        &s(&root().join("configs/shapes/base.toml")),
        "--set",
        "clip.train.lr=fast",
    ]);
    assert!(!ok && text.contains("key `clip.train.lr`") && text.contains("f64"), "{text}");
}

/// Overrides that shrink a shapes config to a few steps of every stage (same model sizes).
fn quick(out: &Path) -> Vec<String> {
    let mut v = vec![format!("run.out={:?}", s(out))];
    for kv in [
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
    ] {
        v.push(kv.to_string());
    }
    v
}

fn with_sets<'a>(base: &[&'a str], sets: &'a [String]) -> Vec<&'a str> {
    let mut args = base.to_vec();
    for kv in sets {
        args.push("--set");
        args.push(kv);
    }
    args
}

/// The committed shapes recipe runs end to end at a few steps per stage: every stage, the
/// export loads and samples; more steps extend a finished stage; a stage killed between its
/// files is redone; and the decoder fine-tune config starts from exactly the shipped decoder.
#[test]
fn the_shapes_configs_run_every_stage() {
    let dir = unclip::core::fsutil::scratch_dir("train-cli-shapes").unwrap();
    let run = dir.join("run");
    let config = s(&root().join("configs/shapes/embedded.toml"));
    let sets = quick(&run);
    let out = train_ok(&with_sets(&["--config", &config], &sets));
    assert!(out.contains("complete: [tokenizer, clip, prior, decoder, upsampler]"), "{out}");
    assert!(run.join("upsampler/validation/step-00000003.png").is_file());
    assert!(run.join("clip/validation/step-00000003.png").is_file());
    let metrics = std::fs::read_to_string(run.join("clip/validation/metrics.csv")).unwrap();
    assert!(metrics.starts_with("step,text_to_image_top1,image_to_text_top1\n3,"), "{metrics}");

    let model = dir.join("model");
    train_ok(&["export", "--config", &config, "--set", &sets[0], "--to", &s(&model)]);
    let mut m =
        Unclip::from_pretrained(&model, &LoadOptions::new(Device::Cpu, Kind::Float)).unwrap();
    assert_eq!(m.sampling.decoder_guidance_scale, 3.0);
    let req = TextToImage {
        seed: Some(0),
        prior_steps: 2,
        decoder_steps: 2,
        super_res_steps: 2,
        ..m.sampling.text_to_image("a small red circle in the top left on a white background")
    };
    let images = m.text_to_image(&req, &mut unclip::no_progress).unwrap().images;
    assert_eq!(images.size(), vec![1, 3, 64, 64]);

    // More prior steps: the finished prior resumes from its last checkpoint (its weights kept
    // aside); the other stages stay complete.
    let mut more = sets.clone();
    more.push("prior.train.steps=5".into());
    let out = train_ok(&with_sets(&["--config", &config], &more));
    assert!(
        out.contains("prior: extending from 3 steps")
            && out.contains("prior: resuming at step 3 of 5"),
        "{out}"
    );
    assert!(
        run.join("prior/weights-3.safetensors").is_file()
            && run.join("prior/complete.json").is_file()
    );
    // Anything but step counts is refused, naming the key.
    let mut other = more.clone();
    other.push("decoder.train.lr=0.001".into());
    let (ok, text) = train(&with_sets(&["--config", &config], &other));
    assert!(
        !ok && text.contains("key `decoder.train.lr`") && text.contains("config.toml"),
        "{text}"
    );

    // A tokenizer stage killed after vocab.json, before tokenizer_config.json (and a temporary
    // file of a killed write) is redone on the next run.
    let tok = run.join("tokenizer/model/tokenizer");
    std::fs::remove_file(run.join("tokenizer/complete.json")).unwrap();
    std::fs::remove_file(tok.join("tokenizer_config.json")).unwrap();
    std::fs::write(tok.join(".merges.txt.tmp-4999999"), b"half").unwrap();
    let out = train_ok(&with_sets(&["--config", &config, "--stage", "tokenizer"], &more));
    assert!(out.contains("tokenizer: trained on"), "{out}");
    assert!(
        tok.join("tokenizer_config.json").is_file()
            && run.join("tokenizer/complete.json").is_file()
    );
    assert!(!tok.join(".merges.txt.tmp-4999999").exists());

    // The decoder fine-tune config: step 0 is the shipped decoder exactly; two steps; the
    // decoder swapped into a copy of the shipped folder, which loads.
    let shipped = root().join("models/shapes");
    let ft = root().join("configs/shapes/decoder-finetune.toml");
    let ft_sets = vec![
        format!("run.out={:?}", s(&dir.join("finetune"))),
        format!("run.conditioning={:?}", s(&shipped)),
        format!("decoder.init={:?}", s(&shipped)),
        "data.items=32".into(),
        "validation.items=2".into(),
        "validation.grid=2".into(),
        "validation.sample_steps=2".into(),
        "decoder.train.steps=2".into(),
        "decoder.train.batch_size=2".into(),
    ];
    let cfg = unclip::train::RunConfig::load(&ft, &ft_sets).unwrap();
    let start = unclip::train::Trainer::open(cfg, &ft).unwrap().initial_decoder_weights().unwrap();
    let folder = unclip::core::weights::read_tensors(
        &shipped.join("decoder/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    for (name, t) in start.iter().filter(|(n, _)| n.starts_with("decoder.")) {
        let want = &folder[name.strip_prefix("decoder.").unwrap()];
        assert!(t.equal(&want.to_kind(Kind::Float)), "{name}");
    }
    train_ok(&with_sets(&["--config", &s(&ft)], &ft_sets));
    let copy = dir.join("shapes-copy");
    copy_folder(&shipped, &copy);
    train_ok(&with_sets(&["export", "--config", &s(&ft), "--to", &s(&copy)], &ft_sets));
    // The config's decoder guidance is written; the folder's other settings (its prior
    // guidance, 2 where Karlo's is 4) are kept.
    assert_eq!(
        unclip::SamplingDefaults::read(&copy).unwrap(),
        unclip::SamplingDefaults::read(&shipped).unwrap()
    );
    let before = bytes(&shipped.join("prior/diffusion_pytorch_model.safetensors"));
    assert_eq!(
        bytes(&copy.join("prior/diffusion_pytorch_model.safetensors")),
        before,
        "untrained stages kept"
    );
    let decoder = bytes(&copy.join("decoder/diffusion_pytorch_model.safetensors"));
    assert_ne!(decoder, bytes(&shipped.join("decoder/diffusion_pytorch_model.safetensors")));
    Unclip::from_pretrained(&copy, &LoadOptions::new(Device::Cpu, Kind::Float)).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The prior trains on precomputed embedding shards (no images decoded), conditioned on the
/// captions through a model folder's CLIP text tower.
#[test]
fn the_prior_trains_on_embedding_shards() {
    let dir = unclip::core::fsutil::scratch_dir("train-cli-embeddings").unwrap();
    let shards = dir.join("embeddings");
    std::fs::create_dir_all(&shards).unwrap();
    let n = 24;
    let keys: Vec<String> = (0..n).map(|i| format!("{i:09}")).collect();
    let generator = unclip::shapes::SceneGenerator::new(unclip::shapes::Split::Train, 0);
    let captions: Vec<String> =
        (0..n).map(|i| unclip::shapes::caption(&generator.scene(i as u64))).collect();
    unclip::tch::manual_seed(0);
    let image = Tensor::randn([n as i64, 128], (Kind::Float, Device::Cpu));
    let text = Tensor::randn([n as i64, 128], (Kind::Float, Device::Cpu));
    unclip::data::write_embedding_shard(
        &shards.join("00000.safetensors"),
        &keys,
        &captions,
        &image,
        &text,
        &[],
    )
    .unwrap();
    let config = dir.join("run.toml");
    let text = format!(
        "[run]\nout = {:?}\nconditioning = {:?}\n[data]\nsource = \"embeddings\"\npath = {:?}\n\
         [validation]\nitems = 4\n[prior]\nstat_items = 8\n[prior.model]\nlayers = 1\n\
         [prior.train]\nsteps = 2\nbatch_size = 4\nlr = 1e-4\n",
        s(&dir.join("run")),
        s(&root().join("models/shapes")),
        s(&shards),
    );
    std::fs::write(&config, text).unwrap();
    let out = train_ok(&["--config", &s(&config)]);
    assert!(out.contains("complete: [prior]") && out.contains("held-out loss"), "{out}");
    assert!(dir.join("run/prior/model/prior/diffusion_pytorch_model.safetensors").is_file());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The 64 -> 256 px upsampler config trains a few steps and its export, swapped into a copy of
/// the shipped folder, makes that folder's pipeline write 256 px images.
#[test]
fn the_256_px_upsampler_config_trains_and_extends_the_cascade() {
    let dir = unclip::core::fsutil::scratch_dir("train-cli-256").unwrap();
    let config = s(&root().join("configs/shapes/upsampler-256.toml"));
    let sets = [
        format!("run.out={:?}", s(&dir.join("run"))),
        "data.items=16".into(),
        "validation.items=2".into(),
        "validation.grid=1".into(),
        "validation.sample_steps=2".into(),
        "upsampler2.train.steps=2".into(),
        "upsampler2.train.batch_size=1".into(),
    ];
    let out = train_ok(&with_sets(&["--config", &config], &sets));
    assert!(out.contains("complete: [upsampler2]"), "{out}");
    let copy = dir.join("shapes-copy");
    copy_folder(&root().join("models/shapes"), &copy);
    train_ok(&with_sets(&["export", "--config", &config, "--to", &s(&copy)], &sets));
    let (m, images) = sample_few_steps(&copy, "a red circle on a blue background");
    assert!(m.upsampler_2.is_some());
    assert_eq!(images.size(), vec![1, 3, 256, 256]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A decoder fine-tuned at 64 px, exported with `export.drop_first_upsampler` into a copy of the
/// shipped folder, gives Karlo's cascade: the 64 -> 256 px upsampler as `super_res_first` and
/// `super_res_last`, no `super_res_2`, 256 px images. A folder with no second upsampler to
/// promote is refused, naming it.
#[test]
fn a_64_px_decoder_exports_into_karlos_cascade() {
    let dir = unclip::core::fsutil::scratch_dir("train-cli-decoder-64").unwrap();
    let shipped = root().join("models/shapes");
    let config = s(&root().join("configs/shapes/decoder-finetune.toml"));
    let sets = [
        format!("run.out={:?}", s(&dir.join("run"))),
        format!("run.conditioning={:?}", s(&shipped)),
        format!("decoder.init={:?}", s(&shipped)),
        "decoder.resolution=64".into(),
        "data.items=16".into(),
        "validation.items=2".into(),
        "validation.grid=1".into(),
        "validation.sample_steps=2".into(),
        "decoder.train.steps=2".into(),
        "decoder.train.batch_size=1".into(),
        "export.drop_first_upsampler=true".into(),
    ];
    train_ok(&with_sets(&["--config", &config], &sets));
    let copy = dir.join("shapes-copy");
    copy_folder(&shipped, &copy);
    // Without the option the 64 px decoder does not fit the folder's 32 px cascade.
    let keep = [sets.to_vec(), vec!["export.drop_first_upsampler=false".into()]].concat();
    let (ok, text) = train(&with_sets(&["export", "--config", &config, "--to", &s(&copy)], &keep));
    assert!(!ok && text.contains("64 px") && text.contains("drop_first_upsampler"), "{text}");
    train_ok(&with_sets(&["export", "--config", &config, "--to", &s(&copy)], &sets));
    let up = bytes(&shipped.join("super_res_2/diffusion_pytorch_model.safetensors"));
    for c in ["super_res_first", "super_res_last"] {
        assert_eq!(bytes(&copy.join(c).join("diffusion_pytorch_model.safetensors")), up, "{c}");
    }
    assert!(!copy.join("super_res_2").exists() && !copy.join("super_res_2_scheduler").exists());
    let index = String::from_utf8(bytes(&copy.join("model_index.json"))).unwrap();
    assert!(!index.contains("super_res_2") && index.contains("super_res_last"), "{index}");
    let (m, images) = sample_few_steps(&copy, "a red circle on a blue background");
    assert!(m.upsampler.is_some() && m.upsampler_2.is_none());
    assert_eq!(images.size(), vec![1, 3, 256, 256]);

    // The copy has no super_res_2 left to promote.
    let (ok, text) = train(&with_sets(&["export", "--config", &config, "--to", &s(&copy)], &sets));
    assert!(!ok && text.contains("drop_first_upsampler") && text.contains("super_res_2"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `clip.freeze_image` (on configs/shapes/clip-relation.toml): two steps train the text tower only;
/// the export writes the folder's image tower back bit for bit (the prior's targets and the
/// decoder's conditioning keep their meaning) and a changed text tower, and the folder loads.
#[test]
fn a_text_only_clip_fine_tune_keeps_the_image_tower() {
    let frozen = ["clip.freeze_image=true"];
    let sampling = one_tower_fine_tune("clip-text", &frozen, "image tower frozen", "text_encoder");
    assert_eq!(sampling, unclip::SamplingDefaults::read(&root().join("models/shapes")).unwrap());
}

/// `clip.freeze_text` with copy negatives (`clip.copy_negatives`): two steps train the image
/// tower only, against batches with a copy scene per pair; the text tower the prior and the
/// decoder read comes back bit for bit. `export.decoder_candidates` sets the folder's decoder
/// best-of-N and keeps its other sampling settings.
#[test]
fn an_image_only_clip_fine_tune_with_copy_negatives_keeps_the_text_tower() {
    let sets = ["clip.freeze_text=true", "clip.copy_negatives=1", "export.decoder_candidates=4"];
    let sampling = one_tower_fine_tune("clip-image", &sets, "text tower frozen", "image_encoder");
    let shipped = unclip::SamplingDefaults::read(&root().join("models/shapes")).unwrap();
    assert_eq!(sampling, unclip::SamplingDefaults { decoder_candidates: 4, ..shipped });
}

/// Two steps of configs/shapes/clip-relation.toml from the shipped folder with `extra` set,
/// exported into a copy: only the `trained` tower's file changes, and the folder loads. Returns
/// the copy's sampling settings.
fn one_tower_fine_tune(
    name: &str,
    extra: &[&str],
    says: &str,
    trained: &str,
) -> unclip::SamplingDefaults {
    let dir = unclip::core::fsutil::scratch_dir(&format!("train-cli-{name}")).unwrap();
    let shipped = root().join("models/shapes");
    let config = s(&root().join("configs/shapes/clip-relation.toml"));
    let mut sets = vec![
        format!("run.out={:?}", s(&dir.join("run"))),
        format!("run.conditioning={:?}", s(&shipped)),
        format!("clip.init={:?}", s(&shipped)),
        "data.items=64".into(),
        "validation.items=4".into(),
        "clip.train.steps=2".into(),
        "clip.train.batch_size=8".into(),
        "clip.train.validate_every=2".into(),
    ];
    sets.extend(extra.iter().map(|x| x.to_string()));
    let out = train_ok(&with_sets(&["--config", &config], &sets));
    assert!(out.contains(says), "{out}");
    let copy = dir.join("shapes-copy");
    copy_folder(&shipped, &copy);
    train_ok(&with_sets(&["export", "--config", &config, "--to", &s(&copy)], &sets));
    let file = |m: &Path, c: &str| bytes(&m.join(c).join("model.safetensors"));
    for tower in ["text_encoder", "image_encoder"] {
        let same = file(&copy, tower) == file(&shipped, tower);
        assert_eq!(same, tower != trained, "{tower} after a fine-tune of {trained}");
    }
    Unclip::from_pretrained(&copy, &LoadOptions::new(Device::Cpu, Kind::Float)).unwrap();
    let sampling = unclip::SamplingDefaults::read(&copy).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    sampling
}
