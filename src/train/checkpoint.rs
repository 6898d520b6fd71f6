//! Checkpoints: trainable weights, optimiser moments, random-stream states, data position and
//! step, written so that a crash at any moment leaves the last complete checkpoint intact.
//!
//! Layout: `RUN/checkpoints/step-00000010/{trainable.safetensors, optimizer.safetensors,
//! state.json}`. A checkpoint is assembled in a temporary folder, every file fsynced, then the
//! folder is renamed into place and `RUN/checkpoints/latest` (a one-line file naming it) is
//! replaced atomically. Resuming reads `latest`, so a half-written folder is never used.
use super::optim::AdamW;
use crate::io::{atomic_write, save_json, save_safetensors, sync_dir};
use crate::model::Llama;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Everything besides tensors that a resumed run needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Optimiser steps completed.
    pub step: usize,
    /// The trainer's data position (trainer-specific).
    pub data: Value,
    /// The LoRA dropout random stream, when the model has adapters.
    pub lora_rng: Option<Value>,
    /// Anything else the trainer keeps (sampling streams, counters).
    #[serde(default)]
    pub extra: Value,
    /// The command, method and resolved config of the run (checked by `--resume`).
    #[serde(default)]
    pub run: Option<super::resume::RunRecord>,
}

fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// Writes a checkpoint for `state.step` and keeps only the newest `keep` of them.
pub fn save(
    run_dir: &Path,
    model: &Llama,
    optim: &AdamW,
    state: &CheckpointState,
    keep: usize,
) -> Result<PathBuf> {
    let root = checkpoints_dir(run_dir);
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let name = format!("step-{:08}", state.step);
    let final_dir = root.join(&name);
    let tmp = root.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    let trainable: Vec<_> = model
        .vars()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    save_safetensors(&tmp.join("trainable.safetensors"), &trainable)?;
    save_safetensors(&tmp.join("optimizer.safetensors"), &optim.state_tensors()?)?;
    save_json(&tmp.join("state.json"), state)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("cannot move checkpoint to {}", final_dir.display()))?;
    sync_dir(&root)?;
    atomic_write(&root.join("latest"), format!("{name}\n").as_bytes())?;
    prune(&root, &name, keep)?;
    Ok(final_dir)
}

/// Completes the pruning of a run killed after it wrote its `latest` checkpoint (`newest`)
/// and before it removed the older ones.
pub fn finish_pruning(run_dir: &Path, newest: &Path, keep: usize) -> Result<()> {
    let name = newest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    prune(&checkpoints_dir(run_dir), &name, keep)
}

fn prune(root: &Path, newest: &str, keep: usize) -> Result<()> {
    // A process killed while replacing `latest` leaves its `.latest.tmpPID`; a resumed run
    // that writes no checkpoint would otherwise keep it.
    crate::io::remove_stale_temps(root, "latest");
    let mut names: Vec<String> = std::fs::read_dir(root)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    names.sort();
    let excess = names.len().saturating_sub(keep.max(1));
    for n in names.iter().take(excess).filter(|n| n.as_str() != newest) {
        std::fs::remove_dir_all(root.join(n))?;
    }
    Ok(())
}

/// The newest complete checkpoint of a run, if any.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    let root = checkpoints_dir(run_dir);
    let pointer = root.join("latest");
    if !pointer.exists() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&pointer)
        .with_context(|| format!("cannot read {}", pointer.display()))?;
    let dir = root.join(name.trim());
    if !dir.join("state.json").exists() {
        bail!(
            "{} names {}, which is incomplete or missing",
            pointer.display(),
            dir.display()
        );
    }
    Ok(Some(dir))
}

/// The state of the checkpoint in `dir` (no tensors).
pub fn read_state(dir: &Path) -> Result<CheckpointState> {
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path)
        .with_context(|| format!("cannot read {}", state_path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a checkpoint state", state_path.display()))
}

/// Restores weights, optimiser and the LoRA dropout stream from `dir`; returns the state.
pub fn load(dir: &Path, model: &Llama, optim: &mut AdamW) -> Result<CheckpointState> {
    let state = read_state(dir)?;
    let read = |f: &str| -> Result<HashMap<String, candle_core::Tensor>> {
        Ok(
            crate::model::load::read_safetensors(&dir.join(f), model.device())?
                .into_iter()
                .collect(),
        )
    };
    model.load_vars(
        &read("trainable.safetensors")?,
        &dir.join("trainable.safetensors").display().to_string(),
    )?;
    optim.load_state(&read("optimizer.safetensors")?, state.step)?;
    match (&state.lora_rng, model.lora_context()) {
        (Some(rng), Some(ctx)) => ctx.set_rng_state(rng)?,
        (None, None) => {}
        _ => {
            return Err(anyhow!(
                "{}: the checkpoint and the model disagree on LoRA",
                dir.display()
            ))
        }
    }
    Ok(state)
}
