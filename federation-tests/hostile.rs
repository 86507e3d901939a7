//! A hostile peer: the test itself speaks for b.test (a running Hearth whose user joined a room on
//! a.test), signing requests and events with B's own key, and sends A events no honest server
//! would: a forged signature, a wrong content hash, an event above its sender's power level, an
//! oversized event, and events claiming a sender of another server. Each gets an answer in the
//! `/send` `pdus` map, none changes the room's state or reaches a client's timeline with its
//! content, and the room keeps working for both servers afterwards.

use serde_json::{Value, json};

use crate::{
    graph::{get_as, two_servers},
    harness::{Account, Backend, enc, timeline},
    membership::{event_ids, wait_for_message},
    testnet::{Peer, TestNet, json as body_of, x_matrix},
};

crate::backend_tests!(hostile_peers_events_are_refused_and_the_room_keeps_working);

/// Alice on A creates a public room; Bob on B joins it through A.
pub(crate) async fn bob_joins_alices_room(a: &Peer, b: &Peer) -> (Account, Account, String) {
    let alice = a.server.register("alice").await;
    let bob = b.server.register("bob").await;
    let room = a.server.create_room(&alice, json!({"preset": "public_chat"})).await;
    let (status, body) = b
        .server
        .post(&format!("/_matrix/client/v3/join/{}?via=a.test", enc(&room)), Some(&bob.access_token), json!({}))
        .await;
    assert_eq!(status, 200, "remote join: {body}");
    (alice, bob, room)
}

/// The room's current state on a server as sorted `(type, state_key, event_id)` triples.
pub(crate) async fn state_ids(peer: &Peer, account: &Account, room: &str) -> Vec<(String, String, String)> {
    let (status, body) =
        peer.server.get(&format!("/_matrix/client/v3/rooms/{}/state", enc(room)), Some(&account.access_token)).await;
    assert_eq!(status, 200, "{body}");
    let mut ids: Vec<(String, String, String)> = body
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let field = |name: &str| e[name].as_str().unwrap_or_default().to_owned();
            (field("type"), field("state_key"), field("event_id"))
        })
        .collect();
    ids.sort();
    ids
}

fn event_id_of(state: &[(String, String, String)], event_type: &str, state_key: &str) -> ruma::OwnedEventId {
    let (.., id) = state.iter().find(|(t, k, _)| t == event_type && k == state_key).expect("in the state");
    id.as_str().try_into().unwrap()
}

/// A PDU of `room` from `sender`, signed by `server` with `key`, citing `prev` (an event ID and
/// its depth) and `auth_events`.
#[allow(clippy::too_many_arguments)] // The parts of an event, spelled out by each test.
pub(crate) fn forge(
    room: &str,
    sender: &str,
    server: &str,
    key: &hearth::matrix::keys::SigningKey,
    (event_type, state_key): (&str, Option<&str>),
    content: Value,
    (prev, prev_depth): (&ruma::OwnedEventId, u64),
    auth_events: &[ruma::OwnedEventId],
) -> Value {
    let rules = ruma::RoomVersionId::V12.rules().unwrap();
    let template = hearth::matrix::pdu::EventTemplate {
        event_type: event_type.to_owned(),
        state_key: state_key.map(str::to_owned),
        content: hearth::matrix::pdu::canonical_content(content).unwrap(),
        redacts: None,
    };
    let room_id: ruma::OwnedRoomId = room.try_into().unwrap();
    let sender: ruma::OwnedUserId = sender.try_into().unwrap();
    let placement = hearth::matrix::pdu::Placement {
        room_id: Some(&room_id),
        sender: &sender,
        prev_events: std::slice::from_ref(prev),
        auth_events,
        depth: prev_depth + 1,
        origin_server_ts: ruma::MilliSecondsSinceUnixEpoch::now(),
    };
    let server: &ruma::ServerName = server.try_into().unwrap();
    let pdu = hearth::matrix::pdu::Pdu::build(template, &placement, &rules, server, key).unwrap();
    serde_json::from_str(&pdu.json).unwrap()
}

/// The event ID of a PDU as the receiver computes it (the reference hash of its redacted form).
pub(crate) fn id_of(pdu: &Value) -> String {
    let object: ruma::CanonicalJsonObject = serde_json::from_value(pdu.clone()).unwrap();
    let rules = ruma::RoomVersionId::V12.rules().unwrap();
    hearth::matrix::pdu::Pdu::from_received(&object, &rules).unwrap().event_id.to_string()
}

/// A key with the same key ID as `key` but another secret: what a forger would sign with.
fn impostor_of(key: &hearth::matrix::keys::SigningKey) -> hearth::matrix::keys::SigningKey {
    let fresh = hearth::matrix::keys::SigningKey::generate_file();
    let secret = fresh.split_whitespace().nth(2).unwrap();
    let version = key.key_id().trim_start_matches("ed25519:").to_owned();
    hearth::matrix::keys::SigningKey::from_file(&format!("ed25519 {version} {secret}")).unwrap()
}

