//! Misuse is refused with a clear error, or warned about loudly, never silently done: run
//! folders, exports, settings beyond what the model or the data can hold. Tiny models made on
//! the spot, so these run without ../shared/data.
mod common;
use common::*;
use osp::train::sft::{run_sft, SftConfig};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;

fn q(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

fn osp_cmd<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_osp"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn sft_data(dir: &Path) -> PathBuf {
    let rows: Vec<_> = (0..8)
        .map(|i| {
            let prompt = ["the cat", "the dog"][i % 2];
            json!({"prompt": prompt, "completion": " sat on the mat ."})
        })
        .collect();
    write_jsonl(&dir.join("sft.jsonl"), &rows)
}

fn sft_config(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> anyhow::Result<SftConfig> {
    let mut set = vec![
        format!("model.path={}", q(model)),
        format!("data.train={}", q(data)),
        format!("train.out={}", q(out)),
        "train.steps=2".into(),
        "train.batch_size=4".into(),
        "train.max_len=64".into(),
        "lora.r=2".into(),
    ];
    set.extend(extra.iter().map(|s| s.to_string()));
    SftConfig::load(None, &set)
}

#[test]
fn an_empty_run_folder_is_refused() {
    let e = sft_config(Path::new("m"), Path::new("d"), Path::new(""), &[]).unwrap_err();
    assert!(format!("{e:#}").contains("train.out is empty"), "{e:#}");
    let set = [
        "model.path=\"m\"".to_string(),
        "data.prompts=\"p\"".into(),
        "train.out=\"\"".into(),
    ];
    let e = osp::train::method::TrainConfig::load(None, &set, None).unwrap_err();
    assert!(format!("{e:#}").contains("train.out is empty"), "{e:#}");
}

#[test]
fn the_final_adapter_replaces_the_old_folder_whole_and_export_needs_force() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_run_model(&tmp.path().join("model"), 3);
    let data = sft_data(tmp.path());
    let run = tmp.path().join("run");
    // What a crash during an earlier save left behind: a stale file in the old adapter
    // folder and a half-written temporary folder.
    std::fs::create_dir_all(run.join("adapter")).unwrap();
    std::fs::write(run.join("adapter/stale.bin"), "old").unwrap();
    std::fs::create_dir_all(run.join(".adapter.tmp")).unwrap();
    std::fs::write(run.join(".adapter.tmp/adapter_model.safetensors"), "half").unwrap();
    let out = run_sft(&sft_config(&model, &data, &run, &[]).unwrap(), false, None).unwrap();
    assert_eq!(out.output, run.join("adapter"));
    let mut names: Vec<String> = std::fs::read_dir(&out.output)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["adapter_config.json", "adapter_model.safetensors"]);
    assert!(!run.join(".adapter.tmp").exists() && !run.join(".adapter.old").exists());

    // export --merge onto an existing model folder: refused, unless --force.
    let target = tmp.path().join("merged");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("config.json"), "{}").unwrap();
    let args = |force: bool| {
        let mut a = vec![
            "export".to_string(),
            "--model".into(),
            model.display().to_string(),
            "--adapter".into(),
            out.output.display().to_string(),
            "--merge".into(),
            "--out".into(),
            target.display().to_string(),
        ];
        if force {
            a.push("--force".into());
        }
        a
    };
    let (ok, err) = osp_cmd(&args(false));
    assert!(!ok && err.contains("--force"), "{err}");
    assert_eq!(
        std::fs::read_to_string(target.join("config.json")).unwrap(),
        "{}"
    );
    let (ok, err) = osp_cmd(&args(true));
    assert!(ok, "{err}");
    assert!(target.join("model.safetensors").exists());
    assert_ne!(
        std::fs::read_to_string(target.join("config.json")).unwrap(),
        "{}"
    );
}

/// A minimal config file for the CLI (every field comes from --set).
fn empty_config(dir: &Path) -> PathBuf {
    let p = dir.join("empty.toml");
    std::fs::write(&p, "").unwrap();
    p
}

