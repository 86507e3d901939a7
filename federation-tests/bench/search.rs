//! Issue 12's "Measure": `POST /search` over a corpus of up to 1,000,000 messages, and the cost
//! of push-rule evaluation for a message into a room of 1,000 members who all have pushers,
//! Hearth beside Synapse (started by `benches/synapse/run.sh`, plain HTTP on loopback) on SQLite
//! and PostgreSQL.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::{StreamExt, stream};
use reqwest::Method;
use serde_json::{Value, json};

use super::{Client, Report, summarise};
use crate::harness::{Backend, TestServer, enc};

/// Words in the corpus vocabulary, drawn with Zipf's law (s = 1), as in natural text.
const VOCABULARY: usize = 20_000;
const WORDS_PER_MESSAGE: usize = 8;
const ROOMS: usize = 50;
const SENDERS: usize = 5;
/// Requests in flight while the corpus is sent.
const IN_FLIGHT: usize = 32;
/// Queries of each kind per measurement.
const QUERIES_PER_KIND: usize = 30;

const SYLLABLES: [&str; 20] = [
    "ka", "lo", "mi", "nu", "pa", "ri", "so", "tu", "va", "zo", "bra", "cli", "dro", "fu", "gra", "ho", "ja", "kli",
    "mo", "no",
];

/// The vocabulary's `rank`th word: four syllables, so no two words share a stem.
fn word(rank: usize) -> String {
    (0..4).map(|digit| SYLLABLES[(rank / 20usize.pow(digit)) % 20]).collect()
}

/// A small deterministic generator (SplitMix64), so both servers get the same corpus.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

struct Corpus {
    /// Cumulative Zipf weights of the ranks.
    cdf: Vec<f64>,
}

impl Corpus {
    fn new() -> Corpus {
        let mut total = 0.0;
        let mut cdf = Vec::with_capacity(VOCABULARY);
        for rank in 1..=VOCABULARY {
            total += 1.0 / rank as f64;
            cdf.push(total);
        }
        for weight in &mut cdf {
            *weight /= total;
        }
        Corpus { cdf }
    }

    /// Message `n` of the corpus.
    fn message(&self, n: usize) -> String {
        let mut words = Vec::with_capacity(WORDS_PER_MESSAGE);
        for w in 0..WORDS_PER_MESSAGE {
            let draw = (mix((n * WORDS_PER_MESSAGE + w) as u64) >> 11) as f64 / (1u64 << 53) as f64;
            let rank = self.cdf.partition_point(|c| *c < draw).min(VOCABULARY - 1);
            words.push(word(rank));
        }
        words.join(" ")
    }
}

/// The query kinds, each with its terms and order.
fn queries() -> Vec<(&'static str, Vec<(String, &'static str)>)> {
    let pick = |salt: u64, from: usize, to: usize| {
        (0..QUERIES_PER_KIND).map(move |i| from + (mix(salt + i as u64) as usize) % (to - from))
    };
    vec![
        ("common word (1.5–8% of messages)", pick(1, 10, 50).map(|r| (word(r), "rank")).collect()),
        ("common word, recent first", pick(2, 10, 50).map(|r| (word(r), "recent")).collect()),
        ("mid word (0.1–0.4%)", pick(3, 200, 1000).map(|r| (word(r), "rank")).collect()),
        ("rare word (<0.02%)", pick(4, 5000, VOCABULARY).map(|r| (word(r), "rank")).collect()),
        (
            "two words",
            pick(5, 200, 1000)
                .zip(pick(6, 10, 50))
                .map(|(a, b)| (format!("{} {}", word(a), word(b)), "rank"))
                .collect(),
        ),
        ("prefix (2 syllables)", pick(7, 200, 1000).map(|r| (word(r)[..4].to_owned(), "rank")).collect()),
    ]
}

/// A Synapse started (and stopped on drop) by `benches/synapse/run.sh`, plain HTTP on loopback.
struct RunSynapse {
    dir: tempfile::TempDir,
    url: String,
}

impl RunSynapse {
    fn start(database: &str, env: &[(&str, &str)]) -> RunSynapse {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/synapse/run.sh");
        let status = std::process::Command::new(&script)
            .args(["start", dir.path().to_str().unwrap(), &port.to_string(), database])
            .envs(env.iter().copied())
            .status()
            .expect("runs benches/synapse/run.sh");
        assert!(status.success(), "Synapse did not start");
        RunSynapse { dir, url: format!("http://127.0.0.1:{port}") }
    }

    fn pid(&self) -> u32 {
        std::fs::read_to_string(self.dir.path().join("synapse.pid")).unwrap().trim().parse().unwrap()
    }
}

