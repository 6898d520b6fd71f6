//! The online loop (OSP.md §5) and its online baselines: sample K responses per prompt with
//! the current policy, judge them with the model itself, pair them, and take one optimiser
//! step on the preference loss against πref.
use super::lockstep::lockstep_pairs;
use super::method::{Method, TrainConfig};
use super::online_method::{online_method_with, OnlineMethod, OnlinePair};
use super::pairs::{
    bucketed_response_logps, by_length, frozen_response_logps, load_pairs, reference_for,
    response_logps,
};
use super::policy::{load_policy, save_trained};
use super::trainer::{DataCursor, Trainer};
use crate::data::{load_prompts, split_eval, ChatRender};
use crate::engine::inference_model;
use crate::judge::{Judge, JudgeModel};
use crate::loss::{preference_loss, PairLogps};
use crate::model::Llama;
use crate::pairing::{Baseline, Cand};
use crate::sample::{generate, Generation, Request, SamplingParams};
use crate::tokenizer::Tokenizer;
use anyhow::{Context, Result};
use candle_core::Tensor;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};
use std::path::PathBuf;
use std::time::Instant;

/// Bins of the judged-strength histogram logged per iteration and per pair rank.
pub const STRENGTH_BINS: usize = 10;

/// Seeds of the evaluation samples: fixed across evaluations, apart from training's.
const EVAL_SEED_SALT: u64 = 0x0e7a_1000;
/// Sequences per batch of πθ's log-probabilities with the graph: sorted by length and padded
/// per batch, so short prompts do not pay for the longest one.
const GRAPH_BUCKET: usize = 16;
/// Padded tokens per graph pass when the loss is backpropagated bucket by bucket (at least
/// one sequence): the activations kept for backward grow with tokens (about 1 GB per 600
/// tokens on a 135M model), while larger passes make larger, faster products.
const BACKWARD_TOKENS: usize = 1024;
/// Held-out prompts sampled per batch during evaluation.
const EVAL_CHUNK: usize = 64;

/// What the judging stage measured.
#[derive(Default)]
struct JudgeStats {
    judgements: usize,
    position_biased: usize,
    prompt_tokens: usize,
    abs_margin_sum: f64,
}

/// Seconds spent in each phase of a step, summed over its micro-batches.
#[derive(Default, Clone, Copy)]
struct PhaseSecs {
    sample: f64,
    judge: f64,
    logprob: f64,
    train: f64,
}

/// What a step's micro-batches measured, turned into one metrics line by [`StepLog::metrics`].
#[derive(Default)]
struct StepLog {
    judge: JudgeStats,
    /// (strength, rank) of every pair.
    strengths: Vec<(f64, usize)>,
    /// Σ log πθ − log πref of every sample.
    kl: Vec<f64>,
    /// Tokens of every sample.
    lengths: Vec<f64>,
    /// The loss metrics of each micro-batch that produced a loss.
    losses: Vec<Map<String, Value>>,
    sampled_tokens: usize,
    train_tokens: usize,
    secs: PhaseSecs,
}

impl StepLog {
    fn add_loss_metrics(&mut self, m: Map<String, Value>) {
        self.losses.push(m);
    }

    /// One metrics line, TRL's names where TRL has one: loss metrics averaged over the
    /// micro-batches (as offline training averages them), the rest over every sample or pair.
    fn metrics(&self, k: usize) -> Map<String, Value> {
        let mut m = Map::new();
        for l in &self.losses {
            for (key, v) in l {
                let add = v.as_f64().unwrap_or(0.0) / self.losses.len() as f64;
                let cur = m.get(key).and_then(Value::as_f64).unwrap_or(0.0);
                m.insert(key.clone(), json!(cur + add));
            }
        }
        m.insert("objective/kl".into(), json!(mean(&self.kl)));
        let s: Vec<f64> = self.strengths.iter().map(|q| q.0).collect();
        m.insert("judge/strength_mean".into(), json!(mean(&s)));
        m.insert("judge/strength_hist".into(), json!(histogram(&s)));
        let by_rank: Vec<Vec<usize>> = (0..k / 2)
            .map(|r| {
                let v: Vec<f64> = self
                    .strengths
                    .iter()
                    .filter(|q| q.1 == r)
                    .map(|q| q.0)
                    .collect();
                histogram(&v)
            })
            .collect();
        m.insert("judge/strength_by_rank".into(), json!(by_rank));
        let j = &self.judge;
        m.insert(
            "judge/abs_margin_mean".into(),
            json!(j.abs_margin_sum / j.judgements.max(1) as f64),
        );
        m.insert(
            "judge/position_bias_rate".into(),
            json!(j.position_biased as f64 / j.judgements.max(1) as f64),
        );
        m.insert("completions/mean_length".into(), json!(mean(&self.lengths)));
        m.insert("pairs".into(), json!(self.strengths.len()));
        m.insert("completions/count".into(), json!(self.lengths.len()));
        let per_s = |n: usize, secs: f64| json!(n as f64 / secs.max(1e-9));
        let t = self.secs;
        m.insert(
            "speed/sampling_tokens_per_s".into(),
            per_s(self.sampled_tokens, t.sample),
        );
        m.insert(
            "speed/judging_tokens_per_s".into(),
            per_s(j.prompt_tokens, t.judge),
        );
        m.insert(
            "speed/training_tokens_per_s".into(),
            per_s(self.train_tokens, t.logprob + t.train),
        );
        for (phase, secs) in [
            ("sample", t.sample),
            ("judge", t.judge),
            ("logprob", t.logprob),
            ("train", t.train),
        ] {
            m.insert(format!("speed/{phase}_seconds"), json!(secs));
        }
        m
    }

