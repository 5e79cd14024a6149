//! Raw-socket tests: frames split across reads, hostile frames, unreachable
//! upstream, broker closing, listeners in another network namespace.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use amq_protocol::frame::parsing::parse_content_header;
use amq_protocol::protocol::{basic, channel, connection, queue, AMQPClass};
use amq_protocol::types::FieldTable;
use common::*;
use ms2m_tap::codec::{self, FrameReader, FRAME_BODY, FRAME_HEADER, FRAME_METHOD, PROTOCOL_HEADER};
use ms2m_tap::{Tap, TapConfig};

struct Raw {
    s: TcpStream,
    r: FrameReader,
    one_byte: bool,
}

impl Raw {
    fn new(addr: SocketAddr, one_byte: bool) -> Raw {
        let s = raw_connect(addr);
        s.set_nodelay(true).unwrap();
        Raw {
            s,
            r: FrameReader::new(1 << 20),
            one_byte,
        }
    }
    fn send(&mut self, bytes: &[u8]) {
        if self.one_byte {
            for b in bytes {
                self.s.write_all(std::slice::from_ref(b)).unwrap();
                std::thread::sleep(Duration::from_micros(300));
            }
        } else {
            self.s.write_all(bytes).unwrap();
        }
    }
    fn method(&mut self, ch: u16, m: AMQPClass) {
        let mut out = Vec::new();
        codec::encode_method(ch, &m, &mut out).unwrap();
        self.send(&out);
    }
    fn frame(&mut self) -> (u8, u16, Vec<u8>) {
        loop {
            if let Some(f) = self.r.next_frame().unwrap() {
                return (
                    f.kind,
                    f.channel,
                    self.r.buffered()[f.payload_range()].to_vec(),
                );
            }
            let mut buf = [0u8; 4096];
            let n = self.s.read(&mut buf).unwrap();
            assert!(n > 0, "connection closed");
            self.r.extend(&buf[..n]);
        }
    }
    fn expect_method(&mut self) -> AMQPClass {
        loop {
            let (kind, _, payload) = self.frame();
            if kind == FRAME_METHOD {
                return amq_protocol::protocol::parse_class(payload.as_slice())
                    .unwrap()
                    .1;
            }
        }
    }
    fn handshake(&mut self) {
        self.send(&PROTOCOL_HEADER);
        let m = self.expect_method();
        assert!(
            matches!(m, AMQPClass::Connection(connection::AMQPMethod::Start(_))),
            "{m:?}"
        );
        self.method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: FieldTable::default(),
                mechanism: "PLAIN".into(),
                response: "\0guest\0guest".into(),
                locale: "en_US".into(),
            })),
        );
        let AMQPClass::Connection(connection::AMQPMethod::Tune(t)) = self.expect_method() else {
            panic!("no tune")
        };
        assert!(t.frame_max <= ms2m_tap::DEFAULT_MAX_FRAME && t.frame_max > 0);
        self.method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: t.channel_max,
                frame_max: t.frame_max,
                heartbeat: 0,
            })),
        );
        self.method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: "/".into(),
            })),
        );
        assert!(matches!(
            self.expect_method(),
            AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))
        ));
    }
    /// channel.open on `ch`, answered.
    fn open_channel(&mut self, ch: u16) {
        self.method(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::Open(Default::default())),
        );
        assert!(matches!(
            self.expect_method(),
            AMQPClass::Channel(channel::AMQPMethod::OpenOk(_))
        ));
    }
    /// queue.declare of `q` on `ch`, answered.
    fn declare_queue(&mut self, ch: u16, q: &str) {
        self.method(
            ch,
            AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                queue: q.into(),
                ..Default::default()
            })),
        );
        assert!(matches!(
            self.expect_method(),
            AMQPClass::Queue(queue::AMQPMethod::DeclareOk(_))
        ));
    }
}

