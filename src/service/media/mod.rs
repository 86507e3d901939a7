//! The content repository: uploads (direct and through `/media/v1/create`), downloads of local
//! and other servers' media, thumbnails, URL previews, quotas and the operators' tools.
//!
//! Rows in `media` say which object (by SHA-256, [`store`]) each `mxc://` URI is. Objects are
//! shared by every row with the same content and deleted with the last of them; the two steps
//! that could race — an upload naming an object that exists, a delete removing an object no row
//! names — both run under [`Media::objects`].

pub mod preview;
pub mod store;
pub mod thumbnail;

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::Stream;
use ruma::{OwnedServerName, ServerName, UserId};
use serde_json::{Map, Value, json};
use tokio::sync::{Notify, Semaphore};

use crate::{
    config::Config,
    error::Error,
    federation::{FederationError, client::FederationClient},
    service::now_ms,
    storage::{
        Db,
        media::{MediaRow, ThumbnailRow},
    },
};
use preview::{AddressPolicy, SafeFetcher};
use store::{MediaStore, Reading, StoreError, Stored};
use thumbnail::{Method, ThumbnailError};

/// Longest a download waits for a created URI's upload (`timeout_ms` is capped to this).
const MAX_WAIT: Duration = Duration::from_secs(120);
/// What a download waits when it does not say (the spec's default).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(20);
/// Largest file read whole to make a thumbnail of.
const MAX_THUMBNAIL_SOURCE_BYTES: u64 = 64 * 1024 * 1024;
/// Thumbnails generated at once (each is CPU-bound and holds a decoded image).
const THUMBNAILERS: usize = 2;
/// What is read of a body refused as too large, so the client sees the answer.
const LINGER_BYTES: usize = 4 * 1024 * 1024;
const LINGER_TIME: Duration = Duration::from_secs(2);
/// Staging objects older than this are uploads cut off by a crash.
const STAGING_MAX_AGE: Duration = Duration::from_secs(6 * 3600);

/// A media ID: 24 random letters and digits (the spec allows `[A-Za-z0-9_-]`).
fn new_media_id() -> String {
    crate::service::users::random_string(24)
}

/// Whether `media_id` is one the spec allows; others are never looked up (or sent on).
pub fn valid_media_id(media_id: &str) -> bool {
    !media_id.is_empty()
        && media_id.len() <= 255
        && media_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Splits `mxc://server/id`.
pub fn parse_mxc(uri: &str) -> Option<(OwnedServerName, String)> {
    let rest = uri.strip_prefix("mxc://")?;
    let (server, media_id) = rest.split_once('/')?;
    let server = OwnedServerName::try_from(server).ok()?;
    valid_media_id(media_id).then(|| (server, media_id.to_owned()))
}

/// What an uploader says about the file.
#[derive(Debug, Default, Clone)]
pub struct UploadMeta {
    pub content_type: Option<String>,
    pub filename: Option<String>,
    /// `Content-Length`, when the client sent one: checked against the limits before any byte
    /// is read.
    pub declared_len: Option<u64>,
}

/// A thumbnail ready to be served.
pub struct ServedThumbnail {
    pub content_type: String,
    pub sha256: String,
    pub size: u64,
}

/// Which endpoint a download came through: the legacy unauthenticated ones serve only media
/// stored while `enable_authenticated_media` was off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Authenticated,
    Legacy,
    /// Another server, over federation (local media only).
    Federation,
}

pub struct Media {
    db: Db,
    store: MediaStore,
    server_name: OwnedServerName,
    config: crate::config::MediaConfig,
    /// How other servers' media is fetched; `None` for the operator commands.
    federation: Option<Arc<FederationClient>>,
    /// Held while an upload gives its object a row and while a delete removes objects.
    objects: tokio::sync::Mutex<()>,
    /// Woken when a created URI gets its upload.
    uploaded: Notify,
    thumbnailers: Semaphore,
    /// URL previews, when enabled.
    previews: Option<SafeFetcher>,
    /// For a remote media server's `Location` redirect (with `federation` only).
    redirects: Option<SafeFetcher>,
}

