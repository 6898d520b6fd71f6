//! A word-level Hugging Face tokenizer for the built-in tasks, written as `tokenizer.json` +
//! `tokenizer_config.json` so that transformers (and osp) load it like any other.
use anyhow::{bail, Result};
use serde_json::{json, Map, Value};
use std::path::Path;

/// Special tokens, in id order.
pub const SPECIALS: [&str; 4] = ["<pad>", "<unk>", "<s>", "</s>"];

/// Writes the tokenizer files for `words` (specials first, then the words in order) into
/// `dir`; returns the vocabulary size.
pub fn write_tokenizer(dir: &Path, words: &[String]) -> Result<usize> {
    let mut vocab = Map::new();
    for (i, w) in SPECIALS
        .iter()
        .map(|s| s.to_string())
        .chain(words.iter().cloned())
        .enumerate()
    {
        if w.is_empty() || w.chars().any(char::is_whitespace) {
            bail!("vocabulary word {w:?} is empty or contains whitespace");
        }
        if vocab.insert(w.clone(), json!(i)).is_some() {
            bail!("vocabulary word {w:?} appears twice");
        }
    }
    let added: Vec<Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    let n = vocab.len();
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        // Sequences start with <s>: written as the post-processor so that transformers and
        // osp (which follows the tokenizer's own rules) both add it.
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [2], "tokens": ["<s>"]}}
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    let config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "model_max_length": 512,
        "clean_up_tokenization_spaces": false
    });
    std::fs::create_dir_all(dir)?;
    crate::io::save_json(&dir.join("tokenizer.json"), &tokenizer)?;
    crate::io::save_json(&dir.join("tokenizer_config.json"), &config)?;
    Ok(n)
}
