//! The verification docs (`docs/verifying-webhooks.md`) against real deliveries.
//! The Python, TypeScript (run by Node.js) and Go snippets are taken out of the
//! page and run; the Rust snippets are the functions of `tests/src/doc_snippets`,
//! compared with the page's text. Every snippet must accept a genuine delivery
//! and refuse a tampered body, a wrong secret and, for the Standard Webhooks
//! headers, a timestamp out of tolerance, so the docs cannot drift from what
//! the system sends.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use aegis_webhook_core::secret::SigningSecret;
use aegis_webhook_core::signing::{VerifyError, standard_webhooks_signature};
use aegis_webhook_tests::doc_snippets::verify_aegis_signature::verify_aegis_signature;
use aegis_webhook_tests::doc_snippets::verify_with_aegis_webhook_verify::verify_with_aegis_webhook_verify;
use serde_json::{Value, json};

use crate::support::{Backend, Received, Receiver, TestApp, envelope, scratch_dir, seed_vulnerability_data};

const DOC: &str = include_str!("../../../docs/verifying-webhooks.md");

/// The page's Rust blocks and the files the tests crate compiles them from.
const RUST_SNIPPETS: [(&str, &str); 2] = [
    (
        "verify_aegis_signature.rs",
        include_str!("../../src/doc_snippets/verify_aegis_signature.rs"),
    ),
    (
        "verify_with_aegis_webhook_verify.rs",
        include_str!("../../src/doc_snippets/verify_with_aegis_webhook_verify.rs"),
    ),
];

/// The webhook documentation's (`seed-webhooks.md`) snippet, which the page
/// must carry verbatim: the one the portal shows beside a secret.
fn seed_typescript() -> String {
    format!("{}\n", aegis_webhook_api::portal::VERIFICATION_SNIPPET)
}

/// The only TypeScript types the page may annotate with (see its convention).
const TYPESCRIPT_TYPES: [&str; 5] = ["string", "number", "boolean", "Buffer", "void"];

// ---------------------------------------------------------------------------
// The page's snippets

#[derive(Debug)]
struct Block {
    language: String,
    title: Option<String>,
    body: String,
}

/// Every fenced block of the page, with the `title="…"` of its info string.
fn blocks() -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut lines = DOC.lines();
    while let Some(line) = lines.next() {
        let Some(info) = line.strip_prefix("```") else {
            continue;
        };
        let mut body = String::new();
        let mut closed = false;
        for line in lines.by_ref() {
            if line == "```" {
                closed = true;
                break;
            }
            body.push_str(line);
            body.push('\n');
        }
        assert!(closed, "unclosed ``` block ({info}) in docs/verifying-webhooks.md");
        let (language, attributes) = info.split_once(' ').unwrap_or((info, ""));
        let title = attributes
            .trim()
            .strip_prefix("title=\"")
            .and_then(|rest| rest.strip_suffix('"'))
            .map(str::to_owned);
        blocks.push(Block {
            language: language.to_owned(),
            title,
            body,
        });
    }
    blocks
}

/// The body of the block titled `title`.
fn snippet(title: &str) -> String {
    let mut found: Vec<Block> = blocks()
        .into_iter()
        .filter(|block| block.title.as_deref() == Some(title))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "docs/verifying-webhooks.md must have exactly one block titled {title}"
    );
    found.remove(0).body
}

/// TypeScript to JavaScript by the page's convention: removes `: T` right
/// after a name or `)`, for the few types the page uses. Anything else stays
/// (and Node.js refuses it, failing the test).
fn strip_type_annotations(typescript: &str) -> String {
    let mut javascript = String::with_capacity(typescript.len());
    let mut rest = typescript;
    while let Some(at) = rest.find(": ") {
        javascript.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        let follows_a_name = javascript
            .chars()
            .last()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ')');
        let annotation = TYPESCRIPT_TYPES.iter().find(|ty| {
            after.starts_with(**ty)
                && after[ty.len()..]
                    .chars()
                    .next()
                    .is_some_and(|c| matches!(c, ',' | ')' | ' ' | '\n' | ';' | '=' | '{'))
        });
        match annotation {
            Some(ty) if follows_a_name => rest = &after[ty.len()..],
            _ => {
                javascript.push_str(": ");
                rest = after;
            }
        }
    }
    javascript.push_str(rest);
    javascript
}

