//! Hearth and a real Synapse, both ways. Heavy (a Synapse per test): `#[ignore]`d, run by
//! `.ci/run` through `cargo test --test federation -- --ignored`.

use reqwest::Method;
use serde_json::{Value, json};

use crate::{
    harness::{Backend, enc},
    synapse_peer::SynapsePeer,
    testnet::{Discovered, Peer, TestNet, skipped},
};

/// A network with a Hearth (`hearth.test`, found by port 8448) and a Synapse (`synapse.test`)
/// that know each other; None when port 8448 is taken on every address tried.
async fn hearth_and_synapse() -> Option<(TestNet, Peer, SynapsePeer)> {
    let net = TestNet::new().await;
    let hearth = net.peer(Backend::Sqlite, "hearth.test", Discovered::Port8448, "").await?;
    let synapse = SynapsePeer::start(&net, "synapse.test", &[("hearth.test", hearth.federation[0].ip())]).await?;
    Some((net, hearth, synapse))
}

/// Signed requests both ways (profiles and room aliases): Synapse verifies Hearth's X-Matrix signature with the key it
/// fetched from Hearth (found by the spec's fallback to port 8448), and Hearth verifies
/// Synapse's the same way (found through the test DNS server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts a Synapse; run by .ci/run with --ignored"]
async fn hearth_and_synapse_answer_each_others_profile_and_alias_queries() {
    let Some((_net, hearth, synapse)) = hearth_and_synapse().await else { return skipped("port 8448") };
    let alice = hearth.server.register("alice").await;
    let path = format!("/_matrix/client/v3/profile/{}/displayname", enc(&alice.user_id));
    let (status, _) =
        hearth.server.put(&path, Some(&alice.access_token), json!({"displayname": "Alice on Hearth"})).await;
    assert_eq!(status, 200);
    let sam = synapse.register("sam").await;
    let sam_path = format!("/_matrix/client/v3/profile/{}/displayname", enc("@sam:synapse.test"));
    let (status, body) =
        synapse.request(Method::PUT, &sam_path, &sam, Some(json!({"displayname": "Sam on Synapse"}))).await;
    assert_eq!(status, 200, "{body}");

    let (status, body) =
        synapse.request(Method::GET, &format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id)), &sam, None).await;
    assert_eq!(
        (status, body["displayname"].as_str()),
        (200, Some("Alice on Hearth")),
        "{body}\n{}",
        synapse.log_tail()
    );
    let (status, body) = hearth
        .server
        .get(&format!("/_matrix/client/v3/profile/{}", enc("@sam:synapse.test")), Some(&alice.access_token))
        .await;
    assert_eq!((status, body["displayname"].as_str()), (reqwest::StatusCode::OK, Some("Sam on Synapse")), "{body}");

    // Room aliases resolve across servers, both ways.
    let room = hearth.server.create_room(&alice, json!({"room_alias_name": "lobby"})).await;
    let (status, body) = synapse
        .request(Method::GET, &format!("/_matrix/client/v3/directory/room/{}", enc("#lobby:hearth.test")), &sam, None)
        .await;
    assert_eq!((status, body["room_id"].as_str()), (200, Some(room.as_str())), "{body}");
    let (status, created) = synapse
        .request(Method::POST, "/_matrix/client/v3/createRoom", &sam, Some(json!({"room_alias_name": "porch"})))
        .await;
    assert_eq!(status, 200, "{created}");
    let (status, body) = hearth
        .server
        .get(&format!("/_matrix/client/v3/directory/room/{}", enc("#porch:synapse.test")), Some(&alice.access_token))
        .await;
    assert_eq!((status.as_u16(), body["room_id"].clone()), (200, created["room_id"].clone()), "{body}");
    assert!(body["servers"].as_array().is_some_and(|servers| servers.contains(&json!("synapse.test"))), "{body}");
}

/// Whether a sync response has a message with `body` in `room`'s timeline.
pub fn timeline_has(response: &Value, room: &str, body: &str) -> bool {
    response["rooms"]["join"][room]["timeline"]["events"]
        .as_array()
        .is_some_and(|events| events.iter().any(|event| event["content"]["body"] == body))
}

