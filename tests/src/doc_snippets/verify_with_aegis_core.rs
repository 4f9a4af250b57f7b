use aegis_webhook_core::secret::SigningSecret;
use aegis_webhook_core::signing::{DEFAULT_TIMESTAMP_TOLERANCE, VerifyError, verify_standard_webhook};

/// Checks the Standard Webhooks headers of a request: `webhook-timestamp`
/// within five minutes of now, then any `v1` entry of `webhook-signature`
/// matching in constant time.
pub fn verify_with_aegis_core(
    secret: &SigningSecret,
    webhook_id: &str,
    webhook_timestamp: &str,
    webhook_signature: &str,
    raw_body: &[u8],
) -> Result<(), VerifyError> {
    verify_standard_webhook(
        secret,
        webhook_id,
        webhook_timestamp,
        webhook_signature,
        raw_body,
        chrono::Utc::now(),
        DEFAULT_TIMESTAMP_TOLERANCE,
    )
}
