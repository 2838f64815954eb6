//! Bad arguments and bad model paths given to the `text_to_image` example (issue 20), and flags
//! the decode-only examples do not take, each in a child process with a time limit: it must exit
//! with an error naming the argument or path (no panic, no abort, no hang), or do the defined
//! thing (chunks written as they are done). The library-level corpus is
//! `unclip/tests/robustness.rs`.
//!
//! Run as part of `cargo test -p unclip-examples` (or `--workspace`): cargo then builds the
//! examples first; with `--test cli_robustness` alone it does not, and an older build would run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn example(name: &str) -> PathBuf {
    // target/<profile>/deps/<this test> -> target/<profile>/examples/<name>; `cargo test` builds
    // the package's examples before its tests.
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("examples").join(name)
}

fn shapes() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/shapes").canonicalize().unwrap()
}

/// Runs `text_to_image` with `args`; (exit success, stderr + stdout). Killed after 120 s.
fn run(args: &[&str], out: &Path) -> (bool, String) {
    run_example("text_to_image", args, out)
}

/// Runs the example `name` with `args` and `--out out`, as [`run`] does.
fn run_example(name: &str, args: &[&str], out: &Path) -> (bool, String) {
    let bin = example(name);
    assert!(bin.is_file(), "{} not built (cargo test builds the examples)", bin.display());
    let log = out.join("log.txt");
    std::fs::create_dir_all(out).unwrap();
    let file = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(&bin)
        .args(args)
        .args(["--out", out.to_str().unwrap()])
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file))
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name} {args:?} hung (killed after 120 s)");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&log).unwrap();
    // A signal (abort, segfault) has no exit code; a Rust panic exits with 101.
    assert!(status.code().is_some(), "{name} {args:?} was killed by a signal: {text}");
    assert!(!text.contains("panicked"), "{name} {args:?} panicked: {text}");
    (status.success(), text)
}

#[test]
fn bad_arguments_and_paths_are_named_errors() {
    let root = unclip_core::fsutil::scratch_dir("cli-robustness").unwrap();
    let model = shapes();
    let m = model.to_str().unwrap();
    std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
    // A model copy whose text encoder config is a FIFO (opening it would block forever).
    let fifo_model = root.join("fifo-model");
    std::fs::create_dir_all(&fifo_model).unwrap();
    for e in std::fs::read_dir(&model).unwrap() {
        let e = e.unwrap();
        std::os::unix::fs::symlink(e.path(), fifo_model.join(e.file_name())).unwrap();
    }
    std::fs::remove_file(fifo_model.join("text_encoder")).unwrap();
    std::fs::create_dir(fifo_model.join("text_encoder")).unwrap();
    std::os::unix::fs::symlink(
        model.join("text_encoder/model.safetensors"),
        fifo_model.join("text_encoder/model.safetensors"),
    )
    .unwrap();
    let ok = Command::new("mkfifo")
        .arg(fifo_model.join("text_encoder/config.json"))
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let (absent, file, looping, fifo) = (
        root.join("absent").display().to_string(),
        model.join("model_index.json").display().to_string(),
        root.join("loop").display().to_string(),
        fifo_model.display().to_string(),
    );
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["--model", &absent], vec!["absent", "nothing"]),
        (vec!["--model", &file], vec!["model_index.json", "found a regular file"]),
        (vec!["--model", &looping], vec!["loop", "symlink loop"]),
        (vec!["--model", &fifo], vec!["config.json", "FIFO"]),
        (vec!["--model", m, "--device", "tpu:7"], vec!["tpu:7"]),
        (vec!["--model", m, "--dtype", "int8"], vec!["int8"]),
        (vec!["--model", m, "--num-images", "many"], vec!["--num-images"]),
        (vec!["--model", m, "--batch-size", "0"], vec!["--batch-size"]),
        (vec!["--model", m, "--num-images", "100000000"], vec!["would need", "--batch-size"]),
        (vec!["--model", m, "--decoder-steps", "0"], vec!["decoder_steps"]),
        (vec!["--model", m, "--prompt", "  "], vec!["prompt 0 is empty"]),
        (
            vec!["--model", m, "--batch-size", "2", "--grid", "g.png"],
            vec!["--grid", "--batch-size"],
        ),
    ];
    let mut failures = Vec::new();
    for (i, (args, must)) in cases.iter().enumerate() {
        let (ok, text) = run(args, &root.join(format!("out-{i}")));
        let missing: Vec<&&str> = must.iter().filter(|p| !text.contains(**p)).collect();
        if ok || !missing.is_empty() {
            failures.push(format!("{args:?}: success {ok}, lacks {missing:?}: {text}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn batches_are_written_as_they_are_done() {
    let root = unclip_core::fsutil::scratch_dir("cli-batches").unwrap();
    let model = shapes();
    let steps = ["--prior-steps", "2", "--decoder-steps", "2", "--super-res-steps", "2"];
    let mut args = vec!["--model", model.to_str().unwrap(), "--num-images", "3"];
    args.extend(["--batch-size", "2"]);
    args.extend(steps);
    let (ok, text) = run(&args, &root);
    assert!(ok, "{text}");
    for i in 0..3 {
        assert!(root.join(format!("image-{i}.png")).is_file(), "image-{i}.png: {text}");
    }
    assert!(!root.join("image-3.png").exists());
    std::fs::remove_dir_all(&root).unwrap();
}

/// The examples that decode a given embedding have no prior and no best-of-N: those flags are
/// refused by name rather than accepted and ignored.
#[test]
fn decode_only_examples_refuse_text_to_image_flags() {
    let root = unclip_core::fsutil::scratch_dir("cli-decode-only").unwrap();
    let mut failures = Vec::new();
    for name in ["image_variations", "interpolate", "text_diff"] {
        for flag in ["--candidates", "--prior-steps", "--prior-guidance", "--decoder-candidates"] {
            let (ok, text) = run_example(name, &[flag, "2"], &root.join(format!("{name}{flag}")));
            if ok || !text.contains(&format!("unexpected argument '{flag}'")) {
                failures.push(format!("{name} {flag}: success {ok}: {text}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    std::fs::remove_dir_all(&root).unwrap();
}
