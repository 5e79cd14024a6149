//! `ms2m_tap::link` against the real RabbitMQ (and a scripted fake broker for
//! what a real one cannot be made to do: split frames, oversized frames).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use amq_protocol::frame::{gen_frame, AMQPContentHeader, AMQPFrame, WriteContext};
use amq_protocol::protocol::{basic, channel, connection, exchange, parse_class, queue, AMQPClass};
use common::{require_broker, unique, BROKER};
use ms2m_tap::codec::{self, FrameReader, FRAME_METHOD};
use ms2m_tap::link::{open, LinkConfig, LinkReceiver, LinkSender};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const NODE: &str = "ms2m@localhost";

fn cfg() -> LinkConfig {
    LinkConfig::from_url(BROKER, Duration::from_secs(5)).unwrap()
}

async fn link(room: &str) -> (LinkSender, LinkReceiver) {
    open(&cfg(), room).await.expect("open link")
}

async fn next(rx: &mut LinkReceiver) -> Vec<u8> {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("timed out waiting for a message")
        .expect("recv")
}

async fn next_err(rx: &mut LinkReceiver) -> String {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("timed out waiting for the link to fail")
        {
            Ok(_) => continue,
            Err(e) => return e.to_string(),
        }
    }
}

fn ctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(["-q", "-n", NODE])
        .args(args)
        .output()
        .expect("run rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The broker's pids of connections whose client-provided name (the
/// `connection_name` client property) is `name`.
fn connections_named(name: &str) -> Vec<String> {
    let quoted = format!("\"{name}\"");
    ctl(&["list_connections", "pid", "client_properties"])
        .lines()
        .filter_map(|l| {
            let (pid, props) = l.split_once('\t')?;
            props.contains(&quoted).then(|| pid.trim().to_string())
        })
        .collect()
}

fn link_name(room: &str) -> String {
    format!("ms2m link room={room}")
}

#[tokio::test]
async fn two_parties_same_room_1000_in_order() {
    require_broker();
    let room = unique("room");
    let (a_tx, mut a_rx) = link(&room).await;
    let (b_tx, mut b_rx) = link(&room).await;
    for i in 0..1000u32 {
        a_tx.send(format!("{{\"seq\":{i}}}").as_bytes())
            .await
            .unwrap();
    }
    for rx in [&mut a_rx, &mut b_rx] {
        for i in 0..1000u32 {
            assert_eq!(next(rx).await, format!("{{\"seq\":{i}}}").into_bytes());
        }
    }
    // The other party, concurrently from a clone on another task, and an
    // empty body.
    let b2 = b_tx.clone();
    tokio::spawn(async move { b2.send(b"{\"from\":\"b\"}").await.unwrap() })
        .await
        .unwrap();
    b_tx.send(b"").await.unwrap();
    for rx in [&mut a_rx, &mut b_rx] {
        assert_eq!(next(rx).await, b"{\"from\":\"b\"}");
        assert_eq!(next(rx).await, b"");
    }
}

#[tokio::test]
async fn large_body_round_trips() {
    require_broker();
    let room = unique("large");
    let (a_tx, mut a_rx) = link(&room).await;
    let (_b_tx, mut b_rx) = link(&room).await;
    let body: Vec<u8> = (0..300 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    a_tx.send(&body).await.unwrap();
    a_tx.send(b"after").await.unwrap();
    assert_eq!(next(&mut b_rx).await, body);
    assert_eq!(next(&mut b_rx).await, b"after");
    assert_eq!(next(&mut a_rx).await, body);
}

#[tokio::test]
async fn other_room_receives_nothing() {
    require_broker();
    let (a_tx, mut a_rx) = link(&unique("x")).await;
    let (c_tx, mut c_rx) = link(&unique("y")).await;
    a_tx.send(b"for x").await.unwrap();
    assert_eq!(next(&mut a_rx).await, b"for x");
    c_tx.send(b"for y").await.unwrap();
    assert_eq!(next(&mut c_rx).await, b"for y");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), c_rx.recv())
            .await
            .is_err(),
        "room y received something"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(100), a_rx.recv())
            .await
            .is_err(),
        "room x received room y's message"
    );
}

