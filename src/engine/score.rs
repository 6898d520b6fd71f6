//! Scoring without gradients on the engine: the judge's answer logits at the last position,
//! and summed response log-probabilities (πref, evaluation). Batches are unpadded, the keys
//! and values live in a one-layer scratch cache, the LM head runs only where it is needed (two
//! vocabulary rows for the judge; chunks of rows for log-probabilities), so memory stays
//! bounded by the batch's tokens, not by tokens × vocabulary or by [T, T] scores.
use super::forward::{Engine, Segment};
use super::kv::KvCache;
use anyhow::{bail, Result};
use rayon::prelude::*;

/// Tokens per forward when scoring: bounds the activations.
const SCORE_TOKENS: usize = 8192;

/// Rows of logits materialised at once when computing log-probabilities.
const HEAD_ROWS: usize = 32;

/// Runs `seqs` in batches of at most `batch` sequences and `SCORE_TOKENS` tokens (a longer
/// sequence runs alone), calling `f(first index, hidden)` per batch. Sequence i's first
/// tokens may already sit in `shared` (`prefix[i]` = (slot, length)): only the rest of it
/// runs, attending to that prefix first, and `f` gets the hidden states of the rest only.
fn batched_after(
    engine: &Engine,
    seqs: &[&[u32]],
    prefix: &[Option<(usize, usize)>],
    shared: Option<&KvCache>,
    batch: usize,
    mut f: impl FnMut(usize, &[f32]) -> Result<()>,
) -> Result<()> {
    if let Some(i) = seqs.iter().position(|s| s.is_empty()) {
        bail!("sequence {i} is empty");
    }
    let skip = |i: usize| prefix[i].map_or(0, |p| p.1);
    let rest = |i: usize| &seqs[i][skip(i)..];
    let mut i0 = 0;
    while i0 < seqs.len() {
        let mut i1 = i0 + 1;
        let mut total = rest(i0).len();
        while i1 < seqs.len() && i1 - i0 < batch && total + rest(i1).len() <= SCORE_TOKENS {
            total += rest(i1).len();
            i1 += 1;
        }
        let longest = (i0..i1).map(|i| rest(i).len()).max().unwrap_or(1);
        let mut scratch = engine.scratch(i1 - i0, longest);
        let segs: Vec<Segment> = (i0..i1)
            .map(|i| Segment {
                tokens: rest(i),
                slot: i - i0,
                start: 0,
                pos0: skip(i),
                prefix: prefix[i],
            })
            .collect();
        let h = engine.hidden(&segs, &mut scratch, shared)?;
        f(i0, &h)?;
        i0 = i1;
    }
    Ok(())
}

/// Shortest prefix worth computing once for a group of judge prompts.
const MIN_SHARED: usize = 8;

/// Slots × positions of one shared-prefix cache: bounds its memory (every layer is kept).
const PREFIX_TOKENS: usize = 2048;

/// Groups of judge prompts that begin with the same tokens (the template's head and the task
/// prompt; in the second order, the same first response too): (members, shared length), the
/// length at least `MIN_SHARED` and short of every member's end (each keeps its last token to
/// run itself), or 0 for a prompt that shares nothing. The prompts are sorted, so a group is a
/// run of neighbours whose common prefix is the least of their neighbours' ones; the runs are
/// chosen to save the most positions, Σ (members − 1) · length (a small dynamic programme:
/// one long group on the task prompt may save less than two on longer, narrower prefixes).
fn prefix_groups(seqs: &[&[u32]]) -> Vec<(Vec<usize>, usize)> {
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by(|&a, &b| seqs[a].cmp(seqs[b]));
    let n = order.len();
    let lcp = |a: &[u32], b: &[u32]| a.iter().zip(b).take_while(|(x, y)| x == y).count();
    // near[i]: common prefix of sorted neighbours i and i + 1.
    let near: Vec<usize> = (1..n)
        .map(|i| lcp(seqs[order[i - 1]], seqs[order[i]]))
        .collect();
    // Shared length of a run of `members` with this common prefix and shortest member.
    let usable = |members: usize, common: usize, shortest: usize| -> usize {
        let len = common.min(shortest - 1);
        if members >= 2 && len >= MIN_SHARED {
            len
        } else {
            0
        }
    };
    // best[j]: (saving, start of the last run, its shared length) for order[..j].
    let mut best: Vec<(usize, usize, usize)> = vec![(0, 0, 0); n + 1];
    for j in 1..=n {
        best[j] = (best[j - 1].0, j - 1, 0);
        let (mut common, mut shortest) = (usize::MAX, seqs[order[j - 1]].len());
        // Runs order[i..j], longer and longer: the common prefix only shrinks.
        for i in (0..j - 1).rev() {
            common = common.min(near[i]);
            if common < MIN_SHARED {
                break;
            }
            shortest = shortest.min(seqs[order[i]].len());
            let len = usable(j - i, common, shortest);
            let saving = best[i].0 + (j - i - 1) * len;
            if saving > best[j].0 {
                best[j] = (saving, i, len);
            }
        }
    }
    let mut groups = vec![];
    let mut j = n;
    while j > 0 {
        let (_, i, len) = best[j];
        groups.push((order[i..j].to_vec(), len));
        j = i;
    }
    groups.reverse();
    groups
}

