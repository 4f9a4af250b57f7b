//! The system's HTTP API as a customer uses it: readiness, the tenant,
//! webhooks created with the documentation's `createWebhook` mutation, their
//! delivery counts, and links into the customer portal (`createPortalSession`).

use anyhow::Context as _;
use serde_json::{Value, json};
use uuid::Uuid;

/// The customer-facing mutation, as the documentation writes it.
const CREATE_WEBHOOK: &str = "mutation CreateWebhook($input: WebhookInput!) { \
     createWebhook(input: $input) { id url events secret active } }";

/// A single-use link into the customer portal, valid for `ttlSeconds`.
const CREATE_PORTAL_SESSION: &str = "mutation CreatePortalSession($ttl: Int!) { \
     createPortalSession(ttlSeconds: $ttl) { path url } }";

/// Every webhook's delivery counts (the portal scenario has few webhooks;
/// 100 is the largest page).
const WEBHOOK_STATS: &str = "{ webhooks(first: 100) { nodes { id stats { succeeded failed pending } } } }";

/// A webhook's deliveries as the API counts them from the database.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryCounts {
    pub succeeded: u64,
    pub failed: u64,
    pub pending: u64,
}

impl DeliveryCounts {
    pub fn total(self) -> u64 {
        self.succeeded + self.failed + self.pending
    }
}

/// What `createPortalSession` answers.
#[derive(Debug, Clone)]
pub struct PortalLink {
    /// `/portal/open/<token>`, on the API's address.
    pub path: String,
    /// The whole link, when the server knows its public address.
    pub url: Option<String>,
}

/// Where the API is and the credentials the benchmark gave the system.
#[derive(Debug, Clone)]
pub struct Api {
    pub base_url: String,
    pub api_key: String,
    pub ingest_token: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn intake_url(&self) -> String {
        format!("{}/v1/events", self.base_url)
    }

    /// Whether `GET /readyz` answers 200 (database and broker reachable).
    pub async fn is_ready(&self) -> bool {
        self.http
            .get(format!("{}/readyz", self.base_url))
            .send()
            .await
            .is_ok_and(|response| response.status().is_success())
    }

    async fn graphql(&self, query: &str, variables: Value) -> anyhow::Result<Value> {
        let response = self
            .http
            .post(format!("{}/graphql", self.base_url))
            .bearer_auth(&self.api_key)
            .json(&json!({ "query": query, "variables": variables }))
            .send()
            .await
            .context("the GraphQL API is unreachable")?;
        let status = response.status();
        let answer: Value = response
            .json()
            .await
            .with_context(|| format!("the GraphQL API answered {status} without JSON"))?;
        if let Some(errors) = answer.get("errors") {
            anyhow::bail!("the GraphQL API answered errors: {errors}");
        }
        Ok(answer["data"].clone())
    }

    /// The id events for the API key's tenant carry.
    pub async fn tenant_id(&self) -> anyhow::Result<Uuid> {
        let data = self.graphql("{ tenant { id } }", json!({})).await?;
        data["tenant"]["id"]
            .as_str()
            .and_then(|id| id.parse().ok())
            .with_context(|| format!("no tenant id in {data}"))
    }

    /// Creates an active webhook for `VULNERABILITY_DETECTED` with `secret`;
    /// returns its id.
    pub async fn create_webhook(&self, url: &str, secret: &str) -> anyhow::Result<Uuid> {
        let input = json!({ "url": url, "events": [crate::events::EVENT_NAME], "secret": secret });
        let data = self
            .graphql(CREATE_WEBHOOK, json!({ "input": input }))
            .await
            .with_context(|| format!("failed to create the webhook for {url}"))?;
        let webhook = &data["createWebhook"];
        if webhook["active"] != json!(true) || webhook["secret"] != json!(secret) {
            anyhow::bail!("createWebhook answered an unexpected webhook: {webhook}");
        }
        webhook["id"]
            .as_str()
            .and_then(|id| id.parse().ok())
            .with_context(|| format!("createWebhook answered no webhook id: {webhook}"))
    }

    /// Each of the tenant's webhooks' delivery counts, by webhook id.
    pub async fn delivery_counts(&self) -> anyhow::Result<Vec<(Uuid, DeliveryCounts)>> {
        let data = self.graphql(WEBHOOK_STATS, json!({})).await?;
        let nodes = data["webhooks"]["nodes"]
            .as_array()
            .with_context(|| format!("no webhooks in {data}"))?;
        nodes
            .iter()
            .map(|node| {
                let id = node["id"].as_str().and_then(|id| id.parse().ok());
                let count = |name: &str| node["stats"][name].as_u64();
                match (id, count("succeeded"), count("failed"), count("pending")) {
                    (Some(id), Some(succeeded), Some(failed), Some(pending)) => Ok((
                        id,
                        DeliveryCounts {
                            succeeded,
                            failed,
                            pending,
                        },
                    )),
                    _ => anyhow::bail!("a webhook without its id or stats: {node}"),
                }
            })
            .collect()
    }

    /// A single-use link into the customer portal for this key's tenant,
    /// opening a session of `ttl_seconds`.
    pub async fn create_portal_session(&self, ttl_seconds: u32) -> anyhow::Result<PortalLink> {
        let data = self
            .graphql(CREATE_PORTAL_SESSION, json!({ "ttl": ttl_seconds }))
            .await
            .context("failed to create a portal session")?;
        let session = &data["createPortalSession"];
        let path = session["path"]
            .as_str()
            .filter(|path| path.starts_with('/'))
            .with_context(|| format!("createPortalSession answered no path: {session}"))?;
        Ok(PortalLink {
            path: path.to_owned(),
            url: session["url"].as_str().map(str::to_owned),
        })
    }
}
