//! llama2.c files: the legacy float32 checkpoint (7-field header, then weights) and
//! `tokenizer.bin` (max_token_length, then score/len/bytes records). The first byte picks
//! the file; for a tokenizer the next two give the vocabulary size the model header would.
#![no_main]
mod common;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    if sel & 1 == 0 {
        let p = common::put("model.bin", rest);
        let _ = osp::model::load::read_llama2c(&p, &candle_core::Device::Cpu);
        return;
    }
    let [a, b, file @ ..] = rest else {
        return;
    };
    let vocab = u16::from_le_bytes([*a, *b]) as usize;
    let p = common::put("tokenizer.bin", file);
    if let Ok(tok) = osp::tokenizer::Tokenizer::from_llama2c(&p, vocab) {
        if let Ok(ids) = tok.encode("Once upon a time, <s> \u{e9}\n", true) {
            let _ = tok.decode(&ids);
        }
        let _ = tok.decode(&[0, 1, 2, 3, 300, u32::MAX]);
        let _ = tok.special_tokens();
    }
});
