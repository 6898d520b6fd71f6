//! Inputs found by the fuzz targets (fuzz/, see the README's "Robustness") that once
//! crashed osp: each is now a clear error. Plain stable tests, no fuzzing dependency.
use osp::tokenizer::Tokenizer;

/// A small valid tokenizer.json with a decoder section (where tokenizers 0.22 panicked).
const TOKENIZER_JSON: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":{"type":"ByteLevel","add_prefix_space":true,"trim_offsets":true,"use_regex":true},"model":{"type":"WordLevel","vocab":{"<unk>":0,"hello":1,"world":2},"unk_token":"<unk>"}}"#;

/// fuzz target `tokenizer_json`: a tokenizer.json cut short (or broken) inside its
/// "decoder" made tokenizers panic (`expect("Helper")` in its decoder deserialiser)
/// instead of returning an error, so a truncated download crashed every command.
#[test]
fn a_tokenizer_json_cut_short_or_broken_anywhere_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tokenizer.json");
    std::fs::write(&path, TOKENIZER_JSON).unwrap();
    let tok = Tokenizer::from_tokenizer_json(&path).expect("the whole file loads");
    assert_eq!(tok.encode("hello world", false).unwrap(), vec![1, 2]);

    let decoder = TOKENIZER_JSON.find("\"decoder\"").unwrap();
    for cut in 0..TOKENIZER_JSON.len() {
        std::fs::write(&path, &TOKENIZER_JSON[..cut]).unwrap();
        let e = format!("{:#}", Tokenizer::from_tokenizer_json(&path).unwrap_err());
        assert!(e.contains(&path.display().to_string()), "cut at {cut}: {e}");
        if cut > decoder {
            assert!(
                e.contains("is not valid JSON") && e.contains("line 1 column"),
                "cut at {cut}: {e}"
            );
        }
    }
    // The shape the fuzzer found: a syntax error inside the decoder, then more text.
    let broken = TOKENIZER_JSON.replace("\"use_regex\":true}", "\"use_regex\":tru{\"}");
    std::fs::write(&path, &broken).unwrap();
    let e = format!("{:#}", Tokenizer::from_tokenizer_json(&path).unwrap_err());
    assert!(e.contains("is not valid JSON"), "{e}");
    // The same through a model folder.
    let e = format!("{:#}", Tokenizer::from_hf_dir(tmp.path()).unwrap_err());
    assert!(e.contains("is not valid JSON"), "{e}");
}

/// fuzz target `tokenizer_json` (2026-12-02, after the fix above): a file that is valid
/// JSON but whose "decoder" holds what no decoder is (stray vocabulary and merges, numbers
/// beyond f64) still reaches tokenizers' `expect("Helper")` panic. In the fuzzer the panic
/// aborts; in osp it must come back as an error naming the file.
#[test]
fn a_decoder_that_is_no_decoder_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tokenizer.json");
    std::fs::write(
        &path,
        include_bytes!("fixtures/fuzz/tokenizer_json_decoder_helper.json"),
    )
    .unwrap();
    let e = format!("{:#}", Tokenizer::from_tokenizer_json(&path).unwrap_err());
    assert!(e.contains(&path.display().to_string()), "{e}");
}
