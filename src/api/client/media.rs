//! The content repository's client endpoints: upload (streamed, never buffered), the
//! authenticated downloads and thumbnails of spec v1.11, their legacy unauthenticated forms,
//! the media config and URL previews.
//!
//! These are plain axum handlers rather than ruma request types: ruma's media types hold a
//! whole file in a `Vec<u8>`, and a 500 MB upload or download must stream.

use std::{sync::Arc, time::Duration};

use axum::{
    Json,
    body::Body,
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use futures_util::StreamExt;
use ruma::{
    OwnedServerName,
    http_headers::{ContentDisposition, ContentDispositionType},
};
use serde::Deserialize;
use serde_json::json;

use crate::{
    api::{
        RateLimits,
        extract::{AuthedUser, GuestOrUser},
    },
    error::Error,
    service::{
        media::{self, Access, DEFAULT_WAIT, Media, ServedThumbnail, UploadMeta, thumbnail::Method},
        rate_limit::UserAction,
    },
    storage::media::MediaRow,
};

/// What a browser must never do with served media: run it as a page of this origin.
const CONTENT_SECURITY_POLICY: &str = "sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; style-src 'unsafe-inline'; \
     media-src 'self'; object-src 'self';";

/// The query parameters of the media endpoints, all optional and strings until checked.
fn query_param(uri: &Uri, name: &str) -> Option<String> {
    form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

fn bool_param(uri: &Uri, name: &str, default: bool) -> Result<bool, Error> {
    match query_param(uri, name).as_deref() {
        None => Ok(default),
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(other) => Err(Error::InvalidParam(format!("{name} must be true or false, not {other}"))),
    }
}

/// `timeout_ms`: how long a download waits for a created URI's upload.
fn wait_param(uri: &Uri) -> Result<Duration, Error> {
    match query_param(uri, "timeout_ms") {
        None => Ok(DEFAULT_WAIT),
        Some(text) => text
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|_| Error::InvalidParam("timeout_ms must be a number of milliseconds".to_owned())),
    }
}

fn server_param(server_name: &str) -> Result<OwnedServerName, Error> {
    OwnedServerName::try_from(server_name).map_err(|_| Error::not_found("There is no such media"))
}

/// What the uploader's headers and query say about the file.
fn upload_meta(uri: &Uri, headers: &HeaderMap) -> Result<UploadMeta, Error> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|value| value.to_str().map(str::to_owned))
        .transpose()
        .map_err(|_| Error::InvalidParam("Content-Type is not readable text".to_owned()))?;
    let declared_len = match headers.get(header::CONTENT_LENGTH) {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|text| text.parse::<u64>().ok())
                .ok_or_else(|| Error::InvalidParam("Content-Length is not a number".to_owned()))?,
        ),
    };
    let filename = query_param(uri, "filename").filter(|name| !name.is_empty());
    if filename.as_ref().is_some_and(|name| name.len() > 1024) {
        return Err(Error::InvalidParam("filename is longer than 1024 bytes".to_owned()));
    }
    Ok(UploadMeta { content_type, filename, declared_len })
}

/// `GET /_matrix/client/v1/media/config` (and the legacy `/_matrix/media/v3/config`).
pub async fn config(State(media): State<Arc<Media>>, _caller: GuestOrUser) -> Json<serde_json::Value> {
    Json(json!({ "m.upload.size": media.max_upload_bytes() }))
}