#[test]
fn the_docs_snippets_follow_the_pages_convention() {
    let blocks = blocks();
    let mut titles: Vec<&str> = blocks.iter().filter_map(|block| block.title.as_deref()).collect();
    titles.sort_unstable();
    let count = titles.len();
    titles.dedup();
    assert_eq!(titles.len(), count, "duplicate titles: {titles:?}");
    assert_eq!(
        titles,
        [
            "verify-standard-webhooks.ts",
            "verify.go",
            "verify.py",
            "verify.ts",
            "verify_aegis_signature.rs",
            "verify_with_aegis_webhook_verify.rs",
        ],
        "every titled block is run by this module: add a runner for a new one"
    );
    for block in blocks.iter().filter(|block| block.title.is_some()) {
        let expected = match block.title.as_deref().and_then(|title| title.rsplit_once('.')) {
            Some((_, "py")) => "python",
            Some((_, "ts")) => "typescript",
            Some((_, "go")) => "go",
            Some((_, "rs")) => "rust",
            other => panic!("unexpected title {other:?}"),
        };
        assert_eq!(block.language, expected, "{block:?}");
    }

    // The seed's snippet, verbatim.
    assert_eq!(snippet("verify.ts"), seed_typescript());
    // Stripping removes the annotations and nothing else.
    assert_eq!(
        strip_type_annotations(&seed_typescript()),
        seed_typescript()
            .replace("payload: string", "payload")
            .replace("signature: string", "signature")
            .replace("secret: string", "secret")
            .replace("): boolean {", ") {")
    );
    let javascript = strip_type_annotations(&snippet("verify-standard-webhooks.ts"));
    for ty in TYPESCRIPT_TYPES {
        assert!(
            !javascript.contains(&format!(": {ty}")),
            "left an annotation: {javascript}"
        );
    }

    // The Go version the page promises is the one the Go test builds the snippet for.
    assert!(
        DOC.contains(&format!("(Go {GO_MINIMUM} or later")),
        "the page must state the minimum Go version the test uses ({GO_MINIMUM})"
    );

    // The Rust blocks are the compiled functions, byte for byte.
    for (title, source) in RUST_SNIPPETS {
        assert_eq!(
            snippet(title),
            source,
            "the docs' {title} differs from tests/src/doc_snippets/{title}: change both"
        );
    }
}

// ---------------------------------------------------------------------------
// Real deliveries and the cases every snippet must decide

/// What a snippet decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Accept,
    RejectSignature,
    RejectTimestamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `X-Aegis-Signature`.
    Aegis,
    /// `webhook-id`, `webhook-timestamp`, `webhook-signature`.
    Standard,
}

#[derive(Debug, Clone)]
struct Case {
    name: String,
    kind: Kind,
    body: Vec<u8>,
    secret: String,
    /// `X-Aegis-Signature` or `webhook-signature`, by kind.
    signature: String,
    id: String,
    timestamp: String,
    /// The receiver's clock, in Unix seconds; `None`: the real one.
    now: Option<i64>,
    expected: Verdict,
}

/// One request as the receiver got it, and the secrets of its webhook.
struct Delivery {
    label: &'static str,
    request: Received,
    secret: String,
    /// The secret before `rotateWebhookSecret`, still signing during the grace period.
    old_secret: Option<String>,
}

