//! The tap's own small AMQP 0-9-1 client for migration control messages.
//!
//! During a live migration the source tap, the target tap and the `ms2m
//! migrate` CLI exchange small JSON control messages through the broker
//! itself. Each party [`open`]s one connection to the broker and joins a
//! per-migration *room*: a server-named, exclusive, auto-delete queue bound
//! with the room name as routing key to the direct exchange [`EXCHANGE`].
//! Everything published into the room ([`LinkSender::send`]) reaches every
//! party in it ([`LinkReceiver::recv`]), the sender included; callers filter
//! their own messages.
//!
//! Built for latency: TCP_NODELAY, one `write` per message (method, content
//! header and body frames encoded into one buffer), written directly by the
//! sending task (no writer task, no batching), and a reader task that hands
//! each delivery to the receiver as soon as its last frame is in (no
//! polling). No heartbeats, no publisher confirms, `no_ack` consumption.
//!
//! Framing reuses [`crate::codec`]: frames split across reads, several
//! frames per read, frames above the negotiated frame_max rejected from their
//! header alone. Bodies larger than a frame are split on send and reassembled
//! on receive.
//!
//! Dropping both halves (every [`LinkSender`] clone and the
//! [`LinkReceiver`]) closes the connection: the reader task sends
//! connection.close and waits briefly for close-ok (best effort; if the
//! runtime goes away first the socket is simply closed, which the broker
//! treats the same for an exclusive queue).

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::frame::parsing::parse_content_header;
use amq_protocol::frame::{gen_frame, AMQPContentHeader, AMQPFrame, WriteContext};
use amq_protocol::protocol::{basic, channel, connection, exchange, parse_class, queue, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Mutex};
use tracing::{debug, warn};

use crate::codec::{
    self, FrameReader, FRAME_BODY, FRAME_END, FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD,
    OVERHEAD, PROTOCOL_HEADER,
};
use crate::{percent_decode, TapError, DEFAULT_PORT};

/// The direct exchange rooms are bound to (non-durable, not auto-delete).
pub const EXCHANGE: &str = "ms2m.migration";
/// Upper bound the link proposes for frame_max (the broker may lower it).
pub const LINK_FRAME_MAX: u32 = 128 * 1024;
/// Largest message body the link sends or accepts (control messages are
/// small; this only bounds memory).
pub const MAX_BODY: usize = 64 * 1024 * 1024;

/// The one channel the link uses.
const CH: u16 = 1;
/// Deliveries buffered between the reader task and the receiver before the
/// reader stops reading the socket (TCP back-pressure to the broker).
const QUEUE_DEPTH: usize = 1024;
/// How long a closing link waits for the broker's connection.close-ok.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// Class id of basic (content header frames).
const BASIC_CLASS: u16 = 60;

/// Where and as whom to connect. Credentials are never printed: `Debug`
/// redacts the password.
#[derive(Clone, PartialEq, Eq)]
pub struct LinkConfig {
    /// Broker host name or IP address (IPv6 without brackets).
    pub host: String,
    /// Broker TCP port.
    pub port: u16,
    /// Virtual host.
    pub vhost: String,
    /// User name (PLAIN authentication).
    pub user: String,
    /// Password (PLAIN authentication). Never printed.
    pub password: String,
    /// Bound on the whole of [`open`]: TCP connect, handshake, channel,
    /// declarations and consumer.
    pub connect_timeout: Duration,
}

impl fmt::Debug for LinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("vhost", &self.vhost)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl LinkConfig {
    /// From an `amqp://[user[:pass]@]host[:port][/vhost]` URL. The vhost and
    /// the credentials are percent-decoded; defaults: guest/guest (a user
    /// without a password gets an empty password), port 5672, vhost `/`. A
    /// `?query` is ignored. Errors never contain the password.
    pub fn from_url(url: &str, connect_timeout: Duration) -> Result<LinkConfig, TapError> {
        let rest = url
            .strip_prefix("amqp://")
            .ok_or_else(|| TapError::Config("link URL must start with amqp://".into()))?;
        let rest = rest.split_once('?').map_or(rest, |(r, _)| r);
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            None => ("guest".to_string(), "guest".to_string()),
            Some(u) => match u.split_once(':') {
                Some((user, pass)) => (percent_decode(user), percent_decode(pass)),
                None => (percent_decode(u), String::new()),
            },
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| TapError::Config("link URL: unterminated [IPv6]".into()))?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| {
                    TapError::Config("link URL: junk after [IPv6] address".into())
                })?),
            };
            (h.to_string(), port)
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(TapError::Config("link URL has no host".into()));
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| TapError::Config("link URL: bad port".into()))?,
            None => DEFAULT_PORT,
        };
        let vhost = if path.is_empty() {
            "/".to_string()
        } else {
            percent_decode(path)
        };
        Ok(LinkConfig {
            host,
            port,
            vhost,
            user,
            password,
            connect_timeout,
        })
    }

    /// The whole `amqp://` URL with the credentials, percent-encoded, for
    /// another AMQP client (never log it).
    pub(crate) fn amqp_url(&self) -> String {
        let enc = |s: &str| {
            let mut out = String::new();
            for c in s.bytes() {
                if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
                    out.push(c as char);
                } else {
                    out.push_str(&format!("%{c:02X}"));
                }
            }
            out
        };
        format!(
            "amqp://{}:{}@{}/{}",
            enc(&self.user),
            enc(&self.password),
            self.addr(),
            enc(&self.vhost)
        )
    }

    /// `host:port` (IPv6 in brackets), for messages.
    fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Why a link ended, kept so every later call reports the same reason.
