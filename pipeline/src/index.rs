//! The corpus index: one unit vector per decodable corpus image, built once
//! per (embedder, preprocessing, corpus listing) and cached in the output
//! store; exact top-K search by inner product.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{
    Array, Float32Array, Float32Builder, ListArray, ListBuilder, RecordBatch, StringArray,
};
use arrow::datatypes::{DataType, Field, Schema};
use mirgen_workers::{image_io::decode_rgb, Embedder};
use parquet::arrow::{arrow_reader::ParquetRecordBatchReaderBuilder, ArrowWriter};
use sha2::{Digest, Sha256};

use crate::corpus::Corpus;
use crate::search::gemm_nt;
use crate::store::Location;
use crate::PipelineError;

/// The inner product every search uses (one summation order everywhere, so
/// a sharded search scores exactly as a replicated one).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Similarity of two embeddings made of `unit`-float vectors: the inner
/// product for single vectors, else the maximum inner product over all
/// pairs of their vectors (BLIP-2: an image is one vector per query token;
/// text to image is the max over the image's queries, as in
/// `Blip2ForImageTextRetrieval`, and image to image the max over pairs).
pub fn similarity(a: &[f32], b: &[f32], unit: usize) -> f32 {
    if a.len() == b.len() && (a.len() == unit || unit == 0) {
        return dot(a, b);
    }
    let unit = unit.max(1);
    let mut best = f32::NEG_INFINITY;
    for x in a.chunks_exact(unit) {
        for y in b.chunks_exact(unit) {
            best = best.max(dot(x, y));
        }
    }
    best
}

/// A query to [`exact_search`]: its vector(s) and, when its target is
/// indexed, the target's exact similarity and corpus position.
#[derive(Clone, Copy, Debug)]
pub struct RowQuery<'a> {
    pub vector: &'a [f32],
    pub target: Option<(f32, u64)>,
}

/// Floats of GEMM scores computed at once (4 MiB per searching worker).
const SCORE_BLOCK: usize = 1 << 20;

/// Largest vector norm of `v` split into `unit`-float vectors.
pub fn max_norm(v: &[f32], unit: usize) -> f32 {
    v.chunks(unit.max(1))
        .map(|x| dot(x, x).sqrt())
        .fold(0.0, f32::max)
}

