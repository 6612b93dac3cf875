//! `loadgen`: a closed-loop load generator. Each of `--concurrency` connections sends
//! one request, reads the whole response, and sends the next, for `--seconds` after a
//! warm-up. Requests are pre-built bytes over keep-alive HTTP/1.1, so the client does
//! as little work per request as it can and the figures describe the server.
//!
//! ```text
//! loadgen --addr 127.0.0.1:8080 --path /narrative --body-file profile.json \
//!         --concurrency 32 --seconds 10 --warmup 2 --label cached-hit
//! ```
//! Prints one line of figures: requests/s, latency percentiles in microseconds, and
//! how many responses were not 200 or lacked `--expect-header`.
//!
//! `--body-file` may be given more than once: connection i then sends body i modulo
//! their number (distinct profiles, so distinct keys, side by side).
//!
//! `--rate R` paces the connections to R requests a second in all (each every
//! concurrency/R seconds, latency counted from the send); without it, each connection
//! sends its next request as soon as the last is answered.
//!
//! `--header 'Name: value'` (repeatable) adds a request header: with
//! `--header 'Accept: text/event-stream'` each response is a whole streamed answer
//! (chunked, read to its end).
//!
//! `--slow N` adds N hostile connections meanwhile, each trickling a request header a
//! byte a second and reconnecting when the server closes it (slowloris); the line then
//! also says how many the server closed and how long they lived on average.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Args {
    addr: SocketAddr,
    method: String,
    path: String,
    /// Request bodies; connection i sends body i modulo their number.
    bodies: Vec<Vec<u8>>,
    concurrency: usize,
    seconds: f64,
    warmup: f64,
    label: String,
    expect_header: Option<String>,
    /// Extra request headers, `Name: value` each.
    headers: Vec<String>,
    slow: usize,
    /// Requests a second in all, paced; `None` is as fast as answers come.
    rate: Option<f64>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        addr: "127.0.0.1:8080".parse()?,
        method: "GET".into(),
        path: "/healthz".into(),
        bodies: Vec::new(),
        concurrency: 32,
        seconds: 10.0,
        warmup: 2.0,
        label: "run".into(),
        expect_header: None,
        headers: Vec::new(),
        slow: 0,
        rate: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--addr" => args.addr = value()?.parse().context("--addr")?,
            "--path" => args.path = value()?,
            "--body-file" => {
                args.bodies
                    .push(std::fs::read(value()?).context("--body-file")?);
                args.method = "POST".into();
            }
            "--concurrency" => args.concurrency = value()?.parse().context("--concurrency")?,
            "--seconds" => args.seconds = value()?.parse().context("--seconds")?,
            "--warmup" => args.warmup = value()?.parse().context("--warmup")?,
            "--label" => args.label = value()?,
            "--expect-header" => args.expect_header = Some(value()?.to_ascii_lowercase()),
            "--slow" => args.slow = value()?.parse().context("--slow")?,
            "--header" => args.headers.push(value()?),
            "--rate" => args.rate = Some(value()?.parse().context("--rate")?),
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(args)
}

fn request_bytes(args: &Args, body: Option<&[u8]>) -> Vec<u8> {
    let mut request = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\n",
        args.method, args.path, args.addr
    );
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    for header in &args.headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    if let Some(body) = body {
        bytes.extend_from_slice(body);
    }
    bytes
}

struct Tally {
    latency_us: Histogram<u64>,
    bad: u64,
}

