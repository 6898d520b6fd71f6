//! What `--resume` may continue. Every checkpoint records the command, the method and the
//! resolved config of its run; resuming with another command or method, or with a changed
//! field that changes the run, is refused with the changed fields listed.
//!
//! Fields that do not change what is trained may differ: where the run folder is
//! (`train.out`), how often it checkpoints or evaluates, the device, and the non-finite
//! policy (so that a run stopped by a NaN can go on with `skip`). `train.steps` may grow,
//! or shrink down to the step already finished.
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// Config fields that may change on `--resume` (dotted paths). `train.steps` is checked
/// on its own.
pub const RESUMABLE_CHANGES: [&str; 6] = [
    "train.out",
    "train.save_every",
    "train.keep_checkpoints",
    "train.eval_every",
    "train.on_nonfinite",
    "model.device",
];

/// A run's configuration as a trainer sees it: the command that runs it, its method, and the
/// resolved config itself (written to `config.toml` and into every checkpoint).
pub trait RunConfig: Serialize {
    /// `sft`, `judge-train` or `train`.
    fn command(&self) -> &'static str;
    /// The method of an `osp train` run (its kebab-case name); None for the other commands.
    fn method(&self) -> Option<String> {
        None
    }
}

/// The identity of a run, stored in each checkpoint's `state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub command: String,
    pub method: Option<String>,
    /// The resolved config as JSON.
    pub config: Value,
}

impl RunRecord {
    pub fn of(cfg: &impl RunConfig) -> Result<Self> {
        Ok(Self {
            command: cfg.command().to_string(),
            method: cfg.method(),
            config: serde_json::to_value(cfg)?,
        })
    }

    /// `osp train --method dpo`, `osp sft`: how the run was started, for messages.
    fn invocation(&self) -> String {
        match &self.method {
            Some(m) => format!("osp {} --method {m}", self.command),
            None => format!("osp {}", self.command),
        }
    }

    /// The record with the fields an older osp did not write (a section added since) at
    /// today's defaults: the config read back through its type and written again. Unchanged
    /// when it does not read back.
    pub fn with_defaults<C: RunConfig + serde::de::DeserializeOwned>(mut self) -> Self {
        let read = serde_json::from_value::<C>(self.config.clone())
            .map_err(anyhow::Error::from)
            .and_then(|c| Ok(serde_json::to_value(&c)?));
        if let Ok(v) = read {
            self.config = v;
        }
        self
    }

    /// Refuses to continue `recorded` (the checkpoint's run, `done` steps finished, in
    /// `checkpoint`) as `self`, with every reason: another command or method, changed
    /// fields, or fewer steps than are done.
    pub fn check_continues(
        &self,
        recorded: Option<&RunRecord>,
        done: usize,
        checkpoint: &Path,
    ) -> Result<()> {
        let Some(old) = recorded else {
            bail!(
                "--resume: {} has no record of the run that wrote it (an older osp); \
                 start a new run instead",
                checkpoint.display()
            );
        };
        if (old.command.as_str(), &old.method) != (self.command.as_str(), &self.method) {
            bail!(
                "--resume: {} holds a `{}` run; it cannot be continued by `{}`",
                checkpoint.display(),
                old.invocation(),
                self.invocation()
            );
        }
        let changed: Vec<String> = changed_fields(&old.config, &self.config)
            .into_iter()
            .filter(|(k, _, _)| k != "train.steps" && !RESUMABLE_CHANGES.contains(&k.as_str()))
            .map(|(k, was, now)| format!("{k}: {was} -> {now}"))
            .collect();
        if !changed.is_empty() {
            bail!(
                "--resume: the config differs from the run in {} in fields that change the run \
                 (only {} and train.steps may change):\n  {}",
                checkpoint.display(),
                RESUMABLE_CHANGES.join(", "),
                changed.join("\n  ")
            );
        }
        let steps = self.config.pointer("/train/steps").and_then(Value::as_u64);
        if let Some(steps) = steps.filter(|&s| (s as usize) < done) {
            bail!(
                "--resume: train.steps = {steps} is below the {done} steps this run has finished \
                 ({})",
                checkpoint.display()
            );
        }
        Ok(())
    }
}

/// Leaves of a JSON object by dotted path (arrays are leaves).
fn flatten(v: &Value, prefix: &str, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(x, &key, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

/// (path, old value, new value) of every leaf that differs; an absent leaf shows as null.
pub fn changed_fields(old: &Value, new: &Value) -> Vec<(String, Value, Value)> {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten(old, "", &mut a);
    flatten(new, "", &mut b);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter_map(|k| {
            let (x, y) = (
                a.get(k).cloned().unwrap_or(Value::Null),
                b.get(k).cloned().unwrap_or(Value::Null),
            );
            (x != y).then(|| (k.clone(), x, y))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Cfg(Value, Option<&'static str>);
    impl Serialize for Cfg {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            self.0.serialize(s)
        }
    }
    impl RunConfig for Cfg {
        fn command(&self) -> &'static str {
            if self.1.is_some() {
                "train"
            } else {
                "sft"
            }
        }
        fn method(&self) -> Option<String> {
            self.1.map(str::to_string)
        }
    }

    fn rec(v: Value, m: Option<&'static str>) -> RunRecord {
        RunRecord::of(&Cfg(v, m)).unwrap()
    }

    #[test]
    fn changes_that_change_the_run_are_listed() {
        let old = rec(
            json!({"train": {"steps": 10, "seed": 0, "out": "a"}, "lora": {"r": 8}}),
            Some("osp"),
        );
        let p = Path::new("ck");
        // Moving the folder and adding steps is fine.
        let ok = rec(
            json!({"train": {"steps": 20, "seed": 0, "out": "b"}, "lora": {"r": 8}}),
            Some("osp"),
        );
        ok.check_continues(Some(&old), 10, p).unwrap();
        let bad = rec(
            json!({"train": {"steps": 10, "seed": 1, "out": "a"}, "lora": {"r": 4}}),
            Some("osp"),
        );
        let e = bad
            .check_continues(Some(&old), 5, p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("train.seed: 0 -> 1") && e.contains("lora.r: 8 -> 4"),
            "{e}"
        );
        let e = rec(old.config.clone(), Some("dpo"))
            .check_continues(Some(&old), 5, p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("osp train --method osp") && e.contains("--method dpo"),
            "{e}"
        );
        let e = rec(old.config.clone(), None)
            .check_continues(Some(&old), 5, p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`osp sft`"), "{e}");
        let short = rec(
            json!({"train": {"steps": 4, "seed": 0, "out": "a"}, "lora": {"r": 8}}),
            Some("osp"),
        );
        let e = short
            .check_continues(Some(&old), 5, p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("train.steps = 4 is below the 5 steps"), "{e}");
        short.check_continues(Some(&old), 4, p).unwrap();
        assert!(old.check_continues(None, 1, p).is_err());
    }
}
