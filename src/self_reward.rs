//! Self-rewarding scoring (Yuan et al. 2024, "Self-Rewarding Language Models"): the model
//! scores one response at a time as an LLM-as-a-judge on the paper's additive 5-point scale,
//! the best and the worst of a prompt's samples become a DPO pair when their scores differ,
//! and the judge itself is taught from seed preferences turned into pointwise examples.
//!
//! Score. The template (the paper's Figure 2 prompt, [`DEFAULT_TEMPLATE`]) ends where the
//! verdict's number comes ("… Score:"). One prefill gives the next-token logits ℓ_k of the
//! answer tokens " 1" … " 5" (each must be one token; checked at start, as the OSP judge's
//! answers), and the score is their expected value under the softmax restricted to them:
//! E[s] = Σ_k k · e^{ℓ_k} / Σ_j e^{ℓ_j}. It is continuous, so ties are rare, and it needs no
//! generation. The paper instead samples the judge's justification and verdict three times
//! and averages the parsed "Score: N"; [`parse_verdict`] and [`mean_parsed_score`] implement
//! that parsing for a caller that generates verdicts.
//!
//! Pairs. Per prompt, the sample with the highest score is chosen and the one with the lowest
//! rejected, when the highest exceeds the lowest by more than `pair_min_gap` (0: when they
//! differ at all); otherwise the prompt gives no pair, as in the paper.
//!
//! Judge training from seed preferences (the paper's EFT data are human-ranked responses; the
//! seed here is pairs). A pair (x, y_w, y_l) with strength s (1 without one, or with
//! `soft_targets = false`) gives two pointwise examples, J(x, y_w) with target score
//! 3 + spread·(2s − 1) and J(x, y_l) with 3 − spread·(2s − 1) (clamped to [1, 5]; spread 2 puts
//! a certain preference at 5 and 1, a coin flip at 3 and 3). A target score t is taught as
//! the two-hot distribution over the answer tokens whose mean is t (mass 1 − frac(t) on ⌊t⌋
//! and frac(t) on ⌈t⌉), by cross-entropy at the verdict position.
use crate::data::PreferencePair;
use crate::model::{Llama, TokenBatch};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

/// Yuan et al. (2024), Figure 2, with `{prompt}` and `{response}` for the paper's
/// `<INSTRUCTION_HERE>` and `<RESPONSE_HERE>`, followed by "\n\nScore:" so that the verdict's
/// number is the next token.
pub const DEFAULT_TEMPLATE: &str = "Review the user's question and the corresponding response using the additive 5-point scoring system described below. Points are accumulated based on the satisfaction of each criterion:
- Add 1 point if the response is relevant and provides some information related to the user's inquiry, even if it is incomplete or contains some irrelevant content.
- Add another point if the response addresses a substantial portion of the user's question, but does not completely resolve the query or provide a direct answer.
- Award a third point if the response answers the basic elements of the user's question in a useful way, regardless of whether it seems to have been written by an AI Assistant or if it has elements typically found in blogs or search results.
- Grant a fourth point if the response is clearly written from an AI Assistant's perspective, addressing the user's question directly and comprehensively, and is well-organized and helpful, even if there is slight room for improvement in clarity, conciseness or focus.
- Bestow a fifth point for a response that is impeccably tailored to the user's question by an AI Assistant, without extraneous information, reflecting expert knowledge, and demonstrating a high-quality, engaging, and insightful answer.

User: {prompt}
<response>{response}</response>

After examining the user's instruction and the response:
- Briefly justify your total score, up to 100 words.
- Conclude with the score using the format: \"Score: <total points>\"

Remember to assess from the AI Assistant perspective, utilizing web search knowledge as necessary. To evaluate the response in alignment with this additive scoring model, we'll systematically attribute points based on the outlined criteria.

Score:";

/// `[self_reward]`: how the model scores its own responses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SelfRewardConfig {
    /// Judge prompt with `{prompt}` and `{response}`, ending where the score's number comes.
    /// Default: [`DEFAULT_TEMPLATE`].
    pub template: String,
    /// The answer tokens for scores 1, 2, …; each must be one token. Default: the digits
    /// " 1" … " 5".
    pub answers: Vec<String>,
    /// Judge prompts per forward pass. Default 16.
    pub batch_size: usize,
    /// Longest judge prompt in tokens (0: the model's limit); longer ones lose their start.
    /// Default 0.
    pub max_len: usize,
    /// A prompt gives a pair only when best − worst exceeds this. Default 0.
    pub pair_min_gap: f64,
    /// Pointwise targets 3 ± spread·(2s − 1). Default 2.
    pub target_spread: f64,
    /// Use the seed pairs' strengths in the targets (else s = 1). Default true.
    pub soft_targets: bool,
}

