//! Holes in a room's graph after an outage: a server that was down while the others chatted gets
//! every message, in order, when it returns — through the senders' retries, and where a sender
//! kept only the newest event (its queue for a long-gone server is bounded), through
//! `get_missing_events`. A peer's fake gap (prev events nobody has) is refused without touching
//! the room.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::{
    graph::two_servers,
    harness::{Account, Backend, TestServer, enc},
    hostile::{bob_joins_alices_room, forge, send_as, state_ids},
    membership::wait_for_message,
    testnet::{Discovered, Peer, TestNet},
};

crate::backend_tests!(
    a_server_that_was_down_gets_every_message_in_order,
    a_long_outage_is_caught_up_from_the_newest_event_through_gap_fill,
    a_fake_gap_is_refused_and_the_room_is_untouched,
);

/// The bodies of the room's messages on a server, oldest first, read back with `/messages`.
pub(crate) async fn history(server: &TestServer, account: &Account, room: &str) -> Vec<String> {
    history_in_pages(server, account, room, 100).await
}

/// [`history`], read `limit` events a page.
pub(crate) async fn history_in_pages(server: &TestServer, account: &Account, room: &str, limit: usize) -> Vec<String> {
    let mut bodies = Vec::new();
    let mut from: Option<String> = None;
    for _ in 0..50 {
        let mut uri = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit={limit}", enc(room));
        if let Some(token) = &from {
            uri.push_str(&format!("&from={}", enc(token)));
        }
        let (status, body) = server.get(&uri, Some(&account.access_token)).await;
        assert_eq!(status, 200, "{body}");
        let chunk = body["chunk"].as_array().unwrap();
        bodies.extend(chunk.iter().filter_map(|e| e["content"]["body"].as_str().map(str::to_owned)));
        match body["end"].as_str() {
            Some(end) if !chunk.is_empty() => from = Some(end.to_owned()),
            _ => break,
        }
    }
    bodies.reverse();
    bodies
}