    /// The progress bar's message: loss, KL and where the step's time went.
    fn progress_message(&self, m: &Map<String, Value>) -> String {
        let f = |k: &str| m.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
        let t = self.secs;
        format!(
            "loss {:.4} kl {:.3} | sample {:.1}s judge {:.1}s logprob {:.1}s train {:.1}s",
            f("loss"),
            f("objective/kl"),
            t.sample,
            t.judge,
            t.logprob,
            t.train
        )
    }
}

/// An online run in progress.
pub struct OnlineRun {
    pub cfg: TrainConfig,
    pub tok: Tokenizer,
    pub trainer: Trainer,
    judge: Judge,
    /// The method's part of the loop: how a prompt's samples become pairs.
    method: Box<dyn OnlineMethod>,
    /// πref: adapters off (LoRA) or a frozen copy of the starting weights (full).
    reference: Llama,
    /// The starting model as a snapshot, when it judges (judge.model = "initial").
    initial_judge: Option<Llama>,
    pub prompts: Vec<(String, Vec<u32>)>,
    pub eval_prompts: Vec<(String, Vec<u32>)>,
    pub cursor: DataCursor,
    /// Without dropout, backpropagate the loss one bucket of sequences at a time (default;
    /// bounds memory). False runs every paired sample through one graph: the reference that
    /// tests hold the bucketed gradient equal to.
    pub backward_in_buckets: bool,
}

impl OnlineRun {
    pub fn new(cfg: &TrainConfig, resume: bool) -> Result<Self> {
        let lm = load_policy(&cfg.model, &cfg.lora, cfg.train.seed, true)?;
        let tok = lm.tokenizer;
        let judge = Judge::new(cfg.judge.clone(), &tok)?;
        let reference = reference_for(&lm.model)?;
        let initial_judge = match cfg.judge.model {
            JudgeModel::Initial => Some(inference_model(&reference)?.into_owned()),
            JudgeModel::Current => None,
        };
        let encoded = encode_prompts(cfg, &tok)?;
        if let Some(w) = pairing_warning(cfg) {
            eprintln!("warning: {w}");
        }
        let (prompts, eval_prompts) = split_eval(encoded, cfg.data.eval_fraction, cfg.train.seed);
        anyhow::ensure!(!prompts.is_empty(), "no training prompts");
        let what = format!("{:?}", cfg.method);
        let (trainer, data) = Trainer::start(lm.model, &cfg.optim, &cfg.train, resume, &what, cfg)?;
        let cursor = data.unwrap_or_else(|| DataCursor::new(cfg.train.seed));
        // Self-rewarding resumed in a later iteration: πref is that iteration's M_t.
        let reference =
            super::self_rewarding::resumed_reference(cfg, trainer.step(), &trainer.run_dir)?
                .unwrap_or(reference);
        Ok(Self {
            cfg: cfg.clone(),
            method: online_method_with(cfg, &tok)?,
            tok,
            trainer,
            judge,
            reference,
            initial_judge,
            prompts,
            eval_prompts,
            cursor,
            backward_in_buckets: true,
        })
    }

    /// Runs iterations until `train.steps` (or `stop_after` more), evaluating and
    /// checkpointing as configured; saves the adapter (or model) at the end. Returns the
    /// output folder, or None when stopped early.
    pub fn run(
        &mut self,
        stop_after: Option<usize>,
        mut on_step: impl FnMut(&mut Self) -> Result<()>,
    ) -> Result<Option<PathBuf>> {
        while !self.trainer.done() {
            if self
                .trainer
                .stop_requested(stop_after, serde_json::to_value(self.cursor)?)?
            {
                return Ok(None);
            }
            if self.iteration()?.is_some() {
                if self.trainer.eval_due() {
                    if let Some(mut m) = self.evaluate()? {
                        m.insert("step".into(), json!(self.trainer.step()));
                        self.trainer.log(Value::Object(m))?;
                    }
                }
                on_step(self)?;
            }
            let done = self.trainer.done();
            self.checkpoint(done)?;
        }
        self.trainer.progress.finish();
        let out = save_trained(
            &self.trainer.model,
            &self.tok,
            &self.cfg.model,
            &self.trainer.run_dir,
        )?;
        Ok(Some(out))
    }

