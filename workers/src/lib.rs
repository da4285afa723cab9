//! mirgen's model roles and their candle implementations.
//!
//! Three roles make one MIR round (GenIR, arXiv 2506.06220):
//! - [`Vlm`]: a vision-language model that writes, compares and refines
//!   queries (the [`QueryWriter`] turns the three GenIR prompts into VLM calls);
//! - [`ImageGenerator`]: a text-to-image model that draws a query (seeded);
//! - [`Embedder`]: a retrieval encoder that maps images and texts to unit vectors.
//!
//! Every role takes a batch. A batch-level `Err` means the whole call failed
//! (the caller retries items one by one to isolate a bad item). Implementations
//! are plain structs owned by one worker thread; nothing here is shared.
//!
//! The `tiny` presets ([`tiny`]) are real candle architectures with small,
//! seeded *random* weights: smoke-test models whose text is noise.

pub mod device;
pub mod embedder;
pub mod encoders;
pub mod generator;
pub mod generators;
pub mod image_io;
pub mod kernels;
pub mod preprocess;
pub mod roles;
pub mod sampling;
pub mod seed;
pub mod simulation;
pub mod tiny;
pub mod vlm;
pub mod vlms;

use std::sync::Arc;

pub use candle_core::Device;
pub use image::RgbImage;
pub use roles::{Prompts, QueryWriter};

/// Errors of the model roles. Messages name the input or file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("model computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("cannot decode image {input}: {reason}")]
    BadImage { input: String, reason: String },
    #[error("model files: {0}")]
    Load(String),
    #[error("invalid request: {0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, WorkerError>;

/// What a model is, for manifests, logs and the dataset card.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ModelInfo {
    /// Architecture family, e.g. `clip`, `sd-unet`, `paligemma-style`.
    pub architecture: String,
    /// Where the weights come from: a preset name, a folder, or `hub-id@revision`.
    pub source: String,
    /// True for presets with random weights (their outputs are noise).
    pub smoke_test: bool,
    /// A hash of everything that changes the model's outputs (config + weights
    /// identity + preprocessing); caches are keyed by it.
    pub fingerprint: String,
}

/// One VLM call: images (in order) plus a text prompt.
#[derive(Clone, Debug)]
pub struct VlmRequest {
    pub images: Vec<Arc<RgbImage>>,
    pub system: Option<String>,
    pub prompt: String,
    pub max_new_tokens: usize,
    /// Sampling seed; the same request and seed give the same text.
    pub seed: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct VlmOutput {
    pub text: String,
    pub token_ids: Vec<u32>,
}

/// Sampling settings (GenIR: temperature 0.7, top-p 0.9, repetition penalty 1.1).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SamplingConfig {
    /// Softmax temperature; 0 means greedy decoding.
    #[serde(default = "SamplingConfig::default_temperature")]
    pub temperature: f64,
    /// Nucleus sampling mass.
    #[serde(default = "SamplingConfig::default_top_p")]
    pub top_p: f64,
    /// Penalty on tokens already in the context (1.0 = none).
    #[serde(default = "SamplingConfig::default_repetition_penalty")]
    pub repetition_penalty: f32,
}

impl SamplingConfig {
    fn default_temperature() -> f64 {
        0.7
    }
    fn default_top_p() -> f64 {
        0.9
    }
    fn default_repetition_penalty() -> f32 {
        1.1
    }
    pub fn greedy() -> Self {
        SamplingConfig {
            temperature: 0.0,
            ..Default::default()
        }
    }
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            temperature: Self::default_temperature(),
            top_p: Self::default_top_p(),
            repetition_penalty: Self::default_repetition_penalty(),
        }
    }
}

/// A vision-language model that continues a prompt about zero or more images.
pub trait Vlm: Send {
    fn info(&self) -> ModelInfo;
    /// Generates one continuation per request.
    fn generate(&mut self, batch: &[VlmRequest]) -> Result<Vec<VlmOutput>>;
}

/// One image to draw.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: String,
    /// Seed of the initial noise; ignored when `init_latents` is given.
    pub seed: u64,
    /// Explicit initial latents (flattened, in the model's latent shape), so
    /// tests can inject the noise a reference implementation used.
    pub init_latents: Option<Vec<f32>>,
}

/// A text-to-image model.
pub trait ImageGenerator: Send {
    fn info(&self) -> ModelInfo;
    /// Output resolution (width, height).
    fn resolution(&self) -> (u32, u32);
    /// Draws one image per request.
    fn generate(&mut self, batch: &[GenerateRequest]) -> Result<Vec<RgbImage>>;
}

/// A retrieval encoder mapping images and texts into one space of unit vectors.
pub trait Embedder: Send {
    fn info(&self) -> ModelInfo;
    /// Length of one vector (a text embedding; one of an image's vectors).
    fn dim(&self) -> usize;
    /// Vectors per image embedding: 1 for single-vector encoders (CLIP,
    /// SigLIP, BLIP); BLIP-2 keeps one per Q-Former query token. An image
    /// embedding from [`Embedder::embed_images`] is these vectors
    /// concatenated (`vectors_per_image() * dim()` floats, each vector unit
    /// norm), and its similarity to another embedding is the maximum inner
    /// product over all pairs of their vectors (BLIP-2's "max over queries").
    fn vectors_per_image(&self) -> usize {
        1
    }
    /// How images are preprocessed (resize, crop, mean/std), for index
    /// metadata; `None` when the encoder takes images as they are.
    fn preprocessing(&self) -> Option<serde_json::Value> {
        None
    }
    fn embed_images(&mut self, images: &[&RgbImage]) -> Result<Vec<Vec<f32>>>;
    fn embed_texts(&mut self, texts: &[String]) -> Result<Vec<Vec<f32>>>;
}
