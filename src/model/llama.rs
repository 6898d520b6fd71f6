//! A Llama-family decoder (llama, mistral, qwen2, llama2.c) in one file: RMSNorm, rotary
//! embeddings, grouped-query attention, SwiGLU MLP, tied or untied LM head, optional biases.
//! Weights carry their Hugging Face names.
use super::config::ModelConfig;
use super::fast;
use super::ops::{frozen_linear, rms_norm, rope, rope_tables, softmax_last_dim};
use crate::lora::{peft_name, LoraConfig, LoraContext, LoraLayer};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::sync::Arc;

/// Large negative bias for masked attention scores; finite so that a fully masked (padding)
/// query row softmaxes to a harmless uniform row instead of NaN.
const MASKED: f32 = -1e30;

/// Named tensors read from a checkpoint, consumed as the model is built.
pub struct Weights {
    map: HashMap<String, Tensor>,
    /// Where the tensors came from, for error messages.
    pub source: String,
}

impl Weights {
    pub fn new(map: HashMap<String, Tensor>, source: impl Into<String>) -> Self {
        Self {
            map,
            source: source.into(),
        }
    }

    /// Removes and returns `name`, checking its shape and that every value is finite (a
    /// checkpoint of NaNs would otherwise generate nonsense without a word).
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .map
            .remove(name)
            .ok_or_else(|| anyhow!("{}: tensor `{name}` is missing", self.source))?;
        if t.dims() != shape {
            bail!(
                "{}: tensor `{name}` has shape {:?}, the config implies {:?}",
                self.source,
                t.dims(),
                shape
            );
        }
        // 0·x is 0 for every finite x and NaN otherwise.
        let probe = t
            .affine(0.0, 0.0)?
            .sum_all()?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        if !probe.is_finite() {
            let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            let bad = values.iter().filter(|v| !v.is_finite()).count();
            bail!(
                "{}: tensor `{name}` has {bad} non-finite values (NaN or infinite) of {}; \
                 the checkpoint is corrupt",
                self.source,
                values.len()
            );
        }
        Ok(t)
    }

    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        self.map.remove(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.map.keys()
    }
}

/// What training updates: nothing, every weight (full fine-tuning), or LoRA adapters on a
/// frozen base.
#[derive(Debug, Clone, PartialEq)]
pub enum Trainable {
    None,
    All,
    /// Fresh adapters (A Kaiming-uniform from `seed`, B zero), base weights constant.
    Lora {
        config: LoraConfig,
        seed: u64,
    },
}

/// Hands out tensors for the model, wrapping them in `Var`s when they are trained.
struct Params<'a> {
    weights: &'a mut Weights,
    trainable: &'a Trainable,
    vars: Vec<(String, Var)>,
    lora: Option<(ChaCha8Rng, Arc<LoraContext>)>,
}

