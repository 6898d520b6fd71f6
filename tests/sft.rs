//! SFT end to end on the real stories260K model: eval loss falls, a run interrupted and
//! resumed ends with the same weights, and bad data or non-finite values are handled.
mod common;
use common::*;
use osp::train::sft::{run_sft, SftConfig};
use std::path::{Path, PathBuf};

const COLORS: [(&str, &str); 8] = [
    ("ball", "red"),
    ("cat", "black"),
    ("sky", "blue"),
    ("grass", "green"),
    ("sun", "yellow"),
    ("snow", "white"),
    ("dog", "brown"),
    ("frog", "green"),
];

/// A small task the base model does not know: "The X was" → " C." for a fixed colour map.
fn write_data(dir: &Path, malformed: bool) -> PathBuf {
    let mut lines = vec![];
    for i in 0..64 {
        let (obj, color) = COLORS[i % COLORS.len()];
        let names = ["Lily", "Tom", "Sue", "Ben"];
        let prompt = format!("{} saw the {obj}. The {obj} was", names[i / 8 % 4]);
        lines.push(
            serde_json::json!({"prompt": prompt, "completion": format!(" {color}.")}).to_string(),
        );
        if malformed && i == 10 {
            lines.push("{\"prompt\": \"broken".to_string());
            lines.push("{\"prompt\": 3, \"completion\": \"x\"}".to_string());
        }
    }
    let p = dir.join("train.jsonl");
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn config(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> SftConfig {
    let mut set: Vec<String> = vec![
        format!("model.path={:?}", model.display().to_string()),
        format!("data.train={:?}", data.display().to_string()),
        format!("train.out={:?}", out.display().to_string()),
        "train.steps=24".into(),
        "train.batch_size=8".into(),
        "train.eval_every=8".into(),
        "train.save_every=4".into(),
        "data.eval_fraction=0.25".into(),
        "lora.r=4".into(),
        "lora.lora_dropout=0.1".into(),
        "optim.lr=0.01".into(),
        "optim.warmup_steps=2".into(),
    ];
    set.extend(extra.iter().map(|s| s.to_string()));
    SftConfig::load(None, &set).unwrap()
}

fn adapter_tensors(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let mut v: Vec<(String, Vec<f32>)> = osp::model::load::read_safetensors(
        &dir.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap()
    .into_iter()
    .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1().unwrap()))
    .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn lora_sft_lowers_eval_loss() {
    let Some(model) = shared_data("models/stories260K/stories260K.bin") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path(), false);
    let cfg = config(&model, &data, &tmp.path().join("run"), &[]);
    let out = run_sft(&cfg, false, None).unwrap();
    let (first, last) = (out.eval_losses[0], *out.eval_losses.last().unwrap());
    assert_eq!(first.0, 0);
    assert_eq!(last.0, 24);
    assert!(last.1 < 0.6 * first.1, "eval loss {first:?} → {last:?}");
    // The run folder has what it promises.
    let run = tmp.path().join("run");
    let cfg_back: SftConfig =
        osp::train::config::load_config(Some(&run.join("config.toml")), &[]).unwrap();
    assert_eq!(cfg_back.train.steps, 24);
    let metrics = osp::train::metrics::read_metrics(&run.join("metrics.jsonl")).unwrap();
    let steps: Vec<&serde_json::Value> =
        metrics.iter().filter(|m| m.get("loss").is_some()).collect();
    assert_eq!(steps.len(), 24);
    for m in &steps {
        for k in ["loss", "lr", "grad_norm", "tokens_per_s", "step"] {
            assert!(m[k].as_f64().is_some_and(f64::is_finite), "{k} in {m}");
        }
    }
    assert_eq!(
        steps[0]["lr"], 0.0,
        "first warm-up step has lr 0, as in transformers"
    );
    assert!(out.output.join("adapter_config.json").exists());
    // The adapter loads as a PEFT adapter and changes the model.
    assert!(adapter_tensors(&out.output)
        .iter()
        .any(|(n, v)| n.contains("lora_B") && v.iter().any(|x| *x != 0.0)));
}

#[test]
fn interrupted_and_resumed_run_ends_with_the_same_weights() {
    let Some(model) = shared_data("models/stories260K/stories260K.bin") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path(), false);
    let straight = run_sft(
        &config(&model, &data, &tmp.path().join("a"), &["train.steps=10"]),
        false,
        None,
    )
    .unwrap();
    let cfg_b = config(
        &model,
        &data,
        &tmp.path().join("b"),
        &["train.steps=10", "train.save_every=3"],
    );
    let stopped = run_sft(&cfg_b, false, Some(5)).unwrap();
    assert!(stopped.output.as_os_str().is_empty());
    // A crash while writing the next checkpoint leaves a temporary folder behind: ignored.
    let junk = tmp.path().join("b/checkpoints/.step-00000006.tmp");
    std::fs::create_dir_all(&junk).unwrap();
    std::fs::write(junk.join("state.json"), "{ half").unwrap();
    let resumed = run_sft(&cfg_b, true, None).unwrap();
    let (a, b) = (
        adapter_tensors(&straight.output),
        adapter_tensors(&resumed.output),
    );
    assert_eq!(a.len(), b.len());
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert_eq!(va, vb, "{na} differs after resume");
    }
    // The metrics of the resumed run have each step once.
    let m = osp::train::metrics::read_metrics(&tmp.path().join("b/metrics.jsonl")).unwrap();
    let steps: Vec<u64> = m
        .iter()
        .filter(|x| x.get("loss").is_some())
        .map(|x| x["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=10).collect::<Vec<u64>>());
    // A fresh run refuses to overwrite a run folder with checkpoints.
    let e = format!("{:#}", run_sft(&cfg_b, false, None).err().unwrap());
    assert!(e.contains("--resume"), "{e}");
}

#[test]
fn malformed_lines_are_reported_and_skipped_or_abort() {
    let Some(model) = shared_data("models/stories260K/stories260K.bin") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path(), true);
    let cfg = config(
        &model,
        &data,
        &tmp.path().join("run"),
        &["train.steps=2", "data.on_malformed=\"abort\""],
    );
    let e = format!("{:#}", run_sft(&cfg, false, None).err().unwrap());
    assert!(e.contains("train.jsonl:12"), "{e}");
    let cfg = config(&model, &data, &tmp.path().join("run2"), &["train.steps=2"]);
    run_sft(&cfg, false, None).unwrap();
}

#[test]
fn config_errors_name_the_field() {
    let e = format!(
        "{:#}",
        SftConfig::load(None, &["train.stepz=3".into()]).unwrap_err()
    );
    assert!(e.contains("stepz"), "{e}");
    let e = format!(
        "{:#}",
        SftConfig::load(
            None,
            &[
                "model.path=\"x\"".into(),
                "data.train=\"y\"".into(),
                "optim.lr=\"fast\"".into()
            ]
        )
        .unwrap_err()
    );
    assert!(e.contains("lr") || e.contains("invalid type"), "{e}");
    let e = format!("{:#}", SftConfig::load(None, &[]).unwrap_err());
    assert!(e.contains("model.path"), "{e}");
}

#[test]
fn the_documented_template_is_exactly_the_defaults() {
    let parsed: SftConfig = toml::from_str(osp::train::sft::SFT_TEMPLATE).unwrap();
    let defaults = SftConfig::default();
    assert_eq!(
        toml::to_string(&parsed).unwrap(),
        toml::to_string(&defaults).unwrap()
    );
}
