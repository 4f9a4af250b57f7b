//! Request signing: the seed's `X-Aegis-Signature` and the Standard Webhooks
//! `webhook-signature`, both over the exact bytes sent.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::secret::SigningSecret;

type HmacSha256 = Hmac<Sha256>;

const AEGIS_PREFIX: &str = "sha256=";

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes a key of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// `sha256=` + lowercase hex HMAC-SHA256 of the body, keyed with the secret's UTF-8
/// bytes: what the seed's `crypto.createHmac('sha256', secret)` computes.
pub fn aegis_signature(secret: &SigningSecret, body: &[u8]) -> String {
    let digest = hmac_sha256(secret.expose().as_bytes(), &[body]);
    format!("{AEGIS_PREFIX}{}", hex::encode(digest))
}

/// Checks an `X-Aegis-Signature` header value in constant time.
pub fn verify_aegis_signature(secret: &SigningSecret, body: &[u8], header: &str) -> bool {
    let expected = aegis_signature(secret, body);
    expected.as_bytes().ct_eq(header.as_bytes()).into()
}

/// One `v1,<base64>` entry of the Standard Webhooks `webhook-signature` header,
/// over `id.timestamp.body`. The key is the base64 part of a `whsec_` secret, as the
/// specification's libraries expect, or the secret's bytes for any other secret.
pub fn standard_webhooks_signature(secret: &SigningSecret, message_id: &str, timestamp: i64, body: &[u8]) -> String {
    let key = secret.standard_webhooks_key();
    let timestamp = timestamp.to_string();
    let digest = hmac_sha256(&key, &[message_id.as_bytes(), b".", timestamp.as_bytes(), b".", body]);
    format!("v1,{}", BASE64.encode(digest))
}

/// How far a `webhook-timestamp` may be from the receiver's clock, as in the
/// Standard Webhooks libraries: wide enough for clock skew and queueing, narrow
/// enough that a captured request cannot be replayed later.
pub const DEFAULT_TIMESTAMP_TOLERANCE: std::time::Duration = std::time::Duration::from_secs(5 * 60);

/// Why a Standard Webhooks request was refused by [`verify_standard_webhook`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("webhook-timestamp is not a whole number of seconds")]
    MalformedTimestamp,
    #[error("webhook-timestamp is {0} s away from now, beyond the tolerance")]
    TimestampOutOfTolerance(i64),
    #[error("no v1 signature in webhook-signature matches")]
    NoMatchingSignature,
}

/// Verifies a Standard Webhooks request the way a receiver should: the
/// timestamp within `tolerance` of `now` (replay protection), then any of the
/// space-separated `v1,<base64>` entries matching in constant time (during a
/// rotation the header carries one per secret). Entries of other versions are
/// ignored, as the specification requires.
pub fn verify_standard_webhook(
    secret: &SigningSecret,
    message_id: &str,
    timestamp_header: &str,
    signature_header: &str,
    body: &[u8],
    now: chrono::DateTime<chrono::Utc>,
    tolerance: std::time::Duration,
) -> Result<(), VerifyError> {
    let timestamp: i64 = timestamp_header
        .trim()
        .parse()
        .map_err(|_| VerifyError::MalformedTimestamp)?;
    let skew = now.timestamp().saturating_sub(timestamp);
    if skew.unsigned_abs() > tolerance.as_secs() {
        return Err(VerifyError::TimestampOutOfTolerance(skew));
    }
    let expected = standard_webhooks_signature(secret, message_id, timestamp, body);
    let matched = signature_header
        .split_whitespace()
        .filter(|entry| entry.starts_with("v1,"))
        .fold(false, |matched, entry| {
            matched | bool::from(entry.as_bytes().ct_eq(expected.as_bytes()))
        });
    if matched {
        Ok(())
    } else {
        Err(VerifyError::NoMatchingSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(text: &str) -> SigningSecret {
        SigningSecret::parse(text).expect("valid secret")
    }

    #[test]
    fn aegis_signature_matches_a_known_hmac_sha256_vector() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        // The key is shorter than our minimum, so build the digest directly as well.
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", &[b"what do ya want for nothing?"])),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let signature = aegis_signature(&secret("your-webhook-secret"), b"{}");
        assert!(signature.starts_with("sha256="));
        assert_eq!(signature.len(), 7 + 64);
        assert_eq!(signature, signature.to_lowercase());
    }

    #[test]
    fn verification_accepts_the_right_signature_only() {
        let key = secret("your-webhook-secret");
        let body = br#"{"event":"X"}"#;
        let header = aegis_signature(&key, body);
        assert!(verify_aegis_signature(&key, body, &header));
        assert!(!verify_aegis_signature(&key, b"{\"event\":\"Y\"}", &header));
        assert!(!verify_aegis_signature(&secret("another-secret-value"), body, &header));
        assert!(!verify_aegis_signature(&key, body, &header[..header.len() - 1]));
    }

    #[test]
    fn standard_webhooks_signature_matches_the_specification_example() {
        // The example of the Standard Webhooks specification (and its libraries' tests).
        let key = secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            standard_webhooks_signature(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn standard_webhook_verification_checks_timestamp_and_any_v1_entry() {
        let key = secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let other = secret("whsec_dGhpcyBpcyBhbm90aGVyIHNlY3JldCBrZXkh");
        let body = br#"{"test": 2432232314}"#;
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let sent_at = chrono::DateTime::from_timestamp(1614265330, 0).expect("valid");
        let tolerance = DEFAULT_TIMESTAMP_TOLERANCE;
        let signature = standard_webhooks_signature(&key, id, sent_at.timestamp(), body);
        let verify = |header: &str, timestamp: &str, now| {
            verify_standard_webhook(&key, id, timestamp, header, body, now, tolerance)
        };

        assert_eq!(verify(&signature, "1614265330", sent_at), Ok(()));
        // During a rotation: the other secret's entry first, a future version ignored.
        let rotating = format!(
            "v2,abc {} {signature}",
            standard_webhooks_signature(&other, id, 1614265330, body)
        );
        assert_eq!(verify(&rotating, "1614265330", sent_at), Ok(()));

        let late = sent_at + chrono::Duration::seconds(301);
        assert_eq!(
            verify(&signature, "1614265330", late),
            Err(VerifyError::TimestampOutOfTolerance(301))
        );
        let early = sent_at - chrono::Duration::seconds(301);
        assert_eq!(
            verify(&signature, "1614265330", early),
            Err(VerifyError::TimestampOutOfTolerance(-301))
        );
        assert_eq!(
            verify(&signature, "16142653x0", sent_at),
            Err(VerifyError::MalformedTimestamp)
        );
        // A signature over another timestamp, a tampered body, another secret.
        assert_eq!(
            verify(&signature, "1614265331", sent_at),
            Err(VerifyError::NoMatchingSignature)
        );
        assert_eq!(
            verify_standard_webhook(&key, id, "1614265330", &signature, b"{}", sent_at, tolerance),
            Err(VerifyError::NoMatchingSignature)
        );
        assert_eq!(
            verify_standard_webhook(&other, id, "1614265330", &signature, body, sent_at, tolerance),
            Err(VerifyError::NoMatchingSignature)
        );
        assert_eq!(verify("", "1614265330", sent_at), Err(VerifyError::NoMatchingSignature));
    }
}
