//! Bad-input corpus (issue 20): damaged copies of the shipped `models/shapes/` folder, damaged
//! files and bad arguments, each through the public API. Every case must end in an `Err` whose
//! message names the file, key, tensor or argument at fault (or in the defined behaviour it
//! states), and none may panic or hang: each runs on its own thread behind `catch_unwind`, with
//! a time limit. The folders are generated here: a case copies only the component it damages and
//! links the others to `models/shapes/`.
//!
//! Classes: 1 absurd sizes, 2 dtypes, 3 non-finite weights, 4 special files, 5 huge requests,
//! 6 vague errors, 0 the ones handled before (truncated/random checkpoints, missing tensors, bad
//! JSON, bad images, bad values).

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};
use unclip::{LoadOptions, TextToImage, Unclip};

fn shapes() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/shapes")
}

/// A copy of `models/shapes` at `dir`: the `damaged` components copied (to be edited), the others
/// linked.
fn model_copy(dir: &Path, damaged: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    for entry in std::fs::read_dir(shapes()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().to_string();
        let (src, dst) = (entry.path(), dir.join(&name));
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(&src, &dst).unwrap();
        } else if damaged.contains(&name.as_str()) {
            std::fs::create_dir_all(&dst).unwrap();
            for f in std::fs::read_dir(&src).unwrap() {
                let f = f.unwrap();
                std::fs::copy(f.path(), dst.join(f.file_name())).unwrap();
            }
        } else {
            std::os::unix::fs::symlink(src.canonicalize().unwrap(), &dst).unwrap();
        }
    }
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

/// Rewrites a safetensors file through `edit` on its (name, tensor) list.
fn edit_tensors(path: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let mut ts = Tensor::read_safetensors(path).unwrap();
    ts.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut ts);
    Tensor::write_safetensors(&ts, path).unwrap();
}

/// Applies `f` to the first tensor whose name contains `pat`.
fn edit_one(path: &Path, pat: &str, f: impl FnOnce(&Tensor) -> Tensor) {
    edit_tensors(path, |ts| {
        let i = ts.iter().position(|(n, _)| n.contains(pat)).unwrap();
        ts[i].1 = f(&ts[i].1);
    });
}

fn fifo(path: &Path) {
    let _ = std::fs::remove_file(path);
    let ok = std::process::Command::new("mkfifo").arg(path).status().unwrap().success();
    assert!(ok, "mkfifo {}", path.display());
}

fn load(dir: &Path) -> Result<Unclip, String> {
    Unclip::from_pretrained(dir, &LoadOptions::default()).map_err(|e| e.to_string())
}

/// A two-step request (fast): the errors come before or after the loops, not from their length.
fn quick(prompt: &str) -> TextToImage {
    TextToImage {
        prior_steps: 2,
        decoder_steps: 2,
        super_res_steps: 2,
        seed: Some(0),
        ..TextToImage::new(prompt)
    }
}

fn generate(dir: &Path, req: TextToImage) -> Result<(), String> {
    let mut m = load(dir)?;
    m.text_to_image(&req, &mut unclip::no_progress).map(drop).map_err(|e| e.to_string())
}

type Setup = Box<dyn FnOnce(&Path) + Send>;
type Act = Box<dyn FnOnce(&Path) -> Result<(), String> + Send>;

struct Case {
    class: u8,
    name: String,
    setup: Setup,
    act: Act,
    /// `None`: must succeed (a defined behaviour); `Some(parts)`: must fail, the message holding
    /// every part.
    expect: Option<Vec<String>>,
}

fn case(
    class: u8,
    name: impl Into<String>,
    setup: impl FnOnce(&Path) + Send + 'static,
    act: impl FnOnce(&Path) -> Result<(), String> + Send + 'static,
    expect: &[&str],
) -> Case {
    Case {
        class,
        name: name.into(),
        setup: Box::new(setup),
        act: Box::new(act),
        expect: Some(expect.iter().map(|s| s.to_string()).collect()),
    }
}

