//! What every target shares: a scratch folder per fuzzing process (in /dev/shm when there is
//! one, so that writing each input to a file costs little), since osp's readers take paths.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() {
            base.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("osp-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch folder");
        dir
    })
}

/// Writes `bytes` to `name` in the scratch folder and returns its path.
pub fn put(name: &str, bytes: &[u8]) -> PathBuf {
    let p = scratch().join(name);
    std::fs::write(&p, bytes).expect("scratch write");
    p
}

/// A word-level tokenizer (the demo's) for loaders that tokenize, made once.
pub fn word_tokenizer() -> &'static osp::tokenizer::Tokenizer {
    static TOK: OnceLock<osp::tokenizer::Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let dir = scratch().join("wordlevel");
        std::fs::create_dir_all(&dir).expect("tokenizer folder");
        let words: Vec<String> = [
            "the",
            "cat",
            "sat",
            "on",
            "mat",
            ".",
            "Human",
            "Assistant",
            ":",
        ]
        .iter()
        .map(|w| w.to_string())
        .collect();
        osp::demo::wordlevel::write_tokenizer(&dir, &words).expect("word tokenizer");
        osp::tokenizer::Tokenizer::from_hf_dir(&dir).expect("word tokenizer loads")
    })
}
