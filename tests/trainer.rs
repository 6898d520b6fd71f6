//! The shared training loop's non-finite policy: skip leaves the weights untouched, abort
//! stops with a message that the last checkpoint is intact.
mod common;
use candle_core::{Device, Tensor};
use common::*;
use osp::lora::LoraConfig;
use osp::model::Trainable;
use osp::train::config::{OnNonFinite, TrainSection};
use osp::train::optim::OptimConfig;
use osp::train::trainer::Trainer;
use serde_json::Map;

fn snapshot(t: &Trainer) -> Vec<Vec<f32>> {
    t.model
        .vars()
        .iter()
        .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

fn trainer(policy: OnNonFinite, out: &std::path::Path) -> Trainer {
    let model = tiny_model(
        "llama",
        false,
        Trainable::Lora {
            config: LoraConfig {
                r: 2,
                ..Default::default()
            },
            seed: 1,
        },
        4,
    );
    let cfg = TrainSection {
        steps: 5,
        on_nonfinite: policy,
        out: out.to_path_buf(),
        save_every: 1,
        max_len: 64,
        ..Default::default()
    };
    Trainer::new(
        model,
        &OptimConfig {
            lr: 0.1,
            ..Default::default()
        },
        &cfg,
        false,
        "test",
    )
    .unwrap()
    .0
}

fn real_loss(t: &Trainer) -> Tensor {
    let seqs = vec![vec![1u32, 5, 9, 3, 7, 2]];
    let masks = vec![vec![false, false, true, true, true, true]];
    t.model
        .sequence_logps(&seqs, &masks)
        .unwrap()
        .sum_all()
        .unwrap()
        .neg()
        .unwrap()
}

#[test]
fn a_nan_loss_is_skipped_without_touching_the_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = trainer(OnNonFinite::Skip, tmp.path());
    let loss = real_loss(&t);
    t.accumulate(&loss, 6).unwrap();
    assert!(t.finish_step(Map::new()).unwrap().is_some());
    t.maybe_checkpoint(serde_json::json!({}), serde_json::json!({}), false)
        .unwrap();
    let before = snapshot(&t);
    let nan = (real_loss(&t) * f64::NAN).unwrap();
    t.accumulate(&nan, 6).unwrap();
    assert!(t.finish_step(Map::new()).unwrap().is_none());
    assert_eq!(snapshot(&t), before);
    assert_eq!(t.step(), 1);
    // The next good batch trains normally.
    let loss = real_loss(&t);
    t.accumulate(&loss, 6).unwrap();
    assert!(t.finish_step(Map::new()).unwrap().is_some());
    assert_ne!(snapshot(&t), before);
    let log = std::fs::read_to_string(t.metrics_path()).unwrap();
    assert!(log.contains("non-finite loss"), "{log}");
}

#[test]
fn a_nan_loss_aborts_and_keeps_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = trainer(OnNonFinite::Abort, tmp.path());
    let loss = real_loss(&t);
    t.accumulate(&loss, 6).unwrap();
    t.finish_step(Map::new()).unwrap();
    let ckpt = t
        .maybe_checkpoint(serde_json::json!({}), serde_json::json!({}), false)
        .unwrap()
        .unwrap();
    let nan = Tensor::new(f32::NAN, &Device::Cpu).unwrap();
    t.accumulate(&nan, 1).unwrap();
    let e = format!("{:#}", t.finish_step(Map::new()).unwrap_err());
    assert!(e.contains("non-finite loss") && e.contains("intact"), "{e}");
    assert!(ckpt.join("trainable.safetensors").exists());
    assert_eq!(
        osp::train::checkpoint::latest(tmp.path()).unwrap().unwrap(),
        ckpt
    );
}
