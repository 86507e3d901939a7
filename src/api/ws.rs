//! Hearth's WebSocket client transport, as specified in `spec/websocket.md`.
//!
//! A thin transport over the same services as HTTP: `subscribe` streams frames from the one
//! delivery core (`service::sync`), and the client's ops call the same service methods as the
//! HTTP endpoints. Per connection: a reader that handles ops one at a time, a writer that owns
//! the socket's sending half behind a bounded queue, and (while subscribed) a producer of `sync`
//! frames. A client that lets the queue fill is told where to resume and closed (4008); nothing
//! waits for it.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    extract::{
        State,
        ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection},
    },
    http::{HeaderMap, header},
    response::{IntoResponse, Response},
};
use futures_util::{SinkExt, StreamExt};
use governor::{DefaultDirectRateLimiter, Quota};
use parking_lot::Mutex;
use ruma::{EventId, OwnedUserId, RoomId, UserId, api::client::filter::FilterDefinition};
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, watch};

use crate::{
    api::{AppState, extract::ClientIp},
    config::{RateLimit, WebSocketConfig},
    error::Error,
    service::{
        filter, now_ms,
        rate_limit::UserAction,
        rooms::send::Sender,
        stream::StreamToken,
        sync::{Delivered, SyncRequest},
        users::Authed,
    },
};

/// The WebSocket subprotocol of version 1.
pub const SUBPROTOCOL: &str = "org.hearth.ws.v1";
/// Largest client frame.
const MAX_CLIENT_FRAME: usize = 64 * 1024;
/// Largest client message the socket reads in full. Messages over `MAX_CLIENT_FRAME` but under
/// this are read and then refused (1009), which leaves the connection clean for the `closing`
/// frame and the close handshake; larger ones make the WebSocket layer give up mid-message, and
/// closing a socket with unread data resets it, losing what was sent last.
const READ_LIMIT: usize = 256 * 1024;
/// Starting size of a socket's read buffer. tungstenite's default (128 KiB, allocated up front)
/// would make every idle socket cost that much; client frames are small and the buffer grows
/// for the rare large one. Writes go straight out (write buffer 0): every frame is flushed
/// as soon as it is written anyway.
const SOCKET_BUFFER: usize = 4 * 1024;
const AUTH_DEADLINE: Duration = Duration::from_secs(10);
const PING_INTERVAL: Duration = Duration::from_secs(30);
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How often an open connection re-checks that its device still exists.
const SESSION_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// Consecutive frames that are not ops before the connection is closed (4000).
const MAX_NON_OPS: u32 = 10;
/// How long the server waits for queued frames to drain before a close.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Long-poll window of the frame producer (it loops; nothing is sent for empty windows).
const PRODUCER_POLL: Duration = Duration::from_secs(30);

/// A device: user and device ID.
type DeviceKey = (OwnedUserId, String);
/// Asks one connection to close.
type CloseSender = watch::Sender<Option<Close>>;
/// Frames sent on a connection and not yet acknowledged: their tokens and deliveries.
type Pending = Arc<Mutex<VecDeque<(StreamToken, Vec<Delivered>)>>>;

/// A close the server decided on.
#[derive(Debug, Clone)]
struct Close {
    code: u16,
    reason: &'static str,
}

impl Close {
    /// Whether a `closing` frame goes first: before every close the server starts, but not in
    /// reply to the client's own close (1000), after which the client expects nothing more.
    fn announced(&self) -> bool {
        self.code != 1000
    }
}

/// Everything the connections of this server share.
pub struct WsHub {
    config: WebSocketConfig,
    op_limit: Option<RateLimit>,
    next_id: AtomicU64,
    /// Per device, its open connections, oldest first.
    devices: Mutex<HashMap<DeviceKey, VecDeque<(u64, CloseSender)>>>,
    shutdown: watch::Sender<bool>,
    /// Upgraded connections whose task is still running (a shutdown waits for their close
    /// frames): the count only changes through `Running`.
    running: watch::Sender<usize>,
}

/// Counts a connection task as running while it lives.
struct Running(watch::Sender<usize>);

impl Running {
    fn new(running: &watch::Sender<usize>) -> Running {
        running.send_modify(|count| *count += 1);
        Running(running.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.send_modify(|count| *count -= 1);
    }
}

impl WsHub {
    pub fn new(config: WebSocketConfig, op_limit: Option<RateLimit>) -> WsHub {
        WsHub {
            config,
            op_limit,
            next_id: AtomicU64::new(1),
            devices: Mutex::new(HashMap::new()),
            shutdown: watch::channel(false).0,
            running: watch::channel(0).0,
        }
    }

