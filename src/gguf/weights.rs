//! The model in a GGUF file: hyper-parameters from the `<arch>.*` metadata keys, tensors
//! renamed from llama.cpp's names to Hugging Face's and dequantised to f32.
//!
//! llama.cpp's converter permutes the rows of q and k in every head of a `llama` model from
//! transformers' "rotate halves" layout to its own interleaved pairs (convert_hf_to_gguf.py,
//! `permute`): GGUF row 2j + c of a head is Hugging Face row c·hd/2 + j. Reading undoes it.
//! `qwen2` files are written without the permutation.
use super::GgufFile;
use crate::model::{ModelConfig, Weights};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;

/// Architectures osp reads, and whether their q/k rows carry llama.cpp's permutation.
fn arch_permutes(arch: &str) -> Option<bool> {
    match arch {
        "llama" | "mistral" => Some(true),
        "qwen2" => Some(false),
        _ => None,
    }
}

/// The model's configuration from the metadata.
pub fn read_config(g: &GgufFile) -> Result<ModelConfig> {
    let arch = g.req_str("general.architecture")?.to_string();
    if arch_permutes(&arch).is_none() {
        bail!(
            "{}: metadata key `general.architecture`: \"{arch}\" is not supported (llama, mistral, qwen2)",
            g.path.display()
        );
    }
    let k = |s: &str| format!("{arch}.{s}");
    if let Some(kind) = g.opt_str(&k("rope.scaling.type"))? {
        if kind != "none" {
            bail!(
                "{}: metadata key `{}`: rope scaling \"{kind}\" is not supported; only plain rotary embeddings are",
                g.path.display(),
                k("rope.scaling.type")
            );
        }
    }
    if g.opt_usize(&k("expert_count"))?.unwrap_or(0) > 0 {
        bail!(
            "{}: metadata key `{}`: mixture-of-experts models are not supported",
            g.path.display(),
            k("expert_count")
        );
    }
    if g.opt_usize(&k("attention.sliding_window"))?.is_some() {
        bail!(
            "{}: metadata key `{}`: sliding-window attention is not supported",
            g.path.display(),
            k("attention.sliding_window")
        );
    }
    let hidden = g.req_usize(&k("embedding_length"))?;
    let heads = g.req_usize(&k("attention.head_count"))?;
    let kv_heads = g.opt_usize(&k("attention.head_count_kv"))?.unwrap_or(heads);
    if heads == 0 || !hidden.is_multiple_of(heads) {
        bail!(
            "{}: metadata keys `{}` ({heads}) and `{}` ({hidden}): the heads do not divide the width",
            g.path.display(),
            k("attention.head_count"),
            k("embedding_length")
        );
    }
    let head_dim = g
        .opt_usize(&k("attention.key_length"))?
        .unwrap_or(hidden / heads);
    if let Some(v) = g.opt_usize(&k("attention.value_length"))? {
        if v != head_dim {
            bail!(
                "{}: metadata key `{}`: value heads of {v} differ from key heads of {head_dim}; not supported",
                g.path.display(),
                k("attention.value_length")
            );
        }
    }
    if let Some(r) = g.opt_usize(&k("rope.dimension_count"))? {
        if r != head_dim {
            bail!(
                "{}: metadata key `{}`: rotary embeddings on {r} of {head_dim} head dimensions (partial rotary) are not supported",
                g.path.display(),
                k("rope.dimension_count")
            );
        }
    }
    let vocab = match g.opt_usize(&k("vocab_size"))? {
        Some(v) => v,
        None => match g.shape("token_embd.weight") {
            Some([v, _]) => *v,
            _ => bail!(
                "{}: metadata key `{}` is missing and there is no 2-D `token_embd.weight` to read it from",
                g.path.display(),
                k("vocab_size")
            ),
        },
    };
    let eos = g.opt_usize("tokenizer.ggml.eos_token_id")?;
    let cfg = ModelConfig {
        model_type: if arch == "mistral" {
            "mistral".into()
        } else {
            arch.clone()
        },
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: g.req_usize(&k("feed_forward_length"))?,
        num_hidden_layers: g.req_usize(&k("block_count"))?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: g.req_f64(&k("attention.layer_norm_rms_epsilon"))?,
        rope_theta: g.opt_f64(&k("rope.freq_base"))?.unwrap_or(10000.0),
        max_position_embeddings: g.opt_usize(&k("context_length"))?.unwrap_or(2048),
        tie_word_embeddings: g.shape("output.weight").is_none(),
        attention_bias: arch == "qwen2",
        o_bias: false,
        mlp_bias: false,
        bos_token_id: g
            .opt_usize("tokenizer.ggml.bos_token_id")?
            .map(|x| x as u32),
        eos_token_ids: eos.map(|x| x as u32).into_iter().collect(),
    };
    cfg.validate()
        .map_err(|e| anyhow::anyhow!("{}: {e:#}", g.path.display()))?;
    Ok(cfg)
}

