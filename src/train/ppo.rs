//! `osp train --method ppo`: RLHF with PPO against a reward model, TRL `PPOTrainer`'s loop
//! over the functions of [`crate::ppo`] and the trainers' shared machinery (policy loading,
//! `Trainer`'s optimiser steps, metrics, checkpoints and `--resume`).
//!
//! One rollout: `train.grad_accum` micro-batches of `train.batch_size` prompts, K =
//! `pairing.k` samples per prompt from the current policy (the online loop's sampling path
//! and seeds); the reward model's score of each prompt ++ response (read at its last
//! non-padding token, as TRL's `get_reward`); log πθ_old and the value head's values (no
//! gradient) and log πref, all at the sampling temperature; then [`process_rollout`] (per-token
//! KL reward plus the score, GAE, whitening). Then `ppo.num_ppo_epochs` passes, each a fresh
//! permutation split into `ppo.num_mini_batches` mini-batches; a mini-batch is one optimiser
//! step (AdamW on the LoRA or full weights and the value head), made of `train.grad_accum`
//! micro-batches of `batch_size·K / num_mini_batches` samples each.
//!
//! Steps. `train.steps` counts optimiser steps, as for every method, so a rollout gives up to
//! `num_ppo_epochs × num_mini_batches` of them (fewer with the `target_kl` early stop, or when
//! the run ends mid-rollout). Each step logs one metrics line: the rollout's TRL metrics
//! (`objective/kl`, `objective/entropy`, `objective/non_score_reward`, `objective/rlhf_reward`,
//! `objective/scores`, `val/num_eos_tokens`) and that update's (`policy/approxkl_avg`,
//! `policy/clipfrac_avg`, `loss/policy_avg`, `loss/value_avg`, `val/clipfrac_avg`,
//! `policy/entropy_avg`, `val/ratio`, …, averaged over its micro-batches), plus `loss`
//! (policy + vf_coef · value) and `ppo/epoch`. Checkpoints and `--stop-after` fall on rollout
//! boundaries (a rollout is not stored), when a `train.save_every` multiple was crossed.
//!
//! Value head: on the policy's final hidden states ([`ValueHead`], TRL's `v_head`), trained
//! with it and registered among the model's trainable tensors, so the optimiser state and
//! checkpoints include it; at the end it is saved beside the policy as
//! `RUN/value_head.safetensors` (`v_head.summary.{weight,bias}`), and the adapter (or model)
//! folder holds the policy alone. Dropout is off in every PPO forward pass, as TRL disables it,
//! so that the first epoch's ratios are exactly 1.
use super::method::{Method, TrainConfig};
use super::pairs::{reference_for, response_logps};
use super::policy::{load_policy, save_trained};
use super::trainer::{DataCursor, Trainer};
use crate::data::split_eval;
use crate::engine::inference_model;
use crate::model::Llama;
use crate::ppo::{
    early_stop, policy_forward, ppo_loss, process_rollout, to_rows, PpoStatsLog, Processed,
    Rollout, ValueHead,
};
use crate::reward::io::load_reward_model;
use crate::reward::RewardModel;
use crate::sample::{generate, FinishReason, Request};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

/// The value head's file in the run folder.
pub const VALUE_HEAD_FILE: &str = "value_head.safetensors";
/// Mixed into the run seed for the value head's initialisation.
const HEAD_SEED_SALT: u64 = 0x0076_6865_6164; // "vhead"
/// Mixed into the run seed for the mini-batch permutations.
const MINIBATCH_SEED_SALT: u64 = 0x6d62_6174_6368; // "mbatch"
/// Evaluation samples' seeds, apart from training's.
const EVAL_SEED_SALT: u64 = 0x0e7a_1000;

/// One sampled response of a rollout.
struct Sample {
    prompt: usize,
    tokens: Vec<u32>,
    eos: bool,
}

/// A PPO run in progress.
pub struct PpoRun {
    pub cfg: TrainConfig,
    pub tok: Tokenizer,
    pub trainer: Trainer,
    head: ValueHead,
    /// πref: adapters off (LoRA) or a frozen copy of the starting weights (full).
    reference: Llama,
    reward: RewardModel,
    pub prompts: Vec<(String, Vec<u32>)>,
    pub eval_prompts: Vec<(String, Vec<u32>)>,
    pub cursor: DataCursor,
}

