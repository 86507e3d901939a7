//! The room graph across two Hearth servers: concurrent sends fork it and later events merge it;
//! conflicting state changes made while the servers cannot reach each other resolve to the same
//! state on both (state resolution v2); a ban racing a message from the banned user's server
//! holds on both, and the late message is soft-failed where the ban was already known.
//!
//! A partition is made by stopping a server: what the other sends meanwhile waits in its
//! persistent outbound queue and is delivered after the restart.

use std::collections::BTreeMap;

use serde_json::json;

use crate::{
    graph::{get_as, two_servers},
    harness::{Account, Backend, TestServer, enc, timeline},
    hostile::{bob_joins_alices_room, state_ids},
    membership::{eventually, wait_for_message},
    testnet::{Peer, TestNet, log_line},
};

crate::backend_tests!(
    concurrent_sends_from_two_servers_fork_and_merge_into_one_graph,
    conflicting_state_changes_during_a_partition_resolve_identically,
    a_ban_racing_a_message_holds_and_the_message_is_soft_failed,
);

const PER_SERVER: usize = 50;

/// The `prev_events` of an event as `at` serves it over federation (asked as `asker`).
async fn prev_events(net: &TestNet, at: &Peer, asker: &Peer, event_id: &str) -> Vec<String> {
    let (status, body) = get_as(net, at, asker, &format!("/_matrix/federation/v1/event/{}", enc(event_id))).await;
    assert_eq!(status, 200, "{body}");
    let mut prevs: Vec<String> =
        body["pdus"][0]["prev_events"].as_array().unwrap().iter().map(|id| id.as_str().unwrap().to_owned()).collect();
    prevs.sort();
    prevs
}

