//! Batched generation with a KV cache: temperature, top-k, top-p, stop at EOS or stop strings.
//! On the CPU it runs on the inference engine (`engine::decode`); `Decoder` is the reference
//! path on the autograd model (other devices, and the tests that hold the two equal).
//!
//! Each request carries its own seed and random stream, and prompts are left-padded with
//! per-sequence positions and masks, so a request's output does not depend on the rest of its
//! batch.
use crate::engine::Engine;
use crate::model::llama::{attention_bias, positions_from_mask};
use crate::model::{KvCache, Llama, TokenBatch};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};
use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// The smallest temperature above 0 that sampling accepts. Below it, logits divided by the
/// temperature can overflow f32 (at 1e-40 the least likely token was picked); such
/// temperatures are refused, and 0 asks for greedy decoding explicitly.
pub const MIN_TEMPERATURE: f64 = 1e-3;

/// How to pick tokens. Defaults follow transformers' `generate` with sampling on.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy decoding, and values in (0, `MIN_TEMPERATURE`)
    /// are refused. Default 1.0.
    pub temperature: f64,
    /// Keep only the k most likely tokens (0 = off). Default 0.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1 = off). Default 1.0.
    pub top_p: f64,
    /// Upper bound on generated tokens per request. Default 64.
    pub max_new_tokens: usize,
    /// Stop when one of these strings appears in the generated text (it is cut off); an
    /// empty string is refused. Default: none.
    pub stop_strings: Vec<String>,
    /// Stop at the tokenizer's end-of-sequence token(s). Default true.
    pub stop_at_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 64,
            stop_strings: vec![],
            stop_at_eos: true,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!(
                "temperature must be a finite number ≥ 0, got {}",
                self.temperature
            );
        }
        if self.temperature > 0.0 && self.temperature < MIN_TEMPERATURE {
            bail!(
                "temperature {} is below {MIN_TEMPERATURE}, the smallest supported (smaller ones \
                 overflow the logits); use 0 for greedy decoding",
                self.temperature
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("top_p must be in (0, 1], got {}", self.top_p);
        }
        if self.stop_strings.iter().any(String::is_empty) {
            bail!("an empty stop string would stop at once; remove it");
        }
        Ok(())
    }
}

/// One prompt to continue, with the seed of its own random stream.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Eos,
    StopString,
    Length,
}

/// A generated continuation (prompt not included).
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated token ids; an EOS that ended generation is included.
    pub tokens: Vec<u32>,
    /// Decoded text, cut before a stop string.
    pub text: String,
    pub finish: FinishReason,
    /// Σ log π(token) over `tokens` under the sampling model's own distribution (its logits
    /// before temperature, top-k and top-p), recorded while sampling where the sampler reads
    /// the logits on the host (the CPU engine); None elsewhere. Online training takes πθ's
    /// log-probabilities of its samples from here instead of scoring them again.
    pub logprob: Option<f32>,
}

/// Incremental decoding state for a batch: the cache plus which cached keys are real tokens.
pub struct Decoder {
    model: Llama,
    cache: KvCache,
    key_mask: Vec<Vec<bool>>,
}

impl Decoder {
    /// Runs the prompts (left-padded) through the model; returns the decoder and the logits
    /// [b, vocab] of each prompt's last token.
    pub fn prefill(model: &Llama, prompts: &[Vec<u32>]) -> Result<(Self, Tensor)> {
        if let Some(i) = prompts.iter().position(Vec::is_empty) {
            bail!("prompt {i} is empty: start it with a BOS token");
        }
        let model = model.snapshot()?;
        let batch = TokenBatch::left_padded(prompts, model.device())?;
        let mut cache = KvCache::default();
        let h =
            model.forward_hidden(&batch.ids, &batch.positions, &batch.bias, Some(&mut cache))?;
        let last = h.narrow(1, batch.len - 1, 1)?;
        let logits = model.logits(&last)?.squeeze(1)?;
        Ok((
            Self {
                model,
                cache,
                key_mask: batch.key_mask,
            },
            logits,
        ))
    }

