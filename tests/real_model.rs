//! The real pretrained chat model end to end, at a budget CI affords: SmolLM2-135M-Instruct
//! (GGUF, ../shared/data) is taught to judge on four HH pairs, then runs two OSP iterations
//! from the augmented model with its chat judge. Every logged metric must be finite, the
//! saved adapter must reload to the same logits, and the chat judge's answers must be single
//! tokens of this tokenizer.
mod common;

use candle_core::Tensor;
use common::{max_abs, shared_data, write_jsonl};
use osp::judge::{Judge, JudgeConfig};
use osp::train::config::ModelSection;
use osp::train::judge_train::{run_judge_train, JudgeTrainConfig};
use osp::train::method::TrainConfig;
use osp::train::online::OnlineRun;
use serde_json::{json, Value};
use std::io::BufRead;

const SMOLLM: &str = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The first `n` HH helpful-base pairs whose transcripts are short.
fn hh_pairs(n: usize) -> Option<Vec<Value>> {
    let path = shared_data("hh-rlhf/helpful-base_test.jsonl.gz")?;
    let f = std::fs::File::open(path).unwrap();
    let r = std::io::BufReader::new(flate2::read::GzDecoder::new(f));
    Some(
        r.lines()
            .map(|l| serde_json::from_str::<Value>(&l.unwrap()).unwrap())
            .filter(|v| {
                v["chosen"].as_str().unwrap().len() < 400
                    && v["rejected"].as_str().unwrap().len() < 400
                    && v["chosen"] != v["rejected"]
            })
            .take(n)
            .collect(),
    )
}

/// Every number in a metrics line, by key path; panics on a non-finite one.
fn assert_finite(v: &Value, at: &str) {
    match v {
        Value::Number(x) => {
            let x = x.as_f64().unwrap();
            assert!(x.is_finite(), "{at} = {x}");
        }
        Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, x)| assert_finite(x, &format!("{at}[{i}]"))),
        Value::Object(m) => m
            .iter()
            .for_each(|(k, x)| assert_finite(x, &format!("{at}.{k}"))),
        _ => {}
    }
}

