//! Reward-model folders, written so that osp, PEFT and transformers all read them back.
//!
//! LoRA (`model.train = "lora"`), the folder `osp rm-train` writes as `RUN/reward_model`:
//! - `adapter_config.json`: PEFT's LoRA config with `task_type = "SEQ_CLS"` and
//!   `modules_to_save = ["score"]`;
//! - `adapter_model.safetensors`: the LoRA tensors (`base_model.model.<module>.lora_{A,B}.weight`)
//!   and the head as `base_model.model.score.weight` [1, d], PEFT's name for a saved module;
//!   `PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base,
//!   num_labels=1), folder)` loads both;
//! - `osp_reward.json`: what osp needs to rebuild it — the base model path, its tokenizer, the
//!   starting adapter merged under the reward adapter (when `model.adapter` was set; the
//!   reward adapter then applies to base + that adapter, not to the base alone) and the pad id.
//!
//! Full fine-tuning, and the merged export of a LoRA reward model (`[reward] export_merged`,
//! `RUN/reward_model_merged`): a transformers folder, `config.json` with `architectures =
//! ["LlamaForSequenceClassification"]` (Mistral/Qwen2 likewise), one label (`id2label =
//! {"0": "LABEL_0"}`) and `pad_token_id`; `model.safetensors` with the backbone under
//! `model.*` and `score.weight` [1, d] (no bias, no LM head); the base's tokenizer files; and
//! `osp_reward.json`. transformers' `AutoModelForSequenceClassification` loads it, and
//! `scripts/check_reward_model.py` checks its rewards against osp's.
//!
//! [`load_reward_model`] reads either layout, and also a sequence-classification folder
//! written by TRL / transformers (its tokenizer and `pad_token_id` must be in the folder).
use super::{RewardModel, PEFT_SCORE, SCORE};
use crate::io::{save_json, save_safetensors};
use crate::lora::LoraConfig;
use crate::model::load::{find_llama2c_tokenizer, read_hf_weights};
use crate::model::{Llama, ModelConfig, Trainable};
use crate::tokenizer::Tokenizer;
use crate::train::config::{ModelSection, TrainMode};
use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// osp's description of a reward-model folder.
pub const META_FILE: &str = "osp_reward.json";
const FORMAT: &str = "osp-reward-model";

/// Which layout a reward-model folder has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// A PEFT adapter (with the head) over a base model.
    Lora,
    /// A full `*ForSequenceClassification` folder.
    Full,
}

/// Contents of `osp_reward.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardMeta {
    pub format: String,
    pub layout: Layout,
    /// The base model (Hugging Face folder or llama2.c `.bin`).
    pub base_model: PathBuf,
    /// The tokenizer, when it is not beside the base model.
    pub tokenizer: Option<PathBuf>,
    /// An adapter merged into the base before the reward adapter (LoRA layout).
    pub start_adapter: Option<PathBuf>,
    pub pad_token_id: u32,
}

/// A reward model ready to score (a frozen snapshot) and its tokenizer.
pub struct LoadedReward {
    pub model: RewardModel,
    pub tokenizer: Tokenizer,
    /// `osp_reward.json`, when the folder has one.
    pub meta: Option<RewardMeta>,
}

/// Writes `rm` (trained from `m`) into `dir` in the layout of its backbone: a PEFT adapter
/// folder when it has LoRA adapters, else a full sequence-classification folder.
pub fn save_reward_model(
    rm: &RewardModel,
    tok: &Tokenizer,
    m: &ModelSection,
    dir: &Path,
) -> Result<()> {
    let Some(cfg) = rm.backbone.lora_config() else {
        return export_merged(rm, tok, m, dir);
    };
    let tensors: Vec<(String, candle_core::Tensor)> = rm
        .backbone
        .vars()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect();
    ensure!(
        tensors.iter().any(|(n, _)| n == PEFT_SCORE),
        "the reward model's head is not among its trainable tensors"
    );
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    save_safetensors(&dir.join("adapter_model.safetensors"), &tensors)?;
    let mut peft = cfg.to_peft_json(&m.path.display().to_string());
    peft["task_type"] = json!("SEQ_CLS");
    peft["modules_to_save"] = json!(["score"]);
    save_json(&dir.join("adapter_config.json"), &peft)?;
    let meta = RewardMeta {
        format: FORMAT.into(),
        layout: Layout::Lora,
        base_model: m.path.clone(),
        tokenizer: m.tokenizer.clone(),
        start_adapter: m.adapter.clone(),
        pad_token_id: rm.pad_token_id,
    };
    save_json(&dir.join(META_FILE), &meta)
}

