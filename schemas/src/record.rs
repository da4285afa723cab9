//! One row per (target, round) and its Arrow/Parquet representation.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BinaryArray, BinaryBuilder, BooleanArray, Float32Array, Float32Builder,
    Int32Array, Int64Array, ListArray, ListBuilder, RecordBatch, StringArray, StringBuilder,
    StructArray, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use bytes::Bytes;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use crate::SchemaError;

/// An image cell in the Hugging Face `Image` feature layout: `struct<bytes, path>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageCell {
    /// Encoded image file (PNG or JPEG).
    pub bytes: Vec<u8>,
    /// A file name hint (`datasets` uses its extension); not a path on disk.
    pub path: String,
}

/// Whether a row holds a result or records a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordStatus {
    Ok,
    Failed,
}

impl RecordStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordStatus::Ok => "ok",
            RecordStatus::Failed => "failed",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ok" => Some(RecordStatus::Ok),
            "failed" => Some(RecordStatus::Failed),
            _ => None,
        }
    }
}

/// Wall-clock milliseconds spent per stage for the batch this row was part of,
/// divided by the batch size (an amortised per-row cost).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StageTimings {
    pub vlm_ms: f32,
    pub generate_ms: f32,
    pub embed_ms: f32,
    pub search_ms: f32,
}

/// One (target, round) of a multi-round MIR dialogue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Corpus-relative id of the target image (e.g. `unlabeled2017/000000123.jpg`).
    pub target_id: String,
    /// Round number, 0..=R.
    pub round: i32,
    /// The target image as stored in the corpus; `None` when it could not be read.
    pub target_image: Option<ImageCell>,
    /// The query (caption) of this round.
    pub query: Option<String>,
    /// The VLM's comparison of target and previous synthetic image that led to
    /// this round's query; `None` at round 0.
    pub feedback: Option<String>,
    /// The image generated from `query` (the visual feedback).
    pub synthetic_image: Option<ImageCell>,
    /// Corpus ids of the top-K retrieved images, best first.
    pub retrieved_ids: Vec<String>,
    /// Cosine similarity of each retrieved image, aligned with `retrieved_ids`.
    pub retrieved_scores: Vec<f32>,
    /// 0-based position of the target in the full ranking of the corpus.
    pub target_rank: Option<i64>,
    /// `target_rank < 10`.
    pub hit_at_10: Option<bool>,
    pub status: RecordStatus,
    /// Why the row failed (names the input and the stage).
    pub error: Option<String>,
    /// Seed used for this round's image generation (derived from run seed, target id, round).
    pub seed: u64,
    pub timings: StageTimings,
}

impl Record {
    /// A failure row: keeps the target id, round and what went wrong, nothing else.
    pub fn failed(target_id: &str, round: i32, seed: u64, error: String) -> Self {
        Record {
            target_id: target_id.to_string(),
            round,
            target_image: None,
            query: None,
            feedback: None,
            synthetic_image: None,
            retrieved_ids: vec![],
            retrieved_scores: vec![],
            target_rank: None,
            hit_at_10: None,
            status: RecordStatus::Failed,
            error: Some(error),
            seed,
            timings: StageTimings::default(),
        }
    }

    /// The record with timings zeroed: what must agree between two runs of the same config.
    pub fn without_timings(&self) -> Self {
        Record {
            timings: StageTimings::default(),
            ..self.clone()
        }
    }
}

fn image_fields() -> Fields {
    Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ])
}

fn timing_fields() -> Fields {
    Fields::from(vec![
        Field::new("vlm_ms", DataType::Float32, false),
        Field::new("generate_ms", DataType::Float32, false),
        Field::new("embed_ms", DataType::Float32, false),
        Field::new("search_ms", DataType::Float32, false),
    ])
}

