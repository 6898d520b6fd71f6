//! Preference losses on summed response log-probabilities (OSP.md §3 and the §6 baselines).
//!
//! Every loss is a function of the implicit reward difference
//!
//! ```text
//! h = β [ (log πθ(y1|x) − log πref(y1|x)) − (log πθ(y2|x) − log πref(y2|x)) ]     (y1 = chosen)
//! ```
//!
//! | kind | per-pair loss | TRL |
//! | --- | --- | --- |
//! | `spce` | −[s·log σ(h) + (1 − s)·log σ(−h)], s = P(y1 ≻ y2) judged | — (OSP) |
//! | `dpo` | −log σ(h) | `loss_type="sigmoid"` |
//! | `cdpo` | −(1 − ε)·log σ(h) − ε·log σ(−h) | `"sigmoid"` with `label_smoothing` (TRL ≤ 0.x) |
//! | `ipo` | (h/β − 1/(2β))² | `"ipo"` (without TRL ≥ 1's per-token length normalisation) |
//! | `hinge` | max(0, 1 − h) | `"hinge"` |
//!
//! and the batch loss is the mean over pairs. SPCE with s = 1 is DPO and with s = 1 − ε is
//! cDPO; its gradient with respect to the policy log-probs is −β(s − σ(h))·(+1, −1)/n, which
//! vanishes where the implicit preference σ(h) equals the judged strength.
//!
//! Gradients flow to the two policy tensors only: the reference log-probs and the strengths
//! are detached. Everything is built from basic candle ops that backpropagate (no fused
//! `candle_nn` ops), so the loss works on any device and float dtype. log σ is computed
//! without overflow for any |h| (see [`log_sigmoid`]), with log σ'(0) = ½ exactly as in torch:
//! that matters, since h = 0 for every pair at the first step of a LoRA run.
use anyhow::{bail, ensure, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Which preference loss to train with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// Soft-preference cross-entropy with judged strengths (OSP.md §3). The default.
    #[default]
    Spce,
    /// DPO: −log σ(h) (TRL `loss_type="sigmoid"`).
    Dpo,
    /// IPO: (h/β − 1/(2β))² (TRL `loss_type="ipo"`, Eq. 17 of Azar et al., on summed
    /// log-probs: pass per-token averages for TRL ≥ 1's length-normalised variant).
    Ipo,
    /// Conservative DPO: −(1 − ε)·log σ(h) − ε·log σ(−h), ε = `label_smoothing`.
    Cdpo,
    /// Hinge (SLiC / RSO): max(0, 1 − h) (TRL `loss_type="hinge"`).
    Hinge,
}

impl LossKind {
    /// The name used in config files.
    pub fn name(self) -> &'static str {
        match self {
            LossKind::Spce => "spce",
            LossKind::Dpo => "dpo",
            LossKind::Ipo => "ipo",
            LossKind::Cdpo => "cdpo",
            LossKind::Hinge => "hinge",
        }
    }

    /// Whether [`preference_loss`] needs a strength per pair.
    pub fn needs_strength(self) -> bool {
        self == LossKind::Spce
    }
}

/// Loss settings (the `[loss]` section of a training config). Every field may be omitted;
/// unknown fields are rejected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossConfig {
    /// Which loss. Default `spce`.
    pub kind: LossKind,
    /// The β of h = β·(log-ratio difference): the strength of the implicit KL penalty to the
    /// reference (for IPO, the regularisation τ of the paper). Must be > 0. Default `0.1`.
    pub beta: f64,
    /// The ε of cDPO: the assumed probability that a preference label is flipped, i.e. cDPO
    /// is SPCE with s = 1 − ε for every pair. Must lie in [0, 0.5), and be 0 unless
    /// `kind = "cdpo"` (no other loss uses it). Default `0.0` (cDPO with ε = 0 is DPO).
    pub label_smoothing: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            kind: LossKind::Spce,
            beta: 0.1,
            label_smoothing: 0.0,
        }
    }
}

impl LossConfig {
    /// Checks the ranges documented on the fields.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.beta.is_finite() && self.beta > 0.0,
            "loss.beta must be a finite number > 0, got {}",
            self.beta
        );
        ensure!(
            self.label_smoothing.is_finite() && (0.0..0.5).contains(&self.label_smoothing),
            "loss.label_smoothing must be in [0, 0.5), got {}",
            self.label_smoothing
        );
        if self.kind != LossKind::Cdpo && self.label_smoothing != 0.0 {
            bail!(
                "loss.label_smoothing = {} is only used by kind = \"cdpo\" (kind is \"{}\"); remove it or set kind = \"cdpo\"",
                self.label_smoothing,
                self.kind.name()
            );
        }
        Ok(())
    }
}

