//! Media across servers: a user of one server downloads (and thumbnails) what a user of another
//! uploaded, fetched over `/_matrix/federation/v1/media/download` and cached; the federation
//! endpoints need a signed request and serve only their own server's media.

use std::io::Cursor;

use serde_json::Value;

use crate::{
    graph::two_servers,
    harness::{Account, Backend, TestServer},
    testnet::{TestNet, x_matrix},
};

crate::backend_tests!(media_uploaded_on_one_server_is_downloaded_and_thumbnailed_on_another,);

fn picture() -> Vec<u8> {
    let image = image::RgbImage::from_fn(640, 480, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 7]));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(image).write_to(&mut Cursor::new(&mut out), image::ImageFormat::Jpeg).unwrap();
    out
}

async fn get(server: &TestServer, account: &Account, path: &str) -> reqwest::Response {
    server.http.get(server.url(path)).bearer_auth(&account.access_token).send().await.unwrap()
}

async fn media_uploaded_on_one_server_is_downloaded_and_thumbnailed_on_another(backend: Backend) {
    let net = TestNet::new().await;
    let (mut a, b) = two_servers(&net, backend).await;
    let alice = a.server.register("alice").await;
    let bob = b.server.register("bob").await;
    let bytes = picture();
    let response = a
        .server
        .http
        .post(a.server.url("/_matrix/media/v3/upload?filename=holiday.jpg"))
        .bearer_auth(&alice.access_token)
        .header("content-type", "image/jpeg")
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    let uploaded: Value = response.json().await.unwrap();
    let mxc = uploaded["content_uri"].as_str().expect("content_uri").to_owned();
    let path = mxc.strip_prefix("mxc://").unwrap().to_owned();
    assert!(path.starts_with("a.test/"), "{mxc}");
    let media_id = path.trim_start_matches("a.test/").to_owned();

    // Bob, on b.test, downloads it: b.test fetches it from a.test.
    let download = get(&b.server, &bob, &format!("/_matrix/client/v1/media/download/{path}")).await;
    if download.status() != 200 {
        for line in b.server.log_lines().iter().chain(a.server.log_lines().iter()).filter(|l| l.contains("media")) {
            eprintln!("{line}");
        }
    }
    assert_eq!(download.status(), 200);
    assert_eq!(download.headers()["content-type"], "image/jpeg");
    assert!(download.headers()["content-disposition"].to_str().unwrap().contains("holiday.jpg"));
    assert_eq!(download.bytes().await.unwrap().as_ref(), bytes.as_slice(), "byte-identical across servers");
    let thumbnail =
        get(&b.server, &bob, &format!("/_matrix/client/v1/media/thumbnail/{path}?width=96&height=96&method=crop"))
            .await;
    assert_eq!(thumbnail.status(), 200);
    let image = image::load_from_memory(&thumbnail.bytes().await.unwrap()).unwrap();
    assert_eq!((image.width(), image.height()), (96, 96));

    // The federation endpoint itself: signed requests only, our own media only, multipart.
    let (client, base) = net.client_for(&a);
    let uri = format!("/_matrix/federation/v1/media/download/{media_id}");
    let unsigned = client.get(format!("{base}{uri}")).send().await.unwrap();
    assert_eq!(unsigned.status(), 401);
    let auth = x_matrix(&b.signing_key(), &b.name, &a.name, "GET", &uri, None);
    let signed = client.get(format!("{base}{uri}")).header("Authorization", auth).send().await.unwrap();
    assert_eq!(signed.status(), 200);
    let content_type = signed.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("multipart/mixed; boundary="), "{content_type}");
    let body = signed.bytes().await.unwrap();
    let boundary = content_type.split("boundary=").nth(1).unwrap();
    let parts: Vec<&[u8]> = split(&body, format!("--{boundary}").as_bytes());
    assert!(parts.iter().any(|part| part.ends_with(&bytes) || contains(part, &bytes)), "the file is a part");
    let unknown = "/_matrix/federation/v1/media/download/nosuchmedia";
    let auth = x_matrix(&b.signing_key(), &b.name, &a.name, "GET", unknown, None);
    let missing = client.get(format!("{base}{unknown}")).header("Authorization", auth).send().await.unwrap();
    assert_eq!(missing.status(), 404);

    // Cached: with a.test gone, b.test still serves it.
    a.server.stop();
    let cached = get(&b.server, &bob, &format!("/_matrix/client/v1/media/download/{path}")).await;
    assert_eq!(cached.status(), 200);
    assert_eq!(cached.bytes().await.unwrap().as_ref(), bytes.as_slice());
    // Media of a server that cannot be reached, and not cached, is a gateway error.
    let gone = get(&b.server, &bob, "/_matrix/client/v1/media/download/a.test/neverseen").await;
    assert_eq!(gone.status(), 502);
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

fn split<'a>(body: &'a [u8], separator: &[u8]) -> Vec<&'a [u8]> {
    let mut parts = Vec::new();
    let mut rest = body;
    while let Some(at) = rest.windows(separator.len()).position(|window| window == separator) {
        parts.push(&rest[..at]);
        rest = &rest[at + separator.len()..];
    }
    parts.push(rest);
    parts
}