#[tokio::test]
async fn bad_password_names_the_step_not_the_password() {
    require_broker();
    let mut c = cfg();
    c.password = "not-the-Password-42".into();
    let t0 = Instant::now();
    let err = open(&c, "r")
        .await
        .expect_err("bad password accepted")
        .to_string();
    eprintln!("bad password: {err} ({:?})", t0.elapsed());
    assert!(err.contains("authenticating"), "{err}");
    assert!(err.contains("127.0.0.1:5672"), "{err}");
    assert!(err.contains("ACCESS_REFUSED"), "{err}");
    assert!(!err.contains("not-the-Password-42"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn unreachable_port_fails_fast_and_silent_peer_times_out() {
    // A port nobody listens on: refused at once.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let c =
        LinkConfig::from_url(&format!("amqp://127.0.0.1:{port}"), Duration::from_secs(2)).unwrap();
    let t0 = Instant::now();
    let err = open(&c, "r")
        .await
        .expect_err("connected to nothing")
        .to_string();
    eprintln!("unreachable: {err} ({:?})", t0.elapsed());
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(err.contains("connecting"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(2));

    // A peer that accepts and says nothing: the timeout, naming the step.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(s);
    });
    let c = LinkConfig::from_url(
        &format!("amqp://127.0.0.1:{port}"),
        Duration::from_millis(300),
    )
    .unwrap();
    let t0 = Instant::now();
    let err = open(&c, "r").await.expect_err("silent peer").to_string();
    let took = t0.elapsed();
    eprintln!("silent peer: {err} ({took:?})");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert!(
        err.contains("timed out") && err.contains("connection.start"),
        "{err}"
    );
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    hold.abort();
}

#[tokio::test]
async fn dropping_both_halves_closes_the_connection() {
    require_broker();
    let room = unique("drop");
    let (tx, rx) = link(&room).await;
    let (obs_tx, mut obs_rx) = link(&room).await;
    assert_eq!(connections_named(&link_name(&room)).len(), 2);
    // The receiver alone dropped: the sender still works.
    drop(rx);
    tx.send(b"still here").await.unwrap();
    assert_eq!(next(&mut obs_rx).await, b"still here");
    let tx2 = tx.clone();
    drop(tx);
    tx2.send(b"clone still here").await.unwrap();
    assert_eq!(next(&mut obs_rx).await, b"clone still here");
    assert_eq!(connections_named(&link_name(&room)).len(), 2);
    // The last one: closed.
    drop(tx2);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = connections_named(&link_name(&room)).len();
        if n == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{n} connections still open");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    obs_tx.send(b"x").await.unwrap();
    assert_eq!(next(&mut obs_rx).await, b"x");
}

#[tokio::test]
async fn broker_closing_the_connection_is_surfaced() {
    require_broker();
    let room = unique("kick");
    let (tx, mut rx) = link(&room).await;
    let pids = connections_named(&link_name(&room));
    assert_eq!(pids.len(), 1);
    ctl(&["close_connection", &pids[0], "kicked by the link test"]);
    let err = next_err(&mut rx).await;
    eprintln!("broker close: {err}");
    assert!(
        err.contains("320") && err.contains("kicked by the link test"),
        "{err}"
    );
    assert!(
        err.contains("127.0.0.1:5672") && err.contains(&room),
        "{err}"
    );
    // Same error again; sending fails too.
    assert_eq!(rx.recv().await.unwrap_err().to_string(), err);
    let serr = tx.send(b"late").await.unwrap_err().to_string();
    assert!(serr.contains("kicked by the link test"), "{serr}");
}

#[tokio::test]
async fn channel_close_is_surfaced() {
    require_broker();
    // Own vhost, so deleting the exchange disturbs no other test.
    let vhost = unique("vh");
    ctl(&["add_vhost", &vhost]);
    ctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
    let c = LinkConfig::from_url(
        &format!("amqp://guest:guest@127.0.0.1:5672/{vhost}"),
        Duration::from_secs(5),
    )
    .unwrap();
    let (tx, mut rx) = open(&c, "r").await.unwrap();
    tx.send(b"one").await.unwrap();
    assert_eq!(next(&mut rx).await, b"one");
    let conn = common::connect(&format!("amqp://guest:guest@127.0.0.1:5672/{vhost}")).await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_delete("ms2m.migration".into(), Default::default())
        .await
        .unwrap();
    let _ = conn.close(200, "bye".into()).await;
    // Publishing to a missing exchange: the broker closes the channel.
    tx.send(b"two").await.unwrap();
    let err = next_err(&mut rx).await;
    eprintln!("channel close: {err}");
    assert!(err.contains("404") && err.contains("NOT_FOUND"), "{err}");
    assert!(tx.send(b"three").await.is_err());
    ctl(&["delete_vhost", &vhost]);
}

#[tokio::test]
async fn latency_median_round_trip() {
    require_broker();
    let room = unique("lat");
    let (a_tx, mut a_rx) = link(&room).await;
    let (b_tx, mut b_rx) = link(&room).await;
    let mut rtt = Vec::new();
    let mut one_way = Vec::new();
    for i in 0..200u32 {
        let ping = format!("{{\"ping\":{i}}}").into_bytes();
        let pong = format!("{{\"pong\":{i}}}").into_bytes();
        let t0 = Instant::now();
        a_tx.send(&ping).await.unwrap();
        while next(&mut b_rx).await != ping {}
        one_way.push(t0.elapsed());
        b_tx.send(&pong).await.unwrap();
        while next(&mut a_rx).await != pong {}
        rtt.push(t0.elapsed());
    }
    rtt.sort();
    one_way.sort();
    let (med, p99) = (rtt[rtt.len() / 2], rtt[rtt.len() * 99 / 100]);
    eprintln!(
        "link latency over 200: round trip median {med:?} p99 {p99:?}; one way (send → recv on the other link) median {:?}",
        one_way[one_way.len() / 2]
    );
    assert!(med < Duration::from_millis(50), "median round trip {med:?}");
}

// ---- a scripted fake broker -------------------------------------------

fn method(channel: u16, class: AMQPClass) -> Vec<u8> {
    let mut out = Vec::new();
    codec::encode_method(channel, &class, &mut out).unwrap();
    out
}

fn frame(f: &AMQPFrame) -> Vec<u8> {
    gen_frame(f)(WriteContext::from(Vec::new()))
        .unwrap()
        .into_inner()
        .0
}

fn delivery(tag: u64, body: &[u8], max_payload: usize) -> Vec<u8> {
    let mut out = method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
            consumer_tag: "t".into(),
            delivery_tag: tag,
            redelivered: false,
            exchange: "ms2m.migration".into(),
            routing_key: "r".into(),
        })),
    );
    out.extend(frame(&AMQPFrame::Header(
        1,
        AMQPContentHeader {
            class_id: 60,
            body_size: body.len() as u64,
            properties: Default::default(),
        },
    )));
    for part in body.chunks(max_payload) {
        out.extend(frame(&AMQPFrame::Body(1, part.to_vec())));
    }
    out
}

