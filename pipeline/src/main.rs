//! The `mirgen` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, Args, Parser, Subcommand};
use mirgen::config::LoadedConfig;
use mirgen::job::{self, RunOptions, RunOutcome};
use mirgen::progress::ProgressMode;

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
    /// Timely worker threads in this process (one model replica each).
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
                println!("NOTE: smoke-test models with random weights: this dataset shows the format, not real retrieval.");
            }
        }
        RunOutcome::ShareDone { new_targets } => println!(
            "process {} finished its share of the {new_targets} targets this run had to do; process 0 writes the dataset",
            args.process
        ),
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
