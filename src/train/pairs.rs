//! What every preference trainer shares: reading preference data in any supported format,
//! tokenizing pairs, and the log-probabilities of both responses under policy and reference.
use crate::data::{
    load_hh, load_pandalm, load_preferences, load_tldr, ChatRender, OnMalformed, PreferencePair,
};
use crate::model::Llama;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Layout of a preference file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// Decide from the file: HH for `*.jsonl.gz`, TL;DR for `comparisons*`, PandaLM for
    /// `testset*.json`, TRL otherwise.
    Auto,
    /// TRL prompt/chosen/rejected (plain or conversational), optional `strength`.
    Trl,
    /// Anthropic HH transcripts.
    Hh,
    /// OpenAI TL;DR comparisons (confidence → strength).
    Tldr,
    /// PandaLM (majority label, agreement → strength).
    Pandalm,
}

/// Reads preference pairs and warnings (skipped records, ties). Pairs whose chosen and
/// rejected responses are the same text are dropped (they carry no preference and train
/// with zero gradient); their count leads the warnings.
pub fn load_pairs(
    path: &Path,
    format: DataFormat,
    tok: Option<&Tokenizer>,
    on_malformed: OnMalformed,
) -> Result<(Vec<PreferencePair>, Vec<String>)> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let format = match format {
        DataFormat::Auto if name.ends_with(".jsonl.gz") => DataFormat::Hh,
        DataFormat::Auto if name.starts_with("comparisons") => DataFormat::Tldr,
        DataFormat::Auto if name.starts_with("testset") => DataFormat::Pandalm,
        DataFormat::Auto => DataFormat::Trl,
        f => f,
    };
    let (mut pairs, mut warnings) = match format {
        DataFormat::Hh => load_hh(path, on_malformed)?,
        DataFormat::Tldr => {
            let (p, _, w) = load_tldr(path, on_malformed)?;
            (p, w)
        }
        DataFormat::Pandalm => {
            let (p, _, w) = load_pandalm(path, on_malformed)?;
            (p, w)
        }
        _ => load_preferences(path, ChatRender::for_tokenizer(tok), on_malformed)?,
    };
    let before = pairs.len();
    let first = pairs
        .iter()
        .find(|p| p.chosen == p.rejected)
        .map(|p| p.source.clone());
    pairs.retain(|p| p.chosen != p.rejected);
    if let Some(first) = first {
        warnings.insert(
            0,
            format!(
                "{}: skipped {} pairs whose chosen and rejected responses are identical (first: {first})",
                path.display(),
                before - pairs.len()
            ),
        );
    }
    Ok((pairs, warnings))
}

/// A pair as token ids: the prompt (with BOS) and each response (with EOS when the
/// tokenizer has one), kept apart so the loss masks only response tokens.
#[derive(Debug, Clone)]
pub struct TokenizedPair {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    pub strength: Option<f64>,
    pub source: String,
    /// πref's summed log-probabilities of (chosen, rejected), filled once by
    /// `cache_reference_logps` so that offline training does not recompute them every step.
    pub ref_logps: Option<(f32, f32)>,
}

/// Tokenizes a pair; responses are cut so prompt + response fits in `max_len` (the prompt
/// keeps its end). Returns None (with the reason) when nothing of a response would remain.
pub fn tokenize_pair(
    tok: &Tokenizer,
    p: &PreferencePair,
    max_len: usize,
) -> Result<std::result::Result<TokenizedPair, String>> {
    let mut prompt = tok.encode(&p.prompt, tok.bos_id().is_some())?;
    let response = |text: &str| -> Result<Vec<u32>> {
        let mut ids = tok.encode(text, false)?;
        if let Some(&eos) = tok.eos_ids().first() {
            ids.push(eos);
        }
        Ok(ids)
    };
    let (mut chosen, mut rejected) = (response(&p.chosen)?, response(&p.rejected)?);
    let budget = max_len.saturating_sub(1);
    if prompt.len() > budget / 2 && prompt.len() + chosen.len().max(rejected.len()) > max_len {
        // Keep the end of a long prompt (where the question is), half the budget at most.
        let keep = (budget / 2).max(1);
        let cut = prompt.len() - keep;
        prompt.drain(..cut);
        if let (Some(bos), Some(first)) = (tok.sequence_bos(), prompt.first_mut()) {
            *first = bos;
        }
    }
    let room = max_len.saturating_sub(prompt.len());
    if room == 0 {
        return Ok(Err(format!(
            "{}: prompt fills the {max_len}-token limit",
            p.source
        )));
    }
    chosen.truncate(room);
    rejected.truncate(room);
    Ok(Ok(TokenizedPair {
        prompt,
        chosen,
        rejected,
        strength: p.strength,
        source: p.source.clone(),
        ref_logps: None,
    }))
}