    fn checkpoint(&mut self, force: bool) -> Result<()> {
        self.trainer
            .maybe_checkpoint(serde_json::to_value(self.cursor)?, json!({}), force)?;
        Ok(())
    }

    /// One online iteration, top to bottom: for each of `train.grad_accum` micro-batches of
    /// prompts, sample → judge → pair → log-probs → loss → backward; then one optimiser step.
    /// Returns None when the step was skipped (non-finite values under on_nonfinite = "skip").
    pub fn iteration(&mut self) -> Result<Option<Map<String, Value>>> {
        // Self-rewarding: a new iteration trains against the model so far as πref.
        if let Some(r) = super::self_rewarding::next_reference(
            &self.cfg,
            self.trainer.step(),
            &self.trainer.model,
            &self.tok,
            &self.trainer.run_dir,
        )? {
            self.reference = r;
        }
        let batches: Vec<Vec<usize>> = (0..self.cfg.train.grad_accum)
            .map(|_| {
                self.cursor
                    .next_batch(self.prompts.len(), self.cfg.train.batch_size)
            })
            .collect();
        self.step_on(&batches)
    }

    /// One optimiser step on the given micro-batches of prompt indices (the benchmark
    /// times a fixed batch this way; `iteration` takes them from the data cursor).
    pub fn step_on(&mut self, batches: &[Vec<usize>]) -> Result<Option<Map<String, Value>>> {
        let step = self.trainer.step();
        // The policy is the same for every micro-batch of the step: one frozen copy samples
        // (and judges, with judge.model = "self").
        // A shallow copy on the CPU engine (it reads the live weights in place).
        let policy = inference_model(&self.trainer.model)?.into_owned();
        let mut log = StepLog::default();
        for batch in batches {
            self.micro_batch(&policy, batch, step, &mut log)?;
        }
        let m = log.metrics(self.cfg.pairing.k);
        let done = self.trainer.finish_step(m.clone())?;
        self.trainer.progress.set_message(log.progress_message(&m));
        Ok(done.map(|_| m))
    }

