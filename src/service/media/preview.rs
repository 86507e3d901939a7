//! URL previews: fetching what users link to without letting them aim the server at its own
//! network, and reading the page's OpenGraph tags with a real HTML parser (`scraper`).
//!
//! [`SafeFetcher`] is the only way media code reaches arbitrary URLs (previews, and a remote
//! media server's `Location` redirect). Every address it connects to passes an [`AddressPolicy`]
//! — names through its resolver, IP literals before the request — and it follows redirects
//! itself, checking each hop, with limits on hops, bytes and time.

use std::{net::IpAddr, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use hickory_resolver::TokioResolver;
use reqwest::Url;
use serde_json::{Map, Value};

use crate::{config::IpNet, federation::discovery::is_forbidden};

/// Which addresses outbound media requests may reach.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    /// Private, loopback and link-local addresses allowed too.
    pub allow_private: bool,
    /// Allowed whatever else says (`url_preview.allowed_ip_ranges`).
    pub allowed: Vec<IpNet>,
    /// Refused on top of the private ranges (`url_preview.denied_ip_ranges`).
    pub denied: Vec<IpNet>,
}

impl AddressPolicy {
    pub fn allows(&self, ip: IpAddr) -> bool {
        if self.allowed.iter().any(|net| net.contains(ip)) {
            return true;
        }
        if self.denied.iter().any(|net| net.contains(ip)) {
            return false;
        }
        self.allow_private || !is_forbidden(ip)
    }
}

/// reqwest's resolver for [`SafeFetcher`]: hickory's answers, less what the policy refuses.
struct CheckedResolve {
    dns: TokioResolver,
    policy: Arc<AddressPolicy>,
}

impl reqwest::dns::Resolve for CheckedResolve {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let dns = self.dns.clone();
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let fqdn = if host.ends_with('.') { host.clone() } else { format!("{host}.") };
            let lookup = dns.lookup_ip(fqdn).await.map_err(|err| format!("cannot resolve {host}: {err}"))?;
            let allowed: Vec<SocketAddr> =
                lookup.iter().filter(|ip| policy.allows(*ip)).map(|ip| SocketAddr::new(ip, 0)).collect();
            if allowed.is_empty() {
                return Err(format!("{host} resolves only to addresses this server may not reach").into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

/// An HTTP client for URLs users (or other servers) name.
pub struct SafeFetcher {
    http: reqwest::Client,
    policy: Arc<AddressPolicy>,
    max_redirects: usize,
    timeout: Duration,
}

/// A fetched body and what the server said it is.
pub struct Fetched {
    /// The URL after redirects.
    pub url: Url,
    pub content_type: Option<String>,
    pub body: Bytes,
}

impl SafeFetcher {
    pub fn new(
        dns: TokioResolver,
        policy: AddressPolicy,
        tls: rustls::ClientConfig,
        timeout: Duration,
        max_redirects: usize,
    ) -> Result<SafeFetcher, String> {
        let policy = Arc::new(policy);
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .dns_resolver(Arc::new(CheckedResolve { dns, policy: policy.clone() }))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .http1_only()
            .connect_timeout(timeout)
            .timeout(timeout)
            .user_agent(concat!("Hearth/", env!("CARGO_PKG_VERSION"), " (URL preview)"))
            .build()
            .map_err(|err| format!("HTTP client for media: {err}"))?;
        Ok(SafeFetcher { http, policy, max_redirects, timeout })
    }

    /// Checks what the resolver never sees: the scheme, and a host that is an IP literal.
    fn check(&self, url: &Url) -> Result<(), String> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("only http and https URLs are fetched, not {}", url.scheme()));
        }
        match url.host() {
            Some(url::Host::Ipv4(ip)) if !self.policy.allows(IpAddr::V4(ip)) => {
                Err(format!("{ip} is an address this server may not reach"))
            }
            Some(url::Host::Ipv6(ip)) if !self.policy.allows(IpAddr::V6(ip)) => {
                Err(format!("{ip} is an address this server may not reach"))
            }
            None => Err("the URL has no host".to_owned()),
            _ => Ok(()),
        }
    }

    /// POSTs `body` as JSON to `url` (no redirects followed) and returns the answer.
    pub async fn post_json(&self, url: &str, body: &serde_json::Value) -> Result<reqwest::Response, String> {
        let url = Url::parse(url).map_err(|err| format!("not a URL: {err}"))?;
        self.check(&url)?;
        self.http
            .post(url.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|err| format!("{}: {}", url, crate::federation::client::error_chain(&err)))
    }

    /// GETs `url` (following at most `max_redirects` redirects, each checked), and starts reading
    /// the answer; errors say why in words fit for a user.
    pub async fn get(&self, url: &str) -> Result<(Url, reqwest::Response), String> {
        let mut url = Url::parse(url).map_err(|err| format!("not a URL: {err}"))?;
        for _ in 0..=self.max_redirects {
            self.check(&url)?;
            let response = self
                .http
                .get(url.clone())
                .send()
                .await
                .map_err(|err| format!("{}: {}", url, crate::federation::client::error_chain(&err)))?;
            if response.status().is_redirection()
                && let Some(location) = response.headers().get(http::header::LOCATION)
            {
                let location = location.to_str().map_err(|_| "a redirect to an unreadable location".to_owned())?;
                url = url.join(location).map_err(|err| format!("a redirect to a bad URL: {err}"))?;
                continue;
            }
            if !response.status().is_success() {
                return Err(format!("{url} answered {}", response.status()));
            }
            return Ok((url, response));
        }
        Err(format!("more than {} redirects", self.max_redirects))
    }

