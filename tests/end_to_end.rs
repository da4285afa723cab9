//! End-to-end tests of `mirgen run` on small generated corpora with the
//! smoke-test models: layout, determinism across worker counts, resume,
//! crash recovery, bad inputs, and (with Python) pyarrow/datasets loading.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use mirgen::config::LoadedConfig;
use mirgen::job::{self, IndexMode, RunOptions, RunOutcome};
use mirgen::progress::ProgressMode;
use mirgen_schemas::{records_from_parquet, Manifest, Record, RecordStatus};

/// Writes `n` small PNGs of different sizes and colours.
fn make_corpus(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    for i in 0..n {
        let (w, h) = (24 + 7 * i as u32, 20 + 5 * (i as u32 % 4));
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 9 + i as u32 * 40) as u8,
                (y * 11 + i as u32 * 13) as u8,
                (x * y + i as u32 * 70) as u8,
            ])
        });
        // one image in a sub-folder: ids are paths relative to the root
        let name = if i == 0 {
            "sub/img00.png".to_string()
        } else {
            format!("img{i:02}.png")
        };
        img.save(dir.join(name)).unwrap();
    }
}

fn write_config(dir: &Path, corpus: &Path, rounds: u32, extra: &str) -> PathBuf {
    let text = format!(
        r#"
[run]
rounds = {rounds}
seed = 7
[corpus]
root = "{}"
[models.vlm]
preset = "tiny"
max_new_tokens = {{ caption = 8, compare = 6, refine = 8 }}
[models.generator]
preset = "tiny"
steps = 2
guidance = 2.0
[models.embedder]
preset = "tiny"
[output]
shard_rows = 10
[batch]
window = 3
{extra}
"#,
        corpus.display()
    );
    let path = dir.join("job.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn try_run_job(
    config: &Path,
    output: &Path,
    workers: usize,
) -> Result<RunOutcome, mirgen::PipelineError> {
    try_run_job_indexed(config, output, workers, IndexMode::Replicated)
}

fn try_run_job_indexed(
    config: &Path,
    output: &Path,
    workers: usize,
    index: IndexMode,
) -> Result<RunOutcome, mirgen::PipelineError> {
    job::run(
        LoadedConfig::load(config).unwrap(),
        RunOptions {
            output: output.display().to_string(),
            timely_args: vec!["mirgen".into(), "-w".into(), workers.to_string()],
            process: 0,
            processes: 1,
            workers,
            device: "cpu".into(),
            progress: ProgressMode::None,
            index,
            index_memory_mb: 2048,
            stalls: mirgen::watchdog::StallLimits {
                warn_after: Duration::from_secs(600),
                abort_after: None,
            },
        },
    )
}

fn run_job(config: &Path, output: &Path, workers: usize) -> RunOutcome {
    try_run_job(config, output, workers).unwrap()
}

fn read_dataset(output: &Path) -> (Manifest, Vec<Record>) {
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(output.join("manifest.json")).unwrap()).unwrap();
    let mut rows = Vec::new();
    for f in &manifest.data_files {
        let bytes = std::fs::read(output.join(f)).unwrap();
        rows.extend(records_from_parquet(bytes.into()).unwrap());
    }
    // data files follow commit order; compare in (target, round) order
    rows.sort_by(|a, b| (&a.target_id, a.round).cmp(&(&b.target_id, b.round)));
    (manifest, rows)
}

fn assert_each_target_round_once(rows: &[Record], targets: usize, rounds: u32) {
    assert_eq!(rows.len(), targets * (rounds as usize + 1));
    let mut keys: Vec<(String, i32)> = rows
        .iter()
        .map(|r| (r.target_id.clone(), r.round))
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), rows.len(), "a (target, round) appears twice");
}

#[test]
fn run_writes_hf_layout_same_records_for_any_worker_count_and_resumes_as_noop() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    make_corpus(&corpus, 7);
    std::fs::write(corpus.join("LICENSES.md"), "not an image, not listed").unwrap();
    let config = write_config(tmp.path(), &corpus, 2, "");

    let out1 = tmp.path().join("out-w1");
    let out2 = tmp.path().join("out-w2");
    assert!(matches!(
        run_job(&config, &out1, 1),
        RunOutcome::Finished { new_targets: 7, .. }
    ));
    assert!(matches!(
        run_job(&config, &out2, 2),
        RunOutcome::Finished { new_targets: 7, .. }
    ));

    let (m1, rows1) = read_dataset(&out1);
    let (m2, rows2) = read_dataset(&out2);
    assert_each_target_round_once(&rows1, 7, 2);
    assert_eq!(m1.config_hash, m2.config_hash);
    assert_eq!(
        m1.data_files,
        vec![
            "data/train-00000-of-00003.parquet",
            "data/train-00001-of-00003.parquet",
            "data/train-00002-of-00003.parquet"
        ]
    );
    assert!(
        rows1.iter().all(|r| r.status == RecordStatus::Ok),
        "{:?}",
        rows1.iter().find(|r| r.error.is_some())
    );
    // byte-identical records (timings aside) whatever the number of workers,
    // and with the index sharded over 3 workers (distributed top-K)
    let out3 = tmp.path().join("out-w3-sharded");
    assert!(matches!(
        try_run_job_indexed(&config, &out3, 3, IndexMode::Sharded).unwrap(),
        RunOutcome::Finished { new_targets: 7, .. }
    ));
    let (_, rows3) = read_dataset(&out3);
    let strip = |rows: &[Record]| {
        let mut v = rows.iter().map(Record::without_timings).collect::<Vec<_>>();
        v.sort_by(|a, b| (&a.target_id, a.round).cmp(&(&b.target_id, b.round)));
        v
    };
    assert_eq!(strip(&rows1), strip(&rows2));
    assert_eq!(
        strip(&rows1),
        strip(&rows3),
        "sharded index must rank as the replicated one"
    );
    let worker_stats = std::fs::read_dir(out3.join(".mirgen/stats"))
        .unwrap()
        .count();
    assert_eq!(worker_stats, 3, "one stats file per worker");
    // rows are complete: round 0 has no feedback, later rounds do; ranks label hits
    for r in &rows1 {
        assert_eq!(r.feedback.is_none(), r.round == 0);
        assert!(r.query.is_some() && r.synthetic_image.is_some() && r.target_image.is_some());
        assert_eq!(r.retrieved_ids.len(), 7);
        assert_eq!(r.hit_at_10, r.target_rank.map(|k| k < 10));
    }
    assert!(rows1.iter().any(|r| r.target_id == "sub/img00.png"));
    let card = std::fs::read_to_string(out1.join("README.md")).unwrap();
    assert!(card.contains("Smoke-test dataset") && card.contains("num_examples: 21"));
    assert!(m1.models.values().all(|v| v["smoke_test"] == true));

    // the same command again is a no-op that leaves the files alone
    let before = std::fs::metadata(out1.join("manifest.json"))
        .unwrap()
        .modified()
        .unwrap();
    assert!(matches!(
        run_job(&config, &out1, 2),
        RunOutcome::AlreadyComplete(_)
    ));
    assert_eq!(
        std::fs::metadata(out1.join("manifest.json"))
            .unwrap()
            .modified()
            .unwrap(),
        before
    );

    // a config that changes results is refused on this output
    let changed = write_config(tmp.path(), &corpus, 3, "");
    let err = try_run_job(&changed, &out1, 1).unwrap_err().to_string();
    assert!(err.contains("another configuration"), "{err}");

    python_checks(&out1);
}