impl Default for SelfRewardConfig {
    fn default() -> Self {
        Self {
            template: DEFAULT_TEMPLATE.into(),
            answers: (1..=5).map(|k| format!(" {k}")).collect(),
            batch_size: 16,
            max_len: 0,
            pair_min_gap: 0.0,
            target_spread: 2.0,
            soft_targets: true,
        }
    }
}

/// A judge bound to a tokenizer: template and answer tokens checked once.
pub struct SelfJudge {
    pub cfg: SelfRewardConfig,
    answer_ids: Vec<u32>,
    bos: Option<u32>,
}

/// The judge prompt for (x, y), filling `{response}` outside the task prompt only.
pub fn render(template: &str, prompt: &str, response: &str) -> String {
    let (pre, post) = template.split_once("{prompt}").unwrap_or((template, ""));
    let fill = |s: &str| s.replace("{response}", response);
    format!("{}{prompt}{}", fill(pre), fill(post))
}

/// E[score] = Σ_k (k + 1)·softmax(ℓ)_k over the answer logits, and the probabilities.
pub fn expected_score(answer_logits: &[f64]) -> (f64, Vec<f64>) {
    let m = answer_logits
        .iter()
        .cloned()
        .fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = answer_logits.iter().map(|l| (l - m).exp()).collect();
    let z: f64 = e.iter().sum();
    let p: Vec<f64> = e.iter().map(|x| x / z).collect();
    let s = p.iter().enumerate().map(|(k, q)| (k + 1) as f64 * q).sum();
    (s, p)
}

/// One scored response.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    /// The expected score, in [1, n_answers].
    pub expected: f64,
    /// The distribution over the answers (scores 1 … n).
    pub probs: Vec<f64>,
}

/// A source of answer logits for (prompt, response) items: the model, or a scripted scorer.
pub type AnswerLogitsFn<'a> = dyn FnMut(&[(&str, &str)]) -> Result<Vec<Vec<f64>>> + 'a;

impl SelfJudge {
    pub fn new(cfg: SelfRewardConfig, tok: &Tokenizer) -> Result<Self> {
        for key in ["{prompt}", "{response}"] {
            ensure!(
                cfg.template.contains(key),
                "self_reward.template has no {key} placeholder"
            );
        }
        ensure!(
            cfg.answers.len() >= 2,
            "self_reward.answers needs at least 2 answers, got {}",
            cfg.answers.len()
        );
        ensure!(
            cfg.batch_size >= 1,
            "self_reward.batch_size must be at least 1"
        );
        ensure!(
            cfg.pair_min_gap.is_finite() && cfg.pair_min_gap >= 0.0,
            "self_reward.pair_min_gap must be ≥ 0, got {}",
            cfg.pair_min_gap
        );
        ensure!(
            cfg.target_spread.is_finite() && cfg.target_spread >= 0.0,
            "self_reward.target_spread must be ≥ 0, got {}",
            cfg.target_spread
        );
        let mut answer_ids = Vec::with_capacity(cfg.answers.len());
        for (k, a) in cfg.answers.iter().enumerate() {
            let id = tok.single_token_id(a).with_context(|| {
                format!(
                    "self_reward.answers[{k}] {a:?} (score {}) must be one token of this tokenizer",
                    k + 1
                )
            })?;
            if let Some(j) = answer_ids.iter().position(|&x| x == id) {
                bail!("self_reward.answers[{j}] and [{k}] are the same token ({id})");
            }
            answer_ids.push(id);
        }
        Ok(Self {
            cfg,
            answer_ids,
            bos: tok.sequence_bos(),
        })
    }

    pub fn answer_ids(&self) -> &[u32] {
        &self.answer_ids
    }

    /// Scores run from 1 to this.
    pub fn max_score(&self) -> usize {
        self.answer_ids.len()
    }

