//! Extractors: [`Ruma`] parses a request into its ruma type with Matrix errors for every kind of bad
//! input; [`AuthedUser`] and [`GuestOrUser`] prove who is calling; [`Origin`] proves which server
//! signed a federation request; [`ClientIp`] is the peer address.

use std::{net::IpAddr, sync::Arc};

use axum::{
    body::Body,
    extract::{ConnectInfo, FromRef, FromRequest, FromRequestParts, RawPathParams, Request},
    http::{HeaderMap, header, request::Parts},
};
use ruma::api::{
    IncomingRequest, IncomingRequestExt,
    error::{DeserializationError, FromHttpRequestError},
    path_builder::PathBuilder,
};

use crate::{
    api::ServerInfo,
    config::IpNet,
    error::Error,
    federation::keys::Keys,
    service::users::{Authed, Users},
};

/// A request body and path parsed into the ruma request type `T`.
pub struct Ruma<T>(pub T);

/// [`Ruma`] with the body as sent too, for the few endpoints where a field left out means
/// something else than its default (ruma's types cannot tell them apart).
pub struct RumaWithBody<T>(pub T, pub axum::body::Bytes);

impl<T, S> FromRequest<S> for Ruma<T>
where
    T: IncomingRequest + Send,
    S: Send + Sync,
    Arc<ServerInfo>: FromRef<S>,
{
    type Rejection = Error;

    async fn from_request(request: Request, state: &S) -> Result<Self, Error> {
        RumaWithBody::from_request(request, state).await.map(|RumaWithBody(parsed, _)| Ruma(parsed))
    }
}

impl<T, S> FromRequest<S> for RumaWithBody<T>
where
    T: IncomingRequest + Send,
    S: Send + Sync,
    Arc<ServerInfo>: FromRef<S>,
{
    type Rejection = Error;

    async fn from_request(request: Request, state: &S) -> Result<Self, Error> {
        let limit = Arc::<ServerInfo>::from_ref(state).max_request_body_bytes;
        let (mut parts, body) = request.into_parts();
        let declared_len = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<usize>().ok());
        if declared_len.is_some_and(|len| len > limit) {
            return Err(too_large(limit));
        }
        let mut path_params: Vec<String> = match RawPathParams::from_request_parts(&mut parts, state).await {
            Ok(params) => params.iter().map(|(_, value)| value.to_owned()).collect(),
            Err(axum::extract::rejection::RawPathParamsRejection::MissingPathParams(_)) => Vec::new(),
            Err(rejection) => return Err(Error::InvalidParam(rejection.body_text())),
        };
        // Routes registered without a trailing empty parameter (an empty state key) supply one
        // argument less than the endpoint's path has.
        let expected = T::PATH_BUILDER.all_paths().next().map_or(0, |path| path.matches('{').count());
        while path_params.len() < expected {
            path_params.push(String::new());
        }
        let bytes = axum::body::to_bytes(Body::new(body), limit).await.map_err(|err| {
            if std::error::Error::source(&err).is_some_and(|source| source.is::<http_body_util::LengthLimitError>()) {
                too_large(limit)
            } else {
                Error::BadJson(format!("could not read the request body: {err}"))
            }
        })?;
        // An empty body means "no parameters" (several clients send none to POST /join); every
        // JSON body in the API is an object, so treat it as `{}`.
        let bytes = if bytes.is_empty() { axum::body::Bytes::from_static(b"{}") } else { bytes };
        let body: &[u8] = &bytes;
        let mut http_request = axum::http::Request::builder()
            .method(parts.method)
            .uri(parts.uri)
            .body(body)
            .map_err(|err| Error::BadJson(err.to_string()))?;
        *http_request.headers_mut() = parts.headers;
        let args: Vec<&str> = path_params.iter().map(String::as_str).collect();
        // ruma's hand-written deserialisers index into JSON objects in places (e.g. a login body
        // without `type`), which panics; a malformed body must be a 400, never a dropped request.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| T::try_from_http_request(http_request, &args))) {
            Ok(parsed) => parsed.map(|parsed| RumaWithBody(parsed, bytes.clone())).map_err(request_error),
            Err(_) => Err(Error::BadJson("Malformed request body".to_owned())),
        }
    }
}

fn too_large(limit: usize) -> Error {
    Error::TooLarge(format!("Request body is larger than {limit} bytes").into())
}

