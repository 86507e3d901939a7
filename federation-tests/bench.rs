//! Federation benchmarks (issue 8's "Measure"): cross-server delivery latency and the time to
//! join a big remote room, Hearth beside Synapse in the same run. Measurements, never asserted
//! on speed, so `#[ignore]`d; the figures go to BENCHMARKS.md. Run against a release build:
//!
//! ```sh
//! cargo build --release --bin hearth
//! HEARTH_BIN=target/release/hearth cargo test --test federation -- --ignored --nocapture --test-threads 1 bench::
//! ```
//!
//! Every load loop is bounded in count and time; everything talks to loopback only.

mod search;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use reqwest::Method;
use serde_json::{Value, json};

use crate::{
    harness::{Account, Backend, TestServer, enc},
    synapse_peer::SynapsePeer,
    testnet::{Discovered, TestNet, free_address, skipped},
};

/// A client of either homeserver: base URL, HTTP client and access token.
#[derive(Clone)]
struct Client {
    label: String,
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    fn hearth(label: &str, server: &TestServer, account: &Account) -> Client {
        Client {
            label: label.to_owned(),
            http: server.http.clone(),
            base: server.base_url.clone(),
            token: account.access_token.clone(),
        }
    }

    fn synapse(label: &str, peer: &SynapsePeer, token: &str) -> Client {
        Client { label: label.to_owned(), http: peer.http.clone(), base: peer.url(""), token: token.to_owned() }
    }

    async fn request(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if !self.token.is_empty() {
            request = request.bearer_auth(&self.token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                (status, response.json().await.unwrap_or(Value::Null))
            }
            Err(err) => (0, json!({ "error": err.to_string() })),
        }
    }

    async fn create_room(&self, body: Value) -> String {
        let (status, created) = self.request(Method::POST, "/_matrix/client/v3/createRoom", Some(body)).await;
        assert_eq!(status, 200, "{}: createRoom: {created}", self.label);
        created["room_id"].as_str().unwrap().to_owned()
    }

    async fn join(&self, room: &str, via: &str) {
        let path = format!("/_matrix/client/v3/join/{}?server_name={}", enc(room), enc(via));
        let (status, body) = self.request(Method::POST, &path, Some(json!({}))).await;
        assert_eq!(status, 200, "{}: join: {body}", self.label);
    }

    async fn send(&self, room: &str, txn: &str, text: &str) -> u16 {
        let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(room));
        self.request(Method::PUT, &path, Some(json!({"msgtype": "m.text", "body": text}))).await.0
    }

    /// The sync token after everything so far.
    async fn sync_token(&self) -> String {
        let (status, body) = self.request(Method::GET, "/_matrix/client/v3/sync?timeout=0", None).await;
        assert_eq!(status, 200, "{}: sync: {body}", self.label);
        body["next_batch"].as_str().unwrap().to_owned()
    }
}

/// Latencies in milliseconds, summarised.
struct Summary {
    p50: f64,
    p99: f64,
    max: f64,
    count: usize,
}

fn summarise(mut values: Vec<f64>) -> Summary {
    values.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if values.is_empty() {
            return f64::NAN;
        }
        values[((values.len() as f64 * q).ceil() as usize).clamp(1, values.len()) - 1]
    };
    Summary { p50: at(0.50), p99: at(0.99), max: at(1.0), count: values.len() }
}

/// Syncs as `receiver` from `since` and records when each message whose body starts with
/// `prefix` first shows up, until `expected` have or `deadline` passes.
async fn watch(
    receiver: Client,
    room: String,
    prefix: String,
    expected: usize,
    since: String,
    deadline: Instant,
) -> HashMap<String, Instant> {
    let mut seen = HashMap::new();
    let mut since = since;
    while seen.len() < expected && Instant::now() < deadline {
        let path = format!("/_matrix/client/v3/sync?timeout=5000&since={}", enc(&since));
        let (status, body) = receiver.request(Method::GET, &path, None).await;
        let now = Instant::now();
        if status != 200 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let events = body["rooms"]["join"][room.as_str()]["timeline"]["events"].as_array().cloned().unwrap_or_default();
        for event in events {
            if let Some(text) = event["content"]["body"].as_str()
                && text.starts_with(&prefix)
            {
                seen.entry(text.to_owned()).or_insert(now);
            }
        }
        if let Some(next) = body["next_batch"].as_str() {
            since = next.to_owned();
        }
    }
    seen
}

/// `count` messages from `sender` at `rate` per second into `room`, each timed from the start of
/// its send request to its arrival in `receiver`'s `/sync`.
async fn delivery_latency(sender: &Client, receiver: &Client, room: &str, count: usize, rate: f64) -> (Summary, usize) {
    let prefix = format!("lat {} to {} #", sender.label, receiver.label);
    let since = receiver.sync_token().await;
    let deadline = Instant::now() + Duration::from_secs_f64(count as f64 / rate + 60.0);
    let watcher = tokio::spawn(watch(receiver.clone(), room.to_owned(), prefix.clone(), count, since, deadline));
    let mut sent = HashMap::new();
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failed = 0;
    for i in 0..count {
        ticks.tick().await;
        let text = format!("{prefix}{i}");
        let started = Instant::now();
        let sender = sender.clone();
        let room = room.to_owned();
        let txn = format!("lat{}{i}", rand_suffix());
        sent.insert(text.clone(), started);
        // Each send on its own task, so a slow answer does not delay the next send.
        tokio::spawn(async move { sender.send(&room, &txn, &text).await });
    }
    let arrived = watcher.await.unwrap();
    let mut latencies = Vec::new();
    for (text, started) in &sent {
        match arrived.get(text) {
            Some(at) => latencies.push(at.saturating_duration_since(*started).as_secs_f64() * 1000.0),
            None => failed += 1,
        }
    }
    (summarise(latencies), failed)
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed) + std::process::id() as u64 * 1_000_000
}

/// Two Hearths and two Synapses that know each other, on SQLite (Synapse's default here too).
struct Network {
    _net: TestNet,
    hearth_a: crate::testnet::Peer,
    hearth_b: crate::testnet::Peer,
    synapse_a: SynapsePeer,
    synapse_b: SynapsePeer,
}

