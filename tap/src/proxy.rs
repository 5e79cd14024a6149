//! One client connection ↔ one upstream connection.
//!
//! Both directions run as two futures of one task. Frames are cut by
//! [`FrameReader`] and copied through unchanged; method frames are decoded
//! for the ledger (except basic.publish, counted from its ids), and the
//! content header after a delivery is decoded for `x-stream-offset` and
//! message-id. Body frames are never decoded.
//!
//! Publish suppression after a restore ([`crate::fence`]): a dropped
//! publish's frames are not forwarded; the acks the tap owes the app for
//! dropped confirm-mode publishes go from the client direction to the broker
//! direction over a channel ([`Injected`]), and broker confirms are shifted
//! there. An injected frame for a channel inside the content of a broker
//! delivery waits until that content is complete ([`ContentGate`]).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use amq_protocol::frame::parsing::parse_content_header;
use amq_protocol::protocol::{basic, channel, connection, parse_class, AMQPClass};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn, Instrument};

use crate::codec::{self, CodecError, FrameReader, FRAME_HEADER, FRAME_METHOD};
use crate::control::{Mode, Shared};
use crate::fence::{self, ContentDrop, ContentGate, DropStep};
use crate::ledger::{header_fields, Delivery};

/// A frame the tap itself sends the client (channel, encoded frame).
type Injected = (u16, Vec<u8>);

const READ_CHUNK: usize = 64 * 1024;

/// What a direction woke up for: bytes read, a new mode, or a frame to
/// inject.
enum Wake {
    Read(usize),
    Mode(Mode),
    Inject(Injected),
}

