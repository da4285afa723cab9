//! Image generators from real diffusers checkpoints: SD-Turbo and Stable
//! Diffusion 1.x/2.x-style pipelines (`StableDiffusionPipeline` folders or
//! Hub ids such as `stabilityai/sd-turbo`), see [`sd_turbo`]. Parity with
//! diffusers is tested on a tiny random pipeline of the exact layout
//! (`tests/generator_parity.rs`, made by
//! `scripts/fixtures/make_generator_fixtures.py`).
//!
//! SD 3.5 and FLUX are not implemented yet.

pub mod euler;
pub mod sd_turbo;
pub mod unet;

use candle_core::Device;

pub use sd_turbo::{SdTurboGenerator, SdTurboPipeline};

use crate::generator::DiffusionSettings;
use crate::{ImageGenerator, Result};

/// Loads an image generator from a diffusers pipeline folder or Hub id.
/// `steps` denoising steps (SD-Turbo: 1), classifier-free `guidance`
/// (SD-Turbo: 0; values <= 1 skip the unconditional pass).
pub fn load_generator(
    spec: &str,
    steps: usize,
    guidance: f64,
    device: &Device,
) -> Result<Box<dyn ImageGenerator>> {
    let pipe = SdTurboPipeline::load(spec, device)?;
    Ok(Box::new(SdTurboGenerator::new(
        pipe,
        DiffusionSettings { steps, guidance },
    )?))
}
