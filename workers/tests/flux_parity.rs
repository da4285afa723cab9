//! Parity of mirgen's FLUX.1 pipeline with diffusers' `FluxPipeline`, on the
//! tiny random pipeline of `workers/tests/fixtures/generators/flux/` (made by
//! `scripts/fixtures/make_flux_fixtures.py`; see its `golden.json`): both
//! tokenizers, CLIP pooled and T5 states, the flow-matching schedule, one
//! transformer call, one scheduler step, the whole loop, the VAE decode and
//! the uint8 image, plus seeds vs injected latents, dispatch by
//! `model_index.json` and the loader's error messages.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use mirgen_workers::generator::DiffusionSettings;
use mirgen_workers::generators::flux::{image_ids, pack_latents, unpack_latents};
use mirgen_workers::generators::{load_generator, FluxGenerator, FluxPipeline};

mod common;
use common::{
    assert_contains_all, broken_copy, check, check_generated_image, copy_dir, fixture_dir,
    load_err, rel_err, replace_in, replacing, Golden,
};

fn fixture() -> PathBuf {
    fixture_dir("generators/flux")
}

impl Golden {
    fn load() -> Golden {
        Golden::load_from(&fixture())
    }
}

/// The fixture pipeline at the goldens' size and T5 length.
fn pipeline(g: &Golden) -> FluxPipeline {
    FluxPipeline::load_dir_with(
        &fixture(),
        "fixture",
        g.usize("max_sequence_length"),
        &Device::Cpu,
    )
    .unwrap()
    .with_resolution(g.usize("width"), g.usize("height"))
    .unwrap()
}

/// Relative error bound of every f32 stage (the issue asks for < 1e-3).
const TOL: f32 = 2e-5;

#[test]
fn tokenizers_and_text_encoders_match_diffusers() {
    let g = Golden::load();
    let p = pipeline(&g);
    let prompt = g.meta["prompt"].as_str().unwrap();
    assert_eq!(p.tokenizer().ids(prompt).unwrap(), g.ids("clip_ids"));
    assert_eq!(p.tokenizer_2().ids(prompt).unwrap(), g.ids("t5_ids"));
    // truncated to max_sequence_length, ending in </s> (id 1)
    let long = format!("{prompt} {prompt}");
    let ids = p.tokenizer_2().ids(&long).unwrap();
    assert_eq!(ids, g.ids("t5_long_ids"));
    assert_eq!(*ids.last().unwrap(), 1);
    let (pooled, states) = p.encode_prompt(prompt).unwrap();
    check("CLIP pooled", &pooled, g.get("pooled_prompt_embeds"), TOL);
    check("T5 states", &states, g.get("prompt_embeds"), TOL);
}

#[test]
fn scheduler_matches_diffusers() {
    let g = Golden::load();
    let p = pipeline(&g);
    let steps = g.usize("num_inference_steps");
    let s = p.scheduler(steps).unwrap();
    assert_eq!(p.packed_shape().0, g.usize("image_seq_len"));
    for (what, ours, want) in [
        ("timesteps", s.timesteps(), g.f64s("timesteps")),
        ("sigmas", s.sigmas(), g.f64s("sigmas")),
    ] {
        assert_eq!(ours.len(), want.len(), "{what}");
        for (a, b) in ours.iter().zip(&want) {
            assert!(
                (*a as f64 - b).abs() <= 1e-6 * b.abs().max(1.0),
                "{what}: {a} vs {b}"
            );
        }
    }
    // the step itself, from diffusers' own inputs
    let next = s
        .step(g.get("transformer_out_0"), 0, g.get("init_latents"))
        .unwrap();
    check("scheduler step 0", &next, g.get("latents_1"), 1e-6);
}

#[test]
fn latent_packing_and_ids_match_diffusers() {
    let g = Golden::load();
    let p = pipeline(&g);
    let packed = pack_latents(g.get("init_latents_unpacked")).unwrap();
    check("pack", &packed, g.get("init_latents"), 1e-7);
    let (_, h, w) = p.latent_shape();
    let unpacked = unpack_latents(g.get("latents_final"), h, w).unwrap();
    check("unpack", &unpacked, g.get("latents_final_unpacked"), 1e-7);
    let ids: Vec<f32> = image_ids(h, w).into_iter().flatten().collect();
    let want: Vec<f32> = g.get("img_ids").flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(ids, want);
}

