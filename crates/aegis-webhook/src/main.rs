//! `aegis-webhook`: parses the command line, loads configuration, installs
//! logging and trace export, hands over to the library, and flushes the last
//! spans on the way out.

use std::path::PathBuf;

use aegis_webhook::{DEFAULT_TENANT, Roles, open_database, open_database_for, run_until_signal, start, start_dev};
use aegis_webhook_core::config::Config;
use aegis_webhook_core::event::ValidatedEvent;
use aegis_webhook_core::telemetry;
use aegis_webhook_storage::{self as db, audit, tenants};
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(
    name = "aegis-webhook",
    version,
    about = "Aegis Webhooks: signed, retried webhook delivery for security events"
)]
struct Cli {
    /// Configuration file (default: aegis-webhook.toml, if present). `AEGIS_*`
    /// environment variables override it.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Everything in one process: SQLite + in-process queue, nothing to install.
    Dev,
    /// The GraphQL API and the HTTP event intake.
    Api,
    /// Consumes events and fans them out into deliveries.
    Ingester,
    /// Sends deliveries: sign, POST, record, retry, dead-letter.
    Worker,
    /// Applies pending database migrations, then exits.
    Migrate,
    /// Validates an event envelope (JSON file, or `-` for standard input) and
    /// publishes it to the events exchange, as an upstream scanner does.
    Publish {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Manages API keys.
    Apikey {
        #[command(subcommand)]
        command: ApikeyCommand,
    },
    /// Manages tenants (customer organisations).
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Creates a tenant and prints its id (the `tenantId` its events carry).
    Create { name: String },
}

#[derive(Subcommand)]
enum ApikeyCommand {
    /// Creates an API key for an existing tenant and prints it once. Tenant
    /// `default` is created on demand (as `dev` and AEGIS_BOOTSTRAP_API_KEY do);
    /// any other is created with `aegis-webhook tenant create`, so a mistyped
    /// name is refused rather than made into a new, empty tenant.
    Create {
        /// The tenant's name.
        #[arg(long, default_value = DEFAULT_TENANT)]
        tenant: String,
        /// What the key may do, comma-separated: `read` (see configuration and
        /// the delivery log, never a secret), `write` (change them), `secrets`
        /// (read webhook secrets back). `read` is always included.
        #[arg(long, default_value = "read,write,secrets")]
        scopes: aegis_webhook_core::access::Scopes,
    },
    /// Lists a tenant's keys (their first characters; keys are stored hashed).
    List {
        #[arg(long, default_value = DEFAULT_TENANT)]
        tenant: String,
    },
    /// Revokes a key by its id (from `list`); effective on the next request.
    Revoke { id: uuid::Uuid },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load(cli.config.as_deref())?;
    let service_name = match cli.command {
        Command::Dev => Roles::ALL.service_name(),
        Command::Api => Roles::API.service_name(),
        Command::Ingester => Roles::INGESTER.service_name(),
        Command::Worker => Roles::WORKER.service_name(),
        _ => "aegis-webhook-cli",
    };
    telemetry::init(aegis_webhook::telemetry_settings(&config, service_name)?);
    telemetry::log_panics();
    let result = run(cli.command, config).await;
    // The spans still buffered are exported before the process ends (a
    // blocking call, so off the runtime's threads).
    let _ = tokio::task::spawn_blocking(telemetry::shutdown).await;
    result
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Dev => dev(config).await,
        Command::Api => serve(config, Roles::API).await,
        Command::Ingester => serve(config, Roles::INGESTER).await,
        Command::Worker => serve(config, Roles::WORKER).await,
        Command::Migrate => {
            let db = db::connect(&config.database_url()).await?;
            db::migrate(&db, config.partition_plan()).await?;
            println!("migrations applied to {}", db::redact_url(&config.database_url()));
            Ok(())
        }
        Command::Publish { file } => publish(config, &file).await,
        Command::Apikey { command } => apikey(config, command).await,
        Command::Tenant {
            command: TenantCommand::Create { name },
        } => {
            let db = open_database(&config, false).await?;
            let tenant = tenants::create_tenant(&db, &name)
                .await
                .map_err(|error| anyhow::anyhow!("{error}"))?;
            println!("tenant {} created: {}", tenant.name, tenant.id);
            Ok(())
        }
    }
}