#[test]
fn frames_split_one_byte_at_a_time() {
    let h = start_tap(None);
    let q = unique("split");
    let mut c = Raw::new(h.addr, true);
    c.handshake();
    c.open_channel(1);
    c.declare_queue(1, &q);
    // publish: method + header + body, each written one byte at a time
    c.method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            routing_key: q.as_str().into(),
            ..Default::default()
        })),
    );
    let body = b"split-hello";
    let header = amq_protocol::frame::AMQPFrame::Header(
        1,
        amq_protocol::frame::AMQPContentHeader {
            class_id: 60,
            body_size: body.len() as u64,
            properties: basic::AMQPProperties::default().with_message_id("mid-1".into()),
        },
    );
    let mut out = Vec::new();
    let ctx = amq_protocol::frame::WriteContext::from(std::mem::take(&mut out));
    out = amq_protocol::frame::gen_frame(&header)(ctx)
        .unwrap()
        .into_inner()
        .0;
    out.push(FRAME_BODY);
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out.push(codec::FRAME_END);
    c.send(&out);
    // basic.get it back
    c.method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
            queue: q.as_str().into(),
            no_ack: false,
        })),
    );
    let m = loop {
        match c.expect_method() {
            AMQPClass::Basic(basic::AMQPMethod::GetEmpty(_)) => {
                std::thread::sleep(Duration::from_millis(50));
                c.method(
                    1,
                    AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
                        queue: q.as_str().into(),
                        ..Default::default()
                    })),
                );
            }
            m => break m,
        }
    };
    let AMQPClass::Basic(basic::AMQPMethod::GetOk(ok)) = m else {
        panic!("{m:?}")
    };
    let (kind, _, hdr) = c.frame();
    assert_eq!(kind, FRAME_HEADER);
    let (_, hdr) = parse_content_header(hdr.as_slice()).unwrap();
    assert_eq!(
        hdr.properties.message_id().as_ref().unwrap().as_str(),
        "mid-1"
    );
    let (kind, _, b) = c.frame();
    assert_eq!((kind, b.as_slice()), (FRAME_BODY, &body[..]));
    assert_eq!(h.tap.stats().unsettled, 1);
    c.method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag: ok.delivery_tag,
            multiple: false,
        })),
    );
    c.method(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
            queue: q.as_str().into(),
            ..Default::default()
        })),
    );
    assert!(matches!(
        c.expect_method(),
        AMQPClass::Queue(queue::AMQPMethod::DeleteOk(_))
    ));
    let st = h.tap.stats();
    assert_eq!(
        (st.publishes, st.deliveries, st.acks, st.unsettled),
        (1, 1, 1, 0)
    );
}

