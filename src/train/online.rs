//! The online loop (OSP.md §5) and its online baselines: sample K responses per prompt with
//! the current policy, judge them with the model itself, pair them, and take one optimiser
//! step on the preference loss against πref.
use super::method::{Method, TrainConfig};
use super::pairs::{load_pairs, pair_logps, pair_logps_detached, reference_for, tokens_of};
use super::policy::{load_policy, save_trained};
use super::trainer::{DataCursor, Trainer};
use crate::data::{load_prompts, split_eval, ChatRender};
use crate::judge::{Judge, JudgeModel};
use crate::loss::{preference_loss, PairLogps};
use crate::model::Llama;
use crate::pairing::{pair_candidates, Baseline, Cand};
use crate::sample::{generate, Generation, Request, SamplingParams};
use crate::tokenizer::Tokenizer;
use anyhow::Result;
use candle_core::Tensor;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};
use std::path::PathBuf;
use std::time::Instant;

/// Bins of the judged-strength histogram logged per iteration and per pair rank.
pub const STRENGTH_BINS: usize = 10;

/// A pair produced online, as tokens, with its judged strength and rank.
struct OnlinePair {
    prompt: usize,
    chosen: Vec<u32>,
    rejected: Vec<u32>,
    strength: f64,
    rank: usize,
}

/// What the judging stage measured.
#[derive(Default)]
struct JudgeStats {
    judgements: usize,
    position_biased: usize,
    prompt_tokens: usize,
    abs_margin_sum: f64,
}

/// An online run in progress.
pub struct OnlineRun {
    pub cfg: TrainConfig,
    pub tok: Tokenizer,
    pub trainer: Trainer,
    judge: Judge,
    /// πref: adapters off (LoRA) or a frozen copy of the starting weights (full).
    reference: Llama,
    /// The starting model as a snapshot, when it judges (judge.model = "initial").
    initial_judge: Option<Llama>,
    prompts: Vec<(String, Vec<u32>)>,
    pub eval_prompts: Vec<(String, Vec<u32>)>,
    cursor: DataCursor,
}

impl OnlineRun {
    pub fn new(cfg: &TrainConfig, resume: bool) -> Result<Self> {
        let lm = load_policy(&cfg.model, &cfg.lora, cfg.train.seed, true)?;
        let tok = lm.tokenizer;
        let judge = Judge::new(cfg.judge.clone(), &tok)?;
        let reference = reference_for(&lm.model)?;
        let initial_judge = match cfg.judge.model {
            JudgeModel::Initial => Some(reference.snapshot()?),
            JudgeModel::Current => None,
        };
        let texts = load_prompt_texts(cfg, &tok)?;
        let limit = cfg
            .train
            .max_len
            .saturating_sub(cfg.sampling.max_new_tokens)
            .max(1);
        let mut encoded = Vec::with_capacity(texts.len());
        for t in texts {
            let mut ids = tok.encode(&t, tok.bos_id().is_some())?;
            if ids.len() > limit {
                // Keep the end of a long prompt, where the request is.
                let cut = ids.len() - limit;
                ids.drain(..cut);
                if let (Some(bos), Some(first)) = (tok.sequence_bos(), ids.first_mut()) {
                    *first = bos;
                }
            }
            encoded.push((t, ids));
        }
        let (prompts, eval_prompts) = split_eval(encoded, cfg.data.eval_fraction, cfg.train.seed);
        anyhow::ensure!(!prompts.is_empty(), "no training prompts");
        let what = format!("{:?}", cfg.method);
        let (trainer, data) = Trainer::start(lm.model, &cfg.optim, &cfg.train, resume, &what, cfg)?;
        let cursor = data.unwrap_or_else(|| DataCursor::new(cfg.train.seed));
        Ok(Self {
            cfg: cfg.clone(),
            tok,
            trainer,
            judge,
            reference,
            initial_judge,
            prompts,
            eval_prompts,
            cursor,
        })
    }

