//! osp's AdamW against torch.optim.AdamW + clip_grad_norm_ + transformers' schedules
//! (fixture from scripts/make_optim_fixture.py), and its behaviour on non-finite gradients,
//! gradient accumulation, checkpoint round trips and bad configs.
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use osp::train::optim::{AdamW, GradAccumulator, OptimConfig, OptimError, Schedule};
use std::collections::HashMap;
use std::path::PathBuf;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/optim")
}

fn fixture_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir().join("adamw.safetensors"), &Device::Cpu).unwrap()
}

fn fixture_meta() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture_dir().join("adamw.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Largest |a - b| / (1 + |b|).
fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    flat(a)
        .iter()
        .zip(flat(b))
        .map(|(x, y)| f64::from((x - y).abs()) / (1.0 + f64::from(y.abs())))
        .fold(0.0, f64::max)
}

fn store(vars: &[(String, Var)], grads: &[Option<Tensor>]) -> GradStore {
    let mut s = GradStore::default();
    for ((_, v), g) in vars.iter().zip(grads) {
        if let Some(g) = g {
            s.insert(v.as_tensor(), g.clone());
        }
    }
    s
}

/// One optimiser step on the given per-parameter gradients (one micro-batch, scale 1).
fn step_with(opt: &mut AdamW, grads: &[Tensor]) -> anyhow::Result<osp::train::optim::StepStats> {
    let mut acc = opt.new_accumulator();
    let gs = store(
        opt.params(),
        &grads.iter().cloned().map(Some).collect::<Vec<_>>(),
    );
    acc.add(opt.params(), &gs, 1.0)?;
    opt.step(&mut acc)
}

fn replay_case(
    case: &serde_json::Value,
    cfg_override: Option<OptimConfig>,
) -> (Vec<Tensor>, AdamW) {
    let tensors = fixture_tensors();
    let name = case["name"].as_str().unwrap();
    let cfg: OptimConfig = serde_json::from_value(case["config"].clone()).unwrap();
    let cfg = cfg_override.unwrap_or(cfg);
    let total = case["total_steps"].as_u64().unwrap() as usize;
    let steps = case["steps"].as_u64().unwrap() as usize;
    let pnames: Vec<String> = case["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let params: Vec<(String, Var)> = pnames
        .iter()
        .map(|p| {
            let init = &tensors[&format!("{name}/init/{p}")];
            (p.clone(), Var::from_tensor(init).unwrap())
        })
        .collect();
    let mut opt = AdamW::new(params, cfg, total).unwrap();
    let mut stats = Vec::new();
    for step in 0..steps {
        let grads: Vec<Tensor> = pnames
            .iter()
            .map(|p| tensors[&format!("{name}/grad/{step}/{p}")].clone())
            .collect();
        assert_eq!(opt.lr_at(step), opt.lr_at(opt.steps_done()));
        stats.push(step_with(&mut opt, &grads).unwrap());
    }
    assert_eq!(opt.steps_done(), steps);
    let finals = opt
        .params()
        .iter()
        .map(|(_, v)| v.as_tensor().clone())
        .collect();
    // Per-step scalars.
    if cfg_is_fixture(case, opt.config()) {
        for (step, s) in stats.iter().enumerate() {
            let lr = case["lrs"][step].as_f64().unwrap();
            let norm = case["grad_norms"][step].as_f64().unwrap();
            let clipped = case["clipped"][step].as_bool().unwrap();
            assert!(
                (s.lr - lr).abs() <= 1e-12 * lr.max(1e-3),
                "{name} step {step}: lr {} vs torch {lr}",
                s.lr
            );
            assert!(
                (s.grad_norm - norm).abs() <= 1e-6 * norm,
                "{name} step {step}: grad norm {} vs torch {norm}",
                s.grad_norm
            );
            assert_eq!(s.clipped, clipped, "{name} step {step}: clipped");
        }
    }
    (finals, opt)
}

fn cfg_is_fixture(case: &serde_json::Value, cfg: &OptimConfig) -> bool {
    let fixture: OptimConfig = serde_json::from_value(case["config"].clone()).unwrap();
    fixture == *cfg
}

#[test]
fn matches_torch_adamw_with_clipping_and_schedules() {
    let meta = fixture_meta();
    let tensors = fixture_tensors();
    let cases = meta["cases"].as_array().unwrap();
    assert!(cases.len() >= 3);
    let mut saw_clip = false;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let (finals, opt) = replay_case(case, None);
        saw_clip |= case["clipped"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c.as_bool().unwrap());
        let state: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
        for ((pname, _), got) in opt.params().iter().zip(&finals) {
            let want = &tensors[&format!("{name}/final/{pname}")];
            let init = &tensors[&format!("{name}/init/{pname}")];
            let err = max_rel(got, want);
            let moved = max_rel(init, want);
            println!("{name} {pname}: final max rel err {err:.2e} (moved {moved:.2e})");
            assert!(
                err <= 1e-6,
                "{name} {pname}: final params differ from torch by {err:e}"
            );
            assert!(
                moved > 1e-3,
                "{name} {pname}: fixture barely moves the parameter"
            );
            for kind in ["exp_avg", "exp_avg_sq"] {
                let want = &tensors[&format!("{name}/{kind}/{pname}")];
                let got = &state[&format!("{kind}.{pname}")];
                // Moments are compared relative to their own scale.
                let scale = flat(want).iter().fold(0f32, |a, x| a.max(x.abs())) as f64;
                let err = max_rel(&(got / scale).unwrap(), &(want / scale).unwrap());
                assert!(
                    err <= 1e-6,
                    "{name} {kind}.{pname}: differs from torch by {err:e}"
                );
            }
        }
    }
    assert!(saw_clip, "the fixture must exercise clipping");
}

