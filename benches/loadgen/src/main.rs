//! loadgen: drives a Matrix homeserver through the Client-Server API and measures message
//! throughput and end-to-end delivery latency. See README.md.

mod matrix;
mod plan;
mod procmon;
mod run;
mod setup;
mod stats;
mod ws;

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use serde::Serialize;
use serde_json::json;
use tokio::task::JoinSet;

use crate::matrix::{Api, enc, now_us};
use crate::plan::{Ask, Plan, Scenario};
use crate::procmon::{ProcMon, Reading};
use crate::run::{Ctx, ErrorSample, Outcome, SendTransport, Transport, WsOptions};
use crate::stats::{Summary, round3};
use crate::ws::WsEndpoint;

/// Longest allowed --duration, --warmup and --drain (seconds).
const MAX_PHASE_SECS: f64 = 3600.0;
/// Longest the whole setup phase may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(3 * 3600);
/// How long receivers get to send their first long-poll (or sockets to get their first frame)
/// before the clock starts; sockets get [`SOCKET_START_PER_USER`] more per user.
const RECEIVER_START_TIMEOUT: Duration = Duration::from_secs(60);
const SOCKET_START_PER_USER: Duration = Duration::from_millis(20);
/// How long stopped receivers get to close their sockets before they are aborted.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// sockets scenario: how long the server's RSS is followed (once a second) after every socket
/// closed; allocators give memory back with a delay.
const AFTER_CLOSE_WATCH: Duration = Duration::from_secs(10);
/// File descriptors kept free besides the sockets and long-polls (HTTP pool, the binary, stdio).
const FD_MARGIN: u64 = 200;

#[derive(Parser, Debug)]
#[command(name = "loadgen", about = "Message throughput and delivery latency of a Matrix homeserver")]
struct Cli {
    /// Base URL of the homeserver (plain HTTP, loopback only), e.g. http://127.0.0.1:8008
    #[arg(long)]
    server: String,
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// Accounts to create (dm: 100, rooms: rooms × room-size, idle: 1000)
    #[arg(long)]
    users: Option<usize>,
    /// Rooms to create (rooms: 10; dm: users / 2)
    #[arg(long)]
    rooms: Option<usize>,
    /// Members per room (rooms: 20, closed: 10, bigroom: 2000)
    #[arg(long)]
    room_size: Option<usize>,
    /// Open-loop messages per second over all senders (dm: 20, rooms: 50, bigroom: 2)
    #[arg(long)]
    rate: Option<f64>,
    /// Closed-loop senders (closed: 8)
    #[arg(long)]
    senders: Option<usize>,
    /// Seconds of measured sending, after the warm-up
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// Seconds of sending before the measured window (not counted)
    #[arg(long, default_value_t = 5.0)]
    warmup: f64,
    /// Longest wait, in seconds, for outstanding sends and deliveries after sending stops
    #[arg(long, default_value_t = 10.0)]
    drain: f64,
    /// Server process to sample CPU time and RSS of (from /proc)
    #[arg(long)]
    server_pid: Option<u32>,
    /// Free text naming this run in the output (default: the server URL)
    #[arg(long)]
    label: Option<String>,
    /// Write the JSON result here
    #[arg(long)]
    out: Option<PathBuf>,
    /// Username prefix (default: random per run)
    #[arg(long)]
    prefix: Option<String>,
    /// Setup requests (register, createRoom, join, initial sync) in flight at once
    #[arg(long, default_value_t = 16)]
    register_concurrency: usize,
    #[arg(long, default_value = "bench-password")]
    password: String,
    /// Timeline limit of the receivers' sync filter
    #[arg(long, default_value_t = 100)]
    timeline_limit: u32,
    /// Upload the receivers' sync filter once per user (POST /user/{userId}/filter) and sync with
    /// its ID, as most clients do, instead of sending it inline with every /sync
    #[arg(long)]
    upload_filter: bool,
    /// How receivers get updates: /sync long-polls, or one subscribed WebSocket each (Hearth's
    /// org.hearth.ws). Default: sync (sockets: ws)
    #[arg(long, value_enum)]
    transport: Option<Transport>,
    /// How senders send: HTTP PUT /send, or the send op on the sender's own WebSocket
    #[arg(long, value_enum)]
    send_transport: Option<SendTransport>,
    /// WebSocket handshakes (each until its first sync frame) in progress at once
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
}

