//! AdamW with per-tensor weight decay, global-norm gradient clipping, gradient accumulation
//! and transformers-style learning-rate schedules.
//!
//! candle-nn's `AdamW` applies one weight decay to every tensor and has neither clipping nor
//! schedules, so osp has its own. The update is torch.optim.AdamW's (decoupled decay, bias
//! correction), decay is applied only to tensors of rank >= 2 (never to biases or norm
//! weights), clipping follows `torch.nn.utils.clip_grad_norm_`, and the schedules are
//! transformers' `get_{constant,linear,cosine}_schedule_with_warmup` evaluated through
//! `LambdaLR` (optimiser step `s`, counted from 0, uses the factor for `s`). All of this is
//! checked against PyTorch by `tests/optim.rs` (fixture from `scripts/make_optim_fixture.py`).
//!
//! Usage per optimiser step:
//!
//! ```ignore
//! let mut acc = opt.new_accumulator();
//! for micro in micro_batches {
//!     let grads = loss(micro)?.backward()?;
//!     acc.add(opt.params(), &grads, 1.0 / n_micro as f64)?;
//! }
//! let stats = opt.step(&mut acc)?; // clears `acc`
//! ```
//!
//! Everything is done with candle tensor ops on the parameters' device, in f32 (moments and
//! accumulated gradients are f32 whatever the parameter dtype).
use anyhow::{anyhow, bail, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, TensorId, Var};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

/// `torch.nn.utils.clip_grad_norm_` divides by `norm + 1e-6`.
const CLIP_EPS: f64 = 1e-6;

/// Learning-rate schedule after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// The full learning rate after warm-up.
    Constant,
    /// Linear decay from `lr` at the end of warm-up to `lr * min_lr_ratio` at `total_steps`.
    Linear,
    /// Half-cosine decay from `lr` at the end of warm-up to `lr * min_lr_ratio` at
    /// `total_steps`.
    Cosine,
}

/// Optimiser settings (the `[optim]` section of a training config). Every field may be
/// omitted; unknown fields are rejected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate, reached at the end of warm-up. Default `1e-4` (`osp train`: 5e-5).
    pub lr: f64,
    /// Decoupled (AdamW) weight decay: before the Adam update, `p -= lr * weight_decay * p`.
    /// Applied only to tensors of rank >= 2 (matrices, embeddings), never to biases or norm
    /// weights. Default `0.0`.
    pub weight_decay: f64,
    /// Exponential decay rate of the first moment. Default `0.9`.
    pub beta1: f64,
    /// Exponential decay rate of the second moment. Default `0.999`.
    pub beta2: f64,
    /// Added to the bias-corrected root of the second moment. Default `1e-8`.
    pub eps: f64,
    /// Gradients are scaled so that their global L2 norm (over all parameters) is at most
    /// this, as `torch.nn.utils.clip_grad_norm_` does; `0` disables clipping. Default `1.0`.
    pub max_grad_norm: f64,
    /// Linear warm-up length in optimiser steps: step `s < warmup_steps` (counted from 0)
    /// uses `lr * s / warmup_steps`, exactly as transformers' schedules, so the first step of
    /// a warm-up has learning rate 0. Default `0`.
    pub warmup_steps: usize,
    /// Shape of the schedule after warm-up. Default `cosine`.
    pub schedule: Schedule,
    /// The linear and cosine decays end at `lr * min_lr_ratio` (at `total_steps`, and stay
    /// there after it); ignored by `constant`. Default `0.0`. With a non-zero ratio the cosine
    /// schedule equals transformers' `get_cosine_with_min_lr_schedule_with_warmup(min_lr_rate)`.
    pub min_lr_ratio: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: 1.0,
            warmup_steps: 0,
            schedule: Schedule::Cosine,
            min_lr_ratio: 0.0,
        }
    }
}

