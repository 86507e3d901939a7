//! The content repository: uploads (direct and asynchronous), authenticated and legacy
//! downloads, ranges, thumbnails of real images, limits and quotas, files that must never run in
//! the server's origin, operators' commands, URL previews, and the S3 backend against a real
//! S3-compatible server (moto) on loopback.

use std::{io::Cursor, time::Duration};

use reqwest::{StatusCode, header};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{Account, TestServer, assert_error, backend_tests};

/// Bytes that no two tests share and that do not compress into anything short.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as u8
        })
        .collect()
}

fn png(width: u32, height: u32) -> Vec<u8> {
    let image =
        image::RgbaImage::from_fn(width, height, |x, y| image::Rgba([(x % 256) as u8, (y % 256) as u8, 90, 255]));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgba8(image).write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

fn jpeg(width: u32, height: u32) -> Vec<u8> {
    let image = image::RgbImage::from_fn(width, height, |x, y| image::Rgb([(x % 256) as u8, 40, (y % 256) as u8]));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(image).write_to(&mut Cursor::new(&mut out), image::ImageFormat::Jpeg).unwrap();
    out
}

fn animated_gif(frames: u32) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = image::codecs::gif::GifEncoder::new(&mut out);
        encoder.set_repeat(image::codecs::gif::Repeat::Infinite).unwrap();
        for i in 0..frames {
            let buffer = image::RgbaImage::from_pixel(200, 100, image::Rgba([(i * 60) as u8, 10, 200, 255]));
            encoder.encode_frame(image::Frame::new(buffer)).unwrap();
        }
    }
    out
}