/// Sends `pdus` to `to` in one transaction signed as `from`; the `pdus` map of the answer.
pub(crate) async fn send_as(net: &TestNet, to: &Peer, from: &Peer, txn_id: &str, pdus: Vec<Value>) -> Value {
    let txn = json!({"origin": from.name, "origin_server_ts": 1, "pdus": pdus});
    let (client, base) = net.client_for(to);
    let uri = format!("/_matrix/federation/v1/send/{txn_id}");
    let auth = x_matrix(&from.signing_key(), &from.name, &to.name, "PUT", &uri, Some(&txn));
    let response = client.put(format!("{base}{uri}")).header("Authorization", auth).json(&txn).send().await.unwrap();
    let (status, body) = body_of(response).await;
    assert_eq!(status, 200, "{body}");
    body["pdus"].clone()
}

async fn hostile_peers_events_are_refused_and_the_room_keeps_working(backend: Backend) {
    let net = TestNet::new().await;
    let (a, b) = two_servers(&net, backend).await;
    let (alice, bob, room) = bob_joins_alices_room(&a, &b).await;
    let keep = a.server.send_text(&alice, &room, "keep me").await;
    let state_before = state_ids(&a, &alice, &room).await;
    let latest_id: ruma::OwnedEventId = event_ids(&a.server, &alice, &room).await.pop().unwrap().try_into().unwrap();
    let latest = (&latest_id, a.server.stored_pdu(latest_id.as_str()).await["depth"].as_u64().unwrap());
    let power_levels = event_id_of(&state_before, "m.room.power_levels", "");
    let bob_member = event_id_of(&state_before, "m.room.member", &bob.user_id);
    let auth = [power_levels.clone(), bob_member.clone()];
    let key = b.signing_key();
    let message = |body: &str| json!({"msgtype": "m.text", "body": body});

    let forged = forge(
        &room,
        &bob.user_id,
        "b.test",
        &impostor_of(&key),
        ("m.room.message", None),
        message("forged"),
        latest,
        &auth,
    );
    // Altered after signing: the event ID (of the redacted form) and signature still hold, the
    // content hash does not.
    let mut altered =
        forge(&room, &bob.user_id, "b.test", &key, ("m.room.message", None), message("original"), latest, &auth);
    altered["content"]["body"] = json!("altered");
    // Bob has power level 0 and makes himself an admin.
    let mut levels = a.server.stored_pdu(power_levels.as_str()).await["content"].clone();
    levels["users"][&bob.user_id] = json!(100);
    let usurping = forge(&room, &bob.user_id, "b.test", &key, ("m.room.power_levels", Some("")), levels, latest, &auth);
    let mut oversized =
        forge(&room, &bob.user_id, "b.test", &key, ("m.room.message", None), message("big"), latest, &auth);
    oversized["content"]["body"] = json!("x".repeat(70_000));
    // B signs for a sender of A, and for one of a server that does not exist.
    let as_alice = forge(
        &room,
        &alice.user_id,
        "b.test",
        &key,
        ("m.room.message", None),
        message("as alice"),
        latest,
        &[power_levels.clone(), event_id_of(&state_before, "m.room.member", &alice.user_id)],
    );
    let as_mallory =
        forge(&room, "@mallory:c.test", "b.test", &key, ("m.room.message", None), message("as mallory"), latest, &auth);
    // Redactions pass the auth rules (room versions 3+), but one by a server that did not send
    // the target, below the redact level, is never applied.
    let redaction =
        forge(&room, &bob.user_id, "b.test", &key, ("m.room.redaction", None), json!({"redacts": keep}), latest, &auth);
    // More prev events than the format allows (20).
    let mut many_prevs =
        forge(&room, &bob.user_id, "b.test", &key, ("m.room.message", None), message("many"), latest, &auth);
    many_prevs["prev_events"] = json!(vec![latest_id.as_str(); 21]);

    let hostile = [&forged, &altered, &usurping, &oversized, &as_alice, &as_mallory, &redaction, &many_prevs];
    let ids: Vec<String> = hostile.iter().map(|pdu| id_of(pdu)).collect();
    let answer = send_as(&net, &a, &b, "hostile-1", hostile.iter().map(|pdu| (*pdu).clone()).collect()).await;
    let error_of = |i: usize| answer[&ids[i]]["error"].as_str().unwrap_or_default().to_owned();
    assert!(error_of(0).contains("signature"), "forged signature: {answer}");
    assert_eq!(answer[&ids[1]], json!({}), "a wrong content hash keeps the redacted form: {answer}");
    assert!(error_of(2).starts_with("rejected"), "above its power level: {answer}");
    assert!(error_of(3).contains("larger than"), "oversized: {answer}");
    assert!(!error_of(4).is_empty(), "a sender of another server: {answer}");
    assert!(!error_of(5).is_empty(), "a sender of an unknown server: {answer}");
    assert_eq!(answer[&ids[6]], json!({}), "a redaction is allowed by the auth rules: {answer}");
    assert!(error_of(7).starts_with("dropped"), "21 prev events: {answer}");
    let (status, kept) = a
        .server
        .get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(&keep)), Some(&alice.access_token))
        .await;
    assert_eq!((status.as_u16(), &kept["content"]["body"]), (200, &json!("keep me")), "not redacted by Bob: {kept}");

    // Nothing reached the room's state; the forged, oversized and foreign events are unknown.
    assert_eq!(state_ids(&a, &alice, &room).await, state_before);
    for i in [0, 3, 4, 5, 7] {
        let (status, body) = get_as(&net, &a, &b, &format!("/_matrix/federation/v1/event/{}", enc(&ids[i]))).await;
        assert_eq!(status, 404, "event {i} is not served: {body}");
    }
    // The altered message is served in its redacted form only.
    let (status, event) = a
        .server
        .get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(&ids[1])), Some(&alice.access_token))
        .await;
    assert_eq!(status, 200, "{event}");
    assert_eq!(event["content"], json!({}), "{event}");
    // A rejected event stays rejected when sent again, and is not served either.
    let again = send_as(&net, &a, &b, "hostile-2", vec![usurping.clone()]).await;
    assert!(again[&ids[2]]["error"].as_str().unwrap_or_default().starts_with("rejected"), "{again}");
    let (status, _) = get_as(&net, &a, &b, &format!("/_matrix/federation/v1/event/{}", enc(&ids[2]))).await;
    assert_eq!(status, 404);

    // A message citing the rejected event as its prev event: the rejected event changed
    // nothing, so the message sits on the state before it, and is allowed there.
    let usurping_id: ruma::OwnedEventId = ids[2].as_str().try_into().unwrap();
    let usurping_depth = usurping["depth"].as_u64().unwrap();
    let on_rejected = forge(
        &room,
        &bob.user_id,
        "b.test",
        &key,
        ("m.room.message", None),
        message("on a rejected event"),
        (&usurping_id, usurping_depth),
        &auth,
    );
    let on_rejected_id = id_of(&on_rejected);
    let answer = send_as(&net, &a, &b, "hostile-3", vec![on_rejected.clone()]).await;
    assert_eq!(answer[&on_rejected_id], json!({}), "{answer}");
    assert_eq!(state_ids(&a, &alice, &room).await, state_before);

    // A hostile server sends its events to every server of the room: B gets them too (here
    // forwarded as from A), so A's next event, which cites them, is complete there. Without
    // them, B would need to fetch them (`get_missing_events`, issue 9).
    let to_b =
        send_as(&net, &b, &a, "forwarded-1", vec![altered.clone(), usurping.clone(), on_rejected, redaction.clone()])
            .await;
    assert_eq!(to_b[&ids[1]], json!({}), "{to_b}");
    assert!(to_b[&ids[2]]["error"].as_str().unwrap_or_default().starts_with("rejected"), "{to_b}");
    assert_eq!(to_b[&on_rejected_id], json!({}), "{to_b}");
    assert_eq!(to_b[&ids[6]], json!({}), "{to_b}");
    let (status, kept) = b
        .server
        .get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(&keep)), Some(&bob.access_token))
        .await;
    assert_eq!((status.as_u16(), &kept["content"]["body"]), (200, &json!("keep me")), "not redacted on B: {kept}");

    // The room keeps working both ways, and no hostile content reached Alice's sync.
    a.server.send_text(&alice, &room, "still here").await;
    wait_for_message(&b.server, &bob, &room, "still here").await;
    b.server.send_text(&bob, &room, "me too").await;
    wait_for_message(&a.server, &alice, &room, "me too").await;
    let sync = a.server.sync(&alice, None, Some(r#"{"room":{"timeline":{"limit":50}}}"#), 0).await;
    let bodies: Vec<&Value> = timeline(&sync, &room).iter().map(|e| &e["content"]["body"]).collect();
    assert!(bodies.contains(&&json!("on a rejected event")), "{bodies:?}");
    for hostile_body in ["forged", "altered", "original", "as alice", "as mallory"] {
        assert!(!bodies.contains(&&json!(hostile_body)), "{hostile_body} in {bodies:?}");
    }
    assert!(!bodies.iter().any(|body| body.as_str().is_some_and(|b| b.len() > 1000)), "the oversized event");
    let levels = a
        .server
        .get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.power_levels", enc(&room)), Some(&alice.access_token))
        .await
        .1;
    assert!(levels["users"][&bob.user_id].is_null(), "{levels}");
}