/// A damaged component folder, loaded: the error must name `must` (and the component folder).
fn load_case(
    class: u8,
    name: &str,
    comp: &'static str,
    damage: impl FnOnce(&Path) + Send + 'static,
    must: &[&str],
) -> Case {
    let mut expect: Vec<&str> = must.to_vec();
    expect.push(comp);
    case(
        class,
        name,
        move |d| {
            model_copy(d, &[comp]);
            damage(&d.join(comp));
        },
        |d| load(d).map(drop),
        &expect,
    )
}

fn config_case(
    class: u8,
    comp: &'static str,
    key: &'static str,
    value: Value,
    must: &[&str],
) -> Case {
    let name = format!("{comp}/config.json {key} = {value}");
    let file = if comp.ends_with("scheduler") { "scheduler_config.json" } else { "config.json" };
    load_case(class, &name, comp, move |c| edit_json(&c.join(file), |v| v[key] = value), must)
}

const DECODER_W: &str = "diffusion_pytorch_model.safetensors";
const CLIP_W: &str = "model.safetensors";

fn cases() -> Vec<Case> {
    let big = json!(1_000_000_000_000i64);
    let mut v = vec![
        // 1. Absurd sizes: refused by key, or sized against the checkpoint before allocating.
        config_case(1, "text_encoder", "hidden_size", big.clone(), &["hidden_size", "config.json"]),
        config_case(1, "text_encoder", "vocab_size", big.clone(), &["vocab_size"]),
        config_case(
            1,
            "text_encoder",
            "vocab_size",
            json!(1 << 24),
            &["token_embedding", "[16777216, 128]"],
        ),
        config_case(
            1,
            "text_encoder",
            "intermediate_size",
            json!(16_000_000),
            &["fc1", "model.safetensors"],
        ),
        config_case(
            1,
            "text_encoder",
            "num_hidden_layers",
            json!(1 << 24),
            &["more than 100000 variables"],
        ),
        config_case(
            1,
            "text_encoder",
            "max_position_embeddings",
            json!(10_000_000),
            &["position_embedding"],
        ),
        config_case(1, "prior", "num_layers", json!(1 << 24), &["more than 100000 variables"]),
        config_case(1, "prior", "num_embeddings", json!(1 << 23), &["causal mask", "would need"]),
        config_case(1, "prior", "attention_head_dim", big.clone(), &["attention_head_dim"]),
        config_case(
            1,
            "prior",
            "embedding_dim",
            json!(1 << 24),
            &["[1, 16777216]", "diffusion_pytorch_model"],
        ),
        config_case(
            1,
            "decoder",
            "block_out_channels",
            json!([1_000_000_000, 64, 128]),
            &["block_out_channels[0]"],
        ),
        config_case(
            1,
            "decoder",
            "block_out_channels",
            json!([1 << 20, 1 << 20, 1 << 20]),
            &["conv_in.bias", "[1048576]", DECODER_W],
        ),
        config_case(1, "decoder", "in_channels", json!(i64::MAX), &["in_channels"]),
        config_case(
            1,
            "decoder",
            "layers_per_block",
            json!(1 << 24),
            &["more than 100000 variables"],
        ),
        config_case(1, "super_res_first", "sample_size", big.clone(), &["sample_size"]),
        config_case(
            1,
            "super_res_first",
            "block_out_channels",
            json!([1 << 24, 64, 64]),
            &["conv_in.bias", "[16777216]"],
        ),
        config_case(
            1,
            "text_proj",
            "clip_embeddings_dim",
            json!(1 << 24),
            &["text_proj", DECODER_W],
        ),
        config_case(
            1,
            "decoder_scheduler",
            "num_train_timesteps",
            big.clone(),
            &["num_train_timesteps"],
        ),
        config_case(
            1,
            "prior_scheduler",
            "num_train_timesteps",
            json!(1 << 21),
            &["num_train_timesteps", "1048576"],
        ),
        case(
            1,
            "super_res_first sample_size 2^23: loads, generation refused with the memory it needs",
            |d| {
                model_copy(d, &["super_res_first"]);
                edit_json(&d.join("super_res_first/config.json"), |v| {
                    v["sample_size"] = json!(1 << 23)
                });
            },
            |d| generate(d, quick("a red circle")),
            &["would need", "upsampler sample_size 8388608x8388608"],
        ),
        // 2. Tensors of the wrong dtype class; half and bfloat16 accepted.
        load_case(
            2,
            "int64 decoder weight",
            "decoder",
            |c| edit_one(&c.join(DECODER_W), "conv_in.weight", |t| t.to_kind(Kind::Int64)),
            &["conv_in.weight", "Int64", "expected a floating-point"],
        ),
        load_case(
            2,
            "bool prior weight",
            "prior",
            |c| edit_one(&c.join(DECODER_W), "proj_in.weight", |t| t.to_kind(Kind::Bool)),
            &["proj_in.weight", "Bool"],
        ),
        load_case(
            2,
            "int32 text encoder weight",
            "text_encoder",
            |c| edit_one(&c.join(CLIP_W), "token_embedding", |t| t.to_kind(Kind::Int)),
            &["token_embedding.weight", "Int"],
        ),
        load_case(
            2,
            "uint8 upsampler weight",
            "super_res_last",
            |c| edit_one(&c.join(DECODER_W), "conv_out.weight", |t| t.to_kind(Kind::Uint8)),
            &["conv_out.weight", "Uint8"],
        ),
        // 3. Non-finite weights (and epsilons that make them) refused at load.
        load_case(
            3,
            "NaN decoder weight",
            "decoder",
            |c| edit_one(&c.join(DECODER_W), "conv_out.weight", |t| t.copy().fill_(f64::NAN)),
            &["conv_out.weight", "NaN", DECODER_W],
        ),
        load_case(
            3,
            "inf prior weight",
            "prior",
            |c| {
                edit_one(&c.join(DECODER_W), "positional_embedding", |t| {
                    t.copy().fill_(f64::INFINITY)
                })
            },
            &["positional_embedding", "infinite"],
        ),
        load_case(
            3,
            "-inf text encoder weight",
            "text_encoder",
            |c| {
                edit_one(&c.join(CLIP_W), "final_layer_norm.weight", |t| {
                    t.copy().fill_(f64::NEG_INFINITY)
                })
            },
            &["final_layer_norm.weight", "infinite"],
        ),
        load_case(
            3,
            "one NaN in an upsampler weight",
            "super_res_first",
            |c| {
                edit_one(&c.join(DECODER_W), "conv_in.bias", |t| {
                    let t = t.copy();
                    let _ = t.narrow(0, 3, 1).fill_(f64::NAN);
                    t
                })
            },
            &["conv_in.bias", "1 NaN"],
        ),
        config_case(3, "decoder", "norm_eps", json!(-1e-5), &["norm_eps"]),
        config_case(3, "text_encoder", "layer_norm_eps", json!(-1.0), &["layer_norm_eps"]),
        // 4. Special files: named for what they are, never opened (a FIFO would block forever).
        load_case(
            4,
            "text_encoder/config.json is a FIFO",
            "text_encoder",
            |c| fifo(&c.join("config.json")),
            &["config.json", "FIFO"],
        ),
        load_case(
            4,
            "decoder weights are a FIFO",
            "decoder",
            |c| fifo(&c.join(DECODER_W)),
            &[DECODER_W, "FIFO"],
        ),
        load_case(
            4,
            "vocab.json is a FIFO",
            "tokenizer",
            |c| fifo(&c.join("vocab.json")),
            &["vocab.json", "FIFO"],
        ),
        load_case(
            4,
            "merges.txt is a FIFO",
            "tokenizer",
            |c| fifo(&c.join("merges.txt")),
            &["merges.txt", "FIFO"],
        ),
        load_case(
            4,
            "tokenizer_config.json is a FIFO",
            "tokenizer",
            |c| fifo(&c.join("tokenizer_config.json")),
            &["tokenizer_config.json", "FIFO"],
        ),
        load_case(
            4,
            "scheduler config is a FIFO",
            "decoder_scheduler",
            |c| fifo(&c.join("scheduler_config.json")),
            &["scheduler_config.json", "FIFO"],
        ),
        load_case(
            4,
            "preprocessor config is a FIFO",
            "feature_extractor",
            |c| fifo(&c.join("preprocessor_config.json")),
            &["preprocessor_config.json", "FIFO"],
        ),
        load_case(
            4,
            "prior/config.json is a folder",
            "prior",
            |c| {
                std::fs::remove_file(c.join("config.json")).unwrap();
                std::fs::create_dir(c.join("config.json")).unwrap();
            },
            &["config.json", "a folder"],
        ),
        load_case(
            4,
            "text_proj/config.json is a symlink loop",
            "text_proj",
            |c| {
                std::fs::remove_file(c.join("config.json")).unwrap();
                std::os::unix::fs::symlink("config.json", c.join("config.json")).unwrap();
            },
            &["config.json", "symlink loop"],
        ),
        case(
            4,
            "model_index.json is a FIFO",
            |d| {
                model_copy(d, &[]);
                fifo(&d.join("model_index.json"));
            },
            |d| load(d).map(drop),
            &["model_index.json", "FIFO"],
        ),
        case(
            4,
            "model path is a file",
            |d| {
                std::fs::create_dir_all(d).unwrap();
                std::fs::write(d.join("model"), b"x").unwrap();
            },
            |d| load(&d.join("model")).map(drop),
            &["model", "found a regular file"],
        ),
        case(
            4,
            "model path is a symlink loop",
            |d| {
                std::fs::create_dir_all(d).unwrap();
                std::os::unix::fs::symlink("model", d.join("model")).unwrap();
            },
            |d| load(&d.join("model")).map(drop),
            &["model", "symlink loop"],
        ),
        case(
            4,
            "model path is a dangling symlink",
            |d| {
                std::fs::create_dir_all(d).unwrap();
                std::os::unix::fs::symlink("absent", d.join("model")).unwrap();
            },
            |d| load(&d.join("model")).map(drop),
            &["model", "dangling"],
        ),
        case(
            4,
            "model path does not exist",
            |_| {},
            |d| load(&d.join("absent")).map(drop),
            &["absent", "nothing"],
        ),
        case(
            4,
            "input image is a FIFO",
            |d| {
                std::fs::create_dir_all(d).unwrap();
                fifo(&d.join("in.png"));
            },
            |d| unclip::output::open_image(&d.join("in.png")).map(drop).map_err(|e| e.to_string()),
            &["in.png", "FIFO"],
        ),
        case(
            4,
            "input image is a folder",
            |d| std::fs::create_dir_all(d.join("in.png")).unwrap(),
            |d| unclip::output::open_image(&d.join("in.png")).map(drop).map_err(|e| e.to_string()),
            &["in.png", "a folder"],
        ),
        // 6. Precise errors: the file, line and key to fix.
        load_case(
            6,
            "vocab.json is binary",
            "tokenizer",
            |c| std::fs::write(c.join("vocab.json"), [0x89u8, 0x50, 0xff, 0x00, 0xfe]).unwrap(),
            &["vocab.json", "binary"],
        ),
        load_case(
            6,
            "vocab.json is a list",
            "tokenizer",
            |c| std::fs::write(c.join("vocab.json"), "[1, 2]").unwrap(),
            &["vocab.json", "JSON object"],
        ),
        load_case(
            6,
            "vocab.json id is a string",
            "tokenizer",
            |c| edit_json(&c.join("vocab.json"), |v| v["a</w>"] = json!("seven")),
            &["vocab.json", "a</w>", "integer"],
        ),
        load_case(
            6,
            "merges.txt is binary",
            "tokenizer",
            |c| std::fs::write(c.join("merges.txt"), [0xffu8, 0xfe, 0xfd]).unwrap(),
            &["merges.txt", "binary"],
        ),
        load_case(
            6,
            "merges.txt line with three tokens",
            "tokenizer",
            |c| {
                let t = std::fs::read_to_string(c.join("merges.txt")).unwrap();
                std::fs::write(c.join("merges.txt"), format!("{t}a b c\n")).unwrap();
            },
            &["merges.txt line", "two tokens"],
        ),
        load_case(
            6,
            "merges.txt token not in vocab.json",
            "tokenizer",
            |c| {
                let t = std::fs::read_to_string(c.join("merges.txt")).unwrap();
                std::fs::write(c.join("merges.txt"), format!("{t}zq xw\n")).unwrap();
            },
            &["merges.txt line", "\"zq\"", "vocab.json"],
        ),
        load_case(
            6,
            "special token absent from the vocabulary",
            "tokenizer",
            |c| edit_json(&c.join("tokenizer_config.json"), |v| v["bos_token"] = json!("<|nope|>")),
            &["vocab_size 619", "<|nope|>", "special_tokens_map.json"],
        ),
        load_case(
            6,
            "tokenizer longer than the text encoder's positions",
            "tokenizer",
            |c| edit_json(&c.join("tokenizer_config.json"), |v| v["model_max_length"] = json!(77)),
            &["model_max_length 77", "max_position_embeddings", "24"],
        ),
        config_case(6, "decoder", "sample_size", json!(0), &["sample_size", "0x0"]),
        config_case(6, "super_res_last", "sample_size", json!([0, 64]), &["sample_size"]),
        // 0. Handled before: broken checkpoints, bad JSON, bad images, bad values.
        load_case(
            0,
            "truncated decoder weights",
            "decoder",
            |c| {
                let p = c.join(DECODER_W);
                let b = std::fs::read(&p).unwrap();
                std::fs::write(&p, &b[..b.len() / 2]).unwrap();
            },
            &[DECODER_W, "safetensors"],
        ),
        load_case(
            0,
            "random bytes as prior weights",
            "prior",
            |c| {
                std::fs::write(
                    c.join(DECODER_W),
                    (0..4096u32)
                        .map(|i| (i.wrapping_mul(2654435761u32) >> 13) as u8)
                        .collect::<Vec<u8>>(),
                )
                .unwrap()
            },
            &[DECODER_W],
        ),
        load_case(
            0,
            "empty text encoder weights",
            "text_encoder",
            |c| std::fs::write(c.join(CLIP_W), b"").unwrap(),
            &[CLIP_W],
        ),
        load_case(
            0,
            "missing tensor",
            "text_proj",
            |c| {
                edit_tensors(&c.join(DECODER_W), |ts| {
                    ts.retain(|(n, _)| n != "embedding_proj.weight");
                })
            },
            &["embedding_proj.weight", "missing"],
        ),
        load_case(
            0,
            "unexpected tensor",
            "super_res_first",
            |c| {
                edit_tensors(&c.join(DECODER_W), |ts| {
                    ts.push((
                        "stray.weight".into(),
                        Tensor::zeros([2], (Kind::Float, tch::Device::Cpu)),
                    ))
                })
            },
            &["stray.weight", "unexpected"],
        ),
        load_case(
            0,
            "misshapen tensor",
            "decoder",
            |c| edit_one(&c.join(DECODER_W), "conv_in.weight", |t| t.narrow(1, 0, 1).contiguous()),
            &["conv_in.weight", "shape"],
        ),
        load_case(
            0,
            "truncated config JSON",
            "decoder",
            |c| {
                let p = c.join("config.json");
                let t = std::fs::read_to_string(&p).unwrap();
                std::fs::write(&p, &t[..t.len() / 2]).unwrap();
            },
            &["config.json"],
        ),
        config_case(
            0,
            "decoder",
            "block_out_channels",
            json!("wide"),
            &["config.json", "block_out_channels"],
        ),
        config_case(0, "prior", "num_layers", json!(-2), &["num_layers"]),
        case(
            0,
            "model_index.json names another pipeline",
            |d| {
                model_copy(d, &[]);
                edit_json(&d.join("model_index.json"), |v| {
                    v["_class_name"] = json!("StableDiffusionPipeline")
                });
            },
            |d| load(d).map(drop),
            &["model_index.json", "StableDiffusionPipeline"],
        ),
        case(
            0,
            "missing component folder",
            |d| {
                model_copy(d, &[]);
                std::fs::remove_file(d.join("prior")).unwrap();
            },
            |d| load(d).map(drop),
            &["missing folder prior/"],
        ),
        case(
            0,
            "image that is text",
            |d| {
                std::fs::create_dir_all(d).unwrap();
                std::fs::write(d.join("x.png"), "not an image").unwrap();
            },
            |d| unclip::output::open_image(&d.join("x.png")).map(drop).map_err(|e| e.to_string()),
            &["x.png"],
        ),
        case(
            0,
            "truncated PNG",
            |d| {
                std::fs::create_dir_all(d).unwrap();
                let img = image::RgbImage::new(16, 16);
                img.save(d.join("t.png")).unwrap();
                let b = std::fs::read(d.join("t.png")).unwrap();
                std::fs::write(d.join("t.png"), &b[..b.len() / 2]).unwrap();
            },
            |d| unclip::output::open_image(&d.join("t.png")).map(drop).map_err(|e| e.to_string()),
            &["t.png"],
        ),
        case(
            0,
            "unknown component in load options",
            |d| model_copy(d, &[]),
            |d| {
                Unclip::from_pretrained(
                    d,
                    &LoadOptions::default().component("vae", tch::Device::Cpu, Kind::Float),
                )
                .map(drop)
                .map_err(|e| e.to_string())
            },
            &["vae"],
        ),
    ];
    // Accepted: half and bfloat16 checkpoints load (defined behaviour, not an error).
    for (comp, kind) in
        [("decoder", Kind::Half), ("prior", Kind::BFloat16), ("text_encoder", Kind::Half)]
    {
        let file = if comp == "text_encoder" { CLIP_W } else { DECODER_W };
        v.push(Case {
            class: 2,
            name: format!("{comp} stored as {kind:?} loads"),
            setup: Box::new(move |d| {
                model_copy(d, &[comp]);
                edit_tensors(&d.join(comp).join(file), |ts| {
                    for (_, t) in ts.iter_mut() {
                        *t = t.to_kind(kind);
                    }
                });
            }),
            act: Box::new(|d| load(d).map(drop)),
            expect: None,
        });
    }
    v
}