/// Exact top-K and target rank over `rows` (`row_len` floats each, made of
/// `unit`-float vectors, scored with [`similarity`]) for a batch of queries.
///
/// The bulk of the work is one GEMM per block of rows for all queries
/// together; GEMM sums in another order than [`dot`], so every score that
/// could change the answer (near the k-th best, near the target's score) is
/// recomputed with [`similarity`]. Results are therefore identical to
/// scoring every row with [`similarity`] (what a sharded index does on each
/// shard), at GEMM speed. The rounding bound: two f32 sums of the same `d`
/// products differ by at most `2 d u |x| |y|` (u = 2^-24); `rows_max_norm`
/// bounds `|y|`.
///
/// Returns per query its best `top_k` as (row index, score), best first
/// (ties to the lower position), and how many rows rank above its target.
pub fn exact_search(
    rows: &[f32],
    row_len: usize,
    unit: usize,
    rows_max_norm: f32,
    position: &dyn Fn(usize) -> u64,
    queries: &[RowQuery<'_>],
    top_k: usize,
) -> Vec<(Vec<(usize, f32)>, u64)> {
    exact_search_blocked(
        rows,
        row_len,
        unit,
        rows_max_norm,
        position,
        queries,
        top_k,
        SCORE_BLOCK,
    )
}

#[allow(clippy::too_many_arguments)]
fn exact_search_blocked(
    rows: &[f32],
    row_len: usize,
    unit: usize,
    rows_max_norm: f32,
    position: &dyn Fn(usize) -> u64,
    queries: &[RowQuery<'_>],
    top_k: usize,
    block_floats: usize,
) -> Vec<(Vec<(usize, f32)>, u64)> {
    let unit = unit.max(1);
    let row_len = row_len.max(unit);
    let n = rows.len() / row_len;
    let per_row = row_len / unit;
    let mut answers = vec![(Vec::new(), 0u64); queries.len()];
    // queries of one length share a GEMM (a wave's queries all have one)
    let mut by_len: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, q) in queries.iter().enumerate() {
        by_len.entry(q.vector.len()).or_default().push(i);
    }
    for (len, group) in by_len {
        let qv = (len / unit).max(1);
        if len == 0 || !len.is_multiple_of(unit) || n == 0 {
            // a malformed query scores nothing; an empty index finds nothing
            continue;
        }
        let lhs: Vec<f32> = group
            .iter()
            .flat_map(|&i| queries[i].vector.iter().copied())
            .collect();
        let m = group.len() * qv;
        // approximate scores: (queries in group) x n, max over vector pairs
        let mut approx = vec![f32::NEG_INFINITY; group.len() * n];
        let block = (block_floats / (m * per_row)).clamp(1, n);
        let mut tmp = vec![0f32; m * block * per_row];
        let mut start = 0;
        while start < n {
            let b = block.min(n - start);
            let cols = b * per_row;
            gemm_nt(
                m,
                cols,
                unit,
                &lhs,
                &rows[start * row_len..(start + b) * row_len],
                &mut tmp,
            );
            for (gi, out) in approx.chunks_mut(n).enumerate() {
                for v in 0..qv {
                    let line = &tmp[(gi * qv + v) * cols..(gi * qv + v + 1) * cols];
                    for (r, chunk) in line.chunks(per_row).enumerate() {
                        let best = chunk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        let slot = &mut out[start + r];
                        *slot = slot.max(best);
                    }
                }
            }
            start += b;
        }
        for (gi, &qi) in group.iter().enumerate() {
            let q = queries[qi];
            let a = &approx[gi * n..(gi + 1) * n];
            let eps = 4.0
                * unit as f32
                * f32::EPSILON
                * max_norm(q.vector, unit)
                * rows_max_norm.max(f32::MIN_POSITIVE)
                + f32::MIN_POSITIVE;
            let exact =
                |r: usize| similarity(&rows[r * row_len..(r + 1) * row_len], q.vector, unit);
            // top-k: every true top-k row has approx >= (k-th best approx) - 2 eps
            let k = top_k.min(n);
            let candidates: Vec<usize> = if k == 0 {
                vec![]
            } else if k == n || a.iter().any(|x| x.is_nan()) {
                (0..n).collect()
            } else {
                let mut vals = a.to_vec();
                let (_, kth, _) = vals.select_nth_unstable_by(k - 1, |x, y| y.total_cmp(x));
                let cut = *kth - 2.0 * eps;
                (0..n).filter(|&r| a[r] >= cut).collect()
            };
            let mut top: Vec<(usize, f32)> =
                candidates.into_iter().map(|r| (r, exact(r))).collect();
            top.sort_by(|x, y| y.1.total_cmp(&x.1).then(position(x.0).cmp(&position(y.0))));
            top.truncate(k);
            // rows above the target: decided by approx unless within eps of its score
            let better = match q.target {
                Some((ts, tp)) => (0..n)
                    .filter(|&r| {
                        if a[r] > ts + eps {
                            true
                        } else if a[r] < ts - eps {
                            false
                        } else {
                            let s = exact(r);
                            s > ts || (s == ts && position(r) < tp)
                        }
                    })
                    .count() as u64,
                None => 0,
            };
            answers[qi] = (top, better);
        }
    }
    answers
}

pub struct CorpusIndex {
    pub ids: Vec<String>,
    /// Floats per image (`unit` x vectors per image).
    pub dim: usize,
    /// Floats per vector (see [`similarity`]); equals `dim` for
    /// single-vector encoders.
    pub unit: usize,
    /// Row-major `ids.len() x dim`.
    pub vectors: Vec<f32>,
    /// Corpus images that could not be decoded (id -> reason); not indexed.
    pub failures: BTreeMap<String, String>,
    position: HashMap<String, usize>,
    /// Largest vector norm (the rounding bound of [`exact_search`]).
    max_norm: f32,
}

/// Result of one query.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchResult {
    pub ids: Vec<String>,
    pub scores: Vec<f32>,
    /// 0-based rank of the target among all indexed images (`None` if not indexed).
    pub target_rank: Option<i64>,
}