#[derive(Debug, Clone)]
struct End {
    kind: io::ErrorKind,
    reason: String,
}

impl End {
    fn new(kind: io::ErrorKind, reason: impl Into<String>) -> Self {
        End {
            kind,
            reason: reason.into(),
        }
    }
    fn error(&self, what: String) -> TapError {
        TapError::io(what, io::Error::new(self.kind, self.reason.clone()))
    }
}

/// The socket's write half, shared by the senders and the reader task.
struct Writer {
    half: OwnedWriteHalf,
    /// Set once the link is unusable.
    dead: Option<End>,
    /// A write was started and not finished (its future was dropped): the
    /// stream may hold a partial frame, so nothing more may be written.
    torn: bool,
}

impl Writer {
    async fn write(&mut self, buf: &[u8]) -> Result<(), End> {
        if let Some(end) = &self.dead {
            return Err(end.clone());
        }
        if self.torn {
            let end = End::new(
                io::ErrorKind::BrokenPipe,
                "an earlier send was cancelled mid-write; the link is unusable",
            );
            self.dead = Some(end.clone());
            return Err(end);
        }
        self.torn = true;
        let res = self.half.write_all(buf).await;
        self.torn = false;
        res.map_err(|e| {
            let end = End::new(e.kind(), format!("writing to the broker: {e}"));
            self.dead = Some(end.clone());
            end
        })
    }
}

/// State shared by both halves; dropping the last holder drops `_shutdown`,
/// which tells the reader task to close the connection.
struct Conn {
    writer: Arc<Mutex<Writer>>,
    addr: String,
    room: ShortString,
    frame_max: u32,
    _shutdown: oneshot::Sender<()>,
}

impl Conn {
    fn what(&self) -> String {
        format!("link to broker {} (room {})", self.addr, self.room.as_str())
    }
}

/// Sending half of a link: cheap to clone, usable from any task.
#[derive(Clone)]
pub struct LinkSender {
    conn: Arc<Conn>,
}

impl fmt::Debug for LinkSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkSender")
            .field("broker", &self.conn.addr)
            .field("room", &self.conn.room.as_str())
            .finish()
    }
}

impl LinkSender {
    /// Publishes `body` (content-type `application/json`, transient) into the
    /// room. Returns once the whole message is written to the socket (no
    /// publisher confirms). Errors when the connection is gone (with the
    /// reason it ended) or the body exceeds [`MAX_BODY`].
    ///
    /// Concurrent sends are serialized; each message goes out in one write.
    /// Cancelling a send mid-write makes the link unusable (the stream could
    /// hold a partial frame): later sends fail.
    pub async fn send(&self, body: &[u8]) -> Result<(), TapError> {
        if body.len() > MAX_BODY {
            return Err(TapError::Config(format!(
                "{}: message of {} bytes exceeds the link's limit of {MAX_BODY} bytes",
                self.conn.what(),
                body.len()
            )));
        }
        let mut buf = Vec::new();
        encode_publish(&self.conn.room, body, self.conn.frame_max, &mut buf)
            .map_err(|e| TapError::Config(format!("{}: {e}", self.conn.what())))?;
        let mut w = self.conn.writer.lock().await;
        w.write(&buf)
            .await
            .map_err(|end| end.error(format!("{}: sending", self.conn.what())))
    }
}

/// Receiving half of a link.
pub struct LinkReceiver {
    conn: Arc<Conn>,
    rx: mpsc::Receiver<Result<Vec<u8>, End>>,
    ended: Option<End>,
}

impl fmt::Debug for LinkReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkReceiver")
            .field("broker", &self.conn.addr)
            .field("room", &self.conn.room.as_str())
            .field("ended", &self.ended.as_ref().map(|e| &e.reason))
            .finish()
    }
}

