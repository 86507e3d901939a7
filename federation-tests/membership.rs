//! Joins and chat across servers: a user of one Hearth joins a room created on another (by room
//! ID with `via`, and by alias), both send and see each other's messages and state changes, and
//! both servers end with the same events; the outbound queue survives the receiver's restart;
//! an inbound transaction is processed once however often it is sent, and PDUs of rooms the
//! receiver is not in are dropped.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{
    harness::{Account, Backend, TestServer, enc, timeline},
    testnet::{Discovered, Peer, TestNet, json as body_of, x_matrix},
};

crate::backend_tests!(
    a_user_joins_a_remote_room_by_id_and_both_chat,
    a_user_joins_a_remote_room_by_alias,
    queued_events_reach_a_server_after_its_restart,
    a_transaction_sent_twice_is_processed_once_and_unknown_rooms_are_dropped,
);

async fn two_peers(backend: Backend) -> (TestNet, Peer, Peer) {
    let net = TestNet::new().await;
    let a = net.peer(backend, "a.test", Discovered::Srv, "").await.expect("an address for a.test");
    let b = net.peer(backend, "b.test", Discovered::Srv, "").await.expect("an address for b.test");
    (net, a, b)
}

/// Bob on B creates a public room; Alice on A joins it through B.
async fn alice_joins_bobs_room(a: &Peer, b: &Peer) -> (Account, Account, String) {
    let alice = a.server.register("alice").await;
    let bob = b.server.register("bob").await;
    let room = b.server.create_room(&bob, json!({"preset": "public_chat"})).await;
    let (status, body) = a
        .server
        .post(&format!("/_matrix/client/v3/join/{}?via=b.test", enc(&room)), Some(&alice.access_token), json!({}))
        .await;
    assert_eq!(status, 200, "remote join: {body}");
    assert_eq!(body["room_id"], room.as_str());
    (alice, bob, room)
}

/// Syncs `account` until its timeline of `room` shows a message with `text`.
pub(crate) async fn wait_for_message(server: &TestServer, account: &Account, room: &str, text: &str) -> String {
    let (_, since) = server.sync_until(account, None, |_| true).await;
    let found = |sync: &Value| timeline(sync, room).iter().any(|e| e["content"]["body"] == text);
    // The message may already be in the initial sync.
    let initial = server.sync(account, None, None, 0).await;
    if found(&initial) {
        return since;
    }
    server.sync_until(account, Some(since), found).await.1
}

/// Polls `check` until it holds, for at most `secs` seconds.
pub(crate) async fn eventually<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    for _ in 0..10_000 {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "not within {secs} s: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("not after 10,000 tries: {what}");
}

/// Event IDs of the room's timeline on a server, oldest first (up to 200).
async fn event_ids(server: &TestServer, account: &Account, room: &str) -> Vec<String> {
    let (status, body) = server
        .get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=200", enc(room)), Some(&account.access_token))
        .await;
    assert_eq!(status, 200, "{body}");
    let mut ids: Vec<String> =
        body["chunk"].as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap().to_owned()).collect();
    ids.reverse();
    ids
}

async fn a_user_joins_a_remote_room_by_id_and_both_chat(backend: Backend) {
    let (_net, a, b) = two_peers(backend).await;
    let (alice, bob, room) = alice_joins_bobs_room(&a, &b).await;

    // B learns of the join at once (it took the join in through send_join).
    let (status, body) =
        b.server.get(&format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room)), Some(&bob.access_token)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["joined"][&alice.user_id].is_object(), "{body}");

    a.server.send_text(&alice, &room, "hello from A").await;
    wait_for_message(&b.server, &bob, &room, "hello from A").await;
    b.server.send_text(&bob, &room, "hello from B").await;
    wait_for_message(&a.server, &alice, &room, "hello from B").await;

    // A state change on B reaches A's view of the room's state.
    b.server.set_state(&bob, &room, "m.room.topic", "", json!({"topic": "federated"})).await;
    let topic_path = format!("/_matrix/client/v3/rooms/{}/state/m.room.topic", enc(&room));
    eventually(20, "the topic reaches A", || async {
        let (status, body) = a.server.get(&topic_path, Some(&alice.access_token)).await;
        status == 200 && body["topic"] == "federated"
    })
    .await;
    a.server.send_text(&alice, &room, "last from A").await;
    wait_for_message(&b.server, &bob, &room, "last from A").await;

    // Both servers have the same events from Alice's join on.
    let on_b = event_ids(&b.server, &bob, &room).await;
    let on_a = event_ids(&a.server, &alice, &room).await;
    let join_at = on_b.iter().position(|id| *id == on_a[0]).expect("A's first event is on B");
    assert_eq!(on_a, on_b[join_at..].to_vec());
}

