//! Webhook signing secrets, and their encryption at rest.
//!
//! A [`SigningSecret`] never prints; a [`SecretCipher`] seals it with an AEAD
//! (ChaCha20-Poly1305) under a key from configuration before it reaches the
//! database. The stored form names the key it was sealed with, so keys can rotate.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as BASE64, URL_SAFE_NO_PAD as BASE64_URL};
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use sha2::{Digest, Sha256};

// Generated secrets look like Standard Webhooks secrets: `whsec_` + base64.
use aegis_webhook_verify::GENERATED_SECRET_PREFIX as GENERATED_PREFIX;

const MIN_SECRET_CHARS: usize = 16;
const MAX_SECRET_CHARS: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("secret must be at least {MIN_SECRET_CHARS} characters")]
    TooShort,
    #[error("secret must be at most {MAX_SECRET_CHARS} characters")]
    TooLong,
    #[error("secret must not contain whitespace or control characters")]
    BadCharacters,
    #[error("secret must be at least {0} characters")]
    ShorterThan(usize),
    #[error("secret must have at least {0} different characters")]
    TooFewDistinct(usize),
}

/// How strong a secret chosen by a customer must be (generated ones always
/// are). Configurable: `AEGIS_SECRET_MIN_CHARS`, `AEGIS_SECRET_MIN_DISTINCT_CHARS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecretRules {
    pub min_chars: usize,
    pub min_distinct_chars: usize,
}

impl Default for SecretRules {
    fn default() -> Self {
        SecretRules {
            min_chars: MIN_SECRET_CHARS,
            min_distinct_chars: 8,
        }
    }
}

/// The shared secret a webhook's requests are signed with.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningSecret(String);

impl SigningSecret {
    pub fn parse(text: &str) -> Result<Self, SecretError> {
        let chars = text.chars().count();
        if chars < MIN_SECRET_CHARS {
            return Err(SecretError::TooShort);
        }
        if chars > MAX_SECRET_CHARS {
            return Err(SecretError::TooLong);
        }
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(SecretError::BadCharacters);
        }
        Ok(SigningSecret(text.to_owned()))
    }

    /// [`SigningSecret::parse`], then the strength `rules` a customer's own
    /// secret must meet: long enough, and not one character repeated.
    pub fn parse_chosen(text: &str, rules: SecretRules) -> Result<Self, SecretError> {
        let secret = Self::parse(text)?;
        if text.chars().count() < rules.min_chars {
            return Err(SecretError::ShorterThan(rules.min_chars));
        }
        let distinct: std::collections::BTreeSet<char> = text.chars().collect();
        if distinct.len() < rules.min_distinct_chars {
            return Err(SecretError::TooFewDistinct(rules.min_distinct_chars));
        }
        Ok(secret)
    }

    /// `whsec_` + base64 of 32 random bytes.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::fill(&mut bytes);
        SigningSecret(format!("{GENERATED_PREFIX}{}", BASE64.encode(bytes)))
    }

    /// Whether it has the form of a generated secret (`whsec_…`).
    pub fn is_generated(&self) -> bool {
        self.0.starts_with(GENERATED_PREFIX)
    }

    /// The secret itself, for signing and for showing it to its owner.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningSecret([redacted])")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CipherError {
    #[error("the secret key must be 32 bytes, base64-encoded")]
    BadKey,
    #[error("stored secret is not in the `v1.<key id>.<sealed>` form")]
    BadFormat,
    #[error("stored secret was sealed with key `{0}`, which is not configured")]
    UnknownKey(String),
    #[error("stored secret failed authentication: wrong key or tampered row")]
    Tampered,
}

/// Seals and opens webhook secrets for storage.
#[derive(Clone)]
pub struct SecretCipher {
    key_id: String,
    cipher: ChaCha20Poly1305,
}

