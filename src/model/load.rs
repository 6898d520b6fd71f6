//! Reading checkpoints: Hugging Face folders (single or sharded safetensors), GGUF files and
//! llama2.c `.bin` files. Every error names the file and, where it applies, the tensor.
use super::config::ModelConfig;
use super::llama::{Llama, Trainable, Weights};
use crate::tokenizer::Tokenizer;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// A model with the tokenizer that goes with it.
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    /// What was loaded, for messages ("Hugging Face folder X", "llama2.c checkpoint Y").
    pub source: String,
}

/// Loads `path`: a Hugging Face model folder, or a llama2.c `.bin` whose tokenizer is
/// `tokenizer` or found beside it (`tok<vocab>.bin`, then `tokenizer.bin`).
pub fn load_model(
    path: &Path,
    tokenizer: Option<&Path>,
    device: &Device,
    trainable: Trainable,
) -> Result<LoadedModel> {
    if !path.exists() {
        bail!("model path {} does not exist", path.display());
    }
    let (cfg, weights, tok, source) = if crate::gguf::is_gguf(path) {
        let mut g = crate::gguf::GgufFile::open(path)?;
        let cfg = crate::gguf::weights::read_config(&g)?;
        let tok = match tokenizer {
            Some(t) if t.is_dir() => Tokenizer::from_hf_dir(t)?,
            Some(t) => Tokenizer::from_tokenizer_json(t)?,
            None => gguf_tokenizer(&g)?,
        };
        let weights = crate::gguf::weights::read_weights(&mut g, &cfg, device)?;
        (cfg, weights, tok, format!("GGUF file {}", path.display()))
    } else if path.is_dir() {
        let cfg = ModelConfig::from_file(&path.join("config.json"))?;
        let weights = read_hf_weights(path, device)?;
        let tok = match tokenizer {
            Some(t) if t.is_dir() => Tokenizer::from_hf_dir(t)?,
            Some(t) if t.extension().is_some_and(|e| e == "bin") => {
                Tokenizer::from_llama2c(t, cfg.vocab_size)?
            }
            Some(t) => Tokenizer::from_tokenizer_json(t)?,
            None => Tokenizer::from_hf_dir(path)?,
        };
        (
            cfg,
            weights,
            tok,
            format!("Hugging Face folder {}", path.display()),
        )
    } else {
        let (cfg, weights) = read_llama2c(path, device)?;
        let tok_path = match tokenizer {
            Some(t) => t.to_path_buf(),
            None => find_llama2c_tokenizer(path, cfg.vocab_size)?,
        };
        let tok = Tokenizer::from_llama2c(&tok_path, cfg.vocab_size)?;
        (
            cfg,
            weights,
            tok,
            format!("llama2.c checkpoint {}", path.display()),
        )
    };
    if tok.vocab_size() > cfg.vocab_size {
        bail!(
            "the tokenizer has {} tokens but the model's vocab_size is {} ({source}): they do not belong together",
            tok.vocab_size(),
            cfg.vocab_size
        );
    }
    let model = Llama::new(&cfg, weights, trainable)?;
    Ok(LoadedModel {
        model,
        tokenizer: tok,
        source,
    })
}

/// The tokenizer in a GGUF file's metadata.
pub fn gguf_tokenizer(g: &crate::gguf::GgufFile) -> Result<Tokenizer> {
    let files = crate::gguf::vocab::hf_tokenizer_files(g)?;
    Tokenizer::from_hf_values(&files.tokenizer_json, &files.tokenizer_config, &g.path)
}

/// The llama2.c tokenizer beside a checkpoint: `tok<vocab>.bin`, then `tokenizer.bin`.
pub fn find_llama2c_tokenizer(model: &Path, vocab: usize) -> Result<PathBuf> {
    let dir = model.parent().unwrap_or(Path::new("."));
    for name in [format!("tok{vocab}.bin"), "tokenizer.bin".to_string()] {
        let p = dir.join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!(
        "no tokenizer beside {} (looked for tok{vocab}.bin and tokenizer.bin); pass --tokenizer",
        model.display()
    )
}

/// All tensors of a Hugging Face folder: `model.safetensors` or the shards listed by
/// `model.safetensors.index.json`.
pub fn read_hf_weights(dir: &Path, device: &Device) -> Result<Weights> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if single.exists() {
        vec![single]
    } else if index.exists() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("cannot read {}", index.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| anyhow!("{}: no `weight_map` object", index.display()))?;
        let mut shards = BTreeSet::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| {
                anyhow!(
                    "{}: `weight_map.{name}` is not a file name",
                    index.display()
                )
            })?;
            shards.insert(file.to_string());
        }
        shards.into_iter().map(|f| dir.join(f)).collect()
    } else {
        bail!(
            "{} has neither model.safetensors nor model.safetensors.index.json",
            dir.display()
        );
    };
    let mut map = HashMap::new();
    for f in &files {
        for (name, t) in read_safetensors(f, device)? {
            if map.insert(name.clone(), t).is_some() {
                bail!(
                    "tensor `{name}` appears in more than one shard ({})",
                    f.display()
                );
            }
        }
    }
    Ok(Weights::new(map, dir.display().to_string()))
}

