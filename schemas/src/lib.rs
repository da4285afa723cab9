//! mirgen's data contracts: the per-(target, round) record, its Arrow schema
//! (with the Hugging Face `features` metadata so `datasets` decodes images),
//! Parquet encoding/decoding, the run manifest and the dataset card.
//!
//! Everything that another tool reads (the `datasets` library, pyarrow, the
//! Hub's card parser, a resume of an interrupted run) goes through this crate,
//! so the pipeline and the evaluation share one definition of a record.

pub mod card;
pub mod manifest;
pub mod record;

pub use manifest::{Manifest, PartCommit, RunStats};
pub use record::{
    record_schema, records_from_batch, records_from_parquet, records_to_batch, records_to_parquet,
    ImageCell, Record, RecordStatus, StageTimings,
};

/// Errors from encoding or decoding mirgen's files.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the file does not have mirgen's record schema: {0}")]
    Mismatch(String),
}
