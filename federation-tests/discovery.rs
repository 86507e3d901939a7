//! Discovery between Hearth servers: one found by plain port 8448, one by SRV, one by
//! `.well-known` delegation, each talking to the others both ways (the profile and directory
//! queries are signed, so the receiver also discovers the sender to fetch its key).

use std::net::SocketAddr;

use serde_json::json;

use crate::{
    harness::{Backend, assert_error, enc},
    testnet::{Discovered, TestNet, free_address, ip4, skipped},
};

crate::backend_tests!(
    peers_are_found_by_port_8448_srv_and_well_known_both_ways,
    peers_named_with_a_port_or_by_ip_literal_are_reached_directly,
    a_deprecated_matrix_srv_record_is_followed,
    well_known_redirects_are_followed_but_loops_and_oversized_bodies_are_not,
    private_destinations_are_refused_unless_allowed,
);

async fn peers_are_found_by_port_8448_srv_and_well_known_both_ways(backend: Backend) {
    let net = TestNet::new().await;
    let Some(plain) = net.peer(backend, "plain.test", Discovered::Port8448, "").await else {
        return skipped("port 8448");
    };
    let srv = net.peer(backend, "srv.test", Discovered::Srv, "").await.unwrap();
    let Some(delegated) = net.peer(backend, "wk.test", Discovered::WellKnown, "").await else {
        return skipped("port 443 for .well-known");
    };
    let alice = plain.server.register("alice").await;
    let bob = srv.server.register("bob").await;
    let carol = delegated.server.register("carol").await;
    for (peer, account, name) in [(&plain, &alice, "Alice"), (&srv, &bob, "Bob"), (&delegated, &carol, "Carol")] {
        let path = format!("/_matrix/client/v3/profile/{}/displayname", enc(&account.user_id));
        let (status, body) = peer.server.put(&path, Some(&account.access_token), json!({"displayname": name})).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, _) = plain
        .server
        .put(
            &format!("/_matrix/client/v3/profile/{}/avatar_url", enc(&alice.user_id)),
            Some(&alice.access_token),
            json!({"avatar_url": "mxc://plain.test/alice"}),
        )
        .await;
    assert_eq!(status, 200);

    // plain → srv (SRV), srv → wk (.well-known), wk → plain (8448); each receiver fetches the
    // sender's key through the sender's own discovery method.
    let (status, body) = plain.server.get(&format!("/_matrix/client/v3/profile/{}", enc(&bob.user_id)), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["displayname"], "Bob");
    let (status, body) =
        srv.server.get(&format!("/_matrix/client/v3/profile/{}/displayname", enc(&carol.user_id)), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["displayname"], "Carol");
    let (status, body) =
        delegated.server.get(&format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id)), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"displayname": "Alice", "avatar_url": "mxc://plain.test/alice"}));
    let (status, body) =
        delegated.server.get(&format!("/_matrix/client/v3/profile/{}/avatar_url", enc(&alice.user_id)), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"avatar_url": "mxc://plain.test/alice"}));

    // The Host header of each step of the spec: the server name for plain 8448, the name without
    // port for SRV, the delegated name with its port for `.well-known` with an explicit port.
    for (peer, host) in [(&srv, "srv.test"), (&delegated, "fed.wk.test:8449"), (&plain, "plain.test")] {
        let wanted = format!("\"host\":\"{host}\"");
        let what = format!("{} saw a request with Host {host}", peer.name);
        crate::testnet::log_line(&peer.server, &what, |line| {
            line.contains("verified a federation request") && line.contains(&wanted)
        })
        .await;
    }

    // The client listener serves the delegation too, where one is configured.
    let (status, body) = delegated.server.get("/.well-known/matrix/server", None).await;
    assert_eq!((status.as_u16(), body), (200, json!({"m.server": "fed.wk.test:8449"})));
    assert_error(&plain.server.get("/.well-known/matrix/server", None).await, 404, "M_NOT_FOUND");

    // And the other way round.
    let (status, body) = srv.server.get(&format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id)), None).await;
    assert_eq!((status.as_u16(), &body["displayname"]), (200, &json!("Alice")), "{body}");
    let (status, body) = delegated.server.get(&format!("/_matrix/client/v3/profile/{}", enc(&bob.user_id)), None).await;
    assert_eq!((status.as_u16(), &body["displayname"]), (200, &json!("Bob")), "{body}");
    let (status, body) = plain.server.get(&format!("/_matrix/client/v3/profile/{}", enc(&carol.user_id)), None).await;
    assert_eq!((status.as_u16(), &body["displayname"]), (200, &json!("Carol")), "{body}");

    // A user the other server does not have is not found, as for a local one.
    let missing = plain.server.get("/_matrix/client/v3/profile/@nobody:srv.test", None).await;
    assert_error(&missing, 404, "M_NOT_FOUND");

    // Another server's room alias is asked of that server (query/directory).
    let room = srv.server.create_room(&bob, json!({"room_alias_name": "lounge"})).await;
    let (status, body) = plain.server.get("/_matrix/client/v3/directory/room/%23lounge%3Asrv.test", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"room_id": room, "servers": ["srv.test"]}));
    let (status, body) = delegated.server.get("/_matrix/client/v3/directory/room/%23lounge%3Asrv.test", None).await;
    assert_eq!((status.as_u16(), &body["room_id"]), (200, &json!(room)), "{body}");
    let missing = plain.server.get("/_matrix/client/v3/directory/room/%23nowhere%3Asrv.test", None).await;
    assert_error(&missing, 404, "M_NOT_FOUND");
}

