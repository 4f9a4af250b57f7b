//! The HTTP server's own limits, tried as a hostile client would: connections
//! that send their headers slowly, byte by byte, or not at all, and
//! keep-alive connections left idle, are closed by the server within the
//! header-read timeout, while everyone else is served at once.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::support::{Backend, TestApp};

const HEADER_TIMEOUT: Duration = Duration::from_secs(1);
/// How much later than the timeout a close may come on a loaded machine.
const MARGIN: Duration = Duration::from_secs(2);

/// Reads until the server closes the connection (an end of stream or a
/// reset); what it sent before, if anything.
async fn closed_by_server(socket: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let reading = async {
        loop {
            match socket.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(read) => received.extend_from_slice(&buffer[..read]),
            }
        }
    };
    tokio::time::timeout(within, reading)
        .await
        .unwrap_or_else(|_| panic!("the server kept the connection open past {within:?}"));
    received
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_header_and_idle_connections_are_closed_while_others_are_served() {
    const SLOW: usize = 100;
    let app = TestApp::spawn_with(Backend::Sqlite, |config| {
        config.http_header_read_timeout = HEADER_TIMEOUT;
    })
    .await
    .expect("SQLite is always there");
    let started = Instant::now();

    // A hundred slowloris connections: headers begun, never finished.
    let mut slow = Vec::with_capacity(SLOW);
    for _ in 0..SLOW {
        let mut socket = TcpStream::connect(app.addr).await.expect("connect");
        socket
            .write_all(b"POST /v1/events HTTP/1.1\r\nHost: aegis\r\nContent-Type: application/json\r\n")
            .await
            .expect("write");
        slow.push(socket);
    }
    // One that trickles a header byte at a time: bytes do not restart the timer.
    let mut trickle = TcpStream::connect(app.addr).await.expect("connect");
    let trickling = tokio::spawn(async move {
        trickle.write_all(b"GET /healthz HTTP/1.1\r\n").await.expect("write");
        for byte in b"X-Slow: ".iter().cycle().take(40) {
            if trickle.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        closed_by_server(&mut trickle, HEADER_TIMEOUT + MARGIN).await;
    });
    // One that made a request and then sits idle on keep-alive.
    let mut idle = TcpStream::connect(app.addr).await.expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: aegis\r\n\r\n")
        .await
        .expect("write");
    let mut answer = [0u8; 17];
    idle.read_exact(&mut answer).await.expect("an answer");
    assert_eq!(&answer, b"HTTP/1.1 200 OK\r\n");

    // Meanwhile everyone else is served at once.
    for _ in 0..10 {
        let asked = Instant::now();
        let response = app.http.get(app.url("/healthz")).send().await.expect("healthz");
        assert_eq!(response.status(), 200);
        assert!(asked.elapsed() < Duration::from_millis(500), "{:?}", asked.elapsed());
    }

    // Every one of them is closed by the server within the timeout.
    for socket in &mut slow {
        closed_by_server(socket, HEADER_TIMEOUT + MARGIN).await;
    }
    closed_by_server(&mut idle, HEADER_TIMEOUT + MARGIN).await;
    trickling.await.expect("the trickling client");
    let all_closed = started.elapsed();
    assert!(
        all_closed >= HEADER_TIMEOUT,
        "closed before the timeout: {all_closed:?}"
    );
    assert!(all_closed < HEADER_TIMEOUT + MARGIN, "{all_closed:?}");

    // And the server still serves.
    let response = app.http.get(app.url("/healthz")).send().await.expect("healthz");
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_wait_and_a_body_that_never_comes_is_a_408() {
    const MAX: usize = 4;
    let app = TestApp::spawn_with(Backend::Sqlite, |config| {
        config.http_header_read_timeout = HEADER_TIMEOUT;
        config.http_request_timeout = Duration::from_secs(1);
        config.http_max_connections = MAX;
    })
    .await
    .expect("SQLite is always there");

    // A request whose body never arrives: its headers are in, so the
    // request timeout (not the header one) ends it, with a 408.
    let mut stalled = TcpStream::connect(app.addr).await.expect("connect");
    // (Authenticated, so the intake goes on to read the body.)
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: aegis\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{",
        app.setup.ingest_token
    );
    stalled.write_all(head.as_bytes()).await.expect("write");
    let asked = Instant::now();
    let answer = closed_by_server(&mut stalled, Duration::from_secs(1) + MARGIN).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(asked.elapsed() >= Duration::from_millis(900), "{:?}", asked.elapsed());

    // All the slots taken by silent connections: a new client waits until the
    // header timeout frees one, then is served.
    let mut silent = Vec::new();
    for _ in 0..MAX {
        silent.push(TcpStream::connect(app.addr).await.expect("connect"));
    }
    // Let the server accept them all (the slots fill as it does).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let client = reqwest::Client::new();
    let asked = Instant::now();
    let response = client.get(app.url("/healthz")).send().await.expect("served in the end");
    assert_eq!(response.status(), 200);
    let waited = asked.elapsed();
    assert!(
        waited >= Duration::from_millis(500),
        "served past the limit at once: {waited:?}"
    );
    assert!(waited < HEADER_TIMEOUT + MARGIN, "{waited:?}");
}

/// Reads until the end of the first response's head, within `within`.
async fn response_head(socket: &mut TcpStream, within: Duration) -> String {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let reading = async {
        while !received.windows(4).any(|window| window == b"\r\n\r\n") {
            match socket.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(read) => received.extend_from_slice(&buffer[..read]),
            }
        }
    };
    tokio::time::timeout(within, reading)
        .await
        .unwrap_or_else(|_| panic!("no answer within {within:?}"));
    String::from_utf8_lossy(&received).into_owned()
}

/// A declared body over the limit is refused as soon as its headers are in:
/// no byte of it is waited for (the request timeout here is 30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_length_over_the_limit_is_answered_413_before_the_body_is_read() {
    let app = TestApp::spawn(Backend::Sqlite).await.expect("SQLite is always there");
    let requests = [
        format!(
            "POST /v1/events HTTP/1.1\r\nHost: aegis\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n",
            app.setup.ingest_token
        ),
        format!(
            "POST /graphql HTTP/1.1\r\nHost: aegis\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n",
            app.setup.api_key
        ),
    ];
    for request in requests {
        let mut socket = TcpStream::connect(app.addr).await.expect("connect");
        socket.write_all(request.as_bytes()).await.expect("write");
        let head = response_head(&mut socket, Duration::from_secs(5)).await;
        assert!(head.starts_with("HTTP/1.1 413"), "{request}: {head}");
    }
}
