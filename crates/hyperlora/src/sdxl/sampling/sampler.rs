//! Samplers and sigma schedules, faithful to diffusers 0.42.1.
//!
//! A [`Scheduler`] is built from a diffusers `scheduler_config.json` ([`SchedulerConfig`]), a
//! [`Sampler`] and a [`SigmaSchedule`] for a number of steps, and is used the way diffusers'
//! SDXL pipelines use theirs:
//!
//! ```ignore
//! let mut sched = Scheduler::new(&SchedulerConfig::sdxl_base(), Sampler::DpmPp2m, SigmaSchedule::Karras, 20)?;
//! let mut gen = TorchGenerator::new(seed);
//! let mut latents = (gen.randn((1, 4, h / 8, w / 8))? * sched.init_noise_sigma())?;
//! for i in sched.begin_index()..sched.num_inference_steps() {
//!     let x_in = sched.scale_model_input(&latents, i)?;
//!     let eps = unet.forward(&x_in, sched.timestep(i), ...)?;   // + classifier-free guidance
//!     latents = sched.step(&eps, i, &latents, &mut gen)?;
//! }
//! ```
//!
//! | [`Sampler`]       | diffusers scheduler                                                    |
//! |-------------------|------------------------------------------------------------------------|
//! | `Euler`           | `EulerDiscreteScheduler`                                               |
//! | `EulerAncestral`  | `EulerAncestralDiscreteScheduler`                                      |
//! | `DpmPp2m`         | `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)` |
//! | `DpmPp2mSde`      | `DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2)` |
//! | `Ddim`            | `DDIMScheduler` (normal schedule only)                                 |
//!
//! [`SigmaSchedule`]: `Normal` is the scheduler's own table, `Karras` is `use_karras_sigmas=True`,
//! `Exponential` is `use_exponential_sigmas=True`. diffusers' `EulerAncestralDiscreteScheduler`
//! has neither option; for Euler ancestral we use `EulerDiscreteScheduler`'s Karras/exponential
//! sigma and timestep tables (what k-diffusion/ComfyUI's `euler_ancestral` + `karras` does).
//!
//! The tables are computed the way diffusers computes them: the training betas in f32 as
//! `torch.linspace` makes them, `alphas_cumprod` accumulated in f64 and stored in f32, the
//! inference tables in f64 as numpy does and stored in f32; the quirks are kept (Euler's Karras
//! range is the sigma range of its `leading` timesteps, DPM-Solver's is the full training range;
//! DPM-Solver rounds Karras timesteps but truncates exponential ones; the last DPM++ step is
//! first order). Per-step scalars are computed in f32 like diffusers' 0-dim tensors.
//!
//! Model outputs in f16/bf16 are promoted to f32 for the update; the result has the model
//! output's dtype, as in diffusers.

use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::Value;

use super::noise::TorchGenerator;
use crate::{Error, Result};

// ---------------------------------------------------------------------------------------------
// Configuration

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredcosCapV2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    /// The model predicts the clean sample (`"sample"`); Euler ancestral does not support it.
    Sample,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Linspace,
    Trailing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalSigmasType {
    Zero,
    SigmaMin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SolverType {
    Midpoint,
    Heun,
}

/// The fields of a diffusers `scheduler_config.json` that the samplers here use. Fields whose
/// default differs between diffusers' scheduler classes are `Option`s resolved per sampler.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    /// `None`: the class default (`leading` for DDIM, `linspace` otherwise).
    pub timestep_spacing: Option<TimestepSpacing>,
    pub steps_offset: usize,
    /// Euler: `interpolation_type == "log_linear"` (not supported; rejected by `Scheduler::new`).
    pub log_linear_interpolation: bool,
    /// Euler: overrides of the Karras/exponential range.
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub final_sigmas_type: FinalSigmasType,
    /// The schedule the config asks for (`use_karras_sigmas` / `use_exponential_sigmas`).
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    /// DPM-Solver.
    pub solver_type: SolverType,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub lambda_min_clipped: f64,
    /// DDIM: `None` means the class default (true).
    pub clip_sample: Option<bool>,
    pub clip_sample_range: f64,
    /// DDIM: `None` means the class default (true).
    pub set_alpha_to_one: Option<bool>,
    /// Unsupported options, kept so `Scheduler::new` can refuse them instead of ignoring them.
    pub rescale_betas_zero_snr: bool,
    pub thresholding: bool,
    pub continuous_timesteps: bool,
}

impl Default for SchedulerConfig {
    /// diffusers' defaults (those shared by the scheduler classes).
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: None,
            steps_offset: 0,
            log_linear_interpolation: false,
            sigma_min: None,
            sigma_max: None,
            final_sigmas_type: FinalSigmasType::Zero,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            solver_type: SolverType::Midpoint,
            lower_order_final: true,
            euler_at_final: false,
            lambda_min_clipped: f64::NEG_INFINITY,
            clip_sample: None,
            clip_sample_range: 1.0,
            set_alpha_to_one: None,
            rescale_betas_zero_snr: false,
            thresholding: false,
            continuous_timesteps: false,
        }
    }
}

