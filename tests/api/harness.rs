//! Test harness: starts the real `hearth` binary on a loopback port with its own data directory
//! and (for the PostgreSQL half) its own freshly created database, and talks to it over HTTP.
//!
//! PostgreSQL comes from `HEARTH_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/postgres`).
//! When it is unreachable the PostgreSQL variants are skipped with a notice, unless
//! `HEARTH_TEST_REQUIRE_POSTGRES=1` (as in CI), in which case they fail.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs each test body once per storage backend, as `<name>::sqlite` and `<name>::postgres`.
macro_rules! backend_tests {
    ($( $(#[$meta:meta])* async fn $name:ident($backend:ident) $body:block )*) => {
        $(
            mod $name {
                #[allow(unused_imports)]
                use super::*;
                #[allow(unused_imports)]
                use crate::harness::*;

                async fn body($backend: Backend) $body

                $(#[$meta])*
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    body(Backend::Sqlite).await
                }

                $(#[$meta])*
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    if crate::harness::postgres_available().await {
                        body(Backend::Postgres).await
                    }
                }
            }
        )*
    };
}
pub(crate) use backend_tests;

/// reqwest is built with rustls but no bundled crypto provider (Hearth passes ring's); any client
/// the tests build needs ring installed as the process default first.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The `hearth` binary under test: this build's, or `HEARTH_BIN` when set (the federation
/// benchmarks drive a release build from the debug test binary).
pub fn binary() -> String {
    std::env::var("HEARTH_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_hearth").to_owned())
}

/// A command for the `hearth` binary without the test run's own `HEARTH_*` variables (such as
/// `HEARTH_TEST_POSTGRES`), which the server would read as configuration keys.
pub fn hearth_command() -> Command {
    let mut command = Command::new(binary());
    for (name, _) in std::env::vars() {
        if name.starts_with("HEARTH_") {
            command.env_remove(name);
        }
    }
    command.env_remove("RUST_LOG");
    command
}

fn postgres_admin_url() -> String {
    std::env::var("HEARTH_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Whether the PostgreSQL half can run; panics when it is required but unreachable.
pub async fn postgres_available() -> bool {
    static AVAILABLE: tokio::sync::OnceCell<bool> = tokio::sync::OnceCell::const_new();
    *AVAILABLE
        .get_or_init(|| async {
            let ok = tokio::time::timeout(Duration::from_secs(5), PgConnection::connect(&postgres_admin_url()))
                .await
                .is_ok_and(|conn| conn.is_ok());
            if !ok {
                if std::env::var("HEARTH_TEST_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
                    panic!(
                        "PostgreSQL at {} is required (HEARTH_TEST_REQUIRE_POSTGRES=1) but unreachable",
                        postgres_admin_url()
                    );
                }
                eprintln!("note: PostgreSQL at {} is unreachable; skipping PostgreSQL variants", postgres_admin_url());
            }
            ok
        })
        .await
}

/// A database created for one test and dropped when the test ends.
pub struct PgDatabase {
    name: String,
}

impl PgDatabase {
    pub async fn create() -> PgDatabase {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "hearth_test_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst),
            rand::random::<u32>()
        );
        let mut conn = PgConnection::connect(&postgres_admin_url()).await.expect("connect to PostgreSQL");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create database");
        PgDatabase { name }
    }

    pub fn url(&self) -> String {
        let admin = postgres_admin_url();
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(base, _)| base);
        format!("{base}/{}", self.name)
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside async context guarantees; use a private runtime on a thread.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                if let Ok(mut conn) = PgConnection::connect(&postgres_admin_url()).await {
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                        .execute(&mut conn)
                        .await;
                }
            });
        })
        .join();
    }
}

/// A running Hearth process.
pub struct TestServer {
    /// Where the server listens (which may differ from the `public_baseurl` it announces).
    pub base_url: String,
    pub http: reqwest::Client,
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
    dir: tempfile::TempDir,
    config_text: String,
    database: Option<PgDatabase>,
    /// Environment variables the server process gets on top of the test's own.
    env: Vec<(String, String)>,
}

/// A logged-in account.
#[derive(Debug, Clone)]
pub struct Account {
    pub user_id: String,
    pub access_token: String,
    pub device_id: String,
    pub password: String,
}

fn merge(base: &mut toml::Table, overrides: toml::Table) {
    for (key, value) in overrides {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(existing)), toml::Value::Table(new)) => merge(existing, new),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

impl TestServer {
    /// A server with test defaults (rate limits off) on `backend`.
    pub async fn start(backend: Backend) -> TestServer {
        Self::start_with(backend, "").await
    }

    /// A server whose configuration is the test defaults overlaid with `config` (TOML).
    pub async fn start_with(backend: Backend, config: &str) -> TestServer {
        Self::start_with_env(backend, config, &[]).await
    }