impl Media {
    /// The content repository of `config`; with `federation` (when federation is enabled) it
    /// fetches other servers' media.
    pub fn new(db: Db, config: &Config, federation: Option<Arc<FederationClient>>) -> Result<Arc<Media>, String> {
        let federation = federation.filter(|_| config.is_federation_enabled());
        let store = MediaStore::from_config(&config.media, &config.data_dir)?;
        let fetcher = |policy: AddressPolicy, timeout: Duration, redirects: usize| -> Result<SafeFetcher, String> {
            let dns = crate::federation::discovery::resolver(&config.federation)?;
            let tls = crate::federation::tls::client_config(&config.federation.extra_ca_certificates)?;
            SafeFetcher::new(dns, policy, tls, timeout, redirects)
        };
        let preview = &config.media.url_preview;
        let previews = if preview.enabled {
            let policy = AddressPolicy {
                allow_private: false,
                allowed: preview.allowed_ip_ranges.clone(),
                denied: preview.denied_ip_ranges.clone(),
            };
            Some(fetcher(policy, Duration::from_secs(preview.timeout_secs), preview.max_redirects)?)
        } else {
            None
        };
        let redirects = if federation.is_some() {
            let policy = AddressPolicy {
                allow_private: config.federation.allow_private_destinations,
                ..AddressPolicy::default()
            };
            Some(fetcher(policy, Duration::from_secs(config.media.max_upload_secs), 3)?)
        } else {
            None
        };
        Ok(Arc::new(Media {
            db,
            store,
            server_name: config.server_name.clone(),
            config: config.media.clone(),
            federation,
            objects: tokio::sync::Mutex::new(()),
            uploaded: Notify::new(),
            thumbnailers: Semaphore::new(THUMBNAILERS),
            previews,
            redirects,
        }))
    }

    pub fn server_name(&self) -> &ServerName {
        &self.server_name
    }

    /// The deadline of an upload or download request.
    pub fn transfer_deadline(&self) -> Duration {
        Duration::from_secs(self.config.max_upload_secs)
    }

    pub fn max_upload_bytes(&self) -> u64 {
        self.config.max_upload_bytes
    }

    pub fn previews_enabled(&self) -> bool {
        self.previews.is_some()
    }

    fn mxc(&self, media_id: &str) -> String {
        format!("mxc://{}/{media_id}", self.server_name)
    }

    fn too_large(&self) -> Error {
        Error::TooLarge(
            format!("The file is larger than this server's limit of {} bytes", self.max_upload_bytes()).into(),
        )
    }

    fn storage_error(&self, err: StoreError) -> Error {
        match err {
            StoreError::TooLarge(_) => self.too_large(),
            StoreError::Body(why) => Error::Unknown(why),
            StoreError::NotFound => Error::not_found("The media's file is missing"),
            StoreError::Backend(why) => {
                tracing::error!(%why, "media storage failed");
                Error::BadGateway("media storage is unavailable".to_owned())
            }
        }
    }

    /// Refuses an upload of `adding` bytes that would take `uploader` past their quota.
    async fn check_quota(&self, uploader: &UserId, adding: u64) -> Result<(), Error> {
        let quota = self.config.user_quota_bytes;
        if quota == 0 {
            return Ok(());
        }
        let used = self.db.media_usage(uploader.as_str()).await? as u64;
        if used.saturating_add(adding) > quota {
            return Err(Error::QuotaExceeded(format!(
                "This upload would take you past your media quota of {quota} bytes ({used} in use)"
            )));
        }
        Ok(())
    }