    /// Waits until every connection task has ended (after [`Self::shut_down`], once each has sent
    /// its `closing` frame and close), at most `limit`; whether they all did.
    pub async fn wait_closed(&self, limit: std::time::Duration) -> bool {
        let mut running = self.running.subscribe();
        tokio::time::timeout(limit, running.wait_for(|count| *count == 0)).await.is_ok()
    }

    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    /// Closes every connection with 1001 (server shutting down), announcing resume tokens.
    pub fn shut_down(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Number of open, authenticated connections.
    pub fn connection_count(&self) -> usize {
        self.devices.lock().values().map(VecDeque::len).sum()
    }

    fn register(&self, user: &UserId, device: &str, id: u64, close: watch::Sender<Option<Close>>) {
        let mut devices = self.devices.lock();
        let connections = devices.entry((user.to_owned(), device.to_owned())).or_default();
        connections.push_back((id, close));
        while connections.len() > self.config.max_connections_per_device {
            if let Some((_, oldest)) = connections.pop_front() {
                let _ = oldest.send(Some(Close { code: 4029, reason: "too many connections" }));
            }
        }
    }

    fn unregister(&self, user: &UserId, device: &str, id: u64) {
        let mut devices = self.devices.lock();
        let key = (user.to_owned(), device.to_owned());
        if let Some(connections) = devices.get_mut(&key) {
            connections.retain(|(other, _)| *other != id);
            if connections.is_empty() {
                devices.remove(&key);
            }
        }
    }
}

/// `GET /_matrix/client/unstable/org.hearth.ws/v1/connect`
pub async fn connect(
    State(app): State<AppState>,
    ClientIp(peer): ClientIp,
    headers: HeaderMap,
    uri: axum::http::Uri,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if !app.ws.enabled() {
        return Error::Unrecognized.into_response();
    }
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(WebSocketUpgradeRejection::InvalidWebSocketVersionHeader(_)) => {
            // RFC 6455 §4.2.2: name the version this server speaks, so the client can retry with it.
            let mut response = Error::Unknown("Only WebSocket version 13 is supported".to_owned())
                .into_response_with(426, "M_UNRECOGNIZED");
            response.headers_mut().insert(header::SEC_WEBSOCKET_VERSION, header::HeaderValue::from_static("13"));
            return response;
        }
        Err(_) => {
            return Error::Unknown("Not a WebSocket upgrade request".to_owned())
                .into_response_with(400, "M_UNRECOGNIZED");
        }
    };
    let offered = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|protocol| protocol.trim() == SUBPROTOCOL);
    if !offered {
        return Error::Unknown(format!("The {SUBPROTOCOL} subprotocol is required"))
            .into_response_with(400, "M_UNRECOGNIZED");
    }
    if uri.query().is_some_and(|q| q.split('&').any(|pair| pair.starts_with("access_token="))) {
        return Error::InvalidParam(
            "Send the access token in the Authorization header or an auth op, not the URL".to_owned(),
        )
        .into_response();
    }
    let header_token =
        headers.get(header::AUTHORIZATION).map(|_| crate::api::extract::access_token(&headers, None).ok());
    let origin_refused = match headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) {
        Some(origin) => {
            !app.ws.config.allowed_origins.is_empty() && !app.ws.config.allowed_origins.iter().any(|a| a == origin)
        }
        None => false,
    };
    upgrade
        .protocols([SUBPROTOCOL])
        .max_message_size(READ_LIMIT)
        .max_frame_size(READ_LIMIT)
        .read_buffer_size(SOCKET_BUFFER)
        .write_buffer_size(0)
        .on_upgrade(move |socket| async move {
            let _running = Running::new(&app.ws.running);
            let connection = Connection::new(app, peer);
            connection.run(socket, header_token, origin_refused).await;
        })
}

trait IntoResponseWith {
    fn into_response_with(self, status: u16, errcode: &'static str) -> Response;
}

impl IntoResponseWith for Error {
    fn into_response_with(self, status: u16, errcode: &'static str) -> Response {
        let status = axum::http::StatusCode::from_u16(status).unwrap_or(axum::http::StatusCode::BAD_REQUEST);
        (status, axum::Json(json!({"errcode": errcode, "error": self.to_string()}))).into_response()
    }
}

/// Something for the writer to put on the wire.
enum Outbound {
    /// A JSON frame; `sync` tells `sync` frames from answers (only the former are held to the
    /// byte bound, §11.1).
    Frame {
        text: String,
        sync: bool,
    },
    Ping,
    Close(Close, Option<String>),
}

/// The state one connection's reader keeps.
struct Connection {
    app: AppState,
    /// The client's address (the forwarded one behind a trusted proxy).
    peer: Option<std::net::IpAddr>,
    id: u64,
    authed: Option<Authed>,
    token: Option<String>,
    /// Tokens and deliveries of the frames sent but not yet acknowledged, oldest first.
    pending: Pending,
    /// The `next_batch` of the last frame queued (the resume token), if subscribed.
    last_sent: Arc<Mutex<Option<StreamToken>>>,
    producer: Option<tokio::task::JoinHandle<()>>,
    /// Held by a `send` op from before its event is stored until its `response` is queued, and
    /// by the producer while it queues a frame: the `response` precedes the frame with the event.
    send_gate: Arc<tokio::sync::Mutex<()>>,
    non_ops: u32,
    limiter: Option<DefaultDirectRateLimiter>,
}

impl Connection {
    fn new(app: AppState, peer: Option<std::net::IpAddr>) -> Connection {
        let limiter = app.ws.op_limit.map(|limit| {
            let period = Duration::from_secs_f64(1.0 / limit.per_second).max(Duration::from_nanos(1));
            let burst = std::num::NonZeroU32::new(limit.burst).unwrap_or(std::num::NonZeroU32::MIN);
            DefaultDirectRateLimiter::direct(Quota::with_period(period).expect("positive").allow_burst(burst))
        });
        let id = app.ws.next_id.fetch_add(1, Ordering::Relaxed);
        Connection {
            app,
            peer,
            id,
            authed: None,
            token: None,
            pending: Arc::new(Mutex::new(VecDeque::new())),
            last_sent: Arc::new(Mutex::new(None)),
            producer: None,
            send_gate: Arc::default(),
            non_ops: 0,
            limiter,
        }
    }

