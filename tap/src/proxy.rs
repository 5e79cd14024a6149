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

use crate::codec::{self, CodecError, FrameReader, FRAME_BODY, FRAME_HEADER, FRAME_METHOD};
use crate::fence::{self, ContentDrop, ContentGate, DropStep};
use crate::ledger::{header_fields, Consumer, Delivery};
use crate::mirror::{Retained, ToMirror};
use crate::state::{Mode, OrderKind, Orders, Shared};

/// A frame the tap itself sends the client (channel, encoded frame).
type Injected = (u16, Vec<u8>);

/// A frame the tap itself sends the broker on the app's connection
/// (channel, encoded frame, and the order it completes once written).
type UpInject = (u16, Vec<u8>, Option<(OrderKind, u64)>);

const READ_CHUNK: usize = 64 * 1024;

/// What a direction woke up for: bytes read, a new mode, a frame to
/// inject, or new orders.
enum Wake<T> {
    Read(usize),
    Mode(Mode),
    Inject(T),
    Orders,
}

/// Reads from `rd` into `reader`, or returns the new mode when it changes
/// first (a dropped sender counts as [`Mode::Shutdown`]), or a frame from
/// `inject` when one comes first, or new `orders`.
async fn read_or_mode<T>(
    rd: &mut OwnedReadHalf,
    reader: &mut FrameReader,
    mode: &mut watch::Receiver<Mode>,
    inject: Option<&mut mpsc::UnboundedReceiver<T>>,
    orders: Option<&mut watch::Receiver<Orders>>,
    side: &'static str,
) -> Result<Wake<T>, PairError> {
    let orders = async {
        match orders {
            Some(o) => {
                if o.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    };
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
        _ = orders => Ok(Wake::Orders),
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
    let (up_tx, up_rx) = mpsc::unbounded_channel();
    // Orders issued before this connection existed do not concern it.
    let orders = shared.orders.subscribe();
    let seen = *orders.borrow();
    shared
        .orders_done
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, seen);
    let res = tokio::select! {
        r = pair.client_to_upstream(cr, uw, shared.mode.subscribe(), inject_tx, up_rx) => r,
        r = pair.upstream_to_client(ur, cw, shared.mode.subscribe(), inject_rx, up_tx, orders) => r,
    };
    shared
        .orders_done
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    shared.mirror.forget(id, None);
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

/// Appends a frame of the tap's own for the broker to `out`, noting the
/// order it completes.
fn put_up(f: UpInject, out: &mut Vec<u8>, done: &mut Vec<(OrderKind, u64)>) {
    out.extend_from_slice(&f.1);
    if let Some(d) = f.2 {
        done.push(d);
    }
}

/// Encodes one method frame of the tap's own for the broker.
fn up_frame(ch: u16, m: AMQPClass, order: Option<(OrderKind, u64)>) -> Option<UpInject> {
    let mut b = Vec::with_capacity(64);
    match codec::encode_method(ch, &m, &mut b) {
        Ok(()) => Some((ch, b, order)),
        Err(e) => {
            warn!(
                channel = ch,
                "ms2m tap: cannot encode a frame of its own: {e}"
            );
            None
        }
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
        mut up: mpsc::UnboundedReceiver<UpInject>,
    ) -> Result<End, PairError> {
        let side = "client";
        let mut reader = FrameReader::new(self.shared.config.max_frame);
        let mut out: Vec<u8> = Vec::with_capacity(READ_CHUNK);
        let mut handshake = false;
        // Channels inside the content of a suppressed publish.
        let mut dropping: HashMap<u16, ContentDrop> = HashMap::new();
        // The app's publish contents per channel: the tap's own frames for
        // a channel wait until its content is complete.
        let mut content: ContentGate<UpInject> = ContentGate::default();
        // Orders completed by what `out` holds, recorded once written.
        let mut done: Vec<(OrderKind, u64)> = Vec::new();
        loop {
            let woke =
                read_or_mode(&mut cr, &mut reader, &mut mode, Some(&mut up), None, side).await?;
            let n = match woke {
                Wake::Read(n) => n,
                Wake::Inject(first) => {
                    let mut frames = vec![first];
                    while let Ok(f) = up.try_recv() {
                        frames.push(f);
                    }
                    for f in frames {
                        let ch = f.0;
                        if let Some(f) = content.offer(ch, f) {
                            put_up(f, &mut out, &mut done);
                        }
                    }
                    self.write_up(&mut uw, &mut out, &mut done).await?;
                    continue;
                }
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
                Wake::Mode(_) | Wake::Orders => continue,
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
                        if self.shared.mirror.capture.load(Ordering::Relaxed) {
                            if let Some(tm) = self.mirror_settle(f.channel, &m) {
                                // The copies first, then the ack: flush what
                                // came before it, in order.
                                self.write_up(&mut uw, &mut out, &mut done).await?;
                                self.copy_to_mirror(tm).await;
                            }
                        }
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
                            for f in content.feed(f.channel, FRAME_METHOD, &[]) {
                                put_up(f, &mut out, &mut done);
                            }
                            continue;
                        }
                    }
                }
                out.extend_from_slice(&reader.buffered()[f.range()]);
                for f in content.feed(f.channel, f.kind, &reader.buffered()[f.payload_range()]) {
                    put_up(f, &mut out, &mut done);
                }
            }
            self.shared
                .counters
                .frames_from_client
                .fetch_add(frames, Ordering::Relaxed);
            self.write_up(&mut uw, &mut out, &mut done).await?;
        }
    }

    /// Writes `out` to the broker and records the orders it completed.
    async fn write_up(
        &self,
        uw: &mut OwnedWriteHalf,
        out: &mut Vec<u8>,
        done: &mut Vec<(OrderKind, u64)>,
    ) -> Result<(), PairError> {
        if !out.is_empty() {
            uw.write_all(out).await.map_err(|err| PairError::Io {
                side: "broker",
                err,
            })?;
            out.clear();
        }
        for (kind, gen) in done.drain(..) {
            self.shared.order_done(self.id, kind, gen);
        }
        Ok(())
    }

    /// The app settled classic deliveries whose content the mirror keeps:
    /// what to copy into the mirror before its ack goes on (see
    /// [`crate::mirror`]). Channel closes and recovers forget kept content.
    fn mirror_settle(&self, ch: u16, m: &AMQPClass) -> Option<ToMirror> {
        let mirror = &self.shared.mirror;
        let (tag, multiple, ack) = match m {
            AMQPClass::Basic(basic::AMQPMethod::Ack(a)) => (a.delivery_tag, a.multiple, true),
            AMQPClass::Basic(basic::AMQPMethod::Nack(n)) => (n.delivery_tag, n.multiple, false),
            AMQPClass::Basic(basic::AMQPMethod::Reject(r)) => (r.delivery_tag, false, false),
            AMQPClass::Basic(
                basic::AMQPMethod::Recover(_) | basic::AMQPMethod::RecoverAsync(_),
            ) => (0, true, false),
            AMQPClass::Channel(channel::AMQPMethod::Close(_) | channel::AMQPMethod::CloseOk(_)) => {
                mirror.forget(self.id, Some(ch));
                return None;
            }
            _ => return None,
        };
        mirror.settle(self.id, ch, tag, multiple, ack)
    }

    /// Publishes the copies (all, then waits for every confirm) and counts
    /// them. A failure marks the mirror broken (the migration is refused at
    /// its fence); the app's ack goes on either way.
    async fn copy_to_mirror(&self, tm: ToMirror) {
        let mirror = &self.shared.mirror;
        match tm.publisher.publish_all(&tm.entries).await {
            Ok(()) => {
                for (_, r) in &tm.entries {
                    mirror.confirmed(&r.queue);
                }
            }
            Err(e) => mirror.fail(e),
        }
    }

    async fn upstream_to_client(
        &self,
        mut ur: OwnedReadHalf,
        mut cw: OwnedWriteHalf,
        mut mode: watch::Receiver<Mode>,
        mut inject: mpsc::UnboundedReceiver<Injected>,
        up: mpsc::UnboundedSender<UpInject>,
        mut orders: watch::Receiver<Orders>,
    ) -> Result<End, PairError> {
        let side = "broker";
        let mut seen_orders = *orders.borrow_and_update();
        // The classic-queue mirror (source side): contents being kept, and
        // after a handover the channels whose delivery content is dropped.
        let mut mirror = MirrorSide::default();
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
            let woke = read_or_mode(
                &mut ur,
                &mut reader,
                &mut mode,
                Some(&mut inject),
                Some(&mut orders),
                side,
            )
            .await?;
            let n = match woke {
                Wake::Orders => {
                    let now = *orders.borrow_and_update();
                    self.carry_out(
                        seen_orders,
                        now,
                        &up,
                        &mut mirror,
                        &mut held,
                        &mut held_deliveries,
                        &mut held_channels,
                        &mut held_count,
                        &mut pending,
                    );
                    seen_orders = now;
                    continue;
                }
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
                // The content of a delivery handed back to the broker.
                if mirror.dropping.contains(&ch) {
                    if f.kind == FRAME_METHOD {
                        mirror.dropping.remove(&ch);
                    } else {
                        for b in released {
                            place(ch, b, &held_channels, &mut held, &mut out);
                        }
                        continue;
                    }
                }
                // Set when this frame is handed back to the broker.
                let mut drop_this = false;
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
                            if mirror.handed_over && self.shared.mirror.mirrors(&delivery.queue) {
                                // After the fence's handover: back to the
                                // queue, for the target.
                                let nack = requeue(delivery.delivery_tag);
                                if let Some(f) = up_frame(ch, nack, None) {
                                    let _ = up.send(f);
                                }
                                mirror.dropping.insert(ch);
                                pending.remove(&ch);
                                drop_this = true;
                                hold_this = false;
                            } else {
                                if self.shared.mirror.capture.load(Ordering::Relaxed)
                                    && !delivery.no_ack
                                    && self.shared.mirror.mirrors(&delivery.queue)
                                {
                                    mirror.capturing.insert(
                                        ch,
                                        Capture::new(delivery.delivery_tag, &delivery.queue),
                                    );
                                }
                                self.delivery(
                                    delivery,
                                    holding || shadow,
                                    &mut hold_this,
                                    &mut held_deliveries,
                                    &mut held_count,
                                    &mut pending,
                                );
                            }
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
                        ) if hold_this || self.shared.mirror.capture.load(Ordering::Relaxed) => {
                            mirror.capturing.remove(&ch);
                            self.shared.mirror.forget(self.id, Some(ch));
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
                    if let Some(c) = mirror.capturing.get_mut(&ch) {
                        let payload = &reader.buffered()[f.payload_range()];
                        match c.header(payload) {
                            Ok(Some(r)) => {
                                let tag = c.tag;
                                mirror.capturing.remove(&ch);
                                if let Some(r) = r {
                                    self.shared.mirror.retain(self.id, ch, tag, r);
                                }
                            }
                            Ok(None) => {}
                            Err(()) => {
                                return Err(PairError::Decode {
                                    side,
                                    what: "content header",
                                })
                            }
                        }
                    }
                    if let Some(p) = pending.remove(&ch) {
                        let payload = &reader.buffered()[f.payload_range()];
                        let (_, h) =
                            parse_content_header(payload).map_err(|_| PairError::Decode {
                                side,
                                what: "content header",
                            })?;
                        let (offset, mid) = header_fields(&h.properties);
                        if p.held && crate::mirror::is_end_marker(&h.properties) {
                            // The end of a mirror's replay (published by
                            // this restore): never the app's.
                            let tag = p.tag;
                            let queue = held_deliveries
                                .iter()
                                .find(|d| d.channel == ch && d.delivery_tag == tag)
                                .map(|d| d.queue.clone())
                                .unwrap_or_default();
                            let dropped = drop_held(
                                &mut held,
                                &mut held_deliveries,
                                &|d: &Delivery| d.channel == ch && d.delivery_tag == tag,
                                &mut mirror.dropping,
                            );
                            held_count.sub(dropped.len() as u64);
                            if h.body_size == 0 {
                                mirror.dropping.remove(&ch);
                            }
                            self.shared.mirror_end_seen(&queue);
                            drop_this = true;
                            hold_this = false;
                        } else if p.held {
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
                if f.kind == FRAME_BODY {
                    if let Some(c) = mirror.capturing.get_mut(&ch) {
                        if let Some(r) = c.body(&reader.buffered()[f.payload_range()]) {
                            let tag = c.tag;
                            mirror.capturing.remove(&ch);
                            self.shared.mirror.retain(self.id, ch, tag, r);
                        }
                    }
                }
                let bytes = match &replacement {
                    Some(b) => b.as_slice(),
                    None => &reader.buffered()[f.range()],
                };
                if drop_this {
                    // Handed back to the broker: the app never sees it.
                } else if hold_this {
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

    /// Carries out the orders that moved from `seen` to `now` (see
    /// [`crate::state::Orders`]), sending the frames they need to the
    /// broker through the client direction.
    #[allow(clippy::too_many_arguments)]
    fn carry_out(
        &self,
        seen: Orders,
        now: Orders,
        up: &mpsc::UnboundedSender<UpInject>,
        mirror: &mut MirrorSide,
        held: &mut Vec<(u16, Vec<u8>)>,
        held_deliveries: &mut Vec<Delivery>,
        held_channels: &mut HashSet<u16>,
        held_count: &mut HeldCount<'_>,
        pending: &mut HashMap<u16, PendingHeader>,
    ) {
        let shared = self.shared;
        let mut frames: Vec<UpInject> = Vec::new();
        let mut finished: Vec<(OrderKind, u64)> = Vec::new();
        if now.handover > seen.handover {
            // Source fence: the app's consumers of mirrored classic queues
            // stop, and what is held for them goes back to the queue (in
            // order) before the target consumes it.
            let consumers = shared
                .ledger()
                .consumers_of(self.id, &|q| shared.mirror.mirrors(q));
            for (ch, c) in &consumers {
                frames.extend(up_frame(*ch, cancel(c), None));
            }
            let dropped = drop_held(
                held,
                held_deliveries,
                &|d: &Delivery| shared.mirror.mirrors(&d.queue),
                &mut mirror.dropping,
            );
            held_count.sub(dropped.len() as u64);
            for (ch, tag) in &dropped {
                if pending.get(ch).is_some_and(|p| p.tag == *tag) {
                    pending.remove(ch);
                }
                if mirror.capturing.get(ch).is_some_and(|c| c.tag == *tag) {
                    mirror.capturing.remove(ch);
                }
                shared.mirror.settle(self.id, *ch, *tag, false, false);
                frames.extend(up_frame(*ch, requeue(*tag), None));
            }
            held_channels.retain(|c| held.iter().any(|(h, _)| h == c));
            mirror.handed_over = true;
            if !consumers.is_empty() || !dropped.is_empty() {
                info!(
                    conn = self.id,
                    consumers = consumers.len(),
                    requeued = dropped.len(),
                    "ms2m tap: classic consumers handed over to the migration's target"
                );
            }
            finished.push((OrderKind::Handover, now.handover));
        }
        if now.reconsume > seen.reconsume {
            // Source abort after a handover: the app's consumers again.
            if mirror.handed_over {
                let consumers = shared
                    .ledger()
                    .consumers_of(self.id, &|q| shared.mirror.mirrors(q));
                for (ch, c) in &consumers {
                    frames.extend(up_frame(*ch, consume(&c.queue, c), None));
                }
                mirror.handed_over = false;
            }
            finished.push((OrderKind::Reconsume, now.reconsume));
        }
        if now.switch > seen.switch {
            // Target going live: from the mirror streams to the queues,
            // under the app's consumer tags.
            let consumers = {
                let ledger = shared.ledger();
                ledger.consumers_of(self.id, &|q| ledger.replaying_mirror(q))
            };
            for (ch, c) in &consumers {
                frames.extend(up_frame(*ch, cancel(c), None));
                frames.extend(up_frame(*ch, consume(&c.queue, c), None));
            }
            if !consumers.is_empty() {
                info!(
                    conn = self.id,
                    consumers = consumers.len(),
                    "ms2m tap: consumers moved from the mirror streams to their queues"
                );
            }
            finished.push((OrderKind::Switch, now.switch));
        }
        for d in finished {
            // A marker after the order's frames (channel 0 never waits for
            // a content).
            frames.push((0, Vec::new(), Some(d)));
        }
        for f in frames {
            if up.send(f).is_err() {
                // The client direction ended: the pair is closing and the
                // broker requeues everything anyway.
                return;
            }
        }
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

/// basic.cancel of consumer `c`, no reply wanted.
fn cancel(c: &Consumer) -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
        consumer_tag: c.tag.as_str().into(),
        nowait: true,
    }))
}

/// basic.consume of `queue` with consumer `c`'s tag and arguments, no reply
/// wanted.
fn consume(queue: &str, c: &Consumer) -> AMQPClass {
    let mut args = amq_protocol::types::FieldTable::default();
    for (k, v) in c.arguments.inner() {
        if k.as_str() != crate::ledger::X_STREAM_OFFSET {
            args.insert(k.clone(), v.clone());
        }
    }
    AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
        queue: queue.into(),
        consumer_tag: c.tag.as_str().into(),
        no_local: false,
        no_ack: c.no_ack,
        exclusive: false,
        nowait: true,
        arguments: args,
    }))
}

