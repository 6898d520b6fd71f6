//! The methods the demo compares and the paper's claims about them: names that the pipeline,
//! the report and the multi-seed aggregate all use (kept apart so that none of those imports
//! another for them).
use crate::train::method::Method;
use anyhow::{Context, Result};
use serde_json::{json, Map, Value};

/// The methods compared by default, with their summary keys.
pub const METHODS: [(&str, Option<Method>); 9] = [
    ("sft", None),
    ("dpo", Some(Method::Dpo)),
    ("ipo", Some(Method::Ipo)),
    ("online_dpo", Some(Method::OnlineDpo)),
    ("osp", Some(Method::Osp)),
    ("osp_hard", Some(Method::OspHard)),
    ("osp_random_pairs", Some(Method::OspRandomPairs)),
    // The paper's baselines: RLHF (a reward model on the seed pairs, then PPO) and
    // self-rewarding (a pointwise judge taught on the seed pairs).
    ("ppo", Some(Method::Ppo)),
    ("self_rewarding", Some(Method::SelfRewarding)),
];

/// Every method the demo can run (`methods` in the budget).
pub const ALL_METHODS: [(&str, Option<Method>); 11] = [
    METHODS[0],
    METHODS[1],
    METHODS[2],
    METHODS[3],
    METHODS[4],
    METHODS[5],
    METHODS[6],
    METHODS[7],
    METHODS[8],
    ("cdpo", Some(Method::Cdpo)),
    ("spce_offline", Some(Method::SpceOffline)),
];

pub fn default_methods() -> Vec<String> {
    METHODS.iter().map(|(k, _)| k.to_string()).collect()
}

pub fn method_by_key(key: &str) -> Result<Option<Method>> {
    ALL_METHODS
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, m)| *m)
        .with_context(|| {
            let keys: Vec<&str> = ALL_METHODS.iter().map(|(k, _)| *k).collect();
            format!("demo method `{key}`: expected one of {}", keys.join(", "))
        })
}

/// The paper's comparisons, as (claim, better method, worse method, metric).
pub const CLAIMS: [(&str, &str, &str, &str); 9] = [
    ("OSP beats SFT", "osp", "sft", "oracle_reward"),
    ("OSP beats DPO", "osp", "dpo", "win_rate_vs_sft"),
    (
        "OSP beats online DPO",
        "osp",
        "online_dpo",
        "win_rate_vs_sft",
    ),
    (
        "soft strengths beat hard labels",
        "osp",
        "osp_hard",
        "win_rate_vs_sft",
    ),
    (
        "ranked pairing beats random pairing",
        "osp",
        "osp_random_pairs",
        "win_rate_vs_sft",
    ),
    ("OSP beats IPO", "osp", "ipo", "win_rate_vs_sft"),
    // The paper's headline: OSP against RLHF with limited data (the seed), and out of domain.
    ("OSP beats RLHF", "osp", "ppo", "win_rate_vs_sft"),
    (
        "OSP beats RLHF out of domain",
        "osp",
        "ppo",
        "ood_win_rate_vs_sft",
    ),
    (
        "OSP beats self-rewarding",
        "osp",
        "self_rewarding",
        "win_rate_vs_sft",
    ),
];

/// Each claim on one task's results (`summary.json`'s `tasks.<task>`): whether it held, by
/// what margin, and that margin in standard errors of the difference (the two methods'
/// errors combined as if independent, which overstates it for paired samples). A margin of
/// a few standard errors or less can flip with the random seed, or on a CPU whose kernels
/// round differently: the demo reports these claims, and the tests do not assert them.
pub fn claims(results: &Map<String, Value>) -> Value {
    let mut out = Map::new();
    for (claim, better, worse, metric) in CLAIMS {
        let get = |m: &str, k: &str| {
            results
                .get(m)
                .and_then(|r| r.get(k))
                .and_then(Value::as_f64)
        };
        let se_key = format!("{metric}_se");
        let (Some(a), Some(b)) = (get(better, metric), get(worse, metric)) else {
            continue;
        };
        let se = match (get(better, &se_key), get(worse, &se_key)) {
            (Some(x), Some(y)) => (x * x + y * y).sqrt(),
            _ => f64::NAN,
        };
        let margin = a - b;
        out.insert(
            claim.to_string(),
            json!({"held": margin > 0.0, "margin": margin, "se": se,
                   "margin_in_se": if se > 0.0 { margin / se } else { f64::NAN },
                   "metric": metric, "better": better, "worse": worse}),
        );
    }
    Value::Object(out)
}
