//! `amqp-consumer`: ms2m's own test workload, an ordinary AMQP 0-9-1
//! consumer written with lapin that knows nothing about ms2m.
//!
//! It consumes numbered messages (`{"seq":N,"sent_at_us":T}`) from a classic
//! queue or a RabbitMQ stream. Its state is the running 64-bit FNV-1a digest
//! over the sequence numbers it processed (each `seq` as 8 little-endian
//! bytes), the count of processed messages and the last `seq`. For every
//! delivery it updates the state, publishes a result
//! (`{"consumer","seq","count","digest","processed_at_us","sent_at_us"}`) to
//! the results queue with publisher confirms, waits for the confirm, and only
//! then acks the delivery: "processed exactly once" rests on that order.
//!
//! The current state is kept in a file (default `/tmp/consumer-state`,
//! replaced atomically) so a test can read it with `ctr task exec cat`.
//!
//! On connection loss (a broker restart, or the socket CRIU restored closed)
//! it reconnects with backoff (100 ms doubling to 1 s) and consumes again with
//! the configured offset, keeping its in-memory state.
//!
//! Configuration, from `--name value` arguments or the environment:
//! `AMQP_URL` (default `amqp://guest:guest@localhost:5672/%2f`), `QUEUE`
//! (required), `QUEUE_TYPE` `classic|stream` (default classic),
//! `STREAM_OFFSET` (`next`, `first`, `last` or a number; default `next`),
//! `PREFETCH` (default 50), `RESULTS_QUEUE` (default `<QUEUE>.results`),
//! `CONSUMER_NAME` (default the hostname), `STATE_FILE` (default
//! `/tmp/consumer-state`), `WORK_US` (default 0): simulated work, the
//! consumer sleeps (blocking, `std::thread::sleep`) that many microseconds
//! per message after updating its state and before publishing the result,
//! so `processed_at_us` is taken after the work; with `WORK_US=1000` and one
//! message at a time it processes at most ~1,000 msg/s. `BATCH` (default 1):
//! up to that many deliveries the broker has already sent are processed
//! together: their results are published back to back, and once all are
//! confirmed the state is kept and the deliveries acked with one
//! `multiple` ack (one confirm round trip per batch instead of per
//! message; the order publish, confirm, ack is the same).

use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const USAGE: &str =
    "usage: amqp-consumer [--amqp-url URL] --queue NAME [--queue-type classic|stream] \
[--stream-offset next|first|last|N] [--prefetch N] [--results-queue NAME] [--consumer-name NAME] \
[--state-file PATH] [--work-us N]   (each also from the environment: AMQP_URL, QUEUE, QUEUE_TYPE, ...)";

/// How long a connection's handshake may take before it is retried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a publish confirm or an ack may take before the connection
/// is given up and made again: a confirm still pending when the
/// connection dies is not always failed (seen once after a broker restart:
/// the consumer waited on it for good).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);

/// FNV-1a 64-bit offset basis: the digest of the empty sequence.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QueueType {
    Classic,
    Stream,
}

#[derive(Debug, Clone)]
enum StreamOffset {
    Named(String),
    Offset(i64),
}

#[derive(Debug, Clone)]
struct Config {
    url: String,
    queue: String,
    queue_type: QueueType,
    offset: StreamOffset,
    prefetch: u16,
    results_queue: String,
    name: String,
    state_file: PathBuf,
    /// Simulated work per message, µs (0: none).
    work_us: u64,
    /// Deliveries processed together at most (1: one at a time).
    batch: usize,
}