/// The fixture is sensitive to the per-tensor decay rule: decaying nothing, or decaying the
/// 1-D bias too, must visibly miss torch.
#[test]
fn fixture_detects_wrong_weight_decay() {
    let meta = fixture_meta();
    let tensors = fixture_tensors();
    let case = &meta["cases"][0];
    let name = case["name"].as_str().unwrap();
    let mut cfg: OptimConfig = serde_json::from_value(case["config"].clone()).unwrap();
    assert!(cfg.weight_decay > 0.0);
    cfg.weight_decay = 0.0;
    let (finals, opt) = replay_case(case, Some(cfg));
    let worst = opt
        .params()
        .iter()
        .zip(&finals)
        .map(|((p, _), got)| max_rel(got, &tensors[&format!("{name}/final/{p}")]))
        .fold(0.0, f64::max);
    assert!(worst > 1e-4, "weight decay makes only {worst:e} difference");
}

#[test]
fn schedules_match_transformers() {
    let meta = fixture_meta();
    for s in meta["schedules"].as_array().unwrap() {
        let schedule: Schedule = serde_json::from_value(s["schedule"].clone()).unwrap();
        let cfg = OptimConfig {
            lr: 1.0,
            schedule,
            warmup_steps: s["warmup_steps"].as_u64().unwrap() as usize,
            min_lr_ratio: s["min_lr_ratio"].as_f64().unwrap(),
            ..Default::default()
        };
        let total = s["total_steps"].as_u64().unwrap() as usize;
        for (step, want) in s["factors"].as_array().unwrap().iter().enumerate() {
            let want = want.as_f64().unwrap();
            let got = cfg.lr_factor(step, total);
            assert!(
                (got - want).abs() <= 1e-12,
                "{s}: step {step}: factor {got} vs transformers {want}"
            );
        }
    }
}

#[test]
fn decay_holds_its_floor_after_total_steps() {
    for schedule in [Schedule::Linear, Schedule::Cosine] {
        let cfg = OptimConfig {
            lr: 2.0,
            schedule,
            warmup_steps: 2,
            min_lr_ratio: 0.1,
            ..Default::default()
        };
        for step in 10..30 {
            assert!(
                (cfg.lr_at(step, 10) - 0.2).abs() < 1e-12,
                "{schedule:?} step {step}"
            );
        }
        assert_eq!(cfg.lr_at(0, 10), 0.0);
        assert_eq!(cfg.lr_at(1, 10), 1.0);
        assert_eq!(cfg.lr_at(2, 10), 2.0);
    }
    let constant = OptimConfig {
        schedule: Schedule::Constant,
        min_lr_ratio: 0.5,
        ..Default::default()
    };
    assert_eq!(constant.lr_at(0, 3), constant.lr);
    assert_eq!(constant.lr_at(100, 3), constant.lr);
}