/// Waits until `server` holds every one of `wanted` (in its history), at most `secs` seconds;
/// returns its history then.
pub(crate) async fn wait_for_history(
    server: &TestServer,
    account: &Account,
    room: &str,
    wanted: &[String],
    secs: u64,
) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let bodies = history(server, account, room).await;
        if wanted.iter().all(|w| bodies.contains(w)) {
            return bodies;
        }
        assert!(
            Instant::now() < deadline,
            "not every message arrived within {secs} s: {} of {}",
            wanted.iter().filter(|w| bodies.contains(w)).count(),
            wanted.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Carol on `c` joins `room` through a.test.
async fn carol_joins(c: &Peer, room: &str) -> Account {
    let carol = c.server.register("carol").await;
    let (status, body) = c
        .server
        .post(&format!("/_matrix/client/v3/join/{}?via=a.test", enc(room)), Some(&carol.access_token), json!({}))
        .await;
    assert_eq!(status, 200, "remote join: {body}");
    carol
}

async fn a_server_that_was_down_gets_every_message_in_order(backend: Backend) {
    let net = TestNet::new().await;
    let (a, b) = two_servers(&net, backend).await;
    let mut c = net.peer(backend, "c.test", Discovered::Srv, "").await.expect("port 8450 free on some address");
    let (alice, bob, room) = bob_joins_alices_room(&a, &b).await;
    let carol = carol_joins(&c, &room).await;
    c.server.stop();

    // A and B take turns; each message is sent once the other server has the one before, so
    // the room is one chain and its order is the order of sending.
    let mut sent = Vec::new();
    for i in 0..100 {
        let text = format!("while c is down {i:03}");
        let (server, account, other, reader) = if i % 2 == 0 { (&a, &alice, &b, &bob) } else { (&b, &bob, &a, &alice) };
        server.server.send_text(account, &room, &text).await;
        wait_for_message(&other.server, reader, &room, &text).await;
        sent.push(text);
    }

    c.server.restart();
    let bodies = wait_for_history(&c.server, &carol, &room, &sent, 180).await;
    let arrived: Vec<&String> = bodies.iter().filter(|b| b.starts_with("while c is down")).collect();
    assert_eq!(arrived, sent.iter().collect::<Vec<_>>(), "every message once, in order");
    // And the room goes on for all three.
    c.server.send_text(&carol, &room, "carol is back").await;
    wait_for_message(&a.server, &alice, &room, "carol is back").await;
    wait_for_message(&b.server, &bob, &room, "carol is back").await;
}

async fn a_long_outage_is_caught_up_from_the_newest_event_through_gap_fill(backend: Backend) {
    let net = TestNet::new().await;
    // A keeps at most 10 events queued for a server that does not answer: past that, only the
    // newest of the room, and C has to fetch the rest itself.
    let a = net
        .peer(backend, "a.test", Discovered::Srv, "max_queued_per_destination = 10")
        .await
        .expect("port 8450 free on some address");
    let mut c = net.peer(backend, "c.test", Discovered::Srv, "").await.expect("port 8450 free on some address");
    let alice = a.server.register("alice").await;
    let room = a.server.create_room(&alice, json!({"preset": "public_chat"})).await;
    let carol = carol_joins(&c, &room).await;
    c.server.stop();

    // More than gap fill on receipt fetches, and more than one client page's backfills place.
    let sent: Vec<String> = (0..700).map(|i| format!("long outage {i:03}")).collect();
    for text in &sent {
        a.server.send_text(&alice, &room, text).await;
    }
    let queued_line = |line: &str| line.contains("catch-up: kept the newest event per room");
    assert!(a.server.log_lines().iter().any(|l| queued_line(l)), "A's queue for C was cut down");

    c.server.restart();
    wait_for_message(&c.server, &carol, &room, "long outage 699").await;
    // One pass of pages as big as a client may ask for: each page ends where history is still
    // missing (never at a gap, as if the room began there), so the pass reads all of it.
    let bodies = history_in_pages(&c.server, &carol, &room, 1000).await;
    let arrived: Vec<&String> = bodies.iter().filter(|b| b.starts_with("long outage")).collect();
    assert_eq!(arrived, sent.iter().collect::<Vec<_>>(), "every message once, in order, in one pass");
    // New messages flow again both ways.
    c.server.send_text(&carol, &room, "caught up").await;
    wait_for_message(&a.server, &alice, &room, "caught up").await;
    a.server.send_text(&alice, &room, "welcome back").await;
    wait_for_message(&c.server, &carol, &room, "welcome back").await;
}

async fn a_fake_gap_is_refused_and_the_room_is_untouched(backend: Backend) {
    let net = TestNet::new().await;
    let (a, b) = two_servers(&net, backend).await;
    let (alice, bob, room) = bob_joins_alices_room(&a, &b).await;
    let state_before = state_ids(&a, &alice, &room).await;
    let id_of = |event_type: &str, state_key: &str| -> ruma::OwnedEventId {
        let (.., id) = state_before.iter().find(|(t, k, _)| t == event_type && k == state_key).unwrap();
        id.as_str().try_into().unwrap()
    };
    let auth = [id_of("m.room.power_levels", ""), id_of("m.room.member", &bob.user_id)];
    // An event deep below a prev event that no server has: B (whose key signs it) cannot
    // hand out what lies between, nor the state there.
    let nowhere: ruma::OwnedEventId = "$nowherenowherenowherenowherenowherenowhere1".try_into().unwrap();
    let pdu = forge(
        &room,
        &bob.user_id,
        "b.test",
        &b.signing_key(),
        ("m.room.message", None),
        json!({"msgtype": "m.text", "body": "across a fake gap"}),
        (&nowhere, 100_000),
        &auth,
    );
    let started = Instant::now();
    let answer = send_as(&net, &a, &b, "fake-gap", vec![pdu]).await;
    assert!(started.elapsed() < Duration::from_secs(60), "bounded in time");
    let result = answer.as_object().unwrap().values().next().expect("a result for the PDU");
    assert!(result.get("error").is_some(), "the PDU was not accepted: {answer}");

    assert_eq!(state_ids(&a, &alice, &room).await, state_before, "the room's state did not change");
    let bodies = history(&a.server, &alice, &room).await;
    assert!(!bodies.iter().any(|b| b == "across a fake gap"), "not in the timeline: {bodies:?}");
    // The room keeps working both ways.
    b.server.send_text(&bob, &room, "still fine").await;
    wait_for_message(&a.server, &alice, &room, "still fine").await;
    a.server.send_text(&alice, &room, "fine here too").await;
    wait_for_message(&b.server, &bob, &room, "fine here too").await;
}