impl Config {
    fn load() -> Result<Config, String> {
        let mut args = std::env::args().skip(1);
        let mut given: Vec<(String, String)> = Vec::new();
        while let Some(a) = args.next() {
            if a == "-h" || a == "--help" {
                println!("{USAGE}");
                std::process::exit(0);
            }
            let Some(name) = a.strip_prefix("--") else {
                return Err(format!("unexpected argument {a:?}\n{USAGE}"));
            };
            let (name, value) = match name.split_once('=') {
                Some((n, v)) => (n.to_string(), v.to_string()),
                None => (
                    name.to_string(),
                    args.next()
                        .ok_or_else(|| format!("--{name} needs a value\n{USAGE}"))?,
                ),
            };
            given.push((name.replace('-', "_").to_ascii_uppercase(), value));
        }
        const KNOWN: [&str; 10] = [
            "AMQP_URL",
            "QUEUE",
            "QUEUE_TYPE",
            "STREAM_OFFSET",
            "PREFETCH",
            "RESULTS_QUEUE",
            "CONSUMER_NAME",
            "STATE_FILE",
            "WORK_US",
            "BATCH",
        ];
        if let Some((n, _)) = given.iter().find(|(n, _)| !KNOWN.contains(&n.as_str())) {
            return Err(format!(
                "unknown option --{}\n{USAGE}",
                n.to_ascii_lowercase().replace('_', "-")
            ));
        }
        let get = |name: &str| -> Option<String> {
            given
                .iter()
                .rev()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .or_else(|| std::env::var(name).ok())
                .filter(|v| !v.is_empty())
        };
        let queue = get("QUEUE").ok_or_else(|| format!("QUEUE is not set\n{USAGE}"))?;
        let queue_type = match get("QUEUE_TYPE").as_deref().unwrap_or("classic") {
            "classic" => QueueType::Classic,
            "stream" => QueueType::Stream,
            other => {
                return Err(format!(
                    "QUEUE_TYPE must be classic or stream, not {other:?}"
                ))
            }
        };
        let offset = parse_offset(get("STREAM_OFFSET").as_deref().unwrap_or("next"))?;
        let prefetch = match get("PREFETCH") {
            None => 50,
            Some(p) => p
                .parse()
                .map_err(|e| format!("PREFETCH {p:?} is not a number 0..65535: {e}"))?,
        };
        let work_us = match get("WORK_US") {
            None => 0,
            Some(w) => w
                .parse()
                .map_err(|e| format!("WORK_US {w:?} is not a number of microseconds: {e}"))?,
        };
        let batch = match get("BATCH") {
            None => 1,
            Some(b) => match b.parse::<usize>() {
                Ok(n) if n >= 1 => n,
                _ => return Err(format!("BATCH {b:?} is not a number >= 1")),
            },
        };
        let name = get("CONSUMER_NAME")
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
                    .filter(|h| !h.is_empty())
            })
            .unwrap_or_else(|| "amqp-consumer".to_string());
        Ok(Config {
            url: get("AMQP_URL")
                .unwrap_or_else(|| "amqp://guest:guest@localhost:5672/%2f".to_string()),
            results_queue: get("RESULTS_QUEUE").unwrap_or_else(|| format!("{queue}.results")),
            queue,
            queue_type,
            offset,
            prefetch,
            name,
            work_us,
            batch,
            state_file: PathBuf::from(
                get("STATE_FILE").unwrap_or_else(|| "/tmp/consumer-state".to_string()),
            ),
        })
    }
}

fn parse_offset(s: &str) -> Result<StreamOffset, String> {
    match s {
        "next" | "first" | "last" => Ok(StreamOffset::Named(s.to_string())),
        n => n
            .parse()
            .map(StreamOffset::Offset)
            .map_err(|_| format!("STREAM_OFFSET must be next, first, last or a number, not {n:?}")),
    }
}

/// What the consumer has processed: the state a checkpoint must preserve.
#[derive(Debug, Clone, PartialEq, Eq)]
struct State {
    count: u64,
    last_seq: u64,
    digest: u64,
    /// Successful (re)connections that reached basic.consume.
    connects: u64,
}

impl State {
    fn new() -> State {
        State {
            count: 0,
            last_seq: 0,
            digest: FNV_OFFSET,
            connects: 0,
        }
    }

    /// The state after processing `seq`.
    fn after(&self, seq: u64) -> State {
        let mut digest = self.digest;
        for b in seq.to_le_bytes() {
            digest ^= u64::from(b);
            digest = digest.wrapping_mul(FNV_PRIME);
        }
        State {
            count: self.count + 1,
            last_seq: seq,
            digest,
            connects: self.connects,
        }
    }

