//! Code the diffusers pipelines ([`super::sd_turbo`], [`super::sdxl`],
//! [`super::sd3`], [`super::flux`]) share: reading a pipeline folder
//! (layout check, weights, checkpoint fingerprint), the VAE's output as
//! images, the initial noise of a request and the [`ImageGenerator`]
//! wrapper. Each pipeline used to carry its own copy; what differs between
//! them (class name, parts, message wording, files hashed) is a parameter.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::sd_turbo::{part_weight_files, weights_err};
use crate::encoders::hf::{load_err, plain, ConfigReader};
use crate::generator::DiffusionSettings;
use crate::seed::gaussian;
use crate::{GenerateRequest, ImageGenerator, ModelInfo, Result, RgbImage, WorkerError};

// ------------------------------------------------------------------ folder

/// Whether `dir/model_index.json` names the pipeline class `class`.
pub fn pipeline_class_is(dir: &Path, class: &str) -> bool {
    crate::encoders::hf::read_json(dir, "model_index.json")
        .ok()
        .and_then(|v| v["_class_name"].as_str().map(|c| c == class))
        .unwrap_or(false)
}

/// What [`check_layout`] checks a pipeline folder against, and the wording
/// of its errors (kept per pipeline: the messages tell users what the
/// loader they called reads).
pub struct Layout<'a> {
    /// `model_index.json`'s `_class_name`, e.g. `FluxPipeline`.
    pub class: &'a str,
    /// The sub-folders the pipeline needs.
    pub parts: &'a [&'a str],
    /// Completes "no model_index.json; {what} (model_index.json, parts/)",
    /// e.g. "a FLUX pipeline is a diffusers folder".
    pub what: &'a str,
    /// Completes "_class_name = \"X\": {wrong_class}".
    pub wrong_class: &'a str,
    /// Appended to "the pipeline has no {part}" (given the part).
    pub missing_note: fn(&str) -> String,
}

/// No note after "the pipeline has no {part}".
pub fn no_note(_: &str) -> String {
    String::new()
}

/// Checks `model_index.json` (present, the right class, every part listed)
/// and that every part's folder is there; returns the index.
pub fn check_layout(dir: &Path, layout: &Layout) -> Result<ConfigReader> {
    if !dir.join("model_index.json").exists() {
        return Err(load_err(format!(
            "{}: no model_index.json; {} (model_index.json, {}/)",
            dir.display(),
            layout.what,
            layout.parts.join("/, ")
        )));
    }
    let index = ConfigReader::read(dir, "model_index.json")?;
    let class = index.str("_class_name").unwrap_or("");
    if class != layout.class {
        return Err(index.error(format!("_class_name = {class:?}: {}", layout.wrong_class)));
    }
    for part in layout.parts {
        let entry = &index.value()[*part];
        if entry.is_null() || entry.get(1).is_some_and(Value::is_null) {
            return Err(index.error(format!(
                "the pipeline has no {part}{}",
                (layout.missing_note)(part)
            )));
        }
        if !dir.join(part).is_dir() {
            return Err(load_err(format!(
                "{}: missing; model_index.json lists {part} but the folder has no {part}/ sub-folder \
                 (copy or download the whole pipeline)",
                dir.join(part).display()
            )));
        }
    }
    Ok(index)
}

/// A part's weights (see [`part_weight_files`]) memory-mapped as f32, each
/// file checked to be readable safetensors first (so a truncated file or a
/// git-lfs pointer is named); also returns the first file's path as a label
/// for later errors.
pub fn part_var_builder(
    dir: &Path,
    stem: &str,
    device: &Device,
) -> Result<(VarBuilder<'static>, String)> {
    let files = part_weight_files(dir, stem)?;
    for f in &files {
        // SAFETY: memory-mapped read-only; model files are not modified while loaded.
        unsafe { candle_core::safetensors::MmapedSafetensors::new(f) }.map_err(|e| {
            load_err(format!(
                "{}: not a readable safetensors file ({}); it is truncated or corrupt (or a git-lfs pointer): \
                 download it again",
                f.display(),
                plain(e)
            ))
        })?;
    }
    let label = files[0].display().to_string();
    // SAFETY: as above.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, device) }
        .map_err(|e| load_err(format!("{label}: {}", plain(e))))?;
    Ok((vb, label))
}

/// The pipeline's `vae/` (`AutoencoderKL`, config from
/// [`super::sd_turbo::vae_config`]).
pub fn load_vae(dir: &Path, vcfg: AutoEncoderKLConfig, device: &Device) -> Result<AutoEncoderKL> {
    let (vb, label) = part_var_builder(&dir.join("vae"), "diffusion_pytorch_model", device)?;
    AutoEncoderKL::new(vb, 3, 3, vcfg).map_err(|e| weights_err(&label, e))
}