/// Starts the system, creates a webhook with a plain secret, one with a
/// generated `whsec_` secret and one whose secret was rotated, publishes one
/// event and returns what each receiver got.
async fn real_deliveries() -> (TestApp, Vec<Delivery>) {
    let app = TestApp::spawn(Backend::Sqlite).await.expect("SQLite is always there");
    let events = ["VULNERABILITY_DETECTED"];

    let plain_receiver = Receiver::start(&[], 200).await;
    app.create_webhook(&plain_receiver.url(), &events, Some("your-webhook-secret"))
        .await;

    let generated_receiver = Receiver::start(&[], 200).await;
    let generated = app.create_webhook(&generated_receiver.url(), &events, None).await;
    let generated_secret = generated["secret"].as_str().expect("generated secret").to_owned();
    assert!(generated_secret.starts_with("whsec_"), "{generated_secret}");

    let rotated_receiver = Receiver::start(&[], 200).await;
    let rotated = app
        .create_webhook(&rotated_receiver.url(), &events, Some("the-old-secret-value"))
        .await;
    let answer = app
        .graphql(
            "mutation($id: ID!) { rotateWebhookSecret(id: $id) { secret } }",
            json!({ "id": rotated["id"] }),
        )
        .await;
    let rotated_secret = answer["data"]["rotateWebhookSecret"]["secret"]
        .as_str()
        .unwrap_or_else(|| panic!("rotateWebhookSecret: {answer}"))
        .to_owned();
    assert!(rotated_secret.starts_with("whsec_"), "{rotated_secret}");

    let (status, reply) = app
        .post_event(&envelope(
            app.setup.tenant_id,
            "VULNERABILITY_DETECTED",
            seed_vulnerability_data(),
        ))
        .await;
    assert_eq!(status, 202, "{reply}");

    let timeout = Duration::from_secs(10);
    let first = |mut received: Vec<Received>| received.remove(0);
    let deliveries = vec![
        Delivery {
            label: "plain secret",
            request: first(plain_receiver.wait_for(1, timeout).await),
            secret: "your-webhook-secret".to_owned(),
            old_secret: None,
        },
        Delivery {
            label: "whsec_ secret",
            request: first(generated_receiver.wait_for(1, timeout).await),
            secret: generated_secret,
            old_secret: None,
        },
        Delivery {
            label: "rotated secret",
            request: first(rotated_receiver.wait_for(1, timeout).await),
            secret: rotated_secret,
            old_secret: Some("the-old-secret-value".to_owned()),
        },
    ];
    let entries = deliveries[2].request.header("webhook-signature").split(' ').count();
    assert_eq!(entries, 2, "a rotated secret signs beside the new one");
    (app, deliveries)
}

/// The body with one value changed, as an attacker would.
fn tampered(body: &[u8]) -> Vec<u8> {
    let text = std::str::from_utf8(body).expect("UTF-8 body");
    let changed = text.replace("\"cvssScore\":9.8", "\"cvssScore\":1.0");
    assert_ne!(changed, text, "the body carries the seed's cvssScore");
    changed.into_bytes()
}

/// Standard base64 with padding (the tests crate has no base64 dependency).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut encoded = String::new();
    for chunk in bytes.chunks(3) {
        let bits = chunk.iter().enumerate().fold(0u32, |bits, (index, byte)| {
            bits | (u32::from(*byte) << (16 - 8 * index))
        });
        for index in 0..4 {
            if index <= chunk.len() {
                encoded.push(char::from(ALPHABET[((bits >> (18 - 6 * index)) & 63) as usize]));
            } else {
                encoded.push('=');
            }
        }
    }
    encoded
}

