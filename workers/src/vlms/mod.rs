//! Vision-language models from Hugging Face checkpoints (local folders or
//! Hub ids), computing what transformers computes: see [`load_vlm`].
//! Parity with transformers is tested on tiny random checkpoints made by
//! `scripts/fixtures/make_vlm_fixtures.py` (`tests/vlm_parity.rs`).
//!
//! Implemented: Gemma 3 multimodal ([`gemma3`]) and Qwen3-VL ([`qwen3vl`],
//! parity: `tests/qwen3vl_parity.rs`, fixtures by
//! `scripts/fixtures/make_qwen3vl_fixtures.py`).

pub mod gemma3;
pub mod qwen3vl;
mod shared;

pub use gemma3::{load_vlm, resolve_vlm, Gemma3Vlm};