impl SchedulerConfig {
    /// stabilityai/stable-diffusion-xl-base-1.0 `scheduler/scheduler_config.json`
    /// (an `EulerDiscreteScheduler` config).
    pub fn sdxl_base() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: Some(TimestepSpacing::Leading),
            steps_offset: 1,
            clip_sample: Some(false),
            set_alpha_to_one: Some(false),
            ..Self::default()
        }
    }

    /// Reads a diffusers `scheduler_config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::from(e).context(path.display()))?;
        Self::from_json_str(&text).map_err(|e| e.context(path.display()))
    }

    /// Parses the text of a diffusers `scheduler_config.json`; unknown keys are ignored, missing
    /// ones take diffusers' defaults.
    pub fn from_json_str(text: &str) -> Result<Self> {
        const MAX_TRAIN_TIMESTEPS: usize = 100_000;
        // Python's json writes -inf (DPM-Solver's lambda_min_clipped) as a bare -Infinity.
        let cleaned = text
            .replace("-Infinity", "null")
            .replace("Infinity", "null")
            .replace("NaN", "null");
        let v: Value = serde_json::from_str(&cleaned).map_err(|e| {
            Error::invalid_argument(format!("scheduler config is not valid JSON: {e}"))
        })?;
        let obj = v
            .as_object()
            .ok_or_else(|| Error::invalid_argument("scheduler config is not a JSON object"))?;
        let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
        let num = |k: &str| -> Result<Option<f64>> {
            match get(k) {
                None => Ok(None),
                Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                    Error::invalid_argument(format!("scheduler config: {k} is not a number"))
                }),
            }
        };
        let boolean = |k: &str| -> Result<Option<bool>> {
            match get(k) {
                None => Ok(None),
                Some(v) => v.as_bool().map(Some).ok_or_else(|| {
                    Error::invalid_argument(format!("scheduler config: {k} is not a boolean"))
                }),
            }
        };
        let string = |k: &str| -> Result<Option<String>> {
            match get(k) {
                None => Ok(None),
                Some(v) => v.as_str().map(|s| Some(s.to_string())).ok_or_else(|| {
                    Error::invalid_argument(format!("scheduler config: {k} is not a string"))
                }),
            }
        };
        let bad = |k: &str, s: &str| {
            Error::invalid_argument(format!("scheduler config: unsupported {k} {s:?}"))
        };

        let mut c = Self::default();
        if let Some(n) = num("num_train_timesteps")? {
            // The tables are this long (diffusers' models train with 1000).
            if !(2.0..=MAX_TRAIN_TIMESTEPS as f64).contains(&n) || n.fract() != 0.0 {
                return Err(Error::invalid_argument(format!(
                    "scheduler config: num_train_timesteps {n}"
                )));
            }
            c.num_train_timesteps = n as usize;
        }
        if let Some(x) = num("beta_start")? {
            c.beta_start = x;
        }
        if let Some(x) = num("beta_end")? {
            c.beta_end = x;
        }
        if let Some(s) = string("beta_schedule")? {
            c.beta_schedule = match s.as_str() {
                "linear" => BetaSchedule::Linear,
                "scaled_linear" => BetaSchedule::ScaledLinear,
                "squaredcos_cap_v2" => BetaSchedule::SquaredcosCapV2,
                _ => return Err(bad("beta_schedule", &s)),
            };
        }
        if let Some(v) = get("trained_betas") {
            let list = v
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_f64()).collect::<Option<Vec<f64>>>())
                .ok_or_else(|| {
                    Error::invalid_argument(
                        "scheduler config: trained_betas is not a list of numbers",
                    )
                })?;
            c.trained_betas = Some(list);
        }
        if let Some(s) = string("prediction_type")? {
            c.prediction_type = match s.as_str() {
                "epsilon" => PredictionType::Epsilon,
                "v_prediction" => PredictionType::VPrediction,
                "sample" => PredictionType::Sample,
                _ => return Err(bad("prediction_type", &s)),
            };
        }
        if let Some(s) = string("timestep_spacing")? {
            c.timestep_spacing = Some(match s.as_str() {
                "leading" => TimestepSpacing::Leading,
                "linspace" => TimestepSpacing::Linspace,
                "trailing" => TimestepSpacing::Trailing,
                _ => return Err(bad("timestep_spacing", &s)),
            });
        }
        if let Some(n) = num("steps_offset")? {
            if n < 0.0 || n >= c.num_train_timesteps as f64 || n.fract() != 0.0 {
                return Err(Error::invalid_argument(format!(
                    "scheduler config: steps_offset {n}"
                )));
            }
            c.steps_offset = n as usize;
        }
        if let Some(s) = string("interpolation_type")? {
            c.log_linear_interpolation = match s.as_str() {
                "linear" => false,
                "log_linear" => true,
                _ => return Err(bad("interpolation_type", &s)),
            };
        }
        c.sigma_min = num("sigma_min")?;
        c.sigma_max = num("sigma_max")?;
        if let Some(s) = string("final_sigmas_type")? {
            c.final_sigmas_type = match s.as_str() {
                "zero" => FinalSigmasType::Zero,
                "sigma_min" => FinalSigmasType::SigmaMin,
                _ => return Err(bad("final_sigmas_type", &s)),
            };
        }
        c.use_karras_sigmas = boolean("use_karras_sigmas")?.unwrap_or(false);
        c.use_exponential_sigmas = boolean("use_exponential_sigmas")?.unwrap_or(false);
        if let Some(s) = string("solver_type")? {
            c.solver_type = match s.as_str() {
                "midpoint" => SolverType::Midpoint,
                "heun" => SolverType::Heun,
                // diffusers maps these (from other solvers' configs) to midpoint.
                "logrho" | "bh1" | "bh2" => SolverType::Midpoint,
                _ => return Err(bad("solver_type", &s)),
            };
        }
        c.lower_order_final = boolean("lower_order_final")?.unwrap_or(true);
        c.euler_at_final = boolean("euler_at_final")?.unwrap_or(false);
        c.lambda_min_clipped = num("lambda_min_clipped")?.unwrap_or(f64::NEG_INFINITY);
        c.clip_sample = boolean("clip_sample")?;
        c.clip_sample_range = num("clip_sample_range")?.unwrap_or(1.0);
        c.set_alpha_to_one = boolean("set_alpha_to_one")?;
        c.rescale_betas_zero_snr = boolean("rescale_betas_zero_snr")?.unwrap_or(false);
        c.thresholding = boolean("thresholding")?.unwrap_or(false);
        c.continuous_timesteps = string("timestep_type")?.as_deref() == Some("continuous");
        Ok(c)
    }
}

