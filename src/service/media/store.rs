//! Where media bytes live: one [`ObjectStore`] (a local directory or an S3-compatible bucket),
//! addressed by the SHA-256 of the content, so a file uploaded twice is stored once.
//!
//! An upload streams into a staging object while it is hashed, and moves to its content address
//! when complete: a body is never held whole in memory, and an upload cut off half way leaves no
//! object anyone can name.

use std::{ops::Range, path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt, stream::BoxStream};
use object_store::{
    GetOptions, GetRange, GetResultPayload, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart,
    aws::AmazonS3Builder, local::LocalFileSystem, path::Path as ObjectPath,
};
use sha2::{Digest, Sha256};

use crate::config::{MediaBackend, MediaConfig};

/// Parts of a multipart upload: S3 wants at least 5 MiB for every part but the last.
const PART_BYTES: usize = 5 * 1024 * 1024;
/// Parts uploaded at once; with [`PART_BYTES`] this bounds an upload's memory (about 20 MiB).
const PARTS_IN_FLIGHT: usize = 3;

/// What went wrong storing or reading media.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no such object")]
    NotFound,
    /// The body passed `max` bytes.
    #[error("larger than {0} bytes")]
    TooLarge(u64),
    /// The body stopped arriving, or broke off.
    #[error("the upload did not complete: {0}")]
    Body(String),
    /// The object store failed (its cause is logged, not shown).
    #[error("media storage: {0}")]
    Backend(String),
}

impl From<object_store::Error> for StoreError {
    fn from(err: object_store::Error) -> Self {
        match err {
            object_store::Error::NotFound { .. } => StoreError::NotFound,
            other => StoreError::Backend(other.to_string()),
        }
    }
}

/// A stored object: its content address and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub sha256: String,
    pub size: u64,
}

/// An object being read: its size and (part of) its bytes.
pub struct Reading {
    /// The whole object's size.
    pub size: u64,
    /// The bytes of the range asked for (all of them without one).
    pub range: Range<u64>,
    pub body: BoxStream<'static, Result<Bytes, StoreError>>,
}

pub struct MediaStore {
    store: Arc<dyn ObjectStore>,
    prefix: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl MediaStore {
    /// The store `config` names: a directory (created if needed; default `data_dir/media`) or an
    /// S3 bucket, whose credentials come from the `AWS_…` environment variables.
    pub fn from_config(config: &MediaConfig, data_dir: &Path) -> Result<MediaStore, String> {
        match config.backend {
            MediaBackend::Local => {
                let dir = config.path.clone().unwrap_or_else(|| data_dir.join("media"));
                std::fs::create_dir_all(&dir)
                    .map_err(|err| format!("cannot create the media directory {}: {err}", dir.display()))?;
                let store = LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|err| format!("media directory {}: {err}", dir.display()))?;
                Ok(MediaStore { store: Arc::new(store), prefix: String::new() })
            }
            MediaBackend::S3 => {
                let s3 = &config.s3;
                let mut builder = AmazonS3Builder::from_env()
                    .with_bucket_name(&s3.bucket)
                    .with_virtual_hosted_style_request(!s3.path_style);
                if let Some(endpoint) = &s3.endpoint {
                    builder = builder.with_endpoint(endpoint).with_allow_http(endpoint.starts_with("http://"));
                }
                if let Some(region) = &s3.region {
                    builder = builder.with_region(region);
                }
                let store = builder.build().map_err(|err| format!("config key `media.s3`: {err}"))?;
                let prefix = s3.prefix.trim_matches('/');
                let prefix = if prefix.is_empty() { String::new() } else { format!("{prefix}/") };
                Ok(MediaStore { store: Arc::new(store), prefix })
            }
        }
    }

    /// `sha256/ab/cd/abcd…`: two levels of fan-out keep directories small on the local backend.
    fn object_path(&self, sha256: &str) -> ObjectPath {
        let (a, b) = (&sha256[..2.min(sha256.len())], &sha256[2.min(sha256.len())..4.min(sha256.len())]);
        ObjectPath::from(format!("{}sha256/{a}/{b}/{sha256}", self.prefix))
    }

    fn staging_path(&self) -> ObjectPath {
        ObjectPath::from(format!("{}staging/{}", self.prefix, crate::service::users::random_string(24)))
    }