/// That the denoiser (config `cfg`) takes and gives the VAE's latents
/// (unpacked: SD/SD-Turbo, SDXL and SD3).
pub fn check_latent_channels(
    cfg: &ConfigReader,
    in_channels: usize,
    out_channels: usize,
    latent_channels: usize,
) -> Result<()> {
    if latent_channels != in_channels || in_channels != out_channels {
        return Err(cfg.error(format!(
            "in_channels = {in_channels}, out_channels = {out_channels} but the VAE has latent_channels = {latent_channels}"
        )));
    }
    Ok(())
}

/// `(width, height)` rounded down to multiples of `m`, which the pipeline
/// `name` needs (and at least `m` x `m`).
pub fn round_resolution(
    width: usize,
    height: usize,
    m: usize,
    name: &str,
) -> Result<(usize, usize)> {
    if width < m || height < m {
        return Err(WorkerError::Invalid(format!(
            "{width}x{height}: {name} needs at least {m}x{m} pixels"
        )));
    }
    Ok((width / m * m, height / m * m))
}

/// A checkpoint fingerprint: `h` (already fed the pipeline's tag and
/// settings) then, in order, each of `files` that exists (name, length,
/// bytes) and, for each `(part, stem)` of `weights`, each weight file's
/// length and its first and last MiB (hashing whole multi-GB files would
/// make every load slow). The first 16 bytes of the digest, hex.
pub fn fingerprint<S: AsRef<str>>(
    mut h: Sha256,
    dir: &Path,
    files: &[S],
    weights: &[(&str, &str)],
) -> Result<String> {
    for name in files {
        let name = name.as_ref();
        if let Ok(b) = std::fs::read(dir.join(name)) {
            h.update(name.as_bytes());
            h.update((b.len() as u64).to_le_bytes());
            h.update(&b);
        }
    }
    for &(part, stem) in weights {
        for f in part_weight_files(&dir.join(part), stem)? {
            let io = |e: std::io::Error| load_err(format!("{}: {e}", f.display()));
            let mut file = std::fs::File::open(&f).map_err(io)?;
            let len = file.metadata().map_err(io)?.len();
            h.update(part.as_bytes());
            h.update(len.to_le_bytes());
            const MIB: u64 = 1 << 20;
            for start in [0, len.saturating_sub(MIB)] {
                let mut buf = vec![0u8; MIB.min(len.saturating_sub(start)) as usize];
                file.seek(SeekFrom::Start(start)).map_err(io)?;
                file.read_exact(&mut buf).map_err(io)?;
                h.update(&buf);
            }
        }
    }
    Ok(hex::encode(&h.finalize()[..16]))
}

// ------------------------------------------------------------------ latents and images

/// The initial latents of a request, (1, c, h, w): its `init_latents`
/// ((c, h, w) row-major, what diffusers' `latents=` takes; the RNG is not
/// used), else a standard Gaussian from its seed. SD/SD-Turbo, SDXL and SD3
/// share it; FLUX packs its latents and words the error for that.
pub fn initial_latents(
    r: &GenerateRequest,
    (c, h, w): (usize, usize, usize),
    device: &Device,
) -> Result<Tensor> {
    let n = c * h * w;
    let v = match &r.init_latents {
        Some(l) if l.len() == n => l.clone(),
        Some(l) => {
            return Err(WorkerError::Invalid(format!(
                "init_latents has {} values, the model needs {c}x{h}x{w} = {n}",
                l.len()
            )))
        }
        None => gaussian(r.seed, n),
    };
    Ok(Tensor::from_vec(v, (1, c, h, w), device)?)
}

/// `vae.decode` of each latent of the batch `x` on its own, concatenated
/// (B, 3, H, W): candle's VAE lets batch items interact, diffusers' does
/// not. `x` is already scaled (and shifted) as the pipeline needs.
pub fn vae_decode_each(vae: &AutoEncoderKL, x: &Tensor) -> Result<Tensor> {
    let parts = (0..x.dim(0)?)
        .map(|i| vae.decode(&x.i(i..i + 1)?))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 0)?)
}

