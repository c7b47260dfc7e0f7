//! Parity of the schedulers with diffusers' (tables, whole runs on a stand-in model, img2img)
//! (scripts/fixtures/sdxl_sampler.py).

use candle_core::{DType, Device, Tensor};
use hyperlora::sdxl::sampling::noise::TorchGenerator;
use hyperlora::sdxl::sampling::sampler::{
    train_alphas_cumprod, PredictionType, Sampler, Scheduler, SchedulerConfig, SigmaSchedule,
};
use serde_json::Value;

use crate::common::{assert_close, fixture, load_fixture, tiny_scheduler_config as config};

fn meta(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("sdxl_sampler", name)).unwrap()).unwrap()
}

fn case_ids(case: &Value) -> (Sampler, SigmaSchedule, usize) {
    (
        Sampler::parse(case["sampler"].as_str().unwrap()).unwrap(),
        SigmaSchedule::parse(case["schedule"].as_str().unwrap()).unwrap(),
        case["steps"].as_u64().unwrap() as usize,
    )
}

fn stand_in_model(x: &Tensor, t: f64) -> Tensor {
    let c = 0.3 * (t / 1000.0).cos();
    x.affine(c, 0.1).unwrap()
}

#[test]
fn torch_linspace_and_alphas_cumprod_match() {
    let t = load_fixture("sdxl_sampler", "tables.safetensors");
    let ac = train_alphas_cumprod(&config()).unwrap();
    let ours = Tensor::new(ac.as_slice(), &Device::Cpu).unwrap();
    assert_close("alphas_cumprod", &ours, &t["alphas_cumprod"], 0.0);
}

#[test]
fn tables_match_diffusers() {
    let m = meta("tables.json");
    let t = load_fixture("sdxl_sampler", "tables.safetensors");
    let mut n = 0;
    for case in m["params"]["cases"].as_array().unwrap() {
        let (sampler, schedule, steps) = case_ids(case);
        let variant = case["variant"].as_str().unwrap();
        let key = format!(
            "{variant}/{}.{}.{steps}",
            sampler.as_str(),
            schedule.as_str()
        );
        let cfg = SchedulerConfig::from_json_str(&case["config"].to_string()).unwrap();
        let s = Scheduler::new(&cfg, sampler, schedule, steps).unwrap();
        // Timesteps: 1e-5 relative. Euler's Karras/exponential timesteps are fractional f32
        // values interpolated between numpy's float32 log-sigmas, which numpy's SIMD log
        // rounds differently from a correctly rounded log in ~20% of cases: <= 1 f32 ulp.
        let want_ts = t[&format!("{key}.timesteps")]
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert_eq!(want_ts.len(), s.timesteps().len(), "{key} timesteps");
        for (i, (a, b)) in s.timesteps().iter().zip(&want_ts).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{key} timestep {i}: ours {a}, diffusers {b}"
            );
        }
        let sig = Tensor::new(s.sigmas(), &Device::Cpu).unwrap();
        assert_close(
            &format!("{key} sigmas"),
            &sig,
            &t[&format!("{key}.sigmas")],
            1e-5,
        );
        let init = case["init_noise_sigma"].as_f64().unwrap();
        assert!(
            (s.init_noise_sigma() - init).abs() <= 1e-5,
            "{key}: init_noise_sigma {} vs {init}",
            s.init_noise_sigma()
        );
        n += 1;
    }
    assert_eq!(n, 13 * (4 + 3 + 3 + 2 + 1));
}

/// Latents after each step of a run, from the same seeded generator diffusers used.
fn run(
    cfg: &SchedulerConfig,
    sampler: Sampler,
    schedule: SigmaSchedule,
    steps: usize,
    seed: u64,
    img2img: Option<(&Tensor, f64)>,
) -> (Vec<Tensor>, Option<Tensor>, usize) {
    let mut s = Scheduler::new(cfg, sampler, schedule, steps).unwrap();
    let mut g = TorchGenerator::new(seed);
    let (mut latents, noised, start) = match img2img {
        None => {
            let x = (g.randn((1, 4, 8, 8)).unwrap() * s.init_noise_sigma()).unwrap();
            (x, None, 0)
        }
        Some((original, strength)) => {
            let start = s.img2img_start(strength).unwrap();
            let noise = g.randn(original.shape().clone()).unwrap();
            let x = s.add_noise(original, &noise, start).unwrap();
            (x.clone(), Some(x), start)
        }
    };
    let mut trace = Vec::new();
    for i in start..s.num_inference_steps() {
        let x_in = s.scale_model_input(&latents, i).unwrap();
        let out = stand_in_model(&x_in, s.timestep(i));
        latents = s.step(&out, i, &latents, &mut g).unwrap();
        trace.push(latents.clone());
    }
    (trace, noised, start)
}

#[test]
fn runs_match_diffusers() {
    let m = meta("runs.json");
    let t = load_fixture("sdxl_sampler", "runs.safetensors");
    let cfg = config();
    for case in m["params"]["cases"].as_array().unwrap() {
        let (sampler, schedule, steps) = case_ids(case);
        let seed = case["seed"].as_u64().unwrap();
        let (cfg, prefix) = match case.get("prediction_type").and_then(|v| v.as_str()) {
            Some("v_prediction") => (
                SchedulerConfig {
                    prediction_type: PredictionType::VPrediction,
                    ..cfg.clone()
                },
                "v.",
            ),
            _ => (cfg.clone(), ""),
        };
        let key = format!("{prefix}{}.{}.{steps}", sampler.as_str(), schedule.as_str());
        let (trace, _, _) = run(&cfg, sampler, schedule, steps, seed, None);
        let want = &t[&key];
        assert_eq!(want.dim(0).unwrap(), trace.len(), "{key}");
        for (i, got) in trace.iter().enumerate() {
            assert_close(&format!("{key} step {i}"), got, &want.get(i).unwrap(), 1e-4);
        }
    }
}

#[test]
fn img2img_matches_diffusers() {
    let m = meta("img2img.json");
    let t = load_fixture("sdxl_sampler", "img2img.safetensors");
    let cfg = config();
    let original = &t["original"];
    for case in m["params"]["cases"].as_array().unwrap() {
        let (sampler, schedule, steps) = case_ids(case);
        let seed = case["seed"].as_u64().unwrap();
        let strength = case["strength"].as_f64().unwrap();
        let key = format!("{}.{}.{steps}", sampler.as_str(), schedule.as_str());
        let (trace, noised, start) = run(
            &cfg,
            sampler,
            schedule,
            steps,
            seed,
            Some((original, strength)),
        );
        assert_eq!(
            start as u64,
            case["t_start"].as_u64().unwrap(),
            "{key} t_start"
        );
        assert_close(
            &format!("{key} add_noise"),
            noised.as_ref().unwrap(),
            &t[&format!("{key}.noised")],
            1e-5,
        );
        let want = &t[&format!("{key}.trace")];
        assert_eq!(want.dim(0).unwrap(), trace.len(), "{key}");
        for (i, got) in trace.iter().enumerate() {
            assert_close(&format!("{key} step {i}"), got, &want.get(i).unwrap(), 1e-4);
        }
    }
}
