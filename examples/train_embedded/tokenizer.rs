//! Stage 1: a byte-level BPE trained on the captions with the `tokenizers` crate, exported in
//! CLIP's format (`vocab.json` + `merges.txt`: the 256 byte symbols, the same with `</w>`, one
//! token per merge, then `<|startoftext|>` and `<|endoftext|>`), which `ClipTokenizer` loads.

use crate::stage::{Ctx, write_bytes};
use anyhow::Context;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;
use tokenizers::models::bpe::{BPE, BpeTrainer};
use tokenizers::{Model, Trainer};
use unclip::clip::ClipTokenizer;
use unclip::core::fsutil;

pub const BOS: &str = "<|startoftext|>";
pub const EOS: &str = "<|endoftext|>";
const END_OF_WORD: &str = "</w>";

/// GPT-2/CLIP's reversible map from bytes to printable characters, in CLIP's vocabulary order
/// (printable Latin-1 ranges first, then the remaining bytes mapped from U+0100 on).
fn byte_symbols() -> Vec<char> {
    let mut bytes: Vec<u32> =
        (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars: Vec<u32> = bytes.clone();
    let mut extra = 0;
    for b in 0..256u32 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    chars.into_iter().map(|c| char::from_u32(c).expect("valid code point")).collect()
}

/// Splits a caption as CLIP's pre-tokenizer does for this language: lower case, letters runs,
/// digit runs and single other symbols, whitespace dropped (the captions are ASCII, whose
/// bytes are their own byte-level symbols).
fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let flush = |cur: &mut String, out: &mut Vec<String>| {
        if !cur.is_empty() {
            out.push(std::mem::take(cur));
        }
    };
    for ch in text.to_lowercase().chars() {
        if ch.is_ascii_alphabetic() {
            if cur.chars().next().is_some_and(|c| !c.is_ascii_alphabetic()) {
                flush(&mut cur, &mut out);
            }
            cur.push(ch);
        } else if ch.is_ascii_digit() {
            flush(&mut cur, &mut out);
            out.push(ch.to_string());
        } else if ch.is_whitespace() {
            flush(&mut cur, &mut out);
        } else {
            flush(&mut cur, &mut out);
            out.push(ch.to_string());
        }
    }
    flush(&mut cur, &mut out);
    out
}

/// Trains the merges on `captions` and writes the tokenizer folder `dir`.
pub fn train(
    captions: &[String],
    vocab_size: usize,
    context_length: usize,
    dir: &Path,
) -> anyhow::Result<()> {
    let mut trainer = BpeTrainer::builder()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .end_of_word_suffix(END_OF_WORD.into())
        .show_progress(false)
        .build();
    trainer
        .feed(captions.iter(), |s| Ok(words(s)))
        .map_err(|e| anyhow::anyhow!("BPE trainer: {e}"))?;
    let mut model = BPE::builder()
        .end_of_word_suffix(END_OF_WORD.into())
        .build()
        .map_err(|e| anyhow::anyhow!("BPE model: {e}"))?;
    trainer.train(&mut model).map_err(|e| anyhow::anyhow!("BPE training: {e}"))?;
    // The trained merges, in rank order, from the model's own merges file.
    let scratch = dir.join("bpe-raw");
    std::fs::create_dir_all(&scratch)?;
    model.save(&scratch, None).map_err(|e| anyhow::anyhow!("saving BPE: {e}"))?;
    let raw = std::fs::read_to_string(scratch.join("merges.txt"))?;
    std::fs::remove_dir_all(&scratch)?;
    let merges: Vec<(String, String)> = raw
        .lines()
        .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        .map(|l| {
            let (a, b) = l.split_once(' ').context("malformed merge line")?;
            Ok((a.to_string(), b.to_string()))
        })
        .collect::<anyhow::Result<_>>()?;
    // CLIP's layout: all bytes (so any text encodes), then merge results, then the specials
    // last (so <|endoftext|> has the largest id).
    let symbols = byte_symbols();
    let mut vocab: Vec<String> = symbols.iter().map(|c| c.to_string()).collect();
    vocab.extend(symbols.iter().map(|c| format!("{c}{END_OF_WORD}")));
    let mut merge_lines = vec!["#version: 0.2".to_string()];
    for (a, b) in &merges {
        vocab.push(format!("{a}{b}"));
        merge_lines.push(format!("{a} {b}"));
    }
    vocab.push(BOS.into());
    vocab.push(EOS.into());
    let ids: BTreeMap<&str, usize> =
        vocab.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    anyhow::ensure!(ids.len() == vocab.len(), "duplicate tokens in the trained vocabulary");
    write_bytes(&dir.join("vocab.json"), serde_json::to_string(&ids)?.as_bytes())?;
    write_bytes(&dir.join("merges.txt"), (merge_lines.join("\n") + "\n").as_bytes())?;
    let config = json!({
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "model_max_length": context_length,
        "do_lower_case": true,
    });
    unclip::core::config::write_json(&dir.join("tokenizer_config.json"), &config)?;
    Ok(())
}

