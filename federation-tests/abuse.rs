//! Peers that answer badly or push too hard: a server whose answers to our requests are garbage,
//! redirects (to a private address) or bodies without end; a peer flooding us with transactions
//! of events for rooms we are not in or with hundreds of auth events. Each is refused or bounded
//! with a clean error, nothing is stored, and other peers and the server's own users are served
//! as usual.

use std::time::{Duration, Instant};

use axum::{
    Router,
    extract::Path,
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::json;

use crate::{
    graph::two_servers,
    harness::{Backend, enc},
    hostile::{bob_joins_alices_room, forge, send_as, state_ids},
    membership::wait_for_message,
    testnet::{Discovered, TestNet, free_address, ip4},
};

crate::backend_tests!(
    answers_that_are_garbage_redirects_or_endless_are_refused_cleanly,
    a_transaction_flood_from_one_peer_does_not_hold_up_another,
);

/// What evil.test answers to `make_join`, by the room's localpart.
async fn bad_make_join(Path((room_id, _user)): Path<(String, String)>) -> Response {
    if room_id.starts_with("!garbage") {
        return ([("content-type", "application/json")], "{\"room_version\": 12, \"event\": [[[").into_response();
    }
    if room_id.starts_with("!redirect") {
        return (axum::http::StatusCode::FOUND, [("location", "http://127.0.0.1:1/_matrix/federation/v1/version")])
            .into_response();
    }
    if room_id.starts_with("!wrongshape") {
        return axum::Json(json!({"room_version": "12", "event": "not an event"})).into_response();
    }
    // A body that never ends, as fast as the connection takes it.
    let chunk = bytes::Bytes::from(vec![b' '; 64 * 1024]);
    let endless = futures_util::stream::repeat_with(move || Ok::<_, std::io::Error>(chunk.clone()));
    ([("content-type", "application/json")], axum::body::Body::from_stream(endless)).into_response()
}

async fn answers_that_are_garbage_redirects_or_endless_are_refused_cleanly(backend: Backend) {
    let net = TestNet::new().await;
    let a = net.peer(backend, "a.test", Discovered::Srv, "").await.expect("port 8450 free on some address");
    let evil = free_address(8448).expect("a free address for port 8448");
    net.dns.a("evil.test", ip4(evil));
    let app = Router::new()
        .route("/_matrix/federation/v1/make_join/{room_id}/{user_id}", get(bad_make_join))
        .route("/_matrix/key/v2/server", get(|| async { "garbage" }))
        .fallback(|| async { "{{{{" });
    net.serve_https("evil.test", evil, app).await;

    let alice = a.server.register("alice").await;
    for kind in ["garbage", "redirect", "wrongshape", "endless"] {
        let room = format!("!{kind}room:evil.test");
        let started = Instant::now();
        let (status, body) = a
            .server
            .post(
                &format!("/_matrix/client/v3/join/{}?server_name=evil.test", enc(&room)),
                Some(&alice.access_token),
                json!({}),
            )
            .await;
        let took = started.elapsed();
        let status = status.as_u16();
        assert!((400..600).contains(&status) && status != 500, "{kind}: a clean error, not {status}: {body}");
        assert!(body["errcode"].is_string(), "{kind}: a Matrix error: {body}");
        assert!(took < Duration::from_secs(70), "{kind}: bounded in time ({took:?})");
    }
    // Nothing of it stuck, and the server serves its users as before.
    let (status, joined) = a.server.get("/_matrix/client/v3/joined_rooms", Some(&alice.access_token)).await;
    assert_eq!((status.as_u16(), joined["joined_rooms"].as_array().map(Vec::len)), (200, Some(0)), "{joined}");
    let room = a.server.create_room(&alice, json!({})).await;
    a.server.send_text(&alice, &room, "still here").await;
}

async fn a_transaction_flood_from_one_peer_does_not_hold_up_another(backend: Backend) {
    let net = TestNet::new().await;
    let (a, b) = two_servers(&net, backend).await;
    let c = net.peer(backend, "c.test", Discovered::Srv, "").await.expect("port 8450 free on some address");
    let (alice, bob, room) = bob_joins_alices_room(&a, &b).await;
    let carol = c.server.register("carol").await;
    let (status, body) = c
        .server
        .post(&format!("/_matrix/client/v3/join/{}?via=a.test", enc(&room)), Some(&carol.access_token), json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    let state_before = state_ids(&a, &alice, &room).await;
    let id_of = |event_type: &str, state_key: &str| -> ruma::OwnedEventId {
        let (.., id) = state_before.iter().find(|(t, k, _)| t == event_type && k == state_key).unwrap();
        id.as_str().try_into().unwrap()
    };
    let latest: ruma::OwnedEventId = id_of("m.room.member", &carol.user_id);
    let key = b.signing_key();
    // Events of a room nobody here is in, and events citing hundreds of auth events.
    let elsewhere = "!elsewhere:b.test";
    let foreign: Vec<_> = (0..50)
        .map(|i| {
            forge(
                elsewhere,
                &bob.user_id,
                "b.test",
                &key,
                ("m.room.message", None),
                json!({"msgtype": "m.text", "body": format!("elsewhere {i}")}),
                (&latest, 10),
                &[],
            )
        })
        .collect();
    let many_auth: Vec<ruma::OwnedEventId> =
        (0..300).map(|i| format!("$fakeauth{i:035}").try_into().unwrap()).collect();
    // (Hearth would never build such an event: the list is put in after signing; the format
    // check comes before the signatures'.)
    let mut bloated = forge(
        &room,
        &bob.user_id,
        "b.test",
        &key,
        ("m.room.message", None),
        json!({"msgtype": "m.text", "body": "hundreds of auth events"}),
        (&latest, 10),
        &[id_of("m.room.power_levels", "")],
    );
    bloated["auth_events"] = json!(many_auth);
    let answer = send_as(&net, &a, &b, "bloated", vec![bloated]).await;
    assert!(
        answer.as_object().is_none_or(|results| results.values().all(|r| r.get("error").is_some())),
        "refused: {answer}"
    );

    // B floods A with 200 transactions at once (up to 50 PDUs each) while Carol on C talks.
    let flood: Vec<_> = (0..200)
        .map(|i| {
            let (net, a, b, pdus) = (&net, &a, &b, foreign.clone());
            async move {
                let txn = json!({"origin": b.name, "origin_server_ts": 1, "pdus": pdus});
                let (client, base) = net.client_for(a);
                let uri = format!("/_matrix/federation/v1/send/flood{i}");
                let auth = crate::testnet::x_matrix(&b.signing_key(), &b.name, &a.name, "PUT", &uri, Some(&txn));
                let response = client.put(format!("{base}{uri}")).header("Authorization", auth).json(&txn).send().await;
                response.map(|r| r.status().as_u16()).unwrap_or(0)
            }
        })
        .collect();
    let started = Instant::now();
    let carol_talks = async {
        c.server.send_text(&carol, &room, "through the flood").await;
        wait_for_message(&a.server, &alice, &room, "through the flood").await;
        started.elapsed()
    };
    let (statuses, carol_took) = tokio::join!(futures_util::future::join_all(flood), carol_talks);
    assert!(
        statuses.iter().all(|s| matches!(*s, 0 | 200 | 429 | 503)),
        "each flood request was served or shed, never a 500: {statuses:?}"
    );
    assert!(carol_took < Duration::from_secs(30), "C's message was not held up by B's flood ({carol_took:?})");
    // Nothing of the flood reached the room.
    assert_eq!(state_ids(&a, &alice, &room).await, state_before);
    let (status, body) = a
        .server
        .get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=100", enc(&room)), Some(&alice.access_token))
        .await;
    assert_eq!(status, 200);
    let bodies: Vec<&str> =
        body["chunk"].as_array().unwrap().iter().filter_map(|e| e["content"]["body"].as_str()).collect();
    assert!(!bodies.iter().any(|b| b.starts_with("elsewhere") || *b == "hundreds of auth events"), "{bodies:?}");
}