#[derive(Serialize)]
struct Parameters {
    server: String,
    users: usize,
    rooms: usize,
    room_size: usize,
    rate: Option<f64>,
    senders: usize,
    duration: f64,
    warmup: f64,
    drain: f64,
    timeline_limit: u32,
    upload_filter: bool,
    prefix: String,
    register_concurrency: usize,
    connect_concurrency: usize,
    server_pid: Option<u32>,
}

/// The sockets scenario's measurements.
#[derive(Serialize)]
struct SocketsResult {
    /// sockets asked for (one per user)
    sockets: usize,
    /// of those, subscribed and given their first `sync` frame before the clock started
    ready: usize,
    /// from the first connect to the last first frame (or the start timeout)
    open_secs: f64,
    /// open at the end of the hold
    open_at_end: usize,
    server_rss_mib_before_sockets: Option<f64>,
    server_rss_mib_after_sockets: Option<f64>,
    server_rss_mib_end: Option<f64>,
    /// 10 s after closing every socket: what the sockets left behind
    server_rss_mib_after_close: Option<f64>,
    /// [[seconds since the sockets were closed, RSS MiB], ...], once a second
    server_rss_after_close: Vec<(f64, f64)>,
    /// (RSS with every socket open − RSS before the first) / ready sockets
    rss_per_socket_kib: Option<f64>,
    /// the same with the RSS at the end of the hold
    rss_per_socket_kib_end: Option<f64>,
    /// the load generator's own RSS growth per socket
    loadgen_rss_per_socket_kib: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    label: String,
    scenario: Scenario,
    transport: Transport,
    send_transport: SendTransport,
    parameters: Parameters,
    started_at_unix: u64,
    setup_secs: BTreeMap<String, f64>,
    window_secs: f64,
    offered_rate: Option<f64>,
    achieved_send_rate: f64,
    deliveries_per_sec: f64,
    send_latency_ms: Summary,
    e2e_latency_ms: Summary,
    errors: BTreeMap<String, u64>,
    errors_by_request: BTreeMap<String, u64>,
    error_samples: Vec<ErrorSample>,
    #[serde(flatten)]
    outcome: Outcome,
    skipped_in_flight_cap: u64,
    /// how late the open-loop scheduler fired its ticks: (mean, max) in ms
    schedule_lag_ms_mean: f64,
    schedule_lag_ms_max: f64,
    duplicated: u64,
    limited_syncs: u64,
    gap_fetched: u64,
    gap_overlap: u64,
    syncs: u64,
    /// WebSocket connections opened again after a close (ws transports)
    reconnects: u64,
    /// WebSocket closes by code; "1006": the connection ended without one
    ws_closes: BTreeMap<String, u64>,
    /// `ack` ops sent (one per `sync` frame)
    acks: u64,
    /// `closing` frames whose `resume_token` was not the last frame's `next_batch`
    resume_token_mismatches: u64,
    /// receivers (long-poll loops, sockets) ready before the clock started, and how long that took
    receivers: usize,
    receivers_ready: usize,
    receivers_ready_secs: f64,
    sockets: Option<SocketsResult>,
    drain_secs: f64,
    server_cpu_seconds: Option<f64>,
    server_cores_avg: Option<f64>,
    server_rss_mib_max: Option<f64>,
    server_rss_mib_start: Option<f64>,
    server_rss_mib_before_setup: Option<f64>,
    server_rss_mib_after_setup: Option<f64>,
    server_rss_mib_end: Option<f64>,
    rss_per_user_kib: Option<f64>,
    rss_per_poller_kib: Option<f64>,
    loadgen_cores_avg: Option<f64>,
    /// [[bucket upper bound ms, count], ...]; log-scale, 20 buckets per decade
    e2e_histogram_ms: Vec<(f64, u64)>,
    /// [[seconds since phase start, server cores over the last interval, server RSS MiB], ...]
    server_samples: Vec<(f64, f64, f64)>,
}

fn mib(kib: u64) -> f64 {
    round3(kib as f64 / 1024.0)
}

fn random_hex() -> String {
    let h = std::collections::hash_map::RandomState::new().hash_one((now_us(), std::process::id()));
    format!("{:06x}", h & 0xff_ffff)
}