// ---------------------------------------------------------------------------------------------
// Sampler choice

/// The sampling algorithm (names as in ComfyUI / A1111).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sampler {
    Euler,
    EulerAncestral,
    DpmPp2m,
    DpmPp2mSde,
    Ddim,
}

impl Sampler {
    pub const ALL: [Sampler; 5] = [
        Sampler::Euler,
        Sampler::EulerAncestral,
        Sampler::DpmPp2m,
        Sampler::DpmPp2mSde,
        Sampler::Ddim,
    ];

    /// `"euler"`, `"euler_ancestral"`, `"dpmpp_2m"`, `"dpmpp_2m_sde"`, `"ddim"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Sampler::Euler => "euler",
            Sampler::EulerAncestral => "euler_ancestral",
            Sampler::DpmPp2m => "dpmpp_2m",
            Sampler::DpmPp2mSde => "dpmpp_2m_sde",
            Sampler::Ddim => "ddim",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|s| s.as_str() == name)
            .ok_or_else(|| Error::invalid_argument(format!("unknown sampler {name:?} (expected one of euler, euler_ancestral, dpmpp_2m, dpmpp_2m_sde, ddim)")))
    }

    /// Whether `step` draws noise from the generator.
    pub fn is_stochastic(self) -> bool {
        matches!(self, Sampler::EulerAncestral | Sampler::DpmPp2mSde)
    }

    fn is_dpm(self) -> bool {
        matches!(self, Sampler::DpmPp2m | Sampler::DpmPp2mSde)
    }
}

/// How the noise levels of the inference steps are spaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SigmaSchedule {
    /// The scheduler's own spacing (`timestep_spacing` of the config).
    #[default]
    Normal,
    /// `use_karras_sigmas=True` (rho = 7).
    Karras,
    /// `use_exponential_sigmas=True`.
    Exponential,
}

impl SigmaSchedule {
    pub const ALL: [SigmaSchedule; 3] = [
        SigmaSchedule::Normal,
        SigmaSchedule::Karras,
        SigmaSchedule::Exponential,
    ];

