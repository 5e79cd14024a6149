//! Tap overhead against the real broker.
//!
//! A producer (direct connection) publishes at a fixed rate; a consumer
//! (manual ack per message, prefetch 200) consumes either directly from the
//! broker or through a tap on an ephemeral loopback port. The tap runs on its
//! own current_thread runtime, as in the shim. Each message body carries its
//! send timestamp; latency = receive time - send time.
//!
//! Usage: cargo run --release -p ms2m-tap --example overhead -- [RATE] [SECONDS] [ROUNDS]
//! (defaults 10000 msg/s, 5 s, 2 rounds alternating direct/tap). Needs
//! RabbitMQ on 127.0.0.1:5672 (hack/start-rabbitmq.sh).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use ms2m_tap::{Tap, TapConfig};

const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

struct RunResult {
    received: usize,
    throughput: f64,
    p50_us: f64,
    p99_us: f64,
}

async fn run(
    consumer_url: &str,
    rate: u64,
    secs: u64,
) -> Result<RunResult, Box<dyn std::error::Error>> {
    let q = format!("ms2m-tap-overhead-{}-{}", std::process::id(), now_ns());
    let pconn = Connection::connect(BROKER, ConnectionProperties::default()).await?;
    let pch = pconn.create_channel().await?;
    pch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let cconn = Connection::connect(consumer_url, ConnectionProperties::default()).await?;
    let cch = cconn.create_channel().await?;
    cch.basic_qos(200, BasicQosOptions::default()).await?;
    let mut consumer = cch
        .basic_consume(
            q.as_str().into(),
            "overhead".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let total = (rate * secs) as usize;
    let qn = q.clone();
    let producer = tokio::spawn(async move {
        let start = Instant::now();
        let per_ms = rate as f64 / 1000.0;
        let mut sent = 0usize;
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        while sent < total {
            tick.tick().await;
            let due = ((start.elapsed().as_secs_f64() * 1000.0 * per_ms) as usize).min(total);
            while sent < due {
                let body = now_ns().to_be_bytes();
                let _ = pch
                    .basic_publish(
                        "".into(),
                        qn.as_str().into(),
                        BasicPublishOptions::default(),
                        &body,
                        BasicProperties::default(),
                    )
                    .await;
                sent += 1;
            }
        }
        pch
    });
    let mut lat = Vec::with_capacity(total);
    let mut first = None;
    let mut last = Instant::now();
    while lat.len() < total {
        let d = match tokio::time::timeout(Duration::from_secs(10), consumer.next()).await {
            Ok(Some(Ok(d))) => d,
            _ => break,
        };
        let t = now_ns();
        let mut b = [0u8; 8];
        b.copy_from_slice(&d.data[..8]);
        lat.push(t.saturating_sub(u64::from_be_bytes(b)));
        d.ack(BasicAckOptions::default()).await?;
        first.get_or_insert_with(Instant::now);
        last = Instant::now();
    }
    let pch = producer.await?;
    let _ = pch
        .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = cconn.close(200, "done".into()).await;
    let _ = pconn.close(200, "done".into()).await;
    let received = lat.len();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |v| *v as f64 / 1000.0)
    };
    let elapsed = first.map_or(1.0, |f| last.duration_since(f).as_secs_f64().max(1e-6));
    Ok(RunResult {
        received,
        throughput: received as f64 / elapsed,
        p50_us: pct(0.5),
        p99_us: pct(0.99),
    })
}

