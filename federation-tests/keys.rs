//! Server keys across servers: the published document and a rotation, the notary endpoints, and
//! keys fetched through a trusted notary.

use ruma::{CanonicalJsonObject, serde::Base64, signatures::PublicKeySet};
use serde_json::{Value, json};

use crate::{
    harness::{Backend, enc},
    testnet::{Discovered, TestNet, json as body_of, skipped},
};

crate::backend_tests!(
    the_key_document_verifies_and_a_rotation_keeps_the_old_key,
    a_notary_vouches_for_other_servers_keys,
    keys_come_through_a_trusted_notary,
);

fn now_ms() -> i64 {
    hearth::service::now_ms()
}

fn object(value: &Value) -> CanonicalJsonObject {
    serde_json::from_value(value.clone()).expect("a JSON object")
}

async fn server_keys(net: &TestNet, peer: &crate::testnet::Peer) -> Value {
    let (client, base) = net.client_for(peer);
    let (status, body) = body_of(client.get(format!("{base}/_matrix/key/v2/server")).send().await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn the_key_document_verifies_and_a_rotation_keeps_the_old_key(backend: Backend) {
    let net = TestNet::new().await;
    let Some(mut plain) = net.peer(backend, "plain.test", Discovered::Port8448, "").await else {
        return skipped("port 8448");
    };
    let srv = net.peer(backend, "srv.test", Discovered::Srv, "").await.unwrap();
    let bob = srv.server.register("bob").await;

    let (client, base) = net.client_for(&plain);
    let (status, version) =
        body_of(client.get(format!("{base}/_matrix/federation/v1/version")).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(version["server"]["name"], "Hearth");

    let before = server_keys(&net, &plain).await;
    let verified =
        hearth::matrix::keys::verify_server_keys(object(&before), "plain.test".try_into().unwrap(), now_ms())
            .expect("the document carries the server's own valid signature");
    assert!(verified.old_verify_keys.is_empty());
    assert!(before["valid_until_ts"].as_i64().unwrap() > now_ms());
    let old_id = verified.verify_keys[0].0.clone();

    let rotated = plain.server.cli(&["keys", "rotate"], None);
    assert!(rotated.status.success(), "{}", String::from_utf8_lossy(&rotated.stderr));
    assert!(String::from_utf8_lossy(&rotated.stdout).contains(&old_id));
    plain.server.restart();

    let after = server_keys(&net, &plain).await;
    let verified = hearth::matrix::keys::verify_server_keys(object(&after), "plain.test".try_into().unwrap(), now_ms())
        .expect("the new document is signed with the new key");
    let new_id = &verified.verify_keys[0].0;
    assert_ne!(new_id, &old_id);
    assert_eq!(after["old_verify_keys"][&old_id]["key"], before["verify_keys"][&old_id]["key"]);
    let expired_ts = after["old_verify_keys"][&old_id]["expired_ts"].as_i64().expect("expired_ts");
    assert!(expired_ts <= now_ms());

    // Requests are now signed with the new key, and the other server accepts them.
    let (status, body) = plain.server.get(&format!("/_matrix/client/v3/profile/{}", enc(&bob.user_id)), None).await;
    assert_eq!(status, 200, "{body}");
}

async fn a_notary_vouches_for_other_servers_keys(backend: Backend) {
    let net = TestNet::new().await;
    let Some(plain) = net.peer(backend, "plain.test", Discovered::Port8448, "").await else {
        return skipped("port 8448");
    };
    let srv = net.peer(backend, "srv.test", Discovered::Srv, "").await.unwrap();
    let (client, base) = net.client_for(&plain);
    let notary_document = server_keys(&net, &plain).await;
    let notary_keys: PublicKeySet = notary_document["verify_keys"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(id, key)| (id.clone(), Base64::parse(key["key"].as_str().unwrap()).unwrap()))
        .collect();

    let query = json!({"server_keys": {"srv.test": {}}});
    let (status, body) =
        body_of(client.post(format!("{base}/_matrix/key/v2/query")).json(&query).send().await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    let documents = body["server_keys"].as_array().unwrap();
    assert_eq!(documents.len(), 1, "{body}");
    let document = object(&documents[0]);
    hearth::matrix::keys::verify_server_keys(document.clone(), "srv.test".try_into().unwrap(), now_ms())
        .expect("srv.test's own signature is kept");
    hearth::matrix::keys::verify_signed_by(&document, "plain.test", notary_keys.clone())
        .expect("the notary signed it too");
    assert_eq!(documents[0]["verify_keys"], server_keys(&net, &srv).await["verify_keys"]);

    let (status, body) = body_of(
        client
            .get(format!("{base}/_matrix/key/v2/query/srv.test?minimum_valid_until_ts={}", now_ms()))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["server_keys"][0]["server_name"], "srv.test");

    let (status, body) =
        body_of(client.get(format!("{base}/_matrix/key/v2/query/plain.test")).send().await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["server_keys"][0]["verify_keys"], notary_document["verify_keys"]);

    // A server nobody can reach is left out, not an error.
    let (status, body) =
        body_of(client.get(format!("{base}/_matrix/key/v2/query/ghost.test")).send().await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["server_keys"], json!([]));
}

async fn keys_come_through_a_trusted_notary(backend: Backend) {
    let net = TestNet::new().await;
    let Some(notary) = net.peer(backend, "notary.test", Discovered::Port8448, "").await else {
        return skipped("port 8448");
    };
    let trusting =
        net.peer(backend, "trusting.test", Discovered::Srv, "trusted_key_servers = [\"notary.test\"]").await.unwrap();
    let Some(asking) = net.peer(backend, "asking.test", Discovered::Port8448, "").await else {
        return skipped("port 8448");
    };
    let erin = trusting.server.register("erin").await;
    // asking → trusting: trusting needs asking's key and asks the notary for it.
    let (status, body) = asking.server.get(&format!("/_matrix/client/v3/profile/{}", enc(&erin.user_id)), None).await;
    assert_eq!(status, 200, "{body}");
    crate::testnet::log_line(&notary.server, "the trusting server asked its notary", |line| {
        line.contains("/_matrix/key/v2/query")
    })
    .await;
}