/// Summed response log-probabilities (prompt and padding masked out) of each pair's chosen
/// and rejected response under the policy and the reference, each of shape `[n_pairs]`, on
/// one device, one float dtype. Gradients flow only to the two policy tensors.
#[derive(Debug, Clone, Copy)]
pub struct PairLogps<'a> {
    pub policy_chosen: &'a Tensor,
    pub policy_rejected: &'a Tensor,
    pub ref_chosen: &'a Tensor,
    pub ref_rejected: &'a Tensor,
}

/// What [`preference_loss`] returns.
#[derive(Debug, Clone)]
pub struct LossOutput {
    /// Scalar (rank 0): the mean of the per-pair losses; call `backward()` on it.
    pub loss: Tensor,
    pub metrics: LossMetrics,
}

/// Batch statistics under TRL's `DPOTrainer` names (see [`LossMetrics::to_json`]); rewards
/// are the implicit rewards r = β (log πθ(y) − log πref(y)).
#[derive(Debug, Clone, PartialEq)]
pub struct LossMetrics {
    /// Number of pairs the means are over (for weighting across micro-batches; not logged).
    pub n_pairs: usize,
    /// `rewards/chosen`: mean of β (log πθ(y1) − log πref(y1)).
    pub rewards_chosen: f64,
    /// `rewards/rejected`: mean of β (log πθ(y2) − log πref(y2)).
    pub rewards_rejected: f64,
    /// `rewards/margins`: mean of chosen − rejected reward (the mean of h).
    pub rewards_margins: f64,
    /// `rewards/accuracies`: fraction of pairs whose chosen reward is strictly greater.
    pub rewards_accuracies: f64,
    /// `logps/chosen`: mean policy log-prob of the chosen responses.
    pub logps_chosen: f64,
    /// `logps/rejected`: mean policy log-prob of the rejected responses.
    pub logps_rejected: f64,
    /// `strength/mean`: mean judged strength, when strengths were given (always for SPCE).
    pub strength_mean: Option<f64>,
}

impl LossMetrics {
    /// The metrics under TRL's key names: `rewards/chosen`, `rewards/rejected`,
    /// `rewards/margins`, `rewards/accuracies`, `logps/chosen`, `logps/rejected`, and
    /// `strength/mean` when strengths were given.
    pub fn to_json(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        let pairs = [
            ("rewards/chosen", self.rewards_chosen),
            ("rewards/rejected", self.rewards_rejected),
            ("rewards/margins", self.rewards_margins),
            ("rewards/accuracies", self.rewards_accuracies),
            ("logps/chosen", self.logps_chosen),
            ("logps/rejected", self.logps_rejected),
        ];
        for (k, v) in pairs {
            m.insert(k.to_string(), Value::from(v));
        }
        if let Some(s) = self.strength_mean {
            m.insert("strength/mean".to_string(), Value::from(s));
        }
        m
    }
}

/// Numerically stable log σ(x), element-wise, from ops that backpropagate:
/// x ≥ 0: −log(1 + e^{−x});  x < 0: x − log(1 + e^{x}). Each branch is evaluated on an input
/// clamped to its own half-line (0 elsewhere), so no exp overflows and no inf or NaN reaches
/// the backward pass; `where_cond` routes the gradient, which is σ(−x) everywhere, ½ at 0.
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let zeros = x.zeros_like()?;
    let pos = x.ge(0.0)?;
    let xp = pos.where_cond(x, &zeros)?;
    let xn = pos.where_cond(&zeros, x)?;
    let on_pos = (xp.neg()?.exp()? + 1.0)?.log()?.neg()?;
    let on_neg = (&xn - (xn.exp()? + 1.0)?.log()?)?;
    Ok(pos.where_cond(&on_pos, &on_neg)?)
}

