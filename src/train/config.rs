//! Run configuration: one TOML file per run, every field with a documented default (see
//! `configs/*.toml`), overridable on the command line with `--set section.field=value`.
//! The resolved configuration is written into the run folder.
use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Which weights train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainMode {
    /// LoRA adapters on a frozen base (the `[lora]` section).
    Lora,
    /// Every weight.
    Full,
}

/// `[model]`: what to start from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// Hugging Face model folder or llama2.c `.bin`. Required.
    pub path: PathBuf,
    /// Tokenizer file or folder when it is not beside the model. Default: none.
    pub tokenizer: Option<PathBuf>,
    /// An adapter folder (PEFT format) to start from instead of fresh adapters. Default: none.
    pub adapter: Option<PathBuf>,
    /// "cpu", "cuda" or "cuda:N". Default "cpu".
    pub device: String,
    /// "lora" or "full". Default "lora".
    pub train: TrainMode,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            path: PathBuf::new(),
            tokenizer: None,
            adapter: None,
            device: "cpu".into(),
            train: TrainMode::Lora,
        }
    }
}

impl ModelSection {
    /// model.path is required; no path may be given as "".
    pub fn validate(&self) -> Result<()> {
        if self.path.as_os_str().is_empty() {
            bail!("model.path is required");
        }
        no_empty_path("model.tokenizer", self.tokenizer.as_deref())?;
        no_empty_path("model.adapter", self.adapter.as_deref())
    }
}

/// Refuses an optional path setting given as "" (left alone, it surfaced as "reading : No
/// such file").
pub fn no_empty_path(name: &str, path: Option<&Path>) -> Result<()> {
    if path.is_some_and(|p| p.as_os_str().is_empty()) {
        bail!("{name} is empty: name a file, or leave the field out");
    }
    Ok(())
}

/// What to do when a loss or gradient is NaN or infinite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnNonFinite {
    /// Drop the batch (no weight changes) and go on; the skip is logged.
    Skip,
    /// Stop the run with an error; the last checkpoint stays intact.
    Abort,
}

/// `[train]`: the loop shared by every trainer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSection {
    /// Optimiser steps. Default 100.
    pub steps: usize,
    /// Sequences per micro-batch (`osp train`: prompts per iteration online, pairs per
    /// micro-batch offline). Default 8 (`osp train`: 4).
    pub batch_size: usize,
    /// Micro-batches per optimiser step (gradient accumulation). Default 1.
    pub grad_accum: usize,
    /// Seed of data order, initialisation, dropout and sampling. Default 0.
    pub seed: u64,
    /// Longest tokenized sequence, at most the model's max_position_embeddings. Longer SFT
    /// examples keep their first max_len tokens; preference pairs keep the end of the prompt
    /// (at most half of max_len) and cut the responses to fit; online prompts keep their
    /// end, leaving room for sampling.max_new_tokens; judge prompts lose the start of the
    /// task prompt. Default 512.
    pub max_len: usize,
    /// Evaluate every N steps (0: only at the end). Default 50.
    pub eval_every: usize,
    /// Checkpoint every N steps (0: only at the end). Default 50.
    pub save_every: usize,
    /// Checkpoints kept. Default 2.
    pub keep_checkpoints: usize,
    /// "skip" or "abort" on a non-finite loss or gradient. Default "abort".
    pub on_nonfinite: OnNonFinite,
    /// Run folder: metrics.jsonl, config.toml, checkpoints/, the final adapter or model.
    /// Default "runs/run".
    pub out: PathBuf,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            steps: 100,
            batch_size: 8,
            grad_accum: 1,
            seed: 0,
            max_len: 512,
            eval_every: 50,
            save_every: 50,
            keep_checkpoints: 2,
            on_nonfinite: OnNonFinite::Abort,
            out: PathBuf::from("runs/run"),
        }
    }
}

impl TrainSection {
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("train.steps", self.steps),
            ("train.batch_size", self.batch_size),
            ("train.grad_accum", self.grad_accum),
            ("train.max_len", self.max_len),
        ] {
            if v == 0 {
                bail!("{name} must be at least 1");
            }
        }
        if self.out.as_os_str().is_empty() {
            bail!("train.out is empty: name the run folder (it would otherwise be the current folder)");
        }
        Ok(())
    }
}

/// Reads a TOML config (or the defaults when `path` is None), applies `key=value` overrides
/// (values are TOML: numbers, booleans, quoted or bare strings) and deserialises it.
pub fn load_config<T: DeserializeOwned>(path: Option<&Path>, overrides: &[String]) -> Result<T> {
    let mut root: toml::Table = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read config {}", p.display()))?;
            text.parse()
                .with_context(|| format!("{} is not valid TOML", p.display()))?
        }
        None => toml::Table::new(),
    };
    for o in overrides {
        let (key, value) = o
            .split_once('=')
            .ok_or_else(|| anyhow!("override `{o}`: expected section.field=value"))?;
        let value: toml::Value = match format!("v = {value}").parse::<toml::Table>() {
            Ok(mut t) => t
                .remove("v")
                .unwrap_or(toml::Value::String(value.to_string())),
            Err(_) => toml::Value::String(value.to_string()),
        };
        let mut parts: Vec<&str> = key.trim().split('.').collect();
        let last = parts
            .pop()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| anyhow!("override `{o}`: empty key"))?;
        let mut table = &mut root;
        for p in parts {
            table = table
                .entry(p.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .ok_or_else(|| anyhow!("override `{o}`: `{p}` is not a section"))?;
        }
        table.insert(last.to_string(), value);
    }
    let where_ = path
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "the command line".into());
    T::deserialize(toml::Value::Table(root)).map_err(|e| anyhow!("config ({where_}): {e}"))
}

/// Writes the resolved configuration into the run folder as `config.toml`.
pub fn write_resolved<T: Serialize>(run_dir: &Path, cfg: &T) -> Result<()> {
    let text = toml::to_string_pretty(cfg).context("cannot serialise the resolved config")?;
    crate::io::atomic_write(&run_dir.join("config.toml"), text.as_bytes())
}
