//! Server discovery (Server-Server API, "Resolving server names"): from a server name to the
//! address to connect to, the `Host` header to send and the name its TLS certificate must prove.
//!
//! The steps follow the spec exactly: an IP literal; an explicit port; `/.well-known/matrix/server`
//! (its delegated name then goes through IP literal, explicit port, SRV `_matrix-fed._tcp`, the
//! deprecated `_matrix._tcp`, and port 8448); else SRV on the server's own host name, then port
//! 8448. DNS goes through hickory-resolver, to `federation.dns_servers` when set.
//!
//! Every address Hearth connects to passes [`is_forbidden`] here (including each address a host
//! name resolves to, at connect time, and every redirect of the `.well-known` request), so no
//! outbound request reaches a private, loopback or link-local address unless
//! `federation.allow_private_destinations` is set. This module does no signing and knows no keys.

use std::{
    net::{IpAddr, SocketAddr},
    num::NonZeroUsize,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use hickory_resolver::{
    TokioResolver,
    config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig},
    net::runtime::TokioRuntimeProvider,
    proto::rr::RData,
};
use lru::LruCache;
use parking_lot::Mutex;
use ruma::{OwnedServerName, ServerName};

use crate::{config::FederationConfig, federation::FederationError};

/// The port of the Server-Server API when nothing else names one.
pub const DEFAULT_PORT: u16 = 8448;
/// `.well-known` cache bounds (the spec recommends 24 h by default and at most 48 h; the floor
/// keeps a peer sending `max-age=0` from costing us a request per federation request).
const WELL_KNOWN_DEFAULT: Duration = Duration::from_secs(24 * 3600);
const WELL_KNOWN_MIN: Duration = Duration::from_secs(5 * 60);
const WELL_KNOWN_MAX: Duration = Duration::from_secs(48 * 3600);
/// Failed `.well-known` lookups are cached for 2 minutes, doubling with each consecutive failure,
/// up to the hour the spec recommends at most.
const WELL_KNOWN_ERROR_FIRST: Duration = Duration::from_secs(120);
const WELL_KNOWN_ERROR_MAX: Duration = Duration::from_secs(3600);
const WELL_KNOWN_MAX_BYTES: usize = 64 * 1024;
const WELL_KNOWN_MAX_REDIRECTS: usize = 5;
const WELL_KNOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a resolution found through SRV or plain DNS is reused before it is looked up again.
const RESOLUTION_MAX: Duration = Duration::from_secs(3600);
/// Server names whose `.well-known` answer is remembered.
const WELL_KNOWN_CACHE_ENTRIES: usize = 10_000;

/// Where a server's Server-Server API is, and what to present to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub server_name: OwnedServerName,
    /// The host to connect to: an IP literal, or a name resolved (A/AAAA) at each connection.
    pub connect_host: ConnectHost,
    pub port: u16,
    /// The `Host` header of every request.
    pub host_header: String,
    /// The name (or IP address) the certificate must be valid for, also sent as SNI.
    pub tls_name: String,
    /// Which step of the spec's process found it, for logs.
    pub step: &'static str,
    /// When discovery must run again.
    pub valid_until: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectHost {
    Ip(IpAddr),
    Name(String),
}

impl Destination {
    /// The base URL requests are built on: its host is the TLS name (so the HTTP client sends it as
    /// SNI and checks the certificate against it) and its port the port to connect to.
    pub fn base_url(&self) -> String {
        match self.tls_name.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => format!("https://[{ip}]:{}", self.port),
            _ => format!("https://{}:{}", self.tls_name, self.port),
        }
    }
}

/// Which SRV record found a server.
#[derive(Debug, Clone, Copy)]
enum Srv {
    /// `_matrix-fed._tcp`.
    MatrixFed,
    /// `_matrix._tcp`, deprecated since v1.8.
    Matrix,
}

#[derive(Debug, Clone)]
struct WellKnownEntry {
    delegated: Option<OwnedServerName>,
    expires: Instant,
    consecutive_failures: u32,
}

/// Discovery with its DNS resolver and `.well-known` cache; shared by every outbound request.
pub struct Discovery {
    dns: TokioResolver,
    allow_private: bool,
    well_known_http: reqwest::Client,
    well_known: Mutex<LruCache<String, WellKnownEntry>>,
}

