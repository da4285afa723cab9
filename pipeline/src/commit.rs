//! The output layout and its commit protocol.
//!
//! ```text
//! <output>/.mirgen/run.json              which config this output belongs to (create-if-absent)
//! <output>/.mirgen/parts/<id>.parquet    a wave's rows (data first)
//! <output>/.mirgen/commits/<id>.json     its commit record (create-if-absent, after the data)
//! <output>/.mirgen/index/…               cached corpus index
//! <output>/data/train-XXXXX-of-YYYYY.parquet, README.md, stats.json
//! <output>/manifest.json                 written last: the dataset is complete
//! ```
//! Readers and resumes trust only committed parts; a part without a commit
//! record (a crash between the two writes) is never read and is overwritten
//! when its targets are redone.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use mirgen_schemas::{
    card::{render_card, CardInput},
    manifest::MANIFEST_FORMAT,
    record::writer_properties,
    record_schema, records_from_parquet, records_to_batch, records_to_parquet, Manifest,
    PartCommit, Record, RecordStatus, RunStats,
};
use parquet::arrow::ArrowWriter;
use sha2::{Digest, Sha256};

use crate::store::Location;
use crate::PipelineError;

pub const STAGING: &str = ".mirgen";
pub const MANIFEST: &str = "manifest.json";

#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
struct RunMarker {
    config_hash: String,
    mirgen_version: String,
}

pub struct Output {
    pub loc: Location,
}

impl Output {
    pub fn new(loc: Location) -> Self {
        Output { loc }
    }

    /// The manifest of a finished dataset, if any.
    pub async fn manifest(&self) -> Result<Option<Manifest>, PipelineError> {
        match self.loc.get_opt(MANIFEST).await? {
            Some(b) => Ok(Some(serde_json::from_slice(&b)?)),
            None => Ok(None),
        }
    }

    /// Binds the output to `config_hash`, or checks it is already bound to it.
    pub async fn claim(&self, config_hash: &str) -> Result<(), PipelineError> {
        let key = format!("{STAGING}/run.json");
        let marker = RunMarker {
            config_hash: config_hash.into(),
            mirgen_version: env!("CARGO_PKG_VERSION").into(),
        };
        if !self
            .loc
            .put_create(&key, serde_json::to_vec_pretty(&marker)?)
            .await?
        {
            let existing: RunMarker = serde_json::from_slice(&self.loc.get(&key).await?)?;
            if existing.config_hash != config_hash {
                return Err(PipelineError::ConfigChanged {
                    output: self.loc.display.clone(),
                    existing: existing.config_hash,
                    current: config_hash.into(),
                });
            }
        }
        Ok(())
    }

    /// Committed targets -> the part holding them (one shared record per part).
    pub async fn committed(
        &self,
        config_hash: &str,
    ) -> Result<BTreeMap<String, std::sync::Arc<PartCommit>>, PipelineError> {
        let mut out = BTreeMap::new();
        for (key, _) in self.loc.list(&format!("{STAGING}/commits")).await? {
            if !key.ends_with(".json") {
                continue;
            }
            let commit: PartCommit =
                serde_json::from_slice(&self.loc.get(&key).await?).map_err(|e| {
                    PipelineError::Input(format!(
                        "commit record {key} is unreadable ({e}); delete it and rerun"
                    ))
                })?;
            if commit.config_hash != config_hash {
                continue;
            }
            let commit = std::sync::Arc::new(commit);
            for t in &commit.target_ids {
                out.entry(t.clone()).or_insert_with(|| commit.clone());
            }
        }
        Ok(out)
    }

