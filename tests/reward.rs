//! Reward models: the Bradley–Terry loss and its TRL options against hand computations,
//! pooling at the last non-padding token, training on the real stories260K model (a trivially
//! separable preference is learnt: held-out accuracy from chance to near 1), save → reload →
//! the same rewards (LoRA folder, merged transformers folder, full fine-tuning), resume, and
//! bad inputs refused with clear errors.
mod common;
use candle_core::{Device, Tensor, Var};
use common::*;
use osp::model::Trainable;
use osp::reward::io::{load_reward_model, META_FILE};
use osp::reward::train::{evaluate, run_rm_train, RmEval, RmTrainConfig, RM_TEMPLATE};
use osp::reward::{
    bradley_terry_loss, margins, pooled_positions, reward_stats, MarginSource, RewardModel,
};
use std::path::{Path, PathBuf};

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

#[test]
fn bradley_terry_loss_matches_the_formula_with_margin_and_centring() {
    let dev = Device::Cpu;
    let rc = [1.5f32, -0.25, 3.0, 0.0];
    let rr = [0.5f32, 0.75, -2.0, 0.0];
    let m = [0.25, 0.0, 1.0, -0.5];
    let c = 0.01;
    let cv = Var::from_slice(&rc, 4, &dev).unwrap();
    let rv = Var::from_slice(&rr, 4, &dev).unwrap();
    let loss = bradley_terry_loss(cv.as_tensor(), rv.as_tensor(), Some(&m), Some(c)).unwrap();
    let (mut want, mut center) = (0.0, 0.0);
    let mut grad_c = [0.0f64; 4];
    for i in 0..4 {
        let d = rc[i] as f64 - rr[i] as f64 - m[i];
        want -= sigmoid(d).ln() / 4.0;
        let s = rc[i] as f64 + rr[i] as f64;
        center += s * s / 4.0;
        grad_c[i] = -sigmoid(-d) / 4.0 + c * 2.0 * s / 4.0;
    }
    want += c * center;
    let got = loss.to_scalar::<f32>().unwrap() as f64;
    assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    let g = loss.backward().unwrap();
    let gc: Vec<f32> = g.get(cv.as_tensor()).unwrap().to_vec1().unwrap();
    for i in 0..4 {
        assert!((gc[i] as f64 - grad_c[i]).abs() < 1e-6, "grad {i}");
    }
    // Without options it is −mean log σ(r_w − r_l); a huge gap stays finite.
    let big = Tensor::new(&[200f32, -200.0], &dev).unwrap();
    let zero = Tensor::new(&[0f32, 0.0], &dev).unwrap();
    let l = bradley_terry_loss(&big, &zero, None, None)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((l - 100.0).abs() < 1e-3, "{l}");
    assert!(bradley_terry_loss(&big, &zero, Some(&[1.0]), None).is_err());
}

#[test]
fn margins_and_stats() {
    assert_eq!(margins(MarginSource::None, 1.0, &[Some(1.0)]), None);
    assert_eq!(
        margins(
            MarginSource::Strength,
            2.0,
            &[Some(1.0), Some(0.5), None, Some(0.75)]
        ),
        Some(vec![2.0, 0.0, 0.0, 1.0])
    );
    let s = reward_stats(&[1.0, 2.0, 0.0], &[0.0, 3.0, 0.0]);
    assert!(
        (s.accuracy - 1.0 / 3.0).abs() < 1e-12,
        "ties count as wrong, as TRL's >"
    );
    assert!((s.margin - 0.0).abs() < 1e-12);
    assert_eq!((s.min_reward, s.max_reward), (0.0, 3.0));
}