    /// Streams an upload's body into the store, within the size and time limits.
    async fn receive<S, E>(&self, uploader: &UserId, meta: &UploadMeta, body: S) -> Result<Stored, Error>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let max = self.max_upload_bytes();
        if meta.declared_len.is_some_and(|len| len > max) {
            return Err(self.too_large());
        }
        self.check_quota(uploader, meta.declared_len.unwrap_or(0)).await?;
        let idle = Duration::from_secs(self.config.upload_idle_secs);
        let deadline = Duration::from_secs(self.config.max_upload_secs);
        let mut body = std::pin::pin!(body);
        let stored = match tokio::time::timeout(deadline, self.store.put_stream(body.as_mut(), max, idle)).await {
            Err(_) => return Err(Error::TimedOut),
            Ok(Err(err @ StoreError::TooLarge(_))) => {
                // A client that sent on past the limit gets the 413 cleanly, not a reset
                // connection: the rest of what it has in flight is read (a little, briefly).
                linger(body.as_mut()).await;
                return Err(self.storage_error(err));
            }
            Ok(result) => result.map_err(|err| self.storage_error(err))?,
        };
        if let Err(err) = self.check_quota(uploader, stored.size).await {
            self.collect(&stored.sha256).await;
            return Err(err);
        }
        Ok(stored)
    }

    /// `POST /media/v3/upload`: the new URI.
    pub async fn upload<S, E>(self: &Arc<Self>, uploader: &UserId, meta: UploadMeta, body: S) -> Result<String, Error>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let stored = self.receive(uploader, &meta, body).await?;
        let media_id = new_media_id();
        let row = self.stored_row(
            self.server_name.as_str(),
            &media_id,
            Some(uploader.to_string()),
            meta.content_type.clone(),
            meta.filename.clone(),
            &stored,
        );
        {
            let _objects = self.objects.lock().await;
            self.ensure_object(&stored).await?;
            self.db.insert_media(&row).await?;
        }
        self.pregenerate_thumbnails(&media_id, &stored.sha256);
        Ok(self.mxc(&media_id))
    }

    /// The row of a file stored now as `mxc://origin/media_id` (`uploader` is `None` for
    /// another server's file).
    fn stored_row(
        &self,
        origin: &str,
        media_id: &str,
        uploader: Option<String>,
        content_type: Option<String>,
        filename: Option<String>,
        stored: &Stored,
    ) -> MediaRow {
        let now = now_ms();
        MediaRow {
            origin: origin.to_owned(),
            media_id: media_id.to_owned(),
            uploader,
            content_type,
            filename,
            size: Some(stored.size as i64),
            sha256: Some(stored.sha256.clone()),
            created_ts: now,
            expires_ts: None,
            authenticated: self.config.enable_authenticated_media,
            quarantined: false,
            last_access_ts: now,
        }
    }

    /// Under [`Media::objects`]: the object an upload hashed to is still there (a delete of
    /// another row with the same content may have removed it after the upload found it).
    async fn ensure_object(&self, stored: &Stored) -> Result<(), Error> {
        match self.store.size(&stored.sha256).await {
            Ok(_) => Ok(()),
            Err(StoreError::NotFound) => {
                Err(Error::BadJson("the upload was lost in storage; send it again".to_owned()))
            }
            Err(err) => Err(self.storage_error(err)),
        }
    }

    /// `POST /media/v1/create`: a URI to upload to later, and until when it waits (ms).
    pub async fn create(&self, uploader: &UserId) -> Result<(String, i64), Error> {
        let now = now_ms();
        let pending = self.db.count_pending_media(uploader.as_str(), now).await?;
        if pending >= i64::from(self.config.max_pending_uploads) {
            return Err(Error::LimitExceeded { retry_after_ms: 60_000 });
        }
        let media_id = new_media_id();
        let expires = now + (self.config.pending_upload_secs as i64) * 1000;
        self.db
            .insert_media(&MediaRow {
                origin: self.server_name.to_string(),
                media_id: media_id.clone(),
                uploader: Some(uploader.to_string()),
                content_type: None,
                filename: None,
                size: None,
                sha256: None,
                created_ts: now,
                expires_ts: Some(expires),
                authenticated: self.config.enable_authenticated_media,
                quarantined: false,
                last_access_ts: now,
            })
            .await?;
        Ok((self.mxc(&media_id), expires))
    }

    /// `PUT /media/v3/upload/{serverName}/{mediaId}`: the content of a created URI.
    pub async fn upload_to<S, E>(
        self: &Arc<Self>,
        uploader: &UserId,
        server_name: &ServerName,
        media_id: &str,
        meta: UploadMeta,
        body: S,
    ) -> Result<(), Error>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let not_found = || Error::not_found("There is no such media to upload to");
        if server_name != self.server_name || !valid_media_id(media_id) {
            return Err(not_found());
        }
        let row = self.db.media(server_name.as_str(), media_id).await?.ok_or_else(not_found)?;
        if row.uploader.as_deref() != Some(uploader.as_str()) {
            return Err(Error::forbidden("This media was created by another user"));
        }
        if row.sha256.is_some() {
            return Err(Error::CannotOverwriteMedia);
        }
        if row.expires_ts.is_some_and(|expires| expires <= now_ms()) {
            return Err(not_found());
        }
        let stored = self.receive(uploader, &meta, body).await?;
        let completed = {
            let _objects = self.objects.lock().await;
            self.ensure_object(&stored).await?;
            self.db
                .complete_pending_media(
                    server_name.as_str(),
                    media_id,
                    meta.content_type.as_deref(),
                    meta.filename.as_deref(),
                    stored.size as i64,
                    &stored.sha256,
                )
                .await?
        };
        if !completed {
            // Another upload to the same URI finished first.
            self.collect(&stored.sha256).await;
            return Err(Error::CannotOverwriteMedia);
        }
        self.uploaded.notify_waiters();
        self.pregenerate_thumbnails(media_id, &stored.sha256);
        Ok(())
    }

    /// The row of `mxc://origin/media_id` ready to serve through `access`: a local one (waiting
    /// up to `wait` for a created URI's upload), or another server's, fetched and cached.
    pub async fn find(
        &self,
        origin: &ServerName,
        media_id: &str,
        wait: Duration,
        access: Access,
    ) -> Result<MediaRow, Error> {
        let not_found = || Error::not_found("There is no such media");
        if !valid_media_id(media_id) {
            return Err(not_found());
        }
        let local = origin == self.server_name;
        if !local && access == Access::Federation {
            return Err(not_found());
        }
        let row = if local {
            self.local(origin, media_id, wait.min(MAX_WAIT)).await?.ok_or_else(not_found)?
        } else {
            match self.db.media(origin.as_str(), media_id).await? {
                Some(row) if row.sha256.is_some() => {
                    self.db.touch_media(origin.as_str(), media_id, now_ms()).await?;
                    row
                }
                _ if self.federation.is_some() => self.fetch_remote(origin, media_id, wait.min(MAX_WAIT)).await?,
                _ => return Err(not_found()),
            }
        };
        if row.quarantined {
            return Err(not_found());
        }
        if access == Access::Legacy && row.authenticated {
            return Err(Error::not_found("This media is served only through the authenticated media endpoints"));
        }
        Ok(row)
    }

    /// A local row, waiting up to `wait` while it is a created URI without its upload.
    async fn local(&self, origin: &ServerName, media_id: &str, wait: Duration) -> Result<Option<MediaRow>, Error> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.uploaded.notified();
            let Some(row) = self.db.media(origin.as_str(), media_id).await? else { return Ok(None) };
            if row.sha256.is_some() {
                return Ok(Some(row));
            }
            if row.expires_ts.is_some_and(|expires| expires <= now_ms()) {
                return Ok(None);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Error::NotYetUploaded);
            }
        }
    }

    /// Opens a row's file (or a byte range of it). A missing file is a 404 and a file whose size
    /// is not the recorded one a 502, both logged.
    pub async fn open(&self, row: &MediaRow, range: Option<std::ops::Range<u64>>) -> Result<Reading, Error> {
        let sha256 = row.sha256.as_deref().ok_or(Error::NotYetUploaded)?;
        let reading = self.store.get(sha256, range).await.map_err(|err| {
            tracing::warn!(origin = %row.origin, media_id = %row.media_id, %err, "cannot read a media file");
            self.storage_error(err)
        })?;
        if row.size.is_some_and(|size| size as u64 != reading.size) {
            tracing::error!(
                origin = %row.origin, media_id = %row.media_id, expected = ?row.size, found = reading.size,
                "a media file's size is not what was stored: the file is damaged"
            );
            return Err(Error::BadGateway("the media's file is damaged".to_owned()));
        }
        Ok(reading)
    }

    /// Opens a thumbnail's object.
    pub async fn open_thumbnail(&self, thumbnail: &ServedThumbnail) -> Result<Reading, Error> {
        self.store.get(&thumbnail.sha256, None).await.map_err(|err| self.storage_error(err))
    }

    /// A thumbnail of the media in the box `width`×`height` (rounded up to a stored size),
    /// generated and stored if it is not yet.
    pub async fn thumbnail(
        &self,
        row: &MediaRow,
        width: u32,
        height: u32,
        method: Method,
        animated: bool,
    ) -> Result<ServedThumbnail, Error> {
        let (width, height) = thumbnail::round_up(width, height);
        let existing = self.db.media_thumbnails(&row.origin, &row.media_id).await?;
        if let Some(found) = existing.iter().find(|t| {
            t.width == i64::from(width)
                && t.height == i64::from(height)
                && t.method == method.as_str()
                && t.animated == animated
        }) {
            return Ok(ServedThumbnail {
                content_type: found.content_type.clone(),
                sha256: found.sha256.clone(),
                size: found.size as u64,
            });
        }
        let sha256 = row.sha256.as_deref().ok_or(Error::NotYetUploaded)?;
        let made = self.generate(&row.origin, &row.media_id, sha256, width, height, method, animated).await?;
        Ok(ServedThumbnail { content_type: made.content_type, sha256: made.sha256, size: made.size as u64 })
    }

    #[allow(clippy::too_many_arguments)]
    async fn generate(
        &self,
        origin: &str,
        media_id: &str,
        sha256: &str,
        width: u32,
        height: u32,
        method: Method,
        animated: bool,
    ) -> Result<ThumbnailRow, Error> {
        let cannot = |why: String| Error::Unknown(format!("Cannot make a thumbnail of this media: {why}"));
        let source = match self.store.read_all(sha256, MAX_THUMBNAIL_SOURCE_BYTES).await {
            Ok(bytes) => bytes,
            Err(StoreError::TooLarge(_)) => return Err(cannot("the file is too large".to_owned())),
            Err(err) => return Err(self.storage_error(err)),
        };
        let max_pixels = self.config.max_image_pixels;
        let _permit = self.thumbnailers.acquire().await.map_err(|_| Error::Overloaded)?;
        let made = tokio::task::spawn_blocking(move || {
            thumbnail::generate(&source, width, height, method, animated, max_pixels)
        })
        .await
        .map_err(|err| Error::Internal(format!("thumbnailer: {err}")))?;
        let made = match made {
            Ok(made) => made,
            Err(err @ (ThumbnailError::Unsupported | ThumbnailError::TooManyPixels(_))) => {
                return Err(cannot(err.to_string()));
            }
            Err(err @ ThumbnailError::Broken(_)) => return Err(cannot(err.to_string())),
        };
        let content_type = made.content_type.to_owned();
        let stored = self.store.put_bytes(Bytes::from(made.bytes)).await.map_err(|err| self.storage_error(err))?;
        let row = ThumbnailRow {
            width: i64::from(width),
            height: i64::from(height),
            method: method.as_str().to_owned(),
            animated,
            content_type,
            size: stored.size as i64,
            sha256: stored.sha256,
        };
        {
            let _objects = self.objects.lock().await;
            self.db.insert_media_thumbnail(origin, media_id, &row).await?;
        }
        Ok(row)
    }

    /// Makes the common sizes of an uploaded image in the background, so the first clients to
    /// show it find them ready. Files that are not images are left alone.
    fn pregenerate_thumbnails(self: &Arc<Self>, media_id: &str, sha256: &str) {
        let media = self.clone();
        let (origin, media_id, sha256) = (self.server_name.to_string(), media_id.to_owned(), sha256.to_owned());
        tokio::spawn(async move {
            for (width, height, method) in thumbnail::SIZES {
                match media.generate(&origin, &media_id, &sha256, width, height, method, false).await {
                    Ok(_) => {}
                    // Not an image, too large, broken: nothing to make of it.
                    Err(Error::Unknown(_)) => return,
                    Err(err) => {
                        tracing::warn!(%media_id, %err, "could not make a thumbnail");
                        return;
                    }
                }
            }
        });
    }

    /// Fetches `mxc://origin/media_id` from its server (`/_matrix/federation/v1/media/download`)
    /// into the store, and records it.
    async fn fetch_remote(&self, origin: &ServerName, media_id: &str, wait: Duration) -> Result<MediaRow, Error> {
        use ruma::api::federation::authenticated_media::get_content;
        let mut request = get_content::v1::Request::new(media_id.to_owned());
        request.timeout_ms = wait;
        let (Some(federation), Some(redirects)) = (&self.federation, &self.redirects) else {
            return Err(Error::not_found("There is no such media"));
        };
        let response = match federation.send_streaming(origin, request).await {
            Ok(response) => response,
            Err(FederationError::Remote { status: 404, errcode, .. }) if errcode != "M_UNRECOGNIZED" => {
                return Err(Error::not_found("There is no such media"));
            }
            Err(FederationError::Remote { status: 504, errcode, .. }) if errcode == "M_NOT_YET_UPLOADED" => {
                return Err(Error::NotYetUploaded);
            }
            Err(err) => {
                tracing::info!(%origin, %media_id, %err, "could not fetch remote media");
                return Err(Error::BadGateway(format!("could not fetch media from {origin}")));
            }
        };
        let bad = |why: String| {
            tracing::info!(%origin, %media_id, %why, "remote media answer refused");
            Error::BadGateway(format!("{origin} sent media this server cannot read"))
        };
        let content_type = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        // multer parses the parts, but its boundary helper knows only multipart/form-data.
        let boundary = content_type
            .parse::<mime::Mime>()
            .ok()
            .filter(|kind| kind.type_() == mime::MULTIPART && kind.subtype() == "mixed")
            .and_then(|kind| kind.get_param(mime::BOUNDARY).map(|b| b.as_str().to_owned()))
            .ok_or_else(|| bad(format!("not multipart/mixed with a boundary: {content_type}")))?;
        let max = self.max_upload_bytes();
        let constraints = multer::Constraints::new()
            .size_limit(multer::SizeLimit::new().whole_stream(max + 128 * 1024).per_field(max));
        let mut parts = multer::Multipart::with_constraints(response.bytes_stream(), boundary, constraints);
        // The first part is the metadata (an empty object today).
        let metadata =
            parts.next_field().await.map_err(|err| bad(err.to_string()))?.ok_or_else(|| bad("empty".into()))?;
        if metadata.bytes().await.map_err(|err| bad(err.to_string()))?.len() > 64 * 1024 {
            return Err(bad("metadata over 64 KiB".to_owned()));
        }
        let file =
            parts.next_field().await.map_err(|err| bad(err.to_string()))?.ok_or_else(|| bad("no file".into()))?;
        let idle = Duration::from_secs(self.config.upload_idle_secs);
        let header = |name: http::HeaderName| file.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let location = header(http::header::LOCATION);
        let (content_type, disposition) =
            (header(http::header::CONTENT_TYPE), header(http::header::CONTENT_DISPOSITION));
        let stored = match location {
            Some(url) => {
                drop(file);
                let (_, redirected) = redirects.get(&url).await.map_err(bad)?;
                if redirected.content_length().is_some_and(|len| len > max) {
                    return Err(self.too_large());
                }
                self.store.put_stream(redirected.bytes_stream(), max, idle).await
            }
            None => self.store.put_stream(file, max, idle).await,
        }
        .map_err(|err| match err {
            StoreError::TooLarge(_) => self.too_large(),
            StoreError::Body(why) => bad(why),
            other => self.storage_error(other),
        })?;
        let filename = disposition
            .and_then(|value| value.parse::<ruma::http_headers::ContentDisposition>().ok())
            .and_then(|disposition| disposition.filename);
        let row = self.stored_row(origin.as_str(), media_id, None, content_type, filename, &stored);
        {
            let _objects = self.objects.lock().await;
            self.ensure_object(&stored).await?;
            self.db.put_remote_media(&row).await?;
        }
        Ok(row)
    }

    /// Deletes the object `sha256` if no row names it any more.
    async fn collect(&self, sha256: &str) {
        let _objects = self.objects.lock().await;
        self.collect_locked(sha256).await;
    }

    async fn collect_locked(&self, sha256: &str) {
        match self.db.media_object_referenced(sha256).await {
            Ok(false) => {
                if let Err(err) = self.store.delete(sha256).await {
                    tracing::warn!(%sha256, %err, "could not delete a media object");
                }
            }
            Ok(true) => {}
            Err(err) => tracing::warn!(%sha256, %err, "could not check a media object's rows"),
        }
    }

    /// Deletes `mxc://origin/media_id`, its thumbnails and the objects no other row needs; false
    /// when there was no such media.
    pub async fn delete(&self, origin: &str, media_id: &str) -> Result<bool, Error> {
        let _objects = self.objects.lock().await;
        let Some(shas) = self.db.delete_media(origin, media_id).await? else { return Ok(false) };
        for sha256 in shas {
            self.collect_locked(&sha256).await;
        }
        Ok(true)
    }

    /// Quarantines (or releases) a URI: quarantined media is served to no one.
    pub async fn set_quarantined(&self, origin: &str, media_id: &str, quarantined: bool) -> Result<bool, Error> {
        Ok(self.db.set_media_quarantined(origin, media_id, quarantined).await?)
    }

    /// Deletes the cached copies of other servers' media last used before `before_ts`: how many.
    pub async fn purge_remote(&self, before_ts: i64) -> Result<usize, Error> {
        let rows = self.db.remote_media_used_before(before_ts).await?;
        let mut purged = 0;
        for (origin, media_id) in rows {
            if self.delete(&origin, &media_id).await? {
                purged += 1;
            }
        }
        Ok(purged)
    }

    /// Evicts the least recently used remote media until the cache fits its cap.
    async fn evict_remote(&self) -> Result<usize, Error> {
        let cap = self.config.remote_cache_max_bytes as i64;
        let mut total = self.db.remote_media_bytes().await?;
        let mut evicted = 0;
        while total > cap {
            let batch = self.db.least_used_remote_media(100).await?;
            if batch.is_empty() {
                break;
            }
            for (origin, media_id, size) in batch {
                if total <= cap {
                    break;
                }
                if self.delete(&origin, &media_id).await? {
                    evicted += 1;
                }
                total -= size;
            }
            total = self.db.remote_media_bytes().await?;
        }
        Ok(evicted)
    }

    /// Periodic upkeep: created URIs never uploaded, expired previews, the remote cache's cap,
    /// staging objects left by a crash.
    pub async fn housekeeping(&self) -> Result<(), Error> {
        let now = now_ms();
        self.db.delete_expired_pending_media(now).await?;
        self.db.prune_url_previews(now).await?;
        let evicted = self.evict_remote().await?;
        if evicted > 0 {
            tracing::info!(evicted, "remote media evicted to keep the cache within media.remote_cache_max_bytes");
        }
        let stale = self.store.clean_staging(STAGING_MAX_AGE).await.map_err(|err| self.storage_error(err))?;
        if stale > 0 {
            tracing::info!(stale, "removed uploads a crash left unfinished");
        }
        Ok(())
    }

    /// The OpenGraph preview of `url` for `user` (`/media/v1/preview_url`), cached.
    pub async fn preview(self: &Arc<Self>, user: &UserId, url: &str) -> Result<Value, Error> {
        let Some(fetcher) = &self.previews else {
            return Err(Error::Unrecognized);
        };
        let now = now_ms();
        if let Some(cached) = self.db.url_preview(url, now).await? {
            return serde_json::from_str(&cached).map_err(|err| Error::Internal(format!("cached preview: {err}")));
        }
        let limits = &self.config.url_preview;
        let page = fetcher.fetch(url, limits.max_page_bytes).await.map_err(|why| {
            tracing::debug!(%url, %why, "no preview");
            Error::Unknown(format!("Cannot preview this URL: {why}"))
        })?;
        let kind = preview::essence(page.content_type.as_deref());
        let mut og = Map::new();
        let image = if kind.starts_with("image/") {
            Some((page.body.clone(), kind.clone()))
        } else if kind == "text/html" || kind == "application/xhtml+xml" {
            let html = String::from_utf8_lossy(&page.body);
            let (tags, image_url) = preview::open_graph(&html, &page.url);
            og = tags;
            match image_url {
                Some(image_url) => match fetcher.fetch(image_url.as_str(), limits.max_page_bytes).await {
                    Ok(fetched) if preview::essence(fetched.content_type.as_deref()).starts_with("image/") => {
                        let kind = preview::essence(fetched.content_type.as_deref());
                        Some((fetched.body, kind))
                    }
                    _ => None,
                },
                None => None,
            }
        } else {
            return Err(Error::Unknown(format!("Cannot preview this URL: it is {kind}, not a page or an image")));
        };
        og.entry("og:url").or_insert_with(|| Value::String(page.url.to_string()));
        if let Some((bytes, kind)) = image {
            let dimensions = thumbnail::probe(&bytes, self.config.max_image_pixels).ok();
            let size = bytes.len();
            let stream = futures_util::stream::once(async move { Ok::<_, std::convert::Infallible>(bytes) });
            let meta = UploadMeta { content_type: Some(kind.clone()), filename: None, declared_len: Some(size as u64) };
            match self.upload(user, meta, stream).await {
                Ok(mxc) => {
                    og.insert("og:image".to_owned(), json!(mxc));
                    og.insert("og:image:type".to_owned(), json!(kind));
                    og.insert("matrix:image:size".to_owned(), json!(size));
                    if let Some(probe) = dimensions {
                        og.insert("og:image:width".to_owned(), json!(probe.width));
                        og.insert("og:image:height".to_owned(), json!(probe.height));
                    }
                }
                Err(err) => tracing::debug!(%url, %err, "preview image not kept"),
            }
        }
        let value = Value::Object(og);
        let expires = now + (limits.cache_secs as i64) * 1000;
        self.db.put_url_preview(url, &value.to_string(), expires).await?;
        Ok(value)
    }

    /// A user's media and the bytes it takes (`hearth media list-user`).
    pub async fn of_user(&self, user: &UserId) -> Result<(Vec<MediaRow>, i64), Error> {
        let rows = self.db.media_of_user(user.as_str()).await?;
        let bytes = self.db.media_usage(user.as_str()).await?;
        Ok((rows, bytes))
    }
}

