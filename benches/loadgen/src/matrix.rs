//! A small client for the parts of the Matrix Client-Server API the load generator needs.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::Method;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// Every request gives up after this long, so a stuck server cannot hang the run.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The content key that marks a benchmark message.
pub const BENCH_KEY: &str = "org.hearth.bench";

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Percent-encodes everything but RFC 3986 unreserved characters (for path segments and query values).
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Why a request failed.
#[derive(Debug, Clone)]
pub enum ReqError {
    /// The server answered with a status other than 200.
    Status { status: u16, errcode: String, body: String, retry_after_ms: Option<u64> },
    /// No complete answer within [`REQUEST_TIMEOUT`].
    Timeout,
    /// The connection could not be made.
    Connect(String),
    /// A 200 whose body was not what the API promises.
    Decode(String),
    /// Anything else on the transport (connection reset, truncated body, ...).
    Transport(String),
    /// A WebSocket op answered with an `error` frame.
    Op { errcode: String, error: String, retry_after_ms: Option<u64> },
    /// The WebSocket went away for good before the op was answered.
    Closed(String),
}

impl ReqError {
    fn from_reqwest(e: reqwest::Error) -> Self {
        if e.is_timeout() {
            ReqError::Timeout
        } else if e.is_connect() {
            ReqError::Connect(chain(&e))
        } else {
            ReqError::Transport(chain(&e))
        }
    }

    pub fn from_status(status: u16, body: &[u8]) -> Self {
        let text = String::from_utf8_lossy(body).into_owned();
        let parsed: Option<Value> = serde_json::from_slice(body).ok();
        let errcode =
            parsed.as_ref().and_then(|v| v.get("errcode")).and_then(Value::as_str).unwrap_or_default().to_string();
        let retry_after_ms = parsed.as_ref().and_then(|v| v.get("retry_after_ms")).and_then(Value::as_u64);
        ReqError::Status { status, errcode, body: text, retry_after_ms }
    }

    /// A short key for counting errors: the HTTP status, or the kind of transport failure.
    pub fn key(&self) -> String {
        match self {
            ReqError::Status { status, .. } => status.to_string(),
            ReqError::Timeout => "timeout".into(),
            ReqError::Connect(_) => "connect".into(),
            ReqError::Decode(_) => "decode".into(),
            ReqError::Transport(_) => "transport".into(),
            ReqError::Op { errcode, .. } if errcode.is_empty() => "ws-error".into(),
            ReqError::Op { errcode, .. } => errcode.clone(),
            ReqError::Closed(_) => "closed".into(),
        }
    }

    /// Worth retrying during setup: rate limits, overload, and transport hiccups.
    pub fn transient(&self) -> bool {
        match self {
            ReqError::Status { status, .. } => matches!(status, 429 | 502 | 503 | 504),
            ReqError::Timeout | ReqError::Connect(_) | ReqError::Transport(_) => true,
            ReqError::Op { errcode, .. } => errcode == "M_LIMIT_EXCEEDED" || errcode == "M_UNKNOWN",
            ReqError::Decode(_) | ReqError::Closed(_) => false,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ReqError::Status { retry_after_ms: Some(ms), .. } | ReqError::Op { retry_after_ms: Some(ms), .. } => {
                Some(Duration::from_millis(*ms))
            }
            _ => None,
        }
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl fmt::Display for ReqError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReqError::Status { status, body, .. } => write!(f, "HTTP {status}: {}", truncate(body, 500)),
            ReqError::Timeout => write!(f, "timed out after {} s", REQUEST_TIMEOUT.as_secs()),
            ReqError::Connect(e) => write!(f, "connect failed: {e}"),
            ReqError::Decode(e) => write!(f, "unexpected response body: {e}"),
            ReqError::Transport(e) => write!(f, "transport error: {e}"),
            ReqError::Op { errcode, error, .. } => write!(f, "error frame {errcode}: {}", truncate(error, 500)),
            ReqError::Closed(e) => write!(f, "socket closed: {e}"),
        }
    }
}

/// A registered (or logged-in) account.
#[derive(Debug, Clone)]
pub struct Account {
    pub user_id: String,
    pub access_token: String,
}

#[derive(Deserialize)]
struct LoginResponse {
    user_id: String,
    access_token: String,
}

