//! Live data across servers (EDUs) between two Hearth servers: typing, receipts (read,
//! threaded, delivered; private ones stay home), presence, to-device messages (once, however
//! often the transaction carrying them is sent), device-list changes, and a forged EDU about
//! another server's user, which is ignored.

use serde_json::{Value, json};

use crate::{
    graph::two_servers,
    harness::{Account, Backend, TestServer, enc},
    hostile::bob_joins_alices_room,
    membership::wait_for_message,
    testnet::{Peer, TestNet, json as body_of, x_matrix},
};

crate::backend_tests!(
    typing_crosses_servers_both_ways,
    read_threaded_and_delivered_receipts_cross_but_private_ones_do_not,
    presence_reaches_users_sharing_a_room,
    to_device_messages_arrive_once_even_when_resent,
    a_new_device_shows_in_the_other_servers_device_lists,
    an_edu_about_another_servers_user_is_ignored,
);

/// The ephemeral events of `room` in a sync response, of `event_type`.
fn ephemeral<'a>(sync: &'a Value, room: &str, event_type: &str) -> Vec<&'a Value> {
    sync["rooms"]["join"][room]["ephemeral"]["events"]
        .as_array()
        .map(|events| events.iter().filter(|e| e["type"] == event_type).collect())
        .unwrap_or_default()
}

/// Whether a sync response's timeline of `room` has a message with `text`.
fn has_message(sync: &Value, room: &str, text: &str) -> bool {
    crate::harness::timeline(sync, room).iter().any(|e| e["content"]["body"] == text)
}

/// Whether a sync response shows exactly `users` typing in `room`.
fn shows_typing(sync: &Value, room: &str, users: &[&str]) -> bool {
    ephemeral(sync, room, "m.typing").iter().any(|e| e["content"]["user_ids"] == json!(users))
}

/// Sends a transaction signed by `from` to `to`; returns the status.
async fn send_transaction(net: &TestNet, from: &Peer, to: &Peer, txn_id: &str, edus: Value) -> u16 {
    let txn = json!({"origin": from.name, "origin_server_ts": 1, "pdus": [], "edus": edus});
    let (client, base) = net.client_for(to);
    let uri = format!("/_matrix/federation/v1/send/{txn_id}");
    let auth = x_matrix(&from.signing_key(), &from.name, &to.name, "PUT", &uri, Some(&txn));
    let response = client.put(format!("{base}{uri}")).header("Authorization", auth).json(&txn).send().await.unwrap();
    let (status, body) = body_of(response).await;
    assert_eq!(status, 200, "{body}");
    status
}

async fn set_typing(server: &TestServer, account: &Account, room: &str, typing: bool) {
    let path = format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(room), enc(&account.user_id));
    let (status, body) =
        server.put(&path, Some(&account.access_token), json!({"typing": typing, "timeout": 30000})).await;
    assert_eq!(status, 200, "{body}");
}

async fn typing_crosses_servers_both_ways(backend: Backend) {
    let net = TestNet::new().await;
    let (a, b) = two_servers(&net, backend).await;
    let (alice, bob, room) = bob_joins_alices_room(&a, &b).await;
    let (_, bob_since) = b.server.sync_until(&bob, None, |_| true).await;
    let (_, alice_since) = a.server.sync_until(&alice, None, |_| true).await;

    set_typing(&b.server, &bob, &room, true).await;
    let (_, alice_since) =
        a.server.sync_until(&alice, Some(alice_since), |s| shows_typing(s, &room, &[&bob.user_id])).await;
    set_typing(&b.server, &bob, &room, false).await;
    a.server.sync_until(&alice, Some(alice_since), |s| shows_typing(s, &room, &[])).await;

    set_typing(&a.server, &alice, &room, true).await;
    let (_, bob_since) =
        b.server.sync_until(&bob, Some(bob_since), |s| shows_typing(s, &room, &[&alice.user_id])).await;
    set_typing(&a.server, &alice, &room, false).await;
    b.server.sync_until(&bob, Some(bob_since), |s| shows_typing(s, &room, &[])).await;
}

/// The receipt of `user` of `receipt_type` at `event_id` in a sync response, if any.
fn receipt<'a>(sync: &'a Value, room: &str, event_id: &str, receipt_type: &str, user: &str) -> Option<&'a Value> {
    ephemeral(sync, room, "m.receipt").into_iter().find_map(|e| {
        let data = &e["content"][event_id][receipt_type][user];
        data.is_object().then_some(data)
    })
}