struct Fake {
    s: TcpStream,
    r: FrameReader,
}

impl Fake {
    async fn method(&mut self) -> AMQPClass {
        loop {
            if let Some(f) = self.r.next_frame().unwrap() {
                assert_eq!(f.kind, FRAME_METHOD);
                return parse_class(&self.r.buffered()[f.payload_range()])
                    .unwrap()
                    .1;
            }
            let n = self.s.read_buf(self.r.read_target(4096)).await.unwrap();
            assert!(n > 0, "link closed the socket");
        }
    }

    /// Accept one link and take it through the handshake with frame_max 4096.
    async fn accept(l: &TcpListener) -> Fake {
        let (mut s, _) = l.accept().await.unwrap();
        let mut hdr = [0u8; 8];
        s.read_exact(&mut hdr).await.unwrap();
        assert_eq!(hdr, codec::PROTOCOL_HEADER);
        let mut f = Fake {
            s,
            r: FrameReader::new(1 << 20),
        };
        let start = connection::Start {
            version_major: 0,
            version_minor: 9,
            server_properties: Default::default(),
            mechanisms: "AMQPLAIN PLAIN".into(),
            locales: "en_US".into(),
        };
        f.s.write_all(&method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Start(start)),
        ))
        .await
        .unwrap();
        let AMQPClass::Connection(connection::AMQPMethod::StartOk(ok)) = f.method().await else {
            panic!("expected start-ok")
        };
        assert_eq!(ok.mechanism.as_str(), "PLAIN");
        assert_eq!(ok.response.as_bytes(), b"\0guest\0guest");
        let tune = connection::Tune {
            channel_max: 2047,
            frame_max: 4096,
            heartbeat: 60,
        };
        f.s.write_all(&method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Tune(tune)),
        ))
        .await
        .unwrap();
        let AMQPClass::Connection(connection::AMQPMethod::TuneOk(ok)) = f.method().await else {
            panic!("expected tune-ok")
        };
        assert_eq!((ok.frame_max, ok.heartbeat), (4096, 0));
        loop {
            let (ch, reply) = match f.method().await {
                AMQPClass::Connection(connection::AMQPMethod::Open(_)) => (
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::OpenOk(Default::default())),
                ),
                AMQPClass::Channel(channel::AMQPMethod::Open(_)) => (
                    1,
                    AMQPClass::Channel(channel::AMQPMethod::OpenOk(Default::default())),
                ),
                AMQPClass::Exchange(exchange::AMQPMethod::Declare(_)) => (
                    1,
                    AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(Default::default())),
                ),
                AMQPClass::Queue(queue::AMQPMethod::Declare(_)) => (
                    1,
                    AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                        queue: "q".into(),
                        message_count: 0,
                        consumer_count: 0,
                    })),
                ),
                AMQPClass::Queue(queue::AMQPMethod::Bind(b)) => {
                    assert_eq!((b.queue.as_str(), b.routing_key.as_str()), ("q", "r"));
                    (
                        1,
                        AMQPClass::Queue(queue::AMQPMethod::BindOk(Default::default())),
                    )
                }
                AMQPClass::Basic(basic::AMQPMethod::Consume(c)) => {
                    assert!(c.no_ack);
                    let ok = basic::ConsumeOk {
                        consumer_tag: "t".into(),
                    };
                    f.s.write_all(&method(
                        1,
                        AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(ok)),
                    ))
                    .await
                    .unwrap();
                    return f;
                }
                other => panic!("unexpected {other:?}"),
            };
            f.s.write_all(&method(ch, reply)).await.unwrap();
        }
    }
}