/// Only plain-HTTP loopback servers: this tool generates load, and load goes to this machine only.
fn check_server(url: &str) -> Result<(), String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| format!("--server {url}: must start with http://"))?;
    let authority = rest.split('/').next().unwrap_or("");
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    let loopback =
        host == "localhost" || host == "::1" || host.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return Err(format!("--server {url}: only loopback addresses (127.0.0.0/8, ::1, localhost) are allowed"));
    }
    Ok(())
}

fn fmt_ms(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn opt_mib(x: Option<f64>) -> String {
    x.map_or_else(|| "-".to_string(), |v| format!("{v:.0}"))
}

fn sockets_line(r: &Report, s: &SocketsResult) -> String {
    let errors: u64 = r.errors.values().sum();
    let per_socket = s.rss_per_socket_kib.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
    let per_socket_end = s.rss_per_socket_kib_end.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
    let own = s.loadgen_rss_per_socket_kib.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
    let cores = r.server_cores_avg.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"));
    format!(
        "sockets {}: transport {} {}/{} open in {:.1} s, {} open at end; server rss {} -> {} MiB, {per_socket} KiB per socket (end of hold {per_socket_end}, 10 s after close {} MiB) cpu {cores} cores; reconnects {} errors {errors}; loadgen {own} KiB per socket",
        r.label,
        r.transport.name(),
        s.ready,
        s.sockets,
        s.open_secs,
        s.open_at_end,
        opt_mib(s.server_rss_mib_before_sockets),
        opt_mib(s.server_rss_mib_after_sockets),
        opt_mib(s.server_rss_mib_after_close),
        r.reconnects,
    )
}

fn summary_line(r: &Report) -> String {
    if let Some(s) = &r.sockets {
        return sockets_line(r, s);
    }
    let offered = match r.offered_rate {
        Some(rate) => format!("{rate:.1}/s"),
        None if r.scenario == Scenario::Closed => format!("closed-loop x{}", r.parameters.senders),
        None => "-".to_string(),
    };
    let errors: u64 = r.errors.values().sum();
    let mut line = format!(
        "{} {}: offered {offered} achieved {:.1}/s deliveries {:.0}/s send p50 {}ms p99 {}ms e2e p50 {} p90 {} p99 {} max {} ms errors {errors} lost {} dup {} limited {}",
        r.scenario.name(),
        r.label,
        r.achieved_send_rate,
        r.deliveries_per_sec,
        fmt_ms(r.send_latency_ms.p50),
        fmt_ms(r.send_latency_ms.p99),
        fmt_ms(r.e2e_latency_ms.p50),
        fmt_ms(r.e2e_latency_ms.p90),
        fmt_ms(r.e2e_latency_ms.p99),
        fmt_ms(r.e2e_latency_ms.max),
        r.outcome.lost,
        r.duplicated,
        r.limited_syncs,
    );
    match (r.server_cores_avg, r.server_rss_mib_max) {
        (Some(cores), Some(rss)) => line.push_str(&format!(" cpu {cores:.2} cores rss {rss:.0} MiB")),
        _ => line.push_str(" cpu - rss -"),
    }
    if let Some(per_user) = r.rss_per_user_kib {
        line.push_str(&format!(" rss/user {per_user:.1} KiB"));
    }
    if let Some(per_poller) = r.rss_per_poller_kib {
        line.push_str(&format!(" (polling only {per_poller:.1} KiB)"));
    }
    line.push_str(&format!(
        " transport {} send {} reconnects {}",
        r.transport.name(),
        r.send_transport.name(),
        r.reconnects
    ));
    line
}

/// Raises the soft open-files limit to the hard limit; returns the limit now in force.
fn raise_open_files_limit() -> Result<u64, String> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(format!("getrlimit(RLIMIT_NOFILE): {}", std::io::Error::last_os_error()));
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            } else {
                eprintln!("warning: could not raise the open-files limit: {}", std::io::Error::last_os_error());
            }
        }
    }
    Ok(lim.rlim_cur)
}

/// The soft open-files limit of another process, from /proc/PID/limits.
fn process_open_files_limit(pid: u32) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    match real_main(cli).await {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(1);
        }
    }
}

