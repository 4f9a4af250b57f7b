//! Request signing: the seed's `X-Aegis-Signature` and the Standard Webhooks
//! `webhook-signature`, both over the exact bytes sent. The algorithms are
//! the receivers' own crate's, `aegis-webhook-verify`, so what Aegis signs and
//! what receivers check can never drift apart; this module only types them
//! with [`SigningSecret`] and the domain's clock.

pub use aegis_webhook_verify::{DEFAULT_TIMESTAMP_TOLERANCE, VerifyError};

use crate::secret::SigningSecret;

/// `sha256=` + lowercase hex HMAC-SHA256 of the body, keyed with the secret's
/// UTF-8 bytes: what the seed's `crypto.createHmac('sha256', secret)` computes.
pub fn aegis_signature(secret: &SigningSecret, body: &[u8]) -> String {
    aegis_webhook_verify::aegis_signature(secret.expose(), body)
}

/// Checks an `X-Aegis-Signature` header value in constant time.
pub fn verify_aegis_signature(secret: &SigningSecret, body: &[u8], header: &str) -> bool {
    aegis_webhook_verify::verify_aegis_signature(secret.expose(), body, header)
}

/// One `v1,<base64>` entry of the Standard Webhooks `webhook-signature` header,
/// over `id.timestamp.body`. The key is the base64 part of a `whsec_` secret, as the
/// specification's libraries expect, or the secret's bytes for any other secret.
pub fn standard_webhooks_signature(secret: &SigningSecret, message_id: &str, timestamp: i64, body: &[u8]) -> String {
    aegis_webhook_verify::standard_webhooks_signature(secret.expose(), message_id, timestamp, body)
}

/// Verifies a Standard Webhooks request as a receiver should (see
/// [`aegis_webhook_verify::verify_standard_webhook_at`]), at `now`.
pub fn verify_standard_webhook(
    secret: &SigningSecret,
    message_id: &str,
    timestamp_header: &str,
    signature_header: &str,
    body: &[u8],
    now: chrono::DateTime<chrono::Utc>,
    tolerance: std::time::Duration,
) -> Result<(), VerifyError> {
    aegis_webhook_verify::verify_standard_webhook_at(
        secret.expose(),
        message_id,
        timestamp_header,
        signature_header,
        body,
        now.into(),
        tolerance,
    )
}

/// The headers of one attempt of a delivery, in the order they are sent:
/// what the worker sends and what the portal shows. `webhook-signature`
/// carries one signature per secret while a rotation's grace period lasts.
pub fn delivery_headers(
    delivery_id: &str,
    event_type: crate::event::EventType,
    attempt: u32,
    timestamp: i64,
    body: &[u8],
    secret: &SigningSecret,
    previous_secret: Option<&SigningSecret>,
) -> [(&'static str, String); 8] {
    let mut signatures = standard_webhooks_signature(secret, delivery_id, timestamp, body);
    if let Some(previous) = previous_secret {
        signatures.push(' ');
        signatures.push_str(&standard_webhooks_signature(previous, delivery_id, timestamp, body));
    }
    [
        ("content-type", "application/json".to_owned()),
        ("x-aegis-signature", aegis_signature(secret, body)),
        ("x-aegis-event", event_type.as_str().to_owned()),
        ("x-aegis-delivery", delivery_id.to_owned()),
        ("x-aegis-attempt", attempt.to_string()),
        ("webhook-id", delivery_id.to_owned()),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", signatures),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_secret_signs_as_the_receivers_crate_verifies() {
        // The algorithms are tested in aegis-webhook-verify; here, that a
        // `SigningSecret` (a generated `whsec_` one) reaches them whole.
        let secret = SigningSecret::generate();
        let body = br#"{"event":"POAM_OVERDUE"}"#;
        let header = aegis_signature(&secret, body);
        assert!(verify_aegis_signature(&secret, body, &header));
        assert!(aegis_webhook_verify::verify_aegis_signature(
            secret.expose(),
            body,
            &header
        ));

        let now = chrono::DateTime::from_timestamp(1_764_000_000, 0).expect("valid");
        let signature = standard_webhooks_signature(&secret, "msg_1", now.timestamp(), body);
        let check = |at| {
            verify_standard_webhook(
                &secret,
                "msg_1",
                "1764000000",
                &signature,
                body,
                at,
                DEFAULT_TIMESTAMP_TOLERANCE,
            )
        };
        assert_eq!(check(now), Ok(()));
        assert_eq!(
            check(now + chrono::Duration::seconds(301)),
            Err(VerifyError::TimestampOutOfTolerance(301))
        );
        let other = SigningSecret::generate();
        assert_eq!(
            verify_standard_webhook(
                &other,
                "msg_1",
                "1764000000",
                &signature,
                body,
                now,
                DEFAULT_TIMESTAMP_TOLERANCE
            ),
            Err(VerifyError::NoMatchingSignature)
        );
    }
}
