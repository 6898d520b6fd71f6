//! Preference augmentation (OSP.md §4): teach the model to judge from a small seed of human
//! preferences. Each seed pair (x, y_w, y_l[, s]) gives two judge examples, J(x, y_w, y_l) → A
//! and J(x, y_l, y_w) → B, trained on the answer token only (soft targets [s, 1 − s] over
//! the two answer tokens when the data carry strengths), mixed with SFT examples (x → y_w)
//! so that generation does not degrade.
use super::config::{load_config, ModelSection, TrainSection};
use super::optim::OptimConfig;
use super::pairs::{join, load_pairs, tokenize_pair, DataFormat};
use super::policy::{load_policy, save_trained};
use super::sft::sft_loss;
use super::trainer::{DataCursor, Trainer};
use crate::data::{split_eval, OnMalformed, PreferencePair, TokenizedExample};
use crate::judge::{Judge, JudgeConfig, JudgeReport};
use crate::lora::LoraConfig;
use crate::model::{Llama, TokenBatch};
use crate::self_reward::{pointwise_loss, PointwiseExample, SelfJudge, SelfRewardConfig};
use anyhow::{bail, Result};
use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map};
use std::path::{Path, PathBuf};

/// `[data]` of preference augmentation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JudgeTrainData {
    /// Seed preference file. Required.
    pub preferences: PathBuf,
    /// "auto", "trl", "hh", "tldr" or "pandalm". Default "auto".
    pub format: DataFormat,
    /// Share of the pairs held out to measure the judge before and after. Default 0.1.
    pub eval_fraction: f64,
    /// Share of each batch that is SFT rather than judge examples. Default 0.5.
    pub sft_mix: f64,
    /// SFT examples to mix in (the SFT training file, in any `osp sft` format); without it,
    /// the seed pairs' chosen responses (x → y_w). Default: none.
    pub sft: Option<PathBuf>,
    /// Use the data's strengths as soft targets where present (else hard A/B). Default true.
    pub soft_targets: bool,
    /// "skip" or "abort" on a malformed record. Default "skip".
    pub on_malformed: OnMalformed,
    /// "pairwise" (the OSP judge: J(x, y1, y2) → A/B, see `[judge]`) or "pointwise" (the
    /// self-rewarding judge: each pair gives J(x, y_w) and J(x, y_l) with target scores on
    /// the 5-point scale, see `[self_reward]`). Default "pairwise".
    pub mode: JudgeMode,
}

/// Which judge preference augmentation teaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JudgeMode {
    Pairwise,
    Pointwise,
}

impl Default for JudgeTrainData {
    fn default() -> Self {
        Self {
            preferences: PathBuf::new(),
            format: DataFormat::Auto,
            eval_fraction: 0.1,
            sft_mix: 0.5,
            sft: None,
            soft_targets: true,
            on_malformed: OnMalformed::default(),
            mode: JudgeMode::Pairwise,
        }
    }
}

/// A whole `osp judge-train` run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JudgeTrainConfig {
    pub model: ModelSection,
    pub lora: LoraConfig,
    pub optim: OptimConfig,
    pub train: TrainSection,
    pub judge: JudgeConfig,
    /// The pointwise judge (`data.mode = "pointwise"`).
    pub self_reward: SelfRewardConfig,
    pub data: JudgeTrainData,
}

impl super::resume::RunConfig for JudgeTrainConfig {
    fn command(&self) -> &'static str {
        "judge-train"
    }
}

impl JudgeTrainConfig {
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let cfg: Self = load_config(path, overrides)?;
        cfg.model.validate()?;
        cfg.train.validate()?;
        if cfg.data.preferences.as_os_str().is_empty() {
            bail!("data.preferences is required");
        }
        super::config::no_empty_path("data.sft", cfg.data.sft.as_deref())?;
        if !(0.0..1.0).contains(&cfg.data.sft_mix) {
            bail!("data.sft_mix must be in [0, 1), got {}", cfg.data.sft_mix);
        }
        Ok(cfg)
    }
}