async fn network() -> Option<Network> {
    let net = TestNet::new().await;
    let hearth_a = net.peer(Backend::Sqlite, "hearth-a.test", Discovered::Port8448, "").await?;
    let hearth_b = net.peer(Backend::Sqlite, "hearth-b.test", Discovered::Port8448, "").await?;
    let (sa, sb) = (free_address(8448)?, free_address(8448)?);
    let hearths = [("hearth-a.test", hearth_a.federation[0].ip()), ("hearth-b.test", hearth_b.federation[0].ip())];
    let mut hosts_a = hearths.to_vec();
    hosts_a.push(("synapse-b.test", sb.ip()));
    let mut hosts_b = hearths.to_vec();
    hosts_b.push(("synapse-a.test", sa.ip()));
    let synapse_a = SynapsePeer::start_at(&net, "synapse-a.test", sa, &hosts_a).await;
    let synapse_b = SynapsePeer::start_at(&net, "synapse-b.test", sb, &hosts_b).await;
    Some(Network { _net: net, hearth_a, hearth_b, synapse_a, synapse_b })
}

/// Cross-server delivery latency at a fixed rate: Hearth→Hearth, Hearth→Synapse and
/// Synapse→Hearth beside Synapse→Synapse, each pair alone in its own room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: prints figures for BENCHMARKS.md"]
async fn bench_cross_server_latency() {
    const COUNT: usize = 300;
    const RATE: f64 = 10.0;
    let Some(n) = network().await else { return skipped("port 8448") };
    let ha = n.hearth_a.server.register("alice").await;
    let hb = n.hearth_b.server.register("bob").await;
    let clients = [
        Client::hearth("hearth-a", &n.hearth_a.server, &ha),
        Client::hearth("hearth-b", &n.hearth_b.server, &hb),
        Client::synapse("synapse-a", &n.synapse_a, &n.synapse_a.register("sam").await),
        Client::synapse("synapse-b", &n.synapse_b, &n.synapse_b.register("sue").await),
    ];
    let servers = ["hearth-a.test", "hearth-b.test", "synapse-a.test", "synapse-b.test"];
    let pairs = [
        (0, 1, "Hearth → Hearth"),
        (0, 2, "Hearth → Synapse"),
        (2, 0, "Synapse → Hearth"),
        (2, 3, "Synapse → Synapse"),
    ];
    let mut report = Report::new(
        "Federation: cross-server delivery latency",
        &format!(
            "{COUNT} messages at {RATE}/s per pair, each pair alone in a room of its own after 5 warm-up messages; \
             latency from the sender's clock before the send request to the receiver's clock when the message \
             arrives in its `/sync` (ms). Two Hearths and two Synapses on SQLite, on loopback with TLS."
        ),
        "bench_cross_server_latency",
    );
    report.line("| path | p50 | p99 | max | delivered |");
    report.line("|---|---|---|---|---|");
    for (from, to, label) in pairs {
        let (sender, receiver) = (&clients[from], &clients[to]);
        let room = sender.create_room(json!({"preset": "public_chat"})).await;
        receiver.join(&room, servers[from]).await;
        // Warm-up: connections, keys and the first transaction, outside the measurement.
        let (warm, _) = delivery_latency(sender, receiver, &room, 5, 5.0).await;
        assert_eq!(warm.count, 5, "{label}: the warm-up messages never arrived");
        let (summary, lost) = delivery_latency(sender, receiver, &room, COUNT, RATE).await;
        report.line(&format!(
            "| {label} | {:.1} | {:.1} | {:.1} | {}/{COUNT} |",
            summary.p50, summary.p99, summary.max, summary.count
        ));
        assert_eq!(lost, 0, "{label}: {lost} messages never arrived");
    }
    report.save("federation-latency.md");
}

/// A benchmark's Markdown section: printed as it grows and saved under `benches/results/`,
/// where `benches/report.py` puts it into BENCHMARKS.md.
struct Report {
    text: String,
}

impl Report {
    fn new(title: &str, method: &str, test: &str) -> Report {
        let commit = std::process::Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .unwrap_or_default();
        let binary = crate::harness::binary();
        let text = format!(
            "## {title}\n\nHearth {commit} (`{binary}`), Synapse {}. {method}\n\nCommand: `cargo build --release --bin hearth && \
             HEARTH_BIN=$PWD/target/release/hearth cargo test --test federation -- --ignored --nocapture --test-threads 1 \
             bench::{test}`\n\n",
            synapse_version(),
            binary = binary.rsplit("/target/").next().map_or(binary.clone(), |tail| format!("target/{tail}")),
        );
        print!("\n{text}");
        Report { text }
    }

    fn line(&mut self, line: &str) {
        println!("{line}");
        self.text.push_str(line);
        self.text.push('\n');
    }

    fn save(&self, file: &str) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results").join(file);
        std::fs::write(&path, &self.text).unwrap();
        println!("(saved to {})", path.display());
    }
}

/// The pinned Synapse version, from `benches/synapse/requirements.txt`.
fn synapse_version() -> String {
    let pins = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/synapse/requirements.txt"),
    )
    .unwrap_or_default();
    pins.lines()
        .find_map(|line| line.strip_prefix("matrix-synapse=="))
        .map_or("(unpinned)".to_owned(), |v| v.trim().to_owned())
}

