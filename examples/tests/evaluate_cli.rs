//! The `evaluate` example's prior-only mode on the shipped `models/shapes` (a few prompts, seconds):
//! it writes one prior.tsv row per one-object prompt and one relation.tsv row per relation
//! prompt, and with `--oracle-embeddings` the ground-truth renders, which sit at their own place,
//! are found nearest their stated place and nearer their own arrangement than its reversal.
//!
//! Run as part of `cargo test -p unclip-examples` (cargo builds the examples first).

use std::path::{Path, PathBuf};
use std::process::Command;

fn evaluate(args: &[&str], out: &Path) -> String {
    // target/<profile>/deps/<this test> -> target/<profile>/examples/evaluate.
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("examples/evaluate");
    assert!(bin.is_file(), "{} not built (cargo test builds the examples)", bin.display());
    let model: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/shapes");
    let counts = ["--single", "8", "--binding", "1", "--relation", "2", "--negation", "2"];
    let output = Command::new(&bin)
        .args(["--model", model.to_str().unwrap(), "--prior-only", "--threads", "1"])
        .args(counts)
        .args(args)
        .args(["--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "evaluate {args:?}: {text}");
    text
}

/// prior.tsv rows: (prompt, place stated, nearest place as "col,row").
fn rows(dir: &Path) -> Vec<(String, bool, String)> {
    let tsv = std::fs::read_to_string(dir.join("prior.tsv")).unwrap();
    tsv.lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 10, "{l}");
            (f[1].to_string(), f[2] == "yes", f[3].to_string())
        })
        .collect()
}

#[test]
fn prior_only_places_each_draw_among_the_nine_places() {
    let root = unclip_core::fsutil::scratch_dir("evaluate-prior-only").unwrap();
    let text = evaluate(&[], &root.join("prior"));
    assert!(text.contains("single, no place"), "{text}");
    // 8 single-object prompts and 2 negation prompts have one object; the binding and relation
    // prompts have two.
    let drawn = rows(&root.join("prior"));
    assert_eq!(drawn.len(), 10, "{drawn:?}");

    evaluate(&["--oracle-embeddings"], &root.join("oracle"));
    let truth = rows(&root.join("oracle"));
    assert_eq!(truth.len(), 10);
    // The same prompts in the same order, whatever is measured.
    assert!(drawn.iter().zip(&truth).all(|(a, b)| a.0 == b.0));
    let placed: Vec<_> = truth.iter().filter(|r| r.1).collect();
    assert!(placed.len() >= 5, "{truth:?}");
    for (prompt, _, nearest) in placed {
        let spec = unclip::shapes::parse_caption(prompt).unwrap();
        let cell = spec.objects[0].cell.unwrap();
        assert_eq!(nearest, &format!("{},{}", cell.col, cell.row), "{prompt}");
    }
    // Relation prompts: the true render is nearer its own scene than the scene with the two
    // objects' places exchanged (relation.tsv's fifth column); the prior's draws are only listed.
    let relation =
        |dir: &str| std::fs::read_to_string(root.join(dir).join("relation.tsv")).unwrap();
    assert_eq!(relation("prior").lines().count(), 3);
    let nearer: Vec<String> = relation("oracle")
        .lines()
        .skip(1)
        .map(|l| l.split('\t').nth(4).unwrap().to_string())
        .collect();
    assert_eq!(nearer, ["yes", "yes"]);
    std::fs::remove_dir_all(&root).unwrap();
}