impl OptimConfig {
    /// Checks every field's range; the error names the first offending field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, rule: &str, v: f64| {
            Err(anyhow!(
                "optimiser config: `{field}` must be {rule}, got {v}"
            ))
        };
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", "a finite number > 0", self.lr);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay", "a finite number >= 0", self.weight_decay);
        }
        if !(0.0..1.0).contains(&self.beta1) {
            return bad("beta1", "in [0, 1)", self.beta1);
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return bad("beta2", "in [0, 1)", self.beta2);
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad("eps", "a finite number > 0", self.eps);
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return bad(
                "max_grad_norm",
                "a finite number >= 0 (0 disables clipping)",
                self.max_grad_norm,
            );
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad("min_lr_ratio", "in [0, 1]", self.min_lr_ratio);
        }
        Ok(())
    }

    /// The schedule's multiplier of `lr` for optimiser step `step` (0-based) of a run of
    /// `total_steps` steps: transformers' `lr_lambda(step)`.
    pub fn lr_factor(&self, step: usize, total_steps: usize) -> f64 {
        let w = self.warmup_steps;
        if step < w {
            return step as f64 / w as f64;
        }
        let min = self.min_lr_ratio;
        let decay_len = total_steps.saturating_sub(w).max(1) as f64;
        let factor = match self.schedule {
            Schedule::Constant => return 1.0,
            Schedule::Linear => ((total_steps as f64 - step as f64) / decay_len).max(0.0),
            Schedule::Cosine => {
                // transformers lets the cosine rise again past the end; osp holds the floor.
                let progress = ((step - w) as f64 / decay_len).min(1.0);
                0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        };
        (factor * (1.0 - min) + min).max(0.0)
    }

    /// The learning rate for optimiser step `step` (0-based) of a run of `total_steps`.
    pub fn lr_at(&self, step: usize, total_steps: usize) -> f64 {
        self.lr * self.lr_factor(step, total_steps)
    }
}

/// What one optimiser step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// The learning rate used by this step.
    pub lr: f64,
    /// Global L2 norm of the accumulated gradients, before clipping.
    pub grad_norm: f64,
    /// Whether clipping scaled the gradients down.
    pub clipped: bool,
}

/// A step refused because a gradient is not finite. Returned (inside `anyhow::Error`, so
/// `err.downcast_ref::<OptimError>()` finds it) before anything is modified.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OptimError {
    #[error(
        "non-finite gradient (NaN or infinity) in parameter `{param}`; \
         no weight or optimiser state was changed"
    )]
    NonFiniteGradient { param: String },
}

/// Sums gradients of micro-batches (gradient accumulation), in f32, on the parameters'
/// device. Gradients are kept per parameter position, so `add` must always be given the same
/// parameter list (normally `AdamW::params()`).
#[derive(Debug)]
pub struct GradAccumulator {
    grads: Vec<Option<Tensor>>,
    ids: Option<Vec<TensorId>>,
    micro_batches: usize,
}

impl GradAccumulator {
    pub fn new(n_params: usize) -> Self {
        Self {
            grads: vec![None; n_params],
            ids: None,
            micro_batches: 0,
        }
    }