/// Reads every tensor of one safetensors file as f32 (f16/bf16 are widened).
pub fn read_safetensors(path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: the mapping is read-only and dropped before this function returns; a file
    // truncated underneath us is the only hazard, as with any mmap reader.
    let mmap = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("cannot map {}", path.display()))?;
    let st = SafeTensors::deserialize(&mmap).map_err(|e| {
        anyhow!(
            "{} is not a valid safetensors file (truncated or corrupt?): {e}",
            path.display()
        )
    })?;
    let mut out = Vec::new();
    let mut views = st.tensors();
    views.sort_by(|a, b| a.0.cmp(&b.0)); // deterministic order for callers that iterate
    for (name, view) in views {
        let shape = view.shape().to_vec();
        let data = view.data();
        let t =
            match view.dtype() {
                Dtype::F32 => Tensor::from_raw_buffer(data, DType::F32, &shape, device)?,
                Dtype::F16 => Tensor::from_raw_buffer(data, DType::F16, &shape, device)?
                    .to_dtype(DType::F32)?,
                Dtype::BF16 => Tensor::from_raw_buffer(data, DType::BF16, &shape, device)?
                    .to_dtype(DType::F32)?,
                other => bail!(
                    "{}: tensor `{name}` has dtype {other:?}; expected a float type",
                    path.display()
                ),
            };
        out.push((name, t));
    }
    Ok(out)
}

