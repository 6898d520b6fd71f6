//! LoRA adapters with PEFT's semantics and file layout.
//!
//! y = x Wᵀ + b + scale · (dropout(x) Aᵀ) Bᵀ with A [r, in] (Kaiming-uniform) and B [out, r]
//! (zero), scale = alpha / r, or alpha / √r with rsLoRA. The base weights stay constants; the
//! reference policy πref is the same model with the adapter switched off
//! (`Llama::without_adapter`), so no second copy of the weights is ever made.
use crate::random::uniform_vec;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The projections LoRA can wrap, by their Hugging Face module names.
pub const LINEAR_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Adapter hyper-parameters (PEFT's `LoraConfig` fields of the same names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank r of the update B·A. Default 8.
    pub r: usize,
    /// Scale numerator: the update is multiplied by alpha / r (alpha / √r with rsLoRA). Default 16.
    pub lora_alpha: f64,
    /// Dropout on the adapter's input during training. Default 0.0 (PEFT's default).
    pub lora_dropout: f64,
    /// Module names to adapt, from q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
    /// down_proj. Default: all seven ("all-linear" in PEFT).
    pub target_modules: Vec<String>,
    /// Rank-stabilised scaling alpha / √r. Default false.
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.0,
            target_modules: LINEAR_MODULES.iter().map(|s| s.to_string()).collect(),
            use_rslora: false,
        }
    }
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            bail!("lora.r must be at least 1");
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            bail!(
                "lora.lora_dropout must be in [0, 1), got {}",
                self.lora_dropout
            );
        }
        if self.target_modules.is_empty() {
            bail!("lora.target_modules is empty: nothing would be trained");
        }
        for m in &self.target_modules {
            if !LINEAR_MODULES.contains(&m.as_str()) {
                bail!("lora.target_modules: unknown module `{m}` (expected some of {LINEAR_MODULES:?})");
            }
        }
        Ok(())
    }

    /// Whether the module at `path` (e.g. `model.layers.0.self_attn.q_proj`) is adapted.
    pub fn targets(&self, path: &str) -> bool {
        let last = path.rsplit('.').next().unwrap_or(path);
        self.target_modules.iter().any(|m| m == last)
    }

    /// Reads PEFT's `adapter_config.json`, refusing options osp does not implement.
    pub fn from_peft_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let ctx = |msg: String| anyhow!("{}: {msg}", path.display());
        let peft_type = v.get("peft_type").and_then(Value::as_str).unwrap_or("LORA");
        if peft_type != "LORA" {
            return Err(ctx(format!("peft_type {peft_type} is not LORA")));
        }
        for (field, ok) in [
            ("bias", v.get("bias").is_none_or(|b| b == "none")),
            ("use_dora", v.get("use_dora").is_none_or(|b| b == false)),
            (
                "fan_in_fan_out",
                v.get("fan_in_fan_out").is_none_or(|b| b == false),
            ),
            (
                "rank_pattern",
                v.get("rank_pattern")
                    .is_none_or(|b| b.as_object().is_none_or(|o| o.is_empty())),
            ),
            (
                "alpha_pattern",
                v.get("alpha_pattern")
                    .is_none_or(|b| b.as_object().is_none_or(|o| o.is_empty())),
            ),
            (
                "layers_to_transform",
                v.get("layers_to_transform").is_none_or(Value::is_null),
            ),
        ] {
            if !ok {
                return Err(ctx(format!(
                    "field `{field}` = {} is not supported",
                    v[field]
                )));
            }
        }
        let r = v
            .get("r")
            .and_then(Value::as_u64)
            .ok_or_else(|| ctx("field `r` must be a positive integer".into()))?;
        let alpha = v
            .get("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| ctx("field `lora_alpha` must be a number".into()))?;
        let targets: Vec<String> = match v.get("target_modules") {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect(),
            Some(Value::String(s)) if s == "all-linear" => {
                LINEAR_MODULES.iter().map(|s| s.to_string()).collect()
            }
            other => {
                return Err(ctx(format!(
                    "field `target_modules` must be a list, found {other:?}"
                )))
            }
        };
        let cfg = Self {
            r: r as usize,
            lora_alpha: alpha,
            lora_dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
            target_modules: targets,
            use_rslora: v
                .get("use_rslora")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        };
        cfg.validate().map_err(|e| ctx(e.to_string()))?;
        Ok(cfg)
    }

    /// PEFT's adapter_config.json for this adapter on `base_model`.
    pub fn to_peft_json(&self, base_model: &str) -> Value {
        let mut targets = self.target_modules.clone();
        targets.sort();
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": targets,
            "use_rslora": self.use_rslora,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_dora": false,
            "modules_to_save": null,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": null,
        })
    }
}