/// prompt ++ response with its loss mask (true on response tokens).
pub fn join(prompt: &[u32], response: &[u32]) -> (Vec<u32>, Vec<bool>) {
    let mut ids = prompt.to_vec();
    ids.extend_from_slice(response);
    let mut mask = vec![false; prompt.len()];
    mask.extend(std::iter::repeat_n(true, response.len()));
    (ids, mask)
}

/// Summed response log-probabilities [n] of the chosen and rejected responses, in one batch.
pub fn pair_logps(model: &Llama, pairs: &[(&[u32], &[u32], &[u32])]) -> Result<(Tensor, Tensor)> {
    if pairs.is_empty() {
        bail!("no pairs");
    }
    let mut seqs = Vec::with_capacity(2 * pairs.len());
    let mut masks = Vec::with_capacity(2 * pairs.len());
    for side in 0..2 {
        for (p, c, r) in pairs {
            let (ids, mask) = join(p, if side == 0 { c } else { r });
            seqs.push(ids);
            masks.push(mask);
        }
    }
    let all = model.sequence_logps(&seqs, &masks)?;
    let n = pairs.len();
    Ok((all.narrow(0, 0, n)?, all.narrow(0, n, n)?))
}

/// Like `pair_logps`, without an autograd graph (for πref).
pub fn pair_logps_detached(
    model: &Llama,
    pairs: &[(&[u32], &[u32], &[u32])],
) -> Result<(Tensor, Tensor)> {
    if crate::engine::Engine::supports(model) {
        // No graph needed: the inference engine, without the autograd model's copies.
        let engine = crate::engine::Engine::new(model)?;
        let (seqs, masks): (Vec<_>, Vec<_>) = (0..2)
            .flat_map(|side| {
                pairs
                    .iter()
                    .map(move |(p, c, r)| join(p, if side == 0 { c } else { r }))
            })
            .unzip();
        if seqs.is_empty() {
            bail!("no pairs");
        }
        let all = crate::engine::score::sequence_logps(&engine, &seqs, &masks)?;
        let n = pairs.len();
        let all = Tensor::from_vec(all, 2 * n, model.device())?;
        return Ok((all.narrow(0, 0, n)?, all.narrow(0, n, n)?));
    }
    let (c, r) = pair_logps(model, pairs)?;
    Ok((c.detach(), r.detach()))
}

/// Summed response log-probabilities [n] of (prompt, response) sequences, in one batch: the
/// log-probs of every sampled completion (for TRL's `objective/kl` over all samples).
pub fn response_logps(model: &Llama, seqs: &[(&[u32], &[u32])]) -> Result<Tensor> {
    if seqs.is_empty() {
        bail!("no sequences");
    }
    let (ids, masks): (Vec<_>, Vec<_>) = seqs.iter().map(|(p, r)| join(p, r)).unzip();
    model.sequence_logps(&ids, &masks)
}

/// The indices `idx` of `seqs`, shortest (prompt + response) first: consecutive chunks of it
/// are batches of similar length, padded little.
pub fn by_length(seqs: &[(&[u32], &[u32])], idx: impl IntoIterator<Item = usize>) -> Vec<usize> {
    let mut order: Vec<usize> = idx.into_iter().collect();
    order.sort_by_key(|&i| seqs[i].0.len() + seqs[i].1.len());
    order
}