async fn a_user_joins_a_remote_room_by_alias(backend: Backend) {
    let (_net, a, b) = two_peers(backend).await;
    let alice = a.server.register("alice").await;
    let bob = b.server.register("bob").await;
    let room = b.server.create_room(&bob, json!({"preset": "public_chat", "room_alias_name": "lobby"})).await;
    let (status, body) = a
        .server
        .post(&format!("/_matrix/client/v3/join/{}", enc("#lobby:b.test")), Some(&alice.access_token), json!({}))
        .await;
    assert_eq!(status, 200, "join by alias: {body}");
    assert_eq!(body["room_id"], room.as_str());
    b.server.send_text(&bob, &room, "welcome").await;
    wait_for_message(&a.server, &alice, &room, "welcome").await;
    a.server.send_text(&alice, &room, "thanks").await;
    wait_for_message(&b.server, &bob, &room, "thanks").await;
}

async fn queued_events_reach_a_server_after_its_restart(backend: Backend) {
    let (_net, mut a, mut b) = two_peers(backend).await;
    let (alice, bob, room) = alice_joins_bobs_room(&a, &b).await;
    a.server.send_text(&alice, &room, "before").await;
    wait_for_message(&b.server, &bob, &room, "before").await;

    b.server.stop();
    a.server.send_text(&alice, &room, "while B was down").await;
    // A's own restart must not lose or duplicate what it queued either.
    a.server.restart();
    b.server.restart();
    wait_for_message(&b.server, &bob, &room, "while B was down").await;
    let (status, body) = b
        .server
        .get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50", enc(&room)), Some(&bob.access_token))
        .await;
    assert_eq!(status, 200);
    let copies =
        body["chunk"].as_array().unwrap().iter().filter(|e| e["content"]["body"] == "while B was down").count();
    assert_eq!(copies, 1, "{body}");
}

async fn a_transaction_sent_twice_is_processed_once_and_unknown_rooms_are_dropped(backend: Backend) {
    let (net, a, b) = two_peers(backend).await;
    let (alice, bob, room) = alice_joins_bobs_room(&a, &b).await;
    let first = a.server.send_text(&alice, &room, "one").await;
    wait_for_message(&b.server, &bob, &room, "one").await;

    // A new event signed by A, as A's own sender would build it, handed to B by the test.
    let previous = a.server.stored_pdu(&first).await;
    let key = a.signing_key();
    let rules = ruma::RoomVersionId::V12.rules().unwrap();
    let ids = |field: &str| -> Vec<ruma::OwnedEventId> {
        previous[field].as_array().unwrap().iter().map(|v| v.as_str().unwrap().try_into().unwrap()).collect()
    };
    let template = hearth::matrix::pdu::EventTemplate {
        event_type: "m.room.message".to_owned(),
        state_key: None,
        content: hearth::matrix::pdu::canonical_content(json!({"msgtype": "m.text", "body": "sent twice"})).unwrap(),
        redacts: None,
    };
    let room_id: ruma::OwnedRoomId = room.as_str().try_into().unwrap();
    let sender: ruma::OwnedUserId = alice.user_id.as_str().try_into().unwrap();
    let prev = vec![ruma::OwnedEventId::try_from(first.as_str()).unwrap()];
    let auth_events = ids("auth_events");
    let placement = hearth::matrix::pdu::Placement {
        room_id: Some(&room_id),
        sender: &sender,
        prev_events: &prev,
        auth_events: &auth_events,
        depth: previous["depth"].as_u64().unwrap() + 1,
        origin_server_ts: ruma::MilliSecondsSinceUnixEpoch::now(),
    };
    let server_name: &ruma::ServerName = "a.test".try_into().unwrap();
    let pdu = hearth::matrix::pdu::Pdu::build(template, &placement, &rules, server_name, &key).unwrap();
    let mut unknown: Value = serde_json::from_str(&pdu.json).unwrap();
    unknown["room_id"] = json!("!nowhere:a.test");
    let txn = json!({
        "origin": "a.test",
        "origin_server_ts": 1,
        "pdus": [serde_json::from_str::<Value>(&pdu.json).unwrap(), unknown],
    });
    let (client, base) = net.client_for(&b);
    let uri = "/_matrix/federation/v1/send/test-txn-1";
    let mut answers = Vec::new();
    for _ in 0..2 {
        let auth = x_matrix(&key, "a.test", "b.test", "PUT", uri, Some(&txn));
        let response =
            client.put(format!("{base}{uri}")).header("Authorization", auth).json(&txn).send().await.unwrap();
        let (status, body) = body_of(response).await;
        assert_eq!(status, 200, "{body}");
        answers.push(body);
    }
    assert_eq!(answers[0], answers[1]);
    // A result for the event of the room B is in, none for the unknown room's.
    assert_eq!(answers[0]["pdus"], json!({ pdu.event_id.as_str(): {} }), "{}", answers[0]);
    let (status, body) = b
        .server
        .get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50", enc(&room)), Some(&bob.access_token))
        .await;
    assert_eq!(status, 200);
    let copies = body["chunk"].as_array().unwrap().iter().filter(|e| e["content"]["body"] == "sent twice").count();
    assert_eq!(copies, 1, "{body}");
}