/// Every tensor, renamed to Hugging Face names, shape-checked against `cfg`, dequantised
/// to f32, with q/k rows put back in transformers' order.
pub fn read_weights(g: &mut GgufFile, cfg: &ModelConfig, device: &Device) -> Result<Weights> {
    let permute = arch_permutes(&cfg.model_type).unwrap_or(false);
    let (d, hd, ff) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (q, kv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
    // (GGUF name, HF name, shape, heads whose rows are permuted)
    let mut plan: Vec<(String, String, Vec<usize>, Option<usize>)> = vec![
        (
            "token_embd.weight".into(),
            "model.embed_tokens.weight".into(),
            vec![cfg.vocab_size, d],
            None,
        ),
        (
            "output_norm.weight".into(),
            "model.norm.weight".into(),
            vec![d],
            None,
        ),
    ];
    if !cfg.tie_word_embeddings {
        plan.push((
            "output.weight".into(),
            "lm_head.weight".into(),
            vec![cfg.vocab_size, d],
            None,
        ));
    }
    let (qh, kh) = if permute {
        (Some(cfg.num_attention_heads), Some(cfg.num_key_value_heads))
    } else {
        (None, None)
    };
    for i in 0..cfg.num_hidden_layers {
        let b = |s: &str| format!("blk.{i}.{s}");
        let m = |s: &str| format!("model.layers.{i}.{s}");
        let mut add = |g: String, h: String, shape: Vec<usize>, heads: Option<usize>| {
            plan.push((g, h, shape, heads))
        };
        add(
            b("attn_norm.weight"),
            m("input_layernorm.weight"),
            vec![d],
            None,
        );
        add(
            b("ffn_norm.weight"),
            m("post_attention_layernorm.weight"),
            vec![d],
            None,
        );
        add(
            b("attn_q.weight"),
            m("self_attn.q_proj.weight"),
            vec![q, d],
            qh,
        );
        add(
            b("attn_k.weight"),
            m("self_attn.k_proj.weight"),
            vec![kv, d],
            kh,
        );
        add(
            b("attn_v.weight"),
            m("self_attn.v_proj.weight"),
            vec![kv, d],
            None,
        );
        add(
            b("attn_output.weight"),
            m("self_attn.o_proj.weight"),
            vec![d, q],
            None,
        );
        add(
            b("ffn_gate.weight"),
            m("mlp.gate_proj.weight"),
            vec![ff, d],
            None,
        );
        add(
            b("ffn_up.weight"),
            m("mlp.up_proj.weight"),
            vec![ff, d],
            None,
        );
        add(
            b("ffn_down.weight"),
            m("mlp.down_proj.weight"),
            vec![d, ff],
            None,
        );
        if cfg.attention_bias {
            add(b("attn_q.bias"), m("self_attn.q_proj.bias"), vec![q], qh);
            add(b("attn_k.bias"), m("self_attn.k_proj.bias"), vec![kv], kh);
            add(b("attn_v.bias"), m("self_attn.v_proj.bias"), vec![kv], None);
        }
    }
    let path = g.path.display().to_string();
    // Tensors osp would silently ignore change the model (e.g. llama 3.1's `rope_freqs`).
    let mut extra: Vec<&String> = g
        .content
        .tensor_infos
        .keys()
        .filter(|n| !plan.iter().any(|(gn, ..)| gn == *n))
        .collect();
    extra.sort();
    if let Some(n) = extra.first() {
        bail!(
            "{path}: tensor `{n}` is not part of a {} model osp can run",
            cfg.model_type
        );
    }
    for (gn, _, shape, _) in &plan {
        match g.shape(gn) {
            None => bail!("{path}: tensor `{gn}` is missing"),
            Some(s) if s != shape.as_slice() => {
                bail!("{path}: tensor `{gn}` has shape {s:?}, but the metadata implies {shape:?}")
            }
            Some(_) => {}
        }
    }
    let mut map = HashMap::new();
    for (gn, hn, shape, heads) in plan {
        let mut t = g.tensor(&gn, device)?;
        if let Some(h) = heads {
            t = unpermute_rows(&t, h, &shape)?;
        }
        map.insert(hn, t);
    }
    Ok(Weights::new(map, path))
}

/// Undoes llama.cpp's `permute` on a [heads·hd, ...] weight or a [heads·hd] bias: row
/// c·hd/2 + j of each head comes from GGUF row 2j + c.
fn unpermute_rows(t: &Tensor, heads: usize, shape: &[usize]) -> Result<Tensor> {
    let rows = shape[0];
    let cols: usize = shape[1..].iter().product();
    let hd = rows / heads;
    // [heads, hd/2, 2, cols] -> [heads, 2, hd/2, cols]
    Ok(t.reshape((heads, hd / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(shape)?)
}