/// The `datasets` features of a record, as the JSON that goes under the Arrow
/// schema metadata key `huggingface` and into the dataset card.
pub fn hf_features() -> serde_json::Value {
    let value = |dtype: &str| serde_json::json!({"dtype": dtype, "_type": "Value"});
    serde_json::json!({
        "target_id": value("string"),
        "round": value("int32"),
        "target_image": {"_type": "Image"},
        "query": value("string"),
        "feedback": value("string"),
        "synthetic_image": {"_type": "Image"},
        "retrieved_ids": {"feature": value("string"), "_type": "Sequence"},
        "retrieved_scores": {"feature": value("float32"), "_type": "Sequence"},
        "target_rank": value("int64"),
        "hit_at_10": value("bool"),
        "status": value("string"),
        "error": value("string"),
        "seed": value("uint64"),
        "timings": {
            "vlm_ms": value("float32"),
            "generate_ms": value("float32"),
            "embed_ms": value("float32"),
            "search_ms": value("float32"),
        },
    })
}

/// The Arrow schema of the record table, with the Hugging Face features in
/// the schema metadata (key `huggingface`) so `datasets` decodes image columns.
pub fn record_schema() -> SchemaRef {
    let fields = vec![
        Field::new("target_id", DataType::Utf8, false),
        Field::new("round", DataType::Int32, false),
        Field::new("target_image", DataType::Struct(image_fields()), true),
        Field::new("query", DataType::Utf8, true),
        Field::new("feedback", DataType::Utf8, true),
        Field::new("synthetic_image", DataType::Struct(image_fields()), true),
        Field::new(
            "retrieved_ids",
            DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
            false,
        ),
        Field::new(
            "retrieved_scores",
            DataType::List(Arc::new(Field::new("item", DataType::Float32, true))),
            false,
        ),
        Field::new("target_rank", DataType::Int64, true),
        Field::new("hit_at_10", DataType::Boolean, true),
        Field::new("status", DataType::Utf8, false),
        Field::new("error", DataType::Utf8, true),
        Field::new("seed", DataType::UInt64, false),
        Field::new("timings", DataType::Struct(timing_fields()), false),
    ];
    let hf = serde_json::json!({"info": {"features": hf_features()}});
    let metadata: std::collections::HashMap<String, String> =
        [("huggingface".to_string(), hf.to_string())].into();
    Arc::new(Schema::new_with_metadata(fields, metadata))
}

fn image_array(cells: Vec<Option<&ImageCell>>) -> StructArray {
    let mut bytes = BinaryBuilder::new();
    let mut paths = StringBuilder::new();
    let mut validity = Vec::with_capacity(cells.len());
    for cell in cells {
        match cell {
            Some(c) => {
                bytes.append_value(&c.bytes);
                paths.append_value(&c.path);
                validity.push(true);
            }
            None => {
                bytes.append_null();
                paths.append_null();
                validity.push(false);
            }
        }
    }
    StructArray::new(
        image_fields(),
        vec![Arc::new(bytes.finish()), Arc::new(paths.finish())],
        Some(validity.into()),
    )
}

/// Encodes records as one Arrow batch of [`record_schema`].
pub fn records_to_batch(records: &[Record]) -> Result<RecordBatch, SchemaError> {
    let strings = |f: &dyn Fn(&Record) -> Option<&str>| -> ArrayRef {
        Arc::new(records.iter().map(f).collect::<StringArray>())
    };
    let mut ids = ListBuilder::new(StringBuilder::new());
    let mut scores = ListBuilder::new(Float32Builder::new());
    for r in records {
        for id in &r.retrieved_ids {
            ids.values().append_value(id);
        }
        ids.append(true);
        scores.values().append_slice(&r.retrieved_scores);
        scores.append(true);
    }
    let timing = |f: &dyn Fn(&StageTimings) -> f32| -> ArrayRef {
        Arc::new(
            records
                .iter()
                .map(|r| f(&r.timings))
                .collect::<Float32Array>(),
        )
    };
    let timings = StructArray::new(
        timing_fields(),
        vec![
            timing(&|t| t.vlm_ms),
            timing(&|t| t.generate_ms),
            timing(&|t| t.embed_ms),
            timing(&|t| t.search_ms),
        ],
        None,
    );
    let columns: Vec<ArrayRef> = vec![
        strings(&|r| Some(&r.target_id)),
        Arc::new(records.iter().map(|r| r.round).collect::<Int32Array>()),
        Arc::new(image_array(
            records.iter().map(|r| r.target_image.as_ref()).collect(),
        )),
        strings(&|r| r.query.as_deref()),
        strings(&|r| r.feedback.as_deref()),
        Arc::new(image_array(
            records.iter().map(|r| r.synthetic_image.as_ref()).collect(),
        )),
        Arc::new(ids.finish()),
        Arc::new(scores.finish()),
        Arc::new(
            records
                .iter()
                .map(|r| r.target_rank)
                .collect::<Int64Array>(),
        ),
        Arc::new(
            records
                .iter()
                .map(|r| r.hit_at_10)
                .collect::<BooleanArray>(),
        ),
        strings(&|r| Some(r.status.as_str())),
        strings(&|r| r.error.as_deref()),
        Arc::new(records.iter().map(|r| r.seed).collect::<UInt64Array>()),
        Arc::new(timings),
    ];
    Ok(RecordBatch::try_new(record_schema(), columns)?)
}

fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> Result<&'a T, SchemaError> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| {
            SchemaError::Mismatch(format!("column `{name}` is missing or has the wrong type"))
        })
}

fn opt_str(a: &StringArray, i: usize) -> Option<String> {
    a.is_valid(i).then(|| a.value(i).to_string())
}

fn image_cells(a: &StructArray) -> Result<Vec<Option<ImageCell>>, SchemaError> {
    let bytes = a
        .column_by_name("bytes")
        .and_then(|c| c.as_any().downcast_ref::<BinaryArray>())
        .ok_or_else(|| SchemaError::Mismatch("image column without `bytes`".into()))?;
    let paths = a
        .column_by_name("path")
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .ok_or_else(|| SchemaError::Mismatch("image column without `path`".into()))?;
    Ok((0..a.len())
        .map(|i| {
            (a.is_valid(i) && bytes.is_valid(i)).then(|| ImageCell {
                bytes: bytes.value(i).to_vec(),
                path: if paths.is_valid(i) {
                    paths.value(i).to_string()
                } else {
                    String::new()
                },
            })
        })
        .collect())
}

/// Decodes a batch of [`record_schema`] back into records.
pub fn records_from_batch(batch: &RecordBatch) -> Result<Vec<Record>, SchemaError> {
    let target_id = column::<StringArray>(batch, "target_id")?;
    let round = column::<Int32Array>(batch, "round")?;
    let target_image = image_cells(column::<StructArray>(batch, "target_image")?)?;
    let query = column::<StringArray>(batch, "query")?;
    let feedback = column::<StringArray>(batch, "feedback")?;
    let synthetic_image = image_cells(column::<StructArray>(batch, "synthetic_image")?)?;
    let ids = column::<ListArray>(batch, "retrieved_ids")?;
    let scores = column::<ListArray>(batch, "retrieved_scores")?;
    let rank = column::<Int64Array>(batch, "target_rank")?;
    let hit = column::<BooleanArray>(batch, "hit_at_10")?;
    let status = column::<StringArray>(batch, "status")?;
    let error = column::<StringArray>(batch, "error")?;
    let seed = column::<UInt64Array>(batch, "seed")?;
    let timings = column::<StructArray>(batch, "timings")?;
    let timing = |name: &str| -> Result<&Float32Array, SchemaError> {
        timings
            .column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<Float32Array>())
            .ok_or_else(|| SchemaError::Mismatch(format!("timings without `{name}`")))
    };
    let (vlm, gen, emb, search) = (
        timing("vlm_ms")?,
        timing("generate_ms")?,
        timing("embed_ms")?,
        timing("search_ms")?,
    );
    let mut out = Vec::with_capacity(batch.num_rows());
    let mut target_image = target_image.into_iter();
    let mut synthetic_image = synthetic_image.into_iter();
    for i in 0..batch.num_rows() {
        let id_list = ids.value(i);
        let id_list = id_list
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| {
                SchemaError::Mismatch("retrieved_ids is not a list of strings".into())
            })?;
        let score_list = scores.value(i);
        let score_list = score_list
            .as_any()
            .downcast_ref::<Float32Array>()
            .ok_or_else(|| {
                SchemaError::Mismatch("retrieved_scores is not a list of float32".into())
            })?;
        let status_str = status.value(i);
        out.push(Record {
            target_id: target_id.value(i).to_string(),
            round: round.value(i),
            target_image: target_image.next().flatten(),
            query: opt_str(query, i),
            feedback: opt_str(feedback, i),
            synthetic_image: synthetic_image.next().flatten(),
            retrieved_ids: id_list
                .iter()
                .map(|s| s.unwrap_or("").to_string())
                .collect(),
            retrieved_scores: score_list.values().to_vec(),
            target_rank: rank.is_valid(i).then(|| rank.value(i)),
            hit_at_10: hit.is_valid(i).then(|| hit.value(i)),
            status: RecordStatus::parse(status_str)
                .ok_or_else(|| SchemaError::Mismatch(format!("unknown status `{status_str}`")))?,
            error: opt_str(error, i),
            seed: seed.value(i),
            timings: StageTimings {
                vlm_ms: vlm.value(i),
                generate_ms: gen.value(i),
                embed_ms: emb.value(i),
                search_ms: search.value(i),
            },
        });
    }
    Ok(out)
}