#[test]
fn max_len_beyond_the_models_positions_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_run_model(&tmp.path().join("model"), 3);
    let data = sft_data(tmp.path());
    let cfg = sft_config(
        &model,
        &data,
        &tmp.path().join("r"),
        &["train.max_len=1000"],
    )
    .unwrap();
    let e = format!("{:#}", run_sft(&cfg, false, None).err().unwrap());
    assert!(
        e.contains("train.max_len = 1000 exceeds the model's max_position_embeddings (128)"),
        "{e}"
    );
}

#[test]
fn sampling_settings_that_do_nothing_useful_are_refused() {
    use osp::sample::SamplingParams;
    let with = |f: &dyn Fn(&mut SamplingParams)| {
        let mut p = SamplingParams::default();
        f(&mut p);
        p.validate()
    };
    let e = with(&|p| p.temperature = 1e-40).unwrap_err().to_string();
    assert!(e.contains("use 0 for greedy"), "{e}");
    with(&|p| p.temperature = 0.0).unwrap();
    with(&|p| p.temperature = osp::sample::MIN_TEMPERATURE).unwrap();
    let e = with(&|p| p.stop_strings = vec!["x".into(), String::new()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty stop string"), "{e}");

    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_run_model(&tmp.path().join("model"), 3);
    let m = model.display().to_string();
    for (args, needle) in [
        (vec!["--num-samples", "0"], "--num-samples"),
        (vec!["--stop", ""], "empty stop string"),
        (vec!["--temperature", "1e-40"], "use 0 for greedy"),
    ] {
        let mut all = vec!["generate", "--model", m.as_str(), "--prompt", "the cat"];
        all.extend(&args);
        let (ok, err) = osp_cmd(&all);
        assert!(!ok && err.contains(needle), "{args:?}: {err}");
    }
    // The generate defaults are SamplingParams' own: 64 new tokens at most.
    let o = Command::new(env!("CARGO_BIN_EXE_osp"))
        .args(["generate", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(
        help.contains(&format!(
            "[default: {}]",
            SamplingParams::default().max_new_tokens
        )),
        "{help}"
    );
}

#[test]
fn corrupt_weights_and_impossible_sizes_are_refused_at_load() {
    use osp::model::load::{load_model, read_llama2c, read_safetensors};
    use osp::model::Trainable;
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_run_model(&tmp.path().join("model"), 3);
    let st = model.join("model.safetensors");
    let cpu = candle_core::Device::Cpu;
    let nan: Vec<(String, candle_core::Tensor)> = read_safetensors(&st, &cpu)
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            let t = (t * f64::NAN).unwrap();
            (n, t)
        })
        .collect();
    osp::io::save_safetensors(&st, &nan).unwrap();
    let e = format!(
        "{:#}",
        load_model(&model, None, &cpu, Trainable::None)
            .err()
            .unwrap()
    );
    assert!(
        e.contains("non-finite values") && e.contains("tensor `"),
        "{e}"
    );

    // llama2.c: an exact file loads; trailing bytes or a header whose sizes overflow do not.
    let (dim, hidden, layers, heads, vocab, seq) = (8i32, 16i32, 1i32, 2i32, 32i32, 16i32);
    let header = [dim, hidden, layers, heads, heads, vocab, seq];
    let hd = (dim / heads) as usize;
    let (d, h, v) = (dim as usize, hidden as usize, vocab as usize);
    let floats = v * d + (2 * d + 4 * d * d + 3 * d * h) + d + seq as usize * hd;
    let mut bytes: Vec<u8> = header.iter().flat_map(|x| x.to_le_bytes()).collect();
    bytes.extend((0..floats).flat_map(|i| ((i % 7) as f32 * 0.01).to_le_bytes()));
    let bin = tmp.path().join("tiny.bin");
    std::fs::write(&bin, &bytes).unwrap();
    read_llama2c(&bin, &cpu).unwrap();
    bytes.extend([0u8; 4]);
    std::fs::write(&bin, &bytes).unwrap();
    let e = format!("{:#}", read_llama2c(&bin, &cpu).err().unwrap());
    assert!(e.contains("4 bytes after"), "{e}");
    let huge: [i32; 7] = [1 << 30, 1 << 30, 1 << 30, 1, 1, 1 << 30, 1 << 30];
    let bytes: Vec<u8> = huge.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(&bin, &bytes).unwrap();
    let e = format!("{:#}", read_llama2c(&bin, &cpu).err().unwrap());
    assert!(e.contains("overflow") || e.contains("truncated"), "{e}");
    // config.json sizes whose product overflows.
    let e = osp::model::ModelConfig::from_json(&json!({
        "model_type": "llama", "vocab_size": u64::MAX / 2, "hidden_size": 1u64 << 40,
        "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
    }))
    .unwrap_err();
    assert!(format!("{e:#}").contains("overflow"), "{e:#}");
}

#[test]
fn a_judge_that_cannot_see_both_responses_is_refused() {
    use osp::demo::tasks::{JUDGE_ANSWER_A, JUDGE_ANSWER_B, JUDGE_TEMPLATE};
    use osp::judge::{Judge, JudgeConfig};
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_run_model(&tmp.path().join("model"), 3);
    let tok = osp::tokenizer::Tokenizer::from_hf_dir(&model).unwrap();
    let cfg = |max_len| JudgeConfig {
        template: JUDGE_TEMPLATE.into(),
        answer_a: JUDGE_ANSWER_A.into(),
        answer_b: JUDGE_ANSWER_B.into(),
        max_len,
        ..Default::default()
    };
    let e = Judge::new(cfg(6), &tok).err().unwrap().to_string();
    assert!(e.contains("leaves no room for the responses"), "{e}");
    let judge = Judge::new(cfg(24), &tok).unwrap();
    // A long task prompt loses its start: fine.
    let long_prompt = ["the cat"; 20].join(" ");
    let ids = judge
        .encode(&tok, &long_prompt, "yes .", "no .", 128)
        .unwrap();
    assert_eq!(ids.len(), 24);
    // Responses that do not fit: refused, not judged blind.
    let long = ["very good"; 10].join(" ");
    let e = judge
        .encode(&tok, "the cat", &long, "no .", 128)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("the two responses"), "{e}");
}

#[test]
fn pairs_without_a_preference_are_skipped_with_a_count() {
    use osp::train::pairs::{load_pairs, DataFormat};
    let tmp = tempfile::tempdir().unwrap();
    let rows: Vec<_> = ["good .", "bad .", "good .", "good ."]
        .iter()
        .map(|r| json!({"prompt": "the cat", "chosen": "good .", "rejected": r}))
        .collect();
    let p = write_jsonl(&tmp.path().join("p.jsonl"), &rows);
    let (pairs, warnings) =
        load_pairs(&p, DataFormat::Auto, None, osp::data::OnMalformed::Abort).unwrap();
    assert_eq!(pairs.len(), 1);
    assert!(
        warnings[0].contains("skipped 3 pairs whose chosen and rejected responses are identical")
            && warnings[0].contains("p.jsonl:1"),
        "{warnings:?}"
    );
}

#[test]
fn an_osp_step_whose_strengths_are_all_one_half_warns() {
    use osp::demo::tasks::{JUDGE_ANSWER_A, JUDGE_ANSWER_B, JUDGE_TEMPLATE};
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_run_model(&tmp.path().join("model"), 3);
    let prompts = write_jsonl(
        &tmp.path().join("q.jsonl"),
        &[json!({"prompt": "the cat"}), json!({"prompt": "the dog"})],
    );
    let cfg = empty_config(tmp.path());
    // Greedy sampling: the K samples of a prompt are identical, so every pair is a tie.
    let sets = [
        format!("model.path={}", q(&model)),
        format!("data.prompts={}", q(&prompts)),
        format!("train.out={}", q(&tmp.path().join("run"))),
        "train.steps=1".into(),
        "train.batch_size=2".into(),
        "train.max_len=64".into(),
        "data.eval_fraction=0".into(),
        "pairing.k=3".into(),
        "sampling.temperature=0".into(),
        "sampling.max_new_tokens=3".into(),
        format!("judge.template={JUDGE_TEMPLATE:?}"),
        format!("judge.answer_a={JUDGE_ANSWER_A:?}"),
        format!("judge.answer_b={JUDGE_ANSWER_B:?}"),
    ];
    let mut args = vec![
        "train".to_string(),
        "--config".into(),
        cfg.display().to_string(),
        "--method".into(),
        "osp".into(),
    ];
    for s in sets {
        args.extend(["--set".into(), s]);
    }
    let (ok, err) = osp_cmd(&args);
    assert!(ok, "{err}");
    assert!(
        err.contains("step 1: every judged strength is 0.5"),
        "{err}"
    );
}

#[test]
fn an_oversized_record_is_reported_with_its_file_and_line() {
    use osp::data::{load_prompts, ChatRender, OnMalformed, MAX_RECORD_BYTES};
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("q.jsonl");
    let big = "x".repeat(MAX_RECORD_BYTES + 1);
    let text = format!(
        "{}\n{}\n{}\n",
        json!({"prompt": "a"}),
        json!({ "prompt": big }),
        json!({"prompt": "b"})
    );
    std::fs::write(&p, text).unwrap();
    let e = load_prompts(&p, ChatRender::Plain, OnMalformed::Abort)
        .err()
        .unwrap();
    assert!(
        format!("{e:#}").contains("q.jsonl:2: record of") && format!("{e:#}").contains("MiB limit"),
        "{e:#}"
    );
    let (ok, warnings) = load_prompts(&p, ChatRender::Plain, OnMalformed::Skip).unwrap();
    assert_eq!(ok.len(), 2);
    assert!(warnings[0].contains("q.jsonl:2"), "{warnings:?}");
}

#[test]
fn messages_say_what_is_wrong() {
    use osp::train::method::{Method, TrainConfig};
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_run_model(&tmp.path().join("model"), 3);
    // Every strength out of range: the pairs are unusable, not "without strengths".
    let rows: Vec<_> = (0..4)
        .map(|_| json!({"prompt": "the cat", "chosen": "good .", "rejected": "bad .", "strength": 3}))
        .collect();
    let prefs = write_jsonl(&tmp.path().join("p.jsonl"), &rows);
    let set = [
        format!("model.path={}", q(&model)),
        format!("data.preferences={}", q(&prefs)),
        format!("train.out={}", q(&tmp.path().join("spce"))),
        "train.max_len=64".into(),
    ];
    let cfg = TrainConfig::load(None, &set, Some(Method::SpceOffline)).unwrap();
    let e = format!(
        "{:#}",
        osp::train::offline::run_offline(&cfg, false, None)
            .err()
            .unwrap()
    );
    assert!(
        e.contains("no usable preference pairs")
            && e.contains("strength")
            && !e.contains("no pair has one"),
        "{e}"
    );
    // A wrongly typed prompt is malformed, not a missing chat template.
    let data = write_jsonl(
        &tmp.path().join("s.jsonl"),
        &[json!({"prompt": 123, "completion": [{"role": "assistant", "content": "yes"}]})],
    );
    let cfg = sft_config(&model, &data, &tmp.path().join("sft"), &[]).unwrap();
    let e = format!("{:#}", run_sft(&cfg, false, None).err().unwrap());
    assert!(
        e.contains("must both be strings or both be message lists") && !e.contains("chat template"),
        "{e}"
    );
    // An empty path setting names the setting.
    let set = [
        format!("model.path={}", q(&model)),
        "data.prompts=\"\"".into(),
    ];
    let e = TrainConfig::load(None, &set, Some(Method::Osp)).unwrap_err();
    assert!(format!("{e:#}").contains("data.prompts is empty"), "{e:#}");
}

/// Not run on its own: the subject of the test below.
#[test]
#[ignore]
fn probe_missing_shared_data() {
    assert!(shared_data("no/such/file.bin").is_none());
}

#[test]
fn a_missing_data_file_fails_under_ci_and_skips_with_a_reason_elsewhere() {
    let probe = |env: &[(&str, &str)]| {
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.args([
            "--exact",
            "probe_missing_shared_data",
            "--ignored",
            "--nocapture",
        ])
        .env_remove("CI")
        .env_remove("OSP_REQUIRE_DATA");
        for (k, v) in env {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        let text =
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        (o.status.success(), text)
    };
    let (ok, text) = probe(&[]);
    assert!(
        ok && text.contains("SKIPPED probe_missing_shared_data"),
        "{text}"
    );
    for env in [("CI", "true"), ("OSP_REQUIRE_DATA", "1")] {
        let (ok, text) = probe(&[env]);
        assert!(!ok && text.contains("requires it"), "{env:?}: {text}");
    }
    let (ok, _) = probe(&[("CI", "false")]);
    assert!(ok);
}
