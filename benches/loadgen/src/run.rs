//! The measured phase: receivers long-polling /sync or holding a WebSocket, senders on a fixed
//! schedule (open loop) or as fast as answers come (closed loop), and the bookkeeping of every
//! send and delivery.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, SemaphorePermit, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::matrix::{Account, Api, BENCH_KEY, Event, REQUEST_TIMEOUT, ReqError, SyncResponse, now_us, truncate};
use crate::setup::Room;
use crate::ws::{self, ServerFrame, WsEndpoint, WsStream};

/// Open-loop sends in flight at once; a tick finding none free is skipped (and counted).
pub const MAX_IN_FLIGHT: usize = 10_000;
/// Long-poll timeout of the receivers' /sync.
pub const SYNC_TIMEOUT_MS: u64 = 30_000;
/// Pages of /messages fetched to fill one limited timeline.
const MAX_GAP_PAGES: usize = 100;
const GAP_PAGE: u32 = 100;
/// Error bodies kept for the report.
const MAX_ERROR_SAMPLES: usize = 20;
/// `id` of the `subscribe` op; other ops are numbered `o<n>`.
const SUBSCRIBE_ID: &str = "sub";
/// Ops queued for one socket (sends waiting for the socket's task to write them).
const SOCKET_QUEUE: usize = 256;

/// How receivers get their updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// `GET /sync` long-polls
    Sync,
    /// one subscribed WebSocket per receiver (`org.hearth.ws`)
    Ws,
}

/// How senders send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SendTransport {
    /// `PUT /rooms/{roomId}/send/...`
    Http,
    /// `send` op on the sender's own WebSocket
    Ws,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Sync => "sync",
            Transport::Ws => "ws",
        }
    }
}

impl SendTransport {
    pub fn name(self) -> &'static str {
        match self {
            SendTransport::Http => "http",
            SendTransport::Ws => "ws",
        }
    }
}

/// The WebSocket side of a run.
pub struct WsOptions {
    pub send_transport: SendTransport,
    /// needed when either transport is `ws`
    pub endpoint: Option<WsEndpoint>,
    /// each user's `filter` member of `subscribe`: the inline filter, or an uploaded filter's ID
    pub filters: Vec<Value>,
    /// socket handshakes (plus first subscription) in progress at once
    pub connect_concurrency: usize,
}

/// An op for a user's socket: its members without `id` (the socket task numbers it), and where
/// the `response` or `error` goes.
pub struct WsRequest {
    pub op: Map<String, Value>,
    pub reply: oneshot::Sender<Result<Value, ReqError>>,
}

/// What one socket task carries from connection to connection.
struct SocketState {
    /// `next_batch` of the last frame processed: what to resume from
    since: String,
    seen: HashSet<u64>,
    /// ops written but not answered, by number: resent after a reconnect (a `send` keeps its
    /// `txn_id`, so that is idempotent)
    pending: BTreeMap<u64, (String, oneshot::Sender<Result<Value, ReqError>>)>,
    next_op: u64,
    ready: bool,
    /// connection failures in a row
    failures: u32,
}