/// Prefills the groups' shared prefixes into one cache (slot = index in `groups`).
fn prefill_prefixes(
    engine: &Engine,
    seqs: &[&[u32]],
    groups: &[(Vec<usize>, usize)],
) -> Result<KvCache> {
    let cap = groups.iter().map(|g| g.1).max().unwrap_or(0).max(1);
    let mut cache = engine.cache(groups.len(), cap);
    let segs: Vec<Segment> = groups
        .iter()
        .enumerate()
        .filter(|(_, g)| g.1 > 0)
        .map(|(slot, (m, l))| Segment {
            tokens: &seqs[m[0]][..*l],
            slot,
            start: 0,
            pos0: 0,
            prefix: None,
        })
        .collect();
    // At most PREFIX_TOKENS positions in all, so one forward suffices.
    if !segs.is_empty() {
        engine.hidden(&segs, &mut cache, None)?;
    }
    Ok(cache)
}

/// Runs every sequence, computing prefixes shared by several of them once (`prefix_groups`
/// on `seqs[i][..limit[i]]`, so at most limit[i] − 1 tokens of sequence i are shared), a chunk
/// of groups at a time, `batch` sequences per forward; calls `f(i, skip, hidden)` with the
/// hidden states [len − skip, d] of sequence i's positions from `skip` on. A sequence's values
/// are exactly those it gets alone: each row's arithmetic is independent of the batch and of
/// where its keys were computed.
fn with_shared_prefixes(
    engine: &Engine,
    seqs: &[&[u32]],
    limit: &[usize],
    batch: usize,
    mut f: impl FnMut(usize, usize, &[f32]) -> Result<()>,
) -> Result<()> {
    let d = engine.cfg.hidden_size;
    if let Some(i) = seqs.iter().position(|s| s.is_empty()) {
        bail!("sequence {i} is empty");
    }
    let heads: Vec<&[u32]> = seqs
        .iter()
        .zip(limit)
        .map(|(s, &l)| &s[..l.clamp(1, s.len())])
        .collect();
    let groups = prefix_groups(&heads);
    let mut g0 = 0;
    while g0 < groups.len() {
        // As many groups as the prefix cache's budget holds (at least one).
        let mut g1 = g0 + 1;
        let mut longest = groups[g0].1;
        while g1 < groups.len() && (g1 + 1 - g0) * longest.max(groups[g1].1) <= PREFIX_TOKENS {
            longest = longest.max(groups[g1].1);
            g1 += 1;
        }
        let chunk = &groups[g0..g1];
        let cache = prefill_prefixes(engine, seqs, chunk)?;
        let mut idx = vec![];
        let mut prefix = vec![];
        for (slot, (members, len)) in chunk.iter().enumerate() {
            for &i in members {
                idx.push(i);
                prefix.push((*len > 0).then_some((slot, *len)));
            }
        }
        let sub: Vec<&[u32]> = idx.iter().map(|&i| seqs[i]).collect();
        let skip = |j: usize| prefix[j].map_or(0, |p: (usize, usize)| p.1);
        batched_after(
            engine,
            &sub,
            &prefix,
            Some(&cache),
            batch.max(1),
            |j0, h| {
                let mut start = 0;
                for j in j0..sub.len() {
                    if start >= h.len() / d {
                        break;
                    }
                    let end = start + sub[j].len() - skip(j);
                    f(idx[j], skip(j), &h[start * d..end * d])?;
                    start = end;
                }
                Ok(())
            },
        )?;
        g0 = g1;
    }
    Ok(())
}

