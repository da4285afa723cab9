//! The `mirgen` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, Args, Parser, Subcommand};
use mirgen::config::LoadedConfig;
use mirgen::job::{self, IndexMode, RunOptions, RunOutcome};
use mirgen::progress::ProgressMode;
use mirgen::watchdog::StallLimits;
use std::time::Duration;

/// mirgen builds multi-round Mental Image Retrieval (MIR) datasets, GenIR-style:
/// per target image a VLM writes a query, a diffusion model draws it, a
/// retrieval encoder ranks the corpus with the drawing, and the VLM compares
/// and refines, for rounds 0..=R. Output: Parquet shards in the Hugging Face
/// layout with a dataset card and a manifest, on a local folder or S3/GCS/Azure.
#[derive(Parser)]
#[command(name = "mirgen", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a dataset-generation job (rerun the same command to resume).
    #[command(
        disable_help_flag = true,
        after_help = "Examples:\n  mirgen run --config configs/demo.toml --output out/demo -w 2\n  mirgen run --config job.toml --output s3://bucket/datasets/job -w 4\n  # two processes on one machine (hostfile: one host:port per line)\n  mirgen run --config job.toml -n 2 -p 0 -h hosts.txt & mirgen run --config job.toml -n 2 -p 1 -h hosts.txt"
    )]
    Run(RunArgs),
    /// Hits@K per round (cumulative and per-round), mean/median rank, of
    /// finished datasets or ranks tables; several inputs are compared.
    Eval(EvalArgs),
    /// Write a static HTML report of a finished dataset (filmstrips, Hits@K, stats).
    Report(ReportArgs),
    /// Export a finished dataset to GenIR's folder layout or ChatIR's dialog JSON.
    Export(ExportArgs),
    /// Upload a finished dataset folder to the Hugging Face Hub (token from HF_TOKEN).
    Publish(PublishArgs),
    /// Throughput: the dataflow against GenIR's sequential loop (batch 1, no
    /// overlap) on the same targets, models and seeds, in one process.
    #[command(
        after_help = "Example:\n  mirgen bench --config configs/demo.toml -w 2 --json > bench.json\n\nThe JSON has dataflow_rounds_per_s, sequential_rounds_per_s, ratio, model_share,\nidentical_records, tail_s, round_s, peak_rss_mib and seconds per stage."
    )]
    Bench(BenchArgs),
    /// Embed the corpus with the config's retrieval encoder, sharded over the
    /// workers (and processes), into the output's index cache; `mirgen run`
    /// with the same config and output reuses it. Rerun to resume.
    #[command(
        disable_help_flag = true,
        after_help = "Examples:\n  mirgen index --config configs/demo.toml --output out/demo -w 2\n  # two processes (same flags as mirgen run)\n  mirgen index --config job.toml --output s3://b/job -n 2 -p 0 -h hosts.txt"
    )]
    Index(IndexArgs),
    /// Embed images and texts with a retrieval checkpoint and print one JSON
    /// line per input: the single-shot command for debugging an encoder and
    /// for external parity checks.
    #[command(
        after_help = "Examples:\n  mirgen embed --model Salesforce/blip-itm-base-coco --image cat.jpg --text \"a cat on a sofa\"\n  mirgen embed --model ./clip-vit-base-patch16 --image a.png --image b.png\n\nOutput, one line per input (images first, then texts, each in the order given):\n  {\"input\": \"cat.jpg\", \"kind\": \"image\", \"embedding\": [...]}\nBLIP-2 image embeddings are one vector per query token: \"embedding\" is then a list of\nvectors (similarity to a text = the maximum over them). An input that fails prints\n{\"input\": ..., \"kind\": ..., \"error\": ...} and the command exits with status 1."
    )]
    Embed(EmbedArgs),
    /// Draw one prompt with a diffusers checkpoint and write the image: the
    /// single-shot command for debugging a generator and for external parity
    /// checks (with --init-latents the result does not depend on the RNG).
    #[command(
        after_help = "Examples:\n  mirgen generate --model stabilityai/sd-turbo --prompt \"a red fox in snow\" --steps 1 --guidance 0 --out fox.png\n  mirgen generate --model ./sd-turbo --prompt \"a cat\" --init-latents noise.safetensors --out cat.png\n\n--init-latents takes a safetensors file holding one tensor (or one named \"latents\")\nof the model's latent shape (1, C, H/8, W/8), e.g. the latents a diffusers\npipeline was given."
    )]
    Generate(GenerateArgs),
    /// Ask a VLM checkpoint about images and print `{"text": ..., "token_ids":
    /// [...]}`: the single-shot command for debugging the query writer and
    /// for external parity checks.
    #[command(
        after_help = "Examples:\n  mirgen vlm --model google/gemma-3-4b-it --image cat.jpg --prompt \"Describe this image.\"\n  mirgen vlm --model ./gemma-3-4b-it --image target.jpg --image drawing.png \\\n      --prompt \"Compare the content difference between the two images.\" --greedy\n\nImages come first in the user turn, in the order given (GenIR's compare call: the\ntarget, then the drawing); the chat template is the checkpoint's (Gemma 3)."
    )]
    Vlm(VlmArgs),
}

