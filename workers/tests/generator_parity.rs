//! Parity of mirgen's SD-Turbo / SD 2.x pipeline with diffusers'
//! `StableDiffusionPipeline`, on the tiny random pipeline of
//! `workers/tests/fixtures/generators/sd-turbo/` (made by
//! `scripts/fixtures/make_generator_fixtures.py`; see its `golden.json`):
//! tokenization, text-encoder states, one UNet call, one scheduler step, the
//! whole loop (guidance 0 as SD-Turbo, and classifier-free guidance), the VAE
//! decode and the uint8 image, plus seeds vs injected latents and the
//! loader's error messages.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use mirgen_workers::generators::{load_generator, SdTurboPipeline};
use mirgen_workers::GenerateRequest;

mod common;
use common::{
    assert_contains_all, check, fixture_dir, load_err, rel_err, replacing, u8_differing,
    u8_max_diff, Golden,
};

fn fixture() -> PathBuf {
    fixture_dir("generators/sd-turbo")
}

impl Golden {
    fn load() -> Golden {
        Golden::load_from(&fixture())
    }
}

fn pipeline() -> SdTurboPipeline {
    SdTurboPipeline::load_dir(&fixture(), "fixture", &Device::Cpu).unwrap()
}

/// Relative error bound of every f32 stage. The issue asks for < 1e-3;
/// measured errors are <= 2e-6, and 2e-5 still catches real differences
/// such as the tanh-approximated GELU of candle's own SD UNet (9e-5 on this
/// fixture's first UNet step, measured with diffusers).
const TOL: f32 = 2e-5;

#[test]
fn tokenizer_and_text_encoder_match_diffusers() {
    let g = Golden::load();
    let p = pipeline();
    let prompt = g.meta["prompt"].as_str().unwrap();
    let ids = p.tokenizer().ids(prompt).unwrap();
    assert_eq!(ids, g.ids("prompt_ids"), "prompt ids");
    assert_eq!(
        p.tokenizer().ids("").unwrap(),
        g.ids("empty_ids"),
        "empty prompt ids"
    );
    // padding is "!" (id 0), not the eos token: SD 2.x's tokenizer; and
    // a "!" in the prompt is that special token too, as in transformers
    assert_eq!(*ids.last().unwrap(), 0);
    let tok = p.tokenizer();
    assert_eq!(
        tok.ids("Hi!!  A ! b").unwrap()[..8],
        tok.ids("hi ! ! a ! b").unwrap()[..8]
    );
    check(
        "prompt_embeds",
        &p.encode_prompt(prompt).unwrap(),
        g.get("prompt_embeds"),
        TOL,
    );
    check(
        "empty_embeds",
        &p.encode_prompt("").unwrap(),
        g.get("empty_embeds"),
        TOL,
    );
}

