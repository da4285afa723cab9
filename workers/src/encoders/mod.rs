//! Retrieval encoders from Hugging Face checkpoints (local folders or Hub
//! ids), computing what transformers computes: see [`hf::load_embedder`].
//! Parity with transformers is tested on tiny random checkpoints made by
//! `scripts/fixtures/make_encoder_fixtures.py` (`tests/encoder_parity.rs`).

pub mod blip;
pub mod blip2;
pub mod clip;
pub mod hf;
pub mod layers;
pub mod pil_resize;
pub mod siglip;

pub use hf::{load_embedder, HfEmbedder};
