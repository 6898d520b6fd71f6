//! osp: Online Self-Preferring alignment of language models on candle.
pub mod data;
pub mod demo;
pub mod eval;
pub mod io;
pub mod judge;
pub mod lora;
pub mod loss;
pub mod model;
pub mod pairing;
pub mod ppo;
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
            Ok(candle_core::Device::new_cuda(ordinal)?)
        }
        other => anyhow::bail!("unknown device `{other}` (cpu, cuda, cuda:N)"),
    }
}