/// How a connection ended.
enum Ended {
    /// closed or lost; the close code (from the `closing` frame or the close frame) and the
    /// `closing` frame's `resume_token`
    Closed { code: Option<u16>, resume: Option<String> },
    /// the subscription was refused
    SubscribeFailed,
    /// the run is over
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SendState {
    InFlight,
    Ok,
    Failed,
}

#[derive(Debug)]
struct Msg {
    /// scheduled inside the measured window (after warm-up, before the end)
    counted: bool,
    /// receivers that should see it: room members minus the sender
    expected: u32,
    /// distinct receivers that saw it
    delivered: u32,
    state: SendState,
}

#[derive(Serialize, Debug, Clone)]
pub struct ErrorSample {
    pub request: String,
    pub error: String,
    pub at_secs: f64,
}

/// Everything counted during the measured phase.
#[derive(Default)]
pub struct Tally {
    msgs: Vec<Msg>,
    pub e2e_us: Vec<u64>,
    pub send_us: Vec<u64>,
    pub duplicated: u64,
    pub gap_fetched: u64,
    pub gap_overlap: u64,
    pub limited_syncs: u64,
    pub syncs: u64,
    pub deliveries_in_window: u64,
    pub sends_ok_in_window: u64,
    pub skipped_in_flight_cap: u64,
    /// how late the open-loop scheduler fired, over all ticks (µs)
    pub schedule_lag_max_us: u64,
    pub schedule_lag_total_us: u64,
    pub ticks: u64,
    pub errors: BTreeMap<String, u64>,
    pub errors_by_request: BTreeMap<String, u64>,
    pub error_samples: Vec<ErrorSample>,
    /// WebSocket connections opened again after one closed
    pub reconnects: u64,
    /// WebSocket closes by code ("1006" when the connection ended without a close code)
    pub ws_closes: BTreeMap<String, u64>,
    /// `ack` ops sent
    pub acks: u64,
    /// `closing` frames whose `resume_token` differed from the last frame's `next_batch`
    pub resume_token_mismatches: u64,
}

/// What the messages of the measured window came to, once the drain is over.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Outcome {
    /// messages scheduled in the window
    pub attempted: u64,
    /// of those, answered 200
    pub sent: u64,
    pub send_failed: u64,
    /// still unanswered when the drain ended
    pub send_unfinished: u64,
    pub expected_deliveries: u64,
    pub delivered: u64,
    pub lost: u64,
    /// deliveries of window messages whose send failed or never finished
    pub delivered_unacknowledged: u64,
}

pub struct Ctx {
    pub api: Arc<Api>,
    pub users: Vec<Account>,
    pub rooms: Vec<Room>,
    pub run_id: String,
    /// each user's percent-encoded sync filter (inline JSON or an uploaded filter's ID)
    pub filters: Vec<String>,
    /// phase start, end of warm-up, end of sending
    window: OnceLock<(Instant, Instant, Instant)>,
    tally: Mutex<Tally>,
    in_flight: AtomicUsize,
    /// receivers ready: long-poll loops started, sockets that got their first frame (or, when
    /// they do not subscribe, are connected)
    pub first_polls: AtomicUsize,
    pub send_transport: SendTransport,
    ws: Option<WsEndpoint>,
    ws_filters: Vec<Value>,
    /// each user's socket op queue, when sends go over sockets
    ws_ops: Vec<mpsc::Sender<WsRequest>>,
    ws_inbox: Vec<Mutex<Option<mpsc::Receiver<WsRequest>>>>,
    connect_permits: Semaphore,
    /// sockets open right now
    pub sockets_open: AtomicUsize,
    stop: watch::Sender<bool>,
}

/// The number of an op `id` `o<n>`.
fn op_number(id: &str) -> Option<u64> {
    id.strip_prefix('o')?.parse().ok()
}

#[derive(Clone, Copy)]
enum Source {
    Sync,
    Gap,
}

impl Ctx {
    pub fn new(
        api: Arc<Api>,
        users: Vec<Account>,
        rooms: Vec<Room>,
        run_id: String,
        filters: Vec<String>,
        ws: WsOptions,
    ) -> Self {
        let (ws_ops, ws_inbox) = if ws.send_transport == SendTransport::Ws {
            users
                .iter()
                .map(|_| {
                    let (tx, rx) = mpsc::channel(SOCKET_QUEUE);
                    (tx, Mutex::new(Some(rx)))
                })
                .unzip()
        } else {
            (Vec::new(), Vec::new())
        };
        Ctx {
            api,
            users,
            rooms,
            run_id,
            filters,
            window: OnceLock::new(),
            tally: Mutex::new(Tally::default()),
            in_flight: AtomicUsize::new(0),
            first_polls: AtomicUsize::new(0),
            send_transport: ws.send_transport,
            ws: ws.endpoint,
            ws_filters: ws.filters,
            ws_ops,
            ws_inbox,
            connect_permits: Semaphore::new(ws.connect_concurrency.max(1)),
            sockets_open: AtomicUsize::new(0),
            stop: watch::Sender::new(false),
        }
    }

