//! The tokenizer in a GGUF file's metadata, written as the Hugging Face `tokenizer.json` and
//! `tokenizer_config.json` that describe it (so osp loads it as a `tokenizers` tokenizer and
//! `osp export` can hand the same files to transformers).
//!
//! - `gpt2`: byte-level BPE (`tokenizer.ggml.tokens`, `.merges`); the pre-tokenizer is the
//!   one `tokenizer.ggml.pre` names (llama.cpp's table in llama-vocab.cpp): `default`/`gpt2`
//!   (GPT-2's split), `smollm` (digits one by one, then GPT-2's split), `llama-bpe` (Llama
//!   3's split). Other names are refused: a wrong split silently changes every id.
//! - `llama`: SentencePiece-style (`tokens`, `scores`, byte pieces `<0xXX>`), written as
//!   transformers writes Llama tokenizers: BPE with byte fallback, merges ranked by the score
//!   of the merged piece, "▁" for spaces and a dummy-prefix space when
//!   `tokenizer.ggml.add_space_prefix` (default true) says so.
//!
//! Control tokens (token_type 3) and user-defined ones (4) become added tokens, matched in
//! text as wholes; control tokens are special (skipped when decoding).
use super::GgufFile;
use anyhow::{bail, Result};
use serde_json::{json, Map, Value};
use std::collections::HashMap;

/// What the metadata says about the tokenizer, as Hugging Face files.
pub struct HfTokenizerFiles {
    pub tokenizer_json: Value,
    pub tokenizer_config: Value,
    /// Whether a sequence starts with BOS (`tokenizer.ggml.add_bos_token`; when absent,
    /// llama.cpp's default: yes for `llama` vocabularies, no for `gpt2` ones).
    pub add_bos: bool,
}

const TYPE_NORMAL: i64 = 1;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

/// The pre-tokenizer for `tokenizer.ggml.pre`.
fn gpt2_pre_tokenizer(g: &GgufFile) -> Result<Value> {
    let pre = g.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false},
            byte_level(false)]}),
        other => bail!(
            "{}: metadata key `tokenizer.ggml.pre`: pre-tokenizer \"{other}\" is not supported \
             (default, gpt2, smollm, llama-bpe); its split rules decide every token id",
            g.path.display()
        ),
    })
}

