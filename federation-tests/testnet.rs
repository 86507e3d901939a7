//! A test network: a DNS server on loopback, a test CA, and Hearth servers on loopback addresses
//! of their own (127.0.x.y, a block per test process), each with a certificate from the CA for the names it must
//! prove, reachable by one of the spec's discovery methods.
//!
//! Every server's `federation.dns_servers` is this network's DNS server, and
//! `allow_private_destinations` is on because all peers live on 127.0.0.0/8: nothing ever asks the
//! machine's resolver or leaves loopback.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use ruma::api::federation::authentication::{XMatrix, XMatrixSigningInput};
use serde_json::Value;

use crate::{
    dns::DnsServer,
    harness::{Backend, TestServer, install_crypto_provider},
};

/// How other servers find a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discovered {
    /// An A record and the default port 8448.
    Port8448,
    /// `_matrix-fed._tcp.<name>` pointing at another host name and port.
    Srv,
    /// Only the deprecated `_matrix._tcp.<name>`.
    LegacySrv,
    /// `https://<name>/.well-known/matrix/server` (served by the peer itself on port 443)
    /// delegating to `fed.<name>:8449`.
    WellKnown,
    /// The server name has an explicit port (`<name>:8452`): an A record, no `.well-known`.
    ExplicitPort,
    /// The server name is an IP literal with a port (`127.0.0.x:8453`); the given name is unused.
    IpLiteral,
}

pub struct TestNet {
    pub dns: DnsServer,
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A running Hearth server of the network.
pub struct Peer {
    pub server: TestServer,
    pub name: String,
    /// Its federation listener addresses, the one other servers use first.
    pub federation: Vec<SocketAddr>,
}

impl Peer {
    /// The server's signing key file, to sign requests as this server in tests.
    pub fn signing_key(&self) -> hearth::matrix::keys::SigningKey {
        let path = self.server.config_path().parent().unwrap().join("data/signing.key");
        hearth::matrix::keys::SigningKey::from_file(&std::fs::read_to_string(path).unwrap()).unwrap()
    }
}

/// Loopback addresses handed out to servers, one per use, so concurrent tests never share one.
/// Each test process starts in a block of 250 of its own (by process ID), so two test runs at
/// once (two checkouts, a benchmark beside the tests) rarely meet on an address either.
fn next_ip() -> Ipv4Addr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let _ = NEXT.compare_exchange(0, 21 + (std::process::id() % 200) * 250, Ordering::SeqCst, Ordering::SeqCst);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    Ipv4Addr::new(127, 0, (n / 250) as u8, (n % 250 + 1) as u8)
}

/// A fresh loopback address whose `port` is free (another program may hold a port on every
/// address); none after a few tries.
pub fn free_address(port: u16) -> Option<SocketAddr> {
    for _ in 0..5 {
        let addr = SocketAddr::from((next_ip(), port));
        if std::net::TcpListener::bind(addr).is_ok() {
            return Some(addr);
        }
    }
    None
}

