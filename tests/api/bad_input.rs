//! Malformed requests get a Matrix error with the right status, never a 500, and change nothing.

use reqwest::Method;
use serde_json::json;

use crate::harness::{TestServer, assert_error, backend_tests, enc};

backend_tests! {
    async fn malformed_json_is_not_json(backend) {
        let server = TestServer::start(backend).await;
        let response = server.request_raw(Method::POST, "/_matrix/client/v3/register", None, b"{\"username\": ".to_vec()).await;
        assert_error(&response, 400, "M_NOT_JSON");
        let response = server.request_raw(Method::POST, "/_matrix/client/v3/login", None, vec![0xff, 0xfe, b'{']).await;
        assert_error(&response, 400, "M_NOT_JSON");
    }

    async fn wrong_shapes_and_types_are_bad_json(backend) {
        let server = TestServer::start(backend).await;
        for body in [json!([]), json!("text"), json!(42), json!({"username": 5, "password": "x"}), json!({"username": "a", "password": ["x"]})] {
            let response = server.post("/_matrix/client/v3/register", None, body.clone()).await;
            assert_error(&response, 400, "M_BAD_JSON");
        }
        assert_eq!(server.get("/_matrix/client/v3/register/available?username=a", None).await.0, 200, "nothing was registered");
    }

    async fn missing_fields_are_missing_params(backend) {
        let server = TestServer::start(backend).await;
        assert_error(&server.post("/_matrix/client/v3/login", None, json!({"type": "m.login.password"})).await, 400, "M_MISSING_PARAM");
        let response = server.post("/_matrix/client/v3/login", None, json!({})).await;
        assert_eq!(response.0, 400, "{}", response.1);
        assert_error(&server.post("/_matrix/client/v3/refresh", None, json!({})).await, 400, "M_MISSING_PARAM");
    }

    async fn invalid_identifiers_in_paths_are_invalid_params(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        assert_error(&server.get("/_matrix/client/v3/profile/alice", None).await, 400, "M_INVALID_PARAM");
        assert_error(
            &server.put("/_matrix/client/v3/profile/%40%3A/displayname", Some(&alice.access_token), json!({"displayname": "x"})).await,
            400,
            "M_INVALID_PARAM",
        );
    }

    async fn oversized_bodies_are_too_large(backend) {
        let server = TestServer::start_with(backend, "[limits]\nmax_request_body_bytes = 4096\n").await;
        let alice = server.register("alice").await;
        let big = json!({"displayname": "x".repeat(10_000)});
        let path = format!("/_matrix/client/v3/profile/{}/displayname", enc(&alice.user_id));
        assert_error(&server.put(&path, Some(&alice.access_token), big).await, 413, "M_TOO_LARGE");
        // Chunked (no Content-Length) bodies are limited too.
        let stream = futures_util::stream::iter(
            (0..10).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b' '; 1000]))),
        );
        let response = server
            .http
            .put(server.url(&path))
            .bearer_auth(&alice.access_token)
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 413);
        assert_eq!(server.get(&path, None).await.1["displayname"], "alice");
    }

    async fn garbage_never_causes_a_server_error(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let me = enc(&alice.user_id);
        let room_id = server.create_room(&alice, json!({"preset": "public_chat"})).await;
        let room = enc(&room_id);
        let event = enc(&server.send_text(&alice, &room_id, "target").await);
        let endpoints: Vec<(Method, String)> = vec![
            (Method::POST, "/_matrix/client/v3/createRoom".into()),
            (Method::POST, format!("/_matrix/client/v3/rooms/{room}/invite")),
            (Method::POST, format!("/_matrix/client/v3/rooms/{room}/kick")),
            (Method::POST, format!("/_matrix/client/v3/rooms/{room}/ban")),
            (Method::POST, format!("/_matrix/client/v3/rooms/{room}/upgrade")),
            (Method::PUT, format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/g1")),
            (Method::PUT, format!("/_matrix/client/v3/rooms/{room}/state/m.room.name/")),
            (Method::PUT, format!("/_matrix/client/v3/rooms/{room}/typing/{me}")),
            (Method::POST, format!("/_matrix/client/v3/rooms/{room}/receipt/m.read/{event}")),
            (Method::POST, format!("/_matrix/client/v3/rooms/{room}/read_markers")),
            (Method::GET, format!("/_matrix/client/v3/rooms/{room}/messages?dir=x&limit=-4&filter=%7B")),
            (Method::GET, format!("/_matrix/client/v3/rooms/{room}/context/{event}?limit=abc")),
            (Method::GET, format!("/_matrix/client/v1/rooms/{room}/relations/{event}?dir=q")),
            (Method::GET, "/_matrix/client/v3/sync?since=s99999999_0&timeout=0".into()),
            (Method::GET, "/_matrix/client/v3/sync?filter=%5B%5D&timeout=0".into()),
            (Method::POST, format!("/_matrix/client/v3/user/{me}/filter")),
            (Method::PUT, format!("/_matrix/client/v3/user/{me}/account_data/m.direct")),
            (Method::PUT, format!("/_matrix/client/v3/user/{me}/rooms/{room}/tags/t")),
            (Method::PUT, "/_matrix/client/v3/sendToDevice/m.test/g3".into()),
            (Method::PUT, format!("/_matrix/client/v3/presence/{me}/status")),
            (Method::PUT, "/_matrix/client/v3/directory/room/%23g%3Alocalhost".into()),
            (Method::POST, "/_matrix/client/v3/publicRooms".into()),
            (Method::POST, "/_matrix/client/v3/user_directory/search".into()),
            (Method::POST, "/_matrix/client/v3/join/%21x%3Alocalhost".into()),
            (Method::POST, "/_matrix/client/v3/register".into()),
            (Method::POST, "/_matrix/client/v3/login".into()),
            (Method::POST, "/_matrix/client/v3/refresh".into()),
            (Method::POST, "/_matrix/client/v3/account/password".into()),
            (Method::POST, "/_matrix/client/v3/account/deactivate".into()),
            (Method::POST, "/_matrix/client/v3/delete_devices".into()),
            (Method::PUT, format!("/_matrix/client/v3/devices/{}", alice.device_id)),
            (Method::DELETE, format!("/_matrix/client/v3/devices/{}", alice.device_id)),
            (Method::PUT, format!("/_matrix/client/v3/profile/{me}/displayname")),
            (Method::PUT, format!("/_matrix/client/v3/profile/{me}/avatar_url")),
            (Method::GET, "/_matrix/client/v3/register/available?username=%00%ff".into()),
            (Method::GET, "/_matrix/client/v1/register/m.login.registration_token/validity?token=".into()),
            (Method::GET, "/_matrix/client/v3/profile/%ZZ".into()),
            // Last: an empty body is a valid logout.
            (Method::POST, "/_matrix/client/v3/logout".into()),
        ];
        let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
        let bodies: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"{".to_vec(),
            b"null".to_vec(),
            b"[1,2,3]".to_vec(),
            b"{\"auth\": 7}".to_vec(),
            b"{\"auth\": {\"type\": 7}}".to_vec(),
            b"{\"auth\": {\"type\": \"m.login.password\", \"identifier\": 3}}".to_vec(),
            b"{\"type\": \"m.login.password\", \"identifier\": {\"type\": \"m.id.user\"}}".to_vec(),
            b"{\"devices\": \"ABC\"}".to_vec(),
            b"{\"new_password\": 1e400}".to_vec(),
            b"{\"displayname\": \"\\ud800\"}".to_vec(),
            deep.into_bytes(),
            vec![0xc3, 0x28],
        ];
        for (method, path) in &endpoints {
            for body in &bodies {
                let (status, value) = server.request_raw(method.clone(), path, Some(&alice.access_token), body.clone()).await;
                assert!(status.is_client_error() || status.is_success(), "{method} {path} {:?} -> {status} {value}", String::from_utf8_lossy(body));
                // Client errors carry an errcode, except UIA challenges, which carry the flows.
                if status.is_client_error() {
                    assert!(value["errcode"].is_string() || value["flows"].is_array(), "{method} {path} -> {status} {value}");
                }
            }
        }
        // The account is untouched: still logged in (unless a logout went through), same password, same name.
        assert_eq!(server.login("alice", &alice.password, json!({})).await.0, 200);
        assert_eq!(server.get(&format!("/_matrix/client/v3/profile/{me}/displayname"), None).await.1["displayname"], "alice");
    }
}