/// transformers' class name for a one-label classifier on `model_type`.
fn seq_cls_architecture(model_type: &str) -> &'static str {
    match model_type {
        "qwen2" => "Qwen2ForSequenceClassification",
        "mistral" => "MistralForSequenceClassification",
        _ => "LlamaForSequenceClassification",
    }
}

/// Writes a transformers sequence-classification folder (adapters merged) into `out`: the
/// weights, config, the tokenizer files of `m.path` when it is a Hugging Face folder, and
/// `osp_reward.json` (which tells osp where a llama2.c base's tokenizer is).
pub fn export_merged(
    rm: &RewardModel,
    tok: &Tokenizer,
    m: &ModelSection,
    out: &Path,
) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let merged = rm.backbone.merged()?;
    let mut tensors: Vec<(String, candle_core::Tensor)> = merged
        .named_tensors()
        .into_iter()
        .filter(|(n, _)| n != "lm_head.weight")
        .collect();
    tensors.push((SCORE.into(), rm.score.detach()));
    save_safetensors(&out.join("model.safetensors"), &tensors)?;
    let mut cfg = rm.backbone.cfg.to_hf_json();
    cfg["architectures"] = json!([seq_cls_architecture(&rm.backbone.cfg.model_type)]);
    cfg["id2label"] = json!({"0": "LABEL_0"});
    cfg["label2id"] = json!({"LABEL_0": 0});
    cfg["pad_token_id"] = json!(rm.pad_token_id);
    if cfg["bos_token_id"].is_null() {
        cfg["bos_token_id"] = tok.bos_id().into();
    }
    save_json(&out.join("config.json"), &cfg)?;
    crate::model::export::copy_tokenizer_files(Some(&m.path), out)?;
    let meta = RewardMeta {
        format: FORMAT.into(),
        layout: Layout::Full,
        base_model: m.path.clone(),
        tokenizer: m.tokenizer.clone(),
        start_adapter: None,
        pad_token_id: rm.pad_token_id,
    };
    save_json(&out.join(META_FILE), &meta)
}