    /// Streams `body` into the store: at most `max` bytes, each chunk arriving within `idle`.
    pub async fn put_stream<S, E>(&self, body: S, max: u64, idle: Duration) -> Result<Stored, StoreError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let staging = self.staging_path();
        let upload = self.store.put_multipart(&staging).await?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        let mut body = std::pin::pin!(body);
        let outcome: Result<(), StoreError> = async {
            loop {
                let next = tokio::time::timeout(idle, body.next())
                    .await
                    .map_err(|_| StoreError::Body(format!("no data for {} s", idle.as_secs())))?;
                let Some(chunk) = next else { break };
                let chunk = chunk.map_err(|err| StoreError::Body(err.to_string()))?;
                size += chunk.len() as u64;
                if size > max {
                    return Err(StoreError::TooLarge(max));
                }
                hasher.update(&chunk);
                writer.wait_for_capacity(PARTS_IN_FLIGHT).await?;
                writer.put(chunk);
            }
            Ok(())
        }
        .await;
        if let Err(err) = outcome {
            let _ = writer.abort().await;
            return Err(err);
        }
        writer.finish().await?;
        let sha256 = hex(&hasher.finalize());
        let target = self.object_path(&sha256);
        match self.store.head(&target).await {
            // The same content is stored already.
            Ok(_) => {
                let _ = self.store.delete(&staging).await;
            }
            Err(object_store::Error::NotFound { .. }) => {
                if let Err(err) = self.store.rename(&staging, &target).await {
                    let _ = self.store.delete(&staging).await;
                    return Err(err.into());
                }
            }
            Err(err) => {
                let _ = self.store.delete(&staging).await;
                return Err(err.into());
            }
        }
        Ok(Stored { sha256, size })
    }

    /// Stores `bytes` (a thumbnail, a preview's image) under their hash.
    pub async fn put_bytes(&self, bytes: Bytes) -> Result<Stored, StoreError> {
        let sha256 = hex(&Sha256::digest(&bytes));
        let size = bytes.len() as u64;
        let target = self.object_path(&sha256);
        if self.store.head(&target).await.is_err() {
            self.store.put(&target, PutPayload::from_bytes(bytes)).await?;
        }
        Ok(Stored { sha256, size })
    }

    /// Opens the object `sha256`, or the bytes `range` of it (clamped to its size).
    pub async fn get(&self, sha256: &str, range: Option<Range<u64>>) -> Result<Reading, StoreError> {
        let options = GetOptions { range: range.map(GetRange::Bounded), ..GetOptions::default() };
        let result = self.store.get_opts(&self.object_path(sha256), options).await?;
        let size = result.meta.size;
        let range = result.range.clone();
        let body = match result.payload {
            // object_store reads local files 8 KiB at a time, each read a hand-off to a blocking
            // thread: a download ran at a fifth of the disk's speed. Read in large chunks.
            GetResultPayload::File(file, _) => file_stream(file, range.clone()).await?,
            GetResultPayload::Stream(stream) => stream.map_err(StoreError::from).boxed(),
        };
        Ok(Reading { size, range, body })
    }

    /// The size of the object `sha256`.
    pub async fn size(&self, sha256: &str) -> Result<u64, StoreError> {
        Ok(self.store.head(&self.object_path(sha256)).await?.size)
    }

    /// Reads the whole object `sha256`, when it is at most `max` bytes.
    pub async fn read_all(&self, sha256: &str, max: u64) -> Result<Bytes, StoreError> {
        let reading = self.get(sha256, None).await?;
        if reading.size > max {
            return Err(StoreError::TooLarge(max));
        }
        let mut bytes = Vec::with_capacity(reading.size as usize);
        let mut body = reading.body;
        while let Some(chunk) = body.next().await {
            bytes.extend_from_slice(&chunk?);
            if bytes.len() as u64 > max {
                return Err(StoreError::TooLarge(max));
            }
        }
        Ok(Bytes::from(bytes))
    }

    /// Deletes the object `sha256` (already gone is fine).
    pub async fn delete(&self, sha256: &str) -> Result<(), StoreError> {
        match self.store.delete(&self.object_path(sha256)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(err) => Err(err.into()),
        }
    }

    /// Removes staging objects older than `age`: uploads cut off by a crash.
    pub async fn clean_staging(&self, age: Duration) -> Result<usize, StoreError> {
        let prefix = ObjectPath::from(format!("{}staging", self.prefix));
        let cutoff = chrono_now_minus(age);
        let old: Vec<ObjectPath> = self
            .store
            .list(Some(&prefix))
            .try_filter_map(|meta| async move { Ok((meta.last_modified < cutoff).then_some(meta.location)) })
            .try_collect()
            .await?;
        for path in &old {
            let _ = self.store.delete(path).await;
        }
        Ok(old.len())
    }
}

/// Bytes read from a local file at once.
const READ_CHUNK: u64 = 256 * 1024;

/// The bytes `range` of a local file, [`READ_CHUNK`] at a time.
async fn file_stream(
    file: std::fs::File,
    range: Range<u64>,
) -> Result<BoxStream<'static, Result<Bytes, StoreError>>, StoreError> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut file = tokio::fs::File::from_std(file);
    file.seek(std::io::SeekFrom::Start(range.start)).await.map_err(|err| StoreError::Backend(err.to_string()))?;
    let remaining = range.end - range.start;
    let stream = futures_util::stream::try_unfold((file, remaining), |(mut file, remaining)| async move {
        if remaining == 0 {
            return Ok(None);
        }
        let mut buf = vec![0u8; remaining.min(READ_CHUNK) as usize];
        let read = file.read(&mut buf).await.map_err(|err| StoreError::Backend(err.to_string()))?;
        if read == 0 {
            return Err(StoreError::Backend("the file ended before its recorded size".to_owned()));
        }
        buf.truncate(read);
        Ok(Some((Bytes::from(buf), (file, remaining - read as u64))))
    });
    Ok(stream.boxed())
}

/// `now - age` in the object store's timestamp type.
fn chrono_now_minus(age: Duration) -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now() - chrono::Duration::from_std(age).unwrap_or(chrono::Duration::zero())
}
