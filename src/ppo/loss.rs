//! The clipped PPO losses of a mini-batch and the statistics TRL logs for them.
use super::rollout::MiniBatch;
use super::{PpoConfig, INVALID_LOGPROB};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use serde::Serialize;
use serde_json::{json, Map, Value};

/// What one mini-batch update measured (TRL's per-micro-batch statistics).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PpoStepStats {
    pub pg_loss: f64,
    pub vf_loss: f64,
    pub pg_clipfrac: f64,
    pub vf_clipfrac: f64,
    /// ½ mean((log πθ − log πθ_old)²) over all columns.
    pub approxkl: f64,
    /// masked_mean(log πθ_old − log πθ): TRL 0.11's early-stop statistic.
    pub policykl: f64,
    /// Mean ratio over all columns.
    pub ratio_mean: f64,
}

/// The loss to backpropagate and its statistics.
pub struct PpoLoss {
    pub loss: Tensor,
    pub stats: PpoStepStats,
}

pub(crate) fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// The clipped PPO loss of a mini-batch. `new_logprobs` [b, T] are the current policy's
/// log-probs of the rollout's response tokens (temperature-scaled, with gradient; any value
/// on padding) and `vpred` [b, T] the value head's outputs (with gradient), both at the
/// rollout's width.
pub fn ppo_loss(
    cfg: &PpoConfig,
    new_logprobs: &Tensor,
    vpred: &Tensor,
    mb: &MiniBatch,
) -> Result<PpoLoss> {
    let (b, t) = mb.shape();
    for (name, x) in [("new_logprobs", new_logprobs), ("vpred", vpred)] {
        if x.dims() != [b, t] {
            bail!(
                "ppo_loss: {name} has shape {:?}, the mini-batch is [{b}, {t}]",
                x.dims()
            );
        }
    }
    let rm = &mb.response_mask;
    let vm = &mb.value_mask;
    // masked_fill(new_logprobs, padding, INVALID_LOGPROB) and masked_fill(vpred, padding_p1, 0)
    let new_lp = ((new_logprobs.to_dtype(DType::F32)? * rm)? + ((1.0 - rm)? * INVALID_LOGPROB)?)?;
    let vpred = (vpred.to_dtype(DType::F32)? * vm)?;
    let c = cfg.cliprange_value;
    let vclip = vpred
        .maximum(&(&mb.old_values - c)?)?
        .minimum(&(&mb.old_values + c)?)?;
    let vf1 = (&vpred - &mb.returns)?.sqr()?;
    let vf2 = (&vclip - &mb.returns)?.sqr()?;
    let vf_max = vf1.maximum(&vf2)?;
    let vf_loss = ((vf_max * vm)?.sum_all()? * (0.5 / mb.n_value.max(1) as f64))?;
    let diff = (&new_lp - &mb.old_logprobs)?;
    let ratio = diff.exp()?;
    let neg_adv = mb.advantages.neg()?;
    let pg1 = (&neg_adv * &ratio)?;
    let pg2 = (&neg_adv * ratio.clamp(1.0 - cfg.cliprange, 1.0 + cfg.cliprange)?)?;
    let pg_max = pg1.maximum(&pg2)?;
    let pg_loss = ((pg_max * rm)?.sum_all()? / mb.n_response as f64)?;
    let loss = (&pg_loss + (&vf_loss * cfg.vf_coef)?)?;
    let frac = |a: &Tensor, b: &Tensor, m: &Tensor, n: usize| -> Result<f64> {
        let gt = a.detach().gt(&b.detach())?.to_dtype(DType::F32)?;
        Ok(scalar(&(gt * m)?.sum_all()?)? / n.max(1) as f64)
    };
    let d = diff.detach();
    let stats = PpoStepStats {
        pg_loss: scalar(&pg_loss)?,
        vf_loss: scalar(&vf_loss)?,
        pg_clipfrac: frac(&pg2, &pg1, rm, mb.n_response)?,
        vf_clipfrac: frac(&vf2, &vf1, vm, mb.n_value)?,
        approxkl: 0.5 * scalar(&d.sqr()?.mean_all()?)?,
        policykl: -scalar(&(&d * rm)?.sum_all()?)? / mb.n_response as f64,
        ratio_mean: scalar(&ratio.detach().mean_all()?)?,
    };
    Ok(PpoLoss { loss, stats })
}