impl LinkReceiver {
    /// The next message body published into the room (by anyone, this party
    /// included), in broker order. Errors when the connection closed or
    /// failed, with the broker's close reason when it sent one; once it has
    /// errored every later call returns the same error.
    ///
    /// Cancel safe: usable in `tokio::select!` without losing messages.
    pub async fn recv(&mut self) -> Result<Vec<u8>, TapError> {
        if let Some(end) = &self.ended {
            return Err(end.error(self.conn.what()));
        }
        let end = match self.rx.recv().await {
            Some(Ok(body)) => return Ok(body),
            Some(Err(end)) => end,
            None => End::new(
                io::ErrorKind::BrokenPipe,
                "the link's reader task ended (runtime shut down?)",
            ),
        };
        let err = end.error(self.conn.what());
        self.ended = Some(end);
        Err(err)
    }
}

/// Connects, authenticates (PLAIN), negotiates (heartbeat 0 = off; frame_max
/// min(broker's, 128 KiB)), opens channel 1, declares the non-durable direct
/// exchange [`EXCHANGE`] (auto_delete false), declares a server-named
/// exclusive auto-delete queue, binds it with routing key `room`, and starts
/// basic.consume with no_ack; only then returns, so a message sent by anyone
/// after `open` returns is received.
///
/// Bounded by `config.connect_timeout` as a whole. Errors name the broker's
/// `host:port` and the step that failed (never the password). `room` must be
/// 1 to 255 bytes. Spawns the link's reader task with `tokio::spawn` (works
/// on a current_thread runtime).
pub async fn open(config: &LinkConfig, room: &str) -> Result<(LinkSender, LinkReceiver), TapError> {
    let addr = config.addr();
    if room.is_empty() {
        return Err(TapError::Config(format!(
            "link to broker {addr}: empty room name"
        )));
    }
    let room_ss = ShortString::try_new(room).map_err(|_| {
        TapError::Config(format!(
            "link to broker {addr}: room name longer than 255 bytes"
        ))
    })?;
    let vhost = ShortString::try_new(config.vhost.as_str()).map_err(|_| {
        TapError::Config(format!(
            "link to broker {addr}: vhost longer than 255 bytes"
        ))
    })?;
    let mut step = String::from("connecting");
    let res = tokio::time::timeout(
        config.connect_timeout,
        handshake(config, &addr, vhost, &room_ss, &mut step),
    )
    .await;
    let (stream, reader, frame_max) = match res {
        Ok(Ok(ok)) => ok,
        Ok(Err(e)) => return Err(e.error(format!("opening link to broker {addr}: {step}"))),
        Err(_) => {
            return Err(TapError::io(
                format!("opening link to broker {addr}: {step}"),
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("timed out (connect timeout {:?})", config.connect_timeout),
                ),
            ))
        }
    };
    let (rd, wr) = stream.into_split();
    let writer = Arc::new(Mutex::new(Writer {
        half: wr,
        dead: None,
        torn: false,
    }));
    let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
    let (shutdown_tx, shutdown_rx) = oneshot::channel();
    let conn = Arc::new(Conn {
        writer: writer.clone(),
        addr,
        room: room_ss,
        frame_max,
        _shutdown: shutdown_tx,
    });
    let task = ReaderTask {
        rd,
        reader,
        writer,
        tx,
        what: conn.what(),
    };
    tokio::spawn(task.run(shutdown_rx));
    Ok((
        LinkSender { conn: conn.clone() },
        LinkReceiver {
            conn,
            rx,
            ended: None,
        },
    ))
}

/// A handshake in progress on a not yet split socket.
struct Handshake {
    stream: TcpStream,
    reader: FrameReader,
    out: Vec<u8>,
}

impl Handshake {
    async fn send(&mut self, channel: u16, class: AMQPClass) -> Result<(), End> {
        self.out.clear();
        codec::encode_method(channel, &class, &mut self.out)
            .map_err(|e| End::new(io::ErrorKind::InvalidData, e))?;
        self.stream
            .write_all(&self.out)
            .await
            .map_err(|e| End::new(e.kind(), format!("writing: {e}")))
    }

