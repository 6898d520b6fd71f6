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
