//! `osp train --method self-rewarding` (Yuan et al. 2024) on the online loop: the model scores
//! each of its K samples alone with [`SelfJudge`] (the expected score over the answer tokens
//! " 1" … " 5", see `self_reward`), the best and the worst sample of a prompt become a DPO
//! pair when their scores differ (by more than `self_reward.pair_min_gap`), and the loop's DPO
//! loss trains on them against πref.
//!
//! Iterations. The paper's M1 → M2 → M3 are rounds of "generate, self-judge, train with DPO
//! from M_t as πref". Here one run holds them: `train.steps` is split evenly over
//! `self_rewarding.iterations` ([`SelfRewardingSection::starts`]); at the first step of every
//! iteration after the first, the model trained so far is saved as
//! `RUN/self_rewarding/m{t}/` (an `adapter/` or `model/` folder, M1 being the starting model)
//! and becomes πref. Unlike the paper, the samples of an iteration come from the current
//! policy (online) rather than all from M_t up front, the judge is the one `judge.model` names
//! (the current policy by default, as the paper's M_t judges its own samples), and AdamW's
//! state and the learning-rate schedule continue across iterations. `eval/*` compares against
//! the current πref.
//!
//! The judge is taught from the seed preferences before the run, with `osp judge-train`
//! and `judge_train.mode = "pointwise"` (each pair gives two pointwise examples; see
//! `self_reward`), and the run starts from that adapter (`model.adapter`).
use super::method::{Method, SelfRewardingSection, TrainConfig};
use super::online_method::{OnlineMethod, OnlinePair};
use super::policy::{load_policy, save_trained};
use crate::model::Llama;
use crate::pairing::JudgeFn;
use crate::self_reward::{select_pair, SelfJudge};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};

/// The method: pairs from pointwise scores.
pub struct SelfRewarding {
    pub judge: SelfJudge,
}

impl SelfRewarding {
    pub fn new(cfg: &TrainConfig, tok: &Tokenizer) -> Result<Self> {
        Ok(Self {
            judge: SelfJudge::new(cfg.self_reward.clone(), tok)?,
        })
    }

    /// The (best, worst) pair of one prompt's samples from their scores, if they differ.
    pub fn pairs_from_scores(&self, scores: &[f64]) -> Result<Vec<OnlinePair>> {
        Ok(select_pair(scores, self.judge.cfg.pair_min_gap)?
            .map(|(chosen, rejected)| OnlinePair {
                chosen,
                rejected,
                strength: 1.0,
                rank: 0,
            })
            .into_iter()
            .collect())
    }

    /// Scores one prompt's samples with `model` (a snapshot) and pairs them. Returns the pairs
    /// and the judge prompts' tokens.
    pub fn score_and_pair(
        &self,
        model: &Llama,
        tok: &Tokenizer,
        prompt: &str,
        samples: &[&str],
    ) -> Result<(Vec<OnlinePair>, usize)> {
        let limit = model.cfg.max_position_embeddings;
        let mut tokens = 0;
        let items: Vec<(&str, &str)> = samples.iter().map(|s| (prompt, *s)).collect();
        let scores = self.judge.score_with(&items, &mut |chunk| {
            let ids = chunk
                .iter()
                .map(|(x, y)| self.judge.encode(tok, x, y, limit))
                .collect::<Result<Vec<_>>>()?;
            tokens += ids.iter().map(Vec::len).sum::<usize>();
            self.judge.answer_logits(model, &ids)
        })?;
        let s: Vec<f64> = scores.iter().map(|s| s.expected).collect();
        Ok((self.pairs_from_scores(&s)?, tokens))
    }
}

impl OnlineMethod for SelfRewarding {
    fn pairs(
        &self,
        _n_samples: usize,
        _judge: &mut JudgeFn<'_>,
        _rng: &mut ChaCha8Rng,
    ) -> Result<Vec<OnlinePair>> {
        bail!("self-rewarding scores each sample alone: the loop calls score_and_pair")
    }

    fn self_rewarding(&self) -> Option<&SelfRewarding> {
        Some(self)
    }
}

/// The folder of M_t (t ≥ 2) in a run folder.
pub fn model_dir(run_dir: &Path, t: usize) -> PathBuf {
    run_dir.join("self_rewarding").join(format!("m{t}"))
}

/// The iteration (1-based) that optimiser step `step` (0-based, the next one to take) is in.
pub fn iteration_of(sec: &SelfRewardingSection, steps: usize, step: usize) -> usize {
    sec.starts(steps)
        .iter()
        .filter(|&&s| s <= step)
        .count()
        .max(1)
}

/// At the first step of iteration t ≥ 2: saves the model trained so far as M_t and returns it
/// as the new πref (a frozen snapshot). None at every other step.
pub fn next_reference(
    cfg: &TrainConfig,
    step: usize,
    model: &Llama,
    tok: &Tokenizer,
    run_dir: &Path,
) -> Result<Option<Llama>> {
    if cfg.method != Method::SelfRewarding {
        return Ok(None);
    }
    let starts = cfg.self_rewarding.starts(cfg.train.steps);
    let Some(t) = starts
        .iter()
        .skip(1)
        .position(|&s| s == step)
        .map(|i| i + 2)
    else {
        return Ok(None);
    };
    let dir = model_dir(run_dir, t);
    std::fs::create_dir_all(&dir)?;
    save_trained(model, tok, &cfg.model, &dir)?;
    Ok(Some(model.snapshot()?))
}

/// πref of a run resumed at `step`: M_t of the iteration `step` is in, read back from its
/// folder, when that iteration began before `step` (at its first step `next_reference` makes
/// it). None when πref is still the starting model.
pub fn resumed_reference(cfg: &TrainConfig, step: usize, run_dir: &Path) -> Result<Option<Llama>> {
    if cfg.method != Method::SelfRewarding {
        return Ok(None);
    }
    let starts = cfg.self_rewarding.starts(cfg.train.steps);
    let Some(t) = (1..starts.len())
        .rev()
        .find(|&i| starts[i] < step)
        .map(|i| i + 1)
    else {
        return Ok(None);
    };
    let dir = model_dir(run_dir, t);
    let fresh = load_policy(&cfg.model, &cfg.lora, cfg.train.seed, true)?.model;
    if fresh.lora_config().is_some() {
        crate::model::load_adapter(&fresh, &dir.join("adapter"))?;
        Ok(Some(fresh.snapshot()?))
    } else {
        let device = crate::device(&cfg.model.device)?;
        let lm = crate::model::load_model(
            &dir.join("model"),
            None,
            &device,
            crate::model::Trainable::None,
        )?;
        Ok(Some(lm.model.snapshot()?))
    }
}