/// Maps ruma's parse failures to the errcodes Synapse uses for the same mistakes.
fn request_error(err: FromHttpRequestError) -> Error {
    match err {
        FromHttpRequestError::Deserialization(err) => match err {
            DeserializationError::Json(err) => {
                use serde_json::error::Category;
                let message = err.to_string();
                match err.classify() {
                    Category::Syntax | Category::Eof | Category::Io => Error::NotJson(message),
                    Category::Data if message.starts_with("missing field") => Error::MissingParam(message),
                    Category::Data => Error::BadJson(message),
                }
            }
            DeserializationError::Query(err) => {
                let message = err.to_string();
                if message.contains("missing field") {
                    Error::MissingParam(message)
                } else {
                    Error::InvalidParam(message)
                }
            }
            DeserializationError::Ident(err) => Error::InvalidParam(err.to_string()),
            DeserializationError::Utf8(err) => Error::NotJson(err.to_string()),
            other => Error::BadJson(other.to_string()),
        },
        FromHttpRequestError::MethodMismatch { .. } => Error::MethodNotAllowed,
        other => Error::BadJson(other.to_string()),
    }
}

/// The caller's access token: `Authorization: Bearer …`, or the deprecated `access_token` query
/// parameter.
pub fn access_token(headers: &HeaderMap, query: Option<&str>) -> Result<String, Error> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value.to_str().map_err(|_| Error::MissingToken)?;
        let (scheme, token) = value.split_once(' ').ok_or(Error::MissingToken)?;
        if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
            return Err(Error::MissingToken);
        }
        return Ok(token.trim().to_owned());
    }
    query
        .into_iter()
        .flat_map(|query| query.split('&'))
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == "access_token")
        .map(|(_, value)| percent_decode(value))
        .filter(|token| !token.is_empty())
        .ok_or(Error::MissingToken)
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    out.push((hi * 16 + lo) as u8);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The client's IP address, for rate limits and device last-seen records: the one
/// [`crate::api::middleware::client_ip`] found (forwarded by a trusted proxy), else the TCP peer.
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        if let Some(ip) = parts.extensions.get::<ClientIp>() {
            return Ok(*ip);
        }
        Ok(ClientIp(parts.extensions.get::<ConnectInfo<std::net::SocketAddr>>().map(|info| info.0.ip())))
    }
}

/// The client address behind `peer`: when `peer` is a trusted proxy, the rightmost address in
/// `X-Forwarded-For` (or else `Forwarded: for=`) that is not itself a trusted proxy — the hops to
/// its left were written by the client or proxies we know nothing of, so they prove nothing.
pub fn forwarded_client(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let hops: Vec<IpAddr> = if headers.contains_key("x-forwarded-for") {
        headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .filter_map(parse_hop)
            .collect()
    } else {
        headers
            .get_all(header::FORWARDED)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .filter_map(|element| {
                element.split(';').find_map(|pair| {
                    let (key, value) = pair.split_once('=')?;
                    key.trim().eq_ignore_ascii_case("for").then(|| parse_hop(value)).flatten()
                })
            })
            .collect()
    };
    hops.iter().rev().copied().find(|ip| !is_trusted(*ip)).or(hops.first().copied()).unwrap_or(peer)
}

/// One hop of a forwarding header: `1.2.3.4`, `1.2.3.4:5678`, `"[2001:db8::1]:80"`, `2001:db8::1`.
fn parse_hop(text: &str) -> Option<IpAddr> {
    let text = text.trim().trim_matches('"');
    if let Ok(ip) = text.parse() {
        return Some(ip);
    }
    if let Some(rest) = text.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    text.parse::<std::net::SocketAddr>().ok().map(|addr| addr.ip())
}

async fn authenticate<S>(parts: &mut Parts, state: &S) -> Result<Authed, Error>
where
    S: Send + Sync,
    Arc<Users>: FromRef<S>,
{
    let token = access_token(&parts.headers, parts.uri.query())?;
    let ClientIp(ip) = ClientIp::from_request_parts(parts, state).await.unwrap_or(ClientIp(None));
    // Boxed: the lookup's state would otherwise sit inside every authenticated handler's
    // future for the whole request (a parked `/sync` among them).
    Box::pin(Arc::<Users>::from_ref(state).authenticate(&token, ip)).await
}

/// A caller with a valid access token for a full (non-guest) account.
#[derive(Debug, Clone)]
pub struct AuthedUser(pub Authed);