    /// The next method frame (heartbeats skipped). A connection.close or
    /// channel.close from the broker is answered and returned as the error.
    async fn method(&mut self) -> Result<(u16, AMQPClass), End> {
        loop {
            let frame = self
                .reader
                .next_frame()
                .map_err(|e| End::new(io::ErrorKind::InvalidData, format!("framing: {e}")))?;
            let Some(frame) = frame else {
                let n = self
                    .stream
                    .read_buf(self.reader.read_target(16 * 1024))
                    .await
                    .map_err(|e| End::new(e.kind(), format!("reading: {e}")))?;
                if n == 0 {
                    return Err(End::new(
                        io::ErrorKind::UnexpectedEof,
                        "the broker closed the connection",
                    ));
                }
                continue;
            };
            match frame.kind {
                FRAME_HEARTBEAT => continue,
                FRAME_METHOD => {}
                k => {
                    return Err(End::new(
                        io::ErrorKind::InvalidData,
                        format!("unexpected frame type {k} during the handshake"),
                    ))
                }
            }
            let payload = &self.reader.buffered()[frame.payload_range()];
            let class = decode_method(payload)?;
            match class {
                AMQPClass::Connection(connection::AMQPMethod::Close(c)) => {
                    let end = broker_closed("connection", c.reply_code, c.reply_text.as_str());
                    let _ = self
                        .send(
                            0,
                            AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                                Default::default(),
                            )),
                        )
                        .await;
                    return Err(end);
                }
                AMQPClass::Channel(channel::AMQPMethod::Close(c)) => {
                    let end = broker_closed("channel", c.reply_code, c.reply_text.as_str());
                    let _ = self
                        .send(
                            frame.channel,
                            AMQPClass::Channel(channel::AMQPMethod::CloseOk(Default::default())),
                        )
                        .await;
                    return Err(end);
                }
                class => return Ok((frame.channel, class)),
            }
        }
    }
}

fn decode_method(payload: &[u8]) -> Result<AMQPClass, End> {
    parse_class(payload)
        .map(|(_, m)| m)
        .map_err(|_| End::new(io::ErrorKind::InvalidData, "undecodable method frame"))
}

fn broker_closed(what: &str, code: u16, text: &str) -> End {
    let kind = match code {
        403 => io::ErrorKind::PermissionDenied,
        404 => io::ErrorKind::NotFound,
        _ => io::ErrorKind::ConnectionAborted,
    };
    End::new(kind, format!("the broker closed the {what}: {code} {text}"))
}

fn unexpected(class: &AMQPClass) -> End {
    End::new(
        io::ErrorKind::InvalidData,
        format!("unexpected method {}", method_name(class)),
    )
}

fn method_name(class: &AMQPClass) -> String {
    let s = format!("{class:?}");
    // "Basic(Deliver(Deliver { .. }))" → "Basic(Deliver"
    s.split(['(', ' ']).take(2).collect::<Vec<_>>().join(".")
}