/// `POST /_matrix/media/v3/upload`
pub async fn upload(
    State(media): State<Arc<Media>>,
    State(limits): State<Arc<RateLimits>>,
    AuthedUser(authed): AuthedUser,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, Error> {
    let meta = upload_meta(&uri, &headers)?;
    limits.user.check(UserAction::MediaUpload, &authed.user_id)?;
    let mxc = media.upload(&authed.user_id, meta, body.into_data_stream()).await?;
    Ok(Json(json!({ "content_uri": mxc })))
}

/// `POST /_matrix/media/v1/create`
pub async fn create(
    State(media): State<Arc<Media>>,
    State(limits): State<Arc<RateLimits>>,
    AuthedUser(authed): AuthedUser,
) -> Result<Json<serde_json::Value>, Error> {
    limits.user.check(UserAction::MediaUpload, &authed.user_id)?;
    let (mxc, expires) = media.create(&authed.user_id).await?;
    Ok(Json(json!({ "content_uri": mxc, "unused_expires_at": expires })))
}

/// `PUT /_matrix/media/v3/upload/{serverName}/{mediaId}`
pub async fn upload_to(
    State(media): State<Arc<Media>>,
    AuthedUser(authed): AuthedUser,
    Path((server_name, media_id)): Path<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, Error> {
    let meta = upload_meta(&uri, &headers)?;
    let server_name = server_param(&server_name)?;
    media.upload_to(&authed.user_id, &server_name, &media_id, meta, body.into_data_stream()).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
pub struct MediaPath {
    server_name: String,
    media_id: String,
    file_name: Option<String>,
}

/// `GET /_matrix/client/v1/media/download/{serverName}/{mediaId}[/{fileName}]`
pub async fn download(
    State(media): State<Arc<Media>>,
    _caller: GuestOrUser,
    Path(path): Path<MediaPath>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, Error> {
    download_as(&media, path, &uri, &headers, Access::Authenticated).await
}

/// `GET /_matrix/media/v3/download/{serverName}/{mediaId}[/{fileName}]`, unauthenticated: only
/// media stored while `media.enable_authenticated_media` was off.
pub async fn legacy_download(
    State(media): State<Arc<Media>>,
    Path(path): Path<MediaPath>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, Error> {
    download_as(&media, path, &uri, &headers, Access::Legacy).await
}

async fn download_as(
    media: &Media,
    path: MediaPath,
    uri: &Uri,
    headers: &HeaderMap,
    access: Access,
) -> Result<Response, Error> {
    let server_name = server_param(&path.server_name)?;
    if access == Access::Legacy && !bool_param(uri, "allow_remote", true)? && server_name != media.server_name() {
        return Err(Error::not_found("There is no such media"));
    }
    let row = media.find(&server_name, &path.media_id, wait_param(uri)?, access).await?;
    serve_file(media, &row, headers, path.file_name).await
}

#[derive(Deserialize)]
pub struct ThumbnailPath {
    server_name: String,
    media_id: String,
}

/// `GET /_matrix/client/v1/media/thumbnail/{serverName}/{mediaId}`
pub async fn thumbnail(
    State(media): State<Arc<Media>>,
    _caller: GuestOrUser,
    Path(path): Path<ThumbnailPath>,
    uri: Uri,
) -> Result<Response, Error> {
    thumbnail_as(&media, path, &uri, Access::Authenticated).await
}

/// `GET /_matrix/media/v3/thumbnail/{serverName}/{mediaId}`, unauthenticated (see
/// [`legacy_download`]).
pub async fn legacy_thumbnail(
    State(media): State<Arc<Media>>,
    Path(path): Path<ThumbnailPath>,
    uri: Uri,
) -> Result<Response, Error> {
    thumbnail_as(&media, path, &uri, Access::Legacy).await
}

/// The thumbnail query: `width` and `height` (required, positive), `method`, `animated`.
pub fn thumbnail_params(uri: &Uri) -> Result<(u32, u32, Method, bool), Error> {
    let dimension = |name: &str| -> Result<u32, Error> {
        let text = query_param(uri, name).ok_or_else(|| Error::MissingParam(format!("{name} is required")))?;
        text.parse::<u32>()
            .ok()
            .filter(|value| *value > 0)
            .ok_or_else(|| Error::InvalidParam(format!("{name} must be a positive whole number")))
    };
    let (width, height) = (dimension("width")?, dimension("height")?);
    let method = match query_param(uri, "method") {
        None => Method::Scale,
        Some(text) => {
            Method::parse(&text).ok_or_else(|| Error::InvalidParam("method must be crop or scale".to_owned()))?
        }
    };
    Ok((width, height, method, bool_param(uri, "animated", false)?))
}

async fn thumbnail_as(media: &Media, path: ThumbnailPath, uri: &Uri, access: Access) -> Result<Response, Error> {
    let server_name = server_param(&path.server_name)?;
    let (width, height, method, animated) = thumbnail_params(uri)?;
    let row = media.find(&server_name, &path.media_id, wait_param(uri)?, access).await?;
    let thumbnail = media.thumbnail(&row, width, height, method, animated).await?;
    serve_thumbnail(media, &thumbnail).await
}

/// `GET /_matrix/client/v1/media/preview_url` (and the legacy `/_matrix/media/v3/preview_url`).
pub async fn preview_url(
    State(media): State<Arc<Media>>,
    AuthedUser(authed): AuthedUser,
    uri: Uri,
) -> Result<Json<serde_json::Value>, Error> {
    if !media.previews_enabled() {
        return Err(Error::Unrecognized);
    }
    let url = query_param(&uri, "url").ok_or_else(|| Error::MissingParam("url is required".to_owned()))?;
    Ok(Json(media.preview(&authed.user_id, &url).await?))
}

/// Headers every served file carries: it may be shown but never run, and it never changes.
fn protect(headers: &mut HeaderMap, etag: &str) {
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert("cross-origin-resource-policy", HeaderValue::from_static("cross-origin"));
    // Content-addressed, so a URI's bytes never change; private, as downloads are per user.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=86400"));
    if let Ok(etag) = HeaderValue::from_str(etag) {
        headers.insert(header::ETAG, etag);
    }
}

fn content_type_header(content_type: Option<&str>) -> HeaderValue {
    content_type
        .and_then(|value| HeaderValue::from_str(value).ok())
        .unwrap_or_else(|| HeaderValue::from_static("application/octet-stream"))
}

/// `Content-Disposition`: inline only for types that cannot run script, attachment otherwise.
pub fn disposition(content_type: Option<&str>, filename: Option<String>) -> HeaderValue {
    let kind = if content_type.is_some_and(media::safe_inline) {
        ContentDispositionType::Inline
    } else {
        ContentDispositionType::Attachment
    };
    let value = ContentDisposition::new(kind).with_filename(filename).to_string();
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("attachment"))
}

fn not_modified(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get(header::IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.split(',').any(|tag| tag.trim() == etag || tag.trim() == "*"))
}

/// The one byte range a request asks for, when it asks for one this response can honour: `Ok(None)`
/// serves the whole file, `Err` is 416.
fn requested_range(headers: &HeaderMap, size: u64, etag: &str) -> Result<Option<std::ops::Range<u64>>, ()> {
    let Some(range) = headers.get(header::RANGE).and_then(|value| value.to_str().ok()) else { return Ok(None) };
    // `If-Range` naming another version: the whole (current) file.
    if let Some(if_range) = headers.get(header::IF_RANGE).and_then(|value| value.to_str().ok())
        && if_range.trim() != etag
    {
        return Ok(None);
    }
    match http_range_header::parse_range_header(range).map(|parsed| parsed.validate(size)) {
        Ok(Ok(ranges)) if ranges.len() == 1 => Ok(Some(*ranges[0].start()..ranges[0].end() + 1)),
        // Several ranges (rarely asked for by media players) get the whole file.
        Ok(Ok(_)) => Ok(None),
        Ok(Err(http_range_header::RangeUnsatisfiableError::Unsatisfiable)) => Err(()),
        // A malformed Range header is ignored, as RFC 9110 allows.
        _ => Ok(None),
    }
}

/// Serves a media row's file: the security headers, `ETag`/`304`, and a byte range (206) when
/// one is asked for.
pub async fn serve_file(
    media: &Media,
    row: &MediaRow,
    headers: &HeaderMap,
    filename: Option<String>,
) -> Result<Response, Error> {
    let sha256 = row.sha256.as_deref().ok_or(Error::NotYetUploaded)?;
    let etag = format!("\"{sha256}\"");
    if not_modified(headers, &etag) {
        let mut response = StatusCode::NOT_MODIFIED.into_response();
        protect(response.headers_mut(), &etag);
        return Ok(response);
    }
    let size = row.size.unwrap_or(0) as u64;
    let range = match requested_range(headers, size, &etag) {
        Ok(range) => range,
        Err(()) => {
            let mut response = (StatusCode::RANGE_NOT_SATISFIABLE, "").into_response();
            if let Ok(value) = HeaderValue::from_str(&format!("bytes */{size}")) {
                response.headers_mut().insert(header::CONTENT_RANGE, value);
            }
            return Ok(response);
        }
    };
    let partial = range.is_some();
    let reading = media.open(row, range).await?;
    let length = reading.range.end - reading.range.start;
    let body = Body::from_stream(reading.body.map(|chunk| chunk.map_err(std::io::Error::other)));
    let mut response = Response::new(body);
    if partial {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        let content_range =
            format!("bytes {}-{}/{}", reading.range.start, reading.range.end.saturating_sub(1), reading.size);
        if let Ok(value) = HeaderValue::from_str(&content_range) {
            response.headers_mut().insert(header::CONTENT_RANGE, value);
        }
    }
    let out = response.headers_mut();
    out.insert(header::CONTENT_TYPE, content_type_header(row.content_type.as_deref()));
    out.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    out.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    out.insert(
        header::CONTENT_DISPOSITION,
        disposition(row.content_type.as_deref(), filename.or_else(|| row.filename.clone())),
    );
    protect(out, &etag);
    Ok(response)
}

/// Serves a thumbnail (always an image this server made, so inline).
pub async fn serve_thumbnail(media: &Media, thumbnail: &ServedThumbnail) -> Result<Response, Error> {
    let reading = media.open_thumbnail(thumbnail).await?;
    let body = Body::from_stream(reading.body.map(|chunk| chunk.map_err(std::io::Error::other)));
    let mut response = Response::new(body);
    let out = response.headers_mut();
    out.insert(header::CONTENT_TYPE, content_type_header(Some(&thumbnail.content_type)));
    out.insert(header::CONTENT_LENGTH, HeaderValue::from(thumbnail.size));
    out.insert(header::CONTENT_DISPOSITION, disposition(Some(&thumbnail.content_type), None));
    protect(out, &format!("\"{}\"", thumbnail.sha256));
    Ok(response)
}
