//! osp::loss against TRL's loss code and torch autograd (fixture from
//! scripts/make_loss_fixture.py), plus the analytic properties of SPCE (OSP.md §3), the
//! TRL-named metrics, input validation and numerical stability.
use candle_core::{DType, Device, Tensor, Var};
use osp::loss::{log_sigmoid, preference_loss, LossConfig, LossKind, LossMetrics, PairLogps};
use std::collections::HashMap;
use std::path::PathBuf;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/loss")
}

fn fixture_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir().join("loss.safetensors"), &Device::Cpu).unwrap()
}

fn fixture_meta() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture_dir().join("loss.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn vec32(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn vec64(t: &Tensor) -> Vec<f64> {
    vec32(t).into_iter().map(f64::from).collect()
}

/// |a - b| / (1 + |b|).
fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / (1.0 + b.abs())
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| rel(*x, *y))
        .fold(0.0, f64::max)
}

fn t32(v: &[f64]) -> Tensor {
    let v: Vec<f32> = v.iter().map(|x| *x as f32).collect();
    Tensor::new(v.as_slice(), &Device::Cpu).unwrap()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Policy log-probs as trainable variables, reference log-probs as constants.
struct Batch {
    pc: Var,
    pr: Var,
    rc: Tensor,
    rr: Tensor,
}

impl Batch {
    fn new(pc: &Tensor, pr: &Tensor, rc: &Tensor, rr: &Tensor) -> Self {
        Self {
            pc: Var::from_tensor(pc).unwrap(),
            pr: Var::from_tensor(pr).unwrap(),
            rc: rc.clone(),
            rr: rr.clone(),
        }
    }

    fn from_f64(pc: &[f64], pr: &[f64], rc: &[f64], rr: &[f64]) -> Self {
        Self::new(&t32(pc), &t32(pr), &t32(rc), &t32(rr))
    }

    fn fixture(t: &HashMap<String, Tensor>) -> Self {
        Self::new(
            &t["inputs/policy_chosen"],
            &t["inputs/policy_rejected"],
            &t["inputs/ref_chosen"],
            &t["inputs/ref_rejected"],
        )
    }

    fn logps(&self) -> PairLogps<'_> {
        PairLogps {
            policy_chosen: self.pc.as_tensor(),
            policy_rejected: self.pr.as_tensor(),
            ref_chosen: &self.rc,
            ref_rejected: &self.rr,
        }
    }

    /// (loss, d loss / d policy_chosen, d loss / d policy_rejected, metrics).
    fn run(&self, cfg: &LossConfig, s: Option<&Tensor>) -> (f32, Vec<f32>, Vec<f32>, LossMetrics) {
        let out = preference_loss(cfg, &self.logps(), s).unwrap();
        assert_eq!(out.loss.rank(), 0, "the loss is a scalar");
        let grads = out.loss.backward().unwrap();
        let gc = vec32(
            grads
                .get(self.pc.as_tensor())
                .expect("grad for policy_chosen"),
        );
        let gr = vec32(
            grads
                .get(self.pr.as_tensor())
                .expect("grad for policy_rejected"),
        );
        (out.loss.to_scalar::<f32>().unwrap(), gc, gr, out.metrics)
    }

    /// log-ratio differences (h / β), in f64.
    fn logits(&self) -> Vec<f64> {
        let (pc, pr, rc, rr) = (
            vec64(self.pc.as_tensor()),
            vec64(self.pr.as_tensor()),
            vec64(&self.rc),
            vec64(&self.rr),
        );
        (0..pc.len())
            .map(|i| (pc[i] - rc[i]) - (pr[i] - rr[i]))
            .collect()
    }
}

fn cfg(kind: LossKind, beta: f64, label_smoothing: f64) -> LossConfig {
    LossConfig {
        kind,
        beta,
        label_smoothing,
    }
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|x| f64::from(*x)).collect()
}

