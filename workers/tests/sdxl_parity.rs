//! Parity of mirgen's SDXL / SDXL-Turbo pipeline with diffusers'
//! `StableDiffusionXLPipeline`, on the tiny random pipeline of
//! `workers/tests/fixtures/generators/sdxl-turbo/` (made by
//! `scripts/fixtures/make_sdxl_fixtures.py`; see its `golden.json`): both
//! tokenizers, `hidden_states[-2]` of both text encoders and the pooled
//! embeds, `add_time_ids`, one UNet call with the text_time add-embedding,
//! one Euler ancestral step, the whole loop (guidance 0 as SDXL-Turbo, and
//! classifier-free guidance with zeroed negative embeds), the VAE decode and
//! the uint8 image, plus the loader's error messages.

use std::path::{Path, PathBuf};

use candle_core::{Device, IndexOp, Tensor};
use mirgen_workers::generators::load_generator;
use mirgen_workers::generators::sdxl::{SdxlPipeline, SdxlText};
use mirgen_workers::GenerateRequest;

mod common;
use common::{
    check, copy_dir, fixture_dir, json_f64s, max_abs, rel_err, u8_differing, u8_max_diff, Golden,
};

fn fixture() -> PathBuf {
    fixture_dir("generators/sdxl-turbo")
}

impl Golden {
    fn load() -> Golden {
        Golden::load_from(&fixture())
    }
    fn run_f64s(&self, run: &str, key: &str) -> Vec<f64> {
        json_f64s(&self.run(run)[key])
    }
}

fn pipeline() -> SdxlPipeline {
    SdxlPipeline::load_dir(&fixture(), "fixture", &Device::Cpu).unwrap()
}

/// Relative error bound of every f32 stage. The issue asks for < 1e-3;
/// measured errors are ~1e-6 (see the test output), so 2e-5 keeps the
/// tests sharp.
const TOL: f32 = 2e-5;

fn prompt(g: &Golden) -> String {
    g.meta["prompt"].as_str().unwrap().to_string()
}

#[test]
fn tokenizers_and_text_encoders_match_diffusers() {
    let g = Golden::load();
    let p = pipeline();
    let pr = prompt(&g);
    let (t1, t2) = p.tokenizers();
    assert_eq!(t1.ids(&pr).unwrap(), g.ids("prompt_ids_1"), "tokenizer ids");
    assert_eq!(
        t2.ids(&pr).unwrap(),
        g.ids("prompt_ids_2"),
        "tokenizer_2 ids"
    );
    assert_eq!(t1.ids("").unwrap(), g.ids("empty_ids_1"));
    assert_eq!(t2.ids("").unwrap(), g.ids("empty_ids_2"));
    // the two tokenizers pad differently (<|endoftext|> vs "!"), as sdxl-turbo's
    assert_ne!(t1.ids("").unwrap(), t2.ids("").unwrap());
    let (h1, h2, pooled) = p.encode_parts(&pr).unwrap();
    check(
        "text_encoder hidden_states[-2]",
        &h1,
        g.get("hidden_1"),
        TOL,
    );
    check(
        "text_encoder_2 hidden_states[-2]",
        &h2,
        g.get("hidden_2"),
        TOL,
    );
    check(
        "pooled_prompt_embeds",
        &pooled,
        g.get("pooled_prompt_embeds"),
        TOL,
    );
    let text = p.encode_prompt(&pr).unwrap();
    check("prompt_embeds", &text.embeds, g.get("prompt_embeds"), TOL);
    // the negative side: zeros (force_zeros_for_empty_prompt), or the "" prompt's
    assert!(p.force_zeros_for_empty_prompt());
    let neg = p.negative(&text).unwrap();
    assert_eq!(neg.embeds.dims(), text.embeds.dims());
    let zero = |t: &Tensor| max_abs(t) == 0.0;
    assert!(zero(&neg.embeds) && zero(&neg.pooled));
    let empty = p.encode_prompt("").unwrap();
    check(
        "empty prompt_embeds",
        &empty.embeds,
        g.get("empty_prompt_embeds"),
        TOL,
    );
    check(
        "empty pooled_prompt_embeds",
        &empty.pooled,
        g.get("empty_pooled_prompt_embeds"),
        TOL,
    );
    // add_time_ids: (orig h, orig w, crop top, crop left, target h, target w)
    check(
        "add_time_ids",
        &p.add_time_ids().unwrap(),
        g.get("add_time_ids"),
        1e-7,
    );
}

