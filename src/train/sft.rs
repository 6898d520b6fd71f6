//! Supervised fine-tuning: cross-entropy on completion tokens only, with a held-out eval loss.
use super::config::{load_config, ModelSection, TrainSection};
use super::optim::OptimConfig;
use super::policy::{load_policy, save_trained};
use super::trainer::{DataCursor, Trainer};
use crate::data::OnMalformed;
use crate::data::{load_sft, split_eval, TokenizedExample};
use crate::lora::LoraConfig;
use crate::model::Llama;
use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map};
use std::path::{Path, PathBuf};

/// `[data]` of an SFT run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftData {
    /// Training file: JSONL / JSON of prompt+completion, text, or messages records. Required.
    pub train: PathBuf,
    /// Held-out file; when absent, `eval_fraction` of `train` is held out. Default: none.
    pub eval: Option<PathBuf>,
    /// Share of the training file held out for evaluation when `eval` is absent. Default 0.1.
    pub eval_fraction: f64,
    /// "skip" (report file:line and go on) or "abort" on a malformed record. Default "skip".
    pub on_malformed: OnMalformed,
}

impl Default for SftData {
    fn default() -> Self {
        Self {
            train: PathBuf::new(),
            eval: None,
            eval_fraction: 0.1,
            on_malformed: OnMalformed::default(),
        }
    }
}

/// A whole SFT run, as read from `osp sft --config FILE`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftConfig {
    pub model: ModelSection,
    pub lora: LoraConfig,
    pub optim: OptimConfig,
    pub train: TrainSection,
    pub data: SftData,
}

/// The documented defaults (configs/sft.toml), printed by `osp sft --print-config`.
pub const SFT_TEMPLATE: &str = include_str!("../../configs/sft.toml");

impl super::resume::RunConfig for SftConfig {
    fn command(&self) -> &'static str {
        "sft"
    }
}

impl SftConfig {
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let cfg: Self = load_config(path, overrides)?;
        cfg.model.validate()?;
        cfg.train.validate()?;
        if cfg.data.train.as_os_str().is_empty() {
            bail!("data.train is required");
        }
        super::config::no_empty_path("data.eval", cfg.data.eval.as_deref())?;
        if !(0.0..1.0).contains(&cfg.data.eval_fraction) {
            bail!(
                "data.eval_fraction must be in [0, 1), got {}",
                cfg.data.eval_fraction
            );
        }
        Ok(cfg)
    }
}

/// Mean negative log-likelihood per trained token, and the number of trained tokens.
pub fn sft_loss(model: &Llama, batch: &[&TokenizedExample]) -> Result<(Tensor, usize)> {
    let seqs: Vec<Vec<u32>> = batch.iter().map(|e| e.ids.clone()).collect();
    let masks: Vec<Vec<bool>> = batch.iter().map(|e| e.loss_mask.clone()).collect();
    let n: usize = masks
        .iter()
        .map(|m| m.iter().skip(1).filter(|&&x| x).count())
        .sum();
    if n == 0 {
        bail!("a batch without trained tokens");
    }
    let (_, per_token) = model.token_logps(&seqs, &masks)?;
    Ok(((per_token.sum_all()? * (-1.0 / n as f64))?, n))
}

/// Token-weighted mean loss over a dataset, without gradients.
pub fn eval_loss(model: &Llama, data: &[TokenizedExample], batch_size: usize) -> Result<f64> {
    let frozen = model.snapshot()?;
    let (mut total, mut count) = (0f64, 0usize);
    for chunk in data.chunks(batch_size.max(1)) {
        let refs: Vec<&TokenizedExample> = chunk.iter().collect();
        let (loss, n) = sft_loss(&frozen, &refs)?;
        total += loss.to_scalar::<f32>()? as f64 * n as f64;
        count += n;
    }
    Ok(if count == 0 {
        f64::NAN
    } else {
        total / count as f64
    })
}

/// What an SFT run produced.
pub struct SftOutcome {
    pub run_dir: PathBuf,
    /// Eval loss before training and after each evaluation, as (step, loss).
    pub eval_losses: Vec<(usize, f64)>,
    /// The saved adapter folder (LoRA) or model folder (full fine-tuning).
    pub output: PathBuf,
}