impl CorpusIndex {
    pub fn new(
        ids: Vec<String>,
        dim: usize,
        vectors: Vec<f32>,
        failures: BTreeMap<String, String>,
    ) -> Self {
        let position = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), i))
            .collect();
        let max_norm = max_norm(&vectors, dim);
        CorpusIndex {
            ids,
            dim,
            unit: dim,
            vectors,
            failures,
            position,
            max_norm,
        }
    }

    /// Marks each image's `dim` floats as vectors of `unit` floats
    /// (multi-vector encoders such as BLIP-2).
    pub fn with_unit(mut self, unit: usize) -> Self {
        self.unit = unit.max(1);
        self.max_norm = max_norm(&self.vectors, self.unit);
        self
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.position.contains_key(id)
    }

    /// Inner product of `query` with every indexed vector, in corpus order.
    pub fn scores(&self, query: &[f32]) -> Vec<f32> {
        self.vectors
            .chunks_exact(self.dim)
            .map(|row| similarity(row, query, self.unit))
            .collect()
    }

    /// The vector of an indexed image.
    pub fn vector(&self, id: &str) -> Option<&[f32]> {
        let &i = self.position.get(id)?;
        Some(&self.vectors[i * self.dim..(i + 1) * self.dim])
    }

    /// 0-based rank of `target` under `scores` (ties broken by corpus order).
    pub fn rank_of(&self, scores: &[f32], target: &str) -> Option<i64> {
        let &ti = self.position.get(target)?;
        let ts = scores[ti];
        Some(
            scores
                .iter()
                .enumerate()
                .filter(|&(i, &s)| s > ts || (s == ts && i < ti))
                .count() as i64,
        )
    }

    /// Exact search: the best `top_k` indexed images (ties broken by corpus
    /// order) and the rank of `target`; see [`Self::search_batch`].
    pub fn search(&self, query: &[f32], top_k: usize, target: Option<&str>) -> SearchResult {
        self.search_batch(&[(target, query)], top_k).remove(0)
    }

    /// [`Self::search`] for several (target, query) pairs at once: one GEMM
    /// pass over the index for all of them ([`exact_search`]), with exactly
    /// the answers of scoring every image with [`similarity`].
    pub fn search_batch(
        &self,
        queries: &[(Option<&str>, &[f32])],
        top_k: usize,
    ) -> Vec<SearchResult> {
        let row_queries: Vec<RowQuery<'_>> = queries
            .iter()
            .map(|&(target, vector)| RowQuery {
                vector,
                target: target.and_then(|t| self.position.get(t)).map(|&ti| {
                    let row = &self.vectors[ti * self.dim..(ti + 1) * self.dim];
                    (similarity(row, vector, self.unit), ti as u64)
                }),
            })
            .collect();
        exact_search(
            &self.vectors,
            self.dim,
            self.unit,
            self.max_norm,
            &|r| r as u64,
            &row_queries,
            top_k,
        )
        .into_iter()
        .zip(&row_queries)
        .map(|((top, better), q)| SearchResult {
            ids: top.iter().map(|&(r, _)| self.ids[r].clone()).collect(),
            scores: top.iter().map(|&(_, s)| s).collect(),
            target_rank: q.target.map(|_| better as i64),
        })
        .collect()
    }

    /// Cache key: the embedder's fingerprint and the corpus listing.
    pub fn cache_key(embedder_fingerprint: &str, corpus: &Corpus) -> String {
        let mut h = Sha256::new();
        h.update(embedder_fingerprint.as_bytes());
        for (id, size) in corpus.ids.iter().zip(&corpus.sizes) {
            h.update(id.as_bytes());
            h.update([0]);
            h.update(size.unwrap_or(u64::MAX).to_le_bytes());
        }
        hex::encode(&h.finalize()[..12])
    }

    /// Loads a complete cached index (all chunks) into memory.
    pub async fn load(cache: &Location, key: &str) -> Result<Option<Self>, PipelineError> {
        let Some(meta) = IndexMeta::load(cache, key).await? else {
            return Ok(None);
        };
        let (mut ids, mut vectors) = (Vec::new(), Vec::new());
        for c in 0..meta.chunks {
            read_chunk(cache, key, c, |_, id, v| {
                ids.push(id.to_string());
                vectors.extend_from_slice(v);
            })
            .await?;
        }
        let failures = meta.failures(cache).await?;
        Ok(Some(
            CorpusIndex::new(ids, meta.row_len(), vectors, failures).with_unit(meta.dim),
        ))
    }

    /// Loads the cached index for this embedder and corpus, or builds it here
    /// (resuming from chunks already written) and caches it.
    /// Returns the index and whether it was reused.
    pub async fn load_or_build(
        cache: &Location,
        corpus: &Corpus,
        embedder: &mut dyn Embedder,
        batch_size: usize,
        on_progress: impl FnMut(usize, usize),
    ) -> Result<(Self, bool), PipelineError> {
        let key = Self::cache_key(&embedder.info().fingerprint, corpus);
        if let Some(index) = Self::load(cache, &key).await? {
            return Ok((index, true));
        }
        build_chunks(
            cache,
            &key,
            corpus,
            embedder,
            batch_size,
            &|_| true,
            on_progress,
        )
        .await?;
        finish_index(
            cache,
            &key,
            corpus,
            &embedder.info(),
            IndexShape::of(embedder),
        )
        .await?;
        let index = Self::load(cache, &key).await?.ok_or_else(|| {
            PipelineError::Input(format!("index {key} vanished while it was written"))
        })?;
        Ok((index, false))
    }
}