    fn to_json(&self, name: &str) -> String {
        serde_json::json!({
            "consumer": name,
            "count": self.count,
            "last_seq": self.last_seq,
            "digest": format!("{:016x}", self.digest),
            "connects": self.connects,
            "updated_at_us": now_us(),
        })
        .to_string()
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn log(msg: &str) {
    println!("{} amqp-consumer: {msg}", now_us());
}

/// A producer message: `{"seq":N,"sent_at_us":T}` (or plain `N` / `seq=N`).
fn parse_message(body: &[u8]) -> Option<(u64, Option<u64>)> {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        if let Some(seq) = v.get("seq").and_then(|s| s.as_u64()) {
            return Some((seq, v.get("sent_at_us").and_then(|s| s.as_u64())));
        }
        return v.as_u64().map(|s| (s, None));
    }
    let text = std::str::from_utf8(body).ok()?.trim();
    let text = text.strip_prefix("seq=").unwrap_or(text);
    text.parse().ok().map(|s| (s, None))
}

fn write_state(path: &PathBuf, json: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{json}\n"))?;
    std::fs::rename(&tmp, path)
}

fn queue_args(cfg: &Config) -> FieldTable {
    let mut args = FieldTable::default();
    if cfg.queue_type == QueueType::Stream {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("stream")),
        );
    }
    args
}

fn declare_opts() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// Why one session ended.
enum End {
    Signal,
    Lost(String),
}

/// One connection's life: connect, declare, consume until the connection or
/// channel fails. `state` carries over between sessions.
async fn session(cfg: &Config, state: &mut State) -> Result<End, String> {
    let props = ConnectionProperties::default()
        .with_connection_name(LongString::from(format!("amqp-consumer {}", cfg.name)));
    // Bounded: a connection accepted while the broker (re)starts may never
    // get its handshake answered; lapin itself would wait forever.
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(&cfg.url, props))
        .await
        .map_err(|_| {
            format!(
                "connecting to {}: no handshake within {} s",
                redact(&cfg.url),
                CONNECT_TIMEOUT.as_secs()
            )
        })?
        .map_err(|e| format!("connecting to {}: {e}", redact(&cfg.url)))?;
    let result = consume(cfg, &conn, state).await;
    let _ = tokio::time::timeout(Duration::from_millis(500), conn.close(200, "bye".into())).await;
    result
}

async fn consume(cfg: &Config, conn: &Connection, state: &mut State) -> Result<End, String> {
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| format!("opening the consume channel: {e}"))?;
    let pub_ch: Channel = conn
        .create_channel()
        .await
        .map_err(|e| format!("opening the publish channel: {e}"))?;
    ch.queue_declare(
        ShortString::from(cfg.queue.as_str()),
        declare_opts(),
        queue_args(cfg),
    )
    .await
    .map_err(|e| format!("declaring queue {}: {e}", cfg.queue))?;
    pub_ch
        .queue_declare(
            ShortString::from(cfg.results_queue.as_str()),
            declare_opts(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("declaring results queue {}: {e}", cfg.results_queue))?;
    pub_ch
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| format!("enabling publisher confirms: {e}"))?;
    ch.basic_qos(cfg.prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| format!("basic.qos {}: {e}", cfg.prefetch))?;
    let mut consume_args = FieldTable::default();
    if cfg.queue_type == QueueType::Stream {
        let v = match &cfg.offset {
            StreamOffset::Named(n) => AMQPValue::LongString(LongString::from(n.as_str())),
            StreamOffset::Offset(n) => AMQPValue::LongLongInt(*n),
        };
        consume_args.insert("x-stream-offset".into(), v);
    }
    let mut consumer = ch
        .basic_consume(
            ShortString::from(cfg.queue.as_str()),
            ShortString::from(format!("amqp-consumer-{}", cfg.name)),
            BasicConsumeOptions::default(),
            consume_args,
        )
        .await
        .map_err(|e| format!("basic.consume on {}: {e}", cfg.queue))?;
    state.connects += 1;
    persist(cfg, state);
    log(&format!(
        "consuming {} ({:?}{}, prefetch {}), results to {}, connection #{}, state count={} last_seq={}",
        cfg.queue,
        cfg.queue_type,
        match (&cfg.queue_type, &cfg.offset) {
            (QueueType::Stream, StreamOffset::Named(n)) => format!(", offset {n}"),
            (QueueType::Stream, StreamOffset::Offset(n)) => format!(", offset {n}"),
            _ => String::new(),
        },
        cfg.prefetch,
        cfg.results_queue,
        state.connects,
        state.count,
        state.last_seq
    ));

    let mut first = true;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("installing the SIGTERM handler: {e}"))?;
    loop {
        let delivery = tokio::select! {
            d = consumer.next() => d,
            _ = term.recv() => {
                log(&format!("SIGTERM: exiting with count={} last_seq={}", state.count, state.last_seq));
                return Ok(End::Signal);
            }
            _ = tokio::signal::ctrl_c() => {
                log("SIGINT: exiting");
                return Ok(End::Signal);
            }
        };
        let delivery = match delivery {
            None => return Ok(End::Lost("the consumer was cancelled".into())),
            Some(Err(e)) => return Ok(End::Lost(e.to_string())),
            Some(Ok(d)) => d,
        };
        // With BATCH > 1, what the broker has already delivered joins this
        // delivery (without waiting for more).
        let mut batch = vec![delivery];
        let mut ended = None;
        while batch.len() < cfg.batch {
            match futures_lite::future::poll_once(consumer.next()).await {
                Some(Some(Ok(d))) => batch.push(d),
                Some(Some(Err(e))) => {
                    ended = Some(End::Lost(e.to_string()));
                    break;
                }
                Some(None) => {
                    ended = Some(End::Lost("the consumer was cancelled".into()));
                    break;
                }
                None => break,
            }
        }
        if let Some(end) = process(cfg, &pub_ch, state, &mut first, &batch).await? {
            return Ok(end);
        }
        if let Some(end) = ended {
            return Ok(end);
        }
    }
}