#[test]
fn one_transformer_step_matches_diffusers() {
    let g = Golden::load();
    let p = pipeline(&g);
    let t0: f32 = g.get("transformer_timestep_0").to_vec1().unwrap()[0];
    let g0: f32 = g.get("transformer_guidance_0").to_vec1().unwrap()[0];
    assert_eq!(g0 as f64, g.f64("guidance_scale"));
    let (_, h, w) = p.latent_shape();
    let txt_ids = vec![[0f32; 3]; g.usize("max_sequence_length")];
    let out = p
        .transformer()
        .forward(
            g.get("init_latents"),
            g.get("prompt_embeds"),
            g.get("pooled_prompt_embeds"),
            t0,
            Some(g0),
            &image_ids(h, w),
            &txt_ids,
        )
        .unwrap();
    check("transformer step 0", &out, g.get("transformer_out_0"), TOL);
    // through the pipeline's own call (timestep from the schedule)
    let s = p.scheduler(g.usize("num_inference_steps")).unwrap();
    let out = p
        .velocity(
            g.get("latents_1"),
            g.get("pooled_prompt_embeds"),
            g.get("prompt_embeds"),
            s.timesteps()[1],
            g.f64("guidance_scale"),
        )
        .unwrap();
    check("transformer step 1", &out, g.get("transformer_out_1"), TOL);
    // the guidance embedding is used: another scale changes the output
    let other = p
        .velocity(
            g.get("init_latents"),
            g.get("pooled_prompt_embeds"),
            g.get("prompt_embeds"),
            s.timesteps()[0],
            1.0,
        )
        .unwrap();
    assert!(rel_err(&other, g.get("transformer_out_0")) > 1e-3);
}

#[test]
fn whole_loop_and_vae_match_diffusers() {
    let g = Golden::load();
    let p = pipeline(&g);
    let prompt = g.meta["prompt"].as_str().unwrap();
    let (pooled, states) = p.encode_prompt(prompt).unwrap();
    let last = p
        .denoise(
            &pooled,
            &states,
            g.get("init_latents"),
            g.usize("num_inference_steps"),
            g.f64("guidance_scale"),
        )
        .unwrap();
    check("last latents", &last, g.get("latents_final"), TOL);
    let dec = p.decode_raw(g.get("latents_final")).unwrap();
    check("VAE decode", &dec, g.get("decoded"), TOL);
    let img = p.decode(&last).unwrap();
    check("image (float)", &img, g.get("image"), TOL);
}

#[test]
fn generated_image_matches_the_pil_output_within_one_level() {
    let g = Golden::load();
    let settings = DiffusionSettings {
        steps: g.usize("num_inference_steps"),
        guidance: g.f64("guidance_scale"),
    };
    let mut gen = FluxGenerator::new(pipeline(&g), settings).unwrap();
    check_generated_image(&mut gen, &g, &fixture(), "flux");
}

#[test]
fn load_generator_dispatches_on_model_index() {
    let gen = load_generator(fixture().to_str().unwrap(), 1, 3.5, &Device::Cpu).unwrap();
    let info = gen.info();
    assert_eq!(info.architecture, "flux");
    assert!(info.smoke_test);
    // diffusers' default size: 128 * vae_scale_factor (4 here, 8 in FLUX.1)
    assert_eq!(gen.resolution(), (512, 512));
    let sd = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/generators/sd-turbo");
    let gen = load_generator(sd.to_str().unwrap(), 1, 0.0, &Device::Cpu).unwrap();
    assert_eq!(gen.info().architecture, "sd-turbo");
}

fn load_error(edit: impl FnOnce(&Path)) -> String {
    let tmp = broken_copy(&fixture(), edit);
    load_err(
        FluxPipeline::load_dir(tmp.path(), "broken", &Device::Cpu),
        "a broken copy",
    )
}

