//! `--resume` on every trainer: a run stopped part-way and resumed ends bit-identical to an
//! uninterrupted one (online OSP, offline DPO and judge-train with LoRA dropout on, and full
//! fine-tuning), and a resume that would continue a different run is refused. Tiny models
//! made on the spot, so these run without ../shared/data.
mod common;
use common::*;
use osp::demo::tasks::{JUDGE_ANSWER_A, JUDGE_ANSWER_B, JUDGE_TEMPLATE};
use osp::train::judge_train::{run_judge_train, JudgeTrainConfig};
use osp::train::method::{Method, TrainConfig};
use osp::train::offline::run_offline;
use osp::train::online::OnlineRun;
use osp::train::sft::{run_sft, SftConfig};
use std::path::{Path, PathBuf};

fn files(dir: &Path) -> RunFiles {
    tiny_run_files(dir, 7)
}

fn q(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

fn common_sets(f: &RunFiles, out: &Path) -> Vec<String> {
    vec![
        format!("model.path={}", q(&f.model)),
        format!("train.out={}", q(out)),
        "train.steps=5".into(),
        "train.batch_size=4".into(),
        "train.save_every=2".into(),
        "train.eval_every=2".into(),
        "train.max_len=64".into(),
        "lora.r=4".into(),
        "lora.lora_dropout=0.1".into(),
        "optim.lr=0.01".into(),
        "optim.warmup_steps=1".into(),
    ]
}

fn judge_sets() -> Vec<String> {
    vec![
        format!("judge.template={JUDGE_TEMPLATE:?}"),
        format!("judge.answer_a={JUDGE_ANSWER_A:?}"),
        format!("judge.answer_b={JUDGE_ANSWER_B:?}"),
    ]
}

fn osp_config(f: &RunFiles, out: &Path, extra: &[&str]) -> TrainConfig {
    let mut set = common_sets(f, out);
    set.extend(judge_sets());
    set.push(format!("data.prompts={}", q(&f.prompts)));
    set.extend(
        [
            "train.batch_size=2",
            "pairing.k=3",
            "sampling.max_new_tokens=4",
            "data.eval_fraction=0",
        ]
        .map(String::from),
    );
    set.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::load(None, &set, Some(Method::Osp)).unwrap()
}

fn dpo_config(f: &RunFiles, out: &Path, extra: &[&str]) -> TrainConfig {
    let mut set = common_sets(f, out);
    set.push(format!("data.preferences={}", q(&f.prefs)));
    set.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::load(None, &set, Some(Method::Dpo)).unwrap()
}

fn judge_train_config(f: &RunFiles, out: &Path) -> JudgeTrainConfig {
    let mut set = common_sets(f, out);
    set.extend(judge_sets());
    set.push(format!("data.preferences={}", q(&f.prefs)));
    set.push("data.eval_fraction=0.25".into());
    JudgeTrainConfig::load(None, &set).unwrap()
}

fn full_sft_config(f: &RunFiles, out: &Path) -> SftConfig {
    let mut set = common_sets(f, out);
    set.push(format!("data.train={}", q(&f.sft)));
    set.push("model.train=\"full\"".into());
    SftConfig::load(None, &set).unwrap()
}

/// Every file of two output folders, byte for byte.
fn assert_same_files(a: &Path, b: &Path, what: &str) {
    let mut names: Vec<_> = std::fs::read_dir(a)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert!(!names.is_empty(), "{what}: {} is empty", a.display());
    for n in names {
        let (x, y) = (
            std::fs::read(a.join(&n)).unwrap(),
            std::fs::read(b.join(&n)),
        );
        assert!(
            y.as_ref().is_ok_and(|y| *y == x),
            "{what}: {} differs after resume",
            n.to_string_lossy()
        );
    }
}

fn optimiser_steps(run: &Path) -> Vec<u64> {
    osp::train::metrics::read_metrics(&run.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter(|m| m.get("loss").is_some() && m.get("lr").is_some())
        .map(|m| m["step"].as_u64().unwrap())
        .collect()
}

/// Runs `run(out, resume, stop_after)` straight to the end in `a`, and in `b` stopped after
/// 3 steps then resumed; the outputs and the metrics' step lists must agree exactly.
fn assert_resume_is_exact(
    tmp: &Path,
    what: &str,
    run: impl Fn(&Path, bool, Option<usize>) -> PathBuf,
) {
    let (a, b) = (tmp.join(format!("{what}-a")), tmp.join(format!("{what}-b")));
    let straight = run(&a, false, None);
    let stopped = run(&b, false, Some(3));
    assert!(stopped.as_os_str().is_empty(), "{what}: not stopped");
    let resumed = run(&b, true, None);
    assert_same_files(&straight, &resumed, what);
    assert_eq!(optimiser_steps(&a), (1..=5).collect::<Vec<_>>(), "{what}");
    assert_eq!(optimiser_steps(&b), optimiser_steps(&a), "{what}");
}

#[test]
fn every_trainer_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let f = files(tmp.path());
    assert_resume_is_exact(tmp.path(), "osp", |out, resume, stop| {
        let mut run = OnlineRun::new(&osp_config(&f, out, &[]), resume).unwrap();
        run.run(stop, |_| Ok(())).unwrap().unwrap_or_default()
    });
    assert_resume_is_exact(tmp.path(), "dpo", |out, resume, stop| {
        run_offline(&dpo_config(&f, out, &[]), resume, stop)
            .unwrap()
            .output
    });
    assert_resume_is_exact(tmp.path(), "judge-train", |out, resume, stop| {
        run_judge_train(&judge_train_config(&f, out), resume, stop)
            .unwrap()
            .output
    });
    assert_resume_is_exact(tmp.path(), "full-sft", |out, resume, stop| {
        run_sft(&full_sft_config(&f, out), resume, stop)
            .unwrap()
            .output
    });
}

#[test]
fn resuming_a_different_run_is_refused_and_leaves_the_folder_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let f = files(tmp.path());
    let out = tmp.path().join("osp");
    let mut run = OnlineRun::new(&osp_config(&f, &out, &[]), false).unwrap();
    assert!(run.run(Some(3), |_| Ok(())).unwrap().is_none());
    drop(run);
    let config_before = std::fs::read(out.join("config.toml")).unwrap();
    let metrics_before = std::fs::read(out.join("metrics.jsonl")).unwrap();
    let err = |r: anyhow::Result<()>| format!("{:#}", r.unwrap_err());

    // Another method of osp train.
    let mut dpo = dpo_config(&f, &out, &[]);
    dpo.data.prompts = Some(f.prompts.clone());
    let e = err(run_offline(&dpo, true, None).map(|_| ()));
    assert!(
        e.contains("`osp train --method osp`") && e.contains("`osp train --method dpo`"),
        "{e}"
    );
    // Another command.
    let e = err(run_sft(&full_sft_config(&f, &out), true, None).map(|_| ()));
    assert!(e.contains("cannot be continued by `osp sft`"), "{e}");
    let e = err(run_judge_train(&judge_train_config(&f, &out), true, None).map(|_| ()));
    assert!(e.contains("`osp judge-train`"), "{e}");
    // Changed fields, all listed; fields that do not change the run may differ.
    let changed = osp_config(
        &f,
        &out,
        &[
            "lora.r=2",
            "train.seed=5",
            "pairing.k=5",
            "train.save_every=1",
        ],
    );
    let e = err(OnlineRun::new(&changed, true).map(|_| ()));
    for field in ["lora.r: 4 -> 2", "train.seed: 0 -> 5", "pairing.k: 3 -> 5"] {
        assert!(e.contains(field), "{field} not in: {e}");
    }
    assert!(!e.contains("train.save_every:"), "{e}");
    // Fewer steps than are done.
    let e = err(OnlineRun::new(&osp_config(&f, &out, &["train.steps=2"]), true).map(|_| ()));
    assert!(e.contains("below the 3 steps"), "{e}");
    // Nothing of the run was touched by the refusals.
    assert_eq!(
        std::fs::read(out.join("config.toml")).unwrap(),
        config_before
    );
    assert_eq!(
        std::fs::read(out.join("metrics.jsonl")).unwrap(),
        metrics_before
    );
    // More steps, a new checkpoint interval: continues, to the new end.
    let longer = osp_config(&f, &out, &["train.steps=6", "train.save_every=1"]);
    let mut run = OnlineRun::new(&longer, true).unwrap();
    assert!(run.run(None, |_| Ok(())).unwrap().is_some());
    assert_eq!(optimiser_steps(&out), (1..=6).collect::<Vec<_>>());
}

#[test]
fn a_run_recorded_before_a_config_section_existed_still_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let f = files(tmp.path());
    let out = tmp.path().join("old");
    let mut run = OnlineRun::new(&osp_config(&f, &out, &[]), false).unwrap();
    assert!(run.run(Some(3), |_| Ok(())).unwrap().is_none());
    drop(run);
    // As an older osp wrote it: no [ppo], [self_reward] or [self_rewarding] in the record.
    let dir = osp::train::checkpoint::latest(&out).unwrap().unwrap();
    let path = dir.join("state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let config = state["run"]["config"].as_object_mut().unwrap();
    for section in ["ppo", "self_reward", "self_rewarding"] {
        assert!(config.remove(section).is_some(), "{section}");
    }
    std::fs::write(&path, state.to_string()).unwrap();
    let mut run = OnlineRun::new(&osp_config(&f, &out, &[]), true).unwrap();
    assert!(run.run(None, |_| Ok(())).unwrap().is_some());
    // A changed field is still refused.
    let e = OnlineRun::new(&osp_config(&f, &out, &["lora.r=2"]), true)
        .err()
        .unwrap();
    assert!(format!("{e:#}").contains("lora.r: 4 -> 2"), "{e:#}");
}