#[derive(Args)]
struct VlmArgs {
    /// A Gemma 3 multimodal checkpoint folder or Hub id `owner/name[@revision]`.
    #[arg(long, value_name = "FOLDER|HUB_ID")]
    model: String,
    /// An image of the user turn (repeatable, in order).
    #[arg(long = "image", value_name = "FILE")]
    images: Vec<PathBuf>,
    /// The user's text.
    #[arg(long)]
    prompt: String,
    /// An optional system text.
    #[arg(long)]
    system: Option<String>,
    /// Greedy decoding instead of sampling (temperature 0.7, top-p 0.9,
    /// repetition penalty 1.1, as GenIR).
    #[arg(long)]
    greedy: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling seed (the same seed and input give the same text).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Device: auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    device: String,
}

fn vlm(args: VlmArgs) -> anyhow::Result<()> {
    let (device, line) = mirgen_workers::device::select(&args.device, 0);
    eprintln!("{line}");
    let sampling = if args.greedy {
        mirgen_workers::SamplingConfig::greedy()
    } else {
        mirgen_workers::SamplingConfig::default()
    };
    let mut images = Vec::new();
    for path in &args.images {
        images.push(std::sync::Arc::new(read_image(path)?));
    }
    let mut model = mirgen_workers::vlms::load_vlm(&args.model, sampling, &device)?;
    let info = model.info();
    eprintln!(
        "vlm {} from {}, fingerprint {}",
        info.architecture, info.source, info.fingerprint
    );
    let mut out = model.generate(&[mirgen_workers::VlmRequest {
        images,
        system: args.system.clone(),
        prompt: args.prompt.clone(),
        max_new_tokens: args.max_new_tokens,
        seed: args.seed,
    }])?;
    let out = out
        .pop()
        .ok_or_else(|| anyhow::anyhow!("the VLM returned no output"))?;
    println!(
        "{}",
        serde_json::json!({"text": out.text, "token_ids": out.token_ids})
    );
    Ok(())
}