/// The heart of federation, against the homeserver most of the network runs: a Hearth user joins
/// a Synapse room and a Synapse user joins a Hearth room (make_join, send_join, the state and
/// auth chain checked on each side), and messages cross both ways through `/send`, in room
/// versions 10, 11 and 12.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts a Synapse; run by .ci/run with --ignored"]
async fn hearth_and_synapse_users_join_each_others_rooms_and_chat_in_every_room_version() {
    let Some((_net, hearth, synapse)) = hearth_and_synapse().await else { return skipped("port 8448") };
    let alice = hearth.server.register("alice").await;
    let sam = synapse.register("sam").await;
    for version in ["10", "11", "12"] {
        let body = json!({"room_version": version, "preset": "public_chat"});
        // A Synapse room, joined from Hearth.
        let (status, created) =
            synapse.request(Method::POST, "/_matrix/client/v3/createRoom", &sam, Some(body.clone())).await;
        assert_eq!(status, 200, "{created}");
        let room = created["room_id"].as_str().unwrap().to_owned();
        let join = format!("/_matrix/client/v3/join/{}?server_name=synapse.test", enc(&room));
        let (status, joined) = hearth.server.post(&join, Some(&alice.access_token), json!({})).await;
        assert_eq!(status, 200, "v{version}: {joined}");
        let text = format!("from Synapse, v{version}");
        let send = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/s{version}", enc(&room));
        let (status, _) =
            synapse.request(Method::PUT, &send, &sam, Some(json!({"msgtype": "m.text", "body": text}))).await;
        assert_eq!(status, 200);
        hearth.server.sync_until(&alice, None, |response| timeline_has(response, &room, &text)).await;
        let text = format!("from Hearth, v{version}");
        hearth.server.send_text(&alice, &room, &text).await;
        synapse.wait_for_message(&sam, &room, &text).await;

        // A Hearth room, joined from Synapse.
        let room = hearth.server.create_room(&alice, body).await;
        let join = format!("/_matrix/client/v3/join/{}?server_name=hearth.test", enc(&room));
        let (status, joined) = synapse.request(Method::POST, &join, &sam, Some(json!({}))).await;
        assert_eq!(status, 200, "v{version}: {joined}\n{}", synapse.log_tail());
        let text = format!("in Hearth's room, v{version}");
        hearth.server.send_text(&alice, &room, &text).await;
        synapse.wait_for_message(&sam, &room, &text).await;
        let text = format!("Synapse in Hearth's room, v{version}");
        let send = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/t{version}", enc(&room));
        let (status, _) =
            synapse.request(Method::PUT, &send, &sam, Some(json!({"msgtype": "m.text", "body": text}))).await;
        assert_eq!(status, 200);
        hearth.server.sync_until(&alice, None, |response| timeline_has(response, &room, &text)).await;
    }
}

/// Syncs Synapse as `token` until `done` holds for a response (at most 30 s).
async fn synapse_sync_until(synapse: &SynapsePeer, token: &str, done: impl Fn(&Value) -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut since: Option<String> = None;
    // Left rooms too, so a ban or a kick shows even in the first response.
    let filter = enc(r#"{"room":{"include_leave":true}}"#);
    loop {
        let path = match &since {
            Some(since) => format!("/_matrix/client/v3/sync?timeout=2000&filter={filter}&since={since}"),
            None => format!("/_matrix/client/v3/sync?timeout=2000&filter={filter}"),
        };
        let (_, response) = synapse.request(Method::GET, &path, token, None).await;
        if done(&response) {
            return;
        }
        since = response["next_batch"].as_str().map(str::to_owned).or(since);
        assert!(std::time::Instant::now() < deadline, "Synapse's sync never got there:\n{}", synapse.log_tail());
    }
}

/// `user`'s membership in `room` as Synapse's `token` reads it.
async fn synapse_membership(synapse: &SynapsePeer, token: &str, room: &str, user: &str) -> Option<String> {
    let path = format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(room), enc(user));
    let (status, body) = synapse.request(Method::GET, &path, token, None).await;
    (status == 200).then(|| body["membership"].as_str().unwrap_or_default().to_owned())
}