async fn apikey(config: Config, command: ApikeyCommand) -> anyhow::Result<()> {
    let db = open_database(&config, false).await?;
    let find_tenant = |name: String| {
        let db = db.clone();
        async move {
            tenants::tenant_by_name(&db, &name)
                .await
                .context("failed to read tenants (are migrations applied? run `aegis-webhook migrate`)")?
                .with_context(|| format!("no tenant `{name}`; create it with `aegis-webhook tenant create {name}`"))
        }
    };
    match command {
        ApikeyCommand::Create { tenant, scopes } => {
            // The default tenant is made on demand, as `dev` and the bootstrap key do.
            let tenant = if tenant == DEFAULT_TENANT {
                tenants::ensure_tenant(&db, DEFAULT_TENANT).await?
            } else {
                find_tenant(tenant).await?
            };
            let txn = db::begin_write(&db).await?;
            let (id, key) = tenants::create_api_key(&txn, tenant.id, scopes).await?;
            let entry = audit::NewEntry {
                tenant_id: tenant.id,
                actor: audit::Actor::Operator,
                operation: "apikey.create",
                target_kind: "api_key",
                target_id: Some(id.to_string()),
                summary: serde_json::json!({ "scopes": scopes.to_string() }),
            };
            audit::record(&txn, entry, chrono::Utc::now()).await?;
            txn.commit().await?;
            println!("tenant:  {} ({})", tenant.name, tenant.id);
            println!("key id:  {id}");
            println!("scopes:  {scopes}");
            println!("api key: {key}");
            println!("The key is shown only this once; it is stored hashed.");
        }
        ApikeyCommand::List { tenant } => {
            let tenant = find_tenant(tenant).await?;
            println!(
                "{:<36}  {:<12}  {:<18}  {:<20}  revoked",
                "id", "starts with", "scopes", "created"
            );
            for key in tenants::list_api_keys(&db, tenant.id).await? {
                println!(
                    "{:<36}  {:<12}  {:<18}  {:<20}  {}",
                    key.id,
                    key.prefix,
                    key.scopes.to_string(),
                    key.created_at.format("%Y-%m-%d %H:%M:%S"),
                    key.revoked_at
                        .map_or_else(|| "-".to_owned(), |at| at.format("%Y-%m-%d %H:%M:%S").to_string())
                );
            }
        }
        ApikeyCommand::Revoke { id } => {
            let txn = db::begin_write(&db).await?;
            let tenant_id = tenants::revoke_api_key(&txn, id)
                .await
                .map_err(|error| anyhow::anyhow!("cannot revoke key {id}: {error} (unknown or already revoked)"))?;
            let entry = audit::NewEntry {
                tenant_id,
                actor: audit::Actor::Operator,
                operation: "apikey.revoke",
                target_kind: "api_key",
                target_id: Some(id.to_string()),
                summary: serde_json::json!({}),
            };
            audit::record(&txn, entry, chrono::Utc::now()).await?;
            txn.commit().await?;
            println!("key {id} revoked");
        }
    }
    Ok(())
}

async fn dev(config: Config) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.listen).await.with_context(|| {
        format!(
            "failed to listen on {} (set AEGIS_LISTEN to use another address)",
            config.listen
        )
    })?;
    let data_dir = config.data_dir.clone();
    let database = db::redact_url(&config.database_url());
    let (system, setup) = start_dev(config, listener).await?;
    let addr = system.addr.context("dev always serves HTTP")?;
    println!(
        "\nAegis Webhooks is running (embedded: SQLite + in-process queue)\n\n  \
         Customer portal     {portal_link}\n                      (opens once; a new link at every start)\n  \
         GraphQL + GraphiQL  http://{addr}/graphql\n  \
         Event intake        POST http://{addr}/v1/events\n  \
         Tenant id           {tenant}\n  \
         API key             {api_key}\n  \
         Ingest token        {ingest_token}\n  \
         Database            {database}\n  \
         Credentials         {credentials}\n\n\
         Loopback targets (http://127.0.0.1:…) are allowed in dev. Ctrl-C stops; pending deliveries resume at the next start.\n",
        portal_link = setup.portal_link,
        tenant = setup.tenant_id,
        api_key = setup.api_key,
        ingest_token = setup.ingest_token,
        credentials = aegis_webhook::DevCredentials::path(&data_dir).display(),
    );
    run_until_signal(system).await
}

async fn publish(config: Config, file: &std::path::Path) -> anyhow::Result<()> {
    if config.amqp_url.is_none() {
        anyhow::bail!("publish needs AEGIS_AMQP_URL (the in-process queue of `dev` takes events at POST /v1/events)");
    }
    let bytes = if file.as_os_str() == "-" {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes).context("failed to read standard input")?;
        bytes
    } else {
        std::fs::read(file).with_context(|| format!("failed to read {}", file.display()))?
    };
    let event = ValidatedEvent::parse(&bytes, chrono::Utc::now()).map_err(|error| anyhow::anyhow!("{error}"))?;
    let (queue, _) = aegis_webhook::open_queue(&config, Roles::API).await?;
    // The canonical envelope carries the id, so publishing the same file twice
    // with an `id` is deduplicated by the ingester.
    queue
        .publish_event(event.event_type().as_str(), event.to_envelope_json().into())
        .await?;
    println!("published {} {}", event.event_type(), event.id());
    Ok(())
}

async fn serve(config: Config, roles: Roles) -> anyhow::Result<()> {
    let db = open_database_for(&config, roles).await?;
    // Every role listens: the API serves everything there, the others their
    // probes and metrics.
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("failed to listen on {}", config.listen))?;
    let system = start(&config, roles, db, Some(listener)).await?;
    if let Some(addr) = system.addr {
        tracing::info!(%addr, "listening");
    }
    run_until_signal(system).await
}
