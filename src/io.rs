//! Crash-safe file writing: a file is either its old version or its complete new one.
use anyhow::{Context, Result};
use candle_core::Tensor;
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` through a temporary file in the same folder, fsynced and renamed
/// over the target, then fsyncs the folder so the rename itself survives a crash.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    remove_stale_temps(dir, &name);
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(dir)
    };
    write()
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Removes `.NAME.tmpPID` files that a killed writer left beside `NAME` (a kill between
/// create and rename). Only temps of processes that are gone are removed, so a live writer's
/// file is never touched; without /proc nothing is removed.
pub(crate) fn remove_stale_temps(dir: &Path, name: &str) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let prefix = format!(".{name}.tmp");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(pid) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Writes a whole folder the way checkpoints are written: `fill` writes into a temporary
/// sibling (`.NAME.tmp`), every file in it is fsynced, and it is renamed to `dir`. An
/// existing `dir` is moved aside to `.NAME.old` first and removed after, so a crash leaves
/// the old folder or the complete new one (between the two renames, the old one under
/// `.NAME.old`), never a mixture.
pub fn write_dir_atomically(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dir
        .file_name()
        .with_context(|| format!("{} does not name a folder", dir.display()))?
        .to_string_lossy()
        .into_owned();
    let (tmp, old) = (
        parent.join(format!(".{name}.tmp")),
        parent.join(format!(".{name}.old")),
    );
    let fresh = |p: &Path| -> Result<()> {
        if p.exists() {
            std::fs::remove_dir_all(p).with_context(|| format!("cannot remove {}", p.display()))?;
        }
        Ok(())
    };
    fresh(&tmp)?;
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let written = fill(&tmp).and_then(|()| {
        for e in std::fs::read_dir(&tmp)? {
            let p = e?.path();
            if p.is_file() {
                std::fs::File::open(&p)
                    .and_then(|f| f.sync_all())
                    .with_context(|| format!("cannot sync {}", p.display()))?;
            }
        }
        Ok(sync_dir(&tmp)?)
    });
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let replace = || -> std::io::Result<()> {
        if dir.exists() {
            if old.exists() {
                std::fs::remove_dir_all(&old)?;
            }
            std::fs::rename(dir, &old)?;
        }
        std::fs::rename(&tmp, dir)?;
        sync_dir(parent)?;
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        Ok(())
    };
    replace().with_context(|| format!("cannot move {} into place", dir.display()))
}

/// fsync a folder, so renames and new entries in it are durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Serialises named f32 tensors in safetensors format (atomically); names are kept in order.
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    for (name, t) in tensors {
        anyhow::ensure!(
            t.elem_count() > 0,
            "refusing to save zero-sized tensor `{name}`"
        );
    }
    let contiguous: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| {
            Ok((
                n.clone(),
                t.detach()
                    .contiguous()?
                    .to_device(&candle_core::Device::Cpu)?,
            ))
        })
        .collect::<Result<_>>()?;
    let bytes =
        safetensors::tensor::serialize(contiguous.iter().map(|(n, t)| (n.as_str(), t)), None)
            .with_context(|| format!("cannot serialise tensors for {}", path.display()))?;
    atomic_write(path, &bytes)
}

/// Writes pretty JSON atomically.
pub fn save_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    atomic_write(path, text.as_bytes())
}