/// Reads from `rd` into `reader`, or returns the new mode when it changes
/// first (a dropped sender counts as [`Mode::Shutdown`]), or a frame from
/// `inject` when one comes first.
async fn read_or_mode(
    rd: &mut OwnedReadHalf,
    reader: &mut FrameReader,
    mode: &mut watch::Receiver<Mode>,
    inject: Option<&mut mpsc::UnboundedReceiver<Injected>>,
    side: &'static str,
) -> Result<Wake, PairError> {
    let injected = async {
        match inject {
            Some(rx) => match rx.recv().await {
                Some(f) => f,
                None => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = rd.read_buf(reader.read_target(READ_CHUNK)) => {
            r.map(Wake::Read).map_err(|err| PairError::Io { side, err })
        }
        r = mode.changed() => {
            Ok(Wake::Mode(if r.is_err() { Mode::Shutdown } else { *mode.borrow_and_update() }))
        }
        f = injected => Ok(Wake::Inject(f)),
    }
}

/// Why a connection pair ended.
#[derive(Debug, thiserror::Error)]
enum PairError {
    #[error("malformed frame from {side}: {err}")]
    Codec { side: &'static str, err: CodecError },
    #[error("undecodable {what} from {side}")]
    Decode {
        side: &'static str,
        what: &'static str,
    },
    #[error("{side} socket: {err}")]
    Io {
        side: &'static str,
        err: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

enum End {
    ClientClosed,
    UpstreamClosed,
    Exit,
    Shutdown,
}

pub(crate) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, addr: SocketAddr) {
    let mut mode = shared.mode.subscribe();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((sock, peer)) => {
                    if matches!(*mode.borrow(), Mode::Exit | Mode::Shutdown) {
                        info!(%peer, "ms2m tap: refusing connection, tap is closing");
                        continue;
                    }
                    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(serve(shared.clone(), sock, peer, id).in_current_span());
                }
                Err(e) => {
                    warn!(%addr, "ms2m tap: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            r = mode.changed() => {
                if r.is_err() || *mode.borrow() == Mode::Shutdown {
                    debug!(%addr, "ms2m tap: listener stopped");
                    return;
                }
            }
        }
    }
}

async fn connect_upstream(shared: &Shared) -> Result<TcpStream, String> {
    let up = &shared.config.upstream;
    let fut = async {
        match up.host.parse::<std::net::IpAddr>() {
            Ok(ip) => TcpStream::connect(SocketAddr::new(ip, up.port)).await,
            Err(_) => TcpStream::connect((up.host.as_str(), up.port)).await,
        }
    };
    match tokio::time::timeout(shared.config.connect_timeout, fut).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!("upstream {up} unreachable: {e}")),
        Err(_) => Err(format!("upstream {up}: connect timed out")),
    }
}

async fn serve(shared: Arc<Shared>, client: TcpStream, peer: SocketAddr, id: u64) {
    let c = &shared.counters;
    c.connections_total.fetch_add(1, Ordering::Relaxed);
    c.connections_active.fetch_add(1, Ordering::Relaxed);
    let upstream = match connect_upstream(&shared).await {
        Ok(u) => u,
        Err(e) => {
            c.connection_errors.fetch_add(1, Ordering::Relaxed);
            warn!(conn = id, %peer, "ms2m tap: closing client connection: {e}");
            c.connections_active.fetch_sub(1, Ordering::Relaxed);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    debug!(conn = id, %peer, "ms2m tap: connection opened");
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let frame_max = AtomicU32::new(0);
    let pair = Pair {
        shared: &shared,
        id,
        frame_max: &frame_max,
    };
    let (inject_tx, inject_rx) = mpsc::unbounded_channel();
    let res = tokio::select! {
        r = pair.client_to_upstream(cr, uw, shared.mode.subscribe(), inject_tx) => r,
        r = pair.upstream_to_client(ur, cw, shared.mode.subscribe(), inject_rx) => r,
    };
    match res {
        Ok(End::ClientClosed) => debug!(conn = id, %peer, "ms2m tap: client closed"),
        Ok(End::UpstreamClosed) => {
            info!(conn = id, %peer, "ms2m tap: broker closed the connection; closing the client's")
        }
        Ok(End::Exit) => info!(conn = id, %peer, "ms2m tap: connection closed for exit checkpoint"),
        Ok(End::Shutdown) => debug!(conn = id, %peer, "ms2m tap: connection closed at shutdown"),
        Err(e) => {
            c.connection_errors.fetch_add(1, Ordering::Relaxed);
            warn!(conn = id, %peer, "ms2m tap: closing connection pair: {e}");
        }
    }
    shared.ledger().drop_conn(id);
    c.connections_active.fetch_sub(1, Ordering::Relaxed);
}

struct Pair<'a> {
    shared: &'a Shared,
    id: u64,
    frame_max: &'a AtomicU32,
}

fn ids(payload: &[u8]) -> (u16, u16) {
    if payload.len() < 4 {
        return (0, 0);
    }
    (
        u16::from_be_bytes([payload[0], payload[1]]),
        u16::from_be_bytes([payload[2], payload[3]]),
    )
}

fn decode(payload: &[u8], side: &'static str) -> Result<AMQPClass, PairError> {
    parse_class(payload)
        .map(|(_, m)| m)
        .map_err(|_| PairError::Decode {
            side,
            what: "method frame",
        })
}

/// Count of deliveries one connection holds, mirrored into the tap-wide
/// counter and taken back out when dropped.
struct HeldCount<'a> {
    counter: &'a AtomicU64,
    n: u64,
}

impl HeldCount<'_> {
    fn add(&mut self) {
        self.n += 1;
        self.counter.fetch_add(1, Ordering::Relaxed);
    }
    fn sub(&mut self, k: u64) {
        let k = k.min(self.n);
        self.n -= k;
        self.counter.fetch_sub(k, Ordering::Relaxed);
    }
    fn clear(&mut self) {
        self.counter.fetch_sub(self.n, Ordering::Relaxed);
        self.n = 0;
    }
}

impl Drop for HeldCount<'_> {
    fn drop(&mut self) {
        self.clear();
    }
}

/// Counts a delivery-processing batch as active while alive.
struct BatchGuard<'a>(&'a AtomicUsize);

impl<'a> BatchGuard<'a> {
    fn enter(c: &'a AtomicUsize) -> Self {
        c.fetch_add(1, Ordering::SeqCst);
        BatchGuard(c)
    }
}

impl Drop for BatchGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Puts a frame bound for the client on channel `ch` in its place: the held
/// list when the channel is held (publisher confirms never: they pass held
/// deliveries), else `out`.
fn place(
    ch: u16,
    bytes: Vec<u8>,
    held_channels: &HashSet<u16>,
    held: &mut Vec<(u16, Vec<u8>)>,
    out: &mut Vec<u8>,
) {
    if held_channels.contains(&ch) && !is_confirm_frame(&bytes) {
        held.push((ch, bytes));
    } else {
        out.extend_from_slice(&bytes);
    }
}