/// Reads one response; returns whether it was a 200 carrying the expected header.
async fn read_response(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    expect: Option<&str>,
) -> anyhow::Result<bool> {
    buf.clear();
    let header_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..header_end])?.to_ascii_lowercase();
    let ok = head.starts_with("http/1.1 200") && expect.is_none_or(|h| head.contains(h));
    if head.contains("transfer-encoding: chunked") {
        // A streamed answer (Server-Sent Events): chunks until the last, empty one.
        let mut at = header_end;
        loop {
            let line_end = loop {
                if let Some(i) = buf[at..].windows(2).position(|w| w == b"\r\n") {
                    break at + i;
                }
                read_more(stream, buf).await?;
            };
            let size_text = std::str::from_utf8(&buf[at..line_end])?;
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .context("chunk size")?;
            // The chunk, and the CRLF after it (after the last chunk: no trailers).
            let end = line_end + 2 + size + 2;
            while buf.len() < end {
                read_more(stream, buf).await?;
            }
            if size == 0 {
                return Ok(ok);
            }
            at = end;
        }
    }
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse())
        .transpose()?
        .context("response without content-length")?;
    while buf.len() < header_end + length {
        read_more(stream, buf).await?;
    }
    Ok(ok)
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    let mut chunk = [0u8; 8192];
    let n = stream.read(&mut chunk).await?;
    if n == 0 {
        bail!("connection closed mid-body");
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

async fn connection(
    addr: SocketAddr,
    request: Vec<u8>,
    expect: Option<String>,
    (warm_until, until): (Instant, Instant),
    pace: Option<(Instant, Duration)>,
) -> anyhow::Result<Tally> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut tally = Tally {
        latency_us: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        bad: 0,
    };
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut next = pace.map(|(first, _)| first);
    loop {
        // Paced: wait for the request's turn. Latency counts from the send, not from
        // the turn: the timer wakes up to a millisecond late, which would swamp what is
        // measured at rates far below capacity (the only rates worth pacing at).
        if let (Some(due), Some((_, every))) = (&mut next, pace) {
            tokio::time::sleep_until((*due).into()).await;
            *due += every;
        }
        let sent = Instant::now();
        if sent >= until {
            return Ok(tally);
        }
        stream.write_all(&request).await?;
        let ok = read_response(&mut stream, &mut buf, expect.as_deref()).await?;
        if sent >= warm_until {
            tally
                .latency_us
                .record(sent.elapsed().as_micros().max(1) as u64)?;
            tally.bad += u64::from(!ok);
        }
    }
}

/// One slowloris connection after another until `until`: returns how many the server
/// closed, and how long they lived in all.
async fn slow_client(addr: SocketAddr, until: Instant) -> (u64, Duration) {
    const HEAD: &[u8] = b"GET /healthz HTTP/1.1\r\nhost: slow\r\nx-slow: ";
    let (mut closed, mut lived) = (0, Duration::ZERO);
    while Instant::now() < until {
        let opened = Instant::now();
        let Ok(mut stream) = TcpStream::connect(addr).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut buf = [0u8; 512];
        for byte in HEAD.iter().cycle() {
            if Instant::now() >= until {
                return (closed, lived);
            }
            if stream.write_all(&[*byte]).await.is_err() {
                break;
            }
            let read = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await;
            if let Ok(Ok(0) | Err(_)) = read {
                break;
            }
        }
        closed += 1;
        lived += opened.elapsed();
    }
    (closed, lived)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let requests: Vec<Vec<u8>> = if args.bodies.is_empty() {
        vec![request_bytes(&args, None)]
    } else {
        args.bodies
            .iter()
            .map(|body| request_bytes(&args, Some(body)))
            .collect()
    };
    let start = Instant::now();
    let warm_until = start + Duration::from_secs_f64(args.warmup);
    let until = warm_until + Duration::from_secs_f64(args.seconds);
    let slow: Vec<_> = (0..args.slow)
        .map(|_| tokio::spawn(slow_client(args.addr, until)))
        .collect();
    // Paced: each connection sends every concurrency/rate seconds, the connections
    // spread evenly over that interval.
    let every = args
        .rate
        .map(|rate| Duration::from_secs_f64(args.concurrency as f64 / rate));
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|i| {
            let pace = every.map(|every| {
                (
                    start + every.mul_f64(i as f64 / args.concurrency as f64),
                    every,
                )
            });
            tokio::spawn(connection(
                args.addr,
                requests[i % requests.len()].clone(),
                args.expect_header.clone(),
                (warm_until, until),
                pace,
            ))
        })
        .collect();
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut bad = 0;
    for task in tasks {
        let tally = task.await??;
        total.add(&tally.latency_us)?;
        bad += tally.bad;
    }
    let (mut slow_closed, mut slow_lived) = (0, Duration::ZERO);
    for task in slow {
        let (closed, lived) = task.await?;
        slow_closed += closed;
        slow_lived += lived;
    }
    let measured = until.saturating_duration_since(warm_until).as_secs_f64();
    let count = total.len();
    println!(
        "{label}: requests={count} rps={rps:.0} p50_us={p50} p99_us={p99} p999_us={p999} max_us={max} concurrency={c} bad={bad}",
        label = args.label,
        rps = count as f64 / measured,
        p50 = total.value_at_quantile(0.50),
        p99 = total.value_at_quantile(0.99),
        p999 = total.value_at_quantile(0.999),
        max = total.max(),
        c = args.concurrency,
    );
    if args.slow > 0 {
        println!(
            "{label}: slow={n} slow_closed_by_server={slow_closed} slow_mean_life_ms={life}",
            label = args.label,
            n = args.slow,
            life = slow_lived.as_millis() / u128::from(slow_closed.max(1)),
        );
    }
    if bad > 0 {
        bail!(
            "{bad} responses were not 200 or lacked {:?}",
            args.expect_header
        );
    }
    Ok(())
}
