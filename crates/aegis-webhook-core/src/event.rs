//! Security events: their types, the upstream envelope, per-event `data` validation
//! against the shapes of the customer-facing document, and the delivered body.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike as _, NaiveDate, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::{TenantId, WebhookId};

mod strict_json;

use strict_json::StrictJsonError;

/// The limits of the strict intake, checked by [`ValidatedEvent::parse`] and so
/// the same for `POST /v1/events` and for AMQP publishers.
///
/// They are constants, not configuration, because they are part of the contract
/// with publishers: an API and an ingester configured apart would accept at one
/// door what they park at the other. They are generous on purpose: each is far
/// above what a real scanner sends and far below what costs the service anything.
pub mod limits {
    use std::ops::RangeInclusive;

    /// `data.component.name`, in characters. Package names are short in practice
    /// (npm caps them at 214 characters; Maven `group:artifact` coordinates and Go
    /// module paths stay well under 200), so 256 leaves room.
    pub const COMPONENT_NAME_CHARS: usize = 256;
    /// `data.component.version`, in characters. Versions with an epoch, a distro
    /// revision and build metadata (`1:2.30.2-1+deb11u2`) are a few dozen at most.
    pub const COMPONENT_VERSION_CHARS: usize = 256;
    /// `data.fileName`, in characters. A file name, or a relative path as it was
    /// uploaded: Linux allows 255 bytes per path segment, and 1024 leaves room for
    /// a few directories.
    pub const FILE_NAME_CHARS: usize = 1024;
    /// The digits of a CVE id's sequence number: the pattern of the CVE JSON 5
    /// record schema, `^CVE-[0-9]{4}-[0-9]{4,19}$`.
    pub const CVE_SEQUENCE_DIGITS: RangeInclusive<usize> = 4..=19;
    /// The first year of a CVE id: the first ids were `CVE-1999-…`. The last is
    /// the current year + 1, the latest that MITRE assigns, checked against the
    /// `now` given to the parse.
    pub const CVE_FIRST_YEAR: i32 = 1999;
    /// The years an event's dates may fall in (`timestamp`,
    /// `data.scheduledCompletionDate`), inclusive: the era of CVEs and POA&Ms, and
    /// a long way into a plan's future, while `0001` or `+12026` are refused.
    pub const DATE_YEARS: RangeInclusive<i32> = 2000..=2100;
    /// How much of a refused value an error message repeats, in characters, so a
    /// refusal never echoes a huge value back (nor into the reason header of the
    /// invalid-events queue).
    pub const ECHOED_CHARS: usize = 64;
    /// The longest refusal message, in characters, whatever it quotes.
    pub const MESSAGE_CHARS: usize = 512;
}

/// Every event type a webhook can subscribe to or receive.
///
/// The names are the wire names of the seed document and of the GraphQL enum
/// `WebhookEvent`; `CRITICAL_VULNERABILITY_DETECTED` is derived from a critical
/// `VULNERABILITY_DETECTED`, and `WEBHOOK_TEST` is only sent by `testWebhook`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventType {
    VulnerabilityDetected,
    CriticalVulnerabilityDetected,
    PoamDueSoon,
    PoamOverdue,
    EvidenceCompleted,
    WebhookTest,
}

impl EventType {
    pub const ALL: [EventType; 6] = [
        EventType::VulnerabilityDetected,
        EventType::CriticalVulnerabilityDetected,
        EventType::PoamDueSoon,
        EventType::PoamOverdue,
        EventType::EvidenceCompleted,
        EventType::WebhookTest,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::VulnerabilityDetected => "VULNERABILITY_DETECTED",
            EventType::CriticalVulnerabilityDetected => "CRITICAL_VULNERABILITY_DETECTED",
            EventType::PoamDueSoon => "POAM_DUE_SOON",
            EventType::PoamOverdue => "POAM_OVERDUE",
            EventType::EvidenceCompleted => "EVIDENCE_COMPLETED",
            EventType::WebhookTest => "WEBHOOK_TEST",
        }
    }

    /// Whether upstream services may publish this type themselves. The other two
    /// are produced by Aegis Webhooks: the critical one by fan-out, the test one by
    /// the API.
    pub fn is_published_upstream(self) -> bool {
        !matches!(self, EventType::CriticalVulnerabilityDetected | EventType::WebhookTest)
    }

    /// Whether a webhook may list this type in its subscriptions.
    pub fn is_subscribable(self) -> bool {
        self != EventType::WebhookTest
    }

    pub fn description(self) -> &'static str {
        match self {
            EventType::VulnerabilityDetected => "A new vulnerability was detected.",
            EventType::CriticalVulnerabilityDetected => "A new vulnerability of severity CRITICAL was detected.",
            EventType::PoamDueSoon => "A POA&M deadline is approaching.",
            EventType::PoamOverdue => "A POA&M passed its deadline.",
            EventType::EvidenceCompleted => "Evidence processing (for example an SBOM) finished.",
            EventType::WebhookTest => "A test event sent on request to check an endpoint.",
        }
    }
}