    /// One micro-batch of prompts: samples, judged pairs, log-probs, and the loss's gradient
    /// into the trainer's accumulator (scaled by 1/grad_accum there).
    fn micro_batch(
        &mut self,
        policy: &Llama,
        batch: &[usize],
        step: usize,
        log: &mut StepLog,
    ) -> Result<()> {
        let k = self.cfg.pairing.k;

        // 1. Sample K responses per prompt from the current policy.
        let t = Instant::now();
        let requests: Vec<Request> = batch
            .iter()
            .flat_map(|&p| (0..k).map(move |j| (p, j)))
            .map(|(p, j)| Request {
                prompt: self.prompts[p].1.clone(),
                seed: sample_seed(self.cfg.train.seed, step, p, j),
            })
            .collect();
        let samples = generate(policy, &self.tok, &requests, &self.cfg.sampling)?;
        log.sampled_tokens += samples.iter().map(|g| g.tokens.len()).sum::<usize>();
        log.lengths
            .extend(samples.iter().map(|g| g.tokens.len() as f64));
        log.secs.sample += t.elapsed().as_secs_f64();

        // 2–3. Judge the samples with the model itself and pair them.
        let t = Instant::now();
        let judge_model = self.initial_judge.as_ref().unwrap_or(policy);
        let baselines = match self.cfg.pairing.baseline {
            Baseline::Given => Some(self.reference_greedy(batch)?),
            Baseline::First => None,
        };
        let per_prompt = self.pair_prompts(
            judge_model,
            batch,
            &samples,
            baselines.as_deref(),
            step,
            &mut log.judge,
        )?;
        let mut pairs = Vec::new();
        for (b, mut prompt_pairs) in per_prompt.into_iter().enumerate() {
            // Pairs index the micro-batch's samples.
            prompt_pairs
                .iter_mut()
                .for_each(|q| (q.chosen, q.rejected) = (q.chosen + b * k, q.rejected + b * k));
            pairs.extend(prompt_pairs);
        }
        log.secs.judge += t.elapsed().as_secs_f64();
        if !pairs.is_empty() && pairs.iter().all(|q| (q.strength - 0.5).abs() < 1e-9) {
            let msg = format!(
                "warning: step {}: every judged strength is 0.5 (identical or empty samples?); \
                 the step has no preference to learn from",
                step + 1
            );
            self.trainer.progress.suspend(|| eprintln!("{msg}"));
        }
        log.strengths
            .extend(pairs.iter().map(|q| (q.strength, q.rank)));

        // 4. Log-probabilities of every sample under πref and πθ, so that `objective/kl`
        // covers every sampled completion, as TRL's. Only the paired samples need πθ's graph:
        // each runs once through the training path (whatever pairs it is in); πref and the
        // unpaired samples' πθ (the baseline sample, for KL alone) take the engine.
        let t = Instant::now();
        let seqs: Vec<(&[u32], &[u32])> = samples
            .iter()
            .enumerate()
            .map(|(i, g)| (self.prompts[batch[i / k]].1.as_slice(), g.tokens.as_slice()))
            .collect();
        let ref_host = frozen_response_logps(&self.reference, &seqs)?;
        let mut in_pair = vec![pairs.is_empty(); seqs.len()];
        for q in &pairs {
            (in_pair[q.chosen], in_pair[q.rejected]) = (true, true);
        }
        let (graph_idx, free_idx): (Vec<usize>, Vec<usize>) =
            (0..seqs.len()).partition(|&i| in_pair[i]);
        // Row of each sample in the graph pass.
        let mut row = vec![usize::MAX; seqs.len()];
        graph_idx.iter().enumerate().for_each(|(r, &i)| row[i] = r);
        let pick = |idx: &[usize]| idx.iter().map(|&i| seqs[i]).collect::<Vec<_>>();
        // Without dropout, πθ's values come from the engine too, and the loss is
        // backpropagated one small bucket of sequences at a time (see `backward_in_buckets`):
        // one graph over every paired sample kept all of their activations alive at once
        // (19 GB for 16 samples of SmolLM2-135M). With dropout the graph's values differ from
        // the engine's, so the single graph pass stays.
        let bucketed =
            self.backward_in_buckets && !pairs.is_empty() && self.cfg.lora.lora_dropout == 0.0;
        let pol_graph = if bucketed {
            None
        } else {
            self.trainer.model.set_training(true);
            let g = bucketed_response_logps(&self.trainer.model, &pick(&graph_idx), GRAPH_BUCKET);
            self.trainer.model.set_training(false);
            Some(g?)
        };
        // The samples whose πθ values the engine gives: all of them when bucketed.
        let engine_idx: Vec<usize> = match bucketed {
            true => (0..seqs.len()).collect(),
            false => free_idx,
        };
        // The sampler recorded them where it could (the CPU engine); the rest are scored.
        let unrecorded: Vec<usize> = engine_idx
            .iter()
            .copied()
            .filter(|&i| samples[i].logprob.is_none())
            .collect();
        let mut scored = match unrecorded.is_empty() {
            true => vec![],
            false => frozen_response_logps(policy, &pick(&unrecorded))?,
        }
        .into_iter();
        let pol_free: Vec<f32> = engine_idx
            .iter()
            .map(|&i| {
                samples[i]
                    .logprob
                    .or_else(|| scored.next())
                    .unwrap_or(f32::NAN)
            })
            .collect();
        log.secs.logprob += t.elapsed().as_secs_f64();
        let mut pol_host = vec![0f32; seqs.len()];
        if let Some(g) = &pol_graph {
            for (&i, v) in graph_idx.iter().zip(g.detach().to_vec1::<f32>()?) {
                pol_host[i] = v;
            }
        }
        for (&i, &v) in engine_idx.iter().zip(&pol_free) {
            pol_host[i] = v;
        }
        let bad = (pol_host.iter().chain(&ref_host)).position(|x| !x.is_finite());
        if let Some(i) = bad {
            // Routed through train.on_nonfinite like a non-finite loss: skip or abort the step.
            let (model, i, v) = if i < pol_host.len() {
                ("πθ", i, pol_host[i])
            } else {
                let j = i - pol_host.len();
                ("πref", j, ref_host[j])
            };
            self.trainer.mark_nonfinite(format!(
                "non-finite log-probability {v} under {model} (sample {i} of a micro-batch)"
            ));
            return Ok(());
        }
        log.kl
            .extend(pol_host.iter().zip(&ref_host).map(|(p, r)| (p - r) as f64));

        // 5. The loss on the pairs, backpropagated into the accumulator.
        let t = Instant::now();
        if pairs.is_empty() {
            // Self-rewarding can find no pair (every prompt's samples scored alike): the
            // micro-batch contributes a zero gradient.
            let pol_graph = pol_graph.context("no graph pass for an empty micro-batch")?;
            let zero = (pol_graph.sum_all()? * 0.0)?;
            self.trainer.accumulate(&zero, 0)?;
            return Ok(());
        }
        let device = self.trainer.model.device().clone();
        let idx = |f: fn(&OnlinePair) -> usize| -> Result<Tensor> {
            let v: Vec<u32> = pairs.iter().map(|q| row[f(q)] as u32).collect();
            Ok(Tensor::from_vec(v, pairs.len(), &device)?)
        };
        let strengths: Vec<f32> = pairs.iter().map(|q| q.strength as f32).collect();
        let strength = Tensor::from_vec(strengths, pairs.len(), &device)?;
        // Bucketed: the log-probabilities enter the loss as leaves, whose gradients then
        // weight each bucket's graph pass.
        let host = |f: fn(&OnlinePair) -> usize| -> Result<candle_core::Var> {
            let v: Vec<f32> = pairs.iter().map(|q| pol_host[f(q)]).collect();
            Ok(candle_core::Var::from_tensor(&Tensor::from_vec(
                v,
                pairs.len(),
                &device,
            )?)?)
        };
        let (pol_c, pol_r, leaves) = match &pol_graph {
            Some(g) => (
                g.index_select(&idx(|q| q.chosen)?, 0)?,
                g.index_select(&idx(|q| q.rejected)?, 0)?,
                None,
            ),
            None => {
                let (c, r) = (host(|q| q.chosen)?, host(|q| q.rejected)?);
                (c.as_tensor().clone(), r.as_tensor().clone(), Some((c, r)))
            }
        };
        let ref_of = |f: fn(&OnlinePair) -> usize| -> Result<Tensor> {
            let v: Vec<f32> = pairs.iter().map(|q| ref_host[f(q)]).collect();
            Ok(Tensor::from_vec(v, pairs.len(), &device)?)
        };
        let (ref_c, ref_r) = (ref_of(|q| q.chosen)?, ref_of(|q| q.rejected)?);
        let lp = PairLogps {
            policy_chosen: &pol_c,
            policy_rejected: &pol_r,
            ref_chosen: &ref_c,
            ref_rejected: &ref_r,
        };
        let out = preference_loss(&self.cfg.loss, &lp, Some(&strength))?;
        let tokens = seqs.iter().map(|(p, r)| p.len() + r.len()).sum::<usize>();
        match &leaves {
            Some((c, r)) => Self::backward_in_buckets(
                &mut self.trainer,
                &out.loss,
                (c, r),
                &pairs,
                &seqs,
                &graph_idx,
                tokens,
            )?,
            None => self.trainer.accumulate(&out.loss, tokens)?,
        }
        log.train_tokens += tokens;
        let mut m = out.metrics.to_json();
        m.insert("loss".into(), json!(out.loss.to_scalar::<f32>()? as f64));
        log.add_loss_metrics(m);
        log.secs.train += t.elapsed().as_secs_f64();
        Ok(())
    }

