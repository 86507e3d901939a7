//! History across servers, served side: `/backfill` and `/get_missing_events` walk back through a
//! room's graph only for a server in the room that its ACL allows, capped per request, and hand
//! out events from before that server's users joined a `joined`-visibility room without their
//! content (`/backfill`: redacted, so the graph stays walkable; `/get_missing_events`: left out,
//! as Synapse does). The requests are signed as server B by the test itself, with B's key.

use serde_json::{Value, json};

use crate::{
    graph::{get_as, two_servers},
    harness::{Backend, enc, timeline},
    hostile::bob_joins_alices_room,
    membership::{event_ids, wait_for_message},
    testnet::{Peer, TestNet, json as body_of, x_matrix},
};

crate::backend_tests!(
    a_joining_server_paginates_a_thousand_messages_of_history_through_backfill,
    backfill_and_missing_events_hide_history_from_before_the_servers_join,
    backfill_and_missing_events_are_refused_outside_the_room_and_to_denied_servers,
    a_gap_no_server_could_fill_is_tried_again_later_not_on_every_page,
);

/// A POST signed by `signer` as its server, sent to `to`.
async fn post_as(net: &TestNet, to: &Peer, signer: &Peer, uri: &str, body: &Value) -> (u16, Value) {
    let (client, base) = net.client_for(to);
    let authorization = x_matrix(&signer.signing_key(), &signer.name, &to.name, "POST", uri, Some(body));
    body_of(client.post(format!("{base}{uri}")).header("authorization", authorization).json(body).send().await.unwrap())
        .await
}

fn backfill_uri(room: &str, from: &[&str], limit: usize) -> String {
    let v: String = from.iter().map(|id| format!("&v={}", enc(id))).collect();
    format!("/_matrix/federation/v1/backfill/{}?limit={limit}{v}", enc(room))
}

fn missing_events_uri(room: &str) -> String {
    format!("/_matrix/federation/v1/get_missing_events/{}", enc(room))
}

/// The `body` of each `m.room.message` in `pdus`, in order (`None` for a redacted one).
fn message_bodies(pdus: &Value) -> Vec<Option<String>> {
    pdus.as_array()
        .unwrap()
        .iter()
        .filter(|pdu| pdu["type"] == "m.room.message")
        .map(|pdu| pdu["content"]["body"].as_str().map(str::to_owned))
        .collect()
}

/// How many messages the room has before the second server joins.
const HISTORY: usize = 1000;

