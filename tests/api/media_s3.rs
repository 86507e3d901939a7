//! A real S3-compatible server for the media tests: moto in server mode (from the tests'
//! virtualenv, `tests/sdk/requirements.txt`), on a loopback port of its own.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// What the server is given as AWS credentials (moto accepts any).
pub const CREDENTIALS: [(&str, &str); 2] =
    [("AWS_ACCESS_KEY_ID", "hearth-test"), ("AWS_SECRET_ACCESS_KEY", "hearth-test-secret")];

pub struct S3Server {
    child: Child,
    pub endpoint: String,
    http: reqwest::Client,
}

impl S3Server {
    /// Starts moto on a free loopback port; `None` (the test skipped, said on stderr) only when
    /// the virtualenv cannot be built on this machine.
    pub async fn start() -> Option<S3Server> {
        let python = crate::sdk_venv::sdk_python();
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let child = Command::new(python)
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto starts");
        let endpoint = format!("http://127.0.0.1:{port}");
        crate::harness::install_crypto_provider();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
        let server = S3Server { child, endpoint, http };
        let deadline = Instant::now() + Duration::from_secs(60);
        while server.http.get(&server.endpoint).send().await.is_err() {
            assert!(Instant::now() < deadline, "moto did not start within 60 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Some(server)
    }

    /// The media configuration for `bucket` on this server (the bucket is created).
    pub fn config(&self, bucket: &str) -> String {
        // moto takes an unsigned bucket creation.
        let url = format!("{}/{bucket}", self.endpoint);
        let status = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                    runtime.block_on(async { self.http.put(&url).send().await.map(|r| r.status()) })
                })
                .join()
                .unwrap()
        })
        .expect("create the bucket");
        assert!(status.is_success(), "bucket creation: {status}");
        format!(
            "[media]\nbackend = \"s3\"\n[media.s3]\nendpoint = \"{}\"\nbucket = \"{bucket}\"\nregion = \"us-east-1\"\n\
             path_style = true\n",
            self.endpoint
        )
    }

    /// Every key in `bucket`.
    pub async fn keys(&self, bucket: &str) -> Vec<String> {
        let body = self
            .http
            .get(format!("{}/{bucket}?list-type=2&max-keys=1000", self.endpoint))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        body.split("<Key>").skip(1).filter_map(|part| part.split("</Key>").next()).map(str::to_owned).collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
