//! The WebSocket transport (`spec/websocket.md`) and delivered receipts
//! (`spec/delivered-receipts.md`), with a real WebSocket client (tokio-tungstenite).

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{
        Message,
        client::IntoClientRequest,
        protocol::frame::{
            Frame,
            coding::{Data, OpCode},
        },
    },
};

use crate::harness::{Backend, TestServer, backend_tests, enc, message_ids, timeline, two_users_in_a_room};

const PATH: &str = "/_matrix/client/unstable/org.hearth.ws/v1/connect";

/// A WebSocket client speaking `org.hearth.ws.v1`.
struct Ws {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    /// Frames read while looking for an answer, handed out by `frame` later.
    backlog: std::collections::VecDeque<Value>,
}

/// How a connection ended.
#[derive(Debug)]
struct Closed {
    code: u16,
    reason: String,
    closing: Option<Value>,
    /// The `next_batch` of the last sync frame before the close.
    last_token: Option<String>,
}

impl Ws {
    async fn connect(server: &TestServer, token: Option<&str>) -> Ws {
        let url = server.url(PATH).replace("http://", "ws://");
        let mut request = url.into_client_request().unwrap();
        request.headers_mut().insert("Sec-WebSocket-Protocol", "org.hearth.ws.v1".parse().unwrap());
        if let Some(token) = token {
            request.headers_mut().insert("Authorization", format!("Bearer {token}").parse().unwrap());
        }
        let (socket, response) = tokio_tungstenite::connect_async(request).await.expect("websocket upgrade");
        assert_eq!(response.headers()["sec-websocket-protocol"], "org.hearth.ws.v1");
        Ws { socket, next_id: 0, backlog: Default::default() }
    }

    /// Like `connect`, with a receive buffer of a few KiB: a client that does not read then
    /// stalls the server's writer on the first large frame (the kernel's autotuned buffers would
    /// otherwise take many MiB).
    async fn connect_small_window(server: &TestServer, token: &str) -> Ws {
        let url = server.url(PATH).replace("http://", "ws://");
        let mut request = url.into_client_request().unwrap();
        request.headers_mut().insert("Sec-WebSocket-Protocol", "org.hearth.ws.v1".parse().unwrap());
        request.headers_mut().insert("Authorization", format!("Bearer {token}").parse().unwrap());
        let address = server.base_url.trim_start_matches("http://").parse().unwrap();
        let tcp = tokio::net::TcpSocket::new_v4().unwrap();
        tcp.set_recv_buffer_size(16 * 1024).unwrap();
        let stream = tcp.connect(address).await.unwrap();
        let (socket, _) =
            tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream)).await.expect("websocket upgrade");
        Ws { socket, next_id: 0, backlog: Default::default() }
    }

    async fn send_raw(&mut self, message: Message) {
        self.socket.send(message).await.unwrap();
    }

    /// Sends an op with a fresh `id` and returns the id.
    async fn op(&mut self, mut op: Value) -> String {
        self.next_id += 1;
        let id = format!("c{}", self.next_id);
        op["id"] = json!(id);
        self.send_raw(Message::Text(op.to_string().into())).await;
        id
    }

    /// The next JSON frame (panics on close or after 20 s).
    async fn frame(&mut self) -> Value {
        if let Some(frame) = self.backlog.pop_front() {
            return frame;
        }
        match tokio::time::timeout(Duration::from_secs(20), self.socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => serde_json::from_str(&text).unwrap(),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => Box::pin(self.frame()).await,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// Reads frames until the answer to `id`, returning it (other frames wait in the backlog).
    async fn answer(&mut self, id: &str) -> Value {
        let mut skipped = Vec::new();
        let answer = loop {
            let frame = self.frame().await;
            if frame["id"] == id {
                break frame;
            }
            skipped.push(frame);
        };
        for frame in skipped.into_iter().rev() {
            self.backlog.push_front(frame);
        }
        answer
    }

    /// Reads until the connection closes; returns the close code, reason and any `closing` frame.
    async fn closed(&mut self) -> Closed {
        let mut closing = None;
        let mut last_token = None;
        for frame in self.backlog.drain(..) {
            if frame["type"] == "sync" {
                last_token = frame["next_batch"].as_str().map(str::to_owned);
            }
        }
        loop {
            let (code, reason) = match tokio::time::timeout(Duration::from_secs(20), self.socket.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => {
                    let frame: Value = serde_json::from_str(&text).unwrap();
                    if frame["type"] == "closing" {
                        closing = Some(frame);
                    } else if frame["type"] == "sync" {
                        last_token = frame["next_batch"].as_str().map(str::to_owned);
                    }
                    continue;
                }
                Ok(Some(Ok(Message::Close(Some(close))))) => (u16::from(close.code), close.reason.to_string()),
                Ok(Some(Ok(Message::Close(None)))) | Ok(None) | Ok(Some(Err(_))) => (1006, String::new()),
                Ok(Some(Ok(_))) => continue,
                Err(_) => panic!("the connection did not close"),
            };
            return Closed { code, reason, closing, last_token };
        }
    }

    /// Subscribes; returns the first frame.
    async fn subscribe(&mut self, since: Option<&str>, filter: Option<Value>) -> Value {
        let mut op = json!({"op": "subscribe"});
        if let Some(since) = since {
            op["since"] = json!(since);
        }
        if let Some(filter) = filter {
            op["filter"] = filter;
        }
        let id = self.op(op).await;
        let response = self.answer(&id).await;
        assert_eq!(response["type"], "response", "{response}");
        let first = self.frame().await;
        assert_eq!(first["type"], "sync");
        assert_eq!(first["next_batch"], response["result"]["next_batch"]);
        first
    }

    /// Reads sync frames until `done` holds for the accumulated room timeline events of `room`.
    async fn timeline_until(&mut self, room: &str, seen: &mut Vec<Value>, done: impl Fn(&[Value]) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = String::new();
        while !done(seen) {
            assert!(Instant::now() < deadline, "timeline condition not met; saw {} events", seen.len());
            let frame = self.frame().await;
            if frame["type"] != "sync" {
                continue;
            }
            last = frame["next_batch"].as_str().unwrap().to_owned();
            seen.extend(
                frame["data"]["rooms"]["join"][room]["timeline"]["events"].as_array().cloned().unwrap_or_default(),
            );
        }
        last
    }
}

fn messages(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect()
}

fn bodies(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| e["content"]["body"].as_str().unwrap().to_owned())
        .collect()
}