/// Processes `batch` (deliveries of one channel, in order): each updates
/// the state and publishes its result; once the broker confirmed them, the
/// state is kept and the deliveries acked (the last with `multiple` when
/// there are several). A failure keeps and acks the confirmed prefix only,
/// so what comes back on the next connection is exactly what the state
/// lacks.
async fn process(
    cfg: &Config,
    pub_ch: &Channel,
    state: &mut State,
    first: &mut bool,
    batch: &[lapin::message::Delivery],
) -> Result<Option<End>, String> {
    let mut next = state.clone();
    let mut pending = Vec::with_capacity(batch.len());
    let mut failed = None;
    for (i, delivery) in batch.iter().enumerate() {
        let offset = delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-stream-offset").cloned());
        let Some((seq, sent_at_us)) = parse_message(&delivery.data) else {
            log(&format!(
                "dropping a message that is not a numbered message ({} bytes)",
                delivery.data.len()
            ));
            continue;
        };
        if *first {
            *first = false;
            log(&format!(
                "first delivery on this connection: seq={seq} redelivered={} offset={offset:?}",
                delivery.redelivered
            ));
        }
        next = next.after(seq);
        if cfg.work_us > 0 {
            // The simulated work blocks the (single-threaded) consumer, as
            // real CPU work would.
            std::thread::sleep(Duration::from_micros(cfg.work_us));
        }
        let result = serde_json::json!({
            "consumer": cfg.name,
            "seq": seq,
            "count": next.count,
            "digest": format!("{:016x}", next.digest),
            "processed_at_us": now_us(),
            "sent_at_us": sent_at_us,
        })
        .to_string();
        match pub_ch
            .basic_publish(
                ShortString::from(""),
                ShortString::from(cfg.results_queue.as_str()),
                BasicPublishOptions::default(),
                result.as_bytes(),
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type(ShortString::from("application/json")),
            )
            .await
        {
            Ok(confirm) => pending.push((i, seq, next.clone(), confirm)),
            Err(e) => {
                failed = Some(format!("publishing the result of seq {seq}: {e}"));
                break;
            }
        }
    }
    // Everything before the first unconfirmed result is done.
    let mut done = 0;
    for (i, seq, st, confirm) in pending {
        let Ok(confirmed) = tokio::time::timeout(SETTLE_TIMEOUT, confirm).await else {
            failed = Some(format!(
                "no confirm for the result of seq {seq} within {} s",
                SETTLE_TIMEOUT.as_secs()
            ));
            break;
        };
        match confirmed {
            Ok(c) if c.is_ack() => {
                *state = st;
                done = i + 1;
            }
            Ok(_) => {
                failed = Some(format!("the broker nacked the result of seq {seq}"));
                break;
            }
            Err(e) => {
                failed = Some(format!("publishing the result of seq {seq}: {e}"));
                break;
            }
        }
    }
    if failed.is_none() {
        done = batch.len();
    }
    persist(cfg, state);
    if done > 0 {
        let last = &batch[done - 1];
        let ack = BasicAckOptions { multiple: done > 1 };
        let Ok(acked) = tokio::time::timeout(SETTLE_TIMEOUT, last.ack(ack)).await else {
            return Ok(Some(End::Lost(format!(
                "ack of delivery {} not written within {} s",
                last.delivery_tag,
                SETTLE_TIMEOUT.as_secs()
            ))));
        };
        match acked {
            Ok(true) => {}
            Ok(false) => {
                return Ok(Some(End::Lost(format!(
                    "ack of delivery {} refused (channel gone)",
                    last.delivery_tag
                ))))
            }
            Err(e) => {
                return Ok(Some(End::Lost(format!(
                    "ack of delivery {}: {e}",
                    last.delivery_tag
                ))))
            }
        }
    }
    Ok(failed.map(End::Lost))
}

