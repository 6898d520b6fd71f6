//! Offline preference training (DPO, IPO, cDPO, SPCE with the data's strengths) on a fixed
//! preference file against πref.
use super::method::{Method, TrainConfig};
use super::pairs::{
    cache_reference_logps, cached_reference_logps, load_pairs, pair_logps, pair_logps_detached,
    reference_for, tokenize_pair, tokens_of, TokenizedPair,
};
use super::policy::{load_policy, save_trained};
use super::trainer::{DataCursor, Trainer};
use crate::data::split_eval;
use crate::loss::{preference_loss, LossOutput, PairLogps};
use crate::model::Llama;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde_json::{json, Map, Value};
use std::path::PathBuf;

/// What an offline run produced.
pub struct OfflineOutcome {
    pub run_dir: PathBuf,
    /// The saved adapter or model folder (empty when stopped early).
    pub output: PathBuf,
    /// Held-out preference metrics after each evaluation: (step, metrics).
    pub evals: Vec<(usize, Map<String, Value>)>,
}

/// The loss on a slice of pairs; strengths are the data's (SPCE) or absent (DPO-family).
/// πref's log-probabilities come from the pairs' caches when filled, else from `reference`.
pub fn batch_loss(
    cfg: &TrainConfig,
    policy: &Llama,
    reference: Option<&Llama>,
    pairs: &[&TokenizedPair],
) -> Result<(LossOutput, usize)> {
    let refs: Vec<(&[u32], &[u32], &[u32])> = pairs
        .iter()
        .map(|p| {
            (
                p.prompt.as_slice(),
                p.chosen.as_slice(),
                p.rejected.as_slice(),
            )
        })
        .collect();
    let (ref_c, ref_r) = match (cached_reference_logps(pairs, policy.device())?, reference) {
        (Some(cached), _) => cached,
        (None, Some(reference)) => pair_logps_detached(reference, &refs)?,
        (None, None) => bail!("πref log-probabilities are neither cached nor computable"),
    };
    let (pol_c, pol_r) = pair_logps(policy, &refs)?;
    let strength = match cfg.method {
        Method::SpceOffline => {
            let s: Vec<f32> = pairs
                .iter()
                .map(|p| p.strength.unwrap_or(1.0) as f32)
                .collect();
            Some(Tensor::from_vec(s, pairs.len(), policy.device())?)
        }
        _ => None,
    };
    let lp = PairLogps {
        policy_chosen: &pol_c,
        policy_rejected: &pol_r,
        ref_chosen: &ref_c,
        ref_rejected: &ref_r,
    };
    Ok((
        preference_loss(&cfg.loss, &lp, strength.as_ref())?,
        tokens_of(&refs),
    ))
}

/// Mean held-out metrics (no gradients).
pub fn eval_pairs(
    cfg: &TrainConfig,
    policy: &Llama,
    reference: Option<&Llama>,
    pairs: &[TokenizedPair],
) -> Result<Map<String, Value>> {
    let frozen = policy.snapshot()?;
    let mut sums: Map<String, Value> = Map::new();
    let mut n = 0usize;
    for chunk in pairs.chunks(cfg.train.batch_size.max(1)) {
        let refs: Vec<&TokenizedPair> = chunk.iter().collect();
        let (out, _) = batch_loss(cfg, &frozen, reference, &refs)?;
        let mut m = out.metrics.to_json();
        m.insert("loss".into(), json!(out.loss.to_scalar::<f32>()? as f64));
        for (k, v) in m {
            let add = v.as_f64().unwrap_or(0.0) * chunk.len() as f64;
            let cur = sums.get(&k).and_then(Value::as_f64).unwrap_or(0.0);
            sums.insert(k, json!(cur + add));
        }
        n += chunk.len();
    }
    Ok(sums
        .into_iter()
        .map(|(k, v)| {
            (
                format!("eval/{k}"),
                json!(v.as_f64().unwrap_or(0.0) / n.max(1) as f64),
            )
        })
        .collect())
}

/// Runs (or resumes) an offline preference run.
pub fn run_offline(
    cfg: &TrainConfig,
    resume: bool,
    stop_after: Option<usize>,
) -> Result<OfflineOutcome> {
    run_offline_with(cfg, resume, stop_after, &mut |_, _| Ok(()))
}