/// Loads the reward model of `ppo.reward_model` and checks that it reads the policy's token
/// ids: same vocabulary size and the same ids for a probe text and for EOS.
pub fn load_checked_reward_model(dir: &Path, device: &str, tok: &Tokenizer) -> Result<RewardModel> {
    let lr = load_reward_model(dir, device)
        .with_context(|| format!("loading the reward model {}", dir.display()))?;
    let (mine, theirs) = (tok.vocab_size(), lr.tokenizer.vocab_size());
    let probe = "The cat sat on the mat. 12 ?";
    let same = mine == theirs
        && lr.model.backbone.cfg.vocab_size == mine.max(lr.model.backbone.cfg.vocab_size)
        && tok.encode(probe, false).ok() == lr.tokenizer.encode(probe, false).ok()
        && tok.eos_ids() == lr.tokenizer.eos_ids();
    if !same {
        bail!(
            "reward model {}: its tokenizer differs from the policy's ({theirs} vs {mine} tokens, \
             or other ids for the same text); PPO scores the policy's token ids, so the reward \
             model must be trained on the policy's tokenizer",
            dir.display()
        );
    }
    Ok(lr.model)
}

impl PpoRun {
    pub fn new(cfg: &TrainConfig, resume: bool) -> Result<Self> {
        ensure!(
            cfg.method == Method::Ppo,
            "PpoRun runs method ppo, not {:?}",
            cfg.method
        );
        let Some(rm_dir) = cfg.ppo.reward_model.clone() else {
            bail!("method ppo needs a reward model: pass --reward-model DIR or set ppo.reward_model (train one with osp rm-train)");
        };
        let lm = load_policy(&cfg.model, &cfg.lora, cfg.train.seed, true)?;
        let tok = lm.tokenizer;
        let reward = load_checked_reward_model(&rm_dir, &cfg.model.device, &tok)?;
        let mut model = lm.model;
        let reference = reference_for(&model)?;
        let head = ValueHead::new(
            model.cfg.hidden_size,
            cfg.train.seed ^ HEAD_SEED_SALT,
            model.device(),
        )?;
        for (name, var) in head.vars() {
            model.add_var(name, var.clone())?;
        }
        let encoded = super::online::encode_prompts(cfg, &tok)?;
        let (prompts, eval_prompts) = split_eval(encoded, cfg.data.eval_fraction, cfg.train.seed);
        ensure!(!prompts.is_empty(), "no training prompts");
        let (trainer, data) = Trainer::start(model, &cfg.optim, &cfg.train, resume, "Ppo", cfg)?;
        let cursor = data.unwrap_or_else(|| DataCursor::new(cfg.train.seed));
        Ok(Self {
            cfg: cfg.clone(),
            tok,
            trainer,
            head,
            reference,
            reward,
            prompts,
            eval_prompts,
            cursor,
        })
    }

    /// Runs rollouts until `train.steps` optimiser steps (or `stop_after` more, at a rollout
    /// boundary), evaluating and checkpointing as configured; saves the policy and the value
    /// head at the end. Returns the policy's folder, or None when stopped early.
    pub fn run(&mut self, stop_after: Option<usize>) -> Result<Option<PathBuf>> {
        self.run_with(stop_after, |_| Ok(()))
    }

    /// [`Self::run`], calling `after_rollout` after each rollout's updates (and before its
    /// evaluation and checkpoint), as `OnlineRun::run` does after each step: the demo draws its
    /// learning curves there.
    pub fn run_with(
        &mut self,
        stop_after: Option<usize>,
        mut after_rollout: impl FnMut(&Self) -> Result<()>,
    ) -> Result<Option<PathBuf>> {
        while !self.trainer.done() {
            if self
                .trainer
                .stop_requested(stop_after, serde_json::to_value(self.cursor)?)?
            {
                return Ok(None);
            }
            let before = self.trainer.step();
            self.rollout_and_update()?;
            after_rollout(self)?;
            let after = self.trainer.step();
            let crossed = |every: usize| every > 0 && before / every != after / every;
            let done = self.trainer.done();
            if after > before && (done || crossed(self.trainer.cfg.eval_every)) {
                if let Some(mut m) = self.evaluate()? {
                    m.insert("step".into(), json!(after));
                    self.trainer.log(Value::Object(m))?;
                }
            }
            self.trainer.maybe_checkpoint(
                serde_json::to_value(self.cursor)?,
                json!({}),
                done || crossed(self.trainer.cfg.save_every),
            )?;
        }
        self.trainer.progress.finish();
        for name in [ValueHead::WEIGHT, ValueHead::BIAS] {
            self.trainer.model.remove_var(name);
        }
        let out = save_trained(
            &self.trainer.model,
            &self.tok,
            &self.cfg.model,
            &self.trainer.run_dir,
        )?;
        crate::io::save_safetensors(
            &self.trainer.run_dir.join(VALUE_HEAD_FILE),
            &self.head.named_tensors(),
        )?;
        Ok(Some(out))
    }

