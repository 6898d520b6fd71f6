//! OSP end to end on the real stories260K model: preference augmentation teaches it to judge
//! a preference it did not have, then a short online OSP run makes its samples preferred over
//! the reference's, with every logged metric finite. The baselines and ablations run too.
mod common;
use common::*;
use osp::train::judge_train::{run_judge_train, JudgeTrainConfig};
use osp::train::method::{Method, TrainConfig};
use osp::train::online::OnlineRun;
use std::path::{Path, PathBuf};

const SUBJECTS: [&str; 16] = [
    "The cat",
    "Lily",
    "Tom",
    "The little dog",
    "Mom",
    "The bird",
    "Ben",
    "Sue",
    "The old man",
    "The girl",
    "Tim",
    "Anna",
    "The frog",
    "Dad",
    "The boy",
    "Max",
];

/// Seed preferences the base model has no opinion on: "X was/felt" → happy over sad or angry.
/// The online prompts have the same shape, so short samples land where the judge has views.
fn write_data(dir: &Path) -> (PathBuf, PathBuf) {
    let good = [
        " very happy.",
        " happy and glad.",
        " so happy.",
        " happy all day.",
    ];
    let bad = [" sad.", " very angry.", " scared and sad.", " mad."];
    let verbs = [" was", " felt"];
    let prefs: Vec<String> = (0..64)
        .map(|i| {
            let prompt = format!("{}{}", SUBJECTS[i % 16], verbs[(i / 16) % 2]);
            let strength = [0.9, 0.75, 1.0, 0.8][i % 4];
            serde_json::json!({"prompt": prompt, "chosen": good[(i * 7) % 4], "rejected": bad[(i * 5) % 4], "strength": strength})
                .to_string()
        })
        .collect();
    let prompts: Vec<String> = SUBJECTS
        .iter()
        .flat_map(|s| {
            verbs
                .iter()
                .map(move |v| serde_json::json!({"prompt": format!("{s}{v}")}).to_string())
        })
        .collect();
    let (p, q) = (dir.join("prefs.jsonl"), dir.join("prompts.jsonl"));
    std::fs::write(&p, prefs.join("\n")).unwrap();
    std::fs::write(&q, prompts.join("\n")).unwrap();
    (p, q)
}

fn s(v: impl ToString) -> String {
    v.to_string()
}

fn judge_train(model: &Path, prefs: &Path, out: &Path) -> PathBuf {
    let cfg = JudgeTrainConfig::load(
        None,
        &[
            format!("model.path={:?}", s(model.display())),
            format!("data.preferences={:?}", s(prefs.display())),
            format!("train.out={:?}", s(out.display())),
            s("train.steps=40"),
            s("train.batch_size=8"),
            s("train.save_every=0"),
            s("train.eval_every=0"),
            s("train.max_len=128"),
            s("lora.r=8"),
            s("optim.lr=0.003"),
            s("data.eval_fraction=0.2"),
            s("judge.answer_a=\"A\""),
            s("judge.answer_b=\"B\""),
        ],
    )
    .unwrap();
    let out = run_judge_train(&cfg, false, None).unwrap();
    let after = out.after.as_ref().unwrap();
    assert!(
        after.accuracy >= 0.9,
        "judge accuracy after augmentation: {}",
        after.accuracy
    );
    assert!(
        after.accuracy > out.before.accuracy + 0.3,
        "before {} after {}",
        out.before.accuracy,
        after.accuracy
    );
    out.output
}

/// stories260K with a judge adapter trained on the test's preferences, and its prompts, in a
/// fresh folder (None when ../shared/data is absent outside CI).
struct Fixture {
    tmp: tempfile::TempDir,
    model: PathBuf,
    prefs: PathBuf,
    prompts: PathBuf,
    adapter: PathBuf,
}

fn fixture() -> Option<Fixture> {
    let model = shared_data("models/stories260K/stories260K.bin")?;
    let tmp = tempfile::tempdir().unwrap();
    let (prefs, prompts) = write_data(tmp.path());
    let adapter = judge_train(&model, &prefs, &tmp.path().join("pa"));
    Some(Fixture {
        tmp,
        model,
        prefs,
        prompts,
        adapter,
    })
}

