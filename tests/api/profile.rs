//! Profiles: display name and avatar URL.

use serde_json::json;

use crate::harness::{TestServer, assert_error, backend_tests, enc};

backend_tests! {
    async fn new_accounts_are_named_after_their_localpart(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let (status, profile) = server.get(&format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id)), None).await;
        assert_eq!(status, 200);
        assert_eq!(profile, json!({"displayname": "alice"}));
    }

    async fn display_name_and_avatar_can_be_set_and_read(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let base = format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id));
        let token = Some(alice.access_token.as_str());
        assert_eq!(server.put(&format!("{base}/displayname"), token, json!({"displayname": "Alice 🌸 Liddell"})).await.0, 200);
        assert_eq!(server.put(&format!("{base}/avatar_url"), token, json!({"avatar_url": "mxc://localhost/abc123"})).await.0, 200);
        assert_eq!(server.get(&format!("{base}/displayname"), None).await.1, json!({"displayname": "Alice 🌸 Liddell"}));
        assert_eq!(server.get(&format!("{base}/avatar_url"), None).await.1, json!({"avatar_url": "mxc://localhost/abc123"}));
        assert_eq!(
            server.get(&base, None).await.1,
            json!({"displayname": "Alice 🌸 Liddell", "avatar_url": "mxc://localhost/abc123"})
        );
        // r0 paths are the same endpoints.
        let r0 = format!("/_matrix/client/r0/profile/{}/displayname", enc(&alice.user_id));
        assert_eq!(server.get(&r0, None).await.1["displayname"], "Alice 🌸 Liddell");
        // Clearing.
        assert_eq!(server.put(&format!("{base}/displayname"), token, json!({"displayname": ""})).await.0, 200);
        assert_eq!(server.get(&format!("{base}/displayname"), None).await.1, json!({}));
    }

    async fn profiles_of_others_cannot_be_changed(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let path = format!("/_matrix/client/v3/profile/{}/displayname", enc(&bob.user_id));
        assert_error(&server.put(&path, Some(&alice.access_token), json!({"displayname": "Bobby"})).await, 403, "M_FORBIDDEN");
        assert_eq!(server.get(&path, None).await.1["displayname"], "bob");
        assert_error(&server.put(&path, None, json!({"displayname": "Bobby"})).await, 401, "M_MISSING_TOKEN");
    }

    async fn unknown_users_have_no_profile(backend) {
        let server = TestServer::start(backend).await;
        assert_error(&server.get("/_matrix/client/v3/profile/%40nobody%3Alocalhost", None).await, 404, "M_NOT_FOUND");
        assert_error(&server.get("/_matrix/client/v3/profile/%40nobody%3Alocalhost/displayname", None).await, 404, "M_NOT_FOUND");
        assert_error(&server.get("/_matrix/client/v3/profile/not-a-user-id", None).await, 400, "M_INVALID_PARAM");
    }

    async fn bad_avatar_and_name_values_are_refused(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let base = format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id));
        let token = Some(alice.access_token.as_str());
        assert_error(&server.put(&format!("{base}/avatar_url"), token, json!({"avatar_url": "https://example.org/a.png"})).await, 400, "M_INVALID_PARAM");
        assert_error(&server.put(&format!("{base}/displayname"), token, json!({"displayname": "x".repeat(300)})).await, 400, "M_INVALID_PARAM");
        assert_error(&server.put(&format!("{base}/displayname"), token, json!({"displayname": 42})).await, 400, "M_BAD_JSON");
        assert_error(&server.put(&format!("{base}/displayname"), token, json!({})).await, 400, "M_MISSING_PARAM");
        assert_eq!(server.get(&format!("{base}/displayname"), None).await.1["displayname"], "alice", "nothing changed");
    }
}