#[test]
fn smollm_augmentation_then_two_osp_iterations() {
    let (Some(gguf), Some(pairs)) = (shared_data(SMOLLM), hh_pairs(6)) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let seed = write_jsonl(&dir.path().join("seed.jsonl"), &pairs[..4]);
    let prompts: Vec<Value> = pairs
        .iter()
        .map(|p| {
            let t = p["chosen"].as_str().unwrap();
            let cut = t.rfind("\n\nAssistant:").unwrap() + "\n\nAssistant:".len();
            json!({ "prompt": &t[..cut] })
        })
        .collect();
    let prompts = write_jsonl(&dir.path().join("prompts.jsonl"), &prompts);
    let q = |p: &std::path::Path| format!("\"{}\"", p.display());

    // Preference augmentation, two steps on four pairs, the chat judge.
    let judge_out = dir.path().join("judge");
    let cfg = JudgeTrainConfig::load(
        None,
        &[
            format!("model.path={}", q(&gguf)),
            format!("data.preferences={}", q(&seed)),
            "data.format=\"hh\"".into(),
            "data.eval_fraction=0.0".into(),
            "judge.chat=true".into(),
            "train.steps=2".into(),
            "train.batch_size=4".into(),
            "train.max_len=256".into(),
            "train.eval_every=0".into(),
            format!("train.out={}", q(&judge_out)),
        ],
    )
    .unwrap();
    let out = run_judge_train(&cfg, false, None).unwrap();
    let adapter = out.output.clone();
    assert!(adapter.join("adapter_model.safetensors").is_file());

    // Two OSP iterations from the augmented model (merged into the base: πref is it).
    let run_out = dir.path().join("osp");
    let cfg = TrainConfig::load(
        None,
        &[
            format!("model.path={}", q(&gguf)),
            format!("model.adapter={}", q(&adapter)),
            format!("data.prompts={}", q(&prompts)),
            "data.eval_fraction=0.34".into(),
            "judge.chat=true".into(),
            "pairing.k=3".into(),
            "sampling.max_new_tokens=8".into(),
            "sampling.stop_strings=[\"\\n\\nHuman:\"]".into(),
            "train.steps=2".into(),
            "train.batch_size=2".into(),
            "train.max_len=256".into(),
            "train.eval_every=2".into(),
            "optim.lr=1e-3".into(),
            format!("train.out={}", q(&run_out)),
        ],
        None,
    )
    .unwrap();
    let mut run = OnlineRun::new(&cfg, false).unwrap();
    let saved = run.run(None, |_| Ok(())).unwrap().expect("finished run");

    // The chat judge's answers are single tokens ("A", "B") in this tokenizer.
    let chat = JudgeConfig {
        chat: true,
        ..Default::default()
    };
    Judge::new(chat, &run.tok).unwrap();
    for a in ["A", "B"] {
        assert_eq!(run.tok.encode(a, false).unwrap().len(), 1, "{a:?}");
    }

    // Every logged number is finite, and both steps and the evaluation were logged.
    let text = std::fs::read_to_string(run_out.join("metrics.jsonl")).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (i, l) in lines.iter().enumerate() {
        assert_finite(l, &format!("metrics line {}", i + 1));
    }
    assert!(lines.iter().filter(|l| l.get("loss").is_some()).count() >= 2);
    let eval = lines
        .iter()
        .find(|l| l.get("eval/win_rate_vs_ref").is_some())
        .expect("an evaluation line");
    assert!(eval["eval/kl"].as_f64().unwrap().is_finite());

    // The adapter round-trips: the saved folder, loaded onto the same start, gives the
    // trained model's logits; and training moved it away from the start.
    let section = ModelSection {
        path: gguf.clone(),
        adapter: Some(adapter.clone()),
        ..Default::default()
    };
    let lora = osp::lora::LoraConfig::from_peft_dir(&saved).unwrap();
    let lm = osp::train::policy::load_policy(&section, &lora, 7, true).unwrap();
    osp::model::load_adapter(&lm.model, &saved).unwrap();
    let ids = run.prompts[0].1.clone();
    let logits = |m: &osp::model::Llama| -> Tensor {
        let dev = m.device().clone();
        let x = Tensor::new(ids.as_slice(), &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let pos: Vec<u32> = (0..ids.len() as u32).collect();
        let pos = Tensor::new(pos.as_slice(), &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let bias = common::causal_bias(ids.len(), &dev);
        let h = m.forward_hidden(&x, &pos, &bias, None).unwrap();
        m.logits(&h.squeeze(0).unwrap()).unwrap()
    };
    let trained = logits(&run.trainer.model);
    let reloaded = logits(&lm.model);
    let start = logits(&lm.model.without_adapter());
    let d = max_abs(&trained, &reloaded);
    assert!(
        d < 1e-4,
        "reloaded adapter differs from the trained model by {d}"
    );
    let moved = max_abs(&trained, &start);
    assert!(
        moved > 1e-3,
        "two steps at lr 1e-3 left the logits within {moved}"
    );
}

/// The README's real-model configs parse with their commands' loaders (a renamed field would
/// otherwise surface only an hour into scripts/real-model.sh).
#[test]
fn real_model_configs_parse() {
    let dir = common::repo().join("configs");
    JudgeTrainConfig::load(Some(&dir.join("real-judge.toml")), &[]).unwrap();
    for name in ["real-osp.toml", "real-self-improve.toml"] {
        let cfg = TrainConfig::load(Some(&dir.join(name)), &[], None).unwrap();
        assert_eq!(cfg.method, osp::train::method::Method::Osp, "{name}");
    }
    let dpo = TrainConfig::load(
        Some(&dir.join("real-osp.toml")),
        &["data.preferences=\"x.jsonl\"".into()],
        Some(osp::train::method::Method::Dpo),
    )
    .unwrap();
    assert_eq!(dpo.loss.kind, osp::loss::LossKind::Dpo);
}
