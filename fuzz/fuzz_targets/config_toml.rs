//! Run configs: a TOML file plus `--set key=value` overrides, for every command that reads
//! one (sft, train with and without --method, judge-train, rm-train) and the demo budget's
//! `--set`. Input: the TOML text, then a line `---`, then one override a line; the first
//! byte picks the command. Loading validates, as the CLI does before any work.
#![no_main]
mod common;
use libfuzzer_sys::fuzz_target;
use osp::train::method::{Method, TrainConfig};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let (toml_text, sets) = text.split_once("\n---\n").unwrap_or((text, ""));
    let sets: Vec<String> = sets.lines().map(String::from).collect();
    let path = common::put("config.toml", toml_text.as_bytes());
    let with_file = sel & 0x80 == 0;
    let file = with_file.then_some(path.as_path());
    let _ = match sel & 0x7 {
        0 => osp::train::sft::SftConfig::load(file, &sets).map(|c| toml::to_string(&c).ok()),
        1 => TrainConfig::load(file, &sets, None).map(|c| toml::to_string(&c).ok()),
        2 => TrainConfig::load(file, &sets, Some(Method::Dpo)).map(|c| toml::to_string(&c).ok()),
        3 => osp::train::judge_train::JudgeTrainConfig::load(file, &sets)
            .map(|c| toml::to_string(&c).ok()),
        4 => osp::reward::train::RmTrainConfig::load(file, &sets).map(|c| toml::to_string(&c).ok()),
        _ => osp::demo::pipeline::DemoBudget::new(sel & 0x40 != 0)
            .with_overrides(&sets)
            .map(|b| toml::to_string(&b).ok()),
    };
});
