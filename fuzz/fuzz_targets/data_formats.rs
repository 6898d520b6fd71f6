//! Every data reader (src/data/): JSON / JSON Lines / gzip records and the prompt, TRL
//! preference, HH, TL;DR, PandaLM and SFT layouts. The first byte picks the reader and the
//! malformed-record policy; the rest is the file. Any input must give Ok or Err, never a panic.
#![no_main]
mod common;
use libfuzzer_sys::fuzz_target;
use osp::data::jsonl::{read_records, OnMalformed};
use osp::data::preference::{
    load_hh, load_pandalm, load_preferences, load_prompts, load_tldr, ChatRender,
};
use osp::data::sft::load_sft;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, file)) = data.split_first() else {
        return;
    };
    let path = common::put("data.jsonl", file);
    let mode = if sel & 0x80 != 0 {
        OnMalformed::Abort
    } else {
        OnMalformed::Skip
    };
    let render = ChatRender::Plain;
    let _ = match sel & 0x7 {
        0 => read_records(&path, mode).map(|_| ()),
        1 => load_prompts(&path, render, mode).map(|_| ()),
        2 => load_preferences(&path, render, mode).map(|_| ()),
        3 => load_hh(&path, mode).map(|_| ()),
        4 => load_tldr(&path, mode).map(|_| ()),
        5 => load_pandalm(&path, mode).map(|_| ()),
        _ => {
            let max_len = 1 + ((sel >> 3) & 0xf) as usize * 4;
            load_sft(&path, common::word_tokenizer(), max_len, mode).map(|_| ())
        }
    };
});