/// Runs (or, with `resume`, continues) an SFT run. `stop_after` ends this invocation after
/// that many optimiser steps with a checkpoint, to be continued with `resume` (preemptible
/// jobs, time-boxed sessions).
pub fn run_sft(cfg: &SftConfig, resume: bool, stop_after: Option<usize>) -> Result<SftOutcome> {
    let lm = load_policy(&cfg.model, &cfg.lora, cfg.train.seed, false)?;
    let tok = &lm.tokenizer;
    let (train_all, warnings) = load_sft(
        &cfg.data.train,
        tok,
        cfg.train.max_len,
        cfg.data.on_malformed,
    )?;
    let (train, eval) = match &cfg.data.eval {
        Some(p) => {
            let (eval, w) = load_sft(p, tok, cfg.train.max_len, cfg.data.on_malformed)?;
            print_warnings(&w);
            (train_all, eval)
        }
        None => split_eval(train_all, cfg.data.eval_fraction, cfg.train.seed),
    };
    print_warnings(&warnings);
    if train.is_empty() {
        let first = warnings
            .first()
            .map(|w| format!(" (first problem: {w})"))
            .unwrap_or_default();
        bail!(
            "{}: no usable training examples{first}",
            cfg.data.train.display()
        );
    }
    let (mut trainer, data) =
        Trainer::start(lm.model.clone(), &cfg.optim, &cfg.train, resume, "sft", cfg)?;
    let fresh = data.is_none();
    let mut cursor = data.unwrap_or_else(|| DataCursor::new(cfg.train.seed));
    let mut eval_losses = vec![];
    if fresh && !eval.is_empty() {
        let l = eval_loss(&trainer.model, &eval, cfg.train.batch_size)?;
        trainer.log(json!({"step": 0, "eval_loss": l}))?;
        eval_losses.push((0, l));
    }
    while !trainer.done() {
        if trainer.stop_requested(stop_after, serde_json::to_value(cursor)?)? {
            return Ok(SftOutcome {
                run_dir: trainer.run_dir.clone(),
                eval_losses,
                output: PathBuf::new(),
            });
        }
        trainer.model.set_training(true);
        let mut loss_sum = 0f64;
        for _ in 0..cfg.train.grad_accum {
            let idx = cursor.next_batch(train.len(), cfg.train.batch_size);
            let batch: Vec<&TokenizedExample> = idx.iter().map(|&i| &train[i]).collect();
            let tokens: usize = batch.iter().map(|e| e.ids.len()).sum();
            let (loss, _) = sft_loss(&trainer.model, &batch)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            trainer.accumulate(&loss, tokens)?;
        }
        trainer.model.set_training(false);
        let mut m = Map::new();
        m.insert("loss".into(), json!(loss_sum / cfg.train.grad_accum as f64));
        m.insert(
            "epoch".into(),
            json!(cursor.epoch as f64 + cursor.pos as f64 / train.len() as f64),
        );
        if trainer.finish_step(m)?.is_none() {
            continue;
        }
        if trainer.eval_due() && !eval.is_empty() {
            let l = eval_loss(&trainer.model, &eval, cfg.train.batch_size)?;
            let step = trainer.step();
            trainer.log(json!({"step": step, "eval_loss": l}))?;
            trainer
                .progress
                .println(format!("step {step}: eval loss {l:.4}"));
            eval_losses.push((step, l));
        }
        let done = trainer.done();
        trainer.maybe_checkpoint(serde_json::to_value(cursor)?, json!({}), done)?;
    }
    trainer.progress.finish();
    let output = save_trained(&trainer.model, &lm.tokenizer, &cfg.model, &trainer.run_dir)?;
    Ok(SftOutcome {
        run_dir: trainer.run_dir.clone(),
        eval_losses,
        output,
    })
}

fn print_warnings(w: &[String]) {
    for line in w.iter().take(10) {
        eprintln!("warning: {line}");
    }
    if w.len() > 10 {
        eprintln!("warning: … and {} more", w.len() - 10);
    }
}