fn hostile(h: &Harness, bytes: &[u8], after_header: bool) {
    let mut s = raw_connect(h.addr);
    if after_header {
        write_all(&mut s, &PROTOCOL_HEADER);
        std::thread::sleep(Duration::from_millis(100));
    }
    write_all(&mut s, bytes);
    assert!(
        closed_by_peer(&mut s),
        "tap did not close the connection for {bytes:02x?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_close_only_that_connection() {
    let h = start_tap(None);
    // a healthy client stays connected throughout
    let good = connect(&h.url()).await;
    let ch = good.create_channel().await.unwrap();
    let addr = h.addr;
    let h2 = &h;
    tokio::task::block_in_place(|| {
        // garbage instead of a protocol header
        hostile(h2, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", false);
        // a frame claiming 1 GiB
        hostile(h2, &[FRAME_BODY, 0, 1, 0x40, 0, 0, 0, 1, 2, 3], true);
        // bad frame-end octet
        hostile(
            h2,
            &[FRAME_METHOD, 0, 0, 0, 0, 0, 4, 0, 10, 0, 11, 0x00],
            true,
        );
        // unknown frame type after the header
        hostile(h2, &[9, 0, 0, 0, 0, 0, 0, 0xCE], true);
    });
    let _ = addr;
    for _ in 0..100 {
        if h.tap.stats().connection_errors >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(h.tap.stats().connection_errors, 4);
    // the old connection still works, and new ones too
    let q = unique("hostile");
    declare_classic(&ch, &q).await;
    let c2 = connect(&h.url()).await;
    let ch2 = c2.create_channel().await.unwrap();
    publish_n(&ch2, &q, 0, 1).await;
    let mut cons = consume(&ch, &q, "c", FieldTable::default()).await;
    let d = recv(&mut cons, 1).await;
    assert_eq!(body(&d[0]), 0);
    d[0].ack(Default::default()).await.unwrap();
    delete_queue(&h.url(), &q).await;
}

#[test]
fn upstream_unreachable_closes_client() {
    require_broker();
    // port 1 on loopback: connection refused
    let h = start_tap_with(TapConfig::new("amqp://u:p@127.0.0.1:1/").unwrap(), None);
    let mut s = raw_connect(h.addr);
    write_all(&mut s, &PROTOCOL_HEADER);
    assert!(closed_by_peer(&mut s));
    assert_eq!(h.tap.stats().connection_errors, 1);
}

#[test]
fn broker_going_away_closes_client_and_recovers() {
    // a fake broker that accepts, reads the header and closes
    let fake = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = fake.local_addr().unwrap().port();
    let h = start_tap_with(
        TapConfig::new(&format!("amqp://127.0.0.1:{port}")).unwrap(),
        None,
    );
    for _ in 0..2 {
        let mut s = raw_connect(h.addr);
        write_all(&mut s, &PROTOCOL_HEADER);
        let (mut up, _) = fake.accept().unwrap();
        let mut hdr = [0u8; 8];
        up.read_exact(&mut hdr).unwrap();
        assert_eq!(hdr, PROTOCOL_HEADER);
        drop(up); // "broker restart"
        assert!(closed_by_peer(&mut s));
    }
    assert_eq!(h.tap.stats().connections_total, 2);
}

/// A listener made inside a fresh network namespace serves a client there.
#[test]
fn listen_in_netns_serves_clients_inside() {
    require_broker();
    init_tracing();
    let name = format!("ms2m-tap-t{}", std::process::id());
    let ok = std::process::Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .unwrap();
    assert!(ok.success(), "ip netns add failed (needs root)");
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }
    let _cleanup = Cleanup(name.clone());
    let ok = std::process::Command::new("ip")
        .args(["netns", "exec", &name, "ip", "link", "set", "lo", "up"])
        .status()
        .unwrap();
    assert!(ok.success());
    let path = std::path::PathBuf::from(format!("/var/run/netns/{name}"));
    let listeners = Tap::listen_in_netns(&path, 5672).unwrap();
    assert!(!listeners.is_empty());
    // the host namespace's own 5672 (the broker) is untouched: a tap listener on 5672 exists only in the netns
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tap = rt
        .block_on(Tap::start(TapConfig::new(BROKER).unwrap(), listeners, None))
        .unwrap();
    let client = std::thread::spawn(move || {
        let f = std::fs::File::open(&path).unwrap();
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let mut out = vec![];
        for addr in ["127.0.0.1:5672", "[::1]:5672"] {
            let Ok(mut s) = TcpStream::connect(addr) else {
                out.push((addr, false));
                continue;
            };
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(&PROTOCOL_HEADER).unwrap();
            let mut buf = [0u8; 11];
            let got = s.read_exact(&mut buf).is_ok()
                && buf[0] == FRAME_METHOD
                && buf[7..11] == [0, 10, 0, 10];
            out.push((addr, got));
        }
        out
    });
    let res = rt.block_on(async {
        loop {
            if client.is_finished() {
                break client.join().unwrap();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    assert_eq!(res[0], ("127.0.0.1:5672", true), "{res:?}");
    rt.block_on(tap.shutdown());
}

/// Content header + body frames of a publish on `ch`, the body cut into
/// `parts`.
fn content_frames(ch: u16, parts: &[&[u8]]) -> (Vec<u8>, Vec<Vec<u8>>) {
    let size: usize = parts.iter().map(|p| p.len()).sum();
    let header = amq_protocol::frame::AMQPFrame::Header(
        ch,
        amq_protocol::frame::AMQPContentHeader {
            class_id: 60,
            body_size: size as u64,
            properties: basic::AMQPProperties::default(),
        },
    );
    let ctx = amq_protocol::frame::WriteContext::from(Vec::new());
    let header = amq_protocol::frame::gen_frame(&header)(ctx)
        .unwrap()
        .into_inner()
        .0;
    let bodies = parts
        .iter()
        .map(|p| {
            let mut b = vec![FRAME_BODY];
            b.extend_from_slice(&ch.to_be_bytes());
            b.extend_from_slice(&(p.len() as u32).to_be_bytes());
            b.extend_from_slice(p);
            b.push(codec::FRAME_END);
            b
        })
        .collect();
    (header, bodies)
}

fn publish_method(ch: u16, q: &str) -> Vec<u8> {
    let mut out = Vec::new();
    codec::encode_method(
        ch,
        &AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            routing_key: q.into(),
            ..Default::default()
        })),
        &mut out,
    )
    .unwrap();
    out
}

/// Suppressed publishes whose frames interleave with another channel's are
/// dropped per channel; the confirm-mode one is acked by the tap, and the
/// broker's confirm after it is shifted.
#[test]
fn suppressed_publishes_interleaved_across_channels() {
    require_broker();
    let h = start_tap_resume(
        TapConfig::new(BROKER).unwrap(),
        ms2m_tap::Resume {
            cut: None,
            suppress_publishes: 2,
            shadow: None,
        },
    );
    let q = unique("raw-suppress");
    let mut c = Raw::new(h.addr, false);
    c.handshake();
    for ch in [1, 2] {
        c.open_channel(ch);
    }
    c.declare_queue(1, &q);
    c.method(
        1,
        AMQPClass::Confirm(amq_protocol::protocol::confirm::AMQPMethod::Select(
            amq_protocol::protocol::confirm::Select { nowait: false },
        )),
    );
    assert!(matches!(
        c.expect_method(),
        AMQPClass::Confirm(amq_protocol::protocol::confirm::AMQPMethod::SelectOk(_))
    ));
    // two suppressed publishes, their frames interleaved, then one
    // forwarded publish on each channel
    let (h1, b1) = content_frames(1, &[b"dropped-", b"one"]);
    let (h2, b2) = content_frames(2, &[b"dropped-two"]);
    let mut bytes = publish_method(1, &q);
    bytes.extend(publish_method(2, &q));
    bytes.extend(&h1);
    bytes.extend(&h2);
    bytes.extend(&b1[0]);
    bytes.extend(&b2[0]);
    bytes.extend(&b1[1]);
    for (ch, body) in [(1u16, b"kept-1".as_slice()), (2, b"kept-2")] {
        bytes.extend(publish_method(ch, &q));
        let (hh, bb) = content_frames(ch, &[body]);
        bytes.extend(hh);
        bytes.extend(bb.concat());
    }
    c.send(&bytes);
    // channel 1: the tap's ack for app seq 1, then the broker's ack for its
    // seq 1 shifted to the app's seq 2
    let mut tags = vec![];
    while tags.len() < 2 {
        let (kind, ch, payload) = c.frame();
        if kind != FRAME_METHOD {
            continue;
        }
        let m = amq_protocol::protocol::parse_class(payload.as_slice())
            .unwrap()
            .1;
        match m {
            AMQPClass::Basic(basic::AMQPMethod::Ack(a)) => {
                assert_eq!(ch, 1);
                tags.push(a.delivery_tag);
            }
            m => panic!("unexpected {m:?} on channel {ch}"),
        }
    }
    assert_eq!(tags, vec![1, 2]);
    // the queue holds exactly the two kept messages
    let mut got = vec![];
    for _ in 0..100 {
        c.method(
            2,
            AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
                queue: q.as_str().into(),
                no_ack: true,
            })),
        );
        match c.expect_method() {
            AMQPClass::Basic(basic::AMQPMethod::GetOk(_)) => {
                let (kind, _, _) = c.frame();
                assert_eq!(kind, FRAME_HEADER);
                let (kind, _, body) = c.frame();
                assert_eq!(kind, FRAME_BODY);
                got.push(String::from_utf8(body).unwrap());
            }
            AMQPClass::Basic(basic::AMQPMethod::GetEmpty(_)) if got.len() >= 2 => break,
            AMQPClass::Basic(basic::AMQPMethod::GetEmpty(_)) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            m => panic!("unexpected {m:?}"),
        }
    }
    got.sort();
    assert_eq!(got, vec!["kept-1", "kept-2"]);
    let st = h.tap.stats();
    assert_eq!((st.publishes, st.suppressed), (2, 2));
    c.method(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
            queue: q.as_str().into(),
            ..Default::default()
        })),
    );
    assert!(matches!(
        c.expect_method(),
        AMQPClass::Queue(queue::AMQPMethod::DeleteOk(_))
    ));
}

