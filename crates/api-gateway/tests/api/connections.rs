//! Clients that hold connections: trickled headers and bodies, silence, oversize
//! bodies written before reading, and a SIGTERM while such a client is connected.
//! Raw sockets, so the test controls every byte and sees when the server closes.

use std::process::Command;
use std::time::{Duration, Instant};

use futures::future::join_all;
use llm_sim::SimConfig;
use redis::AsyncCommands;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{profile, reply, spawn_app, unique_version};
use crate::process::spawn_process;

fn fast() -> SimConfig {
    SimConfig {
        latency_ms: 20,
        ..SimConfig::default()
    }
}

/// Sends `bytes` one at a time, `every` apart, until the server closes the connection
/// (a read of 0 bytes or an error) or `give_up` passes. Returns how long the server
/// took to close it, or `None` if it never did.
async fn trickle(
    addr: std::net::SocketAddr,
    bytes: &[u8],
    every: Duration,
    give_up: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut buf = [0u8; 1024];
    for byte in bytes.iter().cycle() {
        if started.elapsed() > give_up {
            return None;
        }
        if stream.write_all(&[*byte]).await.is_err() {
            return Some(started.elapsed());
        }
        match tokio::time::timeout(every, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            // A response (the 408 for a slow body) before the close.
            Ok(Ok(_)) => {}
            Err(_) => {}
        }
    }
    None
}