/// What every snippet must decide about `delivery`; `wrong_secret` is another
/// webhook's.
fn cases(delivery: &Delivery, wrong_secret: &str) -> Vec<Case> {
    use Verdict::{Accept, RejectSignature, RejectTimestamp};
    let request = &delivery.request;
    let named = |what: &str| format!("{} delivery, {what}", delivery.label);
    let timestamp = request.header("webhook-timestamp").to_owned();
    let sent: i64 = timestamp.parse().expect("unix seconds");

    let aegis = Case {
        name: named("X-Aegis-Signature, genuine"),
        kind: Kind::Aegis,
        body: request.body.to_vec(),
        secret: delivery.secret.clone(),
        signature: request.header("x-aegis-signature").to_owned(),
        id: request.header("webhook-id").to_owned(),
        timestamp,
        now: None,
        expected: Accept,
    };
    let standard = Case {
        name: named("Standard Webhooks, genuine"),
        kind: Kind::Standard,
        signature: request.header("webhook-signature").to_owned(),
        ..aegis.clone()
    };
    // Signed correctly, ten minutes ago: only the timestamp check can refuse it.
    let stale = chrono::Utc::now().timestamp() - 600;
    let secret = SigningSecret::parse(&delivery.secret).expect("valid secret");
    let stale_signature = standard_webhooks_signature(&secret, &standard.id, stale, &standard.body);

    let mut cases = vec![
        aegis.clone(),
        Case {
            name: named("X-Aegis-Signature, tampered body"),
            body: tampered(&aegis.body),
            expected: RejectSignature,
            ..aegis.clone()
        },
        Case {
            name: named("X-Aegis-Signature, wrong secret"),
            secret: wrong_secret.to_owned(),
            expected: RejectSignature,
            ..aegis.clone()
        },
        standard.clone(),
        Case {
            name: named("Standard Webhooks, checked 300 s after sending"),
            now: Some(sent + 300),
            ..standard.clone()
        },
        Case {
            name: named("Standard Webhooks, checked 301 s after sending (replay)"),
            now: Some(sent + 301),
            expected: RejectTimestamp,
            ..standard.clone()
        },
        Case {
            name: named("Standard Webhooks, checked 301 s before sending"),
            now: Some(sent - 301),
            expected: RejectTimestamp,
            ..standard.clone()
        },
        Case {
            name: named("Standard Webhooks, re-signed ten minutes ago"),
            timestamp: stale.to_string(),
            signature: stale_signature,
            expected: RejectTimestamp,
            ..standard.clone()
        },
        Case {
            name: named("Standard Webhooks, tampered body"),
            body: tampered(&standard.body),
            expected: RejectSignature,
            ..standard.clone()
        },
        Case {
            name: named("Standard Webhooks, another webhook-id"),
            id: uuid::Uuid::new_v4().to_string(),
            expected: RejectSignature,
            ..standard.clone()
        },
        Case {
            name: named("Standard Webhooks, wrong secret"),
            secret: wrong_secret.to_owned(),
            expected: RejectSignature,
            ..standard.clone()
        },
    ];
    if !delivery.secret.starts_with("whsec_") {
        // What the docs tell users of Standard Webhooks libraries to do with a plain secret.
        cases.push(Case {
            name: named("Standard Webhooks, the plain secret written as whsec_ + base64"),
            secret: format!("whsec_{}", base64(delivery.secret.as_bytes())),
            ..standard.clone()
        });
    }
    if let Some(old_secret) = &delivery.old_secret {
        cases.push(Case {
            name: named("X-Aegis-Signature, the secret before the rotation"),
            secret: old_secret.clone(),
            expected: RejectSignature,
            ..aegis.clone()
        });
        cases.push(Case {
            name: named("Standard Webhooks, the secret before the rotation (grace period)"),
            secret: old_secret.clone(),
            ..standard.clone()
        });
    }
    cases
}

/// Every case of the three deliveries, each wrong secret being another webhook's.
fn all_cases(deliveries: &[Delivery]) -> Vec<Case> {
    deliveries
        .iter()
        .enumerate()
        .flat_map(|(index, delivery)| cases(delivery, &deliveries[(index + 1) % deliveries.len()].secret))
        .collect()
}

// ---------------------------------------------------------------------------
// Running snippets

/// The toolchain's version, or `None` after a loud notice when `program`
/// cannot run. Outside CI a missing toolchain skips; in CI it fails when
/// `required_in_ci`.
fn toolchain(language: &str, program: &str, version_args: &[&str], required_in_ci: bool) -> Option<String> {
    let why = match Command::new(program).args(version_args).output() {
        Ok(output) if output.status.success() => {
            let text = if output.stdout.is_empty() {
                output.stderr
            } else {
                output.stdout
            };
            let version = String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned();
            eprintln!("verification docs: running the {language} snippets with {version}");
            return Some(version);
        }
        Ok(output) => format!("`{program}` exited with {}", output.status),
        Err(error) => format!("cannot run `{program}`: {error}"),
    };
    if required_in_ci && std::env::var_os("CI").is_some() {
        panic!("`{program}` is required in CI to test the docs' {language} snippets: {why}");
    }
    eprintln!(
        "\n!!!!!!!! SKIPPING THE DOCS' {} SNIPPETS: {why} !!!!!!!!\n",
        language.to_uppercase()
    );
    None
}

