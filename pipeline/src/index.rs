//! The corpus index: one unit vector per decodable corpus image, built once
//! per (embedder, preprocessing, corpus listing) and cached in the output
//! store; exact top-K search by inner product.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{
    Array, Float32Array, Float32Builder, ListArray, ListBuilder, RecordBatch, StringArray,
};
use arrow::datatypes::{DataType, Field, Schema};
use bytes::Bytes;
use mirgen_workers::{image_io::decode_rgb, Embedder};
use parquet::arrow::{arrow_reader::ParquetRecordBatchReaderBuilder, ArrowWriter};
use sha2::{Digest, Sha256};

use crate::corpus::Corpus;
use crate::store::Location;
use crate::PipelineError;

pub struct CorpusIndex {
    pub ids: Vec<String>,
    pub dim: usize,
    /// Row-major `ids.len() x dim`.
    pub vectors: Vec<f32>,
    /// Corpus images that could not be decoded (id -> reason); not indexed.
    pub failures: BTreeMap<String, String>,
    position: HashMap<String, usize>,
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
        CorpusIndex {
            ids,
            dim,
            vectors,
            failures,
            position,
        }
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
            .map(|row| row.iter().zip(query).map(|(a, b)| a * b).sum())
            .collect()
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

    /// Exact search: scores every indexed image, keeps the best `top_k`
    /// (ties broken by corpus order) and the rank of `target`.
    pub fn search(&self, query: &[f32], top_k: usize, target: Option<&str>) -> SearchResult {
        let scores = self.scores(query);
        let better = |a: usize, b: usize| scores[b].total_cmp(&scores[a]).then(a.cmp(&b));
        let mut order: Vec<usize> = (0..scores.len()).collect();
        let k = top_k.min(order.len());
        if k > 0 && k < order.len() {
            order.select_nth_unstable_by(k - 1, |&a, &b| better(a, b));
            order.truncate(k);
        }
        order.sort_by(|&a, &b| better(a, b));
        order.truncate(k);
        let target_rank = target.and_then(|t| self.position.get(t)).map(|&ti| {
            let ts = scores[ti];
            scores
                .iter()
                .enumerate()
                .filter(|&(i, &s)| s > ts || (s == ts && i < ti))
                .count() as i64
        });
        SearchResult {
            ids: order.iter().map(|&i| self.ids[i].clone()).collect(),
            scores: order.iter().map(|&i| scores[i]).collect(),
            target_rank,
        }
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

    fn to_parquet(&self) -> Result<Vec<u8>, PipelineError> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new(
                "vector",
                DataType::List(Arc::new(Field::new("item", DataType::Float32, true))),
                false,
            ),
        ]));
        let mut vectors = ListBuilder::new(Float32Builder::new());
        for row in self.vectors.chunks_exact(self.dim) {
            vectors.values().append_slice(row);
            vectors.append(true);
        }
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(self.ids.iter().map(Some).collect::<StringArray>()),
                Arc::new(vectors.finish()),
            ],
        )?;
        let mut buf = Vec::new();
        let mut w = ArrowWriter::try_new(&mut buf, schema, None)?;
        w.write(&batch)?;
        w.close()?;
        Ok(buf)
    }

    fn from_parquet(
        data: Bytes,
        failures: BTreeMap<String, String>,
    ) -> Result<Self, PipelineError> {
        let reader = ParquetRecordBatchReaderBuilder::try_new(data)?.build()?;
        let (mut ids, mut vectors, mut dim) = (Vec::new(), Vec::new(), 0);
        for batch in reader {
            let batch = batch?;
            let bad = || {
                PipelineError::Input(
                    "cached corpus index has an unexpected layout; delete it to rebuild".into(),
                )
            };
            let id = batch
                .column(0)
                .as_any()
                .downcast_ref::<StringArray>()
                .ok_or_else(bad)?;
            let vec = batch
                .column(1)
                .as_any()
                .downcast_ref::<ListArray>()
                .ok_or_else(bad)?;
            for i in 0..batch.num_rows() {
                ids.push(id.value(i).to_string());
                let v = vec.value(i);
                let v = v.as_any().downcast_ref::<Float32Array>().ok_or_else(bad)?;
                dim = v.len();
                vectors.extend_from_slice(v.values());
            }
        }
        Ok(CorpusIndex::new(ids, dim, vectors, failures))
    }

    /// Loads the cached index for this embedder and corpus, or builds and caches it.
    /// Returns the index and whether it was reused.
    pub async fn load_or_build(
        cache: &Location,
        corpus: &Corpus,
        embedder: &mut dyn Embedder,
        batch_size: usize,
        mut on_progress: impl FnMut(usize, usize),
    ) -> Result<(Self, bool), PipelineError> {
        let key = Self::cache_key(&embedder.info().fingerprint, corpus);
        let (data_key, failures_key) = (
            format!("index/{key}.parquet"),
            format!("index/{key}.failures.json"),
        );
        if let Some(data) = cache.get_opt(&data_key).await? {
            let failures = match cache.get_opt(&failures_key).await? {
                Some(f) => serde_json::from_slice(&f)?,
                None => BTreeMap::new(),
            };
            return Ok((Self::from_parquet(data, failures)?, true));
        }
        let (mut ids, mut vectors, mut failures) = (Vec::new(), Vec::new(), BTreeMap::new());
        let total = corpus.ids.len();
        for chunk in corpus.ids.chunks(batch_size.max(1)) {
            let mut images = Vec::with_capacity(chunk.len());
            for id in chunk {
                let decoded = match corpus.root.get(id).await {
                    Ok(bytes) => decode_rgb(id, &bytes).map_err(|e| e.to_string()),
                    Err(e) => Err(format!("cannot read {id}: {e}")),
                };
                match decoded {
                    Ok(img) => images.push((id.clone(), img)),
                    Err(reason) => {
                        failures.insert(id.clone(), reason);
                    }
                }
            }
            let refs: Vec<_> = images.iter().map(|(_, img)| img).collect();
            let embedded = embedder.embed_images(&refs)?;
            for ((id, _), v) in images.iter().zip(embedded) {
                ids.push(id.clone());
                vectors.extend(v);
            }
            on_progress(ids.len() + failures.len(), total);
        }
        let index = CorpusIndex::new(ids, embedder.dim(), vectors, failures);
        // failures first: the data file's presence marks a complete cache entry
        cache
            .put(&failures_key, serde_json::to_vec_pretty(&index.failures)?)
            .await?;
        cache.put(&data_key, index.to_parquet()?).await?;
        Ok((index, false))
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
        let bytes = idx.to_parquet().unwrap();
        let back = CorpusIndex::from_parquet(Bytes::from(bytes), BTreeMap::new()).unwrap();
        assert_eq!(back.vectors, idx.vectors);
        assert_eq!(back.ids, idx.ids);
    }
}