/// Every step of [`open`] before the timeout; `step` says where it is.
async fn handshake(
    config: &LinkConfig,
    addr: &str,
    vhost: ShortString,
    room: &ShortString,
    step: &mut String,
) -> Result<(TcpStream, FrameReader, u32), End> {
    *step = "connecting".into();
    let stream = TcpStream::connect((config.host.as_str(), config.port))
        .await
        .map_err(|e| End::new(e.kind(), e.to_string()))?;
    stream
        .set_nodelay(true)
        .map_err(|e| End::new(e.kind(), format!("setting TCP_NODELAY: {e}")))?;
    let mut h = Handshake {
        stream,
        reader: FrameReader::new(LINK_FRAME_MAX),
        out: Vec::with_capacity(1024),
    };

    *step = "waiting for connection.start".into();
    h.stream
        .write_all(&PROTOCOL_HEADER)
        .await
        .map_err(|e| End::new(e.kind(), format!("writing the protocol header: {e}")))?;
    // A broker that does not speak 0-9-1 answers with its own protocol header.
    while h.reader.pending() == 0 {
        let n = h
            .stream
            .read_buf(h.reader.read_target(16 * 1024))
            .await
            .map_err(|e| End::new(e.kind(), format!("reading: {e}")))?;
        if n == 0 {
            return Err(End::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the connection (not an AMQP broker?)",
            ));
        }
    }
    let buffered = h.reader.buffered();
    if buffered[buffered.len() - h.reader.pending()] == b'A' {
        return Err(End::new(
            io::ErrorKind::Unsupported,
            "the broker does not speak AMQP 0-9-1 (it answered with a protocol header)",
        ));
    }
    let (_, start) = h.method().await?;
    let AMQPClass::Connection(connection::AMQPMethod::Start(start)) = start else {
        return Err(unexpected(&start));
    };
    let has_plain = String::from_utf8_lossy(start.mechanisms.as_bytes())
        .split_whitespace()
        .any(|m| m == "PLAIN");
    if !has_plain {
        return Err(End::new(
            io::ErrorKind::Unsupported,
            format!(
                "the broker does not offer PLAIN authentication (offers: {})",
                String::from_utf8_lossy(start.mechanisms.as_bytes())
            ),
        ));
    }

    *step = format!("authenticating as user {:?} (PLAIN)", config.user);
    let mut caps = FieldTable::default();
    caps.insert(
        "authentication_failure_close".into(),
        AMQPValue::Boolean(true),
    );
    caps.insert("consumer_cancel_notify".into(), AMQPValue::Boolean(true));
    let mut props = FieldTable::default();
    props.insert(
        "product".into(),
        AMQPValue::LongString("ms2m-tap link".into()),
    );
    props.insert(
        "version".into(),
        AMQPValue::LongString(env!("CARGO_PKG_VERSION").into()),
    );
    props.insert(
        "connection_name".into(),
        AMQPValue::LongString(format!("ms2m link room={}", room.as_str()).into()),
    );
    props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    let mut response = Vec::with_capacity(config.user.len() + config.password.len() + 2);
    response.push(0);
    response.extend_from_slice(config.user.as_bytes());
    response.push(0);
    response.extend_from_slice(config.password.as_bytes());
    h.send(
        0,
        AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
            client_properties: props,
            mechanism: "PLAIN".into(),
            response: LongString::from(response),
            locale: "en_US".into(),
        })),
    )
    .await?;
    let (_, tune) = h.method().await?;
    let AMQPClass::Connection(connection::AMQPMethod::Tune(tune)) = tune else {
        return Err(unexpected(&tune));
    };
    let frame_max = match tune.frame_max {
        0 => LINK_FRAME_MAX,
        n => n.min(LINK_FRAME_MAX),
    };
    if frame_max < codec::FRAME_MIN_SIZE {
        return Err(End::new(
            io::ErrorKind::InvalidData,
            format!(
                "the broker proposed frame_max {} (below the minimum 4096)",
                tune.frame_max
            ),
        ));
    }
    h.send(
        0,
        AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max: 1,
            frame_max,
            heartbeat: 0,
        })),
    )
    .await?;
    h.reader.set_frame_max(frame_max);

    *step = format!("opening vhost {:?}", vhost.as_str());
    h.send(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
            virtual_host: vhost,
        })),
    )
    .await?;
    expect(&mut h, |c| {
        matches!(c, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_)))
    })
    .await?;

    *step = "opening channel 1".into();
    h.send(
        CH,
        AMQPClass::Channel(channel::AMQPMethod::Open(Default::default())),
    )
    .await?;
    expect(&mut h, |c| {
        matches!(c, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_)))
    })
    .await?;

    *step = format!("declaring exchange {EXCHANGE}");
    h.send(
        CH,
        AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
            exchange: EXCHANGE.into(),
            kind: "direct".into(),
            passive: false,
            durable: false,
            auto_delete: false,
            internal: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
    .await?;
    expect(&mut h, |c| {
        matches!(c, AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(_)))
    })
    .await?;

    *step = "declaring the room's queue".into();
    h.send(
        CH,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "".into(),
            passive: false,
            durable: false,
            exclusive: true,
            auto_delete: true,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
    .await?;
    let queue_name = match h.method().await? {
        (CH, AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok))) => ok.queue,
        (_, other) => return Err(unexpected(&other)),
    };

    *step = format!(
        "binding queue {} to room {:?}",
        queue_name.as_str(),
        room.as_str()
    );
    h.send(
        CH,
        AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
            queue: queue_name.clone(),
            exchange: EXCHANGE.into(),
            routing_key: room.clone(),
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
    .await?;
    expect(&mut h, |c| {
        matches!(c, AMQPClass::Queue(queue::AMQPMethod::BindOk(_)))
    })
    .await?;

    *step = format!("starting the consumer on queue {}", queue_name.as_str());
    h.send(
        CH,
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: queue_name,
            consumer_tag: "".into(),
            no_local: false,
            no_ack: true,
            exclusive: true,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
    .await?;
    expect(&mut h, |c| {
        matches!(c, AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_)))
    })
    .await?;
    debug!(broker = addr, room = room.as_str(), frame_max, "link open");
    Ok((h.stream, h.reader, frame_max))
}

async fn expect(h: &mut Handshake, ok: impl Fn(&AMQPClass) -> bool) -> Result<(), End> {
    let (_, class) = h.method().await?;
    if ok(&class) {
        Ok(())
    } else {
        Err(unexpected(&class))
    }
}