type ReqAct = Box<dyn FnOnce(&mut Unclip) -> Result<(), String> + Send>;

/// Requests to one loaded model (loaded once: these check arguments, not files).
fn request_cases() -> Vec<(u8, &'static str, ReqAct, &'static [&'static str])> {
    fn t2i(req: TextToImage) -> ReqAct {
        Box::new(move |m| {
            m.text_to_image(&req, &mut unclip::no_progress).map(drop).map_err(|e| e.to_string())
        })
    }
    vec![
        // 5. Huge requests: refused with the memory they would need; chunks instead.
        (
            5,
            "10^8 images at once",
            t2i(TextToImage { num_images_per_prompt: 100_000_000, ..quick("a red circle") }),
            &["generating 100000000 images", "would need", "GiB", "--batch-size"],
        ),
        (
            5,
            "images x prompts overflows",
            t2i(TextToImage {
                num_images_per_prompt: usize::MAX,
                prompts: vec!["a".into(), "b".into()],
                ..quick("a")
            }),
            &["num_images_per_prompt", "too many images"],
        ),
        (
            5,
            "batch_size 0",
            Box::new(|m| {
                let req = quick("a red circle");
                m.text_to_image_chunked(&req, 0, &mut unclip::no_progress, &mut |_, _| Ok(()))
                    .map(drop)
                    .map_err(|e| e.to_string())
            }),
            &["batch_size"],
        ),
        (0, "empty prompt", t2i(quick(" ")), &["prompt 0 is empty"]),
        (
            0,
            "zero decoder steps",
            t2i(TextToImage { decoder_steps: 0, ..quick("a red circle") }),
            &["decoder_steps"],
        ),
        (
            0,
            "NaN guidance",
            t2i(TextToImage { prior_guidance_scale: f64::NAN, ..quick("a red circle") }),
            &["prior_guidance_scale"],
        ),
        (
            0,
            "one prior step",
            t2i(TextToImage { prior_steps: 1, ..quick("a red circle") }),
            &["steps 1", "at least 2"],
        ),
    ]
}

enum Outcome {
    Done(Result<(), String>),
    Panicked(String),
    Hung,
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// Why a case's outcome is wrong, if it is.
fn judge(outcome: Outcome, expect: Option<&[String]>) -> Option<String> {
    match (outcome, expect) {
        (Outcome::Hung, _) => Some("did not finish within 60 s".to_string()),
        (Outcome::Panicked(m), _) => Some(format!("panicked: {m}")),
        (Outcome::Done(Ok(())), Some(_)) => Some("succeeded, expected an error".into()),
        (Outcome::Done(Err(e)), None) => Some(format!("failed: {e}")),
        (Outcome::Done(Ok(())), None) => None,
        (Outcome::Done(Err(e)), Some(parts)) => {
            let missing: Vec<&String> = parts.iter().filter(|p| !e.contains(p.as_str())).collect();
            (!missing.is_empty()).then(|| format!("error lacks {missing:?}: {e}"))
        }
    }
}

fn run(c: Case, root: &Path) -> Outcome {
    let dir = root.join(format!("case-{}", c.name.replace(['/', ' ', '"', '^'], "_")));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            (c.setup)(&dir);
            (c.act)(&dir)
        }));
        let _ = tx.send(r);
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(r)) => Outcome::Done(r),
        Ok(Err(p)) => Outcome::Panicked(panic_message(p)),
        Err(_) => Outcome::Hung,
    }
}

