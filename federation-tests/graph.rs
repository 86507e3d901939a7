//! Serving the room graph (`/event`, `/state`, `/state_ids`, `/event_auth`): only to a server
//! that may see the event (a member in the room at it, or `world_readable` history) and that the
//! room's server ACL allows; unknown events are 404. The requests are signed as server B by the
//! test itself, with B's key, and B is a running Hearth, so A fetches that key from it.

use serde_json::{Value, json};

use crate::{
    harness::{Backend, enc},
    testnet::{Discovered, Peer, TestNet, json as body_of, x_matrix},
};

crate::backend_tests!(
    graph_is_refused_to_servers_without_a_member_in_the_room,
    graph_of_a_world_readable_room_is_served_with_the_state_before_the_event,
    server_acl_denies_the_graph_to_a_denied_server,
);

/// A GET signed by `signer` as `origin`, sent to `to`.
pub async fn get_as(net: &TestNet, to: &Peer, signer: &Peer, uri: &str) -> (u16, Value) {
    let (client, base) = net.client_for(to);
    let authorization = x_matrix(&signer.signing_key(), &signer.name, &to.name, "GET", uri, None);
    body_of(client.get(format!("{base}{uri}")).header("authorization", authorization).send().await.unwrap()).await
}

pub async fn two_servers(net: &TestNet, backend: Backend) -> (Peer, Peer) {
    let a = net.peer(backend, "a.test", Discovered::Srv, "").await.expect("port 8450 free on some address");
    let b = net.peer(backend, "b.test", Discovered::Srv, "").await.expect("port 8450 free on some address");
    (a, b)
}

fn graph_uris(room_id: &str, event_id: &str) -> [String; 4] {
    let (room, event) = (enc(room_id), enc(event_id));
    [
        format!("/_matrix/federation/v1/event/{event}"),
        format!("/_matrix/federation/v1/state/{room}?event_id={event}"),
        format!("/_matrix/federation/v1/state_ids/{room}?event_id={event}"),
        format!("/_matrix/federation/v1/event_auth/{room}/{event}"),
    ]
}

async fn graph_is_refused_to_servers_without_a_member_in_the_room(backend: Backend) {
    let net = TestNet::new().await;
    let (a, b) = two_servers(&net, backend).await;
    let alice = a.server.register("alice").await;
    let room_id = a.server.create_room(&alice, json!({"preset": "private_chat"})).await;
    let event_id = a.server.send_text(&alice, &room_id, "secret").await;

    for uri in graph_uris(&room_id, &event_id) {
        let (status, body) = get_as(&net, &a, &b, &uri).await;
        assert_eq!((status, &body["errcode"]), (403, &json!("M_FORBIDDEN")), "{uri}: {body}");
    }
    let unknown = "$unknownunknownunknownunknownunknownunknown";
    for uri in graph_uris(&room_id, unknown) {
        let (status, body) = get_as(&net, &a, &b, &uri).await;
        assert_eq!((status, &body["errcode"]), (404, &json!("M_NOT_FOUND")), "{uri}: {body}");
    }
    // An event asked for under another room is unknown there.
    let other_room = a.server.create_room(&alice, json!({"preset": "public_chat"})).await;
    let uri = format!("/_matrix/federation/v1/state_ids/{}?event_id={}", enc(&other_room), enc(&event_id));
    let (status, body) = get_as(&net, &a, &b, &uri).await;
    assert_eq!(status, 404, "{body}");

    // Bad input gets a Matrix error, never a 500.
    let uri = format!("/_matrix/federation/v1/state_ids/{}", enc(&room_id));
    let (status, body) = get_as(&net, &a, &b, &uri).await;
    assert_eq!((status, &body["errcode"]), (400, &json!("M_MISSING_PARAM")), "{body}");
    let (status, body) = get_as(&net, &a, &b, "/_matrix/federation/v1/event/not-an-event-id").await;
    assert_eq!(status, 400, "{body}");
}

