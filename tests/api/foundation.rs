//! Server-level behaviour: discovery, capabilities, key publication, CORS, unknown endpoints,
//! persistence across restarts and graceful shutdown.

use reqwest::Method;
use ruma::{
    serde::Base64,
    signatures::{PublicKeyMap, PublicKeySet, verify_json},
};
use serde_json::{Value, json};

use crate::harness::{TestServer, assert_error, backend_tests};

backend_tests! {
    async fn versions_list_spec_versions(backend) {
        let server = TestServer::start(backend).await;
        let (status, body) = server.get("/_matrix/client/versions", None).await;
        assert_eq!(status, 200);
        let versions: Vec<&str> = body["versions"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert!(versions.contains(&"v1.1") && versions.contains(&"r0.6.1"), "{body}");
        // Nothing past v1.1: v1.2 requires the space hierarchy and v1.11 authenticated media,
        // neither of which Hearth serves (see `SUPPORTED_VERSIONS`).
        assert_eq!(versions.last(), Some(&"v1.1"), "{body}");
        assert!(!versions.iter().any(|v| v.starts_with("v1.") && *v != "v1.1"), "{body}");
        let (status, _) = server.get("/_matrix/client/v1/rooms/!r:localhost/hierarchy", None).await;
        assert_eq!(status, 404, "if the hierarchy now exists, advertise v1.2 and beyond again");
    }

    async fn well_known_points_clients_at_the_server(backend) {
        let server = TestServer::start(backend).await;
        let (status, body) = server.get("/.well-known/matrix/client", None).await;
        assert_eq!(status, 200);
        assert_eq!(body["m.homeserver"]["base_url"], server.base_url);
    }

    async fn public_baseurl_is_what_well_known_announces(backend) {
        let server = TestServer::start_with(backend, r#"public_baseurl = "https://matrix.example.org""#).await;
        let (_, body) = server.get("/.well-known/matrix/client", None).await;
        assert_eq!(body["m.homeserver"]["base_url"], "https://matrix.example.org");
    }

    async fn capabilities_need_a_token_and_list_room_versions(backend) {
        let server = TestServer::start(backend).await;
        assert_error(&server.get("/_matrix/client/v3/capabilities", None).await, 401, "M_MISSING_TOKEN");
        let alice = server.register("alice").await;
        let (status, body) = server.get("/_matrix/client/v3/capabilities", Some(&alice.access_token)).await;
        assert_eq!(status, 200);
        let caps = &body["capabilities"];
        assert_eq!(caps["m.room_versions"]["default"], "12");
        for version in ["10", "11", "12"] {
            assert_eq!(caps["m.room_versions"]["available"][version], "stable", "{body}");
        }
        // Capabilities at their default (enabled) may be omitted, as the spec allows.
        assert_ne!(caps["m.change_password"]["enabled"], false);
        assert_eq!(caps["m.3pid_changes"]["enabled"], false);
    }

    async fn health_answers(backend) {
        let server = TestServer::start(backend).await;
        let response = server.http.get(server.url("/health")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "OK");
    }

    async fn server_key_document_is_self_signed_and_stable_across_restarts(backend) {
        let mut server = TestServer::start(backend).await;
        let (status, document) = server.get("/_matrix/key/v2/server", None).await;
        assert_eq!(status, 200);
        assert_eq!(document["server_name"], "localhost");
        let verify_keys = document["verify_keys"].as_object().unwrap();
        assert_eq!(verify_keys.len(), 1);
        let (key_id, key) = verify_keys.iter().next().unwrap();
        assert!(key_id.starts_with("ed25519:"));
        let mut keys = PublicKeySet::new();
        keys.insert(key_id.clone(), Base64::parse(key["key"].as_str().unwrap()).unwrap());
        let mut key_map = PublicKeyMap::new();
        key_map.insert("localhost".to_owned(), keys);
        let object: ruma::CanonicalJsonObject = serde_json::from_value(document.clone()).unwrap();
        verify_json(&key_map, &object).expect("the key document verifies with its own key");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        assert!(document["valid_until_ts"].as_u64().unwrap() > now);

        server.restart();
        let (_, again) = server.get("/_matrix/key/v2/server", None).await;
        assert_eq!(again["verify_keys"], document["verify_keys"], "the signing key is generated once");
    }

    async fn unknown_endpoints_are_unrecognized(backend) {
        let server = TestServer::start(backend).await;
        assert_error(&server.get("/_matrix/client/v3/no/such/thing", None).await, 404, "M_UNRECOGNIZED");
        assert_error(&server.post("/_matrix/client/v3/nope", None, json!({})).await, 404, "M_UNRECOGNIZED");
        assert_error(&server.get("/", None).await, 404, "M_UNRECOGNIZED");
    }

    async fn wrong_method_is_405_unrecognized(backend) {
        let server = TestServer::start(backend).await;
        assert_error(&server.request(Method::DELETE, "/_matrix/client/versions", None, None).await, 405, "M_UNRECOGNIZED");
        assert_error(&server.request(Method::PUT, "/_matrix/client/v3/login", None, Some(json!({}))).await, 405, "M_UNRECOGNIZED");
    }

    async fn cors_headers_on_every_response_and_options_preflight(backend) {
        let server = TestServer::start(backend).await;
        let response = server
            .http
            .request(Method::OPTIONS, server.url("/_matrix/client/v3/login"))
            .header("Origin", "https://app.element.io")
            .header("Access-Control-Request-Method", "POST")
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success());
        assert_eq!(response.headers()["access-control-allow-origin"], "*");
        assert!(response.headers()["access-control-allow-headers"].to_str().unwrap().contains("Authorization"));
        let response = server.http.get(server.url("/_matrix/client/v3/nope")).send().await.unwrap();
        assert_eq!(response.status(), 404);
        assert_eq!(response.headers()["access-control-allow-origin"], "*");
    }

    async fn accounts_tokens_and_devices_survive_a_restart(backend) {
        let mut server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        server.put(&format!("/_matrix/client/v3/profile/{}/displayname", crate::harness::enc(&alice.user_id)),
            Some(&alice.access_token), json!({"displayname": "Alice A."})).await;
        server.restart();
        let (status, body) = server.get("/_matrix/client/v3/account/whoami", Some(&alice.access_token)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["user_id"], alice.user_id);
        assert_eq!(body["device_id"], alice.device_id);
        let (_, profile) = server.get(&format!("/_matrix/client/v3/profile/{}", crate::harness::enc(&alice.user_id)), None).await;
        assert_eq!(profile["displayname"], "Alice A.");
        let (status, _) = server.login("alice", &alice.password, json!({})).await;
        assert_eq!(status, 200);
    }

    async fn sigterm_finishes_cleanly(backend) {
        let mut server = TestServer::start(backend).await;
        server.register("alice").await;
        let status = server.stop();
        assert!(status.success(), "exit status {status:?}");
        let log = server.log_lines().join("\n");
        assert!(log.contains("shutting down") && log.contains("database closed"), "{log}");
    }

    async fn acknowledged_registration_survives_kill_9(backend) {
        let mut server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        server.crash();
        server.restart();
        let (status, body) = server.get("/_matrix/client/v3/account/whoami", Some(&alice.access_token)).await;
        assert_eq!(status, 200, "{body}");
    }
}

/// The startup log line carries the address to give clients and the startup time.
#[tokio::test]
async fn startup_log_says_where_to_point_a_client() {
    let server = TestServer::start(crate::harness::Backend::Sqlite).await;
    let ready: Vec<Value> = server
        .log_lines()
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line.get("url").is_some())
        .collect();
    assert_eq!(ready.len(), 1);
    let message = ready[0]["message"].as_str().unwrap();
    assert!(message.contains("point a Matrix client at") && message.contains(&server.base_url), "{message}");
}