/// `run_offline` with a hook called after every evaluation point (`train.eval_every`) with the
/// step and the current policy (the demo tracks oracle win rates this way).
pub fn run_offline_with(
    cfg: &TrainConfig,
    resume: bool,
    stop_after: Option<usize>,
    on_eval: &mut dyn FnMut(usize, &Llama) -> Result<()>,
) -> Result<OfflineOutcome> {
    let lm = load_policy(&cfg.model, &cfg.lora, cfg.train.seed, true)?;
    let tok = &lm.tokenizer;
    let path = cfg
        .data
        .preferences
        .as_ref()
        .context("data.preferences is required")?;
    let (raw, warnings) = load_pairs(path, cfg.data.format, Some(tok), cfg.data.on_malformed)?;
    for w in warnings.iter().take(5) {
        eprintln!("warning: {w}");
    }
    let mut all = Vec::with_capacity(raw.len());
    for p in &raw {
        match tokenize_pair(tok, p, cfg.train.max_len)? {
            Ok(t) => all.push(t),
            Err(why) => eprintln!("warning: skipped {why}"),
        }
    }
    if all.is_empty() {
        let first = warnings
            .first()
            .map(|w| format!(" (first problem: {w})"))
            .unwrap_or_default();
        bail!("{}: no usable preference pairs{first}", path.display());
    }
    if cfg.method == Method::SpceOffline {
        let missing = all.iter().filter(|p| p.strength.is_none()).count();
        if missing == all.len() {
            bail!(
                "{}: method spce-offline needs strengths, and no pair has one (use dpo)",
                path.display()
            );
        }
        if missing > 0 {
            eprintln!("note: {missing} pairs have no strength and count as certain (s = 1)");
        }
    }
    let (train, eval) = split_eval(all, cfg.data.eval_fraction, cfg.train.seed);
    if train.is_empty() {
        bail!("{}: no usable preference pairs", path.display());
    }
    let (mut train, mut eval) = (train, eval);
    {
        // πref is frozen: its log-probabilities are computed once here (a resumed run
        // recomputes the same values) and πref itself is dropped before training.
        let reference = reference_for(&lm.model)?;
        let batch = cfg.train.batch_size;
        cache_reference_logps(&reference, &mut train, batch)?;
        cache_reference_logps(&reference, &mut eval, batch)?;
    }
    let what = format!("{:?}", cfg.method);
    let (mut trainer, data) =
        Trainer::start(lm.model.clone(), &cfg.optim, &cfg.train, resume, &what, cfg)?;
    let mut cursor = data.unwrap_or_else(|| DataCursor::new(cfg.train.seed));
    let mut evals = vec![];
    while !trainer.done() {
        if trainer.stop_requested(stop_after, serde_json::to_value(cursor)?)? {
            return Ok(OfflineOutcome {
                run_dir: trainer.run_dir.clone(),
                output: PathBuf::new(),
                evals,
            });
        }
        let mut metrics: Map<String, Value> = Map::new();
        trainer.model.set_training(true);
        for _ in 0..cfg.train.grad_accum {
            let idx = cursor.next_batch(train.len(), cfg.train.batch_size);
            let batch: Vec<&TokenizedPair> = idx.iter().map(|&i| &train[i]).collect();
            let (out, tokens) = batch_loss(cfg, &trainer.model, None, &batch)?;
            trainer.accumulate(&out.loss, tokens)?;
            let mut m = out.metrics.to_json();
            m.insert("loss".into(), json!(out.loss.to_scalar::<f32>()? as f64));
            for (k, v) in m {
                let add = v.as_f64().unwrap_or(0.0) / cfg.train.grad_accum as f64;
                let cur = metrics.get(&k).and_then(Value::as_f64).unwrap_or(0.0);
                metrics.insert(k, json!(cur + add));
            }
        }
        trainer.model.set_training(false);
        metrics.insert(
            "epoch".into(),
            json!(cursor.epoch as f64 + cursor.pos as f64 / train.len() as f64),
        );
        if trainer.finish_step(metrics)?.is_none() {
            continue;
        }
        if trainer.eval_due() {
            if !eval.is_empty() {
                let mut m = eval_pairs(cfg, &trainer.model, None, &eval)?;
                m.insert("step".into(), json!(trainer.step()));
                trainer.log(Value::Object(m.clone()))?;
                evals.push((trainer.step(), m));
            }
            on_eval(trainer.step(), &trainer.model)?;
        }
        let done = trainer.done();
        trainer.maybe_checkpoint(serde_json::to_value(cursor)?, json!({}), done)?;
    }
    trainer.progress.finish();
    let output = save_trained(&trainer.model, tok, &cfg.model, &trainer.run_dir)?;
    Ok(OfflineOutcome {
        run_dir: trainer.run_dir.clone(),
        output,
        evals,
    })
}