#[test]
fn matches_trl_and_torch_fixture() {
    let t = fixture_tensors();
    let meta = fixture_meta();
    let batch = Batch::fixture(&t);
    let strength = &t["inputs/strength"];
    let cases = meta["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 12);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let c: LossConfig = serde_json::from_value(case["config"].clone()).unwrap();
        let s = (c.kind == LossKind::Spce).then_some(strength);
        let (loss, gc, gr, metrics) = batch.run(&c, s);
        let want = case["loss"].as_f64().unwrap();
        assert!(
            rel(f64::from(loss), want) < 1e-6,
            "{name}: loss {loss} vs {want}"
        );
        let want_gc = vec64(&t[&format!("{name}/grad_policy_chosen")]);
        let want_gr = vec64(&t[&format!("{name}/grad_policy_rejected")]);
        let e = max_rel(&to64(&gc), &want_gc).max(max_rel(&to64(&gr), &want_gr));
        assert!(
            e < 1e-6,
            "{name}: gradients differ by {e}: {gc:?} / {gr:?} vs {want_gc:?} / {want_gr:?}"
        );
        // TRL's own logged metrics (strength/mean from torch for SPCE), same key set.
        let got = metrics.to_json();
        let want_m = case["metrics"].as_object().unwrap();
        let mut got_keys: Vec<_> = got.keys().collect();
        let mut want_keys: Vec<_> = want_m.keys().collect();
        got_keys.sort();
        want_keys.sort();
        assert_eq!(got_keys, want_keys, "{name}: metric names");
        for (k, v) in want_m {
            let (a, b) = (got[k].as_f64().unwrap(), v.as_f64().unwrap());
            assert!(rel(a, b) < 1e-6, "{name}: {k} = {a}, TRL {b}");
        }
        assert_eq!(metrics.n_pairs, 6);
    }
}

#[test]
fn fixture_covers_zero_and_large_h() {
    let t = fixture_tensors();
    let logits = Batch::fixture(&t).logits();
    assert_eq!(logits[0], 0.0, "pair 0 has policy == reference");
    assert!(logits[4] >= 500.0 && logits[5] <= -500.0, "{logits:?}");
}

#[test]
fn spce_with_strength_one_is_dpo_exactly() {
    let t = fixture_tensors();
    let batch = Batch::fixture(&t);
    let ones = Tensor::ones(6, DType::F32, &Device::Cpu).unwrap();
    for beta in [0.1, 0.5, 2.0] {
        let dpo = batch.run(&cfg(LossKind::Dpo, beta, 0.0), None);
        let spce = batch.run(&cfg(LossKind::Spce, beta, 0.0), Some(&ones));
        assert_eq!(
            dpo.0.to_bits(),
            spce.0.to_bits(),
            "beta {beta}: loss {} vs {}",
            dpo.0,
            spce.0
        );
        assert_eq!(dpo.1, spce.1, "beta {beta}: grad policy_chosen");
        assert_eq!(dpo.2, spce.2, "beta {beta}: grad policy_rejected");
        // cDPO is SPCE with s = 1 - ε (different op order, so to rounding).
        let eps = 0.2;
        let cdpo = batch.run(&cfg(LossKind::Cdpo, beta, eps), None);
        let s = Tensor::full((1.0 - eps) as f32, 6, &Device::Cpu).unwrap();
        let spce = batch.run(&cfg(LossKind::Spce, beta, 0.0), Some(&s));
        assert!(rel(f64::from(cdpo.0), f64::from(spce.0)) < 1e-6);
        assert!(max_rel(&to64(&cdpo.1), &to64(&spce.1)) < 1e-6);
        assert!(max_rel(&to64(&cdpo.2), &to64(&spce.2)) < 1e-6);
        // And cDPO with ε = 0 is DPO.
        let cdpo0 = batch.run(&cfg(LossKind::Cdpo, beta, 0.0), None);
        assert_eq!(cdpo0.0.to_bits(), dpo.0.to_bits());
        assert_eq!((cdpo0.1, cdpo0.2), (dpo.1, dpo.2));
    }
}