fn read_meta(dir: &Path) -> Result<Option<RewardMeta>> {
    let path = dir.join(META_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let meta: RewardMeta = serde_json::from_str(&text)
        .with_context(|| format!("{} is not an osp reward-model description", path.display()))?;
    ensure!(
        meta.format == FORMAT,
        "{}: field `format` is {:?}, expected {FORMAT:?}",
        path.display(),
        meta.format
    );
    Ok(Some(meta))
}

/// Opens a tokenizer the way `load_model` does: a folder, a llama2.c `.bin`, or a
/// tokenizer.json.
fn open_tokenizer(path: &Path, vocab: usize) -> Result<Tokenizer> {
    if path.is_dir() {
        Tokenizer::from_hf_dir(path)
    } else if path.extension().is_some_and(|e| e == "bin") {
        Tokenizer::from_llama2c(path, vocab)
    } else {
        Tokenizer::from_tokenizer_json(path)
    }
}

/// Reads a reward-model folder (either layout) onto `device` ("cpu", "cuda", "cuda:N") and
/// returns it frozen, ready to score.
pub fn load_reward_model(dir: &Path, device: &str) -> Result<LoadedReward> {
    ensure!(
        dir.is_dir(),
        "reward model {} is not a folder",
        dir.display()
    );
    let meta = read_meta(dir)?;
    let lora = dir.join("adapter_config.json").exists();
    match (&meta, lora) {
        (Some(m), true) if m.layout == Layout::Lora => load_lora(dir, m, device, meta.clone()),
        (_, true) => bail!(
            "{}: a PEFT adapter folder without {META_FILE} (osp cannot tell which base model it adapts)",
            dir.display()
        ),
        (_, false) => load_full(dir, device, meta),
    }
}

fn load_lora(
    dir: &Path,
    m: &RewardMeta,
    device: &str,
    meta: Option<RewardMeta>,
) -> Result<LoadedReward> {
    let section = ModelSection {
        path: m.base_model.clone(),
        tokenizer: m.tokenizer.clone(),
        adapter: m.start_adapter.clone(),
        device: device.to_string(),
        train: TrainMode::Lora,
    };
    let lora = LoraConfig::from_peft_dir(dir)?;
    let lm = crate::train::policy::load_policy(&section, &lora, 0, true)?;
    let mut backbone = lm.model;
    let placeholder = candle_core::Var::zeros(
        (1, backbone.cfg.hidden_size),
        candle_core::DType::F32,
        backbone.device(),
    )?;
    let score = placeholder.as_tensor().clone();
    backbone.add_var(PEFT_SCORE, placeholder)?;
    crate::model::load_adapter(&backbone, dir)?;
    let rm = RewardModel::new(backbone, score, m.pad_token_id)?;
    Ok(LoadedReward {
        model: rm.snapshot()?,
        tokenizer: lm.tokenizer,
        meta,
    })
}

fn load_full(dir: &Path, device: &str, meta: Option<RewardMeta>) -> Result<LoadedReward> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).with_context(|| {
        format!(
            "cannot read {} (a reward model folder holds a PEFT adapter with {META_FILE}, or a transformers sequence-classification model)",
            cfg_path.display()
        )
    })?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", cfg_path.display()))?;
    let arch = v["architectures"][0].as_str().unwrap_or("");
    ensure!(
        arch.ends_with("ForSequenceClassification"),
        "{}: field `architectures` is {:?}, not a *ForSequenceClassification reward model",
        cfg_path.display(),
        v["architectures"]
    );
    let labels = match (v.get("num_labels"), v.get("id2label")) {
        (Some(n), _) => n.as_u64(),
        (None, Some(Value::Object(m))) => Some(m.len() as u64),
        _ => Some(2), // transformers' default
    };
    ensure!(
        labels == Some(1),
        "{}: a reward model has one label (num_labels / id2label), this config has {labels:?}",
        cfg_path.display()
    );
    let pad = v["pad_token_id"].as_u64().ok_or_else(|| {
        anyhow!(
            "{}: field `pad_token_id` is required (it says where sequences end)",
            cfg_path.display()
        )
    })? as u32;
    let mut cfg =
        ModelConfig::from_json(&v).with_context(|| format!("in {}", cfg_path.display()))?;
    let dev = crate::device(device)?;
    let mut weights = read_hf_weights(dir, &dev)?;
    let score = weights
        .remove(SCORE)
        .ok_or_else(|| anyhow!("{}: tensor `{SCORE}` is missing", dir.display()))?;
    if !cfg.tie_word_embeddings && !weights.names().any(|n| n == "lm_head.weight") {
        // A classifier has no LM head; the backbone's (unused) head reuses the embedding.
        cfg.tie_word_embeddings = true;
    }
    let backbone = Llama::new(&cfg, weights, Trainable::None)?;
    let tokenizer = if dir.join("tokenizer.json").exists() {
        Tokenizer::from_hf_dir(dir)?
    } else if let Some(m) = &meta {
        match &m.tokenizer {
            Some(t) => open_tokenizer(t, cfg.vocab_size)?,
            None if m.base_model.is_dir() => Tokenizer::from_hf_dir(&m.base_model)?,
            None => Tokenizer::from_llama2c(
                &find_llama2c_tokenizer(&m.base_model, cfg.vocab_size)?,
                cfg.vocab_size,
            )?,
        }
    } else {
        bail!(
            "{}: no tokenizer.json, and no {META_FILE} naming the base model's tokenizer",
            dir.display()
        )
    };
    let rm = RewardModel::new(backbone, score, pad)
        .with_context(|| format!("reward model {}", dir.display()))?;
    Ok(LoadedReward {
        model: rm.snapshot()?,
        tokenizer,
        meta,
    })
}