impl Params<'_> {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.weights.take(name, shape)?;
        Ok(match self.trainable {
            Trainable::All => self.var(name, &t)?,
            _ => t,
        })
    }

    fn var(&mut self, name: &str, t: &Tensor) -> Result<Tensor> {
        let var = Var::from_tensor(t)?;
        let t = var.as_tensor().clone();
        self.vars.push((name.to_string(), var));
        Ok(t)
    }

    fn linear(&mut self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let weight = self.get(&format!("{prefix}.weight"), &[out, inp])?;
        let bias = if bias {
            Some(self.get(&format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        let mut linear = Linear::new(weight, bias);
        if let (Trainable::Lora { config, .. }, Some((rng, ctx))) =
            (self.trainable, self.lora.as_mut())
        {
            if config.targets(prefix) {
                let dev = linear.weight.device().clone();
                let (a, b, mut layer) = LoraLayer::init(config, out, inp, rng, &dev, ctx.clone())?;
                layer.a = self.var(&peft_name(prefix, 'A'), &a)?;
                layer.b = self.var(&peft_name(prefix, 'B'), &b)?;
                linear.lora = Some(layer);
            }
        }
        Ok(linear)
    }
}

/// y = x Wᵀ + b (+ a LoRA update) with W stored as [out, in], as in PyTorch.
#[derive(Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// Wᵀ materialised as a contiguous [in, out] tensor, in snapshots. candle's matmul with a
    /// contiguous right-hand side is 15–20% faster than with a transposed view, and its result
    /// for a row does not depend on how many rows are in the batch (with the transposed view it
    /// does, for 4 rows or fewer), which keeps cached decoding equal to the full forward.
    weight_t: Option<Tensor>,
    pub lora: Option<LoraLayer>,
}

/// Whether a forward uses the fused kernels of `model::fast`: Some(the model's packed
/// weights) when it does.
type Fused<'a> = Option<&'a Arc<crate::engine::weights::PackCache>>;

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, None)
    }

    /// `forward`; `fused` (the model's packed weights) lets a LoRA layer on a frozen CPU f32
    /// base run as one op (`fast::lora_linear`, same maths) when its dropout is off, and a
    /// trained CPU f32 weight as `fast::linear`.
    fn forward_with(&self, x: &Tensor, fused: Fused) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let inp = *dims.last().ok_or_else(|| anyhow!("linear: scalar input"))?;
        let rows = x.elem_count() / inp.max(1);
        let x2 = x.reshape((rows, inp))?;
        let one_op = match &self.lora {
            Some(l) if fused.is_some() && self.weight_t.is_none() && !self.weight.is_variable() => {
                !l.dropout_active() && fast::applies(&self.weight)
            }
            _ => false,
        };
        let y = match (&self.lora, &self.weight_t) {
            (Some(l), _) if one_op => {
                fast::lora_linear(&x2, &self.weight, &l.a, &l.b, l.scale, fused)?
            }
            (_, Some(wt)) => x2.matmul(wt)?,
            // Constant weights get no gradient computed (candle would compute one anyway).
            _ if !self.weight.is_variable() => frozen_linear(&x2, &self.weight)?,
            _ if fused.is_some() && fast::applies(&self.weight) => fast::linear(&x2, &self.weight)?,
            _ => x2.matmul(&self.weight.t()?)?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let y = match &self.lora {
            Some(l) if !one_op => (y + l.delta(&x2)?)?,
            _ => y,
        };
        let mut out_dims = dims;
        *out_dims.last_mut().expect("non-empty dims") = self.weight.dim(0)?;
        Ok(y.reshape(out_dims)?)
    }

    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            weight_t: None,
            lora: None,
        }
    }

    /// Whether the layer can run inside `fast::block`: CPU f32, no adapter dropout in effect,
    /// no snapshot's materialised transpose.
    pub(crate) fn fusable(&self) -> bool {
        self.weight_t.is_none()
            && fast::applies(&self.weight)
            && self.lora.as_ref().is_none_or(|l| !l.dropout_active())
    }

    /// The base weight with the adapter folded in (W + scale·B·A), detached.
    pub fn merged_weight(&self) -> Result<Tensor> {
        let w = self.weight.detach();
        Ok(match &self.lora {
            Some(l) => (w + l.merged_delta()?)?,
            None => w.copy()?,
        })
    }

    /// A frozen copy with its own storage, the adapter merged and the transposed weight
    /// materialised.
    fn snapshot(&self) -> Result<Self> {
        let weight = self.merged_weight()?;
        Ok(Self {
            weight_t: Some(weight.t()?.contiguous()?),
            weight,
            bias: self.bias.as_ref().map(|b| b.detach().copy()).transpose()?,
            lora: None,
        })
    }

    fn without_adapter(&self) -> Self {
        Self {
            lora: None,
            ..self.clone()
        }
    }

    /// A copy with the adapter merged into a plain weight (for export).
    fn merged(&self) -> Result<Self> {
        Ok(Self::new(
            self.merged_weight()?,
            self.bias.as_ref().map(|b| b.detach().copy()).transpose()?,
        ))
    }
}

#[derive(Clone)]
pub(crate) struct Attention {
    pub(crate) q_proj: Linear,
    pub(crate) k_proj: Linear,
    pub(crate) v_proj: Linear,
    pub(crate) o_proj: Linear,
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
}