    /// Writes a wave's rows, then its commit record.
    pub async fn commit_part(
        &self,
        config_hash: &str,
        worker: usize,
        records: &[Record],
        row_group_rows: usize,
    ) -> Result<PartCommit, PipelineError> {
        let targets: BTreeSet<&str> = records.iter().map(|r| r.target_id.as_str()).collect();
        let mut h = Sha256::new();
        h.update(config_hash.as_bytes());
        for t in &targets {
            h.update(t.as_bytes());
            h.update([0]);
        }
        let id = hex::encode(&h.finalize()[..12]);
        let part = format!("{STAGING}/parts/{id}.parquet");
        self.loc
            .put(&part, records_to_parquet(records, row_group_rows)?)
            .await?;
        crate::failpoint::pause("part-written");
        let commit = PartCommit {
            config_hash: config_hash.into(),
            part,
            target_ids: targets.iter().map(|t| t.to_string()).collect(),
            rows: records.len(),
            worker,
        };
        self.loc
            .put_create(
                &format!("{STAGING}/commits/{id}.json"),
                serde_json::to_vec_pretty(&commit)?,
            )
            .await?;
        crate::failpoint::pause("commit-written");
        Ok(commit)
    }

    /// Reads every committed row of `targets`, sorted by (target, round).
    pub async fn committed_records(
        &self,
        config_hash: &str,
        targets: &[String],
    ) -> Result<Vec<Record>, PipelineError> {
        let committed = self.committed(config_hash).await?;
        let wanted: BTreeSet<&String> = targets.iter().collect();
        let parts: BTreeSet<&String> = committed
            .iter()
            .filter(|(t, _)| wanted.contains(t))
            .map(|(_, c)| &c.part)
            .collect();
        let mut rows = Vec::new();
        for part in parts {
            let data: Bytes = self.loc.get(part).await?;
            for r in records_from_parquet(data)? {
                // a target is taken from the part its commit names (never from an orphan)
                if wanted.contains(&r.target_id)
                    && committed.get(&r.target_id).is_some_and(|c| &c.part == part)
                {
                    rows.push(r);
                }
            }
        }
        rows.sort_by(|a, b| (&a.target_id, a.round).cmp(&(&b.target_id, b.round)));
        Ok(rows)
    }
}

/// Cumulative and per-round Hits@10 (ChatIR's definition, every target in
/// the denominator; a failed row is a miss).
pub fn hits_at_10(rows: &[Record]) -> (Vec<f64>, Vec<f64>) {
    let mut report = crate::eval::evaluate("", &rank_rows(rows), &[10]);
    (
        report.cumulative.remove(&10).unwrap_or_default(),
        report.per_round.remove(&10).unwrap_or_default(),
    )
}

/// The ranks of records, for evaluation.
pub fn rank_rows(rows: &[Record]) -> Vec<crate::eval::RankRow> {
    rows.iter()
        .map(|r| crate::eval::RankRow {
            target_id: r.target_id.clone(),
            round: r.round,
            rank: r.target_rank,
        })
        .collect()
}

/// Reads a finished dataset (manifest + data files) from a folder or URL.
pub async fn read_dataset(loc: &Location) -> Result<(Manifest, Vec<Record>), PipelineError> {
    let manifest: Manifest = match loc.get_opt(MANIFEST).await? {
        Some(b) => serde_json::from_slice(&b)?,
        None => {
            return Err(PipelineError::Input(format!(
            "{} has no {MANIFEST}: not a finished mirgen dataset (rerun `mirgen run` to finish it)",
            loc.display
        )))
        }
    };
    let mut rows = Vec::new();
    for f in &manifest.data_files {
        rows.extend(records_from_parquet(loc.get(f).await?)?);
    }
    Ok((manifest, rows))
}

/// The stats of `finalize`, counted while the rows stream past: the same
/// numbers as [`crate::eval::evaluate`] (ChatIR's definition, every target in
/// the denominator, a failed row is a miss) with memory per round, not per
/// row. A target's rows must arrive together (they do: each target has one
/// home part, read sorted by (target, round)).
struct HitCounts {
    rounds: usize,
    /// Targets whose first hit at K = 1, 5, 10 came at round <= t.
    cumulative: [Vec<usize>; 3],
    /// Targets with a hit at K = 10 at round t.
    per_round_10: Vec<usize>,
    targets: usize,
    failed_rows: usize,
    failed_targets: usize,
    current: Option<(String, Vec<Option<i64>>, bool)>,
}