    /// The gradient of `loss` through the paired samples' log-probabilities, one bucket of
    /// `BACKWARD_TOKENS` padded tokens at a time: with g_i = ∂loss/∂logp_i taken on the leaves,
    /// ∂loss/∂θ = Σ_i g_i ∂logp_i/∂θ, so backpropagating Σ_i g_i logp_i bucket by bucket gives
    /// the same gradient while only one bucket's activations are alive.
    fn backward_in_buckets(
        trainer: &mut Trainer,
        loss: &Tensor,
        (chosen, rejected): (&candle_core::Var, &candle_core::Var),
        pairs: &[OnlinePair],
        seqs: &[(&[u32], &[u32])],
        paired: &[usize],
        tokens: usize,
    ) -> Result<()> {
        let value: f32 = loss.to_scalar()?;
        if !value.is_finite() {
            // The trainer marks the step non-finite (skip or abort under train.on_nonfinite).
            return trainer.accumulate(loss, tokens);
        }
        let grads = loss.backward()?;
        let leaf = |v: &candle_core::Var| -> Result<Vec<f32>> {
            Ok(match grads.get(v.as_tensor()) {
                Some(g) => g.to_vec1()?,
                None => vec![0.0; pairs.len()],
            })
        };
        let (gc, gr) = (leaf(chosen)?, leaf(rejected)?);
        let mut g = vec![0f32; seqs.len()];
        for (q, (a, b)) in pairs.iter().zip(gc.iter().zip(&gr)) {
            g[q.chosen] += a;
            g[q.rejected] += b;
        }
        // Every paired sample, even one whose weight is 0 (all strengths ½): the step then
        // accumulates a zero gradient, as the single graph pass did. Buckets of similar
        // length, so that little of each pass is padding.
        let order = by_length(seqs, paired.iter().copied());
        let device = trainer.model.device().clone();
        let mut first = true;
        for chunk in token_buckets(&order, |i| seqs[i].0.len() + seqs[i].1.len()) {
            let part: Vec<(&[u32], &[u32])> = chunk.iter().map(|&i| seqs[i]).collect();
            trainer.model.set_training(true);
            let lp = response_logps(&trainer.model, &part);
            trainer.model.set_training(false);
            let w: Vec<f32> = chunk.iter().map(|&i| g[i]).collect();
            let surrogate = (lp? * Tensor::from_vec(w, chunk.len(), &device)?)?.sum_all()?;
            // The step's tokens are counted once.
            trainer.accumulate(&surrogate, if first { tokens } else { 0 })?;
            first = false;
        }
        Ok(())
    }