/// Corpus positions per index chunk (one Parquet file each, written by one
/// worker; the unit of resume).
pub const INDEX_CHUNK: usize = 4096;

/// `index/<key>/index.json`: written last, once every chunk exists.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IndexMeta {
    pub format: String,
    pub key: String,
    /// The encoder: architecture, source (preset, folder or hub id@revision)
    /// and the fingerprint of its weights and preprocessing.
    pub encoder: mirgen_workers::ModelInfo,
    /// Floats per vector.
    pub dim: usize,
    /// Vectors per image (1, or BLIP-2's query tokens; see [`similarity`]).
    #[serde(default = "one")]
    pub vectors_per_image: usize,
    /// The encoder's image preprocessing (resize, crop, mean/std).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preprocessing: Option<serde_json::Value>,
    /// Corpus images listed, indexed, and unreadable.
    pub corpus_size: usize,
    pub indexed: usize,
    pub failed: usize,
    pub chunk_size: usize,
    pub chunks: usize,
    pub created_unix: u64,
}

const INDEX_FORMAT: &str = "mirgen-index/1";

fn one() -> usize {
    1
}

fn chunk_key(key: &str, c: usize) -> String {
    format!("index/{key}/chunk-{c:05}.parquet")
}

fn chunk_failures_key(key: &str, c: usize) -> String {
    format!("index/{key}/chunk-{c:05}.failures.json")
}

fn meta_key(key: &str) -> String {
    format!("index/{key}/index.json")
}

impl IndexMeta {
    /// Floats per indexed image.
    pub fn row_len(&self) -> usize {
        self.dim * self.vectors_per_image.max(1)
    }

    pub async fn load(cache: &Location, key: &str) -> Result<Option<Self>, PipelineError> {
        match cache.get_opt(&meta_key(key)).await? {
            Some(b) => Ok(Some(serde_json::from_slice(&b).map_err(|e| {
                PipelineError::Input(format!(
                    "index metadata {} is unreadable ({e}); delete the index folder to rebuild",
                    meta_key(key)
                ))
            })?)),
            None => Ok(None),
        }
    }

    /// Every unreadable corpus image (id -> reason).
    pub async fn failures(
        &self,
        cache: &Location,
    ) -> Result<BTreeMap<String, String>, PipelineError> {
        let mut all = BTreeMap::new();
        for c in 0..self.chunks {
            if let Some(b) = cache.get_opt(&chunk_failures_key(&self.key, c)).await? {
                let f: BTreeMap<String, String> = serde_json::from_slice(&b)?;
                all.extend(f);
            }
        }
        Ok(all)
    }
}

/// Calls `row(position, id, vector)` for every row of chunk `c`, in order.
async fn read_chunk(
    cache: &Location,
    key: &str,
    c: usize,
    mut row: impl FnMut(u64, &str, &[f32]),
) -> Result<(), PipelineError> {
    let data_key = chunk_key(key, c);
    let data = cache.get(&data_key).await?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(data)?.build()?;
    let bad = || {
        PipelineError::Input(format!(
            "index chunk {data_key} has an unexpected layout; delete the index folder to rebuild"
        ))
    };
    for batch in reader {
        let batch = batch?;
        let pos = batch
            .column(0)
            .as_any()
            .downcast_ref::<arrow::array::UInt64Array>()
            .ok_or_else(bad)?;
        let id = batch
            .column(1)
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(bad)?;
        let vec = batch
            .column(2)
            .as_any()
            .downcast_ref::<ListArray>()
            .ok_or_else(bad)?;
        for i in 0..batch.num_rows() {
            let v = vec.value(i);
            let v = v.as_any().downcast_ref::<Float32Array>().ok_or_else(bad)?;
            row(pos.value(i), id.value(i), v.values());
        }
    }
    Ok(())
}

fn chunk_parquet(
    positions: &[u64],
    ids: &[String],
    vectors: &[f32],
    dim: usize,
) -> Result<Vec<u8>, PipelineError> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("position", DataType::UInt64, false),
        Field::new("id", DataType::Utf8, false),
        Field::new(
            "vector",
            DataType::List(Arc::new(Field::new("item", DataType::Float32, true))),
            false,
        ),
    ]));
    let mut list = ListBuilder::new(Float32Builder::new());
    for row in vectors.chunks_exact(dim.max(1)) {
        list.values().append_slice(row);
        list.append(true);
    }
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(arrow::array::UInt64Array::from(positions.to_vec())),
            Arc::new(ids.iter().map(Some).collect::<StringArray>()),
            Arc::new(list.finish()),
        ],
    )?;
    let mut buf = Vec::new();
    let mut w = ArrowWriter::try_new(&mut buf, schema, None)?;
    w.write(&batch)?;
    w.close()?;
    Ok(buf)
}