async fn peers_named_with_a_port_or_by_ip_literal_are_reached_directly(backend: Backend) {
    let net = TestNet::new().await;
    let explicit = net.peer(backend, "explicit.test", Discovered::ExplicitPort, "").await.unwrap();
    let literal = net.peer(backend, "", Discovered::IpLiteral, "").await.unwrap();
    assert_eq!(explicit.name, "explicit.test:8452");
    let frank = explicit.server.register("frank").await;
    let grace = literal.server.register("grace").await;
    assert!(grace.user_id.ends_with(&format!(":{}", literal.name)), "{}", grace.user_id);
    for (peer, account, name) in [(&explicit, &frank, "Frank"), (&literal, &grace, "Grace")] {
        let path = format!("/_matrix/client/v3/profile/{}/displayname", enc(&account.user_id));
        let (status, body) = peer.server.put(&path, Some(&account.access_token), json!({"displayname": name})).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) =
        explicit.server.get(&format!("/_matrix/client/v3/profile/{}", enc(&grace.user_id)), None).await;
    assert_eq!((status.as_u16(), &body["displayname"]), (200, &json!("Grace")), "{body}");
    let (status, body) = literal.server.get(&format!("/_matrix/client/v3/profile/{}", enc(&frank.user_id)), None).await;
    assert_eq!((status.as_u16(), &body["displayname"]), (200, &json!("Frank")), "{body}");
    // The Host header is the server name with its port in both steps.
    for peer in [&explicit, &literal] {
        let wanted = format!("\"host\":\"{}\"", peer.name);
        let what = format!("{} saw a request with Host {}", peer.name, peer.name);
        crate::testnet::log_line(&peer.server, &what, |line| {
            line.contains("verified a federation request") && line.contains(&wanted)
        })
        .await;
    }
}

async fn a_deprecated_matrix_srv_record_is_followed(backend: Backend) {
    let net = TestNet::new().await;
    let Some(plain) = net.peer(backend, "plain.test", Discovered::Port8448, "").await else {
        return skipped("port 8448");
    };
    let legacy = net.peer(backend, "legacy.test", Discovered::LegacySrv, "").await.unwrap();
    let dave = legacy.server.register("dave").await;
    let path = format!("/_matrix/client/v3/profile/{}/displayname", enc(&dave.user_id));
    let (status, _) = legacy.server.put(&path, Some(&dave.access_token), json!({"displayname": "Dave"})).await;
    assert_eq!(status, 200);
    let (status, body) = plain.server.get(&path, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["displayname"], "Dave");
}

