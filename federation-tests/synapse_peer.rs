//! A real Synapse as a peer of the test network: the pinned version of
//! `benches/synapse/requirements.txt` (installed once per run by `benches/synapse/setup.sh`),
//! started through `federation-tests/synapse/launch.py`, which keeps its name resolution
//! in-process (see `federation-tests/synapse/README.md`). Hearth finds it through the network's
//! DNS server (an A record, port 8448); it finds Hearth peers through the names it is given.
//!
//! These tests are heavy (a Python homeserver per test) and `#[ignore]`d: `.ci/run` runs them
//! with `cargo test --test federation -- --ignored`.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::testnet::{TestNet, free_address, ip4};

pub struct SynapsePeer {
    pub name: String,
    pub addr: SocketAddr,
    /// HTTPS to the peer (client and federation APIs share its one listener), trusting the CA.
    pub http: reqwest::Client,
    child: Child,
    dir: tempfile::TempDir,
    /// `SYNAPSE_TEST_HOSTS` for launch.py: the names it resolves in-process.
    hosts: String,
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> PathBuf {
    let venv = std::env::var("SYNAPSE_VENV").map(PathBuf::from).unwrap_or_else(|_| "target/bench/synapse-venv".into());
    let venv = if venv.is_absolute() { venv } else { repo().join(venv) };
    venv.join("bin/python")
}

/// Installs the pinned Synapse once per test run (the script itself does nothing when the pins
/// are already installed).
fn install() {
    static INSTALLED: Mutex<bool> = Mutex::new(false);
    let mut installed = INSTALLED.lock().unwrap();
    if !*installed {
        let status = Command::new(repo().join("benches/synapse/setup.sh")).status().expect("runs setup.sh");
        assert!(status.success(), "benches/synapse/setup.sh failed");
        *installed = true;
    }
}

/// Runs Synapse on the configuration in `data`, its output appended to `data/synapse.out`.
fn launch_synapse(data: &Path, hosts: &str) -> Child {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(data.join("synapse.out")).unwrap();
    Command::new(python())
        .arg(repo().join("federation-tests/synapse/launch.py"))
        .arg("--config-path")
        .arg(data.join("homeserver.yaml"))
        .env("SYNAPSE_TEST_HOSTS", hosts)
        .current_dir(data)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("starts Synapse")
}

impl SynapsePeer {
    /// Starts Synapse as `name` on a loopback address of its own at port 8448, resolving the
    /// given names (the Hearth peers) to their addresses. None when port 8448 is taken on every
    /// address tried.
    pub async fn start(net: &TestNet, name: &str, hosts: &[(&str, IpAddr)]) -> Option<SynapsePeer> {
        let addr = free_address(8448)?;
        Some(Self::start_at(net, name, addr, hosts).await)
    }

