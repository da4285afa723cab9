//! Image generators from real diffusers checkpoints: SD-Turbo and Stable
//! Diffusion 1.x/2.x-style pipelines (`StableDiffusionPipeline` folders or
//! Hub ids such as `stabilityai/sd-turbo`), see [`sd_turbo`]. Parity with
//! diffusers is tested on a tiny random pipeline of the exact layout
//! (`tests/generator_parity.rs`, made by
//! `scripts/fixtures/make_generator_fixtures.py`).
//!
//! FLUX.1 (`FluxPipeline` folders or Hub ids such as
//! `black-forest-labs/FLUX.1-schnell`), see [`flux`], is tested the same way
//! (`tests/flux_parity.rs`, `scripts/fixtures/make_flux_fixtures.py`).
//! Stable Diffusion 3.5 (`StableDiffusion3Pipeline` folders or Hub ids such
//! as `stabilityai/stable-diffusion-3.5-large`), see [`sd3`], likewise
//! (`tests/sd3_parity.rs`, `scripts/fixtures/make_sd3_fixtures.py`).
//! SDXL-Turbo (`StableDiffusionXLPipeline`, e.g. `stabilityai/sdxl-turbo`),
//! see [`sdxl`], likewise (`tests/sdxl_parity.rs`,
//! `scripts/fixtures/make_sdxl_fixtures.py`).

pub mod common;
pub mod euler;
pub mod flux;
pub mod sd3;
pub mod sd_turbo;
pub mod sdxl;
pub mod unet;

use candle_core::Device;

pub use flux::{FluxGenerator, FluxPipeline};
pub use sd3::{Sd3Generator, Sd3Pipeline};
pub use sd_turbo::{SdTurboGenerator, SdTurboPipeline};

use crate::generator::DiffusionSettings;
use crate::{ImageGenerator, Result};

/// Loads an image generator from a diffusers pipeline folder or Hub id.
/// `steps` denoising steps (SD-Turbo: 1), classifier-free `guidance`
/// (SD-Turbo: 0; values <= 1 skip the unconditional pass). A folder whose
/// `model_index.json` names `FluxPipeline` loads FLUX.1 (`guidance` is then
/// FLUX.1-dev's embedded guidance scale), `StableDiffusion3Pipeline` SD 3.5
/// (classifier-free guidance), anything else the Stable Diffusion
/// pipeline.
pub fn load_generator(
    spec: &str,
    steps: usize,
    guidance: f64,
    device: &Device,
) -> Result<Box<dyn ImageGenerator>> {
    let (dir, source) = sd_turbo::resolve_pipeline(spec)?;
    if flux::is_flux_pipeline(&dir) {
        let pipe = FluxPipeline::load_dir(&dir, &source, device)?;
        return Ok(Box::new(FluxGenerator::new(
            pipe,
            DiffusionSettings { steps, guidance },
        )?));
    }
    if sd3::is_sd3_pipeline(&dir) {
        let pipe = Sd3Pipeline::load_dir(&dir, &source, device)?;
        return Ok(Box::new(Sd3Generator::new(
            pipe,
            DiffusionSettings { steps, guidance },
        )?));
    }
    if sdxl::is_sdxl_pipeline(&dir) {
        let pipe = sdxl::SdxlPipeline::load_dir(&dir, &source, device)?;
        let settings = DiffusionSettings { steps, guidance };
        return Ok(Box::new(sdxl::SdxlGenerator::new(pipe, settings)?));
    }
    let pipe = SdTurboPipeline::load_dir(&dir, &source, device)?;
    Ok(Box::new(SdTurboGenerator::new(
        pipe,
        DiffusionSettings { steps, guidance },
    )?))
}