impl EventType {
    /// An example `data` object: the seed document's own examples where it has
    /// them, in the same spirit where it has none.
    pub fn example_data(self) -> serde_json::Value {
        use serde_json::json;
        let vulnerability = json!({
            "vulnerabilityId": "456e7890-e89b-12d3-a456-426614174003",
            "cveId": "CVE-2024-47076",
            "severity": "CRITICAL",
            "cvssScore": 9.8,
            "component": { "name": "curl", "version": "7.68.0" },
            "projectId": "123e4567-e89b-12d3-a456-426614174000"
        });
        match self {
            EventType::VulnerabilityDetected | EventType::CriticalVulnerabilityDetected => vulnerability,
            EventType::PoamDueSoon => json!({
                "poamId": "567e8901-e89b-12d3-a456-426614174004",
                "vulnerabilityId": "456e7890-e89b-12d3-a456-426614174003",
                "cveId": "CVE-2024-47076",
                "scheduledCompletionDate": "2026-01-15",
                "daysUntilDue": 7
            }),
            EventType::PoamOverdue => json!({
                "poamId": "567e8901-e89b-12d3-a456-426614174004",
                "vulnerabilityId": "456e7890-e89b-12d3-a456-426614174003",
                "cveId": "CVE-2024-47076",
                "scheduledCompletionDate": "2026-01-15",
                "daysOverdue": 5
            }),
            EventType::EvidenceCompleted => json!({
                "evidenceId": "345e6789-e89b-12d3-a456-426614174002",
                "fileName": "sbom.spdx.json",
                "vulnerabilitiesFound": 27,
                "criticalCount": 2,
                "highCount": 5
            }),
            EventType::WebhookTest => json!({
                "webhookId": "01a21b2d-4948-7468-87d5-599ed711a6a6",
                "message": "This is a test event from Aegis Webhooks."
            }),
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown event type `{0}`")]
pub struct UnknownEventType(pub String);

impl FromStr for EventType {
    type Err = UnknownEventType;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        EventType::ALL
            .into_iter()
            .find(|event_type| event_type.as_str() == name)
            .ok_or_else(|| UnknownEventType(name.to_owned()))
    }
}

/// Why an upstream envelope was refused. `Malformed` is not JSON at all (HTTP
/// 400); `Invalid` is JSON that breaks the contract (HTTP 422). Both messages name
/// what is wrong, with the JSON path where there is one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("malformed JSON: {0}")]
    Malformed(String),
    #[error("{0}")]
    Invalid(String),
}

/// Why an envelope over `limit` bytes (`AEGIS_MAX_EVENT_BYTES`) is refused:
/// the same words at both doors, the HTTP intake and the ingester.
pub fn too_large_reason(limit: usize) -> String {
    format!("the event is larger than {limit} bytes")
}

/// An upstream event after validation: the only form the rest of the system
/// sees. Made only by [`ValidatedEvent::parse`] (and, for `testWebhook`, by
/// [`ValidatedEvent::webhook_test`]), so its type and its data always agree.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedEvent {
    id: Uuid,
    tenant_id: TenantId,
    event_type: EventType,
    timestamp: DateTime<Utc>,
    data: EventData,
}

