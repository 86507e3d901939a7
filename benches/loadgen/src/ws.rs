//! Hearth's WebSocket client transport (`org.hearth.ws`, spec/websocket.md): opening a socket,
//! the ops loadgen sends and the server frames it reads.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::matrix::{ReqError, SyncResponse};

/// Path of the socket endpoint below the homeserver's base URL.
pub const WS_PATH: &str = "/_matrix/client/unstable/org.hearth.ws/v1/connect";
/// The one subprotocol of version 1.
pub const SUBPROTOCOL: &str = "org.hearth.ws.v1";
/// TCP connect plus the HTTP upgrade must finish within this.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest server frame accepted. Server frames have no size limit (an initial sync can be several
/// MiB); this only keeps a broken server from exhausting memory.
const MAX_SERVER_FRAME: usize = 256 << 20;
/// Read buffer allocated per socket up front; it grows for larger frames. Small, because the
/// sockets scenario holds thousands of idle sockets.
const READ_BUFFER: usize = 4096;

pub type WsStream = WebSocketStream<TcpStream>;

/// Where sockets are opened: `ws://` and the homeserver's host and base path.
#[derive(Debug, Clone)]
pub struct WsEndpoint {
    /// `host:port` to open the TCP connection to
    addr: String,
    /// `ws://host:port/<base path>/_matrix/client/unstable/org.hearth.ws/v1/connect`
    url: String,
}

impl WsEndpoint {
    /// From the homeserver base URL (`http://host[:port][/path]`, already checked to be plain HTTP).
    pub fn new(base: &str) -> Result<Self, String> {
        let rest =
            base.strip_prefix("http://").ok_or_else(|| format!("{base}: the WebSocket needs an http:// base"))?;
        let rest = rest.trim_end_matches('/');
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(format!("{base}: no host"));
        }
        let has_port = match authority.strip_prefix('[') {
            Some(v6) => v6.split_once(']').is_some_and(|(_, after)| after.starts_with(':')),
            None => authority.contains(':'),
        };
        let addr = if has_port { authority.to_string() } else { format!("{authority}:80") };
        Ok(WsEndpoint { addr, url: format!("ws://{authority}{path}{WS_PATH}") })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Opens and upgrades one connection, authenticated with the `Authorization` header.
    pub async fn connect(&self, access_token: &str) -> Result<WsStream, ReqError> {
        tokio::time::timeout(CONNECT_TIMEOUT, self.connect_inner(access_token)).await.map_err(|_| ReqError::Timeout)?
    }

    async fn connect_inner(&self, access_token: &str) -> Result<WsStream, ReqError> {
        let tcp = TcpStream::connect(&self.addr).await.map_err(|e| ReqError::Connect(e.to_string()))?;
        tcp.set_nodelay(true).map_err(|e| ReqError::Connect(e.to_string()))?;
        let mut request =
            self.url.as_str().into_client_request().map_err(|e| ReqError::Transport(format!("request: {e}")))?;
        let headers = request.headers_mut();
        let bearer = HeaderValue::from_str(&format!("Bearer {access_token}"))
            .map_err(|e| ReqError::Transport(format!("access token: {e}")))?;
        headers.insert("Authorization", bearer);
        headers.insert("Sec-WebSocket-Protocol", HeaderValue::from_static(SUBPROTOCOL));
        let (stream, response) =
            tokio_tungstenite::client_async_with_config(request, tcp, Some(config())).await.map_err(handshake_error)?;
        let protocol = response.headers().get("Sec-WebSocket-Protocol").and_then(|v| v.to_str().ok());
        if protocol != Some(SUBPROTOCOL) {
            return Err(ReqError::Decode(format!("upgrade selected subprotocol {protocol:?}, not {SUBPROTOCOL}")));
        }
        Ok(stream)
    }
}

fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(Some(MAX_SERVER_FRAME))
        .max_frame_size(Some(MAX_SERVER_FRAME))
}

/// An HTTP answer other than 101 becomes [`ReqError::Status`], like any refused request.
fn handshake_error(e: tokio_tungstenite::tungstenite::Error) -> ReqError {
    use tokio_tungstenite::tungstenite::Error;
    match e {
        Error::Http(response) => {
            let status = response.status().as_u16();
            let body = response.body().as_deref().unwrap_or_default();
            ReqError::from_status(status, body)
        }
        Error::Io(e) => ReqError::Transport(format!("upgrade: {e}")),
        e => ReqError::Transport(format!("upgrade: {e}")),
    }
}

/// A server frame (§8). Members loadgen does not use are skipped; unknown `type`s are ignored.
#[derive(Deserialize, Default)]
pub struct ServerFrame {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub id: Option<String>,
    /// `sync`
    #[serde(default)]
    pub next_batch: Option<String>,
    #[serde(default)]
    pub data: Option<SyncResponse>,
    /// `response`
    #[serde(default)]
    pub result: Option<Value>,
    /// `error`
    #[serde(default)]
    pub errcode: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub retry_after_ms: Option<u64>,
    /// `closing`
    #[serde(default)]
    pub code: Option<u16>,
    #[serde(default)]
    pub resume_token: Option<String>,
}

impl ServerFrame {
    /// The failure an `error` frame reports.
    pub fn op_error(&self) -> ReqError {
        ReqError::Op {
            errcode: self.errcode.clone().unwrap_or_default(),
            error: self.error.clone().unwrap_or_default(),
            retry_after_ms: self.retry_after_ms,
        }
    }
}