    /// Evaluates the policy on the held-out prompts (None when there are none): one sample
    /// per prompt from πθ and one from πref (seeds fixed across evaluations), logged with
    /// TRL-style names: `eval/kl` (mean over πθ's samples of Σ log πθ − log πref),
    /// `eval/mean_length` and `eval/ref_mean_length` (tokens), `eval/win_rate_vs_ref` (the
    /// share of prompts whose πθ sample a judge that is not the policy — πref's weights, or
    /// the initial model with judge.model = "initial" — prefers to πref's, a tie counting ½)
    /// and `eval/judged_strength_vs_ref` (the mean judged strength itself).
    pub fn evaluate(&self) -> Result<Option<Map<String, Value>>> {
        if self.eval_prompts.is_empty() {
            return Ok(None);
        }
        let policy = inference_model(&self.trainer.model)?;
        let prompts = &self.eval_prompts;
        let reqs: Vec<Request> = (0..prompts.len())
            .map(|p| Request {
                prompt: prompts[p].1.clone(),
                seed: sample_seed(self.cfg.train.seed ^ EVAL_SEED_SALT, usize::MAX, p, 0),
            })
            .collect();
        let (mut ours, mut theirs, mut kl) = (vec![], vec![], vec![]);
        for chunk in reqs.chunks(EVAL_CHUNK) {
            let o = generate(&policy, &self.tok, chunk, &self.cfg.sampling)?;
            let seqs: Vec<(&[u32], &[u32])> = chunk
                .iter()
                .zip(&o)
                .map(|(r, g)| (r.prompt.as_slice(), g.tokens.as_slice()))
                .collect();
            let lp = frozen_response_logps(&policy, &seqs)?;
            let lr = frozen_response_logps(&self.reference, &seqs)?;
            kl.extend(lp.iter().zip(&lr).map(|(p, r)| (p - r) as f64));
            ours.extend(o);
            theirs.extend(generate(
                &self.reference,
                &self.tok,
                chunk,
                &self.cfg.sampling,
            )?);
        }
        let judge_model = self.initial_judge.as_ref().unwrap_or(&self.reference);
        let items: Vec<(&str, &str, &str)> = (0..prompts.len())
            .map(|i| {
                (
                    prompts[i].0.as_str(),
                    ours[i].text.as_str(),
                    theirs[i].text.as_str(),
                )
            })
            .collect();
        let js = self.judge.judge(judge_model, &self.tok, &items)?;
        let s: Vec<f64> = js.iter().map(|j| j.strength).collect();
        let wins: Vec<f64> = s
            .iter()
            .map(|&x| match x.partial_cmp(&0.5) {
                Some(std::cmp::Ordering::Greater) => 1.0,
                Some(std::cmp::Ordering::Equal) => 0.5,
                _ => 0.0,
            })
            .collect();
        let len =
            |g: &[Generation]| mean(&g.iter().map(|g| g.tokens.len() as f64).collect::<Vec<_>>());
        let mut m = Map::new();
        m.insert("eval/kl".into(), json!(mean(&kl)));
        m.insert("eval/mean_length".into(), json!(len(&ours)));
        m.insert("eval/ref_mean_length".into(), json!(len(&theirs)));
        m.insert("eval/win_rate_vs_ref".into(), json!(mean(&wins)));
        m.insert("eval/judged_strength_vs_ref".into(), json!(mean(&s)));
        m.insert("eval/prompts".into(), json!(prompts.len()));
        Ok(Some(m))
    }