/// Registers `count` users on `server` and joins them to `room`, a few requests at a time.
async fn fill_room(server: &TestServer, room: &str, count: usize, localpart_prefix: &str) {
    let server = Arc::new(server_handle(server));
    let next = Arc::new(Mutex::new(0usize));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (server, next, room, prefix) = (server.clone(), next.clone(), room.to_owned(), localpart_prefix.to_owned());
        workers.push(tokio::spawn(async move {
            loop {
                let i = {
                    let mut next = next.lock().unwrap();
                    if *next >= count {
                        return;
                    }
                    *next += 1;
                    *next - 1
                };
                let token = server.register(&format!("{prefix}{i}")).await;
                let member =
                    Client { label: "member".into(), http: server.http.clone(), base: server.base.clone(), token };
                let path = format!("/_matrix/client/v3/rooms/{}/join", enc(&room));
                let (status, body) = member.request(Method::POST, &path, Some(json!({}))).await;
                assert_eq!(status, 200, "member join: {body}");
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
}

/// What the fill workers need of a Hearth: its URL and client (a `TestServer` is not `Clone`).
struct ServerHandle {
    http: reqwest::Client,
    base: String,
}

fn server_handle(server: &TestServer) -> ServerHandle {
    ServerHandle { http: server.http.clone(), base: server.base_url.clone() }
}

impl ServerHandle {
    async fn register(&self, localpart: &str) -> String {
        let body = json!({"username": localpart, "password": "a member password", "auth": {"type": "m.login.dummy"}});
        let response = self.http.post(format!("{}/_matrix/client/v3/register", self.base)).json(&body).send().await;
        let value: Value = response.expect("Hearth answers").json().await.unwrap();
        value["access_token"].as_str().unwrap_or_else(|| panic!("registered: {value}")).to_owned()
    }
}

/// Times `join` while `local` keeps sending into a room of its own server (bounded), and
/// returns the join time and the local sends' latencies.
async fn join_while_sending(
    join: impl std::future::Future<Output = ()>,
    local: &Client,
    local_room: &str,
) -> (Duration, Summary) {
    let started = Instant::now();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let (local, room, done) = (local.clone(), local_room.to_owned(), done.clone());
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let stop = Instant::now() + Duration::from_secs(600);
            for i in 0..100_000 {
                if done.load(std::sync::atomic::Ordering::Relaxed) || Instant::now() > stop {
                    break;
                }
                let sent = Instant::now();
                let status = local.send(&room, &format!("local{}{i}", rand_suffix()), "while a join runs").await;
                assert_eq!(status, 200, "a local send failed during the join");
                latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            latencies
        })
    };
    join.await;
    let took = started.elapsed();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    (took, summarise(sender.await.unwrap()))
}

/// Time to join a remote room of 1,000 and of 5,000 members (on a Hearth), for a Hearth user and
/// for a Synapse user, with each joining server's local send latency while its join runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: prints figures for BENCHMARKS.md"]
async fn bench_remote_join_of_a_big_room() {
    let Some(n) = network().await else { return skipped("port 8448") };
    let owner = n.hearth_a.server.register("owner").await;
    let owner_client = Client::hearth("hearth-a", &n.hearth_a.server, &owner);
    let joiner_h = n.hearth_b.server.register("joiner").await;
    let joiner_h = Client::hearth("hearth-b", &n.hearth_b.server, &joiner_h);
    let joiner_s = Client::synapse("synapse-a", &n.synapse_a, &n.synapse_a.register("joiner").await);
    let local_h = joiner_h.create_room(json!({"preset": "private_chat"})).await;
    let local_s = joiner_s.create_room(json!({"preset": "private_chat"})).await;
    let mut report = Report::new(
        "Federation: joining a big remote room",
        "A room on a Hearth (SQLite) with N local members is joined by a user of another Hearth and by a user \
         of a Synapse (both SQLite); join time is the joining client's `POST /join` (make_join, send_join, checks, \
         commit; Hearth asks for the full state, Synapse for partial state with `omit_members`). Meanwhile a user of the joining server sends into a room of its own \
         every 50 ms: the local send latency while the join runs.",
        "bench_remote_join_of_a_big_room",
    );
    report.line("| members | joining server | join time (s) | local send p50 (ms) | p99 | max | sends |");
    report.line("|---|---|---|---|---|---|---|");
    for members in [1_000usize, 5_000] {
        let room_now = owner_client.create_room(json!({"preset": "public_chat"})).await;
        let fill_started = Instant::now();
        fill_room(&n.hearth_a.server, &room_now, members, &format!("m{members}_")).await;
        eprintln!("filled a room of {members} in {:.1} s", fill_started.elapsed().as_secs_f64());
        for joiner in [&joiner_h, &joiner_s] {
            let local = if joiner.label.starts_with("hearth") { &local_h } else { &local_s };
            let (took, sends) = join_while_sending(joiner.join(&room_now, "hearth-a.test"), joiner, local).await;
            report.line(&format!(
                "| {members} | {} | {:.2} | {:.1} | {:.1} | {:.1} | {} |",
                if joiner.label.starts_with("hearth") { "Hearth" } else { "Synapse" },
                took.as_secs_f64(),
                sends.p50,
                sends.p99,
                sends.max,
                sends.count
            ));
        }
    }
    report.save("federation-join.md");
}

/// Sends `count` messages `"{prefix} {i}"` into `room` as `client`, four requests at a time.
async fn send_many(client: &Client, room: &str, prefix: &str, count: usize) {
    let next = Arc::new(Mutex::new(0usize));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (client, next, room, prefix) = (client.clone(), next.clone(), room.to_owned(), prefix.to_owned());
        workers.push(tokio::spawn(async move {
            let stop = Instant::now() + Duration::from_secs(1800);
            loop {
                let i = {
                    let mut next = next.lock().unwrap();
                    if *next >= count || Instant::now() > stop {
                        return;
                    }
                    *next += 1;
                    *next - 1
                };
                let status =
                    client.send(&room, &format!("{prefix}{}-{i}", rand_suffix()), &format!("{prefix} {i}")).await;
                assert_eq!(status, 200, "{}: a send failed", client.label);
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
}

/// Pages `room`'s history backwards from its newest event as `client` (1,000 a page, at most
/// 100 pages); how many messages starting with `prefix` it holds.
async fn paginate_count(client: &Client, room: &str, prefix: &str) -> usize {
    let mut from: Option<String> = None;
    let mut found = 0;
    for _ in 0..100 {
        let mut path = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=1000", enc(room));
        if let Some(token) = &from {
            path.push_str(&format!("&from={}", enc(token)));
        }
        let (status, body) = client.request(Method::GET, &path, None).await;
        if status != 200 {
            return found;
        }
        let chunk = body["chunk"].as_array().cloned().unwrap_or_default();
        found += chunk.iter().filter(|e| e["content"]["body"].as_str().is_some_and(|b| b.starts_with(prefix))).count();
        match body["end"].as_str() {
            Some(end) if !chunk.is_empty() => from = Some(end.to_owned()),
            _ => break,
        }
    }
    found
}

/// Times from now until `client`'s paginated history of `room` holds `count` messages starting
/// with `prefix` (at most 20 minutes); None when it never does.
async fn time_until_complete(client: &Client, room: &str, prefix: &str, count: usize) -> (Option<Duration>, usize) {
    let started = Instant::now();
    let mut seen = 0;
    while started.elapsed() < Duration::from_secs(1200) {
        seen = paginate_count(client, room, prefix).await;
        if seen >= count {
            return (Some(started.elapsed()), seen);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    (None, seen)
}

fn seconds(took: Option<Duration>) -> String {
    took.map_or("did not finish in 20 min".to_owned(), |took| format!("{:.1}", took.as_secs_f64()))
}

/// Issue 9's "Measure": the time to fill a gap of N events after an outage (the receiving server
/// down while the other sends N messages; from its restart until its user's paginated history
/// holds all N), and the time for a server new to a room of N messages to paginate all of it,
/// Hearth beside Synapse. N is `HEARTH_BENCH_GAP_EVENTS` (default 10,000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: prints figures for BENCHMARKS.md"]
async fn bench_gap_fill_and_history() {
    let count: usize = std::env::var("HEARTH_BENCH_GAP_EVENTS").ok().and_then(|n| n.parse().ok()).unwrap_or(10_000);
    let Some(mut n) = network().await else { return skipped("port 8448") };
    let ha = Client::hearth("hearth-a", &n.hearth_a.server, &n.hearth_a.server.register("alice").await);
    let bob = n.hearth_b.server.register("bob").await;
    let mut hb = Client::hearth("hearth-b", &n.hearth_b.server, &bob);
    let sa = Client::synapse("synapse-a", &n.synapse_a, &n.synapse_a.register("sam").await);
    let sb = Client::synapse("synapse-b", &n.synapse_b, &n.synapse_b.register("sue").await);
    let mut report = Report::new(
        "Federation: gaps after an outage, and history for a new server",
        &format!(
            "Outage: the receiving server is stopped while a user of the sending server sends N = {count} messages \
             (four at a time), then started; the time is from its start until its user's `/messages` (paged back, \
             1,000 a page) holds all N — retries, catch-up, gap filling and backfill together. History: a server \
             new to a room of N messages joins it, and the time is its user's paging back through all N. All on \
             SQLite, loopback with TLS."
        ),
        "bench_gap_fill_and_history",
    );
    report.line("| what | from → to | time (s) | messages held |");
    report.line("|---|---|---|---|");

    // Outages: Hearth from Hearth, Hearth from Synapse, Synapse from Synapse.
    for (label, sender, sender_name) in [
        ("Hearth → Hearth", &ha, "hearth-a.test"),
        ("Synapse → Hearth", &sa, "synapse-a.test"),
        ("Synapse → Synapse", &sa, "synapse-a.test"),
    ] {
        let to_synapse = label.ends_with("Synapse");
        let room = sender.create_room(json!({"preset": "public_chat"})).await;
        if to_synapse { &sb } else { &hb }.join(&room, sender_name).await;
        if to_synapse {
            n.synapse_b.stop();
        } else {
            n.hearth_b.server.stop();
        }
        let prefix = format!("outage {}", rand_suffix());
        send_many(sender, &room, &prefix, count).await;
        if to_synapse {
            n.synapse_b.restart().await;
        } else {
            n.hearth_b.server.restart();
            // A restarted Hearth listens on a new client port.
            hb = Client::hearth("hearth-b", &n.hearth_b.server, &bob);
        }
        let receiver = if to_synapse { &sb } else { &hb };
        let (took, held) = time_until_complete(receiver, &room, &prefix, count).await;
        report.line(&format!("| outage of {count} | {label} | {} | {held}/{count} |", seconds(took)));
    }

    // History: a server new to a room of N messages pages through all of it.
    let room_h = ha
        .create_room(json!({"preset": "public_chat", "initial_state": [
            {"type": "m.room.history_visibility", "state_key": "", "content": {"history_visibility": "shared"}}
        ]}))
        .await;
    let room_s = sa
        .create_room(json!({"preset": "public_chat", "initial_state": [
            {"type": "m.room.history_visibility", "state_key": "", "content": {"history_visibility": "shared"}}
        ]}))
        .await;
    let prefix_h = format!("history {}", rand_suffix());
    let prefix_s = format!("history {}", rand_suffix());
    send_many(&ha, &room_h, &prefix_h, count).await;
    send_many(&sa, &room_s, &prefix_s, count).await;
    for (label, joiner, room, via, prefix) in [
        ("Hearth → Hearth", &hb, &room_h, "hearth-a.test", &prefix_h),
        ("Synapse → Hearth", &hb, &room_s, "synapse-a.test", &prefix_s),
        ("Synapse → Synapse", &sb, &room_s, "synapse-a.test", &prefix_s),
        ("Hearth → Synapse", &sb, &room_h, "hearth-a.test", &prefix_h),
    ] {
        joiner.join(room, via).await;
        let (took, held) = time_until_complete(joiner, room, prefix, count).await;
        report.line(&format!("| history of {count} | {label} | {} | {held}/{count} |", seconds(took)));
    }
    report.save("federation-gaps.md");
}

/// Where forged PDUs go: a receiving server's name and a signed-request client for it.
struct Inbound {
    name: String,
    http: reqwest::Client,
    base: String,
}

impl Inbound {
    /// `PUT /send/{txn}` of `pdus`, signed as `origin` with `key`; how many PDUs were accepted.
    async fn send(&self, origin: &str, key: &hearth::matrix::keys::SigningKey, txn: &str, pdus: Vec<Value>) -> usize {
        let count = pdus.len();
        let body = json!({"origin": origin, "origin_server_ts": 1, "pdus": pdus});
        let uri = format!("/_matrix/federation/v1/send/{txn}");
        let auth = crate::testnet::x_matrix(key, origin, &self.name, "PUT", &uri, Some(&body));
        let response =
            self.http.put(format!("{}{uri}", self.base)).header("Authorization", auth).json(&body).send().await;
        let Ok(response) = response else { return 0 };
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        let refused = answer["pdus"]
            .as_object()
            .map_or(count, |results| results.values().filter(|result| result.get("error").is_some()).count());
        count - refused
    }
}

/// Chains of `per_room` messages by `sender` (of `server`, signed with `key`) in each of
/// `rooms`, each chain starting on the sender's join, interleaved room by room.
fn forge_chains(
    rooms: &[(String, ruma::OwnedEventId, u64, Vec<ruma::OwnedEventId>)],
    sender: &str,
    server: &str,
    key: &hearth::matrix::keys::SigningKey,
    per_room: usize,
) -> Vec<Value> {
    let mut heads: Vec<(ruma::OwnedEventId, u64)> =
        rooms.iter().map(|(_, join, depth, _)| (join.clone(), *depth)).collect();
    let mut pdus = Vec::with_capacity(rooms.len() * per_room);
    for i in 0..per_room {
        for ((room, _, _, auth), head) in rooms.iter().zip(heads.iter_mut()) {
            let pdu = crate::hostile::forge(
                room,
                sender,
                server,
                key,
                ("m.room.message", None),
                json!({"msgtype": "m.text", "body": format!("inbound {i}")}),
                (&head.0, head.1),
                auth,
            );
            *head = (crate::hostile::id_of(&pdu).as_str().try_into().unwrap(), head.1 + 1);
            pdus.push(pdu);
        }
    }
    pdus
}

/// Issue 9's "Measure": inbound `/send` throughput — PDUs a server takes in per second from
/// transactions of 50, for one busy room and spread over 100 rooms, Hearth beside Synapse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: prints figures for BENCHMARKS.md"]
async fn bench_inbound_send_throughput() {
    const TOTAL: usize = 2_000;
    let Some(n) = network().await else { return skipped("port 8448") };
    let bob = n.hearth_b.server.register("bob").await;
    let hb = Client::hearth("hearth-b", &n.hearth_b.server, &bob);
    let key = n.hearth_b.signing_key();
    let (hearth_http, hearth_base) = n._net.client_for(&n.hearth_a);
    let receivers = [
        (
            Client::hearth("hearth-a", &n.hearth_a.server, &n.hearth_a.server.register("alice").await),
            Inbound { name: "hearth-a.test".into(), http: hearth_http, base: hearth_base },
        ),
        (
            Client::synapse("synapse-a", &n.synapse_a, &n.synapse_a.register("sam").await),
            Inbound { name: "synapse-a.test".into(), http: n.synapse_a.http.clone(), base: n.synapse_a.url("") },
        ),
    ];
    let mut report = Report::new(
        "Federation: inbound `/send` throughput",
        &format!(
            "{TOTAL} signed message PDUs of a user of another server (a Hearth, whose key signs them), sent to the \
             receiving server in transactions of 50, one transaction at a time, as chains on that user's join: \
             in one room, and spread over 100 rooms (20 each, interleaved). PDUs/s from the first transaction \
             to the last answer. SQLite, loopback with TLS."
        ),
        "bench_inbound_send_throughput",
    );
    report.line("| receiver | rooms | PDUs accepted | time (s) | PDUs/s |");
    report.line("|---|---|---|---|---|");
    for (owner, inbound) in &receivers {
        for rooms in [1usize, 100] {
            let mut placed = Vec::new();
            for _ in 0..rooms {
                let room = owner.create_room(json!({"preset": "public_chat"})).await;
                hb.join(&room, &inbound.name).await;
                let (status, state) =
                    hb.request(Method::GET, &format!("/_matrix/client/v3/rooms/{}/state", enc(&room)), None).await;
                assert_eq!(status, 200, "{state}");
                let id_of = |event_type: &str, state_key: &str| -> ruma::OwnedEventId {
                    let event = state
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|e| e["type"] == event_type && e["state_key"] == state_key)
                        .unwrap_or_else(|| panic!("{event_type} in the state: {state}"));
                    event["event_id"].as_str().unwrap().try_into().unwrap()
                };
                let join = id_of("m.room.member", &bob.user_id);
                let depth = n.hearth_b.server.stored_pdu(join.as_str()).await["depth"].as_u64().unwrap();
                let auth = vec![id_of("m.room.power_levels", ""), join.clone()];
                placed.push((room, join, depth, auth));
            }
            let pdus = forge_chains(&placed, &bob.user_id, "hearth-b.test", &key, TOTAL / rooms);
            let started = Instant::now();
            let mut accepted = 0;
            for (i, batch) in pdus.chunks(50).enumerate() {
                accepted +=
                    inbound.send("hearth-b.test", &key, &format!("bench{}-{i}", rand_suffix()), batch.to_vec()).await;
                assert!(started.elapsed() < Duration::from_secs(1200), "bounded in time");
            }
            let took = started.elapsed().as_secs_f64();
            report.line(&format!(
                "| {} | {rooms} | {accepted}/{} | {took:.2} | {:.0} |",
                if owner.label.starts_with("hearth") { "Hearth" } else { "Synapse" },
                pdus.len(),
                accepted as f64 / took
            ));
        }
    }
    report.save("federation-inbound.md");
}

/// The user ID behind `client`'s token.
async fn whoami(client: &Client) -> String {
    let (status, body) = client.request(Method::GET, "/_matrix/client/v3/account/whoami", None).await;
    assert_eq!(status, 200, "{}: whoami: {body}", client.label);
    body["user_id"].as_str().unwrap().to_owned()
}

/// Syncs as `receiver` until `deadline` and hands on each ephemeral event of `room` with the
/// time it arrived.
fn watch_ephemeral(
    receiver: Client,
    room: String,
    since: String,
    deadline: Instant,
) -> tokio::sync::mpsc::UnboundedReceiver<(Instant, Value)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut since = since;
        while Instant::now() < deadline && !tx.is_closed() {
            let path = format!("/_matrix/client/v3/sync?timeout=5000&since={}", enc(&since));
            let (status, body) = receiver.request(Method::GET, &path, None).await;
            let now = Instant::now();
            if status != 200 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            for event in body["rooms"]["join"][room.as_str()]["ephemeral"]["events"].as_array().into_iter().flatten() {
                let _ = tx.send((now, event.clone()));
            }
            if let Some(next) = body["next_batch"].as_str() {
                since = next.to_owned();
            }
        }
    });
    rx
}

/// Waits (at most 10 s) for an ephemeral event that `wanted` accepts; when it arrived.
async fn next_matching(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<(Instant, Value)>,
    wanted: impl Fn(&Value) -> bool,
) -> Option<Instant> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some((at, event))) if wanted(&event) => return Some(at),
            Ok(Some(_)) => continue,
            _ => return None,
        }
    }
}

