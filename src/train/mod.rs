//! Training machinery shared by every trainer, and the trainers.
pub mod checkpoint;
pub mod config;
pub mod judge_train;
pub mod lockstep;
pub mod method;
pub mod metrics;
pub mod offline;
pub mod online;
pub mod online_method;
pub mod optim;
pub mod pairs;
pub mod policy;
pub mod ppo;
pub mod resume;
pub mod self_rewarding;
pub mod sft;
pub mod trainer;