impl Attention {
    /// x [b, t, d]; cos/sin [b, t, hd/2]; bias [b, 1, t, T] where T counts cached keys too.
    /// `fused` runs the uncached case through `fast::attention` (same maths, one kernel).
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        bias: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        fused: Fused,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, kvh, hd) = (self.heads, self.kv_heads, self.head_dim);
        let q = self
            .q_proj
            .forward_with(x, fused)?
            .reshape((b, t, h, hd))?
            .transpose(1, 2)?;
        let k = self
            .k_proj
            .forward_with(x, fused)?
            .reshape((b, t, kvh, hd))?
            .transpose(1, 2)?;
        let v = self
            .v_proj
            .forward_with(x, fused)?
            .reshape((b, t, kvh, hd))?
            .transpose(1, 2)?;
        let q = rope(&q, cos, sin)?;
        let mut k = rope(&k, cos, sin)?;
        if fused.is_some() && cache.is_none() {
            let y = fast::attention(&q, &k, &v, bias, 1.0 / (hd as f32).sqrt())?;
            return self.o_proj.forward_with(&y.reshape((b, t, h * hd))?, fused);
        }
        let mut v = v.contiguous()?;
        if let Some(cache) = cache {
            if let Some((pk, pv)) = cache.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *cache = Some((k.clone(), v.clone()));
        }
        let total = k.dim(2)?;
        // Grouped-query attention without copying k/v: the n_rep query heads that share a kv
        // head are contiguous, so q [b, h, t, hd] is viewed as [b, kvh, n_rep·t, hd].
        let n_rep = h / kvh;
        let q = q.reshape((b, kvh, n_rep * t, hd))?;
        // A contiguous kᵀ: faster, and row results independent of the number of query rows
        // (see Linear::weight_t).
        let scores = (q.matmul(&k.t()?.contiguous()?)? * (1.0 / (hd as f64).sqrt()))?;
        let scores = scores.reshape((b, h, t, total))?.broadcast_add(bias)?;
        let probs = softmax_last_dim(&scores)?.reshape((b, kvh, n_rep * t, total))?;
        let y = probs.matmul(&v)?.reshape((b, h, t, hd))?.transpose(1, 2)?;
        self.o_proj.forward(&y.reshape((b, t, h * hd))?)
    }
}

#[derive(Clone)]
pub(crate) struct Mlp {
    pub(crate) gate_proj: Linear,
    pub(crate) up_proj: Linear,
    pub(crate) down_proj: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor, fused: Fused) -> Result<Tensor> {
        if fused.is_some() {
            let y = fast::swiglu(
                &self.gate_proj.forward_with(x, fused)?,
                &self.up_proj.forward_with(x, fused)?,
            )?;
            return self.down_proj.forward_with(&y, fused);
        }
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(x)?)?;
        self.down_proj.forward(&(gate * self.up_proj.forward(x)?)?)
    }
}

#[derive(Clone)]
pub(crate) struct Block {
    pub(crate) input_layernorm: Tensor,
    pub(crate) self_attn: Attention,
    pub(crate) post_attention_layernorm: Tensor,
    pub(crate) mlp: Mlp,
}

/// Per-layer key/value cache for incremental decoding.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// Number of cached positions (0 when empty).
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .and_then(|(k, _)| k.dim(2).ok())
            .unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The decoder with its LM head.
#[derive(Clone)]
pub struct Llama {
    pub cfg: ModelConfig,
    pub(crate) embed_tokens: Tensor,
    pub(crate) layers: Vec<Block>,
    pub(crate) norm: Tensor,
    /// None when tied to the embedding.
    pub(crate) lm_head: Option<Linear>,
    vars: Vec<(String, Var)>,
    /// The adapters' configuration and shared state, when built with `Trainable::Lora`.
    lora: Option<(LoraConfig, Arc<LoraContext>)>,
    /// Made by `snapshot()`: frozen storage nobody writes, so snapshotting again is a clone.
    frozen: bool,
    /// Whether CPU f32 forwards without a cache use the fused kernels of `model::fast`
    /// (default) instead of the composed ops written out in this file.
    fused: bool,
    device: Device,
    /// The inference engine's packed copies of the frozen weights, shared by clones.
    pub(crate) packs: Arc<crate::engine::weights::PackCache>,
}