fn online_config(
    model: &Path,
    adapter: &Path,
    prompts: &Path,
    out: &Path,
    method: Method,
    extra: &[&str],
) -> TrainConfig {
    let mut set = vec![
        format!("model.path={:?}", s(model.display())),
        format!("model.adapter={:?}", s(adapter.display())),
        format!("data.prompts={:?}", s(prompts.display())),
        format!("train.out={:?}", s(out.display())),
        s("train.steps=30"),
        s("train.batch_size=8"),
        s("train.save_every=10"),
        s("train.max_len=128"),
        s("lora.r=4"),
        s("optim.lr=0.003"),
        s("pairing.k=5"),
        s("sampling.max_new_tokens=6"),
        s("data.eval_fraction=0.25"),
        s("judge.answer_a=\"A\""),
        s("judge.answer_b=\"B\""),
    ];
    set.extend(extra.iter().map(s));
    TrainConfig::load(None, &set, Some(method)).unwrap()
}

fn assert_finite_metrics(run_dir: &Path) -> usize {
    let lines = osp::train::metrics::read_metrics(&run_dir.join("metrics.jsonl")).unwrap();
    let steps: Vec<_> = lines.iter().filter(|l| l.get("loss").is_some()).collect();
    for l in &steps {
        for (k, v) in l.as_object().unwrap() {
            let ok = match v {
                serde_json::Value::Number(n) => n.as_f64().is_some_and(f64::is_finite),
                serde_json::Value::Array(_) => true,
                _ => false,
            };
            assert!(ok, "metric {k} = {v} is not finite in {l}");
        }
        for k in [
            "loss",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "rewards/accuracies",
            "logps/chosen",
            "logps/rejected",
            "objective/kl",
            "judge/strength_mean",
            "judge/position_bias_rate",
            "completions/mean_length",
            "speed/sampling_tokens_per_s",
            "speed/judging_tokens_per_s",
            "speed/training_tokens_per_s",
        ] {
            assert!(l.get(k).is_some(), "metric {k} missing from {l}");
        }
    }
    steps.len()
}

#[test]
fn osp_makes_its_samples_preferred_over_the_reference() {
    let Some(Fixture {
        tmp,
        model,
        prompts,
        adapter,
        ..
    }) = fixture()
    else {
        return;
    };
    let cfg = online_config(
        &model,
        &adapter,
        &prompts,
        &tmp.path().join("osp"),
        Method::Osp,
        &[],
    );
    let mut run = OnlineRun::new(&cfg, false).unwrap();
    let before = run.judged_preference_over_reference(8, 99).unwrap();
    assert!(
        (before - 0.5).abs() < 1e-9,
        "policy = πref before training, got {before}"
    );
    let out = run.run(None, |_| Ok(())).unwrap().unwrap();
    let after = run.judged_preference_over_reference(8, 99).unwrap();
    eprintln!("judged preference over πref: before {before:.3}, after {after:.3}");
    assert!(
        after > 0.6,
        "judged preference of OSP samples over πref's: {after}"
    );
    assert_eq!(assert_finite_metrics(&tmp.path().join("osp")), 30);
    assert!(out.join("adapter_model.safetensors").exists());
}