    async fn run(mut self, socket: WebSocket, header_token: Option<Option<String>>, origin_refused: bool) {
        let (mut sink, mut stream) = socket.split();
        let config = &self.app.ws.config;
        let (out_tx, mut out_rx) = mpsc::channel::<Outbound>(config.outbound_buffer_frames);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let queued_syncs = Arc::new(AtomicUsize::new(0));
        let (close_tx, mut close_rx) = watch::channel::<Option<Close>>(None);

        // Writer: owns the sending half; frames leave in queue order.
        let (writer_bytes, writer_syncs) = (queued_bytes.clone(), queued_syncs.clone());
        let writer = tokio::spawn(async move {
            while let Some(item) = out_rx.recv().await {
                let result = match item {
                    Outbound::Frame { text, sync } => {
                        let len = text.len();
                        // A frame counts as queued until it is written out, so a large one being
                        // written still holds its place in the bound.
                        let sent = sink.send(Message::Text(Utf8Bytes::from(text))).await;
                        writer_bytes.fetch_sub(len, Ordering::Relaxed);
                        if sync {
                            writer_syncs.fetch_sub(1, Ordering::Relaxed);
                        }
                        sent
                    }
                    Outbound::Ping => sink.send(Message::Ping(Default::default())).await,
                    Outbound::Close(close, resume) => {
                        if close.announced() {
                            let mut frame = json!({"type": "closing", "code": close.code, "reason": close.reason});
                            if let Some(resume) = resume {
                                frame["resume_token"] = json!(resume);
                            }
                            let _ = sink.send(Message::Text(Utf8Bytes::from(frame.to_string()))).await;
                        }
                        let frame = CloseFrame { code: close.code, reason: Utf8Bytes::from_static(close.reason) };
                        let _ = sink.send(Message::Close(Some(frame))).await;
                        let _ = sink.close().await;
                        break;
                    }
                };
                if result.is_err() {
                    break;
                }
            }
        });

        let outbound = Outbound2 {
            tx: out_tx.clone(),
            bytes: queued_bytes.clone(),
            syncs: queued_syncs.clone(),
            limit: config.outbound_buffer_bytes,
        };
        let mut shutdown = self.app.ws.shutdown.subscribe();
        let close = if origin_refused {
            Some(Close { code: 1008, reason: "origin not allowed" })
        } else {
            // Authenticate with the header, if one was sent.
            let mut early_close = None;
            match header_token {
                Some(Some(token)) => {
                    if let Err(close) = Box::pin(self.authenticate(&outbound, token, None, close_tx.clone())).await {
                        early_close = Some(close);
                    }
                }
                Some(None) => {
                    outbound.error(None, "M_MISSING_TOKEN", "Malformed Authorization header", Map::new()).await;
                    early_close = Some(Close { code: 4001, reason: "M_MISSING_TOKEN" });
                }
                None => {}
            }
            match early_close {
                Some(close) => Some(close),
                None => self.read_loop(&mut stream, &outbound, &mut close_rx, &mut shutdown, close_tx.clone()).await,
            }
        };

        if let Some(producer) = self.producer.take() {
            producer.abort();
        }
        if let Some(authed) = &self.authed {
            self.app.ws.unregister(&authed.user_id, authed.device_id.as_str(), self.id);
            // Remember what this connection delivered but was not acknowledged, so a resume with
            // the last token still confirms it.
            let pending: Vec<(StreamToken, Vec<Delivered>)> = self.pending.lock().drain(..).collect();
            if let Some((token, _)) = pending.last() {
                let delivered = pending.iter().flat_map(|(_, d)| d.iter().cloned()).collect();
                self.app.sync.remember_unconfirmed(&authed.user_id, authed.device_id.as_str(), *token, delivered);
            }
        }
        if let Some(close) = close {
            tracing::debug!(
                connection = self.id,
                code = close.code,
                reason = close.reason,
                "websocket closed by the server"
            );
            let resume = if close.code == 4001 { None } else { self.last_sent.lock().map(|t| t.to_string()) };
            // Let what is queued drain (a slow consumer gets its chance), then close.
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, out_tx.send(Outbound::Close(close, resume))).await;
        }
        drop(out_tx);
        drop(outbound);
        // Keep reading (and ignoring) until the client answers the close, so the socket is not
        // closed with unread data: that would reset it and lose the last frames sent.
        let reads = async { while let Some(Ok(_)) = stream.next().await {} };
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, futures_util::future::join(writer, reads)).await;
    }

    /// Reads frames until something closes the connection; returns the close to perform (None
    /// when the client closed or vanished).
    async fn read_loop(
        &mut self,
        stream: &mut futures_util::stream::SplitStream<WebSocket>,
        outbound: &Outbound2,
        close_rx: &mut watch::Receiver<Option<Close>>,
        shutdown: &mut watch::Receiver<bool>,
        close_tx: watch::Sender<Option<Close>>,
    ) -> Option<Close> {
        let auth_deadline = tokio::time::Instant::now() + AUTH_DEADLINE;
        let mut ping = tokio::time::interval(PING_INTERVAL);
        ping.tick().await;
        let mut session_check = tokio::time::interval(SESSION_CHECK_INTERVAL);
        session_check.tick().await;
        let mut idle_deadline = tokio::time::Instant::now() + IDLE_TIMEOUT;
        loop {
            tokio::select! {
                message = stream.next() => {
                    idle_deadline = tokio::time::Instant::now() + IDLE_TIMEOUT;
                    let message = match message {
                        None => return None,
                        Some(Ok(message)) => message,
                        Some(Err(err)) => return Some(protocol_close(&err)),
                    };
                    match message {
                        Message::Text(text) if text.len() > MAX_CLIENT_FRAME => {
                            return Some(Close { code: 1009, reason: "frame too large" });
                        }
                        Message::Text(text) => {
                            // Boxed: the ops' states would otherwise be part of this loop's
                            // future, which every idle socket keeps for its whole life.
                            if let Some(close) = Box::pin(self.handle_text(text.as_str(), outbound, close_tx.clone())).await {
                                return Some(close);
                            }
                        }
                        Message::Binary(_) => return Some(Close { code: 1003, reason: "binary frames are not supported" }),
                        Message::Ping(_) | Message::Pong(_) => {}
                        Message::Close(_) => return Some(Close { code: 1000, reason: "" }),
                    }
                }
                () = tokio::time::sleep_until(auth_deadline), if self.authed.is_none() => {
                    outbound.error(None, "M_MISSING_TOKEN", "No auth op within 10 seconds", Map::new()).await;
                    return Some(Close { code: 4003, reason: "authentication timeout" });
                }
                () = tokio::time::sleep_until(idle_deadline) => {
                    return Some(Close { code: 4004, reason: "idle timeout" });
                }
                _ = ping.tick() => {
                    outbound.control(Outbound::Ping).await;
                }
                _ = session_check.tick(), if self.authed.is_some() => {
                    if let Some(close) = Box::pin(self.check_session(outbound)).await {
                        return Some(close);
                    }
                }
                changed = close_rx.changed() => {
                    if changed.is_ok() && let Some(close) = close_rx.borrow_and_update().clone() {
                        return Some(close);
                    }
                }
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        return Some(Close { code: 1001, reason: "server shutting down" });
                    }
                }
            }
        }
    }

    /// Expiry (4002) and revocation (4001) of the connection's session.
    async fn check_session(&self, outbound: &Outbound2) -> Option<Close> {
        let authed = self.authed.as_ref()?;
        if authed.expires_ts.is_some_and(|expiry| expiry <= now_ms()) {
            let mut extra = Map::new();
            extra.insert("soft_logout".into(), json!(true));
            outbound.error(None, "M_UNKNOWN_TOKEN", "Access token expired", extra).await;
            return Some(Close { code: 4002, reason: "M_UNKNOWN_TOKEN" });
        }
        match self.app.users.device_exists(&authed.user_id, &authed.device_id).await {
            Ok(false) => {
                let mut extra = Map::new();
                extra.insert("soft_logout".into(), json!(false));
                outbound.error(None, "M_UNKNOWN_TOKEN", "This session was logged out", extra).await;
                Some(Close { code: 4001, reason: "M_UNKNOWN_TOKEN" })
            }
            _ => None,
        }
    }

    /// Authenticates (first time or refresh); errors close the connection.
    async fn authenticate(
        &mut self,
        outbound: &Outbound2,
        token: String,
        id: Option<&str>,
        close_tx: watch::Sender<Option<Close>>,
    ) -> Result<(), Close> {
        match self.app.users.authenticate(&token, self.peer).await {
            Ok(authed) => {
                if let Some(current) = &self.authed
                    && (current.user_id != authed.user_id || current.device_id != authed.device_id)
                {
                    outbound.error(id, "M_FORBIDDEN", "That token belongs to another device", Map::new()).await;
                    return Ok(());
                }
                let mut result = json!({"user_id": authed.user_id.as_str(), "device_id": authed.device_id.as_str()});
                if let Some(expiry) = authed.expires_ts {
                    result["expires_in_ms"] = json!((expiry - now_ms()).max(0));
                }
                if self.authed.is_none() {
                    self.app.ws.register(&authed.user_id, authed.device_id.as_str(), self.id, close_tx);
                }
                self.authed = Some(authed);
                self.token = Some(token);
                if id.is_some() {
                    outbound.response(id, result).await;
                }
                Ok(())
            }
            Err(Error::UnknownToken { soft_logout }) => {
                let mut extra = Map::new();
                extra.insert("soft_logout".into(), json!(soft_logout));
                outbound.error(id, "M_UNKNOWN_TOKEN", "Unknown or expired access token", extra).await;
                Err(Close { code: if soft_logout { 4002 } else { 4001 }, reason: "M_UNKNOWN_TOKEN" })
            }
            Err(err) => {
                outbound.error(id, "M_UNKNOWN", &err.to_string(), Map::new()).await;
                Err(Close { code: 1011, reason: "internal error" })
            }
        }
    }

    /// Parses and performs one text frame.
    async fn handle_text(
        &mut self,
        text: &str,
        outbound: &Outbound2,
        close_tx: watch::Sender<Option<Close>>,
    ) -> Option<Close> {
        let parsed: Result<Value, _> = serde_json::from_str(text);
        let frame = match parsed {
            Ok(Value::Object(frame)) => frame,
            Ok(_) => return self.not_an_op(outbound, "M_BAD_JSON", "A frame must be a JSON object").await,
            Err(err) => return self.not_an_op(outbound, "M_NOT_JSON", &format!("Not JSON: {err}")).await,
        };
        let Some(op) = frame.get("op").and_then(Value::as_str).map(str::to_owned) else {
            return self.not_an_op(outbound, "M_BAD_JSON", "A frame needs a string `op`").await;
        };
        self.non_ops = 0;
        let id = match frame.get("id") {
            None => None,
            Some(Value::String(id)) if (1..=64).contains(&id.chars().count()) => Some(id.clone()),
            Some(_) => {
                outbound
                    .error(None, "M_INVALID_PARAM", "`id` must be a string of 1 to 64 characters", Map::new())
                    .await;
                return None;
            }
        };
        let id = id.as_deref();
        if self.authed.is_none() {
            if op != "auth" {
                outbound.error(id, "M_MISSING_TOKEN", "Authenticate first", Map::new()).await;
                return Some(Close { code: 4001, reason: "M_MISSING_TOKEN" });
            }
            let Some(token) = frame.get("access_token").and_then(Value::as_str) else {
                outbound.error(id, "M_MISSING_TOKEN", "`access_token` is required", Map::new()).await;
                return Some(Close { code: 4001, reason: "M_MISSING_TOKEN" });
            };
            return self.authenticate(outbound, token.to_owned(), id, close_tx).await.err();
        }
        if let Some(limiter) = &self.limiter
            && let Err(not_until) = limiter.check()
        {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default()));
            let mut extra = Map::new();
            extra.insert("retry_after_ms".into(), json!(wait.as_millis().max(1) as u64));
            outbound.error(id, "M_LIMIT_EXCEEDED", "Too many operations", extra).await;
            return None;
        }
        let always_answer = matches!(op.as_str(), "subscribe" | "ping");
        let _gate = if op == "send" { Some(self.send_gate.clone().lock_owned().await) } else { None };
        let result = match op.as_str() {
            "auth" => {
                let Some(token) = frame.get("access_token").and_then(Value::as_str) else {
                    outbound.error(id, "M_MISSING_PARAM", "`access_token` is required", Map::new()).await;
                    return None;
                };
                return self.authenticate(outbound, token.to_owned(), id, close_tx).await.err();
            }
            "ping" => Ok(json!({})),
            "subscribe" => return self.subscribe(&frame, id, outbound).await,
            "ack" => self.ack(&frame).await,
            "send" => self.send(&frame).await,
            "typing" => self.typing(&frame),
            "receipt" => self.receipt(&frame).await,
            "read_markers" => self.read_markers(&frame).await,
            "presence" => self.presence(&frame),
            other => Err(OpError::new("M_UNRECOGNIZED", format!("Unknown op `{other}`"))),
        };
        match result {
            Ok(result) => {
                if id.is_some() || always_answer {
                    outbound.response(id, result).await;
                }
            }
            Err(err) => outbound.error(id, err.errcode, &err.message, err.extra).await,
        }
        None
    }

    async fn not_an_op(&mut self, outbound: &Outbound2, errcode: &str, message: &str) -> Option<Close> {
        if self.authed.is_none() {
            outbound.error(None, "M_MISSING_TOKEN", "Authenticate first", Map::new()).await;
            return Some(Close { code: 4001, reason: "M_MISSING_TOKEN" });
        }
        outbound.error(None, errcode, message, Map::new()).await;
        self.non_ops += 1;
        (self.non_ops >= MAX_NON_OPS).then_some(Close { code: 4000, reason: "protocol error" })
    }

    fn authed(&self) -> &Authed {
        self.authed.as_ref().expect("ops run only on authenticated connections")
    }

    /// `subscribe`: answers with the first frame's token, sends that frame, then streams.
    async fn subscribe(&mut self, frame: &Map<String, Value>, id: Option<&str>, outbound: &Outbound2) -> Option<Close> {
        let authed = self.authed().clone();
        let prepared = async {
            let since = match frame.get("since") {
                None | Some(Value::Null) => None,
                Some(Value::String(token)) => {
                    let token = StreamToken::parse(token).map_err(OpError::from)?;
                    if token.stream > self.app.rooms.streams.position() {
                        return Err(OpError::new("M_INVALID_PARAM", "`since` lies in the future".to_owned()));
                    }
                    Some(token)
                }
                Some(_) => return Err(OpError::new("M_INVALID_PARAM", "`since` must be a string".to_owned())),
            };
            let filter: FilterDefinition = match frame.get("filter") {
                None | Some(Value::Null) => FilterDefinition::default(),
                Some(Value::String(filter)) => {
                    filter::resolve_sync_filter(&self.app.rooms.db, &authed.user_id, filter).await?
                }
                Some(object @ Value::Object(_)) => serde_json::from_value(object.clone())
                    .map_err(|e| OpError::new("M_BAD_JSON", format!("invalid filter: {e}")))?,
                Some(_) => return Err(OpError::new("M_BAD_JSON", "`filter` must be an object or a string".to_owned())),
            };
            let set_presence = match frame.get("set_presence").and_then(Value::as_str) {
                None => "online",
                Some(p @ ("online" | "unavailable" | "offline")) => p,
                Some(_) => return Err(OpError::new("M_INVALID_PARAM", "unknown set_presence".to_owned())),
            };
            let full_state = frame.get("full_state").and_then(Value::as_bool).unwrap_or(false);
            Ok((since, filter, set_presence.to_owned(), full_state))
        }
        .await;
        let (since, filter, set_presence, full_state) = match prepared {
            Ok(prepared) => prepared,
            Err(err) => {
                outbound.error(id, err.errcode, &err.message, err.extra).await;
                return None;
            }
        };
        // Subscribing from a token confirms what came before it, as a /sync with `since` does.
        if let Some(since) = since {
            let confirmed = self.app.sync.take_unconfirmed(&authed.user_id, authed.device_id.as_str(), since);
            if let Err(err) =
                self.app.sync.acknowledge(&authed.user_id, authed.device_id.as_str(), since, &confirmed).await
            {
                outbound.error(id, "M_UNKNOWN", &err.to_string(), Map::new()).await;
                return None;
            }
        }
        let request = SyncRequest {
            user_id: authed.user_id.clone(),
            device_id: authed.device_id.to_string(),
            since,
            filter,
            full_state,
        };
        let first = match self.app.sync.changes(&request).await {
            Ok(first) => first,
            Err(err) => {
                let (_, errcode) = err.status_and_errcode();
                outbound.error(id, errcode, &err.to_string(), Map::new()).await;
                return None;
            }
        };
        if let Some(previous) = self.producer.take() {
            previous.abort();
        }
        self.pending.lock().clear();
        // Until its first frame is queued, the new subscription resumes from its own `since`
        // (absent for an initial sync), not from the old subscription's last frame.
        *self.last_sent.lock() = since;
        outbound.response(id, json!({"next_batch": first.next_batch})).await;
        if !outbound.try_sync_frame(&first, &self.pending, &self.last_sent) {
            return Some(Close { code: 4008, reason: "slow consumer" });
        }
        // Counts as syncing from its first frame: a subscription refused for a full buffer never
        // touched presence.
        let guard = self.app.presence.sync_started(&authed.user_id, &set_presence);
        let producer = Producer {
            app: self.app.clone(),
            request: SyncRequest { since: Some(first.token), full_state: false, ..request },
            outbound: outbound.clone(),
            pending: self.pending.clone(),
            last_sent: self.last_sent.clone(),
            send_gate: self.send_gate.clone(),
            close: self.close_handle(),
        };
        self.producer = Some(tokio::spawn(async move {
            let _presence = guard;
            producer.run().await;
        }));
        None
    }

    fn close_handle(&self) -> Option<watch::Sender<Option<Close>>> {
        let authed = self.authed.as_ref()?;
        let devices = self.app.ws.devices.lock();
        devices
            .get(&(authed.user_id.clone(), authed.device_id.to_string()))?
            .iter()
            .find(|(id, _)| *id == self.id)
            .map(|(_, close)| close.clone())
    }

    /// `ack`: confirms everything up to a token this connection sent.
    async fn ack(&mut self, frame: &Map<String, Value>) -> Result<Value, OpError> {
        let token = frame.get("next_batch").and_then(Value::as_str).ok_or_else(|| OpError::missing("next_batch"))?;
        let token = StreamToken::parse(token)?;
        let last = (*self.last_sent.lock())
            .ok_or_else(|| OpError::new("M_INVALID_PARAM", "Nothing was sent to acknowledge".to_owned()))?;
        if !last.reaches(&token) {
            return Err(OpError::new("M_INVALID_PARAM", "That token was not sent on this connection".to_owned()));
        }
        let confirmed: Vec<Delivered> = {
            let mut pending = self.pending.lock();
            let mut confirmed = Vec::new();
            while pending.front().is_some_and(|(t, _)| token.reaches(t)) {
                if let Some((_, delivered)) = pending.pop_front() {
                    confirmed.extend(delivered);
                }
            }
            confirmed
        };
        let authed = self.authed().clone();
        self.app.sync.acknowledge(&authed.user_id, authed.device_id.as_str(), token, &confirmed).await?;
        Ok(json!({}))
    }

    async fn send(&mut self, frame: &Map<String, Value>) -> Result<Value, OpError> {
        let authed = self.authed().clone();
        let room_id = room_id_of(frame)?;
        let event_type =
            frame.get("event_type").and_then(Value::as_str).ok_or_else(|| OpError::missing("event_type"))?;
        let txn_id = frame.get("txn_id").and_then(Value::as_str).ok_or_else(|| OpError::missing("txn_id"))?;
        let content = match frame.get("content") {
            Some(content @ Value::Object(_)) => content.clone(),
            Some(_) => return Err(OpError::new("M_BAD_JSON", "`content` must be an object".to_owned())),
            None => return Err(OpError::missing("content")),
        };
        if authed.is_guest {
            return Err(OpError::new("M_GUEST_ACCESS_FORBIDDEN", "Guests cannot send here".to_owned()));
        }
        let limits = &self.app.rate_limits.user;
        let event_id = match frame.get("state_key") {
            Some(Value::String(state_key)) => {
                // State sends over the socket have their own transaction namespace.
                let key = format!("state\u{1f}{event_type}\u{1f}{state_key}\u{1f}{txn_id}");
                let txn = (authed.device_id.as_str(), key.as_str());
                if let Some(event_id) = self.app.rooms.sent_with_txn(&authed.user_id, txn.0, &room_id, txn.1).await? {
                    return Ok(json!({"event_id": event_id.as_str()}));
                }
                limits.check(UserAction::Message, &authed.user_id)?;
                let event = self
                    .app
                    .rooms
                    .send_state(&authed.user_id, &room_id, event_type, state_key, content, Some(txn))
                    .await?;
                event.pdu.event_id.clone()
            }
            Some(_) => return Err(OpError::new("M_BAD_JSON", "`state_key` must be a string".to_owned())),
            None => {
                let sender = Sender {
                    user_id: &authed.user_id,
                    device_id: Some(authed.device_id.as_str()),
                    txn_id: Some(txn_id),
                };
                let retried =
                    self.app.rooms.sent_with_txn(&authed.user_id, authed.device_id.as_str(), &room_id, txn_id).await?;
                if let Some(event_id) = retried {
                    return Ok(json!({"event_id": event_id.as_str()}));
                }
                limits.check(UserAction::Message, &authed.user_id)?;
                let event = self.app.rooms.send_message(&sender, &room_id, event_type, content).await?;
                self.app.presence.active(&authed.user_id);
                event.pdu.event_id.clone()
            }
        };
        Ok(json!({"event_id": event_id.as_str()}))
    }

    fn typing(&mut self, frame: &Map<String, Value>) -> Result<Value, OpError> {
        let authed = self.authed().clone();
        let room_id = room_id_of(frame)?;
        let typing = frame.get("typing").and_then(Value::as_bool).ok_or_else(|| OpError::missing("typing"))?;
        let timeout = frame.get("timeout").and_then(Value::as_u64);
        self.app.rate_limits.user.check(UserAction::Typing, &authed.user_id)?;
        self.app.typing.set(&authed.user_id, &room_id, typing, timeout)?;
        Ok(json!({}))
    }

    async fn receipt(&mut self, frame: &Map<String, Value>) -> Result<Value, OpError> {
        let authed = self.authed().clone();
        let room_id = room_id_of(frame)?;
        let receipt_type =
            frame.get("receipt_type").and_then(Value::as_str).ok_or_else(|| OpError::missing("receipt_type"))?;
        if !matches!(receipt_type, "m.read" | "m.read.private" | "org.hearth.delivered") {
            return Err(OpError::new("M_INVALID_PARAM", format!("unsupported receipt_type {receipt_type}")));
        }
        let event_id = event_id_of(frame, "event_id")?.ok_or_else(|| OpError::missing("event_id"))?;
        let thread = frame.get("thread_id").and_then(Value::as_str);
        self.app.receipts.post(&authed.user_id, &room_id, receipt_type, &event_id, thread).await?;
        Ok(json!({}))
    }

    async fn read_markers(&mut self, frame: &Map<String, Value>) -> Result<Value, OpError> {
        let authed = self.authed().clone();
        let room_id = room_id_of(frame)?;
        let fully_read = event_id_of(frame, "m.fully_read")?;
        let read = event_id_of(frame, "m.read")?;
        let read_private = event_id_of(frame, "m.read.private")?;
        self.app
            .receipts
            .read_markers(&authed.user_id, &room_id, fully_read.as_deref(), read.as_deref(), read_private.as_deref())
            .await?;
        Ok(json!({}))
    }

    fn presence(&mut self, frame: &Map<String, Value>) -> Result<Value, OpError> {
        let authed = self.authed().clone();
        let state = frame.get("presence").and_then(Value::as_str).ok_or_else(|| OpError::missing("presence"))?;
        if !matches!(state, "online" | "unavailable" | "offline") {
            return Err(OpError::new("M_INVALID_PARAM", "presence must be online, unavailable or offline".to_owned()));
        }
        let status_msg = frame.get("status_msg").and_then(Value::as_str).map(str::to_owned);
        if status_msg.as_ref().is_some_and(|msg| msg.len() > 1024) {
            // The limit of `PUT /presence/{userId}/status`.
            return Err(OpError::new("M_INVALID_PARAM", "status_msg is too long".to_owned()));
        }
        self.app.rate_limits.user.check(UserAction::Presence, &authed.user_id)?;
        self.app.presence.set(&authed.user_id, state, status_msg);
        Ok(json!({}))
    }
}

