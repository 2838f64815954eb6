//! CLIP's byte-level BPE tokenizer, built the way transformers' `CLIPTokenizer` builds it on the
//! `tokenizers` library: NFC, whitespace runs to one space, lower-casing; CLIP's word split; `</w>`
//! word ends; `<|startoftext|>` ... `<|endoftext|>`; padding to the context length with the
//! configured pad token. Truncation keeps the end token and is reported, never silent.

use crate::{Error, Result};
use serde_json::Value;
use std::path::Path;
use tch::{Device, Kind, Tensor};
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormSeq};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// CLIP's word pattern (letters runs, single digits, punctuation runs, English contractions).
const WORD_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";

/// One tokenized prompt, padded to the context length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoding {
    /// `bos, tokens.., eos, pad..` (length = context length).
    pub ids: Vec<i64>,
    /// 1 for `bos..=eos`, 0 for padding.
    pub attention_mask: Vec<i64>,
    /// Whether tokens were dropped to fit the context length.
    pub truncated: bool,
    /// Length with start and end tokens before truncation.
    pub original_len: usize,
}

/// A batch of encodings as (B, L) int64 tensors.
#[derive(Debug)]
pub struct BatchEncoding {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    /// Per prompt: whether it was truncated.
    pub truncated: Vec<bool>,
    pub original_lens: Vec<usize>,
}

/// What to do with a prompt longer than the context length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Truncation {
    /// Keep the first `context - 2` tokens and the end token (transformers' `truncation=True`);
    /// the encoding says it happened.
    #[default]
    Truncate,
    /// Refuse the prompt with an error.
    Error,
}

/// CLIP's tokenizer.
pub struct ClipTokenizer {
    inner: Tokenizer,
    bos_id: i64,
    eos_id: i64,
    pad_id: i64,
    unk: String,
    context_length: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("context_length", &self.context_length)
            .finish()
    }
}

fn tok_err(what: &str) -> impl Fn(Box<dyn std::error::Error + Send + Sync>) -> Error + '_ {
    move |e| Error::Tokenizer(format!("{what}: {e}"))
}

/// A special token as transformers' configs write it: a string or `{"content": .., "normalized": ..}`.
fn special(v: &Value) -> Option<AddedToken> {
    match v {
        Value::String(s) => Some(AddedToken::from(s.clone(), true).normalized(false)),
        Value::Object(m) => {
            let content = m.get("content")?.as_str()?;
            let normalized = m.get("normalized").and_then(Value::as_bool).unwrap_or(false);
            Some(AddedToken::from(content, true).normalized(normalized))
        }
        _ => None,
    }
}

/// Special tokens and context length from `tokenizer_config.json`, overridden by
/// `special_tokens_map.json` (as transformers resolves them; Karlo's pad "!" comes from the map).
#[derive(Debug, Default)]
struct SpecialConfig {
    bos: Option<AddedToken>,
    eos: Option<AddedToken>,
    unk: Option<AddedToken>,
    pad: Option<AddedToken>,
    model_max_length: Option<usize>,
}

impl SpecialConfig {
    fn read(dir: &Path) -> Result<Self> {
        let mut cfg = SpecialConfig::default();
        for file in ["tokenizer_config.json", "special_tokens_map.json"] {
            let path = dir.join(file);
            if !unclip_core::fsutil::is_present(&path) {
                continue;
            }
            let v: Value = unclip_core::config::read_json(&path)?;
            let get = |k: &str| v.get(k).and_then(special);
            cfg.bos = get("bos_token").or(cfg.bos.take());
            cfg.eos = get("eos_token").or(cfg.eos.take());
            cfg.unk = get("unk_token").or(cfg.unk.take());
            cfg.pad = get("pad_token").or(cfg.pad.take());
            // Files without a real limit store a huge float (1e30); only small values mean a context length.
            if let Some(n) = v.get("model_max_length").and_then(Value::as_f64) {
                if (1.0..=1e6).contains(&n) {
                    cfg.model_max_length = Some(n as usize);
                }
            }
        }
        Ok(cfg)
    }
}

/// `vocab.json`: a JSON object of token -> id.
fn read_vocab(path: &Path) -> Result<tokenizers::models::bpe::Vocab> {
    let text = unclip_core::fsutil::read_text(path, unclip_core::config::MAX_JSON_BYTES)?;
    let bad = |m: String| Error::Tokenizer(format!("{}: {m}", path.display()));
    let value: Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let Value::Object(map) = value else {
        return Err(bad("expected a JSON object mapping each token to its id".into()));
    };
    let mut vocab = tokenizers::models::bpe::Vocab::new();
    for (token, id) in map {
        let n = id.as_u64().and_then(|i| u32::try_from(i).ok()).ok_or_else(|| {
            bad(format!("token {token:?} has id {id}, expected an integer from 0 to {}", u32::MAX))
        })?;
        vocab.insert(token, n);
    }
    if vocab.is_empty() {
        return Err(bad("the vocabulary is empty".into()));
    }
    Ok(vocab)
}