    /// Adds the gradients of `vars` found in `grads` (candle_core::backprop::GradStore),
    /// scaled by `scale`; a var without gradient contributes zero. On error nothing is added.
    pub fn add(&mut self, vars: &[(String, Var)], grads: &GradStore, scale: f64) -> Result<()> {
        if vars.len() != self.grads.len() {
            bail!(
                "gradient accumulator holds {} parameters, given {}",
                self.grads.len(),
                vars.len()
            );
        }
        if !scale.is_finite() {
            bail!("gradient scale must be finite, got {scale}");
        }
        let ids: Vec<TensorId> = vars.iter().map(|(_, v)| v.as_tensor().id()).collect();
        if self.ids.as_ref().is_some_and(|prev| *prev != ids) {
            bail!(
                "gradient accumulator: these are not the parameters of the earlier micro-batches"
            );
        }
        let mut scaled = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                scaled.push(None);
                continue;
            };
            if g.shape() != var.shape() {
                bail!(
                    "gradient of `{name}` has shape {:?}, the parameter {:?}",
                    g.dims(),
                    var.dims()
                );
            }
            let g = g.detach().to_dtype(DType::F32)?;
            scaled.push(Some(if scale == 1.0 {
                g
            } else {
                g.affine(scale, 0.0)?
            }));
        }
        for (slot, g) in self.grads.iter_mut().zip(scaled) {
            if let Some(g) = g {
                *slot = Some(match slot.take() {
                    None => g,
                    Some(sum) => (sum + g)?,
                });
            }
        }
        self.ids = Some(ids);
        self.micro_batches += 1;
        Ok(())
    }

    /// Number of `add` calls since the last `clear` (or optimiser step).
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// The accumulated gradient per parameter (None: no micro-batch had one), f32.
    pub fn grads(&self) -> &[Option<Tensor>] {
        &self.grads
    }

    /// Global L2 norm of the accumulated gradients (may be NaN or infinite).
    pub fn grad_norm(&self) -> Result<f64> {
        Ok(sq_sums(self.grads.iter().map(Option::as_ref))?
            .iter()
            .sum::<f64>()
            .sqrt())
    }

    pub fn clear(&mut self) {
        self.grads.iter_mut().for_each(|g| *g = None);
        self.ids = None;
        self.micro_batches = 0;
    }
}

/// Global L2 norm of a set of tensors (as `clip_grad_norm_` computes it); NaN or infinite
/// when an element is.
pub fn global_grad_norm(grads: &[Tensor]) -> Result<f64> {
    Ok(sq_sums(grads.iter().map(Some))?.iter().sum::<f64>().sqrt())
}

/// Sum of squares of each tensor (0 for None), with one device-to-host transfer when all
/// live on one device. Sums that overflow f32 are recomputed in f64, so a non-finite result
/// means a non-finite element.
fn sq_sums<'a>(grads: impl Iterator<Item = Option<&'a Tensor>>) -> Result<Vec<f64>> {
    let grads: Vec<Option<&Tensor>> = grads.collect();
    let mut sums = Vec::with_capacity(grads.len());
    let mut present = Vec::new();
    for g in grads.iter().flatten() {
        present.push(g.to_dtype(DType::F32)?.sqr()?.sum_all()?);
    }
    let devices_agree = present
        .windows(2)
        .all(|w| w[0].device().same_device(w[1].device()));
    let values: Vec<f32> = if present.is_empty() {
        Vec::new()
    } else if devices_agree {
        Tensor::stack(&present, 0)?.to_vec1()?
    } else {
        present
            .iter()
            .map(|t| t.to_scalar::<f32>())
            .collect::<candle_core::Result<_>>()?
    };
    let mut values = values.into_iter();
    for g in &grads {
        let Some(g) = g else {
            sums.push(0.0);
            continue;
        };
        let v = values
            .next()
            .ok_or_else(|| anyhow!("internal: missing norm"))?;
        sums.push(if v.is_finite() {
            f64::from(v)
        } else {
            g.to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?
        });
    }
    Ok(sums)
}

/// AdamW (torch.optim.AdamW semantics) over named `Var`s, with clipping and a schedule.
pub struct AdamW {
    params: Vec<(String, Var)>,
    /// Whether weight decay applies (rank >= 2).
    decays: Vec<bool>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    cfg: OptimConfig,
    total_steps: usize,
    steps_done: usize,
}

impl AdamW {
    /// Moments start at zero. Errors on an invalid config, `total_steps == 0`, no
    /// parameters, duplicate names, or a non-float parameter.
    pub fn new(params: Vec<(String, Var)>, cfg: OptimConfig, total_steps: usize) -> Result<Self> {
        cfg.validate()?;
        if total_steps == 0 {
            bail!("optimiser: total_steps must be at least 1");
        }
        if params.is_empty() {
            bail!("optimiser: no trainable parameters");
        }
        let mut seen = HashSet::new();
        let mut exp_avg = Vec::with_capacity(params.len());
        for (name, var) in &params {
            if !seen.insert(name.as_str()) {
                bail!("optimiser: parameter name `{name}` appears twice");
            }
            if !var.dtype().is_float() {
                bail!(
                    "optimiser: parameter `{name}` has dtype {:?}, expected a float type",
                    var.dtype()
                );
            }
            exp_avg.push(Tensor::zeros(var.shape(), DType::F32, var.device())?);
        }
        Ok(Self {
            decays: params.iter().map(|(_, v)| v.rank() >= 2).collect(),
            exp_avg_sq: exp_avg.clone(),
            exp_avg,
            params,
            cfg,
            total_steps,
            steps_done: 0,
        })
    }

