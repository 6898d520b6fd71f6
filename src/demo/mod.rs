//! The built-in demo: two tasks with exact oracles, an SFT model trained from scratch,
//! preference augmentation on a 2% seed of "human" preferences, then SFT, DPO, IPO, online
//! DPO, OSP and two OSP ablations at equal budgets, evaluated by the oracle.
pub mod evaluate;
pub mod methods;
pub mod pipeline;
pub mod report;
pub mod seeds;
pub mod tasks;
pub mod wordlevel;

pub use pipeline::{run_demo, DemoOptions};
pub use seeds::run_seeds;