/// pyarrow reads every shard; `datasets` loads the folder and decodes both
/// image columns to PIL images. Needs MIRGEN_PYTHON (a Python with
/// `datasets`), which .ci/run provides; required when CI is set.
fn python_checks(output: &Path) {
    let Ok(python) = std::env::var("MIRGEN_PYTHON") else {
        assert!(
            std::env::var("CI").is_err(),
            "CI must set MIRGEN_PYTHON to a Python with pyarrow and datasets"
        );
        eprintln!("MIRGEN_PYTHON not set: skipping the pyarrow/datasets check");
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/check_dataset.py");
    let out = Command::new(python)
        .arg(script)
        .arg(output)
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "check_dataset.py failed:\n{log}");
    assert!(log.contains("datasets: 21 rows"), "{log}");
}

#[test]
fn bad_corpus_files_are_reported_and_good_targets_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    make_corpus(&corpus, 4);
    std::fs::write(corpus.join("empty.jpg"), b"").unwrap();
    std::fs::write(
        corpus.join("notes.jpg"),
        b"this is a text file renamed to .jpg\n",
    )
    .unwrap();
    let png = std::fs::read(corpus.join("img01.png")).unwrap();
    std::fs::write(corpus.join("truncated.png"), &png[..png.len() / 2]).unwrap();
    let config = write_config(tmp.path(), &corpus, 1, "");
    let out = tmp.path().join("out");
    run_job(&config, &out, 2);
    let (m, rows) = read_dataset(&out);
    assert_each_target_round_once(&rows, 7, 1);
    let failures = &m.stats.corpus_failures;
    assert_eq!(failures.len(), 3, "{failures:?}");
    assert!(failures["empty.jpg"].contains("empty"), "{failures:?}");
    assert!(
        failures["notes.jpg"].contains("not a recognised image"),
        "{failures:?}"
    );
    assert!(
        failures["truncated.png"].contains("corrupt or truncated"),
        "{failures:?}"
    );
    for r in &rows {
        let bad = ["empty.jpg", "notes.jpg", "truncated.png"].contains(&r.target_id.as_str());
        assert_eq!(r.status == RecordStatus::Failed, bad, "{r:?}");
        if bad {
            let e = r.error.as_deref().unwrap();
            assert!(e.contains(&r.target_id), "error must name the input: {e}");
            assert!(r.synthetic_image.is_none() && r.target_image.is_none());
        } else {
            assert!(r.synthetic_image.is_some() && r.target_rank.is_some());
        }
    }
    assert_eq!(m.stats.failed_targets, 3);
}

