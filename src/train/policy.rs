//! Loading the model a run trains and saving what it trained: every trainer starts and ends
//! here (SFT, preference augmentation, offline and online preference training, reward models).
use super::config::{ModelSection, TrainMode};
use crate::lora::LoraConfig;
use crate::model::{load_model, Llama, LoadedModel, Trainable};
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// Loads the model a run trains: fresh LoRA adapters, the adapters of `model.adapter`, or
/// every weight trainable. With `merge_start`, a starting adapter is merged into the base and
/// fresh adapters train on top, so that πref (adapters off) is the starting model.
pub fn load_policy(
    m: &ModelSection,
    lora: &LoraConfig,
    seed: u64,
    merge_start: bool,
) -> Result<LoadedModel> {
    let device = crate::device(&m.device)?;
    let fresh = match m.train {
        TrainMode::Full => Trainable::All,
        TrainMode::Lora => Trainable::Lora {
            config: lora.clone(),
            seed,
        },
    };
    let Some(dir) = &m.adapter else {
        return load_model(&m.path, m.tokenizer.as_deref(), &device, fresh);
    };
    let adapter = Trainable::Lora {
        config: LoraConfig::from_peft_dir(dir)?,
        seed,
    };
    if !merge_start && m.train == TrainMode::Full {
        bail!("model.adapter with model.train = \"full\" needs the adapter merged first (osp export --merge)");
    }
    let lm = load_model(&m.path, m.tokenizer.as_deref(), &device, adapter)?;
    crate::model::load_adapter(&lm.model, dir)?;
    if !merge_start {
        return Ok(lm);
    }
    let merged = lm.model.merged()?;
    let weights = crate::model::Weights::new(
        merged.named_tensors().into_iter().collect(),
        format!("{} + {}", m.path.display(), dir.display()),
    );
    let model = Llama::new(&lm.model.cfg, weights, fresh)?;
    Ok(LoadedModel {
        model,
        tokenizer: lm.tokenizer,
        source: lm.source,
    })
}

/// Saves what a run trained: a PEFT adapter folder (`RUN/adapter`) or a full Hugging Face
/// model folder (`RUN/model`), written whole or not at all (see `io::write_dir_atomically`).
pub fn save_trained(
    model: &Llama,
    tok: &crate::tokenizer::Tokenizer,
    m: &ModelSection,
    run_dir: &Path,
) -> Result<PathBuf> {
    if model.lora_config().is_some() {
        let dir = run_dir.join("adapter");
        crate::io::write_dir_atomically(&dir, |tmp| {
            crate::model::save_adapter(model, tmp, &m.path.display().to_string())
        })?;
        Ok(dir)
    } else {
        let dir = run_dir.join("model");
        crate::io::write_dir_atomically(&dir, |tmp| {
            crate::model::export::save_hf_model(model, tok, Some(&m.path), tmp)
        })?;
        Ok(dir)
    }
}