/// Embeds and writes every chunk of the corpus that `mine(chunk)` selects
/// and that is not written yet (resume). A chunk's failure list is written
/// before its Parquet file, whose presence marks the chunk complete.
/// `on_progress(done, total)` counts images of this call's chunks.
pub async fn build_chunks(
    cache: &Location,
    key: &str,
    corpus: &Corpus,
    embedder: &mut dyn Embedder,
    batch_size: usize,
    mine: &(dyn Fn(usize) -> bool + Sync),
    mut on_progress: impl FnMut(usize, usize),
) -> Result<(), PipelineError> {
    let n_chunks = corpus.ids.len().div_ceil(INDEX_CHUNK);
    let existing: std::collections::BTreeSet<String> = cache
        .list(&format!("index/{key}"))
        .await?
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let todo: Vec<usize> = (0..n_chunks)
        .filter(|&c| mine(c) && !existing.contains(&chunk_key(key, c)))
        .collect();
    let total: usize = todo
        .iter()
        .map(|&c| INDEX_CHUNK.min(corpus.ids.len() - c * INDEX_CHUNK))
        .sum();
    let mut done = 0;
    for c in todo {
        let start = c * INDEX_CHUNK;
        let end = (start + INDEX_CHUNK).min(corpus.ids.len());
        let (mut positions, mut ids, mut vectors, mut failures) =
            (Vec::new(), Vec::new(), Vec::new(), BTreeMap::new());
        for (b, chunk) in corpus.ids[start..end].chunks(batch_size.max(1)).enumerate() {
            let mut images = Vec::with_capacity(chunk.len());
            for (j, id) in chunk.iter().enumerate() {
                let pos = (start + b * batch_size.max(1) + j) as u64;
                let decoded = match corpus.root.get(id).await {
                    Ok(bytes) => decode_rgb(id, &bytes).map_err(|e| e.to_string()),
                    Err(e) => Err(format!("cannot read {id}: {e}")),
                };
                match decoded {
                    Ok(img) => images.push((pos, id.clone(), img)),
                    Err(reason) => {
                        failures.insert(id.clone(), reason);
                    }
                }
            }
            let refs: Vec<_> = images.iter().map(|(_, _, img)| img).collect();
            let embedded = embedder.embed_images(&refs)?;
            for ((pos, id, _), v) in images.into_iter().zip(embedded) {
                positions.push(pos);
                ids.push(id);
                vectors.extend(v);
            }
            done += chunk.len();
            on_progress(done, total);
        }
        cache
            .put(
                &chunk_failures_key(key, c),
                serde_json::to_vec_pretty(&failures)?,
            )
            .await?;
        cache
            .put(
                &chunk_key(key, c),
                chunk_parquet(
                    &positions,
                    &ids,
                    &vectors,
                    embedder.dim() * embedder.vectors_per_image(),
                )?,
            )
            .await?;
    }
    Ok(())
}

/// What an encoder's index rows look like.
#[derive(Clone, Debug)]
pub struct IndexShape {
    pub dim: usize,
    pub vectors_per_image: usize,
    pub preprocessing: Option<serde_json::Value>,
}

impl IndexShape {
    pub fn of(embedder: &dyn Embedder) -> Self {
        IndexShape {
            dim: embedder.dim(),
            vectors_per_image: embedder.vectors_per_image(),
            preprocessing: embedder.preprocessing(),
        }
    }
}

