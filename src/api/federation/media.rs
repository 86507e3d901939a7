//! Serving our media to other servers: `/_matrix/federation/v1/media/download/{mediaId}` and
//! `/thumbnail/{mediaId}`, answered as `multipart/mixed` (a JSON metadata part, then the file)
//! and streamed.

use std::{sync::Arc, time::Duration};

use axum::{
    body::Body,
    extract::{Path, State},
    http::{HeaderValue, Uri, header},
    response::Response,
};
use bytes::Bytes;
use futures_util::{StreamExt, stream};

use crate::{
    api::{
        client::media::{disposition, thumbnail_params},
        extract::Origin,
    },
    error::Error,
    service::media::{Access, DEFAULT_WAIT, Media, store::Reading},
};

fn wait(uri: &Uri) -> Duration {
    form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
        .find(|(key, _)| key == "timeout_ms")
        .and_then(|(_, value)| value.parse::<u64>().ok())
        .map_or(DEFAULT_WAIT, Duration::from_millis)
}

/// A `multipart/mixed` answer: `{}` as the metadata part, then the file with its type and
/// disposition. Written here rather than with ruma's serialiser, which needs the whole file in
/// memory; the format is two parts between boundaries.
fn multipart(content_type: &str, disposition: &HeaderValue, reading: Reading) -> Response {
    let boundary = crate::service::users::random_string(32);
    let head = format!(
        "--{boundary}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--{boundary}\r\nContent-Type: {content_type}\r\n\
         Content-Disposition: {}\r\n\r\n",
        disposition.to_str().unwrap_or("attachment")
    );
    let tail = format!("\r\n--{boundary}--\r\n");
    let length = head.len() as u64 + (reading.range.end - reading.range.start) + tail.len() as u64;
    let body = stream::once(async move { Ok(Bytes::from(head)) })
        .chain(reading.body.map(|chunk| chunk.map_err(std::io::Error::other)))
        .chain(stream::once(async move { Ok(Bytes::from(tail)) }));
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&format!("multipart/mixed; boundary={boundary}")) {
        headers.insert(header::CONTENT_TYPE, value);
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    response
}

/// A content type safe to put in a part's header line.
fn part_type(content_type: Option<&str>) -> String {
    content_type
        .filter(|value| value.bytes().all(|b| (0x20..0x7f).contains(&b)))
        .unwrap_or("application/octet-stream")
        .to_owned()
}

/// `GET /_matrix/federation/v1/media/download/{mediaId}`
pub async fn download(
    State(media): State<Arc<Media>>,
    Origin(origin): Origin,
    Path(media_id): Path<String>,
    uri: Uri,
) -> Result<Response, Error> {
    tracing::debug!(%origin, %media_id, "media download");
    let server_name = media.server_name().to_owned();
    let row = media.find(&server_name, &media_id, wait(&uri), Access::Federation).await?;
    let reading = media.open(&row, None).await?;
    let content_type = part_type(row.content_type.as_deref());
    Ok(multipart(&content_type, &disposition(Some(&content_type), row.filename.clone()), reading))
}

/// `GET /_matrix/federation/v1/media/thumbnail/{mediaId}`
pub async fn thumbnail(
    State(media): State<Arc<Media>>,
    Origin(origin): Origin,
    Path(media_id): Path<String>,
    uri: Uri,
) -> Result<Response, Error> {
    tracing::debug!(%origin, %media_id, "media thumbnail");
    let (width, height, method, animated) = thumbnail_params(&uri)?;
    let server_name = media.server_name().to_owned();
    let row = media.find(&server_name, &media_id, wait(&uri), Access::Federation).await?;
    let thumbnail = media.thumbnail(&row, width, height, method, animated).await?;
    let reading = media.open_thumbnail(&thumbnail).await?;
    Ok(multipart(&thumbnail.content_type, &disposition(Some(&thumbnail.content_type), None), reading))
}