#[derive(Args)]
struct GenerateArgs {
    /// A diffusers pipeline folder (model_index.json, text_encoder/, tokenizer/,
    /// unet/, vae/, scheduler/) or a Hub id `owner/name[@revision]`.
    #[arg(long, value_name = "FOLDER|HUB_ID")]
    model: String,
    /// The text to draw.
    #[arg(long)]
    prompt: String,
    /// Seed of the initial noise (ignored with --init-latents).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Initial latents from a safetensors file instead of seeded noise.
    #[arg(long, value_name = "FILE.safetensors")]
    init_latents: Option<PathBuf>,
    /// Denoising steps (SD-Turbo: 1-4).
    #[arg(long, default_value_t = 1)]
    steps: usize,
    /// Classifier-free guidance scale; <= 1 skips the unconditional pass (SD-Turbo: 0).
    #[arg(long, default_value_t = 0.0)]
    guidance: f64,
    /// Expected output width; the checkpoint decides it (an error if it differs).
    #[arg(long)]
    width: Option<u32>,
    /// Expected output height; the checkpoint decides it (an error if it differs).
    #[arg(long)]
    height: Option<u32>,
    /// Output image (.png, or .jpg/.jpeg for JPEG at quality 95).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Device: auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    device: String,
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    use mirgen_workers::image_io::{encode, ImageEncoding};
    let (device, line) = mirgen_workers::device::select(&args.device, 0);
    eprintln!("{line}");
    let mut model = mirgen_workers::generators::load_generator(
        &args.model,
        args.steps,
        args.guidance,
        &device,
    )?;
    let (w, h) = model.resolution();
    if args.width.is_some_and(|x| x != w) || args.height.is_some_and(|x| x != h) {
        anyhow::bail!(
            "{} draws {w}x{h} images (its unet sample_size times the VAE factor); \
             --width/--height cannot change that, drop them or use a checkpoint of that size",
            args.model
        );
    }
    let init_latents = match &args.init_latents {
        None => None,
        Some(p) => {
            let tensors =
                candle_core::safetensors::load(p, &candle_core::Device::Cpu).map_err(|e| {
                    anyhow::anyhow!("{}: not a readable safetensors file ({e})", p.display())
                })?;
            let t = match tensors.get("latents") {
                Some(t) => t.clone(),
                None if tensors.len() == 1 => tensors.into_values().next().expect("one tensor"),
                None => anyhow::bail!(
                    "{}: holds {} tensors and none is named \"latents\"; save the initial latents alone or under that name",
                    p.display(),
                    tensors.len()
                ),
            };
            Some(
                t.to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            )
        }
    };
    let info = model.info();
    eprintln!(
        "generator {} from {}, {w}x{h}, {} step(s), guidance {}",
        info.architecture, info.source, args.steps, args.guidance
    );
    let mut images = model.generate(&[mirgen_workers::GenerateRequest {
        prompt: args.prompt.clone(),
        seed: args.seed,
        init_latents,
    }])?;
    let img = images
        .pop()
        .ok_or_else(|| anyhow::anyhow!("the generator returned no image"))?;
    let ext = args
        .out
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let encoding = match ext.as_str() {
        "png" => ImageEncoding::Png,
        "jpg" | "jpeg" => ImageEncoding::Jpeg,
        _ => anyhow::bail!(
            "--out {}: use a .png, .jpg or .jpeg file name",
            args.out.display()
        ),
    };
    let bytes = encode(&img, encoding, 95)?;
    // write beside, then rename: no half-written image under the final name
    let tmp = args.out.with_extension(format!("{ext}.partial"));
    std::fs::write(&tmp, bytes)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &args.out)?;
    println!(
        "{}",
        serde_json::json!({"out": args.out.display().to_string(), "width": w, "height": h, "seed": args.seed})
    );
    Ok(())
}

#[derive(Args)]
struct EmbedArgs {
    /// A Hugging Face model folder (config.json, *.safetensors, tokenizer.json,
    /// preprocessor_config.json) or a Hub id `owner/name[@revision]`.
    /// Supported: CLIP, SigLIP, BLIP and BLIP-2 retrieval checkpoints.
    #[arg(long, value_name = "FOLDER|HUB_ID")]
    model: String,
    /// An image file to embed (repeatable).
    #[arg(long = "image", value_name = "FILE")]
    images: Vec<PathBuf>,
    /// A text to embed (repeatable).
    #[arg(long = "text", value_name = "STR")]
    texts: Vec<String>,
    /// Device: auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    device: String,
}

/// Reads and decodes an image file named on the command line.
fn read_image(path: &std::path::Path) -> anyhow::Result<mirgen_workers::RgbImage> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {name}: {e}"))?;
    Ok(mirgen_workers::image_io::decode_rgb(&name, &bytes)?)
}

fn embed(args: EmbedArgs) -> anyhow::Result<()> {
    use std::io::Write;
    if args.images.is_empty() && args.texts.is_empty() {
        anyhow::bail!(
            "nothing to embed: give --image FILE and/or --text STR (see mirgen embed --help)"
        );
    }
    let (device, line) = mirgen_workers::device::select(&args.device, 0);
    eprintln!("{line}");
    let mut model = mirgen_workers::encoders::load_embedder(&args.model, &device)?;
    let info = model.info();
    eprintln!(
        "encoder {} from {} ({}-d{}), fingerprint {}",
        info.architecture,
        info.source,
        model.dim(),
        match model.vectors_per_image() {
            1 => String::new(),
            g => format!(", {g} vectors per image"),
        },
        info.fingerprint
    );
    let (dim, per_image) = (model.dim(), model.vectors_per_image());
    let mut failed = 0;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut emit =
        |input: &str, kind: &str, result: anyhow::Result<Vec<f32>>| -> anyhow::Result<()> {
            // keys in the documented order; floats as f32's shortest round-trip form
            let head = format!(
                "{{\"input\":{},\"kind\":{}",
                serde_json::to_string(input)?,
                serde_json::to_string(kind)?
            );
            let line = match result {
                Ok(v) if kind == "image" && per_image > 1 => format!(
                    "{head},\"embedding\":{}}}",
                    serde_json::to_string(&v.chunks(dim).collect::<Vec<_>>())?
                ),
                Ok(v) => format!("{head},\"embedding\":{}}}", serde_json::to_string(&v)?),
                Err(e) => {
                    failed += 1;
                    eprintln!("error: {kind} {input}: {e:#}");
                    format!(
                        "{head},\"error\":{}}}",
                        serde_json::to_string(&format!("{e:#}"))?
                    )
                }
            };
            writeln!(out, "{line}")?;
            Ok(())
        };
    for path in &args.images {
        let name = path.display().to_string();
        let result = read_image(path).and_then(|img| {
            let mut v = model.embed_images(&[&img])?;
            v.pop()
                .ok_or_else(|| anyhow::anyhow!("the encoder returned no embedding"))
        });
        emit(&name, "image", result)?;
    }
    for text in &args.texts {
        let result = model
            .embed_texts(std::slice::from_ref(text))
            .map_err(anyhow::Error::from)
            .and_then(|mut v| {
                v.pop()
                    .ok_or_else(|| anyhow::anyhow!("the encoder returned no embedding"))
            });
        emit(text, "text", result)?;
    }
    if failed > 0 {
        anyhow::bail!("{failed} input(s) could not be embedded (see the error lines)");
    }
    Ok(())
}

