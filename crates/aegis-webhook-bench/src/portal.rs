//! The customer portal (`/portal` on the API) as a customer's browser uses
//! it, for the portal scenario: a session opened from a single-use link
//! (`createPortalSession`), then pages fetched one at a time with the
//! session's cookie, each timed from sending the request to the last byte of
//! its body.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use reqwest::StatusCode;
use reqwest::header;
use uuid::Uuid;

use crate::api::Api;

/// The session cookie's name.
const COOKIE: &str = "aegis_portal=";

/// How long one page may take before the run gives up on it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the session lasts: longer than any run.
pub const SESSION_TTL_SECONDS: u32 = 3600;

/// Rows on the first page of the delivery log (the portal's page size).
pub const LOG_PAGE_ROWS: u64 = 50;

/// A signed-in portal session: a client that does not follow redirects, as
/// the 303 that sets the cookie must be read, and the cookie.
#[derive(Debug, Clone)]
pub struct Session {
    client: reqwest::Client,
    base_url: String,
    cookie: String,
}

/// One page as fetched.
#[derive(Debug)]
pub struct Fetched {
    /// From sending the request to the whole body read.
    pub elapsed: Duration,
    pub body: String,
}

impl Session {
    /// Makes a portal link with `api`'s key and opens it as a browser does
    /// (its page, then the page's POST): the 303 the POST answers carries the
    /// session cookie.
    pub async fn open(api: &Api) -> anyhow::Result<Session> {
        let link = api.create_portal_session(SESSION_TTL_SECONDS).await?;
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(REQUEST_TIMEOUT)
            .build()
            .context("failed to build the portal's HTTP client")?;
        let url = format!("{}{}", api.base_url, link.path);
        let page = client
            .get(&url)
            .send()
            .await
            .context("the portal link's page could not be read")?;
        if page.status() != StatusCode::OK {
            let status = page.status();
            let body = page.text().await.unwrap_or_default();
            anyhow::bail!(
                "the portal link's page answered {status}, not 200 OK: {}",
                excerpt(&body)
            );
        }
        let response = client
            .post(&url)
            .send()
            .await
            .context("the portal link could not be opened")?;
        let status = response.status();
        if status != StatusCode::SEE_OTHER {
            let body = response.text().await.unwrap_or_default();
            anyhow::bail!(
                "opening the portal link answered {status}, not 303 See Other: {}",
                excerpt(&body)
            );
        }
        let cookie = response
            .headers()
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .find_map(session_cookie)
            .context("opening the portal link set no `aegis_portal` cookie")?;
        Ok(Session {
            client,
            base_url: api.base_url.clone(),
            cookie,
        })
    }

    /// GETs `path` with the session's cookie; anything but 200 is an error.
    pub async fn get(&self, path: &str) -> anyhow::Result<Fetched> {
        let started = Instant::now();
        let response = self
            .client
            .get(format!("{}{path}", self.base_url))
            .header(header::COOKIE, format!("{COOKIE}{}", self.cookie))
            .send()
            .await
            .with_context(|| format!("GET {path} failed"))?;
        let status = response.status();
        let body = response
            .text()
            .await
            .with_context(|| format!("GET {path}: the body could not be read"))?;
        let elapsed = started.elapsed();
        if status != StatusCode::OK {
            anyhow::bail!("GET {path} answered {status}, not 200 OK: {}", excerpt(&body));
        }
        Ok(Fetched { elapsed, body })
    }
}

/// The value of `aegis_portal` in a `Set-Cookie` header, if it sets that one.
fn session_cookie(set_cookie: &str) -> Option<String> {
    let value = set_cookie.trim_start().strip_prefix(COOKIE)?;
    let value = value.split(';').next().unwrap_or_default().trim();
    (!value.is_empty()).then(|| value.to_owned())
}

/// The deliveries a page links to (`/portal/deliveries/<uuid>`), in order,
/// each once: the rows of a delivery log page.
pub fn delivery_links(html: &str) -> Vec<Uuid> {
    const LINK: &str = "href=\"/portal/deliveries/";
    let mut ids: Vec<Uuid> = Vec::new();
    let mut rest = html;
    while let Some(at) = rest.find(LINK) {
        rest = &rest[at + LINK.len()..];
        let id = rest.split('"').next().and_then(|id| id.parse().ok());
        if let Some(id) = id
            && !ids.contains(&id)
        {
            ids.push(id);
        }
    }
    ids
}

/// The start of a page's text (its tags left out), on one line, for an
/// error message.
fn excerpt(body: &str) -> String {
    let mut text = String::new();
    let mut in_tag = false;
    for c in body.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                text.push(' ');
            }
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    let text: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match text.char_indices().nth(300) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_read_from_its_set_cookie_header() {
        assert_eq!(
            session_cookie("aegis_portal=abc123; HttpOnly; SameSite=Lax; Path=/portal; Max-Age=3600").as_deref(),
            Some("abc123")
        );
        assert_eq!(session_cookie("aegis_portal=xyz").as_deref(), Some("xyz"));
        assert_eq!(session_cookie("other=abc; Path=/"), None);
        assert_eq!(session_cookie("aegis_portal=; Max-Age=0"), None);
    }

    #[test]
    fn a_log_pages_rows_are_its_delivery_links() {
        let first = Uuid::new_v4();
        let second = Uuid::new_v4();
        let html = format!(
            "<a href=\"/portal/deliveries\">Deliveries</a>\
             <tr><td><a href=\"/portal/deliveries/{first}\">then</a></td></tr>\
             <tr><td><a href=\"/portal/deliveries/{second}\">now</a></td></tr>\
             <form action=\"/portal/deliveries/{second}/redeliver\"></form>\
             <a href=\"/portal/deliveries/{first}\">again</a>\
             <a href=\"/portal/deliveries?webhook=&before={second}\">Older deliveries</a>"
        );
        assert_eq!(delivery_links(&html), vec![first, second]);
        assert!(delivery_links("<p>No deliveries match.</p>").is_empty());
    }

    #[test]
    fn an_error_shows_the_start_of_the_page() {
        assert_eq!(
            excerpt("<title>Slow down</title><p>\n  Too   many <b>requests</b>\n</p>"),
            "Slow down Too many requests"
        );
        assert_eq!(excerpt(&"x".repeat(400)).chars().count(), 301);
    }
}