    /// The schedule's learning rate for optimiser step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        self.cfg.lr_at(step, self.total_steps)
    }

    /// An empty accumulator sized for these parameters.
    pub fn new_accumulator(&self) -> GradAccumulator {
        GradAccumulator::new(self.params.len())
    }

    /// Applies one update from the accumulated gradients: computes the global grad norm; if
    /// it is not finite returns [`OptimError::NonFiniteGradient`] naming the first offending
    /// parameter WITHOUT modifying any weight or moment (the accumulator is cleared, its
    /// contents being useless); clips to `max_grad_norm`; AdamW update with bias correction as
    /// torch.optim.AdamW (decoupled decay `p -= lr*wd*p` before the Adam step, rank >= 2
    /// only); increments the step; clears the accumulator.
    ///
    /// A parameter that received no gradient in any micro-batch is updated as with a zero
    /// gradient (its moments decay and momentum still moves it), where torch would skip it.
    pub fn step(&mut self, acc: &mut GradAccumulator) -> Result<StepStats> {
        if acc.grads.len() != self.params.len() {
            bail!(
                "optimiser has {} parameters, the gradient accumulator {}",
                self.params.len(),
                acc.grads.len()
            );
        }
        if let Some(ids) = &acc.ids {
            let same = ids
                .iter()
                .zip(&self.params)
                .all(|(id, (_, v))| *id == v.as_tensor().id());
            if !same {
                bail!("the gradient accumulator was filled for other parameters");
            }
        }
        if acc.micro_batches == 0 {
            bail!("optimiser step without gradients: the accumulator is empty");
        }

        let sums = sq_sums(acc.grads.iter().map(Option::as_ref))?;
        if let Some(i) = sums.iter().position(|s| !s.is_finite()) {
            acc.clear();
            return Err(OptimError::NonFiniteGradient {
                param: self.params[i].0.clone(),
            }
            .into());
        }
        let grad_norm = sums.iter().sum::<f64>().sqrt();
        let mut clip = 1.0;
        if self.cfg.max_grad_norm > 0.0 {
            let coef = self.cfg.max_grad_norm / (grad_norm + CLIP_EPS);
            if coef < 1.0 {
                clip = coef;
            }
        }

        let lr = self.lr_at(self.steps_done);
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let t = i32::try_from(self.steps_done + 1).unwrap_or(i32::MAX);
        let bias1 = 1.0 - b1.powi(t);
        let bias2_sqrt = (1.0 - b2.powi(t)).sqrt();
        let step_size = lr / bias1;
        // The update is p -= step_size * m / (sqrt(v) / bias2_sqrt + eps). Dividing the
        // denominator by step_size instead saves one full-size op; kept only where those
        // factors are representable in f32.
        let inv = 1.0 / (bias2_sqrt * step_size);
        let eps_scaled = self.cfg.eps / step_size;
        let folded = step_size > 0.0 && inv < f32::MAX as f64 && eps_scaled < f32::MAX as f64;

        for (i, (_, var)) in self.params.iter().enumerate() {
            let (m, v) = match &acc.grads[i] {
                Some(g) => {
                    let m =
                        (self.exp_avg[i].affine(b1, 0.0)? + g.affine((1.0 - b1) * clip, 0.0)?)?;
                    let v = (self.exp_avg_sq[i].affine(b2, 0.0)?
                        + g.sqr()?.affine((1.0 - b2) * clip * clip, 0.0)?)?;
                    (m, v)
                }
                None => (
                    self.exp_avg[i].affine(b1, 0.0)?,
                    self.exp_avg_sq[i].affine(b2, 0.0)?,
                ),
            };
            if step_size > 0.0 {
                let p = var.as_detached_tensor().to_dtype(DType::F32)?;
                let p = if self.decays[i] && self.cfg.weight_decay > 0.0 {
                    p.affine(1.0 - lr * self.cfg.weight_decay, 0.0)?
                } else {
                    p
                };
                let update = if folded {
                    (&m / v.sqrt()?.affine(inv, eps_scaled)?)?
                } else {
                    (&m / v.sqrt()?.affine(1.0 / bias2_sqrt, self.cfg.eps)?)?
                        .affine(step_size, 0.0)?
                };
                var.set(&(p - update)?.to_dtype(var.dtype())?)?;
            }
            self.exp_avg[i] = m;
            self.exp_avg_sq[i] = v;
        }
        self.steps_done += 1;
        acc.clear();
        Ok(StepStats {
            lr,
            grad_norm,
            clipped: clip < 1.0,
        })
    }

    pub fn steps_done(&self) -> usize {
        self.steps_done
    }

    pub fn total_steps(&self) -> usize {
        self.total_steps
    }

    pub fn config(&self) -> &OptimConfig {
        &self.cfg
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// Moments as named tensors ("exp_avg.<name>", "exp_avg_sq.<name>") for checkpoints.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.push((format!("exp_avg.{name}"), self.exp_avg[i].clone()));
            out.push((format!("exp_avg_sq.{name}"), self.exp_avg_sq[i].clone()));
        }
        Ok(out)
    }

    /// Restores moments and step count. Tensors are moved to each parameter's device and to
    /// f32. Other names in `tensors` are ignored, except "exp_avg."/"exp_avg_sq." entries for a
    /// parameter this optimiser does not have. Errors name every missing, misshapen or
    /// unknown tensor; on error nothing is changed.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        steps_done: usize,
    ) -> Result<()> {
        let mut problems = String::new();
        let mut loaded = Vec::with_capacity(self.params.len());
        for (name, var) in &self.params {
            let mut pair = Vec::with_capacity(2);
            for prefix in ["exp_avg", "exp_avg_sq"] {
                let key = format!("{prefix}.{name}");
                match tensors.get(&key) {
                    None => {
                        let _ = write!(problems, "\n  `{key}` is missing");
                    }
                    Some(t) if t.shape() != var.shape() => {
                        let _ = write!(
                            problems,
                            "\n  `{key}` has shape {:?}, the parameter {:?}",
                            t.dims(),
                            var.dims()
                        );
                    }
                    Some(t) if !t.dtype().is_float() => {
                        let _ = write!(problems, "\n  `{key}` has dtype {:?}", t.dtype());
                    }
                    Some(t) => pair.push(t.to_device(var.device())?.to_dtype(DType::F32)?),
                }
            }
            loaded.push(pair);
        }
        let names: HashSet<&str> = self.params.iter().map(|(n, _)| n.as_str()).collect();
        let mut unknown: Vec<&String> = tensors
            .keys()
            .filter(|k| {
                let param = k
                    .strip_prefix("exp_avg_sq.")
                    .or_else(|| k.strip_prefix("exp_avg."));
                param.is_some_and(|p| !names.contains(p))
            })
            .collect();
        unknown.sort();
        for k in unknown {
            let _ = write!(
                problems,
                "\n  `{k}` belongs to no parameter of this optimiser"
            );
        }
        if !problems.is_empty() {
            bail!("optimiser state does not fit the parameters:{problems}");
        }
        for (i, pair) in loaded.into_iter().enumerate() {
            let [m, v]: [Tensor; 2] = pair
                .try_into()
                .map_err(|_| anyhow!("internal: optimiser state pair"))?;
            self.exp_avg[i] = m;
            self.exp_avg_sq[i] = v;
        }
        self.steps_done = steps_done;
        Ok(())
    }
}