/// basic.nack of one delivery, requeued.
fn requeue(tag: u64) -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
        delivery_tag: tag,
        multiple: false,
        requeue: true,
    }))
}

/// Removes from the held frames the deliveries matching `pred`, with
/// their content frames; returns them as (channel, tag). A channel whose
/// last held delivery was removed goes into `dropping`: the rest of that
/// content, if still to come, is dropped too.
fn drop_held(
    held: &mut Vec<(u16, Vec<u8>)>,
    held_deliveries: &mut Vec<Delivery>,
    pred: &dyn Fn(&Delivery) -> bool,
    dropping: &mut HashSet<u16>,
) -> Vec<(u16, u64)> {
    let mut dropped = Vec::new();
    let mut in_dropped: HashSet<u16> = HashSet::new();
    let mut kept_frames = Vec::with_capacity(held.len());
    let mut kept_deliveries = Vec::with_capacity(held_deliveries.len());
    // Held delivery frames and records are in the same order.
    let mut deliveries = std::mem::take(held_deliveries).into_iter();
    for (ch, bytes) in held.drain(..) {
        if is_delivery_frame(&bytes) {
            match deliveries.next() {
                Some(d) if pred(&d) => {
                    in_dropped.insert(ch);
                    dropped.push((ch, d.delivery_tag));
                    continue;
                }
                Some(d) => kept_deliveries.push(d),
                None => {}
            }
            in_dropped.remove(&ch);
        } else if bytes.first() == Some(&FRAME_METHOD) {
            in_dropped.remove(&ch);
        } else if in_dropped.contains(&ch) {
            continue;
        }
        kept_frames.push((ch, bytes));
    }
    kept_deliveries.extend(deliveries);
    *held = kept_frames;
    *held_deliveries = kept_deliveries;
    dropping.extend(in_dropped);
    dropped
}

