//! `osp rm-train`: a reward model from preference pairs, as TRL's `RewardTrainer`: each batch
//! scores the chosen and the rejected sequences (prompt + response + EOS) in one forward pass
//! and minimises the Bradley–Terry loss; held-out pairwise accuracy is measured before
//! training, every `train.eval_every` steps and at the end.
use super::io::{export_merged, save_reward_model};
use super::{
    bradley_terry_loss, margins, resolve_pad_id, reward_stats, MarginSource, RewardModel,
    RewardStats,
};
use crate::data::{split_eval, OnMalformed};
use crate::lora::LoraConfig;
use crate::train::config::{load_config, ModelSection, TrainSection};
use crate::train::optim::OptimConfig;
use crate::train::pairs::{join, load_pairs, tokenize_pair, DataFormat, TokenizedPair};
use crate::train::policy::load_policy;
use crate::train::trainer::{DataCursor, Trainer};
use anyhow::{bail, ensure, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

/// `[reward]`: the head and the loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardSection {
    /// "none" or "strength" (m = margin_scale · (2s − 1) from the pair's strength; 0 where a
    /// pair has none). Default "none".
    pub margin: MarginSource,
    /// Margin of a certain preference (s = 1) with `margin = "strength"`. Default 1.0.
    pub margin_scale: f64,
    /// TRL's `center_rewards_coefficient`: adds c · mean((r_w + r_l)²). Default: none.
    pub center_rewards_coefficient: Option<f64>,
    /// Token id that marks padding (sequences are read at their last other token). Default:
    /// the tokenizer's pad token, else its EOS (TRL's rule).
    pub pad_token_id: Option<u32>,
    /// Also write a merged transformers folder (`RUN/reward_model_merged`) for a LoRA run.
    /// Default false.
    pub export_merged: bool,
}

impl Default for RewardSection {
    fn default() -> Self {
        Self {
            margin: MarginSource::None,
            margin_scale: 1.0,
            center_rewards_coefficient: None,
            pad_token_id: None,
            export_merged: false,
        }
    }
}

/// `[data]` of a reward-model run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RmData {
    /// Preference file. Required.
    pub preferences: PathBuf,
    /// "auto", "trl", "hh", "tldr" or "pandalm". Default "auto".
    pub format: DataFormat,
    /// Held-out preference file; when absent, `eval_fraction` of `preferences` is held out.
    /// Default: none.
    pub eval: Option<PathBuf>,
    /// Share of the pairs held out for accuracy when `eval` is absent. Default 0.1.
    pub eval_fraction: f64,
    /// "skip" or "abort" on a malformed record. Default "skip".
    pub on_malformed: OnMalformed,
}

impl Default for RmData {
    fn default() -> Self {
        Self {
            preferences: PathBuf::new(),
            format: DataFormat::Auto,
            eval: None,
            eval_fraction: 0.1,
            on_malformed: OnMalformed::Skip,
        }
    }
}

/// A whole `osp rm-train` run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RmTrainConfig {
    pub model: ModelSection,
    pub lora: LoraConfig,
    pub optim: OptimConfig,
    pub train: TrainSection,
    pub reward: RewardSection,
    pub data: RmData,
}

impl crate::train::resume::RunConfig for RmTrainConfig {
    fn command(&self) -> &'static str {
        "rm-train"
    }
}

/// The documented defaults (configs/rm.toml), printed by `osp rm-train --print-config`.
pub const RM_TEMPLATE: &str = include_str!("../../configs/rm.toml");

impl RmTrainConfig {
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let cfg: Self = load_config(path, overrides)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            !self.model.path.as_os_str().is_empty(),
            "model.path is required"
        );
        ensure!(
            !self.data.preferences.as_os_str().is_empty(),
            "data.preferences is required"
        );
        ensure!(
            (0.0..1.0).contains(&self.data.eval_fraction),
            "data.eval_fraction must be in [0, 1), got {}",
            self.data.eval_fraction
        );
        let r = &self.reward;
        ensure!(
            r.margin_scale.is_finite() && r.margin_scale >= 0.0,
            "reward.margin_scale must be ≥ 0, got {}",
            r.margin_scale
        );
        if let Some(c) = r.center_rewards_coefficient {
            ensure!(
                c.is_finite() && c >= 0.0,
                "reward.center_rewards_coefficient must be ≥ 0, got {c}"
            );
        }
        Ok(())
    }
}

/// Held-out figures of a reward model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RmEval {
    pub pairs: usize,
    /// The training loss (margin and centring included) over the held-out pairs.
    pub loss: f64,
    #[serde(flatten)]
    pub stats: RewardStats,
}