#[test]
fn missing_corpus_and_unknown_keys_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path(), &tmp.path().join("nowhere"), 1, "");
    let err = try_run_job(&config, &tmp.path().join("o"), 1)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("corpus.root") && err.contains("nowhere") && err.contains("does not exist"),
        "{err}"
    );

    let bin = env!("CARGO_BIN_EXE_mirgen");
    let bad = write_config(tmp.path(), tmp.path(), 1, "typo_key = 1");
    let out = Command::new(bin)
        .args(["run", "--config"])
        .arg(&bad)
        .arg("--output")
        .arg(tmp.path().join("o2"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("typo_key") && stderr.contains("job.toml"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn killed_run_resumes_with_every_target_round_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    make_corpus(&corpus, 9);
    let config = write_config(tmp.path(), &corpus, 2, "");
    let out = tmp.path().join("out");
    let bin = env!("CARGO_BIN_EXE_mirgen");
    let mut child = Command::new(bin)
        .args(["run", "--progress", "none", "-w", "2", "--config"])
        .arg(&config)
        .arg("--output")
        .arg(&out)
        .spawn()
        .unwrap();
    // kill as soon as the first wave is committed, mid-run
    let commits = out.join(".mirgen/commits");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let n = std::fs::read_dir(&commits).map(|d| d.count()).unwrap_or(0);
        if n >= 1 || Instant::now() > deadline {
            break;
        }
        if child.try_wait().unwrap().is_some() {
            panic!("the run finished before it could be killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !out.join("manifest.json").exists(),
        "a killed run must not look finished"
    );

    let status = Command::new(bin)
        .args(["run", "--progress", "none", "-w", "1", "--config"])
        .arg(&config)
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(stdout.contains("27 rows"), "{stdout}");
    let (_, rows) = read_dataset(&out);
    assert_each_target_round_once(&rows, 9, 2);

    // and the resumed dataset equals an uninterrupted one
    let clean = tmp.path().join("clean");
    run_job(&config, &clean, 1);
    let (_, clean_rows) = read_dataset(&clean);
    let strip = |rows: &[Record]| {
        let mut v = rows.iter().map(Record::without_timings).collect::<Vec<_>>();
        v.sort_by(|a, b| (&a.target_id, a.round).cmp(&(&b.target_id, b.round)));
        v
    };
    assert_eq!(strip(&rows), strip(&clean_rows));
}

fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

#[test]
fn three_processes_of_two_workers_with_a_sharded_index_make_the_records_of_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    make_corpus(&corpus, 8);
    let config = write_config(tmp.path(), &corpus, 1, "");
    let hosts = tmp.path().join("hosts.txt");
    let ports = free_ports(3);
    std::fs::write(
        &hosts,
        ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let out = tmp.path().join("cluster");
    let bin = env!("CARGO_BIN_EXE_mirgen");
    let procs: Vec<_> = (0..3)
        .map(|p| {
            Command::new(bin)
                .args([
                    "run",
                    "--progress",
                    "none",
                    "-w",
                    "2",
                    "-n",
                    "3",
                    "--index",
                    "sharded",
                    "-p",
                    &p.to_string(),
                    "-h",
                ])
                .arg(&hosts)
                .arg("--config")
                .arg(&config)
                .arg("--output")
                .arg(&out)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // a cluster of processes that all must be running at once: wait on each
    for (i, p) in procs.into_iter().enumerate() {
        let out = p.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "process {i} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let single = tmp.path().join("single");
    run_job(&config, &single, 1);
    let (_, cluster_rows) = read_dataset(&out);
    let (_, single_rows) = read_dataset(&single);
    assert_each_target_round_once(&cluster_rows, 8, 1);
    let strip = |rows: &[Record]| {
        let mut v = rows.iter().map(Record::without_timings).collect::<Vec<_>>();
        v.sort_by(|a, b| (&a.target_id, a.round).cmp(&(&b.target_id, b.round)));
        v
    };
    assert_eq!(strip(&cluster_rows), strip(&single_rows));
}

/// `mirgen eval` on a committed ranks table reproduces ChatIR's eval.py
/// formula (re-implemented in scripts/chatir_hits.py) for K = 1, 5, 10.
#[test]
fn eval_matches_the_chatir_formula_on_a_ranks_table() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let table = root.join("tests/data/ranks_chatir.csv");
    let out = mirgen_ok(&[
        "eval",
        "--json",
        "--k",
        "1,5,10",
        "--ranks",
        table.to_str().unwrap(),
    ]);
    let reports: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ours = &reports[0]["cumulative"];
    assert_eq!(reports[0]["targets"], 60);
    let Ok(python) = std::env::var("MIRGEN_PYTHON").or_else(|_| std::env::var("PYTHON")) else {
        assert!(std::env::var("CI").is_err(), "CI must set MIRGEN_PYTHON");
        eprintln!("no MIRGEN_PYTHON: skipping the ChatIR cross-check");
        return;
    };
    for k in ["1", "5", "10"] {
        let reference = Command::new(&python)
            .arg(root.join("scripts/chatir_hits.py"))
            .arg(&table)
            .arg(k)
            .output()
            .unwrap();
        assert!(
            reference.status.success(),
            "{}",
            String::from_utf8_lossy(&reference.stderr)
        );
        let reference: Vec<f64> = serde_json::from_slice(&reference.stdout).unwrap();
        let ours: Vec<f64> = serde_json::from_value(ours[k].clone()).unwrap();
        assert_eq!(ours.len(), 11);
        for (a, b) in ours.iter().zip(&reference) {
            assert!(
                (a - b).abs() < 1e-9,
                "Hits@{k}: mirgen {ours:?} vs ChatIR {reference:?}"
            );
        }
        assert!(
            reference.windows(2).all(|w| w[0] <= w[1]),
            "cumulative hits never decrease"
        );
    }
}

/// The paper's baselines run on the same targets and seeds: `verbal` (no
/// image; retrieval by the query text) and `prediction` (the top-1 real
/// image is the VLM's feedback image).
#[test]
fn baseline_modes_make_complete_datasets_without_drawings() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    make_corpus(&corpus, 5);
    let mut queries = Vec::new();
    for mode in ["verbal", "prediction"] {
        let out = run_mode(tmp.path(), &corpus, mode, 2);
        let (m, rows) = read_dataset(&out);
        assert_eq!(m.config["run"]["mode"], mode);
        assert_each_target_round_once(&rows, 5, 2);
        for r in &rows {
            assert_eq!(r.status, RecordStatus::Ok, "{r:?}");
            assert!(r.synthetic_image.is_none(), "{mode} draws nothing");
            assert!(r.target_rank.is_some());
            assert_eq!(r.feedback.is_some(), r.round > 0);
        }
        queries.push(rows.iter().map(|r| r.query.clone()).collect::<Vec<_>>());
    }
    // same round-0 captions (same seeds), different feedback afterwards
    assert_eq!(queries[0][0], queries[1][0]);
    assert_ne!(queries[0], queries[1]);
}

/// Runs a 2-round job in `mode` under `root/<mode>/` (config `job.toml`, output `out`).
fn run_mode(root: &Path, corpus: &Path, mode: &str, workers: usize) -> PathBuf {
    let dir = root.join(mode);
    std::fs::create_dir_all(&dir).unwrap();
    let config = write_config(&dir, corpus, 2, "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("seed = 7", &format!("seed = 7\nmode = \"{mode}\""));
    std::fs::write(&config, text).unwrap();
    let out = dir.join("out");
    run_job(&config, &out, workers);
    out
}

/// Runs `mirgen` and asserts it succeeded (showing its stderr otherwise).
fn mirgen_ok(args: &[&str]) -> std::process::Output {
    let out = mirgen(args);
    assert!(
        out.status.success(),
        "mirgen {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn mirgen(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mirgen"))
        .args(args)
        .output()
        .unwrap()
}

/// The three modes on one config, compared by `mirgen eval` on one plot; the
/// HTML report of a run opens in headless Chromium with every image found;
/// exports and the publish dry run work on the same output.
#[test]
fn modes_eval_report_export_and_publish_dry_run() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    make_corpus(&corpus, 4);
    let mut outs = Vec::new();
    for mode in ["genir", "verbal", "prediction"] {
        let out = run_mode(tmp.path(), &corpus, mode, 1);
        outs.push(out.display().to_string());
    }
    let plot = tmp.path().join("hits.svg");
    let out = mirgen_ok(&[
        "eval",
        "--json",
        "--dataset",
        &outs[0],
        "--dataset",
        &outs[1],
        "--dataset",
        &outs[2],
        "--plot",
        plot.to_str().unwrap(),
    ]);
    let reports: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reports.as_array().unwrap().len(), 3);
    for r in reports.as_array().unwrap() {
        let cum: Vec<f64> = serde_json::from_value(r["cumulative"]["10"].clone()).unwrap();
        assert_eq!(cum.len(), 3);
        assert!(cum.windows(2).all(|w| w[0] <= w[1]));
    }
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 3, "one line per run");
    assert!(
        image::open(tmp.path().join("hits.png")).is_ok(),
        "the PNG plot is written beside the SVG"
    );

    // text retrieval of the genir run's round-0 captions = the verbal run's
    // recorded round-0 ranks (same captions, both ranked by text)
    let genir_config = tmp.path().join("genir/job.toml");
    let mut views = Vec::new();
    for view in ["text", "fused"] {
        let out = mirgen_ok(&[
            "eval",
            "--json",
            "--dataset",
            &outs[0],
            "--retrieval",
            view,
            "--config",
            genir_config.to_str().unwrap(),
        ]);
        views.push(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()[0].clone());
    }
    assert_eq!(views[0]["mean_rank"][0], reports[1]["mean_rank"][0]);
    assert_eq!(
        views[0]["cumulative"]["10"][0],
        reports[1]["cumulative"]["10"][0]
    );
    assert_ne!(
        views[1]["mean_rank"], views[0]["mean_rank"],
        "fusion mixes in the image scores"
    );
    let no_config = mirgen(&["eval", "--dataset", &outs[0], "--retrieval", "text"]);
    assert!(
        !no_config.status.success()
            && String::from_utf8_lossy(&no_config.stderr).contains("--config")
    );

    // HTML report
    let report = tmp.path().join("report");
    mirgen_ok(&[
        "report",
        "--dataset",
        &outs[0],
        "--out",
        report.to_str().unwrap(),
    ]);
    let html = std::fs::read_to_string(report.join("index.html")).unwrap();
    let srcs: Vec<&str> = html
        .split("src=\"")
        .skip(1)
        .map(|s| s.split('"').next().unwrap())
        .collect();
    assert_eq!(
        srcs.len(),
        4 * (1 + 3),
        "a target and 3 drawings per filmstrip"
    );
    for s in &srcs {
        assert!(
            report.join(s).is_file(),
            "report references a missing image {s}"
        );
    }
    assert!(html.contains("Smoke-test dataset") && html.contains("<svg"));
    screenshot(&report.join("index.html"), &tmp.path().join("report.png"));

    // exports
    let genir = tmp.path().join("genir");
    mirgen_ok(&[
        "export",
        "--dataset",
        &outs[0],
        "--format",
        "genir",
        "--out",
        genir.to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read_dir(genir.join("dialogues")).unwrap().count(),
        4
    );
    assert_eq!(
        std::fs::read_dir(genir.join("generated_images"))
            .unwrap()
            .count(),
        12
    );
    let chatir = tmp.path().join("dialogs.json");
    mirgen_ok(&[
        "export",
        "--dataset",
        &outs[0],
        "--format",
        "chatir",
        "--out",
        chatir.to_str().unwrap(),
    ]);
    let dialogs: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&chatir).unwrap()).unwrap();
    assert_eq!(dialogs[0]["dialog"].as_array().unwrap().len(), 3);

    // publish: dry run lists the dataset without staging; a real run calls the hf CLI
    let out = mirgen(&[
        "publish",
        "--dataset",
        &outs[0],
        "--repo",
        "org/mir-demo",
        "--dry-run",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && stdout.contains("data/train-00000-of-00002.parquet")
            && stdout.contains("README.md"),
        "{stdout}"
    );
    assert!(!stdout.contains(".mirgen/commits"), "{stdout}");
    let stub = tmp.path().join("hf-stub.sh");
    let log = tmp.path().join("hf-args.txt");
    std::fs::write(
        &stub,
        format!(
            "#!/bin/sh\necho \"$@\" > {}\n[ -n \"$HF_TOKEN\" ] || exit 3\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&stub, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let no_token = Command::new(env!("CARGO_BIN_EXE_mirgen"))
        .args(["publish", "--dataset", &outs[0], "--repo", "org/mir-demo"])
        .env_remove("HF_TOKEN")
        .env("MIRGEN_HF_CLI", &stub)
        .output()
        .unwrap();
    assert!(
        !no_token.status.success()
            && String::from_utf8_lossy(&no_token.stderr).contains("HF_TOKEN")
    );
    let ok = Command::new(env!("CARGO_BIN_EXE_mirgen"))
        .args(["publish", "--dataset", &outs[0], "--repo", "org/mir-demo"])
        .env("HF_TOKEN", "hf_secret_test_token")
        .env("MIRGEN_HF_CLI", &stub)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let args = std::fs::read_to_string(&log).unwrap();
    assert!(
        args.starts_with("upload-large-folder org/mir-demo")
            && args.contains("--repo-type dataset"),
        "{args}"
    );
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&ok.stdout),
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        !printed.contains("hf_secret_test_token"),
        "the token must never be printed"
    );
}

