//! PEFT adapter folders (`adapter_config.json`, `adapter_model.safetensors`) for a model's
//! LoRA adapters. Here rather than in `lora`, which defines the adapters and needs nothing of
//! the model, so that `lora` and `model` do not import each other.
use super::Llama;
use crate::lora::LoraConfig;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Reads `adapter_model.safetensors` from an adapter folder.
pub fn read_adapter_tensors(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let path = dir.join("adapter_model.safetensors");
    if !path.exists() {
        bail!("{} is missing (a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors)", path.display());
    }
    let tensors = super::load::read_safetensors(&path, device)?;
    // PEFT versions differ on whether the adapter name appears (`lora_A.default.weight`).
    Ok(tensors
        .into_iter()
        .map(|(n, t)| (n.replace(".default.weight", ".weight"), t))
        .collect())
}

/// Writes the model's adapters as a PEFT adapter folder: `adapter_config.json` and
/// `adapter_model.safetensors` (f32, tensors `base_model.model.<module>.lora_{A,B}.weight`).
pub fn save_adapter(model: &Llama, dir: &Path, base_model: &str) -> Result<()> {
    let cfg = model
        .lora_config()
        .ok_or_else(|| anyhow!("the model has no LoRA adapters to save"))?;
    let tensors: Vec<(String, Tensor)> = model
        .vars()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    crate::io::save_safetensors(&dir.join("adapter_model.safetensors"), &tensors)?;
    crate::io::save_json(
        &dir.join("adapter_config.json"),
        &cfg.to_peft_json(base_model),
    )
}

/// Fills the model's adapters from a PEFT adapter folder. The model must have been built
/// with the folder's `LoraConfig` (see `LoraConfig::from_peft_dir`).
pub fn load_adapter(model: &Llama, dir: &Path) -> Result<()> {
    let cfg = LoraConfig::from_peft_dir(dir)?;
    let mine = model
        .lora_config()
        .ok_or_else(|| anyhow!("the model was built without LoRA adapters"))?;
    let same = mine.r == cfg.r
        && mine.use_rslora == cfg.use_rslora
        && mine.lora_alpha == cfg.lora_alpha
        && {
            let (mut a, mut b) = (mine.target_modules.clone(), cfg.target_modules.clone());
            a.sort();
            b.sort();
            a == b
        };
    if !same {
        bail!(
            "{}: adapter config {cfg:?} differs from the model's {mine:?}",
            dir.display()
        );
    }
    let tensors = read_adapter_tensors(dir, model.device())?;
    model.load_vars(
        &tensors,
        &dir.join("adapter_model.safetensors").display().to_string(),
    )
}
