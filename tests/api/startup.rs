//! Starting Hearth: zero-config defaults, configuration errors that name their key, environment
//! overrides, `generate-config`, and refusing to start on an unreachable database.

use std::{
    io::{BufRead, BufReader},
    process::Stdio,
    time::Duration,
};

use serde_json::json;

use crate::harness::{Backend, TestServer, hearth_command};

/// Runs `hearth` with `args` in `dir` and returns (exit success, stderr).
fn run_to_exit(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut command = hearth_command();
    command.current_dir(dir).args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().unwrap();
    (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn unknown_config_key_is_named_and_stops_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.toml"), "[database]\nulr = \"sqlite://x.db\"\n").unwrap();
    let (ok, stderr) = run_to_exit(dir.path(), &["--config", "bad.toml"], &[]);
    assert!(!ok);
    assert!(stderr.contains("database") && stderr.contains("ulr"), "{stderr}");
    assert!(!dir.path().join("hearth-data").exists(), "nothing was created");
}

#[test]
fn bad_config_value_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.toml"), "listen = [\"not-an-address\"]\n").unwrap();
    let (ok, stderr) = run_to_exit(dir.path(), &["--config", "bad.toml"], &[]);
    assert!(!ok);
    assert!(stderr.contains("listen"), "{stderr}");
    let (ok, stderr) = run_to_exit(dir.path(), &[], &[("HEARTH_REGISTRATION__MODE", "sometimes")]);
    assert!(!ok);
    assert!(stderr.contains("HEARTH_REGISTRATION__MODE"), "{stderr}");
}

#[test]
fn missing_config_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, stderr) = run_to_exit(dir.path(), &["--config", "nope.toml"], &[]);
    assert!(!ok);
    assert!(stderr.contains("nope.toml"), "{stderr}");
}

#[test]
fn unreachable_database_stops_start() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, stderr) = run_to_exit(
        dir.path(),
        &[],
        &[
            ("HEARTH_DATABASE__URL", "postgres://hearth:secret@127.0.0.1:1/hearth"),
            ("HEARTH_DATABASE__CONNECT_TIMEOUT_SECS", "3"),
            ("HEARTH_LISTEN", "[\"127.0.0.1:0\"]"),
        ],
    );
    assert!(!ok);
    assert!(stderr.contains("cannot open database"), "{stderr}");
    assert!(!stderr.contains("secret"), "the password is never printed: {stderr}");
    assert!(!stderr.contains("is ready"), "{stderr}");
}

#[test]
fn generated_config_is_complete_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, stderr) = run_to_exit(dir.path(), &["generate-config", "--output", "hearth.toml"], &[]);
    assert!(ok, "{stderr}");
    let text = std::fs::read_to_string(dir.path().join("hearth.toml")).unwrap();
    for key in ["server_name", "listen", "[database]", "[registration]", "[rate_limits.login]", "[logging]"] {
        assert!(text.contains(key), "{key} missing");
    }
    let (ok, _) = run_to_exit(dir.path(), &["generate-config", "--output", "hearth.toml"], &[]);
    assert!(!ok, "an existing file is never overwritten");
    let output = hearth_command().arg("generate-config").output().unwrap();
    assert_eq!(String::from_utf8(output.stdout).unwrap(), text);
}

/// With no configuration at all, Hearth creates `./hearth-data` with a database and a signing key
/// and serves (only the port is overridden so tests can run side by side).
#[tokio::test]
async fn zero_config_start_creates_data_dir_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = hearth_command()
        .current_dir(dir.path())
        .env("HEARTH_LISTEN", "[\"127.0.0.1:0\"]")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("is ready") {
                let _ = tx.send(line);
            }
        }
    });
    let ready = rx.recv_timeout(Duration::from_secs(60)).expect("ready line");
    assert!(ready.contains("point a Matrix client at http://127.0.0.1:"), "{ready}");
    assert!(dir.path().join("hearth-data/hearth.db").exists());
    assert!(dir.path().join("hearth-data/signing.key").exists());
    let url = ready.split("point a Matrix client at ").nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
    crate::harness::install_crypto_provider();
    let client = reqwest::Client::new();
    let body: serde_json::Value = client
        .post(format!("{url}/_matrix/client/v3/register"))
        .json(&json!({"username": "alice", "password": "secret", "auth": {"type": "m.login.dummy"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["user_id"], "@alice:localhost", "registration is open on loopback: {body}");
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn environment_overrides_the_config_file() {
    // The harness config sets server_name = "localhost"; the environment wins.
    let server = TestServer::start(Backend::Sqlite).await;
    let output = hearth_command()
        .arg("--config")
        .arg(server.config_path())
        .env("HEARTH_SERVER_NAME", "env.example")
        .args(["user", "create", "carol", "--password", "pw"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "created @carol:env.example");
}