#[derive(Deserialize)]
struct RoomIdResponse {
    room_id: String,
}

#[derive(Deserialize)]
struct FilterIdResponse {
    filter_id: String,
}

#[derive(Deserialize)]
struct Ignored {}

/// The parts of a `/sync` response the receivers read; everything else is skipped by serde.
#[derive(Deserialize)]
pub struct SyncResponse {
    pub next_batch: String,
    #[serde(default)]
    pub rooms: SyncRooms,
}

#[derive(Deserialize, Default)]
pub struct SyncRooms {
    #[serde(default)]
    pub join: HashMap<String, JoinedRoom>,
}

#[derive(Deserialize, Default)]
pub struct JoinedRoom {
    #[serde(default)]
    pub timeline: Timeline,
}

#[derive(Deserialize, Default)]
pub struct Timeline {
    #[serde(default)]
    pub events: Vec<Event>,
    #[serde(default)]
    pub limited: bool,
    #[serde(default)]
    pub prev_batch: Option<String>,
}

#[derive(Deserialize)]
pub struct Event {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub sender: String,
    #[serde(default)]
    pub content: Content,
}

#[derive(Deserialize, Default)]
pub struct Content {
    #[serde(rename = "org.hearth.bench", default)]
    pub bench: Option<Value>,
}

/// The benchmark marker inside a message's content.
#[derive(Deserialize, Debug, Clone)]
pub struct BenchMark {
    pub id: u64,
    pub sent_at_us: u64,
    #[serde(default)]
    pub run: String,
}

impl Event {
    /// The benchmark marker, if this is a well-formed benchmark message.
    pub fn bench(&self) -> Option<BenchMark> {
        if self.kind != "m.room.message" {
            return None;
        }
        self.content.bench.as_ref().and_then(|v| BenchMark::deserialize(v).ok())
    }
}

/// A page of `/rooms/{roomId}/messages`.
#[derive(Deserialize)]
pub struct MessagesResponse {
    #[serde(default)]
    pub chunk: Vec<Event>,
    #[serde(default)]
    pub end: Option<String>,
}

