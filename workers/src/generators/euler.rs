//! diffusers' `EulerDiscreteScheduler` (Karras et al. 2022, arXiv 2206.00364,
//! Algorithm 2 without churn), as `scheduler/scheduler_config.json` of a
//! diffusers pipeline configures it: the betas (`linear`, `scaled_linear`),
//! `timestep_spacing` (`trailing` for SD-Turbo, `leading`, `linspace`),
//! `steps_offset`, `interpolation_type` `linear`, `final_sigmas_type`, and
//! the model's `prediction_type` (`epsilon`, `v_prediction`, `sample`).
//!
//! The schedule is computed the way diffusers computes it: betas and
//! `alphas_cumprod` in f32 (torch), sigmas interpolated in f64 (numpy
//! `np.interp`) and stored as f32. Options that change the sampler
//! (Karras/exponential/beta sigmas, continuous timesteps, zero-SNR
//! rescaling, trained betas) are rejected with the key that asks for them.

use candle_core::Tensor;

use crate::encoders::hf::ConfigReader;
use crate::Result;

/// What the denoiser predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

/// How inference timesteps are spread over the training timesteps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestepSpacing {
    Linspace,
    Leading,
    Trailing,
}

/// The parts of `scheduler_config.json` the Euler sampler uses.
#[derive(Clone, Debug, PartialEq)]
pub struct EulerDiscreteConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    /// `scaled_linear` (true) or `linear` (false).
    pub scaled_linear: bool,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
    /// `final_sigmas_type`: `zero` (false) or `sigma_min` (true).
    pub final_sigma_min: bool,
}

impl Default for EulerDiscreteConfig {
    /// `stabilityai/sd-turbo`'s scheduler.
    fn default() -> Self {
        EulerDiscreteConfig {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            scaled_linear: true,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Trailing,
            steps_offset: 1,
            final_sigma_min: false,
        }
    }
}

impl EulerDiscreteConfig {
    /// From `scheduler/scheduler_config.json`; defaults are diffusers'.
    pub fn from_diffusers(c: &ConfigReader) -> Result<Self> {
        if let Some(class) = c.str("_class_name") {
            if class != "EulerDiscreteScheduler" {
                return Err(c.error(format!(
                    "_class_name = {class:?}: only EulerDiscreteScheduler is implemented"
                )));
            }
        }
        let v = c.value();
        if !v["trained_betas"].is_null() {
            return Err(c.error("trained_betas is not supported".into()));
        }
        for key in [
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "rescale_betas_zero_snr",
        ] {
            if c.bool(key, false)? {
                return Err(c.error(format!("{key} = true is not supported")));
            }
        }
        let choice = |key: &str, default: &str| c.str(key).unwrap_or(default).to_string();
        let interp = choice("interpolation_type", "linear");
        if interp != "linear" {
            return Err(c.error(format!(
                "interpolation_type = {interp:?} is not supported (linear is)"
            )));
        }
        let tt = choice("timestep_type", "discrete");
        if tt != "discrete" {
            return Err(c.error(format!(
                "timestep_type = {tt:?} is not supported (discrete is)"
            )));
        }
        let scaled_linear = match choice("beta_schedule", "linear").as_str() {
            "scaled_linear" => true,
            "linear" => false,
            other => {
                return Err(c.error(format!(
                    "beta_schedule = {other:?} is not supported (linear, scaled_linear are)"
                )))
            }
        };
        let prediction_type = match choice("prediction_type", "epsilon").as_str() {
            "epsilon" => PredictionType::Epsilon,
            "v_prediction" => PredictionType::VPrediction,
            "sample" | "original_sample" => PredictionType::Sample,
            other => {
                return Err(c.error(format!(
                "prediction_type = {other:?} is not supported (epsilon, v_prediction, sample are)"
            )))
            }
        };
        let timestep_spacing = match choice("timestep_spacing", "linspace").as_str() {
            "linspace" => TimestepSpacing::Linspace,
            "leading" => TimestepSpacing::Leading,
            "trailing" => TimestepSpacing::Trailing,
            other => {
                return Err(c.error(format!(
                "timestep_spacing = {other:?} is not supported (linspace, leading, trailing are)"
            )))
            }
        };
        let final_sigma_min = match choice("final_sigmas_type", "zero").as_str() {
            "zero" => false,
            "sigma_min" => true,
            other => {
                return Err(c.error(format!(
                    "final_sigmas_type = {other:?} is not supported (zero, sigma_min are)"
                )))
            }
        };
        let cfg = EulerDiscreteConfig {
            num_train_timesteps: c.usize("num_train_timesteps", 1000)?,
            beta_start: c.f64("beta_start", 0.0001)?,
            beta_end: c.f64("beta_end", 0.02)?,
            scaled_linear,
            prediction_type,
            timestep_spacing,
            steps_offset: c.usize("steps_offset", 0)?,
            final_sigma_min,
        };
        if cfg.num_train_timesteps < 2 {
            return Err(c.error("num_train_timesteps must be at least 2".into()));
        }
        Ok(cfg)
    }

