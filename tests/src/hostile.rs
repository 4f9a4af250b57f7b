//! Receivers that misbehave on purpose, written on raw TCP so they can do what no
//! HTTP framework would let them: hang, trickle, lie about lengths, cut the
//! connection half-way or not speak HTTP at all.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a hostile receiver does with each connection.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// Answers with this status line, headers and body.
    Respond {
        status: &'static str,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Reads the request and never answers.
    Hang,
    /// Sends a valid 200 answer one byte a second.
    Trickle,
    /// Answers 200 with a body of this many bytes.
    Huge(usize),
    /// Sends the start of a status line, then closes the connection.
    CloseMidResponse,
    /// Answers in a protocol that is not HTTP.
    NotHttp,
}

impl Behaviour {
    pub fn status(status: &'static str) -> Behaviour {
        Behaviour::Respond {
            status,
            headers: Vec::new(),
            body: b"{}".to_vec(),
        }
    }

    pub fn status_with_header(status: &'static str, name: &str, value: &str) -> Behaviour {
        Behaviour::Respond {
            status,
            headers: vec![(name.to_owned(), value.to_owned())],
            body: b"{}".to_vec(),
        }
    }
}

/// One hostile receiver on loopback.
pub struct HostileReceiver {
    pub addr: SocketAddr,
    /// Requests whose head was read completely.
    requests: Arc<AtomicUsize>,
    /// Bytes of answer the receiver managed to write, over all connections.
    written: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HostileReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HostileReceiver {
    pub async fn start(behaviour: Behaviour) -> HostileReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let requests = Arc::new(AtomicUsize::new(0));
        let written = Arc::new(AtomicUsize::new(0));
        let (counted, bytes) = (requests.clone(), written.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (behaviour, counted, bytes) = (behaviour.clone(), counted.clone(), bytes.clone());
                tokio::spawn(async move {
                    serve(stream, behaviour, counted, bytes).await;
                });
            }
        });
        HostileReceiver {
            addr,
            requests,
            written,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    pub fn bytes_written(&self) -> usize {
        self.written.load(Ordering::SeqCst)
    }
}

/// Reads one request (head, then `Content-Length` bytes of body).
async fn read_request(stream: &mut TcpStream) -> bool {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            break end + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(read) => buffer.extend_from_slice(&chunk[..read]),
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0);
    while buffer.len() < head_end + length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(read) => buffer.extend_from_slice(&chunk[..read]),
        }
    }
    true
}

async fn write_counted(stream: &mut TcpStream, bytes: &[u8], written: &AtomicUsize) -> bool {
    match stream.write_all(bytes).await {
        Ok(()) => {
            written.fetch_add(bytes.len(), Ordering::SeqCst);
            true
        }
        Err(_) => false,
    }
}

async fn serve(mut stream: TcpStream, behaviour: Behaviour, requests: Arc<AtomicUsize>, written: Arc<AtomicUsize>) {
    if let Behaviour::NotHttp = behaviour {
        // Like an SSH or SMTP server: a banner, whatever the client says.
        let _ = write_counted(&mut stream, b"SSH-2.0-OpenSSH_9.2p1 Debian\r\n", &written).await;
        let _ = read_request(&mut stream).await;
        return;
    }
    while read_request(&mut stream).await {
        requests.fetch_add(1, Ordering::SeqCst);
        match &behaviour {
            Behaviour::Respond { status, headers, body } => {
                let mut head = format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\n", body.len());
                for (name, value) in headers {
                    head.push_str(&format!("{name}: {value}\r\n"));
                }
                head.push_str("\r\n");
                if !write_counted(&mut stream, head.as_bytes(), &written).await
                    || !write_counted(&mut stream, body, &written).await
                {
                    return;
                }
            }
            Behaviour::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return;
            }
            Behaviour::Trickle => {
                for byte in b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}" {
                    if !write_counted(&mut stream, &[*byte], &written).await {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            Behaviour::Huge(size) => {
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {size}\r\n\r\n");
                if !write_counted(&mut stream, head.as_bytes(), &written).await {
                    return;
                }
                let block = vec![b'x'; 64 * 1024];
                let mut left = *size;
                while left > 0 {
                    let part = left.min(block.len());
                    if !write_counted(&mut stream, &block[..part], &written).await {
                        return;
                    }
                    left -= part;
                }
            }
            Behaviour::CloseMidResponse => {
                let _ = write_counted(&mut stream, b"HTTP/1.1 20", &written).await;
                return;
            }
            Behaviour::NotHttp => unreachable!("answered above"),
        }
    }
}