#[test]
fn spce_gradient_is_minus_beta_s_minus_sigma_h_over_n() {
    let t = fixture_tensors();
    let batch = Batch::fixture(&t);
    let s = vec64(&t["inputs/strength"]);
    let logits = batch.logits();
    let n = s.len() as f64;
    for beta in [0.1, 0.5] {
        let (_, gc, gr, _) =
            batch.run(&cfg(LossKind::Spce, beta, 0.0), Some(&t["inputs/strength"]));
        let want: Vec<f64> = (0..s.len())
            .map(|i| -beta * (s[i] - sigmoid(beta * logits[i])) / n)
            .collect();
        let minus: Vec<f64> = want.iter().map(|g| -g).collect();
        assert!(
            max_rel(&to64(&gc), &want) < 1e-6,
            "beta {beta}: {gc:?} vs {want:?}"
        );
        assert!(
            max_rel(&to64(&gr), &minus) < 1e-6,
            "beta {beta}: {gr:?} vs {minus:?}"
        );
    }
}

#[test]
fn spce_gradient_vanishes_where_sigma_h_equals_s_and_flips_past_it() {
    let beta = 0.5;
    // Chosen log-ratio differences; reference fixed, policy moved.
    let logits = [0.0, 1.4, -2.6, 4.0, -0.3];
    let rc = [-10.0, -12.0, -8.0, -15.0, -9.0];
    let rr = [-11.0, -9.0, -14.0, -10.0, -7.5];
    let pr = [-11.0, -9.5, -13.0, -10.0, -7.5];
    let pc: Vec<f64> = (0..5)
        .map(|i| logits[i] + rc[i] + (pr[i] - rr[i]))
        .collect();
    let batch = Batch::from_f64(&pc, &pr, &rc, &rr);
    let h: Vec<f64> = batch.logits().iter().map(|l| beta * l).collect();
    let s_eq: Vec<f64> = h.iter().map(|h| sigmoid(*h)).collect();
    let spce = cfg(LossKind::Spce, beta, 0.0);
    let (_, gc, gr, _) = batch.run(&spce, Some(&t32(&s_eq)));
    // Pair 0: h = 0 and s = 1/2 exactly: an exact zero (log σ'(0) = 1/2).
    assert_eq!((gc[0], gr[0]), (0.0, 0.0));
    for i in 0..5 {
        assert!(
            gc[i].abs() < 1e-7 && gr[i].abs() < 1e-7,
            "pair {i}: {} {}",
            gc[i],
            gr[i]
        );
    }
    // s above σ(h): the loss pulls the chosen log-prob up (negative gradient), below: down.
    let up: Vec<f64> = s_eq.iter().map(|s| (s + 0.05).min(1.0)).collect();
    let down: Vec<f64> = s_eq.iter().map(|s| (s - 0.05).max(0.0)).collect();
    let (_, gc_up, gr_up, _) = batch.run(&spce, Some(&t32(&up)));
    let (_, gc_down, gr_down, _) = batch.run(&spce, Some(&t32(&down)));
    for i in 0..5 {
        assert!(gc_up[i] < 0.0 && gr_up[i] > 0.0, "pair {i}");
        assert!(gc_down[i] > 0.0 && gr_down[i] < 0.0, "pair {i}");
    }
    // DPO never stops: at h = 0 its gradient is -β/2 per pair (the torch convention at 0).
    let (_, gc, _, _) = batch.run(&cfg(LossKind::Dpo, beta, 0.0), None);
    assert!(
        (f64::from(gc[0]) - (-beta * 0.5 / 5.0)).abs() < 1e-8,
        "{}",
        gc[0]
    );
}