#[test]
fn bad_input_corpus_errs_precisely_without_panics_or_hangs() {
    let root = unclip_core::fsutil::scratch_dir("robustness").unwrap();
    let cases = cases();
    let mut per_class = [0usize; 7];
    let mut failures = Vec::new();
    let start = Instant::now();
    let mut report = |class: u8, name: &str, secs: f64, problem: Option<String>| {
        per_class[class as usize] += 1;
        println!("[class {class}] {name} ({secs:.2} s): {}", problem.as_deref().unwrap_or("ok"));
        if let Some(p) = problem {
            failures.push(format!("[class {class}] {name}: {p}"));
        }
    };
    for c in cases {
        let (class, name, expect) = (c.class, c.name.clone(), c.expect.clone());
        let t = Instant::now();
        let problem = judge(run(c, &root), expect.as_deref());
        report(class, &name, t.elapsed().as_secs_f64(), problem);
    }
    // The request cases share one model, on one thread, each behind catch_unwind.
    let reqs = request_cases();
    let meta: Vec<(u8, &str, Vec<String>)> = reqs
        .iter()
        .map(|(c, n, _, e)| (*c, *n, e.iter().map(|s| s.to_string()).collect()))
        .collect();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut model = load(&shapes()).expect("the shipped model loads");
        for (_, _, act, _) in reqs {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| act(&mut model)));
            let _ = tx.send(r.map_err(panic_message));
        }
    });
    for (class, name, expect) in meta {
        let t = Instant::now();
        let outcome = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(r)) => Outcome::Done(r),
            Ok(Err(m)) => Outcome::Panicked(m),
            Err(_) => Outcome::Hung,
        };
        report(class, name, t.elapsed().as_secs_f64(), judge(outcome, Some(&expect)));
    }
    let n = per_class.iter().sum::<usize>();
    println!("{n} cases in {:.1} s, per class {per_class:?}", start.elapsed().as_secs_f64());
    assert!(n >= 60, "the corpus has {n} cases");
    assert!(per_class[1..].iter().all(|&k| k >= 3), "every class covered: {per_class:?}");
    assert!(
        failures.is_empty(),
        "{} of {n} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// The sizing that guards every load is exact on Karlo's real configs: the names and shapes
/// measured without allocating equal diffusers' list of the Karlo checkpoints' tensors.
#[test]
fn karlo_configs_are_sized_exactly_without_allocating() {
    use unclip_decoder::checkpoint::{Component, layout, read_config};
    fn check<M: Component>(name: &str) {
        let dir = unclip_core::testing::fixture_path(&format!("decoder/karlo/{name}"));
        let cfg = read_config::<M>(&dir).unwrap();
        let l = layout::<M>(&cfg).unwrap();
        let mut ours: Vec<String> = l.tensors.iter().map(|(n, s)| format!("{n}\t{s:?}")).collect();
        ours.sort();
        let text = std::fs::read_to_string(dir.join("tensors.txt")).unwrap();
        let mut theirs: Vec<String> =
            text.lines().filter(|l| !l.is_empty()).map(String::from).collect();
        theirs.sort();
        assert_eq!(ours, theirs, "{name}");
        let elements: u128 = l.tensors.iter().map(|(_, s)| s.iter().product::<i64>() as u128).sum();
        assert_eq!(l.elements, elements);
        println!("{name}: {} tensors, {} parameters", l.tensors.len(), l.elements);
    }
    check::<unclip_decoder::UNet2DConditionModel>("decoder");
    check::<unclip_decoder::UNet2DModel>("super_res_first");
    check::<unclip_decoder::UnCLIPTextProjModel>("text_proj");
    let prior =
        unclip_prior::PriorTransformer::layout(&unclip_prior::PriorConfig::karlo()).unwrap();
    println!("prior: {} tensors, {} parameters", prior.tensors.len(), prior.elements);
    assert_eq!(prior.tensors.len(), 338);
}

/// Chunked generation: rows in order, `source_index` per prompt, files numbered across chunks;
/// a request that fits in one chunk is the unchunked one exactly.
#[test]
fn chunked_generation_covers_the_request_in_order() {
    let mut m = load(&shapes()).unwrap();
    let req = TextToImage {
        prompts: vec!["a red circle".into(), "a blue square".into()],
        num_images_per_prompt: 3,
        ..quick("")
    };
    let mut seen = Vec::new();
    let total = m
        .text_to_image_chunked(&req, 4, &mut unclip::no_progress, &mut |g, first| {
            seen.push((first, g.images.size()[0], g.source_index.clone()));
            Ok(())
        })
        .unwrap();
    assert_eq!(total, 6);
    assert_eq!(seen, vec![(0, 4, vec![0, 0, 0, 1]), (4, 2, vec![1, 1])]);
    let whole = m.text_to_image(&req, &mut unclip::no_progress).unwrap();
    let mut one = None;
    m.text_to_image_chunked(&req, 6, &mut unclip::no_progress, &mut |g, _| {
        one = Some(g);
        Ok(())
    })
    .unwrap();
    assert!(one.unwrap().images.equal(&whole.images));
}