    /// The value head (trained in place).
    pub fn value_head(&self) -> &ValueHead {
        &self.head
    }

    /// One rollout and its PPO epochs (up to `num_ppo_epochs × num_mini_batches` optimiser
    /// steps). Returns the metrics line of each step taken.
    pub fn rollout_and_update(&mut self) -> Result<Vec<Map<String, Value>>> {
        let step0 = self.trainer.step();
        let batches: Vec<Vec<usize>> = (0..self.cfg.train.grad_accum)
            .map(|_| {
                self.cursor
                    .next_batch(self.prompts.len(), self.cfg.train.batch_size)
            })
            .collect();
        let samples = self.sample(&batches, step0)?;
        let Some(processed) = self.score_and_process(&samples)? else {
            // Non-finite values: the step is skipped or the run aborted (train.on_nonfinite).
            self.trainer.finish_step(Map::new())?;
            return Ok(vec![]);
        };
        let eos: Vec<bool> = samples.iter().map(|s| s.eos).collect();
        let mut rollout = processed.metrics(&eos).to_json();
        let lengths: Vec<f64> = samples.iter().map(|s| s.tokens.len() as f64).collect();
        rollout.insert(
            "completions/mean_length".into(),
            json!(lengths.iter().sum::<f64>() / lengths.len() as f64),
        );
        rollout.insert("completions/count".into(), json!(samples.len()));
        let ppo = self.cfg.ppo.clone();
        let micro = samples.len() / ppo.num_mini_batches / self.cfg.train.grad_accum;
        let seed = crate::train::online::sample_seed(
            self.cfg.train.seed ^ MINIBATCH_SEED_SALT,
            step0,
            0,
            0,
        );
        let mut logged = vec![];
        'epochs: for epoch in 0..ppo.num_ppo_epochs {
            for mb in ppo.minibatches(samples.len(), seed, epoch)? {
                if self.trainer.done() {
                    break 'epochs;
                }
                let mut stats = PpoStatsLog::default();
                for part in mb.chunks(micro.max(1)) {
                    self.micro_batch(&samples, &processed, part, &mut stats)?;
                }
                // TRL 0.11 checks the mini-batch's policy KL (here: over its micro-batches).
                let policykl = stats.to_json()["policy/policykl_avg"]
                    .as_f64()
                    .unwrap_or(f64::NAN);
                let stop = early_stop(ppo.target_kl, policykl);
                stats.early_stopped = stop;
                let mut m = rollout.clone();
                m.extend(stats.to_json());
                let loss = m["loss/policy_avg"].as_f64().unwrap_or(f64::NAN)
                    + ppo.vf_coef * m["loss/value_avg"].as_f64().unwrap_or(f64::NAN);
                m.insert("loss".into(), json!(loss));
                m.insert("ppo/epoch".into(), json!(epoch));
                if self.trainer.finish_step(m.clone())?.is_some() {
                    self.trainer
                        .progress
                        .set_message(format!("loss {loss:.4} score {:.3}", processed_score(&m)));
                    logged.push(m);
                }
                if stop {
                    break 'epochs;
                }
            }
        }
        Ok(logged)
    }

    /// K samples per prompt of every micro-batch from the current policy (seeds per step,
    /// prompt and sample, as the online loop's).
    fn sample(&self, batches: &[Vec<usize>], step: usize) -> Result<Vec<Sample>> {
        let policy = inference_model(&self.trainer.model)?.into_owned();
        let k = self.cfg.pairing.k;
        let eos_id = self.tok.eos_ids().first().copied();
        let mut out = vec![];
        for batch in batches {
            let requests: Vec<Request> = batch
                .iter()
                .flat_map(|&p| (0..k).map(move |j| (p, j)))
                .map(|(p, j)| Request {
                    prompt: self.prompts[p].1.clone(),
                    seed: crate::train::online::sample_seed(self.cfg.train.seed, step, p, j),
                })
                .collect();
            let gens = generate(&policy, &self.tok, &requests, &self.cfg.sampling)?;
            for (i, g) in gens.into_iter().enumerate() {
                let mut tokens = g.tokens;
                if tokens.is_empty() {
                    // Nothing sampled (a stop string at once): score the bare EOS, as the
                    // reward model reads an empty response.
                    tokens.extend(eos_id);
                }
                ensure!(
                    !tokens.is_empty(),
                    "an empty sample and no EOS token to stand for it"
                );
                out.push(Sample {
                    prompt: batch[i / k],
                    tokens,
                    eos: g.finish == FinishReason::Eos,
                });
            }
        }
        Ok(out)
    }

    fn seqs<'a>(
        &'a self,
        samples: &'a [Sample],
        rows: &[usize],
    ) -> (Vec<&'a [u32]>, Vec<&'a [u32]>) {
        rows.iter()
            .map(|&i| {
                let s = &samples[i];
                (self.prompts[s.prompt].1.as_slice(), s.tokens.as_slice())
            })
            .unzip()
    }

    /// Scores, old log-probs, values and reference log-probs of the rollout (no gradient),
    /// turned into advantages and returns. None when a value is not finite (the step is then
    /// marked non-finite).
    fn score_and_process(&mut self, samples: &[Sample]) -> Result<Option<Processed>> {
        let width = samples.iter().map(|s| s.tokens.len()).max().unwrap_or(1);
        let chunk = (self.cfg.train.batch_size * self.cfg.pairing.k).max(1);
        let temp = self.cfg.sampling.temperature;
        let policy = inference_model(&self.trainer.model)?.into_owned();
        let (mut logprobs, mut ref_logprobs, mut values, mut scores) =
            (vec![], vec![], vec![], vec![]);
        let all: Vec<usize> = (0..samples.len()).collect();
        for rows in all.chunks(chunk) {
            let (prompts, responses) = self.seqs(samples, rows);
            let out = policy_forward(&policy, Some(&self.head), &prompts, &responses, width, temp)?;
            logprobs.extend(to_rows(&out.logprobs)?);
            let v = out.values.context("the value head gave no values")?;
            values.extend(to_rows(&v)?);
            let r = policy_forward(&self.reference, None, &prompts, &responses, width, temp)?;
            ref_logprobs.extend(to_rows(&r.logprobs)?);
            let ids: Vec<Vec<u32>> = prompts
                .iter()
                .zip(&responses)
                .map(|(p, r)| [*p, *r].concat())
                .collect();
            scores.extend(self.reward.score_ids(&ids, chunk)?);
        }
        let lengths: Vec<usize> = samples.iter().map(|s| s.tokens.len()).collect();
        let bad = (0..samples.len()).find(|&i| {
            let n = lengths[i];
            !scores[i].is_finite()
                || [&logprobs[i], &ref_logprobs[i], &values[i]]
                    .iter()
                    .any(|row| row[..n].iter().any(|v| !v.is_finite()))
        });
        if let Some(i) = bad {
            self.trainer.mark_nonfinite(format!(
                "non-finite log-probability, value or score in sample {i} of the rollout"
            ));
            return Ok(None);
        }
        let eos: Vec<bool> = samples.iter().map(|s| s.eos).collect();
        let rollout = Rollout {
            logprobs: &logprobs,
            ref_logprobs: &ref_logprobs,
            values: &values,
            lengths: &lengths,
            scores: &scores,
            contains_eos: &eos,
        };
        Ok(Some(process_rollout(&self.cfg.ppo, &rollout)?))
    }

    /// One micro-batch of a mini-batch: the clipped losses with gradient, backpropagated into
    /// the trainer's accumulator.
    fn micro_batch(
        &mut self,
        samples: &[Sample],
        processed: &Processed,
        rows: &[usize],
        stats: &mut PpoStatsLog,
    ) -> Result<()> {
        let device = self.trainer.model.device().clone();
        let mb = processed.minibatch(rows, &device)?;
        let (prompts, responses) = self.seqs(samples, rows);
        let out = policy_forward(
            &self.trainer.model,
            Some(&self.head),
            &prompts,
            &responses,
            processed.width,
            self.cfg.sampling.temperature,
        )?;
        let values = out.values.context("the value head gave no values")?;
        let loss = ppo_loss(&self.cfg.ppo, &out.logprobs, &values, &mb)?;
        let tokens = prompts
            .iter()
            .zip(&responses)
            .map(|(p, r)| p.len() + r.len())
            .sum();
        self.trainer.accumulate(&loss.loss, tokens)?;
        stats.push(loss.stats, out.entropy_mean);
        Ok(())
    }

    /// Held-out evaluation (None without held-out prompts): one sample per prompt from πθ and
    /// from πref (seeds fixed across evaluations), scored by the reward model:
    /// `eval/scores`, `eval/ref_scores`, `eval/win_rate_vs_ref` (share of prompts where πθ's
    /// sample scores higher, a tie ½), `eval/kl` (mean Σ log πθ − log πref of πθ's samples)
    /// and `eval/mean_length`.
    pub fn evaluate(&self) -> Result<Option<Map<String, Value>>> {
        if self.eval_prompts.is_empty() {
            return Ok(None);
        }
        let policy = inference_model(&self.trainer.model)?.into_owned();
        let reqs: Vec<Request> = (0..self.eval_prompts.len())
            .map(|p| Request {
                prompt: self.eval_prompts[p].1.clone(),
                seed: crate::train::online::sample_seed(
                    self.cfg.train.seed ^ EVAL_SEED_SALT,
                    usize::MAX,
                    p,
                    0,
                ),
            })
            .collect();
        let bs = self.cfg.train.batch_size.max(1);
        let score = |model: &Llama| -> Result<(Vec<f32>, Vec<f64>, Vec<f64>)> {
            let (mut s, mut kl, mut len) = (vec![], vec![], vec![]);
            for chunk in reqs.chunks(bs * self.cfg.pairing.k.max(1)) {
                let gens = generate(model, &self.tok, chunk, &self.cfg.sampling)?;
                let seqs: Vec<(&[u32], &[u32])> = chunk
                    .iter()
                    .zip(&gens)
                    .map(|(r, g)| (r.prompt.as_slice(), g.tokens.as_slice()))
                    .collect();
                let ids: Vec<Vec<u32>> = seqs.iter().map(|(p, r)| [*p, *r].concat()).collect();
                s.extend(self.reward.score_ids(&ids, bs)?);
                let lp: Vec<f32> = response_logps(model, &seqs)?.to_vec1()?;
                let lr: Vec<f32> = response_logps(&self.reference, &seqs)?.to_vec1()?;
                kl.extend(lp.iter().zip(&lr).map(|(a, b)| (a - b) as f64));
                len.extend(gens.iter().map(|g| g.tokens.len() as f64));
            }
            Ok((s, kl, len))
        };
        let (ours, kl, len) = score(&policy)?;
        let (theirs, _, _) = score(&self.reference)?;
        let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len().max(1) as f64;
        let f = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
        let wins: Vec<f64> = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| match a.partial_cmp(b) {
                Some(std::cmp::Ordering::Greater) => 1.0,
                Some(std::cmp::Ordering::Equal) => 0.5,
                _ => 0.0,
            })
            .collect();
        let mut m = Map::new();
        m.insert("eval/scores".into(), json!(mean(&f(&ours))));
        m.insert("eval/ref_scores".into(), json!(mean(&f(&theirs))));
        m.insert("eval/win_rate_vs_ref".into(), json!(mean(&wins)));
        m.insert("eval/kl".into(), json!(mean(&kl)));
        m.insert("eval/mean_length".into(), json!(mean(&len)));
        m.insert("eval/prompts".into(), json!(self.eval_prompts.len()));
        Ok(Some(m))
    }
}

fn processed_score(m: &Map<String, Value>) -> f64 {
    m.get("objective/scores")
        .and_then(Value::as_f64)
        .unwrap_or(f64::NAN)
}
