use aegis_webhook_verify::{VerifyError, verify_standard_webhook};

/// Checks the Standard Webhooks headers of a request: `webhook-timestamp`
/// within five minutes of now, then any `v1` entry of `webhook-signature`
/// matching in constant time. (`verify_aegis_signature(secret, raw_body,
/// x_aegis_signature)` checks the other header.)
pub fn verify_with_aegis_webhook_verify(
    secret: &str,
    webhook_id: &str,
    webhook_timestamp: &str,
    webhook_signature: &str,
    raw_body: &[u8],
) -> Result<(), VerifyError> {
    verify_standard_webhook(secret, webhook_id, webhook_timestamp, webhook_signature, raw_body)
}
