//! Training machinery shared by every trainer, and the trainers.
pub mod checkpoint;
pub mod config;
pub mod metrics;
pub mod optim;
pub mod sft;
pub mod trainer;