impl HitCounts {
    const KS: [i64; 3] = [1, 5, 10];

    fn new(rounds: usize) -> Self {
        HitCounts {
            rounds,
            cumulative: std::array::from_fn(|_| vec![0; rounds]),
            per_round_10: vec![0; rounds],
            targets: 0,
            failed_rows: 0,
            failed_targets: 0,
            current: None,
        }
    }

    fn add(&mut self, r: &Record) {
        if self
            .current
            .as_ref()
            .is_none_or(|(t, _, _)| *t != r.target_id)
        {
            self.end_target();
            self.current = Some((r.target_id.clone(), vec![None; self.rounds], false));
        }
        let (_, ranks, failed) = self.current.as_mut().expect("set above");
        if let Some(slot) = usize::try_from(r.round).ok().and_then(|t| ranks.get_mut(t)) {
            *slot = r.target_rank;
        }
        if r.status == RecordStatus::Failed {
            self.failed_rows += 1;
            *failed = true;
        }
    }

    fn end_target(&mut self) {
        let Some((_, ranks, failed)) = self.current.take() else {
            return;
        };
        self.targets += 1;
        self.failed_targets += usize::from(failed);
        for (counts, k) in self.cumulative.iter_mut().zip(Self::KS) {
            if let Some(first) = ranks.iter().position(|r| r.is_some_and(|r| r < k)) {
                counts[first..].iter_mut().for_each(|c| *c += 1);
            }
        }
        for (c, r) in self.per_round_10.iter_mut().zip(&ranks) {
            *c += usize::from(r.is_some_and(|r| r < 10));
        }
    }

    fn percent(&self, counts: &[usize]) -> Vec<f64> {
        if self.targets == 0 {
            return vec![];
        }
        let n = self.targets as f64;
        counts.iter().map(|&c| 100.0 * c as f64 / n).collect()
    }
}

/// A data file being encoded: rows are encoded one row group at a time, so
/// only the encoded file and one row group of records are in memory.
struct DataFile {
    writer: ArrowWriter<Vec<u8>>,
    pending: Vec<Record>,
    row_group_rows: usize,
    rows: usize,
}

impl DataFile {
    fn new(row_group_rows: usize) -> Result<Self, PipelineError> {
        let row_group_rows = row_group_rows.max(1);
        Ok(DataFile {
            writer: ArrowWriter::try_new(
                Vec::new(),
                record_schema(),
                Some(writer_properties(row_group_rows)),
            )?,
            pending: Vec::with_capacity(row_group_rows),
            row_group_rows,
            rows: 0,
        })
    }

    fn push(&mut self, r: Record) -> Result<(), PipelineError> {
        self.pending.push(r);
        self.rows += 1;
        if self.pending.len() >= self.row_group_rows {
            self.write_pending()?;
        }
        Ok(())
    }

    fn write_pending(&mut self) -> Result<(), PipelineError> {
        if !self.pending.is_empty() {
            self.writer.write(&records_to_batch(&self.pending)?)?;
            self.pending.clear();
        }
        Ok(())
    }

    /// The complete Parquet file.
    fn finish(mut self) -> Result<Vec<u8>, PipelineError> {
        self.write_pending()?;
        Ok(self.writer.into_inner()?)
    }
}

/// Everything `finalize` writes besides the rows.
pub struct FinalizeInput<'a> {
    pub config_hash: &'a str,
    pub config: serde_json::Value,
    pub models: BTreeMap<String, serde_json::Value>,
    pub seed: u64,
    pub rounds: u32,
    pub shard_rows: usize,
    pub row_group_rows: usize,
    pub corpus_size: usize,
    pub corpus_failures: BTreeMap<String, String>,
    pub pretty_name: &'a str,
    pub license: &'a str,
    pub corpus_note: &'a str,
    pub smoke_test: bool,
    pub prompts: Vec<(String, String)>,
    pub wall_seconds: f64,
}