    /// Appends one token per sequence; returns the next logits [b, vocab].
    pub fn step(&mut self, tokens: &[u32]) -> Result<Tensor> {
        let b = self.key_mask.len();
        if tokens.len() != b {
            bail!("step: {} tokens for a batch of {b}", tokens.len());
        }
        for m in &mut self.key_mask {
            m.push(true);
        }
        let dev = self.model.device().clone();
        let start = self.key_mask[0].len() - 1;
        let ids = Tensor::from_vec(tokens.to_vec(), (b, 1), &dev)?;
        let positions = positions_from_mask(&self.key_mask, start, &dev)?;
        let bias = attention_bias(&self.key_mask, start, 1, &dev)?;
        let h = self
            .model
            .forward_hidden(&ids, &positions, &bias, Some(&mut self.cache))?;
        Ok(self.model.logits(&h)?.squeeze(1)?)
    }

    /// Cached positions, padding included.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }
}

/// Picks the next token from one row of logits. Top-k keeps the k best by partial selection
/// (no full sort); top-p sorts only a growing head of the candidates until it holds p of the
/// mass; without top-p the draw walks the kept tokens in a fixed order (index order, or
/// top-k's selection order), so a seed always gives the same token.
pub fn sample_token(logits: &[f32], p: &SamplingParams, rng: &mut ChaCha8Rng) -> u32 {
    let argmax = || {
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        best as u32
    };
    if p.temperature == 0.0 {
        return argmax();
    }
    let t = p.temperature as f32;
    let mut cand: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, v)| v.is_finite())
        .map(|(i, &v)| (i as u32, v / t))
        .collect();
    if cand.is_empty() {
        return argmax();
    }
    // Descending by logit, ties by index: a total order, so selections are reproducible.
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if p.top_k > 0 && p.top_k < cand.len() {
        cand.select_nth_unstable_by(p.top_k - 1, order);
        cand.truncate(p.top_k);
    }
    let max = cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<f32> = cand.iter().map(|(_, v)| (v - max).exp()).collect();
    let sum: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|x| *x /= sum);
    if p.top_p < 1.0 {
        // Sort a head of m candidates; grow it until it holds top_p of the mass.
        let mut m = cand.len().min(64);
        let keep = loop {
            if m < cand.len() {
                cand.select_nth_unstable_by(m - 1, order);
            }
            cand[..m].sort_by(order);
            let mut cum = 0f32;
            let mut keep = 0;
            for &(_, v) in &cand[..m] {
                if cum >= p.top_p as f32 {
                    break;
                }
                cum += (v - max).exp() / sum;
                keep += 1;
            }
            if cum >= p.top_p as f32 || m == cand.len() {
                break keep.max(1);
            }
            m = (m * 4).min(cand.len());
        };
        cand.truncate(keep);
        probs = cand.iter().map(|(_, v)| (v - max).exp() / sum).collect();
        let s: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= s);
    }
    let u: f32 = rng.random();
    let mut acc = 0f32;
    for (i, q) in probs.iter().enumerate() {
        acc += q;
        if u < acc {
            return cand[i].0;
        }
    }
    cand[probs.len() - 1].0
}

/// The next token of every unfinished row of `logits` [b, vocab] (finished rows get 0, and
/// their random streams do not advance). Greedy decoding off the CPU takes the argmax on the
/// device and copies b token ids to the host instead of b × vocab logits. Sampling copies the
/// logits: top-k, top-p and each request's own random stream run on the host.
fn pick_tokens(
    logits: &Tensor,
    params: &SamplingParams,
    rngs: &mut [ChaCha8Rng],
    finished: &[Option<FinishReason>],
) -> Result<Vec<u32>> {
    if params.temperature == 0.0 && !logits.device().is_cpu() {
        return Ok(logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?);
    }
    let rows = logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
    Ok(rows
        .iter()
        .zip(rngs.iter_mut())
        .zip(finished)
        .map(|((row, rng), done)| match done {
            Some(_) => 0,
            None => sample_token(row, params, rng),
        })
        .collect())
}

