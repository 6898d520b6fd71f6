//! osp::ppo against TRL's PPO code run on fixed tensors (fixtures from
//! scripts/make_ppo_fixture.py): rollout post-processing, the clipped losses and their
//! gradients, the logged statistics, temperature-scaled log-probs and entropy; plus the value
//! head and input validation.
mod common;
use candle_core::{Device, Tensor, Var};
use osp::ppo::{
    early_stop, entropy_from_logits, ppo_loss, process_rollout, response_logps, KlEstimator,
    MiniBatch, PpoConfig, PpoStatsLog, Rollout, ValueHead,
};
use serde_json::Value;
use std::path::PathBuf;

const TOL: f64 = 1e-6;

fn fixture(name: &str) -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ppo")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn rows(v: &Value) -> Vec<Vec<f64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect()
}

fn rows32(v: &Value) -> Vec<Vec<f32>> {
    rows(v)
        .into_iter()
        .map(|r| r.into_iter().map(|x| x as f32).collect())
        .collect()
}

fn bools(v: &Value) -> Vec<Vec<bool>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_bool().unwrap())
                .collect()
        })
        .collect()
}

fn vec1(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// |a − b| ≤ TOL·(1 + |b|) everywhere.
fn assert_close(what: &str, ours: &[Vec<f64>], theirs: &[Vec<f64>], tol: f64) {
    assert_eq!(ours.len(), theirs.len(), "{what}: rows");
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert_eq!(a.len(), b.len(), "{what}: row {i} width");
        for (t, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "{what}[{i}][{t}]: osp {x}, TRL {y}"
            );
        }
    }
}

fn assert_close1(what: &str, x: f64, y: f64, tol: f64) {
    assert!(
        (x - y).abs() <= tol * (1.0 + y.abs()),
        "{what}: osp {x}, TRL {y}"
    );
}

fn tensor_rows(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_vec2::<f32>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(f64::from).collect())
        .collect()
}

fn config_from(c: &Value) -> PpoConfig {
    PpoConfig {
        kl_coef: c["kl_coef"].as_f64().unwrap(),
        kl_estimator: match c["kl_estimator"].as_str().unwrap() {
            "k1" => KlEstimator::K1,
            _ => KlEstimator::K3,
        },
        whiten_rewards: c["whiten_rewards"].as_bool().unwrap(),
        missing_eos_penalty: c["missing_eos_penalty"].as_f64(),
        gamma: c["gamma"].as_f64().unwrap(),
        lam: c["lam"].as_f64().unwrap(),
        ..Default::default()
    }
}

struct Inputs {
    logprobs: Vec<Vec<f32>>,
    ref_logprobs: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    lengths: Vec<usize>,
    scores: Vec<f32>,
    contains_eos: Vec<bool>,
}

impl Inputs {
    fn from(f: &Value) -> Self {
        let i = &f["inputs"];
        Self {
            logprobs: rows32(&i["logprobs"]),
            ref_logprobs: rows32(&i["ref_logprobs"]),
            values: rows32(&i["values"]),
            lengths: i["lengths"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect(),
            scores: vec1(&i["scores"]).into_iter().map(|x| x as f32).collect(),
            contains_eos: i["contains_eos"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_bool().unwrap())
                .collect(),
        }
    }

    fn rollout(&self) -> Rollout<'_> {
        Rollout {
            logprobs: &self.logprobs,
            ref_logprobs: &self.ref_logprobs,
            values: &self.values,
            lengths: &self.lengths,
            scores: &self.scores,
            contains_eos: &self.contains_eos,
        }
    }
}