#[test]
fn metrics_and_losses_match_hand_computation() {
    let beta = 0.5;
    let batch = Batch::from_f64(
        &[-1.0, -2.0, -3.0],
        &[-4.0, -1.0, -2.0],
        &[-1.5, -2.0, -1.0],
        &[-3.0, -1.0, -2.0],
    );
    // rewards chosen β(pc - rc) = [0.25, 0, -1]; rejected β(pr - rr) = [-0.5, 0, 0];
    // h = [0.75, 0, -1]; pair 1 is a tie, which TRL does not count as accurate.
    let s = t32(&[0.2, 0.5, 1.0]);
    let (loss, _, _, m) = batch.run(&cfg(LossKind::Spce, beta, 0.0), Some(&s));
    let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
    assert_eq!(m.n_pairs, 3);
    assert!(close(m.rewards_chosen, -0.25), "{m:?}");
    assert!(close(m.rewards_rejected, -1.0 / 6.0), "{m:?}");
    assert!(close(m.rewards_margins, -0.25 / 3.0), "{m:?}");
    assert!(close(m.rewards_accuracies, 1.0 / 3.0), "{m:?}");
    assert!(close(m.logps_chosen, -2.0), "{m:?}");
    assert!(close(m.logps_rejected, -7.0 / 3.0), "{m:?}");
    assert!(close(m.strength_mean.unwrap(), 1.7 / 3.0), "{m:?}");
    let json = m.to_json();
    let keys: Vec<&str> = json.keys().map(String::as_str).collect();
    for k in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "strength/mean",
    ] {
        assert!(keys.contains(&k), "{k} missing from {keys:?}");
    }
    assert_eq!(keys.len(), 7);
    assert!(close(
        json["rewards/accuracies"].as_f64().unwrap(),
        1.0 / 3.0
    ));

    let h = [0.75, 0.0, -1.0];
    let sv = [0.2, 0.5, 1.0];
    let ls = |x: f64| -(1.0 + (-x).exp()).ln();
    let spce: f64 = (0..3)
        .map(|i| -(sv[i] * ls(h[i]) + (1.0 - sv[i]) * ls(-h[i])))
        .sum::<f64>()
        / 3.0;
    assert!(close(f64::from(loss), spce), "spce {loss} vs {spce}");

    let dpo: f64 = h.iter().map(|h| -ls(*h)).sum::<f64>() / 3.0;
    let (loss, _, _, m_dpo) = batch.run(&cfg(LossKind::Dpo, beta, 0.0), None);
    assert!(close(f64::from(loss), dpo));
    assert_eq!(m_dpo.strength_mean, None);
    assert!(!m_dpo.to_json().contains_key("strength/mean"));
    assert_eq!(m_dpo.to_json().len(), 6);

    // IPO: (h/β - 1/(2β))² = ([1.5, 0, -2] - 1)² = [0.25, 1, 9].
    let (loss, _, _, _) = batch.run(&cfg(LossKind::Ipo, beta, 0.0), None);
    assert!(close(f64::from(loss), 10.25 / 3.0), "ipo {loss}");
    // Hinge: max(0, 1 - h) = [0.25, 1, 2].
    let (loss, _, _, _) = batch.run(&cfg(LossKind::Hinge, beta, 0.0), None);
    assert!(close(f64::from(loss), 3.25 / 3.0), "hinge {loss}");
    // cDPO with ε = 0.1.
    let cdpo: f64 = h.iter().map(|h| -0.9 * ls(*h) - 0.1 * ls(-h)).sum::<f64>() / 3.0;
    let (loss, _, _, _) = batch.run(&cfg(LossKind::Cdpo, beta, 0.1), None);
    assert!(close(f64::from(loss), cdpo), "cdpo {loss} vs {cdpo}");
    // A strength passed to a loss that does not use it only shows up in the metrics.
    let (loss2, _, _, m2) = batch.run(&cfg(LossKind::Cdpo, beta, 0.1), Some(&s));
    assert_eq!(loss, loss2);
    assert!(close(m2.strength_mean.unwrap(), 1.7 / 3.0));
}