    /// Judges every prompt's samples and pairs them, as the method does (`online_method`),
    /// with the comparisons of all prompts in one batched judge call per round
    /// (`lockstep`): the same pairs and strengths as judging each prompt alone.
    fn pair_prompts(
        &self,
        judge_model: &Llama,
        batch: &[usize],
        samples: &[Generation],
        baselines: Option<&[String]>,
        step: usize,
        stats: &mut JudgeStats,
    ) -> Result<Vec<Vec<OnlinePair>>> {
        let k = self.cfg.pairing.k;
        if let Some(sr) = self.method.self_rewarding() {
            // Pointwise scores, one prompt at a time: no comparisons to batch in rounds.
            return (0..batch.len())
                .map(|b| {
                    let prompt = self.prompts[batch[b]].0.as_str();
                    let texts: Vec<&str> = samples[b * k..(b + 1) * k]
                        .iter()
                        .map(|g| g.text.as_str())
                        .collect();
                    let (pairs, tokens) =
                        sr.score_and_pair(judge_model, &self.tok, prompt, &texts)?;
                    stats.judgements += texts.len();
                    stats.prompt_tokens += tokens;
                    Ok(pairs)
                })
                .collect();
        }
        let text = |b: usize, c: Cand| -> &str {
            match c {
                Cand::Sample(i) => samples[b * k + i].text.as_str(),
                Cand::Baseline => baselines.map_or("", |g| g[b].as_str()),
            }
        };
        let limit = judge_model.cfg.max_position_embeddings;
        let rng = |b: usize| {
            ChaCha8Rng::seed_from_u64(sample_seed(self.cfg.train.seed ^ 0x5eed, step, batch[b], 0))
        };
        let mut prompt_tokens = 0;
        let (done, _rounds) =
            lockstep_pairs(self.method.as_ref(), batch.len(), k, rng, |wanted| {
                let items: Vec<(&str, &str, &str)> = wanted
                    .iter()
                    .map(|&(b, x, y)| (self.prompts[batch[b]].0.as_str(), text(b, x), text(b, y)))
                    .collect();
                self.judge.judge_with(&items, &mut |all| {
                    let ids = all
                        .iter()
                        .map(|(x, a, b)| self.judge.encode(&self.tok, x, a, b, limit))
                        .collect::<Result<Vec<_>>>()?;
                    prompt_tokens += ids.iter().map(Vec::len).sum::<usize>();
                    self.judge.p_ab(judge_model, &ids)
                })
            })?;
        stats.prompt_tokens += prompt_tokens;
        Ok(done
            .into_iter()
            .map(|d| {
                stats.judgements += d.used.len();
                stats.position_biased += d.used.iter().filter(|j| j.position_biased()).count();
                stats.abs_margin_sum +=
                    d.used.iter().map(|j| (j.strength - 0.5).abs()).sum::<f64>();
                d.pairs
            })
            .collect())
    }

    /// πref's greedy response per prompt (the "given" baseline of ranked pairing).
    fn reference_greedy(&self, batch: &[usize]) -> Result<Vec<String>> {
        let params = SamplingParams {
            temperature: 0.0,
            ..self.cfg.sampling.clone()
        };
        let reqs: Vec<Request> = batch
            .iter()
            .map(|&p| Request {
                prompt: self.prompts[p].1.clone(),
                seed: 0,
            })
            .collect();
        Ok(generate(&self.reference, &self.tok, &reqs, &params)?
            .into_iter()
            .map(|g| g.text)
            .collect())
    }

    pub fn reference(&self) -> &Llama {
        &self.reference
    }

    /// Mean judged strength s(policy sample ≻ πref sample) on the held-out prompts (training
    /// prompts if there are none), with πref as a fixed judge: 0.5 before training, and above
    /// it when the policy has learnt what the judge prefers. `n` samples per prompt.
    pub fn judged_preference_over_reference(&self, n: usize, seed: u64) -> Result<f64> {
        let prompts = if self.eval_prompts.is_empty() {
            &self.prompts
        } else {
            &self.eval_prompts
        };
        let reqs: Vec<Request> = (0..prompts.len())
            .flat_map(|p| (0..n).map(move |j| (p, j)))
            .map(|(p, j)| Request {
                prompt: prompts[p].1.clone(),
                seed: sample_seed(seed, usize::MAX, p, j),
            })
            .collect();
        let ours = generate(&self.trainer.model, &self.tok, &reqs, &self.cfg.sampling)?;
        let theirs = generate(&self.reference, &self.tok, &reqs, &self.cfg.sampling)?;
        let judge_model = match &self.initial_judge {
            Some(j) => j.clone(),
            None => inference_model(&self.reference)?.into_owned(),
        };
        let items: Vec<(&str, &str, &str)> = reqs
            .iter()
            .enumerate()
            .map(|(i, _)| {
                (
                    prompts[i / n].0.as_str(),
                    ours[i].text.as_str(),
                    theirs[i].text.as_str(),
                )
            })
            .collect();
        let js = self.judge.judge(&judge_model, &self.tok, &items)?;
        Ok(mean(&js.iter().map(|j| j.strength).collect::<Vec<_>>()))
    }
}

