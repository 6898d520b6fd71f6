//! The transformer, its configuration, its differentiable custom ops and checkpoint loading.
pub mod config;
pub mod export;
pub mod fast;
pub mod init;
pub mod llama;
pub mod load;
pub mod ops;
pub mod peft;

pub use config::ModelConfig;
pub use llama::{KvCache, Llama, TokenBatch, Trainable, Weights};
pub use load::{load_model, LoadedModel};
pub use peft::{load_adapter, read_adapter_tensors, save_adapter};