#[test]
fn large_h_gives_finite_loss_and_gradients() {
    // |h| = 1e4 at β = 5: exp(|h|) overflows f32 (and f64) many times over.
    let beta = 5.0;
    let batch = Batch::from_f64(
        &[-1.0, -2001.0],
        &[-2001.0, -1.0],
        &[-1.0, -1.0],
        &[-1.0, -1.0],
    );
    let s = t32(&[0.3, 0.9]);
    for kind in [
        LossKind::Spce,
        LossKind::Dpo,
        LossKind::Cdpo,
        LossKind::Ipo,
        LossKind::Hinge,
    ] {
        let eps = if kind == LossKind::Cdpo { 0.1 } else { 0.0 };
        let (loss, gc, gr, _) = batch.run(&cfg(kind, beta, eps), Some(&s));
        assert!(loss.is_finite(), "{kind:?}: {loss}");
        assert!(
            gc.iter().chain(&gr).all(|g| g.is_finite()),
            "{kind:?}: {gc:?} {gr:?}"
        );
    }
    // DPO: pair 0 (h = +1e4) costs ~0 and gets ~0 gradient; pair 1 (h = -1e4) costs 1e4 and
    // gets the saturated gradient -β/n on its chosen log-prob.
    let (loss, gc, gr, _) = batch.run(&cfg(LossKind::Dpo, beta, 0.0), None);
    assert!(rel(f64::from(loss), 1e4 / 2.0) < 1e-6, "{loss}");
    assert_eq!(gc[0], 0.0);
    assert!(rel(f64::from(gc[1]), -beta / 2.0) < 1e-6 && rel(f64::from(gr[1]), beta / 2.0) < 1e-6);
    // SPCE: -[s log σ(h) + (1-s) log σ(-h)] ≈ (1-s)·h for h → +∞ and -s·h for h → -∞.
    let (loss, gc, _, _) = batch.run(&cfg(LossKind::Spce, beta, 0.0), Some(&s));
    let want = (0.7 * 1e4 + 0.9 * 1e4) / 2.0;
    assert!(rel(f64::from(loss), want) < 1e-6, "{loss} vs {want}");
    assert!(
        rel(f64::from(gc[0]), -beta * (0.3 - 1.0) / 2.0) < 1e-6,
        "{gc:?}"
    );
    assert!(rel(f64::from(gc[1]), -beta * 0.9 / 2.0) < 1e-6, "{gc:?}");
}

#[test]
fn log_sigmoid_is_stable_and_exact_at_zero() {
    let xs = [
        -1e30, -1e4, -100.0, -20.0, -1.0, 0.0, 1e-3, 1.0, 20.0, 100.0, 1e4, 1e30,
    ];
    let x = Var::from_tensor(&t32(&xs)).unwrap();
    let y = log_sigmoid(x.as_tensor()).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    let (yv, gv) = (vec32(&y), vec32(g.get(x.as_tensor()).unwrap()));
    for (i, &xv) in xs.iter().enumerate() {
        let xv = f64::from(xv as f32);
        let want = if xv >= 0.0 {
            -(-xv).exp().ln_1p()
        } else {
            xv - xv.exp().ln_1p()
        };
        assert!(
            rel(f64::from(yv[i]), want) < 1e-6,
            "log σ({xv}) = {} vs {want}",
            yv[i]
        );
        let dwant = sigmoid(-xv);
        assert!(
            (f64::from(gv[i]) - dwant).abs() < 3e-7,
            "σ(-{xv}) = {} vs {dwant}",
            gv[i]
        );
    }
    assert_eq!(gv[5], 0.5);
}