#[test]
fn rewards_are_read_at_the_last_non_padding_token() {
    assert_eq!(
        pooled_positions(&[vec![1, 5, 6, 2], vec![1, 5, 2, 2], vec![2, 7, 2]], 2).unwrap(),
        vec![2, 1, 1]
    );
    let e = pooled_positions(&[vec![1, 4], vec![2, 2]], 2).unwrap_err();
    assert!(e.to_string().contains("sequence 1"), "{e}");
    let backbone = tiny_model("llama", false, Trainable::None, 3);
    let dev = Device::Cpu;
    let score = Tensor::randn(0f32, 1.0, (1, 32), &dev).unwrap();
    let rm = RewardModel::new(backbone.clone(), score.clone(), 0).unwrap();
    let seqs = vec![
        vec![1u32, 7, 9, 3],
        vec![1, 5, 6, 7, 8, 9, 10, 11],
        vec![1, 4, 0, 0],
    ];
    let got: Vec<f32> = rm.rewards(&seqs).unwrap().to_vec1().unwrap();
    for (i, s) in seqs.iter().enumerate() {
        // By hand: the hidden state of the sequence alone at its last non-pad position.
        let b = osp::model::TokenBatch::right_padded(std::slice::from_ref(s), &dev).unwrap();
        let h = backbone
            .forward_hidden(&b.ids, &b.positions, &b.bias, None)
            .unwrap();
        let p = s.iter().rposition(|&t| t != 0).unwrap();
        let hv: Vec<f32> = h
            .narrow(1, p, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let w: Vec<f32> = score.flatten_all().unwrap().to_vec1().unwrap();
        let by_hand: f32 = hv.iter().zip(&w).map(|(a, b)| a * b).sum();
        assert!(
            (got[i] - by_hand).abs() < 1e-4 * (1.0 + by_hand.abs()),
            "sequence {i}: batched {} vs alone {by_hand}",
            got[i]
        );
    }
    // Bad parts are refused.
    let e = RewardModel::new(
        backbone.clone(),
        Tensor::zeros((1, 31), candle_core::DType::F32, &dev).unwrap(),
        0,
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("score.weight"), "{e}");
    assert!(
        RewardModel::new(backbone, score, 40).is_err(),
        "pad id outside the vocabulary"
    );
}

const SUBJECTS: [&str; 8] = [
    "The cat",
    "Lily",
    "Tom",
    "The little dog",
    "Mom",
    "The bird",
    "Ben",
    "Sue",
];

/// "X was/felt" → a happy ending preferred to a sad one; the held-out file uses other
/// subjects' endings in other combinations.
fn write_data(dir: &Path) -> (PathBuf, PathBuf) {
    let good = [
        " very happy.",
        " happy and glad.",
        " so happy.",
        " happy all day.",
    ];
    let bad = [" sad.", " very angry.", " scared and sad.", " mad."];
    let verbs = [" was", " felt"];
    let line = |i: usize, subj: &str| {
        let prompt = format!("{subj}{}", verbs[i % 2]);
        let strength = [0.9, 0.75, 1.0, 0.8][i % 4];
        serde_json::json!({"prompt": prompt, "chosen": good[(i * 3) % 4], "rejected": bad[(i * 5 + 1) % 4],
                           "strength": strength})
        .to_string()
    };
    let train: Vec<String> = (0..48).map(|i| line(i, SUBJECTS[i % 6])).collect();
    let held: Vec<String> = (0..16).map(|i| line(i + 1, SUBJECTS[6 + i % 2])).collect();
    let (p, q) = (dir.join("prefs.jsonl"), dir.join("heldout.jsonl"));
    std::fs::write(&p, train.join("\n")).unwrap();
    std::fs::write(&q, held.join("\n")).unwrap();
    (p, q)
}

fn config(model: &Path, prefs: &Path, held: &Path, out: &Path, extra: &[&str]) -> RmTrainConfig {
    let mut sets = vec![
        format!("model.path={:?}", model.display().to_string()),
        format!("data.preferences={:?}", prefs.display().to_string()),
        format!("data.eval={:?}", held.display().to_string()),
        format!("train.out={:?}", out.display().to_string()),
        "train.steps=30".into(),
        "train.batch_size=8".into(),
        "train.save_every=0".into(),
        "train.eval_every=15".into(),
        "train.max_len=64".into(),
        "optim.lr=0.003".into(),
        "optim.schedule=\"constant\"".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    RmTrainConfig::load(None, &sets).unwrap()
}

fn held_out_eval(dir: &Path, cfg: &RmTrainConfig, held: &Path) -> RmEval {
    let loaded = load_reward_model(dir, "cpu").unwrap();
    let (pairs, _) = osp::train::pairs::load_pairs(
        held,
        osp::train::pairs::DataFormat::Auto,
        Some(&loaded.tokenizer),
        osp::data::OnMalformed::Abort,
    )
    .unwrap();
    let toks: Vec<_> = pairs
        .iter()
        .map(|p| {
            osp::train::pairs::tokenize_pair(&loaded.tokenizer, p, cfg.train.max_len)
                .unwrap()
                .unwrap()
        })
        .collect();
    evaluate(&loaded.model, &cfg.reward, &toks, 5).unwrap()
}

fn assert_same_eval(a: &RmEval, b: &RmEval, tol: f64, what: &str) {
    for (name, x, y) in [
        ("loss", a.loss, b.loss),
        ("accuracy", a.stats.accuracy, b.stats.accuracy),
        ("margin", a.stats.margin, b.stats.margin),
        ("mean_reward", a.stats.mean_reward, b.stats.mean_reward),
        ("min_reward", a.stats.min_reward, b.stats.min_reward),
        ("max_reward", a.stats.max_reward, b.stats.max_reward),
    ] {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what} {name}: {x} vs {y}"
        );
    }
}