/// Issue 9's "Measure": typing and read-receipt latency across servers — from the start of the
/// typing (or receipt) request on one server to its arrival in the other server's user's
/// `/sync`, Hearth and Synapse each way beside Synapse → Synapse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: prints figures for BENCHMARKS.md"]
async fn bench_typing_and_receipt_latency() {
    const ROUNDS: usize = 50;
    let Some(n) = network().await else { return skipped("port 8448") };
    let clients = [
        Client::hearth("hearth-a", &n.hearth_a.server, &n.hearth_a.server.register("alice").await),
        Client::hearth("hearth-b", &n.hearth_b.server, &n.hearth_b.server.register("bob").await),
        Client::synapse("synapse-a", &n.synapse_a, &n.synapse_a.register("sam").await),
        Client::synapse("synapse-b", &n.synapse_b, &n.synapse_b.register("sue").await),
    ];
    let servers = ["hearth-a.test", "hearth-b.test", "synapse-a.test", "synapse-b.test"];
    let pairs = [
        (0, 1, "Hearth → Hearth"),
        (0, 2, "Hearth → Synapse"),
        (2, 0, "Synapse → Hearth"),
        (2, 3, "Synapse → Synapse"),
    ];
    let mut report = Report::new(
        "Federation: typing and read-receipt latency",
        &format!(
            "{ROUNDS} rounds per pair, each pair alone in a room of its own, one thing in flight at a time: typing \
             started and stopped (each timed from the start of the `PUT /typing` to the other user's `/sync` \
             showing the change) and read receipts on the receiver's messages (from the start of the `POST \
             /receipt` to the other user's `/sync` showing it), in ms. Two Hearths and two Synapses on SQLite, \
             on loopback with TLS."
        ),
        "bench_typing_and_receipt_latency",
    );
    report.line("| path | typing p50 | typing p99 | typing seen | receipt p50 | receipt p99 | receipts seen |");
    report.line("|---|---|---|---|---|---|---|");
    for (from, to, label) in pairs {
        let (actor, observer) = (&clients[from], &clients[to]);
        let actor_id = whoami(actor).await;
        let room = actor.create_room(json!({"preset": "public_chat"})).await;
        observer.join(&room, servers[from]).await;
        // The observer's messages, for the actor to mark read; the actor sees them all first.
        let mut messages = Vec::new();
        for i in 0..=ROUNDS {
            let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/rr{}-{i}", enc(&room), rand_suffix());
            let (status, sent) = observer
                .request(Method::PUT, &path, Some(json!({"msgtype": "m.text", "body": format!("read me {i}")})))
                .await;
            assert_eq!(status, 200, "{label}: send: {sent}");
            messages.push(sent["event_id"].as_str().unwrap().to_owned());
        }
        let last = messages.last().unwrap().clone();
        let waited = Instant::now();
        loop {
            let path = format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(&last));
            if actor.request(Method::GET, &path, None).await.0 == 200 {
                break;
            }
            assert!(waited.elapsed() < Duration::from_secs(120), "{label}: the messages never reached the actor");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let since = observer.sync_token().await;
        let mut events =
            watch_ephemeral(observer.clone(), room.clone(), since, Instant::now() + Duration::from_secs(900));
        let typing_path = format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room), enc(&actor_id));
        let typing_has = |event: &Value, id: &str| {
            event["content"]["user_ids"].as_array().is_some_and(|ids| ids.iter().any(|u| u == id))
        };
        let mut typing = Vec::new();
        // The first receipt and the first typing round are warm-up, outside the measurement.
        for round in 0..=ROUNDS {
            for on in [true, false] {
                let started = Instant::now();
                let body = if on { json!({"typing": true, "timeout": 30000}) } else { json!({"typing": false}) };
                let (status, answer) = actor.request(Method::PUT, &typing_path, Some(body)).await;
                assert_eq!(status, 200, "{label}: typing: {answer}");
                let seen = next_matching(&mut events, |event| {
                    event["type"] == "m.typing" && typing_has(event, &actor_id) == on
                })
                .await;
                if let (Some(at), true) = (seen, round > 0) {
                    typing.push(at.saturating_duration_since(started).as_secs_f64() * 1000.0);
                }
            }
        }
        let mut receipts = Vec::new();
        for (round, event_id) in messages.iter().enumerate() {
            let started = Instant::now();
            let path = format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(&room), enc(event_id));
            let (status, answer) = actor.request(Method::POST, &path, Some(json!({}))).await;
            assert_eq!(status, 200, "{label}: receipt: {answer}");
            let seen = next_matching(&mut events, |event| {
                event["type"] == "m.receipt"
                    && event["content"][event_id.as_str()]["m.read"][actor_id.as_str()].is_object()
            })
            .await;
            if let (Some(at), true) = (seen, round > 0) {
                receipts.push(at.saturating_duration_since(started).as_secs_f64() * 1000.0);
            }
        }
        drop(events);
        let (typing, receipts) = (summarise(typing), summarise(receipts));
        report.line(&format!(
            "| {label} | {:.1} | {:.1} | {}/{} | {:.1} | {:.1} | {}/{ROUNDS} |",
            typing.p50,
            typing.p99,
            typing.count,
            2 * ROUNDS,
            receipts.p50,
            receipts.p99,
            receipts.count
        ));
    }
    report.save("federation-edus.md");
}