/// `subscribe` (§7.2): `filter` is an inline filter object or an uploaded filter's ID.
pub fn subscribe_op(id: &str, since: Option<&str>, filter: &Value) -> String {
    let mut op = json!({"op": "subscribe", "id": id, "filter": filter});
    if let Some(since) = since {
        op["since"] = json!(since);
    }
    op.to_string()
}

/// `ack` (§7.8) without `id`: the server answers only if it fails.
pub fn ack_op(next_batch: &str) -> String {
    json!({"op": "ack", "next_batch": next_batch}).to_string()
}

/// The members of a `send` op (§7.3) of an `m.room.message`, without its `id`.
pub fn send_op(room_id: &str, txn_id: &str, content: Value) -> Map<String, Value> {
    let mut op = Map::new();
    op.insert("op".into(), json!("send"));
    op.insert("room_id".into(), json!(room_id));
    op.insert("event_type".into(), json!("m.room.message"));
    op.insert("txn_id".into(), json!(txn_id));
    op.insert("content".into(), content);
    op
}

/// Close codes after which the client must not reconnect with the same token (§13).
pub fn is_logged_out(code: u16) -> bool {
    code == 4001
}

/// How long to wait before reconnecting after a close with `code` (None: no close frame, 1006),
/// the `failures` in a row so far counted: "at once" codes reconnect immediately the first time,
/// 4029 waits the 30 s the spec asks for, everything else backs off from 100 ms to 5 s.
pub fn reconnect_delay(code: Option<u16>, failures: u32) -> Duration {
    let backoff = Duration::from_millis(100u64 << failures.min(6)).min(Duration::from_secs(5));
    match code {
        Some(4029) => Duration::from_secs(30),
        Some(4002 | 4008) if failures <= 1 => Duration::ZERO,
        Some(1001) => backoff.max(Duration::from_secs(1)),
        _ if failures <= 1 => Duration::ZERO,
        _ => backoff,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_from_base_url() {
        let e = WsEndpoint::new("http://127.0.0.1:18600").unwrap();
        assert_eq!(
            (e.addr.as_str(), e.url()),
            ("127.0.0.1:18600", "ws://127.0.0.1:18600/_matrix/client/unstable/org.hearth.ws/v1/connect")
        );
        let e = WsEndpoint::new("http://localhost/base/").unwrap();
        assert_eq!(
            (e.addr.as_str(), e.url()),
            ("localhost:80", "ws://localhost/base/_matrix/client/unstable/org.hearth.ws/v1/connect")
        );
        let e = WsEndpoint::new("http://[::1]:8008").unwrap();
        assert_eq!(e.addr, "[::1]:8008");
        assert!(WsEndpoint::new("https://x").is_err());
    }

    #[test]
    fn parses_server_frames() {
        let f: ServerFrame = serde_json::from_str(
            r#"{"type":"sync","next_batch":"s2_1","data":{"next_batch":"s2_1","rooms":{"join":{"!r:x":{"timeline":{"events":[{"type":"m.room.message","sender":"@a:x","content":{"org.hearth.bench":{"id":3,"sent_at_us":5,"run":"r"}}}],"limited":false}}}}}}"#,
        )
        .unwrap();
        assert_eq!((f.kind.as_str(), f.next_batch.as_deref()), ("sync", Some("s2_1")));
        let data = f.data.unwrap();
        assert_eq!(data.rooms.join["!r:x"].timeline.events[0].bench().unwrap().id, 3);
        // Sections a frame leaves out are empty, as on /sync.
        let f: ServerFrame =
            serde_json::from_str(r#"{"type":"sync","next_batch":"s3","data":{"next_batch":"s3"}}"#).unwrap();
        assert!(f.data.unwrap().rooms.join.is_empty());
        let f: ServerFrame = serde_json::from_str(
            r#"{"type":"closing","code":4008,"reason":"slow consumer","resume_token":"s9","future":1}"#,
        )
        .unwrap();
        assert_eq!((f.code, f.resume_token.as_deref()), (Some(4008), Some("s9")));
        let f: ServerFrame =
            serde_json::from_str(r#"{"type":"error","id":"o1","errcode":"M_LIMIT_EXCEEDED","retry_after_ms":420}"#)
                .unwrap();
        assert_eq!(f.op_error().key(), "M_LIMIT_EXCEEDED");
    }

    #[test]
    fn builds_ops() {
        let sub: Value = serde_json::from_str(&subscribe_op("sub", Some("s1"), &json!({"room": {}}))).unwrap();
        assert_eq!(sub, json!({"op": "subscribe", "id": "sub", "since": "s1", "filter": {"room": {}}}));
        let sub: Value = serde_json::from_str(&subscribe_op("sub", None, &json!("7"))).unwrap();
        assert_eq!(sub, json!({"op": "subscribe", "id": "sub", "filter": "7"}));
        let ack: Value = serde_json::from_str(&ack_op("s5")).unwrap();
        assert_eq!(ack, json!({"op": "ack", "next_batch": "s5"}));
        let send = Value::Object(send_op("!r:x", "t1", json!({"body": "b"})));
        assert_eq!(send["event_type"], "m.room.message");
        assert_eq!(send["content"]["body"], "b");
    }

    #[test]
    fn reconnect_policy() {
        assert_eq!(reconnect_delay(Some(4008), 1), Duration::ZERO);
        assert_eq!(reconnect_delay(Some(4029), 1), Duration::from_secs(30));
        assert!(reconnect_delay(Some(1001), 1) >= Duration::from_secs(1));
        assert!(reconnect_delay(None, 20) <= Duration::from_secs(5));
        assert!(is_logged_out(4001) && !is_logged_out(4002));
    }
}
