use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Checks `X-Aegis-Signature`: `sha256=` + hex HMAC-SHA256 of the raw body,
/// keyed with the secret's UTF-8 bytes (all of it, `whsec_` included).
/// `verify_slice` compares in constant time.
pub fn verify_aegis_signature(raw_body: &[u8], signature_header: &str, secret: &str) -> bool {
    let Some(Ok(signature)) = signature_header.strip_prefix("sha256=").map(hex::decode) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(raw_body);
    mac.verify_slice(&signature).is_ok()
}