    /// [`TestServer::start_with`], with environment variables for the server process.
    pub async fn start_with_env(backend: Backend, config: &str, env: &[(&str, &str)]) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let database = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(PgDatabase::create().await),
        };
        let mut table: toml::Table = format!(
            r#"
            server_name = "localhost"
            listen = ["127.0.0.1:0"]
            data_dir = "{}"
            [rate_limits]
            enabled = false
            # Federation stays off even for a real server_name (it would bind 0.0.0.0:8448);
            # the federation tests switch it on with listeners and DNS of their own.
            [federation]
            enabled = false
            [logging]
            format = "json"
            level = "info,hearth=debug"
            "#,
            dir.path().join("data").display()
        )
        .parse()
        .unwrap();
        if let Some(db) = &database {
            merge(&mut table, format!("[database]\nurl = \"{}\"\nmax_connections = 4\n", db.url()).parse().unwrap());
        }
        merge(&mut table, config.parse().expect("test config is TOML"));
        let config_text = toml::to_string(&table).unwrap();
        let mut server = TestServer {
            base_url: String::new(),
            http: {
                install_crypto_provider();
                reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap()
            },
            child: None,
            log: Arc::new(Mutex::new(Vec::new())),
            dir,
            config_text,
            database,
            env: env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        };
        server.launch();
        server
    }

    /// The server's `data_dir`.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("hearth.toml")
    }

    /// Runs `hearth <args>` against this server's configuration (operator commands).
    pub fn cli(&self, args: &[&str], stdin: Option<&str>) -> std::process::Output {
        let mut child = hearth_command()
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .arg("--config")
            .arg(self.config_path())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run hearth");
        if let Some(input) = stdin {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        }
        drop(child.stdin.take());
        child.wait_with_output().unwrap()
    }

    fn launch(&mut self) {
        std::fs::write(self.config_path(), &self.config_text).unwrap();
        let mut child = hearth_command()
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .arg("--config")
            .arg(self.config_path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start hearth");
        let stderr = child.stderr.take().unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let log = self.log.clone();
        std::thread::spawn(move || {
            let mut ready_tx = Some(ready_tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let address = ready_tx.as_ref().and_then(|_| {
                    let value = serde_json::from_str::<Value>(&line).ok()?;
                    value.get("local_address").and_then(Value::as_str).map(str::to_owned)
                });
                // Log first, so the ready line is in the log by the time the server counts as up.
                log.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(line);
                if let Some(address) = address
                    && let Some(tx) = ready_tx.take()
                {
                    let _ = tx.send(format!("http://{address}"));
                }
            }
        });
        match ready_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(url) => self.base_url = url,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "hearth did not start:\n{}",
                    self.log.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).join("\n")
                );
            }
        }
        self.child = Some(child);
    }

    /// Stops the server with SIGTERM and waits for it to exit; returns its exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("server is running");
        signal(&child, "TERM");
        wait_with_deadline(&mut child, Duration::from_secs(40))
    }

    /// Kills the server without warning (`kill -9`).
    pub fn crash(&mut self) {
        let mut child = self.child.take().expect("server is running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Overlays `config` (TOML) on the configuration, for the next [`TestServer::restart`].
    pub fn set_config(&mut self, config: &str) {
        let mut table: toml::Table = self.config_text.parse().unwrap();
        merge(&mut table, config.parse().expect("test config is TOML"));
        self.config_text = toml::to_string(&table).unwrap();
    }

    /// Starts the server again on the same data directory and database.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        self.log.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clear();
        self.launch();
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// Sends a request and returns the status and the JSON body (Null for an empty body).
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.request(method, self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request reaches the server");
        let status = response.status();
        let bytes = response.bytes().await.unwrap();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| panic!("non-JSON body: {}", String::from_utf8_lossy(&bytes)))
        };
        (status, value)
    }

    /// Sends raw bytes as the body.
    pub async fn request_raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.request(method, self.url(path)).body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("request reaches the server");
        let status = response.status();
        let bytes = response.bytes().await.unwrap();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, value)
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        self.request(Method::GET, path, token, None).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        self.request(Method::POST, path, token, Some(body)).await
    }

    pub async fn put(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        self.request(Method::PUT, path, token, Some(body)).await
    }

    pub async fn delete(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        self.request(Method::DELETE, path, token, Some(body)).await
    }

    /// Registers `localpart` through the dummy-auth flow and returns the logged-in account.
    pub async fn register(&self, localpart: &str) -> Account {
        self.register_with(localpart, json!({})).await
    }

    /// Registers with extra request fields (merged into the body).
    pub async fn register_with(&self, localpart: &str, extra: Value) -> Account {
        let password = format!("pw-{localpart}-secret");
        let mut body = json!({
            "username": localpart,
            "password": password,
            "auth": { "type": "m.login.dummy" },
        });
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        let (status, response) = self.post("/_matrix/client/v3/register", None, body).await;
        assert_eq!(status, StatusCode::OK, "register {localpart}: {response}");
        Account {
            user_id: response["user_id"].as_str().unwrap().to_owned(),
            access_token: response["access_token"].as_str().unwrap().to_owned(),
            device_id: response["device_id"].as_str().unwrap().to_owned(),
            password,
        }
    }

    /// Logs in with a password and returns the response body.
    pub async fn login(&self, user: &str, password: &str, extra: Value) -> (StatusCode, Value) {
        let mut body = json!({
            "type": "m.login.password",
            "identifier": { "type": "m.id.user", "user": user },
            "password": password,
        });
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        self.post("/_matrix/client/v3/login", None, body).await
    }

    /// Logs `account`'s user in again as another device, `device_id`.
    pub async fn login_device(&self, account: &Account, device_id: &str) -> Account {
        let localpart = account.user_id.trim_start_matches('@').split(':').next().unwrap();
        let (status, body) = self.login(localpart, &account.password, json!({"device_id": device_id})).await;
        assert_eq!(status, 200, "{body}");
        Account {
            access_token: body["access_token"].as_str().unwrap().to_owned(),
            device_id: device_id.to_owned(),
            ..account.clone()
        }
    }
}