    /// Tells receivers and sockets to finish (sockets close with 1000).
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    pub fn tally(&self) -> MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_window(&self, start: Instant, warm_end: Instant, end: Instant) {
        let _ = self.window.set((start, warm_end, end));
    }

    fn in_window(&self, t: Instant) -> bool {
        self.window.get().is_some_and(|&(_, a, b)| t >= a && t < b)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    fn record_error(&self, request: &str, e: &ReqError) {
        let key = e.key();
        let at_secs = self.window.get().map(|w| w.0.elapsed().as_secs_f64()).unwrap_or(0.0);
        let mut t = self.tally();
        *t.errors.entry(key.clone()).or_default() += 1;
        let kind = request.split_whitespace().next().unwrap_or(request);
        *t.errors_by_request.entry(format!("{kind} {key}")).or_default() += 1;
        if t.error_samples.len() < MAX_ERROR_SAMPLES {
            t.error_samples.push(ErrorSample {
                request: request.to_string(),
                error: truncate(&e.to_string(), 1000).to_string(),
                at_secs,
            });
        }
    }

    fn new_msg(&self, room: usize, counted: bool) -> u64 {
        let expected = self.rooms[room].members.len().saturating_sub(1) as u32;
        let mut t = self.tally();
        t.msgs.push(Msg { counted, expected, delivered: 0, state: SendState::InFlight });
        (t.msgs.len() - 1) as u64
    }

    /// Sends message `id` in `room` as user `member`; the caller has counted it in flight.
    async fn send(&self, id: u64, room: usize, member: usize, counted: bool) {
        let user = &self.users[member];
        let room_id = &self.rooms[room].room_id;
        let sent_at_us = now_us();
        let mut content = Map::new();
        content.insert("msgtype".into(), json!("m.text"));
        content.insert("body".into(), json!(format!("bench {id}")));
        content.insert(
            BENCH_KEY.into(),
            json!({"id": id, "sent_at_us": sent_at_us, "sender": user.user_id, "run": self.run_id}),
        );
        let txn_id = format!("{}-{id}", self.run_id);
        let started = Instant::now();
        let result = match self.send_transport {
            SendTransport::Http => {
                self.api.send_message(&user.access_token, room_id, &txn_id, &Value::Object(content)).await
            }
            SendTransport::Ws => self.ws_send(member, room_id, &txn_id, Value::Object(content)).await,
        };
        let took = started.elapsed();
        let now = Instant::now();
        if let Err(e) = &result {
            let how = match self.send_transport {
                SendTransport::Http => format!("PUT /rooms/{room_id}/send/m.room.message/{txn_id}"),
                SendTransport::Ws => format!("ws op send room {room_id} txn {txn_id}"),
            };
            self.record_error(&format!("send {how} as {}", user.user_id), e);
        }
        {
            let mut t = self.tally();
            let ok = result.is_ok();
            t.msgs[id as usize].state = if ok { SendState::Ok } else { SendState::Failed };
            if ok {
                if counted {
                    t.send_us.push(took.as_micros() as u64);
                }
                if self.in_window(now) {
                    t.sends_ok_in_window += 1;
                }
            }
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    /// A `send` op on `member`'s socket: op → `response` (or `error`), at most [`REQUEST_TIMEOUT`].
    async fn ws_send(&self, member: usize, room_id: &str, txn_id: &str, content: Value) -> Result<(), ReqError> {
        let Some(queue) = self.ws_ops.get(member) else {
            return Err(ReqError::Closed("this user has no socket".into()));
        };
        let (reply, answer) = oneshot::channel();
        let op = ws::send_op(room_id, txn_id, content);
        let exchange = async {
            queue.send(WsRequest { op, reply }).await.map_err(|_| ReqError::Closed("socket task ended".into()))?;
            let result = answer.await.map_err(|_| ReqError::Closed("socket task ended before the answer".into()))??;
            match result.get("event_id").and_then(Value::as_str) {
                Some(_) => Ok(()),
                None => Err(ReqError::Decode(format!("send response without event_id: {result}"))),
            }
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange).await.map_err(|_| ReqError::Timeout)?
    }

    /// Benchmark messages of this run in `events` that `me` has not seen yet: (id, latency µs).
    fn collect(&self, me: usize, events: &[Event], arrived_us: u64, seen: &mut HashSet<u64>) -> (Vec<(u64, u64)>, u64) {
        let my_id = &self.users[me].user_id;
        let mut fresh = Vec::new();
        let mut repeats = 0;
        for ev in events {
            if &ev.sender == my_id {
                continue;
            }
            let Some(mark) = ev.bench() else { continue };
            if mark.run != self.run_id {
                continue;
            }
            if seen.insert(mark.id) {
                fresh.push((mark.id, arrived_us.saturating_sub(mark.sent_at_us)));
            } else {
                repeats += 1;
            }
        }
        (fresh, repeats)
    }

    fn record_deliveries(&self, fresh: &[(u64, u64)], repeats: u64, source: Source) {
        if fresh.is_empty() && repeats == 0 {
            return;
        }
        let now = Instant::now();
        let in_window = self.in_window(now);
        let mut t = self.tally();
        for &(id, latency) in fresh {
            let Some(m) = t.msgs.get_mut(id as usize) else { continue };
            m.delivered += 1;
            if m.counted {
                t.e2e_us.push(latency);
            }
        }
        if in_window {
            t.deliveries_in_window += fresh.len() as u64;
        }
        match source {
            Source::Sync => t.duplicated += repeats,
            Source::Gap => {
                t.gap_fetched += fresh.len() as u64;
                t.gap_overlap += repeats;
            }
        }
    }

    /// Fetches the events a limited timeline left out: back from `prev_batch` to the `since` token
    /// the sync started from.
    async fn fill_gap(&self, me: usize, room_id: &str, prev_batch: &str, since: &str, seen: &mut HashSet<u64>) {
        let token = &self.users[me].access_token;
        let mut from = prev_batch.to_string();
        for _ in 0..MAX_GAP_PAGES {
            match self.api.messages_back(token, room_id, &from, since, GAP_PAGE).await {
                Ok((page, arrived)) => {
                    let (fresh, repeats) = self.collect(me, &page.chunk, arrived, seen);
                    self.record_deliveries(&fresh, repeats, Source::Gap);
                    match page.end {
                        Some(end) if !page.chunk.is_empty() && end != from => from = end,
                        _ => break,
                    }
                }
                Err(e) => {
                    let req = format!("messages GET /rooms/{room_id}/messages?dir=b&from={from}&to={since}");
                    self.record_error(&req, &e);
                    break;
                }
            }
        }
    }

    /// Records what one `/sync` body (a response or a socket's `sync` frame) delivered to `me`,
    /// fetching the gaps of limited timelines back to `since`, the token it started from.
    async fn process_sync(&self, me: usize, resp: &SyncResponse, arrived: u64, since: &str, seen: &mut HashSet<u64>) {
        let mut limited = false;
        for (room_id, room) in &resp.rooms.join {
            let (fresh, repeats) = self.collect(me, &room.timeline.events, arrived, seen);
            self.record_deliveries(&fresh, repeats, Source::Sync);
            if room.timeline.limited {
                limited = true;
                if let Some(prev_batch) = &room.timeline.prev_batch {
                    self.fill_gap(me, room_id, prev_batch, since, seen).await;
                }
            }
        }
        let mut t = self.tally();
        t.syncs += 1;
        if limited {
            t.limited_syncs += 1;
        }
    }

    /// One user's long-poll loop; runs until stopped or aborted.
    pub async fn receiver(self: Arc<Self>, me: usize, mut since: String) {
        let token = self.users[me].access_token.clone();
        let filter = self.filters[me].clone();
        let mut seen: HashSet<u64> = HashSet::new();
        let mut failures: u32 = 0;
        let mut stop = self.stop.subscribe();
        self.first_polls.fetch_add(1, Ordering::SeqCst);
        loop {
            let polled = tokio::select! {
                polled = self.api.sync(&token, &filter, Some(&since), SYNC_TIMEOUT_MS) => polled,
                _ = stop.changed() => return,
            };
            match polled {
                Ok((resp, arrived)) => {
                    failures = 0;
                    self.process_sync(me, &resp, arrived, &since, &mut seen).await;
                    since = resp.next_batch;
                }
                Err(e) => {
                    self.record_error(&format!("sync GET /sync?since={since} as {}", self.users[me].user_id), &e);
                    failures += 1;
                    let backoff = Duration::from_millis(100u64 << failures.min(6)).min(Duration::from_secs(5));
                    tokio::time::sleep(e.retry_after().unwrap_or(backoff).min(Duration::from_secs(10))).await;
                }
            }
        }
    }

    fn mark_ready(&self, st: &mut SocketState) {
        if !st.ready {
            st.ready = true;
            self.first_polls.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// One user's WebSocket: connects (at most `connect_concurrency` handshakes at once),
    /// subscribes from `since` when `subscribe` (otherwise only sends), reads `sync` frames and
    /// acks each, writes queued ops; after a close it reconnects and resumes. Runs until stopped,
    /// aborted, or the server says the session is logged out (4001).
    pub async fn socket(self: Arc<Self>, me: usize, since: String, subscribe: bool) {
        let Some(endpoint) = self.ws.as_ref() else { return };
        let user = &self.users[me];
        let mut inbox = self.ws_inbox.get(me).and_then(|m| m.lock().unwrap_or_else(|p| p.into_inner()).take());
        let mut stop = self.stop.subscribe();
        let mut st = SocketState {
            since,
            seen: HashSet::new(),
            pending: BTreeMap::new(),
            next_op: 0,
            ready: false,
            failures: 0,
        };
        let mut connections: u64 = 0;
        loop {
            if *stop.borrow() {
                return;
            }
            let Ok(permit) = self.connect_permits.acquire().await else { return };
            let connected = tokio::select! {
                connected = endpoint.connect(&user.access_token) => connected,
                _ = stop.changed() => return,
            };
            let delay = match connected {
                Ok(mut stream) => {
                    connections += 1;
                    if connections > 1 {
                        self.tally().reconnects += 1;
                    }
                    self.sockets_open.fetch_add(1, Ordering::SeqCst);
                    let ended =
                        self.connection(me, &mut stream, &mut st, subscribe, &mut inbox, &mut stop, permit).await;
                    self.sockets_open.fetch_sub(1, Ordering::SeqCst);
                    drop(stream);
                    st.failures += 1;
                    match ended {
                        Ended::Stopped => return,
                        Ended::SubscribeFailed => ws::reconnect_delay(None, st.failures + 1),
                        Ended::Closed { code, resume } => {
                            let key = code.map_or_else(|| "1006".to_string(), |c| c.to_string());
                            *self.tally().ws_closes.entry(key).or_default() += 1;
                            if let Some(resume) = resume {
                                if resume != st.since {
                                    self.tally().resume_token_mismatches += 1;
                                }
                                // Resume where the server says it stopped; were it not where this
                                // client stopped, deliveries would show as lost or duplicated.
                                st.since = resume;
                            }
                            if code.is_some_and(ws::is_logged_out) {
                                let e = ReqError::Closed(format!("closed with {code:?}: logged out"));
                                self.record_error(&format!("socket of {}", user.user_id), &e);
                                return;
                            }
                            ws::reconnect_delay(code, st.failures)
                        }
                    }
                }
                Err(e) => {
                    drop(permit);
                    self.record_error(&format!("connect ws {} as {}", endpoint.url(), user.user_id), &e);
                    st.failures += 1;
                    e.retry_after().unwrap_or_else(|| ws::reconnect_delay(None, st.failures + 1))
                }
            };
            if !delay.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }

    /// Drives one open connection until it ends. `permit` (a handshake slot) is released once the
    /// socket is ready.
    #[allow(clippy::too_many_arguments)]
    async fn connection(
        &self,
        me: usize,
        stream: &mut WsStream,
        st: &mut SocketState,
        subscribe: bool,
        inbox: &mut Option<mpsc::Receiver<WsRequest>>,
        stop: &mut watch::Receiver<bool>,
        permit: SemaphorePermit<'_>,
    ) -> Ended {
        let user = &self.users[me];
        let mut permit = Some(permit);
        let lost = |e: &dyn std::fmt::Display| {
            self.record_error(&format!("socket of {}", user.user_id), &ReqError::Transport(e.to_string()));
            Ended::Closed { code: None, resume: None }
        };
        if subscribe {
            let op = ws::subscribe_op(SUBSCRIBE_ID, Some(&st.since), &self.ws_filters[me]);
            if let Err(e) = stream.send(Message::text(op)).await {
                return lost(&e);
            }
        } else {
            self.mark_ready(st);
            drop(permit.take());
        }
        // Ops the previous connection did not answer: again (a send keeps its txn_id).
        st.pending.retain(|_, (_, reply)| !reply.is_closed());
        for (text, _) in st.pending.values() {
            if let Err(e) = stream.send(Message::text(text.clone())).await {
                return lost(&e);
            }
        }
        let mut closing: (Option<u16>, Option<String>) = (None, None);
        loop {
            tokio::select! {
                message = stream.next() => {
                    let message = match message {
                        Some(Ok(message)) => message,
                        Some(Err(e)) => {
                            if closing.0.is_none() {
                                return lost(&e);
                            }
                            return Ended::Closed { code: closing.0, resume: closing.1 };
                        }
                        None => return Ended::Closed { code: closing.0, resume: closing.1 },
                    };
                    let text = match message {
                        Message::Text(text) => text,
                        Message::Close(frame) => {
                            let code = closing.0.or(frame.map(|f| u16::from(f.code)));
                            return Ended::Closed { code, resume: closing.1 };
                        }
                        // Pings are answered by the library; nothing else is expected.
                        _ => continue,
                    };
                    let arrived = now_us();
                    let frame: ServerFrame = match serde_json::from_str(text.as_str()) {
                        Ok(frame) => frame,
                        Err(e) => {
                            let e = ReqError::Decode(format!("{e}; frame starts {:?}", truncate(text.as_str(), 300)));
                            self.record_error(&format!("frame to {}", user.user_id), &e);
                            continue;
                        }
                    };
                    match frame.kind.as_str() {
                        "sync" => {
                            let Some(next_batch) = frame.next_batch else {
                                let e = ReqError::Decode("sync frame without next_batch".into());
                                self.record_error(&format!("frame to {}", user.user_id), &e);
                                continue;
                            };
                            if let Some(data) = &frame.data {
                                Box::pin(self.process_sync(me, data, arrived, &st.since, &mut st.seen)).await;
                            }
                            st.since = next_batch;
                            st.failures = 0;
                            self.mark_ready(st);
                            drop(permit.take());
                            if let Err(e) = stream.send(Message::text(ws::ack_op(&st.since))).await {
                                return lost(&e);
                            }
                            self.tally().acks += 1;
                        }
                        "response" => {
                            if let Some(n) = frame.id.as_deref().and_then(op_number)
                                && let Some((_, reply)) = st.pending.remove(&n)
                            {
                                let _ = reply.send(Ok(frame.result.unwrap_or_default()));
                            }
                        }
                        "error" => {
                            let e = frame.op_error();
                            match frame.id.as_deref() {
                                Some(SUBSCRIBE_ID) => {
                                    self.record_error(&format!("subscribe since={} as {}", st.since, user.user_id), &e);
                                    return Ended::SubscribeFailed;
                                }
                                Some(id) => match op_number(id).and_then(|n| st.pending.remove(&n)) {
                                    Some((_, reply)) => {
                                        let _ = reply.send(Err(e));
                                    }
                                    None => self.record_error(&format!("ws answer to unknown op {id} of {}", user.user_id), &e),
                                },
                                // Errors of ops without id (ack) and connection-level errors.
                                None => self.record_error(&format!("ws (ack or connection) of {}", user.user_id), &e),
                            }
                        }
                        "closing" => closing = (frame.code, frame.resume_token),
                        _ => {}
                    }
                }
                request = async {
                    match inbox.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let Some(request) = request else {
                        *inbox = None;
                        continue;
                    };
                    let n = st.next_op;
                    st.next_op += 1;
                    let mut op = request.op;
                    op.insert("id".into(), json!(format!("o{n}")));
                    let text = Value::Object(op).to_string();
                    let written = stream.send(Message::text(text.clone())).await;
                    st.pending.insert(n, (text, request.reply));
                    if let Err(e) = written {
                        return lost(&e);
                    }
                }
                _ = stop.changed() => {
                    let frame = CloseFrame { code: CloseCode::Normal, reason: "".into() };
                    let _ = tokio::time::timeout(Duration::from_secs(1), stream.close(Some(frame))).await;
                    return Ended::Stopped;
                }
            }
        }
    }

    /// Open loop: message k is due at `start + k / rate`, whatever became of the earlier ones.
    /// Tick k goes to room k mod R, and within it to member (k div R) mod size.
    pub async fn open_loop(self: Arc<Self>, rate: f64) {
        let Some(&(start, warm_end, end)) = self.window.get() else { return };
        let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let n_rooms = self.rooms.len();
        let mut k: u64 = 0;
        loop {
            let due = start + Duration::from_secs_f64(k as f64 / rate);
            if due >= end {
                break;
            }
            tokio::time::sleep_until(due.into()).await;
            let lag = Instant::now().saturating_duration_since(due).as_micros() as u64;
            let room = k as usize % n_rooms;
            let members = &self.rooms[room].members;
            let member = members[(k as usize / n_rooms) % members.len()];
            let counted = due >= warm_end;
            {
                let mut t = self.tally();
                t.ticks += 1;
                t.schedule_lag_total_us += lag;
                t.schedule_lag_max_us = t.schedule_lag_max_us.max(lag);
            }
            match permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    let id = self.new_msg(room, counted);
                    self.in_flight.fetch_add(1, Ordering::SeqCst);
                    let ctx = self.clone();
                    tokio::spawn(async move {
                        let _permit: OwnedSemaphorePermit = permit;
                        ctx.send(id, room, member, counted).await;
                    });
                }
                Err(_) => {
                    if counted {
                        self.tally().skipped_in_flight_cap += 1;
                    }
                }
            }
            k += 1;
        }
    }

    /// Closed loop: `senders` members of room 0 each send, wait for the answer, and send again.
    pub async fn closed_loop(self: Arc<Self>, senders: usize) {
        let Some(&(_, warm_end, end)) = self.window.get() else { return };
        let mut set = JoinSet::new();
        for s in 0..senders {
            let ctx = self.clone();
            set.spawn(async move {
                let member = ctx.rooms[0].members[s];
                loop {
                    let now = Instant::now();
                    if now >= end {
                        break;
                    }
                    let counted = now >= warm_end;
                    let id = ctx.new_msg(0, counted);
                    ctx.in_flight.fetch_add(1, Ordering::SeqCst);
                    ctx.send(id, 0, member, counted).await;
                    if ctx.tally().msgs[id as usize].state == SendState::Failed {
                        // Do not spin on a failing server.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            });
        }
        while set.join_next().await.is_some() {}
    }

    /// True once every successfully sent window message has reached all its receivers.
    pub fn all_delivered(&self) -> bool {
        let t = self.tally();
        t.msgs.iter().filter(|m| m.counted && m.state == SendState::Ok).all(|m| m.delivered >= m.expected)
    }

    pub fn outcome(&self) -> Outcome {
        let t = self.tally();
        let mut o = Outcome::default();
        for m in t.msgs.iter().filter(|m| m.counted) {
            o.attempted += 1;
            match m.state {
                SendState::Ok => {
                    o.sent += 1;
                    o.expected_deliveries += u64::from(m.expected);
                    o.delivered += u64::from(m.delivered.min(m.expected));
                }
                SendState::Failed => {
                    o.send_failed += 1;
                    o.delivered_unacknowledged += u64::from(m.delivered);
                }
                SendState::InFlight => {
                    o.send_unfinished += 1;
                    o.delivered_unacknowledged += u64::from(m.delivered);
                }
            }
        }
        o.lost = o.expected_deliveries - o.delivered;
        o
    }
}