fn room_id_of(frame: &Map<String, Value>) -> Result<ruma::OwnedRoomId, OpError> {
    let room = frame.get("room_id").and_then(Value::as_str).ok_or_else(|| OpError::missing("room_id"))?;
    RoomId::parse(room).map_err(|e| OpError::new("M_INVALID_PARAM", e.to_string()))
}

fn event_id_of(frame: &Map<String, Value>, field: &str) -> Result<Option<ruma::OwnedEventId>, OpError> {
    match frame.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(id)) => {
            EventId::parse(id).map(Some).map_err(|e| OpError::new("M_INVALID_PARAM", e.to_string()))
        }
        Some(_) => Err(OpError::new("M_BAD_JSON", format!("`{field}` must be a string"))),
    }
}

/// The close a WebSocket-level error calls for.
fn protocol_close(err: &axum::Error) -> Close {
    let text = err.to_string();
    if text.contains("Space limit exceeded") || text.contains("too long") || text.contains("Capacity") {
        Close { code: 1009, reason: "frame too large" }
    } else if text.contains("UTF-8") || text.contains("utf-8") || text.contains("Utf8") {
        Close { code: 1007, reason: "invalid utf-8" }
    } else {
        Close { code: 1002, reason: "websocket protocol error" }
    }
}

/// An op failure: a Matrix errcode for an `error` frame.
struct OpError {
    errcode: &'static str,
    message: String,
    extra: Map<String, Value>,
}

