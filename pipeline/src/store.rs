//! Object-store locations: a local folder or an `s3://`, `gs://`, `az://`
//! URL, with credentials and endpoints from the usual environment variables
//! (never logged: only the URL is ever printed).

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::{
    local::LocalFileSystem, path::Path as ObjectPath, ObjectStore, ObjectStoreExt, PutMode,
    PutOptions, PutPayload,
};

/// Storage errors, naming the location.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{location}: {message}")]
    Open { location: String, message: String },
    #[error("{location}: {source}")]
    Io {
        location: String,
        source: object_store::Error,
    },
}

/// A store and a prefix inside it.
#[derive(Clone, Debug)]
pub struct Location {
    pub store: Arc<dyn ObjectStore>,
    pub prefix: ObjectPath,
    /// What the user wrote (for messages).
    pub display: String,
}

impl Location {
    /// Opens a folder (created when `create` is set) or a URL.
    pub fn open(spec: &str, create: bool) -> Result<Self, StoreError> {
        let open_err = |message: String| StoreError::Open {
            location: spec.to_string(),
            message,
        };
        if spec.contains("://") && !spec.starts_with("file://") {
            let url =
                url::Url::parse(spec).map_err(|e| open_err(format!("not a valid URL: {e}")))?;
            let env: Vec<(String, String)> = std::env::vars().collect();
            let (store, prefix) = match url.scheme() {
                "s3" | "s3a" => {
                    let mut b = object_store::aws::AmazonS3Builder::from_env().with_url(spec);
                    if std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v == "true") {
                        b = b.with_allow_http(true);
                    }
                    let s = b.build().map_err(|e| open_err(e.to_string()))?;
                    (
                        Arc::new(s) as Arc<dyn ObjectStore>,
                        ObjectPath::from_url_path(url.path())
                            .map_err(|e| open_err(e.to_string()))?,
                    )
                }
                _ => {
                    let (s, p) = object_store::parse_url_opts(&url, env)
                        .map_err(|e| open_err(e.to_string()))?;
                    (Arc::from(s), p)
                }
            };
            return Ok(Location {
                store,
                prefix,
                display: spec.to_string(),
            });
        }
        let path = spec.strip_prefix("file://").unwrap_or(spec);
        let path = std::path::Path::new(path);
        if create {
            std::fs::create_dir_all(path)
                .map_err(|e| open_err(format!("cannot create the folder: {e}")))?;
        } else if !path.is_dir() {
            return Err(open_err(if path.exists() {
                "is not a folder".into()
            } else {
                "does not exist (check the path; relative paths in a config are relative to the config file)".into()
            }));
        }
        let store = LocalFileSystem::new_with_prefix(path).map_err(|e| open_err(e.to_string()))?;
        Ok(Location {
            store: Arc::new(store),
            prefix: ObjectPath::default(),
            display: spec.to_string(),
        })
    }

    /// The full object path of `key` (a `/`-separated path relative to the prefix).
    pub fn path(&self, key: &str) -> ObjectPath {
        let mut p = self.prefix.clone();
        for part in key.split('/').filter(|s| !s.is_empty()) {
            p = p.clone().join(part);
        }
        p
    }

    fn err(&self, key: &str, source: object_store::Error) -> StoreError {
        StoreError::Io {
            location: format!("{}/{}", self.display.trim_end_matches('/'), key),
            source,
        }
    }

    pub async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let r = self
            .store
            .get(&self.path(key))
            .await
            .map_err(|e| self.err(key, e))?;
        r.bytes().await.map_err(|e| self.err(key, e))
    }

    /// Streams an object into a local file (memory stays at one chunk).
    pub async fn get_to_file(&self, key: &str, file: &mut std::fs::File) -> Result<(), StoreError> {
        use std::io::Write;
        let r = self
            .store
            .get(&self.path(key))
            .await
            .map_err(|e| self.err(key, e))?;
        let mut stream = r.into_stream();
        while let Some(chunk) = stream.try_next().await.map_err(|e| self.err(key, e))? {
            file.write_all(&chunk).map_err(|e| StoreError::Open {
                location: format!("{}/{}", self.display.trim_end_matches('/'), key),
                message: format!("cannot write a local copy: {e}"),
            })?;
        }
        Ok(())
    }

    /// `Ok(None)` when the object does not exist.
    pub async fn get_opt(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        match self.get(key).await {
            Ok(b) => Ok(Some(b)),
            Err(StoreError::Io {
                source: object_store::Error::NotFound { .. },
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes (replaces) an object. Single puts are atomic: readers see the
    /// old or the new object, never a part.
    pub async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), StoreError> {
        self.store
            .put(&self.path(key), PutPayload::from(data))
            .await
            .map_err(|e| self.err(key, e))?;
        Ok(())
    }

    /// Creates an object only if absent. `Ok(false)` when it already existed.
    pub async fn put_create(&self, key: &str, data: Vec<u8>) -> Result<bool, StoreError> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&self.path(key), PutPayload::from(data), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.err(key, e)),
        }
    }

    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(key, e)),
        }
    }

    /// Every object under `key_prefix`, as (key relative to this location, size), sorted.
    pub async fn list(&self, key_prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let base = self.path(key_prefix);
        let objects: Vec<_> = self
            .store
            .list(Some(&base))
            .try_collect()
            .await
            .map_err(|e| self.err(key_prefix, e))?;
        let strip = self.prefix.as_ref();
        let mut out: Vec<(String, u64)> = objects
            .into_iter()
            .map(|m| {
                let full = m.location.as_ref();
                let rel = full
                    .strip_prefix(strip)
                    .unwrap_or(full)
                    .trim_start_matches('/')
                    .to_string();
                (rel, m.size)
            })
            .collect();
        out.sort();
        Ok(out)
    }
}