/// Builds the Hugging Face files for the tokenizer in `g`'s metadata.
pub fn hf_tokenizer_files(g: &GgufFile) -> Result<HfTokenizerFiles> {
    let path = g.path.display().to_string();
    let model = g.req_str("tokenizer.ggml.model")?;
    let tokens = g.opt_str_array("tokenizer.ggml.tokens")?.ok_or_else(|| {
        anyhow::anyhow!("{path}: metadata key `tokenizer.ggml.tokens` is missing")
    })?;
    let n = tokens.len();
    let types = match g.opt_i64_array("tokenizer.ggml.token_type")? {
        Some(t) if t.len() != n => bail!(
            "{path}: metadata key `tokenizer.ggml.token_type` has {} entries for {n} tokens",
            t.len()
        ),
        Some(t) => t,
        None => vec![TYPE_NORMAL; n],
    };
    let id_key = |key: &str| -> Result<Option<u32>> {
        match g.opt_usize(key)? {
            Some(id) if id >= n => {
                bail!("{path}: metadata key `{key}`: token id {id} is out of range ({n} tokens)")
            }
            Some(id) => Ok(Some(id as u32)),
            None => Ok(None),
        }
    };
    let bos = id_key("tokenizer.ggml.bos_token_id")?;
    let eos = id_key("tokenizer.ggml.eos_token_id")?;
    let pad = id_key("tokenizer.ggml.padding_token_id")?;
    let unk = id_key("tokenizer.ggml.unknown_token_id")?;

    let mut vocab = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        // A duplicated piece keeps its first id, as llama.cpp's text-to-token map does.
        vocab.entry(t.to_string()).or_insert(json!(i));
    }
    let mut added = Vec::new();
    for (i, (t, &ty)) in tokens.iter().zip(&types).enumerate() {
        let special = ty == TYPE_CONTROL || [bos, eos, pad, unk].contains(&Some(i as u32));
        if special || ty == TYPE_USER_DEFINED {
            added.push(
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": special}),
            );
        }
    }
    let (add_bos_default, body) = match model {
        "gpt2" => {
            let merges = g.opt_str_array("tokenizer.ggml.merges")?.ok_or_else(|| {
                anyhow::anyhow!("{path}: metadata key `tokenizer.ggml.merges` is missing (a gpt2 vocabulary needs them)")
            })?;
            for (i, m) in merges.iter().enumerate() {
                if m.split(' ').count() != 2 {
                    bail!("{path}: metadata key `tokenizer.ggml.merges`: entry {i} {m:?} is not two pieces separated by one space");
                }
            }
            let body = json!({
                "normalizer": null,
                "pre_tokenizer": gpt2_pre_tokenizer(g)?,
                "decoder": byte_level(true),
                "model": {"type": "BPE", "dropout": null, "unk_token": null,
                          "continuing_subword_prefix": null, "end_of_word_suffix": null,
                          "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                          "vocab": vocab, "merges": merges},
            });
            (false, body)
        }
        "llama" => {
            let scores = g.opt_f32_array("tokenizer.ggml.scores")?.ok_or_else(|| {
                anyhow::anyhow!("{path}: metadata key `tokenizer.ggml.scores` is missing (a llama vocabulary needs them)")
            })?;
            if scores.len() != n {
                bail!("{path}: metadata key `tokenizer.ggml.scores` has {} entries for {n} tokens", scores.len());
            }
            let prefix = g.opt_bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
            let mut normalizers = vec![];
            if prefix {
                normalizers.push(json!({"type": "Prepend", "prepend": "▁"}));
            }
            normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
            let mut decoders = vec![
                json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if prefix {
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            let unk_text = unk.map(|u| tokens[u as usize].to_string());
            let body = json!({
                "normalizer": {"type": "Sequence", "normalizers": normalizers},
                "pre_tokenizer": null,
                "decoder": {"type": "Sequence", "decoders": decoders},
                "model": {"type": "BPE", "dropout": null, "unk_token": unk_text,
                          "continuing_subword_prefix": null, "end_of_word_suffix": null,
                          "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                          "vocab": vocab, "merges": spm_merges(&tokens, &scores, &types)},
            });
            (true, body)
        }
        other => bail!(
            "{path}: metadata key `tokenizer.ggml.model`: \"{other}\" is not supported (gpt2, llama)"
        ),
    };
    let add_bos = g
        .opt_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(add_bos_default);
    let add_eos = g.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    if add_bos && bos.is_none() {
        bail!("{path}: metadata key `tokenizer.ggml.add_bos_token` is true but `tokenizer.ggml.bos_token_id` is missing");
    }
    // transformers adds BOS through the post-processor; write it so that both agree.
    let post = match bos.filter(|_| add_bos) {
        Some(b) => {
            let bt = tokens[b as usize];
            json!({"type": "TemplateProcessing",
                   "single": [{"SpecialToken": {"id": bt, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                   "pair": [{"SpecialToken": {"id": bt, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                            {"Sequence": {"id": "B", "type_id": 1}}],
                   "special_tokens": {bt: {"id": bt, "ids": [b], "tokens": [bt]}}})
        }
        None => Value::Null,
    };
    let mut tj = json!({"version": "1.0", "truncation": null, "padding": null,
                        "added_tokens": added, "post_processor": post});
    for (k, v) in body.as_object().into_iter().flatten() {
        tj[k] = v.clone();
    }
    let name = |id: Option<u32>| id.map(|i| Value::from(tokens[i as usize]));
    let mut cfg = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": false,
        "model_max_length": g.opt_usize(&format!("{}.context_length", g.opt_str("general.architecture")?.unwrap_or("llama")))?.unwrap_or(2048),
    });
    for (field, id) in [
        ("bos_token", bos),
        ("eos_token", eos),
        ("pad_token", pad),
        ("unk_token", unk),
    ] {
        if let Some(v) = name(id) {
            cfg[field] = v;
        }
    }
    if let Some(t) = g.opt_str("tokenizer.chat_template")? {
        cfg["chat_template"] = t.into();
    }
    Ok(HfTokenizerFiles {
        tokenizer_json: tj,
        tokenizer_config: cfg,
        add_bos,
    })
}

/// BPE merges that reproduce SentencePiece's highest-score-first merging: every split of a
/// normal piece into two pieces of the vocabulary, ranked by the merged piece's score
/// (ties: lower merged id, then lower left id).
fn spm_merges(tokens: &[&str], scores: &[f32], types: &[i64]) -> Vec<Value> {
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .rev()
        .map(|(i, t)| (*t, i))
        .collect();
    let mut merges: Vec<(f32, usize, usize, &str, &str)> = Vec::new();
    for (m, piece) in tokens.iter().enumerate() {
        if types[m] != TYPE_NORMAL || piece.chars().count() < 2 {
            continue;
        }
        for (cut, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(cut);
            if let (Some(&li), Some(_)) = (ids.get(l), ids.get(r)) {
                merges.push((scores[m], m, li, l, r));
            }
        }
    }
    merges.sort_by(|a, b| {
        b.0.partial_cmp(&a.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
    });
    merges
        .into_iter()
        .map(|(_, _, _, l, r)| json!([l, r]))
        .collect()
}