/// Writes the Hugging Face layout from the committed parts of `targets`,
/// streaming: one part, one data file (encoded) and one row group of records
/// are in memory at a time, and the stats are counted as the rows pass (per
/// round, not per row). Parts are read in key order. Data files are written first,
/// then README.md and stats.json, and manifest.json last. Fails if a target
/// is not committed.
pub async fn finalize(
    out: &Output,
    targets: &[String],
    rounds_per_target: usize,
    input: FinalizeInput<'_>,
) -> Result<Manifest, PipelineError> {
    let committed = out.committed(input.config_hash).await?;
    let missing = targets
        .iter()
        .filter(|t| !committed.contains_key(*t))
        .count();
    if missing > 0 {
        return Err(PipelineError::Incomplete(format!(
            "{} of {} targets are committed (other processes may still be running); rerun the same command to finish",
            targets.len() - missing,
            targets.len()
        )));
    }
    // part -> the targets it is the committed home of
    let mut parts: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for t in targets {
        parts
            .entry(committed[t].part.as_str())
            .or_default()
            .insert(t.as_str());
    }
    let total_rows = targets.len() * rounds_per_target;
    let n_shards = total_rows.div_ceil(input.shard_rows).max(1);
    let mut data_files = Vec::with_capacity(n_shards);
    let mut data_bytes = 0u64;
    let mut file: Option<DataFile> = None;
    let mut hits = HitCounts::new(rounds_per_target);
    let mut rows_seen = 0usize;
    // puts a finished data file under the next shard name
    let put_next = |bytes: Vec<u8>, data_files: &mut Vec<String>| {
        let i = data_files.len();
        let key = format!("data/train-{i:05}-of-{n_shards:05}.parquet");
        data_files.push(key.clone());
        async move {
            let len = bytes.len() as u64;
            out.loc.put(&key, bytes).await?;
            crate::failpoint::pause("finalize-data");
            Ok::<u64, PipelineError>(len)
        }
    };
    for (part, wanted) in &parts {
        let mut rows: Vec<Record> = records_from_parquet(out.loc.get(part).await?)?
            .into_iter()
            .filter(|r| wanted.contains(r.target_id.as_str()))
            .collect();
        rows.sort_by(|a, b| (&a.target_id, a.round).cmp(&(&b.target_id, b.round)));
        for r in rows {
            rows_seen += 1;
            hits.add(&r);
            let f = match &mut file {
                Some(f) => f,
                None => file.insert(DataFile::new(input.row_group_rows)?),
            };
            f.push(r)?;
            if f.rows == input.shard_rows && data_files.len() + 1 < n_shards {
                let bytes = file.take().expect("a file is open").finish()?;
                data_bytes += put_next(bytes, &mut data_files).await?;
            }
        }
    }
    if rows_seen != total_rows {
        return Err(PipelineError::Input(format!(
            "the committed parts hold {rows_seen} rows for {} targets x {rounds_per_target} rounds; \
             delete {STAGING}/commits and rerun to redo them",
            targets.len()
        )));
    }
    let last = match file {
        Some(f) => f,
        None => DataFile::new(input.row_group_rows)?,
    };
    data_bytes += put_next(last.finish()?, &mut data_files).await?;
    for (key, _) in out.loc.list("data").await? {
        if !data_files.contains(&key) {
            out.loc.delete(&key).await?;
        }
    }
    hits.end_target();
    let stats = RunStats {
        targets: targets.len(),
        rows: rows_seen,
        failed_rows: hits.failed_rows,
        failed_targets: hits.failed_targets,
        corpus_size: input.corpus_size,
        corpus_failures: input.corpus_failures,
        cumulative_hits_at_10: hits.percent(&hits.cumulative[2]),
        per_round_hits_at_10: hits.percent(&hits.per_round_10),
        cumulative_hits_at_1: hits.percent(&hits.cumulative[0]),
        cumulative_hits_at_5: hits.percent(&hits.cumulative[1]),
        data_bytes,
        wall_seconds: input.wall_seconds,
    };
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        mirgen_version: env!("CARGO_PKG_VERSION").into(),
        config_hash: input.config_hash.into(),
        config: input.config,
        models: input.models,
        seed: input.seed,
        rounds: input.rounds,
        data_files,
        stats,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    let card = render_card(&CardInput {
        manifest: &manifest,
        pretty_name: input.pretty_name,
        license: input.license,
        corpus_note: input.corpus_note,
        smoke_test: input.smoke_test,
        prompts: &input.prompts,
    });
    out.loc.put("README.md", card.into_bytes()).await?;
    out.loc
        .put("stats.json", serde_json::to_vec_pretty(&manifest.stats)?)
        .await?;
    crate::failpoint::pause("finalize-card");
    out.loc
        .put(MANIFEST, serde_json::to_vec_pretty(&manifest)?)
        .await?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(t: &str, round: i32, hit: bool) -> Record {
        let mut r = Record::failed(t, round, 0, String::new());
        r.status = RecordStatus::Ok;
        r.error = None;
        r.hit_at_10 = Some(hit);
        r.target_rank = Some(if hit { 3 } else { 30 });
        r
    }

    #[test]
    fn hits_are_cumulative_over_first_hits() {
        // a: hit at 1 only; b: hit at 0 and 2; c: never
        let rows = vec![
            row("a", 0, false),
            row("a", 1, true),
            row("a", 2, false),
            row("b", 0, true),
            row("b", 1, false),
            row("b", 2, true),
            row("c", 0, false),
            row("c", 1, false),
            row("c", 2, false),
        ];
        let (cum, per) = hits_at_10(&rows);
        let third = 100.0 / 3.0;
        assert_eq!(cum, vec![third, 2.0 * third, 2.0 * third]);
        assert_eq!(per, vec![third, third, third]);
    }

    #[test]
    fn streamed_hit_counts_equal_evaluate() {
        // 7 targets x 4 rounds, ranks spread over 0..40, some failed rows
        let mut rows = Vec::new();
        for t in 0..7 {
            for round in 0..4 {
                let mut r = row(&format!("t{t}"), round, false);
                let x = (t * 13 + round * 7) % 40;
                r.target_rank = Some(x as i64);
                if (t + round) % 5 == 0 {
                    r = Record::failed(&format!("t{t}"), round, 0, "boom".into());
                }
                rows.push(r);
            }
        }
        let mut hits = HitCounts::new(4);
        rows.iter().for_each(|r| hits.add(r));
        hits.end_target();
        let ranks = rank_rows(&rows);
        let mut k = crate::eval::evaluate("", &ranks, &[1, 5, 10]);
        assert_eq!(
            hits.percent(&hits.cumulative[0]),
            k.cumulative.remove(&1).unwrap()
        );
        assert_eq!(
            hits.percent(&hits.cumulative[1]),
            k.cumulative.remove(&5).unwrap()
        );
        assert_eq!(
            hits.percent(&hits.cumulative[2]),
            k.cumulative.remove(&10).unwrap()
        );
        assert_eq!(
            hits.percent(&hits.per_round_10),
            k.per_round.remove(&10).unwrap()
        );
        let failed = rows.iter().filter(|r| r.status == RecordStatus::Failed);
        assert_eq!(hits.failed_rows, failed.clone().count());
        let mut ft: Vec<_> = failed.map(|r| &r.target_id).collect();
        ft.dedup();
        assert_eq!((hits.targets, hits.failed_targets), (7, ft.len()));
    }
}