impl RmEval {
    fn to_json(self, step: usize) -> Value {
        json!({
            "step": step,
            "eval/pairs": self.pairs,
            "eval/loss": self.loss,
            "eval/accuracy": self.stats.accuracy,
            "eval/margin": self.stats.margin,
            "eval/mean_reward": self.stats.mean_reward,
            "eval/min_reward": self.stats.min_reward,
            "eval/max_reward": self.stats.max_reward,
        })
    }
}

/// What an rm-train run produced.
pub struct RmOutcome {
    pub run_dir: PathBuf,
    /// `RUN/reward_model` (empty when stopped early).
    pub output: PathBuf,
    /// `RUN/reward_model_merged`, with `reward.export_merged` on a LoRA run.
    pub merged: Option<PathBuf>,
    /// Held-out figures before training (fresh runs) and at the end.
    pub before: Option<RmEval>,
    pub after: Option<RmEval>,
}

/// Chosen then rejected sequences of a batch, and the batch's margins.
fn batch_seqs(pairs: &[&TokenizedPair]) -> Vec<Vec<u32>> {
    let chosen = pairs.iter().map(|p| join(&p.prompt, &p.chosen).0);
    let rejected = pairs.iter().map(|p| join(&p.prompt, &p.rejected).0);
    chosen.chain(rejected).collect()
}

/// Loss and rewards of a batch of pairs.
fn batch_loss(
    rm: &RewardModel,
    r: &RewardSection,
    pairs: &[&TokenizedPair],
) -> Result<(Tensor, Vec<f32>, Vec<f32>)> {
    let n = pairs.len();
    let all = rm.rewards(&batch_seqs(pairs))?;
    let (c, rj) = (all.narrow(0, 0, n)?, all.narrow(0, n, n)?);
    let strengths: Vec<Option<f64>> = pairs.iter().map(|p| p.strength).collect();
    let m = margins(r.margin, r.margin_scale, &strengths);
    let loss = bradley_terry_loss(&c, &rj, m.as_deref(), r.center_rewards_coefficient)?;
    Ok((
        loss,
        c.detach().to_vec1::<f32>()?,
        rj.detach().to_vec1::<f32>()?,
    ))
}

/// Held-out loss and pairwise accuracy, without gradients.
pub fn evaluate(
    rm: &RewardModel,
    r: &RewardSection,
    pairs: &[TokenizedPair],
    batch_size: usize,
) -> Result<RmEval> {
    ensure!(!pairs.is_empty(), "no held-out pairs");
    let frozen = rm.snapshot()?;
    let (mut loss, mut chosen, mut rejected) = (0.0, vec![], vec![]);
    for chunk in pairs.chunks(batch_size.max(1)) {
        let refs: Vec<&TokenizedPair> = chunk.iter().collect();
        let (l, c, rj) = batch_loss(&frozen, r, &refs)?;
        loss += l.to_scalar::<f32>()? as f64 * chunk.len() as f64;
        chosen.extend(c);
        rejected.extend(rj);
    }
    Ok(RmEval {
        pairs: pairs.len(),
        loss: loss / pairs.len() as f64,
        stats: reward_stats(&chosen, &rejected),
    })
}

fn tokenize_all(
    tok: &crate::tokenizer::Tokenizer,
    pairs: &[crate::data::PreferencePair],
    max_len: usize,
) -> Result<Vec<TokenizedPair>> {
    let mut out = Vec::with_capacity(pairs.len());
    for p in pairs {
        match tokenize_pair(tok, p, max_len)? {
            Ok(t) => out.push(t),
            Err(why) => eprintln!("warning: skipped {why}"),
        }
    }
    Ok(out)
}

