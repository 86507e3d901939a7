//! `POST /register` with user-interactive auth, name rules, registration modes and tokens.

use serde_json::json;

use crate::harness::{TestServer, assert_error, backend_tests};

const REGISTER: &str = "/_matrix/client/v3/register";

backend_tests! {
    async fn dummy_flow_takes_two_rounds(backend) {
        let server = TestServer::start(backend).await;
        let (status, challenge) = server.post(REGISTER, None, json!({"username": "alice", "password": "secret"})).await;
        assert_eq!(status, 401);
        assert_eq!(challenge["flows"], json!([{"stages": ["m.login.dummy"]}]));
        let session = challenge["session"].as_str().unwrap();
        let (status, body) = server
            .post(REGISTER, None, json!({
                "username": "alice", "password": "secret",
                "auth": {"type": "m.login.dummy", "session": session},
            }))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["user_id"], "@alice:localhost");
        assert!(body["access_token"].as_str().unwrap().len() > 20);
        assert!(body["device_id"].is_string());
        // The session is spent.
        let again = server
            .post(REGISTER, None, json!({"username": "bob", "password": "x", "auth": {"type": "m.login.dummy", "session": session}}))
            .await;
        assert_error(&again, 400, "M_UNKNOWN");
    }

    async fn registration_uses_requested_device(backend) {
        let server = TestServer::start(backend).await;
        let alice = server
            .register_with("alice", json!({"device_id": "MYPHONE", "initial_device_display_name": "Alice's phone"}))
            .await;
        assert_eq!(alice.device_id, "MYPHONE");
        let (_, devices) = server.get("/_matrix/client/v3/devices", Some(&alice.access_token)).await;
        assert_eq!(devices["devices"][0]["device_id"], "MYPHONE");
        assert_eq!(devices["devices"][0]["display_name"], "Alice's phone");
    }

    async fn username_availability(backend) {
        let server = TestServer::start(backend).await;
        let (status, body) = server.get("/_matrix/client/v3/register/available?username=alice", None).await;
        assert_eq!((status.as_u16(), body), (200, json!({"available": true})));
        server.register("alice").await;
        assert_error(&server.get("/_matrix/client/v3/register/available?username=alice", None).await, 400, "M_USER_IN_USE");
        assert_error(&server.get("/_matrix/client/v3/register/available?username=Al%20ice", None).await, 400, "M_INVALID_USERNAME");
        assert_error(&server.get("/_matrix/client/v3/register/available", None).await, 400, "M_MISSING_PARAM");
    }

    async fn taken_names_are_refused(backend) {
        let server = TestServer::start(backend).await;
        server.register("alice").await;
        let response = server
            .post(REGISTER, None, json!({"username": "alice", "password": "x", "auth": {"type": "m.login.dummy"}}))
            .await;
        assert_error(&response, 400, "M_USER_IN_USE");
    }

    async fn invalid_names_are_refused(backend) {
        let server = TestServer::start(backend).await;
        let too_long = "a".repeat(250);
        for name in ["Alice", "al ice", "al:ice", "_bridge", "1234", "émile", "", too_long.as_str()] {
            let response = server
                .post(REGISTER, None, json!({"username": name, "password": "x", "auth": {"type": "m.login.dummy"}}))
                .await;
            assert_error(&response, 400, "M_INVALID_USERNAME");
        }
    }

    async fn inhibit_login_creates_account_without_session(backend) {
        let server = TestServer::start(backend).await;
        let (status, body) = server
            .post(REGISTER, None, json!({
                "username": "alice", "password": "secret", "inhibit_login": true,
                "auth": {"type": "m.login.dummy"},
            }))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["user_id"], "@alice:localhost");
        assert!(body.get("access_token").is_none());
        assert_eq!(server.login("alice", "secret", json!({})).await.0, 200);
    }

    async fn server_picks_a_name_when_none_is_given(backend) {
        let server = TestServer::start(backend).await;
        let (status, body) = server.post(REGISTER, None, json!({"password": "secret", "auth": {"type": "m.login.dummy"}})).await;
        assert_eq!(status, 200, "{body}");
        let user_id = body["user_id"].as_str().unwrap();
        assert!(user_id.starts_with('@') && user_id.ends_with(":localhost"));
        let (status, whoami) = server.get("/_matrix/client/v3/account/whoami", body["access_token"].as_str()).await;
        assert_eq!(status, 200);
        assert_eq!(whoami["user_id"], user_id);
    }

    async fn unknown_uia_session_is_refused(backend) {
        let server = TestServer::start(backend).await;
        let response = server
            .post(REGISTER, None, json!({"username": "alice", "password": "x", "auth": {"type": "m.login.dummy", "session": "nope"}}))
            .await;
        assert_error(&response, 400, "M_UNKNOWN");
        assert_eq!(server.get("/_matrix/client/v3/register/available?username=alice", None).await.0, 200);
    }

    async fn empty_password_is_weak(backend) {
        let server = TestServer::start(backend).await;
        let response = server.post(REGISTER, None, json!({"username": "alice", "password": "", "auth": {"type": "m.login.dummy"}})).await;
        assert_error(&response, 400, "M_WEAK_PASSWORD");
    }

    async fn disabled_registration_refuses_everyone(backend) {
        let server = TestServer::start_with(backend, "[registration]\nmode = \"disabled\"\n").await;
        let response = server.post(REGISTER, None, json!({"username": "alice", "password": "x", "auth": {"type": "m.login.dummy"}})).await;
        assert_error(&response, 403, "M_FORBIDDEN");
        assert_error(&server.post(REGISTER, None, json!({"username": "alice", "password": "x"})).await, 403, "M_FORBIDDEN");
        assert_error(&server.get("/_matrix/client/v3/register/available?username=alice", None).await, 403, "M_FORBIDDEN");
    }

    async fn token_registration_checks_and_counts_uses(backend) {
        let server = TestServer::start_with(backend, "[registration]\nmode = \"token\"\n").await;
        let created = server.cli(&["registration-token", "create", "--token", "letmein", "--uses", "1"], None);
        assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));

        let validity = "/_matrix/client/v1/register/m.login.registration_token/validity";
        assert_eq!(server.get(&format!("{validity}?token=letmein"), None).await.1["valid"], true);
        assert_eq!(server.get(&format!("{validity}?token=wrong"), None).await.1["valid"], false);

        let (status, challenge) = server.post(REGISTER, None, json!({"username": "alice", "password": "x"})).await;
        assert_eq!(status, 401);
        assert_eq!(challenge["flows"], json!([{"stages": ["m.login.registration_token"]}]));
        let session = challenge["session"].as_str().unwrap();

        // Dummy auth is not enough in token mode.
        let dummy = server.post(REGISTER, None, json!({"username": "alice", "password": "x", "auth": {"type": "m.login.dummy", "session": session}})).await;
        assert_error(&dummy, 400, "M_UNKNOWN");

        let (status, wrong) = server
            .post(REGISTER, None, json!({"username": "alice", "password": "x",
                "auth": {"type": "m.login.registration_token", "token": "wrong", "session": session}}))
            .await;
        assert_eq!(status, 401);
        assert_eq!(wrong["errcode"], "M_UNAUTHORIZED");
        assert!(wrong["flows"].is_array());

        let (status, body) = server
            .post(REGISTER, None, json!({"username": "alice", "password": "x",
                "auth": {"type": "m.login.registration_token", "token": "letmein", "session": session}}))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(server.get(&format!("{validity}?token=letmein"), None).await.1["valid"], false, "its one use is spent");

        let (status, used_up) = server
            .post(REGISTER, None, json!({"username": "bob", "password": "x",
                "auth": {"type": "m.login.registration_token", "token": "letmein"}}))
            .await;
        assert_eq!(status, 401);
        assert_eq!(used_up["errcode"], "M_UNAUTHORIZED");
        let listed = String::from_utf8(server.cli(&["registration-token", "list"], None).stdout).unwrap();
        let row = listed.lines().find(|line| line.starts_with("letmein")).unwrap();
        let columns: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(columns, ["letmein", "1", "0", "1", "false"]);
    }

    async fn guests_are_refused_by_default(backend) {
        let server = TestServer::start(backend).await;
        assert_error(&server.post(&format!("{REGISTER}?kind=guest"), None, json!({})).await, 403, "M_GUEST_ACCESS_FORBIDDEN");
    }

    async fn guests_when_enabled_get_a_limited_account(backend) {
        let server = TestServer::start_with(backend, "[registration]\nguest_access = true\n").await;
        let (status, body) = server.post(&format!("{REGISTER}?kind=guest"), None, json!({})).await;
        assert_eq!(status, 200, "{body}");
        let token = body["access_token"].as_str().unwrap();
        let (_, whoami) = server.get("/_matrix/client/v3/account/whoami", Some(token)).await;
        assert_eq!(whoami["is_guest"], true);
        assert_error(&server.get("/_matrix/client/v3/devices", Some(token)).await, 403, "M_GUEST_ACCESS_FORBIDDEN");
    }

    async fn a_real_domain_defaults_to_token_registration_even_on_loopback(backend) {
        // Listening on loopback only, as behind a reverse proxy on the same host.
        let server = TestServer::start_with(backend, "server_name = \"example.org\"\npublic_baseurl = \"https://matrix.example.org\"\n").await;
        let (status, challenge) = server.post(REGISTER, None, json!({"username": "alice", "password": "secret"})).await;
        assert_eq!(status, 401, "{challenge}");
        assert_eq!(challenge["flows"], json!([{"stages": ["m.login.registration_token"]}]));
        let dummy = server.post(REGISTER, None, json!({"username": "alice", "password": "x", "auth": {"type": "m.login.dummy"}})).await;
        assert_eq!(dummy.0, 400, "{}", dummy.1);
        assert_eq!(server_registration_mode(&server), "token");

        let dev = TestServer::start_with(backend, "server_name = \"example.org\"\npublic_baseurl = \"http://127.0.0.1:8008\"\n").await;
        dev.register("alice").await;
        assert_eq!(server_registration_mode(&dev), "open");
        let localhost = TestServer::start(backend).await;
        assert_eq!(server_registration_mode(&localhost), "open");
    }
}

/// The registration mode the server logged at start.
fn server_registration_mode(server: &TestServer) -> String {
    server
        .log_lines()
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find_map(|line| line.get("registration").and_then(|mode| mode.as_str()).map(str::to_owned))
        .expect("the start-up line names the registration mode")
}