    /// Runs iterations until `train.steps` (or `stop_after` more), checkpointing as
    /// configured; saves the adapter (or model) at the end. Returns the output folder, or None
    /// when stopped early.
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
            let batch = self
                .cursor
                .next_batch(self.prompts.len(), self.cfg.train.batch_size);
            if self.iteration(&batch)?.is_some() {
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

    /// One online iteration, top to bottom: sample → judge → pair → log-probs → loss → step.
    /// Returns None when the step was skipped (non-finite values under on_nonfinite = "skip").
    pub fn iteration(&mut self, batch: &[usize]) -> Result<Option<Map<String, Value>>> {
        let step = self.trainer.step();
        let k = self.cfg.pairing.k;

        // 1. Sample K responses per prompt from the current policy.
        let t = Instant::now();
        let policy = self.trainer.model.snapshot()?;
        let requests: Vec<Request> = batch
            .iter()
            .flat_map(|&p| (0..k).map(move |j| (p, j)))
            .map(|(p, j)| Request {
                prompt: self.prompts[p].1.clone(),
                seed: sample_seed(self.cfg.train.seed, step, p, j),
            })
            .collect();
        let samples = generate(&policy, &self.tok, &requests, &self.cfg.sampling)?;
        let sampled_tokens: usize = samples.iter().map(|g| g.tokens.len()).sum();
        let sample_secs = t.elapsed().as_secs_f64();

        // 2–3. Judge the samples with the model itself and pair them.
        let t = Instant::now();
        let judge_model = self.initial_judge.as_ref().unwrap_or(&policy);
        let baselines = match self.cfg.pairing.baseline {
            Baseline::Given => Some(self.reference_greedy(batch)?),
            Baseline::First => None,
        };
        let mut stats = JudgeStats::default();
        let mut pairs = Vec::new();
        for (b, &p) in batch.iter().enumerate() {
            let cands = &samples[b * k..(b + 1) * k];
            let baseline = baselines.as_ref().map(|g| g[b].as_str());
            pairs.extend(self.pair_prompt(judge_model, p, cands, baseline, step, &mut stats)?);
        }
        let judge_secs = t.elapsed().as_secs_f64();
        if !pairs.is_empty() && pairs.iter().all(|q| (q.strength - 0.5).abs() < 1e-9) {
            let msg = format!(
                "warning: step {}: every judged strength is 0.5 (identical or empty samples?); \
                 the step has no preference to learn from",
                step + 1
            );
            self.trainer.progress.suspend(|| eprintln!("{msg}"));
        }
        if self.cfg.method == Method::OspHard {
            pairs
                .iter_mut()
                .for_each(|p| p.strength = if p.strength >= 0.5 { 1.0 } else { 0.0 });
        }

        // 4–5. Log-probabilities under πθ and πref, the loss, one optimiser step.
        let t = Instant::now();
        let refs: Vec<(&[u32], &[u32], &[u32])> = pairs
            .iter()
            .map(|q| {
                (
                    self.prompts[q.prompt].1.as_slice(),
                    q.chosen.as_slice(),
                    q.rejected.as_slice(),
                )
            })
            .collect();
        let (ref_c, ref_r) = pair_logps_detached(&self.reference, &refs)?;
        self.trainer.model.set_training(true);
        let (pol_c, pol_r) = pair_logps(&self.trainer.model, &refs)?;
        self.trainer.model.set_training(false);
        let strengths: Vec<f32> = pairs.iter().map(|q| q.strength as f32).collect();
        let strength = Tensor::from_vec(strengths, pairs.len(), self.trainer.model.device())?;
        let lp = PairLogps {
            policy_chosen: &pol_c,
            policy_rejected: &pol_r,
            ref_chosen: &ref_c,
            ref_rejected: &ref_r,
        };
        let out = preference_loss(&self.cfg.loss, &lp, Some(&strength))?;
        self.trainer.accumulate(&out.loss, tokens_of(&refs))?;
        let train_secs = t.elapsed().as_secs_f64();

        // Metrics (TRL's names where TRL has one).
        let mut m = out.metrics.to_json();
        m.insert("loss".into(), json!(out.loss.to_scalar::<f32>()? as f64));
        let kl = {
            let d = ((&pol_c - &ref_c)? + (&pol_r - &ref_r)?)?;
            d.sum_all()?.to_scalar::<f32>()? as f64 / (2 * pairs.len()) as f64
        };
        m.insert("objective/kl".into(), json!(kl));
        let s: Vec<f64> = pairs.iter().map(|q| q.strength).collect();
        m.insert("judge/strength_mean".into(), json!(mean(&s)));
        m.insert("judge/strength_hist".into(), json!(histogram(&s)));
        let by_rank: Vec<Vec<f64>> = (0..k / 2)
            .map(|r| {
                pairs
                    .iter()
                    .filter(|q| q.rank == r)
                    .map(|q| q.strength)
                    .collect()
            })
            .collect();
        m.insert(
            "judge/strength_by_rank".into(),
            json!(by_rank.iter().map(|v| histogram(v)).collect::<Vec<_>>()),
        );
        m.insert(
            "judge/abs_margin_mean".into(),
            json!(stats.abs_margin_sum / stats.judgements.max(1) as f64),
        );
        m.insert(
            "judge/position_bias_rate".into(),
            json!(stats.position_biased as f64 / stats.judgements.max(1) as f64),
        );
        let lens: Vec<f64> = samples.iter().map(|g| g.tokens.len() as f64).collect();
        m.insert("completions/mean_length".into(), json!(mean(&lens)));
        m.insert("pairs".into(), json!(pairs.len()));
        m.insert(
            "speed/sampling_tokens_per_s".into(),
            json!(sampled_tokens as f64 / sample_secs.max(1e-9)),
        );
        m.insert(
            "speed/judging_tokens_per_s".into(),
            json!(stats.prompt_tokens as f64 / judge_secs.max(1e-9)),
        );
        m.insert(
            "speed/training_tokens_per_s".into(),
            json!(tokens_of(&refs) as f64 / train_secs.max(1e-9)),
        );
        Ok(self.trainer.finish_step(m.clone())?.map(|_| m))
    }

    /// Judges one prompt's samples and pairs them (ranked or random; K = 2 for online DPO).
    fn pair_prompt(
        &self,
        judge_model: &Llama,
        p: usize,
        cands: &[Generation],
        baseline: Option<&str>,
        step: usize,
        stats: &mut JudgeStats,
    ) -> Result<Vec<OnlinePair>> {
        let prompt = self.prompts[p].0.as_str();
        let text = |c: Cand| -> &str {
            match c {
                Cand::Sample(i) => cands[i].text.as_str(),
                Cand::Baseline => baseline.unwrap_or(""),
            }
        };
        let limit = judge_model.cfg.max_position_embeddings;
        let mut judge = |cmp: &[(Cand, Cand)]| -> Result<Vec<f64>> {
            let items: Vec<(&str, &str, &str)> = cmp
                .iter()
                .map(|&(a, b)| (prompt, text(a), text(b)))
                .collect();
            let js = self.judge.judge_with(&items, &mut |batch| {
                let ids = batch
                    .iter()
                    .map(|(x, a, b)| self.judge.encode(&self.tok, x, a, b, limit))
                    .collect::<Result<Vec<_>>>()?;
                stats.prompt_tokens += ids.iter().map(Vec::len).sum::<usize>();
                self.judge.p_ab(judge_model, &ids)
            })?;
            stats.judgements += js.len();
            stats.position_biased += js.iter().filter(|j| j.position_biased()).count();
            stats.abs_margin_sum += js.iter().map(|j| (j.strength - 0.5).abs()).sum::<f64>();
            Ok(js.iter().map(|j| j.strength).collect())
        };
        let pair = |chosen: usize, rejected: usize, strength: f64, rank: usize| OnlinePair {
            prompt: p,
            chosen: cands[chosen].tokens.clone(),
            rejected: cands[rejected].tokens.clone(),
            strength,
            rank,
        };
        if self.cfg.method == Method::OnlineDpo {
            // OAIF-style: two samples, one binary self-judgement, the winner is chosen.
            let s = judge(&[(Cand::Sample(0), Cand::Sample(1))])?[0];
            return Ok(vec![if s >= 0.5 {
                pair(0, 1, 1.0, 0)
            } else {
                pair(1, 0, 1.0, 0)
            }]);
        }
        let mut rng =
            ChaCha8Rng::seed_from_u64(sample_seed(self.cfg.train.seed ^ 0x5eed, step, p, 0));
        let pairing = pair_candidates(cands.len(), &self.cfg.pairing, &mut rng, &mut judge)?;
        Ok(pairing
            .pairs
            .iter()
            .map(|q| pair(q.chosen, q.rejected, q.strength, q.rank))
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
            None => self.reference.snapshot()?,
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

/// A seed per (run seed, step, prompt, sample): resumable and independent of batch layout.
pub fn sample_seed(seed: u64, step: usize, prompt: usize, sample: usize) -> u64 {
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    for v in [step as u64, prompt as u64, sample as u64] {
        x = (x ^ v).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 31;
    }
    x
}

fn load_prompt_texts(cfg: &TrainConfig, tok: &Tokenizer) -> Result<Vec<String>> {
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

fn mean(xs: &[f64]) -> f64 {
    crate::eval::mean_std(xs).0
}

fn histogram(xs: &[f64]) -> Vec<usize> {
    crate::eval::histogram01(xs, STRENGTH_BINS)
}