/// Reads and drops what is left of a refused body: at most [`LINGER_BYTES`], for at most
/// [`LINGER_TIME`].
async fn linger<S, E>(mut body: std::pin::Pin<&mut S>)
where
    S: Stream<Item = Result<Bytes, E>>,
{
    use futures_util::StreamExt;
    let mut read = 0;
    let _ = tokio::time::timeout(LINGER_TIME, async {
        while let Some(Ok(chunk)) = body.next().await {
            read += chunk.len();
            if read > LINGER_BYTES {
                break;
            }
        }
    })
    .await;
}

/// Types a browser may show inline: media and plain text that cannot run script. Everything else
/// (HTML, SVG, PDF, anything unknown) is served as an attachment.
pub fn safe_inline(content_type: &str) -> bool {
    const INLINE: &[&str] = &[
        "text/css",
        "text/plain",
        "text/csv",
        "application/json",
        "application/ld+json",
        "image/jpeg",
        "image/gif",
        "image/png",
        "image/apng",
        "image/webp",
        "image/avif",
        "video/mp4",
        "video/webm",
        "video/ogg",
        "video/quicktime",
        "audio/mp4",
        "audio/webm",
        "audio/aac",
        "audio/mpeg",
        "audio/ogg",
        "audio/wave",
        "audio/wav",
        "audio/x-wav",
        "audio/x-pn-wav",
        "audio/flac",
        "audio/x-flac",
    ];
    INLINE.contains(&preview::essence(Some(content_type)).as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mxc_uris_parse_and_bad_ids_are_refused() {
        let (server, id) = parse_mxc("mxc://example.org/abc_DEF-1").unwrap();
        assert_eq!((server.as_str(), id.as_str()), ("example.org", "abc_DEF-1"));
        assert!(parse_mxc("mxc://example.org/../etc").is_none());
        assert!(parse_mxc("https://example.org/abc").is_none());
        assert!(!valid_media_id(""));
        assert!(valid_media_id(&new_media_id()));
    }

    #[test]
    fn only_safe_types_are_inline() {
        assert!(safe_inline("image/png"));
        assert!(safe_inline("text/plain; charset=utf-8"));
        assert!(!safe_inline("text/html"));
        assert!(!safe_inline("image/svg+xml"));
        assert!(!safe_inline("application/octet-stream"));
    }
}