#[test]
fn scheduler_matches_diffusers() {
    let g = Golden::load();
    let p = pipeline();
    let run = g.run("turbo");
    let steps = run["num_inference_steps"].as_u64().unwrap() as usize;
    let s = p.scheduler(steps).unwrap();
    let want_t: Vec<f64> = run["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(s.timesteps(), want_t.as_slice(), "timesteps (trailing)");
    let want_s: Vec<f64> = run["sigmas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(s.sigmas().len(), want_s.len());
    for (a, b) in s.sigmas().iter().zip(&want_s) {
        assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "sigma {a} vs {b}");
    }
    let ins = run["init_noise_sigma"].as_f64().unwrap();
    assert!((s.init_noise_sigma() - ins).abs() < 1e-5 * ins);
    // the step itself, from diffusers' own inputs
    for name in ["turbo", "cfg"] {
        let latents_0 = g.get(&format!("{name}.latents_0"));
        check(
            &format!("{name}: latents_0 = init * init_noise_sigma"),
            &(g.get(&format!("{name}.init_latents")) * s.init_noise_sigma()).unwrap(),
            latents_0,
            1e-6,
        );
        let scaled = s.scale_model_input(latents_0, 0).unwrap();
        let unet_in = g.get(&format!("{name}.unet_input_0"));
        let first = unet_in.narrow(0, unet_in.dim(0).unwrap() - 1, 1).unwrap();
        check(&format!("{name}: scale_model_input"), &scaled, &first, 1e-6);
    }
    let eps = g.get("turbo.noise_pred_0");
    let next = s.step(eps, 0, g.get("turbo.latents_0")).unwrap();
    check(
        "turbo: scheduler step 0",
        &next,
        g.get("turbo.latents_1"),
        1e-5,
    );
}

#[test]
fn one_unet_step_matches_diffusers() {
    let g = Golden::load();
    let p = pipeline();
    let t0 = g.run("turbo")["unet_timesteps"][0].as_f64().unwrap();
    let out = p
        .unet()
        .forward(g.get("turbo.unet_input_0"), t0, g.get("prompt_embeds"))
        .unwrap();
    check("turbo: UNet step 0", &out, g.get("turbo.noise_pred_0"), TOL);
    // with classifier-free guidance the UNet sees [uncond, cond]
    let ctx = Tensor::cat(&[g.get("empty_embeds"), g.get("prompt_embeds")], 0).unwrap();
    let t0 = g.run("cfg")["unet_timesteps"][0].as_f64().unwrap();
    let out = p
        .unet()
        .forward(g.get("cfg.unet_input_0"), t0, &ctx)
        .unwrap();
    check(
        "cfg: UNet step 0 (batch of 2)",
        &out,
        g.get("cfg.noise_pred_0"),
        TOL,
    );
}

#[test]
fn whole_loop_and_vae_match_diffusers() {
    let g = Golden::load();
    let p = pipeline();
    let prompt = g.meta["prompt"].as_str().unwrap();
    let cond = p.encode_prompt(prompt).unwrap();
    let uncond = p.encode_prompt("").unwrap();
    for name in ["turbo", "cfg"] {
        let run = g.run(name);
        let steps = run["num_inference_steps"].as_u64().unwrap() as usize;
        let guidance = run["guidance_scale"].as_f64().unwrap();
        let init = g.get(&format!("{name}.init_latents"));
        let latents = p
            .denoise(&cond, Some(&uncond), init, steps, guidance)
            .unwrap();
        check(
            &format!("{name}: last latents ({steps} steps, guidance {guidance})"),
            &latents,
            g.get(&format!("{name}.latents_final")),
            TOL,
        );
        let one = p.denoise(&cond, Some(&uncond), init, 1, guidance).unwrap();
        assert!(
            rel_err(&one, g.get(&format!("{name}.latents_final"))) > 1e-2,
            "{name}: 1 and {steps} steps must differ (the test must be able to fail)"
        );
        // the VAE from diffusers' own latents
        let latents_ref = g.get(&format!("{name}.latents_final"));
        check(
            &format!("{name}: VAE decode"),
            &p.decode_raw(latents_ref).unwrap(),
            g.get(&format!("{name}.decoded")),
            TOL,
        );
        check(
            &format!("{name}: image in [0, 1]"),
            &p.decode(latents_ref).unwrap(),
            g.get(&format!("{name}.image")),
            TOL,
        );
    }
}

#[test]
fn generated_images_match_the_pil_output_within_one_level() {
    let g = Golden::load();
    let prompt = g.meta["prompt"].as_str().unwrap().to_string();
    for name in ["turbo", "cfg"] {
        let run = g.run(name);
        let steps = run["num_inference_steps"].as_u64().unwrap() as usize;
        let guidance = run["guidance_scale"].as_f64().unwrap();
        let mut gen =
            load_generator(fixture().to_str().unwrap(), steps, guidance, &Device::Cpu).unwrap();
        let (w, h) = gen.resolution();
        assert_eq!(
            (w as u64, h as u64),
            (
                g.meta["width"].as_u64().unwrap(),
                g.meta["height"].as_u64().unwrap()
            )
        );
        let init: Vec<f32> = g
            .get(&format!("{name}.init_latents"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let req = |seed| GenerateRequest {
            prompt: prompt.clone(),
            seed,
            init_latents: Some(init.clone()),
        };
        let imgs = gen.generate(&[req(1), req(2)]).unwrap();
        let png = image::open(fixture().join(run["png"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        assert_eq!(imgs[0].dimensions(), png.dimensions());
        let max = u8_max_diff(&imgs[0], &png);
        let differing = u8_differing(&imgs[0], &png);
        eprintln!("{name}: uint8 image max diff {max}, {differing} values differ");
        assert!(max <= 1, "{name}: uint8 image differs by {max} levels");
        assert_eq!(
            imgs[0], imgs[1],
            "{name}: explicit latents must make the seed irrelevant"
        );
    }
}

#[test]
fn seeds_give_different_reproducible_images() {
    let mut gen = load_generator(fixture().to_str().unwrap(), 1, 0.0, &Device::Cpu).unwrap();
    let req = |seed| GenerateRequest {
        prompt: "a red cat".into(),
        seed,
        init_latents: None,
    };
    let a = gen.generate(&[req(5), req(6)]).unwrap();
    let b = gen.generate(&[req(5)]).unwrap();
    assert_eq!(a[0], b[0], "same seed, same image (and batch-independent)");
    assert_ne!(a[0], a[1], "different seeds must give different images");
    let info = gen.info();
    assert_eq!(info.architecture, "sd-turbo");
    assert!(info.fingerprint.contains("steps=1/guidance=0"));
    let bad = GenerateRequest {
        prompt: "x".into(),
        seed: 0,
        init_latents: Some(vec![0.0; 3]),
    };
    let err = gen.generate(&[bad]).unwrap_err().to_string();
    assert!(err.contains("init_latents"), "{err}");
}

/// A copy of the fixture with `edit` applied.
fn broken_copy(edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    common::broken_copy(&fixture(), edit)
}

fn load_error(dir: &Path) -> String {
    load_err(
        SdTurboPipeline::load_dir(dir, "broken", &Device::Cpu),
        &dir.display().to_string(),
    )
}

#[test]
fn load_errors_name_the_missing_part() {
    let d = broken_copy(|p| std::fs::remove_dir_all(p.join("unet")).unwrap());
    let e = load_error(d.path());
    assert_contains_all(&e, &["unet", "sub-folder"]);

    let d = broken_copy(|p| std::fs::remove_file(p.join("model_index.json")).unwrap());
    let e = load_error(d.path());
    assert!(e.contains("model_index.json"), "{e}");

    let d = broken_copy(|p| {
        std::fs::remove_file(p.join("vae/diffusion_pytorch_model.safetensors")).unwrap()
    });
    let e = load_error(d.path());
    assert_contains_all(&e, &["vae", "diffusion_pytorch_model.safetensors"]);

    let d = broken_copy(|p| std::fs::remove_file(p.join("tokenizer/merges.txt")).unwrap());
    let e = load_error(d.path());
    assert!(e.contains("merges.txt"), "{e}");

    let d = broken_copy(replacing(
        "scheduler/scheduler_config.json",
        "\"use_karras_sigmas\": false",
        "\"use_karras_sigmas\": true",
    ));
    let e = load_error(d.path());
    assert!(e.contains("use_karras_sigmas"), "{e}");

    let d = broken_copy(replacing(
        "unet/config.json",
        "\"cross_attention_dim\": 32",
        "\"cross_attention_dim\": 48",
    ));
    let e = load_error(d.path());
    assert!(e.contains("cross_attention_dim"), "{e}");
}

#[test]
fn transformers_4_text_encoder_keys_and_fp16_variants_load() {
    // stabilityai/sd-turbo's text encoder was saved by transformers 4
    // (`text_model.*` keys); its parts also come as `*.fp16.safetensors`.
    let d = broken_copy(|p| {
        let te = p.join("text_encoder/model.safetensors");
        let t = candle_core::safetensors::load(&te, &Device::Cpu).unwrap();
        let renamed: HashMap<String, Tensor> = t
            .into_iter()
            .map(|(k, v)| (format!("text_model.{k}"), v))
            .collect();
        candle_core::safetensors::save(&renamed, &te).unwrap();
        let unet = p.join("unet/diffusion_pytorch_model.safetensors");
        let t = candle_core::safetensors::load(&unet, &Device::Cpu).unwrap();
        let half: HashMap<String, Tensor> = t
            .into_iter()
            .map(|(k, v)| (k, v.to_dtype(DType::F16).unwrap()))
            .collect();
        candle_core::safetensors::save(
            &half,
            p.join("unet/diffusion_pytorch_model.fp16.safetensors"),
        )
        .unwrap();
        std::fs::remove_file(unet).unwrap();
    });
    let g = Golden::load();
    let p = SdTurboPipeline::load_dir(d.path(), "variant", &Device::Cpu).unwrap();
    let prompt = g.meta["prompt"].as_str().unwrap();
    check(
        "prompt_embeds (text_model.* keys)",
        &p.encode_prompt(prompt).unwrap(),
        g.get("prompt_embeds"),
        TOL,
    );
    let t0 = g.run("turbo")["unet_timesteps"][0].as_f64().unwrap();
    let out = p
        .unet()
        .forward(g.get("turbo.unet_input_0"), t0, g.get("prompt_embeds"))
        .unwrap();
    // f16 weights, f32 compute: only the weight rounding differs
    check(
        "UNet step 0 (fp16 weights)",
        &out,
        g.get("turbo.noise_pred_0"),
        1e-2,
    );
}