/// The warning for a K that wastes a sample: with `baseline = "first"` sample 0 is the
/// baseline and the other K − 1 are paired two by two, so an even K leaves one sample unpaired
/// (sampled and judged for nothing). None when every sample is used.
pub fn pairing_warning(cfg: &TrainConfig) -> Option<String> {
    let k = cfg.pairing.k;
    let ranked = matches!(
        cfg.method,
        Method::Osp | Method::OspHard | Method::OspRandomPairs
    );
    let wasted = ranked && cfg.pairing.baseline == Baseline::First && k.is_multiple_of(2);
    wasted.then(|| {
        format!(
            "pairing.k = {k} with baseline = \"first\": sample 0 is the baseline and the other \
             {} are paired two by two, so one sample per prompt is wasted; use an odd k ({} or {})",
            k - 1,
            k - 1,
            k + 1
        )
    })
}

/// The run's prompts, tokenized: BOS when the tokenizer adds one, long prompts keeping their
/// end so that `sampling.max_new_tokens` fits in `train.max_len`.
pub(crate) fn encode_prompts(
    cfg: &TrainConfig,
    tok: &Tokenizer,
) -> Result<Vec<(String, Vec<u32>)>> {
    let limit = cfg
        .train
        .max_len
        .saturating_sub(cfg.sampling.max_new_tokens)
        .max(1);
    load_prompt_texts(cfg, tok)?
        .into_iter()
        .map(|t| {
            let ids = encode_prompt(tok, &t, limit)?;
            Ok((t, ids))
        })
        .collect()
}

/// One prompt's token ids, at most `limit` of them: a long prompt keeps its end, where the
/// request is, and its BOS (when the tokenizer uses one) stays first.
pub fn encode_prompt(tok: &Tokenizer, text: &str, limit: usize) -> Result<Vec<u32>> {
    let mut ids = tok.encode(text, tok.bos_id().is_some())?;
    if ids.len() > limit {
        ids.drain(..ids.len() - limit);
        if let (Some(bos), Some(first)) = (tok.sequence_bos(), ids.first_mut()) {
            *first = bos;
        }
    }
    Ok(ids)
}

/// A seed per (run seed, step, prompt, sample): resumable and independent of batch layout.
pub fn sample_seed(seed: u64, step: usize, prompt: usize, sample: usize) -> u64 {
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    for v in [step as u64, prompt as u64, sample as u64] {
        x = (x ^ v).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 31;
    }
    x
}

pub(crate) fn load_prompt_texts(cfg: &TrainConfig, tok: &Tokenizer) -> Result<Vec<String>> {
    let render = ChatRender::for_tokenizer(Some(tok));
    let (texts, warnings): (Vec<String>, Vec<String>) =
        match (&cfg.data.prompts, &cfg.data.preferences) {
            (Some(p), _) => {
                let (recs, w) = load_prompts(p, render, cfg.data.on_malformed)?;
                (recs.into_iter().map(|r| r.prompt).collect(), w)
            }
            (None, Some(p)) => {
                let (pairs, w) = load_pairs(p, cfg.data.format, Some(tok), cfg.data.on_malformed)?;
                (pairs.into_iter().map(|r| r.prompt).collect(), w)
            }
            (None, None) => anyhow::bail!("no prompts configured"),
        };
    for w in warnings.iter().take(5) {
        eprintln!("warning: {w}");
    }
    if texts.is_empty() {
        let first = warnings
            .first()
            .map(|w| format!(" (first problem: {w})"))
            .unwrap_or_default();
        anyhow::bail!("no usable prompts{first}");
    }
    Ok(texts)
}

/// Splits `order` (sorted by length, shortest first) into runs whose padded size — count ×
/// the run's longest length — stays within `BACKWARD_TOKENS`, each holding at least one.
fn token_buckets(order: &[usize], len: impl Fn(usize) -> usize) -> Vec<&[usize]> {
    let mut out = vec![];
    let mut start = 0;
    for end in 1..=order.len() {
        let over = |e: usize| (e - start) * len(order[e - 1]) > BACKWARD_TOKENS;
        if end - start > 1 && over(end) {
            out.push(&order[start..end - 1]);
            start = end - 1;
        }
    }
    if start < order.len() {
        out.push(&order[start..]);
    }
    out
}

fn mean(xs: &[f64]) -> f64 {
    crate::eval::mean_std(xs).0
}

fn histogram(xs: &[f64]) -> Vec<usize> {
    crate::eval::histogram01(xs, STRENGTH_BINS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_buckets_bound_the_padded_size_and_keep_every_sequence() {
        // Lengths by index; `order` is sorted by length, as by_length gives it.
        let lens = [100, 200, 300, 500, 600, 2000];
        let order = [0, 1, 2, 3, 4, 5];
        let buckets = token_buckets(&order, |i| lens[i]);
        assert_eq!(
            buckets,
            vec![&[0, 1, 2][..], &[3][..], &[4][..], &[5][..]],
            "3 × 300 fits in {BACKWARD_TOKENS}, 2 × 600 does not; a long sequence goes alone"
        );
        assert!(token_buckets(&[], |i| lens[i]).is_empty());
    }
}