impl fmt::Debug for SecretCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretCipher")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl SecretCipher {
    /// From a base64-encoded 32-byte key (`AEGIS_SECRET_KEY`).
    pub fn from_base64(encoded: &str) -> Result<Self, CipherError> {
        let bytes = BASE64.decode(encoded.trim()).map_err(|_| CipherError::BadKey)?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| CipherError::BadKey)?;
        Ok(Self::from_key(key))
    }

    pub fn from_key(key: [u8; 32]) -> Self {
        // The key id is a short, non-reversible fingerprint of the key.
        let key_id = hex::encode(&Sha256::digest(key)[..4]);
        SecretCipher {
            key_id,
            cipher: ChaCha20Poly1305::new(Key::from_slice(&key)),
        }
    }

    /// A fresh random key, base64-encoded, for first-run setups.
    pub fn generate_key() -> String {
        let mut key = [0u8; 32];
        rand::fill(&mut key);
        BASE64.encode(key)
    }

    pub fn seal(&self, secret: &SigningSecret) -> String {
        let mut nonce = [0u8; 12];
        rand::fill(&mut nonce);
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), secret.expose().as_bytes())
            .expect("ChaCha20-Poly1305 encryption cannot fail for short inputs");
        let mut payload = nonce.to_vec();
        payload.extend_from_slice(&sealed);
        format!("v1.{}.{}", self.key_id, BASE64_URL.encode(payload))
    }

    /// The key id and the sealed payload of a stored secret in the
    /// `v1.<key id>.<sealed>` form.
    fn parts(stored: &str) -> Option<(&str, &str)> {
        let mut parts = stored.splitn(3, '.');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("v1"), Some(key_id), Some(payload)) => Some((key_id, payload)),
            _ => None,
        }
    }

    /// The id of the key a stored secret was sealed with, if it is in the
    /// stored form.
    pub fn key_id_of(stored: &str) -> Option<&str> {
        Self::parts(stored).map(|(key_id, _)| key_id)
    }

    /// Whether `stored` was sealed with another key than this one (by its
    /// key id): `AEGIS_SECRET_KEY` differs from the one that sealed it.
    pub fn sealed_with_another_key(&self, stored: &str) -> bool {
        Self::key_id_of(stored).is_some_and(|key_id| key_id != self.key_id)
    }

    pub fn open(&self, stored: &str) -> Result<SigningSecret, CipherError> {
        let (key_id, payload) = Self::parts(stored).ok_or(CipherError::BadFormat)?;
        if key_id != self.key_id {
            return Err(CipherError::UnknownKey(key_id.to_owned()));
        }
        let payload = BASE64_URL.decode(payload).map_err(|_| CipherError::BadFormat)?;
        if payload.len() < 12 {
            return Err(CipherError::BadFormat);
        }
        let (nonce, sealed) = payload.split_at(12);
        let plain = self
            .cipher
            .decrypt(Nonce::from_slice(nonce), sealed)
            .map_err(|_| CipherError::Tampered)?;
        let text = String::from_utf8(plain).map_err(|_| CipherError::Tampered)?;
        Ok(SigningSecret(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_checked_for_length_and_characters() {
        assert_eq!(SigningSecret::parse("short"), Err(SecretError::TooShort));
        assert_eq!(SigningSecret::parse(&"x".repeat(257)), Err(SecretError::TooLong));
        assert_eq!(
            SigningSecret::parse("has a space in it!"),
            Err(SecretError::BadCharacters)
        );
        assert!(SigningSecret::parse("your-webhook-secret").is_ok());
        // The documentation's secret meets the default strength rules.
        let rules = SecretRules::default();
        assert!(SigningSecret::parse_chosen("your-webhook-secret", rules).is_ok());
        assert_eq!(
            SigningSecret::parse_chosen("aaaaaaaaaaaaaaaaaaaa", rules),
            Err(SecretError::TooFewDistinct(8))
        );
        assert_eq!(
            SigningSecret::parse_chosen("abcdefghijklmnopqrst", SecretRules { min_chars: 24, ..rules }),
            Err(SecretError::ShorterThan(24))
        );
        assert!(
            SecretError::TooFewDistinct(8)
                .to_string()
                .contains("at least 8 different characters")
        );
    }

    #[test]
    fn generated_secrets_are_standard_webhooks_secrets() {
        let secret = SigningSecret::generate();
        let encoded = secret.expose().strip_prefix("whsec_").expect("prefix");
        assert_eq!(BASE64.decode(encoded).expect("base64").len(), 32);
        assert_ne!(secret, SigningSecret::generate());
        assert_eq!(format!("{secret:?}"), "SigningSecret([redacted])");
    }

    #[test]
    fn sealed_secrets_open_with_the_same_key_only() {
        let cipher = SecretCipher::from_base64(&SecretCipher::generate_key()).expect("key");
        let secret = SigningSecret::parse("your-webhook-secret").expect("valid");
        let stored = cipher.seal(&secret);
        assert!(!stored.contains("your-webhook-secret"));
        assert_ne!(stored, cipher.seal(&secret), "a fresh nonce every time");
        assert_eq!(cipher.open(&stored).expect("opens"), secret);

        let other = SecretCipher::from_base64(&SecretCipher::generate_key()).expect("key");
        assert!(matches!(other.open(&stored), Err(CipherError::UnknownKey(_))));
        assert!(other.sealed_with_another_key(&stored));
        assert!(!cipher.sealed_with_another_key(&stored));
        assert!(
            !other.sealed_with_another_key("not sealed at all"),
            "that is another failure"
        );

        let mut tampered = stored.clone();
        tampered.pop();
        tampered.push(if stored.ends_with('A') { 'B' } else { 'A' });
        assert!(matches!(
            cipher.open(&tampered),
            Err(CipherError::Tampered | CipherError::BadFormat)
        ));
    }

    #[test]
    fn bad_keys_are_refused() {
        assert!(matches!(
            SecretCipher::from_base64("not base64!"),
            Err(CipherError::BadKey)
        ));
        assert!(matches!(
            SecretCipher::from_base64("c2hvcnQ="),
            Err(CipherError::BadKey)
        ));
    }
}