/// Opens a page in headless Chromium, takes a screenshot, and fails on load
/// errors. Needs MIRGEN_CHROMIUM (or `chromium` on PATH); required on CI.
fn screenshot(page: &Path, png: &Path) {
    let chromium = std::env::var("MIRGEN_CHROMIUM").unwrap_or_else(|_| "chromium".into());
    let profile = tempfile::tempdir().unwrap();
    let run = Command::new(&chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1200,1600",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", page.display()))
        .output();
    let Ok(run) = run else {
        assert!(
            std::env::var("CI").is_err(),
            "CI must provide chromium (MIRGEN_CHROMIUM)"
        );
        eprintln!("no chromium: skipping the screenshot check");
        return;
    };
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "chromium failed: {log}");
    for bad in ["ERR_FILE_NOT_FOUND", "Uncaught", "Failed to load resource"] {
        assert!(
            !log.contains(bad),
            "the page had a load error ({bad}):\n{log}"
        );
    }
    let shot = image::open(png).unwrap().to_rgb8();
    assert_eq!(shot.dimensions(), (1200, 1600));
    let first = *shot.get_pixel(0, 0);
    assert!(
        shot.pixels().filter(|p| **p != first).count() > 10_000,
        "the screenshot is blank"
    );
}

/// Waits until something listens on `port`.
fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed (and reaped) when dropped, also when a test fails.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_s3s_fs(bin: &str, root: &Path, port: u16) -> Server {
    let child = Command::new(bin)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args([
            "--access-key",
            "AKIDMIRGENTEST",
            "--secret-key",
            "mirgen-test-secret-7f3a",
        ])
        .arg(root)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let server = Server(child);
    wait_for_port(port);
    server
}

