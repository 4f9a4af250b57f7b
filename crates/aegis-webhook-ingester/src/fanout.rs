//! Which webhooks receive an event, and under which event name.

use aegis_webhook_core::event::{EventType, ValidatedEvent};
use aegis_webhook_storage::deliveries::NewDelivery;
use aegis_webhook_storage::webhooks::Subscription;

/// One delivery per subscribed webhook. A critical vulnerability goes, as
/// `CRITICAL_VULNERABILITY_DETECTED`, to webhooks subscribed to that type, and as
/// `VULNERABILITY_DETECTED` to those subscribed only to the general type; a
/// webhook subscribed to both gets the critical one only. Webhooks with a project
/// filter only get events of those projects (events without a project pass).
pub fn plan_deliveries(event: &ValidatedEvent, subscriptions: &[Subscription]) -> Vec<NewDelivery> {
    let project = event.project_id();
    subscriptions
        .iter()
        .filter(|subscription| match project {
            Some(project) if !subscription.project_ids.is_empty() => subscription.project_ids.contains(&project),
            _ => true,
        })
        .filter_map(|subscription| {
            let wants = |event_type| subscription.events.contains(&event_type);
            let delivered_as = if event.is_critical_vulnerability() && wants(EventType::CriticalVulnerabilityDetected) {
                EventType::CriticalVulnerabilityDetected
            } else if wants(event.event_type()) {
                event.event_type()
            } else {
                return None;
            };
            Some(NewDelivery {
                webhook_id: subscription.webhook_id,
                event_type: delivered_as,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use aegis_webhook_core::event::ValidatedEvent;
    use chrono::Utc;
    use uuid::Uuid;

    fn vulnerability(severity: &str, project: Uuid) -> ValidatedEvent {
        let envelope = serde_json::json!({
            "event": "VULNERABILITY_DETECTED",
            "tenantId": Uuid::now_v7(),
            "data": {
                "vulnerabilityId": Uuid::now_v7(), "cveId": "CVE-2024-47076", "severity": severity,
                "cvssScore": 9.8, "component": { "name": "curl", "version": "7.68.0" }, "projectId": project
            }
        });
        ValidatedEvent::parse(envelope.to_string().as_bytes(), Utc::now()).expect("valid")
    }

    fn subscription(events: &[EventType], projects: &[Uuid]) -> Subscription {
        Subscription {
            webhook_id: aegis_webhook_core::ids::WebhookId::generate(),
            events: events.to_vec(),
            project_ids: projects.to_vec(),
        }
    }

    #[test]
    fn critical_vulnerabilities_reach_both_kinds_of_subscriber_once() {
        let project = Uuid::now_v7();
        let general = subscription(&[EventType::VulnerabilityDetected], &[]);
        let critical = subscription(&[EventType::CriticalVulnerabilityDetected], &[]);
        let both = subscription(
            &[
                EventType::VulnerabilityDetected,
                EventType::CriticalVulnerabilityDetected,
            ],
            &[],
        );
        let unrelated = subscription(&[EventType::PoamOverdue], &[]);
        let subscriptions = [general.clone(), critical.clone(), both.clone(), unrelated];

        let planned = plan_deliveries(&vulnerability("CRITICAL", project), &subscriptions);
        assert_eq!(
            planned,
            vec![
                NewDelivery {
                    webhook_id: general.webhook_id,
                    event_type: EventType::VulnerabilityDetected
                },
                NewDelivery {
                    webhook_id: critical.webhook_id,
                    event_type: EventType::CriticalVulnerabilityDetected
                },
                NewDelivery {
                    webhook_id: both.webhook_id,
                    event_type: EventType::CriticalVulnerabilityDetected
                },
            ]
        );

        let planned = plan_deliveries(&vulnerability("HIGH", project), &subscriptions);
        assert_eq!(
            planned,
            vec![
                NewDelivery {
                    webhook_id: general.webhook_id,
                    event_type: EventType::VulnerabilityDetected
                },
                NewDelivery {
                    webhook_id: both.webhook_id,
                    event_type: EventType::VulnerabilityDetected
                },
            ]
        );
    }

    #[test]
    fn project_filters_apply_to_events_that_name_a_project() {
        let project = Uuid::now_v7();
        let mine = subscription(&[EventType::VulnerabilityDetected], &[project]);
        let other = subscription(&[EventType::VulnerabilityDetected], &[Uuid::now_v7()]);
        let planned = plan_deliveries(&vulnerability("LOW", project), &[mine.clone(), other]);
        assert_eq!(planned.len(), 1);
        assert_eq!(planned[0].webhook_id, mine.webhook_id);
    }
}