    /// Starts Synapse as `name` on `addr` (from [`free_address`]): two Synapses that must know
    /// each other's addresses before either starts take theirs first.
    pub async fn start_at(net: &TestNet, name: &str, addr: SocketAddr, hosts: &[(&str, IpAddr)]) -> SynapsePeer {
        tokio::task::spawn_blocking(install).await.unwrap();
        net.dns.a(name, ip4(addr));
        // The address too, for clients that reach Synapse by IP and check the name (node's fetch).
        let ip = addr.ip().to_string();
        let (crt, key) = net.certificate(name, &[name, &ip]);
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path();
        let fill = |template: &str| {
            std::fs::read_to_string(repo().join("federation-tests/synapse").join(template))
                .unwrap()
                .replace("@SERVER_NAME@", name)
                .replace("@PORT@", &addr.port().to_string())
                .replace("@BIND@", &addr.ip().to_string())
                .replace("@DATA_DIR@", &data.display().to_string())
                .replace("@TLS_CERT@", &crt.display().to_string())
                .replace("@TLS_KEY@", &key.display().to_string())
                .replace("@CA_CERT@", &net.ca_path().display().to_string())
                .replace("@SECRET@", "federation-test-secret")
        };
        std::fs::write(data.join("homeserver.yaml"), fill("homeserver.yaml.template")).unwrap();
        std::fs::write(data.join("log.config"), fill("log.config.template")).unwrap();
        let launch = repo().join("federation-tests/synapse/launch.py");
        let config = data.join("homeserver.yaml");
        let status = Command::new(python())
            .arg(&launch)
            .arg("--config-path")
            .arg(&config)
            .arg("--generate-keys")
            .current_dir(data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("runs Synapse to generate its keys");
        assert!(status.success(), "Synapse could not generate its keys");
        let hosts: Vec<String> = hosts.iter().map(|(name, ip)| format!("{name}={ip}")).collect();
        let hosts = hosts.join(",");
        let child = launch_synapse(data, &hosts);
        let ca = std::fs::read(net.ca_path()).unwrap();
        let http = reqwest::Client::builder()
            .tls_certs_only(reqwest::Certificate::from_pem_bundle(&ca).unwrap())
            .resolve(name, addr)
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let mut peer = SynapsePeer { name: name.to_owned(), addr, http, child, dir, hosts };
        peer.wait_until_up().await;
        peer
    }

    /// The Synapse process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops Synapse (the process this peer started, by its pid) and waits for it to end.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts Synapse again on the same data directory, and waits until it answers.
    pub async fn restart(&mut self) {
        self.stop();
        self.child = launch_synapse(self.dir.path(), &self.hosts);
        self.wait_until_up().await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://{}:{}{path}", self.name, self.addr.port())
    }

    async fn wait_until_up(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(response) = self.http.get(self.url("/_matrix/federation/v1/version")).send().await
                && response.status().is_success()
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("Synapse exited ({status}) while starting:\n{}", self.log_tail());
            }
            assert!(Instant::now() < deadline, "Synapse did not start within 120 s:\n{}", self.log_tail());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The end of Synapse's log and output, for failure messages.
    pub fn log_tail(&self) -> String {
        let mut text = String::new();
        for file in ["synapse.out", "homeserver.log"] {
            let content = std::fs::read_to_string(self.dir.path().join(file)).unwrap_or_default();
            let lines: Vec<&str> = content.lines().collect();
            text.push_str(&format!("--- {file}\n{}\n", lines[lines.len().saturating_sub(40)..].join("\n")));
        }
        text
    }

    /// Registers `localpart` (open registration, the dummy stage) and returns its access token.
    pub async fn register(&self, localpart: &str) -> String {
        let body =
            json!({"username": localpart, "password": "a password for tests", "auth": {"type": "m.login.dummy"}});
        let response =
            self.http.post(self.url("/_matrix/client/v3/register")).json(&body).send().await.expect("Synapse answers");
        let value: Value = response.json().await.unwrap();
        value["access_token"].as_str().unwrap_or_else(|| panic!("registered on Synapse: {value}")).to_owned()
    }

    /// A client API request with `token`; the status and JSON body.
    pub async fn request(&self, method: reqwest::Method, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.http.request(method, self.url(path)).bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("Synapse answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

impl SynapsePeer {
    /// Syncs as `token` until a message with `body` is in `room`'s timeline (at most 30 s).
    pub async fn wait_for_message(&self, token: &str, room: &str, body: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut since: Option<String> = None;
        loop {
            let path = match &since {
                Some(since) => format!("/_matrix/client/v3/sync?timeout=2000&since={since}"),
                None => "/_matrix/client/v3/sync?timeout=2000".to_owned(),
            };
            let (_, response) = self.request(reqwest::Method::GET, &path, token, None).await;
            if crate::interop::timeline_has(&response, room, body) {
                return;
            }
            since = response["next_batch"].as_str().map(str::to_owned).or(since);
            assert!(Instant::now() < deadline, "{body:?} never reached Synapse in {room}:\n{}", self.log_tail());
        }
    }
}

impl Drop for SynapsePeer {
    fn drop(&mut self) {
        // Only the process this peer started, by its pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
