//! Rate limits and request limits: per-user limits on actions, the client address behind trusted
//! proxies, the global request timeout and the in-flight request cap.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::harness::{Backend, TestServer, assert_error, backend_tests, two_users_in_a_room};

/// `POST /login` as `user` from a client that a proxy says is at `forwarded_for`.
async fn login_via_proxy(server: &TestServer, user: &str, password: &str, forwarded_for: &str) -> (StatusCode, Value) {
    let response = server
        .http
        .post(server.url("/_matrix/client/v3/login"))
        .header("X-Forwarded-For", forwarded_for)
        .json(&json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": password}))
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Limits of one action at a time, refilling far slower than a test runs.
fn one_of_each(actions: &[&str]) -> String {
    // Registrations stay unlimited: the tests make several accounts.
    let mut config =
        "[rate_limits]\nenabled = true\n[rate_limits.register]\nper_second = 100.0\nburst = 100\n".to_owned();
    for action in actions {
        config.push_str(&format!("[rate_limits.{action}]\nper_second = 0.001\nburst = 1\n"));
    }
    config
}

fn assert_limited(response: &(StatusCode, Value), what: &str) {
    assert_error(response, 429, "M_LIMIT_EXCEEDED");
    let wait = response.1["retry_after_ms"].as_u64().unwrap_or(0);
    assert!(wait > 0, "{what}: no retry_after_ms in {}", response.1);
}

async fn message_budget_is_per_user_and_spares_retries(backend: Backend) {
    let config = "[rate_limits]\nenabled = true\n[rate_limits.message]\nper_second = 0.001\nburst = 3\n";
    let server = TestServer::start_with(backend, config).await;
    let (alice, bob, room) = two_users_in_a_room(&server).await;
    let path = |txn: &str| format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}");
    let text = json!({"msgtype": "m.text", "body": "hello"});
    // Joining spent none of it; three messages do (one is a state event).
    let (_, first) = server.put(&path("t1"), Some(&alice.access_token), text.clone()).await;
    let first_id = first["event_id"].as_str().expect("sent").to_owned();
    assert_eq!(server.put(&path("t2"), Some(&alice.access_token), text.clone()).await.0, 200);
    let topic = format!("/_matrix/client/v3/rooms/{room}/state/m.room.topic/");
    assert_eq!(server.put(&topic, Some(&alice.access_token), json!({"topic": "t"})).await.0, 200);
    assert_limited(&server.put(&path("t3"), Some(&alice.access_token), text.clone()).await, "a fourth message");
    assert_limited(&server.put(&topic, Some(&alice.access_token), json!({"topic": "u"})).await, "a state event");
    let redact = format!("/_matrix/client/v3/rooms/{room}/redact/{first_id}/r1");
    assert_limited(&server.put(&redact, Some(&alice.access_token), json!({})).await, "a redaction");
    // A retry of a transaction already sent is answered with its event, without spending.
    let (status, retried) = server.put(&path("t1"), Some(&alice.access_token), text.clone()).await;
    assert_eq!((status, retried["event_id"].as_str()), (StatusCode::OK, Some(first_id.as_str())), "{retried}");
    // Bob has a budget of his own.
    assert_eq!(server.put(&path("b1"), Some(&bob.access_token), text).await.0, 200);
    // The refused sends left nothing behind.
    let (_, messages) =
        server.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=50"), Some(&bob.access_token)).await;
    let texts = messages["chunk"].as_array().unwrap().iter().filter(|e| e["type"] == "m.room.message").count();
    assert_eq!(texts, 3, "{messages}");
}

async fn every_user_action_has_its_own_budget(backend: Backend) {
    let actions = ["room_creation", "join", "invite", "profile", "presence", "typing", "to_device"];
    let server = TestServer::start_with(backend, &one_of_each(&actions)).await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let token = Some(alice.access_token.as_str());
    let (status, created) = server.post("/_matrix/client/v3/createRoom", token, json!({"preset": "public_chat"})).await;
    assert_eq!(status, 200, "{created}");
    let room = created["room_id"].as_str().unwrap().to_owned();
    assert_limited(&server.post("/_matrix/client/v3/createRoom", token, json!({})).await, "a second room");
    let upgrade = format!("/_matrix/client/v3/rooms/{room}/upgrade");
    assert_limited(&server.post(&upgrade, token, json!({"new_version": "11"})).await, "an upgrade");

    let join = format!("/_matrix/client/v3/rooms/{room}/join");
    assert_eq!(server.post(&join, Some(&bob.access_token), json!({})).await.0, 200);
    assert_limited(&server.post(&join, Some(&bob.access_token), json!({})).await, "a second join");
    assert_limited(
        &server.post(&format!("/_matrix/client/v3/join/{room}"), Some(&bob.access_token), json!({})).await,
        "a join by ID or alias",
    );

    let invite = format!("/_matrix/client/v3/rooms/{room}/invite");
    let carol = server.register("carol").await;
    let dave = server.register("dave").await;
    assert_eq!(server.post(&invite, token, json!({"user_id": carol.user_id})).await.0, 200);
    assert_limited(&server.post(&invite, token, json!({"user_id": dave.user_id})).await, "a second invite");

    let name = format!("/_matrix/client/v3/profile/{}/displayname", alice.user_id);
    let avatar = format!("/_matrix/client/v3/profile/{}/avatar_url", alice.user_id);
    assert_eq!(server.put(&name, token, json!({"displayname": "Alice"})).await.0, 200);
    assert_limited(&server.put(&avatar, token, json!({"avatar_url": "mxc://localhost/a"})).await, "an avatar change");

    let presence = format!("/_matrix/client/v3/presence/{}/status", alice.user_id);
    assert_eq!(server.put(&presence, token, json!({"presence": "online"})).await.0, 200);
    assert_limited(&server.put(&presence, token, json!({"presence": "unavailable"})).await, "a presence change");

    let typing = format!("/_matrix/client/v3/rooms/{room}/typing/{}", alice.user_id);
    assert_eq!(server.put(&typing, token, json!({"typing": true, "timeout": 1000})).await.0, 200);
    assert_limited(&server.put(&typing, token, json!({"typing": false})).await, "a typing change");

    let to_device = |txn: &str| format!("/_matrix/client/v3/sendToDevice/m.test/{txn}");
    let message = json!({"messages": {bob.user_id.clone(): {"*": {"n": 1}}}});
    assert_eq!(server.put(&to_device("d1"), token, message.clone()).await.0, 200);
    assert_limited(&server.put(&to_device("d2"), token, message.clone()).await, "a second to-device request");
    assert_eq!(server.put(&to_device("d1"), token, message).await.0, 200, "a retry costs nothing");

    // Messages have a budget of their own, untouched by all of the above.
    assert!(!server.send_text(&alice, &room, "still talking").await.is_empty());
}

/// Opens a request that never finishes sending its body, holding a slot until dropped.
async fn stalled_request(server: &TestServer) -> TcpStream {
    let address = server.base_url.trim_start_matches("http://").trim_end_matches('/').to_owned();
    let mut stream = TcpStream::connect(&address).await.unwrap();
    let head = format!(
        "POST /_matrix/client/v3/login HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{{\"type\""
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

async fn a_request_past_the_deadline_gets_504_but_a_long_poll_does_not(backend: Backend) {
    let server = TestServer::start_with(backend, "[limits]\nrequest_timeout_secs = 1\n").await;
    let alice = server.register("alice").await;
    let mut stalled = stalled_request(&server).await;
    let started = Instant::now();
    let mut response = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), stalled.read_to_end(&mut response)).await;
    assert!(read.is_ok(), "no answer to a stalled request within 30 s");
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 504"), "{text}");
    assert!(text.contains("\"errcode\":\"M_UNKNOWN\""), "{text}");
    assert!(started.elapsed() >= Duration::from_millis(900), "answered before the deadline: {text}");
    // A long-poll of 2.5 s outlives the 1 s deadline: /sync has its own.
    let (_, first) = server.get("/_matrix/client/v3/sync", Some(&alice.access_token)).await;
    let since = first["next_batch"].as_str().unwrap();
    let (status, body) =
        server.get(&format!("/_matrix/client/v3/sync?since={since}&timeout=2500"), Some(&alice.access_token)).await;
    assert_eq!(status, 200, "{body}");
}

async fn requests_over_the_in_flight_cap_are_refused_at_once(backend: Backend) {
    let server =
        TestServer::start_with(backend, "[limits]\nmax_concurrent_requests = 2\nrequest_timeout_secs = 60\n").await;
    let alice = server.register("alice").await;
    // Three stalled requests for two slots: at least two hold a slot as soon as the server has
    // read their headers (a third, or one that met another request in flight, is refused).
    let mut stalled = Vec::new();
    for _ in 0..3 {
        stalled.push(stalled_request(&server).await);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        let response = server.get("/_matrix/client/versions", None).await;
        if response.0 == StatusCode::SERVICE_UNAVAILABLE {
            break response;
        }
        if Instant::now() >= deadline {
            let log: Vec<String> = server.log_lines().into_iter().filter(|line| line.contains("/login")).collect();
            panic!("never refused with three requests stalled for two slots: {response:?}; login lines: {log:#?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_error(&refused, 503, "M_LIMIT_EXCEEDED");
    assert!(refused.1["retry_after_ms"].as_u64().unwrap_or(0) > 0, "{}", refused.1);
    // Health checks and long-polls are outside the cap.
    let health = server.http.get(server.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let (status, _) = server.get("/_matrix/client/v3/sync?timeout=0", Some(&alice.access_token)).await;
    assert_eq!(status, 200);
    // Slots come back when the stalled clients go away.
    drop(stalled);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let response = server.get("/_matrix/client/versions", None).await;
        if response.0 == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "the slot never came back: {response:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const ONE_LOGIN: &str = "[rate_limits]\nenabled = true\n[rate_limits.login]\nper_second = 0.01\nburst = 1\n";

backend_tests! {
    async fn trusted_proxy_gives_each_forwarded_client_its_own_login_budget(backend) {
        let server = TestServer::start_with(backend, &format!("trusted_proxies = [\"127.0.0.1/32\"]\n{ONE_LOGIN}")).await;
        let alice = server.register("alice").await;
        assert_eq!(login_via_proxy(&server, "alice", &alice.password, "192.0.2.1").await.0, 200);
        assert_error(&login_via_proxy(&server, "alice", &alice.password, "192.0.2.1").await, 429, "M_LIMIT_EXCEEDED");
        // A client-written hop to the left of the proxy's is not believed: the budget is still 192.0.2.1's.
        assert_error(&login_via_proxy(&server, "alice", &alice.password, "198.51.100.7, 192.0.2.1").await, 429, "M_LIMIT_EXCEEDED");
        let (status, login) = login_via_proxy(&server, "alice", &alice.password, "192.0.2.2").await;
        assert_eq!(status, 200, "{login}");
        // The device records the forwarded address (listed from another device, whose own
        // request comes straight from 127.0.0.1).
        let (_, devices) = server.get("/_matrix/client/v3/devices", Some(&alice.access_token)).await;
        let device = devices["devices"].as_array().unwrap().iter().find(|d| d["device_id"] == login["device_id"]).unwrap().clone();
        assert_eq!(device["last_seen_ip"], "192.0.2.2", "{devices}");
    }

    async fn forwarding_headers_from_untrusted_peers_are_ignored(backend) {
        let server = TestServer::start_with(backend, ONE_LOGIN).await;
        let alice = server.register("alice").await;
        let (status, login) = login_via_proxy(&server, "alice", &alice.password, "192.0.2.1").await;
        assert_eq!(status, 200);
        assert_error(&login_via_proxy(&server, "alice", &alice.password, "192.0.2.2").await, 429, "M_LIMIT_EXCEEDED");
        let (_, devices) = server.get("/_matrix/client/v3/devices", Some(&alice.access_token)).await;
        let device = devices["devices"].as_array().unwrap().iter().find(|d| d["device_id"] == login["device_id"]).unwrap().clone();
        assert_eq!(device["last_seen_ip"], "127.0.0.1", "{devices}");
    }

    async fn message_budget_per_user_spares_retries(backend) {
        message_budget_is_per_user_and_spares_retries(backend).await
    }

    async fn each_user_action_has_its_own_budget(backend) {
        every_user_action_has_its_own_budget(backend).await
    }

    async fn request_deadline_gives_504_except_to_long_polls(backend) {
        a_request_past_the_deadline_gets_504_but_a_long_poll_does_not(backend).await
    }

    async fn in_flight_cap_refuses_at_once(backend) {
        requests_over_the_in_flight_cap_are_refused_at_once(backend).await
    }
}