async fn real_main(cli: Cli) -> Result<String, String> {
    check_server(&cli.server)?;
    for (flag, v) in [("--duration", cli.duration), ("--warmup", cli.warmup), ("--drain", cli.drain)] {
        if !(v.is_finite() && (0.0..=MAX_PHASE_SECS).contains(&v)) {
            return Err(format!("{flag} {v}: must be between 0 and {MAX_PHASE_SECS} seconds"));
        }
    }
    if cli.duration <= 0.0 {
        return Err("--duration must be positive".into());
    }
    if cli.timeline_limit == 0 || cli.timeline_limit > 10_000 {
        return Err("--timeline-limit must be in 1..=10000".into());
    }
    let ask =
        Ask { users: cli.users, rooms: cli.rooms, room_size: cli.room_size, rate: cli.rate, senders: cli.senders };
    let plan = Plan::new(cli.scenario, &ask)?;
    let prefix = cli.prefix.clone().unwrap_or_else(|| format!("lg{}_", random_hex()));
    let run_id = format!("{prefix}{}", random_hex());
    let label = cli.label.clone().unwrap_or_else(|| cli.server.clone());
    let sockets_scenario = plan.scenario == Scenario::Sockets;
    let transport = match (cli.transport, sockets_scenario) {
        (Some(Transport::Sync), true) => {
            return Err("--transport sync: the sockets scenario holds WebSockets (use idle for /sync)".into());
        }
        (Some(t), _) => t,
        (None, true) => Transport::Ws,
        (None, false) => Transport::Sync,
    };
    let sends = !matches!(plan.scenario, Scenario::Idle | Scenario::Sockets);
    let send_transport = match cli.send_transport {
        Some(SendTransport::Ws) if !sends => {
            return Err(format!("--send-transport does not apply to scenario {}", plan.scenario.name()));
        }
        Some(t) => t,
        None => SendTransport::Http,
    };
    let warmup = if sockets_scenario { 0.0 } else { cli.warmup };
    // One socket per user for ws receivers; with /sync receivers and ws sends, one unsubscribed
    // socket per user besides its long-poll.
    let sockets = match (transport, send_transport) {
        (Transport::Ws, _) => plan.users,
        (Transport::Sync, SendTransport::Ws) => plan.users,
        (Transport::Sync, SendTransport::Http) => 0,
    };
    let long_polls = if transport == Transport::Sync { plan.users } else { 0 };
    let fd_limit = raise_open_files_limit()?;
    let fd_need = (sockets + long_polls + cli.register_concurrency) as u64
        + FD_MARGIN
        + if plan.rate.is_some() { 2000 } else { 0 };
    if sockets > 0 && fd_limit < fd_need {
        return Err(format!(
            "{sockets} sockets need about {fd_need} open files, but the hard limit is {fd_limit} (raise it: ulimit -Hn, prlimit)"
        ));
    } else if fd_limit < fd_need {
        eprintln!(
            "warning: open-files limit {fd_limit} may be too low for {} users (raise with ulimit -n)",
            plan.users
        );
    }
    if let (Some(pid), true) = (cli.server_pid, sockets > 0)
        && let Some(server_limit) = process_open_files_limit(pid)
        && server_limit < (sockets as u64) + FD_MARGIN
    {
        return Err(format!(
            "the server (pid {pid}) may open {server_limit} files, too few for {sockets} sockets; raise its limit (prlimit --pid {pid} --nofile=N:N)"
        ));
    }

    let api = Arc::new(Api::new(&cli.server)?);
    let server_mon = cli.server_pid.map(|pid| ProcMon::new(Some(pid)));
    let self_mon = ProcMon::new(None);
    let read_server = || server_mon.as_ref().and_then(ProcMon::read);
    if let (Some(pid), None) = (cli.server_pid, read_server()) {
        return Err(format!("--server-pid {pid}: cannot read /proc/{pid}/stat and status"));
    }
    let before_setup = read_server();
    let started_at_unix = now_us() / 1_000_000;

    eprintln!(
        "{} {label}: {} users, {} rooms, transport {} send {}, prefix {prefix}; setting up",
        plan.scenario.name(),
        plan.users,
        plan.rooms.len(),
        transport.name(),
        send_transport.name(),
    );
    let initial_filter = enc(r#"{"room":{"timeline":{"limit":1}},"presence":{"not_types":["*"]}}"#);
    let world = tokio::time::timeout(
        SETUP_TIMEOUT,
        setup::build(api.clone(), &plan, &prefix, &cli.password, cli.register_concurrency, &initial_filter),
    )
    .await
    .map_err(|_| format!("setup did not finish within {} s", SETUP_TIMEOUT.as_secs()))??;
    let filter = json!({"room": {"timeline": {"limit": cli.timeline_limit}}, "presence": {"not_types": ["*"]}});
    // /sync takes the filter percent-encoded in the query; subscribe takes the object or the ID.
    let (filters, ws_filters): (Vec<String>, Vec<serde_json::Value>) = if cli.upload_filter {
        let ids = setup::upload_filters(api.clone(), &world.users, &filter, cli.register_concurrency).await?;
        ids.into_iter().map(|id| (enc(&id), json!(id))).unzip()
    } else {
        (vec![enc(&filter.to_string()); world.users.len()], vec![filter.clone(); world.users.len()])
    };
    let endpoint = if sockets > 0 { Some(WsEndpoint::new(&cli.server)?) } else { None };
    let ws_options =
        WsOptions { send_transport, endpoint, filters: ws_filters, connect_concurrency: cli.connect_concurrency };
    let ctx = Arc::new(Ctx::new(api.clone(), world.users, world.rooms, run_id, filters, ws_options));
    let after_setup = read_server();
    let self_before = self_mon.read();

    // Receivers first, so that every user is long-polling (or subscribed) before the first message
    // goes out.
    let mut receivers = JoinSet::new();
    for (u, since) in world.since.into_iter().enumerate() {
        match (transport, send_transport) {
            (Transport::Ws, _) => {
                receivers.spawn(ctx.clone().socket(u, since, true));
            }
            (Transport::Sync, SendTransport::Ws) => {
                receivers.spawn(ctx.clone().socket(u, since.clone(), false));
                receivers.spawn(ctx.clone().receiver(u, since));
            }
            (Transport::Sync, SendTransport::Http) => {
                receivers.spawn(ctx.clone().receiver(u, since));
            }
        }
    }
    let n_receivers = receivers.len();
    let start_timeout = (RECEIVER_START_TIMEOUT + SOCKET_START_PER_USER * sockets as u32).min(SETUP_TIMEOUT);
    if sockets > 0 {
        eprintln!("opening {sockets} sockets ({} handshakes at once)", cli.connect_concurrency);
    }
    let wait_start = Instant::now();
    let mut reported = Instant::now();
    while ctx.first_polls.load(Ordering::SeqCst) < n_receivers && wait_start.elapsed() < start_timeout {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if reported.elapsed() >= Duration::from_secs(5) {
            eprintln!("  ready: {}/{n_receivers}", ctx.first_polls.load(Ordering::SeqCst));
            reported = Instant::now();
        }
    }
    let receivers_ready_secs = wait_start.elapsed().as_secs_f64();
    let receivers_ready = ctx.first_polls.load(Ordering::SeqCst);
    if receivers_ready < n_receivers {
        eprintln!(
            "warning: only {receivers_ready}/{n_receivers} receivers ready after {:.0} s; going on",
            start_timeout.as_secs_f64()
        );
    } else {
        eprintln!("{n_receivers} receivers ready in {receivers_ready_secs:.1} s");
    }
    // Give the last long-polls time to reach the server.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let start = Instant::now();
    let warm_end = start + Duration::from_secs_f64(warmup);
    let end = warm_end + Duration::from_secs_f64(cli.duration);
    ctx.set_window(start, warm_end, end);
    let at_start = read_server();
    let self_at_start = self_mon.read();
    if sockets_scenario {
        eprintln!("holding {} sockets for {:.0} s", ctx.sockets_open.load(Ordering::SeqCst), cli.duration);
    } else {
        eprintln!("measuring: {warmup:.0} s warm-up, {:.0} s window", cli.duration);
    }

    // One server sample a second over the whole phase, for max RSS and the time series.
    let samples: Arc<Mutex<Vec<(f64, Reading)>>> = Arc::new(Mutex::new(Vec::new()));
    let sampler = server_mon.clone().map(|mon| {
        let samples = samples.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if let Some(r) = mon.read() {
                    samples.lock().unwrap_or_else(|p| p.into_inner()).push((start.elapsed().as_secs_f64(), r));
                }
            }
        })
    });

    let sender = match (plan.scenario, plan.rate) {
        (Scenario::Closed, _) => Some(tokio::spawn(ctx.clone().closed_loop(plan.senders))),
        (_, Some(rate)) if !ctx.rooms.is_empty() => Some(tokio::spawn(ctx.clone().open_loop(rate))),
        _ => None,
    };

    tokio::time::sleep_until(warm_end.into()).await;
    let server_w0 = read_server();
    let self_w0 = self_mon.read();
    tokio::time::sleep_until(end.into()).await;
    let server_w1 = read_server();
    let self_w1 = self_mon.read();

    // Drain: wait for outstanding sends and deliveries, at most --drain seconds.
    let drain_deadline = end + Duration::from_secs_f64(cli.drain);
    if sends {
        loop {
            let sender_done = sender.as_ref().is_none_or(|h| h.is_finished());
            if sender_done && ctx.in_flight() == 0 && ctx.all_delivered() {
                break;
            }
            if Instant::now() >= drain_deadline {
                eprintln!("drain: gave up after {:.1} s with {} sends in flight", cli.drain, ctx.in_flight());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let drain_secs = Instant::now().saturating_duration_since(end).as_secs_f64();
    let open_at_end = ctx.sockets_open.load(Ordering::SeqCst);
    if let Some(h) = &sender {
        h.abort();
    }
    // Long-polls stop, sockets close with 1000; whatever has not finished by then is aborted.
    ctx.stop();
    let _ = tokio::time::timeout(STOP_TIMEOUT, async { while receivers.join_next().await.is_some() {} }).await;
    receivers.abort_all();
    if let Some(s) = &sampler {
        s.abort();
    }
    let at_end = read_server();
    let mut after_close_series = Vec::new();
    let mut after_close = None;
    if sockets_scenario && server_mon.is_some() {
        let closed = Instant::now();
        while closed.elapsed() < AFTER_CLOSE_WATCH {
            tokio::time::sleep(Duration::from_secs(1)).await;
            after_close = read_server();
            if let Some(r) = after_close {
                after_close_series.push((round3(closed.elapsed().as_secs_f64()), mib(r.rss_kib)));
            }
        }
    }

    let window = cli.duration;
    let outcome = ctx.outcome();
    let (e2e, send, e2e_hist, t) = {
        let mut t = ctx.tally();
        let e2e = stats::summarize(&mut t.e2e_us);
        let send = stats::summarize(&mut t.send_us);
        let hist = stats::histogram(&t.e2e_us);
        (e2e, send, hist, std::mem::take(&mut *t))
    };

    let server_cpu = match (server_w0, server_w1) {
        (Some(a), Some(b)) => Some(round3(b.cpu_secs - a.cpu_secs)),
        _ => None,
    };
    let loadgen_cores = match (self_w0, self_w1) {
        (Some(a), Some(b)) => Some(round3((b.cpu_secs - a.cpu_secs) / window)),
        _ => None,
    };
    let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|p| p.into_inner()));
    let mut series = Vec::with_capacity(samples.len());
    let mut prev: Option<(f64, Reading)> = None;
    for &(ts, r) in &samples {
        let cores = prev.map_or(0.0, |(pt, pr)| if ts > pt { (r.cpu_secs - pr.cpu_secs) / (ts - pt) } else { 0.0 });
        series.push((round3(ts), round3(cores), mib(r.rss_kib)));
        prev = Some((ts, r));
    }
    let rss_max = samples
        .iter()
        .map(|(_, r)| r.rss_kib)
        .chain([at_start, server_w0, server_w1, at_end].into_iter().flatten().map(|r| r.rss_kib))
        .max();
    let per_user = |from: Option<Reading>| match (plan.scenario, from, server_w1) {
        (Scenario::Idle, Some(b), Some(e)) => Some(round3((e.rss_kib as f64 - b.rss_kib as f64) / plan.users as f64)),
        _ => None,
    };
    // As specified: everything the users cost, setup included; and the long-polls alone.
    let rss_per_user_kib = per_user(before_setup);
    let rss_per_poller_kib = per_user(after_setup);
    let sockets_result = sockets_scenario.then(|| {
        let ready = receivers_ready.max(1) as f64;
        let per_socket = |from: Option<Reading>, to: Option<Reading>| match (from, to) {
            (Some(a), Some(b)) => Some(round3((b.rss_kib as f64 - a.rss_kib as f64) / ready)),
            _ => None,
        };
        SocketsResult {
            sockets: plan.users,
            ready: receivers_ready,
            open_secs: round3(receivers_ready_secs),
            open_at_end,
            server_rss_mib_before_sockets: after_setup.map(|r| mib(r.rss_kib)),
            server_rss_mib_after_sockets: at_start.map(|r| mib(r.rss_kib)),
            server_rss_mib_end: server_w1.map(|r| mib(r.rss_kib)),
            server_rss_mib_after_close: after_close.map(|r| mib(r.rss_kib)),
            server_rss_after_close: std::mem::take(&mut after_close_series),
            rss_per_socket_kib: per_socket(after_setup, at_start),
            rss_per_socket_kib_end: per_socket(after_setup, server_w1),
            loadgen_rss_per_socket_kib: per_socket(self_before, self_at_start),
        }
    });

    let report = Report {
        label,
        scenario: plan.scenario,
        transport,
        send_transport,
        parameters: Parameters {
            server: cli.server.clone(),
            users: plan.users,
            rooms: plan.rooms.len(),
            room_size: plan.room_size,
            rate: plan.rate,
            senders: plan.senders,
            duration: cli.duration,
            warmup,
            drain: cli.drain,
            timeline_limit: cli.timeline_limit,
            upload_filter: cli.upload_filter,
            prefix,
            register_concurrency: cli.register_concurrency,
            connect_concurrency: cli.connect_concurrency,
            server_pid: cli.server_pid,
        },
        started_at_unix,
        setup_secs: world.timings.into_iter().map(|(k, v)| (k, round3(v))).collect(),
        window_secs: window,
        offered_rate: plan.rate,
        achieved_send_rate: round3(t.sends_ok_in_window as f64 / window),
        deliveries_per_sec: round3(t.deliveries_in_window as f64 / window),
        send_latency_ms: send,
        e2e_latency_ms: e2e,
        errors: t.errors,
        errors_by_request: t.errors_by_request,
        error_samples: t.error_samples,
        outcome,
        skipped_in_flight_cap: t.skipped_in_flight_cap,
        schedule_lag_ms_mean: round3(t.schedule_lag_total_us as f64 / t.ticks.max(1) as f64 / 1000.0),
        schedule_lag_ms_max: round3(t.schedule_lag_max_us as f64 / 1000.0),
        duplicated: t.duplicated,
        limited_syncs: t.limited_syncs,
        gap_fetched: t.gap_fetched,
        gap_overlap: t.gap_overlap,
        syncs: t.syncs,
        reconnects: t.reconnects,
        ws_closes: t.ws_closes,
        acks: t.acks,
        resume_token_mismatches: t.resume_token_mismatches,
        receivers: n_receivers,
        receivers_ready,
        receivers_ready_secs: round3(receivers_ready_secs),
        sockets: sockets_result,
        drain_secs: round3(drain_secs),
        server_cpu_seconds: server_cpu,
        server_cores_avg: server_cpu.map(|c| round3(c / window)),
        server_rss_mib_max: rss_max.map(mib),
        server_rss_mib_start: at_start.map(|r| mib(r.rss_kib)),
        server_rss_mib_before_setup: before_setup.map(|r| mib(r.rss_kib)),
        server_rss_mib_after_setup: after_setup.map(|r| mib(r.rss_kib)),
        server_rss_mib_end: server_w1.map(|r| mib(r.rss_kib)),
        rss_per_user_kib,
        rss_per_poller_kib,
        loadgen_cores_avg: loadgen_cores,
        e2e_histogram_ms: e2e_hist,
        server_samples: series,
    };
    let line = summary_line(&report);
    if let Some(path) = &cli.out {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
        let text = serde_json::to_string_pretty(&report).map_err(|e| format!("encoding the report: {e}"))?;
        std::fs::write(path, text + "\n").map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(line)
}
