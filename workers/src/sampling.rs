//! Token sampling: temperature + top-p + repetition penalty, seeded.

use candle_core::{DType, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};

use crate::{Result, SamplingConfig};

/// A seeded sampler for one sequence.
pub struct Sampler {
    processor: LogitsProcessor,
    repetition_penalty: f32,
}

impl Sampler {
    pub fn new(cfg: &SamplingConfig, seed: u64) -> Self {
        let sampling = if cfg.temperature <= 0.0 {
            Sampling::ArgMax
        } else if cfg.top_p >= 1.0 {
            Sampling::All {
                temperature: cfg.temperature,
            }
        } else {
            Sampling::TopP {
                p: cfg.top_p,
                temperature: cfg.temperature,
            }
        };
        Sampler {
            processor: LogitsProcessor::from_sampling(seed, sampling),
            repetition_penalty: cfg.repetition_penalty,
        }
    }

    /// Samples the next token from 1-D logits, penalising `context` tokens.
    pub fn sample(&mut self, logits: &Tensor, context: &[u32]) -> Result<u32> {
        let logits = logits.to_dtype(DType::F32)?;
        let logits = if (self.repetition_penalty - 1.0).abs() > f32::EPSILON && !context.is_empty()
        {
            candle_transformers::utils::apply_repeat_penalty(
                &logits,
                self.repetition_penalty,
                context,
            )?
        } else {
            logits
        };
        Ok(self.processor.sample(&logits)?)
    }
}
