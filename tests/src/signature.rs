//! Receivers' view of signatures: a real delivery verified the way customers do,
//! with the seed document's Node.js snippet and with an independent Rust HMAC.

use std::process::Command;
use std::sync::OnceLock;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::support::Received;

/// The seed document's TypeScript snippet, with only its type annotations
/// removed so that Node.js runs it as it is; a wrapper feeds it the delivery.
const SEED_SNIPPET_JS: &str = r#"
const crypto = require('crypto');

function verifyWebhookSignature(
  payload,
  signature,
  secret
) {
  const hmac = crypto.createHmac('sha256', secret);
  const expectedSignature = 'sha256=' + hmac.update(payload).digest('hex');
  return crypto.timingSafeEqual(
    Buffer.from(signature),
    Buffer.from(expectedSignature)
  );
}

const payload = require('fs').readFileSync(process.env.PAYLOAD_FILE, 'utf8');
process.stdout.write(String(verifyWebhookSignature(payload, process.env.SIGNATURE, process.env.SECRET)));
"#;

fn snippet_path() -> &'static std::path::Path {
    static PATH: OnceLock<std::path::PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = crate::support::scratch_dir().join("verify.js");
        std::fs::write(&path, SEED_SNIPPET_JS).expect("write the snippet");
        path
    })
}

/// Runs the seed's snippet; `None` when Node.js is missing outside CI (reported).
fn node_verifies(payload: &[u8], signature: &str, secret: &str) -> Option<bool> {
    let payload_file = crate::support::scratch_dir().join("payload.json");
    std::fs::write(&payload_file, payload).expect("write the payload");
    let output = Command::new("node")
        .arg(snippet_path())
        .env("PAYLOAD_FILE", &payload_file)
        .env("SIGNATURE", signature)
        .env("SECRET", secret)
        .output();
    let output = match output {
        Ok(output) => output,
        Err(error) if std::env::var_os("CI").is_none() => {
            eprintln!("\n!!!!!!!! SKIPPING THE NODE.JS SIGNATURE CHECK: cannot run `node` ({error}) !!!!!!!!\n");
            return None;
        }
        Err(error) => panic!("Node.js is required in CI for the seed snippet check: {error}"),
    };
    assert!(
        output.status.success(),
        "node failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Some(String::from_utf8_lossy(&output.stdout) == "true")
}

/// Asserts that `request` carries a valid `X-Aegis-Signature` for `secret`,
/// checked three ways, and a valid Standard Webhooks signature.
pub fn assert_signed(request: &Received, secret: &str) {
    let header = request.header("x-aegis-signature");

    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(&request.body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(header, expected, "independent HMAC-SHA256 check");

    let signing_secret = aegis_webhook_core::secret::SigningSecret::parse(secret).expect("valid secret");
    assert!(aegis_webhook_core::signing::verify_aegis_signature(
        &signing_secret,
        &request.body,
        header
    ));

    let timestamp: i64 = request.header("webhook-timestamp").parse().expect("unix seconds");
    let standard = aegis_webhook_core::signing::standard_webhooks_signature(
        &signing_secret,
        request.header("webhook-id"),
        timestamp,
        &request.body,
    );
    // The first signature is the current secret's; a second, during a rotation's
    // grace period, is the previous secret's.
    let first = request
        .header("webhook-signature")
        .split(' ')
        .next()
        .expect("a signature");
    assert_eq!(first, standard);

    if let Some(verified) = node_verifies(&request.body, header, secret) {
        assert!(verified, "the seed's Node.js snippet rejects a real delivery");
        let mut tampered = request.body.to_vec();
        tampered.push(b' ');
        assert_eq!(
            node_verifies(&tampered, header, secret),
            Some(false),
            "the snippet must catch tampering"
        );
    }
}
