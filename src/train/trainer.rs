//! The optimisation loop every trainer shares: backward with gradient accumulation, the
//! non-finite policy, the optimiser step, metrics, progress and checkpoints.
use super::checkpoint::{self, CheckpointState};
use super::config::{OnNonFinite, TrainSection};
use super::metrics::{progress_bar, MetricsLog};
use super::optim::{AdamW, GradAccumulator, OptimConfig, OptimError, StepStats};
use super::resume::{RunConfig, RunRecord};
use crate::model::Llama;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use indicatif::ProgressBar;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Consecutive skipped steps after which a run gives up even under `on_nonfinite = "skip"`.
const MAX_CONSECUTIVE_SKIPS: usize = 20;

pub struct Trainer {
    pub model: Llama,
    pub optim: AdamW,
    acc: GradAccumulator,
    pub cfg: TrainSection,
    pub run_dir: PathBuf,
    metrics: MetricsLog,
    pub progress: ProgressBar,
    /// Whether a micro-batch of the current step had a non-finite loss.
    poisoned: Option<String>,
    consecutive_skips: usize,
    step_start: Instant,
    step_tokens: usize,
    /// Optimiser steps done when this invocation started (for `--stop-after`).
    first_step: usize,
    /// What every checkpoint records about the run (set by `start`).
    record: Option<RunRecord>,
}