/// Runs (or, with `resume`, continues) a reward-model run. `stop_after` ends this invocation
/// after that many optimiser steps with a checkpoint.
pub fn run_rm_train(
    cfg: &RmTrainConfig,
    resume: bool,
    stop_after: Option<usize>,
) -> Result<RmOutcome> {
    cfg.validate()?;
    // A starting adapter (an SFT model) is merged, and fresh adapters train on top of it.
    let lm = load_policy(&cfg.model, &cfg.lora, cfg.train.seed, true)?;
    let tok = &lm.tokenizer;
    let pad = resolve_pad_id(tok, cfg.reward.pad_token_id)?;
    let limit = cfg.train.max_len.min(lm.model.cfg.max_position_embeddings);
    let (raw, warnings) = load_pairs(
        &cfg.data.preferences,
        cfg.data.format,
        Some(tok),
        cfg.data.on_malformed,
    )?;
    for w in warnings.iter().take(5) {
        eprintln!("warning: {w}");
    }
    let all = tokenize_all(tok, &raw, limit)?;
    let (train, held_out) = match &cfg.data.eval {
        Some(path) => {
            let (raw, w) = load_pairs(path, cfg.data.format, Some(tok), cfg.data.on_malformed)?;
            for w in w.iter().take(5) {
                eprintln!("warning: {w}");
            }
            (all, tokenize_all(tok, &raw, limit)?)
        }
        None => split_eval(all, cfg.data.eval_fraction, cfg.train.seed),
    };
    if train.is_empty() {
        bail!(
            "{}: no usable preference pairs",
            cfg.data.preferences.display()
        );
    }
    if cfg.reward.margin == MarginSource::Strength && train.iter().all(|p| p.strength.is_none()) {
        bail!(
            "reward.margin = \"strength\", but no pair in {} has a strength",
            cfg.data.preferences.display()
        );
    }
    let rm = RewardModel::with_fresh_head(lm.model, pad, cfg.train.seed)?;
    let (mut trainer, data) = Trainer::start(
        rm.backbone.clone(),
        &cfg.optim,
        &cfg.train,
        resume,
        "rm-train",
        cfg,
    )?;
    let fresh = data.is_none();
    let mut cursor = data.unwrap_or_else(|| DataCursor::new(cfg.train.seed));
    let bs = cfg.train.batch_size;
    let (mut before, mut after) = (None, None);
    if fresh && !held_out.is_empty() {
        let e = evaluate(&rm, &cfg.reward, &held_out, bs)?;
        trainer.log(e.to_json(0))?;
        before = Some(e);
    }
    while !trainer.done() {
        if trainer.stop_requested(stop_after, serde_json::to_value(cursor)?)? {
            return Ok(RmOutcome {
                run_dir: trainer.run_dir.clone(),
                output: PathBuf::new(),
                merged: None,
                before,
                after: None,
            });
        }
        trainer.model.set_training(true);
        let (mut loss_sum, mut chosen, mut rejected) = (0f64, vec![], vec![]);
        for _ in 0..cfg.train.grad_accum {
            let idx = cursor.next_batch(train.len(), bs);
            let batch: Vec<&TokenizedPair> = idx.iter().map(|&i| &train[i]).collect();
            let tokens: usize = batch
                .iter()
                .map(|p| 2 * p.prompt.len() + p.chosen.len() + p.rejected.len())
                .sum();
            let (loss, c, r) = batch_loss(&rm, &cfg.reward, &batch)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            chosen.extend(c);
            rejected.extend(r);
            trainer.accumulate(&loss, tokens)?;
        }
        trainer.model.set_training(false);
        let s = reward_stats(&chosen, &rejected);
        let mut m = Map::new();
        m.insert("loss".into(), json!(loss_sum / cfg.train.grad_accum as f64));
        m.insert("accuracy".into(), json!(s.accuracy));
        m.insert("margin".into(), json!(s.margin));
        m.insert("min_reward".into(), json!(s.min_reward));
        m.insert("mean_reward".into(), json!(s.mean_reward));
        m.insert("max_reward".into(), json!(s.max_reward));
        m.insert(
            "epoch".into(),
            json!(cursor.epoch as f64 + cursor.pos as f64 / train.len() as f64),
        );
        if trainer.finish_step(m)?.is_none() {
            continue;
        }
        if trainer.eval_due() && !held_out.is_empty() {
            let e = evaluate(&rm, &cfg.reward, &held_out, bs)?;
            let step = trainer.step();
            trainer.log(e.to_json(step))?;
            trainer.progress.println(format!(
                "step {step}: held-out accuracy {:.3}, loss {:.4}",
                e.stats.accuracy, e.loss
            ));
            after = trainer.done().then_some(e);
        }
        let done = trainer.done();
        trainer.maybe_checkpoint(serde_json::to_value(cursor)?, json!({}), done)?;
    }
    trainer.progress.finish();
    if after.is_none() && !held_out.is_empty() {
        after = Some(evaluate(&rm, &cfg.reward, &held_out, bs)?);
    }
    let output = trainer.run_dir.join("reward_model");
    save_reward_model(&rm, tok, &cfg.model, &output)?;
    let merged = if cfg.reward.export_merged && rm.backbone.lora_config().is_some() {
        let dir = trainer.run_dir.join("reward_model_merged");
        export_merged(&rm, tok, &cfg.model, &dir)?;
        Some(dir)
    } else {
        None
    };
    Ok(RmOutcome {
        run_dir: trainer.run_dir.clone(),
        output,
        merged,
        before,
        after,
    })
}