async fn a_joining_server_paginates_a_thousand_messages_of_history_through_backfill(backend: Backend) {
    let net = TestNet::new().await;
    let (a, b) = two_servers(&net, backend).await;
    let alice = a.server.register("alice").await;
    let bob = b.server.register("bob").await;
    let room = a.server.create_room(&alice, json!({"preset": "public_chat", "name": "Old"})).await;
    for n in 0..HISTORY {
        a.server.send_text(&alice, &room, &format!("m{n}")).await;
    }
    let (status, body) = b
        .server
        .post(&format!("/_matrix/client/v3/join/{}?via=a.test", enc(&room)), Some(&bob.access_token), json!({}))
        .await;
    assert_eq!(status, 200, "remote join: {body}");
    let (sync, since) = b.server.sync_until(&bob, None, |sync| sync["rooms"]["join"][&room].is_object()).await;
    // Sync shows the join, which is a gap: limited, with a prev_batch to page back from.
    let joined = &sync["rooms"]["join"][&room]["timeline"];
    assert_eq!(joined["limited"], json!(true), "{joined}");
    let prev_batch = joined["prev_batch"].as_str().expect("prev_batch").to_owned();

    // Bob pages back from there to the room's start: every message once, newest first, the
    // create event last.
    let mut bodies: Vec<String> = Vec::new();
    let mut types: Vec<String> = Vec::new();
    let mut from: Option<String> = Some(prev_batch);
    for _ in 0..(HISTORY / 50 + 10) {
        let mut uri = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50", enc(&room));
        if let Some(token) = &from {
            uri.push_str(&format!("&from={}", enc(token)));
        }
        let (status, page) = b.server.get(&uri, Some(&bob.access_token)).await;
        assert_eq!(status, 200, "{page}");
        for event in page["chunk"].as_array().unwrap() {
            types.push(event["type"].as_str().unwrap().to_owned());
            if let Some(text) = event["content"]["body"].as_str() {
                bodies.push(text.to_owned());
            }
        }
        match page["end"].as_str() {
            Some(end) => from = Some(end.to_owned()),
            None => break,
        }
    }
    let expected: Vec<String> = (0..HISTORY).rev().map(|n| format!("m{n}")).collect();
    assert_eq!(bodies, expected, "all of the history, in order, without duplicates");
    assert!(!types.is_empty() && types.iter().filter(|t| *t == "m.room.member").count() == 1, "alice's join only");
    assert_eq!(types.last().map(String::as_str), Some("m.room.create"), "the room's start last");

    // None of it is new to bob's sync: a message sent now is all the next sync brings.
    a.server.send_text(&alice, &room, "now").await;
    let (sync, _) = b
        .server
        .sync_until(&bob, Some(since), |sync| timeline(sync, &room).iter().any(|e| e["content"]["body"] == "now"))
        .await;
    let texts: Vec<&Value> = timeline(&sync, &room).iter().map(|e| &e["content"]["body"]).collect();
    assert_eq!(texts, [&json!("now")], "{sync}");
    let initial = b.server.sync(&bob, None, None, 0).await;
    let old = timeline(&initial, &room)
        .iter()
        .filter(|e| e["content"]["body"].as_str().is_some_and(|t| t.starts_with('m')))
        .count();
    assert_eq!(old, 0, "backfilled history is not in an initial sync's timeline either");
    // B's current state and forward extremities did not move back: bob can still send.
    let reply = b.server.send_text(&bob, &room, "still here").await;
    wait_for_message(&a.server, &alice, &room, "still here").await;
    assert!(reply.starts_with('$'));
}

