//! The system's HTTP API as a customer uses it: readiness, the tenant, and
//! webhooks created with the documentation's `createWebhook` mutation.

use anyhow::Context as _;
use serde_json::{Value, json};
use uuid::Uuid;

/// The customer-facing mutation, as the documentation writes it.
const CREATE_WEBHOOK: &str = "mutation CreateWebhook($input: WebhookInput!) { \
     createWebhook(input: $input) { id url events secret active } }";

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

    /// Creates an active webhook for `VULNERABILITY_DETECTED` with `secret`.
    pub async fn create_webhook(&self, url: &str, secret: &str) -> anyhow::Result<()> {
        let input = json!({ "url": url, "events": [crate::events::EVENT_NAME], "secret": secret });
        let data = self
            .graphql(CREATE_WEBHOOK, json!({ "input": input }))
            .await
            .with_context(|| format!("failed to create the webhook for {url}"))?;
        let webhook = &data["createWebhook"];
        if webhook["active"] != json!(true) || webhook["secret"] != json!(secret) {
            anyhow::bail!("createWebhook answered an unexpected webhook: {webhook}");
        }
        Ok(())
    }
}