#[test]
fn lora_reward_model_learns_a_separable_preference_and_reloads() {
    let Some(model) = shared_data("models/stories260K/stories260K.bin") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (prefs, held) = write_data(tmp.path());
    let run = tmp.path().join("run");
    let cfg = config(
        &model,
        &prefs,
        &held,
        &run,
        &[
            "reward.export_merged=true",
            "reward.margin=\"strength\"",
            "reward.center_rewards_coefficient=0.01",
        ],
    );
    let out = run_rm_train(&cfg, false, None).unwrap();
    let (before, after) = (out.before.unwrap(), out.after.unwrap());
    assert_eq!(after.pairs, 16);
    eprintln!(
        "held-out accuracy {:.3} → {:.3}",
        before.stats.accuracy, after.stats.accuracy
    );
    assert!(
        before.stats.accuracy <= 0.75,
        "the base has no such preference: {before:?}"
    );
    assert!(after.stats.accuracy >= 0.9, "{after:?}");
    assert!(after.loss < 0.5 * before.loss, "{before:?} → {after:?}");
    // Metrics: TRL's names per step, eval/accuracy before, mid-way and at the end.
    let m = osp::train::metrics::read_metrics(&run.join("metrics.jsonl")).unwrap();
    let steps: Vec<_> = m.iter().filter(|x| x.get("loss").is_some()).collect();
    assert_eq!(steps.len(), 30);
    for k in [
        "loss",
        "accuracy",
        "margin",
        "min_reward",
        "mean_reward",
        "max_reward",
        "lr",
    ] {
        assert!(steps[29][k].as_f64().is_some_and(f64::is_finite), "{k}");
    }
    let evals: Vec<u64> = m
        .iter()
        .filter(|x| x.get("eval/accuracy").is_some())
        .map(|x| x["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, vec![0, 15, 30]);
    // The folder: PEFT layout with the head, and osp's description.
    let dir = &out.output;
    let ac: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(ac["task_type"], "SEQ_CLS");
    assert_eq!(ac["modules_to_save"], serde_json::json!(["score"]));
    let t = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    assert_eq!(t["base_model.model.score.weight"].dims(), [1, 64]);
    assert!(t.keys().any(|k| k.contains("lora_B")));
    assert!(dir.join(META_FILE).exists());
    // Reload → the same rewards as at the end of training.
    assert_same_eval(
        &held_out_eval(dir, &cfg, &held),
        &after,
        1e-5,
        "LoRA reload",
    );
    // The merged transformers folder gives them too (merging rounds differently).
    let merged = out.merged.unwrap();
    let mc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(
        mc["architectures"],
        serde_json::json!(["LlamaForSequenceClassification"])
    );
    assert_eq!(mc["id2label"].as_object().unwrap().len(), 1);
    let loaded = load_reward_model(&merged, "cpu").unwrap();
    assert_eq!(
        mc["pad_token_id"].as_u64().unwrap() as u32,
        loaded.model.pad_token_id
    );
    let mt =
        candle_core::safetensors::load(merged.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(mt["score.weight"].dims(), [1, 64]);
    assert!(
        !mt.contains_key("lm_head.weight"),
        "a classifier has no LM head"
    );
    assert_same_eval(
        &held_out_eval(&merged, &cfg, &held),
        &after,
        1e-4,
        "merged reload",
    );
    // Scoring texts (what PPO calls) agrees with the pairs' rewards.
    let r = loaded
        .model
        .score_texts(
            &loaded.tokenizer,
            &[("Ben was", " very happy."), ("Ben was", " sad.")],
            64,
            2,
        )
        .unwrap();
    assert!(r[0] > r[1], "{r:?}");
}

#[test]
fn full_reward_model_saves_a_transformers_folder_and_resumes() {
    let Some(model) = shared_data("models/stories260K/stories260K.bin") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (prefs, held) = write_data(tmp.path());
    let extra = ["model.train=\"full\"", "train.steps=8", "optim.lr=0.001"];
    let a = run_rm_train(
        &config(&model, &prefs, &held, &tmp.path().join("a"), &extra),
        false,
        None,
    )
    .unwrap();
    let dir = &a.output;
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        c["architectures"],
        serde_json::json!(["LlamaForSequenceClassification"])
    );
    assert!(!dir.join("adapter_config.json").exists());
    let cfg_a = config(&model, &prefs, &held, &tmp.path().join("a"), &extra);
    assert_same_eval(
        &held_out_eval(dir, &cfg_a, &held),
        &a.after.unwrap(),
        1e-5,
        "full reload",
    );
    // Stopped after 3 steps and resumed: the same weights as the straight run.
    let mut extra_b = extra.to_vec();
    extra_b.push("train.save_every=2");
    let cfg_b = config(&model, &prefs, &held, &tmp.path().join("b"), &extra_b);
    let stopped = run_rm_train(&cfg_b, false, Some(3)).unwrap();
    assert!(stopped.output.as_os_str().is_empty());
    let b = run_rm_train(&cfg_b, true, None).unwrap();
    let ta =
        candle_core::safetensors::load(a.output.join("model.safetensors"), &Device::Cpu).unwrap();
    let tb =
        candle_core::safetensors::load(b.output.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(ta.len(), tb.len());
    for (name, x) in &ta {
        assert_eq!(
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            tb[name].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{name} differs after resume"
        );
    }
}

#[test]
fn bad_inputs_are_refused_with_clear_errors() {
    let e = format!("{:#}", RmTrainConfig::load(None, &[]).unwrap_err());
    assert!(e.contains("model.path"), "{e}");
    let e = format!(
        "{:#}",
        RmTrainConfig::load(None, &["model.path=\"m\"".into()]).unwrap_err()
    );
    assert!(e.contains("data.preferences"), "{e}");
    let e = format!(
        "{:#}",
        RmTrainConfig::load(
            None,
            &[
                "model.path=\"m\"".into(),
                "data.preferences=\"p\"".into(),
                "reward.margin_scale=-1".into()
            ]
        )
        .unwrap_err()
    );
    assert!(e.contains("reward.margin_scale"), "{e}");
    let e = format!(
        "{:#}",
        RmTrainConfig::load(None, &["reward.marginz=1".into()]).unwrap_err()
    );
    assert!(e.contains("marginz"), "{e}");
    // Folders that are not reward models.
    let tmp = tempfile::tempdir().unwrap();
    let e = format!("{:#}", load_reward_model(tmp.path(), "cpu").err().unwrap());
    assert!(e.contains("config.json"), "{e}");
    let e = format!(
        "{:#}",
        load_reward_model(&fixture("llama_gqa"), "cpu")
            .err()
            .unwrap()
    );
    assert!(e.contains("ForSequenceClassification"), "{e}");
    std::fs::write(tmp.path().join("adapter_config.json"), "{}").unwrap();
    let e = format!("{:#}", load_reward_model(tmp.path(), "cpu").err().unwrap());
    assert!(e.contains(META_FILE), "{e}");
    // margin = "strength" on data without strengths.
    let Some(model) = shared_data("models/stories260K/stories260K.bin") else {
        return;
    };
    let p = tmp.path().join("p.jsonl");
    std::fs::write(
        &p,
        "{\"prompt\": \"Tom was\", \"chosen\": \" happy.\", \"rejected\": \" sad.\"}\n".repeat(4),
    )
    .unwrap();
    let cfg = config(
        &model,
        &p,
        &p,
        &tmp.path().join("r"),
        &["reward.margin=\"strength\""],
    );
    let e = format!("{:#}", run_rm_train(&cfg, false, None).err().unwrap());
    assert!(e.contains("strength"), "{e}");
}

#[test]
fn the_documented_template_is_exactly_the_defaults() {
    let parsed: RmTrainConfig = toml::from_str(RM_TEMPLATE).unwrap();
    let default = RmTrainConfig::default();
    assert_eq!(
        toml::to_string(&parsed).unwrap(),
        toml::to_string(&default).unwrap()
    );
}

#[test]
fn the_command_line_trains_and_reports_accuracy() {
    let Some(model) = shared_data("models/stories260K/stories260K.bin") else {
        return;
    };
    let bin = env!("CARGO_BIN_EXE_osp");
    let out = std::process::Command::new(bin)
        .args(["rm-train", "--print-config"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), RM_TEMPLATE);
    let tmp = tempfile::tempdir().unwrap();
    let (prefs, held) = write_data(tmp.path());
    let cfg_path = tmp.path().join("rm.toml");
    let text = RM_TEMPLATE
        .replace(
            "path = \"\"",
            &format!("path = {:?}", model.display().to_string()),
        )
        .replace(
            "preferences = \"\"",
            &format!("preferences = {:?}", prefs.display().to_string()),
        );
    std::fs::write(&cfg_path, text).unwrap();
    let run = tmp.path().join("run");
    let out = std::process::Command::new(bin)
        .args(["rm-train", "--config", cfg_path.to_str().unwrap()])
        .args([
            "--set",
            &format!("train.out={:?}", run.display().to_string()),
        ])
        .args([
            "--set",
            &format!("data.eval={:?}", held.display().to_string()),
        ])
        .args(["--set", "train.steps=4", "--set", "train.max_len=64"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("reward model after: held-out accuracy"),
        "{err}"
    );
    assert!(run.join("reward_model/adapter_model.safetensors").exists());
    let out = std::process::Command::new(bin)
        .args([
            "rm-train",
            "--config",
            cfg_path.to_str().unwrap(),
            "--method",
            "osp",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn a_reward_model_on_top_of_a_starting_adapter_reloads() {
    let Some(model) = shared_data("models/stories260K/stories260K.bin") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (prefs, held) = write_data(tmp.path());
    // A starting adapter with non-zero B, standing in for an SFT run's.
    let start = tmp.path().join("sft_adapter");
    let lm = osp::model::load_model(
        &model,
        None,
        &Device::Cpu,
        Trainable::Lora {
            config: osp::lora::LoraConfig {
                r: 4,
                ..Default::default()
            },
            seed: 2,
        },
    )
    .unwrap();
    for (name, var) in lm.model.vars() {
        if name.contains("lora_B") {
            var.set(&Tensor::randn(0f32, 0.05, var.dims(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    osp::model::save_adapter(&lm.model, &start, &model.display().to_string()).unwrap();
    let adapter = format!("model.adapter={:?}", start.display().to_string());
    let cfg = config(
        &model,
        &prefs,
        &held,
        &tmp.path().join("run"),
        &[&adapter, "train.steps=6"],
    );
    let out = run_rm_train(&cfg, false, None).unwrap();
    let loaded = load_reward_model(&out.output, "cpu").unwrap();
    assert_eq!(
        loaded.meta.as_ref().unwrap().start_adapter.as_ref(),
        Some(&start)
    );
    assert_same_eval(
        &held_out_eval(&out.output, &cfg, &held),
        &out.after.unwrap(),
        1e-5,
        "reload over a merged starting adapter",
    );
}