impl Drop for RunSynapse {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/synapse/run.sh");
        let _ = std::process::Command::new(script).args(["stop", self.dir.path().to_str().unwrap()]).status();
    }
}

/// Registers `name` (dummy flow) and returns a client with its token.
async fn register(base: &str, http: &reqwest::Client, name: &str) -> Client {
    let anonymous = Client { label: name.to_owned(), http: http.clone(), base: base.to_owned(), token: String::new() };
    let body = json!({"username": name, "password": "a password for benchmarks", "auth": {"type": "m.login.dummy"}});
    let (status, account) = anonymous.request(Method::POST, "/_matrix/client/v3/register", Some(body)).await;
    assert_eq!(status, 200, "register {name}: {account}");
    Client { token: account["access_token"].as_str().unwrap().to_owned(), ..anonymous }
}

fn plain_http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(120)).pool_max_idle_per_host(64).build().unwrap()
}

/// The searcher, the senders and the rooms of a corpus on one server.
struct Setup {
    searcher: Client,
    senders: Vec<Client>,
    rooms: Vec<String>,
}

async fn set_up(base: &str) -> Setup {
    let http = plain_http();
    let searcher = register(base, &http, "searcher").await;
    let mut senders = Vec::new();
    for n in 0..SENDERS {
        senders.push(register(base, &http, &format!("sender{n}")).await);
    }
    let mut rooms = Vec::new();
    for n in 0..ROOMS {
        let room = searcher.create_room(json!({"preset": "public_chat", "name": format!("Corpus room {n}")})).await;
        for sender in &senders {
            let (status, body) =
                sender.request(Method::POST, &format!("/_matrix/client/v3/join/{}", enc(&room)), Some(json!({}))).await;
            assert_eq!(status, 200, "join: {body}");
        }
        rooms.push(room);
    }
    Setup { searcher, senders, rooms }
}