#[test]
fn scheduler_matches_diffusers() {
    let g = Golden::load();
    let p = pipeline();
    for run in ["turbo", "cfg"] {
        let steps = g.run(run)["num_inference_steps"].as_u64().unwrap() as usize;
        let s = p.scheduler(steps).unwrap();
        assert!(
            s.ancestral,
            "sdxl-turbo ships EulerAncestralDiscreteScheduler"
        );
        assert_eq!(s.euler.timesteps(), g.run_f64s(run, "timesteps").as_slice());
        let want = g.run_f64s(run, "sigmas");
        assert_eq!(s.euler.sigmas().len(), want.len());
        for (a, b) in s.euler.sigmas().iter().zip(&want) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "sigma {a} vs {b}");
        }
        let ins = g.run(run)["init_noise_sigma"].as_f64().unwrap();
        assert!((s.euler.init_noise_sigma() - ins).abs() < 1e-5 * ins);
        let l0 = g.get(&format!("{run}.latents_0"));
        check(
            &format!("{run}: latents_0"),
            &(g.get(&format!("{run}.init_latents")) * s.euler.init_noise_sigma()).unwrap(),
            l0,
            1e-6,
        );
        let scaled = s.euler.scale_model_input(l0, 0).unwrap();
        let unet_in = g.get(&format!("{run}.unet_input_0"));
        let last = unet_in.narrow(0, unet_in.dim(0).unwrap() - 1, 1).unwrap();
        check(&format!("{run}: scale_model_input"), &scaled, &last, 1e-6);
    }
    // the ancestral step, from diffusers' own inputs and noise
    let s = p.scheduler(2).unwrap();
    let (down, up) = s.ancestral_sigmas(0);
    assert!(up > 0.0 && down > 0.0);
    assert_eq!(
        s.ancestral_sigmas(1),
        (0.0, 0.0),
        "the last step adds no noise"
    );
    let noise = g.get("turbo.step_noise").i(0).unwrap();
    let next = s
        .step(
            g.get("turbo.noise_pred_0"),
            0,
            g.get("turbo.latents_0"),
            Some(&noise),
        )
        .unwrap();
    check(
        "turbo: ancestral step 0",
        &next,
        g.get("turbo.latents_1"),
        1e-5,
    );
    // without the noise the step is wrong: the noise is really used
    let plain = s
        .step(
            g.get("turbo.noise_pred_0"),
            0,
            g.get("turbo.latents_0"),
            Some(&noise.zeros_like().unwrap()),
        )
        .unwrap();
    assert!(rel_err(&plain, g.get("turbo.latents_1")) > 1e-2);
}

