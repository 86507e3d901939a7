//! End-to-end encryption across servers, with a real encryption stack: matrix-js-sdk's Rust
//! crypto (`tests/sdk/js/e2ee.js`) with Alice and Carol on one server and Bob, Dave and Eve on
//! the other — cross-signing, an encrypted DM and a group of five, SAS verification over
//! `m.direct_to_device`, and key backup restored on a new device. Keys travel through
//! `/user/keys/query`, `/user/keys/claim` and `/user/devices`, device-list updates through EDUs.

use crate::{graph::two_servers, harness::Backend, testnet::TestNet};

crate::backend_tests!(users_on_two_hearths_encrypt_verify_and_restore_from_key_backup);

async fn users_on_two_hearths_encrypt_verify_and_restore_from_key_backup(backend: Backend) {
    let net = TestNet::new().await;
    let (a, b) = two_servers(&net, backend).await;
    run_e2ee_js(a.server.base_url.clone(), b.server.base_url.clone(), None).await;
}

/// Runs `e2ee.js` with its first server at `first` and its second at `second` (`ca`: a CA file
/// node must trust to reach `second` over TLS), failing the test with the script's output.
pub async fn run_e2ee_js(first: String, second: String, ca: Option<std::path::PathBuf>) {
    // The script blocks for a while: on the blocking pool, so the servers' runtime keeps going.
    let output = tokio::task::spawn_blocking(move || {
        let mut command = std::process::Command::new("node");
        command.arg("e2ee.js").current_dir(crate::sdk_venv::sdk_js_dir());
        command.env("HEARTH_URL", first).env("HEARTH_URL_2", second);
        if let Some(ca) = ca {
            command.env("NODE_EXTRA_CA_CERTS", ca);
        }
        command.output().expect("node runs")
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "e2ee.js failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
