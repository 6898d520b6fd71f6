//! osp: Online Self-Preferring alignment of language models on candle.
pub mod alloc;
pub mod bench;
pub mod compare;
pub mod data;
pub mod demo;
pub mod engine;
pub mod eval;
pub mod gguf;
pub mod io;
pub mod judge;
pub mod lora;
pub mod loss;
pub mod model;
pub mod pairing;
pub mod ppo;
pub mod random;
pub mod report;
pub mod reward;
pub mod sample;
pub mod self_reward;
pub mod tokenizer;
pub mod train;

/// The device named on the command line: `cpu`, `cuda` or `cuda:N`.
pub fn device(name: &str) -> anyhow::Result<candle_core::Device> {
    match name {
        "cpu" => Ok(candle_core::Device::Cpu),
        n if n == "cuda" || n.starts_with("cuda:") => {
            let ordinal = n.strip_prefix("cuda:").unwrap_or("0");
            let ordinal: usize = ordinal
                .parse()
                .map_err(|_| anyhow::anyhow!("bad device `{n}`: expected cuda:N"))?;
            if !candle_core::utils::cuda_is_available() {
                anyhow::bail!("device `{n}`: this osp was built without the `cuda` feature");
            }
            cuda_device(ordinal)
        }
        other => anyhow::bail!("unknown device `{other}` (cpu, cuda, cuda:N)"),
    }
}

/// One `Device` per CUDA ordinal for the whole process. candle gives every `new_cuda` call a
/// device of its own (own stream, own kernel modules), and tensors of two such devices cannot
/// meet in one op even on the same GPU; models loaded separately (policy, judge, reference)
/// must share one.
fn cuda_device(ordinal: usize) -> anyhow::Result<candle_core::Device> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static DEVICES: OnceLock<Mutex<HashMap<usize, candle_core::Device>>> = OnceLock::new();
    let mut map = DEVICES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(d) = map.get(&ordinal) {
        return Ok(d.clone());
    }
    let d = candle_core::Device::new_cuda(ordinal)
        .map_err(|e| anyhow::anyhow!("device `cuda:{ordinal}`: {e}"))?;
    map.insert(ordinal, d.clone());
    Ok(d)
}