#[test]
fn one_unet_step_matches_diffusers() {
    let g = Golden::load();
    let p = pipeline();
    for run in ["turbo", "cfg"] {
        let t0 = g.run(run)["unet_timesteps"][0].as_f64().unwrap();
        // the UNet's conditioning as the pipeline builds it
        let text = p.encode_prompt(&prompt(&g)).unwrap();
        let text = if run == "cfg" {
            let neg = p.negative(&text).unwrap();
            SdxlText {
                embeds: Tensor::cat(&[&neg.embeds, &text.embeds], 0).unwrap(),
                pooled: Tensor::cat(&[&neg.pooled, &text.pooled], 0).unwrap(),
            }
        } else {
            text
        };
        let key = |k: &str| format!("{run}.{k}");
        check(
            &key("unet context"),
            &text.embeds,
            g.get(&key("unet_context_0")),
            TOL,
        );
        check(
            &key("unet text_embeds"),
            &text.pooled,
            g.get(&key("unet_text_embeds_0")),
            TOL,
        );
        let out = p.unet_step(g.get(&key("unet_input_0")), t0, &text).unwrap();
        check(&key("UNet step 0"), &out, g.get(&key("noise_pred_0")), TOL);
        // from diffusers' exact inputs, through the UNet's own API
        let out = p
            .unet()
            .forward_with_added(
                g.get(&key("unet_input_0")),
                t0,
                g.get(&key("unet_context_0")),
                Some((
                    g.get(&key("unet_text_embeds_0")),
                    g.get(&key("unet_time_ids_0")),
                )),
            )
            .unwrap();
        check(
            &key("UNet step 0 (golden inputs)"),
            &out,
            g.get(&key("noise_pred_0")),
            TOL,
        );
    }
    // the add-embedding matters: other time ids change the output
    let t0 = g.run("turbo")["unet_timesteps"][0].as_f64().unwrap();
    let ids = (g.get("turbo.unet_time_ids_0") * 2.0).unwrap();
    let out = p
        .unet()
        .forward_with_added(
            g.get("turbo.unet_input_0"),
            t0,
            g.get("turbo.unet_context_0"),
            Some((g.get("turbo.unet_text_embeds_0"), &ids)),
        )
        .unwrap();
    assert!(rel_err(&out, g.get("turbo.noise_pred_0")) > 1e-4);
    // a text_time UNet refuses to run without the added conditions
    assert!(p
        .unet()
        .forward(
            g.get("turbo.unet_input_0"),
            t0,
            g.get("turbo.unet_context_0")
        )
        .is_err());
}