/// A judge prompt and the probability that its answer is A.
#[derive(Debug, Clone)]
pub struct JudgeExample {
    pub ids: Vec<u32>,
    pub target_a: f64,
}

/// The two judge examples of one preference pair.
pub fn judge_examples(
    judge: &Judge,
    tok: &crate::tokenizer::Tokenizer,
    p: &PreferencePair,
    soft: bool,
    limit: usize,
) -> Result<[JudgeExample; 2]> {
    let t = if soft { p.strength.unwrap_or(1.0) } else { 1.0 };
    Ok([
        JudgeExample {
            ids: judge.encode(tok, &p.prompt, &p.chosen, &p.rejected, limit)?,
            target_a: t,
        },
        JudgeExample {
            ids: judge.encode(tok, &p.prompt, &p.rejected, &p.chosen, limit)?,
            target_a: 1.0 - t,
        },
    ])
}

/// −[t·log π(A | J) + (1 − t)·log π(B | J)], averaged: cross-entropy on the answer position
/// only (every other position is masked by construction: only the last one is computed).
pub fn judge_loss(model: &Llama, judge: &Judge, batch: &[&JudgeExample]) -> Result<Tensor> {
    let seqs: Vec<Vec<u32>> = batch.iter().map(|e| e.ids.clone()).collect();
    let tb = TokenBatch::left_padded(&seqs, model.device())?;
    let h = model.forward_hidden(&tb.ids, &tb.positions, &tb.bias, None)?;
    let logp = candle_nn::ops::log_softmax(
        &model.logits(&h.narrow(1, tb.len - 1, 1)?.squeeze(1)?)?,
        D::Minus1,
    )?;
    let (a, b) = judge.answer_ids();
    let two = logp.index_select(&Tensor::new(&[a, b], model.device())?, D::Minus1)?;
    let t: Vec<f32> = batch
        .iter()
        .flat_map(|e| [e.target_a as f32, 1.0 - e.target_a as f32])
        .collect();
    let t = Tensor::from_vec(t, (batch.len(), 2), model.device())?;
    Ok(((two * t)?.sum_all()? * (-1.0 / batch.len() as f64))?)
}

/// The judge a run teaches and its examples.
enum Taught {
    Pairwise(Judge, Vec<JudgeExample>),
    Pointwise(SelfJudge, Vec<PointwiseExample>),
}

impl Taught {
    fn len(&self) -> usize {
        match self {
            Taught::Pairwise(_, e) => e.len(),
            Taught::Pointwise(_, e) => e.len(),
        }
    }

    /// The loss of examples `idx` and their tokens.
    fn loss(&self, model: &Llama, idx: &[usize]) -> Result<(Tensor, usize)> {
        Ok(match self {
            Taught::Pairwise(j, e) => {
                let b: Vec<&JudgeExample> = idx.iter().map(|&i| &e[i]).collect();
                let t = b.iter().map(|x| x.ids.len()).sum();
                (judge_loss(model, j, &b)?, t)
            }
            Taught::Pointwise(j, e) => {
                let b: Vec<&PointwiseExample> = idx.iter().map(|&i| &e[i]).collect();
                let t = b.iter().map(|x| x.ids.len()).sum();
                (pointwise_loss(model, j, &b)?, t)
            }
        })
    }