/// The files of a tokenizer folder, in the order [`train`] writes them.
pub const FILES: [&str; 3] = ["vocab.json", "merges.txt", "tokenizer_config.json"];

/// Runs the stage unless `<out>/tokenizer` is marked complete (a run killed between its files
/// redoes it), then checks the folder loads and every training caption fits the context.
pub fn run(ctx: &Ctx) -> anyhow::Result<()> {
    let dir = ctx.out.join("tokenizer");
    // A folder from before completion markers: complete when all its files are there and load.
    if !fsutil::is_complete(&dir)
        && FILES.iter().all(|f| dir.join(f).is_file())
        && ClipTokenizer::from_dir(&dir).is_ok()
    {
        fsutil::mark_complete(&dir, &json!({ "stage": "tokenizer", "adopted": true }))?;
    }
    if !fsutil::is_complete(&dir) {
        std::fs::create_dir_all(&dir)?;
        let data = ctx.data();
        let n = data.len.min(20_000);
        let captions: Vec<String> = (0..n).map(|i| data.caption(i)).collect();
        train(&captions, ctx.recipe.vocab_size, ctx.recipe.context_length, &dir)?;
        fsutil::mark_complete(&dir, &json!({ "stage": "tokenizer", "captions": n }))?;
        println!("tokenizer: trained on {n} captions -> {}", dir.display());
    }
    let tok = ClipTokenizer::from_dir(&dir)?;
    let data = ctx.data();
    let longest = (0..2000)
        .map(|i| tok.tokens(&data.caption(i)).map(|t| t.len() + 2))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .max()
        .unwrap_or(0);
    println!(
        "tokenizer: {} tokens, longest of 2000 captions {longest} of {} with start/end",
        tok.vocab_size(),
        tok.context_length()
    );
    anyhow::ensure!(longest <= tok.context_length(), "captions do not fit the context length");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::Recipe;
    use tch::Device;

    /// A run killed after `vocab.json` was written but before the stage's other files used to
    /// fail on every rerun (the stage was judged done by `vocab.json`). Now the stage has no
    /// completion marker, so the rerun redoes it and completes; the killed write's temporary file
    /// is removed when the run folder is opened again.
    #[test]
    fn a_stage_killed_between_its_files_is_redone() {
        let out = fsutil::scratch_dir("tokenizer-killed").unwrap();
        let ctx = Ctx::new(out.clone(), Recipe::quick(), Device::Cpu);
        run(&ctx).unwrap();
        let dir = out.join("tokenizer");
        assert!(fsutil::is_complete(&dir));
        let vocab = std::fs::read(dir.join("vocab.json")).unwrap();
        let config = std::fs::read(dir.join("tokenizer_config.json")).unwrap();

        // The state a kill during the stage leaves: vocab.json only, a temporary file of the
        // write in progress (of a process that is gone), no marker.
        fsutil::clear_complete(&dir).unwrap();
        std::fs::remove_file(dir.join("merges.txt")).unwrap();
        std::fs::remove_file(dir.join("tokenizer_config.json")).unwrap();
        let stale = dir.join(".merges.txt.tmp-4999999");
        std::fs::write(&stale, b"#version: 0.2\nt h").unwrap();

        assert_eq!(fsutil::clean_stale_temps(&out).unwrap(), vec![stale.clone()]);
        run(&ctx).unwrap();
        assert!(fsutil::is_complete(&dir));
        assert!(!stale.exists());
        assert_eq!(std::fs::read(dir.join("vocab.json")).unwrap(), vocab, "same tokenizer again");
        assert_eq!(std::fs::read(dir.join("tokenizer_config.json")).unwrap(), config);
        assert_eq!(ctx.tokenizer().unwrap().context_length(), ctx.recipe.context_length);

        // A complete folder from before markers (all files, loadable) is adopted, not redone.
        fsutil::clear_complete(&dir).unwrap();
        let before = std::fs::metadata(dir.join("vocab.json")).unwrap().modified().unwrap();
        run(&ctx).unwrap();
        assert!(fsutil::is_complete(&dir));
        let after = std::fs::metadata(dir.join("vocab.json")).unwrap().modified().unwrap();
        assert_eq!(before, after);
        std::fs::remove_dir_all(&out).unwrap();
    }
}