#[derive(Args)]
struct IndexArgs {
    /// Job configuration (TOML): its corpus and embedder are used.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// The output the index belongs to (as for `mirgen run`).
    /// Default: output/<config file name without .toml>.
    #[arg(long, value_name = "DIR|URL")]
    output: Option<String>,
    /// Indexing threads in this process (one encoder each, on an even share
    /// of the cores; RAYON_NUM_THREADS sets the kernel threads of each).
    #[arg(short = 'w', long = "workers", default_value_t = 1, value_name = "N")]
    workers: usize,
    /// Number of processes in the cluster.
    #[arg(short = 'n', long = "processes", default_value_t = 1, value_name = "N")]
    processes: usize,
    /// This process's index in the cluster, 0-based.
    #[arg(short = 'p', long = "process", default_value_t = 0, value_name = "I")]
    process: usize,
    /// Accepted for symmetry with `mirgen run` (indexing needs no connections).
    #[arg(short = 'h', long = "hostfile", value_name = "FILE")]
    hostfile: Option<PathBuf>,
    /// Device: auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Progress display.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    progress: ProgressMode,
    /// Print help (`-h` is the hostfile flag).
    #[arg(long, action = ArgAction::Help)]
    help: Option<bool>,
}

fn default_output(config: &std::path::Path) -> String {
    let stem = config
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "run".into());
    format!("output/{stem}")
}

