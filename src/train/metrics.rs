//! Per-step metrics: one JSON object per line in the run folder, and a terminal progress bar.
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

/// Appends JSON lines to `metrics.jsonl`.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens the log. On resume from `resume_step`, lines of later steps (written after the
    /// checkpoint, before a crash) are dropped, since those steps are about to run again.
    pub fn open(run_dir: &Path, resume_step: Option<usize>) -> Result<Self> {
        let path = run_dir.join("metrics.jsonl");
        if let Some(step) = resume_step {
            if path.exists() {
                let f = std::fs::File::open(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                let mut kept = String::new();
                for line in std::io::BufReader::new(f).lines() {
                    let line = line?;
                    // A line that does not parse was cut short by a kill mid-append: drop it
                    // with the steps that run again.
                    let Ok(v) = serde_json::from_str::<Value>(&line) else {
                        continue;
                    };
                    let s = v.get("step").and_then(Value::as_u64);
                    if s.is_none_or(|s| s as usize <= step) {
                        kept.push_str(&line);
                        kept.push('\n');
                    }
                }
                crate::io::atomic_write(&path, kept.as_bytes())?;
            }
        } else if path.exists() {
            std::fs::remove_file(&path)
                .with_context(|| format!("cannot replace {}", path.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Self { path, file })
    }

    pub fn log(&mut self, record: &Value) -> Result<()> {
        let mut line = serde_json::to_string(record)?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .with_context(|| format!("cannot append to {}", self.path.display()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A progress bar with ETA on stderr (hidden automatically when stderr is not a terminal).
pub fn progress_bar(total: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    let style =
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed} < {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
    pb.set_style(style);
    pb.set_prefix(what.to_string());
    pb
}

/// Reads a metrics file back (for reports and tests).
pub fn read_metrics(path: &Path) -> Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))
        })
        .collect()
}