/// Client-Server API calls against one homeserver.
pub struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    pub fn new(base: &str) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| format!("building the HTTP client: {}", chain(&e)))?;
        Ok(Api { http, base: base.trim_end_matches('/').to_string() })
    }

    /// One request; on 200 returns the decoded body and the time (unix µs) the body was fully read.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Result<(T, u64), ReqError> {
        let mut req = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(ReqError::from_reqwest)?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(ReqError::from_reqwest)?;
        let at = now_us();
        if status != 200 {
            return Err(ReqError::from_status(status, &bytes));
        }
        let value = serde_json::from_slice(&bytes).map_err(|e| {
            ReqError::Decode(format!("{e}; body starts {:?}", truncate(&String::from_utf8_lossy(&bytes), 300)))
        })?;
        Ok((value, at))
    }

    /// Registers `username` with the dummy auth flow, answering a user-interactive-auth challenge
    /// with its session. An already taken name is logged into with `password` instead, so a run
    /// with a fixed `--prefix` can reuse accounts.
    pub async fn register(&self, username: &str, password: &str) -> Result<Account, ReqError> {
        let mut body = json!({
            "username": username,
            "password": password,
            "auth": {"type": "m.login.dummy"},
            "initial_device_display_name": "loadgen",
        });
        let mut answered_challenge = false;
        loop {
            match self.call::<LoginResponse>(Method::POST, "/_matrix/client/v3/register", None, Some(&body)).await {
                Ok((r, _)) => return Ok(Account { user_id: r.user_id, access_token: r.access_token }),
                Err(ReqError::Status { status: 401, body: text, .. }) if !answered_challenge => {
                    let session = serde_json::from_str::<Value>(&text)
                        .ok()
                        .and_then(|v| v.get("session").and_then(Value::as_str).map(str::to_string));
                    let Some(session) = session else {
                        return Err(ReqError::from_status(401, text.as_bytes()));
                    };
                    body["auth"] = json!({"type": "m.login.dummy", "session": session});
                    answered_challenge = true;
                }
                Err(ReqError::Status { status: 400, errcode, .. }) if errcode == "M_USER_IN_USE" => {
                    return self.login(username, password).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub async fn login(&self, username: &str, password: &str) -> Result<Account, ReqError> {
        let body = json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": username},
            "password": password,
            "initial_device_display_name": "loadgen",
        });
        let (r, _) = self.call::<LoginResponse>(Method::POST, "/_matrix/client/v3/login", None, Some(&body)).await?;
        Ok(Account { user_id: r.user_id, access_token: r.access_token })
    }

    /// `POST /createRoom`; `invite` non-empty makes it a direct chat (`trusted_private_chat`).
    pub async fn create_room(&self, token: &str, name: &str, invite: &[String]) -> Result<String, ReqError> {
        let body = if invite.is_empty() {
            json!({"preset": "public_chat", "name": name})
        } else {
            json!({"preset": "trusted_private_chat", "invite": invite, "is_direct": true})
        };
        let (r, _) = self
            .call::<RoomIdResponse>(Method::POST, "/_matrix/client/v3/createRoom", Some(token), Some(&body))
            .await?;
        Ok(r.room_id)
    }

    pub async fn join(&self, token: &str, room_id: &str) -> Result<(), ReqError> {
        let path = format!("/_matrix/client/v3/join/{}", enc(room_id));
        self.call::<Ignored>(Method::POST, &path, Some(token), Some(&json!({}))).await.map(|_| ())
    }

    /// `POST /user/{userId}/filter`: stores `filter` on the server and returns its ID.
    pub async fn upload_filter(&self, token: &str, user_id: &str, filter: &Value) -> Result<String, ReqError> {
        let path = format!("/_matrix/client/v3/user/{}/filter", enc(user_id));
        let (r, _) = self.call::<FilterIdResponse>(Method::POST, &path, Some(token), Some(filter)).await?;
        Ok(r.filter_id)
    }

    /// `GET /sync`; `filter` must already be percent-encoded. Returns the response and when it arrived.
    pub async fn sync(
        &self,
        token: &str,
        filter: &str,
        since: Option<&str>,
        timeout_ms: u64,
    ) -> Result<(SyncResponse, u64), ReqError> {
        let mut path = format!("/_matrix/client/v3/sync?filter={filter}&timeout={timeout_ms}");
        if let Some(s) = since {
            path.push_str("&since=");
            path.push_str(&enc(s));
        }
        self.call(Method::GET, &path, Some(token), None).await
    }

    /// One page of `GET /rooms/{roomId}/messages?dir=b`.
    pub async fn messages_back(
        &self,
        token: &str,
        room_id: &str,
        from: &str,
        to: &str,
        limit: u32,
    ) -> Result<(MessagesResponse, u64), ReqError> {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/messages?dir=b&from={}&to={}&limit={limit}",
            enc(room_id),
            enc(from),
            enc(to)
        );
        self.call(Method::GET, &path, Some(token), None).await
    }

    /// `PUT /rooms/{roomId}/send/m.room.message/{txnId}`.
    pub async fn send_message(
        &self,
        token: &str,
        room_id: &str,
        txn_id: &str,
        content: &Value,
    ) -> Result<(), ReqError> {
        let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{}", enc(room_id), enc(txn_id));
        self.call::<Ignored>(Method::PUT, &path, Some(token), Some(content)).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_room_ids_and_filters() {
        assert_eq!(enc("!abc:localhost"), "%21abc%3Alocalhost");
        assert_eq!(enc("{\"a\":1}"), "%7B%22a%22%3A1%7D");
        assert_eq!(enc("s12_3-x.y~"), "s12_3-x.y~");
    }

    #[test]
    fn reads_bench_marker() {
        let ev: Event = serde_json::from_value(json!({
            "type": "m.room.message", "sender": "@a:x",
            "content": {"body": "x", "org.hearth.bench": {"id": 7, "sent_at_us": 9, "sender": "@a:x", "run": "r"}}
        }))
        .unwrap();
        let b = ev.bench().unwrap();
        assert_eq!((b.id, b.sent_at_us, b.run.as_str()), (7, 9, "r"));
        let other: Event = serde_json::from_value(json!({"type": "m.room.member", "content": {}})).unwrap();
        assert!(other.bench().is_none());
    }
}