/// The `data` object of each upstream event type, exactly the seed's shape. Field
/// order here is the order in the delivered JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum EventData {
    VulnerabilityDetected(VulnerabilityDetected),
    PoamDueSoon(PoamDueSoon),
    PoamOverdue(PoamOverdue),
    EvidenceCompleted(EvidenceCompleted),
    WebhookTest(WebhookTest),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VulnerabilityDetected {
    pub vulnerability_id: Uuid,
    pub cve_id: CveId,
    pub severity: Severity,
    pub cvss_score: CvssScore,
    pub component: Component,
    pub project_id: Uuid,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Component {
    pub name: BoundedText<{ limits::COMPONENT_NAME_CHARS }>,
    pub version: BoundedText<{ limits::COMPONENT_VERSION_CHARS }>,
}

/// Not in the seed document, which only names the notification ("POA&M deadline
/// approaching"); shaped like `POAM_OVERDUE` with `daysUntilDue` in place of
/// `daysOverdue`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoamDueSoon {
    pub poam_id: Uuid,
    pub vulnerability_id: Uuid,
    pub cve_id: CveId,
    pub scheduled_completion_date: EventDate,
    pub days_until_due: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoamOverdue {
    pub poam_id: Uuid,
    pub vulnerability_id: Uuid,
    pub cve_id: CveId,
    pub scheduled_completion_date: EventDate,
    pub days_overdue: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EvidenceCompleted {
    pub evidence_id: Uuid,
    pub file_name: BoundedText<{ limits::FILE_NAME_CHARS }>,
    pub vulnerabilities_found: u32,
    pub critical_count: u32,
    pub high_count: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WebhookTest {
    pub webhook_id: Uuid,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Severity {
    Critical,
    High,
    Medium,
    Low,
    None,
}

/// A CVE identifier such as `CVE-2024-47076`: `CVE-`, a year from
/// [`limits::CVE_FIRST_YEAR`], then a sequence number of 4 to 19 digits
/// ([`limits::CVE_SEQUENCE_DIGITS`]). That the year is at most next year depends
/// on the clock, so [`ValidatedEvent::parse`] checks it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CveId(String);

impl CveId {
    /// The year of the id (`2024` for `CVE-2024-47076`).
    pub fn year(&self) -> i32 {
        self.0["CVE-".len().."CVE-YYYY".len()]
            .parse()
            .expect("a parsed CVE id has a four-digit year")
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for CveId {
    type Error = String;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        let all_digits = |text: &str| text.bytes().all(|b| b.is_ascii_digit());
        let parts = value
            .strip_prefix("CVE-")
            .and_then(|rest| rest.split_once('-'))
            .filter(|(year, number)| year.len() == 4 && all_digits(year) && !number.is_empty() && all_digits(number));
        let Some((year, number)) = parts else {
            return Err(format!(
                "`{}` is not a CVE id (expected CVE-YYYY-NNNN)",
                excerpt(&value)
            ));
        };
        let digits = limits::CVE_SEQUENCE_DIGITS;
        if !digits.contains(&number.len()) {
            return Err(format!(
                "the sequence number of a CVE id must have {} to {} digits (got {})",
                digits.start(),
                digits.end(),
                number.len()
            ));
        }
        let year: i32 = year.parse().expect("four ASCII digits");
        if year < limits::CVE_FIRST_YEAR {
            return Err(format!(
                "the year of a CVE id must be {} or later (got {year})",
                limits::CVE_FIRST_YEAR
            ));
        }
        Ok(CveId(value))
    }
}

impl From<CveId> for String {
    fn from(id: CveId) -> Self {
        id.0
    }
}

/// A CVSS base score, 0.0 to 10.0 inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct CvssScore(f64);

impl TryFrom<f64> for CvssScore {
    type Error = String;

    fn try_from(value: f64) -> Result<Self, Self::Error> {
        if (0.0..=10.0).contains(&value) {
            Ok(CvssScore(value))
        } else {
            Err(format!("{value} is out of range (0 to 10)"))
        }
    }
}

impl From<CvssScore> for f64 {
    fn from(score: CvssScore) -> Self {
        score.0
    }
}

/// Text of at most `MAX` characters (Unicode scalar values), with at least one
/// that is not whitespace and none that is a control character: the names,
/// versions and file names that receivers show and log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BoundedText<const MAX: usize>(String);

impl<const MAX: usize> TryFrom<String> for BoundedText<MAX> {
    type Error = String;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        let length = value.chars().count();
        if length > MAX {
            return Err(format!("must be at most {MAX} characters (got {length})"));
        }
        if value.trim().is_empty() {
            return Err("must not be empty".to_owned());
        }
        if let Some((position, control)) = value.chars().enumerate().find(|(_, c)| c.is_control()) {
            return Err(format!(
                "must not contain control characters (U+{:04X} at character {})",
                u32::from(control),
                position + 1
            ));
        }
        Ok(BoundedText(value))
    }
}

impl<const MAX: usize> From<BoundedText<MAX>> for String {
    fn from(value: BoundedText<MAX>) -> Self {
        value.0
    }
}

impl<const MAX: usize> BoundedText<MAX> {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A calendar date within [`limits::DATE_YEARS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "NaiveDate", into = "NaiveDate")]
pub struct EventDate(NaiveDate);

impl TryFrom<NaiveDate> for EventDate {
    type Error = String;

    fn try_from(date: NaiveDate) -> Result<Self, Self::Error> {
        check_year(date.year()).map(|()| EventDate(date))
    }
}

impl From<EventDate> for NaiveDate {
    fn from(date: EventDate) -> Self {
        date.0
    }
}

impl EventDate {
    pub fn get(self) -> NaiveDate {
        self.0
    }
}

/// Refuses a year outside [`limits::DATE_YEARS`], naming the range.
fn check_year(year: i32) -> Result<(), String> {
    let years = limits::DATE_YEARS;
    if years.contains(&year) {
        Ok(())
    } else {
        Err(format!(
            "must be in the years {} to {} (got year {year})",
            years.start(),
            years.end()
        ))
    }
}

/// At most [`limits::ECHOED_CHARS`] characters of `text`, for quoting a refused
/// value in a message.
fn excerpt(text: &str) -> Cow<'_, str> {
    match text.char_indices().nth(limits::ECHOED_CHARS) {
        None => Cow::Borrowed(text),
        Some((cut, _)) => Cow::Owned(format!("{}… ({} characters)", &text[..cut], text.chars().count())),
    }
}

/// The envelope as it arrives, before its `data` is checked against its type.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawEnvelope {
    id: Option<Uuid>,
    event: String,
    timestamp: Option<String>,
    tenant_id: Uuid,
    data: serde_json::Value,
}

/// The envelope as published to the broker after intake: `id` and `timestamp`
/// filled in, so every later step (and every redelivery) agrees on them.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CanonicalEnvelope<'a> {
    id: Uuid,
    event: EventType,
    timestamp: String,
    tenant_id: Uuid,
    data: &'a EventData,
}

/// What routing an upstream envelope needs, read without validating the
/// rest: its tenant and, if it has one, its id. The ingester decides an
/// envelope's lane by its tenant before anything else, and moves a flooding
/// tenant's envelopes to the bulk lane unvalidated: they are validated once,
/// where they are fanned out (an invalid one is refused there, as it would
/// have been here). A valid envelope always has a readable head; one
/// without is refused by [`ValidatedEvent::parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnvelopeHead {
    id: Option<Uuid>,
    tenant_id: TenantId,
}

impl EnvelopeHead {
    /// Reads the head of a JSON object in UTF-8 with a `tenantId` (a UUID)
    /// and an `id` (a UUID, `null` or absent); every other member is skipped
    /// unread, so a large `data` costs a scan, not a parse.
    pub fn read(bytes: &[u8]) -> Option<Self> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Head {
            #[serde(default)]
            id: Option<Uuid>,
            tenant_id: Uuid,
        }
        // The body is kept as text once moved: all of it must be UTF-8, not
        // only the members read here.
        let text = std::str::from_utf8(bytes).ok()?;
        let head: Head = serde_json::from_str(text).ok()?;
        Some(EnvelopeHead {
            id: head.id,
            tenant_id: TenantId::from_uuid(head.tenant_id),
        })
    }

    /// The envelope's `id`, if it has one (`null` is none, as for
    /// [`ValidatedEvent::parse`]).
    pub fn id(&self) -> Option<Uuid> {
        self.id
    }

    pub fn tenant_id(&self) -> TenantId {
        self.tenant_id
    }

    /// The envelope `bytes` (whose head this is) with `id` set in it, for
    /// one that had none; `None` if it is not a JSON object without
    /// duplicate members, which [`ValidatedEvent::parse`] refuses anyway
    /// (re-serialized, a duplicate would silently become one member).
    pub fn envelope_with_id(bytes: &[u8], id: Uuid) -> Option<String> {
        let serde_json::Value::Object(mut envelope) = strict_json::from_slice(bytes).ok()? else {
            return None;
        };
        envelope.insert("id".to_owned(), serde_json::Value::String(id.to_string()));
        Some(serde_json::Value::Object(envelope).to_string())
    }
}

impl ValidatedEvent {
    /// Parses and validates an upstream envelope. `now` stands in for a missing
    /// timestamp, and a fresh id for a missing `id`; it also bounds a CVE id's
    /// year. Every message is at most [`limits::MESSAGE_CHARS`] characters.
    pub fn parse(bytes: &[u8], now: DateTime<Utc>) -> Result<Self, EnvelopeError> {
        Self::parse_unbounded(bytes, now).map_err(|error| match error {
            EnvelopeError::Malformed(message) => EnvelopeError::Malformed(bounded(message)),
            EnvelopeError::Invalid(message) => EnvelopeError::Invalid(bounded(message)),
        })
    }

    fn parse_unbounded(bytes: &[u8], now: DateTime<Utc>) -> Result<Self, EnvelopeError> {
        let value = strict_json::from_slice(bytes).map_err(|error| match error {
            StrictJsonError::Syntax(error) => EnvelopeError::Malformed(error.to_string()),
            StrictJsonError::DuplicateKey(path) => EnvelopeError::Invalid(format!("{path}: duplicate key")),
        })?;
        // serde would read a JSON array as a struct; say plainly what is expected.
        if !value.is_object() {
            return Err(EnvelopeError::Invalid("the event must be a JSON object".to_owned()));
        }
        let raw: RawEnvelope = deserialize_at(value, "")?;
        let event_type: EventType = raw.event.parse().map_err(|_: UnknownEventType| {
            EnvelopeError::Invalid(format!("event: unknown event type `{}`", excerpt(&raw.event)))
        })?;
        if !event_type.is_published_upstream() {
            let hint = match event_type {
                EventType::CriticalVulnerabilityDetected => {
                    "publish VULNERABILITY_DETECTED with severity CRITICAL instead"
                }
                _ => "it is sent by the testWebhook mutation",
            };
            return Err(EnvelopeError::Invalid(format!(
                "event: `{event_type}` cannot be published upstream; {hint}"
            )));
        }
        let timestamp = match raw.timestamp {
            None => now,
            Some(text) => {
                let timestamp = DateTime::parse_from_rfc3339(&text)
                    .map_err(|error| {
                        EnvelopeError::Invalid(format!(
                            "timestamp: `{}` is not an RFC 3339 date-time ({error})",
                            excerpt(&text)
                        ))
                    })?
                    .with_timezone(&Utc);
                check_year(timestamp.year()).map_err(|error| EnvelopeError::Invalid(format!("timestamp: {error}")))?;
                timestamp
            }
        };
        let data = EventData::parse(event_type, raw.data, now)?;
        Ok(ValidatedEvent {
            id: raw.id.unwrap_or_else(Uuid::now_v7),
            tenant_id: TenantId::from_uuid(raw.tenant_id),
            event_type,
            timestamp,
            data,
        })
    }

    /// The `WEBHOOK_TEST` event that `testWebhook` sends to a webhook at `now`.
    pub fn webhook_test(tenant_id: TenantId, webhook_id: WebhookId, now: DateTime<Utc>) -> Self {
        ValidatedEvent {
            id: Uuid::now_v7(),
            tenant_id,
            event_type: EventType::WebhookTest,
            timestamp: now,
            data: EventData::WebhookTest(WebhookTest {
                webhook_id: webhook_id.as_uuid(),
                message: "This is a test event from Aegis Webhooks.".to_owned(),
            }),
        }
    }

    /// The envelope's `id`: the upstream dedupe key, unique within a tenant
    /// (generated when the envelope had none).
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The tenant the event is for (the envelope's `tenantId`).
    pub fn tenant_id(&self) -> TenantId {
        self.tenant_id
    }

    pub fn event_type(&self) -> EventType {
        self.event_type
    }

    pub fn timestamp(&self) -> DateTime<Utc> {
        self.timestamp
    }

    /// The validated `data`, of the event's type.
    pub fn data(&self) -> &EventData {
        &self.data
    }

    /// The envelope to publish on the broker: what [`ValidatedEvent::parse`] reads
    /// back to the same value.
    pub fn to_envelope_json(&self) -> Vec<u8> {
        let envelope = CanonicalEnvelope {
            id: self.id,
            event: self.event_type,
            timestamp: self.timestamp_text(),
            tenant_id: self.tenant_id.as_uuid(),
            data: &self.data,
        };
        serde_json::to_vec(&envelope).expect("an envelope always serializes")
    }

    /// The timestamp as delivered: RFC 3339 in UTC with a `Z`, fractions only when
    /// the source had them.
    pub fn timestamp_text(&self) -> String {
        self.timestamp.to_rfc3339_opts(SecondsFormat::AutoSi, true)
    }

    /// Whether this is a vulnerability of severity CRITICAL, which is also
    /// delivered as `CRITICAL_VULNERABILITY_DETECTED`.
    pub fn is_critical_vulnerability(&self) -> bool {
        matches!(&self.data, EventData::VulnerabilityDetected(v) if v.severity == Severity::Critical)
    }

    /// The project the event belongs to, for webhooks that filter on projects.
    pub fn project_id(&self) -> Option<Uuid> {
        match &self.data {
            EventData::VulnerabilityDetected(v) => Some(v.project_id),
            _ => None,
        }
    }
}

impl EventData {
    fn parse(event_type: EventType, data: serde_json::Value, now: DateTime<Utc>) -> Result<Self, EnvelopeError> {
        if !data.is_object() {
            return Err(EnvelopeError::Invalid(format!(
                "data: must be a JSON object, not {}",
                json_kind(&data)
            )));
        }
        let data = match event_type {
            EventType::VulnerabilityDetected | EventType::CriticalVulnerabilityDetected => {
                EventData::VulnerabilityDetected(deserialize_at(data, "data")?)
            }
            EventType::PoamDueSoon => EventData::PoamDueSoon(deserialize_at(data, "data")?),
            EventType::PoamOverdue => EventData::PoamOverdue(deserialize_at(data, "data")?),
            EventType::EvidenceCompleted => {
                let evidence: EvidenceCompleted = deserialize_at(data, "data")?;
                // Critical and high findings are among those found, so together
                // they cannot be more (the seed's 2 + 5 of 27).
                let counted = u64::from(evidence.critical_count) + u64::from(evidence.high_count);
                if counted > u64::from(evidence.vulnerabilities_found) {
                    return Err(EnvelopeError::Invalid(format!(
                        "data: criticalCount + highCount ({} + {}) exceeds vulnerabilitiesFound ({})",
                        evidence.critical_count, evidence.high_count, evidence.vulnerabilities_found
                    )));
                }
                EventData::EvidenceCompleted(evidence)
            }
            EventType::WebhookTest => EventData::WebhookTest(deserialize_at(data, "data")?),
        };
        if let Some(cve_id) = data.cve_id() {
            let last = now.year() + 1;
            if cve_id.year() > last {
                return Err(EnvelopeError::Invalid(format!(
                    "data.cveId: the year of a CVE id must be {} to {last}, next year at the latest (got {})",
                    limits::CVE_FIRST_YEAR,
                    cve_id.year()
                )));
            }
        }
        Ok(data)
    }

    /// The CVE the event is about, for the types that name one.
    pub fn cve_id(&self) -> Option<&CveId> {
        match self {
            EventData::VulnerabilityDetected(v) => Some(&v.cve_id),
            EventData::PoamDueSoon(p) => Some(&p.cve_id),
            EventData::PoamOverdue(p) => Some(&p.cve_id),
            EventData::EvidenceCompleted(_) | EventData::WebhookTest(_) => None,
        }
    }

    /// The `data` object as delivered, serialized once at ingest and stored.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("event data always serializes")
    }
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// `message`, cut to [`limits::MESSAGE_CHARS`] characters: serde's own messages
/// quote unknown keys and values whole.
fn bounded(message: String) -> String {
    match message.char_indices().nth(limits::MESSAGE_CHARS) {
        None => message,
        Some((cut, _)) => format!("{}… (message shortened)", &message[..cut]),
    }
}

/// Deserializes `value`, naming the JSON path of the first problem, prefixed by
/// `root` ("data.component.name: missing field ...").
fn deserialize_at<T: serde::de::DeserializeOwned>(value: serde_json::Value, root: &str) -> Result<T, EnvelopeError> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let location = match (root.is_empty(), path == ".") {
            (true, true) => String::new(),
            (true, false) => format!("{path}: "),
            (false, true) => format!("{root}: "),
            (false, false) => format!("{root}.{path}: "),
        };
        EnvelopeError::Invalid(format!("{location}{}", error.into_inner()))
    })
}

/// The body POSTed to a webhook: exactly the seed's `{"event","timestamp","data"}`.
/// `data_json` is the stored output of [`EventData::to_json`], so the bytes are the
/// same on every attempt.
pub fn delivered_body(event_type: EventType, timestamp: &str, data_json: &str) -> String {
    let timestamp = serde_json::to_string(timestamp).expect("a string always serializes");
    format!(
        r#"{{"event":"{}","timestamp":{timestamp},"data":{data_json}}}"#,
        event_type.as_str()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const TENANT: &str = "0b5a6a40-5d43-4a2b-9c1f-1c1b2a3d4e5f";

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .expect("valid")
            .with_timezone(&Utc)
    }

    fn seed_vulnerability() -> serde_json::Value {
        serde_json::json!({
            "event": "VULNERABILITY_DETECTED",
            "timestamp": "2025-12-16T15:30:00Z",
            "tenantId": TENANT,
            "data": {
                "vulnerabilityId": "456e7890-e89b-12d3-a456-426614174003",
                "cveId": "CVE-2024-47076",
                "severity": "CRITICAL",
                "cvssScore": 9.8,
                "component": { "name": "curl", "version": "7.68.0" },
                "projectId": "123e4567-e89b-12d3-a456-426614174000"
            }
        })
    }

    fn parse(value: &serde_json::Value) -> Result<ValidatedEvent, EnvelopeError> {
        ValidatedEvent::parse(value.to_string().as_bytes(), now())
    }

    fn invalid_message(value: &serde_json::Value) -> String {
        match parse(value) {
            Err(EnvelopeError::Invalid(message)) => message,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn the_seed_vulnerability_is_delivered_byte_for_byte_in_the_seed_shape() {
        let event = parse(&seed_vulnerability()).expect("the seed's event is valid");
        assert!(event.is_critical_vulnerability());
        let body = delivered_body(event.event_type, &event.timestamp_text(), &event.data.to_json());
        assert_eq!(
            body,
            r#"{"event":"VULNERABILITY_DETECTED","timestamp":"2025-12-16T15:30:00Z","data":{"vulnerabilityId":"456e7890-e89b-12d3-a456-426614174003","cveId":"CVE-2024-47076","severity":"CRITICAL","cvssScore":9.8,"component":{"name":"curl","version":"7.68.0"},"projectId":"123e4567-e89b-12d3-a456-426614174000"}}"#
        );
    }

    #[test]
    fn every_seed_event_parses_and_round_trips_through_the_canonical_envelope() {
        let seeds = [seed_vulnerability(), seed_poam_overdue(), seed_evidence()];
        for seed in seeds {
            let event = parse(&seed).expect("seed events are valid");
            assert_eq!(
                serde_json::from_str::<serde_json::Value>(&event.data.to_json()).expect("json"),
                seed["data"],
                "data is delivered exactly as the seed shows it"
            );
            let again = ValidatedEvent::parse(&event.to_envelope_json(), now()).expect("canonical");
            assert_eq!(again, event);
        }
    }

    #[test]
    fn a_missing_id_and_timestamp_are_filled_in() {
        let mut envelope = seed_vulnerability();
        envelope.as_object_mut().expect("object").remove("timestamp");
        let event = parse(&envelope).expect("valid");
        assert_eq!(event.timestamp, now());
        assert_eq!(event.timestamp_text(), "2026-01-01T00:00:00Z");
        assert_eq!(event.id.get_version_num(), 7);
    }

    #[test]
    fn malformed_json_is_told_apart_from_invalid_json() {
        assert!(matches!(
            ValidatedEvent::parse(b"{not json", now()),
            Err(EnvelopeError::Malformed(_))
        ));
        assert_eq!(
            ValidatedEvent::parse(b"[1,2]", now()),
            Err(EnvelopeError::Invalid("the event must be a JSON object".to_owned()))
        );
    }

    #[test]
    fn invalid_envelopes_name_the_field_at_fault() {
        type Mutation = Box<dyn Fn(&mut serde_json::Value)>;
        let cases: Vec<(&str, Mutation, &str)> = vec![
            (
                "unknown event",
                Box::new(|v| v["event"] = "VULN_FOUND".into()),
                "event: unknown event type `VULN_FOUND`",
            ),
            (
                "derived event",
                Box::new(|v| v["event"] = "CRITICAL_VULNERABILITY_DETECTED".into()),
                "cannot be published upstream",
            ),
            (
                "test event",
                Box::new(|v| v["event"] = "WEBHOOK_TEST".into()),
                "cannot be published upstream",
            ),
            (
                "missing tenant",
                Box::new(|v| {
                    v.as_object_mut().expect("object").remove("tenantId");
                }),
                "missing field `tenantId`",
            ),
            (
                "bad timestamp",
                Box::new(|v| v["timestamp"] = "yesterday".into()),
                "timestamp: `yesterday`",
            ),
            (
                "missing cve",
                Box::new(|v| {
                    v["data"].as_object_mut().expect("object").remove("cveId");
                }),
                "data: missing field `cveId`",
            ),
            (
                "bad cve",
                Box::new(|v| v["data"]["cveId"] = "CVE-24-1".into()),
                "data.cveId: `CVE-24-1` is not a CVE id",
            ),
            (
                "bad severity",
                Box::new(|v| v["data"]["severity"] = "SEVERE".into()),
                "data.severity: unknown variant `SEVERE`",
            ),
            (
                "cvss too high",
                Box::new(|v| v["data"]["cvssScore"] = 11.into()),
                "data.cvssScore: 11 is out of range",
            ),
            (
                "cvss as string",
                Box::new(|v| v["data"]["cvssScore"] = "9.8".into()),
                "data.cvssScore: invalid type",
            ),
            (
                "empty component",
                Box::new(|v| v["data"]["component"]["name"] = " ".into()),
                "data.component.name: must not be empty",
            ),
            (
                "bad project id",
                Box::new(|v| v["data"]["projectId"] = "p-1".into()),
                "data.projectId:",
            ),
            (
                "unknown data field",
                Box::new(|v| v["data"]["extra"] = 1.into()),
                "data.extra: unknown field `extra`",
            ),
            (
                "unknown envelope field",
                Box::new(|v| v["tenant"] = 1.into()),
                "unknown field `tenant`",
            ),
            (
                "data not an object",
                Box::new(|v| v["data"] = 3.into()),
                "data: must be a JSON object, not a number",
            ),
            (
                "data an array",
                Box::new(|v| v["data"] = serde_json::json!([])),
                "data: must be a JSON object, not an array",
            ),
        ];
        for (name, mutate, expected) in cases {
            let mut envelope = seed_vulnerability();
            mutate(&mut envelope);
            let message = invalid_message(&envelope);
            assert!(
                message.contains(expected),
                "{name}: `{message}` should contain `{expected}`"
            );
        }
    }

    #[test]
    fn a_key_repeated_at_any_level_is_refused_naming_its_path() {
        // serde_json writes keys in order, so the seed's text starts `{"data":{"component":{`.
        let seed = seed_vulnerability().to_string();
        let cases = [
            (
                r#"{"data":"#,
                r#"{"event":"POAM_OVERDUE","data":"#,
                "event: duplicate key",
            ),
            (
                r#""data":{"#,
                r#""data":{"cveId":"CVE-2024-0001","#,
                "data.cveId: duplicate key",
            ),
            (
                r#""component":{"#,
                r#""component":{"name":"wget","#,
                "data.component.name: duplicate key",
            ),
        ];
        for (anchor, repeated, expected) in cases {
            let body = seed.replacen(anchor, repeated, 1);
            assert_ne!(body, seed, "`{anchor}` is in the seed's text");
            assert_eq!(
                ValidatedEvent::parse(body.as_bytes(), now()),
                Err(EnvelopeError::Invalid(expected.to_owned()))
            );
        }
        // Keys are per object: `name` in two objects is no duplicate.
        let mut envelope = seed_vulnerability();
        envelope["data"]["name"] = "curl".into();
        assert!(invalid_message(&envelope).contains("unknown field `name`"));
    }

    fn seed_poam_overdue() -> serde_json::Value {
        serde_json::json!({
            "event": "POAM_OVERDUE", "timestamp": "2025-12-16T15:30:00Z", "tenantId": TENANT,
            "data": {
                "poamId": "567e8901-e89b-12d3-a456-426614174004",
                "vulnerabilityId": "456e7890-e89b-12d3-a456-426614174003",
                "cveId": "CVE-2024-47076",
                "scheduledCompletionDate": "2026-01-15",
                "daysOverdue": 5
            }
        })
    }

    fn seed_evidence() -> serde_json::Value {
        serde_json::json!({
            "event": "EVIDENCE_COMPLETED", "timestamp": "2025-12-16T15:30:00Z", "tenantId": TENANT,
            "data": {
                "evidenceId": "345e6789-e89b-12d3-a456-426614174002",
                "fileName": "sbom.spdx.json",
                "vulnerabilitiesFound": 27, "criticalCount": 2, "highCount": 5
            }
        })
    }

    /// `envelope` with `value` at `pointer`, parsed.
    fn parse_with(
        envelope: serde_json::Value,
        pointer: &str,
        value: serde_json::Value,
    ) -> Result<ValidatedEvent, EnvelopeError> {
        let mut envelope = envelope;
        *envelope.pointer_mut(pointer).expect("the field is in the seed") = value;
        parse(&envelope)
    }

    #[test]
    fn names_versions_and_file_names_are_bounded_not_blank_and_free_of_control_characters() {
        let fields = [
            (
                seed_vulnerability(),
                "/data/component/name",
                "data.component.name",
                limits::COMPONENT_NAME_CHARS,
            ),
            (
                seed_vulnerability(),
                "/data/component/version",
                "data.component.version",
                limits::COMPONENT_VERSION_CHARS,
            ),
            (
                seed_evidence(),
                "/data/fileName",
                "data.fileName",
                limits::FILE_NAME_CHARS,
            ),
        ];
        assert_eq!(
            (
                limits::COMPONENT_NAME_CHARS,
                limits::COMPONENT_VERSION_CHARS,
                limits::FILE_NAME_CHARS
            ),
            (256, 256, 1024)
        );
        for (seed, pointer, path, limit) in fields {
            let at = |text: String| parse_with(seed.clone(), pointer, text.into());
            // The limit counts characters, not bytes.
            at("é".repeat(limit)).unwrap_or_else(|error| panic!("{path}: {limit} characters are allowed: {error}"));
            for (text, expected) in [
                (
                    "x".repeat(limit + 1),
                    format!("{path}: must be at most {limit} characters (got {})", limit + 1),
                ),
                (
                    "x".repeat(250_000),
                    format!("{path}: must be at most {limit} characters (got 250000)"),
                ),
                ("   ".to_owned(), format!("{path}: must not be empty")),
                (
                    "curl\n7".to_owned(),
                    format!("{path}: must not contain control characters (U+000A at character 5)"),
                ),
                (
                    "\u{7f}".to_owned(),
                    format!("{path}: must not contain control characters (U+007F at character 1)"),
                ),
                (
                    "a\u{85}".to_owned(),
                    format!("{path}: must not contain control characters (U+0085 at character 2)"),
                ),
            ] {
                assert_eq!(at(text), Err(EnvelopeError::Invalid(expected)));
            }
        }
        // Other Unicode is welcome: names are not only ASCII.
        parse_with(
            seed_evidence(),
            "/data/fileName",
            "Prüfbericht 2025 – SBOM 📦.json".into(),
        )
        .expect("valid");
    }

    #[test]
    fn cve_ids_are_checked_by_pattern_year_and_length() {
        let cve = |id: String| parse_with(seed_vulnerability(), "/data/cveId", id.into());
        // `now` is 2026-01-01, so next year is 2027.
        for valid in [
            "CVE-1999-0001".to_owned(),
            "CVE-2024-47076".to_owned(),
            "CVE-2027-1234".to_owned(),
            format!("CVE-2024-{}", "9".repeat(19)),
        ] {
            cve(valid.clone()).unwrap_or_else(|error| panic!("{valid}: {error}"));
        }
        for (id, expected) in [
            (
                "CVE-2024-123".to_owned(),
                "data.cveId: the sequence number of a CVE id must have 4 to 19 digits (got 3)".to_owned(),
            ),
            (
                format!("CVE-2024-{}", "1".repeat(20)),
                "data.cveId: the sequence number of a CVE id must have 4 to 19 digits (got 20)".to_owned(),
            ),
            (
                format!("CVE-2024-{}", "1".repeat(200_000)),
                "data.cveId: the sequence number of a CVE id must have 4 to 19 digits (got 200000)".to_owned(),
            ),
            (
                "CVE-1998-1234".to_owned(),
                "data.cveId: the year of a CVE id must be 1999 or later (got 1998)".to_owned(),
            ),
            (
                "CVE-2028-1234".to_owned(),
                "data.cveId: the year of a CVE id must be 1999 to 2027, next year at the latest (got 2028)".to_owned(),
            ),
            (
                "cve-2024-1234".to_owned(),
                "data.cveId: `cve-2024-1234` is not a CVE id (expected CVE-YYYY-NNNN)".to_owned(),
            ),
            (
                "CVE-2024-12a4".to_owned(),
                "data.cveId: `CVE-2024-12a4` is not a CVE id (expected CVE-YYYY-NNNN)".to_owned(),
            ),
            (
                "CVE-2024-".to_owned(),
                "data.cveId: `CVE-2024-` is not a CVE id (expected CVE-YYYY-NNNN)".to_owned(),
            ),
            (
                "CVE-2024-1234 ".to_owned(),
                "data.cveId: `CVE-2024-1234 ` is not a CVE id (expected CVE-YYYY-NNNN)".to_owned(),
            ),
        ] {
            assert_eq!(cve(id), Err(EnvelopeError::Invalid(expected)));
        }
        // The POA&M events carry a CVE id too, under the same rules.
        assert_eq!(
            parse_with(seed_poam_overdue(), "/data/cveId", "CVE-2099-1234".into()),
            Err(EnvelopeError::Invalid(
                "data.cveId: the year of a CVE id must be 1999 to 2027, next year at the latest (got 2099)".to_owned()
            ))
        );
    }

    #[test]
    fn dates_fall_in_the_years_2000_to_2100() {
        assert_eq!(limits::DATE_YEARS, 2000..=2100);
        for valid in [
            "2000-01-01T00:00:00Z",
            "2100-12-31T23:59:59.999Z",
            "2025-12-16T17:30:00+02:00",
        ] {
            parse_with(seed_vulnerability(), "/timestamp", valid.into())
                .unwrap_or_else(|error| panic!("{valid}: {error}"));
        }
        for (timestamp, expected) in [
            (
                "0001-01-01T00:00:00Z",
                "timestamp: must be in the years 2000 to 2100 (got year 1)",
            ),
            (
                "1999-12-31T23:59:59Z",
                "timestamp: must be in the years 2000 to 2100 (got year 1999)",
            ),
            (
                "2101-01-01T00:00:00Z",
                "timestamp: must be in the years 2000 to 2100 (got year 2101)",
            ),
            // Still 2100 where it was sent, but 2101 in UTC, as it is delivered.
            (
                "2100-12-31T23:00:00-05:00",
                "timestamp: must be in the years 2000 to 2100 (got year 2101)",
            ),
        ] {
            assert_eq!(
                parse_with(seed_vulnerability(), "/timestamp", timestamp.into()),
                Err(EnvelopeError::Invalid(expected.to_owned()))
            );
        }
        // RFC 3339 has four-digit years only.
        let message = match parse_with(seed_vulnerability(), "/timestamp", "+12026-01-01T00:00:00Z".into()) {
            Err(EnvelopeError::Invalid(message)) => message,
            other => panic!("a five-digit year is refused: {other:?}"),
        };
        assert!(
            message.starts_with("timestamp: `+12026-01-01T00:00:00Z` is not an RFC 3339 date-time"),
            "{message}"
        );

        for seed in [seed_poam_overdue(), seed_poam_due_soon()] {
            for valid in ["2000-01-01", "2100-12-31"] {
                parse_with(seed.clone(), "/data/scheduledCompletionDate", valid.into())
                    .unwrap_or_else(|error| panic!("{valid}: {error}"));
            }
            for (date, year) in [
                ("+12026-01-15", "12026"),
                ("0001-01-01", "1"),
                ("1999-12-31", "1999"),
                ("2101-01-01", "2101"),
            ] {
                assert_eq!(
                    parse_with(seed.clone(), "/data/scheduledCompletionDate", date.into()),
                    Err(EnvelopeError::Invalid(format!(
                        "data.scheduledCompletionDate: must be in the years 2000 to 2100 (got year {year})"
                    )))
                );
            }
        }
    }

    fn seed_poam_due_soon() -> serde_json::Value {
        let mut envelope = seed_poam_overdue();
        envelope["event"] = "POAM_DUE_SOON".into();
        let data = envelope["data"].as_object_mut().expect("object");
        data.remove("daysOverdue");
        data.insert("daysUntilDue".to_owned(), 7.into());
        envelope
    }

    #[test]
    fn a_refusal_never_echoes_a_huge_value() {
        let huge = "A".repeat(200_000);
        let cases = [
            ("/event", "event: unknown event type `AAAA"),
            ("/data/severity", "data.severity: unknown variant `AAAA"),
            ("/data/cveId", "data.cveId: `AAAA"),
            ("/timestamp", "timestamp: `AAAA"),
        ];
        for (pointer, expected) in cases {
            let message = match parse_with(seed_vulnerability(), pointer, huge.clone().into()) {
                Err(EnvelopeError::Invalid(message)) => message,
                other => panic!("{pointer}: {other:?}"),
            };
            assert!(message.starts_with(expected), "{pointer}: {message}");
            assert!(
                message.chars().count() <= limits::MESSAGE_CHARS + 30,
                "{pointer}: {message}"
            );
        }
        // An unknown key is named in the path and in serde's message: cut as a whole.
        let mut envelope = seed_vulnerability();
        envelope["data"][huge.as_str()] = 1.into();
        let message = invalid_message(&envelope);
        assert!(message.starts_with("data.AAAA"), "{message}");
        assert!(message.ends_with("… (message shortened)"), "{message}");
        assert!(message.chars().count() <= limits::MESSAGE_CHARS + 30);
    }

    #[test]
    fn evidence_counts_must_add_up() {
        let envelope = serde_json::json!({
            "event": "EVIDENCE_COMPLETED", "tenantId": TENANT,
            "data": {
                "evidenceId": "345e6789-e89b-12d3-a456-426614174002", "fileName": "sbom.spdx.json",
                "vulnerabilitiesFound": 1, "criticalCount": 2, "highCount": 0
            }
        });
        assert_eq!(
            invalid_message(&envelope),
            "data: criticalCount + highCount (2 + 0) exceeds vulnerabilitiesFound (1)"
        );
    }

    #[test]
    fn negative_day_counts_and_bad_dates_are_refused() {
        let mut envelope = serde_json::json!({
            "event": "POAM_OVERDUE", "tenantId": TENANT,
            "data": {
                "poamId": "567e8901-e89b-12d3-a456-426614174004",
                "vulnerabilityId": "456e7890-e89b-12d3-a456-426614174003",
                "cveId": "CVE-2024-47076",
                "scheduledCompletionDate": "2026-01-15",
                "daysOverdue": -1
            }
        });
        assert!(invalid_message(&envelope).starts_with("data.daysOverdue:"));
        envelope["data"]["daysOverdue"] = 1.into();
        envelope["data"]["scheduledCompletionDate"] = "2026-02-30".into();
        assert!(invalid_message(&envelope).starts_with("data.scheduledCompletionDate:"));
    }

    #[test]
    fn every_example_is_valid_data_of_its_type() {
        for event_type in EventType::ALL {
            let parse_as = match event_type {
                EventType::CriticalVulnerabilityDetected => EventType::VulnerabilityDetected,
                other => other,
            };
            EventData::parse(parse_as, event_type.example_data(), now())
                .unwrap_or_else(|error| panic!("{event_type}: {error}"));
        }
    }

    #[test]
    fn an_envelopes_head_is_its_tenant_and_id_and_every_valid_envelope_has_one() {
        let tenant = TenantId::from_uuid(TENANT.parse().expect("uuid"));
        for seed in [seed_vulnerability(), seed_poam_overdue(), seed_evidence()] {
            let head = EnvelopeHead::read(seed.to_string().as_bytes()).expect("a valid envelope has a head");
            assert_eq!(
                head,
                EnvelopeHead {
                    id: None,
                    tenant_id: tenant
                }
            );
            let event = parse(&seed).expect("valid");
            let head = EnvelopeHead::read(&event.to_envelope_json()).expect("the canonical envelope has a head");
            assert_eq!(head.id(), Some(event.id()));
        }
        let mut envelope = seed_vulnerability();
        envelope["id"] = serde_json::Value::Null;
        assert_eq!(
            EnvelopeHead::read(envelope.to_string().as_bytes()).expect("head").id(),
            None
        );
        // Not a head: then not a valid envelope either.
        let mut no_tenant = seed_vulnerability();
        no_tenant.as_object_mut().expect("object").remove("tenantId");
        let mut bad_tenant = seed_vulnerability();
        bad_tenant["tenantId"] = "acme".into();
        let mut bad_id = seed_vulnerability();
        bad_id["id"] = 7.into();
        for refused in [no_tenant, bad_tenant, bad_id] {
            assert_eq!(EnvelopeHead::read(refused.to_string().as_bytes()), None, "{refused}");
            assert!(parse(&refused).is_err(), "{refused}");
        }
        let twice = format!(r#"{{"tenantId":"{TENANT}","tenantId":"{TENANT}","event":"POAM_OVERDUE"}}"#);
        assert_eq!(EnvelopeHead::read(twice.as_bytes()), None);
        let mut not_utf8 = seed_vulnerability().to_string().into_bytes();
        let at = not_utf8
            .windows(4)
            .position(|w| w == b"curl")
            .expect("the component's name");
        not_utf8[at] = 0xff;
        assert_eq!(EnvelopeHead::read(&not_utf8), None);
        assert!(ValidatedEvent::parse(&not_utf8, now()).is_err());
        assert_eq!(EnvelopeHead::read(b"[1]"), None);
    }

    #[test]
    fn an_envelope_given_an_id_keeps_every_member_and_never_hides_a_duplicate() {
        let id = Uuid::from_u128(7);
        let given = EnvelopeHead::envelope_with_id(seed_vulnerability().to_string().as_bytes(), id).expect("an object");
        let event = ValidatedEvent::parse(given.as_bytes(), now()).expect("still valid");
        assert_eq!(event.id(), id);
        assert_eq!(
            event,
            parse(&seed_vulnerability())
                .map(|event| ValidatedEvent { id, ..event })
                .expect("valid")
        );
        // A duplicate member is refused, not resolved to its last value.
        let twice = format!(r#"{{"tenantId":"{TENANT}","event":"POAM_OVERDUE","event":"POAM_DUE_SOON"}}"#);
        assert!(
            EnvelopeHead::read(twice.as_bytes()).is_some(),
            "the head alone does not see it"
        );
        assert_eq!(EnvelopeHead::envelope_with_id(twice.as_bytes(), id), None);
        assert_eq!(EnvelopeHead::envelope_with_id(b"[1]", id), None);
    }

    #[test]
    fn event_type_names_round_trip() {
        for event_type in EventType::ALL {
            assert_eq!(event_type.as_str().parse::<EventType>().expect("known"), event_type);
            assert_eq!(
                serde_json::to_string(&event_type).expect("json"),
                format!("\"{event_type}\"")
            );
        }
    }
}
