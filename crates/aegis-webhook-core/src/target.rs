//! Where webhooks may point: the URL rules and the address policy that keeps
//! workers from being turned against internal networks (SSRF).
//!
//! The same [`TargetPolicy`] is applied when a webhook is created and again when
//! a worker connects, after DNS resolution.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::LazyLock;

use ipnet::IpNet;
use url::{Host, Url};

const MAX_URL_CHARS: usize = 2048;

/// Address ranges that are not the public internet: loopback, private, CGNAT,
/// link-local (with the cloud metadata address), documentation, benchmarking,
/// multicast, reserved, and IPv6 forms that embed an IPv4 address.
static NON_PUBLIC_RANGES: LazyLock<Vec<IpNet>> = LazyLock::new(|| {
    [
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/128",
        "::1/128",
        "::/96",
        "64:ff9b::/96",
        "64:ff9b:1::/48",
        "100::/64",
        "2001::/23",
        "2001:db8::/32",
        "2002::/16",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
    ]
    .into_iter()
    .map(|range| range.parse().expect("static ranges are valid"))
    .collect()
});

/// Which addresses workers may connect to: public ones, plus the allow-listed
/// ranges (`AEGIS_ALLOW_PRIVATE_TARGETS`), which may also be reached over `http`.
#[derive(Debug, Clone, Default)]
pub struct TargetPolicy {
    allow_listed: Vec<IpNet>,
}

impl TargetPolicy {
    pub fn new(allow_listed: Vec<IpNet>) -> Self {
        TargetPolicy { allow_listed }
    }

    /// Loopback allowed, as `aegis-webhook dev` and the tests need.
    pub fn allowing_loopback() -> Self {
        TargetPolicy::new(Self::allowing_loopback_ranges().to_vec())
    }

    /// The loopback ranges, IPv4 and IPv6.
    pub fn allowing_loopback_ranges() -> [IpNet; 2] {
        ["127.0.0.0/8".parse().expect("valid"), "::1/128".parse().expect("valid")]
    }

    pub fn is_allow_listed(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.allow_listed.iter().any(|range| range.contains(&ip))
    }