/// p_AB = σ(ℓ_a − ℓ_b) at the last position of each judge prompt, `batch` prompts per
/// forward, shared prefixes (the template's head and the task prompt; in the second order,
/// the same first response too) computed once.
pub fn p_ab(
    engine: &Engine,
    prompts: &[Vec<u32>],
    answers: (u32, u32),
    batch: usize,
) -> Result<Vec<f64>> {
    let d = engine.cfg.hidden_size;
    let seqs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let limit: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
    let mut out = vec![f64::NAN; prompts.len()];
    with_shared_prefixes(engine, &seqs, &limit, batch, |i, _, h| {
        let last = &h[h.len() - d..];
        let l = engine.logits_of(last, &[answers.0, answers.1])?;
        let diff = (l[0] - l[1]) as f64;
        out[i] = 1.0 / (1.0 + (-diff).exp());
        Ok(())
    })?;
    Ok(out)
}

/// log softmax(logits)[t], for one row of logits.
pub(crate) fn token_logprob(logits: &[f32], t: u32) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = logits.iter().map(|v| (v - max).exp()).sum::<f32>().ln() + max;
    logits[t as usize] - lse
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
    // A prompt shared by several sequences (the K samples of one prompt) runs once: up to the
    // position before the first scored token, whose hidden state predicts it.
    let limit: Vec<usize> = masks
        .iter()
        .map(|m| m.iter().skip(1).position(|&b| b).map_or(m.len(), |j| j + 1))
        .collect();
    let mut out = vec![0f32; seqs.len()];
    let mut logits = vec![];
    with_shared_prefixes(engine, &refs, &limit, usize::MAX, |i, skip, h| {
        // (row of h, target token) for every scored position.
        let wanted: Vec<(usize, u32)> = ((skip + 1)..seqs[i].len())
            .filter(|&j| masks[i][j])
            .map(|j| (j - 1 - skip, seqs[i][j]))
            .collect();
        let mut hid = Vec::with_capacity(HEAD_ROWS * d);
        for chunk in wanted.chunks(HEAD_ROWS) {
            hid.clear();
            for &(r, _) in chunk {
                hid.extend_from_slice(&h[r * d..(r + 1) * d]);
            }
            engine.logits_into(&hid, chunk.len(), &mut logits)?;
            let lps: Vec<f32> = logits
                .par_chunks(vocab)
                .zip(chunk.par_iter())
                .map(|(row, &(_, t))| token_logprob(row, t))
                .collect();
            // In position order, as a sequential sum over the sequence.
            lps.iter().for_each(|lp| out[i] += lp);
        }
        Ok(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_groups_save_the_most_positions() {
        let head: Vec<u32> = (0..10).collect();
        let with = |mid: &[u32], tail: u32| {
            let mut s = head.clone();
            s.extend_from_slice(mid);
            s.push(tail);
            s
        };
        let long_a: Vec<u32> = (100..130).collect();
        let long_b: Vec<u32> = (200..230).collect();
        let seqs = [
            with(&long_a, 1),
            with(&long_b, 1),
            with(&long_a, 2),
            with(&long_b, 2),
            with(&long_a, 3),
            vec![7, 7, 7],
        ];
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let mut groups = prefix_groups(&refs);
        groups.iter_mut().for_each(|g| g.0.sort());
        groups.sort();
        // Two groups on the 40-token prefixes beat one on the 10-token head; the odd one out
        // shares nothing.
        assert_eq!(
            groups,
            vec![(vec![0, 2, 4], 40), (vec![1, 3], 40), (vec![5], 0)]
        );
    }
}
