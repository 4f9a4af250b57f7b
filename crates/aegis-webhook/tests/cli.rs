//! The `aegis-webhook` command line as an operator meets it. Being an
//! integration test also makes `cargo test --workspace` build the binary,
//! which the benchmark smoke test (`tests/tests/e2e/bench.rs`) runs.

use std::process::Command;

fn aegis_webhook() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_aegis-webhook"));
    // Only the defaults: no configuration file, none of the caller's settings.
    command.current_dir(std::env::temp_dir());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("AEGIS_") {
            command.env_remove(name);
        }
    }
    command
}

/// A migrated SQLite database in a scratch folder of its own, and a way to
/// run the command line on it; the folder goes when the value is dropped.
struct ScratchDatabase {
    folder: std::path::PathBuf,
    url: String,
}

impl ScratchDatabase {
    fn migrated(name: &str) -> ScratchDatabase {
        let folder = std::env::temp_dir().join(format!("aegis-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&folder);
        let url = format!("sqlite://{}/aegis.db?mode=rwc", folder.display());
        let database = ScratchDatabase { folder, url };
        assert!(database.run(&["migrate"]).status.success());
        database
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        aegis_webhook()
            .env("AEGIS_DATABASE_URL", &self.url)
            .args(args)
            .output()
            .expect("run aegis-webhook")
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.folder);
    }
}

#[test]
fn help_lists_every_subcommand() {
    let output = aegis_webhook()
        .arg("--help")
        .output()
        .expect("run aegis-webhook --help");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for subcommand in [
        "dev", "api", "ingester", "worker", "migrate", "publish", "apikey", "tenant",
    ] {
        assert!(help.contains(subcommand), "--help does not list {subcommand}:\n{help}");
    }
}

#[test]
fn publish_without_a_broker_says_where_events_go_instead() {
    let output = aegis_webhook()
        .args(["publish", "event.json"])
        .output()
        .expect("run aegis-webhook publish");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("AEGIS_AMQP_URL"), "{stderr}");
}

/// `apikey create --help` says what it does with a tenant that does not exist,
/// and it does exactly that, on a real (SQLite) database.
#[test]
fn apikey_create_does_what_its_help_says_about_tenants() {
    let output = aegis_webhook()
        .args(["apikey", "create", "--help"])
        .output()
        .expect("run aegis-webhook apikey create --help");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(help.contains("for an existing tenant"), "{help}");
    assert!(help.contains("Tenant `default` is created on demand"), "{help}");
    assert!(help.contains("`aegis-webhook tenant create`"), "{help}");

    let database = ScratchDatabase::migrated("tenants");
    let run = |args: &[&str]| database.run(args);

    let refused = run(&["apikey", "create", "--tenant", "acme"]);
    assert!(!refused.status.success(), "a key for a tenant that does not exist");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("no tenant `acme`; create it with `aegis-webhook tenant create acme`"),
        "{stderr}"
    );

    assert!(run(&["tenant", "create", "acme"]).status.success());
    let created = run(&["apikey", "create", "--tenant", "acme"]);
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    assert!(String::from_utf8_lossy(&created.stdout).contains("api key: aegis_"));

    // `default` needs no `tenant create`.
    let default = run(&["apikey", "create"]);
    assert!(default.status.success(), "{}", String::from_utf8_lossy(&default.stderr));
    assert!(String::from_utf8_lossy(&default.stdout).contains("tenant:  default"));
    assert!(String::from_utf8_lossy(&default.stdout).contains("scopes:  read,write,secrets"));
}

/// `apikey create --scopes` gives a key only those rights, `list` shows them,
/// and a scope that does not exist is refused by name.
#[test]
fn apikey_scopes_are_chosen_at_create_and_shown_by_list() {
    let database = ScratchDatabase::migrated("scopes");
    let run = |args: &[&str]| database.run(args);
    let created = run(&["apikey", "create", "--scopes", "read"]);
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    assert!(String::from_utf8_lossy(&created.stdout).contains("scopes:  read\n"));
    let created = run(&["apikey", "create", "--scopes", "write"]);
    assert!(String::from_utf8_lossy(&created.stdout).contains("scopes:  read,write\n"));

    let refused = run(&["apikey", "create", "--scopes", "read,admin"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("unknown scope `admin`"), "{stderr}");

    let listed = run(&["apikey", "list"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    let rows: Vec<&str> = listed.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{listed}");
    assert!(rows[0].contains(" read ") && !rows[0].contains("write"), "{listed}");
    assert!(rows[1].contains(" read,write "), "{listed}");
}