    /// The judge on held-out pairs. Pointwise, a pair's strength is σ(E[score(y_w)] −
    /// E[score(y_l)]), so accuracy is the share of pairs whose chosen response scores higher
    /// (ties ½) and the calibration figures are of that logistic reading.
    fn report(
        &self,
        model: &Llama,
        tok: &crate::tokenizer::Tokenizer,
        pairs: &[PreferencePair],
    ) -> Result<JudgeReport> {
        let m = crate::engine::inference_model(model)?;
        match self {
            Taught::Pairwise(j, _) => j.evaluate(&m, tok, pairs),
            Taught::Pointwise(j, _) => {
                let items: Vec<(&str, &str)> = pairs
                    .iter()
                    .flat_map(|p| {
                        [
                            (p.prompt.as_str(), p.chosen.as_str()),
                            (p.prompt.as_str(), p.rejected.as_str()),
                        ]
                    })
                    .collect();
                let sc = j.score(&m, tok, &items)?;
                let js: Vec<crate::judge::Judgement> = sc
                    .chunks(2)
                    .map(|w| {
                        let s = 1.0 / (1.0 + (w[1].expected - w[0].expected).exp());
                        crate::judge::Judgement {
                            strength: s,
                            p_forward: s,
                            p_backward: None,
                        }
                    })
                    .collect();
                Ok(JudgeReport::from_judgements(pairs, &js, false))
            }
        }
    }
}

/// What a judge-train run produced.
pub struct JudgeTrainOutcome {
    pub run_dir: PathBuf,
    pub output: PathBuf,
    pub before: JudgeReport,
    /// None when the run stopped early (`stop_after`).
    pub after: Option<JudgeReport>,
}

