//! Inbound request authentication: only a valid X-Matrix signature of the origin, addressed to
//! us, gets an answer; anything else is 401 `M_UNAUTHORIZED`.

use serde_json::json;

use crate::{
    harness::{Backend, enc},
    testnet::{Discovered, TestNet, json as body_of, skipped, x_matrix},
};

crate::backend_tests!(requests_without_a_valid_x_matrix_signature_are_refused);

async fn requests_without_a_valid_x_matrix_signature_are_refused(backend: Backend) {
    let net = TestNet::new().await;
    let Some(plain) = net.peer(backend, "plain.test", Discovered::Port8448, "").await else {
        return skipped("port 8448");
    };
    let srv = net.peer(backend, "srv.test", Discovered::Srv, "").await.unwrap();
    let bob = plain.server.register("bob").await;
    let path = format!("/_matrix/client/v3/profile/{}/displayname", enc(&bob.user_id));
    let (status, _) = plain.server.put(&path, Some(&bob.access_token), json!({"displayname": "Bob"})).await;
    assert_eq!(status, 200);

    let (client, base) = net.client_for(&plain);
    let uri = format!("/_matrix/federation/v1/query/profile?user_id={}", enc(&bob.user_id));
    let send = |authorization: Option<String>| {
        let mut request = client.get(format!("{base}{uri}"));
        if let Some(authorization) = authorization {
            request = request.header("authorization", authorization);
        }
        async move { body_of(request.send().await.unwrap()).await }
    };
    let srv_key = srv.signing_key();

    let (status, body) = send(Some(x_matrix(&srv_key, "srv.test", "plain.test", "GET", &uri, None))).await;
    assert_eq!((status, &body["displayname"]), (200, &json!("Bob")), "a valid request is answered: {body}");

    let impostor =
        hearth::matrix::keys::SigningKey::from_file(&hearth::matrix::keys::SigningKey::generate_file()).unwrap();
    let forged =
        x_matrix(&impostor, "srv.test", "plain.test", "GET", &uri, None).replace(&impostor.key_id(), &srv_key.key_id());
    let other_uri = "/_matrix/federation/v1/query/profile?user_id=%40alice%3Aplain.test";
    for (what, authorization) in [
        ("no Authorization header", None),
        ("a bearer token", Some("Bearer abc".to_owned())),
        ("a malformed X-Matrix header", Some("X-Matrix origin=srv.test".to_owned())),
        ("another destination", Some(x_matrix(&srv_key, "srv.test", "other.test", "GET", &uri, None))),
        ("a forged signature under the origin's key ID", Some(forged)),
        ("a signature over another URI", Some(x_matrix(&srv_key, "srv.test", "plain.test", "GET", other_uri, None))),
        ("a signature over another method", Some(x_matrix(&srv_key, "srv.test", "plain.test", "POST", &uri, None))),
        ("an origin claiming to be us", Some(x_matrix(&srv_key, "plain.test", "plain.test", "GET", &uri, None))),
        ("an origin nobody can reach", Some(x_matrix(&srv_key, "ghost.test", "plain.test", "GET", &uri, None))),
    ] {
        let (status, body) = send(authorization).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body["errcode"], "M_UNAUTHORIZED", "{what}: {body}");
    }

    // Bad input gets a Matrix error, never a 500.
    let no_user = "/_matrix/federation/v1/query/profile";
    let request = client
        .get(format!("{base}{no_user}"))
        .header("authorization", x_matrix(&srv_key, "srv.test", "plain.test", "GET", no_user, None));
    let (status, body) = body_of(request.send().await.unwrap()).await;
    assert_eq!((status, &body["errcode"]), (400, &json!("M_MISSING_PARAM")), "{body}");
    let key_query = format!("{base}/_matrix/key/v2/query");
    for (raw, errcode) in [("not json", "M_NOT_JSON"), (r#"{"server_keys": 5}"#, "M_BAD_JSON")] {
        let request = client.post(&key_query).header("content-type", "application/json").body(raw);
        let (status, body) = body_of(request.send().await.unwrap()).await;
        assert_eq!((status, &body["errcode"]), (400, &json!(errcode)), "{raw}: {body}");
    }
    let (status, body) =
        body_of(client.get(format!("{base}/_matrix/key/v2/query/not%20a%20name")).send().await.unwrap()).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) =
        body_of(client.get(format!("{base}/_matrix/federation/v1/nonsense")).send().await.unwrap()).await;
    assert_eq!((status, &body["errcode"]), (404, &json!("M_UNRECOGNIZED")), "{body}");
}
