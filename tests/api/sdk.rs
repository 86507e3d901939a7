//! Real client SDKs driving Hearth. The Python SDKs live in a virtualenv under the target
//! directory, created on first use from `tests/sdk/requirements.txt` (so a plain `cargo test`
//! provisions what it needs; `.ci/run` creates it up front). matrix-js-sdk (what Element Web is
//! built on) is pinned by `tests/sdk/js/package-lock.json` and installed with `npm ci` on first use.

use std::{path::Path, process::Command};

use crate::harness::{TestServer, backend_tests};

pub use crate::sdk_venv::{sdk_js_dir, sdk_python};

/// Runs a script from `tests/sdk` against `server`, failing the test with its output on error.
pub fn run_sdk_script(server: &TestServer, script: &str) {
    let python = sdk_python();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk").join(script);
    let output = Command::new(python).arg(path).env("HEARTH_URL", &server.base_url).output().unwrap();
    assert!(
        output.status.success(),
        "{script} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs a script from `tests/sdk/js` with node against `server`.
pub fn run_js_script(server: &TestServer, script: &str) {
    let dir = sdk_js_dir();
    let output =
        Command::new("node").arg(script).current_dir(&dir).env("HEARTH_URL", &server.base_url).output().unwrap();
    assert!(
        output.status.success(),
        "{script} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

backend_tests! {
    async fn matrix_js_sdk_starts_and_chats_in_a_dm(backend) {
        let server = TestServer::start(backend).await;
        tokio::task::spawn_blocking(move || run_js_script(&server, "chat.js")).await.unwrap();
    }

    async fn matrix_js_sdk_searches_sets_push_rules_and_is_pushed(backend) {
        let config = "[push]\nallowed_ip_ranges = [\"127.0.0.0/8\"]\ncoalesce_ms = 200\n";
        let server = TestServer::start_with(backend, config).await;
        tokio::task::spawn_blocking(move || run_js_script(&server, "search_push.js")).await.unwrap();
    }

    async fn matrix_js_sdk_users_encrypt_verify_and_restore_from_key_backup(backend) {
        let server = TestServer::start(backend).await;
        tokio::task::spawn_blocking(move || run_js_script(&server, "e2ee.js")).await.unwrap();
    }

    async fn matrix_nio_users_encrypt_and_decrypt_in_a_dm_and_a_group(backend) {
        let server = TestServer::start(backend).await;
        tokio::task::spawn_blocking(move || run_sdk_script(&server, "nio_e2ee.py")).await.unwrap();
    }

    async fn matrix_nio_registers_logs_in_and_manages_its_profile(backend) {
        let server = TestServer::start(backend).await;
        tokio::task::spawn_blocking(move || run_sdk_script(&server, "nio_account.py")).await.unwrap();
    }

    async fn matrix_nio_users_share_pictures_and_files(backend) {
        let server = TestServer::start(backend).await;
        tokio::task::spawn_blocking(move || run_sdk_script(&server, "nio_media.py")).await.unwrap();
    }

    async fn matrix_nio_users_chat_in_a_dm_and_a_group(backend) {
        let server = TestServer::start(backend).await;
        tokio::task::spawn_blocking(move || run_sdk_script(&server, "nio_chat.py")).await.unwrap();
    }
}