/// A frame of the tap's own through the connection's gate, if it has one
/// (see [`ContentGate::offer`]).
fn offer(gate: &mut Option<ContentGate<Vec<u8>>>, ch: u16, bytes: Vec<u8>) -> Option<Vec<u8>> {
    match gate {
        Some(g) => g.offer(ch, bytes),
        None => Some(bytes),
    }
}

/// True for a basic.deliver or basic.get-ok method frame (whole frame).
fn is_delivery_frame(frame: &[u8]) -> bool {
    frame.len() >= 11
        && frame[0] == FRAME_METHOD
        && frame[7..9] == 60u16.to_be_bytes()
        && (frame[9..11] == 60u16.to_be_bytes() || frame[9..11] == 71u16.to_be_bytes())
}

/// True for a basic.ack or basic.nack method frame (a publisher confirm,
/// when it comes from the broker side).
fn is_confirm_frame(frame: &[u8]) -> bool {
    frame.len() >= 11
        && frame[0] == FRAME_METHOD
        && frame[7..9] == 60u16.to_be_bytes()
        && (frame[9..11] == 80u16.to_be_bytes() || frame[9..11] == 120u16.to_be_bytes())
}

/// Delivery waiting for its content header.
struct PendingHeader {
    tag: u64,
    /// The delivery is held (its record is in the held list).
    held: bool,
}