/// The same job writes to S3 (a loopback s3s-fs server, installed by
/// .ci/run; MIRGEN_S3S_FS names its binary), survives a server restart in the
/// middle of the run, and never prints or stores the credentials.
#[test]
fn s3_output_survives_a_server_restart_without_leaking_credentials() {
    let Ok(server) = std::env::var("MIRGEN_S3S_FS") else {
        assert!(
            std::env::var("CI").is_err(),
            "CI must set MIRGEN_S3S_FS (cargo install s3s-fs --features binary)"
        );
        eprintln!("MIRGEN_S3S_FS not set: skipping the S3 test");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    make_corpus(&corpus, 9);
    let config = write_config(tmp.path(), &corpus, 2, "");
    let root = tmp.path().join("s3");
    std::fs::create_dir_all(root.join("bucket")).unwrap();
    let port = free_ports(1)[0];
    let s3 = start_s3s_fs(&server, &root, port);
    let mut job = Command::new(env!("CARGO_BIN_EXE_mirgen"))
        .args(["run", "--progress", "log", "-w", "2", "--config"])
        .arg(&config)
        .args(["--output", "s3://bucket/datasets/run1"])
        .env("AWS_ACCESS_KEY_ID", "AKIDMIRGENTEST")
        .env("AWS_SECRET_ACCESS_KEY", "mirgen-test-secret-7f3a")
        .env("AWS_ENDPOINT", format!("http://127.0.0.1:{port}"))
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_REGION", "us-east-1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // restart the server once the first wave is committed
    let commits = root.join("bucket/datasets/run1/.mirgen/commits");
    let deadline = Instant::now() + Duration::from_secs(300);
    while std::fs::read_dir(&commits).map(|d| d.count()).unwrap_or(0) == 0 {
        assert!(
            Instant::now() < deadline,
            "no commit appeared on the S3 server"
        );
        assert!(
            job.try_wait().unwrap().is_none(),
            "the job ended before the restart"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(s3);
    std::thread::sleep(Duration::from_millis(500));
    let s3 = start_s3s_fs(&server, &root, port);
    let out = job.wait_with_output().unwrap();
    drop(s3);
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{log}");
    assert!(log.contains("27 rows"), "{log}");
    // s3s-fs keeps objects as files: read the dataset from its folder
    let (_, rows) = read_dataset(&root.join("bucket/datasets/run1"));
    assert_each_target_round_once(&rows, 9, 2);
    // no credential in the logs or in any stored object
    assert!(
        !log.contains("mirgen-test-secret-7f3a") && !log.contains("AKIDMIRGENTEST"),
        "{log}"
    );
    let mut stack = vec![root.join("bucket")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap();
                let needle = b"mirgen-test-secret-7f3a";
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == needle),
                    "{} holds the secret key",
                    p.display()
                );
            }
        }
    }
}

/// A model call that never returns: the watchdog stops the process (exit 4)
/// instead of hanging, later attempts isolate the stalled wave's targets,
/// and the target that stalls alone twice gets failed rows while the others
/// complete.
#[test]
fn a_stalled_model_call_stops_the_process_and_the_culprit_is_isolated_then_failed() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    make_corpus(&corpus, 4);
    let config = write_config(tmp.path(), &corpus, 1, "");
    let out = tmp.path().join("out");
    let culprit = "img02.png";
    let attempt = || {
        let o = Command::new(env!("CARGO_BIN_EXE_mirgen"))
            .args([
                "run",
                "--progress",
                "none",
                "--stall-warn",
                "1",
                "--stall-timeout",
                "3",
                "--config",
            ])
            .arg(&config)
            .arg("--output")
            .arg(&out)
            .env("MIRGEN_TEST_STALL", culprit)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    // 1: the first wave (3 targets with the culprit) stalls in its caption call
    let (code, log) = attempt();
    assert_eq!(code, Some(4), "{log}");
    assert!(log.contains("has been in stage `caption`"), "{log}");
    assert!(
        log.contains("stalled in stage `caption`") && log.contains(culprit),
        "{log}"
    );
    // 2 and 3: its targets run alone; the culprit stalls alone (twice)
    for _ in 0..2 {
        let (code, log) = attempt();
        assert_eq!(code, Some(4), "{log}");
        assert!(log.contains("run one at a time"), "{log}");
    }
    // 4: the culprit is given up on; everything else completes
    let (code, log) = attempt();
    assert_eq!(code, Some(0), "{log}");
    let (_, rows) = read_dataset(&out);
    assert_each_target_round_once(&rows, 4, 1);
    for r in &rows {
        if r.target_id == culprit {
            assert_eq!(r.status, RecordStatus::Failed);
            let e = r.error.as_deref().unwrap_or_default();
            assert!(e.contains("stalled"), "{e}");
        } else {
            assert_eq!(r.status, RecordStatus::Ok, "{:?}", r.error);
        }
    }
}