fn persist(cfg: &Config, state: &State) {
    if let Err(e) = write_state(&cfg.state_file, &state.to_json(&cfg.name)) {
        log(&format!("cannot write {}: {e}", cfg.state_file.display()));
    }
}

/// The URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

async fn run(cfg: Config) -> i32 {
    log(&format!(
        "starting: {} queue={} type={:?} results={} name={} state={}",
        redact(&cfg.url),
        cfg.queue,
        cfg.queue_type,
        cfg.results_queue,
        cfg.name,
        cfg.state_file.display()
    ));
    let mut state = State::new();
    persist(&cfg, &state);
    let mut backoff = Duration::from_millis(100);
    loop {
        let connects = state.connects;
        match session(&cfg, &mut state).await {
            Ok(End::Signal) => return 0,
            Ok(End::Lost(why)) => log(&format!("connection lost: {why}")),
            Err(why) => log(&format!("session failed: {why}")),
        }
        if state.connects > connects {
            backoff = Duration::from_millis(100);
        }
        log(&format!("reconnecting in {} ms", backoff.as_millis()));
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = tokio::signal::ctrl_c() => return 0,
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

fn main() {
    let cfg = match Config::load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("amqp-consumer: {e}");
            std::process::exit(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("amqp-consumer: cannot start the tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = rt.block_on(run(cfg));
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_fnv1a_over_le_seq() {
        let s = State::new().after(1).after(2);
        // Recomputed independently, byte by byte.
        let mut h: u64 = 0xcbf29ce484222325;
        for b in [1u8, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0] {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        assert_eq!(s.digest, h);
        assert_eq!(s.count, 2);
        assert_eq!(s.last_seq, 2);
        assert_ne!(State::new().after(2).after(1).digest, s.digest);
    }

    #[test]
    fn parses_messages() {
        assert_eq!(
            parse_message(br#"{"seq":7,"sent_at_us":12}"#),
            Some((7, Some(12)))
        );
        assert_eq!(parse_message(b"42"), Some((42, None)));
        assert_eq!(parse_message(b"seq=5\n"), Some((5, None)));
        assert_eq!(parse_message(b"hello"), None);
        assert_eq!(parse_message(br#"{"x":1}"#), None);
    }

    #[test]
    fn offsets_and_redaction() {
        assert!(matches!(parse_offset("next"), Ok(StreamOffset::Named(_))));
        assert!(matches!(parse_offset("17"), Ok(StreamOffset::Offset(17))));
        assert!(parse_offset("soon").is_err());
        assert_eq!(
            redact("amqp://guest:guest@localhost:5672/%2f"),
            "amqp://guest:***@localhost:5672/%2f"
        );
        assert_eq!(redact("amqp://localhost"), "amqp://localhost");
    }
}