impl Pair<'_> {
    fn sync_limit(&self, reader: &mut FrameReader) {
        let fm = self.frame_max.load(Ordering::Relaxed);
        if fm != 0 && reader.limit() != fm.min(self.shared.config.max_frame) {
            reader.set_frame_max(fm);
        }
    }

    async fn client_to_upstream(
        &self,
        mut cr: OwnedReadHalf,
        mut uw: OwnedWriteHalf,
        mut mode: watch::Receiver<Mode>,
        inject: mpsc::UnboundedSender<Injected>,
    ) -> Result<End, PairError> {
        let side = "client";
        let mut reader = FrameReader::new(self.shared.config.max_frame);
        let mut out: Vec<u8> = Vec::with_capacity(READ_CHUNK);
        let mut handshake = false;
        // Channels inside the content of a suppressed publish.
        let mut dropping: HashMap<u16, ContentDrop> = HashMap::new();
        loop {
            let n = match read_or_mode(&mut cr, &mut reader, &mut mode, None, side).await? {
                Wake::Read(n) => n,
                Wake::Mode(Mode::Exit) => {
                    let close =
                        AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                            reply_code: 320,
                            reply_text: "ms2m tap: container checkpointed (exit)".into(),
                            class_id: 0,
                            method_id: 0,
                        }));
                    out.clear();
                    if codec::encode_method(0, &close, &mut out).is_ok() {
                        let _ = uw.write_all(&out).await;
                    }
                    let _ = uw.shutdown().await;
                    return Ok(End::Exit);
                }
                Wake::Mode(Mode::Shutdown) => return Ok(End::Shutdown),
                Wake::Mode(_) | Wake::Inject(_) => continue,
            };
            if n == 0 {
                return Ok(End::ClientClosed);
            }
            if !handshake {
                match reader
                    .protocol_header()
                    .map_err(|err| PairError::Codec { side, err })?
                {
                    None => continue,
                    Some(h) => {
                        handshake = true;
                        out.extend_from_slice(&h);
                    }
                }
            }
            self.sync_limit(&mut reader);
            let mut frames = 0u64;
            while let Some(f) = reader
                .next_frame()
                .map_err(|err| PairError::Codec { side, err })?
            {
                frames += 1;
                if let Some(d) = dropping.get_mut(&f.channel) {
                    // The content of a suppressed publish: dropped.
                    let payload = &reader.buffered()[f.payload_range()];
                    let step = d
                        .feed(f.kind, payload)
                        .map_err(|e| PairError::Other(format!("channel {}: {e}", f.channel)))?;
                    if step == DropStep::Done {
                        let tag = d.ack_tag;
                        dropping.remove(&f.channel);
                        if let Some(tag) = tag {
                            let mut ack = Vec::new();
                            codec::encode_method(f.channel, &fence::synthetic_ack(tag), &mut ack)
                                .map_err(PairError::Other)?;
                            // The broker direction outlives this one only
                            // while the pair is closing: nothing to ack then.
                            let _ = inject.send((f.channel, ack));
                        }
                    }
                    continue;
                }
                if f.kind == FRAME_METHOD {
                    let payload = &reader.buffered()[f.payload_range()];
                    let (class, method) = ids(payload);
                    if (class, method) == (60, 40) {
                        // basic.publish: counted without decoding.
                        if f.channel != 0 && self.shared.take_suppression() {
                            let tag = self.shared.ledger().suppressed_publish(self.id, f.channel);
                            debug!(
                                conn = self.id,
                                channel = f.channel,
                                confirm_tag = ?tag,
                                "ms2m tap: suppressing a publish"
                            );
                            dropping.insert(f.channel, ContentDrop::new(tag));
                            continue;
                        }
                        self.shared.ledger().client_method(
                            self.id,
                            f.channel,
                            &AMQPClass::Basic(basic::AMQPMethod::Publish(Default::default())),
                        );
                        self.shared
                            .counters
                            .publishes_since_cut
                            .fetch_add(1, Ordering::SeqCst);
                    } else {
                        let m = decode(payload, side)?;
                        if let AMQPClass::Connection(connection::AMQPMethod::TuneOk(t)) = &m {
                            let fm = if t.frame_max == 0 {
                                self.shared.config.max_frame
                            } else {
                                t.frame_max.min(self.shared.config.max_frame)
                            };
                            self.frame_max.store(fm, Ordering::Relaxed);
                            reader.set_frame_max(fm);
                        }
                        let rewritten = self.shared.ledger().client_method(self.id, f.channel, &m);
                        if let Some(rw) = rewritten {
                            codec::encode_method(f.channel, &rw, &mut out)
                                .map_err(PairError::Other)?;
                            continue;
                        }
                    }
                }
                out.extend_from_slice(&reader.buffered()[f.range()]);
            }
            self.shared
                .counters
                .frames_from_client
                .fetch_add(frames, Ordering::Relaxed);
            if !out.is_empty() {
                uw.write_all(&out).await.map_err(|err| PairError::Io {
                    side: "broker",
                    err,
                })?;
                out.clear();
            }
        }
    }

    async fn upstream_to_client(
        &self,
        mut ur: OwnedReadHalf,
        mut cw: OwnedWriteHalf,
        mut mode: watch::Receiver<Mode>,
        mut inject: mpsc::UnboundedReceiver<Injected>,
    ) -> Result<End, PairError> {
        let side = "broker";
        let counters = &self.shared.counters;
        let mut reader = FrameReader::new(self.shared.config.max_frame);
        let mut out: Vec<u8> = Vec::with_capacity(READ_CHUNK);
        // Held frames in arrival order, with their channel.
        let mut held: Vec<(u16, Vec<u8>)> = Vec::new();
        let mut held_deliveries: Vec<Delivery> = Vec::new();
        // Keeps the tap-wide held counter right however this future ends.
        let mut held_count = HeldCount {
            counter: &counters.held_deliveries,
            n: 0,
        };
        let mut held_channels: HashSet<u16> = HashSet::new();
        let mut pending: HashMap<u16, PendingHeader> = HashMap::new();
        // The broker's content per channel; holds back injected frames for
        // a channel inside a delivery's content. Only a connection opened
        // while publishes are still to be suppressed can ever get injected
        // frames: the others skip the bookkeeping.
        let mut gate: Option<ContentGate<Vec<u8>>> =
            (self.shared.suppress_remaining.load(Ordering::SeqCst) > 0).then(ContentGate::default);
        let mut handshake = false;
        mode.borrow_and_update();
        loop {
            // The mode is read fresh (not only on change notifications) so a
            // quiesce or release takes effect from the next batch on.
            let now = *mode.borrow();
            if now == Mode::Open && !held_channels.is_empty() {
                if self.shared.shadow_active.load(Ordering::SeqCst) {
                    // A shadow's gate moved (or a quiesce ended): forward
                    // what it lets through now.
                    self.release_gated(
                        &mut held,
                        &mut held_deliveries,
                        &mut held_channels,
                        &mut held_count,
                        &pending,
                        &mut out,
                    );
                } else {
                    // Release: record and forward what was held, in order.
                    held_count.clear();
                    {
                        let mut ledger = self.shared.ledger();
                        for d in held_deliveries.drain(..) {
                            ledger.record_delivery(self.id, d);
                        }
                    }
                    held_channels.clear();
                    for p in pending.values_mut() {
                        p.held = false;
                    }
                    for (_, b) in held.drain(..) {
                        out.extend_from_slice(&b);
                    }
                }
            }
            // What a release or an injected frame put out.
            if !out.is_empty() {
                cw.write_all(&out).await.map_err(|err| PairError::Io {
                    side: "client",
                    err,
                })?;
                out.clear();
            }
            let n = match read_or_mode(&mut ur, &mut reader, &mut mode, Some(&mut inject), side)
                .await?
            {
                Wake::Inject((ch, bytes)) => {
                    // A frame of the tap's own (an ack for a suppressed
                    // publish): in order with its channel's held frames, and
                    // not inside the content of a delivery on its channel.
                    let mut frames = vec![(ch, bytes)];
                    while let Ok(f) = inject.try_recv() {
                        frames.push(f);
                    }
                    for (ch, bytes) in frames {
                        if let Some(bytes) = offer(&mut gate, ch, bytes) {
                            place(ch, bytes, &held_channels, &mut held, &mut out);
                        }
                    }
                    // Written (after a shadow's gated release) at the top.
                    continue;
                }
                Wake::Read(n) => n,
                Wake::Mode(Mode::Exit) => {
                    held_deliveries.clear();
                    held_channels.clear();
                    let _ = cw.shutdown().await;
                    return Ok(End::Exit);
                }
                Wake::Mode(Mode::Shutdown) => return Ok(End::Shutdown),
                Wake::Mode(_) => continue,
            };
            if n == 0 {
                // Whatever was decoded and forwarded already went out.
                return Ok(End::UpstreamClosed);
            }
            if !handshake {
                // A broker that rejects the protocol version answers with its
                // own protocol header and closes: pass it on.
                let b = reader.buffered();
                let n = b.len().min(4);
                if b[..n] == b"AMQP"[..n] {
                    if b.len() < 8 {
                        continue;
                    }
                    cw.write_all(reader.buffered())
                        .await
                        .map_err(|err| PairError::Io {
                            side: "client",
                            err,
                        })?;
                    return Ok(End::UpstreamClosed);
                }
                handshake = true;
            }
            self.sync_limit(&mut reader);
            let mut frames = 0u64;
            // Marks a batch in progress, so a quiesce on another thread does
            // not conclude between reading the mode and recording deliveries.
            let _batch = BatchGuard::enter(&counters.batches_active);
            let holding = *mode.borrow() == Mode::Hold;
            // The shadow of a live migration holds every delivery until its
            // stream offset (in the content header) is known to be behind
            // the gate (see crate::migration).
            let shadow = self.shared.shadow_active.load(Ordering::SeqCst);
            // Frames the tap injected before these broker frames were read
            // go first: an ack for a suppressed publish must precede any
            // broker confirm (a multiple one could cover it). One for a
            // channel inside a delivery's content goes right after the
            // content's last frame instead (no confirm can come before it).
            while let Ok((ch, bytes)) = inject.try_recv() {
                if let Some(bytes) = offer(&mut gate, ch, bytes) {
                    place(ch, bytes, &held_channels, &mut held, &mut out);
                }
            }
            while let Some(f) = reader
                .next_frame()
                .map_err(|err| PairError::Codec { side, err })?
            {
                frames += 1;
                let ch = f.channel;
                // Injected frames due after this one (it completed a
                // content on `ch`).
                let released = match gate.as_mut() {
                    Some(g) => g.feed(ch, f.kind, &reader.buffered()[f.payload_range()]),
                    None => Vec::new(),
                };
                // Publisher confirms are never held: they need no order
                // with deliveries, and an app that acks a delivery only
                // after its result is confirmed on the same channel would
                // otherwise never settle, and a quiesce never complete.
                let mut hold_this = ch != 0
                    && held_channels.contains(&ch)
                    && !is_confirm_frame(&reader.buffered()[f.range()]);
                // A rewritten frame replacing this one (shifted confirm).
                let mut replacement: Option<Vec<u8>> = None;
                if f.kind == FRAME_METHOD {
                    let payload = &reader.buffered()[f.payload_range()];
                    let m = decode(payload, side)?;
                    match &m {
                        AMQPClass::Basic(basic::AMQPMethod::Deliver(d)) => {
                            let delivery =
                                self.shared.ledger().delivery_from_deliver(self.id, ch, d);
                            self.delivery(
                                delivery,
                                holding || shadow,
                                &mut hold_this,
                                &mut held_deliveries,
                                &mut held_count,
                                &mut pending,
                            );
                        }
                        AMQPClass::Basic(basic::AMQPMethod::GetOk(g)) => {
                            let delivery =
                                self.shared.ledger().delivery_from_get_ok(self.id, ch, g);
                            self.delivery(
                                delivery,
                                holding || shadow,
                                &mut hold_this,
                                &mut held_deliveries,
                                &mut held_count,
                                &mut pending,
                            );
                        }
                        AMQPClass::Connection(connection::AMQPMethod::Tune(t)) => {
                            let cap = self.shared.config.max_frame;
                            if t.frame_max == 0 || t.frame_max > cap {
                                let mut t2 = t.clone();
                                t2.frame_max = cap;
                                debug!(
                                    conn = self.id,
                                    from = t.frame_max,
                                    to = cap,
                                    "ms2m tap: clamping connection.tune frame_max"
                                );
                                let class = AMQPClass::Connection(connection::AMQPMethod::Tune(t2));
                                codec::encode_method(ch, &class, &mut out)
                                    .map_err(PairError::Other)?;
                                continue;
                            }
                        }
                        AMQPClass::Connection(connection::AMQPMethod::Close(c)) => {
                            info!(conn = self.id, code = c.reply_code, text = %c.reply_text, "ms2m tap: broker closes connection");
                        }
                        AMQPClass::Channel(
                            channel::AMQPMethod::Close(_) | channel::AMQPMethod::CloseOk(_),
                        ) if hold_this => {
                            // The channel is going away: the broker requeues
                            // what it delivered on it, so drop what is held
                            // there and let the close through.
                            let before = held_deliveries.len();
                            held_deliveries.retain(|d| d.channel != ch);
                            held_count.sub((before - held_deliveries.len()) as u64);
                            held.retain(|(c, _)| *c != ch);
                            held_channels.remove(&ch);
                            pending.remove(&ch);
                            hold_this = false;
                            self.shared.ledger().server_method(self.id, ch, &m);
                        }
                        AMQPClass::Basic(
                            basic::AMQPMethod::Ack(_) | basic::AMQPMethod::Nack(_),
                        ) => {
                            // A publisher confirm: shifted past the publishes
                            // the tap suppressed on this channel.
                            let shift = {
                                let mut ledger = self.shared.ledger();
                                ledger.server_method(self.id, ch, &m);
                                ledger.confirm_shift(self.id, ch)
                            };
                            if let Some(rw) = fence::shift_confirm(&m, shift) {
                                let mut b = Vec::new();
                                codec::encode_method(ch, &rw, &mut b).map_err(PairError::Other)?;
                                replacement = Some(b);
                            }
                        }
                        other => self.shared.ledger().server_method(self.id, ch, other),
                    }
                } else if f.kind == FRAME_HEADER {
                    if let Some(p) = pending.remove(&ch) {
                        let payload = &reader.buffered()[f.payload_range()];
                        let (_, h) =
                            parse_content_header(payload).map_err(|_| PairError::Decode {
                                side,
                                what: "content header",
                            })?;
                        let (offset, mid) = header_fields(&h.properties);
                        if p.held {
                            if let Some(d) = held_deliveries
                                .iter_mut()
                                .rev()
                                .find(|d| d.channel == ch && d.delivery_tag == p.tag)
                            {
                                d.stream_offset = offset;
                                d.message_id = mid;
                            }
                        } else {
                            self.shared
                                .ledger()
                                .update_delivery(self.id, ch, p.tag, offset, mid)
                        }
                    }
                }
                let bytes = match &replacement {
                    Some(b) => b.as_slice(),
                    None => &reader.buffered()[f.range()],
                };
                if hold_this {
                    held_channels.insert(ch);
                    held.push((ch, bytes.to_vec()));
                } else {
                    out.extend_from_slice(bytes);
                }
                for b in released {
                    place(ch, b, &held_channels, &mut held, &mut out);
                }
            }
            if shadow && !holding && !held_channels.is_empty() {
                self.release_gated(
                    &mut held,
                    &mut held_deliveries,
                    &mut held_channels,
                    &mut held_count,
                    &pending,
                    &mut out,
                );
            }
            drop(_batch);
            counters
                .frames_from_broker
                .fetch_add(frames, Ordering::Relaxed);
            if !out.is_empty() {
                cw.write_all(&out).await.map_err(|err| PairError::Io {
                    side: "client",
                    err,
                })?;
                out.clear();
            }
        }
    }

    /// A shadow's partial release: forwards, in order, the held frames of
    /// each channel up to its first delivery that must wait (its content
    /// header, with the stream offset, not read yet, or a stream offset at
    /// or past the gate), and keeps the rest held. Deliveries without a
    /// stream offset (classic queues) are not gated.
    fn release_gated(
        &self,
        held: &mut Vec<(u16, Vec<u8>)>,
        held_deliveries: &mut Vec<Delivery>,
        held_channels: &mut HashSet<u16>,
        held_count: &mut HeldCount<'_>,
        pending: &HashMap<u16, PendingHeader>,
        out: &mut Vec<u8>,
    ) {
        let limits = self.shared.gate.limits();
        let mut blocked: HashSet<u16> = HashSet::new();
        let mut kept: Vec<(u16, Vec<u8>)> = Vec::new();
        let mut kept_deliveries: Vec<Delivery> = Vec::new();
        let mut released: Vec<Delivery> = Vec::new();
        // Held deliveries and their method frames were pushed in the same
        // order: the n-th delivery frame in `held` is the n-th delivery.
        let mut deliveries = std::mem::take(held_deliveries).into_iter();
        for (ch, bytes) in held.drain(..) {
            if is_delivery_frame(&bytes) {
                let Some(d) = deliveries.next() else {
                    // Cannot happen (both lists move together); keep the
                    // frame held rather than lose track of it.
                    blocked.insert(ch);
                    kept.push((ch, bytes));
                    continue;
                };
                let wait = blocked.contains(&ch)
                    || pending
                        .get(&ch)
                        .is_some_and(|p| p.held && p.tag == d.delivery_tag)
                    || match (&limits, d.stream_offset) {
                        (Some(l), Some(o)) => o >= l.get(&d.queue).copied().unwrap_or(0),
                        _ => false,
                    };
                if wait {
                    blocked.insert(ch);
                    kept_deliveries.push(d);
                    kept.push((ch, bytes));
                } else {
                    released.push(d);
                    out.extend_from_slice(&bytes);
                }
            } else if blocked.contains(&ch) && !is_confirm_frame(&bytes) {
                kept.push((ch, bytes));
            } else {
                // Not behind a waiting delivery, or a publisher confirm
                // (from the broker or for a suppressed publish): confirms
                // need no order with deliveries, and an app that waits for
                // its confirm before acking must not wait behind the gate.
                out.extend_from_slice(&bytes);
            }
        }
        kept_deliveries.extend(deliveries);
        if !released.is_empty() {
            held_count.sub(released.len() as u64);
            let mut ledger = self.shared.ledger();
            for d in released {
                ledger.record_delivery(self.id, d);
            }
        }
        *held = kept;
        *held_deliveries = kept_deliveries;
        held_channels.retain(|c| blocked.contains(c));
    }

    fn delivery(
        &self,
        delivery: Delivery,
        holding: bool,
        hold_this: &mut bool,
        held_deliveries: &mut Vec<Delivery>,
        held_count: &mut HeldCount<'_>,
        pending: &mut HashMap<u16, PendingHeader>,
    ) {
        let ch = delivery.channel;
        let tag = delivery.delivery_tag;
        if holding || *hold_this {
            *hold_this = true;
            held_deliveries.push(delivery);
            held_count.add();
            pending.insert(ch, PendingHeader { tag, held: true });
        } else {
            self.shared.ledger().record_delivery(self.id, delivery);
            pending.insert(ch, PendingHeader { tag, held: false });
        }
    }
}
