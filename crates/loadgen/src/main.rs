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
//! how many responses were not 200 or lacked `--expect-header`; last, how many were
//! answered during the warm-up (`warmup_requests`), so that a server's CPU over the
//! whole run can be divided by every request it answered.
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
//! `--versus ADDR` interleaves a second server with the first: time is cut into
//! phases of `--phase` seconds (default 1), and in even phases every connection sends
//! to `--addr`, in odd ones to `ADDR` (each connection holds one keep-alive connection
//! to each). A line for each then gives its requests over the time it owned. Two
//! servers measured this way share the machine's moods, which on a shared machine
//! move more between runs seconds apart than a small difference between them does.
//! `--versus-label` names the second line (default: the label and "versus").
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
    /// A second server, given every other phase of `phase` seconds.
    versus: Option<SocketAddr>,
    versus_label: Option<String>,
    phase: f64,
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
        versus: None,
        versus_label: None,
        phase: 1.0,
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
            "--versus" => args.versus = Some(value()?.parse().context("--versus")?),
            "--versus-label" => args.versus_label = Some(value()?),
            "--phase" => args.phase = value()?.parse().context("--phase")?,
            other => bail!("unknown flag {other}"),
        }
    }
    if args.phase.is_nan() || args.phase <= 0.0 {
        bail!("--phase must be more than 0 seconds");
    }
    Ok(args)
}

/// Which server owns each moment: with one server, always the first; with two, they
/// take turns of `phase`, the first from `start`.
#[derive(Clone, Copy)]
struct Turns {
    start: Instant,
    phase: Duration,
    servers: usize,
}

impl Turns {
    fn owner(&self, at: Instant) -> usize {
        let phases = at.saturating_duration_since(self.start).as_nanos() / self.phase.as_nanos();
        (phases % self.servers as u128) as usize
    }

    /// How long server `server` owned within `from..until`.
    fn owned(&self, server: usize, from: Instant, until: Instant) -> Duration {
        let mut owned = Duration::ZERO;
        let mut phase_start = self.start;
        let mut index = 0;
        while phase_start < until {
            let phase_end = phase_start + self.phase;
            if index % self.servers == server {
                let (a, b) = (phase_start.max(from), phase_end.min(until));
                owned += b.saturating_duration_since(a);
            }
            phase_start = phase_end;
            index += 1;
        }
        owned
    }
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
    /// Answered during the warm-up: not in the figures, but the server did the work.
    warm: u64,
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

/// One connection to each server; every request goes to the server whose turn it is.
/// Returns a tally for each server.
async fn connection(
    servers: Vec<SocketAddr>,
    turns: Turns,
    request: Vec<u8>,
    expect: Option<String>,
    (warm_until, until): (Instant, Instant),
    pace: Option<(Instant, Duration)>,
) -> anyhow::Result<Vec<Tally>> {
    let mut streams = Vec::with_capacity(servers.len());
    let mut tallies = Vec::with_capacity(servers.len());
    for addr in servers {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        streams.push(stream);
        tallies.push(Tally {
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3)?,
            bad: 0,
            warm: 0,
        });
    }
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
            return Ok(tallies);
        }
        let server = turns.owner(sent);
        let (stream, tally) = (&mut streams[server], &mut tallies[server]);
        stream.write_all(&request).await?;
        let ok = read_response(stream, &mut buf, expect.as_deref()).await?;
        if sent >= warm_until {
            tally
                .latency_us
                .record(sent.elapsed().as_micros().max(1) as u64)?;
            tally.bad += u64::from(!ok);
        } else {
            tally.warm += 1;
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
    let servers: Vec<SocketAddr> = std::iter::once(args.addr).chain(args.versus).collect();
    let turns = Turns {
        start,
        phase: Duration::from_secs_f64(args.phase),
        servers: servers.len(),
    };
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
                servers.clone(),
                turns,
                requests[i % requests.len()].clone(),
                args.expect_header.clone(),
                (warm_until, until),
                pace,
            ))
        })
        .collect();
    let mut totals = Vec::new();
    for _ in &servers {
        totals.push(Tally {
            latency_us: Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?,
            bad: 0,
            warm: 0,
        });
    }
    for task in tasks {
        for (total, tally) in totals.iter_mut().zip(task.await??) {
            total.latency_us.add(&tally.latency_us)?;
            total.bad += tally.bad;
            total.warm += tally.warm;
        }
    }
    let (mut slow_closed, mut slow_lived) = (0, Duration::ZERO);
    for task in slow {
        let (closed, lived) = task.await?;
        slow_closed += closed;
        slow_lived += lived;
    }
    let labels = [
        args.label.clone(),
        args.versus_label
            .clone()
            .unwrap_or_else(|| format!("{} versus", args.label)),
    ];
    for (server, (total, label)) in totals.iter().zip(&labels).enumerate() {
        let measured = turns.owned(server, warm_until, until).as_secs_f64();
        let latency = &total.latency_us;
        let count = latency.len();
        println!(
            "{label}: requests={count} rps={rps:.0} p50_us={p50} p99_us={p99} p999_us={p999} max_us={max} concurrency={c} bad={bad} warmup_requests={warm}",
            rps = count as f64 / measured.max(f64::MIN_POSITIVE),
            p50 = latency.value_at_quantile(0.50),
            p99 = latency.value_at_quantile(0.99),
            p999 = latency.value_at_quantile(0.999),
            max = latency.max(),
            c = args.concurrency,
            bad = total.bad,
            warm = total.warm,
        );
    }
    if args.slow > 0 {
        println!(
            "{label}: slow={n} slow_closed_by_server={slow_closed} slow_mean_life_ms={life}",
            label = args.label,
            n = args.slow,
            life = slow_lived.as_millis() / u128::from(slow_closed.max(1)),
        );
    }
    let bad: u64 = totals.iter().map(|total| total.bad).sum();
    if bad > 0 {
        bail!(
            "{bad} responses were not 200 or lacked {:?}",
            args.expect_header
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turns(servers: usize) -> Turns {
        Turns {
            start: Instant::now(),
            phase: Duration::from_millis(500),
            servers,
        }
    }

    #[test]
    fn two_servers_take_turns_from_the_first() {
        let turns = turns(2);
        let at = |ms| turns.start + Duration::from_millis(ms);
        assert_eq!(turns.owner(at(0)), 0);
        assert_eq!(turns.owner(at(499)), 0);
        assert_eq!(turns.owner(at(500)), 1);
        assert_eq!(turns.owner(at(1_250)), 0);
        assert_eq!(turns.owner(at(1_999)), 1);
    }

    #[test]
    fn one_server_owns_every_moment() {
        let turns = turns(1);
        let (from, until) = (turns.start, turns.start + Duration::from_millis(1_730));
        assert_eq!(turns.owner(until), 0);
        assert_eq!(turns.owned(0, from, until), Duration::from_millis(1_730));
    }

    #[test]
    fn the_measured_window_is_shared_out_by_turns() {
        let turns = turns(2);
        // From 0.3 s to 2.1 s: the first owns 0.3-0.5, 1.0-1.5 and 2.0-2.1 (0.8 s), the
        // second 0.5-1.0 and 1.5-2.0 (1.0 s).
        let from = turns.start + Duration::from_millis(300);
        let until = turns.start + Duration::from_millis(2_100);
        assert_eq!(turns.owned(0, from, until), Duration::from_millis(800));
        assert_eq!(turns.owned(1, from, until), Duration::from_millis(1_000));
    }
}