/// The preference loss of `cfg.kind` over a batch of pairs, with TRL-style metrics.
///
/// `strength` (shape `[n_pairs]`, values in [0, 1]: the judged P(chosen ≻ rejected)) is
/// required for SPCE; the other losses ignore it apart from logging its mean.
/// Errors (naming the offending tensor) on a bad config, non-1-D or mismatched shapes, an
/// empty batch, mixed devices or dtypes, non-finite log-probs, and strengths outside [0, 1].
pub fn preference_loss(
    cfg: &LossConfig,
    lp: &PairLogps,
    strength: Option<&Tensor>,
) -> Result<LossOutput> {
    cfg.validate()?;
    let named = [
        ("policy_chosen", lp.policy_chosen),
        ("policy_rejected", lp.policy_rejected),
        ("ref_chosen", lp.ref_chosen),
        ("ref_rejected", lp.ref_rejected),
    ];
    let first = lp.policy_chosen;
    let n = match first.dims() {
        [n] => *n,
        d => bail!("policy_chosen must have shape [n_pairs], got {d:?}"),
    };
    ensure!(
        n > 0,
        "policy_chosen is empty: a preference loss needs at least one pair"
    );
    let dtype = first.dtype();
    ensure!(
        dtype.is_float(),
        "policy_chosen has dtype {dtype:?}; log-probs must be a float dtype"
    );
    let mut host = Vec::with_capacity(4);
    for (name, t) in named {
        ensure!(
            t.dims() == first.dims(),
            "{name} has shape {:?}, policy_chosen has {:?}; the four log-prob tensors must all be [n_pairs]",
            t.dims(),
            first.dims()
        );
        ensure!(
            t.dtype() == dtype,
            "{name} has dtype {:?}, policy_chosen has {dtype:?}",
            t.dtype()
        );
        ensure!(
            t.device().same_device(first.device()),
            "{name} is on {:?}, policy_chosen on {:?}",
            t.device(),
            first.device()
        );
        let v = to_host(t)?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            bail!("{name}[{i}] = {} is not a finite log-probability", v[i]);
        }
        host.push(v);
    }
    let strength = match strength {
        Some(s) => Some(check_strength(s, n, first)?),
        None if cfg.kind.needs_strength() => bail!(
            "the spce loss needs a strength per pair (the judged P(chosen ≻ rejected)); none was given"
        ),
        None => None,
    };

    let beta = cfg.beta;
    let ref_chosen = lp.ref_chosen.detach();
    let ref_rejected = lp.ref_rejected.detach();
    let chosen_ratio = (lp.policy_chosen - &ref_chosen)?;
    let rejected_ratio = (lp.policy_rejected - &ref_rejected)?;
    // Unscaled log-ratio difference (TRL's `logits`); h = β · logits.
    let logits = (&chosen_ratio - &rejected_ratio)?;
    let h = logits.affine(beta, 0.0)?;
    let per_pair = match cfg.kind {
        LossKind::Dpo => log_sigmoid(&h)?.neg()?,
        LossKind::Cdpo => {
            let eps = cfg.label_smoothing;
            let pos = log_sigmoid(&h)?.affine(1.0 - eps, 0.0)?;
            let neg = log_sigmoid(&h.neg()?)?.affine(eps, 0.0)?;
            (pos + neg)?.neg()?
        }
        LossKind::Spce => {
            let s = match &strength {
                Some((s, _)) => s,
                None => bail!("the spce loss needs a strength per pair"),
            };
            let not_s = s.affine(-1.0, 1.0)?;
            let pos = (s * log_sigmoid(&h)?)?;
            let neg = (not_s * log_sigmoid(&h.neg()?)?)?;
            (pos + neg)?.neg()?
        }
        LossKind::Ipo => logits.affine(1.0, -1.0 / (2.0 * beta))?.sqr()?,
        LossKind::Hinge => {
            let z = h.affine(-1.0, 1.0)?;
            // relu with gradient 0 at the kink, as torch.relu.
            z.gt(0.0)?.where_cond(&z, &z.zeros_like()?)?
        }
    };
    let loss = per_pair.mean_all()?;

    let (pc, pr, rc, rr) = (&host[0], &host[1], &host[2], &host[3]);
    let nf = n as f64;
    let mean = |v: &mut dyn Iterator<Item = f64>| v.sum::<f64>() / nf;
    let chosen_r: Vec<f64> = pc.iter().zip(rc).map(|(p, r)| beta * (p - r)).collect();
    let rejected_r: Vec<f64> = pr.iter().zip(rr).map(|(p, r)| beta * (p - r)).collect();
    let metrics = LossMetrics {
        n_pairs: n,
        rewards_chosen: mean(&mut chosen_r.iter().copied()),
        rewards_rejected: mean(&mut rejected_r.iter().copied()),
        rewards_margins: mean(&mut chosen_r.iter().zip(&rejected_r).map(|(c, r)| c - r)),
        rewards_accuracies: mean(&mut chosen_r.iter().zip(&rejected_r).map(|(c, r)| {
            if c > r {
                1.0
            } else {
                0.0
            }
        })),
        logps_chosen: mean(&mut pc.iter().copied()),
        logps_rejected: mean(&mut pr.iter().copied()),
        strength_mean: strength.map(|(_, v)| v.iter().sum::<f64>() / nf),
    };
    Ok(LossOutput { loss, metrics })
}

fn to_host(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.detach().to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// Validates the strengths; returns them detached, in the log-probs' dtype, and on the host.
fn check_strength(s: &Tensor, n: usize, like: &Tensor) -> Result<(Tensor, Vec<f64>)> {
    ensure!(
        s.dims() == [n],
        "strength has shape {:?}, expected [{n}] (one per pair)",
        s.dims()
    );
    ensure!(
        s.dtype().is_float(),
        "strength has dtype {:?}; it must be a float dtype",
        s.dtype()
    );
    ensure!(
        s.device().same_device(like.device()),
        "strength is on {:?}, the log-probs on {:?}",
        s.device(),
        like.device()
    );
    let v = to_host(s)?;
    if let Some(i) = v
        .iter()
        .position(|x| !x.is_finite() || !(0.0..=1.0).contains(x))
    {
        bail!("strength[{i}] = {} is not a probability in [0, 1]", v[i]);
    }
    Ok((s.detach().to_dtype(like.dtype())?, v))
}