/// Runs (or, with `resume`, continues) preference augmentation; reports the judge on
/// held-out pairs before and after. `stop_after` ends this invocation after that many
/// optimiser steps with a checkpoint (then `output` is empty and `after` is None).
pub fn run_judge_train(
    cfg: &JudgeTrainConfig,
    resume: bool,
    stop_after: Option<usize>,
) -> Result<JudgeTrainOutcome> {
    let lm = load_policy(&cfg.model, &cfg.lora, cfg.train.seed, false)?;
    let tok = &lm.tokenizer;
    let (pairs, warnings) = load_pairs(
        &cfg.data.preferences,
        cfg.data.format,
        Some(tok),
        cfg.data.on_malformed,
    )?;
    for w in warnings.iter().take(5) {
        eprintln!("warning: {w}");
    }
    let (train, held_out) = split_eval(pairs, cfg.data.eval_fraction, cfg.train.seed);
    if train.is_empty() {
        bail!(
            "{}: no usable preference pairs",
            cfg.data.preferences.display()
        );
    }
    let limit = cfg.train.max_len.min(lm.model.cfg.max_position_embeddings);
    let mut taught = match cfg.data.mode {
        JudgeMode::Pairwise => Taught::Pairwise(Judge::new(cfg.judge.clone(), tok)?, vec![]),
        JudgeMode::Pointwise => {
            let mut sr = cfg.self_reward.clone();
            // data.soft_targets governs both modes.
            sr.soft_targets = sr.soft_targets && cfg.data.soft_targets;
            Taught::Pointwise(SelfJudge::new(sr, tok)?, vec![])
        }
    };
    let mut sft_ex = Vec::with_capacity(train.len());
    for p in &train {
        match &mut taught {
            Taught::Pairwise(judge, ex) => {
                ex.extend(judge_examples(judge, tok, p, cfg.data.soft_targets, limit)?);
            }
            Taught::Pointwise(judge, ex) => ex.extend(judge.pointwise_examples(tok, p, limit)?),
        }
        if cfg.data.sft.is_some() {
            continue;
        }
        if let Ok(t) = tokenize_pair(tok, p, limit)? {
            let (ids, loss_mask) = join(&t.prompt, &t.chosen);
            sft_ex.push(TokenizedExample {
                ids,
                loss_mask,
                source: p.source.clone(),
            });
        }
    }
    if let Some(path) = &cfg.data.sft {
        let (examples, warnings) = crate::data::load_sft(path, tok, limit, cfg.data.on_malformed)?;
        for w in warnings.iter().take(5) {
            eprintln!("warning: {w}");
        }
        sft_ex = examples;
    }
    let before = taught.report(&lm.model, tok, &held_out)?;
    let (mut trainer, data) = Trainer::start(
        lm.model.clone(),
        &cfg.optim,
        &cfg.train,
        resume,
        "judge-train",
        cfg,
    )?;
    let fresh = data.is_none();
    let (mut jc, mut sc): (DataCursor, DataCursor) = data.unwrap_or_else(|| {
        (
            DataCursor::new(cfg.train.seed),
            DataCursor::new(cfg.train.seed.wrapping_add(1)),
        )
    });
    if fresh {
        trainer.log(json!({"step": 0, "judge_before": before}))?;
    }
    let n_sft = if sft_ex.is_empty() {
        0
    } else {
        (cfg.train.batch_size as f64 * cfg.data.sft_mix).round() as usize
    };
    let n_judge = cfg.train.batch_size.saturating_sub(n_sft).max(1);
    let mut after = None;
    while !trainer.done() {
        if trainer.stop_requested(stop_after, serde_json::to_value((jc, sc))?)? {
            return Ok(JudgeTrainOutcome {
                run_dir: trainer.run_dir.clone(),
                output: PathBuf::new(),
                before,
                after: None,
            });
        }
        trainer.model.set_training(true);
        let (mut jl, mut sl) = (0f64, 0f64);
        for _ in 0..cfg.train.grad_accum {
            let jb = jc.next_batch(taught.len(), n_judge);
            let (mut loss, mut tokens) = taught.loss(&trainer.model, &jb)?;
            jl += loss.to_scalar::<f32>()? as f64;
            if n_sft > 0 {
                let sb: Vec<&TokenizedExample> = sc
                    .next_batch(sft_ex.len(), n_sft)
                    .iter()
                    .map(|&i| &sft_ex[i])
                    .collect();
                let (l, _) = sft_loss(&trainer.model, &sb)?;
                sl += l.to_scalar::<f32>()? as f64;
                tokens += sb.iter().map(|e| e.ids.len()).sum::<usize>();
                // Weighted by share of the batch, so sft_mix sets the balance.
                loss = ((loss * (1.0 - cfg.data.sft_mix))? + (l * cfg.data.sft_mix)?)?;
            }
            trainer.accumulate(&loss, tokens)?;
        }
        trainer.model.set_training(false);
        let ga = cfg.train.grad_accum as f64;
        let mut m = Map::new();
        m.insert("loss".into(), json!(jl / ga));
        m.insert("judge_loss".into(), json!(jl / ga));
        if n_sft > 0 {
            m.insert("sft_loss".into(), json!(sl / ga));
        }
        if trainer.finish_step(m)?.is_none() {
            continue;
        }
        if trainer.eval_due() && !held_out.is_empty() && !trainer.done() {
            let r = taught.report(&trainer.model, tok, &held_out)?;
            let step = trainer.step();
            trainer
                .progress
                .println(format!("step {step}: judge accuracy {:.3}", r.accuracy));
            trainer.log(json!({"step": step, "judge_eval": r}))?;
        }
        let done = trainer.done();
        if done {
            // Logged before the final checkpoint, so a run killed after it (while the
            // adapter is written) resumes with its log complete and does not log it twice.
            let r = taught.report(&trainer.model, tok, &held_out)?;
            trainer.log(json!({"step": trainer.step(), "judge_after": r}))?;
            after = Some(r);
        }
        trainer.maybe_checkpoint(serde_json::to_value((jc, sc))?, json!({}), done)?;
    }
    trainer.progress.finish();
    let after = match after {
        Some(r) => r,
        // Resumed after the last step: the log already holds it.
        None => taught.report(&trainer.model, tok, &held_out)?,
    };
    let output = save_trained(&trainer.model, tok, &cfg.model, &trainer.run_dir)?;
    Ok(JudgeTrainOutcome {
        run_dir: trainer.run_dir.clone(),
        output,
        before,
        after: Some(after),
    })
}

/// The documented defaults (configs/judge_train.toml), printed by `--print-config`.
pub const JUDGE_TRAIN_TEMPLATE: &str = include_str!("../../configs/judge_train.toml");
