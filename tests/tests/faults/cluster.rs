//! The topology on a three-node RabbitMQ cluster (`scripts/rabbitmq-cluster.sh`:
//! three nodes on this machine, ports 5701-5703), with the API, the ingester
//! and two workers as separate processes given all three nodes in
//! `AEGIS_AMQP_URL`. Mid-stream, the node they are all connected to, which
//! also leads every queue, is killed; events keep coming, and every delivery
//! must still arrive (counted by distinct `X-Aegis-Delivery`, duplicates
//! reported).
//!
//! Why that node: it is the worst one to lose. Every process connects to the
//! first address, so every connection breaks and has to fail over to the
//! next; and the processes declared the queues over those connections, so
//! RabbitMQ placed every queue's leader there (client-local placement,
//! checked below), and every queue has to elect a new leader from the two
//! replicas left. Accepted events live only in the broker until the ingester
//! has stored them, so an event lost with the node would be a delivery lost.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use aegis_webhook_tests::processes::ProcessCluster;
use aegis_webhook_tests::support::in_ci;

use crate::{Cluster, Published, Running, SERIAL, WEBHOOKS};

/// Events published in all; a third before the node is killed, the rest during
/// and after the failover.
const EVENTS: usize = 600;

/// The node every process connects to first (the first URL of the list).
const FIRST_NODE: usize = 1;

/// A cluster started by the script, stopped when dropped (a failed test's
/// unwinding included), so no node outlives its test.
struct RabbitCluster {
    dir: PathBuf,
    urls: String,
}

/// How `scripts/rabbitmq-cluster.sh` says RabbitMQ is not installed.
const NOT_INSTALLED: i32 = 3;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/rabbitmq-cluster.sh")
}

fn run_script(args: &[&str]) -> Output {
    Command::new(script())
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("run scripts/rabbitmq-cluster.sh {args:?}: {error}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl RabbitCluster {
    /// A fresh cluster; `None` (after a loud notice) when RabbitMQ is not
    /// installed outside CI. In CI that fails, as does any other failure to
    /// start it anywhere.
    fn start() -> Option<RabbitCluster> {
        // One directory for every run, so a run killed before its guard
        // could stop the nodes has them stopped by the next.
        let dir = std::env::temp_dir().join("aegis-rabbitmq-cluster");
        let dir_arg = dir.to_str().expect("a UTF-8 temporary directory");
        let stopped = run_script(&["stop", dir_arg]);
        assert!(
            stopped.status.success() || stopped.status.code() == Some(NOT_INSTALLED),
            "could not stop an earlier run's nodes:\n{}",
            text(&stopped.stderr)
        );
        let started = run_script(&["start", dir_arg]);
        if started.status.code() == Some(NOT_INSTALLED) && !in_ci() {
            eprintln!(
                "\n!!!!!!!! SKIPPING THE RABBITMQ CLUSTER TEST: {} !!!!!!!!\n",
                text(&started.stderr).trim()
            );
            return None;
        }
        // From here on the guard stops whatever did start.
        let cluster = RabbitCluster {
            urls: text(&run_script(&["urls", dir_arg]).stdout).trim().to_owned(),
            dir,
        };
        assert!(
            started.status.success(),
            "the three-node RabbitMQ cluster did not start:\n{}{}",
            text(&started.stdout),
            text(&started.stderr)
        );
        Some(cluster)
    }

    fn dir(&self) -> &str {
        self.dir.to_str().expect("UTF-8")
    }

    fn node(n: usize) -> String {
        format!("aegis-c{n}@localhost")
    }

    /// SIGKILL: the node is gone at once, with no chance to hand anything over.
    fn kill_node(&self, n: usize) {
        let killed = run_script(&["kill-node", &n.to_string(), self.dir()]);
        assert!(killed.status.success(), "kill-node {n}: {}", text(&killed.stderr));
    }

    /// Every queue whose name starts with `prefix`, as node `via` sees it.
    fn queues(&self, via: usize, prefix: &str) -> Vec<QueueState> {
        let listed = run_script(&[
            "ctl",
            &via.to_string(),
            self.dir(),
            "-q",
            "list_queues",
            "name",
            "type",
            "leader",
            "members",
            "online",
            "--formatter",
            "json",
        ]);
        assert!(listed.status.success(), "list_queues: {}", text(&listed.stderr));
        let all: Vec<QueueState> = serde_json::from_slice(&listed.stdout)
            .unwrap_or_else(|error| panic!("list_queues answered {}: {error}", text(&listed.stdout)));
        all.into_iter().filter(|queue| queue.name.starts_with(prefix)).collect()
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        let stopped = run_script(&["stop", self.dir()]);
        if !stopped.status.success() {
            eprintln!("could not stop the RabbitMQ cluster: {}", text(&stopped.stderr));
        }
    }
}

/// One line of `rabbitmqctl list_queues name type leader members online`.
#[derive(Debug, serde::Deserialize)]
struct QueueState {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    leader: String,
    #[serde(deserialize_with = "nodes")]
    members: Vec<String>,
    #[serde(deserialize_with = "nodes")]
    online: Vec<String>,
}

/// A list of nodes, which `list_queues` writes `""` for a classic queue.
fn nodes<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Nodes {
        List(Vec<String>),
        None(String),
    }
    match serde::Deserialize::deserialize(deserializer)? {
        Nodes::List(nodes) => Ok(nodes),
        Nodes::None(text) if text.is_empty() => Ok(Vec::new()),
        Nodes::None(text) => Err(serde::de::Error::custom(format!("not a list of nodes: {text:?}"))),
    }
}