/// Seen in a black-box run: a client trickling headers held its connection forever.
/// 500 of them (and a few that send nothing) are all closed within
/// `HTTP_HEADER_TIMEOUT` plus a margin, while a normal client is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_silent_connections_are_closed_within_the_header_timeout() {
    let app = spawn_app(fast(), &[("HTTP_HEADER_TIMEOUT", "2s")]).await;
    let head = b"POST /narrative HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-slow: ";
    let slow = (0..500).map(|_| {
        trickle(
            app.addr,
            head,
            Duration::from_secs(1),
            Duration::from_secs(20),
        )
    });
    let silent = (0..10).map(|_| async {
        let started = Instant::now();
        let mut stream = TcpStream::connect(app.addr).await.expect("connect");
        let mut buf = [0u8; 16];
        match tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => Some(started.elapsed()),
            _ => None,
        }
    });
    let normal = async {
        let mut statuses = Vec::new();
        for n in 0..20 {
            statuses.push(app.post_narrative(&profile(n)).await.status);
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        statuses
    };
    let (slow, silent, statuses) = tokio::join!(join_all(slow), join_all(silent), normal);
    assert!(
        statuses.iter().all(|s| *s == 200),
        "normal client: {statuses:?}"
    );
    // Operators see them, by why they were closed.
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let closed = metrics.lines().find_map(|line| {
        line.strip_prefix(r#"narrative_connections_closed_total{reason="header_timeout"} "#)
    });
    assert_eq!(closed, Some("510"), "{metrics}");
    let limit = Duration::from_secs(2) + Duration::from_millis(1500);
    for (what, closed) in [("slow", slow), ("silent", silent)] {
        let late: Vec<_> = closed
            .iter()
            .filter(|c| c.is_none_or(|after| after > limit))
            .collect();
        assert!(
            late.is_empty(),
            "{} {what} connections closed late or never: {:?}",
            late.len(),
            &late[..late.len().min(5)]
        );
    }
}

/// A body trickled slower than `HTTP_BODY_TIMEOUT` allows gets a 408 naming the body,
/// and its connection closes.
#[tokio::test]
async fn a_trickled_body_is_refused_within_the_body_timeout() {
    let app = spawn_app(fast(), &[("HTTP_BODY_TIMEOUT", "2s")]).await;
    let started = Instant::now();
    let mut stream = TcpStream::connect(app.addr).await.expect("connect");
    stream
        .write_all(b"POST /narrative HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{")
        .await
        .expect("headers");
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    while started.elapsed() < Duration::from_secs(10) {
        let _ = stream.write_all(b" ").await;
        match tokio::time::timeout(Duration::from_millis(300), stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => response.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains(r#""field":"body""#), "{text}");
    assert!(elapsed < Duration::from_secs(4), "closed after {elapsed:?}");
}

/// Seen in a black-box run: a client that writes its whole oversize body before
/// reading (aiohttp does) got a reset connection instead of the 413.
#[tokio::test]
async fn an_oversize_body_written_before_reading_gets_a_readable_413() {
    let app = spawn_app(fast(), &[]).await;
    // Written in chunks, still being written when the server has read its limit: a
    // server that answers and closes then resets the connection under the writer.
    let body = format!(
        r#"{{"classification":"primary","pad":"{}"}}"#,
        "x".repeat(960_000)
    );
    let mut stream = TcpStream::connect(app.addr).await.expect("connect");
    let head = format!(
        "POST /narrative HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("headers");
    for chunk in body.as_bytes().chunks(32 * 1024) {
        stream
            .write_all(chunk)
            .await
            .expect("the whole body is taken");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    while !String::from_utf8_lossy(&response).contains("payload_too_large") {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => response.extend_from_slice(&buf[..n]),
            other => panic!(
                "no readable answer ({other:?}): {}",
                String::from_utf8_lossy(&response)
            ),
        }
    }
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
}

/// A kept-alive connection may wait longer than `HTTP_HEADER_TIMEOUT` for its next
/// request (a load balancer's pool does), up to `HTTP_IDLE_TIMEOUT`.
#[tokio::test]
async fn an_idle_kept_alive_connection_lasts_the_idle_timeout_not_the_header_timeout() {
    let app = spawn_app(
        fast(),
        &[("HTTP_HEADER_TIMEOUT", "1s"), ("HTTP_IDLE_TIMEOUT", "4s")],
    )
    .await;
    let mut stream = TcpStream::connect(app.addr).await.expect("connect");
    let request = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";
    let mut buf = [0u8; 4096];
    for _ in 0..2 {
        stream.write_all(request).await.expect("request");
        let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf))
            .await
            .expect("answered")
            .expect("read");
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        // Idle for twice the header timeout, well within the idle one.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let idle_from = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0) | Err(_))),
        "closed when idle: {closed:?}"
    );
    let idle = idle_from.elapsed() + Duration::from_secs(2);
    assert!(
        idle < Duration::from_secs(6),
        "idle for {idle:?} before the close"
    );
}

/// Seen in a black-box run: on SIGTERM, one client trickling a body kept the process
/// alive past `SHUTDOWN_GRACE`. A real process: it exits within the grace period plus
/// 2 s, and a generation in flight at the signal is stored first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_within_the_grace_period_and_stores_the_generation_in_flight() {
    let sim = llm_sim::spawn(SimConfig {
        latency_ms: 1500,
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let redis_url = test_kit::redis().url.clone();
    let vars = [("GENERATION_WAIT_MS", "100"), ("SHUTDOWN_GRACE", "3s")];
    let (mut process, url) =
        spawn_process(&sim, &redis_url, &unique_version("sigterm"), &vars).await;
    let client = reqwest::Client::new();
    // A miss: answered with the template at once, its generation still running.
    let miss = reply(
        client
            .post(format!("{url}/narrative"))
            .json(&profile(1))
            .send()
            .await
            .expect("answers"),
    )
    .await;
    assert_eq!(miss.source(), "fallback");
    // A client trickling a body, which would otherwise hold the process open.
    let addr: std::net::SocketAddr = url["http://".len()..].parse().expect("addr");
    let trickler = tokio::spawn(async move {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let _ = stream
            .write_all(b"POST /narrative HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n{")
            .await;
        loop {
            if stream.write_all(b" ").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let signalled = Instant::now();
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(process.0.id().to_string())
        .status()
        .expect("kill");
    assert!(status.success());
    let exited = loop {
        if process.0.try_wait().expect("wait").is_some() {
            break Some(signalled.elapsed());
        }
        if signalled.elapsed() > Duration::from_secs(15) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    trickler.abort();
    let exited = exited.expect("the process exits");
    assert!(
        exited <= Duration::from_secs(5),
        "exited {exited:?} after SIGTERM"
    );
    let mut redis = redis::Client::open(redis_url.as_str())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    assert!(
        redis
            .exists::<_, bool>(miss.key().as_str())
            .await
            .expect("EXISTS"),
        "the generation in flight at SIGTERM was stored"
    );
}

/// Found in review: an oversize body whose sender slowed down while the server drained
/// it got a 408, though the server already knew the answer was a 413.
#[tokio::test]
async fn an_oversize_body_that_then_trickles_still_gets_its_413() {
    let app = spawn_app(fast(), &[("HTTP_BODY_TIMEOUT", "1s")]).await;
    let mut stream = TcpStream::connect(app.addr).await.expect("connect");
    stream
        .write_all(b"POST /narrative HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 400000\r\n\r\n")
        .await
        .expect("headers");
    stream
        .write_all(&vec![b' '; 70_000])
        .await
        .expect("past the limit");
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) && !response.ends_with(b"}") {
        let _ = stream.write_all(b" ").await;
        match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => response.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
}