/// Writes `index.json` once every chunk exists; `Ok(None)` if some are missing.
pub async fn finish_index(
    cache: &Location,
    key: &str,
    corpus: &Corpus,
    encoder: &mirgen_workers::ModelInfo,
    shape: IndexShape,
) -> Result<Option<IndexMeta>, PipelineError> {
    let n_chunks = corpus.ids.len().div_ceil(INDEX_CHUNK);
    let existing: std::collections::BTreeSet<String> = cache
        .list(&format!("index/{key}"))
        .await?
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    if (0..n_chunks).any(|c| !existing.contains(&chunk_key(key, c))) {
        return Ok(None);
    }
    let mut meta = IndexMeta {
        format: INDEX_FORMAT.into(),
        key: key.into(),
        encoder: encoder.clone(),
        dim: shape.dim,
        vectors_per_image: shape.vectors_per_image,
        preprocessing: shape.preprocessing,
        corpus_size: corpus.ids.len(),
        indexed: 0,
        failed: 0,
        chunk_size: INDEX_CHUNK,
        chunks: n_chunks,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    meta.failed = meta.failures(cache).await?.len();
    meta.indexed = corpus.ids.len() - meta.failed;
    cache
        .put(&meta_key(key), serde_json::to_vec_pretty(&meta)?)
        .await?;
    Ok(Some(meta))
}

/// One worker's part of a sharded index: the rows whose corpus position is
/// `shard` modulo `n_shards`, plus the vectors of the targets this worker
/// owns (to score them against its queries). Memory: (corpus / shards +
/// owned targets) vectors.
pub struct IndexShard {
    pub shard: usize,
    pub n_shards: usize,
    /// Floats per image.
    pub dim: usize,
    /// Floats per vector (see [`similarity`]).
    pub unit: usize,
    ids: Vec<String>,
    /// Corpus position of each row (ties are broken by it, as in [`CorpusIndex`]).
    positions: Vec<u64>,
    vectors: Vec<f32>,
    /// Owned targets: id -> (corpus position, vector).
    owned: HashMap<String, (u64, Vec<f32>)>,
    /// Largest vector norm of the shard's rows.
    max_norm: f32,
}

/// A shard's answer to one query.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShardHits {
    /// The shard's best rows: (corpus position, score, id), best first.
    pub top: Vec<(u64, f32, String)>,
    /// Rows of this shard that rank above the target (score higher, or equal
    /// and earlier in the corpus).
    pub better: u64,
}

impl IndexShard {
    /// Builds a shard from a whole index (tests and small corpora).
    pub fn from_index(
        index: &CorpusIndex,
        shard: usize,
        n_shards: usize,
        owns: impl Fn(&str) -> bool,
    ) -> Self {
        let mut s = IndexShard::empty(shard, n_shards, index.dim);
        s.unit = index.unit;
        for (pos, id) in index.ids.iter().enumerate() {
            let v = &index.vectors[pos * index.dim..(pos + 1) * index.dim];
            s.add(pos as u64, id, v, &owns);
        }
        s
    }

    /// A shard holding nothing.
    pub fn empty(shard: usize, n_shards: usize, dim: usize) -> Self {
        IndexShard {
            shard,
            n_shards: n_shards.max(1),
            dim,
            unit: dim,
            ids: vec![],
            positions: vec![],
            vectors: vec![],
            owned: HashMap::new(),
            max_norm: 0.0,
        }
    }

    fn add(&mut self, pos: u64, id: &str, v: &[f32], owns: &impl Fn(&str) -> bool) {
        if pos % self.n_shards as u64 == self.shard as u64 {
            self.ids.push(id.to_string());
            self.positions.push(pos);
            self.vectors.extend_from_slice(v);
            self.max_norm = self.max_norm.max(max_norm(v, self.unit));
        }
        if owns(id) {
            self.owned.insert(id.to_string(), (pos, v.to_vec()));
        }
    }

    /// Reads the cached index `key` chunk by chunk (one chunk in memory at a
    /// time), keeping only this shard's rows and the owned targets' vectors.
    pub async fn load(
        cache: &Location,
        key: &str,
        shard: usize,
        n_shards: usize,
        owns: impl Fn(&str) -> bool,
    ) -> Result<Self, PipelineError> {
        let meta = IndexMeta::load(cache, key).await?.ok_or_else(|| {
            PipelineError::Input(format!(
                "the corpus index {key} is not complete in {}; run `mirgen index` or rerun to build it",
                cache.display
            ))
        })?;
        let mut s = IndexShard::empty(shard, n_shards, meta.row_len());
        s.unit = meta.dim;
        for c in 0..meta.chunks {
            read_chunk(cache, key, c, |pos, id, v| s.add(pos, id, v, &owns)).await?;
        }
        Ok(s)
    }

    /// Rows held by this shard.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Bytes of vectors held (shard rows and owned targets).
    pub fn vector_bytes(&self) -> usize {
        4 * (self.vectors.len() + self.owned.len() * self.dim)
    }

    /// Owned target vectors held.
    pub fn owned_len(&self) -> usize {
        self.owned.len()
    }

    /// Whether `id` is an owned, indexed target.
    pub fn owns(&self, id: &str) -> bool {
        self.owned.contains_key(id)
    }

    /// The target's (score under `query`, corpus position), for [`Self::search`] on every shard.
    pub fn target_key(&self, id: &str, query: &[f32]) -> Option<(f32, u64)> {
        self.owned
            .get(id)
            .map(|(pos, v)| (similarity(v, query, self.unit), *pos))
    }

    /// This shard's best `top_k` rows and how many of its rows beat the target.
    pub fn search(&self, query: &[f32], top_k: usize, target: Option<(f32, u64)>) -> ShardHits {
        self.search_batch(
            &[RowQuery {
                vector: query,
                target,
            }],
            top_k,
        )
        .remove(0)
    }

