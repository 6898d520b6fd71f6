//! Hugging Face tokenizers: a bare `tokenizer.json`, or (when the input holds a line
//! `=====`) a folder with `tokenizer.json` and, after the separator, `tokenizer_config.json`
//! (specials, chat template). A loaded tokenizer then encodes, decodes and renders a chat.
#![no_main]
mod common;
use libfuzzer_sys::fuzz_target;
use osp::tokenizer::{ChatMessage, Tokenizer};

fuzz_target!(|data: &[u8]| {
    let sep = b"\n=====\n";
    let split = data.windows(sep.len()).position(|w| w == sep);
    let tok = match split {
        None => Tokenizer::from_tokenizer_json(&common::put("tokenizer.json", data)),
        Some(i) => {
            let _ = std::fs::create_dir_all(common::scratch().join("tok"));
            common::put("tok/tokenizer.json", &data[..i]);
            common::put("tok/tokenizer_config.json", &data[i + sep.len()..]);
            Tokenizer::from_hf_dir(&common::scratch().join("tok"))
        }
    };
    let Ok(tok) = tok else {
        return;
    };
    if let Ok(ids) = tok.encode("Hello <s> world\n\u{e9}!", true) {
        let _ = tok.decode(&ids);
    }
    let _ = tok.decode(&[0, 1, 2, u32::MAX]);
    let _ = tok.special_tokens();
    if tok.has_chat_template() {
        let chat = [
            ChatMessage::new("user", "hi"),
            ChatMessage::new("assistant", "yo"),
        ];
        let _ = tok.apply_chat_template(&chat, true);
    }
});