impl OpError {
    fn new(errcode: &'static str, message: String) -> OpError {
        OpError { errcode, message, extra: Map::new() }
    }

    fn missing(field: &str) -> OpError {
        OpError::new("M_MISSING_PARAM", format!("`{field}` is required"))
    }
}

impl From<Error> for OpError {
    fn from(err: Error) -> OpError {
        let (_, errcode) = err.status_and_errcode();
        let mut extra = Map::new();
        if let Error::LimitExceeded { retry_after_ms } = &err {
            extra.insert("retry_after_ms".into(), json!(retry_after_ms));
        }
        let message = match &err {
            Error::Internal(_) => "Internal server error".to_owned(),
            other => other.to_string(),
        };
        OpError { errcode: if errcode.is_empty() { "M_UNKNOWN" } else { errcode }, message, extra }
    }
}

/// The queue to the writer, with its byte accounting.
#[derive(Clone)]
struct Outbound2 {
    tx: mpsc::Sender<Outbound>,
    /// Bytes of the frames queued and not yet written.
    bytes: Arc<AtomicUsize>,
    /// `sync` frames queued and not yet written.
    syncs: Arc<AtomicUsize>,
    limit: usize,
}

impl Outbound2 {
    /// Queues a frame that must not be dropped (answers to ops); waits for room.
    async fn frame(&self, value: Value) {
        let text = value.to_string();
        self.bytes.fetch_add(text.len(), Ordering::Relaxed);
        let _ = self.tx.send(Outbound::Frame { text, sync: false }).await;
    }