/// CPU cost of the tap's per-message work, without sockets: cut a
/// deliver+header+body triple from a buffer, decode the deliver method and
/// the content header, record it in the ledger, copy it out; then decode and
/// apply the client's ack. Mirrors what the proxy does per message.
fn hot_path_cost() -> Result<f64, Box<dyn std::error::Error>> {
    use amq_protocol::frame::parsing::parse_content_header;
    use amq_protocol::frame::{gen_frame, AMQPContentHeader, AMQPFrame, WriteContext};
    use amq_protocol::protocol::{basic, parse_class, AMQPClass};
    use ms2m_tap::codec::{FrameReader, FRAME_HEADER, FRAME_METHOD};
    use ms2m_tap::ledger::{header_fields, Ledger};

    let enc = |f: &AMQPFrame| -> Result<Vec<u8>, Box<dyn std::error::Error>> {
        let ctx = WriteContext::from(Vec::new());
        Ok(gen_frame(f)(ctx)
            .map_err(|e| format!("{e:?}"))?
            .into_inner()
            .0)
    };
    let mut ledger = Ledger::new(None);
    let consume = AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
        queue: "q".into(),
        consumer_tag: "c".into(),
        ..Default::default()
    }));
    ledger.client_method(1, 1, &consume);
    ledger.server_method(
        1,
        1,
        &AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
            consumer_tag: "c".into(),
        })),
    );
    let n = 200_000u64;
    let mut reader = FrameReader::new(1 << 20);
    let mut out = Vec::with_capacity(1 << 16);
    // "Broker" and "client" frames, pre-encoded; only the tap part is timed.
    let frames: Vec<(Vec<u8>, Vec<u8>)> = (1..=n)
        .map(
            |tag| -> Result<(Vec<u8>, Vec<u8>), Box<dyn std::error::Error>> {
                let mut b = enc(&AMQPFrame::Method(
                    1,
                    AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                        consumer_tag: "c".into(),
                        delivery_tag: tag,
                        routing_key: "q".into(),
                        ..Default::default()
                    })),
                ))?;
                b.extend(enc(&AMQPFrame::Header(
                    1,
                    AMQPContentHeader {
                        class_id: 60,
                        body_size: 8,
                        properties: BasicProperties::default(),
                    },
                ))?);
                b.extend(enc(&AMQPFrame::Body(1, vec![0u8; 8]))?);
                let a = enc(&AMQPFrame::Method(
                    1,
                    AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                        delivery_tag: tag,
                        multiple: false,
                    })),
                ))?;
                Ok((b, a))
            },
        )
        .collect::<Result<_, _>>()?;
    let t = Instant::now();
    for (i, (bytes, ack)) in frames.iter().enumerate() {
        let tag = 1 + i as u64;
        reader.read_target(1 << 16).extend_from_slice(bytes);
        while let Some(f) = reader.next_frame()? {
            let payload = &reader.buffered()[f.payload_range()];
            if f.kind == FRAME_METHOD {
                if let Ok((_, AMQPClass::Basic(basic::AMQPMethod::Deliver(d)))) =
                    parse_class(payload)
                {
                    let d = ledger.delivery_from_deliver(1, 1, &d);
                    ledger.record_delivery(1, d);
                }
            } else if f.kind == FRAME_HEADER {
                if let Ok((_, h)) = parse_content_header(payload) {
                    let (o, m) = header_fields(&h.properties);
                    ledger.update_delivery(1, 1, tag, o, m);
                }
            }
            out.extend_from_slice(&reader.buffered()[f.range()]);
        }
        out.clear();
        reader.read_target(1 << 16).extend_from_slice(ack);
        while let Some(f) = reader.next_frame()? {
            if let Ok((_, m)) = parse_class(&reader.buffered()[f.payload_range()]) {
                ledger.client_method(1, 1, &m);
            }
        }
    }
    let per_msg_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    if ledger.unsettled() != 0 {
        return Err("hot path benchmark left deliveries unsettled".into());
    }
    Ok(per_msg_us)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rate = args.first().copied().unwrap_or(10_000);
    let secs = args.get(1).copied().unwrap_or(5);
    let rounds = args.get(2).copied().unwrap_or(2);
    if std::net::TcpStream::connect("127.0.0.1:5672").is_err() {
        return Err("RabbitMQ not reachable on 127.0.0.1:5672: run hack/start-rabbitmq.sh".into());
    }
    // the tap on its own current_thread runtime, like in the shim
    let listeners = Tap::listen_loopback(0)?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let tap = Tap::start(TapConfig::new(BROKER).expect("config"), listeners, None)
                .await
                .expect("tap");
            tx.send(tap).expect("send");
            std::future::pending::<()>().await;
        });
    });
    let tap = rx.recv()?;
    let addr = tap
        .local_addrs()
        .iter()
        .find(|a| a.is_ipv4())
        .copied()
        .ok_or("no v4 listener")?;
    let tap_url = format!("amqp://guest:guest@{addr}/%2f");
    println!("offered {rate} msg/s for {secs} s, {rounds} rounds (direct, tap alternating)");
    let (mut dt, mut tt, mut d50, mut t50, mut d99, mut t99) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut diffs = vec![];
    for r in 0..rounds {
        for (name, url) in [("direct", BROKER.to_string()), ("tap", tap_url.clone())] {
            let res = run(&url, rate, secs).await?;
            println!(
                "round {r} {name:6}: received {:6}, throughput {:8.0} msg/s, latency p50 {:7.1} us, p99 {:8.1} us",
                res.received, res.throughput, res.p50_us, res.p99_us
            );
            if name == "direct" {
                dt.push(res.throughput);
                d50.push(res.p50_us);
                d99.push(res.p99_us);
            } else {
                tt.push(res.throughput);
                t50.push(res.p50_us);
                t99.push(res.p99_us);
            }
        }
    }
    for (t, d) in t50.iter().zip(&d50) {
        diffs.push(t - d);
    }
    let paired = median(diffs);
    let (dt, tt) = (median(dt), median(tt));
    let (d50, t50, d99, t99) = (median(d50), median(t50), median(d99), median(t99));
    println!("direct: {dt:.0} msg/s, p50 {d50:.1} us, p99 {d99:.1} us");
    println!("tap:    {tt:.0} msg/s, p50 {t50:.1} us, p99 {t99:.1} us");
    println!(
        "throughput ratio tap/direct: {:.3} (target >= 0.95)",
        tt / dt
    );
    println!(
        "added latency p50: {:.1} us (target <= 100 us); p99: {:.1} us",
        t50 - d50,
        t99 - d99
    );
    println!("added latency p50, median of per-round differences: {paired:.1} us");
    println!(
        "tap CPU work per message (deliver+header+body and its ack, no sockets): {:.2} us",
        hot_path_cost()?
    );
    let st = tap.stats();
    println!("tap stats: {st:?}");
    Ok(())
}