    pub fn is_allowed(&self, ip: IpAddr) -> bool {
        self.is_allow_listed(ip) || is_public(ip)
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:127.0.0.1`) are judged as the IPv4 address
/// they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

pub fn is_public(ip: IpAddr) -> bool {
    let ip = canonical(ip);
    !NON_PUBLIC_RANGES.iter().any(|range| range.contains(&ip))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("url is not an absolute URL: {0}")]
    NotAUrl(String),
    #[error("url is longer than {MAX_URL_CHARS} characters")]
    TooLong,
    #[error("url scheme `{0}` is not allowed; use https")]
    Scheme(String),
    #[error("url must not contain a user name or password")]
    Credentials,
    #[error("url has no host")]
    NoHost,
    #[error("url port 0 is not allowed")]
    Port,
    #[error("url host `{0}` must be a fully qualified domain name")]
    SingleLabel(String),
    #[error("url host `{0}` is a private, loopback, link-local or reserved address")]
    NonPublic(String),
    #[error("url must use https (http only for allow-listed development targets)")]
    HttpNotAllowed,
}

/// A webhook target that passed [`TargetPolicy`] at parse time.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookUrl(Url);

impl WebhookUrl {
    pub fn parse(text: &str, policy: &TargetPolicy) -> Result<Self, UrlError> {
        let text = text.trim();
        if text.chars().count() > MAX_URL_CHARS {
            return Err(UrlError::TooLong);
        }
        let url = Url::parse(text).map_err(|error| UrlError::NotAUrl(error.to_string()))?;
        let scheme = url.scheme();
        if scheme != "https" && scheme != "http" {
            return Err(UrlError::Scheme(scheme.to_owned()));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(UrlError::Credentials);
        }
        if url.port() == Some(0) {
            return Err(UrlError::Port);
        }
        // The url crate has already normalised decimal, octal and hex IPv4 forms
        // ("http://2130706433/", "http://0x7f.1/") into dotted addresses.
        let literal_ip = match url.host().ok_or(UrlError::NoHost)? {
            Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
            Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
            Host::Domain(domain) => {
                let name = domain.trim_end_matches('.').to_ascii_lowercase();
                if name == "localhost" || name.ends_with(".localhost") {
                    // Always resolves to loopback (RFC 6761).
                    Some(IpAddr::V4(Ipv4Addr::LOCALHOST))
                } else if !name.contains('.') {
                    return Err(UrlError::SingleLabel(domain.to_owned()));
                } else {
                    None
                }
            }
        };
        let allow_listed = match literal_ip {
            Some(ip) if !policy.is_allowed(ip) => {
                return Err(UrlError::NonPublic(url.host_str().unwrap_or_default().to_owned()));
            }
            Some(ip) => policy.is_allow_listed(ip),
            // Names are resolved and checked again at connect time.
            None => false,
        };
        if scheme == "http" && !allow_listed {
            return Err(UrlError::HttpNotAllowed);
        }
        Ok(WebhookUrl(url))
    }

    /// A URL read back from storage: [`WebhookUrl::parse`] checked it against
    /// the policy when the webhook was saved, and the worker's resolver checks
    /// every address at connect time, so only its syntax is read here.
    pub fn from_stored(text: &str) -> Result<Self, UrlError> {
        Url::parse(text)
            .map(WebhookUrl)
            .map_err(|error| UrlError::NotAUrl(error.to_string()))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    pub fn as_url(&self) -> &Url {
        &self.0
    }
}

impl fmt::Debug for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("WebhookUrl").field(&self.0.as_str()).finish()
    }
}

impl fmt::Display for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

/// An address the policy refused at connect time.
#[derive(Debug, thiserror::Error)]
#[error("refused to connect to {0}: not a public address and not allow-listed")]
pub struct RefusedAddress(pub IpAddr);

#[cfg(test)]
mod tests {
    use super::*;

    fn strict() -> TargetPolicy {
        TargetPolicy::default()
    }

    #[test]
    fn public_https_urls_are_accepted() {
        for url in [
            "https://your-app.com/webhooks/aegis",
            "https://hooks.example.org:8443/a?b=c",
            "https://93.184.216.34/hook",
            "https://[2606:2800:220:1:248:1893:25c8:1946]/hook",
            "https://example.com./trailing-dot",
        ] {
            assert!(WebhookUrl::parse(url, &strict()).is_ok(), "{url} should be accepted");
        }
    }

    #[test]
    fn hostile_and_malformed_urls_are_refused() {
        let cases = [
            ("not a url", "not an absolute URL"),
            ("/relative/path", "not an absolute URL"),
            ("file:///etc/passwd", "scheme `file`"),
            ("gopher://example.com/", "scheme `gopher`"),
            ("ftp://example.com/", "scheme `ftp`"),
            ("http://example.com/hook", "must use https"),
            ("https://user:pass@example.com/", "user name or password"),
            ("https://user@example.com/", "user name or password"),
            ("https://example.com:0/", "port 0"),
            ("https://example.com:99999/", "not an absolute URL"),
            ("https://intranet/", "fully qualified"),
            ("https://localhost/", "private"),
            ("https://api.localhost/", "private"),
            ("https://127.0.0.1/", "private"),
            ("https://127.1/", "private"),
            ("https://2130706433/", "private"),
            ("https://0x7f000001/", "private"),
            ("https://0177.0.0.1/", "private"),
            ("https://0.0.0.0/", "private"),
            ("https://10.0.0.1/", "private"),
            ("https://172.16.5.4/", "private"),
            ("https://192.168.1.1/", "private"),
            ("https://100.64.0.1/", "private"),
            ("https://169.254.169.254/latest/meta-data/", "private"),
            ("https://224.0.0.1/", "private"),
            ("https://255.255.255.255/", "private"),
            ("https://[::1]/", "private"),
            ("https://[::]/", "private"),
            ("https://[::ffff:127.0.0.1]/", "private"),
            ("https://[::ffff:169.254.169.254]/", "private"),
            ("https://[fe80::1]/", "private"),
            ("https://[fd00:ec2::254]/", "private"),
            ("https://[64:ff9b::a9fe:a9fe]/", "private"),
            ("https://[2002:7f00:1::]/", "private"),
            ("https://[ff02::1]/", "private"),
        ];
        for (url, expected) in cases {
            let error = WebhookUrl::parse(url, &strict()).expect_err(url).to_string();
            assert!(error.contains(expected), "{url}: `{error}` should contain `{expected}`");
        }
    }

    #[test]
    fn allow_listed_ranges_may_be_reached_over_http() {
        let policy = TargetPolicy::allowing_loopback();
        assert!(WebhookUrl::parse("http://127.0.0.1:9000/hook", &policy).is_ok());
        assert!(WebhookUrl::parse("http://localhost:9000/hook", &policy).is_ok());
        assert!(WebhookUrl::parse("http://[::1]:9000/hook", &policy).is_ok());
        assert!(WebhookUrl::parse("http://10.0.0.1/hook", &policy).is_err());
        assert!(WebhookUrl::parse("http://example.com/hook", &policy).is_err());
        assert!(policy.is_allowed("::ffff:127.0.0.1".parse().expect("ip")));
    }
}
