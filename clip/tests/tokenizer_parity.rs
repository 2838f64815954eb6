//! Token ids identical to transformers 5.24.0's `CLIPTokenizer` on 301 strings (fixtures/gen_clip.py).

use std::collections::HashMap;
use tch::{Device, Tensor};
use unclip_clip::{ClipTokenizer, Truncation};
use unclip_core::testing::{fixture_path, load_fixture};

fn strings() -> Vec<String> {
    let text = std::fs::read_to_string(fixture_path("clip/tokenizer_strings.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<i64>> {
    let t = t.to_kind(tch::Kind::Int64);
    (0..t.size()[0]).map(|i| Vec::<i64>::try_from(t.get(i)).unwrap()).collect()
}

fn check(tok: &ClipTokenizer, r: &HashMap<String, Tensor>) {
    let strings = strings();
    assert!(strings.len() >= 300);
    let specials = Vec::<i64>::try_from(r["special_ids"].to_kind(tch::Kind::Int64)).unwrap();
    assert_eq!(vec![tok.bos_id(), tok.eos_id(), tok.pad_id()], specials);
    let (ids, mask) = (rows(&r["input_ids"]), rows(&r["attention_mask"]));
    let lens = Vec::<i64>::try_from(r["untruncated_length"].to_kind(tch::Kind::Int64)).unwrap();
    let mut mismatches = vec![];
    let mut truncated = 0;
    for (i, s) in strings.iter().enumerate() {
        let e = tok.encode(s, Truncation::Truncate).unwrap();
        if e.ids != ids[i] || e.attention_mask != mask[i] {
            mismatches.push(format!("{s:?}:\n ours {:?}\n  ref {:?}", e.ids, ids[i]));
        }
        assert_eq!(e.original_len as i64, lens[i], "untruncated length of {s:?}");
        assert_eq!(e.truncated, lens[i] as usize > tok.context_length(), "{s:?}");
        truncated += e.truncated as usize;
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} differ:\n{}",
        mismatches.len(),
        strings.len(),
        mismatches.join("\n")
    );
    assert!(truncated > 10, "the set should exercise truncation ({truncated})");
}

#[test]
fn real_vocab_from_vocab_and_merges() {
    let tok = ClipTokenizer::from_dir(&fixture_path("clip/tokenizer")).unwrap();
    assert_eq!(tok.context_length(), 77);
    assert_eq!(tok.pad_id(), 0, "Karlo pads with '!' (special_tokens_map.json)");
    check(&tok, &load_fixture("clip/tokenizer_ids.safetensors"));
    let e = tok.encode("a red circle to the left of a blue square", Truncation::Truncate).unwrap();
    assert_eq!(tok.decode(&e.ids).unwrap(), "a red circle to the left of a blue square");
}

#[test]
fn tokenizer_json_folder() {
    let tok = ClipTokenizer::from_dir(&fixture_path("clip/tiny_tokenizer"))
        .unwrap()
        .with_context_length(32)
        .unwrap();
    check(&tok, &load_fixture("clip/tiny_tokenizer_ids.safetensors"));

    // A tokenizer.json that carries its own padding and truncation settings gives the same ids
    // (both are done, and reported, by ClipTokenizer).
    let dir = std::env::temp_dir().join(format!("unclip-clip-tokpad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixture_path("clip/tiny_tokenizer");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap())
            .unwrap();
    json["truncation"] = serde_json::json!({"direction": "Right", "max_length": 5, "strategy": "LongestFirst", "stride": 0});
    json["padding"] = serde_json::json!({"strategy": {"Fixed": 40}, "direction": "Right",
        "pad_to_multiple_of": null, "pad_id": 0, "pad_type_id": 0, "pad_token": "!"});
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
    std::fs::copy(src.join("tokenizer_config.json"), dir.join("tokenizer_config.json")).unwrap();
    let padded = ClipTokenizer::from_dir(&dir).unwrap().with_context_length(32).unwrap();
    check(&padded, &load_fixture("clip/tiny_tokenizer_ids.safetensors"));
    std::fs::remove_dir_all(&dir).unwrap();

    // Our own tokenizer.json round-trips to the same ids.
    let dir = std::env::temp_dir().join(format!("unclip-clip-tok-{}", std::process::id()));
    let real = ClipTokenizer::from_dir(&fixture_path("clip/tokenizer")).unwrap();
    real.save(&dir).unwrap();
    let again = ClipTokenizer::from_dir(&dir).unwrap();
    check(&again, &load_fixture("clip/tokenizer_ids.safetensors"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn truncation_is_reported_or_refused() {
    let tok = ClipTokenizer::from_dir(&fixture_path("clip/tokenizer"))
        .unwrap()
        .with_context_length(8)
        .unwrap();
    let e = tok.encode("one two three four five six seven eight", Truncation::Truncate).unwrap();
    assert!(e.truncated && e.original_len == 10);
    assert_eq!(e.ids.len(), 8);
    assert_eq!(*e.ids.last().unwrap(), tok.eos_id(), "the end token is kept");
    assert!(tok.encode("one two three four five six seven eight", Truncation::Error).is_err());
    let ok = tok.encode("one two", Truncation::Error).unwrap();
    assert!(!ok.truncated && ok.attention_mask == vec![1, 1, 1, 1, 0, 0, 0, 0]);
    let empty = tok.encode("", Truncation::Error).unwrap();
    assert_eq!(&empty.ids[..3], &[tok.bos_id(), tok.eos_id(), tok.pad_id()]);
    let b = tok
        .encode_batch(
            &["a cat", "", "one two three four five six seven"],
            Truncation::Truncate,
            Device::Cpu,
        )
        .unwrap();
    assert_eq!(b.input_ids.size(), vec![3, 8]);
    assert_eq!(b.truncated, vec![false, false, true]);
    assert!(tok.encode_batch::<&str>(&[], Truncation::Truncate, Device::Cpu).is_err());
    assert!(
        ClipTokenizer::from_dir(&fixture_path("clip/tokenizer"))
            .unwrap()
            .with_context_length(1)
            .is_err()
    );
    assert!(ClipTokenizer::from_dir(&fixture_path("clip/nowhere")).is_err());
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// Any text gives a full-length encoding that starts with bos, holds exactly one real eos
        /// before the padding, and reports truncation exactly when tokens were dropped.
        #[test]
        fn any_text_encodes_well_formed(text in "\\PC{0,200}") {
            let tok = ClipTokenizer::from_dir(&fixture_path("clip/tiny_tokenizer")).unwrap().with_context_length(24).unwrap();
            let e = tok.encode(&text, Truncation::Truncate).unwrap();
            prop_assert_eq!(e.ids.len(), 24);
            prop_assert_eq!(e.ids[0], tok.bos_id());
            let used: usize = e.attention_mask.iter().sum::<i64>() as usize;
            prop_assert_eq!(e.ids[used - 1], tok.eos_id());
            prop_assert!(e.ids[used..].iter().all(|&i| i == tok.pad_id()));
            prop_assert_eq!(e.truncated, e.original_len > 24);
            prop_assert_eq!(used, e.original_len.min(24));
        }
    }
}
