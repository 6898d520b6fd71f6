//! Defaults live in one place, the config structs' `Default` impls: every "Default X" in a
//! field's doc comment must equal the value (and every plain field must document one), and
//! the command line reads the same structs.
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Fields whose documented default is prose rather than a value, and why.
const PROSE: [(&str, &str); 4] = [
    ("JudgeConfig", "template"), // "see `DEFAULT_TEMPLATE`", compared below
    ("LoraConfig", "target_modules"), // "all seven", compared below
    ("SelfRewardConfig", "template"), // "[`DEFAULT_TEMPLATE`]", compared below
    ("SelfRewardConfig", "answers"), // "\" 1\" … \" 5\"", compared below
];

fn defaults() -> BTreeMap<&'static str, Value> {
    use osp::train::*;
    BTreeMap::from([
        (
            "ModelSection",
            serde_json::to_value(config::ModelSection::default()).unwrap(),
        ),
        (
            "TrainSection",
            serde_json::to_value(config::TrainSection::default()).unwrap(),
        ),
        (
            "SftData",
            serde_json::to_value(sft::SftData::default()).unwrap(),
        ),
        (
            "PrefData",
            serde_json::to_value(method::PrefData::default()).unwrap(),
        ),
        (
            "TrainConfig",
            serde_json::to_value(method::TrainConfig::default()).unwrap(),
        ),
        (
            "JudgeTrainData",
            serde_json::to_value(judge_train::JudgeTrainData::default()).unwrap(),
        ),
        (
            "JudgeConfig",
            serde_json::to_value(osp::judge::JudgeConfig::default()).unwrap(),
        ),
        (
            "LoraConfig",
            serde_json::to_value(osp::lora::LoraConfig::default()).unwrap(),
        ),
        (
            "OptimConfig",
            serde_json::to_value(optim::OptimConfig::default()).unwrap(),
        ),
        (
            "LossConfig",
            serde_json::to_value(osp::loss::LossConfig::default()).unwrap(),
        ),
        (
            "PairingConfig",
            serde_json::to_value(osp::pairing::PairingConfig::default()).unwrap(),
        ),
        (
            "PpoConfig",
            serde_json::to_value(osp::ppo::PpoConfig::default()).unwrap(),
        ),
        (
            "SelfRewardConfig",
            serde_json::to_value(osp::self_reward::SelfRewardConfig::default()).unwrap(),
        ),
        (
            "SelfRewardingSection",
            serde_json::to_value(method::SelfRewardingSection::default()).unwrap(),
        ),
        (
            "SamplingParams",
            serde_json::to_value(osp::sample::SamplingParams::default()).unwrap(),
        ),
    ])
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// (struct, field, doc comment) of every field of every `pub struct` in `src/`.
fn documented_fields() -> Vec<(String, String, String)> {
    let mut files = vec![];
    rust_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    let mut out = vec![];
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let mut current: Option<String> = None;
        let mut doc = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("pub struct ") {
                current = rest
                    .strip_suffix(" {")
                    .map(|n| n.split('<').next().unwrap().to_string());
                doc.clear();
                continue;
            }
            let Some(name) = &current else { continue };
            if line == "}" {
                current = None;
                continue;
            }
            let t = line.trim();
            if let Some(d) = t.strip_prefix("///") {
                doc.push(' ');
                doc.push_str(d.trim());
            } else if let Some(field) = t.strip_prefix("pub ").and_then(|r| r.split_once(':')) {
                out.push((name.clone(), field.0.to_string(), std::mem::take(&mut doc)));
            } else if !t.starts_with("#[") {
                doc.clear();
            }
        }
    }
    out
}