/// Writer settings for record files: zstd, and small row groups because rows
/// embed images (the Hugging Face viewer reads one row group at a time).
pub fn writer_properties(row_group_rows: usize) -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(3).expect("valid zstd level"),
        ))
        .set_max_row_group_row_count(Some(row_group_rows.max(1)))
        .build()
}

/// Encodes records as a complete Parquet file in memory.
pub fn records_to_parquet(
    records: &[Record],
    row_group_rows: usize,
) -> Result<Vec<u8>, SchemaError> {
    let batch = records_to_batch(records)?;
    let mut buf = Vec::new();
    let mut writer = ArrowWriter::try_new(
        &mut buf,
        record_schema(),
        Some(writer_properties(row_group_rows)),
    )?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(buf)
}

/// Decodes a Parquet file of records.
pub fn records_from_parquet(data: Bytes) -> Result<Vec<Record>, SchemaError> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(data)?.build()?;
    let mut out = Vec::new();
    for batch in reader {
        out.extend(records_from_batch(&batch?)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(round: i32) -> Record {
        Record {
            target_id: "a/b.jpg".into(),
            round,
            target_image: Some(ImageCell {
                bytes: vec![1, 2, 3],
                path: "b.jpg".into(),
            }),
            query: Some("a red bus".into()),
            feedback: (round > 0).then(|| "the bus is blue".into()),
            synthetic_image: Some(ImageCell {
                bytes: vec![9],
                path: "b_0.png".into(),
            }),
            retrieved_ids: vec!["x.jpg".into(), "a/b.jpg".into()],
            retrieved_scores: vec![0.9, 0.5],
            target_rank: Some(1),
            hit_at_10: Some(true),
            status: RecordStatus::Ok,
            error: None,
            seed: 42,
            timings: StageTimings {
                vlm_ms: 1.0,
                generate_ms: 2.0,
                embed_ms: 3.0,
                search_ms: 4.0,
            },
        }
    }

    #[test]
    fn parquet_round_trip_keeps_every_field() {
        let records = vec![
            sample(0),
            sample(1),
            Record::failed("bad.jpg", 0, 7, "cannot decode bad.jpg: truncated".into()),
        ];
        let bytes = records_to_parquet(&records, 2).unwrap();
        let back = records_from_parquet(Bytes::from(bytes)).unwrap();
        assert_eq!(back, records);
    }

    #[test]
    fn schema_carries_huggingface_features() {
        let schema = record_schema();
        let hf: serde_json::Value =
            serde_json::from_str(schema.metadata().get("huggingface").unwrap()).unwrap();
        assert_eq!(hf["info"]["features"]["synthetic_image"]["_type"], "Image");
        // every column has a feature and vice versa
        let features = hf["info"]["features"].as_object().unwrap();
        assert_eq!(features.len(), schema.fields().len());
        for f in schema.fields() {
            assert!(
                features.contains_key(f.name()),
                "no feature for {}",
                f.name()
            );
        }
    }
}
