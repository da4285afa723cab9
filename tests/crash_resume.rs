//! Crash safety (issue 6): a 2-process cluster is killed with SIGKILL at
//! six moments — two random times, after a part is written but before its
//! commit record, right after a commit record, after the first data file of
//! the finalize step, and after its card but before the manifest — and rerun
//! each time. The final dataset must hold every (target, round) exactly
//! once, every Parquet file must read, no unlisted data file may remain,
//! and the rows must equal those of an uninterrupted run.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mirgen_schemas::{records_from_parquet, Manifest, Record};
use rand::{Rng, SeedableRng};

const TARGETS: usize = 24;
const ROUNDS: u32 = 3;

fn make_corpus(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..TARGETS {
        let img = image::RgbImage::from_fn(12 + i as u32 % 5, 10, |x, y| {
            image::Rgb([
                (x * 20 + i as u32 * 9) as u8,
                (y * 25) as u8,
                (i * 10) as u8,
            ])
        });
        img.save(dir.join(format!("img{i:02}.png"))).unwrap();
    }
}

fn write_config(dir: &Path, corpus: &Path) -> PathBuf {
    let text = format!(
        r#"
[run]
rounds = {ROUNDS}
seed = 11
[corpus]
root = "{}"
[models.vlm]
preset = "simulation"
[models.generator]
preset = "simulation"
[models.embedder]
preset = "simulation"
[output]
shard_rows = 20
[batch]
window = 2
"#,
        corpus.display()
    );
    let p = dir.join("job.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    ls.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// The processes of one cluster attempt; killed (and reaped) on drop.
struct Cluster {
    children: Vec<Child>,
    lines: mpsc::Receiver<(usize, String)>,
    log: Vec<String>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start(config: &Path, out: &Path, pause: Option<(&str, usize)>, tmp: &Path) -> Cluster {
    let hosts = tmp.join("hosts.txt");
    let ports = free_ports(2);
    std::fs::write(
        &hosts,
        ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let (tx, rx) = mpsc::channel();
    let children = (0..2)
        .map(|p| {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_mirgen"));
            cmd.args([
                "run",
                "--progress",
                "none",
                "-w",
                "1",
                "-n",
                "2",
                "-p",
                &p.to_string(),
                "-h",
            ])
            .arg(&hosts)
            .arg("--config")
            .arg(config)
            .arg("--output")
            .arg(out)
            .env("MIRGEN_SIM_LATENCY_MS", "60")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
            if let Some((point, proc_)) = pause {
                if proc_ == p {
                    cmd.env("MIRGEN_TEST_PAUSE_AT", point);
                }
            }
            let mut child = cmd.spawn().unwrap();
            let stderr = child.stderr.take().unwrap();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let _ = tx.send((p, line));
                }
            });
            child
        })
        .collect();
    Cluster {
        children,
        lines: rx,
        log: vec![],
    }
}

impl Cluster {
    /// Waits until a process prints a line containing `needle`.
    fn wait_for(&mut self, needle: &str, limit: Duration) -> Option<usize> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok((p, line)) = self.lines.recv_timeout(Duration::from_millis(100)) {
                let hit = line.contains(needle);
                self.log.push(format!("[p{p}] {line}"));
                if hit {
                    return Some(p);
                }
            }
        }
        None
    }

    /// SIGKILLs process `p`; returns how the other one ended (exit code) and
    /// asserts it did not hang.
    fn kill_one(&mut self, p: usize) -> Option<i32> {
        self.children[p].kill().unwrap();
        self.children[p].wait().unwrap();
        let other = 1 - p;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.children[other].try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                // a peer still finishing (e.g. process 0 finalizing) is not a hang:
                // stop it too, as a cluster scheduler would
                self.children[other].kill().unwrap();
                self.children[other].wait().unwrap();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn finish(mut self) -> Vec<Option<i32>> {
        let codes = self
            .children
            .iter_mut()
            .map(|c| c.wait().unwrap().code())
            .collect();
        while let Ok((p, line)) = self.lines.try_recv() {
            self.log.push(format!("[p{p}] {line}"));
        }
        codes
    }
}

