//! The events a run publishes, and when each was published.
//!
//! Every event is a `VULNERABILITY_DETECTED` whose `data.vulnerabilityId` (and
//! envelope `id`) is a fresh UUID, so a delivery's body names its event: the
//! receiver reads it back to compute event→receipt latency and to tell which
//! (event, webhook) pairs arrived. Severity is `HIGH`, so the critical-event
//! rule adds no deliveries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;
use uuid::Uuid;

pub const EVENT_NAME: &str = "VULNERABILITY_DETECTED";

/// The events of one run, generated before it starts so that publishing and
/// receiving only read shared state (publish times are atomics).
#[derive(Debug)]
pub struct Events {
    /// The zero of every recorded time.
    epoch: Instant,
    /// `epoch` as wall-clock time, in nanoseconds since the Unix epoch: how
    /// recorded times compare with the system's trace spans.
    epoch_unix_nanos: u64,
    ids: Vec<Uuid>,
    by_id: HashMap<Uuid, u32>,
    /// Nanoseconds since `epoch` plus one when published; zero before.
    published_at: Vec<AtomicU64>,
    /// How many were handed over so far, for the progress display.
    published: AtomicU32,
}

impl Events {
    pub fn generate(count: u32) -> Events {
        let ids: Vec<Uuid> = (0..count).map(|_| Uuid::new_v4()).collect();
        let by_id = ids.iter().enumerate().map(|(index, id)| (*id, index as u32)).collect();
        let (epoch, wall) = (Instant::now(), std::time::SystemTime::now());
        let epoch_unix_nanos = wall
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| u64::try_from(since.as_nanos()).unwrap_or(u64::MAX));
        Events {
            epoch,
            epoch_unix_nanos,
            published_at: ids.iter().map(|_| AtomicU64::new(0)).collect(),
            published: AtomicU32::new(0),
            ids,
            by_id,
        }
    }

    pub fn len(&self) -> u32 {
        self.ids.len() as u32
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The upstream envelope of event `index`, as a scanner publishes it.
    pub fn envelope(&self, index: u32, tenant_id: Uuid) -> Vec<u8> {
        let id = self.ids[index as usize];
        let envelope = serde_json::json!({
            "id": id,
            "event": EVENT_NAME,
            "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "tenantId": tenant_id,
            "data": {
                "vulnerabilityId": id,
                "cveId": "CVE-2024-47076",
                "severity": "HIGH",
                "cvssScore": 8.1,
                "component": { "name": "curl", "version": "7.68.0" },
                "projectId": "123e4567-e89b-12d3-a456-426614174000"
            }
        });
        serde_json::to_vec(&envelope).expect("a JSON value always serializes")
    }

    /// Records that event `index` is being published now (just before it is
    /// handed to the broker or the intake).
    pub fn mark_published(&self, index: u32) {
        let nanos = self.nanos_since_epoch(Instant::now()) + 1;
        self.published_at[index as usize].store(nanos, Ordering::Release);
        self.published.fetch_add(1, Ordering::Relaxed);
    }

    /// How many events were handed over so far.
    pub fn published(&self) -> u32 {
        self.published.load(Ordering::Relaxed)
    }

    fn nanos_since_epoch(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn published_nanos(&self, index: u32) -> Option<u64> {
        match self.published_at[index as usize].load(Ordering::Acquire) {
            0 => None,
            nanos => Some(nanos - 1),
        }
    }

    /// The id of event `index` (its envelope `id` and `data.vulnerabilityId`).
    pub fn id(&self, index: u32) -> Uuid {
        self.ids[index as usize]
    }

    /// Event `index`, by its id.
    pub fn index_of(&self, id: Uuid) -> Option<u32> {
        self.by_id.get(&id).copied()
    }

    /// `at` as wall-clock time, in nanoseconds since the Unix epoch.
    pub fn unix_nanos(&self, at: Instant) -> u64 {
        self.epoch_unix_nanos + self.nanos_since_epoch(at)
    }

    /// When event `index` was published, in nanoseconds since the Unix epoch.
    pub fn published_unix_nanos(&self, index: u32) -> Option<u64> {
        Some(self.epoch_unix_nanos + self.published_nanos(index)?)
    }

    /// From event `index`'s publication to `at`.
    pub fn latency(&self, index: u32, at: Instant) -> Option<Duration> {
        let published = self.published_nanos(index)?;
        Some(Duration::from_nanos(
            self.nanos_since_epoch(at).saturating_sub(published),
        ))
    }

    /// The event a delivered body is about, from its `data.vulnerabilityId`.
    pub fn identify(&self, body: &[u8]) -> Option<u32> {
        #[derive(Deserialize)]
        struct Delivered {
            data: DeliveredData,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct DeliveredData {
            vulnerability_id: Uuid,
        }
        let delivered: Delivered = serde_json::from_slice(body).ok()?;
        self.by_id.get(&delivered.data.vulnerability_id).copied()
    }

    /// When the first and the last event were published.
    pub fn publish_span(&self) -> Option<(Instant, Instant)> {
        let (first, last) = (0..self.len())
            .filter_map(|index| self.published_nanos(index))
            .fold((u64::MAX, 0), |(first, last), nanos| {
                (first.min(nanos), last.max(nanos))
            });
        (first != u64::MAX).then(|| {
            (
                self.epoch + Duration::from_nanos(first),
                self.epoch + Duration::from_nanos(last),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivered_body_names_its_event() {
        let events = Events::generate(3);
        let envelope: serde_json::Value = serde_json::from_slice(&events.envelope(2, Uuid::new_v4())).expect("JSON");
        // The system delivers {"event","timestamp","data"}: the envelope minus id and tenantId.
        let delivered = serde_json::json!({
            "event": envelope["event"],
            "timestamp": envelope["timestamp"],
            "data": envelope["data"],
        });
        assert_eq!(events.identify(delivered.to_string().as_bytes()), Some(2));
        assert_eq!(
            events.identify(br#"{"data":{"vulnerabilityId":"00000000-0000-0000-0000-000000000000"}}"#),
            None
        );
        assert_eq!(events.identify(b"not json"), None);
    }

    #[test]
    fn latency_counts_from_publication() {
        let events = Events::generate(2);
        assert_eq!(events.latency(0, Instant::now()), None);
        assert!(events.publish_span().is_none());
        events.mark_published(0);
        let later = Instant::now() + Duration::from_millis(5);
        assert!(events.latency(0, later).expect("published") >= Duration::from_millis(5));
        let (first, last) = events.publish_span().expect("one published");
        assert_eq!(first, last);
    }
}