fn index(args: IndexArgs) -> anyhow::Result<()> {
    let cfg = LoadedConfig::load(&args.config)?;
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| default_output(&args.config));
    let ensured = mirgen::job::index_only(
        &cfg,
        &output,
        mirgen::indexing::Cluster {
            processes: args.processes,
            process: args.process,
            workers: args.workers,
            device: args.device.clone(),
        },
        args.progress,
    )?;
    let m = &ensured.meta;
    println!(
        "corpus index {} at {}/.mirgen/index/{}: {} of {} images, {}-d{}, encoder {} ({}){}",
        if ensured.reused { "reused" } else { "written" },
        output.trim_end_matches('/'),
        ensured.key,
        m.indexed,
        m.corpus_size,
        m.dim,
        if m.vectors_per_image > 1 {
            format!(" x {} vectors per image", m.vectors_per_image)
        } else {
            String::new()
        },
        m.encoder.architecture,
        m.encoder.source,
        if m.failed > 0 {
            format!(
                "; {} unreadable (listed in the chunks' failures files)",
                m.failed
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

#[derive(Args)]
struct BenchArgs {
    /// Job configuration (TOML), as for `mirgen run`.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Dataflow worker threads (the sequential loop runs on all cores, each
    /// worker on an even share; RAYON_NUM_THREADS sets the kernel threads).
    #[arg(short = 'w', long = "workers", default_value_t = 2, value_name = "N")]
    workers: usize,
    /// Use only the first N targets (sorted by id).
    #[arg(long, value_name = "N")]
    targets: Option<usize>,
    /// Scratch folder for the outputs (default: a temporary folder, removed).
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Device for the models: auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let cfg = LoadedConfig::load(&args.config)?;
    let r = mirgen::bench::run(
        cfg,
        mirgen::bench::BenchOptions {
            workers: args.workers,
            targets: args.targets,
            work_dir: args.work_dir,
            device: args.device,
            plan_kernel_threads: true,
        },
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "{} targets x {} rounds = {} target-rounds{}",
        r.targets,
        r.rounds_per_target,
        r.target_rounds,
        if r.smoke_test {
            " (smoke-test models)"
        } else {
            ""
        }
    );
    println!(
        "sequential (batch 1, no overlap, {} kernel threads):  {:.1} s, {:.2} target-rounds/s, model calls {:.0}% of wall",
        r.sequential_kernel_threads,
        r.sequential_s,
        r.sequential_rounds_per_s,
        100.0 * r.sequential_model_share
    );
    println!(
        "dataflow ({} workers x {} kernel threads): {:.1} s, {:.2} target-rounds/s, model calls {:.0}% of worker time",
        r.workers,
        r.kernel_threads,
        r.dataflow_s,
        r.dataflow_rounds_per_s,
        100.0 * r.model_share
    );
    println!(
        "ratio {:.2}x; records identical: {}; tail {:.1} s (round step {:.1} s); last admission to end {:.1} s; peak RSS {:.0} MiB",
        r.ratio, r.identical_records, r.tail_s, r.round_s, r.last_admission_to_end_s, r.peak_rss_mib
    );
    Ok(())
}

/// `mirgen report --dataset out/demo --out out/demo-report` then open out/demo-report/index.html
#[derive(Args)]
struct ReportArgs {
    /// A finished mirgen dataset (folder or object-store URL).
    #[arg(long, value_name = "DIR|URL")]
    dataset: String,
    /// Folder for index.html and its images.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Page title (default: the dataset's name from its config).
    #[arg(long)]
    title: Option<String>,
    /// At most this many target filmstrips.
    #[arg(long, default_value_t = 100, value_name = "N")]
    max_targets: usize,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ExportFormat {
    /// GenIR's captions/, generated_images/, comparisons/, dialogues/ folders.
    Genir,
    /// ChatIR's dialog JSON: [{"img": path, "dialog": [query per round]}].
    Chatir,
}

/// `mirgen export --dataset out/demo --format genir --out genir/`
#[derive(Args)]
struct ExportArgs {
    /// A finished mirgen dataset (folder or object-store URL).
    #[arg(long, value_name = "DIR|URL")]
    dataset: String,
    #[arg(long, value_enum)]
    format: ExportFormat,
    /// Output folder (genir) or JSON file (chatir).
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

/// `mirgen publish --dataset out/demo --repo my-org/my-mir-dataset --dry-run`
///
/// Uses `hf upload-large-folder` (pip install huggingface_hub), which resumes
/// an interrupted upload when the same command is run again.
#[derive(Args)]
struct PublishArgs {
    /// A finished dataset in a local folder.
    #[arg(long, value_name = "DIR")]
    dataset: PathBuf,
    /// Hub dataset repository, `org/name`.
    #[arg(long, value_name = "ORG/NAME")]
    repo: String,
    /// Create the repository as private.
    #[arg(long)]
    private: bool,
    /// List what would be uploaded and the command, upload nothing.
    #[arg(long)]
    dry_run: bool,
}

fn read_dataset(
    spec: &str,
) -> anyhow::Result<(mirgen_schemas::Manifest, Vec<mirgen_schemas::Record>)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let loc = mirgen::store::Location::open(spec, false)?;
    Ok(runtime.block_on(mirgen::commit::read_dataset(&loc))?)
}

fn report(args: ReportArgs) -> anyhow::Result<()> {
    let (manifest, rows) = read_dataset(&args.dataset)?;
    let title = args.title.clone().unwrap_or_else(|| {
        manifest.config["output"]["pretty_name"]
            .as_str()
            .unwrap_or("mirgen dataset")
            .to_string()
    });
    mirgen::report::write_report(&manifest, &rows, &args.out, &title, args.max_targets)?;
    println!("wrote {}", args.out.join("index.html").display());
    Ok(())
}

fn export(args: ExportArgs) -> anyhow::Result<()> {
    let (_, rows) = read_dataset(&args.dataset)?;
    match args.format {
        ExportFormat::Genir => {
            let n = mirgen::export::export_genir(&rows, &args.out)?;
            println!("wrote {n} GenIR dialogues under {}", args.out.display());
        }
        ExportFormat::Chatir => {
            let dialogs = mirgen::export::chatir_dialogs(&rows);
            std::fs::write(&args.out, serde_json::to_vec(&dialogs)?)
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", args.out.display()))?;
            println!(
                "wrote {} ChatIR dialogs to {}",
                dialogs.as_array().map_or(0, Vec::len),
                args.out.display()
            );
        }
    }
    Ok(())
}

fn publish(args: PublishArgs) -> anyhow::Result<()> {
    mirgen::publish::check_repo_id(&args.repo)?;
    let plan = mirgen::publish::plan_upload(&args.dataset)?;
    if args.dry_run {
        for (f, n) in &plan.files {
            println!("{n:>12}  {f}");
        }
        let cmd = mirgen::publish::upload_command(
            std::path::Path::new("hf"),
            &args.dataset,
            &args.repo,
            args.private,
        );
        println!(
            "dry run: {} files, {} bytes would go to https://huggingface.co/datasets/{} with: hf {}",
            plan.files.len(),
            plan.total_bytes(),
            args.repo,
            cmd.get_args().map(|a| a.to_string_lossy().to_string()).collect::<Vec<_>>().join(" ")
        );
        return Ok(());
    }
    mirgen::publish::publish(&args.dataset, &args.repo, args.private)?;
    println!(
        "published {} to https://huggingface.co/datasets/{}",
        args.dataset.display(),
        args.repo
    );
    Ok(())
}

/// `mirgen eval --dataset out/demo --dataset out/other --plot hits.svg`
#[derive(Args)]
#[command(
    after_help = "Cumulative Hits@K at round t = % of targets whose first hit (rank < K) came at a round <= t (ChatIR/GenIR); \
every target is in the denominator, a failed row is a miss.\n\nExamples:\n  mirgen eval --dataset out/demo\n  \
mirgen eval --dataset out/a --dataset out/b --json --plot hits.svg\n  mirgen eval --ranks ranks.csv --k 1,5,10"
)]
struct EvalArgs {
    /// A finished mirgen dataset (folder or object-store URL). Repeat to compare runs.
    #[arg(long = "dataset", value_name = "DIR|URL")]
    datasets: Vec<String>,
    /// A ranks table: CSV with header `target_id,round,rank` (empty rank = miss)
    /// or a JSON list of {"target_id", "round", "rank"}. Repeatable.
    #[arg(long = "ranks", value_name = "FILE")]
    ranks: Vec<PathBuf>,
    /// The K of Hits@K, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 5, 10])]
    k: Vec<u32>,
    /// Print the reports as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Write a plot of cumulative Hits@K (the largest K) against the round:
    /// FILE.svg and FILE.png.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Which view ranks the corpus for --dataset inputs: the recorded ranks
    /// (`image`: the drawing in genir mode), the query `text`, or `fused`
    /// image and text scores. `text` and `fused` re-embed with --config's embedder.
    #[arg(long, value_enum, default_value_t = mirgen::rescore::Retrieval::Image)]
    retrieval: mirgen::rescore::Retrieval,
    /// Job config whose corpus and embedder re-rank for --retrieval text|fused.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// ChatIR-format dialogs (`[{"img", "dialog": [...]}]`) to score with
    /// --config's embedder over its corpus: round t's query is the first t+1
    /// turns joined with ", " (ChatIR's protocol). Repeatable.
    #[arg(long = "dialogs", value_name = "FILE.json")]
    dialogs: Vec<PathBuf>,
    /// Where the corpus index for --dialogs is cached (folder or URL).
    #[arg(long, value_name = "DIR|URL", default_value = "output/.eval-index")]
    index_cache: String,
    /// Fusion weights w_img0,w_txt0,w_img,w_txt (round 0, later rounds); default DAR's 0.2,0.8,0.5,0.5.
    #[arg(long, value_name = "W", default_value = "0.2,0.8,0.5,0.5")]
    fuse_weights: String,
}

fn eval(args: EvalArgs) -> anyhow::Result<()> {
    use mirgen::eval::{evaluate, read_ranks_table, render_svg, render_table};
    anyhow::ensure!(
        !args.datasets.is_empty() || !args.ranks.is_empty(),
        "give at least one --dataset or --ranks"
    );
    anyhow::ensure!(
        !args.k.is_empty() && args.k.iter().all(|&k| k > 0),
        "--k needs positive values"
    );
    let mut reports = Vec::new();
    let weights = mirgen::rescore::FuseWeights::parse(&args.fuse_weights)?;
    if !args.dialogs.is_empty() {
        let Some(config) = &args.config else {
            anyhow::bail!(
                "--dialogs are ranked by text: give a job --config (its corpus and embedder)"
            );
        };
        let dialog_cfg = LoadedConfig::load(config)?;
        let cache = mirgen::store::Location::open(&args.index_cache, true)?;
        for path in &args.dialogs {
            let spec = path.display().to_string();
            let text =
                std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {spec}: {e}"))?;
            let value: serde_json::Value = serde_json::from_slice(&text)
                .map_err(|e| anyhow::anyhow!("{spec} is not valid JSON: {e}"))?;
            let dialogs = mirgen::rescore::parse_dialogs(&spec, &value)?;
            reports.push(evaluate(
                &spec,
                &mirgen::rescore::rank_dialogs(&dialog_cfg, &cache, &dialogs)?,
                &args.k,
            ));
        }
    }
    let cfg = match (&args.config, args.retrieval) {
        (_, mirgen::rescore::Retrieval::Image) => None,
        (Some(c), _) => Some(LoadedConfig::load(c)?),
        (None, r) => anyhow::bail!("--retrieval {r:?} re-embeds the queries: give the job's --config (its corpus and embedder)"),
    };
    for spec in &args.datasets {
        let (_, rows) = read_dataset(spec)?;
        let ranks = match &cfg {
            None => mirgen::commit::rank_rows(&rows),
            Some(cfg) => {
                let loc = mirgen::store::Location::open(spec, false)?;
                mirgen::rescore::rescore(cfg, &loc, &rows, args.retrieval, weights)?
            }
        };
        reports.push(evaluate(spec, &ranks, &args.k));
    }
    for path in &args.ranks {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        let spec = path.display().to_string();
        reports.push(evaluate(&spec, &read_ranks_table(&spec, &text)?, &args.k));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        print!("{}", render_table(&reports));
    }
    if let Some(plot) = &args.plot {
        let k = *args.k.iter().max().expect("checked non-empty");
        let svg = render_svg(&reports, k);
        let svg_path = plot.with_extension("svg");
        let png_path = plot.with_extension("png");
        std::fs::write(&svg_path, &svg)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", svg_path.display()))?;
        std::fs::write(&png_path, mirgen::eval::svg_to_png(&svg)?)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", png_path.display()))?;
        eprintln!("wrote {} and {}", svg_path.display(), png_path.display());
    }
    Ok(())
}

/// `mirgen run --config configs/demo.toml --output out/demo -w 2`
///
/// What the job does (corpus, targets, models, prompts, rounds) is in the
/// config file; how this process runs is in these flags. Rerunning the same
/// command resumes: committed targets are skipped, and a finished output is
/// left as it is. A config that changes results is refused on an output made
/// with another config.
#[derive(Args)]
struct RunArgs {
    /// Job configuration (TOML). See configs/demo.toml for every key.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Where the dataset goes: a folder or an object-store URL (s3://bucket/prefix,
    /// gs://…, az://…; credentials from the usual environment variables).
    /// Default: output/<config file name without .toml>.
    #[arg(long, value_name = "DIR|URL")]
    output: Option<String>,
    /// Timely worker threads in this process (one model replica each, on an
    /// even share of the cores; RAYON_NUM_THREADS sets the kernel threads of
    /// each worker instead).
    #[arg(short = 'w', long = "workers", default_value_t = 1, value_name = "N")]
    workers: usize,
    /// Number of processes in the cluster (timely `-n`).
    #[arg(short = 'n', long = "processes", default_value_t = 1, value_name = "N")]
    processes: usize,
    /// This process's index in the cluster, 0-based (timely `-p`).
    #[arg(short = 'p', long = "process", default_value_t = 0, value_name = "I")]
    process: usize,
    /// Hostfile for multi-process runs: line i is `host:port` of process i (timely `-h`).
    #[arg(short = 'h', long = "hostfile", value_name = "FILE")]
    hostfile: Option<PathBuf>,
    /// Device for the models: `auto` (GPU `worker mod count` when built with
    /// --features cuda and a GPU is visible, else CPU), `cpu` or `cuda`.
    #[arg(long, default_value = "auto", value_name = "DEVICE")]
    device: String,
    /// Progress display.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    progress: ProgressMode,
    /// Corpus index placement: `replicated` (every worker holds the whole
    /// index), `sharded` (worker i holds every n-th vector; queries go to all
    /// shards and the owner merges their top-K: same results, 1/n memory), or
    /// `auto` (sharded when the index exceeds --index-memory-mb).
    #[arg(long, value_enum, default_value_t = IndexMode::Auto)]
    index: IndexMode,
    /// Index size above which `--index auto` shards it.
    #[arg(long, default_value_t = 2048, value_name = "MB")]
    index_memory_mb: u64,
    /// Warn when one stage of a wave (a batched model call, a commit) runs
    /// longer than this.
    #[arg(long, default_value_t = 600, value_name = "SECONDS")]
    stall_warn: u64,
    /// Stop this process (exit status 4) when a stage runs longer than this,
    /// instead of hanging; rerunning resumes, runs the stalled targets one at
    /// a time, and records a target that stalls alone twice as failed. 0: never.
    #[arg(long, default_value_t = 3600, value_name = "SECONDS")]
    stall_timeout: u64,
    /// Print help (`-h` is timely's hostfile flag).
    #[arg(long, action = ArgAction::Help)]
    help: Option<bool>,
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let cfg = LoadedConfig::load(&args.config)?;
    let output = args.output.clone().unwrap_or_else(|| {
        let stem = args
            .config
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "run".into());
        format!("output/{stem}")
    });
    let mut timely_args = vec!["mirgen".to_string(), "-w".into(), args.workers.to_string()];
    if args.processes > 1 {
        timely_args.extend([
            "-n".into(),
            args.processes.to_string(),
            "-p".into(),
            args.process.to_string(),
        ]);
        if let Some(h) = &args.hostfile {
            timely_args.extend(["-h".into(), h.display().to_string()]);
        }
    }
    let outcome = job::run(
        cfg,
        RunOptions {
            output: output.clone(),
            timely_args,
            process: args.process,
            processes: args.processes,
            workers: args.workers,
            index: args.index,
            index_memory_mb: args.index_memory_mb,
            stalls: StallLimits {
                warn_after: Duration::from_secs(args.stall_warn.max(1)),
                abort_after: (args.stall_timeout > 0)
                    .then(|| Duration::from_secs(args.stall_timeout)),
            },
            device: args.device,
            progress: args.progress,
        },
    )?;
    match outcome {
        RunOutcome::AlreadyComplete(m) => println!(
            "nothing to do: {output} already holds the finished dataset of this config ({} rows, {} targets, config hash {}).",
            m.stats.rows, m.stats.targets, m.config_hash
        ),
        RunOutcome::Finished { manifest: m, new_targets } => {
            println!(
                "wrote {output}: {} rows ({} targets x {} rounds, {} new this run), {} failed rows, {} data file(s)",
                m.stats.rows,
                m.stats.targets,
                m.rounds + 1,
                new_targets,
                m.stats.failed_rows,
                m.data_files.len()
            );
            if let (Some(first), Some(last)) = (m.stats.cumulative_hits_at_10.first(), m.stats.cumulative_hits_at_10.last()) {
                println!("cumulative Hits@10: round 0 {first:.1}% -> round {} {last:.1}%", m.rounds);
            }
            if m.models.values().any(|v| v["smoke_test"] == true) {
                println!("NOTE: smoke-test models (random weights, or simulation stand-ins that are no model): this dataset shows the format, not real retrieval.");
            }
        }
        RunOutcome::ShareDone { new_targets } => println!(
            "process {} finished its share of the {new_targets} targets this run had to do; process 0 writes the dataset",
            args.process
        ),
    }
    Ok(())
}

/// A dead peer process surfaces as a panic in timely's network threads;
/// turn it into one clear message and a prompt exit (committed work is safe).
fn install_peer_loss_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        if msg.contains("timely communication error") || msg.contains("MergeQueue poisoned") {
            eprintln!(
                "error: lost the connection to another process of this cluster ({msg}). \
                 A peer process died or was killed; every committed wave is kept. \
                 Rerun the same command on every process to resume."
            );
            std::process::exit(PEER_LOST_EXIT_CODE);
        }
        default(info);
    }));
}

/// Exit status when a peer process of the cluster is lost.
const PEER_LOST_EXIT_CODE: i32 = 3;

fn main() -> ExitCode {
    install_peer_loss_hook();
    let cli = Cli::parse();
    // Split the cores between this process's workers before any thread starts
    // (candle reads the thread count from the environment; `bench` plans its
    // two phases itself).
    let workers = match &cli.command {
        Command::Run(a) => Some(a.workers),
        Command::Index(a) => Some(a.workers),
        _ => None,
    };
    if let Some(w) = workers {
        let (_, line) = mirgen_workers::kernels::plan_threads(w);
        eprintln!("{line}");
    }
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Eval(args) => eval(args),
        Command::Report(args) => report(args),
        Command::Export(args) => export(args),
        Command::Publish(args) => publish(args),
        Command::Bench(args) => bench(args),
        Command::Index(args) => index(args),
        Command::Embed(args) => embed(args),
        Command::Generate(args) => generate(args),
        Command::Vlm(args) => vlm(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