/// The largest resident set of process `pid` seen while `work` runs (sampled every 20 ms), and
/// the resident set before it, in MiB.
async fn peak_rss_during<T>(pid: u32, work: impl std::future::Future<Output = T>) -> (T, f64, f64) {
    fn rss_kib(pid: u32) -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|status| {
                status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    }
    let before = rss_kib(pid);
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(before));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        tokio::spawn(async move {
            // Bounded: at most an hour of samples.
            for _ in 0..180_000 {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                peak.fetch_max(rss_kib(pid), std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let out = work.await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    sampler.await.unwrap();
    let mib = |kib: u64| kib as f64 / 1024.0;
    (out, mib(before), mib(peak.load(std::sync::atomic::Ordering::SeqCst)))
}

/// `len` bytes of a repeating but not constant pattern, as a stream of 256 KiB chunks (never
/// all in the benchmark's memory).
fn pattern_body(len: u64) -> reqwest::Body {
    const CHUNK: u64 = 256 * 1024;
    let chunk = bytes::Bytes::from((0..CHUNK).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect::<Vec<_>>());
    let chunks = (0..len.div_ceil(CHUNK)).map(move |i| {
        let take = (len - i * CHUNK).min(CHUNK) as usize;
        Ok::<_, std::io::Error>(chunk.slice(..take))
    });
    reqwest::Body::wrap_stream(futures_util::stream::iter(chunks))
}

/// Issue 10's "Measure": upload and download throughput and the server's memory for a large
/// file, and the time to thumbnail a 12-megapixel JPEG, Hearth beside Synapse. The file size is
/// `HEARTH_BENCH_MEDIA_MB` (default 500).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: prints figures for BENCHMARKS.md"]
async fn bench_media() {
    let megabytes: u64 = std::env::var("HEARTH_BENCH_MEDIA_MB").ok().and_then(|n| n.parse().ok()).unwrap_or(500);
    let len = megabytes * 1024 * 1024;
    let net = TestNet::new().await;
    let config = format!("[media]\nmax_upload_bytes = {}\nmax_upload_secs = 3600", len + 1024);
    let Some(hearth) = net.peer(Backend::Sqlite, "hearth.test", Discovered::Port8448, &config).await else {
        return skipped("port 8448");
    };
    let Some(synapse) = SynapsePeer::start(&net, "synapse.test", &[("hearth.test", hearth.federation[0].ip())]).await
    else {
        return skipped("port 8448");
    };
    let alice = hearth.server.register("alice").await;
    let clients = [
        ("Hearth", Client::hearth("hearth", &hearth.server, &alice), hearth.server.pid()),
        ("Synapse", Client::synapse("synapse", &synapse, &synapse.register("sam").await), synapse.pid()),
    ];
    let mut report = Report::new(
        "Media: a large file up and down, and thumbnails",
        &format!(
            "One {megabytes} MiB file uploaded (streamed by the client, with its Content-Length) and downloaded \
             once, on loopback with TLS, SQLite, each server's media on local disk; MB/s over the whole request, \
             and the server's resident memory before and at its peak (sampled every 20 ms). Then a 12-megapixel \
             JPEG (4000×3000) uploaded and its 320×240 thumbnail fetched: the upload's time and the thumbnail \
             request's (Hearth makes the common sizes after answering the upload, Synapse before)."
        ),
        "bench_media",
    );
    report.line("| server | upload MB/s | RSS before → peak, upload (MiB) | download MB/s | RSS peak, download (MiB) | 12 MP JPEG upload (ms) | its 320×240 thumbnail (ms) |");
    report.line("|---|---|---|---|---|---|---|");
    let jpeg = {
        let image = image::RgbImage::from_fn(4000, 3000, |x, y| {
            image::Rgb([(x % 251) as u8, (y % 241) as u8, ((x ^ y) % 256) as u8])
        });
        let mut out = Vec::new();
        image::DynamicImage::ImageRgb8(image)
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Jpeg)
            .unwrap();
        out
    };
    for (label, client, pid) in &clients {
        let upload = async {
            let started = Instant::now();
            let response = client
                .http
                .post(format!("{}/_matrix/media/v3/upload?filename=big.bin", client.base))
                .bearer_auth(&client.token)
                .header("content-type", "application/octet-stream")
                .header("content-length", len.to_string())
                .timeout(Duration::from_secs(3600))
                .body(pattern_body(len))
                .send()
                .await
                .unwrap();
            let status = response.status();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            assert!(status.is_success(), "{label} upload: {status} {body}");
            (started.elapsed(), body["content_uri"].as_str().unwrap().trim_start_matches("mxc://").to_owned())
        };
        let ((up_time, path), before, up_peak) = peak_rss_during(*pid, upload).await;
        let download = async {
            let started = Instant::now();
            let mut response = client
                .http
                .get(format!("{}/_matrix/client/v1/media/download/{path}", client.base))
                .bearer_auth(&client.token)
                .timeout(Duration::from_secs(3600))
                .send()
                .await
                .unwrap();
            assert!(response.status().is_success(), "{label} download: {}", response.status());
            let mut got = 0u64;
            while let Some(chunk) = response.chunk().await.unwrap() {
                got += chunk.len() as u64;
            }
            assert_eq!(got, len, "{label}: the whole file");
            started.elapsed()
        };
        let (down_time, _, down_peak) = peak_rss_during(*pid, download).await;
        let mb_per_s = |took: Duration| len as f64 / 1_000_000.0 / took.as_secs_f64();

        let started = Instant::now();
        let response = client
            .http
            .post(format!("{}/_matrix/media/v3/upload?filename=photo.jpg", client.base))
            .bearer_auth(&client.token)
            .header("content-type", "image/jpeg")
            .body(jpeg.clone())
            .send()
            .await
            .unwrap();
        let uploaded: Value = response.json().await.unwrap();
        let jpeg_up = started.elapsed();
        let photo = uploaded["content_uri"].as_str().unwrap().trim_start_matches("mxc://").to_owned();
        let started = Instant::now();
        let thumbnail = client
            .http
            .get(format!("{}/_matrix/client/v1/media/thumbnail/{photo}?width=320&height=240&method=scale", client.base))
            .bearer_auth(&client.token)
            .send()
            .await
            .unwrap();
        assert!(thumbnail.status().is_success(), "{label} thumbnail: {}", thumbnail.status());
        let _ = thumbnail.bytes().await.unwrap();
        let thumb_time = started.elapsed();
        report.line(&format!(
            "| {label} | {:.0} | {before:.0} → {up_peak:.0} | {:.0} | {down_peak:.0} | {:.0} | {:.0} |",
            mb_per_s(up_time),
            mb_per_s(down_time),
            jpeg_up.as_secs_f64() * 1000.0,
            thumb_time.as_secs_f64() * 1000.0,
        ));
    }
    report.save("media.md");
}

/// A device's identity keys signed by `key`, as a client uploads them.
fn bench_device_keys(key: &crate::harness::Key, user: &str, device: &str) -> Value {
    let keys = json!({
        "user_id": user,
        "device_id": device,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {format!("ed25519:{device}"): key.public(), format!("curve25519:{device}"): format!("curve-{device}")},
    });
    key.sign(user, device, keys)
}

/// Issue 11's "Measure": `/keys/query` for 1,000 users (each with a device that uploaded keys)
/// and `/keys/claim` by 50 concurrent claimers of one device's one-time keys, Hearth beside
/// Synapse. The user count is `HEARTH_BENCH_KEY_USERS` (default 1000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: prints figures for BENCHMARKS.md"]
async fn bench_e2ee_keys() {
    let users: usize = std::env::var("HEARTH_BENCH_KEY_USERS").ok().and_then(|n| n.parse().ok()).unwrap_or(1000);
    const QUERIES: usize = 30;
    const CLAIMERS: usize = 50;
    // 500 keys in all: the most one device may hold on either server.
    const CLAIMS_EACH: usize = 10;
    let net = TestNet::new().await;
    let Some(hearth) = net.peer(Backend::Sqlite, "hearth.test", Discovered::Port8448, "").await else {
        return skipped("port 8448");
    };
    let Some(synapse) = SynapsePeer::start(&net, "synapse.test", &[("hearth.test", hearth.federation[0].ip())]).await
    else {
        return skipped("port 8448");
    };
    let mut report = Report::new(
        "End-to-end encryption keys: query and claim",
        &format!(
            "SQLite, loopback with TLS. {users} users each upload one device's identity keys; then one client asks \
             `/keys/query` for all {users} users at once, {QUERIES} times in a row (latency of each answer). Then \
             one device uploads {} signed one-time keys and {CLAIMERS} clients claim them concurrently, {CLAIMS_EACH} \
             claims each, one at a time (every claimed key checked distinct): claims per second over the whole \
             run and the latency of each claim.",
            CLAIMERS * CLAIMS_EACH
        ),
        "bench_e2ee_keys",
    );
    report.line("| server | query of all users p50 (ms) | p99 (ms) | claims/s | claim p50 (ms) | claim p99 (ms) |");
    report.line("|---|---|---|---|---|---|");
    let key = crate::harness::Key::new();
    let hearth_owner = hearth.server.register("owner").await;
    let synapse_owner = synapse.register("owner").await;
    let servers = [
        ("Hearth", Client::hearth("hearth", &hearth.server, &hearth_owner)),
        ("Synapse", Client::synapse("synapse", &synapse, &synapse_owner)),
    ];
    for (label, owner) in &servers {
        // Users, each with a device that uploaded keys (registered 8 at a time).
        let mut user_ids = Vec::with_capacity(users);
        for chunk in (0..users).collect::<Vec<_>>().chunks(8) {
            let registered = futures_util::future::join_all(chunk.iter().map(|n| async move {
                let body = json!({"username": format!("user{n}"), "password": "a password for tests",
                                  "auth": {"type": "m.login.dummy"}});
                let anonymous = Client { token: String::new(), ..owner.clone() };
                let (status, account) =
                    anonymous.request(Method::POST, "/_matrix/client/v3/register", Some(body)).await;
                assert_eq!(status, 200, "{label}: register: {account}");
                account
            }))
            .await;
            for account in registered {
                let user = account["user_id"].as_str().unwrap().to_owned();
                let device = account["device_id"].as_str().unwrap().to_owned();
                let client = Client { token: account["access_token"].as_str().unwrap().to_owned(), ..owner.clone() };
                let body = json!({"device_keys": bench_device_keys(&key, &user, &device)});
                let (status, response) =
                    client.request(Method::POST, "/_matrix/client/v3/keys/upload", Some(body)).await;
                assert_eq!(status, 200, "{label}: keys upload: {response}");
                user_ids.push(user);
            }
        }
        let wanted: serde_json::Map<String, Value> = user_ids.iter().map(|u| (u.clone(), json!([]))).collect();
        let query = json!({"device_keys": wanted});
        let mut query_ms = Vec::with_capacity(QUERIES);
        for _ in 0..QUERIES {
            let started = Instant::now();
            let (status, response) =
                owner.request(Method::POST, "/_matrix/client/v3/keys/query", Some(query.clone())).await;
            query_ms.push(started.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(status, 200, "{label}: query");
            let found = response["device_keys"]
                .as_object()
                .map_or(0, |m| m.values().filter(|d| d.as_object().is_some_and(|d| !d.is_empty())).count());
            assert_eq!(found, users, "{label}: every user's device in the answer");
        }

        // One device with enough one-time keys for every claim.
        let anonymous = Client { token: String::new(), ..owner.clone() };
        let (_, target) = anonymous
            .request(
                Method::POST,
                "/_matrix/client/v3/register",
                Some(json!({"username": "target",
                "password": "a password for tests", "auth": {"type": "m.login.dummy"}})),
            )
            .await;
        let target_user = target["user_id"].as_str().unwrap().to_owned();
        let target_device = target["device_id"].as_str().unwrap().to_owned();
        let target_client = Client { token: target["access_token"].as_str().unwrap().to_owned(), ..owner.clone() };
        let total = CLAIMERS * CLAIMS_EACH;
        for batch in 0..total.div_ceil(100) {
            let keys: serde_json::Map<String, Value> = (batch * 100..((batch + 1) * 100).min(total))
                .map(|n| {
                    let otk = key.sign(&target_user, &target_device, json!({"key": format!("otk{n}")}));
                    (format!("signed_curve25519:K{n}"), otk)
                })
                .collect();
            let mut body = json!({"one_time_keys": keys});
            if batch == 0 {
                body["device_keys"] = bench_device_keys(&key, &target_user, &target_device);
            }
            let (status, response) =
                target_client.request(Method::POST, "/_matrix/client/v3/keys/upload", Some(body)).await;
            assert_eq!(status, 200, "{label}: one-time keys upload: {response}");
        }
        let claimed = Arc::new(Mutex::new(Vec::new()));
        let started = Instant::now();
        let claimers = (0..CLAIMERS).map(|_| {
            let (owner, claimed) = (owner.clone(), claimed.clone());
            let (user, device) = (target_user.clone(), target_device.clone());
            async move {
                let mut latencies = Vec::with_capacity(CLAIMS_EACH);
                for _ in 0..CLAIMS_EACH {
                    let body = json!({"one_time_keys": {&user: {&device: "signed_curve25519"}}});
                    let sent = Instant::now();
                    let (status, response) =
                        owner.request(Method::POST, "/_matrix/client/v3/keys/claim", Some(body)).await;
                    latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                    assert_eq!(status, 200, "claim: {response}");
                    let keys = response["one_time_keys"][&user][&device].as_object().cloned().unwrap_or_default();
                    claimed.lock().unwrap().extend(keys.keys().cloned());
                }
                latencies
            }
        });
        let latencies: Vec<f64> = futures_util::future::join_all(claimers).await.into_iter().flatten().collect();
        let took = started.elapsed();
        let claimed = claimed.lock().unwrap().clone();
        let distinct: std::collections::HashSet<&String> = claimed.iter().collect();
        assert_eq!((claimed.len(), distinct.len()), (total, total), "{label}: every claim got its own key");
        let (query, claim) = (summarise(query_ms), summarise(latencies));
        report.line(&format!(
            "| {label} | {:.1} | {:.1} | {:.0} | {:.1} | {:.1} |",
            query.p50,
            query.p99,
            total as f64 / took.as_secs_f64(),
            claim.p50,
            claim.p99
        ));
    }
    report.save("e2ee-keys.md");
}