#[test]
fn rollout_processing_matches_trl() {
    let f = fixture("rollout.json");
    let inp = Inputs::from(&f);
    let cases = f["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let cfg = config_from(&case["config"]);
        let p = process_rollout(&cfg, &inp.rollout()).unwrap();
        let o = &case["outputs"];
        assert_eq!(p.response_mask, bools(&o["response_mask"]), "{name}");
        assert_eq!(p.value_mask, bools(&o["value_mask"]), "{name}");
        let s: Vec<Vec<f64>> = vec![p.scores.clone()];
        assert_close(&format!("{name} scores"), &s, &[vec1(&o["scores"])], TOL);
        for (key, ours) in [
            ("logprobs", &p.logprobs),
            ("ref_logprobs", &p.ref_logprobs),
            ("values", &p.values),
            ("kl", &p.kl),
            ("non_score_reward", &p.non_score_reward),
            ("rewards", &p.rewards),
            ("advantages", &p.advantages),
            ("returns", &p.returns),
        ] {
            assert_close(&format!("{name} {key}"), ours, &rows(&o[key]), TOL);
        }
        let m = p.metrics(&inp.contains_eos);
        let t = &case["metrics"];
        assert_close1(
            "objective/kl",
            m.kl,
            t["objective/kl"].as_f64().unwrap(),
            TOL,
        );
        assert_close1(
            "objective/non_score_reward",
            m.non_score_reward,
            t["objective/non_score_reward"].as_f64().unwrap(),
            TOL,
        );
        assert_close1(
            "objective/rlhf_reward",
            m.rlhf_reward,
            t["objective/rlhf_reward"].as_f64().unwrap(),
            TOL,
        );
        assert_close1(
            "objective/scores",
            m.scores,
            t["objective/scores"].as_f64().unwrap(),
            TOL,
        );
        assert_close1(
            "objective/entropy",
            m.entropy,
            t["objective/entropy (response tokens)"].as_f64().unwrap(),
            TOL,
        );
        // TRL's own figure counts −1 for every padding slot (its placeholder log-prob is 1).
        let pad_slots: usize = inp.lengths.iter().map(|&n| p.width - n).sum();
        assert_close1(
            "objective/entropy, TRL's",
            m.entropy - pad_slots as f64 / p.rows() as f64,
            t["objective/entropy (trl, padding included)"]
                .as_f64()
                .unwrap(),
            TOL,
        );
        assert_eq!(
            m.num_eos,
            t["val/num_eos_tokens"].as_u64().unwrap() as usize,
            "{name}"
        );
    }
}

#[test]
fn score_lands_after_the_last_token_unless_the_row_is_full() {
    // One row of 2 tokens in a width of 4, one full row; no KL (same log-probs), zero values.
    let lp = vec![vec![-1.0f32; 4]; 2];
    let v = vec![vec![0.0f32; 4]; 2];
    let r = Rollout {
        logprobs: &lp,
        ref_logprobs: &lp,
        values: &v,
        lengths: &[2, 4],
        scores: &[3.0, 5.0],
        contains_eos: &[true, false],
    };
    let cfg = PpoConfig {
        missing_eos_penalty: Some(1.0),
        ..Default::default()
    };
    let p = process_rollout(&cfg, &r).unwrap();
    assert_eq!(p.rewards[0], vec![0.0, 0.0, 3.0, 0.0]);
    assert_eq!(
        p.rewards[1],
        vec![0.0, 0.0, 0.0, 4.0],
        "penalised, at the last token"
    );
    assert_eq!(p.value_mask[0], vec![true, true, true, false]);
    // γ = 1, λ = 0.95, V = 0: returns are discounted-by-λ sums of rewards.
    let r0 = &p.returns[0];
    assert!((r0[2] - 3.0).abs() < 1e-12 && (r0[1] - 0.95 * 3.0).abs() < 1e-12);
    assert!((r0[0] - 0.95 * 0.95 * 3.0).abs() < 1e-12);
    assert_eq!(p.advantages[0][2], 0.0, "padding has no advantage");
}

