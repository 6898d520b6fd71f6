//! Writing Hugging Face model folders that transformers loads.
use super::Llama;
use crate::io::{save_json, save_safetensors};
use crate::tokenizer::Tokenizer;
use anyhow::{Context, Result};
use std::path::Path;

/// Tokenizer and generation files copied from the base model folder when present.
const SIDE_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
];

/// Writes `config.json`, `model.safetensors` (adapters merged in) and the base folder's
/// tokenizer files into `out`.
pub fn save_hf_model(
    model: &Llama,
    tok: &Tokenizer,
    base: Option<&Path>,
    out: &Path,
) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let merged = model.merged()?;
    save_safetensors(&out.join("model.safetensors"), &merged.named_tensors())?;
    let mut cfg = model.cfg.to_hf_json();
    if cfg["bos_token_id"].is_null() {
        cfg["bos_token_id"] = tok.bos_id().into();
    }
    save_json(&out.join("config.json"), &cfg)?;
    copy_tokenizer_files(base, out)
}

/// Copies the base folder's tokenizer and generation files into `out`; for a GGUF base,
/// writes the tokenizer.json and tokenizer_config.json (chat template included) its metadata
/// describes (a no-op for a llama2.c base, with a note when `out` ends up without a
/// tokenizer.json).
pub fn copy_tokenizer_files(base: Option<&Path>, out: &Path) -> Result<()> {
    if let Some(base) = base.filter(|b| crate::gguf::is_gguf(b)) {
        let g = crate::gguf::GgufFile::open(base)?;
        let files = crate::gguf::vocab::hf_tokenizer_files(&g)?;
        save_json(&out.join("tokenizer.json"), &files.tokenizer_json)?;
        save_json(&out.join("tokenizer_config.json"), &files.tokenizer_config)?;
        return Ok(());
    }
    let mut copied = 0;
    // Copying a folder's files onto themselves would truncate them.
    let same = |b: &Path| std::fs::canonicalize(b).ok() == std::fs::canonicalize(out).ok();
    if let Some(base) = base.filter(|b| b.is_dir() && !same(b)) {
        for f in SIDE_FILES {
            let src = base.join(f);
            if src.exists() {
                std::fs::copy(&src, out.join(f))
                    .with_context(|| format!("cannot copy {}", src.display()))?;
                copied += 1;
            }
        }
    }
    if copied == 0 && !out.join("tokenizer.json").exists() {
        eprintln!(
            "note: no Hugging Face tokenizer files to copy into {} (a llama2.c tokenizer has no tokenizer.json form)",
            out.display()
        );
    }
    Ok(())
}

/// Refuses to export onto an existing, non-empty `out` (a model folder it would overwrite)
/// unless `force`.
pub fn check_export_target(out: &Path, force: bool) -> Result<()> {
    let occupied = if out.is_dir() {
        std::fs::read_dir(out)
            .with_context(|| format!("cannot read {}", out.display()))?
            .next()
            .is_some()
    } else {
        out.exists()
    };
    if occupied && !force {
        anyhow::bail!(
            "{} already exists and is not empty; refusing to overwrite it (pass --force to replace it)",
            out.display()
        );
    }
    Ok(())
}

/// `osp export --merge`: the merged model written to `out` whole or not at all (a previous
/// `out` is replaced only once the new folder is complete).
pub fn export_merged(
    model: &Llama,
    tok: &Tokenizer,
    base: &Path,
    out: &Path,
    force: bool,
) -> Result<()> {
    check_export_target(out, force)?;
    crate::io::write_dir_atomically(out, |tmp| save_hf_model(model, tok, Some(base), tmp))
}