/// A PNG whose header claims 30,000×30,000 pixels (900 megapixels) in a file of a few dozen
/// bytes: decoding it would take gigabytes.
fn png_bomb() -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for byte in bytes {
            crc ^= u32::from(*byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut typed = kind.to_vec();
        typed.extend_from_slice(data);
        out.extend_from_slice(&typed);
        out.extend_from_slice(&crc32(&typed).to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut header = Vec::new();
    header.extend_from_slice(&30_000u32.to_be_bytes());
    header.extend_from_slice(&30_000u32.to_be_bytes());
    header.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &header);
    // A zlib stream of a few zero bytes: far from the rows the header promises.
    chunk(&mut out, b"IDAT", &[0x78, 0x9c, 0x63, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01]);
    chunk(&mut out, b"IEND", &[]);
    out
}

async fn upload(
    server: &TestServer,
    account: &Account,
    bytes: Vec<u8>,
    content_type: &str,
    filename: Option<&str>,
) -> (StatusCode, Value) {
    let mut url = server.url("/_matrix/media/v3/upload");
    if let Some(name) = filename {
        url.push_str(&format!("?filename={}", crate::harness::enc(name)));
    }
    let response = server
        .http
        .post(url)
        .bearer_auth(&account.access_token)
        .header(header::CONTENT_TYPE, content_type)
        .body(bytes)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn upload_ok(
    server: &TestServer,
    account: &Account,
    bytes: Vec<u8>,
    content_type: &str,
    filename: Option<&str>,
) -> String {
    let (status, body) = upload(server, account, bytes, content_type, filename).await;
    assert_eq!(status, 200, "upload: {body}");
    body["content_uri"].as_str().expect("content_uri").to_owned()
}

/// `server/id` of an `mxc://` URI.
fn path_of(mxc: &str) -> &str {
    mxc.strip_prefix("mxc://").expect("an mxc URI")
}

async fn download(server: &TestServer, token: Option<&str>, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = server.http.get(server.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

async fn error_of(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn header_of<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response.headers().get(name).map(|v| v.to_str().unwrap()).unwrap_or("")
}

/// Every object file under the local media directory.
fn stored_objects(server: &TestServer) -> Vec<std::path::PathBuf> {
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&server.data_dir().join("media/sha256"), &mut out);
    out
}

backend_tests! {
    async fn an_upload_comes_back_byte_for_byte_with_its_type_and_name(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let bytes = noise(3 * 1024 * 1024 + 17, 1);
        let mxc = upload_ok(&server, &alice, bytes.clone(), "audio/ogg", Some("voice note 🎤.ogg")).await;
        assert!(mxc.starts_with("mxc://localhost/"), "{mxc}");

        let path = format!("/_matrix/client/v1/media/download/{}", path_of(&mxc));
        let response = download(&server, Some(&bob.access_token), &path, &[]).await;
        assert_eq!(response.status(), 200);
        assert_eq!(header_of(&response, "content-type"), "audio/ogg");
        let disposition = header_of(&response, "content-disposition").to_owned();
        assert!(disposition.starts_with("inline"), "{disposition}");
        assert!(disposition.contains("filename*=utf-8''voice%20note%20%F0%9F%8E%A4.ogg"), "{disposition}");
        assert!(header_of(&response, "content-security-policy").starts_with("sandbox"));
        assert_eq!(header_of(&response, "x-content-type-options"), "nosniff");
        assert_eq!(header_of(&response, "accept-ranges"), "bytes");
        let etag = header_of(&response, "etag").to_owned();
        assert_eq!(response.bytes().await.unwrap().as_ref(), bytes.as_slice(), "byte-identical");

        // A file name in the path overrides the stored one.
        let named = download(&server, Some(&bob.access_token), &format!("{path}/other.ogg"), &[]).await;
        assert!(header_of(&named, "content-disposition").contains("filename=other.ogg"));
        // The ETag revalidates.
        let again = download(&server, Some(&bob.access_token), &path, &[("if-none-match", &etag)]).await;
        assert_eq!(again.status(), 304);

        // Authenticated media: no token, no file; the legacy endpoint does not serve it.
        assert_error(&error_of(download(&server, None, &path, &[]).await).await, 401, "M_MISSING_TOKEN");
        let legacy = format!("/_matrix/media/v3/download/{}", path_of(&mxc));
        assert_error(&error_of(download(&server, None, &legacy, &[]).await).await, 404, "M_NOT_FOUND");
        // Unknown media.
        let missing = download(&server, Some(&bob.access_token), "/_matrix/client/v1/media/download/localhost/nosuchmedia", &[]).await;
        assert_error(&error_of(missing).await, 404, "M_NOT_FOUND");
        // The config says how large an upload may be.
        let (status, config) = server.get("/_matrix/client/v1/media/config", Some(&bob.access_token)).await;
        assert_eq!(status, 200);
        assert_eq!(config["m.upload.size"], json!(100 * 1024 * 1024));
    }

    async fn identical_uploads_are_stored_once_and_deleted_with_the_last_uri(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bytes = noise(200_000, 2);
        let first = upload_ok(&server, &alice, bytes.clone(), "application/pdf", Some("a.pdf")).await;
        let second = upload_ok(&server, &alice, bytes.clone(), "application/pdf", Some("b.pdf")).await;
        assert_ne!(first, second);
        assert_eq!(stored_objects(&server).len(), 1, "one object for both URIs");

        let out = server.cli(&["media", "delete", &first], None);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let gone = download(&server, Some(&alice.access_token), &format!("/_matrix/client/v1/media/download/{}", path_of(&first)), &[]).await;
        assert_eq!(gone.status(), 404);
        let kept = download(&server, Some(&alice.access_token), &format!("/_matrix/client/v1/media/download/{}", path_of(&second)), &[]).await;
        assert_eq!(kept.bytes().await.unwrap().as_ref(), bytes.as_slice());
        assert_eq!(stored_objects(&server).len(), 1);
        assert!(server.cli(&["media", "delete", &second], None).status.success());
        assert!(stored_objects(&server).is_empty(), "the last URI took the object with it");
        let out = server.cli(&["media", "delete", &second], None);
        assert!(!out.status.success(), "deleting twice says so");
    }

    async fn byte_ranges_serve_video_seeking_and_resumed_downloads(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bytes = noise(1_000_000, 3);
        let mxc = upload_ok(&server, &alice, bytes.clone(), "video/mp4", None).await;
        let path = format!("/_matrix/client/v1/media/download/{}", path_of(&mxc));
        let token = Some(alice.access_token.as_str());

        let part = download(&server, token, &path, &[("range", "bytes=1000-1999")]).await;
        assert_eq!(part.status(), 206);
        assert_eq!(header_of(&part, "content-range"), "bytes 1000-1999/1000000");
        assert_eq!(header_of(&part, "content-length"), "1000");
        assert_eq!(part.bytes().await.unwrap().as_ref(), &bytes[1000..2000]);

        let tail = download(&server, token, &path, &[("range", "bytes=-10")]).await;
        assert_eq!(tail.status(), 206);
        assert_eq!(tail.bytes().await.unwrap().as_ref(), &bytes[bytes.len() - 10..]);

        let open = download(&server, token, &path, &[("range", "bytes=999990-")]).await;
        assert_eq!(open.bytes().await.unwrap().as_ref(), &bytes[999_990..]);

        let beyond = download(&server, token, &path, &[("range", "bytes=2000000-")]).await;
        assert_eq!(beyond.status(), 416);
        assert_eq!(header_of(&beyond, "content-range"), "bytes */1000000");

        // If-Range naming another version gets the whole file; garbage is ignored.
        let changed = download(&server, token, &path, &[("range", "bytes=0-9"), ("if-range", "\"other\"")]).await;
        assert_eq!(changed.status(), 200);
        assert_eq!(changed.bytes().await.unwrap().len(), bytes.len());
        let garbage = download(&server, token, &path, &[("range", "pages=1-2")]).await;
        assert_eq!(garbage.status(), 200);
    }

    async fn the_size_limit_refuses_before_the_body_and_the_quota_holds(backend) {
        let server = TestServer::start_with(backend, "[media]\nmax_upload_bytes = 100000\nuser_quota_bytes = 150000").await;
        let alice = server.register("alice").await;
        // A declared length over the limit is refused at once, with no body sent at all.
        let addr = server.base_url.trim_start_matches("http://").to_owned();
        let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/octet-stream\r\nContent-Length: 1000000000\r\n\r\n",
            alice.access_token
        );
        socket.write_all(head.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), socket.read(&mut answer)).await.expect("answered before any body").unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains("M_TOO_LARGE"), "{answer}");

        // A streamed (chunked) body is stopped when it passes the limit.
        let chunks = futures_util::stream::iter((0..30).map(|i| Ok::<_, std::io::Error>(noise(10_000, i))));
        let response = server
            .http
            .post(server.url("/_matrix/media/v3/upload"))
            .bearer_auth(&alice.access_token)
            .body(reqwest::Body::wrap_stream(chunks))
            .send()
            .await
            .unwrap();
        assert_error(&error_of(response).await, 413, "M_TOO_LARGE");

        // The quota: 90 kB twice is over 150 kB.
        upload_ok(&server, &alice, noise(90_000, 4), "application/octet-stream", None).await;
        let over = upload(&server, &alice, noise(90_000, 5), "application/octet-stream", None).await;
        assert_error(&over, 403, "M_RESOURCE_LIMIT_EXCEEDED");
        // Nothing of the refused uploads is left behind.
        assert_eq!(stored_objects(&server).len(), 1);
        let usage = server.cli(&["media", "list-user", &alice.user_id], None);
        let text = String::from_utf8_lossy(&usage.stdout);
        assert!(text.contains("1 files, 90000 bytes"), "{text}");
    }

    async fn the_legacy_endpoints_serve_media_stored_while_authenticated_media_was_off(backend) {
        let mut server = TestServer::start_with(backend, "[media]\nenable_authenticated_media = false").await;
        let alice = server.register("alice").await;
        let old = upload_ok(&server, &alice, png(64, 64), "image/png", Some("old.png")).await;
        let legacy = format!("/_matrix/media/v3/download/{}", path_of(&old));
        let response = download(&server, None, &legacy, &[]).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.bytes().await.unwrap().as_ref(), png(64, 64).as_slice());
        let thumb = download(&server, None, &format!("/_matrix/media/r0/thumbnail/{}?width=32&height=32", path_of(&old)), &[]).await;
        assert_eq!(thumb.status(), 200);
        // Switched on (Synapse's "freeze"): what was stored before is still served the old way,
        // what comes after only through the authenticated endpoints.
        server.set_config("[media]\nenable_authenticated_media = true");
        server.restart();
        let new = upload_ok(&server, &alice, noise(10, 13), "text/plain", None).await;
        assert_eq!(download(&server, None, &legacy, &[]).await.status(), 200);
        let response = download(&server, None, &format!("/_matrix/media/v3/download/{}", path_of(&new)), &[]).await;
        assert_error(&error_of(response).await, 404, "M_NOT_FOUND");
        let authed = download(&server, Some(&alice.access_token), &format!("/_matrix/client/v1/media/download/{}", path_of(&new)), &[]).await;
        assert_eq!(authed.status(), 200);
    }

    async fn uploads_are_rate_limited_per_user(backend) {
        let server = TestServer::start_with(
            backend,
            "[rate_limits]\nenabled = true\n[rate_limits.media_upload]\nper_second = 0.01\nburst = 2",
        )
        .await;
        let alice = server.register("alice").await;
        upload_ok(&server, &alice, noise(100, 10), "text/plain", None).await;
        upload_ok(&server, &alice, noise(100, 11), "text/plain", None).await;
        let limited = upload(&server, &alice, noise(100, 12), "text/plain", None).await;
        assert_error(&limited, 429, "M_LIMIT_EXCEEDED");
        assert!(limited.1["retry_after_ms"].as_u64().unwrap() > 0);
        // Creating a URI to upload to later counts against the same budget.
        assert_error(&server.post("/_matrix/media/v1/create", Some(&alice.access_token), json!({})).await, 429, "M_LIMIT_EXCEEDED");
    }

    async fn an_mxc_uri_created_first_is_uploaded_to_once_and_waited_for(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let (status, created) = server.post("/_matrix/media/v1/create", Some(&alice.access_token), json!({})).await;
        assert_eq!(status, 200, "{created}");
        let mxc = created["content_uri"].as_str().unwrap().to_owned();
        assert!(created["unused_expires_at"].as_i64().unwrap() > 0);
        let path = format!("/_matrix/client/v1/media/download/{}", path_of(&mxc));

        // Not there yet: a short wait ends in M_NOT_YET_UPLOADED.
        let early = download(&server, Some(&bob.access_token), &format!("{path}?timeout_ms=300"), &[]).await;
        assert_error(&error_of(early).await, 504, "M_NOT_YET_UPLOADED");

        // A download waiting for it gets it as soon as it is uploaded.
        let waiting = {
            let (http, url, token) = (server.http.clone(), server.url(&format!("{path}?timeout_ms=20000")), bob.access_token.clone());
            tokio::spawn(async move { http.get(url).bearer_auth(token).send().await.unwrap() })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let upload_path = format!("/_matrix/media/v3/upload/{}?filename=later.txt", path_of(&mxc));
        let put = |token: &str, body: &'static [u8]| {
            server.http.put(server.url(&upload_path)).bearer_auth(token.to_owned()).header("content-type", "text/plain").body(body).send()
        };
        // Only its creator may upload to it.
        assert_error(&error_of(put(&bob.access_token, b"not mine").await.unwrap()).await, 403, "M_FORBIDDEN");
        assert_eq!(put(&alice.access_token, b"arrived later").await.unwrap().status(), 200);
        let got = waiting.await.unwrap();
        assert_eq!(got.status(), 200);
        assert!(header_of(&got, "content-disposition").contains("later.txt"));
        assert_eq!(got.bytes().await.unwrap().as_ref(), b"arrived later");
        // Once uploaded, it cannot be overwritten.
        assert_error(&error_of(put(&alice.access_token, b"again").await.unwrap()).await, 409, "M_CANNOT_OVERWRITE_MEDIA");

        // At most five pending URIs per user (the default).
        for _ in 0..5 {
            assert_eq!(server.post("/_matrix/media/v1/create", Some(&bob.access_token), json!({})).await.0, 200);
        }
        assert_error(&server.post("/_matrix/media/v1/create", Some(&bob.access_token), json!({})).await, 429, "M_LIMIT_EXCEEDED");
    }

    async fn thumbnails_of_real_images_have_the_asked_size_and_format(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let token = Some(alice.access_token.as_str());
        let png_mxc = upload_ok(&server, &alice, png(1000, 500), "image/png", Some("wide.png")).await;
        let jpeg_mxc = upload_ok(&server, &alice, jpeg(640, 960), "image/jpeg", None).await;
        let gif_mxc = upload_ok(&server, &alice, animated_gif(4), "image/gif", None).await;
        let thumb = |mxc: &str, query: &str| format!("/_matrix/client/v1/media/thumbnail/{}?{query}", path_of(mxc));

        let scaled = download(&server, token, &thumb(&png_mxc, "width=320&height=240&method=scale"), &[]).await;
        assert_eq!(scaled.status(), 200);
        assert_eq!(header_of(&scaled, "content-type"), "image/png");
        let image = image::load_from_memory(&scaled.bytes().await.unwrap()).unwrap();
        assert_eq!((image.width(), image.height()), (320, 160), "fits the box, keeps the aspect ratio");

        let cropped = download(&server, token, &thumb(&png_mxc, "width=96&height=96&method=crop"), &[]).await;
        let image = image::load_from_memory(&cropped.bytes().await.unwrap()).unwrap();
        assert_eq!((image.width(), image.height()), (96, 96));

        // A request between sizes is served from the next size up.
        let between = download(&server, token, &thumb(&jpeg_mxc, "width=500&height=400&method=scale"), &[]).await;
        assert_eq!(header_of(&between, "content-type"), "image/jpeg");
        let image = image::load_from_memory_with_format(&between.bytes().await.unwrap(), image::ImageFormat::Jpeg).unwrap();
        assert_eq!((image.width(), image.height()), (320, 480));

        // Animated when asked, still otherwise.
        let animated = download(&server, token, &thumb(&gif_mxc, "width=96&height=96&method=scale&animated=true"), &[]).await;
        assert_eq!(header_of(&animated, "content-type"), "image/gif");
        let bytes = animated.bytes().await.unwrap();
        let frames = image::AnimationDecoder::into_frames(image::codecs::gif::GifDecoder::new(Cursor::new(bytes)).unwrap()).count();
        assert_eq!(frames, 4);
        let still = download(&server, token, &thumb(&gif_mxc, "width=96&height=96&method=scale"), &[]).await;
        assert_eq!(header_of(&still, "content-type"), "image/png");

        // Bad parameters are Matrix errors.
        let bad = download(&server, token, &thumb(&png_mxc, "width=0&height=10"), &[]).await;
        assert_error(&error_of(bad).await, 400, "M_INVALID_PARAM");
        let bad = download(&server, token, &thumb(&png_mxc, "width=10&height=10&method=stretch"), &[]).await;
        assert_error(&error_of(bad).await, 400, "M_INVALID_PARAM");
        let bad = download(&server, token, &thumb(&png_mxc, "height=10"), &[]).await;
        assert_error(&error_of(bad).await, 400, "M_MISSING_PARAM");
    }

    async fn uploaded_html_svg_and_a_decompression_bomb_are_served_safely(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let token = Some(alice.access_token.as_str());
        let html = upload_ok(&server, &alice, b"<html><script>alert(document.cookie)</script></html>".to_vec(), "text/html", Some("x.html")).await;
        let svg = upload_ok(&server, &alice, b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>".to_vec(), "image/svg+xml", None).await;
        for mxc in [&html, &svg] {
            let response = download(&server, token, &format!("/_matrix/client/v1/media/download/{}", path_of(mxc)), &[]).await;
            assert_eq!(response.status(), 200);
            assert!(header_of(&response, "content-disposition").starts_with("attachment"), "{mxc}");
            let csp = header_of(&response, "content-security-policy");
            assert!(csp.contains("sandbox") && csp.contains("script-src 'none'"), "{csp}");
            assert_eq!(header_of(&response, "x-content-type-options"), "nosniff");
            // Not thumbnailed: an SVG is not decoded as an image.
            let thumb = download(&server, token, &format!("/_matrix/client/v1/media/thumbnail/{}?width=32&height=32", path_of(mxc)), &[]).await;
            assert_error(&error_of(thumb).await, 400, "M_UNKNOWN");
        }
        let bomb = upload_ok(&server, &alice, png_bomb(), "image/png", Some("bomb.png")).await;
        let started = std::time::Instant::now();
        let thumb = download(&server, token, &format!("/_matrix/client/v1/media/thumbnail/{}?width=32&height=32", path_of(&bomb)), &[]).await;
        assert_error(&error_of(thumb).await, 400, "M_UNKNOWN");
        assert!(started.elapsed() < Duration::from_secs(10), "refused from the header, not decoded");
        // The server is unharmed, and the file itself can still be downloaded.
        let file = download(&server, token, &format!("/_matrix/client/v1/media/download/{}", path_of(&bomb)), &[]).await;
        assert_eq!(file.bytes().await.unwrap().as_ref(), png_bomb().as_slice());
    }

    async fn a_missing_or_damaged_file_is_a_clean_error(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let token = Some(alice.access_token.as_str());
        let damaged = upload_ok(&server, &alice, noise(5000, 6), "application/zip", None).await;
        let objects = stored_objects(&server);
        assert_eq!(objects.len(), 1);
        std::fs::write(&objects[0], b"truncated").unwrap();
        let response = download(&server, token, &format!("/_matrix/client/v1/media/download/{}", path_of(&damaged)), &[]).await;
        assert_error(&error_of(response).await, 502, "M_UNKNOWN");
        std::fs::remove_file(&objects[0]).unwrap();
        let response = download(&server, token, &format!("/_matrix/client/v1/media/download/{}", path_of(&damaged)), &[]).await;
        assert_error(&error_of(response).await, 404, "M_NOT_FOUND");
    }

    async fn operators_quarantine_list_and_measure_media(backend) {
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let bob = server.register("bob").await;
        let mxc = upload_ok(&server, &alice, noise(1234, 7), "image/png", Some("evidence.png")).await;
        upload_ok(&server, &bob, noise(99, 8), "text/plain", None).await;
        let path = format!("/_matrix/client/v1/media/download/{}", path_of(&mxc));

        let out = server.cli(&["media", "quarantine", &mxc], None);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(download(&server, Some(&bob.access_token), &path, &[]).await.status(), 404);
        assert!(server.cli(&["media", "quarantine", "--release", &mxc], None).status.success());
        assert_eq!(download(&server, Some(&bob.access_token), &path, &[]).await.status(), 200);

        let listed = String::from_utf8_lossy(&server.cli(&["media", "list-user", "alice"], None).stdout).into_owned();
        assert!(listed.contains(&mxc) && listed.contains("evidence.png") && listed.contains("1 files, 1234 bytes"), "{listed}");
        let usage = String::from_utf8_lossy(&server.cli(&["media", "usage"], None).stdout).into_owned();
        let alice_line = usage.lines().position(|l| l.contains(&alice.user_id)).expect("alice listed");
        let bob_line = usage.lines().position(|l| l.contains(&bob.user_id)).expect("bob listed");
        assert!(alice_line < bob_line, "the largest first: {usage}");
        let purged = server.cli(&["media", "purge-remote", "--before", "now"], None);
        assert!(String::from_utf8_lossy(&purged.stdout).contains("purged 0"), "no remote media here");
        assert!(!server.cli(&["media", "quarantine", "https://not-an-mxc"], None).status.success());
    }

    async fn url_previews_read_open_graph_and_never_reach_private_addresses_unless_allowed(backend) {
        let site = PreviewSite::start().await;
        let url = format!("http://{}/article", site.addr);
        // Off by default.
        let server = TestServer::start(backend).await;
        let alice = server.register("alice").await;
        let off = server.get(&format!("/_matrix/client/v1/media/preview_url?url={}", crate::harness::enc(&url)), Some(&alice.access_token)).await;
        assert_error(&off, 404, "M_UNRECOGNIZED");
        drop(server);

        // On, but loopback is private: refused.
        let server = TestServer::start_with(backend, "[media.url_preview]\nenabled = true").await;
        let alice = server.register("alice").await;
        let refused = server.get(&format!("/_matrix/client/v1/media/preview_url?url={}", crate::harness::enc(&url)), Some(&alice.access_token)).await;
        assert_error(&refused, 400, "M_UNKNOWN");
        // A redirect to a private address is refused too, even from an allowed start.
        drop(server);

        let server = TestServer::start_with(
            backend,
            "[media.url_preview]\nenabled = true\nallowed_ip_ranges = [\"127.0.0.0/8\"]\ndenied_ip_ranges = [\"127.0.0.99/32\"]",
        )
        .await;
        let alice = server.register("alice").await;
        let (status, og) = server.get(&format!("/_matrix/client/v1/media/preview_url?url={}", crate::harness::enc(&url)), Some(&alice.access_token)).await;
        assert_eq!(status, 200, "{og}");
        assert_eq!(og["og:title"], "Hearth ships media");
        assert_eq!(og["og:description"], "Uploads, thumbnails and previews");
        assert_eq!(og["og:image:width"], 120);
        let image = og["og:image"].as_str().expect("the image, stored as media");
        let fetched = download(&server, Some(&alice.access_token), &format!("/_matrix/client/v1/media/download/{}", path_of(image)), &[]).await;
        assert_eq!(fetched.bytes().await.unwrap().as_ref(), png(120, 60).as_slice());
        // Cached: asked again, the site is not.
        let hits = site.hits();
        let (status, again) = server.get(&format!("/_matrix/client/v1/media/preview_url?url={}", crate::harness::enc(&url)), Some(&alice.access_token)).await;
        assert_eq!((status, &again), (StatusCode::OK, &og));
        assert_eq!(site.hits(), hits);
        // A redirect to a denied address, and a URL that is not http, are refused.
        let redirect = format!("http://{}/to-denied", site.addr);
        let refused = server.get(&format!("/_matrix/client/v1/media/preview_url?url={}", crate::harness::enc(&redirect)), Some(&alice.access_token)).await;
        assert_error(&refused, 400, "M_UNKNOWN");
        let refused = server.get(&format!("/_matrix/client/v1/media/preview_url?url={}", crate::harness::enc("file:///etc/passwd")), Some(&alice.access_token)).await;
        assert_error(&refused, 400, "M_UNKNOWN");
    }

    async fn the_s3_backend_round_trips_files_and_thumbnails(backend) {
        let Some(s3) = crate::media_s3::S3Server::start().await else { return };
        let server = TestServer::start_with_env(backend, &s3.config("hearth-media"), &crate::media_s3::CREDENTIALS).await;
        let alice = server.register("alice").await;
        let token = Some(alice.access_token.as_str());
        // Larger than one multipart part (5 MiB), so the upload is a real multipart upload.
        let bytes = noise(12 * 1024 * 1024 + 5, 9);
        let mxc = upload_ok(&server, &alice, bytes.clone(), "video/webm", Some("clip.webm")).await;
        let path = format!("/_matrix/client/v1/media/download/{}", path_of(&mxc));
        let response = download(&server, token, &path, &[]).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.bytes().await.unwrap().as_ref(), bytes.as_slice(), "byte-identical through S3");
        let part = download(&server, token, &path, &[("range", "bytes=6000000-6000099")]).await;
        assert_eq!(part.status(), 206);
        assert_eq!(part.bytes().await.unwrap().as_ref(), &bytes[6_000_000..6_000_100]);
        let picture = upload_ok(&server, &alice, png(400, 400), "image/png", None).await;
        let thumb = download(&server, token, &format!("/_matrix/client/v1/media/thumbnail/{}?width=96&height=96&method=crop", path_of(&picture)), &[]).await;
        let image = image::load_from_memory(&thumb.bytes().await.unwrap()).unwrap();
        assert_eq!((image.width(), image.height()), (96, 96));
        // The objects are in the bucket, under their hashes.
        let keys = s3.keys("hearth-media").await;
        assert!(keys.iter().filter(|k| k.starts_with("sha256/")).count() >= 3, "{keys:?}");
        assert!(!keys.iter().any(|k| k.starts_with("staging/")), "no staging object left: {keys:?}");
        // Restarted, the server still serves it.
        let mut server = server;
        server.restart();
        let response = download(&server, token, &path, &[]).await;
        assert_eq!(response.bytes().await.unwrap().len(), bytes.len());
    }
}