/// Body of the `i`th large message of
/// [`injected_acks_wait_for_the_end_of_a_delivery`].
fn big_body(i: usize, size: usize) -> Vec<u8> {
    (0..size).map(|k| ((k * 7 + i * 13) % 251) as u8).collect()
}

/// A publish of `body` to `q` on `ch`: method, header and body frames of at
/// most 4000 bytes (below any frame_max).
fn publish_frames(ch: u16, q: &str, body: &[u8]) -> Vec<u8> {
    let parts: Vec<&[u8]> = body.chunks(4000).collect();
    let (header, bodies) = content_frames(ch, &parts);
    let mut bytes = publish_method(ch, q);
    bytes.extend(header);
    bytes.extend(bodies.concat());
    bytes
}

/// A client consuming and publishing with confirms on ONE channel right
/// after a restore: the acks the tap injects for its suppressed publishes
/// never land inside the content of a delivery on that channel (AMQP
/// forbids any frame between a basic.deliver and the end of its content;
/// clients drop the connection), and all of them arrive, as do the
/// deliveries.
#[test]
fn injected_acks_wait_for_the_end_of_a_delivery() {
    require_broker();
    const ROUNDS: usize = 5;
    const MESSAGES: usize = 3;
    const SIZE: usize = 300 * 1024;
    const DROPPED: u64 = 5;
    let broker: SocketAddr = "127.0.0.1:5672".parse().unwrap();
    let bodies: Vec<Vec<u8>> = (0..MESSAGES).map(|i| big_body(i, SIZE)).collect();
    for round in 0..ROUNDS {
        // the queue, pre-filled directly at the broker
        let q = unique("raw-gate");
        let mut b = Raw::new(broker, false);
        b.handshake();
        b.open_channel(1);
        b.declare_queue(1, &q);
        b.method(
            1,
            AMQPClass::Confirm(amq_protocol::protocol::confirm::AMQPMethod::Select(
                amq_protocol::protocol::confirm::Select { nowait: false },
            )),
        );
        assert!(matches!(
            b.expect_method(),
            AMQPClass::Confirm(amq_protocol::protocol::confirm::AMQPMethod::SelectOk(_))
        ));
        for body in &bodies {
            b.send(&publish_frames(1, &q, body));
        }
        loop {
            match b.expect_method() {
                AMQPClass::Basic(basic::AMQPMethod::Ack(a))
                    if a.delivery_tag == MESSAGES as u64 =>
                {
                    break
                }
                AMQPClass::Basic(basic::AMQPMethod::Ack(_)) => {}
                m => panic!("pre-fill: unexpected {m:?}"),
            }
        }

        let h = start_tap_resume(
            TapConfig::new(BROKER).unwrap(),
            ms2m_tap::Resume {
                cut: None,
                suppress_publishes: DROPPED,
                shadow: None,
            },
        );
        let mut c = Raw::new(h.addr, false);
        c.handshake();
        c.open_channel(1);
        c.method(
            1,
            AMQPClass::Confirm(amq_protocol::protocol::confirm::AMQPMethod::Select(
                amq_protocol::protocol::confirm::Select { nowait: false },
            )),
        );
        assert!(matches!(
            c.expect_method(),
            AMQPClass::Confirm(amq_protocol::protocol::confirm::AMQPMethod::SelectOk(_))
        ));
        c.method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                queue: q.as_str().into(),
                consumer_tag: "gate".into(),
                no_ack: true,
                ..Default::default()
            })),
        );
        assert!(matches!(
            c.expect_method(),
            AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_))
        ));

        // Read the channel frame by frame, checking it is well-formed; while
        // a delivery streams in, send the publishes the tap drops (and acks).
        enum In {
            Idle,
            Header,
            Body(u64),
        }
        let mut state = In::Idle;
        let mut got: Vec<Vec<u8>> = vec![];
        let mut cur: Vec<u8> = vec![];
        let mut acks: Vec<u64> = vec![];
        let mut sent = 0u64;
        let mut frames = 0usize;
        while got.len() < MESSAGES || acks.len() < DROPPED as usize {
            if sent < DROPPED && (!matches!(state, In::Idle) || got.len() == MESSAGES) {
                c.send(&publish_frames(1, &q, b"dropped"));
                sent += 1;
                // let the tap inject its ack while the delivery is in flight
                std::thread::sleep(Duration::from_millis(2));
            }
            let (kind, ch, payload) = c.frame();
            frames += 1;
            assert_eq!(ch, 1, "round {round}: frame type {kind} on channel {ch}");
            match (kind, &mut state) {
                (FRAME_METHOD, In::Idle) => {
                    match amq_protocol::protocol::parse_class(payload.as_slice())
                        .unwrap()
                        .1
                    {
                        AMQPClass::Basic(basic::AMQPMethod::Deliver(_)) => state = In::Header,
                        AMQPClass::Basic(basic::AMQPMethod::Ack(a)) => {
                            assert!(!a.multiple, "round {round}: {a:?}");
                            acks.push(a.delivery_tag);
                        }
                        m => panic!("round {round}: unexpected {m:?}"),
                    }
                }
                (FRAME_METHOD, _) => {
                    let m = amq_protocol::protocol::parse_class(payload.as_slice()).map(|r| r.1);
                    panic!(
                        "round {round}: method frame {m:?} on channel 1 inside the content of \
                         delivery {} (frame {frames}, {} body bytes in)",
                        got.len() + 1,
                        cur.len()
                    );
                }
                (FRAME_HEADER, In::Header) => {
                    let (_, hdr) = parse_content_header(payload.as_slice()).unwrap();
                    assert_eq!(hdr.body_size, SIZE as u64, "round {round}");
                    state = In::Body(hdr.body_size);
                }
                (FRAME_BODY, In::Body(left)) => {
                    let n = payload.len() as u64;
                    assert!(n <= *left, "round {round}: body overruns its header");
                    cur.extend_from_slice(&payload);
                    *left -= n;
                    if *left == 0 {
                        got.push(std::mem::take(&mut cur));
                        state = In::Idle;
                    }
                }
                _ => panic!("round {round}: frame type {kind} out of place (frame {frames})"),
            }
        }
        assert_eq!(sent, DROPPED);
        assert_eq!(acks, (1..=DROPPED).collect::<Vec<_>>(), "round {round}");
        assert_eq!(got.len(), MESSAGES, "round {round}");
        for (i, body) in got.iter().enumerate() {
            assert!(body == &bodies[i], "round {round}: delivery {i} damaged");
        }
        let st = h.tap.stats();
        assert_eq!((st.publishes, st.suppressed), (0, DROPPED), "round {round}");
        drop(c);
        b.method(
            1,
            AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
                queue: q.as_str().into(),
                ..Default::default()
            })),
        );
        assert!(matches!(
            b.expect_method(),
            AMQPClass::Queue(queue::AMQPMethod::DeleteOk(_))
        ));
    }
}