#[tokio::test]
async fn fake_broker_split_frames_empty_body_and_oversized_frame() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = LinkConfig::from_url(
        &format!("amqp://{}", l.local_addr().unwrap()),
        Duration::from_secs(5),
    )
    .unwrap();
    let (link, fake) = tokio::join!(open(&c, "r"), Fake::accept(&l));
    let (tx, mut rx) = link.unwrap();
    let mut fake = fake;
    // Multi-frame body written one byte at a time, then an empty body and a
    // small one in one write.
    let body: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    let bytes = delivery(1, &body, 4096 - 8);
    let writer = async {
        for b in &bytes {
            fake.s.write_all(std::slice::from_ref(b)).await.unwrap();
            tokio::task::yield_now().await;
        }
        let mut two = delivery(2, b"", 4088);
        two.extend(delivery(3, b"{}", 4088));
        fake.s.write_all(&two).await.unwrap();
    };
    let (_, got) = tokio::join!(writer, next(&mut rx));
    assert_eq!(got, body);
    assert_eq!(next(&mut rx).await, b"");
    assert_eq!(next(&mut rx).await, b"{}");
    // A send larger than frame_max arrives split at 4096.
    let big = vec![b'x'; 9000];
    tx.send(&big).await.unwrap();
    fake.r.set_frame_max(4096);
    let AMQPClass::Basic(basic::AMQPMethod::Publish(p)) = fake.method().await else {
        panic!("expected publish")
    };
    assert_eq!(
        (p.exchange.as_str(), p.routing_key.as_str()),
        ("ms2m.migration", "r")
    );
    let mut sizes = Vec::new();
    while sizes.iter().sum::<usize>() < 9000 + 1 {
        match fake.r.next_frame().unwrap() {
            Some(f) => sizes.push(f.len),
            None => {
                fake.s.read_buf(fake.r.read_target(8192)).await.unwrap();
            }
        }
        if sizes.len() == 4 {
            break;
        }
    }
    assert_eq!(sizes.len(), 4, "header + 3 body frames: {sizes:?}");
    assert!(sizes.iter().all(|&s| s <= 4096), "{sizes:?}");
    // A frame above the negotiated frame_max: the link fails.
    fake.s.write_all(&[3, 0, 1, 0, 0, 0x20, 0]).await.unwrap(); // claims 8192 bytes
    let err = next_err(&mut rx).await;
    eprintln!("oversized: {err}");
    assert!(err.contains("exceeds the limit of 4096"), "{err}");
    assert!(tx.send(b"late").await.is_err());
}

#[tokio::test]
async fn fake_broker_connection_close_gets_close_ok() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = LinkConfig::from_url(
        &format!("amqp://{}", l.local_addr().unwrap()),
        Duration::from_secs(5),
    )
    .unwrap();
    let (link, fake) = tokio::join!(open(&c, "r"), Fake::accept(&l));
    let (tx, mut rx) = link.unwrap();
    let mut fake = fake;
    let close = connection::Close {
        reply_code: 320,
        reply_text: "CONNECTION_FORCED - going down".into(),
        class_id: 0,
        method_id: 0,
    };
    fake.s
        .write_all(&method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(close)),
        ))
        .await
        .unwrap();
    assert!(matches!(
        fake.method().await,
        AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))
    ));
    let err = next_err(&mut rx).await;
    assert!(err.contains("320 CONNECTION_FORCED - going down"), "{err}");
    let serr = tx.send(b"x").await.unwrap_err().to_string();
    assert!(serr.contains("going down"), "{serr}");
}

#[tokio::test]
async fn fake_broker_sees_connection_close_on_drop() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = LinkConfig::from_url(
        &format!("amqp://{}", l.local_addr().unwrap()),
        Duration::from_secs(5),
    )
    .unwrap();
    let (link, fake) = tokio::join!(open(&c, "r"), Fake::accept(&l));
    let mut fake = fake;
    drop(link.unwrap());
    let AMQPClass::Connection(connection::AMQPMethod::Close(cl)) = fake.method().await else {
        panic!("expected connection.close")
    };
    assert_eq!(cl.reply_code, 200);
    fake.s
        .write_all(&method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(Default::default())),
        ))
        .await
        .unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(3), fake.s.read_to_end(&mut rest))
        .await
        .expect("link did not close the socket")
        .unwrap();
    assert_eq!(n, 0);
}