#[test]
fn gradients_reach_only_the_policy() {
    let t = fixture_tensors();
    let rc = Var::from_tensor(&t["inputs/ref_chosen"]).unwrap();
    let rr = Var::from_tensor(&t["inputs/ref_rejected"]).unwrap();
    let s = Var::from_tensor(&t["inputs/strength"]).unwrap();
    let pc = Var::from_tensor(&t["inputs/policy_chosen"]).unwrap();
    let pr = Var::from_tensor(&t["inputs/policy_rejected"]).unwrap();
    let lp = PairLogps {
        policy_chosen: pc.as_tensor(),
        policy_rejected: pr.as_tensor(),
        ref_chosen: rc.as_tensor(),
        ref_rejected: rr.as_tensor(),
    };
    let out = preference_loss(&LossConfig::default(), &lp, Some(s.as_tensor())).unwrap();
    let g = out.loss.backward().unwrap();
    assert!(g.get(pc.as_tensor()).is_some() && g.get(pr.as_tensor()).is_some());
    assert!(
        g.get(rc.as_tensor()).is_none(),
        "reference log-probs are constants"
    );
    assert!(
        g.get(rr.as_tensor()).is_none(),
        "reference log-probs are constants"
    );
    assert!(g.get(s.as_tensor()).is_none(), "strengths are constants");
}

#[test]
fn f64_inputs_agree_with_f32() {
    let t = fixture_tensors();
    let b32 = Batch::fixture(&t);
    let up = |k: &str| t[k].to_dtype(DType::F64).unwrap();
    let b64 = Batch::new(
        &up("inputs/policy_chosen"),
        &up("inputs/policy_rejected"),
        &up("inputs/ref_chosen"),
        &up("inputs/ref_rejected"),
    );
    let c = LossConfig::default();
    let out32 = preference_loss(&c, &b32.logps(), Some(&t["inputs/strength"])).unwrap();
    // f32 strengths with f64 log-probs are accepted (converted).
    let out64 = preference_loss(&c, &b64.logps(), Some(&t["inputs/strength"])).unwrap();
    assert_eq!(out64.loss.dtype(), DType::F64);
    let (a, b) = (
        f64::from(out32.loss.to_scalar::<f32>().unwrap()),
        out64.loss.to_scalar::<f64>().unwrap(),
    );
    assert!(rel(a, b) < 1e-6, "{a} vs {b}");
}