fn read_all(out: &Path) -> (Manifest, Vec<Record>) {
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let mut rows = Vec::new();
    for f in &manifest.data_files {
        rows.extend(records_from_parquet(std::fs::read(out.join(f)).unwrap().into()).unwrap());
    }
    let mut keys: Vec<(String, i32)> = rows
        .iter()
        .map(|r| (r.target_id.clone(), r.round))
        .collect();
    keys.sort();
    let n = keys.len();
    keys.dedup();
    assert_eq!(keys.len(), n, "a (target, round) appears twice");
    assert_eq!(
        n,
        TARGETS * (ROUNDS as usize + 1),
        "every (target, round) appears"
    );
    // no data file outside the manifest; every Parquet file (parts too) reads
    for e in std::fs::read_dir(out.join("data")).unwrap() {
        let name = format!("data/{}", e.unwrap().file_name().to_string_lossy());
        assert!(
            manifest.data_files.contains(&name),
            "unlisted data file {name}"
        );
    }
    for e in std::fs::read_dir(out.join(".mirgen/parts")).unwrap() {
        let p = e.unwrap().path();
        records_from_parquet(std::fs::read(&p).unwrap().into())
            .unwrap_or_else(|e| panic!("{} does not read: {e}", p.display()));
    }
    rows.sort_by(|a, b| (&a.target_id, a.round).cmp(&(&b.target_id, b.round)));
    (manifest, rows.iter().map(Record::without_timings).collect())
}

#[test]
fn sigkill_at_six_moments_then_resume_gives_each_target_round_once() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    make_corpus(&corpus);
    let config = write_config(tmp.path(), &corpus);

    // the reference: one uninterrupted cluster run
    let reference = tmp.path().join("reference");
    let c = start(&config, &reference, None, tmp.path());
    let codes = c.finish();
    assert!(codes.iter().all(|c| *c == Some(0)), "{codes:?}");
    let (_, expected) = read_all(&reference);

    let out = tmp.path().join("crashed");
    let seed = std::env::var("MIRGEN_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261122u64);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    eprintln!("crash test seed {seed} (set MIRGEN_CRASH_SEED to replay)");
    let moments: [(&str, Option<&str>); 6] = [
        ("random time", None),
        ("part written, commit record not", Some("part-written")),
        ("random time", None),
        ("right after a commit record", Some("commit-written")),
        ("finalize: first data file written", Some("finalize-data")),
        (
            "finalize: card written, manifest not",
            Some("finalize-card"),
        ),
    ];
    for (what, pause) in moments {
        // a random process at random times; the named points are where they happen
        // process 0 finalizes; commits happen in either process
        let pause = pause.map(|point| {
            let p = if point.starts_with("finalize") {
                0
            } else {
                rng.random_range(0..2)
            };
            (point, p)
        });
        let mut c = start(&config, &out, pause, tmp.path());
        let victim = match pause {
            Some((point, p)) => {
                let at = c.wait_for(&format!("paused at {point}"), Duration::from_secs(60));
                assert_eq!(at, Some(p), "never reached {point}:\n{}", c.log.join("\n"));
                p
            }
            None => {
                // ready, then a random delay into the rounds
                c.wait_for("device", Duration::from_secs(60));
                let ms = rng.random_range(100..700);
                std::thread::sleep(Duration::from_millis(ms));
                rng.random_range(0..2)
            }
        };
        let other = c.kill_one(victim);
        eprintln!("killed process {victim} at {what}; its peer ended with {other:?}");
        if !what.starts_with("finalize") {
            assert_eq!(
                other,
                Some(3),
                "the peer of a killed process must stop with the peer-lost status, not hang:\n{}",
                c.log.join("\n")
            );
        }
        assert!(
            !out.join("manifest.json").exists() || what.contains("random"),
            "a dataset killed before its manifest must not look finished"
        );
        if pause.is_some_and(|(point, _)| point == "finalize-data") {
            // killed mid-finalize: some data files, no card yet
            let files = std::fs::read_dir(out.join("data")).unwrap().count();
            assert!(
                files >= 1 && !out.join("README.md").exists(),
                "finalize-data is after the first data file, before the card"
            );
        }
    }
    // the same command again completes the dataset
    let c = start(&config, &out, None, tmp.path());
    let codes = c.finish();
    assert!(
        codes.iter().all(|c| *c == Some(0)),
        "final rerun failed: {codes:?}"
    );
    let (_, rows) = read_all(&out);
    assert_eq!(
        rows, expected,
        "resumed records differ from the uninterrupted run"
    );
}