// ---- synthetic parameters for the behavioural tests ----

/// Deterministic pseudo-random values in about [-1, 1].
fn values(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 + 1.0) * 12.9898 + seed * 78.233).sin())
        .collect()
}

fn tensor(shape: &[usize], seed: f32, scale: f32) -> Tensor {
    let n = shape.iter().product();
    let v: Vec<f32> = values(n, seed).into_iter().map(|x| x * scale).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

const SHAPES: [(&str, &[usize]); 3] = [
    ("layer.weight", &[4, 3]),
    ("layer.bias", &[5]),
    ("conv.weight", &[2, 3, 2]),
];

fn make_params() -> Vec<(String, Var)> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, (n, s))| {
            (
                n.to_string(),
                Var::from_tensor(&tensor(s, i as f32, 1.0)).unwrap(),
            )
        })
        .collect()
}

fn grads_for(step: usize, scale: f32) -> Vec<Tensor> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, (_, s))| tensor(s, 100.0 + (step * 7 + i) as f32, scale))
        .collect()
}

fn test_cfg() -> OptimConfig {
    OptimConfig {
        lr: 0.05,
        weight_decay: 0.1,
        max_grad_norm: 1.0,
        warmup_steps: 1,
        schedule: Schedule::Cosine,
        min_lr_ratio: 0.05,
        ..Default::default()
    }
}

fn weights(opt: &AdamW) -> Vec<Vec<f32>> {
    opt.params()
        .iter()
        .map(|(_, v)| flat(v.as_tensor()))
        .collect()
}

fn state(opt: &AdamW) -> Vec<(String, Vec<f32>)> {
    opt.state_tensors()
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, flat(&t)))
        .collect()
}

fn with_value(t: &Tensor, idx: usize, x: f32) -> Tensor {
    let mut v = flat(t);
    v[idx] = x;
    Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap()
}

#[test]
fn non_finite_gradient_is_refused_without_changes() {
    let mut opt = AdamW::new(make_params(), test_cfg(), 10).unwrap();
    step_with(&mut opt, &grads_for(0, 1.0)).unwrap();
    step_with(&mut opt, &grads_for(1, 1.0)).unwrap();
    let (w0, s0) = (weights(&opt), state(&opt));
    for (which, bad) in [(1, f32::NAN), (2, f32::INFINITY), (0, f32::NEG_INFINITY)] {
        let mut grads = grads_for(2, 1.0);
        grads[which] = with_value(&grads[which], 3, bad);
        let mut acc = opt.new_accumulator();
        acc.add(
            opt.params(),
            &store(
                opt.params(),
                &grads.into_iter().map(Some).collect::<Vec<_>>(),
            ),
            1.0,
        )
        .unwrap();
        let err = opt.step(&mut acc).unwrap_err();
        let msg = err.to_string();
        let pname = SHAPES[which].0;
        assert!(msg.contains("non-finite gradient"), "{msg}");
        assert!(msg.contains(&format!("`{pname}`")), "{msg}");
        assert_eq!(
            err.downcast_ref::<OptimError>(),
            Some(&OptimError::NonFiniteGradient {
                param: pname.to_string()
            })
        );
        assert_eq!(
            acc.micro_batches(),
            0,
            "the poisoned accumulator is cleared"
        );
        assert_eq!(opt.steps_done(), 2);
        // Bitwise unchanged (NaN-free, so == is exact).
        assert_eq!(weights(&opt), w0);
        assert_eq!(state(&opt), s0);
    }
    // The optimiser goes on normally afterwards.
    let stats = step_with(&mut opt, &grads_for(2, 1.0)).unwrap();
    assert!(stats.grad_norm.is_finite());
    assert_eq!(opt.steps_done(), 3);
    assert_ne!(weights(&opt), w0);
}

