//! Seconds per image of each image generator, in process, on the given
//! diffusers folders (the tiny fixtures on CPU; full-size checkpoints on a
//! GPU build). `scripts/generator_bench.py` runs it and times diffusers on
//! the same folders and settings.
//!
//! `generator_bench [--images N] DIR:STEPS:GUIDANCE...` prints one JSON line
//! per folder: architecture, width, height, steps, guidance, seconds_per_image.

use std::time::Instant;

use mirgen_workers::{generators::load_generator, GenerateRequest};

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut images = 5usize;
    if args.first().map(String::as_str) == Some("--images") {
        images = args[1].parse().expect("--images N");
        args.drain(..2);
    }
    if args.is_empty() {
        eprintln!("usage: generator_bench [--images N] DIR:STEPS:GUIDANCE...");
        std::process::exit(2);
    }
    let (device, line) = mirgen_workers::device::select("auto", 0);
    eprintln!("{line}");
    for spec in &args {
        let mut parts = spec.rsplitn(3, ':');
        let guidance: f64 = parts.next().and_then(|g| g.parse().ok()).expect("GUIDANCE");
        let steps: usize = parts.next().and_then(|s| s.parse().ok()).expect("STEPS");
        let dir = parts.next().expect("DIR");
        let t = Instant::now();
        let mut model =
            load_generator(dir, steps, guidance, &device).unwrap_or_else(|e| panic!("{dir}: {e}"));
        let load_s = t.elapsed().as_secs_f64();
        let request = |seed| GenerateRequest {
            prompt: "a photo of a red cat on the moon".into(),
            seed,
            init_latents: None,
        };
        model.generate(&[request(0)]).expect("warm-up image");
        let t = Instant::now();
        for seed in 1..=images as u64 {
            model.generate(&[request(seed)]).expect("image");
        }
        let per_image = t.elapsed().as_secs_f64() / images as f64;
        let (w, h) = model.resolution();
        println!(
            "{}",
            serde_json::json!({
                "dir": dir, "architecture": model.info().architecture, "width": w, "height": h,
                "steps": steps, "guidance": guidance, "load_s": load_s,
                "seconds_per_image": per_image,
            })
        );
    }
}
