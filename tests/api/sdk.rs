//! Real client SDKs driving Hearth. The Python SDKs live in a virtualenv under the target
//! directory, created on first use from `tests/sdk/requirements.txt` (so a plain `cargo test`
//! provisions what it needs; `.ci/run` creates it up front). matrix-js-sdk (what Element Web is
//! built on) is pinned by `tests/sdk/js/package-lock.json` and installed with `npm ci` on first use.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::harness::{TestServer, backend_tests};

const REQUIREMENTS: &str = include_str!("../sdk/requirements.txt");

/// The virtualenv's Python, creating the virtualenv if needed. Each set of requirements gets its
/// own directory, built privately and renamed into place, so concurrent test processes never see
/// (or delete) a half-built one. Tests run on several threads of one process, so the build is
/// also done once per process (the staging name carries the process id only).
pub fn sdk_python() -> PathBuf {
    static PYTHON: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PYTHON.get_or_init(build_sdk_venv).clone()
}

fn build_sdk_venv() -> PathBuf {
    let hash =
        REQUIREMENTS.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let root = tmp.join(format!("sdk-venv-{hash:016x}"));
    let python = root.join("bin/python");
    if root.join(".complete").exists() {
        return python;
    }
    let staging = tmp.join(format!("sdk-venv-staging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let status = Command::new("python3").args(["-m", "venv"]).arg(&staging).status().expect("python3 is installed");
    assert!(status.success(), "python3 -m venv failed");
    let requirements = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/requirements.txt");
    let status = Command::new(staging.join("bin/python"))
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r"])
        .arg(&requirements)
        .status()
        .expect("pip runs");
    assert!(status.success(), "pip install -r tests/sdk/requirements.txt failed");
    std::fs::write(staging.join(".complete"), REQUIREMENTS).unwrap();
    if std::fs::rename(&staging, &root).is_err() {
        // Another process finished first; its venv is just as good.
        let _ = std::fs::remove_dir_all(&staging);
    }
    python
}

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

    async fn matrix_nio_users_chat_in_a_dm_and_a_group(backend) {
        let server = TestServer::start(backend).await;
        tokio::task::spawn_blocking(move || run_sdk_script(&server, "nio_chat.py")).await.unwrap();
    }
}