/// Room and sync helpers.
impl TestServer {
    /// `POST /createRoom` as `account`; panics unless it succeeds.
    pub async fn create_room(&self, account: &Account, body: Value) -> String {
        let (status, response) = self.post("/_matrix/client/v3/createRoom", Some(&account.access_token), body).await;
        assert_eq!(status, StatusCode::OK, "createRoom: {response}");
        response["room_id"].as_str().unwrap().to_owned()
    }

    pub async fn join(&self, account: &Account, room_id: &str) {
        let (status, response) = self
            .post(&format!("/_matrix/client/v3/join/{}", enc(room_id)), Some(&account.access_token), json!({}))
            .await;
        assert_eq!(status, StatusCode::OK, "join: {response}");
    }

    pub async fn invite(&self, from: &Account, room_id: &str, user_id: &str) {
        let (status, response) = self
            .post(
                &format!("/_matrix/client/v3/rooms/{}/invite", enc(room_id)),
                Some(&from.access_token),
                json!({"user_id": user_id}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "invite: {response}");
    }

    /// Sends an event with a fresh transaction ID and returns its event ID.
    pub async fn send(&self, account: &Account, room_id: &str, event_type: &str, content: Value) -> String {
        static TXN: AtomicU32 = AtomicU32::new(0);
        let txn = TXN.fetch_add(1, Ordering::SeqCst);
        let path = format!("/_matrix/client/v3/rooms/{}/send/{event_type}/t{txn}", enc(room_id));
        let (status, response) = self.put(&path, Some(&account.access_token), content).await;
        assert_eq!(status, StatusCode::OK, "send: {response}");
        response["event_id"].as_str().unwrap().to_owned()
    }

    /// Sends a text message with a chosen transaction ID.
    pub async fn send_text_with_txn(&self, account: &Account, room_id: &str, txn: &str, body: &str) -> String {
        let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{}", enc(room_id), enc(txn));
        let (status, response) =
            self.put(&path, Some(&account.access_token), json!({"msgtype": "m.text", "body": body})).await;
        assert_eq!(status, StatusCode::OK, "send: {response}");
        response["event_id"].as_str().unwrap().to_owned()
    }

    pub async fn send_text(&self, account: &Account, room_id: &str, body: &str) -> String {
        self.send(account, room_id, "m.room.message", json!({"msgtype": "m.text", "body": body})).await
    }

    pub async fn set_state(
        &self,
        account: &Account,
        room_id: &str,
        event_type: &str,
        state_key: &str,
        content: Value,
    ) -> (StatusCode, Value) {
        let path = format!("/_matrix/client/v3/rooms/{}/state/{event_type}/{}", enc(room_id), enc(state_key));
        self.put(&path, Some(&account.access_token), content).await
    }

    /// `GET /sync` with optional `since`, `filter` (JSON or ID) and timeout; panics unless 200.
    pub async fn sync(&self, account: &Account, since: Option<&str>, filter: Option<&str>, timeout_ms: u64) -> Value {
        let mut path = format!("/_matrix/client/v3/sync?timeout={timeout_ms}");
        if let Some(since) = since {
            path.push_str(&format!("&since={}", enc(since)));
        }
        if let Some(filter) = filter {
            path.push_str(&format!("&filter={}", enc(filter)));
        }
        let (status, response) = self.get(&path, Some(&account.access_token)).await;
        assert_eq!(status, StatusCode::OK, "sync: {response}");
        response
    }

    /// Syncs from `since` until `done` holds for a response (each response is passed in turn;
    /// the returned token is the last `next_batch`). Panics after 20 seconds.
    pub async fn sync_until(
        &self,
        account: &Account,
        since: Option<String>,
        mut done: impl FnMut(&Value) -> bool,
    ) -> (Value, String) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut since = since;
        loop {
            let response = self.sync(account, since.as_deref(), None, 2000).await;
            let next = response["next_batch"].as_str().unwrap().to_owned();
            if done(&response) {
                return (response, next);
            }
            assert!(Instant::now() < deadline, "sync condition not met in time; last response: {response}");
            since = Some(next);
        }
    }