/// `response_logps` in batches of at most `bucket` sequences of similar length (sorted by
/// length), so that a batch is padded to its own longest sequence rather than the longest of
/// all; the result [n] is in the order of `seqs`, with the graph when the model has one.
pub fn bucketed_response_logps(
    model: &Llama,
    seqs: &[(&[u32], &[u32])],
    bucket: usize,
) -> Result<Tensor> {
    if seqs.len() <= bucket {
        return response_logps(model, seqs);
    }
    let order = by_length(seqs, 0..seqs.len());
    let parts = order
        .chunks(bucket.max(1))
        .map(|c| response_logps(model, &c.iter().map(|&i| seqs[i]).collect::<Vec<_>>()))
        .collect::<Result<Vec<_>>>()?;
    let sorted = Tensor::cat(&parts, 0)?;
    // Position of each sequence in the sorted result.
    let mut at = vec![0u32; seqs.len()];
    for (r, &i) in order.iter().enumerate() {
        at[i] = r as u32;
    }
    let at = Tensor::from_vec(at, seqs.len(), sorted.device())?;
    Ok(sorted.index_select(&at, 0)?)
}

/// Summed response log-probabilities without a graph (πref, evaluation, metrics): on the
/// inference engine where it runs (unpadded batches, the LM head only at response tokens, in
/// chunks of rows), else through `response_logps`, detached.
pub fn frozen_response_logps(model: &Llama, seqs: &[(&[u32], &[u32])]) -> Result<Vec<f32>> {
    if seqs.is_empty() {
        bail!("no sequences");
    }
    if crate::engine::Engine::supports(model) {
        let (ids, masks): (Vec<_>, Vec<_>) = seqs.iter().map(|(p, r)| join(p, r)).unzip();
        let engine = crate::engine::Engine::new(model)?;
        return crate::engine::score::sequence_logps(&engine, &ids, &masks);
    }
    Ok(response_logps(model, seqs)?.detach().to_vec1()?)
}

/// Fills every pair's `ref_logps` with πref's log-probabilities, `batch` pairs at a time. πref
/// is frozen, so these values are the same at every step and epoch; computing them once
/// removes a forward pass of the reference model from every training step.
pub fn cache_reference_logps(
    reference: &Llama,
    pairs: &mut [TokenizedPair],
    batch: usize,
) -> Result<()> {
    for chunk in pairs.chunks_mut(batch.max(1)) {
        let refs: Vec<(&[u32], &[u32], &[u32])> = chunk
            .iter()
            .map(|p| {
                (
                    p.prompt.as_slice(),
                    p.chosen.as_slice(),
                    p.rejected.as_slice(),
                )
            })
            .collect();
        let (c, r) = pair_logps_detached(reference, &refs)?;
        let (c, r) = (c.to_vec1::<f32>()?, r.to_vec1::<f32>()?);
        for ((p, c), r) in chunk.iter_mut().zip(c).zip(r) {
            p.ref_logps = Some((c, r));
        }
    }
    Ok(())
}

/// πref's (chosen, rejected) log-probabilities [n] of `pairs` from their caches, or None when
/// a pair has none.
pub fn cached_reference_logps(
    pairs: &[&TokenizedPair],
    device: &candle_core::Device,
) -> Result<Option<(Tensor, Tensor)>> {
    let Some(v) = pairs
        .iter()
        .map(|p| p.ref_logps)
        .collect::<Option<Vec<_>>>()
    else {
        return Ok(None);
    };
    let (c, r): (Vec<f32>, Vec<f32>) = v.into_iter().unzip();
    let n = pairs.len();
    Ok(Some((
        Tensor::from_vec(c, n, device)?,
        Tensor::from_vec(r, n, device)?,
    )))
}

/// Token count of a padded batch, for throughput.
pub fn tokens_of(pairs: &[(&[u32], &[u32], &[u32])]) -> usize {
    pairs
        .iter()
        .map(|(p, c, r)| 2 * p.len() + c.len() + r.len())
        .sum()
}

/// πref for a policy: the same model with its adapters off (LoRA, no copy), or a frozen
/// snapshot of the starting weights (full fine-tuning).
pub fn reference_for(policy: &Llama) -> Result<Llama> {
    Ok(if policy.lora_config().is_some() {
        policy.without_adapter()
    } else {
        policy.snapshot()?
    })
}