/// The mirror's per-connection state in the broker direction.
#[derive(Default)]
struct MirrorSide {
    /// Classic deliveries whose content is being kept, per channel.
    capturing: HashMap<u16, Capture>,
    /// Channels inside the content of a delivery handed back.
    dropping: HashSet<u16>,
    /// The fence handed this connection's classic consumers over.
    handed_over: bool,
}

/// The content of one classic delivery, as it arrives.
struct Capture {
    tag: u64,
    queue: String,
    properties: Option<amq_protocol::protocol::basic::AMQPProperties>,
    size: usize,
    body: Vec<u8>,
}

impl Capture {
    fn new(tag: u64, queue: &str) -> Capture {
        Capture {
            tag,
            queue: queue.to_string(),
            properties: None,
            size: 0,
            body: Vec::new(),
        }
    }

    /// The content header: `Ok(Some(Some(r)))` when the content is complete
    /// (empty body), `Ok(None)` when body frames are due. The delivery's
    /// queue is mirrored, so it is classic: an `x-stream-offset` header a
    /// publisher set on it does not make it a stream delivery.
    #[allow(clippy::type_complexity, clippy::option_option)]
    fn header(&mut self, payload: &[u8]) -> Result<Option<Option<Retained>>, ()> {
        let (_, h) = parse_content_header(payload).map_err(|_| ())?;
        self.size = h.body_size as usize;
        self.properties = Some(h.properties);
        if self.size == 0 {
            return Ok(Some(self.take()));
        }
        self.body.reserve_exact(self.size);
        Ok(None)
    }

    /// A body frame: the kept content once complete.
    fn body(&mut self, payload: &[u8]) -> Option<Retained> {
        self.properties.as_ref()?;
        self.body.extend_from_slice(payload);
        if self.body.len() >= self.size {
            self.take()
        } else {
            None
        }
    }

    fn take(&mut self) -> Option<Retained> {
        Some(Retained {
            queue: std::mem::take(&mut self.queue),
            properties: self.properties.take()?,
            body: std::mem::take(&mut self.body),
        })
    }
}