    /// The schedule for `steps` inference steps.
    pub fn build(&self, steps: usize) -> Result<EulerDiscrete> {
        EulerDiscrete::new(self.clone(), steps)
    }
}

/// torch.linspace(start, end, n, dtype=float32): the step from the start
/// for the first half and from the end for the second half.
fn linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    if n == 1 {
        return vec![s];
    }
    let step = (e - s) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                s + step * i as f32
            } else {
                e - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

/// numpy `np.interp(x, arange(len(fp)), fp)`.
fn interp(x: f64, fp: &[f64]) -> f64 {
    if x <= 0.0 {
        return fp[0];
    }
    let last = fp.len() - 1;
    if x >= last as f64 {
        return fp[last];
    }
    let i = x.floor() as usize;
    let w = x - i as f64;
    fp[i] + (fp[i + 1] - fp[i]) * w
}

/// An Euler discrete schedule for a fixed number of steps.
#[derive(Clone, Debug)]
pub struct EulerDiscrete {
    config: EulerDiscreteConfig,
    timesteps: Vec<f64>,
    /// One per timestep plus the final sigma (f32 values, as diffusers keeps them).
    sigmas: Vec<f64>,
}

impl EulerDiscrete {
    pub fn new(config: EulerDiscreteConfig, steps: usize) -> Result<Self> {
        let n = config.num_train_timesteps;
        if steps == 0 || steps > n {
            return Err(crate::WorkerError::Invalid(format!(
                "the Euler scheduler needs between 1 and num_train_timesteps = {n} steps, not {steps}"
            )));
        }
        let betas: Vec<f32> = if config.scaled_linear {
            linspace_f32(config.beta_start.sqrt(), config.beta_end.sqrt(), n)
                .into_iter()
                .map(|b| b * b)
                .collect()
        } else {
            linspace_f32(config.beta_start, config.beta_end, n)
        };
        let mut acc = 1f32;
        let alphas_cumprod: Vec<f32> = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        let train_sigmas: Vec<f64> = alphas_cumprod
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt() as f64)
            .collect();
        let timesteps: Vec<f64> = match config.timestep_spacing {
            TimestepSpacing::Linspace => {
                // np.linspace(0, n - 1, steps, dtype=float32)[::-1]
                let hi = (n - 1) as f64;
                (0..steps)
                    .rev()
                    .map(|i| {
                        let t = if steps == 1 {
                            0.0
                        } else {
                            i as f64 * hi / (steps - 1) as f64
                        };
                        t as f32 as f64
                    })
                    .collect()
            }
            TimestepSpacing::Leading => {
                let ratio = n / steps;
                (0..steps)
                    .rev()
                    .map(|i| (i * ratio + config.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                // np.arange(n, 0, -n / steps).round() - 1
                let ratio = n as f64 / steps as f64;
                let mut ts = Vec::with_capacity(steps);
                let mut k = 0usize;
                loop {
                    let v = n as f64 - k as f64 * ratio;
                    if v <= 0.0 {
                        break;
                    }
                    ts.push(v.round_ties_even() - 1.0);
                    k += 1;
                }
                ts
            }
        };
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| interp(t, &train_sigmas) as f32 as f64)
            .collect();
        sigmas.push(if config.final_sigma_min {
            train_sigmas[0] as f32 as f64
        } else {
            0.0
        });
        Ok(EulerDiscrete {
            config,
            timesteps,
            sigmas,
        })
    }

    pub fn config(&self) -> &EulerDiscreteConfig {
        &self.config
    }

    /// The timesteps the denoiser is called with, first to last.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// Sigma of every step and the final sigma (`timesteps().len() + 1`).
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// The scale of the initial noise (`latents * init_noise_sigma`).
    pub fn init_noise_sigma(&self) -> f64 {
        let max = self.sigmas.iter().copied().fold(0.0, f64::max);
        match self.config.timestep_spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        }
    }

    /// The denoiser input of step `i`: `sample / sqrt(sigma^2 + 1)`.
    pub fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        let s = self.sigma(i)?;
        Ok((sample / (s * s + 1.0).sqrt())?)
    }

    fn sigma(&self, i: usize) -> Result<f64> {
        if i + 1 >= self.sigmas.len() {
            return Err(crate::WorkerError::Invalid(format!(
                "step {i} of a {}-step schedule",
                self.timesteps.len()
            )));
        }
        Ok(self.sigmas[i])
    }

    /// One Euler step (no churn) from step `i` to `i + 1`.
    pub fn step(&self, model_output: &Tensor, i: usize, sample: &Tensor) -> Result<Tensor> {
        let sigma = self.sigma(i)?;
        let pred_original = match self.config.prediction_type {
            PredictionType::Epsilon => (sample - (model_output * sigma)?)?,
            PredictionType::VPrediction => {
                let a = (model_output * (-sigma / (sigma * sigma + 1.0).sqrt()))?;
                (a + (sample / (sigma * sigma + 1.0))?)?
            }
            PredictionType::Sample => model_output.clone(),
        };
        let derivative = ((sample - pred_original)? / sigma)?;
        let dt = self.sigmas[i + 1] - sigma;
        Ok((sample + (derivative * dt)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_schedule_matches_diffusers() {
        // diffusers 0.42 EulerDiscreteScheduler (sd-turbo config), set_timesteps(4)
        let s = EulerDiscreteConfig::default().build(4).unwrap();
        assert_eq!(s.timesteps(), &[999.0, 749.0, 499.0, 249.0]);
        let s1 = EulerDiscreteConfig::default().build(1).unwrap();
        assert_eq!(s1.timesteps(), &[999.0]);
        assert!((s1.sigmas()[0] - 14.614646911621094).abs() < 1e-5);
        assert_eq!(s1.sigmas()[1], 0.0);
        assert!((s1.init_noise_sigma() - 14.614646911621094).abs() < 1e-5);
    }

    fn close(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-6 * y.abs().max(1.0), "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn spacings_and_v_prediction_match_diffusers() {
        // diffusers 0.42: EulerDiscreteScheduler(scaled_linear 0.00085..0.012,
        // steps_offset=1, timestep_spacing=...).set_timesteps(3)
        let build = |sp| {
            EulerDiscreteConfig {
                timestep_spacing: sp,
                ..Default::default()
            }
            .build(3)
            .unwrap()
        };
        let s = build(TimestepSpacing::Leading);
        assert_eq!(s.timesteps(), &[667.0, 334.0, 1.0]);
        close(
            s.sigmas(),
            &[
                2.9295499324798584,
                0.9355102181434631,
                0.04131447896361351,
                0.0,
            ],
        );
        close(&[s.init_noise_sigma()], &[3.0955231189727783]);
        let s = build(TimestepSpacing::Linspace);
        assert_eq!(s.timesteps(), &[999.0, 499.5, 0.0]);
        close(
            s.sigmas(),
            &[
                14.614646911621094,
                1.6155834197998047,
                0.02916753478348255,
                0.0,
            ],
        );
        close(&[s.init_noise_sigma()], &[14.614646911621094]);
        let s = build(TimestepSpacing::Trailing);
        assert_eq!(s.timesteps(), &[999.0, 666.0, 332.0]);
        close(
            s.sigmas(),
            &[
                14.614646911621094,
                2.9183084964752197,
                0.9292148947715759,
                0.0,
            ],
        );
        // linear betas 1e-4..0.02, leading, no offset, v_prediction, 2 steps;
        // step(model_output=[0.1, 0.2, -0.3], t=500, sample=[0.5, -1, 2])
        let s = EulerDiscreteConfig {
            beta_start: 0.0001,
            beta_end: 0.02,
            scaled_linear: false,
            prediction_type: PredictionType::VPrediction,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 0,
            ..Default::default()
        }
        .build(2)
        .unwrap();
        assert_eq!(s.timesteps(), &[500.0, 0.0]);
        close(s.sigmas(), &[3.442967414855957, 0.010001329705119133, 0.0]);
        close(&[s.init_noise_sigma()], &[3.5852510929107666]);
        let dev = candle_core::Device::Cpu;
        let x = Tensor::new(&[[0.5f32, -1.0, 2.0]], &dev).unwrap();
        let m = Tensor::new(&[[0.1f32, 0.2, -0.3]], &dev).unwrap();
        let next = s.step(&m, 0, &x).unwrap().to_vec2::<f32>().unwrap();
        let want = [
            -0.055514633655548096,
            -0.2719804644584656,
            0.44820845127105713,
        ];
        for (a, b) in next[0].iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-5, "{next:?} vs {want:?}");
        }
    }

    #[test]
    fn bad_step_counts_are_errors() {
        assert!(EulerDiscreteConfig::default().build(0).is_err());
        assert!(EulerDiscreteConfig::default().build(1001).is_err());
    }
}
