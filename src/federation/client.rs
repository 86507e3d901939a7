//! Outbound Server-Server requests: discovery, a connection pool per destination, and the X-Matrix
//! signature on every request that needs one.
//!
//! Each destination gets its own reqwest client. Its URL carries the name the peer's certificate
//! must prove (so reqwest sends it as SNI and rustls checks the certificate against it), its
//! resolver connects to where discovery pointed (an SRV target can differ from that name), and
//! the `Host` header is set explicitly, because the spec's `Host` differs from the URL's
//! authority at several steps (SRV: no port). A shared client with one resolver could not tell two
//! destinations with the same TLS name but different targets apart.

use std::{num::NonZeroUsize, sync::Arc, time::Duration, time::Instant};

use http::header::HOST;
use lru::LruCache;
use parking_lot::Mutex;
use ruma::{
    OwnedServerName, ServerName,
    api::{
        IncomingResponseExt, OutgoingRequest, OutgoingRequestExt,
        auth_scheme::{AuthScheme, NoAuthentication},
        federation::authentication::{ServerSignatures, XMatrixSigningInput},
        path_builder::SinglePath,
    },
    signatures::Ed25519KeyPair,
};

use crate::{
    federation::{
        FederationError,
        discovery::{ConnectHost, Destination, Discovery, SafeResolve},
    },
    service::server_keys::ServerKeys,
};

/// Largest response body read from another server.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Destinations whose connection pool is kept.
const PEER_CACHE_ENTRIES: usize = 4096;

/// How an endpoint's authentication scheme is filled in for an outbound request.
pub trait OutboundAuth: AuthScheme {
    fn input<'a>(origin: &ServerName, destination: &ServerName, key: &'a Ed25519KeyPair) -> Self::Input<'a>;
}

impl OutboundAuth for ServerSignatures {
    fn input<'a>(origin: &ServerName, destination: &ServerName, key: &'a Ed25519KeyPair) -> Self::Input<'a> {
        XMatrixSigningInput::new(origin.to_owned(), destination.to_owned(), key)
    }
}

impl OutboundAuth for NoAuthentication {
    fn input<'a>(_: &ServerName, _: &ServerName, _: &'a Ed25519KeyPair) -> Self::Input<'a> {}
}

struct Peer {
    destination: Destination,
    http: reqwest::Client,
}

/// Sends Server-Server API requests to other servers.
pub struct FederationClient {
    keys: Arc<ServerKeys>,
    discovery: Arc<Discovery>,
    tls: rustls::ClientConfig,
    peers: Mutex<LruCache<OwnedServerName, Arc<Peer>>>,
}

impl FederationClient {
    pub fn new(keys: Arc<ServerKeys>, discovery: Arc<Discovery>, tls: rustls::ClientConfig) -> FederationClient {
        FederationClient {
            keys,
            discovery,
            tls,
            peers: Mutex::new(LruCache::new(NonZeroUsize::new(PEER_CACHE_ENTRIES).expect("non-zero"))),
        }
    }

    pub fn server_name(&self) -> &ServerName {
        self.keys.server_name()
    }

    /// Where discovery finds `destination` now (cached while valid).
    pub async fn destination(&self, destination: &ServerName) -> Result<Destination, FederationError> {
        Ok(self.peer(destination).await?.destination.clone())
    }