/// The VAE's output in [0, 1] as diffusers' image processor makes it:
/// `(raw / 2 + 0.5).clamp(0, 1)`.
pub fn unit_range(raw: &Tensor) -> Result<Tensor> {
    Ok(((raw / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
}

/// Images (B, 3, H, W) in [0, 1] as `output_type="pil"` makes them:
/// `(x * 255).round()` as u8.
pub fn to_rgb(images: &Tensor) -> Result<Vec<RgbImage>> {
    let images = (images * 255.0)?
        .round()?
        .to_dtype(DType::U8)?
        .to_device(&Device::Cpu)?;
    let mut out = Vec::new();
    for i in 0..images.dim(0)? {
        let hwc = images.i(i)?.permute((1, 2, 0))?.contiguous()?;
        let (h, w, _) = hwc.dims3()?;
        let data = hwc.flatten_all()?.to_vec1::<u8>()?;
        out.push(
            RgbImage::from_raw(w as u32, h as u32, data)
                .ok_or_else(|| WorkerError::Invalid("decoded image has the wrong size".into()))?,
        );
    }
    Ok(out)
}

// ------------------------------------------------------------------ generator

/// What [`DiffusionGenerator`] needs of a pipeline; each pipeline module
/// implements it by delegating to its own methods.
pub trait DiffusionPipeline: Send {
    /// [`ModelInfo::architecture`], e.g. `sd-turbo`.
    const ARCHITECTURE: &'static str;
    /// Builds the scheduler for `steps`, so that a bad step count fails when
    /// the generator is made rather than at the first image.
    fn check_steps(&self, steps: usize) -> Result<()>;
    /// Output (width, height).
    fn size(&self) -> (usize, usize);
    /// Where the weights come from (a folder or `hub:repo@commit`).
    fn source(&self) -> &str;
    /// Whether the folder is marked as holding random weights.
    fn random_weights(&self) -> bool;
    /// The start of [`ModelInfo::fingerprint`]: the checkpoint's hash and
    /// whatever else of the pipeline changes its images (e.g. a settable
    /// resolution), e.g. `flux-pipeline-<hash>/512x512`.
    fn fingerprint_key(&self) -> String;
    /// One image for one request.
    fn generate_one(&self, r: &GenerateRequest, steps: usize, guidance: f64) -> Result<RgbImage>;
}

/// A diffusers pipeline with its sampling settings as an
/// [`ImageGenerator`] (`FluxGenerator`, `Sd3Generator`, `SdxlGenerator` and
/// `SdTurboGenerator` are this type for their pipelines).
pub struct DiffusionGenerator<P> {
    pipe: P,
    settings: DiffusionSettings,
}

impl<P: DiffusionPipeline> DiffusionGenerator<P> {
    pub fn new(pipe: P, settings: DiffusionSettings) -> Result<Self> {
        pipe.check_steps(settings.steps)?;
        Ok(DiffusionGenerator { pipe, settings })
    }

    pub fn pipeline(&self) -> &P {
        &self.pipe
    }
}

impl<P: DiffusionPipeline> ImageGenerator for DiffusionGenerator<P> {
    fn info(&self) -> ModelInfo {
        ModelInfo {
            architecture: P::ARCHITECTURE.into(),
            source: self.pipe.source().to_string(),
            smoke_test: self.pipe.random_weights(),
            fingerprint: format!(
                "{}/steps={}/guidance={}",
                self.pipe.fingerprint_key(),
                self.settings.steps,
                self.settings.guidance
            ),
        }
    }

    fn resolution(&self) -> (u32, u32) {
        let (w, h) = self.pipe.size();
        (w as u32, h as u32)
    }

    /// One denoising loop per request: an image never depends on the batch.
    fn generate(&mut self, batch: &[GenerateRequest]) -> Result<Vec<RgbImage>> {
        batch
            .iter()
            .map(|r| {
                self.pipe
                    .generate_one(r, self.settings.steps, self.settings.guidance)
            })
            .collect()
    }
}

/// Implements [`DiffusionPipeline`] for a pipeline type `$pipe` of the
/// calling module by delegating to its own `scheduler`, `resolution` and
/// `generate_one` methods and its `source`, `random_weights` and
/// `fingerprint` fields, which all four pipelines have alike (a macro, so
/// that it can read the private fields); `|p| key` makes the fingerprint key
/// from the pipeline `p`.
macro_rules! impl_diffusion_pipeline {
    ($pipe:ident, $arch:literal, |$p:ident| $key:expr) => {
        impl $crate::generators::common::DiffusionPipeline for $pipe {
            const ARCHITECTURE: &'static str = $arch;

            fn check_steps(&self, steps: usize) -> $crate::Result<()> {
                self.scheduler(steps).map(drop)
            }

            fn size(&self) -> (usize, usize) {
                self.resolution()
            }

            fn source(&self) -> &str {
                &self.source
            }

            fn random_weights(&self) -> bool {
                self.random_weights
            }

            fn fingerprint_key(&self) -> String {
                let $p = self;
                $key
            }

            fn generate_one(
                &self,
                r: &$crate::GenerateRequest,
                steps: usize,
                guidance: f64,
            ) -> $crate::Result<$crate::RgbImage> {
                $pipe::generate_one(self, r, steps, guidance)
            }
        }
    };
}
pub(crate) use impl_diffusion_pipeline;