/// Encode basic.publish + content header + body frames (split at
/// `frame_max`) into `out`.
fn encode_publish(
    room: &ShortString,
    body: &[u8],
    frame_max: u32,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    let chunk = frame_max as usize - OVERHEAD;
    let frames = body.len().div_ceil(chunk);
    out.reserve(128 + room.as_str().len() + body.len() + frames * OVERHEAD);
    codec::encode_method(
        CH,
        &AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: EXCHANGE.into(),
            routing_key: room.clone(),
            mandatory: false,
            immediate: false,
        })),
        out,
    )?;
    let header = AMQPFrame::Header(
        CH,
        AMQPContentHeader {
            class_id: BASIC_CLASS,
            body_size: body.len() as u64,
            properties: basic::AMQPProperties::default()
                .with_content_type("application/json".into()),
        },
    );
    let ctx = WriteContext::from(std::mem::take(out));
    *out = gen_frame(&header)(ctx)
        .map(|ctx| ctx.into_inner().0)
        .map_err(|e| format!("encoding content header: {e:?}"))?;
    for part in body.chunks(chunk) {
        out.push(FRAME_BODY);
        out.extend_from_slice(&CH.to_be_bytes());
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part);
        out.push(FRAME_END);
    }
    Ok(())
}

/// A delivery whose content is still coming in.
struct Pending {
    /// Body size from the content header (None: header not seen yet).
    size: Option<usize>,
    body: Vec<u8>,
}

/// What one frame did.
enum Step {
    Continue,
    Message(Vec<u8>),
}

/// Owns the read half: cuts frames, reassembles deliveries, answers the
/// broker's closes, and closes the connection when both halves are gone.
struct ReaderTask {
    rd: OwnedReadHalf,
    reader: FrameReader,
    writer: Arc<Mutex<Writer>>,
    tx: mpsc::Sender<Result<Vec<u8>, End>>,
    what: String,
}

impl ReaderTask {
    async fn run(mut self, mut shutdown: oneshot::Receiver<()>) {
        let mut pending = None;
        let end = loop {
            // Every complete frame already buffered first.
            let step = match self.reader.next_frame() {
                Err(e) => Err(End::new(
                    io::ErrorKind::InvalidData,
                    format!("framing: {e}"),
                )),
                Ok(Some(frame)) => self.frame(frame, &mut pending).await,
                Ok(None) => {
                    tokio::select! {
                        _ = &mut shutdown => {
                            self.close().await;
                            return;
                        }
                        r = self.rd.read_buf(self.reader.read_target(64 * 1024)) => match r {
                            Ok(0) => Err(End::new(
                                io::ErrorKind::UnexpectedEof,
                                "the broker closed the TCP connection",
                            )),
                            Ok(_) => Ok(Step::Continue),
                            Err(e) => Err(End::new(e.kind(), format!("reading: {e}"))),
                        },
                    }
                }
            };
            match step {
                Ok(Step::Continue) => {}
                Ok(Step::Message(body)) => {
                    if self.tx.is_closed() {
                        continue; // receiver dropped; a sender lives on
                    }
                    tokio::select! {
                        _ = &mut shutdown => {
                            self.close().await;
                            return;
                        }
                        _ = self.tx.send(Ok(body)) => {}
                    }
                }
                Err(end) => break end,
            }
        };
        debug!(link = self.what, reason = end.reason, "link ended");
        {
            let mut w = self.writer.lock().await;
            if w.dead.is_none() {
                w.dead = Some(end.clone());
            }
        }
        let _ = self.tx.send(Err(end)).await;
    }

    async fn write(&self, channel: u16, class: AMQPClass) -> Result<(), End> {
        let mut buf = Vec::with_capacity(64);
        codec::encode_method(channel, &class, &mut buf)
            .map_err(|e| End::new(io::ErrorKind::InvalidData, e))?;
        self.writer.lock().await.write(&buf).await
    }