impl TestNet {
    pub async fn new() -> TestNet {
        install_crypto_provider();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "Hearth federation test CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.crt"), ca.pem()).unwrap();
        TestNet { dns: DnsServer::start().await, dir, ca }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// A certificate from the test CA for `names`, written as `<file>.crt` and `<file>.key`.
    pub fn certificate(&self, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let params = CertificateParams::new(names.iter().map(|name| name.to_string()).collect::<Vec<_>>()).unwrap();
        let key = KeyPair::generate().unwrap();
        let certificate = params.signed_by(&key, &self.ca).unwrap();
        let (crt, key_path) =
            (self.dir.path().join(format!("{file}.crt")), self.dir.path().join(format!("{file}.key")));
        std::fs::write(&crt, certificate.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (crt, key_path)
    }

    /// The configuration of a server of this network (TOML), with extra `[federation]` lines.
    pub fn config(
        &self,
        name: &str,
        listen: &[SocketAddr],
        certificate: &(PathBuf, PathBuf),
        federation: &str,
    ) -> String {
        let client_ip = listen[0].ip();
        let listen: Vec<String> = listen.iter().map(|addr| format!("\"{addr}\"")).collect();
        format!(
            r#"
            server_name = "{name}"
            listen = ["{client_ip}:0"]
            [registration]
            mode = "open"
            [federation]
            enabled = true
            listen = [{listen}]
            tls_certificate = "{crt}"
            tls_private_key = "{key}"
            extra_ca_certificates = ["{ca}"]
            dns_servers = ["{dns}"]
            {allow_private}
            {federation}
            "#,
            // All peers live on 127.0.0.0/8; a test may keep the default instead.
            allow_private = if federation.contains("allow_private_destinations") {
                ""
            } else {
                "allow_private_destinations = true"
            },
            listen = listen.join(", "),
            crt = certificate.0.display(),
            key = certificate.1.display(),
            ca = self.ca_path().display(),
            dns = self.dns.addr,
        )
    }

    /// Starts a server named `name`, found as `how` says, with extra `[federation]` lines. None
    /// when the port that discovery method needs is taken on every address tried.
    pub async fn peer(&self, backend: Backend, name: &str, how: Discovered, federation: &str) -> Option<Peer> {
        let mut name = name.to_owned();
        let (listen, certificate) = match how {
            Discovered::ExplicitPort => {
                let addr = free_address(8452)?;
                self.dns.a(&name, ip4(addr));
                let certificate = self.certificate(&name, &[&name]);
                name = format!("{name}:8452");
                (vec![addr], certificate)
            }
            Discovered::IpLiteral => {
                let addr = free_address(8453)?;
                let ip = addr.ip().to_string();
                name = addr.to_string();
                (vec![addr], self.certificate(&ip, &[&ip]))
            }
            Discovered::Port8448 => {
                let addr = free_address(8448)?;
                self.dns.a(&name, ip4(addr));
                (vec![addr], self.certificate(&name, &[&name]))
            }
            Discovered::Srv | Discovered::LegacySrv => {
                let addr = free_address(8450)?;
                let target = format!("host.{name}");
                self.dns.a(&target, ip4(addr));
                let service = if how == Discovered::Srv { "_matrix-fed._tcp" } else { "_matrix._tcp" };
                self.dns.srv(&format!("{service}.{name}"), &target, 8450);
                // The certificate proves the server name, never the SRV target.
                (vec![addr], self.certificate(&name, &[&name]))
            }
            Discovered::WellKnown => {
                let well_known = free_address(443)?;
                let delegated = free_address(8449)?;
                let delegated_name = format!("fed.{name}");
                self.dns.a(&name, ip4(well_known));
                self.dns.a(&delegated_name, ip4(delegated));
                let federation = format!("well_known_server = \"{delegated_name}:8449\"\n{federation}");
                let certificate = self.certificate(&name, &[&name, &delegated_name]);
                let config = self.config(&name, &[well_known, delegated], &certificate, &federation);
                let server = TestServer::start_with(backend, &config).await;
                return Some(Peer { server, name, federation: vec![delegated, well_known] });
            }
        };
        let config = self.config(&name, &listen, &certificate, federation);
        let server = TestServer::start_with(backend, &config).await;
        Some(Peer { server, name, federation: listen })
    }

    /// A server named `name` listening only at `fed.<name>:8449`, for a `.well-known` the test
    /// serves itself (see [`TestNet::serve_https`]).
    pub async fn peer_behind_delegation(&self, backend: Backend, name: &str) -> Option<Peer> {
        let addr = free_address(8449)?;
        let delegated_name = format!("fed.{name}");
        self.dns.a(&delegated_name, ip4(addr));
        let certificate = self.certificate(name, &[name, &delegated_name]);
        let config = self.config(name, &[addr], &certificate, "");
        let server = TestServer::start_with(backend, &config).await;
        Some(Peer { server, name: name.to_owned(), federation: vec![addr] })
    }

    /// Serves `app` over HTTPS on `addr` with a certificate for `name` (Hearth's own TLS listener),
    /// until the test's runtime ends.
    pub async fn serve_https(&self, name: &str, addr: SocketAddr, app: axum::Router) {
        let (crt, key) = self.certificate(&format!("web-{name}"), &[name]);
        let tls = hearth::federation::tls::server_config(&crt, &key).unwrap();
        let tcp = tokio::net::TcpListener::bind(addr).await.unwrap();
        let listener = hearth::api::federation::listener::TlsListener::new(tcp, tls).unwrap();
        tokio::spawn(async move { axum::serve(listener, app.into_make_service()).await });
    }

    /// An HTTPS client that trusts the test CA and reaches `peer` by its name without DNS.
    pub fn client_for(&self, peer: &Peer) -> (reqwest::Client, String) {
        let addr = peer.federation[0];
        let host = if peer.federation.len() > 1 { format!("fed.{}", peer.name) } else { peer.name.clone() };
        // A server name with an explicit port (or an IP literal with one): the host part.
        let host = host.split(':').next().unwrap_or_default().to_owned();
        let ca = std::fs::read(self.ca_path()).unwrap();
        let client = reqwest::Client::builder()
            .tls_certs_only(reqwest::Certificate::from_pem_bundle(&ca).unwrap())
            .resolve(&host, addr)
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        (client, format!("https://{host}:{}", addr.port()))
    }
}

/// Waits (at most 10 s) until a line of `server`'s log matches: the log is read from the
/// server's output as it comes, so a line may trail the response that caused it.
pub async fn log_line(server: &TestServer, what: &str, matches: impl Fn(&str) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !server.log_lines().iter().any(|line| matches(line)) {
        assert!(std::time::Instant::now() < deadline, "no log line: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn ip4(addr: SocketAddr) -> Ipv4Addr {
    match addr.ip() {
        std::net::IpAddr::V4(ip) => ip,
        other => panic!("loopback addresses here are IPv4, not {other}"),
    }
}

/// The X-Matrix `Authorization` header of a request signed by `key` as `origin`.
pub fn x_matrix(
    key: &hearth::matrix::keys::SigningKey,
    origin: &str,
    destination: &str,
    method: &str,
    uri: &str,
    body: Option<&Value>,
) -> String {
    let body = body.map(|value| serde_json::to_vec(value).unwrap()).unwrap_or_default();
    let request = http::Request::builder().method(method).uri(uri).body(body).unwrap();
    let input = XMatrixSigningInput::new(origin.try_into().unwrap(), destination.try_into().unwrap(), key.key_pair());
    XMatrix::sign_http_request(&request, input).unwrap().to_string()
}

/// A JSON response body (Null when empty or not JSON).
pub async fn json(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let bytes = response.bytes().await.unwrap_or_default();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// Skips a test whose fixed port is taken everywhere, saying so.
pub fn skipped(what: &str) {
    eprintln!("note: skipping: {what} (the port it needs is taken on every loopback address tried)");
}