    /// `"normal"`, `"karras"`, `"exponential"`.
    pub fn as_str(self) -> &'static str {
        match self {
            SigmaSchedule::Normal => "normal",
            SigmaSchedule::Karras => "karras",
            SigmaSchedule::Exponential => "exponential",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|s| s.as_str() == name)
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "unknown sigma schedule {name:?} (expected normal, karras or exponential)"
                ))
            })
    }

    /// The schedule a config asks for (`use_karras_sigmas` / `use_exponential_sigmas`).
    pub fn from_config(config: &SchedulerConfig) -> Self {
        if config.use_karras_sigmas {
            SigmaSchedule::Karras
        } else if config.use_exponential_sigmas {
            SigmaSchedule::Exponential
        } else {
            SigmaSchedule::Normal
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The scheduler

/// A sampler set up for a number of inference steps; see the module documentation.
#[derive(Debug, Clone)]
pub struct Scheduler {
    sampler: Sampler,
    schedule: SigmaSchedule,
    config: SchedulerConfig,
    alphas_cumprod: Vec<f32>,
    /// DDIM's `final_alpha_cumprod`.
    final_alpha_cumprod: f32,
    timesteps: Vec<f64>,
    /// `num_inference_steps + 1` noise levels (for DDIM, the equivalent `sqrt((1 - a) / a)`).
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
    begin_index: usize,
    /// The index `step` expects next.
    next_step: usize,
    eta: f32,
    /// DPM-Solver: the last two converted model outputs (oldest first).
    model_outputs: [Option<Tensor>; 2],
    lower_order_nums: usize,
}

impl Scheduler {
    /// `scheduler.set_timesteps(num_inference_steps)` for the given sampler and schedule.
    pub fn new(
        config: &SchedulerConfig,
        sampler: Sampler,
        schedule: SigmaSchedule,
        num_inference_steps: usize,
    ) -> Result<Self> {
        validate(config, sampler, schedule, num_inference_steps)?;
        let alphas_cumprod = train_alphas_cumprod(config)?;
        let train_sigmas: Vec<f32> = alphas_cumprod
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt())
            .collect();
        let log_sigmas: Vec<f32> = train_sigmas
            .iter()
            .map(|&s| (s as f64).ln() as f32)
            .collect();
        let n = num_inference_steps;
        let set_alpha_to_one = config.set_alpha_to_one.unwrap_or(true);
        let final_alpha_cumprod = if set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };

        let (timesteps, sigmas, init_noise_sigma) = match sampler {
            Sampler::Euler | Sampler::EulerAncestral => {
                let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
                let base = euler_timesteps(config, spacing, n);
                let interp: Vec<f64> = base
                    .iter()
                    .map(|&t| interp_unit_grid(t, &train_sigmas))
                    .collect();
                let (sig, ts): (Vec<f64>, Vec<f64>) = match schedule {
                    SigmaSchedule::Normal => (interp, base),
                    SigmaSchedule::Karras | SigmaSchedule::Exponential => {
                        let lo = config.sigma_min.unwrap_or(interp[interp.len() - 1]);
                        let hi = config.sigma_max.unwrap_or(interp[0]);
                        let sig = if schedule == SigmaSchedule::Karras {
                            karras(lo, hi, n)
                        } else {
                            exponential(lo, hi, n)
                        };
                        let ts = sig.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
                        (sig, ts)
                    }
                };
                // Euler keeps float32 timesteps (fractional with Karras/exponential).
                let ts: Vec<f64> = ts.iter().map(|&t| t as f32 as f64).collect();
                let mut sigmas: Vec<f32> = sig.iter().map(|&s| s as f32).collect();
                let last = match (sampler, config.final_sigmas_type) {
                    (Sampler::Euler, FinalSigmasType::SigmaMin) => train_sigmas[0],
                    _ => 0.0,
                };
                sigmas.push(last);
                let max = sigmas.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let init = match spacing {
                    TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
                    TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
                };
                (ts, sigmas, init as f64)
            }
            Sampler::DpmPp2m | Sampler::DpmPp2mSde => {
                let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
                let (ts, sig): (Vec<f64>, Vec<f64>) = match schedule {
                    SigmaSchedule::Normal => {
                        let ts = dpm_timesteps(config, &alphas_cumprod, spacing, n);
                        let sig = ts
                            .iter()
                            .map(|&t| interp_unit_grid(t, &train_sigmas))
                            .collect();
                        (ts, sig)
                    }
                    SigmaSchedule::Karras | SigmaSchedule::Exponential => {
                        // The full training range (diffusers' DPM-Solver has no sigma_min/max).
                        let lo = train_sigmas[0] as f64;
                        let hi = train_sigmas[train_sigmas.len() - 1] as f64;
                        let karras_schedule = schedule == SigmaSchedule::Karras;
                        let sig = if karras_schedule {
                            karras(lo, hi, n)
                        } else {
                            exponential(lo, hi, n)
                        };
                        let ts = sig
                            .iter()
                            .map(|&s| {
                                let t = sigma_to_t(s, &log_sigmas);
                                // Karras timesteps are rounded (except for squaredcos_cap_v2);
                                // the float -> int64 conversion then truncates.
                                let t = if karras_schedule
                                    && config.beta_schedule != BetaSchedule::SquaredcosCapV2
                                {
                                    t.round_ties_even()
                                } else {
                                    t
                                };
                                t.trunc()
                            })
                            .collect();
                        (ts, sig)
                    }
                };
                let mut sigmas: Vec<f32> = sig.iter().map(|&s| s as f32).collect();
                sigmas.push(match config.final_sigmas_type {
                    FinalSigmasType::SigmaMin => train_sigmas[0],
                    FinalSigmasType::Zero => 0.0,
                });
                (ts, sigmas, 1.0)
            }
            Sampler::Ddim => {
                let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Leading);
                let ts = ddim_timesteps(config, spacing, n);
                let mut sigmas: Vec<f32> = ts
                    .iter()
                    .map(|&t| {
                        let a = alphas_cumprod[t as usize];
                        ((1.0 - a) / a).sqrt()
                    })
                    .collect();
                sigmas.push(((1.0 - final_alpha_cumprod) / final_alpha_cumprod).sqrt());
                (ts, sigmas, 1.0)
            }
        };
        if timesteps.len() != n || sigmas.len() != n + 1 {
            return Err(Error::internal(format!(
                "{} {}: {} timesteps / {} sigmas for {n} steps",
                sampler.as_str(),
                schedule.as_str(),
                timesteps.len(),
                sigmas.len()
            )));
        }
        if sampler == Sampler::Ddim || sampler.is_dpm() {
            if let Some(t) = timesteps
                .iter()
                .find(|&&t| t < 0.0 || t >= config.num_train_timesteps as f64)
            {
                return Err(Error::invalid_argument(format!(
                    "{}: timestep {t} outside the training range (steps_offset {} too large?)",
                    sampler.as_str(),
                    config.steps_offset
                )));
            }
        }
        Ok(Self {
            sampler,
            schedule,
            config: config.clone(),
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps,
            sigmas,
            init_noise_sigma,
            begin_index: 0,
            next_step: 0,
            eta: 0.0,
            model_outputs: [None, None],
            lower_order_nums: 0,
        })
    }

    pub fn sampler(&self) -> Sampler {
        self.sampler
    }

    pub fn schedule(&self) -> SigmaSchedule {
        self.schedule
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    pub fn num_inference_steps(&self) -> usize {
        self.timesteps.len()
    }

    /// `scheduler.timesteps`: the model's timestep at each step (integers except for Euler /
    /// Euler ancestral with Karras or exponential sigmas, which are fractional float32 values).
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The timestep to give the UNet at `step_index`.
    pub fn timestep(&self, step_index: usize) -> f64 {
        self.timesteps[step_index]
    }

    /// `scheduler.sigmas`: one noise level per step plus the final one (DDIM: the equivalent
    /// `sqrt((1 - alpha_cumprod) / alpha_cumprod)` of its timesteps and final alpha).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// The training `alphas_cumprod` (f32, as diffusers holds it).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// `scheduler.init_noise_sigma`: the initial Gaussian noise is multiplied by this.
    pub fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    /// `scheduler.order` (1 for all samplers here).
    pub fn order(&self) -> usize {
        1
    }

    /// DDIM's `eta` (0 by default, as in diffusers' pipelines); > 0 draws noise in `step`.
    pub fn set_eta(&mut self, eta: f64) -> Result<()> {
        if !(0.0..=1.0).contains(&eta) {
            return Err(Error::invalid_argument(format!(
                "eta must be in [0, 1], got {eta}"
            )));
        }
        self.eta = eta as f32;
        Ok(())
    }

    /// The first step index of the run (0, or the img2img start).
    pub fn begin_index(&self) -> usize {
        self.begin_index
    }

    /// `scheduler.set_begin_index(i)`: the run starts at step `i` (restarts the run's state).
    pub fn set_begin_index(&mut self, begin_index: usize) -> Result<()> {
        if begin_index >= self.timesteps.len() {
            return Err(Error::invalid_argument(format!(
                "begin index {begin_index} out of range for {} steps",
                self.timesteps.len()
            )));
        }
        self.begin_index = begin_index;
        self.reset();
        Ok(())
    }

    /// Image-to-image as diffusers' SDXL img2img pipeline does it (`get_timesteps`):
    /// `init_timestep = min(int(steps * strength), steps)`, the run starts at
    /// `t_start = steps - init_timestep` (also set as the begin index) and the noised latents are
    /// `add_noise(image_latents, noise, t_start)`. Returns `t_start`.
    pub fn img2img_start(&mut self, strength: f64) -> Result<usize> {
        if !(0.0..=1.0).contains(&strength) {
            return Err(Error::invalid_argument(format!(
                "strength must be in [0, 1], got {strength}"
            )));
        }
        let n = self.timesteps.len();
        let init_timestep = ((n as f64 * strength) as usize).min(n);
        let t_start = n - init_timestep;
        if t_start >= n {
            return Err(Error::invalid_argument(format!(
                "strength {strength} with {n} steps leaves no denoising step"
            )));
        }
        self.set_begin_index(t_start)?;
        Ok(t_start)
    }

    /// Forgets the multistep history and expects `begin_index` next.
    pub fn reset(&mut self) {
        self.next_step = self.begin_index;
        self.model_outputs = [None, None];
        self.lower_order_nums = 0;
    }

    fn check_index(&self, step_index: usize) -> Result<()> {
        if step_index >= self.timesteps.len() {
            return Err(Error::invalid_argument(format!(
                "step index {step_index} out of range for {} steps",
                self.timesteps.len()
            )));
        }
        Ok(())
    }

    /// `scheduler.scale_model_input(sample, t)`: Euler-type samplers divide by `sqrt(sigma^2 + 1)`;
    /// DPM-Solver and DDIM return the sample unchanged.
    pub fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        self.check_index(step_index)?;
        match self.sampler {
            Sampler::Euler | Sampler::EulerAncestral => {
                let sigma = self.sigmas[step_index];
                Ok(div(sample, (sigma * sigma + 1.0).sqrt())?)
            }
            _ => Ok(sample.clone()),
        }
    }

    /// `scheduler.add_noise(original, noise, timesteps[step_index])` (img2img).
    pub fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step_index: usize,
    ) -> Result<Tensor> {
        self.check_index(step_index)?;
        let dtype = original.dtype();
        let x = original.to_dtype(DType::F32)?;
        let noise = noise.to_dtype(DType::F32)?.to_device(x.device())?;
        let out = match self.sampler {
            Sampler::Euler | Sampler::EulerAncestral => {
                (&x + mul(&noise, self.sigmas[step_index])?)?
            }
            Sampler::DpmPp2m | Sampler::DpmPp2mSde => {
                let (alpha, sigma) = alpha_sigma(self.sigmas[step_index]);
                (mul(&x, alpha)? + mul(&noise, sigma)?)?
            }
            Sampler::Ddim => {
                let a = self.alphas_cumprod[self.timesteps[step_index] as usize];
                (mul(&x, a.sqrt())? + mul(&noise, (1.0 - a).sqrt())?)?
            }
        };
        Ok(out.to_dtype(dtype)?)
    }

    /// `scheduler.step(model_output, t, sample, generator=generator).prev_sample` for the step at
    /// `step_index`; steps must be taken in order from `begin_index`. Euler ancestral and
    /// DPM++ 2M SDE (and DDIM with eta > 0) draw their noise from `generator`, as diffusers does.
    pub fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        generator: &mut TorchGenerator,
    ) -> Result<Tensor> {
        self.check_index(step_index)?;
        if step_index != self.next_step {
            return Err(Error::invalid_argument(format!(
                "{}: step {step_index} called but step {} was expected (steps run in order from the begin index)",
                self.sampler.as_str(),
                self.next_step
            )));
        }
        if model_output.dims() != sample.dims() {
            return Err(Error::invalid_argument(format!(
                "model output {:?} and sample {:?} differ in shape",
                model_output.dims(),
                sample.dims()
            )));
        }
        let out_dtype = model_output.dtype();
        let mo = model_output.to_dtype(DType::F32)?;
        let x = sample.to_dtype(DType::F32)?;
        let prev = match self.sampler {
            Sampler::Euler => self.euler_step(&mo, step_index, &x)?,
            Sampler::EulerAncestral => {
                self.euler_ancestral_step(&mo, model_output, step_index, &x, generator)?
            }
            Sampler::DpmPp2m | Sampler::DpmPp2mSde => {
                self.dpm_step(&mo, step_index, &x, generator)?
            }
            Sampler::Ddim => self.ddim_step(&mo, model_output, step_index, &x, generator)?,
        };
        self.next_step = step_index + 1;
        Ok(prev.to_dtype(out_dtype)?)
    }

    fn euler_step(&self, mo: &Tensor, i: usize, x: &Tensor) -> Result<Tensor> {
        // s_churn = 0: gamma = 0 and sigma_hat = sigma.
        let sigma = self.sigmas[i];
        let sigma_hat = sigma * (0.0 + 1.0);
        let pred_x0 = match self.config.prediction_type {
            PredictionType::Epsilon => (x - mul(mo, sigma_hat)?)?,
            PredictionType::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                (mul(mo, -sigma / s2.sqrt())? + div(x, s2)?)?
            }
            PredictionType::Sample => mo.clone(),
        };
        let derivative = div(&(x - pred_x0)?, sigma_hat)?;
        let dt = self.sigmas[i + 1] - sigma_hat;
        Ok((x + mul(&derivative, dt)?)?)
    }

    fn euler_ancestral_step(
        &self,
        mo: &Tensor,
        model_output: &Tensor,
        i: usize,
        x: &Tensor,
        generator: &mut TorchGenerator,
    ) -> Result<Tensor> {
        let sigma = self.sigmas[i];
        let pred_x0 = match self.config.prediction_type {
            PredictionType::Epsilon => (x - mul(mo, sigma)?)?,
            PredictionType::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                (mul(mo, -sigma / s2.sqrt())? + div(x, s2)?)?
            }
            PredictionType::Sample => {
                return Err(Error::invalid_argument(
                    "euler_ancestral does not support prediction_type \"sample\"",
                ))
            }
        };
        let (from, to) = (self.sigmas[i], self.sigmas[i + 1]);
        let sigma_up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let sigma_down = (to * to - sigma_up * sigma_up).sqrt();
        let derivative = div(&(x - pred_x0)?, sigma)?;
        let dt = sigma_down - sigma;
        let prev = (x + mul(&derivative, dt)?)?;
        // randn_tensor(model_output.shape, dtype=model_output.dtype, generator=generator)
        let noise = generator.randn_like(model_output)?.to_dtype(DType::F32)?;
        Ok((prev + mul(&noise, sigma_up)?)?)
    }

    fn dpm_step(
        &mut self,
        mo: &Tensor,
        i: usize,
        x: &Tensor,
        generator: &mut TorchGenerator,
    ) -> Result<Tensor> {
        let n = self.timesteps.len();
        let c = &self.config;
        let final_step = i == n - 1;
        let lower_order_final = final_step
            && (c.euler_at_final
                || (c.lower_order_final && n < 15)
                || c.final_sigmas_type == FinalSigmasType::Zero);
        // convert_model_output: the data prediction x0.
        let (alpha, sigma) = alpha_sigma(self.sigmas[i]);
        let x0 = match c.prediction_type {
            PredictionType::Epsilon => div(&(x - mul(mo, sigma)?)?, alpha)?,
            PredictionType::VPrediction => (mul(x, alpha)? - mul(mo, sigma)?)?,
            PredictionType::Sample => mo.clone(),
        };
        self.model_outputs[0] = self.model_outputs[1].take();
        self.model_outputs[1] = Some(x0.clone());
        let sde = self.sampler == Sampler::DpmPp2mSde;
        // randn_tensor(model_output.shape, generator=generator, dtype=torch.float32), every step.
        let noise = if sde {
            Some(
                generator
                    .randn_dtype(x0.shape().clone(), DType::F32)?
                    .to_device(x0.device())?,
            )
        } else {
            None
        };

        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let lambda_t = alpha_t.ln() - sigma_t.ln();
        let lambda_s0 = alpha_s0.ln() - sigma_s0.ln();
        let h = lambda_t - lambda_s0;

        let first_order = self.lower_order_nums < 1 || lower_order_final;
        let prev = if first_order {
            if let Some(noise) = &noise {
                let e2 = (-2.0 * h).exp();
                let a = sigma_t / sigma_s0 * (-h).exp();
                let b = alpha_t * (1.0 - e2);
                let s = sigma_t * (1.0 - e2).sqrt();
                ((mul(x, a)? + mul(&x0, b)?)? + mul(noise, s)?)?
            } else {
                (mul(x, sigma_t / sigma_s0)? - mul(&x0, alpha_t * ((-h).exp() - 1.0))?)?
            }
        } else {
            let m1 = self.model_outputs[0]
                .as_ref()
                .ok_or_else(|| Error::internal("dpm: missing previous output"))?;
            let m0 = &x0;
            let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
            let lambda_s1 = alpha_s1.ln() - sigma_s1.ln();
            let h0 = lambda_s0 - lambda_s1;
            let r0 = h0 / h;
            let d1 = mul(&(m0 - m1)?, 1.0 / r0)?;
            if let Some(noise) = &noise {
                let e2 = (-2.0 * h).exp();
                let a = sigma_t / sigma_s0 * (-h).exp();
                let b = alpha_t * (1.0 - e2);
                let d = match c.solver_type {
                    SolverType::Midpoint => 0.5 * (alpha_t * (1.0 - e2)),
                    SolverType::Heun => alpha_t * ((1.0 - e2) / (-2.0 * h) + 1.0),
                };
                let s = sigma_t * (1.0 - e2).sqrt();
                (((mul(x, a)? + mul(m0, b)?)? + mul(&d1, d)?)? + mul(noise, s)?)?
            } else {
                let em1 = (-h).exp() - 1.0;
                let base = (mul(x, sigma_t / sigma_s0)? - mul(m0, alpha_t * em1)?)?;
                match c.solver_type {
                    SolverType::Midpoint => (base - mul(&d1, 0.5 * (alpha_t * em1))?)?,
                    SolverType::Heun => (base + mul(&d1, alpha_t * (em1 / h + 1.0))?)?,
                }
            }
        };
        if self.lower_order_nums < 2 {
            self.lower_order_nums += 1;
        }
        Ok(prev)
    }

    fn ddim_step(
        &self,
        mo: &Tensor,
        model_output: &Tensor,
        i: usize,
        x: &Tensor,
        generator: &mut TorchGenerator,
    ) -> Result<Tensor> {
        let c = &self.config;
        let t = self.timesteps[i] as i64;
        let prev_t = t - (c.num_train_timesteps / self.timesteps.len()) as i64;
        let a_t = self.alphas_cumprod[t as usize];
        let a_prev = if prev_t >= 0 {
            self.alphas_cumprod[prev_t as usize]
        } else {
            self.final_alpha_cumprod
        };
        let b_t = 1.0 - a_t;
        let (mut pred_x0, pred_eps) = match c.prediction_type {
            PredictionType::Epsilon => (div(&(x - mul(mo, b_t.sqrt())?)?, a_t.sqrt())?, mo.clone()),
            PredictionType::Sample => (mo.clone(), div(&(x - mul(mo, a_t.sqrt())?)?, b_t.sqrt())?),
            PredictionType::VPrediction => (
                (mul(x, a_t.sqrt())? - mul(mo, b_t.sqrt())?)?,
                (mul(mo, a_t.sqrt())? + mul(x, b_t.sqrt())?)?,
            ),
        };
        if c.clip_sample.unwrap_or(true) {
            let r = c.clip_sample_range;
            pred_x0 = pred_x0.clamp(-r, r)?;
        }
        let b_prev = 1.0 - a_prev;
        let variance = (b_prev / b_t) * (1.0 - a_t / a_prev);
        let std_dev = self.eta * variance.sqrt();
        let direction = mul(&pred_eps, (1.0 - a_prev - std_dev * std_dev).sqrt())?;
        let mut prev = (mul(&pred_x0, a_prev.sqrt())? + direction)?;
        if self.eta > 0.0 {
            let noise = generator.randn_like(model_output)?.to_dtype(DType::F32)?;
            prev = (prev + mul(&noise, std_dev)?)?;
        }
        Ok(prev)
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor helpers (f32 scalars, like diffusers' 0-dim float32 tensors)

fn mul(x: &Tensor, s: f32) -> Result<Tensor> {
    Ok(x.affine(s as f64, 0.0)?)
}

/// A true division (not a multiplication by the reciprocal), as torch divides.
fn div(x: &Tensor, s: f32) -> Result<Tensor> {
    let s = Tensor::new(s, x.device())?.to_dtype(x.dtype())?;
    Ok(x.broadcast_div(&s)?)
}

/// DPM-Solver's `_sigma_to_alpha_sigma_t`.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

// ---------------------------------------------------------------------------------------------
// Tables

fn validate(
    config: &SchedulerConfig,
    sampler: Sampler,
    schedule: SigmaSchedule,
    n: usize,
) -> Result<()> {
    let name = sampler.as_str();
    if n == 0 {
        return Err(Error::invalid_argument(
            "the number of inference steps must be at least 1",
        ));
    }
    if n > config.num_train_timesteps {
        return Err(Error::invalid_argument(format!(
            "{n} inference steps exceed the {} training timesteps",
            config.num_train_timesteps
        )));
    }
    if sampler == Sampler::Ddim && schedule != SigmaSchedule::Normal {
        return Err(Error::invalid_argument(format!(
            "ddim supports only the normal sigma schedule, not {}",
            schedule.as_str()
        )));
    }
    let unsupported = |what: &str| {
        Err(Error::invalid_argument(format!(
            "{name}: {what} is not supported"
        )))
    };
    if config.rescale_betas_zero_snr {
        return unsupported("rescale_betas_zero_snr");
    }
    if config.thresholding {
        return unsupported("thresholding");
    }
    if config.continuous_timesteps {
        return unsupported("timestep_type \"continuous\"");
    }
    if config.log_linear_interpolation && matches!(sampler, Sampler::Euler) {
        return unsupported("interpolation_type \"log_linear\"");
    }
    if let Some(b) = &config.trained_betas {
        if b.len() != config.num_train_timesteps {
            return Err(Error::invalid_argument(format!(
                "trained_betas has {} entries for {} training timesteps",
                b.len(),
                config.num_train_timesteps
            )));
        }
    }
    Ok(())
}

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on the CPU, bit for bit: the step
/// in f32, the first half from `start`, the second from `end`, with fused multiply-adds.
fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    if steps == 1 {
        return vec![s];
    }
    let step = (e - s) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, s)
            } else {
                (-step).mul_add((steps - i - 1) as f32, e)
            }
        })
        .collect()
}