/// State shared by every adapter of a model: train/eval mode and the dropout random stream
/// (seeded and checkpointed, unlike candle's own dropout which draws from a thread RNG).
pub struct LoraContext {
    training: AtomicBool,
    rng: Mutex<ChaCha8Rng>,
}

impl LoraContext {
    pub fn new(seed: u64) -> Arc<Self> {
        Arc::new(Self {
            training: AtomicBool::new(false),
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
        })
    }
    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::Relaxed);
    }
    pub fn rng_state(&self) -> Result<Value> {
        let rng = self
            .rng
            .lock()
            .map_err(|_| anyhow!("dropout RNG lock poisoned"))?;
        Ok(serde_json::to_value(&*rng)?)
    }
    pub fn set_rng_state(&self, v: &Value) -> Result<()> {
        let rng: ChaCha8Rng = serde_json::from_value(v.clone()).context("bad dropout RNG state")?;
        *self
            .rng
            .lock()
            .map_err(|_| anyhow!("dropout RNG lock poisoned"))? = rng;
        Ok(())
    }
    fn dropout_mask(&self, n: usize, p: f64) -> Result<Vec<f32>> {
        let mut rng = self
            .rng
            .lock()
            .map_err(|_| anyhow!("dropout RNG lock poisoned"))?;
        let keep = (1.0 / (1.0 - p)) as f32;
        Ok((0..n)
            .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep })
            .collect())
    }
}

/// One adapted projection: the trainable A and B and how to apply them.
#[derive(Clone)]
pub struct LoraLayer {
    /// [r, in]
    pub a: Tensor,
    /// [out, r]
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f64,
    pub ctx: Arc<LoraContext>,
}

impl LoraLayer {
    /// Fresh adapter as PEFT initialises it: A ~ Kaiming-uniform(a=√5) = U(±1/√in), B = 0.
    pub fn init(
        cfg: &LoraConfig,
        out: usize,
        inp: usize,
        rng: &mut ChaCha8Rng,
        device: &Device,
        ctx: Arc<LoraContext>,
    ) -> Result<(Tensor, Tensor, Self)> {
        if cfg.r > out.min(inp) {
            bail!(
                "lora.r = {} exceeds the rank of a {out}×{inp} projection (at most {})",
                cfg.r,
                out.min(inp)
            );
        }
        let bound = 1.0 / (inp as f32).sqrt();
        let a = Tensor::from_vec(uniform_vec(rng, cfg.r * inp, bound), (cfg.r, inp), device)?;
        let b = Tensor::zeros((out, cfg.r), DType::F32, device)?;
        Ok((
            a.clone(),
            b.clone(),
            Self {
                a,
                b,
                scale: cfg.scale(),
                dropout: cfg.lora_dropout,
                ctx,
            },
        ))
    }

    /// Whether dropout applies to the adapter's input now (rate > 0, in training).
    pub fn dropout_active(&self) -> bool {
        self.dropout > 0.0 && self.ctx.training.load(Ordering::Relaxed)
    }

    /// scale · (dropout(x) Aᵀ) Bᵀ for x [rows, in].
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.dropout_active() {
            let mask = self.ctx.dropout_mask(x.elem_count(), self.dropout)?;
            (x * Tensor::from_vec(mask, x.shape(), x.device())?)?
        } else {
            x.clone()
        };
        Ok((x.matmul(&self.a.t()?)?.matmul(&self.b.t()?)? * self.scale)?)
    }

    /// scale · B A, the [out, in] update that merging adds to the base weight.
    pub fn merged_delta(&self) -> Result<Tensor> {
        Ok((self.b.detach().matmul(&self.a.detach())? * self.scale)?)
    }
}

/// PEFT's tensor name for the A or B matrix of the module at `path`.
pub fn peft_name(path: &str, which: char) -> String {
    format!("base_model.model.{path}.lora_{which}.weight")
}