#[test]
fn load_errors_name_the_missing_part() {
    let e = load_error(|p| std::fs::remove_dir_all(p.join("text_encoder_2")).unwrap());
    assert_contains_all(&e, &["text_encoder_2", "sub-folder"]);
    let e = load_error(|p| std::fs::remove_file(p.join("tokenizer_2/tokenizer.json")).unwrap());
    assert!(e.contains("tokenizer.json"), "{e}");
    let e = load_error(|p| {
        std::fs::remove_file(p.join("transformer/diffusion_pytorch_model.safetensors")).unwrap()
    });
    assert_contains_all(&e, &["transformer", "diffusion_pytorch_model.safetensors"]);
    let e = load_error(replacing(
        "transformer/config.json",
        "\"joint_attention_dim\": 32",
        "\"joint_attention_dim\": 48",
    ));
    assert!(e.contains("joint_attention_dim"), "{e}");
    let e = load_error(replacing(
        "scheduler/scheduler_config.json",
        "\"stochastic_sampling\": false",
        "\"stochastic_sampling\": true",
    ));
    assert!(e.contains("stochastic_sampling"), "{e}");
    let e = load_error(replacing(
        "transformer/config.json",
        "\"axes_dims_rope\": [\n    4,",
        "\"axes_dims_rope\": [\n    6,",
    ));
    assert!(e.contains("axes_dims_rope"), "{e}");
}

/// FLUX.1-schnell style: the fixture with `guidance_embeds = false` and the
/// schnell scheduler (static shift 1.0); no guidance input at all.
#[test]
fn schnell_style_pipeline_matches_diffusers() {
    let g = Golden::load();
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture(), tmp.path());
    replace_in(
        tmp.path(),
        "transformer/config.json",
        "\"guidance_embeds\": true",
        "\"guidance_embeds\": false",
    );
    replace_in(
        tmp.path(),
        "scheduler/scheduler_config.json",
        "\"shift\": 3.0",
        "\"shift\": 1.0",
    );
    replace_in(
        tmp.path(),
        "scheduler/scheduler_config.json",
        "\"use_dynamic_shifting\": true",
        "\"use_dynamic_shifting\": false",
    );
    let p = FluxPipeline::load_dir_with(
        tmp.path(),
        "schnell",
        g.usize("max_sequence_length"),
        &Device::Cpu,
    )
    .unwrap()
    .with_resolution(g.usize("width"), g.usize("height"))
    .unwrap();
    let steps = g.usize("num_inference_steps");
    let s = p.scheduler(steps).unwrap();
    let want = |k: &str| -> Vec<f32> {
        g.meta["schnell"][k]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    assert_eq!(s.timesteps(), want("timesteps").as_slice());
    assert_eq!(s.sigmas(), want("sigmas").as_slice());
    // guidance is not an input: any scale gives the same velocity
    let (pooled, states) = (g.get("pooled_prompt_embeds"), g.get("prompt_embeds"));
    let v = p
        .velocity(g.get("init_latents"), pooled, states, s.timesteps()[0], 0.0)
        .unwrap();
    check(
        "schnell: transformer step 0",
        &v,
        g.get("schnell.transformer_out_0"),
        TOL,
    );
    let v7 = p
        .velocity(g.get("init_latents"), pooled, states, s.timesteps()[0], 7.0)
        .unwrap();
    assert_eq!(rel_err(&v7, &v), 0.0);
    let last = p
        .denoise(pooled, states, g.get("init_latents"), steps, 0.0)
        .unwrap();
    check(
        "schnell: last latents",
        &last,
        g.get("schnell.latents_final"),
        TOL,
    );
}

/// openai's CLIP configs (FLUX.1's text_encoder) say `eos_token_id = 2`:
/// transformers then pools at the largest id, which is the eos here too.
#[test]
fn clip_pooling_with_legacy_eos_id() {
    let g = Golden::load();
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture(), tmp.path());
    let f = tmp.path().join("text_encoder/config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
    assert_ne!(v["eos_token_id"], 2);
    v["eos_token_id"] = 2.into();
    std::fs::write(&f, v.to_string()).unwrap();
    let p = FluxPipeline::load_dir_with(tmp.path(), "eos2", 16, &Device::Cpu).unwrap();
    let ids = Tensor::from_vec(g.ids("clip_ids"), (1, 77), &Device::Cpu).unwrap();
    let pooled = p.encode_clip_ids(&ids).unwrap();
    check(
        "CLIP pooled (eos_token_id 2)",
        &pooled,
        g.get("pooled_prompt_embeds"),
        TOL,
    );
}