/// Whether outbound requests must not reach `ip`: loopback, private, link-local, unique-local,
/// shared (CGNAT), unspecified, broadcast, documentation, benchmarking and multicast ranges.
pub fn is_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_multicast()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (18..20).contains(&b))
                || a >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_forbidden(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || (first == 0x2001 && v6.segments()[1] == 0x0db8)
                || (first == 0x0064 && v6.segments()[1] == 0xff9b)
        }
    }
}

/// Builds the DNS resolver: the configured name servers (UDP, then TCP for long answers), or the
/// system's configuration.
pub fn resolver(config: &FederationConfig) -> Result<TokioResolver, String> {
    if config.dns_servers.is_empty() {
        let builder =
            TokioResolver::builder_tokio().map_err(|err| format!("cannot read the system DNS configuration: {err}"))?;
        return builder.build().map_err(|err| format!("DNS resolver: {err}"));
    }
    let name_servers = config
        .dns_servers
        .iter()
        .map(|server| {
            let mut udp = ConnectionConfig::udp();
            udp.port = server.0.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = server.0.port();
            NameServerConfig::new(server.0.ip(), true, vec![udp, tcp])
        })
        .collect();
    let mut builder = TokioResolver::builder_with_config(
        ResolverConfig::from_parts(None, Vec::new(), name_servers),
        TokioRuntimeProvider::default(),
    );
    // Explicit name servers mean exactly those: not the hosts file either.
    builder.options_mut().use_hosts_file = ResolveHosts::Never;
    builder.build().map_err(|err| format!("config key `federation.dns_servers`: {err}"))
}

/// A name as hickory should look it up: fully qualified, so no search domain is tried.
fn fqdn(name: &str) -> String {
    if name.ends_with('.') { name.to_owned() } else { format!("{name}.") }
}

/// Looks up `host`'s addresses and leaves out the forbidden ones; an error when none is left.
pub async fn lookup_addresses(dns: &TokioResolver, host: &str, allow_private: bool) -> Result<Vec<IpAddr>, String> {
    let lookup = dns.lookup_ip(fqdn(host)).await.map_err(|err| format!("cannot resolve {host}: {err}"))?;
    let all: Vec<IpAddr> = lookup.iter().collect();
    let allowed: Vec<IpAddr> = all.iter().copied().filter(|ip| allow_private || !is_forbidden(*ip)).collect();
    if allowed.is_empty() {
        return Err(if all.is_empty() {
            format!("{host} has no addresses")
        } else {
            format!("{host} resolves only to private or reserved addresses, which federation does not reach")
        });
    }
    Ok(allowed)
}

/// The reqwest resolver of outbound connections: addresses come from hickory, checked by
/// [`is_forbidden`]. With `fixed`, every name resolves as that host instead (the SRV target of a
/// destination, whose URL carries the name the certificate must prove).
pub struct SafeResolve {
    pub dns: TokioResolver,
    pub allow_private: bool,
    pub fixed: Option<String>,
}

impl reqwest::dns::Resolve for SafeResolve {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let dns = self.dns.clone();
        let allow_private = self.allow_private;
        let host = self.fixed.clone().unwrap_or_else(|| name.as_str().to_owned());
        Box::pin(async move {
            let addresses = lookup_addresses(&dns, &host, allow_private).await?;
            // Port 0: the connector uses the URL's port.
            let addrs: reqwest::dns::Addrs = Box::new(addresses.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}

/// How long a `.well-known` answer may be cached, from its `Cache-Control` or `Expires` header,
/// within the bounds above.
fn well_known_lifetime(headers: &http::HeaderMap, now: SystemTime) -> Duration {
    let directives = headers
        .get_all(http::header::CACHE_CONTROL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|directive| directive.trim().to_ascii_lowercase())
        .collect::<Vec<_>>();
    let lifetime = if directives.iter().any(|d| d == "no-store" || d == "no-cache") {
        Some(Duration::ZERO)
    } else if let Some(seconds) =
        directives.iter().find_map(|d| d.strip_prefix("max-age=").and_then(|s| s.trim_matches('"').parse::<u64>().ok()))
    {
        Some(Duration::from_secs(seconds))
    } else {
        headers
            .get(http::header::EXPIRES)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| httpdate::parse_http_date(value).ok())
            .map(|expires| expires.duration_since(now).unwrap_or(Duration::ZERO))
    };
    lifetime.unwrap_or(WELL_KNOWN_DEFAULT).clamp(WELL_KNOWN_MIN, WELL_KNOWN_MAX)
}

/// The `m.server` of a `.well-known/matrix/server` body, if the body is valid.
fn parse_well_known(body: &[u8]) -> Result<OwnedServerName, String> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|err| format!("not JSON: {err}"))?;
    let server = value.get("m.server").and_then(|v| v.as_str()).ok_or("no string m.server")?;
    OwnedServerName::try_from(server).map_err(|err| format!("m.server `{server}`: {err}"))
}