/// `merges.txt`: `#version` lines, then one merge per line, `left right`; every part and the
/// merged token must be in the vocabulary.
fn read_merges(
    path: &Path,
    vocab_path: &Path,
    vocab: &tokenizers::models::bpe::Vocab,
) -> Result<Vec<(String, String)>> {
    let text = unclip_core::fsutil::read_text(path, unclip_core::config::MAX_JSON_BYTES)?;
    let mut merges = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("#version") {
            continue;
        }
        let bad = |m: String| Error::Tokenizer(format!("{} line {}: {m}", path.display(), i + 1));
        let (a, b) = match line.split(' ').collect::<Vec<_>>()[..] {
            [a, b] if !a.is_empty() && !b.is_empty() => (a, b),
            _ => {
                return Err(bad(format!(
                    "expected two tokens separated by one space, found {line:?}"
                )));
            }
        };
        for t in [a.to_string(), b.to_string(), format!("{a}{b}")] {
            if !vocab.contains_key(&t) {
                return Err(bad(format!("{t:?} is not in {}", vocab_path.display())));
            }
        }
        merges.push((a.to_string(), b.to_string()));
    }
    Ok(merges)
}

impl ClipTokenizer {
    /// Loads a tokenizer folder: `tokenizer.json` when present, else `vocab.json` + `merges.txt`;
    /// `tokenizer_config.json` / `special_tokens_map.json` are read when present.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        unclip_core::fsutil::ensure_dir(dir)?;
        let cfg = SpecialConfig::read(dir)?;
        let json = dir.join("tokenizer.json");
        let (inner, vocab_file) = if unclip_core::fsutil::is_present(&json) {
            let text = unclip_core::fsutil::read_text(&json, unclip_core::config::MAX_JSON_BYTES)?;
            let tok = text.parse::<Tokenizer>().map_err(|e| {
                Error::Tokenizer(format!("{}: not a tokenizers JSON file: {e}", json.display()))
            })?;
            (tok, json)
        } else {
            let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
            for p in [&vocab, &merges] {
                if !unclip_core::fsutil::is_present(p) {
                    return Err(Error::Tokenizer(format!(
                        "{} has no tokenizer.json and no {}",
                        dir.display(),
                        p.file_name().unwrap_or_default().to_string_lossy()
                    )));
                }
            }
            let unk = cfg.unk.as_ref().map(|t| t.content.clone()).unwrap_or_else(|| EOS.into());
            (Self::build(&vocab, &merges, &unk)?, vocab)
        };
        Self::with_specials(inner, cfg, &vocab_file)
    }

    /// Builds the pipeline of transformers' `CLIPTokenizer` around a BPE vocabulary. The files
    /// are read here (regular files only) and checked line by line, so a binary or inconsistent
    /// file is named with the line and token at fault.
    fn build(vocab_path: &Path, merges_path: &Path, unk: &str) -> Result<Tokenizer> {
        let vocab = read_vocab(vocab_path)?;
        let merges = read_merges(merges_path, vocab_path, &vocab)?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .unk_token(unk.into())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .fuse_unk(false)
            .build()
            .map_err(tok_err(&vocab_path.display().to_string()))?;
        let mut tok = Tokenizer::new(bpe);
        let ws = Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .map_err(tok_err("whitespace normalizer"))?;
        tok.with_normalizer(Some(NormSeq::new(vec![NFC.into(), ws.into(), Lowercase.into()])));
        let split = Split::new(
            SplitPattern::Regex(WORD_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(tok_err("word pattern"))?;
        tok.with_pre_tokenizer(Some(PreSeq::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        tok.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
        Ok(tok)
    }

    fn with_specials(mut inner: Tokenizer, cfg: SpecialConfig, vocab_file: &Path) -> Result<Self> {
        // Padding and truncation are done here (and reported); a tokenizer.json may carry its own.
        inner.with_padding(None);
        inner.with_truncation(None).map_err(tok_err("truncation"))?;
        let default = |s: &str| AddedToken::from(s, true).normalized(false);
        let bos = cfg.bos.unwrap_or_else(|| default(BOS));
        let eos = cfg.eos.unwrap_or_else(|| default(EOS));
        let unk = cfg.unk.unwrap_or_else(|| default(EOS));
        let pad = cfg.pad.unwrap_or_else(|| default(EOS));
        // Added as special tokens, so their text in a prompt maps to their id (transformers does the same).
        inner.add_special_tokens(&[bos.clone(), eos.clone(), unk.clone(), pad.clone()]);
        let id = |t: &AddedToken| {
            inner.token_to_id(&t.content).map(i64::from).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{}: special token {:?} (from tokenizer_config.json / special_tokens_map.json, or CLIP's default) is not in the vocabulary",
                    vocab_file.display(),
                    t.content
                ))
            })
        };
        Ok(Self {
            bos_id: id(&bos)?,
            eos_id: id(&eos)?,
            pad_id: id(&pad)?,
            unk: unk.content.clone(),
            context_length: cfg.model_max_length.unwrap_or(77),
            inner,
        })
    }

    /// Sets the padded length (e.g. a model's `max_position_embeddings`); at least 2.
    pub fn with_context_length(mut self, n: usize) -> Result<Self> {
        if n < 2 {
            return Err(Error::Tokenizer(format!("context length must be at least 2, got {n}")));
        }
        self.context_length = n;
        Ok(self)
    }

    pub fn context_length(&self) -> usize {
        self.context_length
    }

    pub fn bos_id(&self) -> i64 {
        self.bos_id
    }

    pub fn eos_id(&self) -> i64 {
        self.eos_id
    }

    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The start, end and padding tokens, as text.
    pub fn special_tokens(&self) -> Vec<String> {
        [self.bos_id, self.eos_id, self.pad_id]
            .iter()
            .map(|&i| {
                u32::try_from(i).ok().and_then(|i| self.inner.id_to_token(i)).unwrap_or_default()
            })
            .collect()
    }

    /// The BPE ids of `text` without start/end tokens.
    pub fn tokens(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self.inner.encode(text, false).map_err(tok_err("encode"))?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// Tokenizes one prompt (the empty prompt is valid: it is CLIP's unconditional text).
    pub fn encode(&self, text: &str, truncation: Truncation) -> Result<Encoding> {
        let mut body = self.tokens(text)?;
        let original_len = body.len() + 2;
        let keep = self.context_length - 2;
        let truncated = body.len() > keep;
        if truncated {
            if truncation == Truncation::Error {
                return Err(Error::Input(format!(
                    "prompt of {original_len} tokens (with start/end) exceeds the context length {}: {:?}",
                    self.context_length,
                    text.chars().take(60).collect::<String>()
                )));
            }
            body.truncate(keep);
        }
        let mut ids = Vec::with_capacity(self.context_length);
        ids.push(self.bos_id);
        ids.extend(body);
        ids.push(self.eos_id);
        let used = ids.len();
        ids.resize(self.context_length, self.pad_id);
        let attention_mask = (0..self.context_length).map(|i| i64::from(i < used)).collect();
        Ok(Encoding { ids, attention_mask, truncated, original_len })
    }

    /// Tokenizes prompts into (B, context) tensors on `device`. An empty list is an error.
    pub fn encode_batch<S: AsRef<str>>(
        &self,
        texts: &[S],
        truncation: Truncation,
        device: Device,
    ) -> Result<BatchEncoding> {
        if texts.is_empty() {
            return Err(Error::Input("no prompts given".into()));
        }
        let encs = texts
            .iter()
            .map(|t| self.encode(t.as_ref(), truncation))
            .collect::<Result<Vec<_>>>()?;
        let (b, l) = (encs.len() as i64, self.context_length as i64);
        let flat = |f: fn(&Encoding) -> &Vec<i64>| {
            encs.iter().flat_map(|e| f(e).iter().copied()).collect::<Vec<i64>>()
        };
        let input_ids =
            Tensor::f_from_slice(&flat(|e| &e.ids))?.f_view([b, l])?.f_to_device(device)?;
        let attention_mask = Tensor::f_from_slice(&flat(|e| &e.attention_mask))?
            .f_view([b, l])?
            .f_to_kind(Kind::Int64)?
            .f_to_device(device)?;
        Ok(BatchEncoding {
            input_ids,
            attention_mask,
            truncated: encs.iter().map(|e| e.truncated).collect(),
            original_lens: encs.iter().map(|e| e.original_len).collect(),
        })
    }

    /// Text back from ids (special tokens skipped, `</w>` as spaces).
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().filter_map(|&i| u32::try_from(i).ok()).collect();
        let text = self.inner.decode(&ids, true).map_err(tok_err("decode"))?;
        Ok(text.replace("</w>", " ").trim().to_string())
    }

    /// Saves the pipeline as `tokenizer.json` (specials included) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| unclip_core::Error::io(dir, e))?;
        self.inner.save(dir.join("tokenizer.json"), false).map_err(tok_err("save"))?;
        let cfg = serde_json::json!({
            "tokenizer_class": "CLIPTokenizer",
            "bos_token": self.inner.id_to_token(self.bos_id as u32),
            "eos_token": self.inner.id_to_token(self.eos_id as u32),
            "unk_token": self.unk,
            "pad_token": self.inner.id_to_token(self.pad_id as u32),
            "model_max_length": self.context_length,
        });
        unclip_core::config::write_json(&dir.join("tokenizer_config.json"), &cfg)?;
        Ok(())
    }
}