    async fn frame(
        &mut self,
        frame: codec::RawFrame,
        pending: &mut Option<Pending>,
    ) -> Result<Step, End> {
        let payload = &self.reader.buffered()[frame.payload_range()];
        match frame.kind {
            FRAME_HEARTBEAT => Ok(Step::Continue),
            FRAME_METHOD => {
                let class = decode_method(payload)?;
                self.method(frame.channel, class, pending).await
            }
            FRAME_HEADER => {
                let Some(p) = pending
                    .as_mut()
                    .filter(|p| p.size.is_none() && frame.channel == CH)
                else {
                    return Err(End::new(
                        io::ErrorKind::InvalidData,
                        "content header without a delivery",
                    ));
                };
                let (_, header) = parse_content_header(payload).map_err(|_| {
                    End::new(io::ErrorKind::InvalidData, "undecodable content header")
                })?;
                if header.body_size > MAX_BODY as u64 {
                    return Err(End::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "delivery of {} bytes exceeds the link's limit of {MAX_BODY} bytes",
                            header.body_size
                        ),
                    ));
                }
                let size = header.body_size as usize;
                if size == 0 {
                    *pending = None;
                    return Ok(Step::Message(Vec::new()));
                }
                p.size = Some(size);
                p.body.reserve_exact(size);
                Ok(Step::Continue)
            }
            FRAME_BODY => {
                let Some(p) = pending
                    .as_mut()
                    .filter(|p| p.size.is_some() && frame.channel == CH)
                else {
                    return Err(End::new(
                        io::ErrorKind::InvalidData,
                        "content body without a header",
                    ));
                };
                let size = p.size.unwrap_or(0);
                if p.body.len() + payload.len() > size {
                    return Err(End::new(
                        io::ErrorKind::InvalidData,
                        "content body longer than announced",
                    ));
                }
                p.body.extend_from_slice(payload);
                if p.body.len() == size {
                    let body = pending.take().map(|p| p.body).unwrap_or_default();
                    return Ok(Step::Message(body));
                }
                Ok(Step::Continue)
            }
            k => Err(End::new(
                io::ErrorKind::InvalidData,
                format!("unexpected frame type {k}"),
            )),
        }
    }

    async fn method(
        &mut self,
        ch: u16,
        class: AMQPClass,
        pending: &mut Option<Pending>,
    ) -> Result<Step, End> {
        match class {
            AMQPClass::Connection(connection::AMQPMethod::Close(c)) => {
                let end = broker_closed("connection", c.reply_code, c.reply_text.as_str());
                warn!(
                    link = self.what,
                    reason = end.reason,
                    "link closed by the broker"
                );
                let _ = self
                    .write(
                        0,
                        AMQPClass::Connection(connection::AMQPMethod::CloseOk(Default::default())),
                    )
                    .await;
                Err(end)
            }
            AMQPClass::Channel(channel::AMQPMethod::Close(c)) => {
                let end = broker_closed("channel", c.reply_code, c.reply_text.as_str());
                warn!(
                    link = self.what,
                    reason = end.reason,
                    "link's channel closed by the broker"
                );
                let _ = self
                    .write(
                        ch,
                        AMQPClass::Channel(channel::AMQPMethod::CloseOk(Default::default())),
                    )
                    .await;
                self.close_with(end.clone()).await;
                Err(end)
            }
            AMQPClass::Basic(basic::AMQPMethod::Cancel(c)) => {
                let end = End::new(
                    io::ErrorKind::ConnectionAborted,
                    "the broker cancelled the room's consumer (queue deleted?)",
                );
                warn!(
                    link = self.what,
                    reason = end.reason,
                    "link's consumer cancelled"
                );
                if !c.nowait {
                    let _ = self
                        .write(
                            ch,
                            AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                                consumer_tag: c.consumer_tag,
                            })),
                        )
                        .await;
                }
                self.close_with(end.clone()).await;
                Err(end)
            }
            AMQPClass::Basic(basic::AMQPMethod::Deliver(_)) if ch == CH => {
                if pending.is_some() {
                    return Err(End::new(
                        io::ErrorKind::InvalidData,
                        "delivery before the previous one's content",
                    ));
                }
                *pending = Some(Pending {
                    size: None,
                    body: Vec::new(),
                });
                Ok(Step::Continue)
            }
            other => {
                if pending.is_some() {
                    return Err(unexpected(&other));
                }
                debug!(link = self.what, method = method_name(&other), "ignored");
                Ok(Step::Continue)
            }
        }
    }

    /// Mark the link dead with `end` and close the connection.
    async fn close_with(&mut self, end: End) {
        {
            let mut w = self.writer.lock().await;
            if w.dead.is_none() {
                w.dead = Some(end);
            }
        }
        self.close().await;
    }

    /// Best effort connection.close; waits up to [`CLOSE_WAIT`] for close-ok.
    async fn close(&mut self) {
        let sent = self
            .write(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                    reply_code: 200,
                    reply_text: "ms2m link closed".into(),
                    class_id: 0,
                    method_id: 0,
                })),
            )
            .await;
        {
            let mut w = self.writer.lock().await;
            if w.dead.is_none() {
                w.dead = Some(End::new(io::ErrorKind::NotConnected, "the link was closed"));
            }
        }
        if sent.is_err() {
            return;
        }
        let wait = async {
            loop {
                match self.reader.next_frame() {
                    Err(_) => return,
                    Ok(Some(f)) if f.kind == FRAME_METHOD => {
                        let p = &self.reader.buffered()[f.payload_range()];
                        if let Ok(AMQPClass::Connection(
                            connection::AMQPMethod::CloseOk(_) | connection::AMQPMethod::Close(_),
                        )) = decode_method(p)
                        {
                            return;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => match self.rd.read_buf(self.reader.read_target(64 * 1024)).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    },
                }
            }
        };
        let _ = tokio::time::timeout(CLOSE_WAIT, wait).await;
        let _ = self.writer.lock().await.half.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parsing() {
        let t = Duration::from_secs(3);
        let c =
            LinkConfig::from_url("amqp://al%40ice:p%3Ass@broker.example:5673/%2fprod", t).unwrap();
        assert_eq!(c.host, "broker.example");
        assert_eq!(c.port, 5673);
        assert_eq!(c.vhost, "/prod");
        assert_eq!(c.user, "al@ice");
        assert_eq!(c.password, "p:ss");
        assert_eq!(c.connect_timeout, t);
        let c = LinkConfig::from_url("amqp://10.0.0.1", t).unwrap();
        assert_eq!(
            (
                c.host.as_str(),
                c.port,
                c.vhost.as_str(),
                c.user.as_str(),
                c.password.as_str()
            ),
            ("10.0.0.1", 5672, "/", "guest", "guest")
        );
        let c = LinkConfig::from_url("amqp://u@[::1]:5999/%2f?heartbeat=10", t).unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.vhost.as_str()),
            ("::1", 5999, "/")
        );
        assert_eq!((c.user.as_str(), c.password.as_str()), ("u", ""));
        assert_eq!(c.addr(), "[::1]:5999");
        let c = LinkConfig::from_url("amqp://[::1]", t).unwrap();
        assert_eq!((c.host.as_str(), c.port), ("::1", 5672));
        // '@' in a password must be encoded; the last '@' ends the userinfo.
        let c = LinkConfig::from_url("amqp://u:a@b@h/", t).unwrap();
        assert_eq!(
            (c.password.as_str(), c.host.as_str(), c.vhost.as_str()),
            ("a@b", "h", "/")
        );
        for bad in [
            "http://h",
            "amqps://h",
            "amqp://",
            "amqp://h:0",
            "amqp://h:99999",
            "amqp://u:secret@h:x",
            "amqp://[::1",
        ] {
            let e = LinkConfig::from_url(bad, t).unwrap_err();
            assert!(matches!(e, TapError::Config(_)), "{bad}: {e}");
            assert!(!e.to_string().contains("secret"), "{e}");
        }
    }

    #[test]
    fn debug_redacts_password() {
        let c = LinkConfig::from_url("amqp://ms2m:hunter2@h/", Duration::from_secs(1)).unwrap();
        let d = format!("{c:?}");
        assert!(!d.contains("hunter2"), "{d}");
        assert!(d.contains("redacted") && d.contains("ms2m"), "{d}");
        let d = format!("{c:#?}");
        assert!(!d.contains("hunter2"), "{d}");
    }

    #[test]
    fn publish_is_split_at_frame_max() {
        let room: ShortString = "r".into();
        let body: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let mut out = Vec::new();
        encode_publish(&room, &body, 4096, &mut out).unwrap();
        let mut r = FrameReader::new(4096);
        r.extend(&out);
        let mut kinds = Vec::new();
        let mut got = Vec::new();
        while let Some(f) = r.next_frame().unwrap() {
            assert!(f.len <= 4096);
            kinds.push(f.kind);
            if f.kind == FRAME_BODY {
                got.extend_from_slice(&r.buffered()[f.payload_range()]);
            }
            if f.kind == FRAME_HEADER {
                let (_, h) = parse_content_header(&r.buffered()[f.payload_range()]).unwrap();
                assert_eq!(h.body_size, 10_000);
                assert_eq!(
                    h.properties.content_type().as_ref().map(|s| s.as_str()),
                    Some("application/json")
                );
            }
        }
        assert_eq!(
            kinds,
            [
                FRAME_METHOD,
                FRAME_HEADER,
                FRAME_BODY,
                FRAME_BODY,
                FRAME_BODY
            ]
        );
        assert_eq!(got, body);
        // An empty body: method + header, no body frame.
        let mut out = Vec::new();
        encode_publish(&room, b"", 4096, &mut out).unwrap();
        let mut r = FrameReader::new(4096);
        r.extend(&out);
        let mut n = 0;
        while r.next_frame().unwrap().is_some() {
            n += 1;
        }
        assert_eq!(n, 2);
    }

    #[test]
    fn method_names() {
        let c = AMQPClass::Basic(basic::AMQPMethod::Qos(Default::default()));
        assert_eq!(method_name(&c), "Basic.Qos");
    }
}