    /// GETs `url` and reads at most `max` bytes of it, all within the fetcher's time limit.
    pub async fn fetch(&self, url: &str, max: usize) -> Result<Fetched, String> {
        let work = async {
            let (url, mut response) = self.get(url).await?;
            if response.content_length().is_some_and(|len| len > max as u64) {
                return Err(format!("{url} is larger than {max} bytes"));
            }
            let content_type = response
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned);
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(|err| format!("{url}: {err}"))? {
                if body.len() + chunk.len() > max {
                    return Err(format!("{url} is larger than {max} bytes"));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Fetched { url, content_type, body: Bytes::from(body) })
        };
        tokio::time::timeout(self.timeout, work).await.map_err(|_| format!("{url} took too long"))?
    }
}

/// The media type of a `Content-Type` value, lower-case, without parameters.
pub fn essence(content_type: Option<&str>) -> String {
    content_type.unwrap_or_default().split(';').next().unwrap_or_default().trim().to_ascii_lowercase()
}

/// The OpenGraph description of an HTML page: its `og:*` meta tags, with the `<title>`, the
/// meta description and the first image standing in for missing ones (as Synapse does). The
/// image, if any, is returned as an absolute URL for the caller to fetch.
pub fn open_graph(html: &str, page: &Url) -> (Map<String, Value>, Option<Url>) {
    let document = scraper::Html::parse_document(html);
    let mut og = Map::new();
    let meta = scraper::Selector::parse("meta").expect("valid selector");
    let mut description = None;
    for element in document.select(&meta) {
        let value = element.value();
        let Some(content) = value.attr("content") else { continue };
        let key = value.attr("property").or_else(|| value.attr("name")).unwrap_or_default();
        let content = content.trim();
        if key.starts_with("og:") && !og.contains_key(key) && key.len() < 64 && content.len() < 4096 {
            og.insert(key.to_owned(), Value::String(content.to_owned()));
        } else if key.eq_ignore_ascii_case("description") && description.is_none() {
            description = Some(content.to_owned());
        }
    }
    if !og.contains_key("og:title") {
        let title = scraper::Selector::parse("title").expect("valid selector");
        if let Some(element) = document.select(&title).next() {
            let text = element.text().collect::<String>();
            let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
            if !text.is_empty() {
                og.insert("og:title".to_owned(), Value::String(truncate(&text, 512)));
            }
        }
    }
    if !og.contains_key("og:description")
        && let Some(description) = description.filter(|d| !d.is_empty())
    {
        og.insert("og:description".to_owned(), Value::String(truncate(&description, 1024)));
    }
    let image = match og.get("og:image").and_then(Value::as_str) {
        Some(src) => page.join(src).ok(),
        None => {
            let img = scraper::Selector::parse("img[src]").expect("valid selector");
            document
                .select(&img)
                .next()
                .and_then(|element| element.value().attr("src"))
                .and_then(|src| page.join(src).ok())
        }
    };
    og.remove("og:image");
    (og, image)
}

fn truncate(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(max_chars).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_graph_tags_are_read_and_missing_ones_filled_in() {
        let page = Url::parse("https://example.org/posts/1").unwrap();
        let html = r#"<html><head><title> A   title </title>
            <meta property="og:site_name" content="Example">
            <meta name="description" content="What it is about">
            <meta property="og:image" content="/img/cover.png">
            </head><body><img src="other.png"></body></html>"#;
        let (og, image) = open_graph(html, &page);
        assert_eq!(og["og:title"], "A title");
        assert_eq!(og["og:description"], "What it is about");
        assert_eq!(og["og:site_name"], "Example");
        assert_eq!(image.unwrap().as_str(), "https://example.org/img/cover.png");
        assert!(!og.contains_key("og:image"));
    }

    #[test]
    fn the_first_image_stands_in_for_og_image() {
        let page = Url::parse("https://example.org/a/").unwrap();
        let (_, image) = open_graph("<p>hi</p><img src='b.jpg'>", &page);
        assert_eq!(image.unwrap().as_str(), "https://example.org/a/b.jpg");
    }

    #[test]
    fn private_addresses_are_refused_unless_allowed() {
        let policy = AddressPolicy::default();
        assert!(!policy.allows("127.0.0.1".parse().unwrap()));
        assert!(!policy.allows("10.1.2.3".parse().unwrap()));
        assert!(!policy.allows("169.254.169.254".parse().unwrap()));
        assert!(policy.allows("93.184.216.34".parse().unwrap()));
        let policy = AddressPolicy {
            allowed: vec!["127.0.0.0/8".parse().unwrap()],
            denied: vec!["93.184.0.0/16".parse().unwrap()],
            ..AddressPolicy::default()
        };
        assert!(policy.allows("127.0.0.1".parse().unwrap()));
        assert!(!policy.allows("93.184.216.34".parse().unwrap()));
    }
}