    /// [`Self::search`] for several queries in one GEMM pass ([`exact_search`]).
    pub fn search_batch(&self, row_queries: &[RowQuery<'_>], top_k: usize) -> Vec<ShardHits> {
        exact_search(
            &self.vectors,
            self.dim,
            self.unit,
            self.max_norm,
            &|r| self.positions[r],
            row_queries,
            top_k,
        )
        .into_iter()
        .map(|(top, better)| ShardHits {
            top: top
                .iter()
                .map(|&(r, s)| (self.positions[r], s, self.ids[r].clone()))
                .collect(),
            better,
        })
        .collect()
    }
}

/// Merges every shard's answer to one query into the replicated index's answer.
pub fn merge_shard_hits(hits: &[ShardHits], top_k: usize, target_indexed: bool) -> SearchResult {
    let mut all: Vec<&(u64, f32, String)> = hits.iter().flat_map(|h| &h.top).collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    all.truncate(top_k);
    SearchResult {
        ids: all.iter().map(|h| h.2.clone()).collect(),
        scores: all.iter().map(|h| h.1).collect(),
        target_rank: target_indexed.then(|| hits.iter().map(|h| h.better as i64).sum()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_ranks_exactly_and_breaks_ties_by_order() {
        let ids: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let vectors = vec![1.0, 0.0, 0.0, 1.0, 0.6, 0.8, 0.6, 0.8];
        let idx = CorpusIndex::new(ids, 2, vectors, BTreeMap::new());
        let r = idx.search(&[0.0, 1.0], 2, Some("d"));
        assert_eq!(r.ids, vec!["b", "c"]);
        assert_eq!(r.target_rank, Some(2), "d ties with c but comes later");
        let r = idx.search(&[1.0, 0.0], 10, Some("a"));
        assert_eq!(r.ids.len(), 4);
        assert_eq!(r.target_rank, Some(0));
        assert_eq!(idx.search(&[1.0, 0.0], 1, Some("zzz")).target_rank, None);
        let bytes = chunk_parquet(&[0, 1, 2, 3], &idx.ids, &idx.vectors, 2).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::open(&dir.path().display().to_string(), true).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(loc.put(&chunk_key("k", 0), bytes)).unwrap();
        let (mut ids, mut vectors) = (vec![], vec![]);
        rt.block_on(read_chunk(&loc, "k", 0, |p, id, v| {
            assert_eq!(p as usize, ids.len());
            ids.push(id.to_string());
            vectors.extend_from_slice(v);
        }))
        .unwrap();
        assert_eq!(vectors, idx.vectors);
        assert_eq!(ids, idx.ids);
    }

    /// Scores every row with [`similarity`]: what [`exact_search`] must equal.
    fn naive(
        rows: &[f32],
        row_len: usize,
        unit: usize,
        q: &RowQuery<'_>,
        k: usize,
    ) -> (Vec<(usize, f32)>, u64) {
        let scores: Vec<f32> = rows
            .chunks(row_len)
            .map(|r| similarity(r, q.vector, unit))
            .collect();
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        let top = order.iter().take(k).map(|&r| (r, scores[r])).collect();
        let better = q.target.map_or(0, |(ts, tp)| {
            (0..scores.len())
                .filter(|&r| scores[r] > ts || (scores[r] == ts && (r as u64) < tp))
                .count() as u64
        });
        (top, better)
    }

    #[test]
    fn gemm_search_equals_scoring_every_row_even_for_rounding_ties() {
        // rows that are permutations of one vector: mathematically tied
        // scores that float summation order separates, plus plain rows
        let unit = 64;
        let base: Vec<f32> = (0..unit)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 9.0)
            .collect();
        let mut rows = Vec::new();
        for r in 0..300usize {
            if r % 3 == 0 {
                let mut v = base.clone();
                v.rotate_left(r % unit);
                rows.extend(v);
            } else {
                rows.extend((0..unit).map(|i| (((i * 7 + r * 13) % 17) as f32 - 8.0) / 10.0));
            }
        }
        let queries: Vec<Vec<f32>> = (0..5)
            .map(|q| {
                (0..unit)
                    .map(|i| {
                        if q == 0 {
                            0.125
                        } else {
                            (((i + q * 5) % 9) as f32 - 4.0) / 7.0
                        }
                    })
                    .collect()
            })
            .collect();
        for (per_row, qv) in [(1, 1), (4, 1), (4, 2)] {
            let row_len = unit * per_row;
            let n = rows.len() / row_len;
            let rows = &rows[..n * row_len];
            let qs: Vec<Vec<f32>> = queries
                .iter()
                .map(|q| q.iter().cycle().take(unit * qv).copied().collect())
                .collect();
            for k in [1, 10, n] {
                for block in [unit * 7, 1 << 22] {
                    let rq: Vec<RowQuery<'_>> = qs
                        .iter()
                        .enumerate()
                        .map(|(i, v)| {
                            let tr = (i * 31) % n;
                            let ts = similarity(&rows[tr * row_len..(tr + 1) * row_len], v, unit);
                            RowQuery {
                                vector: v,
                                target: Some((ts, tr as u64)),
                            }
                        })
                        .collect();
                    let got = exact_search_blocked(
                        rows,
                        row_len,
                        unit,
                        max_norm(rows, unit),
                        &|r| r as u64,
                        &rq,
                        k,
                        block,
                    );
                    for (q, g) in rq.iter().zip(&got) {
                        assert_eq!(
                            *g,
                            naive(rows, row_len, unit, q, k),
                            "per_row {per_row}, qv {qv}, k {k}, block {block}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn multi_vector_similarity_is_the_max_over_pairs() {
        // two 2-d vectors per image (BLIP-2 style), unit 2
        let a = [1.0, 0.0, 0.0, 1.0];
        assert_eq!(similarity(&a, &[0.6, 0.8], 2), 0.8); // text: max over the image's vectors
        assert_eq!(similarity(&a, &[0.0, -1.0, 0.5, 0.5], 2), 0.5); // image: max over pairs
        assert_eq!(
            similarity(&[0.5, 0.5], &[0.6, 0.8], 2),
            dot(&[0.5, 0.5], &[0.6, 0.8])
        );
        // an index of such images ranks by that similarity, replicated and sharded alike
        let ids: Vec<String> = (0..6).map(|i| format!("img{i}")).collect();
        let vectors: Vec<f32> = (0..6 * 4)
            .map(|i| ((i * 5 % 7) as f32 - 3.0) / 3.0)
            .collect();
        let idx = CorpusIndex::new(ids, 4, vectors.clone(), BTreeMap::new()).with_unit(2);
        let query = [0.6, 0.8];
        let r = idx.search(&query, 3, Some("img4"));
        let mut expected: Vec<(f32, usize)> = vectors
            .chunks(4)
            .enumerate()
            .map(|(i, row)| (dot(&row[..2], &query).max(dot(&row[2..], &query)), i))
            .collect();
        expected.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
        let top: Vec<String> = expected[..3]
            .iter()
            .map(|(_, i)| format!("img{i}"))
            .collect();
        assert_eq!(r.ids, top);
        let shards: Vec<IndexShard> = (0..2)
            .map(|s| IndexShard::from_index(&idx, s, 2, |id| id == "img4"))
            .collect();
        let key = shards
            .iter()
            .find(|s| s.owns("img4"))
            .unwrap()
            .target_key("img4", &query);
        let hits: Vec<ShardHits> = shards.iter().map(|s| s.search(&query, 3, key)).collect();
        assert_eq!(merge_shard_hits(&hits, 3, true), r);
    }

    #[test]
    fn sharded_search_equals_replicated_search() {
        // 50 vectors with deliberate ties; 1, 3 and 4 shards
        let dim = 4;
        let ids: Vec<String> = (0..50).map(|i| format!("img{i:02}")).collect();
        let vectors: Vec<f32> = (0..50 * dim)
            .map(|i| (((i * 7919) % 13) as f32 - 6.0) / 4.0)
            .collect();
        let idx = CorpusIndex::new(ids.clone(), dim, vectors, BTreeMap::new());
        for n in [1, 3, 4] {
            let shards: Vec<IndexShard> = (0..n)
                .map(|s| IndexShard::from_index(&idx, s, n, |id| id == "img17" || id == "img33"))
                .collect();
            assert_eq!(shards.iter().map(IndexShard::len).sum::<usize>(), 50);
            for q in 0..10 {
                let query: Vec<f32> = (0..dim).map(|j| ((q * 3 + j) % 5) as f32 - 2.0).collect();
                for target in ["img17", "img33"] {
                    let owner = shards.iter().find(|s| s.owns(target)).unwrap();
                    let key = owner.target_key(target, &query);
                    let hits: Vec<ShardHits> =
                        shards.iter().map(|s| s.search(&query, 10, key)).collect();
                    let merged = merge_shard_hits(&hits, 10, key.is_some());
                    assert_eq!(
                        merged,
                        idx.search(&query, 10, Some(target)),
                        "{n} shards, query {q}"
                    );
                }
            }
        }
    }
}