/// Sends corpus messages `from..to`, `IN_FLIGHT` at a time; returns messages per second.
async fn populate(setup: &Setup, corpus: &Corpus, from: usize, to: usize) -> f64 {
    let started = Instant::now();
    let sent = stream::iter(from..to)
        .map(|n| {
            let sender = &setup.senders[n % SENDERS];
            let room = &setup.rooms[n % ROOMS];
            let text = corpus.message(n);
            async move {
                for attempt in 0..5 {
                    let status = sender.send(room, &format!("c{n}"), &text).await;
                    if status == 200 {
                        return;
                    }
                    assert!(attempt < 4, "message {n}: status {status}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .count()
        .await;
    let rate = sent as f64 / started.elapsed().as_secs_f64();
    eprintln!("sent messages {from}..{to} at {rate:.0}/s");
    rate
}

/// Runs every query kind once through; returns per-kind (p50, p99) in ms, overall p50/p99 and
/// the mean number of results counted per query.
async fn measure(searcher: &Client) -> (Vec<(f64, f64)>, f64, f64, f64) {
    let mut per_kind = Vec::new();
    let mut all = Vec::new();
    let mut counted = 0u64;
    let mut queries_run = 0u64;
    for (_, list) in queries() {
        let mut times = Vec::new();
        for (term, order) in list {
            let body = json!({"search_categories": {"room_events": {"search_term": term, "order_by": order}}});
            let started = Instant::now();
            let (status, found) = searcher.request(Method::POST, "/_matrix/client/v3/search", Some(body)).await;
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            assert_eq!(status, 200, "{}: search {term}: {found}", searcher.label);
            counted += found["search_categories"]["room_events"]["count"].as_u64().unwrap_or(0);
            queries_run += 1;
            times.push(ms);
        }
        all.extend(times.iter().copied());
        let summary = summarise(times);
        per_kind.push((summary.p50, summary.p99));
    }
    let overall = summarise(all);
    (per_kind, overall.p50, overall.p99, counted as f64 / queries_run as f64)
}

fn row(report: &mut Report, label: &str, messages: usize, rate: f64, measured: &(Vec<(f64, f64)>, f64, f64, f64)) {
    let (per_kind, p50, p99, mean_count) = measured;
    let kinds: Vec<String> = per_kind.iter().map(|(a, b)| format!("{a:.1} / {b:.1}")).collect();
    report.line(&format!(
        "| {label} | {messages} | {rate:.0} | {p50:.1} | {p99:.1} | {} | {mean_count:.0} |",
        kinds.join(" | ")
    ));
}

/// Search over a corpus of `HEARTH_BENCH_SEARCH_MESSAGES` messages (default 1,000,000) on
/// Hearth, and over its first `HEARTH_BENCH_SEARCH_SYNAPSE` (default 10,000) on both servers —
/// Synapse takes minutes per ten thousand messages, so it is not sent the whole corpus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: prints figures for BENCHMARKS.md"]
async fn bench_search() {
    let env = |name: &str, default: usize| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let total = env("HEARTH_BENCH_SEARCH_MESSAGES", 1_000_000);
    let shared = env("HEARTH_BENCH_SEARCH_SYNAPSE", 10_000).min(total);
    let backends: Vec<Backend> = match std::env::var("HEARTH_BENCH_SEARCH_BACKENDS").as_deref() {
        Ok("sqlite") => vec![Backend::Sqlite],
        Ok("postgres") => vec![Backend::Postgres],
        _ => vec![Backend::Sqlite, Backend::Postgres],
    };
    let corpus = Corpus::new();
    let mut report = Report::new(
        "Search: a million messages",
        &format!(
            "Plain HTTP on loopback. A corpus of {ROOMS} rooms, {SENDERS} senders and one searcher in every room; \
             each message is {WORDS_PER_MESSAGE} words drawn by Zipf's law from a vocabulary of {VOCABULARY} \
             (the same corpus for both servers, sent {IN_FLIGHT} at a time). Each measurement runs \
             {QUERIES_PER_KIND} queries of each kind one after another (`POST /search`, `room_events`, default \
             limit, the count included); Synapse gets the first {shared} messages only (it sends about a hundred \
             a second, a million would take hours), Hearth is measured at {shared} and at {total}. Cells are \
             p50 / p99 in ms."
        ),
        "search::bench_search",
    );
    let kinds: Vec<&str> = queries().iter().map(|(name, _)| *name).collect();
    report.line(&format!(
        "| server, database | messages | sent/s | all p50 | all p99 | {} | mean count |",
        kinds.join(" | ")
    ));
    report.line(&format!("|---|---|---|---|---|{}---|", "---|".repeat(kinds.len())));
    for backend in backends {
        let db = match backend {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        };
        let pool = match backend {
            Backend::Sqlite => "",
            Backend::Postgres => "[database]\nmax_connections = 16\n",
        };
        let hearth = TestServer::start_with(
            backend,
            &format!("[logging]\nlevel = \"warn,hearth::app=info\"\nformat = \"json\"\n{pool}"),
        )
        .await;
        let hearth_setup = set_up(&hearth.base_url).await;
        if shared > 0 {
            let rate = populate(&hearth_setup, &corpus, 0, shared).await;
            row(&mut report, &format!("Hearth, {db}"), shared, rate, &measure(&hearth_setup.searcher).await);
            compare_with_synapse(&mut report, backend, db, &corpus, shared).await;
        }
        if total > shared {
            let rate = populate(&hearth_setup, &corpus, shared, total).await;
            row(&mut report, &format!("Hearth, {db}"), total, rate, &measure(&hearth_setup.searcher).await);
        }
    }
    report.save("search.md");
}

/// Synapse on the first `shared` messages of the corpus.
async fn compare_with_synapse(report: &mut Report, backend: Backend, db: &str, corpus: &Corpus, shared: usize) {
    {
        let synapse = RunSynapse::start(
            match backend {
                Backend::Sqlite => "sqlite",
                Backend::Postgres => "postgres:hearth_bench_search",
            },
            &[],
        );
        let synapse_setup = set_up(&synapse.url).await;
        let rate = populate(&synapse_setup, corpus, 0, shared).await;
        row(report, &format!("Synapse, {db}"), shared, rate, &measure(&synapse_setup.searcher).await);
    }
}

/// What a push gateway on loopback was told: notifications and when each came.
#[derive(Clone, Default)]
struct Gateway {
    seen: Arc<Mutex<Vec<(Instant, usize)>>>,
}

async fn start_gateway() -> (Gateway, SocketAddr) {
    use axum::{Json, Router, extract::State, routing::post};
    let gateway = Gateway::default();
    async fn notify(State(gw): State<Gateway>, Json(body): Json<Value>) -> Json<Value> {
        let devices = body["notification"]["devices"].as_array().map_or(0, Vec::len);
        gw.seen.lock().unwrap().push((Instant::now(), devices));
        Json(json!({"rejected": []}))
    }
    let app = Router::new().route("/_matrix/push/v1/notify", post(notify)).with_state(gateway.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (gateway, addr)
}

/// CPU time (user + system) of a process so far, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at its closing parenthesis.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// Push-rule evaluation for a room of `HEARTH_BENCH_PUSH_MEMBERS` (default 1,000) members, each
/// with an HTTP pusher to a gateway on loopback: server CPU per message and how long until the
/// gateway has heard of it for every member, Hearth beside Synapse, SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: prints figures for BENCHMARKS.md"]
async fn bench_push_rules() {
    let members = std::env::var("HEARTH_BENCH_PUSH_MEMBERS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000usize);
    const MESSAGES: usize = 20;
    let (gateway, gateway_addr) = start_gateway().await;
    let gateway_url = format!("http://{gateway_addr}/_matrix/push/v1/notify");
    let mut report = Report::new(
        "Push rules: a message into a room of 1,000 members with pushers",
        &format!(
            "SQLite, plain HTTP on loopback. {members} members join one room; each registers an HTTP pusher to one \
             push gateway on loopback and keeps the default push rules (every message notifies). Then one member \
             sends {MESSAGES} messages, one every 2 s: the server's CPU time over them (user + system, from \
             /proc, idle time between them included) and, for each, the time from the send until the gateway has been told for every other member. Hearth \
             coalesces pushes per device for `push.coalesce_ms` (here 0) and sends one request per device, as \
             Synapse does."
        ),
        "search::bench_push_rules",
    );
    report.line("| server | members | send p50 (ms) | all pushed p50 (ms) | all pushed p99 (ms) | CPU per message (ms) | CPU per member (µs) |");
    report.line("|---|---|---|---|---|---|---|");
    for server in ["Hearth", "Synapse"] {
        let (base, pid, _hearth, _synapse);
        if server == "Hearth" {
            let config = "[logging]\nlevel = \"warn,hearth::app=info\"\nformat = \"json\"\n[push]\nallowed_ip_ranges = [\"127.0.0.0/8\"]\ncoalesce_ms = 0\n";
            let started = TestServer::start_with(Backend::Sqlite, config).await;
            base = started.base_url.clone();
            pid = started.pid();
            _hearth = Some(started);
            _synapse = None;
        } else {
            let started = RunSynapse::start("sqlite", &[("SYNAPSE_ALLOW_LOOPBACK_PUSH", "1")]);
            base = started.url.clone();
            pid = started.pid();
            _synapse = Some(started);
            _hearth = None;
        }
        let http = plain_http();
        let owner = register(&base, &http, "owner").await;
        let room = owner.create_room(json!({"preset": "public_chat"})).await;
        let clients: Vec<Client> = stream::iter(0..members)
            .map(|n| {
                let (base, http, room, url) = (&base, &http, &room, &gateway_url);
                async move {
                    let client = register(base, http, &format!("member{n}")).await;
                    let (status, body) = client
                        .request(Method::POST, &format!("/_matrix/client/v3/join/{}", enc(room)), Some(json!({})))
                        .await;
                    assert_eq!(status, 200, "join: {body}");
                    let pusher = json!({"kind": "http", "app_id": "org.example.bench", "pushkey": format!("key{n}"),
                        "app_display_name": "Bench", "device_display_name": "Phone", "lang": "en",
                        "data": {"url": url}});
                    let (status, body) =
                        client.request(Method::POST, "/_matrix/client/v3/pushers/set", Some(pusher)).await;
                    assert_eq!(status, 200, "pusher: {body}");
                    client
                }
            })
            .buffer_unordered(8)
            .collect()
            .await;
        assert_eq!(clients.len(), members);
        // Joins settle (and their pushes, if any) before measuring.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let mut send_ms = Vec::new();
        let mut pushed_ms = Vec::new();
        let cpu_before = cpu_seconds(pid);
        for n in 0..MESSAGES {
            let before = gateway.seen.lock().unwrap().len();
            let started = Instant::now();
            let status = owner.send(&room, &format!("p{n}"), &format!("message {n} to everyone")).await;
            send_ms.push(started.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(status, 200);
            let deadline = started + Duration::from_secs(60);
            let mut done = None;
            while Instant::now() < deadline {
                let finished = {
                    let seen = gateway.seen.lock().unwrap();
                    let devices: usize = seen[before..].iter().map(|(_, d)| d).sum();
                    if devices >= members { seen.last().map(|(at, _)| *at) } else { None }
                };
                if finished.is_some() {
                    done = finished;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let done = done.unwrap_or_else(|| panic!("{server}: not every member was pushed message {n}"));
            pushed_ms.push(done.duration_since(started).as_secs_f64() * 1000.0);
            // The message's work done before the next (CPU time is read for all of them at once:
            // the kernel counts it in 10 ms ticks).
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let cpu_per_message = (cpu_seconds(pid) - cpu_before) * 1000.0 / MESSAGES as f64;
        let send = summarise(send_ms);
        let pushed = summarise(pushed_ms);
        report.line(&format!(
            "| {server} | {members} | {:.1} | {:.1} | {:.1} | {cpu_per_message:.1} | {:.0} |",
            send.p50,
            pushed.p50,
            pushed.p99,
            cpu_per_message * 1000.0 / members as f64
        ));
    }
    report.save("push-rules.md");
}