#[test]
fn huge_finite_gradient_is_clipped_not_refused() {
    // Squares overflow f32 (1e20^2 > 3.4e38); the norm must still be finite and clipping
    // must bring the step back to a normal size.
    let mut opt = AdamW::new(make_params(), test_cfg(), 10).unwrap();
    let w0 = weights(&opt);
    let stats = step_with(&mut opt, &grads_for(0, 1e20)).unwrap();
    assert!(stats.clipped);
    assert!(
        stats.grad_norm.is_finite() && stats.grad_norm > 1e20,
        "{}",
        stats.grad_norm
    );
    // Warm-up 1: the first step has lr 0, weights stay; the second moves them.
    assert_eq!(weights(&opt), w0);
    step_with(&mut opt, &grads_for(1, 1e20)).unwrap();
    for (a, b) in weights(&opt).iter().zip(&w0) {
        for (x, y) in a.iter().zip(b) {
            assert!(x.is_finite() && (x - y).abs() < 0.2, "{x} vs {y}");
        }
    }
}

#[test]
fn accumulating_two_half_scaled_micro_batches_equals_the_average() {
    let cfg = test_cfg();
    let mut a = AdamW::new(make_params(), cfg.clone(), 5).unwrap();
    let mut b = AdamW::new(make_params(), cfg, 5).unwrap();
    for step in 0..3 {
        let g1 = grads_for(2 * step, 1.5);
        let g2 = grads_for(2 * step + 1, 1.5);
        // The second micro-batch has no gradient for the bias: it contributes zero.
        let mut g2_opt: Vec<Option<Tensor>> = g2.iter().cloned().map(Some).collect();
        g2_opt[1] = None;
        let mut acc = a.new_accumulator();
        acc.add(
            a.params(),
            &store(
                a.params(),
                &g1.iter().cloned().map(Some).collect::<Vec<_>>(),
            ),
            0.5,
        )
        .unwrap();
        acc.add(a.params(), &store(a.params(), &g2_opt), 0.5)
            .unwrap();
        assert_eq!(acc.micro_batches(), 2);
        let sa = a.step(&mut acc).unwrap();
        assert_eq!(acc.micro_batches(), 0);
        assert!(acc.grads().iter().all(Option::is_none));

        let avg: Vec<Tensor> = g1
            .iter()
            .zip(&g2_opt)
            .map(|(x, y)| match y {
                Some(y) => ((x + y).unwrap() / 2.0).unwrap(),
                None => (x / 2.0).unwrap(),
            })
            .collect();
        let sb = step_with(&mut b, &avg).unwrap();
        assert!((sa.grad_norm - sb.grad_norm).abs() <= 1e-6 * sb.grad_norm);
        assert_eq!(sa.lr, sb.lr);
        assert_eq!(sa.clipped, sb.clipped);
        for ((_, va), (_, vb)) in a.params().iter().zip(b.params()) {
            let err = max_rel(va.as_tensor(), vb.as_tensor());
            assert!(err <= 1e-6, "step {step}: {err:e}");
        }
    }
}

