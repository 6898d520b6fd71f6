//! Helpers shared by the integration tests.
#![allow(dead_code)]
use osp::model::{init::random_weights, Llama, ModelConfig, Trainable};
use std::path::PathBuf;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A file under ../shared/data, or None (with a message) where the folder is absent.
pub fn shared_data(rel: &str) -> Option<PathBuf> {
    let p = repo().join("../shared/data").join(rel);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipping: {} is absent", p.display());
        None
    }
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
