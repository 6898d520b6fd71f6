//! The `osp` binary as a user runs it.
mod common;
use common::*;
use std::process::Command;

fn osp(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_osp"))
        .args(args)
        .output()
        .expect("run osp");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn generate_stories260k_greedy_from_bos() {
    let Some(bin) = shared_data("models/stories260K/stories260K.bin") else {
        return;
    };
    let (ok, stdout, stderr) = osp(&[
        "generate",
        "--model",
        bin.to_str().unwrap(),
        "--temperature",
        "0",
        "--max-new-tokens",
        "60",
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.starts_with("Once upon a time, there was a little girl named Lily. She loved to play outside in the park."),
        "{stdout}"
    );
    assert!(stderr.contains("tokens/s"), "{stderr}");
}

#[test]
fn generate_with_prompt_and_several_seeded_samples() {
    let Some(bin) = shared_data("models/stories260K/stories260K.bin") else {
        return;
    };
    let args = [
        "generate",
        "--model",
        bin.to_str().unwrap(),
        "--prompt",
        "Tom had a dog",
        "--temperature",
        "0.8",
        "--top-k",
        "50",
        "--top-p",
        "0.9",
        "--max-new-tokens",
        "30",
        "--num-samples",
        "3",
        "--seed",
        "7",
    ];
    let (ok, a, err) = osp(&args);
    assert!(ok, "{err}");
    assert_eq!(a.matches("--- sample").count(), 3, "{a}");
    assert_eq!(a.matches("Tom had a dog").count(), 3, "{a}");
    let (_, b, _) = osp(&args);
    assert_eq!(a, b, "the same seed must give the same samples");
}

#[test]
fn inspect_describes_the_model() {
    let Some(bin) = shared_data("models/stories260K/stories260K.bin") else {
        return;
    };
    let (ok, out, err) = osp(&["inspect", "--model", bin.to_str().unwrap()]);
    assert!(ok, "{err}");
    for want in [
        "llama2.c",
        "parameters:        ",
        "layers:            5",
        "4 key/value",
        "llama2.c (512 tokens)",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    // 260K parameters: the published size of stories260K.
    let params: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("parameters:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!((250_000..270_000).contains(&params), "{params}");
}

#[test]
fn bad_input_is_an_error_message_not_a_panic() {
    let (ok, _, err) = osp(&["generate", "--model", "/no/such/model.bin"]);
    assert!(!ok);
    assert!(
        err.starts_with("error: ") && err.contains("/no/such/model.bin"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let fx = fixture("llama_gqa");
    let (ok, _, err) = osp(&["inspect", "--model", fx.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("tokenizer.json") && !err.contains("panicked"),
        "{err}"
    );
    let Some(bin) = shared_data("models/stories260K/stories260K.bin") else {
        return;
    };
    let (ok, _, err) = osp(&["generate", "--model", bin.to_str().unwrap(), "--top-p", "0"]);
    assert!(!ok && err.contains("top_p"), "{err}");
    let (ok, _, err) = osp(&[
        "generate",
        "--model",
        bin.to_str().unwrap(),
        "--max-new-tokens",
        "600",
    ]);
    assert!(!ok && err.contains("512 positions"), "{err}");
}

#[test]
fn sft_then_export_merged_then_generate_the_same_text() {
    let Some(bin) = shared_data("models/stories260K/stories260K.bin") else {
        return;
    };
    let tok = bin.with_file_name("tok512.bin");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("train.jsonl");
    let lines: Vec<String> = (0..16)
        .map(|i| serde_json::json!({"prompt": format!("Tom saw {i} birds. Tom said"), "completion": " wow!"}).to_string())
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let run = tmp.path().join("run");
    let config = tmp.path().join("sft.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\npath = {:?}\n[train]\nsteps = 6\nbatch_size = 4\nout = {:?}\n[optim]\nlr = 0.02\n[data]\ntrain = {:?}\n",
            bin.display().to_string(),
            run.display().to_string(),
            data.display().to_string()
        ),
    )
    .unwrap();
    let (ok, _, err) = osp(&[
        "sft",
        "--config",
        config.to_str().unwrap(),
        "--set",
        "lora.r=4",
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("eval loss at step 6"), "{err}");
    let adapter = run.join("adapter");
    let merged = tmp.path().join("merged");
    let (ok, _, err) = osp(&[
        "export",
        "--model",
        bin.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--merge",
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let prompt = [
        "--prompt",
        "Tom saw 3 birds. Tom said",
        "--temperature",
        "0",
        "--max-new-tokens",
        "12",
    ];
    let (ok, with_adapter, err) = osp(&[
        &[
            "generate",
            "--model",
            bin.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
        ],
        &prompt[..],
    ]
    .concat());
    assert!(ok, "{err}");
    let (ok, from_merged, err) = osp(&[
        &[
            "generate",
            "--model",
            merged.to_str().unwrap(),
            "--tokenizer",
            tok.to_str().unwrap(),
        ],
        &prompt[..],
    ]
    .concat());
    assert!(ok, "{err}");
    assert_eq!(with_adapter, from_merged);
    let (_, base, _) =
        osp(&[&["generate", "--model", bin.to_str().unwrap()], &prompt[..]].concat());
    assert_ne!(
        base, with_adapter,
        "the adapter should change greedy output after training on ' wow!'"
    );
    // The config printer shows every section.
    let (ok, out, _) = osp(&["sft", "--print-config"]);
    assert!(
        ok && ["[model]", "[lora]", "[optim]", "[train]", "[data]"]
            .iter()
            .all(|s| out.contains(s))
    );
}
