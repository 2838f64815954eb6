//! Stage 1: a byte-level BPE trained on the captions with the `tokenizers` crate, exported in
//! CLIP's format (`vocab.json` + `merges.txt`: the 256 byte symbols, the same with `</w>`, one
//! token per merge, then `<|startoftext|>` and `<|endoftext|>`), which `ClipTokenizer` loads.

use super::loop_::{Ctx, MODEL};
use super::{Result, TrainError, write_bytes};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;
use tokenizers::models::bpe::{BPE, BpeTrainer};
use tokenizers::{Model, Trainer};
use unclip_clip::ClipTokenizer;

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
) -> Result<()> {
    let bpe = |e: String| TrainError::stage("tokenizer", e);
    let mut trainer = BpeTrainer::builder()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .end_of_word_suffix(END_OF_WORD.into())
        .show_progress(false)
        .build();
    trainer
        .feed(captions.iter(), |s| Ok(words(s)))
        .map_err(|e| bpe(format!("BPE trainer: {e}")))?;
    let mut model = BPE::builder()
        .end_of_word_suffix(END_OF_WORD.into())
        .build()
        .map_err(|e| bpe(format!("BPE model: {e}")))?;
    trainer.train(&mut model).map_err(|e| bpe(format!("BPE training: {e}")))?;
    // The trained merges, in rank order, from the model's own merges file.
    let scratch = dir.join("bpe-raw");
    std::fs::create_dir_all(&scratch).map_err(|e| TrainError::io(&scratch, e))?;
    model.save(&scratch, None).map_err(|e| bpe(format!("saving BPE: {e}")))?;
    let raw_path = scratch.join("merges.txt");
    let raw = std::fs::read_to_string(&raw_path).map_err(|e| TrainError::io(&raw_path, e))?;
    std::fs::remove_dir_all(&scratch).map_err(|e| TrainError::io(&scratch, e))?;
    let merges: Vec<(String, String)> = raw
        .lines()
        .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        .map(|l| {
            let (a, b) =
                l.split_once(' ').ok_or_else(|| bpe(format!("malformed merge line {l:?}")))?;
            Ok((a.to_string(), b.to_string()))
        })
        .collect::<Result<_>>()?;
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
    if ids.len() != vocab.len() {
        return Err(bpe("duplicate tokens in the trained vocabulary".into()));
    }
    let vocab_json = serde_json::to_string(&ids).map_err(|e| bpe(e.to_string()))?;
    write_bytes(&dir.join("vocab.json"), vocab_json.as_bytes())?;
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
    unclip_core::config::write_json(&dir.join("tokenizer_config.json"), &config)?;
    Ok(())
}

/// Runs the stage: learns the merges on the first `captions` training captions and writes
/// `<run>/tokenizer/model/tokenizer/`, then checks that it loads and that the first 2000
/// captions fit the context. (A killed run redoes it: only the marker written after says done.)
pub(crate) fn run(ctx: &Ctx) -> Result<()> {
    let cfg = ctx
        .cfg
        .tokenizer
        .as_ref()
        .ok_or_else(|| TrainError::stage("tokenizer", "no [tokenizer] section"))?;
    let dir = ctx.stage_dir("tokenizer").join(MODEL).join("tokenizer");
    std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    let data = &ctx.data.train;
    let n = data.len().min(cfg.captions);
    let mut captions = Vec::with_capacity(n);
    let mut bad = 0usize;
    for i in 0..n {
        match data.item(i) {
            Ok(item) => captions.push(item.caption),
            Err(_) => bad += 1,
        }
    }
    if captions.is_empty() {
        return Err(TrainError::stage(
            "tokenizer",
            format!("none of the first {n} items of {} could be read", data.describe()),
        ));
    }
    train(&captions, cfg.vocab_size, cfg.context_length, &dir)?;
    println!(
        "tokenizer: trained on {} captions ({bad} unreadable items skipped) -> {}",
        captions.len(),
        dir.display()
    );
    let tok = ClipTokenizer::from_dir(&dir)?;
    let mut longest = 0;
    for c in captions.iter().take(2000) {
        longest = longest.max(tok.tokens(c)?.len() + 2);
    }
    println!(
        "tokenizer: {} tokens, longest of the first 2000 captions {longest} of {} with start/end",
        tok.vocab_size(),
        tok.context_length()
    );
    if longest > tok.context_length() {
        println!(
            "tokenizer: warning: longer captions are truncated to {} tokens",
            tok.context_length()
        );
    }
    Ok(())
}
