//! mirgen's pipeline: the timely dataflow that builds multi-round Mental
//! Image Retrieval datasets (GenIR, arXiv 2506.06220), its commit protocol
//! on object storage, and the `mirgen` CLI's commands.

pub mod bench;
pub mod commit;
pub mod config;
pub mod corpus;
pub mod dataflow;
pub mod eval;
pub mod export;
pub mod failpoint;
pub mod index;
pub mod indexing;
pub mod job;
pub mod progress;
pub mod publish;
pub mod report;
pub mod rescore;
pub mod rounds;
pub mod search;
pub mod store;
pub mod watchdog;

/// Errors of a job. Messages name the input and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("storage: {0}")]
    Store(#[from] store::StoreError),
    #[error("{0}")]
    Input(String),
    #[error("model: {0}")]
    Worker(#[from] mirgen_workers::WorkerError),
    #[error("records: {0}")]
    Schema(#[from] mirgen_schemas::SchemaError),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error(
        "output {output} belongs to a run with another configuration (config hash {existing}, this config {current}); \
         results of different configs are never mixed: choose another --output, or delete {output} to start over"
    )]
    ConfigChanged {
        output: String,
        existing: String,
        current: String,
    },
    #[error("dataflow: {0}")]
    Dataflow(String),
    #[error("the run is incomplete: {0}")]
    Incomplete(String),
}