/// Runs a blocking step (the script, the CLI) off the async threads.
async fn blocking<T: Send + 'static>(step: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(step).await.expect("a blocking step")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_killed_mid_stream_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let began = Instant::now();
    let Some(rabbit) = blocking(RabbitCluster::start).await else {
        return;
    };
    let rabbit = std::sync::Arc::new(rabbit);
    let cluster_started = began.elapsed();
    let Some(processes) = ProcessCluster::prepare_on("cluster", &rabbit.urls).await else {
        return;
    };
    let prefix = processes
        .settings()
        .iter()
        .find(|(key, _)| key == "AEGIS_AMQP_PREFIX")
        .map(|(_, value)| value.clone())
        .expect("a queue prefix");
    let Running {
        cluster,
        api,
        workers: _workers,
        _ingester,
    } = Running::start_on(Cluster::prepare_on(processes, Duration::ZERO).await).await;

    // Every queue is a quorum queue with a replica on each node, led by the
    // node the processes are connected to.
    let queues = blocking({
        let (rabbit, prefix) = (rabbit.clone(), prefix.clone());
        move || rabbit.queues(2, &prefix)
    })
    .await;
    assert!(queues.len() >= 7, "the topology is declared: {queues:#?}");
    let all_nodes: Vec<String> = (1..=3).map(RabbitCluster::node).collect();
    for queue in &queues {
        let mut members = queue.members.clone();
        members.sort();
        assert_eq!(
            (queue.kind.as_str(), members.as_slice()),
            ("quorum", all_nodes.as_slice()),
            "{queue:?}"
        );
        assert_eq!(queue.leader, RabbitCluster::node(FIRST_NODE), "{queue:?}");
    }

    // Arrange done; act: a stream of events, and the node killed in the middle
    // of it, while events are still being accepted and deliveries arriving.
    let published = Published::default();
    let publishing = cluster.publish_counting(&api, EVENTS, &published);
    let killing = async {
        let deadline = Instant::now() + Duration::from_secs(60);
        while published.accepted.load(Ordering::Relaxed) < EVENTS / 3 || cluster.tally().1 == 0 {
            assert!(Instant::now() < deadline, "the stream did not get going");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        blocking({
            let rabbit = rabbit.clone();
            move || rabbit.kill_node(FIRST_NODE)
        })
        .await;
        let accepted = published.accepted.load(Ordering::Relaxed);
        assert!(accepted < EVENTS, "the node went down after the stream had ended");
        cluster.assert_mid_run(EVENTS * WEBHOOKS);
        (accepted, Instant::now())
    };
    let ((), (accepted_at_kill, killed_at)) = tokio::join!(publishing, killing);

    // Assert: every event of the stream delivered to every webhook.
    cluster
        .expect_all(EVENTS * WEBHOOKS, Duration::from_secs(60), "cluster node killed")
        .await;
    let recovered_in = killed_at.elapsed();

    // The two nodes left lead every queue now, each with its two replicas.
    let after = blocking({
        let (rabbit, prefix) = (rabbit.clone(), prefix.clone());
        move || rabbit.queues(2, &prefix)
    })
    .await;
    let left = [RabbitCluster::node(2), RabbitCluster::node(3)];
    assert_eq!(after.len(), queues.len(), "{after:#?}");
    for queue in &after {
        assert!(left.contains(&queue.leader), "{queue:?}");
        assert_eq!(queue.online.len(), 2, "{queue:?}");
    }
    let report = format!(
        "[cluster node killed] {} queues failed over; node killed after {accepted_at_kill} of {EVENTS} events \
         had been accepted; {} answers 503 while failing over; all delivered {recovered_in:.1?} after the kill; \
         cluster started in {cluster_started:.1?}, whole test {:.1?}\n",
        after.len(),
        published.unavailable.load(Ordering::Relaxed),
        began.elapsed()
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr(), report.as_bytes());
}