#[test]
fn baselines_and_ablations_run_and_log_finite_metrics() {
    let Some(Fixture {
        tmp,
        model,
        prefs,
        prompts,
        adapter,
    }) = fixture()
    else {
        return;
    };
    for method in [Method::OnlineDpo, Method::OspHard, Method::OspRandomPairs] {
        let out = tmp.path().join(format!("{method:?}"));
        let cfg = online_config(&model, &adapter, &prompts, &out, method, &["train.steps=3"]);
        let mut run = OnlineRun::new(&cfg, false).unwrap();
        run.run(None, |_| Ok(())).unwrap();
        assert_eq!(assert_finite_metrics(&out), 3, "{method:?}");
    }
    for (method, extra) in [
        (Method::Dpo, None),
        (Method::Ipo, None),
        (Method::Cdpo, Some("loss.label_smoothing=0.1")),
        (Method::SpceOffline, None),
    ] {
        let out = tmp.path().join(format!("{method:?}"));
        let mut set = vec![
            format!("model.path={:?}", s(model.display())),
            format!("model.adapter={:?}", s(adapter.display())),
            format!("data.preferences={:?}", s(prefs.display())),
            format!("train.out={:?}", s(out.display())),
            s("train.steps=4"),
            s("train.batch_size=4"),
            s("train.max_len=128"),
            s("train.eval_every=2"),
        ];
        set.extend(extra.map(s));
        let cfg = TrainConfig::load(None, &set, Some(method)).unwrap();
        let r = osp::train::offline::run_offline(&cfg, false, None).unwrap();
        assert!(!r.evals.is_empty() && r.output.exists(), "{method:?}");
        let lines = osp::train::metrics::read_metrics(&out.join("metrics.jsonl")).unwrap();
        assert_eq!(lines.iter().filter(|l| l.get("loss").is_some()).count(), 4);
    }
}

#[test]
fn a_loss_that_contradicts_the_method_is_refused() {
    let set = [
        s("model.path=\"x\""),
        s("data.prompts=\"p\""),
        s("loss.kind=\"ipo\""),
    ];
    let e = format!(
        "{:#}",
        TrainConfig::load(None, &set, Some(Method::Osp)).unwrap_err()
    );
    assert!(e.contains("contradicts"), "{e}");
    let set = [s("model.path=\"x\""), s("data.preferences=\"p\"")];
    let e = format!(
        "{:#}",
        TrainConfig::load(None, &set, Some(Method::Cdpo)).unwrap_err()
    );
    assert!(e.contains("label_smoothing"), "{e}");
    let e = format!(
        "{:#}",
        TrainConfig::load(None, &[s("model.path=\"x\"")], Some(Method::Dpo)).unwrap_err()
    );
    assert!(e.contains("data.preferences"), "{e}");
}

#[test]
fn documented_templates_are_exactly_the_defaults() {
    let t: TrainConfig = toml::from_str(osp::train::method::TRAIN_TEMPLATE).unwrap();
    assert_eq!(
        toml::to_string(&t).unwrap(),
        toml::to_string(&TrainConfig::default()).unwrap()
    );
    let j: JudgeTrainConfig =
        toml::from_str(osp::train::judge_train::JUDGE_TRAIN_TEMPLATE).unwrap();
    assert_eq!(
        toml::to_string(&j).unwrap(),
        toml::to_string(&JudgeTrainConfig::default()).unwrap()
    );
}

#[test]
fn the_loss_backpropagated_in_buckets_gives_the_single_graph_gradient() {
    let Some(Fixture {
        tmp,
        model,
        prompts,
        adapter,
        ..
    }) = fixture()
    else {
        return;
    };
    let mut step = vec![];
    for bucketed in [true, false] {
        let out = tmp.path().join(format!("osp-{bucketed}"));
        let cfg = online_config(
            &model,
            &adapter,
            &prompts,
            &out,
            Method::Osp,
            &["train.steps=1", "data.eval_fraction=0.0"],
        );
        let mut run = OnlineRun::new(&cfg, false).unwrap();
        run.backward_in_buckets = bucketed;
        run.run(None, |_| Ok(())).unwrap();
        let lines = osp::train::metrics::read_metrics(&out.join("metrics.jsonl")).unwrap();
        let l = lines.iter().find(|l| l.get("loss").is_some()).unwrap();
        step.push((
            l["loss"].as_f64().unwrap(),
            l["grad_norm"].as_f64().unwrap(),
            l["pairs"].as_f64().unwrap(),
        ));
    }
    let ((l1, g1, p1), (l2, g2, p2)) = (step[0], step[1]);
    assert_eq!(p1, p2, "the same samples and pairs");
    assert!(p1 > 0.0);
    assert!((l1 - l2).abs() < 1e-5, "loss {l1} vs {l2}");
    assert!(g1 > 0.0);
    assert!(
        (g1 - g2).abs() < 1e-3 * g2,
        "gradient norm {g1} (buckets) vs {g2} (one graph)"
    );
}