async fn private_destinations_are_refused_unless_allowed(backend: Backend) {
    let net = TestNet::new().await;
    let Some(plain) = net.peer(backend, "plain.test", Discovered::Port8448, "").await else {
        return skipped("port 8448");
    };
    let bob = plain.server.register("bob").await;
    // The same network, but this server keeps the default: loopback is off limits.
    let cautious =
        net.peer(backend, "cautious.test", Discovered::Srv, "allow_private_destinations = false").await.unwrap();

    let refused = cautious.server.get(&format!("/_matrix/client/v3/profile/{}", enc(&bob.user_id)), None).await;
    assert_error(&refused, 502, "M_UNKNOWN");
    crate::testnet::log_line(&cautious.server, "the refusal is logged", |line| {
        line.contains("private or reserved addresses")
    })
    .await;
    assert!(
        cautious.server.log_lines().iter().any(|line| line.contains("private or reserved addresses")),
        "the refusal names its reason in the log"
    );
    assert!(
        !plain.server.log_lines().iter().any(|line| line.contains("/_matrix/federation/v1/query/profile")),
        "no request reached the private address"
    );
}

async fn well_known_redirects_are_followed_but_loops_and_oversized_bodies_are_not(backend: Backend) {
    use axum::{http::header, response::IntoResponse, routing::get};

    let net = TestNet::new().await;
    let Some(asker) = net.peer(backend, "asker.test", Discovered::Port8448, "").await else {
        return skipped("port 8448");
    };
    // moved.test's .well-known redirects (twice) to the real answer.
    let moved = net.peer_behind_delegation(backend, "moved.test").await.unwrap();
    let Some(web) = free_address(443) else { return skipped("port 443") };
    net.dns.a("moved.test", ip4(web));
    let redirects = axum::Router::new()
        .route(
            "/.well-known/matrix/server",
            get(|| async {
                ([(header::LOCATION, "https://moved.test/step")], http::StatusCode::FOUND).into_response()
            }),
        )
        .route("/step", get(|| async { ([(header::LOCATION, "/final")], http::StatusCode::MOVED_PERMANENTLY) }))
        .route("/final", get(|| async { axum::Json(json!({"m.server": "fed.moved.test:8449"})) }));
    net.serve_https("moved.test", web, redirects).await;

    // looping.test redirects to itself; big.test answers with more than 64 KiB naming a server
    // that does not exist. Both must count as "no .well-known": discovery goes on to port 8448,
    // where each really is.
    let Some(looping) = net.peer(backend, "looping.test", Discovered::Port8448, "").await else {
        return skipped("port 8448");
    };
    let loops = axum::Router::new().route(
        "/.well-known/matrix/server",
        get(|| async {
            ([(header::LOCATION, "https://looping.test/.well-known/matrix/server")], http::StatusCode::FOUND)
        }),
    );
    net.serve_https("looping.test", SocketAddr::new(looping.federation[0].ip(), 443), loops).await;
    let Some(big) = net.peer(backend, "big.test", Discovered::Port8448, "").await else {
        return skipped("port 8448");
    };
    let oversized = axum::Router::new().route(
        "/.well-known/matrix/server",
        get(|| async { axum::Json(json!({"m.server": "nowhere.test:1", "padding": "x".repeat(70 * 1024)})) }),
    );
    net.serve_https("big.test", SocketAddr::new(big.federation[0].ip(), 443), oversized).await;

    for peer in [&moved, &looping, &big] {
        let user = peer.server.register("someone").await;
        let (status, body) =
            asker.server.get(&format!("/_matrix/client/v3/profile/{}", enc(&user.user_id)), None).await;
        assert_eq!(status, 200, "{}: {body}", peer.name);
    }
}