async fn read_threaded_and_delivered_receipts_cross_but_private_ones_do_not(backend: Backend) {
    let net = TestNet::new().await;
    let (a, b) = two_servers(&net, backend).await;
    let (alice, bob, room) = bob_joins_alices_room(&a, &b).await;

    // Bob's message reaches Alice; her syncing it records a delivered receipt on A, which B
    // shows to Bob.
    let first = b.server.send_text(&bob, &room, "first").await;
    wait_for_message(&a.server, &alice, &room, "first").await;
    // A response that carries the message, then the request that confirms it.
    let (_, alice_since) = a.server.sync_until(&alice, None, |s| has_message(s, &room, "first")).await;
    a.server.sync(&alice, Some(&alice_since), None, 0).await;
    let (_, bob_since) = b
        .server
        .sync_until(&bob, None, |s| receipt(s, &room, &first, "org.hearth.delivered", &alice.user_id).is_some())
        .await;

    // A private receipt stays on A; the public one after it crosses (with its thread).
    let second = b.server.send_text(&bob, &room, "second").await;
    wait_for_message(&a.server, &alice, &room, "second").await;
    let post = |event_id: &str, receipt_type: &str, body: Value| {
        let path = format!("/_matrix/client/v3/rooms/{}/receipt/{receipt_type}/{}", enc(&room), enc(event_id));
        let token = alice.access_token.clone();
        let server = &a.server;
        async move {
            let (status, body) = server.post(&path, Some(&token), body).await;
            assert_eq!(status, 200, "{body}");
        }
    };
    post(&second, "m.read.private", json!({})).await;
    post(&first, "m.read", json!({"thread_id": "main"})).await;
    let mut saw_private = false;
    let (sync, bob_since) = b
        .server
        .sync_until(&bob, Some(bob_since), |s| {
            saw_private |= receipt(s, &room, &second, "m.read.private", &alice.user_id).is_some();
            receipt(s, &room, &first, "m.read", &alice.user_id).is_some()
        })
        .await;
    let read = receipt(&sync, &room, &first, "m.read", &alice.user_id).unwrap();
    assert_eq!(read["thread_id"], "main", "{read}");
    // Unthreaded too, and at the later event.
    post(&second, "m.read", json!({})).await;
    b.server
        .sync_until(&bob, Some(bob_since), |s| {
            saw_private |= receipt(s, &room, &second, "m.read.private", &alice.user_id).is_some();
            receipt(s, &room, &second, "m.read", &alice.user_id).is_some_and(|r| r.get("thread_id").is_none())
        })
        .await;
    assert!(!saw_private, "a private receipt left its server");
    let initial = b.server.sync(&bob, None, None, 0).await;
    assert!(receipt(&initial, &room, &second, "m.read.private", &alice.user_id).is_none(), "{initial}");

    // And Bob's read receipt reaches Alice.
    let path = format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(&room), enc(&second));
    let (status, body) = b.server.post(&path, Some(&bob.access_token), json!({})).await;
    assert_eq!(status, 200, "{body}");
    a.server
        .sync_until(&alice, Some(alice_since), |s| receipt(s, &room, &second, "m.read", &bob.user_id).is_some())
        .await;
}

async fn presence_reaches_users_sharing_a_room(backend: Backend) {
    let net = TestNet::new().await;
    let (a, b) = two_servers(&net, backend).await;
    let (alice, bob, _room) = bob_joins_alices_room(&a, &b).await;
    let path = format!("/_matrix/client/v3/presence/{}/status", enc(&bob.user_id));
    let (status, body) =
        b.server.put(&path, Some(&bob.access_token), json!({"presence": "online", "status_msg": "federating"})).await;
    assert_eq!(status, 200, "{body}");
    let shows_bob = |sync: &Value| {
        sync["presence"]["events"].as_array().is_some_and(|events| {
            events.iter().any(|e| e["sender"] == bob.user_id.as_str() && e["content"]["status_msg"] == "federating")
        })
    };
    a.server.sync_until(&alice, None, shows_bob).await;
    let (status, body) = a.server.get(&path, Some(&alice.access_token)).await;
    assert_eq!((status.as_u16(), &body["presence"]), (200, &json!("online")), "{body}");
}

/// The to-device events of a sync response.
fn to_device_events(sync: &Value) -> Vec<Value> {
    sync["to_device"]["events"].as_array().cloned().unwrap_or_default()
}