    async fn control(&self, item: Outbound) {
        let _ = self.tx.send(item).await;
    }

    async fn response(&self, id: Option<&str>, result: Value) {
        let mut frame = json!({"type": "response", "result": result});
        if let Some(id) = id {
            frame["id"] = json!(id);
        }
        self.frame(frame).await;
    }

    async fn error(&self, id: Option<&str>, errcode: &str, message: &str, extra: Map<String, Value>) {
        let mut frame = json!({"type": "error", "errcode": errcode, "error": message});
        if let Some(id) = id {
            frame["id"] = json!(id);
        }
        if let Some(object) = frame.as_object_mut() {
            object.extend(extra);
        }
        self.frame(frame).await;
    }

    /// Queues a `sync` frame without waiting; false if the client is too slow to take it.
    ///
    /// The byte bound holds only while another `sync` frame is still waiting: a frame behind
    /// nothing but answers (the `response` to `subscribe`, say) is taken whatever its size, so a
    /// first frame larger than the bound (a big initial sync or catch-up) is always delivered
    /// instead of failing the same way on every resume.
    fn try_sync_frame(
        &self,
        response: &crate::service::sync::SyncResponse,
        pending: &Mutex<VecDeque<(StreamToken, Vec<Delivered>)>>,
        last_sent: &Mutex<Option<StreamToken>>,
    ) -> bool {
        let mut data = serde_json::to_value(response).expect("sync responses serialise");
        prune_empty(&mut data);
        if let Some(object) = data.as_object_mut() {
            object.insert("next_batch".into(), json!(response.next_batch));
        }
        let text = json!({"type": "sync", "next_batch": response.next_batch, "data": data}).to_string();
        let len = text.len();
        let queued = self.bytes.load(Ordering::Relaxed);
        if self.syncs.load(Ordering::Relaxed) > 0 && queued + len > self.limit {
            return false;
        }
        self.bytes.fetch_add(len, Ordering::Relaxed);
        self.syncs.fetch_add(1, Ordering::Relaxed);
        if self.tx.try_send(Outbound::Frame { text, sync: true }).is_err() {
            self.bytes.fetch_sub(len, Ordering::Relaxed);
            self.syncs.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        pending.lock().push_back((response.token, response.delivered.clone()));
        *last_sent.lock() = Some(response.token);
        true
    }
}

/// Removes empty sections (empty objects, empty arrays, timelines without events) at every
/// level of a sync body, without descending into events.
fn prune_empty(value: &mut Value) {
    let Value::Object(object) = value else { return };
    for (key, child) in object.iter_mut() {
        if key == "events" {
            continue;
        }
        prune_empty(child);
    }
    object.retain(|key, child| match child {
        Value::Object(o) => {
            if key == "timeline" {
                return o.get("events").and_then(Value::as_array).is_some_and(|e| !e.is_empty());
            }
            !o.is_empty()
        }
        Value::Array(a) => !a.is_empty(),
        _ => true,
    });
}

/// Produces `sync` frames for one subscription until stopped.
struct Producer {
    app: AppState,
    request: SyncRequest,
    outbound: Outbound2,
    pending: Pending,
    last_sent: Arc<Mutex<Option<StreamToken>>>,
    send_gate: Arc<tokio::sync::Mutex<()>>,
    close: Option<watch::Sender<Option<Close>>>,
}

impl Producer {
    async fn run(mut self) {
        loop {
            let response = match self.app.sync.long_poll(&self.request, PRODUCER_POLL).await {
                Ok(response) => response,
                Err(err) => {
                    tracing::warn!(%err, "websocket subscription failed");
                    self.request_close(Close { code: 1011, reason: "internal error" });
                    return;
                }
            };
            if response.is_empty() {
                if self.app.rooms.streams.is_shutting_down() {
                    // The server is stopping; the socket is closed with its resume token elsewhere.
                    return;
                }
                // Nothing for this device in that window: move on without a frame.
                self.request.since = Some(response.token);
                continue;
            }
            let queued = {
                let _gate = self.send_gate.lock().await;
                self.outbound.try_sync_frame(&response, &self.pending, &self.last_sent)
            };
            if !queued {
                self.request_close(Close { code: 4008, reason: "slow consumer" });
                return;
            }
            self.request.since = Some(response.token);
        }
    }

    fn request_close(&self, close: Close) {
        if let Some(sender) = &self.close {
            let _ = sender.send(Some(close));
        }
    }
}
