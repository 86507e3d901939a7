//! Inbound request authentication (Server-Server API, "Request Authentication"): the X-Matrix
//! `Authorization` header names the origin, the destination and a key; the signature covers the
//! method, the request URI, origin, destination and the JSON body. Parsing and the signature
//! check are ruma's (`XMatrix`); this module fetches the origin's key and applies our rules.

use http::{HeaderMap, Method, Uri};
use ruma::{OwnedServerName, ServerName, api::federation::authentication::XMatrix};

use crate::{federation::keys::Keys, service::now_ms};

/// Why a request was not accepted as coming from the server it names (always a 401).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AuthError(pub String);

/// Verifies a request's X-Matrix signature and returns the origin it proves.
///
/// A header without `destination` is accepted (the spec keeps that for older servers) and then
/// verified as addressed to us; one naming another destination is refused.
pub async fn verify_request(
    keys: &Keys,
    our_name: &ServerName,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<OwnedServerName, AuthError> {
    let x_matrix = XMatrix::extract_from_http_headers(headers)
        .map_err(|err| AuthError(format!("missing or malformed X-Matrix authorization: {err}")))?;
    if x_matrix.destination.as_deref().is_some_and(|destination| destination != our_name) {
        return Err(AuthError(format!("this request is addressed to another server, not {our_name}")));
    }
    if x_matrix.origin == our_name {
        return Err(AuthError("a request cannot come from this server itself".to_owned()));
    }
    let wanted = [(x_matrix.origin.clone(), [x_matrix.key.to_string()].into())].into();
    let key_map = keys.public_key_map(&wanted, now_ms()).await;
    if !key_map.get(x_matrix.origin.as_str()).is_some_and(|set| set.contains_key(x_matrix.key.as_str())) {
        return Err(AuthError(format!("cannot get key {} of {}", x_matrix.key, x_matrix.origin)));
    }
    let path_and_query = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let request = http::Request::builder()
        .method(method.clone())
        .uri(path_and_query)
        .body(body)
        .map_err(|err| AuthError(format!("bad request: {err}")))?;
    x_matrix
        .verify_http_request(&request, our_name, &key_map)
        .map_err(|err| AuthError(format!("the X-Matrix signature of {} does not verify: {err}", x_matrix.origin)))?;
    let host = headers.get(http::header::HOST).and_then(|value| value.to_str().ok()).unwrap_or_default();
    tracing::debug!(origin = %x_matrix.origin, host, "verified a federation request");
    Ok(x_matrix.origin)
}