/// Message bodies of a room's timeline on a server, by event ID (up to 500 events).
async fn bodies(server: &TestServer, account: &Account, room: &str) -> BTreeMap<String, String> {
    let (status, body) = server
        .get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=500", enc(room)), Some(&account.access_token))
        .await;
    assert_eq!(status, 200, "{body}");
    body["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["event_id"].as_str()?.to_owned(), e["content"]["body"].as_str()?.to_owned())))
        .collect()
}

/// Collects message bodies from `account`'s incremental syncs of `room` from `since` until
/// `wanted` were all seen; every copy is counted, so a duplicate shows.
async fn synced_bodies(
    server: &TestServer,
    account: &Account,
    room: &str,
    since: String,
    wanted: &[String],
) -> Vec<String> {
    let filter = r#"{"room":{"timeline":{"limit":100}}}"#;
    let mut since = since;
    let mut seen: Vec<String> = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    while !wanted.iter().all(|w| seen.contains(w)) {
        assert!(std::time::Instant::now() < deadline, "sync did not bring all messages; seen {seen:?}");
        let sync = server.sync(account, Some(&since), Some(filter), 2000).await;
        assert_ne!(sync["rooms"]["join"][room]["timeline"]["limited"], json!(true), "a gap in sync: {sync}");
        seen.extend(timeline(&sync, room).iter().filter_map(|e| e["content"]["body"].as_str().map(str::to_owned)));
        since = sync["next_batch"].as_str().unwrap().to_owned();
    }
    seen
}

/// Sends each text in turn; every tenth also becomes the room's topic, so the branches conflict
/// in state too. Returns the last event's ID.
async fn send_all(server: &TestServer, account: &Account, room: &str, texts: &[String]) -> String {
    let mut last = String::new();
    for (i, text) in texts.iter().enumerate() {
        last = server.send_text(account, room, text).await;
        if i % 10 == 9 {
            let (status, body) = server.set_state(account, room, "m.room.topic", "", json!({"topic": text})).await;
            assert_eq!(status, 200, "{body}");
            last = body["event_id"].as_str().unwrap().to_owned();
        }
    }
    last
}

async fn concurrent_sends_from_two_servers_fork_and_merge_into_one_graph(backend: Backend) {
    let net = TestNet::new().await;
    let (a, b) = two_servers(&net, backend).await;
    let (alice, bob, room) = bob_joins_alices_room(&a, &b).await;
    make_admin(&a, &alice, &room, &bob.user_id).await;
    let levels_path = format!("/_matrix/client/v3/rooms/{}/state/m.room.power_levels", enc(&room));
    eventually(20, "B knows Bob is an admin", || async {
        b.server.get(&levels_path, Some(&bob.access_token)).await.1["users"][&bob.user_id] == 100
    })
    .await;
    let (_, alice_since) = a.server.sync_until(&alice, None, |_| true).await;
    let (_, bob_since) = b.server.sync_until(&bob, None, |_| true).await;

    let from_a: Vec<String> = (0..PER_SERVER).map(|i| format!("a{i}")).collect();
    let from_b: Vec<String> = (0..PER_SERVER).map(|i| format!("b{i}")).collect();
    // Both clients sync while the messages arrive, as clients do.
    let all: Vec<String> = from_a.iter().chain(&from_b).cloned().collect();
    let (last_a, last_b, seen_by_alice, seen_by_bob) = tokio::join!(
        send_all(&a.server, &alice, &room, &from_a),
        send_all(&b.server, &bob, &room, &from_b),
        synced_bodies(&a.server, &alice, &room, alice_since, &all),
        synced_bodies(&b.server, &bob, &room, bob_since, &all),
    );
    for (who, seen) in [("alice", &seen_by_alice), ("bob", &seen_by_bob)] {
        for text in &all {
            assert_eq!(seen.iter().filter(|s| *s == text).count(), 1, "{who} synced {text} once: {seen:?}");
        }
    }

    // Each server has the other's last event (a topic, which no sync above waited for).
    for (at, from, last) in [(&a, &b, &last_b), (&b, &a, &last_a)] {
        eventually(30, "the other side's last event arrives", || async {
            get_as(&net, at, from, &format!("/_matrix/federation/v1/event/{}", enc(last))).await.0 == 200
        })
        .await;
    }

    // One more message from each side, one after the other: each merges every branch it knows.
    a.server.send_text(&alice, &room, "merge from A").await;
    wait_for_message(&b.server, &bob, &room, "merge from A").await;
    let merge_b = b.server.send_text(&bob, &room, "merge from B").await;
    wait_for_message(&a.server, &alice, &room, "merge from B").await;
    let on_a = bodies(&a.server, &alice, &room).await;
    let on_b = bodies(&b.server, &bob, &room).await;
    assert_eq!(on_a, on_b, "both servers hold the same messages");
    assert_eq!(on_a.len(), 2 * PER_SERVER + 2);
    let merge_a = on_a.iter().find(|(_, body)| *body == "merge from A").unwrap().0.clone();
    assert!(prev_events(&net, &a, &b, &merge_a).await.len() <= 2, "A's merge cites at most a branch per server");
    // After A's merge reached B, B had a single forward extremity: the merge.
    assert_eq!(prev_events(&net, &b, &a, &merge_b).await, vec![merge_a.clone()]);
    assert_eq!(prev_events(&net, &a, &b, &merge_b).await, vec![merge_a]);
    // The same resolved state, whatever order each server received the branches in.
    assert_eq!(state_ids(&a, &alice, &room).await, state_ids(&b, &bob, &room).await);

    // The next message from A cites only B's merge: the graph is a chain again.
    let after = a.server.send_text(&alice, &room, "after").await;
    assert_eq!(prev_events(&net, &a, &b, &after).await, vec![merge_b]);
}

/// Power levels giving `user` the level 100 too.
async fn make_admin(peer: &Peer, admin: &Account, room: &str, user: &str) {
    let path = format!("/_matrix/client/v3/rooms/{}/state/m.room.power_levels", enc(room));
    let mut levels = peer.server.get(&path, Some(&admin.access_token)).await.1;
    levels["users"][user] = json!(100);
    let (status, body) = peer.server.put(&path, Some(&admin.access_token), levels).await;
    assert_eq!(status, 200, "{body}");
}

async fn conflicting_state_changes_during_a_partition_resolve_identically(backend: Backend) {
    let net = TestNet::new().await;
    let (mut a, mut b) = two_servers(&net, backend).await;
    let (alice, bob, room) = bob_joins_alices_room(&a, &b).await;
    make_admin(&a, &alice, &room, &bob.user_id).await;
    let levels_path = format!("/_matrix/client/v3/rooms/{}/state/m.room.power_levels", enc(&room));
    eventually(20, "B knows Bob is an admin", || async {
        b.server.get(&levels_path, Some(&bob.access_token)).await.1["users"][&bob.user_id] == 100
    })
    .await;

    // While A is down, Bob changes the topic and the power levels; then, while B is down, Alice
    // changes them differently. Neither knows of the other's change.
    a.server.stop();
    b.server.set_state(&bob, &room, "m.room.topic", "", json!({"topic": "from B"})).await;
    let mut levels = b.server.get(&levels_path, Some(&bob.access_token)).await.1;
    levels["events"]["m.room.name"] = json!(75);
    let (status, body) = b.server.put(&levels_path, Some(&bob.access_token), levels).await;
    assert_eq!(status, 200, "{body}");
    b.server.stop();
    a.server.restart();
    a.server.set_state(&alice, &room, "m.room.topic", "", json!({"topic": "from A"})).await;
    let mut levels = a.server.get(&levels_path, Some(&alice.access_token)).await.1;
    levels["events"]["m.room.avatar"] = json!(80);
    let (status, body) = a.server.put(&levels_path, Some(&alice.access_token), levels).await;
    assert_eq!(status, 200, "{body}");
    b.server.restart();

    // Both receive the other's changes and resolve the same state.
    let topic_path = format!("/_matrix/client/v3/rooms/{}/state/m.room.topic", enc(&room));
    eventually(60, "both servers resolve to the same state", || async {
        let (on_a, on_b) = (state_ids(&a, &alice, &room).await, state_ids(&b, &bob, &room).await);
        on_a == on_b && {
            // Both servers have both topics (whichever won).
            let (_, from_b) = a
                .server
                .get(
                    &format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50", enc(&room)),
                    Some(&alice.access_token),
                )
                .await;
            from_b["chunk"].as_array().is_some_and(|chunk| chunk.iter().any(|e| e["content"]["topic"] == "from B"))
        }
    })
    .await;
    let topic_a = a.server.get(&topic_path, Some(&alice.access_token)).await.1;
    let topic_b = b.server.get(&topic_path, Some(&bob.access_token)).await.1;
    assert_eq!(topic_a, topic_b);
    let levels_a = a.server.get(&levels_path, Some(&alice.access_token)).await.1;
    assert_eq!(levels_a, b.server.get(&levels_path, Some(&bob.access_token)).await.1);
    // State resolution v2: power events apply in reverse topological power order, the more
    // powerful sender's first. Alice created the room (room version 12: she outranks every
    // level), so her power levels apply first and Bob's, allowed by them, replace them whole
    // (events are picked, never merged). The topics cite the same power levels (one mainline
    // position), so the later one, Alice's, wins.
    assert_eq!(topic_a["topic"], "from A", "{topic_a}");
    assert_eq!(levels_a["events"]["m.room.name"], 75, "{levels_a}");
    assert_eq!(levels_a["events"]["m.room.avatar"], 50, "{levels_a}");

    // The next event of each side merges the branches, and the state stays agreed.
    let resolved = a.server.send_text(&alice, &room, "resolved").await;
    assert_eq!(prev_events(&net, &a, &b, &resolved).await.len(), 2, "A's event cites both branches");
    wait_for_message(&b.server, &bob, &room, "resolved").await;
    let ack = b.server.send_text(&bob, &room, "ack").await;
    assert_eq!(prev_events(&net, &b, &a, &ack).await, vec![resolved]);
    wait_for_message(&a.server, &alice, &room, "ack").await;
    assert_eq!(state_ids(&a, &alice, &room).await, state_ids(&b, &bob, &room).await);
}

async fn a_ban_racing_a_message_holds_and_the_message_is_soft_failed(backend: Backend) {
    let net = TestNet::new().await;
    let (mut a, mut b) = two_servers(&net, backend).await;
    let (alice, bob, room) = bob_joins_alices_room(&a, &b).await;
    // Carol keeps B in the room after Bob's ban.
    let carol = b.server.register("carol").await;
    let (status, body) = b
        .server
        .post(&format!("/_matrix/client/v3/join/{}?via=a.test", enc(&room)), Some(&carol.access_token), json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    a.server.send_text(&alice, &room, "before").await;
    wait_for_message(&b.server, &bob, &room, "before").await;
    let (_, alice_since) = a.server.sync_until(&alice, None, |_| true).await;

    // Bob's message, sent while A is down, cites the state before the ban; the ban, made while B
    // is down, cites the state before the message.
    a.server.stop();
    let late = b.server.send_text(&bob, &room, "late").await;
    // And a state change of his own: a new display name, a member event of his (join).
    let member = format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(&room), enc(&bob.user_id));
    let (status, body) =
        b.server.put(&member, Some(&bob.access_token), json!({"membership": "join", "displayname": "Late Bob"})).await;
    assert_eq!(status, 200, "{body}");
    b.server.stop();
    a.server.restart();
    let (status, body) = a
        .server
        .post(
            &format!("/_matrix/client/v3/rooms/{}/ban", enc(&room)),
            Some(&alice.access_token),
            json!({"user_id": bob.user_id, "reason": "racing"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    b.server.restart();

    // A receives the message and keeps it (it is allowed at its place in the graph)...
    eventually(60, "A has Bob's late message", || async {
        get_as(&net, &a, &b, &format!("/_matrix/federation/v1/event/{}", enc(&late))).await.0 == 200
    })
    .await;
    // ...answering B that it soft-failed it...
    log_line(&b.server, "A answers the late message as soft-failed", |line| {
        line.contains("did not accept") && line.contains(&late) && line.contains("soft-failed")
    })
    .await;
    // ...and the ban holds on both servers.
    let member_path = format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(&room), enc(&bob.user_id));
    eventually(60, "B knows of the ban", || async {
        b.server.get(&member_path, Some(&carol.access_token)).await.1["membership"] == "ban"
    })
    .await;
    assert_eq!(a.server.get(&member_path, Some(&alice.access_token)).await.1["membership"], "ban");
    // Bob's late member event loses to the ban on both servers: state resolution checks it
    // against the resolved membership, where Bob is banned.
    let banned = b.server.get(&member_path, Some(&carol.access_token)).await.1;
    assert!(banned["displayname"] != "Late Bob", "{banned}");
    // B's views follow its resolved state: Bob's own sync has the room among those he left.
    let sync = b.server.sync(&bob, None, Some(r#"{"room":{"include_leave":true}}"#), 0).await;
    assert!(sync["rooms"]["join"].get(&room).is_none(), "{sync}");
    assert!(sync["rooms"]["leave"].get(&room).is_some(), "{sync}");

    // Soft-failed on A: never in Alice's timeline, never a prev event of A's.
    let after = a.server.send_text(&alice, &room, "after the ban").await;
    assert!(!prev_events(&net, &a, &b, &after).await.contains(&late), "the late message is not a prev event");
    let seen = synced_bodies(&a.server, &alice, &room, alice_since, &["after the ban".to_owned()]).await;
    assert!(!seen.contains(&"late".to_owned()), "{seen:?}");
    let sync = a.server.sync(&alice, None, Some(r#"{"room":{"timeline":{"limit":50}}}"#), 0).await;
    assert!(!timeline(&sync, &room).iter().any(|e| e["content"]["displayname"] == "Late Bob"), "{sync}");
    let on_a = bodies(&a.server, &alice, &room).await;
    assert!(!on_a.contains_key(&late), "not in A's /messages: {on_a:?}");
    let (status, _) = a
        .server
        .get(&format!("/_matrix/client/v3/rooms/{}/context/{}", enc(&room), enc(&late)), Some(&alice.access_token))
        .await;
    assert_ne!(status, 200, "no context around a soft-failed event");
    let (status, body) = a
        .server
        .get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(&late)), Some(&alice.access_token))
        .await;
    assert_eq!(status, 404, "a soft-failed event is not served to clients: {body}");

    // B keeps working with A, and both agree on the state.
    wait_for_message(&b.server, &carol, &room, "after the ban").await;
    b.server.send_text(&carol, &room, "carol here").await;
    wait_for_message(&a.server, &alice, &room, "carol here").await;
    assert_eq!(state_ids(&a, &alice, &room).await, state_ids(&b, &carol, &room).await);
    let (status, body) = b
        .server
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/x", enc(&room)),
            Some(&bob.access_token),
            json!({"body": "again", "msgtype": "m.text"}),
        )
        .await;
    assert_ne!(status, 200, "a banned user cannot send: {body}");
}
