//! Cross-cutting HTTP behaviour: CORS and `OPTIONS`, request logging without secrets, the client
//! address behind trusted proxies, and the per-address rate limits on registration and login.

use std::{sync::Arc, time::Instant};

use axum::{
    extract::{Request, State},
    http::{HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};

use crate::{
    api::{
        RateLimits, ServerInfo,
        extract::{BufferedBody, ClientIp, forwarded_client},
    },
    config::IpNet,
    error::Error,
};

/// Reads a federation request's body (up to the body limit) into a [`BufferedBody`], for the
/// [`crate::api::extract::Origin`] check, and passes the request on with the same body.
pub async fn buffer_body(State(info): State<Arc<ServerInfo>>, request: Request, next: Next) -> Response {
    let limit = info.max_request_body_bytes;
    let (mut parts, body) = request.into_parts();
    // A body trickling in must not hold the connection past the request's deadline.
    let read = tokio::time::timeout(info.request_timeout, axum::body::to_bytes(body, limit)).await;
    let Ok(read) = read else {
        return Error::TimedOut.into_response();
    };
    let bytes = match read {
        Ok(bytes) => bytes,
        Err(err) => {
            let too_large =
                std::error::Error::source(&err).is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
            return if too_large {
                Error::TooLarge(format!("Request body is larger than {limit} bytes").into()).into_response()
            } else {
                Error::BadJson(format!("could not read the request body: {err}")).into_response()
            };
        }
    };
    parts.extensions.insert(BufferedBody(bytes.clone()));
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes))).await
}

/// Finds the client's address (see [`forwarded_client`]) once per request, for every extractor
/// of [`ClientIp`] after it.
pub async fn client_ip(State(trusted): State<Arc<Vec<IpNet>>>, mut request: Request, next: Next) -> Response {
    let peer = request.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|info| info.0.ip());
    if let Some(peer) = peer {
        let ip = forwarded_client(peer, request.headers(), &trusted);
        request.extensions_mut().insert(ClientIp(Some(ip)));
    }
    next.run(request).await
}

/// Every response carries the CORS headers the spec requires, and any `OPTIONS` request (a CORS
/// preflight) is answered directly, so browser clients work against every endpoint.
pub async fn cors(request: Request, next: Next) -> Response {
    let mut response = if request.method() == Method::OPTIONS {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, PUT, DELETE, OPTIONS"));
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("X-Requested-With, Content-Type, Authorization"),
    );
    response
}

/// Logs each request's method, path, status and duration. The query string is left out: it may
/// carry an access token.
pub async fn log_requests(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    if response.status().is_server_error() {
        tracing::warn!(%method, %path, status, elapsed_ms, "request failed");
    } else {
        tracing::debug!(%method, %path, status, elapsed_ms, "request");
    }
    response
}

fn address_key(ip: ClientIp) -> String {
    ip.0.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string())
}

/// Rate limit on `POST /register`, per client address.
pub async fn limit_register(
    State(limits): State<Arc<RateLimits>>,
    ip: ClientIp,
    request: Request,
    next: Next,
) -> Response {
    match limits.register.check(&address_key(ip)) {
        Ok(()) => next.run(request).await,
        Err(err) => err.into_response(),
    }
}

/// Rate limit on `POST /login`, per client address.
pub async fn limit_login(
    State(limits): State<Arc<RateLimits>>,
    ip: ClientIp,
    request: Request,
    next: Next,
) -> Response {
    match limits.login.check(&address_key(ip)) {
        Ok(()) => next.run(request).await,
        Err(err) => err.into_response(),
    }
}
