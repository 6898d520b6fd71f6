//! Model configuration: the subset of a Hugging Face `config.json` that a Llama-family decoder
//! needs, parsed field by field so that a wrong type or an unsupported option is reported by name.
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::Value;
use std::path::Path;

/// Architecture hyper-parameters shared by llama, mistral, qwen2 and llama2.c checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelConfig {
    /// `model_type` of the source checkpoint ("llama", "mistral", "qwen2" or "llama2.c").
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Per-head width; Hugging Face's default is hidden_size / num_attention_heads.
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    /// The LM head shares the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// Biases on the q/k/v projections (qwen2 always; llama with `attention_bias`).
    pub attention_bias: bool,
    /// Bias on the o projection (llama's `attention_bias` covers o_proj too; qwen2 has none).
    pub o_bias: bool,
    /// Biases on gate/up/down (llama's `mlp_bias`).
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read model config {}", path.display()))?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        Self::from_json(&v).with_context(|| format!("in model config {}", path.display()))
    }

    /// Parses a config object; every refusal names the offending field.
    pub fn from_json(v: &Value) -> Result<Self> {
        let f = Fields(v);
        let model_type = f.string("model_type")?.unwrap_or_default();
        if !matches!(model_type.as_str(), "llama" | "mistral" | "qwen2") {
            bail!("field `model_type`: \"{model_type}\" is not supported (llama, mistral, qwen2)");
        }
        let act = f.string("hidden_act")?.unwrap_or_else(|| "silu".into());
        if act != "silu" {
            bail!("field `hidden_act`: activation \"{act}\" is not supported (only silu)");
        }
        // transformers < 5 writes `rope_theta` and `rope_scaling`; transformers 5 writes
        // `rope_parameters: {rope_type, rope_theta, ...}`. Read both; refuse any scaling.
        let rope_params = v.get("rope_parameters").filter(|r| !r.is_null());
        for (field, rs) in [
            ("rope_scaling", v.get("rope_scaling")),
            ("rope_parameters", rope_params),
        ] {
            let Some(rs) = rs.filter(|r| !r.is_null()) else {
                continue;
            };
            let kind = rs
                .get("rope_type")
                .or_else(|| rs.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            if kind != "default" {
                bail!("field `{field}`: rope scaling \"{kind}\" is not supported; only plain rotary embeddings are");
            }
        }
        let nested_theta = match rope_params.and_then(|r| r.get("rope_theta")) {
            None => None,
            Some(t) => Some(t.as_f64().ok_or_else(|| {
                anyhow!("field `rope_parameters.rope_theta`: expected a number, found {t}")
            })?),
        };
        let rope_theta = match (f.f64("rope_theta")?, nested_theta) {
            (Some(a), Some(b)) if a != b => {
                bail!("fields `rope_theta` ({a}) and `rope_parameters.rope_theta` ({b}) disagree")
            }
            (a, b) => a.or(b).unwrap_or(10000.0),
        };
        // Sliding-window attention changes which keys are visible; refusing is safer than
        // silently attending to the whole context.
        let sliding = match model_type.as_str() {
            "qwen2" => f.bool("use_sliding_window")?.unwrap_or(false),
            "mistral" => !v.get("sliding_window").map(Value::is_null).unwrap_or(true),
            _ => false,
        };
        if sliding {
            bail!("field `sliding_window`: sliding-window attention is not supported; use a checkpoint with sliding_window null");
        }
        let hidden_size = f.req_usize("hidden_size")?;
        let heads = f.req_usize("num_attention_heads")?;
        let kv_heads = f.usize("num_key_value_heads")?.unwrap_or(heads);
        let head_dim = match f.usize("head_dim")? {
            Some(h) => h,
            None => {
                if heads == 0 || !hidden_size.is_multiple_of(heads) {
                    bail!("field `num_attention_heads`: {heads} does not divide hidden_size {hidden_size}");
                }
                hidden_size / heads
            }
        };
        let attention_bias = f.bool("attention_bias")?.unwrap_or(false);
        let eos_token_ids = match v.get("eos_token_id") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_u64()
                        .map(|x| x as u32)
                        .ok_or_else(|| anyhow!("field `eos_token_id`: expected integers"))
                })
                .collect::<Result<_>>()?,
            Some(_) => vec![f.req_usize("eos_token_id")? as u32],
        };
        let cfg = Self {
            vocab_size: f.req_usize("vocab_size")?,
            hidden_size,
            intermediate_size: f.req_usize("intermediate_size")?,
            num_hidden_layers: f.req_usize("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: f.f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            max_position_embeddings: f.usize("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: f.bool("tie_word_embeddings")?.unwrap_or(false),
            attention_bias: attention_bias || model_type == "qwen2",
            o_bias: attention_bias && model_type == "llama",
            mlp_bias: f.bool("mlp_bias")?.unwrap_or(false),
            bos_token_id: f.usize("bos_token_id")?.map(|x| x as u32),
            eos_token_ids,
            model_type,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Shape checks that would otherwise surface as an obscure matmul error.
    pub fn validate(&self) -> Result<()> {
        let nonzero = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ];
        for (name, value) in nonzero {
            if value == 0 {
                bail!("field `{name}` must be positive");
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            bail!(
                "field `num_key_value_heads`: {} does not divide num_attention_heads {}",
                self.num_key_value_heads,
                self.num_attention_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!(
                "field `head_dim`: rotary embeddings need an even head size, got {}",
                self.head_dim
            );
        }
        if self.rope_theta.is_nan() || self.rope_theta <= 0.0 {
            bail!("field `rope_theta` must be positive");
        }
        if self
            .checked_num_parameters()
            .and_then(|n| n.checked_mul(4))
            .is_none()
        {
            bail!(
                "the sizes (vocab_size {}, hidden_size {}, intermediate_size {}, {} layers, \
                 head_dim {}) overflow: not a real model's config",
                self.vocab_size,
                self.hidden_size,
                self.intermediate_size,
                self.num_hidden_layers,
                self.head_dim
            );
        }
        Ok(())
    }

    /// Number of parameters, counting a tied LM head once (`validate` guarantees it fits).
    pub fn num_parameters(&self) -> usize {
        self.checked_num_parameters().unwrap_or(usize::MAX)
    }

    /// Number of parameters, or None when a size computed from the config overflows (every
    /// tensor size is a term of this sum, so it bounds them all).
    pub fn checked_num_parameters(&self) -> Option<usize> {
        let (d, h, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let mul = |a: usize, b: usize| a.checked_mul(b);
        let sum = |xs: &[usize]| xs.iter().try_fold(0usize, |a, &b| a.checked_add(b));
        let q = mul(self.num_attention_heads, hd)?;
        let kv = mul(self.num_key_value_heads, hd)?;
        let attn = sum(&[
            mul(d, q)?,
            mul(mul(2, d)?, kv)?,
            mul(q, d)?,
            if self.attention_bias {
                sum(&[q, mul(2, kv)?])?
            } else {
                0
            },
            if self.o_bias { d } else { 0 },
        ])?;
        let mlp = sum(&[
            mul(mul(3, d)?, h)?,
            if self.mlp_bias {
                sum(&[mul(2, h)?, d])?
            } else {
                0
            },
        ])?;
        let layer = sum(&[attn, mlp, mul(2, d)?])?;
        let embed = mul(self.vocab_size, d)?;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        sum(&[embed, mul(self.num_hidden_layers, layer)?, d, head])
    }

    /// A config.json that transformers reads back as this architecture.
    pub fn to_hf_json(&self) -> Value {
        let model_type = if self.model_type == "llama2.c" {
            "llama"
        } else {
            &self.model_type
        };
        let arch = match model_type {
            "qwen2" => "Qwen2ForCausalLM",
            "mistral" => "MistralForCausalLM",
            _ => "LlamaForCausalLM",
        };
        let mut v = serde_json::json!({
            "architectures": [arch],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": match self.eos_token_ids.as_slice() {
                [] => Value::Null,
                [one] => (*one).into(),
                many => many.into(),
            },
        });
        if model_type == "llama" {
            v["attention_bias"] = self.attention_bias.into();
            v["mlp_bias"] = self.mlp_bias.into();
        }
        if model_type == "mistral" {
            v["sliding_window"] = Value::Null;
        }
        v
    }
}

/// Typed accessors that name the field in every error.
struct Fields<'a>(&'a Value);

impl Fields<'_> {
    fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }
    fn usize(&self, name: &str) -> Result<Option<usize>> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
                anyhow!("field `{name}`: expected a non-negative integer, found {v}")
            }),
        }
    }
    fn req_usize(&self, name: &str) -> Result<usize> {
        self.usize(name)?
            .ok_or_else(|| anyhow!("field `{name}` is missing"))
    }
    fn f64(&self, name: &str) -> Result<Option<f64>> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| anyhow!("field `{name}`: expected a number, found {v}")),
        }
    }
    fn bool(&self, name: &str) -> Result<Option<bool>> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| anyhow!("field `{name}`: expected true or false, found {v}")),
        }
    }
    fn string(&self, name: &str) -> Result<Option<String>> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(|s| Some(s.to_string()))
                .ok_or_else(|| anyhow!("field `{name}`: expected a string, found {v}")),
        }
    }
}
