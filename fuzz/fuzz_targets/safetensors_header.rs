//! Model and adapter files of a Hugging Face folder: safetensors (header and data, through
//! osp's reader and the PEFT adapter reader), `config.json` and `adapter_config.json`. The
//! first byte picks the file; the rest is its content.
#![no_main]
mod common;
use candle_core::Device;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, file)) = data.split_first() else {
        return;
    };
    let dir = common::scratch().join("hf");
    let _ = std::fs::create_dir_all(&dir);
    let cpu = Device::Cpu;
    match sel % 4 {
        0 => {
            let p = common::put("hf/model.safetensors", file);
            let _ = osp::model::load::read_safetensors(&p, &cpu);
        }
        1 => {
            common::put("hf/adapter_model.safetensors", file);
            let _ = osp::model::read_adapter_tensors(&dir, &cpu);
        }
        2 => {
            let p = common::put("hf/config.json", file);
            if let Ok(cfg) = osp::model::ModelConfig::from_file(&p) {
                let _ = cfg.checked_num_parameters();
                let _ = cfg.to_hf_json();
            }
        }
        _ => {
            common::put("hf/adapter_config.json", file);
            let _ = osp::lora::LoraConfig::from_peft_dir(&dir);
        }
    }
});