/// TRL 0.11's early stop: true when the policy KL exceeds 1.5 × `target_kl`.
pub fn early_stop(target_kl: Option<f64>, policykl: f64) -> bool {
    target_kl.is_some_and(|k| policykl > 1.5 * k)
}

/// log π of `tokens` [b, T] (u32) under `logits` [b, T, V] divided by (temperature + 1e-7), as
/// TRL scores sampled tokens; differentiable through `logits`.
pub fn response_logps(logits: &Tensor, tokens: &Tensor, temperature: f64) -> Result<Tensor> {
    let scaled = (logits / (temperature + 1e-7))?;
    let logp = candle_nn::ops::log_softmax(&scaled, D::Minus1)?;
    Ok(logp
        .gather(&tokens.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?
        .squeeze(D::Minus1)?)
}

/// Entropy of softmax(`logits`) along the last axis: logsumexp(ℓ) − Σ softmax(ℓ)·ℓ (TRL's
/// formula; pass the temperature-scaled logits), evaluated in f64 because the difference
/// cancels most of f32's digits; returned as f32. No gradient.
pub fn entropy_from_logits(logits: &Tensor) -> Result<Tensor> {
    let l = logits.detach().to_dtype(DType::F64)?;
    let max = l.max_keepdim(D::Minus1)?;
    let e = l.broadcast_sub(&max)?.exp()?;
    let z = e.sum_keepdim(D::Minus1)?;
    let lse = (z.log()? + &max)?;
    let p = e.broadcast_div(&z)?;
    let h = (lse.squeeze(D::Minus1)? - (p * &l)?.sum(D::Minus1)?)?;
    Ok(h.to_dtype(DType::F32)?)
}

/// Averages of the per-mini-batch statistics over a rollout's PPO epochs, logged under TRL's
/// names. `val/ratio_var` is the (unbiased) variance of the mini-batch mean ratios, as TRL's.
#[derive(Debug, Clone, Default)]
pub struct PpoStatsLog {
    steps: Vec<PpoStepStats>,
    entropy: Vec<f64>,
    /// Whether the target-KL early stop ended the epochs.
    pub early_stopped: bool,
}

impl PpoStatsLog {
    /// Records one mini-batch: its statistics and the mean entropy of its (temperature-scaled)
    /// logits over all columns (`entropy_from_logits(..).mean_all()`).
    pub fn push(&mut self, s: PpoStepStats, entropy_mean: f64) {
        self.steps.push(s);
        self.entropy.push(entropy_mean);
    }

    pub fn len(&self) -> usize {
        self.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    pub fn to_json(&self) -> Map<String, Value> {
        let n = self.steps.len().max(1) as f64;
        let mean = |f: &dyn Fn(&PpoStepStats) -> f64| self.steps.iter().map(f).sum::<f64>() / n;
        let mut m = Map::new();
        m.insert("policy/approxkl_avg".into(), json!(mean(&|s| s.approxkl)));
        m.insert(
            "policy/clipfrac_avg".into(),
            json!(mean(&|s| s.pg_clipfrac)),
        );
        m.insert("policy/policykl_avg".into(), json!(mean(&|s| s.policykl)));
        m.insert("loss/policy_avg".into(), json!(mean(&|s| s.pg_loss)));
        m.insert("loss/value_avg".into(), json!(mean(&|s| s.vf_loss)));
        m.insert("val/clipfrac_avg".into(), json!(mean(&|s| s.vf_clipfrac)));
        m.insert(
            "policy/entropy_avg".into(),
            json!(self.entropy.iter().sum::<f64>() / n),
        );
        let r = mean(&|s| s.ratio_mean);
        m.insert("val/ratio".into(), json!(r));
        if self.steps.len() >= 2 {
            let var = self
                .steps
                .iter()
                .map(|s| (s.ratio_mean - r).powi(2))
                .sum::<f64>()
                / (n - 1.0);
            m.insert("val/ratio_var".into(), json!(var));
        }
        m.insert("ppo/minibatch_updates".into(), json!(self.steps.len()));
        m.insert("ppo/early_stopped".into(), json!(self.early_stopped));
        m
    }
}