#[test]
fn bad_rollouts_are_refused_with_the_row() {
    let lp = vec![vec![-1.0f32; 3]; 2];
    let ok = Rollout {
        logprobs: &lp,
        ref_logprobs: &lp,
        values: &lp,
        lengths: &[3, 2],
        scores: &[1.0, 0.0],
        contains_eos: &[true, true],
    };
    let cfg = PpoConfig::default();
    assert!(process_rollout(&cfg, &ok).is_ok());
    let e = process_rollout(
        &cfg,
        &Rollout {
            lengths: &[3, 0],
            ..ok
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("row 1 has length 0"), "{e}");
    let e = process_rollout(
        &cfg,
        &Rollout {
            lengths: &[3, 4],
            ..ok
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("row 1 has length 4"), "{e}");
    let e = process_rollout(
        &cfg,
        &Rollout {
            scores: &[1.0],
            ..ok
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("scores has 1 rows"), "{e}");
    let e = process_rollout(
        &cfg,
        &Rollout {
            scores: &[1.0, f32::NAN],
            ..ok
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("score 1"), "{e}");
    let nan = vec![vec![-1.0f32, f32::NAN, -1.0], vec![-1.0; 3]];
    let e = process_rollout(
        &cfg,
        &Rollout {
            logprobs: &nan,
            ..ok
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("row 0 has a non-finite"), "{e}");
    // A NaN past a row's length is padding and ignored.
    assert!(process_rollout(
        &cfg,
        &Rollout {
            logprobs: &nan,
            lengths: &[1, 2],
            ..ok
        }
    )
    .is_ok());
    let one = vec![vec![-1.0f32; 3]];
    let single = Rollout {
        logprobs: &one,
        ref_logprobs: &one,
        values: &one,
        lengths: &[1],
        scores: &[1.0],
        contains_eos: &[true],
    };
    let e = process_rollout(&cfg, &single).unwrap_err();
    assert!(e.to_string().contains("at least 2 tokens"), "{e}");
    let bad = PpoConfig {
        lam: 1.5,
        ..Default::default()
    };
    assert!(process_rollout(&bad, &ok)
        .unwrap_err()
        .to_string()
        .contains("ppo.lam"));
}

#[test]
fn losses_gradients_and_stats_match_trl() {
    let f = fixture("loss.json");
    let c = &f["config"];
    let cfg = PpoConfig {
        cliprange: c["cliprange"].as_f64().unwrap(),
        cliprange_value: c["cliprange_value"].as_f64().unwrap(),
        vf_coef: c["vf_coef"].as_f64().unwrap(),
        ..Default::default()
    };
    let m = &f["minibatch"];
    let dev = Device::Cpu;
    let mb = MiniBatch::new(
        &rows(&m["old_logprobs"]),
        &rows(&m["old_values"]),
        &rows(&m["returns"]),
        &rows(&m["advantages"]),
        &bools(&m["response_mask"]),
        &bools(&m["value_mask"]),
        &dev,
    )
    .unwrap();
    let mut log = PpoStatsLog::default();
    for case in f["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let to_var = |k: &str| {
            let r = rows32(&case[k]);
            let (b, t) = (r.len(), r[0].len());
            let flat: Vec<f32> = r.into_iter().flatten().collect();
            Var::from_tensor(&Tensor::from_vec(flat, (b, t), &dev).unwrap()).unwrap()
        };
        let (lp, v) = (to_var("new_logprobs"), to_var("vpred"));
        let out = ppo_loss(&cfg, lp.as_tensor(), v.as_tensor(), &mb).unwrap();
        let s = &case["stats"];
        let loss = out.loss.to_scalar::<f32>().unwrap() as f64;
        assert_close1(
            &format!("{name} loss"),
            loss,
            s["loss"].as_f64().unwrap(),
            TOL,
        );
        for (key, ours) in [
            ("pg_loss", out.stats.pg_loss),
            ("vf_loss", out.stats.vf_loss),
            ("pg_clipfrac", out.stats.pg_clipfrac),
            ("vf_clipfrac", out.stats.vf_clipfrac),
            ("approxkl", out.stats.approxkl),
            ("policykl", out.stats.policykl),
            ("ratio_mean", out.stats.ratio_mean),
        ] {
            assert_close1(
                &format!("{name} {key}"),
                ours,
                s[key].as_f64().unwrap(),
                TOL,
            );
        }
        let g = out.loss.backward().unwrap();
        assert_close(
            &format!("{name} d loss / d new_logprobs"),
            &tensor_rows(g.get(lp.as_tensor()).unwrap()),
            &rows(&case["grad_new_logprobs"]),
            TOL,
        );
        assert_close(
            &format!("{name} d loss / d vpred"),
            &tensor_rows(g.get(v.as_tensor()).unwrap()),
            &rows(&case["grad_vpred"]),
            TOL,
        );
        log.push(out.stats, 0.5);
    }
    let j = log.to_json();
    for key in [
        "policy/approxkl_avg",
        "policy/clipfrac_avg",
        "loss/policy_avg",
        "loss/value_avg",
        "val/clipfrac_avg",
        "policy/entropy_avg",
        "val/ratio",
        "val/ratio_var",
    ] {
        assert!(j[key].as_f64().unwrap().is_finite(), "{key}");
    }
    let cases = f["cases"].as_array().unwrap();
    let want = (cases[0]["stats"]["approxkl"].as_f64().unwrap()
        + cases[1]["stats"]["approxkl"].as_f64().unwrap())
        / 2.0;
    assert_close1(
        "approxkl_avg",
        j["policy/approxkl_avg"].as_f64().unwrap(),
        want,
        TOL,
    );
}

#[test]
fn temperature_log_probs_and_entropy_match_trl() {
    let f = fixture("loss.json");
    let l = &f["logits"];
    let temp = l["temperature"].as_f64().unwrap();
    let v = l["vocab"].as_u64().unwrap() as usize;
    let rows3: Vec<Vec<Vec<f64>>> = l["logits"].as_array().unwrap().iter().map(rows).collect();
    let (b, t) = (rows3.len(), rows3[0].len());
    let flat: Vec<f32> = rows3
        .iter()
        .flatten()
        .flatten()
        .map(|&x| x as f32)
        .collect();
    let logits = Tensor::from_vec(flat, (b, t, v), &Device::Cpu).unwrap();
    let tokens: Vec<u32> = l["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
        })
        .collect();
    let tokens = Tensor::from_vec(tokens, (b, t), &Device::Cpu).unwrap();
    let lp = response_logps(&logits, &tokens, temp).unwrap();
    assert_close(
        "token_logps",
        &tensor_rows(&lp),
        &rows(&l["token_logps"]),
        TOL,
    );
    let scaled = (&logits / (temp + 1e-7)).unwrap();
    let h = entropy_from_logits(&scaled).unwrap();
    assert_close("entropy", &tensor_rows(&h), &rows(&l["entropy_f64"]), TOL);
    // TRL's own float32 evaluation loses about 1e-6 to cancellation.
    assert_close(
        "entropy (TRL, f32)",
        &tensor_rows(&h),
        &rows(&l["entropy"]),
        1e-5,
    );
}

#[test]
fn loss_shapes_are_checked() {
    let dev = Device::Cpu;
    let z = vec![vec![0.0; 3]; 2];
    let m = vec![vec![true; 3]; 2];
    let mb = MiniBatch::new(&z, &z, &z, &z, &m, &m, &dev).unwrap();
    let wrong = Tensor::zeros((2, 4), candle_core::DType::F32, &dev).unwrap();
    let right = Tensor::zeros((2, 3), candle_core::DType::F32, &dev).unwrap();
    let e = ppo_loss(&PpoConfig::default(), &wrong, &right, &mb)
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("new_logprobs has shape [2, 4]"),
        "{e}"
    );
    let none = vec![vec![false; 3]; 2];
    assert!(MiniBatch::new(&z, &z, &z, &z, &none, &m, &dev).is_err());
}

#[test]
fn early_stop_is_trl_0_11s_rule() {
    assert!(!early_stop(None, 100.0));
    assert!(!early_stop(Some(0.1), 0.15));
    assert!(early_stop(Some(0.1), 0.1501));
}

#[test]
fn value_head_is_a_linear_map_with_gradients() {
    let dev = Device::Cpu;
    let head = ValueHead::new(4, 7, &dev).unwrap();
    assert_eq!(head.vars().len(), 2);
    let w: Vec<f32> = head.weight.flatten_all().unwrap().to_vec1().unwrap();
    assert!(w.iter().all(|x| x.abs() <= 0.5) && w.iter().any(|&x| x != 0.0));
    let h = Tensor::arange(0f32, 24.0, &dev)
        .unwrap()
        .reshape((2, 3, 4))
        .unwrap();
    let v = head.forward(&h).unwrap();
    assert_eq!(v.dims(), [2, 3]);
    let b: f32 = head.bias.to_vec1::<f32>().unwrap()[0];
    let by_hand: f32 = (0..4).map(|k| w[k] * (4 + k) as f32).sum::<f32>() + b;
    let got = v.to_vec2::<f32>().unwrap()[0][1];
    assert!((got - by_hand).abs() < 1e-5, "{got} vs {by_hand}");
    let g = v.sum_all().unwrap().backward().unwrap();
    assert!(g.get(&head.weight).is_some() && g.get(&head.bias).is_some());
    // Same seed, same head; bad shapes refused.
    let again = ValueHead::new(4, 7, &dev).unwrap();
    assert_eq!(
        again
            .weight
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        w
    );
    let bad = Tensor::zeros((2, 4), candle_core::DType::F32, &dev).unwrap();
    let e = ValueHead::from_tensors(bad, head.bias.clone(), false)
        .err()
        .unwrap();
    assert!(e.to_string().contains("v_head.summary.weight"), "{e}");
    assert!(head
        .forward(&Tensor::zeros((1, 1, 5), candle_core::DType::F32, &dev).unwrap())
        .is_err());
}

#[test]
fn policy_forward_reads_each_response_token_where_it_is_predicted() {
    use osp::model::Trainable;
    use osp::ppo::{policy_forward, to_rows};
    let lora = osp::lora::LoraConfig {
        r: 4,
        ..Default::default()
    };
    let model = common::tiny_model(
        "llama",
        false,
        Trainable::Lora {
            config: lora,
            seed: 5,
        },
        9,
    );
    // Non-zero B, as after some training.
    for (name, var) in model.vars() {
        if name.contains("lora_B") {
            var.set(&(Tensor::randn(0f32, 0.3, var.dims(), &Device::Cpu).unwrap()))
                .unwrap();
        }
    }
    let head = ValueHead::new(32, 1, &Device::Cpu).unwrap();
    let prompts: Vec<Vec<u32>> = vec![vec![1, 5, 9], vec![1, 7], vec![1, 2, 3, 4]];
    let responses: Vec<Vec<u32>> = vec![vec![11, 12, 2], vec![13, 14, 15, 16], vec![17]];
    let p: Vec<&[u32]> = prompts.iter().map(|x| x.as_slice()).collect();
    let r: Vec<&[u32]> = responses.iter().map(|x| x.as_slice()).collect();
    let width = 5;
    let out = policy_forward(&model, Some(&head), &p, &r, width, 1.0).unwrap();
    let lp = to_rows(&out.logprobs).unwrap();
    let vals = to_rows(out.values.as_ref().unwrap()).unwrap();
    for i in 0..3 {
        let seq = [prompts[i].clone(), responses[i].clone()].concat();
        let mask: Vec<bool> = (0..seq.len()).map(|j| j >= prompts[i].len()).collect();
        let (_, per_token) = model
            .token_logps(std::slice::from_ref(&seq), &[mask])
            .unwrap();
        let per_token: Vec<f32> = per_token.squeeze(0).unwrap().to_vec1().unwrap();
        let b =
            osp::model::TokenBatch::right_padded(std::slice::from_ref(&seq), &Device::Cpu).unwrap();
        let h = model
            .forward_hidden(&b.ids, &b.positions, &b.bias, None)
            .unwrap();
        let v: Vec<f32> = head
            .forward(&h)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        for t in 0..width {
            if t < responses[i].len() {
                let pos = prompts[i].len() + t - 1;
                assert!(
                    (lp[i][t] - per_token[pos]).abs() < 1e-4,
                    "logp row {i} token {t}"
                );
                assert!(
                    (vals[i][t] - v[pos]).abs() < 1e-4,
                    "value row {i} token {t}"
                );
            } else if t == responses[i].len() {
                // The first padding slot's value is read at the last response token.
                assert_eq!(lp[i][t], 0.0, "padding row {i} column {t}");
                let pos = prompts[i].len() + t - 1;
                assert!((vals[i][t] - v[pos]).abs() < 1e-4, "value row {i} slot {t}");
            } else {
                assert_eq!(
                    (lp[i][t], vals[i][t]),
                    (0.0, 0.0),
                    "padding row {i} column {t}"
                );
            }
        }
    }
    assert!(out.entropy_mean > 0.0 && out.entropy_mean <= (40f64).ln() + 1e-6);
    // The pieces compose: rollout → advantages → loss → gradients into adapters and head.
    let zeros = vec![vec![0f32; width]; 3];
    let lengths: Vec<usize> = responses.iter().map(Vec::len).collect();
    let roll = Rollout {
        logprobs: &lp,
        ref_logprobs: &zeros,
        values: &vals,
        lengths: &lengths,
        scores: &[1.0, -0.5, 0.25],
        contains_eos: &[true, false, false],
    };
    let processed = process_rollout(&PpoConfig::default(), &roll).unwrap();
    let mb = processed.minibatch(&[2, 0, 1], &Device::Cpu).unwrap();
    let p2: Vec<&[u32]> = [2, 0, 1].iter().map(|&i| p[i]).collect();
    let r2: Vec<&[u32]> = [2, 0, 1].iter().map(|&i| r[i]).collect();
    let now = policy_forward(&model, Some(&head), &p2, &r2, width, 1.0).unwrap();
    let loss = ppo_loss(
        &PpoConfig::default(),
        &now.logprobs,
        now.values.as_ref().unwrap(),
        &mb,
    )
    .unwrap();
    assert!(loss.stats.approxkl < 1e-9 && (loss.stats.ratio_mean - 1.0).abs() < 1e-6);
    let g = loss.loss.backward().unwrap();
    assert!(g.get(&head.weight).is_some());
    assert!(model.vars().iter().any(|(n, v)| n.contains("lora_A")
        && g.get(v.as_tensor()).is_some_and(|t| t
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0)));
    // Bad inputs.
    assert!(
        policy_forward(&model, None, &p, &r, 3, 1.0).is_err(),
        "a response wider than the rollout"
    );
    assert!(policy_forward(&model, None, &p[..2], &r, 5, 1.0).is_err());
}

#[test]
fn minibatches_partition_the_rollout_each_epoch() {
    let cfg = PpoConfig {
        num_mini_batches: 3,
        ..Default::default()
    };
    let a = cfg.minibatches(12, 7, 0).unwrap();
    assert_eq!(a.len(), 3);
    assert!(a.iter().all(|m| m.len() == 4));
    let mut all: Vec<usize> = a.concat();
    all.sort();
    assert_eq!(all, (0..12).collect::<Vec<_>>());
    assert_eq!(a, cfg.minibatches(12, 7, 0).unwrap(), "deterministic");
    assert_ne!(
        a,
        cfg.minibatches(12, 7, 1).unwrap(),
        "a fresh order per epoch"
    );
    let e = cfg.minibatches(10, 7, 0).unwrap_err();
    assert!(e.to_string().contains("ppo.num_mini_batches = 3"), "{e}");
}