/// Padding state events (`org.example.padding`) in a room's `state` and `timeline` of a sync body.
fn padding_events(data: &Value, room: &str) -> usize {
    ["state", "timeline"]
        .iter()
        .filter_map(|section| data["rooms"]["join"][room][section]["events"].as_array())
        .flatten()
        .filter(|e| e["type"] == "org.example.padding")
        .count()
}

/// Whether a sync body holds an `org.hearth.delivered` receipt of `user` at `event`.
fn has_delivered(data: &Value, room: &str, event: &str, user: &str) -> bool {
    data["rooms"]["join"][room]["ephemeral"]["events"].as_array().is_some_and(|events| {
        events
            .iter()
            .any(|e| e["type"] == "m.receipt" && e["content"][event]["org.hearth.delivered"].get(user).is_some())
    })
}

impl Ws {
    /// Reads sync frames until one holds `user`'s delivered receipt at `event`.
    async fn until_delivered(&mut self, room: &str, event: &str, user: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(Instant::now() < deadline, "no delivered receipt of {user} at {event}");
            let frame = self.frame().await;
            if frame["type"] == "sync" && has_delivered(&frame["data"], room, event, user) {
                return;
            }
        }
    }
}

/// A close with `code` and `reason`, announced by a `closing` frame that repeats them.
#[track_caller]
fn assert_closing(closed: &Closed, code: u16, reason: &str) {
    assert_eq!((closed.code, closed.reason.as_str()), (code, reason), "{closed:?}");
    let closing = closed.closing.as_ref().unwrap_or_else(|| panic!("no closing frame: {closed:?}"));
    assert_eq!((closing["code"].as_u64(), closing["reason"].as_str()), (Some(u64::from(code)), Some(reason)));
    if code == 4001 {
        assert!(closing.get("resume_token").is_none(), "{closing}");
    }
}

/// The socket's `send`, `typing` and `presence` ops draw on the user's own budgets, shared with
/// the HTTP endpoints; a retried transaction costs nothing.
async fn socket_ops_share_the_users_budgets(backend: Backend) {
    let config = "[rate_limits]\nenabled = true\n[rate_limits.message]\nper_second = 0.001\nburst = 2\n\
                  [rate_limits.typing]\nper_second = 0.001\nburst = 1\n\
                  [rate_limits.presence]\nper_second = 0.001\nburst = 1\n";
    let server = TestServer::start_with(backend, config).await;
    let (alice, _bob, room) = two_users_in_a_room(&server).await;
    server.send_text_with_txn(&alice, &room, "http1", "over HTTP").await;
    let mut ws = Ws::connect(&server, Some(&alice.access_token)).await;
    let id = ws.op(send_op(&room, "w1", "over the socket")).await;
    let sent = ws.answer(&id).await;
    let event_id = sent["result"]["event_id"].as_str().expect("sent").to_owned();
    let id = ws.op(send_op(&room, "w2", "one too many")).await;
    let refused = ws.answer(&id).await;
    assert_eq!(refused["errcode"], "M_LIMIT_EXCEEDED", "{refused}");
    assert!(refused["retry_after_ms"].as_u64().unwrap_or(0) > 0, "{refused}");
    let id = ws.op(send_op(&room, "w1", "over the socket")).await;
    assert_eq!(ws.answer(&id).await["result"]["event_id"], event_id.as_str(), "a retry is answered, not limited");
    let status = server
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/http2"),
            Some(&alice.access_token),
            json!({"body": "x", "msgtype": "m.text"}),
        )
        .await;
    assert_eq!(status.1["errcode"], "M_LIMIT_EXCEEDED", "HTTP shares the budget: {}", status.1);
    for op in [
        json!({"op": "typing", "room_id": room, "typing": true, "timeout": 1000}),
        json!({"op": "presence", "presence": "online"}),
    ] {
        let id = ws.op(op.clone()).await;
        assert_eq!(ws.answer(&id).await["type"], "response", "{op}");
        let id = ws.op(op.clone()).await;
        assert_eq!(ws.answer(&id).await["errcode"], "M_LIMIT_EXCEEDED", "{op}");
    }
}

fn send_op(room: &str, txn: &str, body: &str) -> Value {
    json!({"op": "send", "room_id": room, "event_type": "m.room.message", "txn_id": txn, "content": {"msgtype": "m.text", "body": body}})
}