/// The training `alphas_cumprod` of a scheduler config, as diffusers builds it (f32 betas, f64
/// running product): entry `t` is the fraction of signal left at training timestep `t`.
pub fn train_alphas_cumprod(config: &SchedulerConfig) -> Result<Vec<f32>> {
    let n = config.num_train_timesteps;
    let betas: Vec<f32> = if let Some(b) = &config.trained_betas {
        b.iter().map(|&x| x as f32).collect()
    } else {
        match config.beta_schedule {
            BetaSchedule::Linear => torch_linspace_f32(config.beta_start, config.beta_end, n),
            BetaSchedule::ScaledLinear => {
                torch_linspace_f32(config.beta_start.sqrt(), config.beta_end.sqrt(), n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            BetaSchedule::SquaredcosCapV2 => {
                let alpha_bar = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                        .cos()
                        .powi(2)
                };
                (0..n)
                    .map(|i| {
                        let t1 = i as f64 / n as f64;
                        let t2 = (i + 1) as f64 / n as f64;
                        (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                    })
                    .collect()
            }
        }
    };
    let mut acc = 1.0f64;
    let ac: Vec<f32> = betas
        .iter()
        .map(|&b| {
            acc *= (1.0f32 - b) as f64;
            acc as f32
        })
        .collect();
    if ac.iter().any(|a| !(a.is_finite() && *a > 0.0 && *a <= 1.0)) {
        return Err(Error::invalid_argument(
            "scheduler config gives alphas_cumprod outside (0, 1]",
        ));
    }
    Ok(ac)
}

/// `np.interp(t, np.arange(len(fp)), fp)`.
fn interp_unit_grid(t: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if t.is_nan() {
        return f64::NAN;
    }
    if t <= 0.0 {
        return fp[0] as f64;
    }
    if t >= last as f64 {
        return fp[last] as f64;
    }
    let j = t.floor() as usize;
    if t == j as f64 {
        return fp[j] as f64;
    }
    let slope = (fp[j + 1] as f64 - fp[j] as f64) / 1.0;
    slope * (t - j as f64) + fp[j] as f64
}

/// numpy's `np.linspace(start, stop, num)` (float64).
fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    y[num - 1] = stop;
    y
}

/// numpy's `np.arange(start, stop, step)` for floats (first two values, then `start + i * delta`).
fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let second = start + step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// Euler / Euler ancestral `set_timesteps` (float32 timesteps).
fn euler_timesteps(c: &SchedulerConfig, spacing: TimestepSpacing, n: usize) -> Vec<f64> {
    let nt = c.num_train_timesteps;
    let ts: Vec<f32> = match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (nt - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|t| t as f32)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = nt / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio) as f32 + c.steps_offset as f32)
                .collect()
        }
        TimestepSpacing::Trailing => np_arange(nt as f64, 0.0, -(nt as f64 / n as f64))
            .into_iter()
            .map(|t| t.round_ties_even() as f32 - 1.0)
            .collect(),
    };
    ts.into_iter().map(|t| t as f64).collect()
}