async fn graph_of_a_world_readable_room_is_served_with_the_state_before_the_event(backend: Backend) {
    let net = TestNet::new().await;
    let (a, b) = two_servers(&net, backend).await;
    let alice = a.server.register("alice").await;
    let visibility = json!({"type": "m.room.history_visibility", "content": {"history_visibility": "world_readable"}});
    let room_id = a
        .server
        .create_room(&alice, json!({"preset": "public_chat", "name": "Open", "initial_state": [visibility]}))
        .await;
    let topic_id =
        a.server.set_state(&alice, &room_id, "m.room.topic", "", json!({"topic": "one"})).await.1["event_id"]
            .as_str()
            .unwrap()
            .to_owned();
    let message_id = a.server.send_text(&alice, &room_id, "hello").await;

    let [event_uri, state_uri, state_ids_uri, auth_uri] = graph_uris(&room_id, &message_id);
    let (status, body) = get_as(&net, &a, &b, &event_uri).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["origin"], "a.test");
    assert_eq!(body["pdus"].as_array().map(Vec::len), Some(1), "{body}");
    let pdu = &body["pdus"][0];
    assert_eq!((&pdu["content"]["body"], &pdu["room_id"]), (&json!("hello"), &json!(room_id)), "{pdu}");
    assert!(pdu["signatures"]["a.test"].is_object(), "the PDU is served signed: {pdu}");
    assert!(pdu.get("event_id").is_none(), "room versions 3+ carry no event_id: {pdu}");

    let (status, ids) = get_as(&net, &a, &b, &state_ids_uri).await;
    assert_eq!(status, 200, "{ids}");
    let pdu_ids: Vec<&str> = ids["pdu_ids"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(pdu_ids.contains(&topic_id.as_str()), "the state before the message has the topic: {ids}");
    assert!(!pdu_ids.contains(&message_id.as_str()), "a message is not state: {ids}");
    assert!(!ids["auth_chain_ids"].as_array().unwrap().is_empty(), "{ids}");

    let (status, state) = get_as(&net, &a, &b, &state_uri).await;
    assert_eq!(status, 200, "{state}");
    let types: Vec<&str> = state["pdus"].as_array().unwrap().iter().filter_map(|p| p["type"].as_str()).collect();
    for wanted in ["m.room.create", "m.room.member", "m.room.power_levels", "m.room.join_rules", "m.room.topic"] {
        assert!(types.contains(&wanted), "{wanted} in the state: {types:?}");
    }
    assert_eq!(state["pdus"].as_array().unwrap().len(), pdu_ids.len());
    assert_eq!(state["auth_chain"].as_array().unwrap().len(), ids["auth_chain_ids"].as_array().unwrap().len());

    // The state before the topic change does not have it (state *before* the event).
    let [_, _, topic_state_ids, _] = graph_uris(&room_id, &topic_id);
    let (status, before) = get_as(&net, &a, &b, &topic_state_ids).await;
    assert_eq!(status, 200, "{before}");
    assert!(!before["pdu_ids"].as_array().unwrap().contains(&json!(topic_id)), "{before}");

    let (status, auth) = get_as(&net, &a, &b, &auth_uri).await;
    assert_eq!(status, 200, "{auth}");
    let auth_types: Vec<&str> =
        auth["auth_chain"].as_array().unwrap().iter().filter_map(|p| p["type"].as_str()).collect();
    for wanted in ["m.room.create", "m.room.member", "m.room.power_levels"] {
        assert!(auth_types.contains(&wanted), "{wanted} in the auth chain: {auth_types:?}");
    }
    assert!(!auth_types.contains(&"m.room.topic"), "a topic authorises nothing: {auth_types:?}");
}

async fn server_acl_denies_the_graph_to_a_denied_server(backend: Backend) {
    let net = TestNet::new().await;
    let (a, b) = two_servers(&net, backend).await;
    let alice = a.server.register("alice").await;
    let visibility = json!({"type": "m.room.history_visibility", "content": {"history_visibility": "world_readable"}});
    let room_id = a.server.create_room(&alice, json!({"preset": "public_chat", "initial_state": [visibility]})).await;
    let event_id = a.server.send_text(&alice, &room_id, "before the ACL").await;
    let [event_uri, ..] = graph_uris(&room_id, &event_id);
    let (status, body) = get_as(&net, &a, &b, &event_uri).await;
    assert_eq!(status, 200, "served before the ACL: {body}");

    let acl = json!({"allow": ["*"], "deny": ["b.test"], "allow_ip_literals": false});
    let (status, body) = a.server.set_state(&alice, &room_id, "m.room.server_acl", "", acl).await;
    assert_eq!(status, 200, "{body}");
    for uri in graph_uris(&room_id, &event_id) {
        let (status, body) = get_as(&net, &a, &b, &uri).await;
        assert_eq!((status, &body["errcode"]), (403, &json!("M_FORBIDDEN")), "{uri}: {body}");
    }

    // An ACL that allows B again lets it back in.
    let acl = json!({"allow": ["*.test"], "deny": ["evil.test"]});
    let (status, body) = a.server.set_state(&alice, &room_id, "m.room.server_acl", "", acl).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = get_as(&net, &a, &b, &event_uri).await;
    assert_eq!(status, 200, "{body}");
}