backend_tests! {
    async fn versions_advertise_the_extensions(backend) {
        let server = TestServer::start(backend).await;
        let (_, versions) = server.get("/_matrix/client/versions", None).await;
        assert_eq!(versions["unstable_features"]["org.hearth.ws"], true);
        assert_eq!(versions["unstable_features"]["org.hearth.delivered_receipts"], true);
    }

    async fn sockets_carry_key_counts_and_to_device_messages(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, _room) = two_users_in_a_room(&server).await;
        let body = json!({"one_time_keys": {"curve25519:A": "key-a", "curve25519:B": "key-b"},
                          "fallback_keys": {"curve25519:F": "key-f"}});
        let (status, _) = server.post("/_matrix/client/v3/keys/upload", Some(&alice.access_token), body).await;
        assert_eq!(status, 200);
        let mut a = Ws::connect(&server, Some(&alice.access_token)).await;
        let first = a.subscribe(None, None).await;
        assert_eq!(first["data"]["device_one_time_keys_count"]["curve25519"], 2, "{first}");
        assert_eq!(first["data"]["device_unused_fallback_key_types"], json!(["curve25519"]), "{first}");
        let path = "/_matrix/client/v3/sendToDevice/m.room_key/ws-1";
        let message = json!({"messages": {&alice.user_id: {&alice.device_id: {"session": "s"}}}});
        assert_eq!(server.put(path, Some(&bob.access_token), message).await.0, 200);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let frame = a.frame().await;
            if let Some(events) = frame["data"]["to_device"]["events"].as_array().filter(|e| !e.is_empty()) {
                assert_eq!(events.len(), 1, "{frame}");
                assert_eq!(events[0]["content"]["session"], "s");
                break;
            }
            assert!(Instant::now() < deadline, "no to-device frame");
        }
    }

    async fn two_users_chat_over_sockets(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        let mut a = Ws::connect(&server, Some(&alice.access_token)).await;
        let mut b = Ws::connect(&server, Some(&bob.access_token)).await;
        a.subscribe(None, None).await;
        b.subscribe(None, None).await;
                let id = a.op(send_op(&room, "t1", "hi bob 👋")).await;
        // The response comes before the frame that carries the event.
        let response = a.answer(&id).await;
        assert!(a.backlog.iter().all(|frame| !messages(frame["data"]["rooms"]["join"][&room]["timeline"]["events"].as_array().map(|v| v.as_slice()).unwrap_or_default()).contains(&response["result"]["event_id"].as_str().unwrap().to_owned())));
        let event_id = response["result"]["event_id"].as_str().unwrap().to_owned();
        let mut own = Vec::new();
        a.timeline_until(&room, &mut own, |seen| !messages(seen).is_empty()).await;
        assert_eq!(own[0]["unsigned"]["transaction_id"], "t1");
        let mut seen = Vec::new();
        b.timeline_until(&room, &mut seen, |seen| !messages(seen).is_empty()).await;
        assert_eq!(messages(&seen), vec![event_id.clone()]);
        assert!(seen[0]["unsigned"].get("transaction_id").is_none());
        // Retries are idempotent, and share the namespace with HTTP sends of the same device.
        let retry = a.op(send_op(&room, "t1", "different body")).await;
        assert_eq!(a.answer(&retry).await["result"]["event_id"], event_id);
        let (_, http) = server.put(&format!("/_matrix/client/v3/rooms/{}/send/m.room.message/t1", enc(&room)), Some(&alice.access_token), json!({"body": "x"})).await;
        assert_eq!(http["event_id"], event_id);
        // Bob answers; typing and state over the socket too.
        let typing = b.op(json!({"op": "typing", "room_id": room, "typing": true, "timeout": 5000})).await;
        assert_eq!(b.answer(&typing).await["type"], "response");
        let reply = b.op(send_op(&room, "b1", "hello alice")).await;
        assert_eq!(b.answer(&reply).await["type"], "response");
        let mut seen = Vec::new();
        a.timeline_until(&room, &mut seen, |seen| bodies(seen).contains(&"hello alice".to_owned())).await;
        let topic = a.op(json!({"op": "send", "room_id": room, "event_type": "m.room.topic", "state_key": "", "txn_id": "s1", "content": {"topic": "sockets"}})).await;
        assert!(a.answer(&topic).await["result"]["event_id"].is_string());
        let (_, topic) = server.get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.topic/", enc(&room)), Some(&bob.access_token)).await;
        assert_eq!(topic["topic"], "sockets");
    }

    async fn socket_and_sync_clients_see_the_same_timeline(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        let mut a = Ws::connect(&server, Some(&alice.access_token)).await;
        a.subscribe(None, None).await;
        let start = server.sync(&bob, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();
        for i in 0..20 {
            if i % 2 == 0 {
                let id = a.op(send_op(&room, &format!("a{i}"), &format!("m{i}"))).await;
                a.answer(&id).await;
            } else {
                server.send_text(&bob, &room, &format!("m{i}")).await;
            }
        }
        let mut socket_seen = Vec::new();
        a.timeline_until(&room, &mut socket_seen, |seen| messages(seen).len() >= 20).await;
                let mut sync_seen: Vec<String> = Vec::new();
        let mut since = start;
        let deadline = Instant::now() + Duration::from_secs(30);
        while sync_seen.len() < 20 {
            assert!(Instant::now() < deadline, "/sync saw only {} messages", sync_seen.len());
            let sync = server.sync(&bob, Some(&since), Some(r#"{"room":{"timeline":{"limit":50}}}"#), 2000).await;
            sync_seen.extend(message_ids(&timeline(&sync, &room)));
            since = sync["next_batch"].as_str().unwrap().to_owned();
        }
        assert_eq!(messages(&socket_seen), sync_seen);
        // The same token works on either transport.
        let mut b2 = Ws::connect(&server, Some(&bob.access_token)).await;
        let first = b2.subscribe(Some(&since), None).await;
                // Only what came after the /sync token (here: the delivered receipt that resuming with it
        // confirmed), no timeline events again.
        assert!(first["data"]["rooms"]["join"][&room].get("timeline").is_none(), "{first}");
    }

    async fn resume_after_fifty_forced_disconnects_loses_nothing(backend) {
        const MESSAGES: usize = 1000;
        let server = std::sync::Arc::new(TestServer::start(backend).await);
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        let since = server.sync(&bob, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();
        let sender = {
            let (server, alice, room) = (server.clone(), alice.clone(), room.clone());
            tokio::spawn(async move {
                for i in 0..MESSAGES {
                    server.send_text(&alice, &room, &format!("n{i}")).await;
                }
            })
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let filter = json!({"room": {"timeline": {"limit": 100}}});
        let mut token = since;
        let mut seen: Vec<String> = Vec::new();
        let mut kills = 0;
        let deadline = Instant::now() + Duration::from_secs(120);
        while seen.len() < MESSAGES {
            assert!(Instant::now() < deadline, "only {} of {MESSAGES} after {kills} kills", seen.len());
            let mut ws = Ws::connect(&server, Some(&bob.access_token)).await;
            let mut frame = ws.subscribe(Some(&token), Some(filter.clone())).await;
            // Process frames until the random kill point, then drop the TCP connection mid-stream.
            let frames_before_kill = if kills < 50 { rng.gen_range(0..4) } else { usize::MAX };
            let mut processed = 0;
            loop {
                let room_sync = &frame["data"]["rooms"]["join"][&room];
                assert_ne!(room_sync["timeline"]["limited"], true, "limit 100 is never exceeded between frames here");
                seen.extend(room_sync["timeline"]["events"].as_array().map(|e| bodies(e)).unwrap_or_default());
                token = frame["next_batch"].as_str().unwrap().to_owned();
                processed += 1;
                if processed > frames_before_kill || seen.len() >= MESSAGES {
                    break;
                }
                frame = loop {
                    let next = ws.frame().await;
                    if next["type"] == "sync" {
                        break next;
                    }
                };
            }
            if seen.len() < MESSAGES {
                kills += 1;
            }
            drop(ws);
        }
        sender.await.unwrap();
        assert!(kills >= 50, "the stream was cut {kills} times");
        let expected: Vec<String> = (0..MESSAGES).map(|i| format!("n{i}")).collect();
        assert_eq!(seen, expected, "every message exactly once, in order");
    }

    async fn slow_consumers_are_closed_with_a_resume_token_and_others_are_unaffected(backend) {
        let server = std::sync::Arc::new(TestServer::start_with(backend, "[websocket]\noutbound_buffer_frames = 8\noutbound_buffer_bytes = 262144\n").await);
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        let carol = server.register("carol").await;
        server.join(&carol, &room).await;
        let mut slow = Ws::connect(&server, Some(&bob.access_token)).await;
        let first = slow.subscribe(None, Some(json!({"room": {"timeline": {"limit": 1}}}))).await;
        let mut fast = Ws::connect(&server, Some(&carol.access_token)).await;
        fast.subscribe(None, None).await;
        // Small buffers, but room for a few of these frames so a client that reads keeps up; bob
        // reads nothing, so once the kernel's socket buffers (a few MiB on loopback) are full his
        // queue fills and he is closed.
        let padding = "x".repeat(30_000);
        let total = 400;
        let sender = {
            let (server, alice, room, padding) = (server.clone(), alice.clone(), room.clone(), padding.clone());
            tokio::spawn(async move {
                for i in 0..total {
                    server.send(&alice, &room, "m.room.message", json!({"msgtype": "m.text", "body": format!("big{i}"), "pad": padding})).await;
                }
            })
        };
        // Carol keeps up and gets everything while bob does not read at all.
        let mut seen = Vec::new();
        fast.timeline_until(&room, &mut seen, |seen| messages(seen).len() >= total).await;
        sender.await.unwrap();
        let closed = slow.closed().await;
        assert_eq!(closed.code, 4008, "{closed:?}");
        assert_eq!(closed.reason, "slow consumer");
        let resume = closed.closing.expect("a closing frame")["resume_token"].as_str().unwrap().to_owned();
        assert_ne!(resume, first["next_batch"].as_str().unwrap());
        // Resuming gets the rest; nothing is lost (the server stayed responsive throughout).
        let mut again = Ws::connect(&server, Some(&bob.access_token)).await;
        let frame = again.subscribe(Some(&resume), Some(json!({"room": {"timeline": {"limit": 1}}}))).await;
        assert!(frame["data"]["rooms"]["join"].get(&room).is_some(), "{}", frame["next_batch"]);
                assert_eq!(server.http.get(server.url("/health")).send().await.unwrap().status(), 200);
    }

    async fn delivered_then_read_receipts_reach_the_sender(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        let mut a = Ws::connect(&server, Some(&alice.access_token)).await;
        a.subscribe(None, None).await;
        let mut b = Ws::connect(&server, Some(&bob.access_token)).await;
        b.subscribe(None, None).await;
        let sent = a.op(send_op(&room, "d1", "did you get this?")).await;
        let event_id = a.answer(&sent).await["result"]["event_id"].as_str().unwrap().to_owned();
        let mut seen = Vec::new();
        let token = b.timeline_until(&room, &mut seen, |seen| messages(seen).contains(&event_id)).await;
        let ack = b.op(json!({"op": "ack", "next_batch": token})).await;
        assert_eq!(b.answer(&ack).await["type"], "response");
        let read = b.op(json!({"op": "receipt", "room_id": room, "receipt_type": "m.read", "event_id": event_id})).await;
        assert_eq!(b.answer(&read).await["type"], "response");
        // Alice sees delivered, then read, for her message.
        let mut order = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while order.len() < 2 {
            assert!(Instant::now() < deadline, "receipts missing: {order:?}");
            let frame = a.frame().await;
            let ephemeral = frame["data"]["rooms"]["join"][&room]["ephemeral"]["events"].as_array().cloned().unwrap_or_default();
            for event in ephemeral.iter().filter(|e| e["type"] == "m.receipt") {
                for kind in ["org.hearth.delivered", "m.read"] {
                    if event["content"][&event_id][kind].get(&bob.user_id).is_some() && !order.contains(&kind) {
                        order.push(kind);
                    }
                }
            }
        }
        assert_eq!(order, vec!["org.hearth.delivered", "m.read"]);
    }

    async fn delivered_receipts_over_sync_and_opting_out(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        let since = server.sync(&bob, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();
        let first = server.send_text(&alice, &room, "one").await;
        let (sync, next) = server.sync_until(&bob, Some(since), |s| !timeline(s, &room).is_empty()).await;
        assert!(message_ids(&timeline(&sync, &room)).contains(&first));
        // The next request with that token proves the response arrived.
        server.sync(&bob, Some(&next), None, 0).await;
        let receipt = |s: &Value, event: &str| s["rooms"]["join"][&room]["ephemeral"]["events"].as_array().is_some_and(|events| {
            events.iter().any(|e| e["type"] == "m.receipt" && e["content"][event]["org.hearth.delivered"].get(&bob.user_id).is_some())
        });
        let (alice_view, _) = server.sync_until(&alice, None, |s| receipt(s, &first)).await;
        assert_eq!(alice_view["rooms"]["join"][&room]["ephemeral"]["events"].as_array().unwrap().iter()
            .find(|e| e["type"] == "m.receipt").unwrap()["content"][&first]["org.hearth.delivered"][&bob.user_id]["thread_id"], "main");
        // Bob opts out: no more delivered receipts from him, and the old one is hidden.
        server.put(&format!("/_matrix/client/v3/user/{}/account_data/org.hearth.delivered_receipts", enc(&bob.user_id)), Some(&bob.access_token), json!({"enabled": false})).await;
        let second = server.send_text(&alice, &room, "two").await;
        let (_, next) = server.sync_until(&bob, Some(next), |s| !timeline(s, &room).is_empty()).await;
        server.sync(&bob, Some(&next), None, 0).await;
        let view = server.sync(&alice, None, None, 0).await;
        assert!(!receipt(&view, &first) && !receipt(&view, &second), "{view}");
    }

    async fn rooms_above_the_member_limit_record_no_delivered_receipts(backend) {
        let server = TestServer::start_with(backend, "[delivered_receipts]\nmax_room_members = 2\n").await;
        let (_, capabilities) = server.get("/_matrix/client/v3/capabilities", Some(&server.register("reader").await.access_token)).await;
        assert_eq!(capabilities["capabilities"]["org.hearth.delivered_receipts"]["max_room_members"], 2, "{capabilities}");
        let (alice, bob, small) = two_users_in_a_room(&server).await;
        let big = server.create_room(&alice, json!({"preset": "public_chat"})).await;
        server.join(&bob, &big).await;
        let carol = server.register("carol").await;
        server.join(&carol, &big).await;
        let delivered = |s: &Value, room: &str, event: &str| s["rooms"]["join"][room]["ephemeral"]["events"].as_array().is_some_and(|events| {
            events.iter().any(|e| e["type"] == "m.receipt" && e["content"][event]["org.hearth.delivered"].get(&bob.user_id).is_some())
        });
        let since = server.sync(&bob, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();
        let in_big = server.send_text(&alice, &big, "to three").await;
        let in_small = server.send_text(&alice, &small, "to two").await;
        let (_, next) = server.sync_until(&bob, Some(since), |s| !timeline(s, &big).is_empty() && !timeline(s, &small).is_empty()).await;
        server.sync(&bob, Some(&next), None, 0).await;
        // An explicit delivered receipt in the big room is accepted and dropped too.
        let (status, _) = server.post(&format!("/_matrix/client/v3/rooms/{}/receipt/org.hearth.delivered/{}", enc(&big), enc(&in_big)), Some(&bob.access_token), json!({})).await;
        assert_eq!(status, 200);
        let (view, _) = server.sync_until(&alice, None, |s| delivered(s, &small, &in_small)).await;
        assert!(!delivered(&view, &big, &in_big), "three members are above the limit of two: {view}");
    }

    async fn a_receipt_from_one_device_reaches_the_others(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        let event = server.send_text(&alice, &room, "read me on your phone").await;
        let (_, laptop) = server.login("bob", &bob.password, json!({"device_id": "LAPTOP"})).await;
        let mut phone = Ws::connect(&server, Some(&bob.access_token)).await;
        phone.subscribe(None, None).await;
        let mut lap = Ws::connect(&server, laptop["access_token"].as_str()).await;
        lap.subscribe(None, None).await;
        let id = phone.op(json!({"op": "receipt", "room_id": room, "receipt_type": "m.read", "event_id": event, "thread_id": "main"})).await;
        assert_eq!(phone.answer(&id).await["type"], "response");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(Instant::now() < deadline);
            let frame = lap.frame().await;
            let events = frame["data"]["rooms"]["join"][&room]["ephemeral"]["events"].as_array().cloned().unwrap_or_default();
            if events.iter().any(|e| e["type"] == "m.receipt" && e["content"][&event]["m.read"].get(&bob.user_id).is_some()) {
                break;
            }
        }
    }

    async fn authentication_by_op_refresh_and_logout(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let (_, login) = server.login("alice", &alice.password, json!({"refresh_token": true})).await;
        let mut ws = Ws::connect(&server, None).await;
        let id = ws.op(json!({"op": "auth", "access_token": login["access_token"]})).await;
        let answer = ws.answer(&id).await;
        assert_eq!(answer["result"]["user_id"], alice.user_id);
        assert!(answer["result"]["expires_in_ms"].as_u64().unwrap() > 0);
        ws.subscribe(None, None).await;
        // Refreshing is not a logout: the connection stays, and takes the new token.
        let (_, refreshed) = server.post("/_matrix/client/v3/refresh", None, json!({"refresh_token": login["refresh_token"]})).await;
        let id = ws.op(json!({"op": "auth", "access_token": refreshed["access_token"]})).await;
        assert_eq!(ws.answer(&id).await["type"], "response");
        // Another device's token is refused, the connection stays.
        let id = ws.op(json!({"op": "auth", "access_token": alice.access_token})).await;
        assert_eq!(ws.answer(&id).await["errcode"], "M_FORBIDDEN");
        // Logging the device out closes the socket with 4001.
        server.post("/_matrix/client/v3/logout", refreshed["access_token"].as_str(), json!({})).await;
        let closed = ws.closed().await;
        assert_eq!(closed.code, 4001, "{closed:?}");
    }

    async fn bad_frames_and_bad_tokens(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        // Ops before auth.
        let mut ws = Ws::connect(&server, None).await;
        ws.op(json!({"op": "ping"})).await;
        assert_eq!(ws.frame().await["errcode"], "M_MISSING_TOKEN");
        let closed = ws.closed().await;
        assert_eq!(closed.code, 4001);
        assert_closing(&closed, 4001, "M_MISSING_TOKEN");
        // A bad token, in the header and in an auth op: error, closing (no resume_token), 4001.
        let mut ws = Ws::connect(&server, Some("hat_nonsense")).await;
        let error = ws.frame().await;
        assert_eq!((error["errcode"].as_str(), error["soft_logout"].as_bool()), (Some("M_UNKNOWN_TOKEN"), Some(false)));
        let closed = ws.closed().await;
        assert_eq!(closed.code, 4001);
        assert_closing(&closed, 4001, "M_UNKNOWN_TOKEN");
        let mut ws = Ws::connect(&server, None).await;
        let id = ws.op(json!({"op": "auth", "access_token": "hat_nonsense"})).await;
        assert_eq!(ws.answer(&id).await["errcode"], "M_UNKNOWN_TOKEN");
        assert_closing(&ws.closed().await, 4001, "M_UNKNOWN_TOKEN");
        // Malformed frames and unknown ops get errors; the connection stays.
        let mut ws = Ws::connect(&server, Some(&alice.access_token)).await;
        ws.send_raw(Message::Text("{not json".into())).await;
        assert_eq!(ws.frame().await["errcode"], "M_NOT_JSON");
        ws.send_raw(Message::Text("[1,2]".into())).await;
        assert_eq!(ws.frame().await["errcode"], "M_BAD_JSON");
        let id = ws.op(json!({"op": "teleport"})).await;
        let answer = ws.answer(&id).await;
        assert_eq!(answer["errcode"], "M_UNRECOGNIZED");
        let id = ws.op(json!({"op": "send", "room_id": "!nope:localhost", "event_type": "m.room.message", "txn_id": "x", "content": {}})).await;
        assert_eq!(ws.answer(&id).await["errcode"], "M_NOT_FOUND");
        let id = ws.op(json!({"op": "send", "room_id": "garbage"})).await;
        assert_eq!(ws.answer(&id).await["errcode"], "M_INVALID_PARAM");
        let id = ws.op(json!({"op": "ack", "next_batch": "s1_0"})).await;
        assert_eq!(ws.answer(&id).await["errcode"], "M_INVALID_PARAM", "nothing was sent to ack yet");
        let id = ws.op(json!({"op": "ping"})).await;
        assert_eq!(ws.answer(&id).await["type"], "response");
        // Ten frames in a row that are not ops close it (4000), each answered, the tenth too; an
        // unknown op is an op, and starts the count again.
        for _ in 0..9 {
            ws.send_raw(Message::Text("\"just a string\"".into())).await;
        }
        ws.op(json!({"op": "teleport"})).await;
        for _ in 0..9 {
            ws.send_raw(Message::Text("\"just a string\"".into())).await;
        }
        let id = ws.op(json!({"op": "ping"})).await;
        let mut errors = 0;
        loop {
            let frame = ws.frame().await;
            if frame["id"] == id.as_str() {
                break;
            }
            errors += 1;
        }
        assert_eq!(errors, 19, "9 errors, the unknown op's, 9 more; still open");
        for _ in 0..10 {
            ws.send_raw(Message::Text("\"just a string\"".into())).await;
        }
        for _ in 0..10 {
            assert_eq!(ws.frame().await["errcode"], "M_BAD_JSON");
        }
        assert_closing(&ws.closed().await, 4000, "protocol error");
        // Binary frames: 1003. Invalid UTF-8: 1007. Oversized frames: 1009. Each after `closing`,
        // with the subscription's resume token.
        let mut ws = Ws::connect(&server, Some(&alice.access_token)).await;
        let first = ws.subscribe(None, None).await;
        ws.send_raw(Message::Binary(vec![1, 2, 3].into())).await;
        let closed = ws.closed().await;
        assert_closing(&closed, 1003, "binary frames are not supported");
        let last = closed.last_token.clone().unwrap_or_else(|| first["next_batch"].as_str().unwrap().to_owned());
        assert_eq!(closed.closing.as_ref().unwrap()["resume_token"], last.as_str());
        let mut ws = Ws::connect(&server, Some(&alice.access_token)).await;
        let invalid = Frame::message(vec![b'"', 0xff, 0xfe, b'"'], OpCode::Data(Data::Text), true);
        ws.send_raw(Message::Frame(invalid)).await;
        assert_closing(&ws.closed().await, 1007, "invalid utf-8");
        let mut ws = Ws::connect(&server, Some(&alice.access_token)).await;
        ws.send_raw(Message::Text("x".repeat(70_000).into())).await;
        assert_closing(&ws.closed().await, 1009, "frame too large");
        // Handshake refusals are plain HTTP errors.
        let url = server.url(PATH);
        let response = server.http.get(&url).header("Connection", "Upgrade").header("Upgrade", "websocket")
            .header("Sec-WebSocket-Version", "13").header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==").send().await.unwrap();
        assert_eq!(response.status(), 400, "no subprotocol");
        let response = server.http.get(format!("{url}?access_token=x")).header("Connection", "Upgrade").header("Upgrade", "websocket")
            .header("Sec-WebSocket-Version", "13").header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("Sec-WebSocket-Protocol", "org.hearth.ws.v1").send().await.unwrap();
        assert_eq!(response.status(), 400, "tokens never go in the URL");
    }

    async fn sync_frames_larger_than_the_byte_bound_are_delivered(backend) {
        // The default bound (4 MiB) against a room whose state is about 10 MiB.
        let server = TestServer::start(backend).await;
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        let before = server.sync(&bob, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();
        const PADDING: usize = 175;
        let pad = "p".repeat(60_000);
        for i in 0..PADDING {
            let (status, body) = server.set_state(&alice, &room, "org.example.padding", &format!("k{i}"), json!({"pad": pad})).await;
            assert_eq!(status, 200, "{body}");
        }
        // A fresh device's initial sync: one frame of over 10 MiB, right behind the subscribe
        // response, instead of 4008 on every attempt.
        let mut fresh = Ws::connect(&server, Some(&bob.access_token)).await;
        let first = fresh.subscribe(None, None).await;
        assert!(first.to_string().len() > 10 * 1024 * 1024, "{} bytes", first.to_string().len());
        assert_eq!(padding_events(&first["data"], &room), PADDING);
        // A catch-up over the bound (a limited timeline carries the state it skipped) likewise.
        let mut resumed = Ws::connect(&server, Some(&bob.access_token)).await;
        let catch_up = resumed.subscribe(Some(&before), Some(json!({"room": {"timeline": {"limit": 5}}}))).await;
        assert!(catch_up.to_string().len() > 4 * 1024 * 1024);
        assert_eq!(padding_events(&catch_up["data"], &room), PADDING);
        let id = resumed.op(json!({"op": "ping"})).await;
        assert_eq!(resumed.answer(&id).await["type"], "response", "the connection stays open");

        // A subscription whose first frame finds the buffer full (behind the previous
        // subscription's 10 MiB frame, which a client that does not read leaves there) is closed
        // with 4008, and `closing` names its own `since`: nothing of it was queued.
        let mut stalled = Ws::connect_small_window(&server, &bob.access_token).await;
        stalled.send_raw(Message::Text(json!({"op": "subscribe", "id": "old"}).to_string().into())).await;
        stalled.send_raw(Message::Text(json!({"op": "subscribe", "id": "new", "since": before}).to_string().into())).await;
        // Wait for the server's decision without reading the socket, so the old frame stays in
        // the way; then read everything.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !server.log_lines().iter().any(|line| line.contains("websocket closed by the server") && line.contains("4008")) {
            assert!(Instant::now() < deadline, "the second subscribe was not refused");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut types = Vec::new();
        let closed = loop {
            match tokio::time::timeout(Duration::from_secs(30), stalled.socket.next()).await.unwrap() {
                Some(Ok(Message::Text(text))) => {
                    let frame: Value = serde_json::from_str(&text).unwrap();
                    types.push(format!("{} {}", frame["type"].as_str().unwrap(), frame["id"].as_str().unwrap_or("")));
                    if frame["type"] == "closing" {
                        break frame;
                    }
                }
                Some(Ok(_)) => {}
                other => panic!("expected frames, got {other:?} after {types:?}"),
            }
        };
        assert_eq!(types, vec!["response old", "sync ", "response new", "closing "]);
        assert_eq!(closed["code"], 4008);
        assert_eq!(closed["resume_token"], before.as_str(), "{closed}");
    }

    async fn own_delivered_receipts_reach_every_device_of_the_user(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, room) = two_users_in_a_room(&server).await;
        let laptop = server.login_device(&bob, "LAPTOP").await;
        let tablet = server.login_device(&bob, "TABLET").await;
        let mut phone = Ws::connect(&server, Some(&bob.access_token)).await;
        phone.subscribe(None, None).await;
        let mut lap = Ws::connect(&server, Some(&laptop.access_token)).await;
        lap.subscribe(None, None).await;
        let tablet_since = server.sync(&tablet, None, None, 0).await["next_batch"].as_str().unwrap().to_owned();
        let event = server.send_text(&alice, &room, "for bob's phone").await;
        // Only the phone confirms it.
        let mut seen = Vec::new();
        let token = phone.timeline_until(&room, &mut seen, |seen| messages(seen).contains(&event)).await;
        let ack = phone.op(json!({"op": "ack", "next_batch": token})).await;
        assert_eq!(phone.answer(&ack).await["type"], "response");
        // The acking device gets its own receipt too (it is the user's receipt, not the device's).
        phone.until_delivered(&room, &event, &bob.user_id).await;
        // His other devices: over the socket, over /sync, and in an initial /sync.
        lap.until_delivered(&room, &event, &bob.user_id).await;
        server.sync_until(&tablet, Some(tablet_since), |s| has_delivered(s, &room, &event, &bob.user_id)).await;
        let initial = server.sync(&tablet, None, None, 0).await;
        assert!(has_delivered(&initial, &room, &event, &bob.user_id), "{initial}");
        // And the sender, as before.
        let (_, _) = server.sync_until(&alice, None, |s| has_delivered(s, &room, &event, &bob.user_id)).await;
    }

    async fn the_426_answer_names_the_websocket_version(backend) {
        let server = TestServer::start(backend).await;
        let upgrade = |version: &'static str| {
            server.http.get(server.url(PATH)).header("Connection", "Upgrade").header("Upgrade", "websocket")
                .header("Sec-WebSocket-Version", version).header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
                .header("Sec-WebSocket-Protocol", "org.hearth.ws.v1").send()
        };
        let response = upgrade("8").await.unwrap();
        assert_eq!(response.status(), 426);
        assert_eq!(response.headers()["sec-websocket-version"], "13");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["errcode"], "M_UNRECOGNIZED", "{body}");
    }

    async fn presence_ops_win_over_set_presence(backend) {
        let server = TestServer::start(backend).await;
        let (alice, bob, _) = two_users_in_a_room(&server).await;
        let presence = format!("/_matrix/client/v3/presence/{}/status", enc(&bob.user_id));
        let mut ws = Ws::connect(&server, Some(&bob.access_token)).await;
        ws.subscribe(None, None).await;
        assert_eq!(server.get(&presence, Some(&alice.access_token)).await.1["presence"], "online");
        let id = ws.op(json!({"op": "presence", "presence": "unavailable", "status_msg": "away"})).await;
        assert_eq!(ws.answer(&id).await["type"], "response");
        assert_eq!(server.get(&presence, Some(&alice.access_token)).await.1["presence"], "unavailable");
        // Another subscription with the default set_presence (online) leaves the explicit state.
        let mut other = Ws::connect(&server, Some(&bob.access_token)).await;
        other.subscribe(None, None).await;
        let (_, state) = server.get(&presence, Some(&alice.access_token)).await;
        assert_eq!((state["presence"].as_str(), state["status_msg"].as_str()), (Some("unavailable"), Some("away")));
        // Too long a status message is refused as over HTTP.
        let id = ws.op(json!({"op": "presence", "presence": "online", "status_msg": "x".repeat(1025)})).await;
        assert_eq!(ws.answer(&id).await["errcode"], "M_INVALID_PARAM");
    }

    async fn shutdown_tells_sockets_where_to_resume(backend) {
        let mut server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
                let mut ws = Ws::connect(&server, Some(&alice.access_token)).await;
        let first = ws.subscribe(None, None).await;
        let stopper = std::thread::spawn(move || {
            let status = server.stop();
            (server, status)
        });
        let closed = ws.closed().await;
        assert_eq!(closed.code, 1001, "{closed:?}");
                let resume = closed.closing.as_ref().unwrap()["resume_token"].as_str().unwrap().to_owned();
        let last = closed.last_token.clone().unwrap_or_else(|| first["next_batch"].as_str().unwrap().to_owned());
        assert_eq!(resume, last, "the resume token is the last frame's token");
        let (_server, status) = stopper.join().unwrap();
        assert!(status.success());
    }

    async fn socket_ops_draw_on_the_users_budgets(backend) {
        socket_ops_share_the_users_budgets(backend).await
    }
}