impl Trainer {
    /// Sets up the run folder. With `resume`, restores the newest checkpoint (weights,
    /// optimiser, dropout stream) and returns its state for the caller's data position.
    pub fn new(
        model: Llama,
        optim_cfg: &OptimConfig,
        cfg: &TrainSection,
        resume: bool,
        what: &str,
    ) -> Result<(Self, Option<CheckpointState>)> {
        cfg.validate()?;
        optim_cfg.validate()?;
        if model.vars().is_empty() {
            bail!("the model has no trainable parameters");
        }
        let positions = model.cfg.max_position_embeddings;
        if cfg.max_len > positions {
            bail!(
                "train.max_len = {} exceeds the model's max_position_embeddings ({positions})",
                cfg.max_len
            );
        }
        let run_dir = cfg.out.clone();
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("cannot create run folder {}", run_dir.display()))?;
        let mut optim = AdamW::new(model.vars().to_vec(), optim_cfg.clone(), cfg.steps)?;
        let state = if resume {
            match checkpoint::latest(&run_dir)? {
                Some(dir) => {
                    // A kill between writing `latest` and pruning left older checkpoints.
                    checkpoint::finish_pruning(&run_dir, &dir, cfg.keep_checkpoints)?;
                    Some(checkpoint::load(&dir, &model, &mut optim)?)
                }
                None => bail!("--resume: {} has no checkpoint", run_dir.display()),
            }
        } else {
            if checkpoint::latest(&run_dir)?.is_some() {
                bail!(
                    "{} already holds checkpoints of a run: pass --resume to continue it, or choose another train.out",
                    run_dir.display()
                );
            }
            None
        };
        let metrics = MetricsLog::open(&run_dir, state.as_ref().map(|s| s.step))?;
        let progress = progress_bar(cfg.steps as u64, what);
        progress.set_position(optim.steps_done() as u64);
        let acc = optim.new_accumulator();
        let mut trainer = Self {
            model,
            optim,
            acc,
            cfg: cfg.clone(),
            run_dir,
            metrics,
            progress,
            poisoned: None,
            consecutive_skips: 0,
            step_start: Instant::now(),
            step_tokens: 0,
            first_step: 0,
            record: None,
        };
        trainer.first_step = trainer.step();
        Ok((trainer, state))
    }

    /// `new`, plus what every trainer does next: refuse to resume a different run (see
    /// `resume`), write the resolved config into the run folder and read back the
    /// checkpoint's data position (None for a fresh run).
    pub fn start<D: serde::de::DeserializeOwned, C: RunConfig + serde::de::DeserializeOwned>(
        model: Llama,
        optim_cfg: &OptimConfig,
        cfg: &TrainSection,
        resume: bool,
        what: &str,
        resolved: &C,
    ) -> Result<(Self, Option<D>)> {
        let record = RunRecord::of(resolved)?;
        if resume {
            if let Some(dir) = checkpoint::latest(&cfg.out)? {
                let state = checkpoint::read_state(&dir)?;
                let old = state.run.map(RunRecord::with_defaults::<C>);
                record.check_continues(old.as_ref(), state.step, &dir)?;
            }
        }
        let (mut trainer, state) = Self::new(model, optim_cfg, cfg, resume, what)?;
        trainer.record = Some(record);
        super::config::write_resolved(&trainer.run_dir, resolved)?;
        let data = match state {
            Some(s) => {
                Some(serde_json::from_value(s.data).context("the checkpoint's data position")?)
            }
            None => None,
        };
        Ok((trainer, data))
    }

    /// Optimiser steps completed.
    pub fn step(&self) -> usize {
        self.optim.steps_done()
    }

    pub fn done(&self) -> bool {
        self.step() >= self.cfg.steps
    }

    /// Backpropagates one micro-batch's loss (scaled by 1/grad_accum) into the accumulator.
    /// `tokens` counts what the micro-batch processed, for tokens/s.
    pub fn accumulate(&mut self, loss: &Tensor, tokens: usize) -> Result<()> {
        self.step_tokens += tokens;
        let value: f32 = loss.to_dtype(candle_core::DType::F32)?.to_scalar()?;
        if !value.is_finite() {
            self.poisoned = Some(format!("non-finite loss ({value})"));
            return Ok(());
        }
        if self.poisoned.is_some() {
            return Ok(());
        }
        let grads = loss.backward()?;
        self.acc.add(
            self.optim.params(),
            &grads,
            1.0 / self.cfg.grad_accum as f64,
        )
    }

    /// Marks the current step non-finite for a reason found outside the loss (a NaN
    /// log-probability): `finish_step` then skips or aborts it under `train.on_nonfinite`,
    /// exactly as for a non-finite loss.
    pub fn mark_nonfinite(&mut self, why: String) {
        self.poisoned.get_or_insert(why);
    }

    /// Ends the step: applies the update (or skips / aborts on non-finite values), logs one
    /// metrics line with `extra`, and advances the progress bar. Returns None when skipped.
    pub fn finish_step(&mut self, mut extra: Map<String, Value>) -> Result<Option<StepStats>> {
        let step = self.step() + 1;
        let outcome = match self.poisoned.take() {
            Some(why) => {
                self.acc.clear();
                Err(why)
            }
            None => match self.optim.step(&mut self.acc) {
                Ok(stats) => Ok(stats),
                Err(e) => match e.downcast_ref::<OptimError>() {
                    Some(oe) => Err(oe.to_string()),
                    None => return Err(e),
                },
            },
        };
        let secs = self.step_start.elapsed().as_secs_f64();
        let tokens = std::mem::take(&mut self.step_tokens);
        self.step_start = Instant::now();
        match outcome {
            Ok(stats) => {
                self.consecutive_skips = 0;
                extra.insert("step".into(), json!(step));
                extra.insert("lr".into(), json!(stats.lr));
                extra.insert("grad_norm".into(), json!(stats.grad_norm));
                extra.insert("tokens_per_s".into(), json!(tokens as f64 / secs.max(1e-9)));
                extra.insert("step_seconds".into(), json!(secs));
                self.metrics.log(&Value::Object(extra.clone()))?;
                if let Some(loss) = extra.get("loss").and_then(Value::as_f64) {
                    self.progress.set_message(format!("loss {loss:.4}"));
                }
                self.progress.set_position(step as u64);
                Ok(Some(stats))
            }
            Err(why) => {
                let msg = format!("step {step}: {why}");
                match self.cfg.on_nonfinite {
                    OnNonFinite::Abort => bail!(
                        "{msg}; stopping (train.on_nonfinite = \"abort\"); the last checkpoint in {} is intact",
                        self.run_dir.display()
                    ),
                    OnNonFinite::Skip => {
                        self.consecutive_skips += 1;
                        self.metrics.log(&json!({"step": step - 1, "skipped": msg}))?;
                        self.progress.println(format!("skipped {msg}"));
                        if self.consecutive_skips >= MAX_CONSECUTIVE_SKIPS {
                            bail!("{MAX_CONSECUTIVE_SKIPS} consecutive steps were non-finite; stopping");
                        }
                        Ok(None)
                    }
                }
            }
        }
    }

    /// With `--stop-after N`: once this invocation has taken N steps, writes a checkpoint
    /// (holding `data`) and returns true; the run continues later with `--resume`.
    pub fn stop_requested(&mut self, stop_after: Option<usize>, data: Value) -> Result<bool> {
        if stop_after.is_none_or(|n| self.step() - self.first_step < n) {
            return Ok(false);
        }
        self.maybe_checkpoint(data, Value::Null, true)?;
        self.progress
            .abandon_with_message("stopped; continue with --resume");
        Ok(true)
    }

    /// Logs a line that is not a training step (evaluation, sampling statistics).
    pub fn log(&mut self, record: Value) -> Result<()> {
        self.metrics.log(&record)
    }

    /// Writes a checkpoint when one is due after the current step (or `force`).
    pub fn maybe_checkpoint(
        &mut self,
        data: Value,
        extra: Value,
        force: bool,
    ) -> Result<Option<PathBuf>> {
        let step = self.step();
        let due = self.cfg.save_every > 0 && step > 0 && step.is_multiple_of(self.cfg.save_every);
        if !(due || force) {
            return Ok(None);
        }
        let state = CheckpointState {
            step,
            data,
            lora_rng: self
                .model
                .lora_context()
                .map(|c| c.rng_state())
                .transpose()?,
            extra,
            run: self.record.clone(),
        };
        let keep = self.cfg.keep_checkpoints;
        checkpoint::save(&self.run_dir, &self.model, &self.optim, &state, keep).map(Some)
    }

    /// Whether an evaluation is due after the current step.
    pub fn eval_due(&self) -> bool {
        let step = self.step();
        self.done()
            || (self.cfg.eval_every > 0 && step > 0 && step.is_multiple_of(self.cfg.eval_every))
    }

    pub fn metrics_path(&self) -> &Path {
        self.metrics.path()
    }
}

/// Position in a shuffled dataset: each epoch is a fresh permutation from (seed, epoch), so
/// the position alone restores the order on resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataCursor {
    pub epoch: u64,
    pub pos: usize,
    pub seed: u64,
}

impl DataCursor {
    pub fn new(seed: u64) -> Self {
        Self {
            epoch: 0,
            pos: 0,
            seed,
        }
    }

    fn order(&self, n: usize) -> Vec<usize> {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        let mut idx: Vec<usize> = (0..n).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            self.seed ^ self.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        idx.shuffle(&mut rng);
        idx
    }

    /// The next `k` indices into a dataset of `n` items, wrapping into a new epoch.
    pub fn next_batch(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(k);
        let mut order = self.order(n);
        while out.len() < k && n > 0 {
            if self.pos >= n {
                self.epoch += 1;
                self.pos = 0;
                order = self.order(n);
            }
            out.push(order[self.pos]);
            self.pos += 1;
        }
        out
    }
}