/// The value after "Default" in a doc comment: `Some(value)`, `Some(Null)` for "none", or
/// None for prose.
fn documented_default(doc: &str) -> Option<Option<Value>> {
    let at = doc.find("Default")?;
    let rest = doc[at + "Default".len()..]
        .trim_start_matches(':')
        .trim_start();
    let lit = if let Some(r) = rest.strip_prefix('`') {
        r.split('`').next().unwrap_or("").to_string()
    } else if let Some(r) = rest.strip_prefix('"') {
        return Some(Some(Value::String(
            r.split('"').next().unwrap_or("").into(),
        )));
    } else {
        let w = rest.split_whitespace().next().unwrap_or("");
        w.trim_end_matches(['.', ',', ';']).to_string()
    };
    Some(match lit.as_str() {
        "none" => Some(Value::Null),
        "true" => Some(Value::Bool(true)),
        "false" => Some(Value::Bool(false)),
        l => match l.parse::<f64>() {
            Ok(x) => Some(serde_json::json!(x)),
            // An enum name in backticks, as serialised.
            Err(_)
                if rest.starts_with('`')
                    && l.chars().all(|c| c.is_ascii_lowercase() || c == '_') =>
            {
                Some(Value::String(l.into()))
            }
            Err(_) => None,
        },
    })
}

fn same(doc: &Value, actual: &Value) -> bool {
    match (doc, actual) {
        (Value::Number(a), Value::Number(b)) => {
            let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            (a - b).abs() <= 1e-12 * a.abs().max(b.abs())
        }
        (Value::Null, Value::Array(a)) => a.is_empty(),
        (a, b) => a == b,
    }
}

#[test]
fn every_documented_default_is_the_default() {
    let defaults = defaults();
    let fields = documented_fields();
    let mut checked = 0;
    let mut problems = vec![];
    for (name, value) in &defaults {
        let mine: Vec<_> = fields.iter().filter(|(s, _, _)| s == name).collect();
        assert!(!mine.is_empty(), "struct {name} not found in src/");
        for (_, field, doc) in mine {
            let actual = value.get(field).cloned().unwrap_or(Value::Null);
            if actual.is_object() {
                continue; // a nested section, documented field by field
            }
            match documented_default(doc) {
                // A required setting has no default; its Default is empty.
                None if doc.contains("Required.") && actual == "" => checked += 1,
                None => problems.push(format!("{name}.{field}: no \"Default …\" in its doc")),
                Some(None) if PROSE.contains(&(name, field.as_str())) => {}
                Some(None) => problems.push(format!("{name}.{field}: default is prose: {doc}")),
                Some(Some(d)) if same(&d, &actual) => checked += 1,
                Some(Some(d)) => {
                    problems.push(format!("{name}.{field}: doc says {d}, Default is {actual}"))
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(checked >= 50, "only {checked} defaults checked");
    // The two prose defaults.
    assert_eq!(
        defaults["JudgeConfig"]["template"],
        osp::judge::DEFAULT_TEMPLATE
    );
    assert_eq!(
        defaults["SelfRewardConfig"]["template"],
        osp::self_reward::DEFAULT_TEMPLATE
    );
    assert_eq!(
        defaults["SelfRewardConfig"]["answers"],
        serde_json::json!([" 1", " 2", " 3", " 4", " 5"])
    );
    assert_eq!(
        defaults["LoraConfig"]["target_modules"],
        serde_json::json!(osp::lora::LINEAR_MODULES)
    );
}

#[test]
fn the_command_line_reads_the_struct_defaults() {
    let help = |cmd: &str| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_osp"))
            .args([cmd, "--help"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let s = osp::sample::SamplingParams::default();
    let h = help("generate");
    for (flag, value) in [
        ("--temperature", s.temperature.to_string()),
        ("--top-k", s.top_k.to_string()),
        ("--top-p", s.top_p.to_string()),
        ("--max-new-tokens", s.max_new_tokens.to_string()),
    ] {
        let at = h.find(flag).unwrap_or_else(|| panic!("{flag} in {h}"));
        let section = &h[at..];
        let end = section[1..].find("\n  -").map_or(section.len(), |e| e + 1);
        assert!(
            section[..end].contains(&format!("[default: {value}]")),
            "{flag}: {}",
            &section[..end]
        );
    }
    assert!(help("demo").contains("about a minute"));
}
