//! Bad `[federation]` values stop Hearth at start with the key named; a listener without a
//! certificate says it speaks plain HTTP.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use crate::{harness::hearth_command, testnet::TestNet};

/// Runs `hearth` with `config` and returns its standard error once it exits (within 30 s).
fn run_until_exit(config: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hearth.toml");
    std::fs::write(&path, format!("data_dir = \"{}\"\n{config}", dir.path().join("data").display())).unwrap();
    let mut child = hearth_command()
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start hearth");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("hearth kept running with a bad configuration:\n{config}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status.success(), stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_federation_values_stop_the_start_naming_the_key() {
    let net = TestNet::new().await;
    let (crt, key) = net.certificate("bad.test", &["bad.test"]);
    let (_, other_key) = net.certificate("other.test", &["other.test"]);
    let base = "server_name = \"bad.test\"\nlisten = [\"127.0.0.1:0\"]\n[federation]\nlisten = [\"127.0.0.1:0\"]\n";
    let cases = [
        (
            format!("tls_certificate = \"/nonexistent/x.crt\"\ntls_private_key = \"{}\"", key.display()),
            "federation.tls_certificate",
        ),
        (
            format!("tls_certificate = \"{}\"\ntls_private_key = \"/nonexistent/x.key\"", crt.display()),
            "federation.tls_private_key",
        ),
        (
            format!("tls_certificate = \"{}\"\ntls_private_key = \"{}\"", crt.display(), other_key.display()),
            "federation.tls_private_key",
        ),
        (format!("tls_certificate = \"{}\"", crt.display()), "federation.tls_private_key"),
        ("extra_ca_certificates = [\"/nonexistent/ca.crt\"]".to_owned(), "federation.extra_ca_certificates"),
        ("dns_servers = [\"resolver.example\"]".to_owned(), "federation.dns_servers"),
        ("well_known_server = \"https://matrix.example.org/\"".to_owned(), "federation.well_known_server"),
    ];
    for (lines, key_name) in cases {
        // Each fails before any lookup; a name server that is not there guards against one
        // reaching the machine's resolver all the same.
        let dns = if lines.contains("dns_servers") { "" } else { "dns_servers = [\"127.0.0.1:9\"]\n" };
        let (succeeded, stderr) = run_until_exit(&format!("{base}{dns}{lines}\n"));
        assert!(!succeeded, "{lines}");
        assert!(stderr.contains(key_name), "{lines}: expected `{key_name}` in:\n{stderr}");
    }
    let (succeeded, stderr) =
        run_until_exit("server_name = \"bad.test\"\n[federation]\nlisten = [\"127.0.0.1:nope\"]\n");
    assert!(!succeeded);
    assert!(stderr.contains("federation.listen"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_without_a_certificate_says_it_speaks_plain_http() {
    let net = TestNet::new().await;
    let config = format!(
        "server_name = \"plain-http.test\"\n[registration]\nmode = \"open\"\n[federation]\nenabled = true\nlisten = [\"127.0.0.1:0\"]\n\
         dns_servers = [\"{}\"]\n",
        net.dns.addr
    );
    let server = crate::harness::TestServer::start_with(crate::harness::Backend::Sqlite, &config).await;
    crate::testnet::log_line(&server, "the listener says it speaks plain HTTP", |line| line.contains("plain HTTP"))
        .await;
}
