//! Training and evaluation data: record files (JSON Lines, JSON arrays, gzip), SFT examples
//! tokenized with a loss mask, and preference pairs and prompts from TRL layouts and from
//! the public HH-RLHF, TL;DR and PandaLM data sets.
//!
//! Every record remembers its `file:line`, and every loader takes an [`OnMalformed`]
//! policy, so that bad rows are either reported precisely or skipped with a warning.

pub mod jsonl;
pub mod preference;
pub mod sft;

pub use jsonl::{read_records, OnMalformed, Record, RecordError, Records, MAX_RECORD_BYTES};
pub use preference::{
    load_hh, load_pandalm, load_preferences, load_prompts, load_tldr, tldr_prompt, ChatRender,
    PandaLmStats, PreferencePair, PromptRecord, TldrStats, HH_ASSISTANT,
};
pub use sft::{load_sft, split_eval, TokenizedExample};
