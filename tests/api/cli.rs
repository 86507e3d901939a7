//! Operator commands, run against the same database as a live server.

use serde_json::json;

use crate::harness::{TestServer, assert_error, backend_tests};

fn stdout(output: &std::process::Output) -> String {
    assert!(output.status.success(), "command failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

backend_tests! {
    async fn user_create_then_login(backend) {
        let server = TestServer::start_with(backend, "[registration]\nmode = \"disabled\"\n").await;
        assert_eq!(stdout(&server.cli(&["user", "create", "alice", "--password", "s3cret"], None)).trim(), "created @alice:localhost");
        assert_eq!(stdout(&server.cli(&["user", "create", "bob", "--admin"], Some("from-stdin\n"))).trim(), "created @bob:localhost");
        assert_eq!(server.login("alice", "s3cret", json!({})).await.0, 200);
        assert_eq!(server.login("bob", "from-stdin", json!({})).await.0, 200);
        let duplicate = server.cli(&["user", "create", "alice", "--password", "x"], None);
        assert!(!duplicate.status.success());
        let invalid = server.cli(&["user", "create", "Not Valid", "--password", "x"], None);
        assert!(!invalid.status.success());
        let list = stdout(&server.cli(&["user", "list"], None));
        let alice = list.lines().find(|l| l.starts_with("@alice:localhost")).unwrap();
        let bob = list.lines().find(|l| l.starts_with("@bob:localhost")).unwrap();
        assert_eq!(alice.split_whitespace().collect::<Vec<_>>(), ["@alice:localhost", "false", "false", "active"]);
        assert_eq!(bob.split_whitespace().collect::<Vec<_>>(), ["@bob:localhost", "true", "false", "active"]);
    }

    async fn user_deactivate_locks_the_account_out(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        assert_eq!(stdout(&server.cli(&["user", "deactivate", "alice"], None)).trim(), "deactivated @alice:localhost");
        assert_error(&server.get("/_matrix/client/v3/account/whoami", Some(&alice.access_token)).await, 401, "M_UNKNOWN_TOKEN");
        assert_error(&server.login("alice", &alice.password, json!({})).await, 403, "M_USER_DEACTIVATED");
        assert!(!server.cli(&["user", "deactivate", "@alice:localhost"], None).status.success(), "already deactivated");
        assert!(!server.cli(&["user", "deactivate", "@nobody:localhost"], None).status.success());
        let list = stdout(&server.cli(&["user", "list"], None));
        assert!(list.lines().any(|l| l.starts_with("@alice:localhost") && l.ends_with("deactivated")), "{list}");
    }

    async fn user_reset_password_logs_out_everywhere(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        stdout(&server.cli(&["user", "reset-password", "@alice:localhost", "--password", "fresh"], None));
        assert_error(&server.get("/_matrix/client/v3/account/whoami", Some(&alice.access_token)).await, 401, "M_UNKNOWN_TOKEN");
        assert_error(&server.login("alice", &alice.password, json!({})).await, 403, "M_FORBIDDEN");
        assert_eq!(server.login("alice", "fresh", json!({})).await.0, 200);
        assert!(!server.cli(&["user", "reset-password", "ghost", "--password", "x"], None).status.success());
    }

    async fn registration_tokens_can_be_generated_and_listed(backend) {
        let server = TestServer::start_with(backend, "[registration]\nmode = \"token\"\n").await;
        let token = stdout(&server.cli(&["registration-token", "create"], None)).trim().to_owned();
        assert_eq!(token.len(), 16);
        let expiring = stdout(&server.cli(&["registration-token", "create", "--uses", "5", "--expires-in-days", "7"], None));
        let list = stdout(&server.cli(&["registration-token", "list"], None));
        assert!(list.contains(&token) && list.contains(expiring.trim()), "{list}");
        let (status, body) = server
            .post("/_matrix/client/v3/register", None, json!({"username": "alice", "password": "x",
                "auth": {"type": "m.login.registration_token", "token": token}}))
            .await;
        assert_eq!(status, 200, "{body}");
        assert!(!server.cli(&["registration-token", "create", "--token", "bad token!"], None).status.success());
        assert!(!server.cli(&["registration-token", "create", "--token", &token], None).status.success(), "duplicates are refused");
    }
}