/// The text that `generated` adds after `prompt`. Decoding the continuation alone can differ
/// at the seam (SentencePiece-style tokenizers drop a leading space after BOS, byte-level
/// BPE may split a character), so decode a little prompt context with it and cut that off.
pub fn continuation_text(tok: &Tokenizer, prompt: &[u32], generated: &[u32]) -> Result<String> {
    let ctx = &prompt[prompt.len().saturating_sub(8)..];
    let before = tok.decode(ctx)?;
    let mut ids = ctx.to_vec();
    ids.extend_from_slice(generated);
    let full = tok.decode(&ids)?;
    match full.strip_prefix(before.as_str()) {
        Some(rest) => Ok(rest.to_string()),
        None => tok.decode(generated),
    }
}

/// Generates a continuation for every request, in one batch.
pub fn generate(
    model: &Llama,
    tok: &Tokenizer,
    requests: &[Request],
    params: &SamplingParams,
) -> Result<Vec<Generation>> {
    params.validate()?;
    if requests.is_empty() {
        return Ok(vec![]);
    }
    let longest = requests.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
    let limit = model.cfg.max_position_embeddings;
    if longest.saturating_add(params.max_new_tokens) > limit {
        bail!(
            "a prompt of {longest} tokens plus {} new tokens exceeds the model's {limit} positions",
            params.max_new_tokens
        );
    }
    let prompts: Vec<Vec<u32>> = requests.iter().map(|r| r.prompt.clone()).collect();
    let mut rngs: Vec<ChaCha8Rng> = requests
        .iter()
        .map(|r| ChaCha8Rng::seed_from_u64(r.seed))
        .collect();
    let eos: &[u32] = if params.stop_at_eos {
        tok.eos_ids()
    } else {
        &[]
    };
    let n = requests.len();
    let mut out: Vec<Vec<u32>> = vec![vec![]; n];
    let mut finish: Vec<Option<FinishReason>> = vec![None; n];
    let mut texts: Vec<Option<String>> = vec![None; n];
    if params.max_new_tokens == 0 {
        return Ok((0..n)
            .map(|_| Generation {
                tokens: vec![],
                text: String::new(),
                finish: FinishReason::Length,
                logprob: Some(0.0),
            })
            .collect());
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        bail!("prompt {i} is empty: start it with a BOS token");
    }
    if Engine::supports(model) {
        return crate::engine::decode::generate(&Engine::new(model)?, tok, requests, params);
    }
    let (mut dec, mut logits) = Decoder::prefill(model, &prompts)?;
    for step in 0..params.max_new_tokens {
        let picks = pick_tokens(&logits, params, &mut rngs, &finish)?;
        let mut next = vec![0u32; n];
        for i in 0..n {
            if finish[i].is_some() {
                // Finished rows keep decoding a harmless token; their output is frozen.
                next[i] = *out[i].last().unwrap_or(&0);
                continue;
            }
            let t = picks[i];
            next[i] = t;
            out[i].push(t);
            if eos.contains(&t) {
                finish[i] = Some(FinishReason::Eos);
            } else if !params.stop_strings.is_empty() {
                let text = continuation_text(tok, &prompts[i], &out[i])?;
                if let Some(cut) = params
                    .stop_strings
                    .iter()
                    .filter_map(|s| text.find(s.as_str()))
                    .min()
                {
                    texts[i] = Some(text[..cut].to_string());
                    finish[i] = Some(FinishReason::StopString);
                }
            }
        }
        if finish.iter().all(Option::is_some) || step + 1 == params.max_new_tokens {
            break;
        }
        logits = dec.step(&next)?;
    }
    (0..n)
        .map(|i| {
            let text = match texts[i].take() {
                Some(t) => t,
                None => continuation_text(tok, &prompts[i], &out[i])?,
            };
            Ok(Generation {
                tokens: std::mem::take(&mut out[i]),
                text,
                finish: finish[i].unwrap_or(FinishReason::Length),
                logprob: None,
            })
        })
        .collect()
}
