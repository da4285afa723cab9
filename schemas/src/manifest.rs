//! The run manifest (written last: its presence means the dataset is complete)
//! and the per-part commit records of the commit protocol.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Written with create-if-absent after a part's data file: a part without a
/// commit record is an orphan of a crash and is never read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartCommit {
    /// Hash of the result-affecting configuration the part was made with.
    pub config_hash: String,
    /// Object key of the part's Parquet file, relative to the output root.
    pub part: String,
    /// Target ids whose every round is in the part.
    pub target_ids: Vec<String>,
    pub rows: usize,
    /// Timely worker that wrote it (global index) — informational.
    pub worker: usize,
}

/// Counts and timings of a run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunStats {
    pub targets: usize,
    pub rows: usize,
    pub failed_rows: usize,
    pub failed_targets: usize,
    pub corpus_size: usize,
    /// Corpus files that could not be decoded (id -> reason); they are not in the index.
    pub corpus_failures: BTreeMap<String, String>,
    /// Cumulative Hits@10 (% of targets with a hit at a round <= t), index = round.
    pub cumulative_hits_at_10: Vec<f64>,
    /// Per-round Hits@10 (% of targets with a hit at round t).
    pub per_round_hits_at_10: Vec<f64>,
    /// Cumulative Hits@1 and Hits@5 per round (percent).
    #[serde(default)]
    pub cumulative_hits_at_1: Vec<f64>,
    #[serde(default)]
    pub cumulative_hits_at_5: Vec<f64>,
    /// Bytes of the data files (Parquet, compressed).
    #[serde(default)]
    pub data_bytes: u64,
    /// Seconds of this invocation's work (a resumed run counts only the new part).
    pub wall_seconds: f64,
}

/// Description of a finished dataset: what made it and what it holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub mirgen_version: String,
    pub config_hash: String,
    /// The resolved configuration (TOML, as parsed).
    pub config: serde_json::Value,
    /// Role -> model description (kind, id/revision or preset, smoke-test flag).
    pub models: BTreeMap<String, serde_json::Value>,
    pub seed: u64,
    pub rounds: u32,
    /// Data files relative to the dataset root, in order.
    pub data_files: Vec<String>,
    pub stats: RunStats,
    pub created_unix: u64,
}

pub const MANIFEST_FORMAT: &str = "mirgen-manifest/1";