impl Llama {
    /// Builds the model from named weights; every tensor the config implies must be present with
    /// the right shape, and tensors the model would not use are an error (a silently ignored
    /// weight is a wrong model).
    pub fn new(cfg: &ModelConfig, mut weights: Weights, trainable: Trainable) -> Result<Self> {
        cfg.validate()?;
        let device = match weights.map.values().next() {
            Some(t) => t.device().clone(),
            None => bail!("{}: no tensors", weights.source),
        };
        let (d, v, hd) = (cfg.hidden_size, cfg.vocab_size, cfg.head_dim);
        let (h, kvh, ff) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.intermediate_size,
        );
        if cfg.tie_word_embeddings {
            // Some tied checkpoints store the head anyway; it must equal the embedding.
            weights.remove("lm_head.weight");
        }
        let lora = match &trainable {
            Trainable::Lora { config, seed } => {
                config.validate()?;
                Some((config.clone(), LoraContext::new(seed.wrapping_add(1))))
            }
            _ => None,
        };
        let mut p = Params {
            weights: &mut weights,
            trainable: &trainable,
            vars: vec![],
            lora: match (&trainable, &lora) {
                (Trainable::Lora { seed, .. }, Some((_, ctx))) => {
                    Some((ChaCha8Rng::seed_from_u64(*seed), ctx.clone()))
                }
                _ => None,
            },
        };
        let embed_tokens = p.get("model.embed_tokens.weight", &[v, d])?;
        let mut layers = Vec::new(); // not with_capacity: the count comes from a file
        for i in 0..cfg.num_hidden_layers {
            let pre = format!("model.layers.{i}");
            let a = format!("{pre}.self_attn");
            let m = format!("{pre}.mlp");
            layers.push(Block {
                input_layernorm: p.get(&format!("{pre}.input_layernorm.weight"), &[d])?,
                self_attn: Attention {
                    q_proj: p.linear(&format!("{a}.q_proj"), h * hd, d, cfg.attention_bias)?,
                    k_proj: p.linear(&format!("{a}.k_proj"), kvh * hd, d, cfg.attention_bias)?,
                    v_proj: p.linear(&format!("{a}.v_proj"), kvh * hd, d, cfg.attention_bias)?,
                    o_proj: p.linear(&format!("{a}.o_proj"), d, h * hd, cfg.o_bias)?,
                    heads: h,
                    kv_heads: kvh,
                    head_dim: hd,
                },
                post_attention_layernorm: p
                    .get(&format!("{pre}.post_attention_layernorm.weight"), &[d])?,
                mlp: Mlp {
                    gate_proj: p.linear(&format!("{m}.gate_proj"), ff, d, cfg.mlp_bias)?,
                    up_proj: p.linear(&format!("{m}.up_proj"), ff, d, cfg.mlp_bias)?,
                    down_proj: p.linear(&format!("{m}.down_proj"), d, ff, cfg.mlp_bias)?,
                },
            });
        }
        let norm = p.get("model.norm.weight", &[d])?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(p.linear("lm_head", v, d, false)?)
        };
        let vars = std::mem::take(&mut p.vars);
        let mut leftover: Vec<&String> = weights
            .names()
            .filter(|n| !n.ends_with("rotary_emb.inv_freq"))
            .collect();
        if !leftover.is_empty() {
            leftover.sort();
            bail!(
                "{}: tensors the {} config does not use: {}",
                weights.source,
                cfg.model_type,
                leftover
                    .iter()
                    .take(8)
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            vars,
            lora,
            frozen: false,
            fused: true,
            device,
            packs: Arc::default(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The trainable variables with their Hugging Face names (empty unless built trainable).
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Registers a trainable tensor that lives beside the transformer (a reward model's score
    /// head, PPO's value head), so that the optimiser, checkpoints and `load_vars` treat it as
    /// one of the model's own. Copies made by `snapshot`, `merged` and `without_adapter` do not
    /// carry it: the head's owner keeps its tensor.
    pub fn add_var(&mut self, name: &str, var: Var) -> Result<()> {
        if self.frozen {
            bail!("cannot add trainable tensor `{name}` to a frozen snapshot");
        }
        if self.vars.iter().any(|(n, _)| n == name) {
            bail!("the model already has a trainable tensor named `{name}`");
        }
        if !var.device().same_device(&self.device) {
            bail!("trainable tensor `{name}` is on another device than the model");
        }
        self.vars.push((name.to_string(), var));
        Ok(())
    }

    /// Removes a tensor registered with `add_var` (PPO saves its policy without the value
    /// head) and returns it; None when there is none of that name.
    pub fn remove_var(&mut self, name: &str) -> Option<Var> {
        let i = self.vars.iter().position(|(n, _)| n == name)?;
        Some(self.vars.remove(i).1)
    }

    /// A frozen copy for sampling and scoring: its own storage (later optimiser steps do not
    /// change it), the adapter merged in, no autograd graph, and matmul-friendly weight
    /// layouts. Costs one copy of the weights, which faster matmuls repay within a few steps.
    pub fn snapshot(&self) -> Result<Self> {
        if self.frozen {
            return Ok(self.clone());
        }
        let mut s = self.map_linears(&|l: &Linear| l.snapshot(), true)?;
        if s.lm_head.is_none() {
            // A tied head gets its own transposed copy; the embedding stays the lookup table.
            s.lm_head = Some(Linear::new(s.embed_tokens.clone(), None).snapshot()?);
        }
        s.frozen = true;
        Ok(s)
    }

    /// The reference policy πref: the same weights with every adapter switched off. Shares
    /// all storage with `self`; no copy is made.
    pub fn without_adapter(&self) -> Self {
        self.map_linears(&|l: &Linear| Ok(l.without_adapter()), false)
            .expect("dropping adapters cannot fail")
    }

    /// A plain model with the adapters merged into the base weights (for export).
    pub fn merged(&self) -> Result<Self> {
        self.map_linears(&|l: &Linear| l.merged(), true)
    }

    /// Rebuilds the model with `f` applied to every linear layer; `copy` gives the other
    /// tensors their own detached storage. The result has no trainable variables.
    fn map_linears(&self, f: &dyn Fn(&Linear) -> Result<Linear>, copy: bool) -> Result<Self> {
        let t = |x: &Tensor| -> Result<Tensor> {
            Ok(if copy { x.detach().copy()? } else { x.clone() })
        };
        let mut layers = Vec::with_capacity(self.layers.len());
        for b in &self.layers {
            let a = &b.self_attn;
            layers.push(Block {
                input_layernorm: t(&b.input_layernorm)?,
                self_attn: Attention {
                    q_proj: f(&a.q_proj)?,
                    k_proj: f(&a.k_proj)?,
                    v_proj: f(&a.v_proj)?,
                    o_proj: f(&a.o_proj)?,
                    ..a.clone()
                },
                post_attention_layernorm: t(&b.post_attention_layernorm)?,
                mlp: Mlp {
                    gate_proj: f(&b.mlp.gate_proj)?,
                    up_proj: f(&b.mlp.up_proj)?,
                    down_proj: f(&b.mlp.down_proj)?,
                },
            });
        }
        Ok(Self {
            cfg: self.cfg.clone(),
            embed_tokens: t(&self.embed_tokens)?,
            layers,
            norm: t(&self.norm)?,
            lm_head: self.lm_head.as_ref().map(f).transpose()?,
            vars: vec![],
            lora: None,
            frozen: false,
            fused: self.fused,
            device: self.device.clone(),
            // Same tensors (no copy), same packs; copied tensors get packed afresh.
            packs: if copy {
                Arc::default()
            } else {
                self.packs.clone()
            },
        })
    }

    /// The LoRA configuration, when the model carries adapters.
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora.as_ref().map(|(c, _)| c)
    }

    /// Shared adapter state (train mode, dropout RNG), when the model carries adapters.
    pub fn lora_context(&self) -> Option<&Arc<LoraContext>> {
        self.lora.as_ref().map(|(_, c)| c)
    }

    /// Training mode turns on LoRA dropout; evaluation and sampling run without it.
    pub fn set_training(&self, on: bool) {
        if let Some((_, ctx)) = &self.lora {
            ctx.set_training(on);
        }
    }

    /// Overwrites the trainable variables with tensors of the same names (a saved adapter or
    /// checkpoint). Every variable must be present with its shape, and nothing else.
    pub fn load_vars(&self, tensors: &HashMap<String, Tensor>, source: &str) -> Result<()> {
        for (name, var) in &self.vars {
            let t = tensors
                .get(name)
                .ok_or_else(|| anyhow!("{source}: tensor `{name}` is missing"))?;
            if t.dims() != var.dims() {
                bail!(
                    "{source}: tensor `{name}` has shape {:?}, the model needs {:?}",
                    t.dims(),
                    var.dims()
                );
            }
            var.set(&t.to_device(&self.device)?)?;
        }
        if tensors.len() != self.vars.len() {
            let known: std::collections::HashSet<&str> =
                self.vars.iter().map(|(n, _)| n.as_str()).collect();
            let mut extra: Vec<&String> = tensors
                .keys()
                .filter(|n| !known.contains(n.as_str()))
                .collect();
            extra.sort();
            bail!(
                "{source}: tensors this model does not have: {}",
                extra
                    .iter()
                    .take(8)
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(())
    }

    /// Every weight under its Hugging Face name (a tied head is not repeated).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.clone(),
        )];
        let mut lin = |name: String, l: &Linear| {
            out.push((format!("{name}.weight"), l.weight.clone()));
            if let Some(b) = &l.bias {
                out.push((format!("{name}.bias"), b.clone()));
            }
        };
        let mut norms = vec![];
        for (i, b) in self.layers.iter().enumerate() {
            let pre = format!("model.layers.{i}");
            let a = &b.self_attn;
            lin(format!("{pre}.self_attn.q_proj"), &a.q_proj);
            lin(format!("{pre}.self_attn.k_proj"), &a.k_proj);
            lin(format!("{pre}.self_attn.v_proj"), &a.v_proj);
            lin(format!("{pre}.self_attn.o_proj"), &a.o_proj);
            lin(format!("{pre}.mlp.gate_proj"), &b.mlp.gate_proj);
            lin(format!("{pre}.mlp.up_proj"), &b.mlp.up_proj);
            lin(format!("{pre}.mlp.down_proj"), &b.mlp.down_proj);
            norms.push((
                format!("{pre}.input_layernorm.weight"),
                b.input_layernorm.clone(),
            ));
            norms.push((
                format!("{pre}.post_attention_layernorm.weight"),
                b.post_attention_layernorm.clone(),
            ));
        }
        if let (Some(h), false) = (&self.lm_head, self.cfg.tie_word_embeddings) {
            lin("lm_head".to_string(), h);
        }
        out.extend(norms);
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        out
    }

    /// Final hidden states [b, t, d] for `ids` [b, t] at `positions` [b, t] (u32), with additive
    /// attention `bias` [b, 1, t, T]; with a cache, the new keys are appended to it.
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        bias: &Tensor,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let (cos, sin) = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)?;
        let mut x = self
            .embed_tokens
            .index_select(&ids.flatten_all()?, 0)
            .context("token id out of the embedding's range")?
            .reshape((b, t, self.cfg.hidden_size))?;
        if let Some(c) = cache.as_deref_mut() {
            c.layers.resize(self.layers.len(), None);
        }
        let eps = self.cfg.rms_norm_eps;
        // Cached decoding keeps the composed ops (its steps must equal the full forward).
        let fused = (self.fused && cache.is_none() && fast::applies(&x)).then_some(&self.packs);
        // Without a cache a whole layer is one op (`fast::block`), sharing these across layers.
        let block_ctx = match fused {
            Some(_) if self.layers.iter().any(fast::block::supports) => {
                Some(fast::BlockContext::new(&cos, &sin, bias, eps)?)
            }
            _ => None,
        };
        for (i, layer) in self.layers.iter().enumerate() {
            if let (Some(packs), Some(ctx)) = (fused, &block_ctx) {
                if fast::block::supports(layer) {
                    x = fast::block(&x, layer, ctx, packs)?;
                    continue;
                }
            }
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let h = rms_norm(&x, &layer.input_layernorm, eps)?;
            let a = layer
                .self_attn
                .forward(&h, &cos, &sin, bias, layer_cache, fused)?;
            x = (x + a)?;
            let h = rms_norm(&x, &layer.post_attention_layernorm, eps)?;
            x = (x + layer.mlp.forward(&h, fused)?)?;
        }
        Ok(rms_norm(&x, &self.norm, eps)?)
    }

    /// Switches the fused CPU kernels (`model::fast`) on or off; off runs the composed ops of
    /// this file, the reference the fused path is tested against.
    pub fn set_fused(&mut self, on: bool) {
        self.fused = on;
    }

    /// The head's weight [vocab, d] when the head is a plain product (no adapter, no bias),
    /// which the fused log-probability kernel can take.
    fn plain_head(&self) -> Option<&Tensor> {
        match &self.lm_head {
            None => Some(&self.embed_tokens),
            Some(l) if l.lora.is_none() && l.bias.is_none() => Some(&l.weight),
            Some(_) => None,
        }
    }

    /// LM-head logits for hidden states [.., d] → [.., vocab].
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        match &self.lm_head {
            Some(h) => h.forward(hidden),
            None => Linear::new(self.embed_tokens.clone(), None).forward(hidden),
        }
    }

    /// Logits [b, t, vocab] for a padded batch.
    pub fn forward(&self, batch: &TokenBatch) -> Result<Tensor> {
        let h = self.forward_hidden(&batch.ids, &batch.positions, &batch.bias, None)?;
        self.logits(&h)
    }

    /// Per-sequence sum of log π(token) over the tokens where `loss_mask` is true: the
    /// log π(y|x) of every preference loss. `seqs[i]` is prompt + response, `loss_mask[i]` has
    /// the same length and is true on response tokens (the first token is never scored).
    pub fn sequence_logps(&self, seqs: &[Vec<u32>], loss_mask: &[Vec<bool>]) -> Result<Tensor> {
        let (sum, _) = self.token_logps(seqs, loss_mask)?;
        Ok(sum)
    }

    /// Like `sequence_logps`, also returning the per-token log-probabilities [b, t-1] (zero
    /// where masked), for per-token losses and KL estimates.
    pub fn token_logps(
        &self,
        seqs: &[Vec<u32>],
        loss_mask: &[Vec<bool>],
    ) -> Result<(Tensor, Tensor)> {
        if seqs.len() != loss_mask.len() {
            bail!(
                "{} sequences but {} loss masks",
                seqs.len(),
                loss_mask.len()
            );
        }
        for (i, (s, m)) in seqs.iter().zip(loss_mask).enumerate() {
            if s.len() != m.len() {
                bail!(
                    "sequence {i}: {} tokens but a loss mask of {}",
                    s.len(),
                    m.len()
                );
            }
            if s.len() < 2 {
                bail!("sequence {i}: needs at least 2 tokens to score a response");
            }
        }
        let batch = TokenBatch::right_padded(seqs, &self.device)?;
        let t = batch.len;
        if let (true, Some(w)) = (
            self.fused && fast::applies(&self.embed_tokens),
            self.plain_head(),
        ) {
            // Only response tokens' log-probabilities, never the [tokens, vocab] logits.
            let h = self.forward_hidden(&batch.ids, &batch.positions, &batch.bias, None)?;
            let d = self.cfg.hidden_size;
            let h = h
                .narrow(1, 0, t - 1)?
                .contiguous()?
                .reshape((seqs.len() * (t - 1), d))?;
            let mut selected = vec![];
            for (i, (s, m)) in seqs.iter().zip(loss_mask).enumerate() {
                for j in 1..s.len() {
                    if m[j] {
                        selected.push((i * (t - 1) + j - 1, s[j]));
                    }
                }
            }
            let per_token = fast::target_logprobs(&h, w, &selected, Some(&self.packs))?
                .reshape((seqs.len(), t - 1))?;
            return Ok((per_token.sum(1)?, per_token));
        }
        let logits = self.forward(&batch)?.narrow(1, 0, t - 1)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let targets = batch
            .ids
            .narrow(1, 1, t - 1)?
            .contiguous()?
            .unsqueeze(D::Minus1)?;
        let picked = logp.gather(&targets, D::Minus1)?.squeeze(D::Minus1)?;
        let mask: Vec<f32> = loss_mask
            .iter()
            .flat_map(|m| {
                (1..t).map(move |j| {
                    if m.get(j).copied().unwrap_or(false) {
                        1.0
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (seqs.len(), t - 1), &self.device)?;
        let per_token = (picked * mask)?;
        Ok((per_token.sum(1)?, per_token))
    }
}

/// A padded batch on the device: token ids, per-sequence positions (padding does not shift
/// them) and the additive causal + padding attention bias.
pub struct TokenBatch {
    pub ids: Tensor,
    pub positions: Tensor,
    pub bias: Tensor,
    /// Which key positions are real tokens, per sequence.
    pub key_mask: Vec<Vec<bool>>,
    pub len: usize,
}

impl TokenBatch {
    /// Sequences padded on the right (training and scoring).
    pub fn right_padded(seqs: &[Vec<u32>], device: &Device) -> Result<Self> {
        Self::padded(seqs, false, device)
    }

    /// Sequences padded on the left (prompts before generation, so that all end together).
    pub fn left_padded(seqs: &[Vec<u32>], device: &Device) -> Result<Self> {
        Self::padded(seqs, true, device)
    }

    fn padded(seqs: &[Vec<u32>], left: bool, device: &Device) -> Result<Self> {
        if seqs.is_empty() {
            bail!("empty batch");
        }
        let len = seqs.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut ids = Vec::with_capacity(seqs.len() * len);
        let mut key_mask = Vec::with_capacity(seqs.len());
        for s in seqs {
            let pad = len - s.len();
            let mut m = vec![true; len];
            if left {
                ids.extend(std::iter::repeat_n(0u32, pad).chain(s.iter().copied()));
                m[..pad].iter_mut().for_each(|x| *x = false);
            } else {
                ids.extend(s.iter().copied().chain(std::iter::repeat_n(0u32, pad)));
                m[len - pad..].iter_mut().for_each(|x| *x = false);
            }
            key_mask.push(m);
        }
        let ids = Tensor::from_vec(ids, (seqs.len(), len), device)?;
        let positions = positions_from_mask(&key_mask, 0, device)?;
        let bias = attention_bias(&key_mask, 0, len, device)?;
        Ok(Self {
            ids,
            positions,
            bias,
            key_mask,
            len,
        })
    }
}

/// Position of each query: the number of real tokens before it (HF generate's convention:
/// cumsum(mask) − 1, clamped at 0), for queries `q_start..` of the key sequence.
pub fn positions_from_mask(
    key_mask: &[Vec<bool>],
    q_start: usize,
    device: &Device,
) -> Result<Tensor> {
    let len = key_mask.first().map(Vec::len).unwrap_or(0);
    let q_len = len - q_start;
    let mut pos = Vec::with_capacity(key_mask.len() * q_len);
    for m in key_mask {
        let mut count = 0u32;
        for (j, &real) in m.iter().enumerate() {
            count += real as u32;
            if j >= q_start {
                pos.push(count.saturating_sub(1));
            }
        }
    }
    Ok(Tensor::from_vec(pos, (key_mask.len(), q_len), device)?)
}

/// Additive bias [b, 1, q_len, T]: query i (absolute index q_start + i) sees key j when
/// j ≤ q_start + i and key j is a real token.
pub fn attention_bias(
    key_mask: &[Vec<bool>],
    q_start: usize,
    q_len: usize,
    device: &Device,
) -> Result<Tensor> {
    let total = key_mask.first().map(Vec::len).unwrap_or(0);
    let mut bias = Vec::with_capacity(key_mask.len() * q_len * total);
    for m in key_mask {
        for i in 0..q_len {
            let qi = q_start + i;
            bias.extend(
                m.iter()
                    .enumerate()
                    .map(|(j, &real)| if real && j <= qi { 0.0 } else { MASKED }),
            );
        }
    }
    Ok(Tensor::from_vec(bias, (key_mask.len(), 1, q_len, total), device)?.to_dtype(DType::F32)?)
}
