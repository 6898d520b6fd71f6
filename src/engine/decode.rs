//! Batched generation on the engine, with `sample::generate`'s semantics (per-request random
//! streams, EOS and stop strings): one prefill per distinct prompt whose cache every request
//! with that prompt attends to, finished rows leave the batch, stop strings are checked on a
//! tail window of the continuation.
use super::forward::{Engine, Segment};
use super::score::token_logprob;
use crate::sample::SamplingParams;
use crate::sample::{continuation_text, sample_token, FinishReason, Generation, Request};
use crate::tokenizer::Tokenizer;
use anyhow::Result;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::collections::HashMap;

/// Prompt tokens per prefill forward: bounds the activations (rows × FFN width) however many
/// distinct prompts there are.
const PREFILL_TOKENS: usize = 4096;

/// Logits (rows × vocabulary) worth sampling on more than one thread.
const SAMPLE_WORK_PER_THREAD: usize = 1 << 16;

/// A token drawn from one row of logits, and its log-probability under them.
fn draw(row: &[f32], params: &SamplingParams, rng: &mut ChaCha8Rng) -> (u32, f32) {
    let t = sample_token(row, params, rng);
    (t, token_logprob(row, t))
}

/// Generates a continuation for every request (validated by the caller).
pub fn generate(
    engine: &Engine,
    tok: &Tokenizer,
    requests: &[Request],
    params: &SamplingParams,
) -> Result<Vec<Generation>> {
    let n = requests.len();
    // Distinct prompts, in order of first appearance.
    let mut group_of = Vec::with_capacity(n);
    let mut prompts: Vec<&[u32]> = vec![];
    let mut index: HashMap<&[u32], usize> = HashMap::new();
    for r in requests {
        let g = *index.entry(r.prompt.as_slice()).or_insert_with(|| {
            prompts.push(r.prompt.as_slice());
            prompts.len() - 1
        });
        group_of.push(g);
    }
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let mut prefix = engine.cache(prompts.len(), longest);
    let vocab = engine.cfg.vocab_size;
    let mut first_logits: Vec<Vec<f32>> = vec![vec![]; prompts.len()];
    let mut g0 = 0;
    while g0 < prompts.len() {
        // As many whole prompts as fit the token budget (at least one).
        let mut g1 = g0 + 1;
        let mut total = prompts[g0].len();
        while g1 < prompts.len() && total + prompts[g1].len() <= PREFILL_TOKENS {
            total += prompts[g1].len();
            g1 += 1;
        }
        let segs: Vec<Segment> = (g0..g1)
            .map(|g| Segment {
                tokens: prompts[g],
                slot: g,
                start: 0,
                pos0: 0,
                prefix: None,
            })
            .collect();
        let h = engine.hidden(&segs, &mut prefix, None)?;
        let d = engine.cfg.hidden_size;
        let mut end = 0;
        for (g, s) in (g0..g1).zip(&segs) {
            end += s.tokens.len();
            first_logits[g] = engine.logits(&h[(end - 1) * d..end * d], 1)?;
        }
        g0 = g1;
    }

    let mut rngs: Vec<ChaCha8Rng> = requests
        .iter()
        .map(|r| ChaCha8Rng::seed_from_u64(r.seed))
        .collect();
    let eos: &[u32] = if params.stop_at_eos {
        tok.eos_ids()
    } else {
        &[]
    };
    let window = params
        .stop_strings
        .iter()
        .map(String::len)
        .max()
        .unwrap_or(0)
        + 8;
    let mut own = engine.cache(n, params.max_new_tokens);
    let mut out: Vec<Vec<u32>> = vec![vec![]; n];
    let mut finish: Vec<Option<FinishReason>> = vec![None; n];
    let mut texts: Vec<Option<String>> = vec![None; n];
    let mut logprob = vec![0f32; n];
    // Logits of each active row, [active, vocab], in `active` order.
    let mut active: Vec<usize> = (0..n).collect();
    let mut logits: Vec<f32> = Vec::with_capacity(n * vocab);
    for &i in &active {
        logits.extend_from_slice(&first_logits[group_of[i]]);
    }
    drop(first_logits);
    for step in 0..params.max_new_tokens {
        // Each row draws from its own stream, so rows sample in parallel (the softmax over a
        // 50k vocabulary for 56 rows is milliseconds that would leave the other cores idle).
        let mut streams: Vec<&mut ChaCha8Rng> = rngs
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| active.binary_search(i).is_ok())
            .map(|(_, rng)| rng)
            .collect();
        let one = |(a, rng): (usize, &mut &mut ChaCha8Rng)| {
            draw(&logits[a * vocab..(a + 1) * vocab], params, rng)
        };
        let drawn: Vec<(u32, f32)> = if active.len() * vocab >= SAMPLE_WORK_PER_THREAD {
            streams.par_iter_mut().enumerate().map(one).collect()
        } else {
            streams.iter_mut().enumerate().map(one).collect()
        };
        let mut next = Vec::with_capacity(active.len());
        for (&i, &(t, lp)) in active.iter().zip(&drawn) {
            logprob[i] += lp;
            out[i].push(t);
            if eos.contains(&t) {
                finish[i] = Some(FinishReason::Eos);
            } else if !params.stop_strings.is_empty() {
                if let Some(text) = stop_hit(tok, &requests[i].prompt, &out[i], params, window)? {
                    texts[i] = Some(text);
                    finish[i] = Some(FinishReason::StopString);
                }
            }
            if finish[i].is_none() {
                next.push((i, t));
            }
        }
        if next.is_empty() || step + 1 == params.max_new_tokens {
            break;
        }
        // Finished rows leave the batch.
        active = next.iter().map(|&(i, _)| i).collect();
        let toks: Vec<[u32; 1]> = next.iter().map(|&(_, t)| [t]).collect();
        let segs: Vec<Segment> = next
            .iter()
            .zip(&toks)
            .map(|(&(i, _), t)| {
                let p = prompts[group_of[i]].len();
                Segment {
                    tokens: t,
                    slot: i,
                    start: step,
                    pos0: p + step,
                    prefix: Some((group_of[i], p)),
                }
            })
            .collect();
        let h = engine.hidden(&segs, &mut own, Some(&prefix))?;
        engine.logits_into(&h, segs.len(), &mut logits)?;
    }
    (0..n)
        .map(|i| {
            let text = match texts[i].take() {
                Some(t) => t,
                None => continuation_text(tok, &requests[i].prompt, &out[i])?,
            };
            Ok(Generation {
                tokens: std::mem::take(&mut out[i]),
                text,
                finish: finish[i].unwrap_or(FinishReason::Length),
                logprob: Some(logprob[i]),
            })
        })
        .collect()
}

/// The continuation's text cut before the earliest stop string, when one has appeared. Only a
/// tail of `window` tokens is decoded per step (a stop string that just completed lies within
/// its last bytes, and every token adds at least one byte); the full text is decoded only on a
/// hit, to cut it exactly as the reference path does.
fn stop_hit(
    tok: &Tokenizer,
    prompt: &[u32],
    out: &[u32],
    params: &SamplingParams,
    window: usize,
) -> Result<Option<String>> {
    if out.len() > window {
        let (before, tail) = out.split_at(out.len() - window);
        let text = continuation_text(tok, before, tail)?;
        if !params
            .stop_strings
            .iter()
            .any(|s| text.contains(s.as_str()))
        {
            return Ok(None);
        }
    }
    let text = continuation_text(tok, prompt, out)?;
    Ok(params
        .stop_strings
        .iter()
        .filter_map(|s| text.find(s.as_str()))
        .min()
        .map(|cut| text[..cut].to_string()))
}