fn err_of(cfg: &LossConfig, lp: &PairLogps, s: Option<&Tensor>) -> String {
    match preference_loss(cfg, lp, s) {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn bad_inputs_are_errors_naming_the_tensor() {
    let b = Batch::from_f64(&[-1.0, -2.0], &[-3.0, -1.0], &[-1.0, -2.0], &[-2.0, -2.0]);
    let spce = LossConfig::default();
    let dpo = cfg(LossKind::Dpo, 0.1, 0.0);
    let lp = b.logps();

    let e = err_of(&spce, &lp, None);
    assert!(e.contains("strength") && e.contains("spce"), "{e}");

    let short = t32(&[-1.0]);
    let e = err_of(
        &dpo,
        &PairLogps {
            ref_rejected: &short,
            ..lp
        },
        None,
    );
    assert!(e.contains("ref_rejected"), "{e}");
    let e = err_of(
        &dpo,
        &PairLogps {
            policy_rejected: &short,
            ..lp
        },
        None,
    );
    assert!(e.contains("policy_rejected"), "{e}");

    let two_d = t32(&[-1.0, -2.0]).reshape((1, 2)).unwrap();
    let e = err_of(
        &dpo,
        &PairLogps {
            policy_chosen: &two_d,
            ..lp
        },
        None,
    );
    assert!(e.contains("policy_chosen"), "{e}");
    let e = err_of(
        &dpo,
        &PairLogps {
            ref_chosen: &two_d,
            ..lp
        },
        None,
    );
    assert!(e.contains("ref_chosen"), "{e}");

    let empty = Tensor::zeros(0, DType::F32, &Device::Cpu).unwrap();
    let e = err_of(
        &dpo,
        &PairLogps {
            policy_chosen: &empty,
            policy_rejected: &empty,
            ref_chosen: &empty,
            ref_rejected: &empty,
        },
        None,
    );
    assert!(e.contains("policy_chosen") && e.contains("empty"), "{e}");

    let nan = t32(&[f64::NAN, -1.0]);
    let e = err_of(
        &dpo,
        &PairLogps {
            policy_rejected: &nan,
            ..lp
        },
        None,
    );
    assert!(e.contains("policy_rejected[0]"), "{e}");
    let inf = t32(&[-1.0, f64::NEG_INFINITY]);
    let e = err_of(
        &dpo,
        &PairLogps {
            ref_chosen: &inf,
            ..lp
        },
        None,
    );
    assert!(e.contains("ref_chosen[1]"), "{e}");

    let f64_ref = t32(&[-1.0, -2.0]).to_dtype(DType::F64).unwrap();
    let e = err_of(
        &dpo,
        &PairLogps {
            ref_chosen: &f64_ref,
            ..lp
        },
        None,
    );
    assert!(e.contains("ref_chosen") && e.contains("dtype"), "{e}");
    let ints = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
    let e = err_of(
        &dpo,
        &PairLogps {
            policy_chosen: &ints,
            ..lp
        },
        None,
    );
    assert!(e.contains("policy_chosen") && e.contains("dtype"), "{e}");

    for bad in [
        [0.5, 1.5],
        [-0.1, 0.5],
        [f64::NAN, 0.5],
        [0.5, f64::INFINITY],
    ] {
        let e = err_of(&spce, &lp, Some(&t32(&bad)));
        assert!(e.contains("strength["), "{bad:?}: {e}");
    }
    let e = err_of(&spce, &lp, Some(&t32(&[0.5, 0.5, 0.5])));
    assert!(e.contains("strength") && e.contains("shape"), "{e}");
    let e = err_of(
        &spce,
        &lp,
        Some(&Tensor::new(&[0u32, 1], &Device::Cpu).unwrap()),
    );
    assert!(e.contains("strength") && e.contains("dtype"), "{e}");
    // Strengths are also checked when the loss does not use them.
    let e = err_of(&dpo, &lp, Some(&t32(&[0.5, 2.0])));
    assert!(e.contains("strength[1]"), "{e}");

    // Bad settings.
    for beta in [0.0, -0.1, f64::NAN, f64::INFINITY] {
        let e = err_of(&cfg(LossKind::Dpo, beta, 0.0), &lp, None);
        assert!(e.contains("loss.beta"), "{beta}: {e}");
    }
    for eps in [-0.1, 0.5, 1.0, f64::NAN] {
        let e = err_of(&cfg(LossKind::Cdpo, 0.1, eps), &lp, None);
        assert!(e.contains("loss.label_smoothing"), "{eps}: {e}");
    }
    let e = err_of(&cfg(LossKind::Dpo, 0.1, 0.1), &lp, None);
    assert!(e.contains("label_smoothing") && e.contains("cdpo"), "{e}");
}

#[test]
fn config_defaults_and_toml() {
    let d = LossConfig::default();
    assert_eq!(
        (d.kind, d.beta, d.label_smoothing),
        (LossKind::Spce, 0.1, 0.0)
    );
    d.validate().unwrap();
    let empty: LossConfig = toml::from_str("").unwrap();
    assert_eq!(empty, d);
    let c: LossConfig =
        toml::from_str("kind = \"cdpo\"\nbeta = 0.5\nlabel_smoothing = 0.1\n").unwrap();
    assert_eq!(c, cfg(LossKind::Cdpo, 0.5, 0.1));
    c.validate().unwrap();
    for (name, kind) in [
        ("spce", LossKind::Spce),
        ("dpo", LossKind::Dpo),
        ("ipo", LossKind::Ipo),
        ("cdpo", LossKind::Cdpo),
        ("hinge", LossKind::Hinge),
    ] {
        let c: LossConfig = toml::from_str(&format!("kind = \"{name}\"")).unwrap();
        assert_eq!(c.kind, kind);
        assert_eq!(kind.name(), name);
        assert_eq!(kind.needs_strength(), kind == LossKind::Spce);
        // Round trip.
        let back: LossConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }
    assert!(
        toml::from_str::<LossConfig>("bta = 0.1").is_err(),
        "unknown field"
    );
    assert!(
        toml::from_str::<LossConfig>("kind = \"sigmoid\"").is_err(),
        "unknown kind"
    );
}
