//! Shared helpers for the tap's integration tests (real RabbitMQ).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use ms2m_tap::{Cut, Resume, Tap, TapConfig};

pub const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Panics loudly when the broker is not there.
pub fn require_broker() {
    if TcpStream::connect_timeout(&"127.0.0.1:5672".parse().unwrap(), Duration::from_secs(2))
        .is_err()
    {
        panic!("RabbitMQ is not reachable on 127.0.0.1:5672: run hack/start-rabbitmq.sh");
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "ms2m_tap=info".into()),
        )
        .with_test_writer()
        .try_init();
}

pub fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("ms2m-tap-test-{name}-{}-{nanos}", std::process::id())
}

/// A tap running on its own current_thread runtime (as in the shim).
pub struct Harness {
    pub tap: Tap,
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Harness {
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn start_tap_with(config: TapConfig, resume: Option<Cut>) -> Harness {
    start_tap_resume(config, Resume::from_cut(resume))
}

/// A tap started with [`Tap::start_with`].
pub fn start_tap_resume(config: TapConfig, resume: Resume) -> Harness {
    init_tracing();
    let listeners = Tap::listen_loopback(0).expect("bind loopback");
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let tap = Tap::start_with(config, listeners, resume).await.unwrap();
            tx.send(tap.clone()).unwrap();
            let _ = stop_rx.await;
            tap.shutdown().await;
        });
    });
    let tap = rx.recv().unwrap();
    let addr = *tap.local_addrs().iter().find(|a| a.is_ipv4()).unwrap();
    Harness {
        tap,
        addr,
        stop: Some(stop_tx),
        thread: Some(thread),
    }
}

pub fn start_tap(resume: Option<Cut>) -> Harness {
    require_broker();
    start_tap_with(TapConfig::new(BROKER).unwrap(), resume)
}

pub async fn connect(url: &str) -> Connection {
    tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .expect("connect timed out")
    .expect("connect")
}

pub async fn declare_classic(ch: &Channel, q: &str) {
    ch.queue_declare(
        q.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

pub async fn declare_stream(ch: &Channel, q: &str) {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("stream".into()),
    );
    ch.queue_declare(
        q.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
}

pub async fn delete_queue(url: &str, q: &str) {
    let c = connect(url).await;
    let ch = c.create_channel().await.unwrap();
    let _ = ch
        .queue_delete(q.into(), QueueDeleteOptions::default())
        .await;
    let _ = c.close(200, "bye".into()).await;
}

pub async fn publish_n(ch: &Channel, q: &str, from: u32, n: u32) {
    for i in from..from + n {
        ch.basic_publish(
            "".into(),
            q.into(),
            BasicPublishOptions::default(),
            format!("{i}").as_bytes(),
            BasicProperties::default().with_message_id(format!("m-{i}").into()),
        )
        .await
        .unwrap();
    }
}

pub async fn consume(ch: &Channel, q: &str, tag: &str, args: FieldTable) -> Consumer {
    ch.basic_consume(q.into(), tag.into(), BasicConsumeOptions::default(), args)
        .await
        .unwrap()
}

pub async fn recv(c: &mut Consumer, n: usize) -> Vec<Delivery> {
    let mut v = Vec::new();
    while v.len() < n {
        let d = tokio::time::timeout(Duration::from_secs(10), c.next())
            .await
            .unwrap_or_else(|_| panic!("timed out after {} of {n} deliveries", v.len()))
            .expect("consumer ended")
            .expect("delivery error");
        v.push(d);
    }
    v
}

/// Nothing arrives within `wait`.
pub async fn recv_none(c: &mut Consumer, wait: Duration) {
    if let Ok(Some(d)) = tokio::time::timeout(wait, c.next()).await {
        panic!("unexpected delivery: {:?}", d.map(|d| d.data));
    }
}

pub fn body(d: &Delivery) -> u32 {
    String::from_utf8_lossy(&d.data).parse().unwrap()
}

pub fn stream_offset(d: &Delivery) -> u64 {
    let h = d.properties.headers().as_ref().expect("headers");
    match h.inner().get("x-stream-offset").expect("x-stream-offset") {
        lapin::types::AMQPValue::LongLongInt(o) => *o as u64,
        other => panic!("unexpected offset type {other:?}"),
    }
}

pub fn stream_args(spec: lapin::types::AMQPValue) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-stream-offset".into(), spec);
    args
}

/// Raw client: connect, send the protocol header, return the socket.
pub fn raw_connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// True when the peer closes the socket within 5 s (EOF or reset), draining
/// whatever the broker had sent before.
pub fn closed_by_peer(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
    false
}

pub fn write_all(s: &mut TcpStream, b: &[u8]) {
    s.write_all(b).unwrap();
}
