//! Helpers shared by the integration tests.
#![allow(dead_code)]
use osp::model::{init::random_weights, Llama, ModelConfig, Trainable};
use std::path::PathBuf;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Whether a missing ../shared/data file fails the test rather than skipping it: under CI
/// (`CI` set to anything but "" / "0" / "false") or with `OSP_REQUIRE_DATA=1`.
pub fn data_required() -> bool {
    let set = |k: &str| {
        std::env::var(k)
            .is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
    };
    set("CI") || set("OSP_REQUIRE_DATA")
}

/// A file under ../shared/data. Where it is absent the test cannot test anything: under CI
/// (see [`data_required`]) that is a failure; elsewhere this returns None after printing
/// which test skips and why, and the test returns early.
pub fn shared_data(rel: &str) -> Option<PathBuf> {
    let p = repo().join("../shared/data").join(rel);
    if p.exists() {
        return Some(p);
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_string();
    assert!(
        !data_required(),
        "{test}: {} is absent, and CI (or OSP_REQUIRE_DATA=1) requires it: the test would pass without testing",
        p.display()
    );
    eprintln!(
        "SKIPPED {test}: {} is absent (with CI or OSP_REQUIRE_DATA=1 set this fails)",
        p.display()
    );
    None
}

pub fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures").join(name)
}

/// A small config exercising GQA, biases and an untied head.
pub fn tiny_config(model_type: &str, tied: bool) -> ModelConfig {
    let v = serde_json::json!({
        "model_type": model_type,
        "vocab_size": 40,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 128,
        "tie_word_embeddings": tied,
    });
    ModelConfig::from_json(&v).expect("valid tiny config")
}

pub fn tiny_model(model_type: &str, tied: bool, trainable: Trainable, seed: u64) -> Llama {
    let cfg = tiny_config(model_type, tied);
    let w = random_weights(&cfg, seed, 0.2, &candle_core::Device::Cpu).expect("weights");
    Llama::new(&cfg, w, trainable).expect("model")
}

/// Largest absolute element-wise difference of two tensors of one shape.
pub fn max_abs(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    max_abs_value(&(a - b).unwrap())
}

/// Largest absolute element of a tensor.
pub fn max_abs_value(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Words of the tiny run model's vocabulary: the demo's judge-template words and a few more.
pub const TINY_WORDS: &[&str] = &[
    "cat", "dog", "sat", "ran", "on", "mat", "red", "blue", "big", "small", "good", "bad", "yes",
    "no", "very", "and", ".",
];

/// A tiny Hugging Face model folder (word-level tokenizer over [`TINY_WORDS`] and the judge
/// words, random weights) written into `dir`, for fast end-to-end training tests that need
/// no downloaded data.
pub fn tiny_run_model(dir: &std::path::Path, seed: u64) -> PathBuf {
    use osp::demo::tasks::JUDGE_WORDS;
    let words: Vec<String> = JUDGE_WORDS
        .iter()
        .chain(TINY_WORDS)
        .map(|w| w.to_string())
        .collect();
    let n = osp::demo::wordlevel::write_tokenizer(dir, &words).unwrap();
    let cfg = ModelConfig::from_json(&serde_json::json!({
        "model_type": "llama", "vocab_size": n, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 128,
        "tie_word_embeddings": true, "bos_token_id": 2, "eos_token_id": 3,
    }))
    .unwrap();
    let w = random_weights(&cfg, seed, 0.2, &candle_core::Device::Cpu).unwrap();
    let model = Llama::new(&cfg, w, Trainable::None).unwrap();
    let tok = osp::tokenizer::Tokenizer::from_hf_dir(dir).unwrap();
    osp::model::export::save_hf_model(&model, &tok, Some(dir), dir).unwrap();
    dir.to_path_buf()
}

/// Writes `rows` as JSON Lines to `path`.
pub fn write_jsonl(path: &std::path::Path, rows: &[serde_json::Value]) -> PathBuf {
    let text: String = rows.iter().map(|r| r.to_string() + "\n").collect();
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

/// A tiny model and the data every trainer needs (SFT examples, preference pairs with
/// strengths, prompts), written into `dir`: what the resume and crash tests run on.
pub struct RunFiles {
    pub model: PathBuf,
    pub sft: PathBuf,
    pub prefs: PathBuf,
    pub prompts: PathBuf,
}

pub fn tiny_run_files(dir: &std::path::Path, seed: u64) -> RunFiles {
    use serde_json::json;
    let model = tiny_run_model(&dir.join("model"), seed);
    let subjects = ["the cat", "the dog", "the big cat", "the small dog"];
    let sft: Vec<_> = (0..16)
        .map(|i| {
            let completion = [" sat on the mat .", " ran ."][i % 2];
            json!({"prompt": subjects[i % 4], "completion": completion})
        })
        .collect();
    let prefs: Vec<_> = (0..16)
        .map(|i| {
            let (rejected, strength) = [(" bad .", 0.9), (" no no .", 0.7)][i % 2];
            json!({"prompt": subjects[i % 4], "chosen": " very good and yes .",
                   "rejected": rejected, "strength": strength})
        })
        .collect();
    let prompts: Vec<_> = subjects.iter().map(|s| json!({"prompt": s})).collect();
    RunFiles {
        model,
        sft: write_jsonl(&dir.join("sft.jsonl"), &sft),
        prefs: write_jsonl(&dir.join("prefs.jsonl"), &prefs),
        prompts: write_jsonl(&dir.join("prompts.jsonl"), &prompts),
    }
}

/// The additive causal mask of one unpadded sequence of `n` tokens, [1, 1, n, n].
pub fn causal_bias(n: usize, dev: &candle_core::Device) -> candle_core::Tensor {
    let mut b = vec![0f32; n * n];
    for i in 0..n {
        for j in i + 1..n {
            b[i * n + j] = f32::NEG_INFINITY;
        }
    }
    candle_core::Tensor::from_vec(b, (1, 1, n, n), dev).unwrap()
}