/// Polls until `user`'s membership in `room` on Synapse is `want` (at most 30 s).
async fn wait_for_synapse_membership(synapse: &SynapsePeer, token: &str, room: &str, user: &str, want: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while synapse_membership(synapse, token, room, user).await.as_deref() != Some(want) {
        assert!(std::time::Instant::now() < deadline, "{user} never became {want} on Synapse:\n{}", synapse.log_tail());
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Invites both ways, accepted: a Synapse user invites a Hearth user (`/v2/invite` to Hearth, the
/// invite in Hearth's sync with its stripped state, accepted by a join through Synapse) and a
/// Hearth user invites a Synapse user (accepted on Synapse); messages cross afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts a Synapse; run by .ci/run with --ignored"]
async fn hearth_and_synapse_users_invite_each_other_and_accept() {
    let Some((_net, hearth, synapse)) = hearth_and_synapse().await else { return skipped("port 8448") };
    let alice = hearth.server.register("alice").await;
    let sam = synapse.register("sam").await;

    let (status, created) = synapse
        .request(
            Method::POST,
            "/_matrix/client/v3/createRoom",
            &sam,
            Some(json!({"preset": "private_chat", "name": "Sam's"})),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    let room = created["room_id"].as_str().unwrap().to_owned();
    let invite = format!("/_matrix/client/v3/rooms/{}/invite", enc(&room));
    let (status, body) = synapse.request(Method::POST, &invite, &sam, Some(json!({"user_id": alice.user_id}))).await;
    assert_eq!(status, 200, "{body}\n{}", synapse.log_tail());
    let (sync, _) = hearth.server.sync_until(&alice, None, |sync| sync["rooms"]["invite"][&room].is_object()).await;
    let state = sync["rooms"]["invite"][&room]["invite_state"]["events"].as_array().unwrap();
    assert!(state.iter().any(|e| e["type"] == "m.room.member" && e["content"]["membership"] == "invite"), "{sync}");
    let (status, body) = hearth
        .server
        .post(&format!("/_matrix/client/v3/rooms/{}/join", enc(&room)), Some(&alice.access_token), json!({}))
        .await;
    assert_eq!(status, 200, "accept on Hearth: {body}");
    hearth.server.send_text(&alice, &room, "hi Sam").await;
    synapse.wait_for_message(&sam, &room, "hi Sam").await;

    let room = hearth.server.create_room(&alice, json!({"preset": "private_chat", "name": "Alice's"})).await;
    let (status, body) = hearth
        .server
        .post(
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(&room)),
            Some(&alice.access_token),
            json!({"user_id": "@sam:synapse.test"}),
        )
        .await;
    assert_eq!(status, 200, "invite to Synapse: {body}\n{}", synapse.log_tail());
    synapse_sync_until(&synapse, &sam, |sync| sync["rooms"]["invite"][&room].is_object()).await;
    let (status, body) = synapse
        .request(Method::POST, &format!("/_matrix/client/v3/rooms/{}/join", enc(&room)), &sam, Some(json!({})))
        .await;
    assert_eq!(status, 200, "accept on Synapse: {body}\n{}", synapse.log_tail());
    hearth.server.send_text(&alice, &room, "welcome Sam").await;
    synapse.wait_for_message(&sam, &room, "welcome Sam").await;
}

/// Invites both ways, rejected: Hearth rejects through Synapse (make_leave/send_leave to it), and
/// Synapse rejects through Hearth (Hearth serves both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts a Synapse; run by .ci/run with --ignored"]
async fn hearth_and_synapse_users_reject_each_others_invites() {
    let Some((_net, hearth, synapse)) = hearth_and_synapse().await else { return skipped("port 8448") };
    let alice = hearth.server.register("alice").await;
    let sam = synapse.register("sam").await;

    let (status, created) = synapse
        .request(Method::POST, "/_matrix/client/v3/createRoom", &sam, Some(json!({"preset": "private_chat"})))
        .await;
    assert_eq!(status, 200, "{created}");
    let room = created["room_id"].as_str().unwrap().to_owned();
    let invite = format!("/_matrix/client/v3/rooms/{}/invite", enc(&room));
    let (status, body) = synapse.request(Method::POST, &invite, &sam, Some(json!({"user_id": alice.user_id}))).await;
    assert_eq!(status, 200, "{body}");
    let (_, since) = hearth.server.sync_until(&alice, None, |sync| sync["rooms"]["invite"][&room].is_object()).await;
    let (status, body) = hearth
        .server
        .post(&format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)), Some(&alice.access_token), json!({}))
        .await;
    assert_eq!(status, 200, "reject on Hearth: {body}");
    hearth.server.sync_until(&alice, Some(since), |sync| sync["rooms"]["leave"][&room].is_object()).await;
    wait_for_synapse_membership(&synapse, &sam, &room, &alice.user_id, "leave").await;

    let room = hearth.server.create_room(&alice, json!({"preset": "private_chat"})).await;
    hearth.server.invite(&alice, &room, "@sam:synapse.test").await;
    synapse_sync_until(&synapse, &sam, |sync| sync["rooms"]["invite"][&room].is_object()).await;
    let (status, body) = synapse
        .request(Method::POST, &format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)), &sam, Some(json!({})))
        .await;
    assert_eq!(status, 200, "reject on Synapse: {body}\n{}", synapse.log_tail());
    let path = format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(&room), enc("@sam:synapse.test"));
    let (status, body) = hearth.server.get(&path, Some(&alice.access_token)).await;
    assert_eq!((status.as_u16(), body["membership"].as_str()), (200, Some("leave")), "{body}");
}