/// A small web site on loopback for URL previews: an article with OpenGraph tags, its image, and
/// a redirect to a denied address.
struct PreviewSite {
    addr: std::net::SocketAddr,
    hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl PreviewSite {
    async fn start() -> PreviewSite {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = hits.clone();
        let task = tokio::spawn(async move {
            // Bounded: the tests make a handful of requests.
            for _ in 0..100 {
                let Ok((mut socket, _)) = listener.accept().await else { return };
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let n = socket.read(&mut buf).await.unwrap_or(0);
                    let request = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let path = request.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    let (status, content_type, body, extra): (&str, &str, Vec<u8>, String) = match path.as_str() {
                        "/article" => (
                            "200 OK",
                            "text/html; charset=utf-8",
                            br#"<html><head><title>ignored title</title>
                               <meta property="og:title" content="Hearth ships media">
                               <meta property="og:description" content="Uploads, thumbnails and previews">
                               <meta property="og:image" content="/cover.png"></head><body>Hi</body></html>"#
                                .to_vec(),
                            String::new(),
                        ),
                        "/cover.png" => ("200 OK", "image/png", png(120, 60), String::new()),
                        "/to-denied" => {
                            ("302 Found", "text/plain", Vec::new(), "Location: http://127.0.0.99:9/\r\n".to_owned())
                        }
                        _ => ("404 Not Found", "text/plain", b"no".to_vec(), String::new()),
                    };
                    let head = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = socket.write_all(head.as_bytes()).await;
                    let _ = socket.write_all(&body).await;
                });
            }
        });
        PreviewSite { addr, hits, task }
    }

    fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for PreviewSite {
    fn drop(&mut self) {
        self.task.abort();
    }
}
