//! Typed ids: a webhook's id cannot be passed where a delivery's is meant.
//! Each wraps the UUID it is stored and sent as; it is converted once, at the
//! edges (the storage rows, the queue's wire format, GraphQL's `ID`), and is
//! otherwise only passed around.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A string that is not an id of the kind wanted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not a valid {what} id (a UUID)")]
pub struct IdError {
    pub what: &'static str,
    pub text: String,
}

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        // On the wire exactly the UUID, as before the ids were typed.
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A new id: a UUIDv7, so ids sort by creation time.
            pub fn generate() -> Self {
                $name(Uuid::now_v7())
            }

            /// The id stored or sent as `uuid`.
            pub const fn from_uuid(uuid: Uuid) -> Self {
                $name(uuid)
            }

            pub const fn as_uuid(self) -> Uuid {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = IdError;

            fn from_str(text: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(text).map($name).map_err(|_| IdError {
                    what: $what,
                    text: text.chars().take(64).collect(),
                })
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Uuid {
                id.0
            }
        }
    };
}

typed_id!(
    /// A tenant: one customer organisation, the `tenantId` its events carry.
    TenantId,
    "tenant"
);
typed_id!(
    /// A webhook: one endpoint of a tenant and what it subscribes to.
    WebhookId,
    "webhook"
);
typed_id!(
    /// An event as stored (not the envelope's `id`, the upstream dedupe key
    /// that is unique only within a tenant).
    EventId,
    "event"
);
typed_id!(
    /// A delivery: one event to one webhook, the `X-Aegis-Delivery` header and
    /// the receiver's dedupe key.
    DeliveryId,
    "delivery"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_print_and_serialize_as_their_uuid() {
        let uuid = Uuid::parse_str("0190f5a6-5d43-7a2b-9c1f-1c1b2a3d4e5f").expect("uuid");
        let id = WebhookId::from_uuid(uuid);
        assert_eq!(id.to_string(), "0190f5a6-5d43-7a2b-9c1f-1c1b2a3d4e5f");
        assert_eq!("0190f5a6-5d43-7a2b-9c1f-1c1b2a3d4e5f".parse::<WebhookId>(), Ok(id));
        assert_eq!(
            serde_json::to_string(&id).expect("json"),
            "\"0190f5a6-5d43-7a2b-9c1f-1c1b2a3d4e5f\""
        );
        assert_eq!(
            serde_json::from_str::<WebhookId>("\"0190f5a6-5d43-7a2b-9c1f-1c1b2a3d4e5f\"").expect("json"),
            id
        );
        assert_eq!(Uuid::from(id), uuid);
    }

    #[test]
    fn a_bad_id_says_what_it_should_have_been() {
        let error = "nope".parse::<DeliveryId>().expect_err("not a uuid");
        assert_eq!(error.to_string(), "`nope` is not a valid delivery id (a UUID)");
        let long = "x".repeat(10_000);
        assert_eq!(
            long.parse::<TenantId>().expect_err("not a uuid").text.len(),
            64,
            "bounded in messages"
        );
    }
}