/// Bans both ways: a Synapse admin bans a Hearth user (who can then neither send nor rejoin),
/// and a Hearth admin bans a Synapse user (whose membership on Synapse becomes `ban`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts a Synapse; run by .ci/run with --ignored"]
async fn hearth_and_synapse_ban_each_others_users() {
    let Some((_net, hearth, synapse)) = hearth_and_synapse().await else { return skipped("port 8448") };
    let alice = hearth.server.register("alice").await;
    let sam = synapse.register("sam").await;

    let (status, created) = synapse
        .request(Method::POST, "/_matrix/client/v3/createRoom", &sam, Some(json!({"preset": "public_chat"})))
        .await;
    assert_eq!(status, 200, "{created}");
    let room = created["room_id"].as_str().unwrap().to_owned();
    let join = format!("/_matrix/client/v3/join/{}?server_name=synapse.test", enc(&room));
    let (status, body) = hearth.server.post(&join, Some(&alice.access_token), json!({})).await;
    assert_eq!(status, 200, "{body}");
    let (_, since) = hearth.server.sync_until(&alice, None, |sync| sync["rooms"]["join"][&room].is_object()).await;
    let ban = format!("/_matrix/client/v3/rooms/{}/ban", enc(&room));
    let (status, body) = synapse.request(Method::POST, &ban, &sam, Some(json!({"user_id": alice.user_id}))).await;
    assert_eq!(status, 200, "{body}");
    hearth.server.sync_until(&alice, Some(since), |sync| sync["rooms"]["leave"][&room].is_object()).await;
    let (status, body) = hearth.server.post(&join, Some(&alice.access_token), json!({})).await;
    assert_eq!(status.as_u16(), 403, "rejoin while banned: {body}");

    let room = hearth.server.create_room(&alice, json!({"preset": "public_chat"})).await;
    let join = format!("/_matrix/client/v3/join/{}?server_name=hearth.test", enc(&room));
    let (status, body) = synapse.request(Method::POST, &join, &sam, Some(json!({}))).await;
    assert_eq!(status, 200, "{body}\n{}", synapse.log_tail());
    let (status, body) = hearth
        .server
        .post(
            &format!("/_matrix/client/v3/rooms/{}/ban", enc(&room)),
            Some(&alice.access_token),
            json!({"user_id": "@sam:synapse.test"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // Synapse lets a banned user read nothing of the room: its sync shows the room left, with the ban.
    synapse_sync_until(&synapse, &sam, |sync| {
        sync["rooms"]["leave"][&room]["timeline"]["events"].as_array().is_some_and(|events| {
            events.iter().any(|e| e["type"] == "m.room.member" && e["content"]["membership"] == "ban")
        })
    })
    .await;
    let send = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/banned", enc(&room));
    let (status, _) = synapse.request(Method::PUT, &send, &sam, Some(json!({"msgtype": "m.text", "body": "x"}))).await;
    assert_eq!(status, 403);
}

/// What a user sees: matrix-nio clients, one on Hearth and one on Synapse, invite each other,
/// join, chat, change a topic and leave, each step checked through the other's `/sync`
/// (`tests/sdk/nio_federation.py`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts a Synapse; run by .ci/run with --ignored"]
async fn matrix_nio_users_on_hearth_and_synapse_invite_join_chat_and_leave() {
    let Some((net, hearth, synapse)) = hearth_and_synapse().await else { return skipped("port 8448") };
    let python = tokio::task::spawn_blocking(crate::sdk_venv::sdk_python).await.unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/nio_federation.py");
    let synapse_url = format!("https://{}", synapse.addr);
    let ca = net.ca_path();
    let (hearth_url, hearth_name, synapse_name) =
        (hearth.server.base_url.clone(), hearth.name.clone(), synapse.name.clone());
    // The script blocks for a while: on the blocking pool, so the servers' runtime keeps going.
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .env("HEARTH_URL", hearth_url)
            .env("HEARTH_NAME", hearth_name)
            .env("SYNAPSE_URL", synapse_url)
            .env("SYNAPSE_NAME", synapse_name)
            .env("SYNAPSE_CA", ca)
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(
        output.status.success(),
        "nio_federation.py failed:\nstdout: {}\nstderr: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        synapse.log_tail()
    );
}

/// End-to-end encryption between Hearth and Synapse users with matrix-js-sdk's Rust crypto
/// (`tests/sdk/js/e2ee.js`): Bob, Dave and Eve on Synapse, Alice and Carol on Hearth — an
/// encrypted DM and group, SAS verification across the servers, and key backup on Hearth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts a Synapse; run by .ci/run with --ignored"]
async fn matrix_js_sdk_users_on_hearth_and_synapse_encrypt_verify_and_restore_keys() {
    let Some((net, hearth, synapse)) = hearth_and_synapse().await else { return skipped("port 8448") };
    let synapse_url = format!("https://{}", synapse.addr);
    crate::e2ee::run_e2ee_js(hearth.server.base_url.clone(), synapse_url, Some(net.ca_path())).await;
    drop(synapse);
}

/// Messages on Synapse, oldest first, as its `/messages` pages back (up to 500).
async fn synapse_history(synapse: &SynapsePeer, token: &str, room: &str) -> Vec<String> {
    let path = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=500", enc(room));
    let (status, body) = synapse.request(Method::GET, &path, token, None).await;
    assert_eq!(status, 200, "{body}");
    let mut bodies: Vec<String> = body["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect();
    bodies.reverse();
    bodies
}

/// An outage of Hearth: Synapse users send 30 messages while Hearth is down. When it is back,
/// Synapse retries with only the room's newest event (its catch-up), and Hearth fills the gap
/// behind it from Synapse with `get_missing_events`: all 30 reach Hearth's user, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts a Synapse; run by .ci/run with --ignored"]
async fn hearth_down_while_synapse_users_send_fills_the_gap_when_back() {
    let Some((_net, mut hearth, synapse)) = hearth_and_synapse().await else { return skipped("port 8448") };
    let alice = hearth.server.register("alice").await;
    let sam = synapse.register("sam").await;
    let (status, created) = synapse
        .request(Method::POST, "/_matrix/client/v3/createRoom", &sam, Some(json!({"preset": "public_chat"})))
        .await;
    assert_eq!(status, 200, "{created}");
    let room = created["room_id"].as_str().unwrap().to_owned();
    let join = format!("/_matrix/client/v3/join/{}?server_name=synapse.test", enc(&room));
    let (status, joined) = hearth.server.post(&join, Some(&alice.access_token), json!({})).await;
    assert_eq!(status, 200, "{joined}");

    hearth.server.stop();
    let sent: Vec<String> = (0..30).map(|i| format!("while hearth is down {i:02}")).collect();
    for (i, text) in sent.iter().enumerate() {
        let send = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/down{i}", enc(&room));
        let (status, body) =
            synapse.request(Method::PUT, &send, &sam, Some(json!({"msgtype": "m.text", "body": text}))).await;
        assert_eq!(status, 200, "{body}");
    }
    hearth.server.restart();
    let bodies = crate::gaps::wait_for_history(&hearth.server, &alice, &room, &sent, 120).await;
    let arrived: Vec<&String> = bodies.iter().filter(|b| b.starts_with("while hearth is down")).collect();
    assert_eq!(arrived, sent.iter().collect::<Vec<_>>(), "all 30, once each, in order");
    // And the room goes on both ways.
    hearth.server.send_text(&alice, &room, "hearth is back").await;
    synapse.wait_for_message(&sam, &room, "hearth is back").await;
}

/// An outage of Synapse: Hearth users send while Synapse is down; when it is back, Hearth's
/// queue delivers what Synapse missed (and Synapse may pull the rest from Hearth): every message
/// reaches Synapse's user, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts a Synapse; run by .ci/run with --ignored"]
async fn synapse_down_while_hearth_users_send_gets_every_message_when_back() {
    let Some((_net, hearth, mut synapse)) = hearth_and_synapse().await else { return skipped("port 8448") };
    let alice = hearth.server.register("alice").await;
    let sam = synapse.register("sam").await;
    let room = hearth.server.create_room(&alice, json!({"preset": "public_chat"})).await;
    let join = format!("/_matrix/client/v3/join/{}?server_name=hearth.test", enc(&room));
    let (status, joined) = synapse.request(Method::POST, &join, &sam, Some(json!({}))).await;
    assert_eq!(status, 200, "{joined}\n{}", synapse.log_tail());

    synapse.stop();
    let sent: Vec<String> = (0..30).map(|i| format!("while synapse is down {i:02}")).collect();
    for text in &sent {
        hearth.server.send_text(&alice, &room, text).await;
    }
    synapse.restart().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let bodies = synapse_history(&synapse, &sam, &room).await;
        let arrived: Vec<&String> = bodies.iter().filter(|b| b.starts_with("while synapse is down")).collect();
        if arrived.len() == sent.len() {
            assert_eq!(arrived, sent.iter().collect::<Vec<_>>(), "all 30, once each, in order");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of 30 reached Synapse:\n{}",
            arrived.len(),
            synapse.log_tail()
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let send = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/back", enc(&room));
    let (status, _) =
        synapse.request(Method::PUT, &send, &sam, Some(json!({"msgtype": "m.text", "body": "synapse is back"}))).await;
    assert_eq!(status, 200);
    hearth.server.sync_until(&alice, None, |response| timeline_has(response, &room, "synapse is back")).await;
}

/// The ephemeral events of `room` of `event_type` in a sync response (Hearth's or Synapse's).
fn ephemeral_of<'a>(response: &'a Value, room: &str, event_type: &str) -> Vec<&'a Value> {
    response["rooms"]["join"][room]["ephemeral"]["events"]
        .as_array()
        .map(|events| events.iter().filter(|event| event["type"] == event_type).collect())
        .unwrap_or_default()
}

/// Whether a sync response shows `user` typing in `room`.
fn shows_typing(response: &Value, room: &str, user: &str) -> bool {
    ephemeral_of(response, room, "m.typing")
        .iter()
        .any(|event| event["content"]["user_ids"].as_array().is_some_and(|ids| ids.contains(&json!(user))))
}

/// Whether a sync response has `user`'s `m.read` receipt at `event_id` in `room`.
fn shows_read(response: &Value, room: &str, event_id: &str, user: &str) -> bool {
    ephemeral_of(response, room, "m.receipt").iter().any(|event| event["content"][event_id]["m.read"][user].is_object())
}

/// Live data with the homeserver most of the network runs: typing and read receipts cross in
/// both directions between a Hearth user and a Synapse user (`m.typing` and `m.receipt` EDUs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts a Synapse; run by .ci/run with --ignored"]
async fn hearth_and_synapse_users_see_each_others_typing_and_read_receipts() {
    let Some((_net, hearth, synapse)) = hearth_and_synapse().await else { return skipped("port 8448") };
    let alice = hearth.server.register("alice").await;
    let sam = synapse.register("sam").await;
    let sam_id = "@sam:synapse.test";
    let room = hearth.server.create_room(&alice, json!({"preset": "public_chat"})).await;
    let join = format!("/_matrix/client/v3/join/{}?server_name=hearth.test", enc(&room));
    let (status, joined) = synapse.request(Method::POST, &join, &sam, Some(json!({}))).await;
    assert_eq!(status, 200, "{joined}\n{}", synapse.log_tail());
    hearth.server.send_text(&alice, &room, "welcome").await;
    synapse.wait_for_message(&sam, &room, "welcome").await;

    // Typing, Synapse → Hearth and Hearth → Synapse.
    let typing = |user: &str| format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room), enc(user));
    let (status, body) =
        synapse.request(Method::PUT, &typing(sam_id), &sam, Some(json!({"typing": true, "timeout": 30000}))).await;
    assert_eq!(status, 200, "{body}");
    hearth.server.sync_until(&alice, None, |response| shows_typing(response, &room, sam_id)).await;
    let (status, body) = hearth
        .server
        .put(&typing(&alice.user_id), Some(&alice.access_token), json!({"typing": true, "timeout": 30000}))
        .await;
    assert_eq!(status, 200, "{body}");
    synapse_sync_until(&synapse, &sam, |response| shows_typing(response, &room, &alice.user_id)).await;

    // Read receipts, Hearth → Synapse and Synapse → Hearth.
    let send = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/r1", enc(&room));
    let (status, sent) =
        synapse.request(Method::PUT, &send, &sam, Some(json!({"msgtype": "m.text", "body": "read me"}))).await;
    assert_eq!(status, 200, "{sent}");
    let sams_event = sent["event_id"].as_str().unwrap().to_owned();
    hearth.server.sync_until(&alice, None, |response| timeline_has(response, &room, "read me")).await;
    let receipt = |event_id: &str| format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(&room), enc(event_id));
    let (status, body) = hearth.server.post(&receipt(&sams_event), Some(&alice.access_token), json!({})).await;
    assert_eq!(status, 200, "{body}");
    synapse_sync_until(&synapse, &sam, |response| shows_read(response, &room, &sams_event, &alice.user_id)).await;

    let alices_event = hearth.server.send_text(&alice, &room, "and me").await;
    synapse.wait_for_message(&sam, &room, "and me").await;
    let (status, body) = synapse.request(Method::POST, &receipt(&alices_event), &sam, Some(json!({}))).await;
    assert_eq!(status, 200, "{body}");
    hearth.server.sync_until(&alice, None, |response| shows_read(response, &room, &alices_event, sam_id)).await;
}