#[test]
fn whole_loop_vae_and_image_match_diffusers() {
    let g = Golden::load();
    let p = pipeline();
    let pr = prompt(&g);
    for run in ["turbo", "cfg"] {
        let key = |k: &str| format!("{run}.{k}");
        let guidance = g.run(run)["guidance_scale"].as_f64().unwrap();
        let steps = g.run(run)["num_inference_steps"].as_u64().unwrap() as usize;
        let text = p.encode_prompt(&pr).unwrap();
        let noise = g.get(&key("step_noise")).clone();
        let mut step_noise = |i: usize| Ok(noise.i(i).unwrap());
        let init = g.get(&key("init_latents"));
        let first = p.denoise(&text, init, 1, guidance, &mut step_noise);
        // a 1-step schedule differs from step 1 of 2; just check it runs
        assert!(first.is_ok());
        let lat = p
            .denoise(&text, init, steps, guidance, &mut step_noise)
            .unwrap();
        check(
            &key("latents_final"),
            &lat,
            g.get(&key("latents_final")),
            TOL,
        );
        // the VAE alone, from diffusers' latents
        let dec = p.decode_raw(g.get(&key("latents_final"))).unwrap();
        check(&key("VAE decode"), &dec, g.get(&key("decoded")), TOL);
        let img = p.decode(&lat).unwrap();
        check(&key("image [0, 1]"), &img, g.get(&key("image")), TOL);
        // the uint8 image within one level of diffusers' PNG
        let ours = SdxlPipeline::to_rgb(&img).unwrap().remove(0);
        let png = image::open(fixture().join(g.run(run)["png"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        assert_eq!(ours.dimensions(), png.dimensions());
        let worst = u8_max_diff(&ours, &png);
        let off = u8_differing(&ours, &png);
        eprintln!(
            "{run}: uint8 max diff {worst}, {off} of {} values differ",
            ours.as_raw().len()
        );
        assert!(worst <= 1, "{run}: uint8 image differs by {worst} levels");
    }
}

#[test]
fn generator_with_init_latents_matches_diffusers_one_step() {
    // sdxl-turbo's own setting: 1 step, guidance 0. The ancestral noise of the
    // last step is multiplied by sigma_up = 0, so init latents make it RNG-free.
    let g = Golden::load();
    let mut gen = load_generator(fixture().to_str().unwrap(), 1, 0.0, &Device::Cpu).unwrap();
    let info = gen.info();
    assert_eq!(info.architecture, "sdxl-turbo");
    assert!(info.smoke_test, "the fixture holds RANDOM_WEIGHTS.md");
    assert_eq!(gen.resolution(), (32, 32));
    let init: Vec<f32> = g
        .get("turbo.init_latents")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let req = |seed: u64| GenerateRequest {
        prompt: prompt(&g),
        seed,
        init_latents: Some(init.clone()),
    };
    let a = gen.generate(&[req(1), req(2)]).unwrap();
    assert_eq!(a[0], a[1], "with init latents the seed is unused");
    // also with 2 steps, whose first step draws ancestral noise
    let mut gen2 = load_generator(fixture().to_str().unwrap(), 2, 0.0, &Device::Cpu).unwrap();
    let two = gen2.generate(&[req(1), req(2)]).unwrap();
    assert_eq!(
        two[0], two[1],
        "the step noise follows the init latents, not the seed"
    );
    assert_ne!(two[0], a[0]);
    // the same through the pipeline by hand
    let p = pipeline();
    let text = p.encode_prompt(&prompt(&g)).unwrap();
    let mut no_noise = |_: usize| -> mirgen_workers::Result<Tensor> { panic!("no noise needed") };
    let lat = p
        .denoise(&text, g.get("turbo.init_latents"), 1, 0.0, &mut no_noise)
        .unwrap();
    let img = SdxlPipeline::to_rgb(&p.decode(&lat).unwrap())
        .unwrap()
        .remove(0);
    assert_eq!(a[0], img);
    // seeds without init latents: deterministic, and different per seed
    let s = |seed| GenerateRequest {
        prompt: prompt(&g),
        seed,
        init_latents: None,
    };
    let b = gen2.generate(&[s(5), s(5), s(6)]).unwrap();
    assert_eq!(b[0], b[1]);
    assert_ne!(b[0], b[2]);
}

#[test]
fn load_errors_name_the_problem() {
    let tmp = std::env::temp_dir().join(format!("mirgen-sdxl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    copy_dir(&fixture(), &tmp);
    let err = |dir: &Path| {
        SdxlPipeline::load_dir(dir, "t", &Device::Cpu)
            .err()
            .expect("load should fail")
            .to_string()
    };
    // a missing second text encoder
    std::fs::rename(tmp.join("text_encoder_2"), tmp.join("te2")).unwrap();
    let e = err(&tmp);
    assert!(e.contains("text_encoder_2"), "{e}");
    std::fs::rename(tmp.join("te2"), tmp.join("text_encoder_2")).unwrap();
    // a UNet without the text_time add-embedding
    let ucfg = tmp.join("unet/config.json");
    let text = std::fs::read_to_string(&ucfg).unwrap();
    let plain = text.replace("\"text_time\"", "null");
    assert_ne!(plain, text);
    std::fs::write(&ucfg, plain).unwrap();
    let e = err(&tmp);
    assert!(e.contains("text_time"), "{e}");
    // a scheduler mirgen does not implement
    std::fs::write(&ucfg, &text).unwrap();
    let scfg = tmp.join("scheduler/scheduler_config.json");
    let s = std::fs::read_to_string(&scfg).unwrap();
    std::fs::write(
        &scfg,
        s.replace("EulerAncestralDiscreteScheduler", "LCMScheduler"),
    )
    .unwrap();
    let e = err(&tmp);
    assert!(e.contains("LCMScheduler"), "{e}");
    std::fs::write(&scfg, s).unwrap();
    // the folder loads again once repaired
    assert!(SdxlPipeline::load_dir(&tmp, "t", &Device::Cpu).is_ok());
    let _ = std::fs::remove_dir_all(&tmp);
}