    /// Token ids of the judge prompt for (x, y), cut from the left to `limit` tokens.
    pub fn encode(
        &self,
        tok: &Tokenizer,
        prompt: &str,
        response: &str,
        limit: usize,
    ) -> Result<Vec<u32>> {
        let mut ids = tok.encode(
            &render(&self.cfg.template, prompt, response),
            self.bos.is_some(),
        )?;
        let limit = if self.cfg.max_len > 0 {
            self.cfg.max_len.min(limit)
        } else {
            limit
        };
        if ids.len() > limit {
            let cut = ids.len() - limit;
            ids.drain(..cut);
            if let (Some(bos), Some(first)) = (self.bos, ids.first_mut()) {
                *first = bos;
            }
        }
        Ok(ids)
    }

    /// Answer logits [n][answers] for tokenized judge prompts: one batched prefill per chunk,
    /// LM head at the last position only. `model` should be a snapshot (no graph).
    pub fn answer_logits(&self, model: &Llama, prompts: &[Vec<u32>]) -> Result<Vec<Vec<f64>>> {
        let mut out = Vec::with_capacity(prompts.len());
        let idx = Tensor::new(self.answer_ids.as_slice(), model.device())?;
        for chunk in prompts.chunks(self.cfg.batch_size) {
            let batch = TokenBatch::left_padded(chunk, model.device())?;
            let h = model.forward_hidden(&batch.ids, &batch.positions, &batch.bias, None)?;
            let logits = model.logits(&h.narrow(1, batch.len - 1, 1)?.squeeze(1)?)?;
            let rows: Vec<Vec<f32>> = logits.index_select(&idx, D::Minus1)?.to_vec2()?;
            out.extend(
                rows.into_iter()
                    .map(|r| r.into_iter().map(f64::from).collect()),
            );
        }
        Ok(out)
    }

    /// Scores (prompt, response) items with the model (a snapshot).
    pub fn score(
        &self,
        model: &Llama,
        tok: &Tokenizer,
        items: &[(&str, &str)],
    ) -> Result<Vec<Score>> {
        let limit = model.cfg.max_position_embeddings;
        self.score_with(items, &mut |chunk| {
            let prompts = chunk
                .iter()
                .map(|(x, y)| self.encode(tok, x, y, limit))
                .collect::<Result<Vec<_>>>()?;
            self.answer_logits(model, &prompts)
        })
    }

    /// Scores items with any source of answer logits (the model, or a scripted scorer).
    pub fn score_with(
        &self,
        items: &[(&str, &str)],
        logits: &mut AnswerLogitsFn<'_>,
    ) -> Result<Vec<Score>> {
        let l = logits(items)?;
        ensure!(
            l.len() == items.len(),
            "the scorer returned {} rows for {} items",
            l.len(),
            items.len()
        );
        l.iter()
            .enumerate()
            .map(|(i, row)| {
                ensure!(
                    row.len() == self.answer_ids.len(),
                    "item {i}: {} answer logits, expected {}",
                    row.len(),
                    self.answer_ids.len()
                );
                ensure!(
                    row.iter().all(|x| x.is_finite()),
                    "item {i}: non-finite answer logits {row:?}"
                );
                let (expected, probs) = expected_score(row);
                Ok(Score { expected, probs })
            })
            .collect()
    }

    /// The two pointwise judge examples of a seed pair (see the module docs).
    pub fn pointwise_examples(
        &self,
        tok: &Tokenizer,
        p: &PreferencePair,
        limit: usize,
    ) -> Result<[PointwiseExample; 2]> {
        let (hi, lo) = pointwise_targets(
            if self.cfg.soft_targets {
                p.strength
            } else {
                None
            },
            self.cfg.target_spread,
            self.max_score(),
        );
        let n = self.max_score();
        Ok([
            PointwiseExample {
                ids: self.encode(tok, &p.prompt, &p.chosen, limit)?,
                target: two_hot(hi, n),
            },
            PointwiseExample {
                ids: self.encode(tok, &p.prompt, &p.rejected, limit)?,
                target: two_hot(lo, n),
            },
        ])
    }
}