    async fn peer(&self, destination: &ServerName) -> Result<Arc<Peer>, FederationError> {
        if let Some(peer) = self.peers.lock().get(destination).cloned()
            && peer.destination.valid_until > Instant::now()
        {
            return Ok(peer);
        }
        let found = self.discovery.resolve(destination).await?;
        tracing::debug!(
            destination = %destination,
            step = found.step,
            host = ?found.connect_host,
            port = found.port,
            host_header = %found.host_header,
            tls_name = %found.tls_name,
            "discovered"
        );
        let fixed = match &found.connect_host {
            ConnectHost::Name(name) => Some(name.clone()),
            // An IP literal URL never reaches the resolver; discovery checked the address.
            ConnectHost::Ip(_) => None,
        };
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(self.tls.clone())
            .dns_resolver(Arc::new(SafeResolve {
                dns: self.discovery.dns().clone(),
                allow_private: self.discovery.allows_private(),
                fixed,
            }))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .http1_only()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("Hearth/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|err| FederationError::Unreachable(format!("HTTP client: {err}")))?;
        let peer = Arc::new(Peer { destination: found, http });
        self.peers.lock().put(destination.to_owned(), peer.clone());
        Ok(peer)
    }

    /// Sends `request` to `destination`, signed when the endpoint requires it, and parses the answer.
    pub async fn send<T>(&self, destination: &ServerName, request: T) -> Result<T::IncomingResponse, FederationError>
    where
        T: OutgoingRequest<PathBuilder = SinglePath>,
        T::Authentication: OutboundAuth,
    {
        let (response, path) = self.execute(destination, request).await?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = read_limited(response, MAX_RESPONSE_BYTES)
            .await
            .map_err(|err| FederationError::Unreachable(format!("{destination}{path}: {err}")))?;
        let mut http_response = http::Response::new(body.as_slice());
        *http_response.status_mut() = status;
        *http_response.headers_mut() = headers;
        T::IncomingResponse::try_from_http_response(http_response)
            .map_err(|err| FederationError::BadResponse(format!("{destination}{path}: {err}")))
    }

    /// Like [`FederationClient::send`], but hands back the successful response unread, for a
    /// body to be streamed (media) rather than parsed.
    pub async fn send_streaming<T>(
        &self,
        destination: &ServerName,
        request: T,
    ) -> Result<reqwest::Response, FederationError>
    where
        T: OutgoingRequest<PathBuilder = SinglePath>,
        T::Authentication: OutboundAuth,
    {
        Ok(self.execute(destination, request).await?.0)
    }

    /// Sends `request`; the response when its status is a success (with the request's path, for
    /// messages), the remote's Matrix error otherwise.
    async fn execute<T>(
        &self,
        destination: &ServerName,
        request: T,
    ) -> Result<(reqwest::Response, String), FederationError>
    where
        T: OutgoingRequest<PathBuilder = SinglePath>,
        T::Authentication: OutboundAuth,
    {
        let peer = self.peer(destination).await?;
        let origin = self.keys.server_name();
        let auth = <T::Authentication as OutboundAuth>::input(origin, destination, self.keys.key().key_pair());
        let mut http_request = request
            .try_into_http_request::<Vec<u8>>(&peer.destination.base_url(), auth, ())
            .map_err(|err| FederationError::BadResponse(format!("cannot build the request: {err}")))?;
        let host = http::HeaderValue::from_str(&peer.destination.host_header)
            .map_err(|_| FederationError::Unreachable(format!("bad Host header for {destination}")))?;
        http_request.headers_mut().insert(HOST, host);
        let path = http_request.uri().path().to_owned();
        let request = reqwest::Request::try_from(http_request)
            .map_err(|err| FederationError::BadResponse(format!("cannot build the request: {err}")))?;

        let response = match peer.http.execute(request).await {
            Ok(response) => response,
            Err(err) => {
                // The next request runs discovery again: the peer may have moved.
                self.peers.lock().pop(destination);
                return Err(FederationError::Unreachable(format!("{destination}{path}: {}", error_chain(&err))));
            }
        };
        let status = response.status();
        if !status.is_success() {
            let body = read_limited(response, MAX_RESPONSE_BYTES)
                .await
                .map_err(|err| FederationError::Unreachable(format!("{destination}{path}: {err}")))?;
            let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let text = |field: &str| value.get(field).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
            return Err(FederationError::Remote {
                server: destination.to_string(),
                status: status.as_u16(),
                errcode: text("errcode"),
                message: text("error"),
            });
        }
        Ok((response, path))
    }
}

/// An error and its sources, outermost first (reqwest's own message says only "client error").
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Reads a response body, refusing more than `limit` bytes.
async fn read_limited(mut response: reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|err| err.to_string())? {
        if body.len() + chunk.len() > limit {
            return Err(format!("the response is larger than {limit} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