/// `mirgen bench` runs the sequential reference loop and the dataflow on the
/// same targets and seeds; their records must be identical (speed is
/// measured by the benchmark itself, not asserted here).
#[test]
fn bench_compares_the_sequential_loop_and_the_dataflow_on_identical_records() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    make_corpus(&corpus, 5);
    let config = write_config(tmp.path(), &corpus, 1, "");
    let r = mirgen::bench::run(
        LoadedConfig::load(&config).unwrap(),
        mirgen::bench::BenchOptions {
            workers: 2,
            targets: Some(4),
            work_dir: Some(tmp.path().join("bench")),
            device: "cpu".into(),
            plan_kernel_threads: false,
        },
    )
    .unwrap();
    assert_eq!((r.targets, r.rounds_per_target, r.target_rounds), (4, 2, 8));
    assert!(
        r.identical_records,
        "dataflow and sequential records differ"
    );
    assert!(r.sequential_rounds_per_s > 0.0 && r.dataflow_rounds_per_s > 0.0);
    assert!(
        r.model_share > 0.0 && r.model_share <= 1.0,
        "{}",
        r.model_share
    );
    assert!(r.dataflow_stage_seconds.generate > 0.0 && r.sequential_stage_seconds.vlm > 0.0);
    assert!(r.peak_rss_mib > 1.0);
}