/// Messages in a room before the other side joins it.
const INTEROP_HISTORY: usize = 150;

/// The message bodies of a room's history as `page` (one `/messages` request from a token, or
/// from now) returns it, newest first, following `end` until it stops (at most 40 pages).
async fn paginate_bodies<F, Fut>(mut page: F) -> Vec<String>
where
    F: FnMut(Option<String>) -> Fut,
    Fut: std::future::Future<Output = Value>,
{
    let mut bodies = Vec::new();
    let mut from = None;
    for _ in 0..40 {
        let response = page(from.clone()).await;
        let chunk = response["chunk"].as_array().cloned().unwrap_or_default();
        bodies.extend(chunk.iter().filter_map(|e| e["content"]["body"].as_str().map(str::to_owned)));
        match response["end"].as_str() {
            Some(end) if !chunk.is_empty() || from.as_deref() != Some(end) => from = Some(end.to_owned()),
            _ => break,
        }
    }
    bodies
}

/// History across servers with Synapse: Synapse joins a Hearth room with history and its user
/// pages back through all of it (Hearth serves `/backfill`), and a Hearth user joins a Synapse
/// room with history and pages back through it (Hearth asks Synapse's `/backfill`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts a Synapse; run by .ci/run with --ignored"]
async fn hearth_and_synapse_users_page_back_through_each_others_room_history() {
    let Some((_net, hearth, synapse)) = hearth_and_synapse().await else { return skipped("port 8448") };
    let alice = hearth.server.register("alice").await;
    let sam = synapse.register("sam").await;
    let expected: Vec<String> = (0..INTEROP_HISTORY).rev().map(|n| format!("h{n}")).collect();

    // A Hearth room with history, joined from Synapse.
    let room = hearth.server.create_room(&alice, json!({"preset": "public_chat"})).await;
    for n in 0..INTEROP_HISTORY {
        hearth.server.send_text(&alice, &room, &format!("h{n}")).await;
    }
    let join = format!("/_matrix/client/v3/join/{}?server_name=hearth.test", enc(&room));
    let (status, joined) = synapse.request(Method::POST, &join, &sam, Some(json!({}))).await;
    assert_eq!(status, 200, "{joined}\n{}", synapse.log_tail());
    let bodies = paginate_bodies(|from| {
        let mut path = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50", enc(&room));
        if let Some(from) = from {
            path.push_str(&format!("&from={}", enc(&from)));
        }
        let (synapse, sam) = (&synapse, &sam);
        async move { synapse.request(Method::GET, &path, sam, None).await.1 }
    })
    .await;
    assert_eq!(bodies, expected, "Synapse pages all of Hearth's history\n{}", synapse.log_tail());
    let served = hearth.server.log_lines().iter().any(|line| line.contains("/_matrix/federation/v1/backfill/"));
    assert!(served, "Synapse got the history through Hearth's /backfill");

    // A Synapse room with history, joined from Hearth.
    let (status, created) = synapse
        .request(Method::POST, "/_matrix/client/v3/createRoom", &sam, Some(json!({"preset": "public_chat"})))
        .await;
    assert_eq!(status, 200, "{created}");
    let room = created["room_id"].as_str().unwrap().to_owned();
    for n in 0..INTEROP_HISTORY {
        let send = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/h{n}", enc(&room));
        let body = json!({"msgtype": "m.text", "body": format!("h{n}")});
        let (status, _) = synapse.request(Method::PUT, &send, &sam, Some(body)).await;
        assert_eq!(status, 200);
    }
    let join = format!("/_matrix/client/v3/join/{}?server_name=synapse.test", enc(&room));
    let (status, joined) = hearth.server.post(&join, Some(&alice.access_token), json!({})).await;
    assert_eq!(status, 200, "{joined}");
    let bodies = paginate_bodies(|from| {
        let mut path = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50", enc(&room));
        if let Some(from) = from {
            path.push_str(&format!("&from={}", enc(&from)));
        }
        let (hearth, token) = (&hearth, alice.access_token.clone());
        async move { hearth.server.get(&path, Some(&token)).await.1 }
    })
    .await;
    assert_eq!(bodies, expected, "Hearth pages all of Synapse's history");
}