async fn to_device_messages_arrive_once_even_when_resent(backend: Backend) {
    let net = TestNet::new().await;
    let (a, b) = two_servers(&net, backend).await;
    let (alice, bob, _room) = bob_joins_alices_room(&a, &b).await;
    let (_, bob_since) = b.server.sync_until(&bob, None, |_| true).await;

    // Through the client API of A and A's outbox.
    let path = "/_matrix/client/v3/sendToDevice/org.example.ping/txn1";
    let body = json!({"messages": {bob.user_id.as_str(): {"*": {"n": 1}}}});
    let (status, answer) = a.server.put(path, Some(&alice.access_token), body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let (sync, bob_since) = b.server.sync_until(&bob, Some(bob_since), |s| !to_device_events(s).is_empty()).await;
    let events = to_device_events(&sync);
    assert_eq!(events.len(), 1, "{sync}");
    assert_eq!((&events[0]["sender"], &events[0]["type"]), (&json!(alice.user_id), &json!("org.example.ping")));
    assert_eq!(events[0]["content"], json!({"n": 1}));

    // The same message in a transaction sent twice, and once more in another transaction.
    let edu = json!([{"edu_type": "m.direct_to_device", "content": {
        "sender": alice.user_id, "type": "org.example.ping", "message_id": "resent-1",
        "messages": {bob.user_id.as_str(): {bob.device_id.as_str(): {"n": 2}}},
    }}]);
    send_transaction(&net, &a, &b, "edu-retry-1", edu.clone()).await;
    send_transaction(&net, &a, &b, "edu-retry-1", edu.clone()).await;
    send_transaction(&net, &a, &b, "edu-retry-2", edu).await;
    // A marker after them: once it is there, the resends have been processed.
    let marker = json!([{"edu_type": "m.direct_to_device", "content": {
        "sender": alice.user_id, "type": "org.example.marker", "message_id": "marker-1",
        "messages": {bob.user_id.as_str(): {"*": {}}},
    }}]);
    send_transaction(&net, &a, &b, "edu-marker", marker).await;
    let mut seen = Vec::new();
    b.server
        .sync_until(&bob, Some(bob_since), |s| {
            seen.extend(to_device_events(s));
            seen.iter().any(|e| e["type"] == "org.example.marker")
        })
        .await;
    let twos = seen.iter().filter(|e| e["content"]["n"] == 2).count();
    assert_eq!(twos, 1, "{seen:?}");
    assert!(seen.iter().all(|e| e["content"]["n"] != 1), "the first message came again: {seen:?}");
}

async fn a_new_device_shows_in_the_other_servers_device_lists(backend: Backend) {
    let net = TestNet::new().await;
    let (a, b) = two_servers(&net, backend).await;
    let (alice, bob, _room) = bob_joins_alices_room(&a, &b).await;
    let (_, alice_since) = a.server.sync_until(&alice, None, |_| true).await;
    // Let the join's own device-list news settle first.
    let (_, alice_since) = a.server.sync_until(&alice, Some(alice_since), |_| true).await;
    b.server.login_device(&bob, "BOBPHONE").await;
    let changed = |sync: &Value| {
        sync["device_lists"]["changed"].as_array().is_some_and(|users| users.contains(&json!(bob.user_id)))
    };
    a.server.sync_until(&alice, Some(alice_since), changed).await;
}

async fn an_edu_about_another_servers_user_is_ignored(backend: Backend) {
    let net = TestNet::new().await;
    let (a, b) = two_servers(&net, backend).await;
    let (alice, bob, room) = bob_joins_alices_room(&a, &b).await;
    let (_, alice_since) = a.server.sync_until(&alice, None, |_| true).await;
    // B claims that Alice (a user of A) is typing, and that Bob is: only the second holds.
    let edus = json!([
        {"edu_type": "m.typing", "content": {"room_id": room, "user_id": alice.user_id, "typing": true}},
        {"edu_type": "m.typing", "content": "not an object"},
        {"edu_type": "m.receipt", "content": {room.as_str(): {"m.read": {alice.user_id.as_str(): {"event_ids": ["$x"], "data": {}}}}}},
        {"edu_type": "m.typing", "content": {"room_id": room, "user_id": bob.user_id, "typing": true}},
    ]);
    send_transaction(&net, &b, &a, "forged-1", edus).await;
    let (sync, _) =
        a.server.sync_until(&alice, Some(alice_since), |s| !ephemeral(s, &room, "m.typing").is_empty()).await;
    assert!(shows_typing(&sync, &room, &[&bob.user_id]), "{sync}");
}
