//! Real client SDKs driving Hearth. The Python SDKs live in a virtualenv under the target
//! directory, created on first use from `tests/sdk/requirements.txt` (so a plain `cargo test`
//! provisions what it needs; `.ci/run` creates it up front). matrix-js-sdk (what Element Web is
//! built on) is pinned by `tests/sdk/js/package-lock.json` and installed with `npm ci` on first use.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::harness::{TestServer, backend_tests};

pub use crate::sdk_venv::sdk_python;

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

/// `node`, after `npm ci` of `tests/sdk/js` (pinned by its package-lock.json) has run once per
/// process; `node_modules` is gitignored.
fn sdk_js_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/js");
        let lock = std::fs::read(dir.join("package-lock.json")).unwrap();
        let stamp = dir.join("node_modules/.hearth-lock");
        if std::fs::read(&stamp).ok().as_deref() != Some(&lock[..]) {
            let status = Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(&dir)
                .status()
                .expect("npm is installed");
            assert!(status.success(), "npm ci in tests/sdk/js failed");
            std::fs::write(&stamp, &lock).unwrap();
        }
        dir
    })
    .clone()
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