/// DPM-Solver `set_timesteps` for the normal schedule (int64 timesteps).
fn dpm_timesteps(
    c: &SchedulerConfig,
    alphas_cumprod: &[f32],
    spacing: TimestepSpacing,
    n: usize,
) -> Vec<f64> {
    let nt = c.num_train_timesteps;
    // clipped_idx = searchsorted(flip(lambda_t), lambda_min_clipped)
    let clipped_idx = if c.lambda_min_clipped == f64::NEG_INFINITY {
        0
    } else {
        alphas_cumprod
            .iter()
            .rev()
            .map(|&a| (a.sqrt().ln() - (1.0 - a).sqrt().ln()) as f64)
            .take_while(|&l| l < c.lambda_min_clipped)
            .count()
    };
    let last = nt - clipped_idx;
    match spacing {
        TimestepSpacing::Linspace => {
            let mut v: Vec<f64> = np_linspace(0.0, last as f64 - 1.0, n + 1)
                .into_iter()
                .map(|t| t.round_ties_even())
                .collect();
            v.reverse();
            v.pop();
            v
        }
        TimestepSpacing::Leading => {
            let ratio = last / (n + 1);
            (1..=n)
                .rev()
                .map(|i| (i * ratio + c.steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => np_arange(last as f64, 0.0, -(nt as f64 / n as f64))
            .into_iter()
            .map(|t| t.round_ties_even() - 1.0)
            .collect(),
    }
}

/// DDIM `set_timesteps` (int64 timesteps).
fn ddim_timesteps(c: &SchedulerConfig, spacing: TimestepSpacing, n: usize) -> Vec<f64> {
    let nt = c.num_train_timesteps;
    match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (nt - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|t| t.round_ties_even())
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = nt / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio + c.steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => np_arange(nt as f64, 0.0, -(nt as f64 / n as f64))
            .into_iter()
            .map(|t| t.round_ties_even() - 1.0)
            .collect(),
    }
}

/// Karras et al. (2022) noise levels, rho = 7 (`_convert_to_karras`).
fn karras(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// `_convert_to_exponential`: log-uniform noise levels.
fn exponential(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    np_linspace(sigma_max.ln(), sigma_min.ln(), n)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// `_sigma_to_t`: the fractional training timestep of a noise level, interpolating log-sigmas.
fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // Index of the last log-sigma <= log_sigma (0 when there is none), at most n - 2.
    let count = log_sigmas
        .iter()
        .filter(|&&l| log_sigma - l as f64 >= 0.0)
        .count();
    let low_idx = count.saturating_sub(1).min(n - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx] as f64;
    let high = log_sigmas[high_idx] as f64;
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::tiny_scheduler_config as config;
    use candle_core::Device;

    #[test]
    fn sdxl_base_config_matches_the_file() {
        assert_eq!(config(), SchedulerConfig::sdxl_base());
    }

    #[test]
    fn dpm_config_with_infinity_parses() {
        let c = SchedulerConfig::from_json_str(
            r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity, "solver_type": "heun",
                "use_karras_sigmas": true, "sigma_min": null}"#,
        )
        .unwrap();
        assert_eq!(c.lambda_min_clipped, f64::NEG_INFINITY);
        assert_eq!(c.solver_type, SolverType::Heun);
        assert_eq!(SigmaSchedule::from_config(&c), SigmaSchedule::Karras);
    }

    #[test]
    fn steps_must_run_in_order() {
        let mut s = Scheduler::new(
            &SchedulerConfig::sdxl_base(),
            Sampler::DpmPp2m,
            SigmaSchedule::Karras,
            4,
        )
        .unwrap();
        let x = Tensor::zeros((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
        let mut g = TorchGenerator::new(0);
        assert!(s.step(&x, 1, &x, &mut g).is_err());
        s.step(&x, 0, &x, &mut g).unwrap();
        assert!(s.step(&x, 0, &x, &mut g).is_err());
        assert!(Scheduler::new(
            &SchedulerConfig::sdxl_base(),
            Sampler::Ddim,
            SigmaSchedule::Karras,
            4
        )
        .is_err());
        assert!(s.img2img_start(0.0).is_err());
    }
}