    /// The server's process ID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is running").id()
    }

    /// The PostgreSQL URL of this server's database (None on SQLite).
    pub fn postgres_url(&self) -> Option<String> {
        self.database.as_ref().map(PgDatabase::url)
    }

    /// The stored PDU JSON of an event, read straight from the database.
    pub async fn stored_pdu(&self, event_id: &str) -> Value {
        let json: String = match &self.database {
            Some(db) => {
                let mut conn = PgConnection::connect(&db.url()).await.unwrap();
                sqlx::query_scalar("SELECT json FROM events WHERE event_id = $1")
                    .bind(event_id)
                    .fetch_one(&mut conn)
                    .await
                    .unwrap()
            }
            None => {
                let url = format!("sqlite://{}?mode=ro", self.dir.path().join("data/hearth.db").display());
                let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
                sqlx::query_scalar("SELECT json FROM events WHERE event_id = $1")
                    .bind(event_id)
                    .fetch_one(&mut conn)
                    .await
                    .unwrap()
            }
        };
        serde_json::from_str(&json).unwrap()
    }
}

/// Timeline events of `room_id` in a sync response.
/// alice creates a public room and bob joins it.
pub async fn two_users_in_a_room(server: &TestServer) -> (Account, Account, String) {
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    server.join(&bob, &room).await;
    (alice, bob, room)
}

pub fn timeline<'a>(sync: &'a Value, room_id: &str) -> Vec<&'a Value> {
    sync["rooms"]["join"][room_id]["timeline"]["events"].as_array().map(|a| a.iter().collect()).unwrap_or_default()
}

/// Event IDs of the `m.room.message` events in a timeline.
pub fn message_ids(events: &[&Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect()
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- hearth log ----\n{}",
                self.log.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).join("\n")
            );
        }
        // The database (if any) is dropped after the process is gone.
        let _ = self.database.take();
    }
}

fn signal(child: &Child, name: &str) {
    let _ = Command::new("kill").arg(format!("-{name}")).arg(child.id().to_string()).status();
}

fn wait_with_deadline(child: &mut Child, deadline: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            panic!("hearth did not exit within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts a Matrix error response.
#[track_caller]
pub fn assert_error(response: &(StatusCode, Value), status: u16, errcode: &str) {
    assert_eq!(response.0.as_u16(), status, "unexpected status, body: {}", response.1);
    assert_eq!(response.1["errcode"], errcode, "unexpected errcode, body: {}", response.1);
    assert!(response.1["error"].is_string(), "error message missing: {}", response.1);
}

/// Path helper: percent-encodes a user ID or other identifier for use in a URL path.
pub fn enc(id: &str) -> String {
    let mut out = String::new();
    for byte in id.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(byte as char),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// An ed25519 key of the test's own, signing JSON the way clients do.
pub struct Key {
    der: Vec<u8>,
}

impl Default for Key {
    fn default() -> Key {
        Key::new()
    }
}

impl Key {
    pub fn new() -> Key {
        Key { der: ruma::signatures::Ed25519KeyPair::generate().to_vec() }
    }

    fn pair(&self, name: &str) -> ruma::signatures::Ed25519KeyPair {
        ruma::signatures::Ed25519KeyPair::from_der(&self.der, name.to_owned()).unwrap()
    }

    pub fn public(&self) -> String {
        ruma::serde::Base64::<ruma::serde::base64::Standard, _>::new(self.pair("k").public_key()).encode()
    }

    /// `object` signed by `signer` with key ID `ed25519:<key_name>`, keeping earlier signatures.
    pub fn sign(&self, signer: &str, key_name: &str, object: Value) -> Value {
        let mut canonical: ruma::CanonicalJsonObject = serde_json::from_value(object).unwrap();
        ruma::signatures::sign_json(signer, &self.pair(key_name), &mut canonical).unwrap();
        serde_json::to_value(canonical).unwrap()
    }
}