/// Writes the cases (bodies as files) for a driver and runs `command` with
/// `CASES_FILE` pointing at them; returns one verdict per case.
fn run_cases(language: &str, mut command: Command, cases: &[&Case], dir: &Path) -> Vec<Verdict> {
    let listed: Vec<Value> = cases
        .iter()
        .enumerate()
        .map(|(index, case)| {
            let body_file = dir.join(format!("case-{index}.body"));
            std::fs::write(&body_file, &case.body).expect("write a body");
            let kind = match case.kind {
                Kind::Aegis => "aegis",
                Kind::Standard => "standard",
            };
            json!({
                "kind": kind,
                "body_file": body_file,
                "secret": case.secret,
                "signature": case.signature,
                "id": case.id,
                "timestamp": case.timestamp,
                "now": case.now,
            })
        })
        .collect();
    let cases_file = dir.join("cases.json");
    std::fs::write(&cases_file, Value::Array(listed).to_string()).expect("write the cases");
    let output = command
        .env("CASES_FILE", &cases_file)
        .output()
        .expect("run the snippet");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the {language} snippet failed ({}):\n{}\n{stdout}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let verdicts: Vec<Verdict> = stdout
        .lines()
        .map(|line| match line.strip_prefix("reject: ") {
            None if line == "accept" => Verdict::Accept,
            Some(reason) if reason.contains("timestamp") => Verdict::RejectTimestamp,
            Some(reason) if reason.contains("signature") => Verdict::RejectSignature,
            _ => panic!("the {language} driver printed {line:?}"),
        })
        .collect();
    assert_eq!(
        verdicts.len(),
        cases.len(),
        "one line per case from {language}: {stdout}"
    );
    verdicts
}

/// Asserts each case got its expected verdict, listing every one that did not.
fn assert_decided(language: &str, cases: &[&Case], verdicts: &[Verdict]) {
    let wrong: Vec<String> = cases
        .iter()
        .zip(verdicts)
        .filter(|(case, verdict)| case.expected != **verdict)
        .map(|(case, verdict)| format!("  {}: expected {:?}, got {verdict:?}", case.name, case.expected))
        .collect();
    assert!(
        wrong.is_empty(),
        "the {language} snippet of docs/verifying-webhooks.md decided wrongly:\n{}",
        wrong.join("\n")
    );
    eprintln!(
        "verification docs: the {language} snippet decided all {} cases right",
        cases.len()
    );
}

fn of_kind(cases: &[Case], kind: Kind) -> Vec<&Case> {
    cases.iter().filter(|case| case.kind == kind).collect()
}

const PYTHON_DRIVER: &str = r#"

# ---- driver appended by tests/tests/e2e/verification_docs.rs ----
import json as _json
import os as _os

with open(_os.environ["CASES_FILE"]) as _file:
    _cases = _json.load(_file)
for _case in _cases:
    with open(_case["body_file"], "rb") as _file:
        _body = _file.read()
    if _case["kind"] == "aegis":
        _valid = verify_aegis_signature(_body, _case["signature"], _case["secret"])
        print("accept" if _valid else "reject: signature")
        continue
    try:
        verify_standard_webhook(
            _body, _case["id"], _case["timestamp"], _case["signature"], _case["secret"], now=_case["now"]
        )
        print("accept")
    except WebhookVerificationError as _error:
        print("reject: " + str(_error))
"#;

const NODE_AEGIS_DRIVER: &str = r#"
// ---- driver appended by tests/tests/e2e/verification_docs.rs ----
import { readFileSync as _readFileSync } from 'fs';

for (const _case of JSON.parse(_readFileSync(process.env.CASES_FILE, 'utf8'))) {
  const _payload = _readFileSync(_case.body_file, 'utf8');
  console.log(verifyWebhookSignature(_payload, _case.signature, _case.secret) ? 'accept' : 'reject: signature');
}
"#;

const NODE_STANDARD_DRIVER: &str = r#"
// ---- driver appended by tests/tests/e2e/verification_docs.rs ----
import { readFileSync as _readFileSync } from 'fs';

for (const _case of JSON.parse(_readFileSync(process.env.CASES_FILE, 'utf8'))) {
  const _payload = _readFileSync(_case.body_file, 'utf8');
  try {
    verifyStandardWebhook(_payload, _case.id, _case.timestamp, _case.signature, _case.secret, _case.now ?? undefined);
    console.log('accept');
  } catch (_error) {
    console.log('reject: ' + _error.message);
  }
}
"#;

/// The oldest Go the page says the snippet builds with.
const GO_MINIMUM: &str = "1.18";

/// A second file of the Go snippet's package: cases with a fixed clock go to
/// `VerifyStandardWebhook`, the others through `WebhookHandler` as a server would.
const GO_DRIVER: &str = r#"package main

// Driver written by tests/tests/e2e/verification_docs.rs beside the docs' verify.go.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"time"
)

