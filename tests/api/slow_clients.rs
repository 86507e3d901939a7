//! Clients that send slowly on purpose (slow-loris): a request's headers must arrive within
//! `limits.header_read_timeout_secs` and its body within the request deadline, or the connection
//! ends; while dozens of such clients hang on, everyone else is served as usual. (The listener
//! code is shared by the client and federation listeners; the federation one adds its TLS
//! handshake deadline in front.) The server's own behaviour, not the storage, is under test, so
//! SQLite alone.

use std::time::{Duration, Instant};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::harness::{Backend, TestServer};

const CONFIG: &str = "[limits]\nheader_read_timeout_secs = 2\nrequest_timeout_secs = 3\n";

fn address(server: &TestServer) -> String {
    server.base_url.trim_start_matches("http://").trim_end_matches('/').to_owned()
}

/// Reads until the server closes the connection (or `limit` passes); what it sent.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(answer),
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_headers_are_cut_off_and_other_clients_are_served() {
    let server = TestServer::start_with(Backend::Sqlite, CONFIG).await;
    let addr = address(&server);
    // Forty clients start a request and then send a header byte every half second, forever.
    let mut slow = Vec::new();
    for i in 0..40 {
        let addr = addr.clone();
        slow.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(&addr).await.unwrap();
            let started = Instant::now();
            stream
                .write_all(format!("GET /_matrix/client/versions HTTP/1.1\r\nHost: x\r\nX-Slow-{i}: ").as_bytes())
                .await
                .unwrap();
            for _ in 0..40 {
                if stream.write_all(b"a").await.is_err() {
                    break;
                }
                let mut buf = [0u8; 64];
                match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    _ => {}
                }
            }
            started.elapsed()
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Meanwhile the server answers others at once.
    for _ in 0..5 {
        let (status, body) = server.get("/_matrix/client/versions", None).await;
        assert_eq!(status, 200, "{body}");
    }
    for client in slow {
        let held = client.await.unwrap();
        assert!(held < Duration::from_secs(10), "a slow client held its connection for {held:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_trickling_in_gets_a_timeout_answer() {
    let server = TestServer::start_with(Backend::Sqlite, CONFIG).await;
    let mut stream = TcpStream::connect(address(&server)).await.unwrap();
    let head = "POST /_matrix/client/v3/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{";
    stream.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    // A byte a second: the body would take over fifteen minutes.
    let writer = {
        let (mut read_half, mut write_half) = stream.into_split();
        let writer = tokio::spawn(async move {
            for _ in 0..30 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if write_half.write_all(b" ").await.is_err() {
                    break;
                }
            }
        });
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_secs(15), read_half.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(n)) => {
                    answer.extend_from_slice(&buf[..n]);
                    if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
                        break;
                    }
                }
            }
        }
        let text = String::from_utf8_lossy(&answer).into_owned();
        assert!(text.starts_with("HTTP/1.1 504"), "a timeout answer: {text:?}");
        assert!(text.contains("\"errcode\""), "a Matrix error: {text:?}");
        writer
    };
    assert!(started.elapsed() < Duration::from_secs(10), "answered within the request deadline");
    writer.abort();
    // Nothing was harmed: the server answers as usual.
    let (status, _) = server.get("/_matrix/client/versions", None).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_that_never_sends_a_request_is_closed() {
    let server = TestServer::start_with(Backend::Sqlite, CONFIG).await;
    let mut stream = TcpStream::connect(address(&server)).await.unwrap();
    let closed = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    assert!(closed.is_some(), "the server closed a connection that sent nothing");
}
