//! The benchmark's own RabbitMQ connection: a unique name prefix per run, a
//! wait until the system's consumers are attached, publishers with confirms
//! (on this connection, or on one of their own), and the deletion of the run's
//! exchanges and queues at the end.
//!
//! The names come from the system's [`Topology`], so they cannot drift from
//! what the processes declare.

use aegis_webhook_core::retry::RetrySchedule;
use aegis_webhook_rabbitmq::Topology;
use anyhow::Context as _;
use lapin::options::{ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};

/// How long the broker keeps a queue nobody uses (`AEGIS_AMQP_QUEUE_EXPIRY`):
/// a safety net for runs killed before they could delete their queues.
pub const QUEUE_EXPIRY: &str = "10m";

async fn connect(url: &str, name: &str) -> anyhow::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url, properties)
        .await
        .with_context(|| format!("RabbitMQ is unreachable at {url}; start it (scripts/services.sh) or pass --amqp-url"))
}

async fn confirming_channel(connection: &Connection) -> anyhow::Result<Channel> {
    let channel = connection
        .create_channel()
        .await
        .context("failed to open a RabbitMQ channel")?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .context("failed to enable publisher confirms")?;
    Ok(channel)
}

/// A publishing channel and the connection it alone uses.
#[derive(Debug)]
pub struct SeparatePublisher {
    connection: Connection,
    pub channel: Channel,
}

impl SeparatePublisher {
    pub async fn close(self) {
        let _ = self.connection.close(200, "done".into()).await;
    }
}

#[derive(Debug)]
pub struct Broker {
    url: String,
    connection: Connection,
    pub prefix: String,
    topology: Topology,
}

impl Broker {
    /// Connects with a fresh prefix. `retry_schedule` must be the one the
    /// processes use, since it names the retry tier queues.
    pub async fn connect(url: &str, retry_schedule: &RetrySchedule) -> anyhow::Result<Broker> {
        let connection = connect(url, "aegis-bench").await?;
        let prefix = format!("bench-{}.", uuid::Uuid::new_v4().simple());
        let topology = Topology::new(&prefix, retry_schedule.delays(), None);
        Ok(Broker {
            url: url.to_owned(),
            connection,
            prefix,
            topology,
        })
    }

    /// The exchange scanners publish to.
    pub fn events_exchange(&self) -> String {
        self.topology.events_exchange()
    }

    /// A channel with publisher confirms on.
    pub async fn publisher(&self) -> anyhow::Result<Channel> {
        confirming_channel(&self.connection).await
    }

    /// A channel with publisher confirms on a connection of its own, named
    /// `name`: a second publisher's messages do not wait behind the first's on
    /// one socket, nor under the flow control RabbitMQ applies per connection.
    pub async fn separate_publisher(&self, name: &str) -> anyhow::Result<SeparatePublisher> {
        let connection = connect(&self.url, name).await?;
        let channel = confirming_channel(&connection).await?;
        Ok(SeparatePublisher { connection, channel })
    }

    /// Consumers on a queue, or `None` while it does not exist yet.
    async fn consumers(&self, queue: &str) -> anyhow::Result<Option<u32>> {
        // A passive declare of a missing queue closes the channel: one each time.
        let channel = self
            .connection
            .create_channel()
            .await
            .context("failed to open a RabbitMQ channel")?;
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let consumers = match channel
            .queue_declare(queue.into(), options, FieldTable::default())
            .await
        {
            Ok(queue) => Some(queue.consumer_count()),
            Err(_) => None,
        };
        let _ = channel.close(200, "done".into()).await;
        Ok(consumers)
    }

    /// Whether `ingesters` consumers are on the ingest queue and `workers` on
    /// the work queue: the processes are ready to take events.
    pub async fn consumers_attached(&self, ingesters: u32, workers: u32) -> anyhow::Result<bool> {
        let ingest = self.consumers(&self.topology.ingest_queue()).await?;
        let work = self.consumers(&self.topology.work_queue()).await?;
        Ok(ingest.is_some_and(|count| count >= ingesters) && work.is_some_and(|count| count >= workers))
    }

    /// Deletes the run's queues and exchanges (after its processes stopped).
    pub async fn delete_topology(&self) -> anyhow::Result<()> {
        let channel = self
            .connection
            .create_channel()
            .await
            .context("failed to open a RabbitMQ channel")?;
        self.topology
            .delete(&channel)
            .await
            .with_context(|| format!("failed to delete the topology of prefix {}", self.prefix))?;
        let _ = channel.close(200, "done".into()).await;
        Ok(())
    }

    pub async fn close(self) {
        let _ = self.connection.close(200, "done".into()).await;
    }
}