/// `mirgen index` embeds the corpus (a corrupt image is reported, not
/// fatal), a second call reuses it, and `mirgen run` on the same output
/// reuses it too.
#[test]
fn index_command_builds_once_reports_bad_images_and_run_reuses_it() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    make_corpus(&corpus, 5);
    std::fs::write(
        corpus.join("broken.jpg"),
        b"\xff\xd8\xff\xe0 truncated jpeg",
    )
    .unwrap();
    let config = write_config(tmp.path(), &corpus, 1, "");
    let out = tmp.path().join("out");
    let args = |extra: &[&str]| {
        let mut a = vec!["index", "--progress", "none", "--config"];
        a.push(config.to_str().unwrap());
        a.extend(["--output", out.to_str().unwrap()]);
        a.extend_from_slice(extra);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let first = mirgen_ok(
        &args(&["-w", "2"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let (so, se) = (
        String::from_utf8_lossy(&first.stdout),
        String::from_utf8_lossy(&first.stderr),
    );
    assert!(
        so.contains("written") && so.contains("5 of 6 images"),
        "{so}"
    );
    assert!(se.contains("broken.jpg"), "{se}");
    let again = mirgen_ok(&args(&[]).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(String::from_utf8_lossy(&again.stdout).contains("reused"));
    let run = mirgen_ok(&[
        "run",
        "--progress",
        "none",
        "--config",
        config.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(log.contains("reused from cache"), "{log}");
    let (_, rows) = read_dataset(&out);
    assert_eq!(
        rows.len(),
        6 * 2,
        "the broken image is a target with failed rows"
    );
    assert!(rows
        .iter()
        .filter(|r| r.target_id == "broken.jpg")
        .all(|r| r.status == RecordStatus::Failed));
}

fn encoder_fixture(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../workers/tests/fixtures/encoders")
        .join(arch)
}

/// max |a - b| / max |b| over two equally long lists.
fn rel_err(ours: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(ours.len(), reference.len(), "embedding sizes differ");
    let diff = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    diff / reference.iter().map(|b| b.abs()).fold(0f32, f32::max)
}

fn json_floats(v: &serde_json::Value) -> Vec<f32> {
    match v {
        serde_json::Value::Array(items) => items.iter().flat_map(json_floats).collect(),
        x => vec![x.as_f64().expect("a number") as f32],
    }
}

#[test]
fn embed_command_prints_the_transformers_embeddings_of_each_checkpoint() {
    let images = encoder_fixture("images");
    let mut checked = 0;
    for arch in ["clip", "siglip", "blip", "blip2"] {
        let dir = encoder_fixture(arch);
        let golden = candle_core::safetensors::load(
            dir.join("golden.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("golden.json")).unwrap()).unwrap();
        let text = meta["texts"][1].as_str().unwrap();
        let out = mirgen_ok(&[
            "embed",
            "--device",
            "cpu",
            "--model",
            dir.to_str().unwrap(),
            "--image",
            images.join("rocket.png").to_str().unwrap(),
            "--text",
            text,
        ]);
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{arch}: one line per input");
        assert_eq!(lines[0]["kind"], "image");
        assert_eq!(lines[1]["kind"], "text");
        assert_eq!(lines[1]["input"], text);
        // golden row 1 is rocket.png and texts[1]
        let image_golden = golden["image_embeds"].get(1).unwrap();
        let text_golden = golden["text_embeds"].get(1).unwrap();
        let image_golden: Vec<f32> = image_golden.flatten_all().unwrap().to_vec1().unwrap();
        let text_golden: Vec<f32> = text_golden.to_vec1().unwrap();
        let (ei, et) = (
            rel_err(&json_floats(&lines[0]["embedding"]), &image_golden),
            rel_err(&json_floats(&lines[1]["embedding"]), &text_golden),
        );
        assert!(
            ei < 1e-4 && et < 1e-4,
            "{arch}: image rel. err. {ei}, text {et}"
        );
        if arch == "blip2" {
            // one vector per query token
            assert_eq!(
                lines[0]["embedding"].as_array().unwrap().len(),
                golden["image_embeds"].dims()[1]
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 4);
    // a bad input is a JSON error line and a failing status, the rest still printed
    let out = mirgen(&[
        "embed",
        "--model",
        encoder_fixture("clip").to_str().unwrap(),
        "--image",
        "/nonexistent/x.png",
        "--text",
        "still embedded",
    ]);
    assert!(!out.status.success());
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(
        so.contains("\"error\"") && so.contains("/nonexistent/x.png"),
        "{so}"
    );
    assert!(so.contains("still embedded"), "{so}");
    // a folder that is not a checkpoint names the missing file
    let out = mirgen(&["embed", "--model", images.to_str().unwrap(), "--text", "x"]);
    assert!(!out.status.success());
    let se = String::from_utf8_lossy(&out.stderr);
    assert!(se.contains("config.json"), "{se}");
}

#[test]
fn a_run_ranks_the_corpus_with_a_hugging_face_checkpoint() {
    for arch in ["clip", "blip2"] {
        let tmp = tempfile::tempdir().unwrap();
        let corpus = tmp.path().join("corpus");
        make_corpus(&corpus, 6);
        let fixture = encoder_fixture(arch);
        // the checkpoint as a folder next to the config: a relative `model`
        copy_dir(&fixture, &tmp.path().join("encoder"));
        if arch == "blip2" {
            // without the marker a folder is taken for real weights
            std::fs::remove_file(tmp.path().join("encoder/RANDOM_WEIGHTS.md")).unwrap();
        }
        let config = write_config(tmp.path(), &corpus, 1, "");
        let text = std::fs::read_to_string(&config).unwrap().replace(
            "[models.embedder]\npreset = \"tiny\"",
            "[models.embedder]\nmodel = \"encoder\"",
        );
        // with CLIP, the drawings come from the tiny SD-Turbo checkpoint too
        // (the path real weights take); with BLIP-2 from the stand-in
        let generator = if arch == "clip" {
            copy_tree(&generator_fixture(), &tmp.path().join("sd-turbo"));
            "[models.generator]\nmodel = \"sd-turbo\""
        } else {
            "[models.generator]\npreset = \"simulation\""
        };
        // and the queries from the tiny Gemma 3: every role on a checkpoint
        let vlm = if arch == "clip" {
            copy_tree(&vlm_fixture(), &tmp.path().join("gemma3"));
            "[models.vlm]\nmodel = \"gemma3\""
        } else {
            "[models.vlm]\npreset = \"simulation\""
        };
        let text = text
            .replace("[models.vlm]\npreset = \"tiny\"", vlm)
            .replace("[models.generator]\npreset = \"tiny\"", generator)
            .replace("steps = 2\nguidance = 2.0", "steps = 1\nguidance = 0.0");
        std::fs::write(&config, text).unwrap();
        let out = tmp.path().join("out");
        run_job(&config, &out, 2);
        let (manifest, rows) = read_dataset(&out);
        assert_each_target_round_once(&rows, 6, 1);
        let manifest = serde_json::to_value(&manifest).unwrap();
        let expected_arch = if arch == "blip2" { "blip-2" } else { arch };
        assert_eq!(
            manifest["models"]["embedder"]["architecture"], expected_arch,
            "{manifest}"
        );
        // the fixtures' random weights are labelled as smoke-test models
        assert_eq!(
            manifest["models"]["embedder"]["smoke_test"],
            arch == "clip",
            "{manifest}"
        );
        if arch == "clip" {
            assert_eq!(manifest["models"]["generator"]["architecture"], "sd-turbo");
            assert_eq!(manifest["models"]["vlm"]["architecture"], "gemma3");
            assert!(rows
                .iter()
                .all(|r| r.query.as_ref().is_some_and(|q| !q.is_empty())));
            let drawing = rows[0].synthetic_image.as_ref().unwrap();
            let drawing = mirgen_workers::image_io::decode_rgb("drawing", &drawing.bytes).unwrap();
            assert_eq!(drawing.dimensions(), (32, 32));
        }
        // the index names the encoder, its preprocessing and its shape
        let index_dir = out.join(".mirgen/index");
        let metas: Vec<serde_json::Value> = std::fs::read_dir(&index_dir)
            .unwrap()
            .map(|e| {
                serde_json::from_slice(
                    &std::fs::read(e.unwrap().path().join("index.json")).unwrap(),
                )
                .unwrap()
            })
            .collect();
        assert_eq!(metas.len(), 1);
        let meta = &metas[0];
        assert_eq!(meta["encoder"]["architecture"], expected_arch);
        assert_eq!(meta["dim"], 24);
        assert_eq!(
            meta["vectors_per_image"],
            if arch == "blip2" { 8 } else { 1 }
        );
        assert_eq!(
            meta["preprocessing"]["normalize"][0]
                .as_array()
                .unwrap()
                .len(),
            3,
            "{meta}"
        );
        // every retrieved score is the similarity of the drawing and the corpus
        // image under the checkpoint (max over query-vector pairs for BLIP-2)
        let mut enc = mirgen_workers::encoders::load_embedder(
            fixture.to_str().unwrap(),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let unit = enc.dim();
        for r in &rows {
            assert_eq!(r.status, RecordStatus::Ok, "{:?}", r.error);
            let drawing = r.synthetic_image.as_ref().unwrap();
            let drawing = mirgen_workers::image_io::decode_rgb("drawing", &drawing.bytes).unwrap();
            let q = enc.embed_images(&[&drawing]).unwrap().remove(0);
            let best = &r.retrieved_ids[0];
            let img = mirgen_workers::image_io::decode_rgb(
                best,
                &std::fs::read(corpus.join(best)).unwrap(),
            )
            .unwrap();
            let c = enc.embed_images(&[&img]).unwrap().remove(0);
            let s = mirgen::index::similarity(&c, &q, unit);
            assert!(
                (s - r.retrieved_scores[0]).abs() < 1e-5,
                "{arch}: score {} recorded, {s} recomputed",
                r.retrieved_scores[0]
            );
            assert!(r.retrieved_scores.windows(2).all(|w| w[0] >= w[1]));
            assert!(r.target_rank.is_some());
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn generator_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../workers/tests/fixtures/generators/sd-turbo")
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn generate_command_draws_what_diffusers_draws_from_the_same_latents() {
    let fixture = generator_fixture();
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture.join("golden.json")).unwrap()).unwrap();
    let prompt = meta["prompt"].as_str().unwrap();
    let golden = candle_core::safetensors::load(
        fixture.join("golden.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let latents = tmp.path().join("latents.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([(
            "latents".to_string(),
            golden["turbo.init_latents"].clone(),
        )]),
        &latents,
    )
    .unwrap();
    let reference = image::open(fixture.join("image_turbo.png"))
        .unwrap()
        .to_rgb8();
    let mut drawn = Vec::new();
    for seed in ["1", "2"] {
        let out = tmp.path().join(format!("seed{seed}.png"));
        let so = mirgen_ok(&[
            "generate",
            "--device",
            "cpu",
            "--model",
            fixture.to_str().unwrap(),
            "--prompt",
            prompt,
            "--init-latents",
            latents.to_str().unwrap(),
            "--steps",
            "2",
            "--guidance",
            "0",
            "--seed",
            seed,
            "--width",
            "32",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(String::from_utf8_lossy(&so.stdout).contains("\"width\":32"));
        let img = image::open(&out).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), reference.dimensions());
        let worst = img
            .as_raw()
            .iter()
            .zip(reference.as_raw())
            .map(|(a, b)| (*a as i16 - *b as i16).abs())
            .max()
            .unwrap();
        assert!(
            worst <= 1,
            "pixels differ from diffusers' by up to {worst} levels"
        );
        drawn.push(std::fs::read(&out).unwrap());
    }
    assert_eq!(
        drawn[0], drawn[1],
        "with --init-latents the seed must not matter"
    );
    // seeded noise: the seed matters
    let (a, b) = (tmp.path().join("a.png"), tmp.path().join("b.png"));
    for (seed, out) in [("1", &a), ("2", &b)] {
        mirgen_ok(&[
            "generate",
            "--model",
            fixture.to_str().unwrap(),
            "--prompt",
            prompt,
            "--seed",
            seed,
            "--out",
            out.to_str().unwrap(),
        ]);
    }
    assert_ne!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    // a size the checkpoint does not draw, and a folder that is no pipeline, are named errors
    let out = mirgen(&[
        "generate",
        "--model",
        fixture.to_str().unwrap(),
        "--prompt",
        "x",
        "--width",
        "512",
        "--out",
        tmp.path().join("x.png").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("32x32"));
    let out = mirgen(&[
        "generate",
        "--model",
        tmp.path().to_str().unwrap(),
        "--prompt",
        "x",
        "--out",
        tmp.path().join("x.png").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("model_index.json"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn vlm_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../workers/tests/fixtures/vlm/gemma3")
}

#[test]
fn vlm_command_continues_as_transformers_does() {
    let fixture = vlm_fixture();
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture.join("golden.json")).unwrap()).unwrap();
    let images = encoder_fixture("images");
    for case in meta["cases"].as_array().unwrap() {
        let mut args: Vec<String> = ["vlm", "--device", "cpu", "--model"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(fixture.display().to_string());
        for img in case["images"].as_array().unwrap() {
            args.push("--image".into());
            args.push(images.join(img.as_str().unwrap()).display().to_string());
        }
        args.extend([
            "--prompt".into(),
            case["prompt"].as_str().unwrap().to_string(),
        ]);
        if let Some(system) = case["system"].as_str() {
            args.extend(["--system".into(), system.to_string()]);
        }
        args.extend(["--greedy", "--max-new-tokens", "8"].map(String::from));
        let out = mirgen_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let line: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
        // greedy with GenIR's repetition penalty 1.1
        assert_eq!(
            line["token_ids"], case["greedy_tokens_repetition_penalty_1.1"],
            "{}",
            case["name"]
        );
        assert!(line["text"].is_string());
    }
    let out = mirgen(&["vlm", "--model", images.to_str().unwrap(), "--prompt", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("config.json"));
}

#[test]
fn each_generator_draws_the_rounds_of_a_job_from_its_checkpoint_folder() {
    let root = generator_fixture();
    let root = root.parent().unwrap();
    for (name, arch, steps, guidance, size) in [
        ("sd-turbo", "sd-turbo", 1, 0.0, 32),
        ("sdxl-turbo", "sdxl-turbo", 1, 0.0, 32),
        ("sd3", "sd3", 2, 3.5, 32),
        ("flux", "flux", 1, 3.5, 512),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let corpus = tmp.path().join("corpus");
        make_corpus(&corpus, 2);
        let config = write_config(tmp.path(), &corpus, 0, "");
        let text = std::fs::read_to_string(&config)
            .unwrap()
            .replace(
                "[models.vlm]\npreset = \"tiny\"",
                "[models.vlm]\npreset = \"simulation\"",
            )
            .replace(
                "[models.embedder]\npreset = \"tiny\"",
                "[models.embedder]\npreset = \"simulation\"",
            )
            .replace(
                "[models.generator]\npreset = \"tiny\"\nsteps = 2\nguidance = 2.0",
                &format!(
                    "[models.generator]\nmodel = \"{}\"\nsteps = {steps}\nguidance = {guidance:?}",
                    root.join(name).display()
                ),
            );
        assert!(text.contains(&format!("generators/{name}")), "{text}");
        std::fs::write(&config, text).unwrap();
        let out = tmp.path().join("out");
        run_job(&config, &out, 1);
        let (manifest, rows) = read_dataset(&out);
        assert_each_target_round_once(&rows, 2, 0);
        let manifest = serde_json::to_value(&manifest).unwrap();
        assert_eq!(manifest["models"]["generator"]["architecture"], arch);
        assert_eq!(manifest["models"]["generator"]["smoke_test"], true);
        for r in &rows {
            assert_eq!(r.status, RecordStatus::Ok, "{name}: {:?}", r.error);
            let drawing = r.synthetic_image.as_ref().unwrap();
            let drawing = mirgen_workers::image_io::decode_rgb("drawing", &drawing.bytes).unwrap();
            assert_eq!(drawing.dimensions(), (size, size), "{name}");
        }
    }
}
