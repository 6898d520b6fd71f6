//! Fresh weights for training from scratch, with transformers' Llama initialisation
//! (normal(0, 0.02) matrices, unit norms, zero biases), deterministic in the seed.
use super::config::ModelConfig;
use super::llama::Weights;
use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

pub use crate::random::{normal_vec, uniform_vec};

/// The shapes of every tensor `cfg` implies, under their Hugging Face names.
pub fn parameter_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (d, v, hd) = (cfg.hidden_size, cfg.vocab_size, cfg.head_dim);
    let (q, kv, ff) = (
        cfg.num_attention_heads * hd,
        cfg.num_key_value_heads * hd,
        cfg.intermediate_size,
    );
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, d])];
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        out.push((format!("{p}.input_layernorm.weight"), vec![d]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
        for (name, o, n, bias) in [
            ("self_attn.q_proj", q, d, cfg.attention_bias),
            ("self_attn.k_proj", kv, d, cfg.attention_bias),
            ("self_attn.v_proj", kv, d, cfg.attention_bias),
            ("self_attn.o_proj", d, q, cfg.o_bias),
            ("mlp.gate_proj", ff, d, cfg.mlp_bias),
            ("mlp.up_proj", ff, d, cfg.mlp_bias),
            ("mlp.down_proj", d, ff, cfg.mlp_bias),
        ] {
            out.push((format!("{p}.{name}.weight"), vec![o, n]));
            if bias {
                out.push((format!("{p}.{name}.bias"), vec![o]));
            }
        }
    }
    out.push(("model.norm.weight".to_string(), vec![d]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, d]));
    }
    out
}

/// Random weights: matrices ~ N(0, std²), norm weights 1, biases 0.
pub fn random_weights(cfg: &ModelConfig, seed: u64, std: f32, device: &Device) -> Result<Weights> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut map = HashMap::new();
    for (name, shape) in parameter_shapes(cfg) {
        let n: usize = shape.iter().product();
        let data = if name.ends_with("norm.weight") {
            vec![1f32; n]
        } else if name.ends_with(".bias") {
            vec![0f32; n]
        } else {
            normal_vec(&mut rng, n, std)
        };
        map.insert(name, Tensor::from_vec(data, shape, device)?);
    }
    Ok(Weights::new(map, format!("random init (seed {seed})")))
}