#[test]
fn accumulator_reads_a_real_backward_pass() {
    let params = make_params();
    let w = params[0].1.as_tensor();
    let b = params[1].1.as_tensor();
    let x = tensor(&[3, 2], 9.0, 1.0);
    // loss = sum((W x)^2) + sum(b); conv.weight is unused and gets no gradient.
    let loss =
        (w.matmul(&x).unwrap().sqr().unwrap().sum_all().unwrap() + b.sum_all().unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    let mut acc = GradAccumulator::new(params.len());
    acc.add(&params, &grads, 1.0).unwrap();
    acc.add(&params, &grads, 0.25).unwrap();
    let got = acc.grads();
    let want_w = (grads.get(w).unwrap() * 1.25).unwrap();
    assert!(max_rel(got[0].as_ref().unwrap(), &want_w) < 1e-6);
    assert_eq!(flat(got[1].as_ref().unwrap()), vec![1.25f32; 5]);
    assert!(got[2].is_none());
    let norm = acc.grad_norm().unwrap();
    let want = osp::train::optim::global_grad_norm(&[
        want_w,
        Tensor::full(1.25f32, 5, &Device::Cpu).unwrap(),
    ])
    .unwrap();
    assert!((norm - want).abs() < 1e-6 * want);

    // Other vars or another count are rejected.
    let other = make_params();
    let err = acc.add(&other, &grads, 1.0).unwrap_err().to_string();
    assert!(err.contains("not the parameters"), "{err}");
    assert!(acc.add(&params[..2], &grads, 1.0).is_err());
    assert_eq!(acc.micro_batches(), 2);
    let mut opt = AdamW::new(other, test_cfg(), 3).unwrap();
    let err = opt.step(&mut acc).unwrap_err().to_string();
    assert!(err.contains("other parameters"), "{err}");
    let mut empty = opt.new_accumulator();
    assert!(opt
        .step(&mut empty)
        .unwrap_err()
        .to_string()
        .contains("empty"));
}

#[test]
fn state_round_trip_continues_identically() {
    let cfg = test_cfg();
    let total = 6;
    let mut straight = AdamW::new(make_params(), cfg.clone(), total).unwrap();
    for step in 0..6 {
        step_with(&mut straight, &grads_for(step, 2.0)).unwrap();
    }

    let mut first = AdamW::new(make_params(), cfg.clone(), total).unwrap();
    for step in 0..3 {
        step_with(&mut first, &grads_for(step, 2.0)).unwrap();
    }
    // Through a safetensors file, as a checkpoint would.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optim.safetensors");
    let mut to_save: HashMap<String, Tensor> = first.state_tensors().unwrap().into_iter().collect();
    assert_eq!(to_save.len(), 6);
    assert!(
        to_save.contains_key("exp_avg.layer.weight")
            && to_save.contains_key("exp_avg_sq.conv.weight")
    );
    for (name, var) in first.params() {
        to_save.insert(format!("param.{name}"), var.as_tensor().clone());
    }
    candle_core::safetensors::save(&to_save, &path).unwrap();
    let loaded = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();

    let params: Vec<(String, Var)> = SHAPES
        .iter()
        .map(|(n, _)| {
            (
                n.to_string(),
                Var::from_tensor(&loaded[&format!("param.{n}")]).unwrap(),
            )
        })
        .collect();
    let mut resumed = AdamW::new(params, cfg, total).unwrap();
    resumed.load_state(&loaded, first.steps_done()).unwrap();
    assert_eq!(resumed.steps_done(), 3);
    for step in 3..6 {
        step_with(&mut resumed, &grads_for(step, 2.0)).unwrap();
    }
    assert_eq!(weights(&resumed), weights(&straight));
    assert_eq!(state(&resumed), state(&straight));
}

#[test]
fn load_state_names_missing_misshapen_and_stray_tensors() {
    let mut opt = AdamW::new(make_params(), test_cfg(), 4).unwrap();
    let good: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();

    let mut missing = good.clone();
    missing.remove("exp_avg_sq.layer.bias");
    let err = opt.load_state(&missing, 2).unwrap_err().to_string();
    assert!(err.contains("`exp_avg_sq.layer.bias` is missing"), "{err}");

    let mut misshapen = good.clone();
    misshapen.insert(
        "exp_avg.layer.weight".into(),
        Tensor::zeros((3, 4), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    misshapen.insert(
        "exp_avg.extra.weight".into(),
        Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let err = opt.load_state(&misshapen, 2).unwrap_err().to_string();
    assert!(
        err.contains("`exp_avg.layer.weight` has shape [3, 4]"),
        "{err}"
    );
    assert!(err.contains("`exp_avg.extra.weight`"), "{err}");
    assert_eq!(opt.steps_done(), 0, "a failed load changes nothing");

    // Unrelated names (model weights in the same file) are ignored.
    let mut extra = good;
    extra.insert(
        "model.layer.weight".into(),
        Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    opt.load_state(&extra, 2).unwrap();
    assert_eq!(opt.steps_done(), 2);
}

#[test]
fn config_validation_names_the_field() {
    type Spoil = fn(&mut OptimConfig);
    let cases: Vec<(&str, Spoil)> = vec![
        ("lr", |c| c.lr = 0.0),
        ("lr", |c| c.lr = f64::NAN),
        ("weight_decay", |c| c.weight_decay = -0.1),
        ("beta1", |c| c.beta1 = 1.0),
        ("beta2", |c| c.beta2 = -0.5),
        ("eps", |c| c.eps = 0.0),
        ("max_grad_norm", |c| c.max_grad_norm = -1.0),
        ("max_grad_norm", |c| c.max_grad_norm = f64::INFINITY),
        ("min_lr_ratio", |c| c.min_lr_ratio = 1.5),
    ];
    for (field, bad) in cases {
        let mut cfg = OptimConfig::default();
        bad(&mut cfg);
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(&format!("`{field}`")), "{field}: {err}");
        let err = AdamW::new(make_params(), cfg, 10)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(&format!("`{field}`")), "{field}: {err}");
    }
    OptimConfig::default().validate().unwrap();

    let err = AdamW::new(make_params(), OptimConfig::default(), 0)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("total_steps"), "{err}");
    let mut dup = make_params();
    dup.push((
        "layer.bias".into(),
        Var::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap(),
    ));
    let err = AdamW::new(dup, OptimConfig::default(), 5)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("`layer.bias` appears twice"), "{err}");
    assert!(AdamW::new(vec![], OptimConfig::default(), 5).is_err());
}

#[test]
fn config_reads_from_toml_with_defaults() {
    let cfg: OptimConfig = toml::from_str("").unwrap();
    assert_eq!(cfg, OptimConfig::default());
    assert_eq!(cfg.lr, 1e-4);
    assert_eq!(cfg.max_grad_norm, 1.0);
    assert_eq!(cfg.schedule, Schedule::Cosine);
    let cfg: OptimConfig = toml::from_str(
        "lr = 3e-4\nweight_decay = 0.01\nwarmup_steps = 10\nschedule = \"linear\"\n",
    )
    .unwrap();
    assert_eq!(
        (cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.schedule),
        (3e-4, 0.01, 10, Schedule::Linear)
    );
    assert_eq!(cfg.beta2, 0.999);
    let c: OptimConfig = toml::from_str("schedule = \"constant\"").unwrap();
    assert_eq!(c.schedule, Schedule::Constant);
    let err = toml::from_str::<OptimConfig>("learning_rate = 1e-3")
        .unwrap_err()
        .to_string();
    assert!(err.contains("learning_rate"), "{err}");
    assert!(toml::from_str::<OptimConfig>("schedule = \"exponential\"").is_err());
    // Round trip through TOML.
    let text = toml::to_string(&cfg).unwrap();
    assert_eq!(toml::from_str::<OptimConfig>(&text).unwrap(), cfg);
}

#[test]
fn bias_and_norm_weights_are_not_decayed() {
    // Zero gradients: Adam's update is 0, so only decay can move a weight.
    let cfg = OptimConfig {
        lr: 0.1,
        weight_decay: 0.5,
        schedule: Schedule::Constant,
        ..Default::default()
    };
    let mut opt = AdamW::new(make_params(), cfg, 3).unwrap();
    let w0 = weights(&opt);
    let zeros: Vec<Tensor> = opt
        .params()
        .iter()
        .map(|(_, v)| v.as_tensor().zeros_like().unwrap())
        .collect();
    let stats = step_with(&mut opt, &zeros).unwrap();
    assert_eq!(stats.grad_norm, 0.0);
    assert!(!stats.clipped);
    let w1 = weights(&opt);
    assert_eq!(w1[1], w0[1], "the 1-D bias must not decay");
    for i in [0, 2] {
        for (a, b) in w1[i].iter().zip(&w0[i]) {
            assert!(
                (a - b * 0.95).abs() <= 1e-7,
                "rank>=2 tensor {i}: {a} vs {}",
                b * 0.95
            );
        }
    }
}

#[test]
fn tiny_learning_rate_stays_finite() {
    // step_size below f32's range takes the unfolded update path; it must not produce
    // 0 * inf = NaN for zero weights or zero second moments.
    let cfg = OptimConfig {
        lr: 1e-40,
        schedule: Schedule::Constant,
        weight_decay: 0.1,
        ..Default::default()
    };
    let params: Vec<(String, Var)> = SHAPES
        .iter()
        .map(|(n, s)| {
            (
                n.to_string(),
                Var::zeros(*s, candle_core::DType::F32, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    let mut opt = AdamW::new(params, cfg, 3).unwrap();
    let mut grads = grads_for(0, 1.0);
    grads[1] = grads[1].zeros_like().unwrap();
    step_with(&mut opt, &grads).unwrap();
    for w in weights(&opt) {
        assert!(w.iter().all(|x| x.is_finite() && x.abs() < 1e-30), "{w:?}");
    }
}
