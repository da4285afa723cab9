//! Publishing a finished dataset folder to the Hugging Face Hub with the
//! official CLI (`hf upload-large-folder`, from huggingface_hub), which is
//! resumable: rerun the same command after an interruption. The token comes
//! from `HF_TOKEN` and is never printed. `.mirgen/` (staging) is not uploaded.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::commit::{MANIFEST, STAGING};
use crate::PipelineError;

/// What would be uploaded.
#[derive(Debug, PartialEq)]
pub struct UploadPlan {
    /// (path relative to the dataset folder, bytes), sorted.
    pub files: Vec<(String, u64)>,
}

impl UploadPlan {
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|(_, n)| n).sum()
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, u64)>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let rel = path
            .strip_prefix(root)
            .expect("under root")
            .to_string_lossy()
            .replace('\\', "/");
        if rel == STAGING || rel.starts_with(&format!("{STAGING}/")) {
            continue;
        }
        if entry.file_type()?.is_dir() {
            walk(root, &path, out)?;
        } else {
            out.push((rel, entry.metadata()?.len()));
        }
    }
    Ok(())
}

/// Checks the folder is a finished dataset and lists what would be uploaded.
pub fn plan_upload(dir: &Path) -> Result<UploadPlan, PipelineError> {
    if !dir.join(MANIFEST).is_file() {
        return Err(PipelineError::Input(format!(
            "{} has no {MANIFEST}: only a finished dataset can be published (rerun `mirgen run` to finish it; \
             for an object-store output, copy it to a local folder first)",
            dir.display()
        )));
    }
    if !dir.join("README.md").is_file() {
        return Err(PipelineError::Input(format!(
            "{} has no README.md dataset card",
            dir.display()
        )));
    }
    let mut files = Vec::new();
    walk(dir, dir, &mut files)
        .map_err(|e| PipelineError::Input(format!("cannot list {}: {e}", dir.display())))?;
    files.sort();
    Ok(UploadPlan { files })
}

/// `org/name` with the Hub's allowed characters.
pub fn check_repo_id(repo: &str) -> Result<(), PipelineError> {
    let ok = repo.split('/').count() == 2
        && repo.split('/').all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        });
    if ok {
        Ok(())
    } else {
        Err(PipelineError::Input(format!(
            "--repo {repo:?} is not a Hub repository id of the form org/name"
        )))
    }
}

/// The upload command. `cli` is the `hf` executable (MIRGEN_HF_CLI or `hf`).
pub fn upload_command(cli: &Path, dir: &Path, repo: &str, private: bool) -> Command {
    let mut c = Command::new(cli);
    c.arg("upload-large-folder").arg(repo).arg(dir).args([
        "--repo-type",
        "dataset",
        "--exclude",
        &format!("{STAGING}/**"),
    ]);
    if private {
        c.arg("--private");
    }
    c
}

/// Runs the upload with the token from `HF_TOKEN`.
pub fn publish(dir: &Path, repo: &str, private: bool) -> Result<(), PipelineError> {
    check_repo_id(repo)?;
    plan_upload(dir)?;
    if std::env::var("HF_TOKEN")
        .map(|t| t.trim().is_empty())
        .unwrap_or(true)
    {
        return Err(PipelineError::Input(
            "HF_TOKEN is not set: create a write token at the Hub (Settings > Access Tokens) and export HF_TOKEN".into(),
        ));
    }
    let cli = std::env::var_os("MIRGEN_HF_CLI")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("hf"));
    let status = upload_command(&cli, dir, repo, private).status().map_err(|e| {
        PipelineError::Input(format!(
            "cannot run `{}` ({e}): install the Hugging Face CLI with `pip install -U huggingface_hub`",
            cli.display()
        ))
    })?;
    if !status.success() {
        return Err(PipelineError::Input(format!(
            "`{} upload-large-folder` failed ({status}); rerun the same command to resume the upload",
            cli.display()
        )));
    }
    Ok(())
}