/// Reads a llama2.c legacy float32 checkpoint and renames its weights to Hugging Face names.
/// llama2.c rotates interleaved pairs (2i, 2i+1) where transformers rotates halves (i, i+d/2),
/// so the rows of wq and wk are permuted within each head to keep the same function.
pub fn read_llama2c(path: &Path, device: &Device) -> Result<(ModelConfig, Weights)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() < 28 {
        bail!(
            "{}: too short for a llama2.c header ({} bytes)",
            path.display(),
            bytes.len()
        );
    }
    let header: Vec<i32> = bytes[..28]
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let [dim, hidden, layers, heads, kv_heads, vocab, seq_len] = header[..] else {
        unreachable!("seven header fields")
    };
    if [dim, hidden, layers, heads, kv_heads, seq_len]
        .iter()
        .any(|&x| x <= 0)
        || vocab == 0
    {
        bail!(
            "{}: not a llama2.c checkpoint (header {header:?})",
            path.display()
        );
    }
    let shared = vocab > 0;
    let (dim, hidden, layers, heads, kv_heads, vocab, seq_len) = (
        dim as usize,
        hidden as usize,
        layers as usize,
        heads as usize,
        kv_heads as usize,
        vocab.unsigned_abs() as usize,
        seq_len as usize,
    );
    if dim % heads != 0 || heads % kv_heads != 0 {
        bail!(
            "{}: inconsistent header (dim {dim}, heads {heads}, kv heads {kv_heads})",
            path.display()
        );
    }
    let hd = dim / heads;
    let kv_dim = kv_heads * hd;
    let cfg = ModelConfig {
        model_type: "llama2.c".into(),
        vocab_size: vocab,
        hidden_size: dim,
        intermediate_size: hidden,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim: hd,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: seq_len,
        tie_word_embeddings: shared,
        attention_bias: false,
        o_bias: false,
        mlp_bias: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    };
    cfg.validate()
        .with_context(|| format!("in {}", path.display()))?;
    let expected = llama2c_floats(dim, hidden, layers, kv_dim, vocab, seq_len, hd, shared)
        .with_context(|| {
            format!(
                "{}: the header's sizes overflow (header {header:?}): not a llama2.c checkpoint",
                path.display()
            )
        })?;
    let have = (bytes.len() - 28) / 4;
    if have < expected {
        bail!(
            "{}: truncated: the header implies {expected} floats of weights, the file holds {have}",
            path.display()
        );
    }
    if bytes.len() - 28 != expected * 4 {
        bail!(
            "{}: {} bytes after the {expected} floats of weights the header implies: \
             not a llama2.c checkpoint of this header (or a corrupt one)",
            path.display(),
            bytes.len() - 28 - expected * 4
        );
    }
    let floats: Vec<f32> = bytes[28..28 + expected * 4]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mut off = 0;
    let mut next = |n: usize| {
        let s = &floats[off..off + n];
        off += n;
        s.to_vec()
    };
    let mut map: HashMap<String, Tensor> = HashMap::new();
    let mut put = |name: String, data: Vec<f32>, shape: &[usize]| -> Result<()> {
        map.insert(name, Tensor::from_vec(data, shape, device)?);
        Ok(())
    };
    let l = |i: usize, s: &str| format!("model.layers.{i}.{s}");
    put(
        "model.embed_tokens.weight".into(),
        next(vocab * dim),
        &[vocab, dim],
    )?;
    let rms_att = next(layers * dim);
    let wq = next(layers * dim * dim);
    let wk = next(layers * kv_dim * dim);
    let wv = next(layers * kv_dim * dim);
    let wo = next(layers * dim * dim);
    let rms_ffn = next(layers * dim);
    let w1 = next(layers * hidden * dim);
    let w2 = next(layers * dim * hidden);
    let w3 = next(layers * hidden * dim);
    let rms_final = next(dim);
    let _rope_tables = next(seq_len * hd); // freq_cis_real and _imag: recomputed instead
    let wcls = if shared {
        None
    } else {
        Some(next(vocab * dim))
    };
    for i in 0..layers {
        let chunk = |v: &[f32], n: usize| v[i * n..(i + 1) * n].to_vec();
        put(l(i, "input_layernorm.weight"), chunk(&rms_att, dim), &[dim])?;
        let q = interleaved_to_halves(&chunk(&wq, dim * dim), heads, hd, dim);
        put(l(i, "self_attn.q_proj.weight"), q, &[dim, dim])?;
        let k = interleaved_to_halves(&chunk(&wk, kv_dim * dim), kv_heads, hd, dim);
        put(l(i, "self_attn.k_proj.weight"), k, &[kv_dim, dim])?;
        put(
            l(i, "self_attn.v_proj.weight"),
            chunk(&wv, kv_dim * dim),
            &[kv_dim, dim],
        )?;
        put(
            l(i, "self_attn.o_proj.weight"),
            chunk(&wo, dim * dim),
            &[dim, dim],
        )?;
        put(
            l(i, "post_attention_layernorm.weight"),
            chunk(&rms_ffn, dim),
            &[dim],
        )?;
        put(
            l(i, "mlp.gate_proj.weight"),
            chunk(&w1, hidden * dim),
            &[hidden, dim],
        )?;
        put(
            l(i, "mlp.down_proj.weight"),
            chunk(&w2, dim * hidden),
            &[dim, hidden],
        )?;
        put(
            l(i, "mlp.up_proj.weight"),
            chunk(&w3, hidden * dim),
            &[hidden, dim],
        )?;
    }
    put("model.norm.weight".into(), rms_final, &[dim])?;
    if let Some(w) = wcls {
        put("lm_head.weight".into(), w, &[vocab, dim])?;
    }
    Ok((cfg, Weights::new(map, path.display().to_string())))
}

/// Floats of weights a llama2.c header implies, or None when the sizes overflow (a corrupt
/// header must not wrap around into a small, plausible size).
#[allow(clippy::too_many_arguments)]
fn llama2c_floats(
    dim: usize,
    hidden: usize,
    layers: usize,
    kv_dim: usize,
    vocab: usize,
    seq_len: usize,
    hd: usize,
    shared: bool,
) -> Option<usize> {
    let mul = |a: usize, b: usize| a.checked_mul(b);
    let per_layer = [
        mul(2, dim)?,
        mul(mul(dim, dim)?, 2)?,
        mul(mul(dim, kv_dim)?, 2)?,
        mul(mul(3, dim)?, hidden)?,
    ]
    .into_iter()
    .try_fold(0usize, usize::checked_add)?;
    let embed = mul(vocab, dim)?;
    [
        embed,
        mul(layers, per_layer)?,
        dim,
        mul(seq_len, hd)?,
        if shared { 0 } else { embed },
    ]
    .into_iter()
    .try_fold(0usize, usize::checked_add)
    .filter(|&n| n.checked_mul(4).is_some())
}

/// Reorders the rows of a [heads·hd, cols] projection from llama2.c's interleaved rotary pairs
/// to transformers' halves: new row j < hd/2 is old row 2j, new row hd/2 + j is old row 2j + 1.
pub(crate) fn interleaved_to_halves(w: &[f32], heads: usize, hd: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    let half = hd / 2;
    for h in 0..heads {
        for j in 0..hd {
            let old = if j < half { 2 * j } else { 2 * (j - half) + 1 };
            let (dst, src) = ((h * hd + j) * cols, (h * hd + old) * cols);
            out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
        }
    }
    out
}