/// Target scores (chosen, rejected) for a pair of strength `s` (1 when None) on a 1…n scale:
/// mid ± spread·(2s − 1), mid = (n + 1)/2, clamped to [1, n].
pub fn pointwise_targets(strength: Option<f64>, spread: f64, n: usize) -> (f64, f64) {
    let s = strength.unwrap_or(1.0).clamp(0.0, 1.0);
    let mid = (n as f64 + 1.0) / 2.0;
    let d = spread * (2.0 * s - 1.0);
    let c = |x: f64| x.clamp(1.0, n as f64);
    (c(mid + d), c(mid - d))
}

/// The distribution over scores 1…n with mean `t` on the two nearest integers.
pub fn two_hot(t: f64, n: usize) -> Vec<f64> {
    let t = t.clamp(1.0, n as f64);
    let lo = t.floor();
    let frac = t - lo;
    let mut p = vec![0.0; n];
    let i = lo as usize - 1;
    p[i] = 1.0 - frac;
    if frac > 0.0 {
        p[i + 1] = frac;
    }
    p
}

/// A judge prompt and the target distribution over its answers.
#[derive(Debug, Clone, PartialEq)]
pub struct PointwiseExample {
    pub ids: Vec<u32>,
    pub target: Vec<f64>,
}

/// −Σ_k target_k · log π(answer_k | J), averaged over the batch (log-softmax over the whole
/// vocabulary, so mass moves onto the answer tokens).
pub fn pointwise_loss(
    model: &Llama,
    judge: &SelfJudge,
    batch: &[&PointwiseExample],
) -> Result<Tensor> {
    ensure!(!batch.is_empty(), "empty batch");
    let n = judge.max_score();
    let seqs: Vec<Vec<u32>> = batch.iter().map(|e| e.ids.clone()).collect();
    let tb = TokenBatch::left_padded(&seqs, model.device())?;
    let h = model.forward_hidden(&tb.ids, &tb.positions, &tb.bias, None)?;
    let logp = candle_nn::ops::log_softmax(
        &model.logits(&h.narrow(1, tb.len - 1, 1)?.squeeze(1)?)?,
        D::Minus1,
    )?;
    let picked = logp.index_select(&Tensor::new(judge.answer_ids(), model.device())?, D::Minus1)?;
    let mut t = Vec::with_capacity(batch.len() * n);
    for (i, e) in batch.iter().enumerate() {
        ensure!(
            e.target.len() == n,
            "example {i}: a target over {} answers, the judge has {n}",
            e.target.len()
        );
        t.extend(e.target.iter().map(|&x| x as f32));
    }
    let t = Tensor::from_vec(t, (batch.len(), n), model.device())?;
    Ok(((picked * t)?.sum_all()? * (-1.0 / batch.len() as f64))?)
}

/// The (best, worst) sample of one prompt by score: the first of the highest and the first of
/// the lowest, when best − worst > `min_gap`; None otherwise (no pair, as in the paper).
pub fn select_pair(scores: &[f64], min_gap: f64) -> Result<Option<(usize, usize)>> {
    ensure!(
        scores.iter().all(|s| s.is_finite()),
        "non-finite score among {scores:?}"
    );
    if scores.len() < 2 {
        return Ok(None);
    }
    let (mut best, mut worst) = (0, 0);
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
        if s < scores[worst] {
            worst = i;
        }
    }
    Ok((scores[best] - scores[worst] > min_gap).then_some((best, worst)))
}

/// The paper's parsing of a generated verdict: the integer after the last "Score:" that is
/// followed by one, when it is in 0…`max` (the additive scale can give 0 points). A decimal
/// ("Score: 4.5") does not parse; "Score: 4/5" and "Score: 4." read as 4.
pub fn parse_verdict(text: &str, max: u32) -> Option<u32> {
    text.rmatch_indices("Score:").find_map(|(i, m)| {
        let rest = text[i + m.len()..].trim_start();
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        let mut after = rest[digits.len()..].chars();
        if after.next() == Some('.') && after.next().is_some_and(|c| c.is_ascii_digit()) {
            return None;
        }
        digits.parse::<u32>().ok().filter(|&v| v <= max)
    })
}

/// The mean of the verdicts that parse, as the paper averages three sampled judgements; None
/// when none parses.
pub fn mean_parsed_score(texts: &[String], max: u32) -> Option<f64> {
    let v: Vec<u32> = texts.iter().filter_map(|t| parse_verdict(t, max)).collect();
    (!v.is_empty()).then(|| v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64)
}