/// Media both ways: a Hearth user downloads what a Synapse user uploaded (Hearth fetches it over
/// `/_matrix/federation/v1/media/download` and parses Synapse's multipart answer), and a
/// Synapse user downloads a Hearth upload and a thumbnail of it (Synapse asks Hearth's
/// federation media endpoints).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts a Synapse; run by .ci/run with --ignored"]
async fn hearth_and_synapse_users_download_each_others_media() {
    let Some((_net, hearth, synapse)) = hearth_and_synapse().await else { return skipped("port 8448") };
    let alice = hearth.server.register("alice").await;
    let sam = synapse.register("sam").await;
    let picture = {
        let image = image::RgbImage::from_fn(300, 200, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 200]));
        let mut out = Vec::new();
        image::DynamicImage::ImageRgb8(image)
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    };
    let document: Vec<u8> = (0..250_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();

    // Synapse → Hearth.
    let response = synapse
        .http
        .post(synapse.url("/_matrix/media/v3/upload?filename=report.pdf"))
        .bearer_auth(&sam)
        .header("content-type", "application/pdf")
        .body(document.clone())
        .send()
        .await
        .unwrap();
    let uploaded: Value = response.json().await.unwrap();
    let on_synapse =
        uploaded["content_uri"].as_str().expect("Synapse's content_uri").trim_start_matches("mxc://").to_owned();
    let download = hearth
        .server
        .http
        .get(hearth.server.url(&format!("/_matrix/client/v1/media/download/{on_synapse}")))
        .bearer_auth(&alice.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(download.status(), 200, "{}", synapse.log_tail());
    assert_eq!(download.headers()["content-type"], "application/pdf");
    assert!(download.headers()["content-disposition"].to_str().unwrap().contains("report.pdf"));
    assert_eq!(download.bytes().await.unwrap().as_ref(), document.as_slice(), "byte-identical from Synapse");

    // Hearth → Synapse.
    let response = hearth
        .server
        .http
        .post(hearth.server.url("/_matrix/media/v3/upload?filename=map.png"))
        .bearer_auth(&alice.access_token)
        .header("content-type", "image/png")
        .body(picture.clone())
        .send()
        .await
        .unwrap();
    let uploaded: Value = response.json().await.unwrap();
    let on_hearth = uploaded["content_uri"].as_str().unwrap().trim_start_matches("mxc://").to_owned();
    let download = synapse
        .http
        .get(synapse.url(&format!("/_matrix/client/v1/media/download/{on_hearth}")))
        .bearer_auth(&sam)
        .send()
        .await
        .unwrap();
    assert_eq!(download.status(), 200, "{}", synapse.log_tail());
    assert_eq!(download.bytes().await.unwrap().as_ref(), picture.as_slice(), "byte-identical to Synapse");
    let thumbnail = synapse
        .http
        .get(synapse.url(&format!("/_matrix/client/v1/media/thumbnail/{on_hearth}?width=96&height=96&method=crop")))
        .bearer_auth(&sam)
        .send()
        .await
        .unwrap();
    assert_eq!(thumbnail.status(), 200, "{}", synapse.log_tail());
    let image = image::load_from_memory(&thumbnail.bytes().await.unwrap()).unwrap();
    assert!(image.width() <= 96 && image.height() <= 96, "{}x{}", image.width(), image.height());
}