type testCase struct {
	Kind      string `json:"kind"`
	BodyFile  string `json:"body_file"`
	Secret    string `json:"secret"`
	Signature string `json:"signature"`
	ID        string `json:"id"`
	Timestamp string `json:"timestamp"`
	Now       *int64 `json:"now"`
}

func main() {
	data, err := os.ReadFile(os.Getenv("CASES_FILE"))
	if err != nil {
		panic(err)
	}
	var cases []testCase
	if err := json.Unmarshal(data, &cases); err != nil {
		panic(err)
	}
	for _, c := range cases {
		body, err := os.ReadFile(c.BodyFile)
		if err != nil {
			panic(err)
		}
		switch {
		case c.Kind == "aegis":
			if VerifyAegisSignature(body, c.Signature, c.Secret) {
				fmt.Println("accept")
			} else {
				fmt.Println("reject: signature")
			}
		case c.Now != nil:
			if err := VerifyStandardWebhook(body, c.ID, c.Timestamp, c.Signature, c.Secret, time.Unix(*c.Now, 0)); err != nil {
				fmt.Println("reject: " + err.Error())
			} else {
				fmt.Println("accept")
			}
		default:
			request := httptest.NewRequest(http.MethodPost, "/webhooks/aegis", bytes.NewReader(body))
			request.Header.Set("Content-Type", "application/json")
			request.Header.Set("webhook-id", c.ID)
			request.Header.Set("webhook-timestamp", c.Timestamp)
			request.Header.Set("webhook-signature", c.Signature)
			recorder := httptest.NewRecorder()
			enqueued := ""
			handler := WebhookHandler(c.Secret, func(deliveryID string, received []byte) error {
				if !bytes.Equal(received, body) {
					panic("the handler enqueued other bytes than it received")
				}
				enqueued = deliveryID
				return nil
			})
			handler.ServeHTTP(recorder, request)
			switch {
			case recorder.Code == http.StatusNoContent && enqueued == c.ID:
				fmt.Println("accept")
			case recorder.Code == http.StatusUnauthorized && enqueued == "":
				fmt.Println("reject: " + strings.TrimSpace(recorder.Body.String()))
			default:
				fmt.Printf("unexpected: status %d, enqueued %q\n", recorder.Code, enqueued)
			}
		}
	}
}
"#;