fn ip_of_literal(name: &ServerName) -> Option<IpAddr> {
    name.host().trim_start_matches('[').trim_end_matches(']').parse().ok()
}

impl Discovery {
    pub fn new(config: &FederationConfig, tls: rustls::ClientConfig) -> Result<Discovery, String> {
        let dns = resolver(config)?;
        let allow_private = config.allow_private_destinations;
        let redirect = reqwest::redirect::Policy::custom(move |attempt| {
            let url = attempt.url();
            // Names are checked when they resolve; IP literals never reach the resolver.
            let host_is_forbidden = url
                .host_str()
                .and_then(|host| host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().ok())
                .is_some_and(is_forbidden);
            if attempt.previous().len() >= WELL_KNOWN_MAX_REDIRECTS {
                attempt.error("too many redirects")
            } else if url.scheme() != "https" {
                attempt.error("redirect away from https")
            } else if host_is_forbidden && !allow_private {
                attempt.error("redirect to a private address")
            } else if attempt.previous().iter().any(|seen| seen == url) {
                attempt.error("redirect loop")
            } else {
                attempt.follow()
            }
        });
        let well_known_http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .dns_resolver(Arc::new(SafeResolve { dns: dns.clone(), allow_private, fixed: None }))
            .redirect(redirect)
            .no_proxy()
            .http1_only()
            .timeout(WELL_KNOWN_TIMEOUT)
            .user_agent(concat!("Hearth/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|err| format!("HTTP client: {err}"))?;
        Ok(Discovery {
            dns,
            allow_private,
            well_known_http,
            well_known: Mutex::new(LruCache::new(NonZeroUsize::new(WELL_KNOWN_CACHE_ENTRIES).expect("non-zero"))),
        })
    }

    pub fn dns(&self) -> &TokioResolver {
        &self.dns
    }

    pub fn allows_private(&self) -> bool {
        self.allow_private
    }

    fn check_ip(&self, ip: IpAddr, server: &ServerName) -> Result<(), FederationError> {
        if !self.allow_private && is_forbidden(ip) {
            return Err(FederationError::Unreachable(format!(
                "{server} is at {ip}, a private or reserved address, which federation does not reach"
            )));
        }
        Ok(())
    }

    /// Runs discovery for `server`.
    pub async fn resolve(&self, server: &ServerName) -> Result<Destination, FederationError> {
        let now = Instant::now();
        let found = |connect_host, port, host_header: &str, tls_name: &str, step, valid_until| Destination {
            server_name: server.to_owned(),
            connect_host,
            port,
            host_header: host_header.to_owned(),
            tls_name: tls_name.to_owned(),
            step,
            valid_until,
        };
        // Step 1: an IP literal.
        if let Some(ip) = ip_of_literal(server) {
            self.check_ip(ip, server)?;
            let port = server.port().unwrap_or(DEFAULT_PORT);
            return Ok(found(
                ConnectHost::Ip(ip),
                port,
                server.as_str(),
                &ip.to_string(),
                "ip literal",
                now + RESOLUTION_MAX,
            ));
        }
        let host = server.host();
        // Step 2: a host name with an explicit port.
        if let Some(port) = server.port() {
            return Ok(found(
                ConnectHost::Name(host.to_owned()),
                port,
                server.as_str(),
                host,
                "explicit port",
                now + RESOLUTION_MAX,
            ));
        }
        // Step 3: `.well-known` delegation.
        let (delegated, well_known_expires) = self.well_known(host).await;
        let valid_until = well_known_expires.min(now + RESOLUTION_MAX);
        if let Some(delegated) = delegated {
            let delegated_host = delegated.host();
            // 3.1: the delegated name is an IP literal.
            if let Some(ip) = ip_of_literal(&delegated) {
                self.check_ip(ip, server)?;
                let port = delegated.port().unwrap_or(DEFAULT_PORT);
                return Ok(found(
                    ConnectHost::Ip(ip),
                    port,
                    delegated.as_str(),
                    &ip.to_string(),
                    "well-known ip literal",
                    valid_until,
                ));
            }
            // 3.2: with an explicit port.
            if let Some(port) = delegated.port() {
                let connect = ConnectHost::Name(delegated_host.to_owned());
                return Ok(found(
                    connect,
                    port,
                    delegated.as_str(),
                    delegated_host,
                    "well-known explicit port",
                    valid_until,
                ));
            }
            // 3.3 and 3.4: SRV records of the delegated name; 3.5: port 8448.
            let (connect, port, step) = match self.srv(delegated_host).await {
                Some((target, port, Srv::MatrixFed)) => (ConnectHost::Name(target), port, "well-known srv _matrix-fed"),
                Some((target, port, Srv::Matrix)) => (ConnectHost::Name(target), port, "well-known srv _matrix"),
                None => (ConnectHost::Name(delegated_host.to_owned()), DEFAULT_PORT, "well-known default port"),
            };
            return Ok(found(connect, port, delegated_host, delegated_host, step, valid_until));
        }
        // Steps 4 and 5: SRV records of the server's own name; step 6: port 8448.
        let (connect, port, step) = match self.srv(host).await {
            Some((target, port, Srv::MatrixFed)) => (ConnectHost::Name(target), port, "srv _matrix-fed"),
            Some((target, port, Srv::Matrix)) => (ConnectHost::Name(target), port, "srv _matrix (deprecated)"),
            None => (ConnectHost::Name(host.to_owned()), DEFAULT_PORT, "default port"),
        };
        Ok(found(connect, port, host, host, step, valid_until))
    }

    /// `_matrix-fed._tcp.<host>`, else the deprecated `_matrix._tcp.<host>`: the chosen target and
    /// port (lowest priority, then the highest weight), or none.
    async fn srv(&self, host: &str) -> Option<(String, u16, Srv)> {
        for (service, which) in [("_matrix-fed._tcp", Srv::MatrixFed), ("_matrix._tcp", Srv::Matrix)] {
            let name = fqdn(&format!("{service}.{host}"));
            let lookup = match self.dns.srv_lookup(name.as_str()).await {
                Ok(lookup) => lookup,
                Err(err) => {
                    tracing::debug!(%name, %err, "no SRV record");
                    continue;
                }
            };
            let best = lookup
                .answers()
                .iter()
                .filter_map(|record| match &record.data {
                    RData::SRV(srv) => Some(srv.clone()),
                    _ => None,
                })
                // A target of "." says the service is decidedly not offered there.
                .filter(|srv| !srv.target.is_root())
                .min_by_key(|srv| (srv.priority, std::cmp::Reverse(srv.weight)));
            if let Some(srv) = best {
                let target = srv.target.to_ascii();
                return Some((target.trim_end_matches('.').to_owned(), srv.port, which));
            }
        }
        None
    }

    /// The delegated server name of `host`'s `.well-known/matrix/server` (none when it failed or
    /// was invalid), and until when that answer holds.
    async fn well_known(&self, host: &str) -> (Option<OwnedServerName>, Instant) {
        let now = Instant::now();
        let previous = self.well_known.lock().get(host).cloned();
        if let Some(entry) = &previous
            && entry.expires > now
        {
            return (entry.delegated.clone(), entry.expires);
        }
        let entry = match self.fetch_well_known(host).await {
            Ok((delegated, lifetime)) => {
                WellKnownEntry { delegated: Some(delegated), expires: now + lifetime, consecutive_failures: 0 }
            }
            Err(err) => {
                let failures = previous.map_or(0, |entry| {
                    if entry.delegated.is_none() { entry.consecutive_failures.saturating_add(1) } else { 0 }
                });
                let backoff = WELL_KNOWN_ERROR_FIRST.saturating_mul(1 << failures.min(10)).min(WELL_KNOWN_ERROR_MAX);
                tracing::debug!(%host, %err, ?backoff, "no .well-known delegation");
                WellKnownEntry { delegated: None, expires: now + backoff, consecutive_failures: failures }
            }
        };
        self.well_known.lock().put(host.to_owned(), entry.clone());
        (entry.delegated, entry.expires)
    }

    async fn fetch_well_known(&self, host: &str) -> Result<(OwnedServerName, Duration), String> {
        let url = format!("https://{host}/.well-known/matrix/server");
        let mut response = self
            .well_known_http
            .get(&url)
            .send()
            .await
            .map_err(|err| format!("{url}: {}", crate::federation::client::error_chain(&err)))?;
        if !response.status().is_success() {
            return Err(format!("{url}: status {}", response.status()));
        }
        let lifetime = well_known_lifetime(response.headers(), SystemTime::now());
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|err| format!("{url}: {err}"))? {
            if body.len() + chunk.len() > WELL_KNOWN_MAX_BYTES {
                return Err(format!("{url}: the body is larger than {WELL_KNOWN_MAX_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        let delegated = parse_well_known(&body).map_err(|err| format!("{url}: {err}"))?;
        Ok((delegated, lifetime))
    }

    /// Forgets a cached `.well-known` answer (tests and operators changing delegation).
    pub fn forget(&self, host: &str) {
        self.well_known.lock().pop(host);
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderValue};

    use super::*;

    #[test]
    fn private_and_reserved_addresses_are_forbidden() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "ff02::1",
        ] {
            assert!(is_forbidden(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["1.1.1.1", "203.0.114.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert!(!is_forbidden(ip.parse().unwrap()), "{ip}");
        }
    }

    fn headers(pairs: &[(http::header::HeaderName, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(name.clone(), HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn well_known_lifetime_follows_headers_within_bounds() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(well_known_lifetime(&HeaderMap::new(), now), WELL_KNOWN_DEFAULT);
        let cc = http::header::CACHE_CONTROL;
        assert_eq!(
            well_known_lifetime(&headers(&[(cc.clone(), "public, max-age=7200")]), now),
            Duration::from_secs(7200)
        );
        assert_eq!(well_known_lifetime(&headers(&[(cc.clone(), "max-age=1")]), now), WELL_KNOWN_MIN);
        assert_eq!(well_known_lifetime(&headers(&[(cc.clone(), "max-age=99999999")]), now), WELL_KNOWN_MAX);
        assert_eq!(well_known_lifetime(&headers(&[(cc, "no-store")]), now), WELL_KNOWN_MIN);
        let expires = httpdate::fmt_http_date(now + Duration::from_secs(3 * 3600));
        let mut map = HeaderMap::new();
        map.insert(http::header::EXPIRES, HeaderValue::from_str(&expires).unwrap());
        assert_eq!(well_known_lifetime(&map, now), Duration::from_secs(3 * 3600));
    }

    #[test]
    fn well_known_bodies_are_parsed_strictly() {
        assert_eq!(parse_well_known(br#"{"m.server": "matrix.example.org:443"}"#).unwrap(), "matrix.example.org:443");
        assert!(parse_well_known(b"not json").is_err());
        assert!(parse_well_known(br#"{"m.server": 5}"#).is_err());
        assert!(parse_well_known(br#"{"m.server": "bad name!"}"#).is_err());
        assert!(parse_well_known(br#"{}"#).is_err());
    }

    #[test]
    fn base_urls_carry_the_tls_name_and_port() {
        let destination = |tls_name: &str, port| Destination {
            server_name: "example.org".try_into().unwrap(),
            connect_host: ConnectHost::Name("target.example.net".into()),
            port,
            host_header: "example.org".into(),
            tls_name: tls_name.into(),
            step: "test",
            valid_until: Instant::now(),
        };
        assert_eq!(destination("example.org", 8448).base_url(), "https://example.org:8448");
        assert_eq!(destination("2001:db8::1", 443).base_url(), "https://[2001:db8::1]:443");
        assert_eq!(destination("192.0.2.1", 8448).base_url(), "https://192.0.2.1:8448");
    }
}