async fn backfill_and_missing_events_hide_history_from_before_the_servers_join(backend: Backend) {
    let net = TestNet::new().await;
    let (a, b) = two_servers(&net, backend).await;
    let alice = a.server.register("alice").await;
    let bob = b.server.register("bob").await;
    let visibility = json!({"type": "m.room.history_visibility", "content": {"history_visibility": "joined"}});
    let room = a.server.create_room(&alice, json!({"preset": "public_chat", "initial_state": [visibility]})).await;
    for n in 0..3 {
        a.server.send_text(&alice, &room, &format!("before {n}")).await;
    }
    let (status, body) = b
        .server
        .post(&format!("/_matrix/client/v3/join/{}?via=a.test", enc(&room)), Some(&bob.access_token), json!({}))
        .await;
    assert_eq!(status, 200, "remote join: {body}");
    for n in 0..3 {
        a.server.send_text(&alice, &room, &format!("after {n}")).await;
    }
    wait_for_message(&b.server, &bob, &room, "after 2").await;
    let ids = event_ids(&a.server, &alice, &room).await;
    let latest = ids.last().unwrap().clone();

    // Backfill from the newest event reaches the create event, newest first; what came before
    // B's join has no content.
    let (status, body) = get_as(&net, &a, &b, &backfill_uri(&room, &[&latest], 100)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["origin"], "a.test");
    let pdus = body["pdus"].as_array().unwrap();
    assert_eq!(pdus.len(), ids.len(), "every event of the chain: {body}");
    assert_eq!(pdus.last().unwrap()["type"], "m.room.create", "oldest last: {body}");
    let depths: Vec<u64> = pdus.iter().map(|p| p["depth"].as_u64().unwrap()).collect();
    assert!(depths.windows(2).all(|w| w[0] > w[1]), "deepest first: {depths:?}");
    let bodies = message_bodies(&body["pdus"]);
    let after: Vec<Option<String>> = (0..3).rev().map(|n| Some(format!("after {n}"))).collect();
    assert_eq!(bodies, [after, vec![None, None, None]].concat(), "pre-join messages are redacted");
    assert!(
        pdus.iter().all(|p| {
            let origin = p["sender"].as_str().unwrap().split(':').nth(1).unwrap();
            p["signatures"][origin].is_object() && p["hashes"]["sha256"].is_string()
        }),
        "redacted or not, each PDU keeps its signature and hash: {body}"
    );

    // The limit bounds the page, and the page starts at the `v` events.
    let (status, body) = get_as(&net, &a, &b, &backfill_uri(&room, &[&latest], 2)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(message_bodies(&body["pdus"]), [Some("after 2".to_owned()), Some("after 1".to_owned())]);
    // A limit beyond the cap is cut to it, not refused.
    let (status, body) = get_as(&net, &a, &b, &backfill_uri(&room, &[&latest], 100_000)).await;
    assert_eq!((status, body["pdus"].as_array().map(Vec::len)), (200, Some(ids.len())), "{body}");

    // get_missing_events: the ancestors of `latest_events`, oldest first, without the latest
    // events, stopping at `earliest_events`; what B may not see is left out.
    let earliest = &ids[ids.len() - 3];
    let request = json!({"earliest_events": [earliest], "latest_events": [latest], "limit": 10});
    let (status, body) = post_as(&net, &a, &b, &missing_events_uri(&room), &request).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(message_bodies(&body["events"]), [Some("after 1".to_owned())], "{body}");
    let request = json!({"earliest_events": [], "latest_events": [latest], "limit": 50});
    let (status, body) = post_as(&net, &a, &b, &missing_events_uri(&room), &request).await;
    assert_eq!(status, 200, "{body}");
    let events = body["events"].as_array().unwrap();
    let depths: Vec<u64> = events.iter().map(|p| p["depth"].as_u64().unwrap()).collect();
    assert!(depths.windows(2).all(|w| w[0] < w[1]), "oldest first: {depths:?}");
    assert_eq!(message_bodies(&body["events"]), [Some("after 0".to_owned()), Some("after 1".to_owned())]);
    assert!(events.iter().all(|e| e["content"]["body"] != "before 0"), "{body}");
    let bobs_join = events.iter().find(|e| e["type"] == "m.room.member" && e["state_key"] == bob.user_id.as_str());
    assert!(bobs_join.is_some(), "B's own join is visible to it: {body}");
    // min_depth: nothing shallower.
    let min_depth = depths[depths.len() - 1];
    let request = json!({"earliest_events": [], "latest_events": [latest], "limit": 50, "min_depth": min_depth});
    let (status, body) = post_as(&net, &a, &b, &missing_events_uri(&room), &request).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(message_bodies(&body["events"]), [Some("after 1".to_owned())], "{body}");
}

async fn backfill_and_missing_events_are_refused_outside_the_room_and_to_denied_servers(backend: Backend) {
    let net = TestNet::new().await;
    let (a, b) = two_servers(&net, backend).await;
    let (alice, _bob, room) = bob_joins_alices_room(&a, &b).await;
    let world_readable =
        json!({"type": "m.room.history_visibility", "content": {"history_visibility": "world_readable"}});
    // A world-readable room B is not in: history is walked for servers in the room only.
    let open = a.server.create_room(&alice, json!({"preset": "public_chat", "initial_state": [world_readable]})).await;
    let message = a.server.send_text(&alice, &open, "hello").await;
    let (status, body) = get_as(&net, &a, &b, &backfill_uri(&open, &[&message], 10)).await;
    assert_eq!((status, &body["errcode"]), (403, &json!("M_FORBIDDEN")), "{body}");
    let request = json!({"earliest_events": [], "latest_events": [message]});
    let (status, body) = post_as(&net, &a, &b, &missing_events_uri(&open), &request).await;
    assert_eq!((status, &body["errcode"]), (403, &json!("M_FORBIDDEN")), "{body}");

    let latest = a.server.send_text(&alice, &room, "in the room").await;
    let (status, body) = get_as(&net, &a, &b, &backfill_uri(&room, &[&latest], 10)).await;
    assert_eq!(status, 200, "{body}");
    // Unknown events and events of another room are no starting point.
    let unknown = "$unknownunknownunknownunknownunknownunknown";
    let (status, body) = get_as(&net, &a, &b, &backfill_uri(&room, &[unknown, &message], 10)).await;
    assert_eq!((status, body["pdus"].as_array().map(Vec::len)), (200, Some(0)), "{body}");
    // Bad input is a Matrix error.
    let uri = format!("/_matrix/federation/v1/backfill/{}?v={}", enc(&room), enc(&latest));
    let (status, body) = get_as(&net, &a, &b, &uri).await;
    assert_eq!((status, &body["errcode"]), (400, &json!("M_MISSING_PARAM")), "{body}");
    let (status, body) = post_as(&net, &a, &b, &missing_events_uri(&room), &json!({"latest_events": 5})).await;
    assert_eq!((status, &body["errcode"]), (400, &json!("M_BAD_JSON")), "{body}");
    let (status, body) = get_as(&net, &a, &b, &backfill_uri("!nosuchroom:a.test", &[&latest], 10)).await;
    assert_eq!((status, &body["errcode"]), (404, &json!("M_NOT_FOUND")), "{body}");

    // Denied by the ACL: refused although B is in the room.
    let acl = json!({"allow": ["*"], "deny": ["b.test"], "allow_ip_literals": false});
    let (status, body) = a.server.set_state(&alice, &room, "m.room.server_acl", "", acl).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = get_as(&net, &a, &b, &backfill_uri(&room, &[&latest], 10)).await;
    assert_eq!((status, &body["errcode"]), (403, &json!("M_FORBIDDEN")), "{body}");
    let request = json!({"earliest_events": [], "latest_events": [latest]});
    let (status, body) = post_as(&net, &a, &b, &missing_events_uri(&room), &request).await;
    assert_eq!((status, &body["errcode"]), (403, &json!("M_FORBIDDEN")), "{body}");
}

/// The messages of a backward `/messages` page of `room` from `from`, as bob of `server`.
async fn page_texts(server: &crate::harness::TestServer, token: &str, room: &str, from: &str) -> Vec<String> {
    let uri = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50&from={}", enc(room), enc(from));
    let (status, page) = server.get(&uri, Some(token)).await;
    assert_eq!(status, 200, "{page}");
    page["chunk"].as_array().unwrap().iter().filter_map(|e| e["content"]["body"].as_str().map(str::to_owned)).collect()
}

async fn a_gap_no_server_could_fill_is_tried_again_later_not_on_every_page(backend: Backend) {
    let net = TestNet::new().await;
    let (mut a, b) = two_servers(&net, backend).await;
    let alice = a.server.register("alice").await;
    let bob = b.server.register("bob").await;
    let room = a.server.create_room(&alice, json!({"preset": "public_chat"})).await;
    for n in 0..5 {
        a.server.send_text(&alice, &room, &format!("old {n}")).await;
    }
    let (status, body) = b
        .server
        .post(&format!("/_matrix/client/v3/join/{}?via=a.test", enc(&room)), Some(&bob.access_token), json!({}))
        .await;
    assert_eq!(status, 200, "remote join: {body}");
    let (sync, _) = b.server.sync_until(&bob, None, |sync| sync["rooms"]["join"][&room].is_object()).await;
    let prev_batch = sync["rooms"]["join"][&room]["timeline"]["prev_batch"].as_str().expect("prev_batch").to_owned();

    // The only server with the history is down: the page is what B holds, answered, not an error.
    a.server.stop();
    let failed_at = std::time::Instant::now();
    assert!(page_texts(&b.server, &bob.access_token, &room, &prev_batch).await.is_empty());
    // Back up at once: B does not ask again on the very next page (its fill failed a moment ago)…
    a.server.restart();
    if failed_at.elapsed() < std::time::Duration::from_secs(8) {
        assert!(
            page_texts(&b.server, &bob.access_token, &room, &prev_batch).await.is_empty(),
            "a gap whose fill just failed is not asked about again on the next page"
        );
    }
    // …but later it does, and the history arrives.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let texts = page_texts(&b.server, &bob.access_token, &room, &prev_batch).await;
        if texts.len() == 5 {
            assert_eq!(texts, ["old 4", "old 3", "old 2", "old 1", "old 0"]);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the history never arrived: {texts:?}");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}