// ---------------------------------------------------------------------------
// The tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docs_python_snippet_verifies_real_deliveries() {
    if toolchain("Python", "python3", &["--version"], true).is_none() {
        return;
    }
    let (_app, deliveries) = real_deliveries().await;
    let cases = all_cases(&deliveries);
    let dir = scratch_dir();
    let script = dir.join("verify.py");
    std::fs::write(&script, snippet("verify.py") + PYTHON_DRIVER).expect("write verify.py");
    let mut command = Command::new("python3");
    command.arg(&script);
    let cases: Vec<&Case> = cases.iter().collect();
    let verdicts = run_cases("Python", command, &cases, &dir);
    assert_decided("Python", &cases, &verdicts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docs_typescript_snippets_verify_real_deliveries_under_node() {
    if toolchain("TypeScript (Node.js)", "node", &["--version"], true).is_none() {
        return;
    }
    let (_app, deliveries) = real_deliveries().await;
    let cases = all_cases(&deliveries);
    let dir = scratch_dir();
    for (title, driver, kind) in [
        ("verify.ts", NODE_AEGIS_DRIVER, Kind::Aegis),
        ("verify-standard-webhooks.ts", NODE_STANDARD_DRIVER, Kind::Standard),
    ] {
        // An ES module, as the snippets `import` (annotations stripped by the page's convention).
        let module = dir.join(title.replace(".ts", ".mjs"));
        std::fs::write(&module, strip_type_annotations(&snippet(title)) + driver).expect("write the module");
        let mut command = Command::new("node");
        command.arg(&module);
        let cases = of_kind(&cases, kind);
        let language = format!("TypeScript {title}");
        let verdicts = run_cases(&language, command, &cases, &dir);
        assert_decided(&language, &cases, &verdicts);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docs_go_snippet_verifies_real_deliveries() {
    // `.ci/run` installs Debian's Go (the oldest the page promises to build with); a
    // developer without Go is told loudly.
    if toolchain("Go", "go", &["version"], true).is_none() {
        return;
    }
    let (_app, deliveries) = real_deliveries().await;
    let cases = all_cases(&deliveries);
    let dir = scratch_dir();
    let package = dir.join("go");
    std::fs::create_dir_all(&package).expect("create the Go package");
    std::fs::write(package.join("verify.go"), snippet("verify.go")).expect("write verify.go");
    std::fs::write(package.join("driver.go"), GO_DRIVER).expect("write driver.go");
    // A module at the page's minimum version, as a receiver's own would be: the
    // compiler then refuses language features newer than that.
    std::fs::write(package.join("go.mod"), format!("module verify\n\ngo {GO_MINIMUM}\n")).expect("write go.mod");
    let mut command = Command::new("go");
    command.args(["run", "."]).current_dir(&package);
    let cases: Vec<&Case> = cases.iter().collect();
    let verdicts = run_cases("Go", command, &cases, &dir);
    assert_decided("Go", &cases, &verdicts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docs_rust_snippets_verify_real_deliveries() {
    // The page's text is these functions' source: the_docs_snippets_follow_the_pages_convention.
    let (_app, deliveries) = real_deliveries().await;
    let cases = all_cases(&deliveries);
    // `verify_with_aegis_webhook_verify` reads the clock: the cases with a fixed clock are for the others.
    let cases: Vec<&Case> = cases
        .iter()
        .filter(|case| case.kind == Kind::Aegis || case.now.is_none())
        .collect();
    let verdicts: Vec<Verdict> = cases
        .iter()
        .map(|case| match case.kind {
            Kind::Aegis => {
                // The hand-written snippet and the crate's own check agree.
                let by_crate = aegis_webhook_verify::verify_aegis_signature(&case.secret, &case.body, &case.signature);
                let by_snippet = verify_aegis_signature(&case.body, &case.signature, &case.secret);
                assert_eq!(by_snippet, by_crate, "{}", case.name);
                if by_snippet {
                    Verdict::Accept
                } else {
                    Verdict::RejectSignature
                }
            }
            Kind::Standard => {
                match verify_with_aegis_webhook_verify(
                    &case.secret,
                    &case.id,
                    &case.timestamp,
                    &case.signature,
                    &case.body,
                ) {
                    Ok(()) => Verdict::Accept,
                    Err(VerifyError::TimestampOutOfTolerance(_) | VerifyError::MalformedTimestamp) => {
                        Verdict::RejectTimestamp
                    }
                    Err(VerifyError::NoMatchingSignature) => Verdict::RejectSignature,
                }
            }
        })
        .collect();
    assert_decided("Rust", &cases, &verdicts);
}

/// Issue 5, point 4: a receiver using the specification's algorithm (the
/// docs' Python, written from the Standard Webhooks spec) and one using the
/// seed's snippet (Node.js) both verify the same delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spec_algorithm_and_the_seed_snippet_verify_the_same_delivery() {
    let python = toolchain("Python", "python3", &["--version"], true);
    let (_app, deliveries) = real_deliveries().await;
    let dir = scratch_dir();
    let script = dir.join("verify.py");
    std::fs::write(&script, snippet("verify.py") + PYTHON_DRIVER).expect("write verify.py");
    for delivery in &deliveries {
        let request = &delivery.request;
        assert_eq!(
            request.header("x-aegis-delivery"),
            request.header("webhook-id"),
            "the docs promise one dedupe key under both names"
        );

        // The seed's snippet run by Node.js (with an independent HMAC and core's
        // check beside it) accepts X-Aegis-Signature and catches tampering.
        crate::signature::assert_signed(request, &delivery.secret);

        // The specification's algorithm accepts the Standard Webhooks headers
        // of the very same request, and catches tampering and replays.
        if python.is_some() {
            let cases = cases(delivery, "a-secret-nobody-uses")
                .into_iter()
                .filter(|case| case.kind == Kind::Standard)
                .collect::<Vec<_>>();
            let cases: Vec<&Case> = cases.iter().collect();
            let mut command = Command::new("python3");
            command.arg(&script);
            let verdicts = run_cases("Python", command, &cases, &dir);
            assert_eq!(verdicts[0], Verdict::Accept, "{}", cases[0].name);
            assert_decided("Python (the Standard Webhooks algorithm)", &cases, &verdicts);
        }
    }
}
