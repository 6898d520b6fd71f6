//! Scoring without gradients on the engine: the judge's answer logits at the last position,
//! and summed response log-probabilities (πref, evaluation). Batches are unpadded, the keys
//! and values live in a one-layer scratch cache, the LM head runs only where it is needed (two
//! vocabulary rows for the judge; chunks of rows for log-probabilities), so memory stays
//! bounded by the batch's tokens, not by tokens × vocabulary or by [T, T] scores.
use super::forward::{Engine, Segment};
use anyhow::{bail, Result};

/// Tokens per forward when scoring: bounds the activations.
const SCORE_TOKENS: usize = 8192;

/// Rows of logits materialised at once when computing log-probabilities.
const HEAD_ROWS: usize = 32;

/// Runs `seqs` in batches of at most `batch` sequences and `SCORE_TOKENS` tokens (a longer
/// sequence runs alone), calling `f(first index, hidden [tokens, d])` per batch.
fn batched(
    engine: &Engine,
    seqs: &[&[u32]],
    batch: usize,
    mut f: impl FnMut(usize, &[f32]) -> Result<()>,
) -> Result<()> {
    if let Some(i) = seqs.iter().position(|s| s.is_empty()) {
        bail!("sequence {i} is empty");
    }
    let mut i0 = 0;
    while i0 < seqs.len() {
        let mut i1 = i0 + 1;
        let mut total = seqs[i0].len();
        while i1 < seqs.len() && i1 - i0 < batch && total + seqs[i1].len() <= SCORE_TOKENS {
            total += seqs[i1].len();
            i1 += 1;
        }
        let longest = seqs[i0..i1].iter().map(|s| s.len()).max().unwrap_or(1);
        let mut scratch = engine.scratch(i1 - i0, longest);
        let segs: Vec<Segment> = (i0..i1)
            .map(|i| Segment {
                tokens: seqs[i],
                slot: i - i0,
                start: 0,
                pos0: 0,
                prefix: None,
            })
            .collect();
        let h = engine.hidden(&segs, &mut scratch, None)?;
        f(i0, &h)?;
        i0 = i1;
    }
    Ok(())
}

/// p_AB = σ(ℓ_a − ℓ_b) at the last position of each judge prompt, `batch` prompts per
/// forward.
pub fn p_ab(
    engine: &Engine,
    prompts: &[Vec<u32>],
    answers: (u32, u32),
    batch: usize,
) -> Result<Vec<f64>> {
    let d = engine.cfg.hidden_size;
    let seqs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let mut out = Vec::with_capacity(prompts.len());
    batched(engine, &seqs, batch.max(1), |i0, h| {
        let mut end = 0;
        for s in &seqs[i0..] {
            if end >= h.len() / d {
                break;
            }
            end += s.len();
            let l = engine.logits_of(&h[(end - 1) * d..end * d], &[answers.0, answers.1])?;
            let diff = (l[0] - l[1]) as f64;
            out.push(1.0 / (1.0 + (-diff).exp()));
        }
        Ok(())
    })?;
    Ok(out)
}

/// Per-sequence sum of log π(token) over the tokens where `mask` is true (the first token is
/// never scored), as `Llama::sequence_logps` computes it.
pub fn sequence_logps(engine: &Engine, seqs: &[Vec<u32>], masks: &[Vec<bool>]) -> Result<Vec<f32>> {
    if seqs.len() != masks.len() {
        bail!("{} sequences but {} loss masks", seqs.len(), masks.len());
    }
    for (i, (s, m)) in seqs.iter().zip(masks).enumerate() {
        if s.len() != m.len() {
            bail!(
                "sequence {i}: {} tokens but a loss mask of {}",
                s.len(),
                m.len()
            );
        }
        if s.len() < 2 {
            bail!("sequence {i}: needs at least 2 tokens to score a response");
        }
    }
    let (d, vocab) = (engine.cfg.hidden_size, engine.cfg.vocab_size);
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let mut out = Vec::with_capacity(seqs.len());
    batched(engine, &refs, usize::MAX, |i0, h| {
        // (row in h, target token) for every scored position of this batch.
        let mut wanted: Vec<(usize, usize, u32)> = vec![];
        let mut row = 0;
        let mut n = 0;
        for (i, s) in seqs[i0..].iter().enumerate() {
            if row >= h.len() / d {
                break;
            }
            for j in 1..s.len() {
                if masks[i0 + i][j] {
                    wanted.push((i, row + j - 1, s[j]));
                }
            }
            row += s.len();
            n += 1;
        }
        let mut sums = vec![0f32; n];
        for chunk in wanted.chunks(HEAD_ROWS) {
            let mut hid = Vec::with_capacity(chunk.len() * d);
            for &(_, r, _) in chunk {
                hid.extend_from_slice(&h[r * d..(r + 1) * d]);
            }
            let logits = engine.logits(&hid, chunk.len())?;
            for (k, &(i, _, t)) in chunk.iter().enumerate() {
                let l = &logits[k * vocab..(k + 1) * vocab];
                let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let lse = l.iter().map(|v| (v - max).exp()).sum::<f32>().ln() + max;
                sums[i] += l[t as usize] - lse;
            }
        }
        out.extend(sums);
        Ok(())
    })?;
    Ok(out)
}