impl<S> FromRequestParts<S> for AuthedUser
where
    S: Send + Sync,
    Arc<Users>: FromRef<S>,
{
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        let authed = authenticate(parts, state).await?;
        if authed.is_guest {
            return Err(Error::GuestAccessForbidden);
        }
        Ok(AuthedUser(authed))
    }
}

/// A caller with a valid access token, guest accounts included (for the few endpoints the spec
/// opens to guests).
#[derive(Debug, Clone)]
pub struct GuestOrUser(pub Authed);

impl<S> FromRequestParts<S> for GuestOrUser
where
    S: Send + Sync,
    Arc<Users>: FromRef<S>,
{
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        authenticate(parts, state).await.map(GuestOrUser)
    }
}

/// The body of a federation request, read once by [`crate::api::middleware::buffer_body`] so that
/// [`Origin`] can check the signature over it and [`Ruma`] can still parse it.
#[derive(Clone)]
pub struct BufferedBody(pub bytes::Bytes);

/// The server that sent a federation request, proven by its X-Matrix signature (origin,
/// destination = us, the origin's key, the signature over method, URI and body). Any failure is
/// 401 `M_UNAUTHORIZED`.
#[derive(Debug, Clone)]
pub struct Origin(pub ruma::OwnedServerName);

impl<S> FromRequestParts<S> for Origin
where
    S: Send + Sync,
    Arc<Keys>: FromRef<S>,
    Arc<ServerInfo>: FromRef<S>,
{
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        let body = parts
            .extensions
            .get::<BufferedBody>()
            .map(|body| body.0.clone())
            .ok_or_else(|| Error::Internal("federation request body was not buffered".to_owned()))?;
        let keys = Arc::<Keys>::from_ref(state);
        let info = Arc::<ServerInfo>::from_ref(state);
        crate::federation::auth::verify_request(
            &keys,
            &info.server_name,
            &parts.method,
            &parts.uri,
            &parts.headers,
            &body,
        )
        .await
        .map(Origin)
        .map_err(|err| Error::Unauthorized(err.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn bearer_header_wins_and_query_is_decoded() {
        let mut headers = HeaderMap::new();
        assert!(matches!(access_token(&headers, None), Err(Error::MissingToken)));
        assert_eq!(access_token(&headers, Some("a=1&access_token=abc%2Bd")).unwrap(), "abc+d");
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer tok"));
        assert_eq!(access_token(&headers, Some("access_token=other")).unwrap(), "tok");
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic dXNlcjpwYXNz"));
        assert!(matches!(access_token(&headers, None), Err(Error::MissingToken)));
    }

    #[test]
    fn forwarded_address_is_believed_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["127.0.0.1".parse().unwrap(), "10.0.0.0/8".parse().unwrap()];
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        let stranger: IpAddr = "203.0.113.7".parse().unwrap();
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.append(*name, HeaderValue::from_static(value));
            }
            map
        };
        let xff = headers(&[("x-forwarded-for", "198.51.100.1, 192.0.2.9, 10.1.2.3")]);
        assert_eq!(forwarded_client(peer, &xff, &trusted), "192.0.2.9".parse::<IpAddr>().unwrap());
        assert_eq!(forwarded_client(stranger, &xff, &trusted), stranger, "only trusted peers are believed");
        assert_eq!(forwarded_client(peer, &xff, &[]), peer);
        let two = headers(&[("x-forwarded-for", "198.51.100.1"), ("x-forwarded-for", "192.0.2.10:4711")]);
        assert_eq!(forwarded_client(peer, &two, &trusted), "192.0.2.10".parse::<IpAddr>().unwrap());
        let forwarded = headers(&[("forwarded", "for=192.0.2.60;proto=http, for=\"[2001:db8::5]:80\";by=10.0.0.1")]);
        assert_eq!(forwarded_client(peer, &forwarded, &trusted), "2001:db8::5".parse::<IpAddr>().unwrap());
        let all_trusted = headers(&[("x-forwarded-for", "10.9.9.9, 127.0.0.1")]);
        assert_eq!(forwarded_client(peer, &all_trusted, &trusted), "10.9.9.9".parse::<IpAddr>().unwrap());
        let junk = headers(&[("x-forwarded-for", "unknown, nonsense")]);
        assert_eq!(forwarded_client(peer, &junk, &trusted), peer);
    }

    #[test]
    fn percent_decoding_handles_truncated_escapes() {
        assert_eq!(percent_decode("a%"), "a%");
        assert_eq!(percent_decode("a%4"), "a%4");
        assert_eq!(percent_decode("a%41"), "aA");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
