//! The tap's ledger: consumers, prefetch, deliveries and their settlement,
//! publishes and confirms, per connection and channel; and per queue the
//! progress that makes up the broker cut.
//!
//! The ledger is plain data driven by decoded methods, so its logic is unit
//! tested without sockets. The proxy calls it under a short mutex.

use std::collections::{BTreeMap, HashMap, VecDeque};

use amq_protocol::protocol::{basic, channel, confirm, queue, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable, ShortString};
use tracing::info;

use crate::cut::{InDoubt, OffsetSpec, QueueCut, QueueKind};

/// Next stream offset per queue (the highest acked offset + 1).
pub type Positions = BTreeMap<String, u64>;

/// Argument / header carrying a stream offset.
pub const X_STREAM_OFFSET: &str = "x-stream-offset";

/// A delivery handed to the client (basic.deliver or basic.get-ok).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Channel number.
    pub channel: u16,
    /// Delivery tag (per channel).
    pub delivery_tag: u64,
    /// Consumer tag (`None` for basic.get-ok).
    pub consumer_tag: Option<String>,
    /// Queue it came from (empty when unknown).
    pub queue: String,
    /// Redelivered flag.
    pub redelivered: bool,
    /// `x-stream-offset` header.
    pub stream_offset: Option<u64>,
    /// message-id property.
    pub message_id: Option<String>,
    /// Delivered to a no-ack consumer (settled on delivery).
    pub no_ack: bool,
}

/// A consumer as the client declared it.
#[derive(Debug, Clone, PartialEq)]
pub struct Consumer {
    /// Consumer tag (server-assigned ones are filled in at consume-ok).
    pub tag: String,
    /// Queue consumed.
    pub queue: String,
    /// basic.consume arguments (after any resume rewrite).
    pub arguments: FieldTable,
    /// no-ack consumer.
    pub no_ack: bool,
}

#[derive(Debug, Default)]
struct ChannelLedger {
    prefetch: Option<u16>,
    consumers: HashMap<String, Consumer>,
    pending_consumes: VecDeque<Consumer>,
    pending_gets: VecDeque<(String, bool)>,
    unacked: BTreeMap<u64, Delivery>,
    confirm: bool,
    publishes: u64,
    confirms: u64,
    /// The app's confirm sequence: publishes (forwarded or suppressed) since
    /// confirm.select.
    confirm_seq: u64,
    /// Confirm-mode publishes suppressed on this channel (always app
    /// sequence numbers `1..=confirm_dropped`, see [`crate::fence`]).
    confirm_dropped: u64,
}

#[derive(Debug, Default)]
struct ConnLedger {
    channels: HashMap<u16, ChannelLedger>,
}

/// Per-queue progress, kept for the tap's whole life (across connections).
#[derive(Debug, Default, Clone)]
struct QueueLedger {
    stream: bool,
    /// Highest acked stream offset + 1.
    next_offset: Option<u64>,
    /// Offset spec of the latest consume on this queue.
    offset_spec: Option<OffsetSpec>,
    delivered: u64,
    acked: u64,
}

/// Resume state of a stream queue restored from a cut.
#[derive(Debug, Clone)]
struct Resume {
    start: OffsetSpec,
    used: bool,
}

/// Counters returned by [`Ledger::totals`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LedgerTotals {
    /// Deliveries handed to clients.
    pub deliveries: u64,
    /// Deliveries acked.
    pub acks: u64,
    /// Deliveries nacked/rejected/recovered.
    pub nacks: u64,
    /// basic.publish from clients.
    pub publishes: u64,
    /// Publisher confirms (basic.ack/nack from the broker).
    pub confirms: u64,
    /// Delivered and not yet settled.
    pub unsettled: u64,
}

/// A classic queue a migration's target replays from its mirror stream
/// first (see [`crate::mirror`]).
#[derive(Debug, Clone)]
struct MirrorReplay {
    stream: String,
    /// The first consume was rewritten (later ones continue from the
    /// ledger's progress).
    used: bool,
}

/// The ledger of one tap.
#[derive(Debug, Default)]
pub struct Ledger {
    conns: HashMap<u64, ConnLedger>,
    queues: BTreeMap<String, QueueLedger>,
    resume: HashMap<String, Resume>,
    /// Classic queues replayed from a mirror stream until the switch.
    mirrors: HashMap<String, MirrorReplay>,
    totals: LedgerTotals,
}

/// Parse an `x-stream-offset` value.
pub fn offset_spec_of(v: &AMQPValue) -> Option<OffsetSpec> {
    let s = |s: &str| match s {
        "first" => OffsetSpec::First,
        "last" => OffsetSpec::Last,
        "next" => OffsetSpec::Next,
        other => OffsetSpec::Interval(other.to_string()),
    };
    Some(match v {
        AMQPValue::LongString(l) => s(&String::from_utf8_lossy(l.as_bytes())),
        AMQPValue::ShortString(x) => s(x.as_str()),
        AMQPValue::Timestamp(t) => OffsetSpec::Timestamp(*t),
        other => OffsetSpec::Offset(int_of(other)?),
    })
}

/// Non-negative integer value of a numeric field.
pub fn int_of(v: &AMQPValue) -> Option<u64> {
    match *v {
        AMQPValue::ShortShortInt(x) => u64::try_from(x).ok(),
        AMQPValue::ShortShortUInt(x) => Some(x.into()),
        AMQPValue::ShortInt(x) => u64::try_from(x).ok(),
        AMQPValue::ShortUInt(x) => Some(x.into()),
        AMQPValue::LongInt(x) => u64::try_from(x).ok(),
        AMQPValue::LongUInt(x) => Some(x.into()),
        AMQPValue::LongLongInt(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

/// The `x-stream-offset` argument value for a spec.
pub fn offset_spec_value(spec: &OffsetSpec) -> AMQPValue {
    match spec {
        OffsetSpec::First => AMQPValue::LongString("first".into()),
        OffsetSpec::Last => AMQPValue::LongString("last".into()),
        OffsetSpec::Next => AMQPValue::LongString("next".into()),
        OffsetSpec::Offset(o) => AMQPValue::LongLongInt(i64::try_from(*o).unwrap_or(i64::MAX)),
        OffsetSpec::Timestamp(t) => AMQPValue::Timestamp(*t),
        OffsetSpec::Interval(s) => AMQPValue::LongString(s.as_str().into()),
    }
}

fn is_stream_declare(args: &FieldTable) -> bool {
    match args.inner().get("x-queue-type") {
        Some(AMQPValue::LongString(s)) => s.as_bytes() == b"stream",
        Some(AMQPValue::ShortString(s)) => s.as_str() == "stream",
        _ => false,
    }
}

impl Ledger {
    /// An empty ledger; with `resume`, stream queues of the cut get their
    /// first basic.consume rewritten to the cut (see [`Ledger::client_method`]).
    pub fn new(resume: Option<&crate::cut::Cut>) -> Self {
        let mut l = Ledger::default();
        if let Some(cut) = resume {
            for q in &cut.queues {
                let ql = l.queues.entry(q.name.clone()).or_default();
                ql.stream = q.kind == QueueKind::Stream;
                ql.next_offset = q.next_offset;
                ql.offset_spec = q.offset_spec.clone();
                if q.kind == QueueKind::Stream {
                    let start = match (q.next_offset, &q.offset_spec) {
                        (Some(o), _) => Some(OffsetSpec::Offset(o)),
                        (None, Some(spec)) => Some(spec.clone()),
                        (None, None) => None,
                    };
                    if let Some(start) = start {
                        l.resume
                            .insert(q.name.clone(), Resume { start, used: false });
                    }
                }
            }
        }
        l
    }

    fn chan(&mut self, conn: u64, ch: u16) -> &mut ChannelLedger {
        self.conns
            .entry(conn)
            .or_default()
            .channels
            .entry(ch)
            .or_default()
    }

    /// Forget a connection (its unsettled deliveries return to the broker).
    pub fn drop_conn(&mut self, conn: u64) {
        if let Some(c) = self.conns.remove(&conn) {
            let n: usize = c.channels.values().map(|c| c.unacked.len()).sum();
            self.totals.unsettled = self.totals.unsettled.saturating_sub(n as u64);
        }
    }

    fn drop_channel(&mut self, conn: u64, ch: u16) {
        if let Some(c) = self.conns.get_mut(&conn) {
            if let Some(cl) = c.channels.remove(&ch) {
                self.totals.unsettled = self
                    .totals
                    .unsettled
                    .saturating_sub(cl.unacked.len() as u64);
            }
        }
    }

    /// A method from the client. Returns a replacement when the tap rewrites
    /// it (resume of a stream consumer), else `None`.
    pub fn client_method(&mut self, conn: u64, ch: u16, m: &AMQPClass) -> Option<AMQPClass> {
        match m {
            AMQPClass::Basic(basic::AMQPMethod::Publish(_)) => {
                let chl = self.chan(conn, ch);
                chl.publishes += 1;
                if chl.confirm {
                    chl.confirm_seq += 1;
                }
                self.totals.publishes += 1;
            }
            AMQPClass::Basic(basic::AMQPMethod::Ack(a)) => {
                self.settle(conn, ch, a.delivery_tag, a.multiple, true)
            }
            AMQPClass::Basic(basic::AMQPMethod::Nack(n)) => {
                self.settle(conn, ch, n.delivery_tag, n.multiple, false)
            }
            AMQPClass::Basic(basic::AMQPMethod::Reject(r)) => {
                self.settle(conn, ch, r.delivery_tag, false, false)
            }
            AMQPClass::Basic(basic::AMQPMethod::Recover(_))
            | AMQPClass::Basic(basic::AMQPMethod::RecoverAsync(_)) => {
                // Everything unacked on the channel is requeued/redelivered
                // with new delivery tags.
                self.settle(conn, ch, 0, true, false)
            }
            AMQPClass::Basic(basic::AMQPMethod::Qos(q)) => {
                self.chan(conn, ch).prefetch = Some(q.prefetch_count)
            }
            AMQPClass::Basic(basic::AMQPMethod::Get(g)) => {
                let q = g.queue.to_string();
                self.queues.entry(q.clone()).or_default();
                self.chan(conn, ch).pending_gets.push_back((q, g.no_ack));
            }
            AMQPClass::Basic(basic::AMQPMethod::Cancel(c)) if c.nowait => {
                // No cancel-ok will come: forget the consumer now.
                self.chan(conn, ch)
                    .consumers
                    .remove(c.consumer_tag.as_str());
            }
            AMQPClass::Basic(basic::AMQPMethod::Consume(c)) => return self.consume(conn, ch, c),
            AMQPClass::Queue(queue::AMQPMethod::Declare(d)) => {
                let stream = is_stream_declare(&d.arguments);
                if stream && !d.queue.as_str().is_empty() {
                    self.queues.entry(d.queue.to_string()).or_default().stream = true;
                }
            }
            AMQPClass::Confirm(confirm::AMQPMethod::Select(_)) => {
                self.chan(conn, ch).confirm = true
            }
            AMQPClass::Channel(channel::AMQPMethod::Close(_))
            | AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) => self.drop_channel(conn, ch),
            _ => {}
        }
        None
    }

    /// A migration's target: the app's consumes of these classic queues
    /// (queue → mirror stream) are rewritten onto the mirror streams, from
    /// their start, until [`Ledger::switch_mirrors`]. Their positions on
    /// the mirror count as the queues' stream positions meanwhile.
    pub fn replay_mirrors(&mut self, mirrors: &BTreeMap<String, String>) {
        for (q, stream) in mirrors {
            // Position 0 on the mirror from the start: a target that has
            // not acked anything yet is 0 behind nothing.
            let ql = self.queues.entry(q.clone()).or_default();
            ql.stream = true;
            ql.next_offset = Some(0);
            self.mirrors.insert(
                q.clone(),
                MirrorReplay {
                    stream: stream.clone(),
                    used: false,
                },
            );
        }
    }

    /// Whether the app's consumers of classic queue `q` are on its mirror.
    pub fn replaying_mirror(&self, q: &str) -> bool {
        self.mirrors.contains_key(q)
    }

    /// The replay of the mirrors is over: the queues are classic again, and
    /// later consumes are left as the app sends them. Returns the queues.
    pub fn switch_mirrors(&mut self) -> Vec<String> {
        let qs: Vec<String> = self.mirrors.drain().map(|(q, _)| q).collect();
        for q in &qs {
            if let Some(ql) = self.queues.get_mut(q) {
                ql.stream = false;
                ql.next_offset = None;
                ql.offset_spec = None;
            }
        }
        qs
    }

    /// The consumers of connection `conn` on any of `queues`, with their
    /// channel, in channel order.
    pub fn consumers_of(&self, conn: u64, queues: &dyn Fn(&str) -> bool) -> Vec<(u16, Consumer)> {
        let mut v: Vec<(u16, Consumer)> = self
            .conns
            .get(&conn)
            .map(|c| {
                c.channels
                    .iter()
                    .flat_map(|(ch, chl)| chl.consumers.values().map(|c| (*ch, c.clone())))
                    .filter(|(_, c)| queues(&c.queue))
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by(|a, b| (a.0, &a.1.tag).cmp(&(b.0, &b.1.tag)));
        v
    }

    /// Checks that the consumers of `queues` can be mirrored: no no-ack
    /// consumer (the broker forgets its messages on delivery) and a
    /// prefetch limit on their channel (the target replays a stream there).
    pub fn check_mirrorable(&self, queues: &[String]) -> Result<(), crate::TapError> {
        for c in self.conns.values() {
            for (ch, chl) in &c.channels {
                for cons in chl.consumers.values() {
                    if !queues.contains(&cons.queue) {
                        continue;
                    }
                    if cons.no_ack {
                        return Err(crate::TapError::Config(format!(
                            "consumer {} of classic queue {} is no-ack: the broker forgets \
                             its messages on delivery, so they cannot be mirrored for a live \
                             migration (use manual acks, or --stop-and-copy)",
                            cons.tag, cons.queue
                        )));
                    }
                    if chl.prefetch.unwrap_or(0) == 0 {
                        return Err(crate::TapError::Config(format!(
                            "consumer {} of classic queue {} is on channel {ch} without a \
                             prefetch limit (basic.qos): the target replays the queue's mirror \
                             stream on that channel, and RabbitMQ streams need one \
                             (set basic.qos, or use --stop-and-copy)",
                            cons.tag, cons.queue
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    fn consume(&mut self, conn: u64, ch: u16, c: &basic::Consume) -> Option<AMQPClass> {
        if self.mirrors.contains_key(c.queue.as_str()) {
            return self.consume_mirror(conn, ch, c);
        }
        let qname = c.queue.to_string();
        let mut args = c.arguments.clone();
        let asked = args.inner().get(X_STREAM_OFFSET).and_then(offset_spec_of);
        let mut rewritten = None;
        let progress = self.queues.get(&qname).and_then(|q| q.next_offset);
        if let Some(r) = self.resume.get_mut(&qname) {
            let start = if !r.used {
                // First consume after restore: the cut wins, whatever the app asked.
                r.used = true;
                Some(r.start.clone())
            } else {
                // Later re-consumes (the app reconnected): continue from the
                // ledger's own progress when the app asks for a tail-relative
                // position; explicit positions are the app's business.
                match asked {
                    None | Some(OffsetSpec::Next) | Some(OffsetSpec::Last) => {
                        Some(progress.map_or_else(|| r.start.clone(), OffsetSpec::Offset))
                    }
                    Some(_) => None,
                }
            };
            if let Some(start) = start {
                info!(
                    queue = %qname,
                    asked = ?asked,
                    start = ?start,
                    "ms2m tap: resume: rewriting basic.consume x-stream-offset"
                );
                args.insert(X_STREAM_OFFSET.into(), offset_spec_value(&start));
                let mut nc = c.clone();
                nc.arguments = args.clone();
                rewritten = Some(AMQPClass::Basic(basic::AMQPMethod::Consume(nc)));
            }
        }
        let spec = args.inner().get(X_STREAM_OFFSET).and_then(offset_spec_of);
        let ql = self.queues.entry(qname.clone()).or_default();
        if spec.is_some() {
            ql.stream = true;
            ql.offset_spec = spec;
        }
        let consumer = Consumer {
            tag: c.consumer_tag.to_string(),
            queue: qname,
            arguments: args,
            no_ack: c.no_ack,
        };
        let chl = self.chan(conn, ch);
        if c.nowait {
            chl.consumers.insert(consumer.tag.clone(), consumer);
        } else {
            chl.pending_consumes.push_back(consumer);
        }
        rewritten
    }

    /// A consume of a classic queue replayed from its mirror: rewritten
    /// onto the mirror stream, from its start the first time and from the
    /// ledger's progress after (the app reconnected). The consumer keeps
    /// the app's queue name and arguments (for the switch back).
    fn consume_mirror(&mut self, conn: u64, ch: u16, c: &basic::Consume) -> Option<AMQPClass> {
        let qname = c.queue.to_string();
        let progress = self.queues.get(&qname).and_then(|q| q.next_offset);
        let m = self.mirrors.get_mut(&qname)?;
        let start = if m.used { progress.unwrap_or(0) } else { 0 };
        m.used = true;
        let mut args = c.arguments.clone();
        args.insert(
            X_STREAM_OFFSET.into(),
            offset_spec_value(&OffsetSpec::Offset(start)),
        );
        let mut nc = c.clone();
        nc.queue = m.stream.as_str().into();
        nc.arguments = args;
        info!(
            queue = %qname,
            mirror = %m.stream,
            start,
            "ms2m tap: replaying a classic queue from its mirror stream"
        );
        let consumer = Consumer {
            tag: c.consumer_tag.to_string(),
            queue: qname,
            arguments: c.arguments.clone(),
            no_ack: c.no_ack,
        };
        let chl = self.chan(conn, ch);
        if c.nowait {
            chl.consumers.insert(consumer.tag.clone(), consumer);
        } else {
            chl.pending_consumes.push_back(consumer);
        }
        Some(AMQPClass::Basic(basic::AMQPMethod::Consume(nc)))
    }

    fn settle(&mut self, conn: u64, ch: u16, tag: u64, multiple: bool, ack: bool) {
        let Some(chl) = self
            .conns
            .get_mut(&conn)
            .and_then(|c| c.channels.get_mut(&ch))
        else {
            return;
        };
        let settled: Vec<Delivery> = if multiple {
            // tag 0 (and the largest tag) settles everything.
            let keep = match tag.checked_add(1) {
                Some(next) if tag != 0 => chl.unacked.split_off(&next),
                _ => BTreeMap::new(),
            };
            std::mem::replace(&mut chl.unacked, keep)
                .into_values()
                .collect()
        } else {
            chl.unacked.remove(&tag).into_iter().collect()
        };
        let n = settled.len() as u64;
        self.totals.unsettled = self.totals.unsettled.saturating_sub(n);
        if ack {
            self.totals.acks += n;
        } else {
            self.totals.nacks += n;
        }
        if ack {
            for d in settled {
                self.progress(&d, true);
            }
        }
    }

    fn progress(&mut self, d: &Delivery, acked: bool) {
        let ql = self.queues.entry(d.queue.clone()).or_default();
        if acked {
            ql.acked += 1;
        }
        if let Some(o) = d.stream_offset {
            ql.stream = true;
            if acked {
                // A forged header at u64::MAX must not wrap to 0 (a restore
                // would replay the stream from its start).
                let next = o.saturating_add(1);
                ql.next_offset = Some(ql.next_offset.map_or(next, |n| n.max(next)));
            }
        }
    }

    /// A basic.publish from the client that the tap suppresses (drops). It
    /// is not counted as a publish; on a channel in confirm mode it takes the
    /// next app sequence number, returned so the tap can ack it.
    pub fn suppressed_publish(&mut self, conn: u64, ch: u16) -> Option<u64> {
        let chl = self.chan(conn, ch);
        if !chl.confirm {
            return None;
        }
        chl.confirm_seq += 1;
        chl.confirm_dropped += 1;
        Some(chl.confirm_seq)
    }

    /// How far the broker's confirm delivery tags on a channel lag behind the
    /// app's: the confirm-mode publishes suppressed there.
    pub fn confirm_shift(&self, conn: u64, ch: u16) -> u64 {
        self.conns
            .get(&conn)
            .and_then(|c| c.channels.get(&ch))
            .map_or(0, |c| c.confirm_dropped)
    }

    /// A method from the broker (other than deliveries, which go through
    /// [`Ledger::delivery_from_deliver`] / [`Ledger::delivery_from_get_ok`]).
    pub fn server_method(&mut self, conn: u64, ch: u16, m: &AMQPClass) {
        match m {
            AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(ok)) => {
                let chl = self.chan(conn, ch);
                if let Some(mut c) = chl.pending_consumes.pop_front() {
                    c.tag = ok.consumer_tag.to_string();
                    chl.consumers.insert(c.tag.clone(), c);
                }
            }
            AMQPClass::Basic(basic::AMQPMethod::CancelOk(c)) => {
                self.chan(conn, ch)
                    .consumers
                    .remove(c.consumer_tag.as_str());
            }
            AMQPClass::Basic(basic::AMQPMethod::Cancel(c)) => {
                info!(
                    channel = ch,
                    consumer = %c.consumer_tag,
                    "ms2m tap: broker cancelled consumer"
                );
                self.chan(conn, ch)
                    .consumers
                    .remove(c.consumer_tag.as_str());
            }
            AMQPClass::Basic(basic::AMQPMethod::GetEmpty(_)) => {
                self.chan(conn, ch).pending_gets.pop_front();
            }
            AMQPClass::Basic(basic::AMQPMethod::Ack(_))
            | AMQPClass::Basic(basic::AMQPMethod::Nack(_)) => {
                let chl = self.chan(conn, ch);
                if chl.confirm {
                    chl.confirms += 1;
                    self.totals.confirms += 1;
                }
            }
            AMQPClass::Channel(channel::AMQPMethod::Close(_))
            | AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) => self.drop_channel(conn, ch),
            _ => {}
        }
    }

    /// A delivery record for a basic.deliver (queue looked up by consumer).
    pub fn delivery_from_deliver(&mut self, conn: u64, ch: u16, d: &basic::Deliver) -> Delivery {
        let chl = self.chan(conn, ch);
        let (queue, no_ack) = chl
            .consumers
            .get(d.consumer_tag.as_str())
            .map(|c| (c.queue.clone(), c.no_ack))
            .unwrap_or_default();
        Delivery {
            channel: ch,
            delivery_tag: d.delivery_tag,
            consumer_tag: Some(d.consumer_tag.to_string()),
            queue,
            redelivered: d.redelivered,
            stream_offset: None,
            message_id: None,
            no_ack,
        }
    }

    /// A delivery record for a basic.get-ok (queue from the pending basic.get).
    pub fn delivery_from_get_ok(&mut self, conn: u64, ch: u16, g: &basic::GetOk) -> Delivery {
        let (queue, no_ack) = self
            .chan(conn, ch)
            .pending_gets
            .pop_front()
            .unwrap_or_default();
        Delivery {
            channel: ch,
            delivery_tag: g.delivery_tag,
            consumer_tag: None,
            queue,
            redelivered: g.redelivered,
            stream_offset: None,
            message_id: None,
            no_ack,
        }
    }

    /// Record a delivery as handed to the client.
    pub fn record_delivery(&mut self, conn: u64, d: Delivery) {
        self.totals.deliveries += 1;
        if let Some(ql) = self.queues.get_mut(&d.queue) {
            ql.delivered += 1;
        } else {
            self.queues.entry(d.queue.clone()).or_default().delivered += 1;
        }
        if d.no_ack {
            self.progress(&d, true);
            self.totals.acks += 1;
            return;
        }
        if d.stream_offset.is_some() {
            self.queues.entry(d.queue.clone()).or_default().stream = true;
        }
        self.totals.unsettled += 1;
        self.chan(conn, d.channel).unacked.insert(d.delivery_tag, d);
    }

    /// Fill in the content-header fields of a recorded delivery.
    pub fn update_delivery(
        &mut self,
        conn: u64,
        ch: u16,
        tag: u64,
        stream_offset: Option<u64>,
        message_id: Option<String>,
    ) {
        let Some(d) = self
            .conns
            .get_mut(&conn)
            .and_then(|c| c.channels.get_mut(&ch))
            .and_then(|c| c.unacked.get_mut(&tag))
        else {
            return;
        };
        d.stream_offset = stream_offset;
        d.message_id = message_id;
        if stream_offset.is_some() {
            let q = d.queue.clone();
            self.queues.entry(q).or_default().stream = true;
        }
    }

    /// Counters.
    pub fn totals(&self) -> LedgerTotals {
        self.totals
    }

    /// Delivered and unsettled, across all connections.
    pub fn unsettled(&self) -> u64 {
        self.totals.unsettled
    }

    /// Unsettled deliveries from queues matching `queue`.
    pub fn unsettled_of(&self, queue: &dyn Fn(&str) -> bool) -> usize {
        self.conns
            .values()
            .flat_map(|c| c.channels.values())
            .flat_map(|ch| ch.unacked.values())
            .filter(|d| queue(&d.queue))
            .count()
    }

    /// Prefetch set by basic.qos on a channel, if any.
    pub fn prefetch(&self, conn: u64, ch: u16) -> Option<u16> {
        self.conns.get(&conn)?.channels.get(&ch)?.prefetch
    }

    /// Active consumers of a connection.
    pub fn consumers(&self, conn: u64) -> Vec<Consumer> {
        self.conns
            .get(&conn)
            .map(|c| {
                c.channels
                    .values()
                    .flat_map(|ch| ch.consumers.values().cloned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Unsettled deliveries of a connection, ordered by channel and tag.
    pub fn unacked(&self, conn: u64) -> Vec<Delivery> {
        let mut v: Vec<Delivery> = self
            .conns
            .get(&conn)
            .map(|c| {
                c.channels
                    .values()
                    .flat_map(|ch| ch.unacked.values().cloned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by_key(|d| (d.channel, d.delivery_tag));
        v
    }

    /// Publishes and confirms seen on a channel.
    pub fn publish_counts(&self, conn: u64, ch: u16) -> (u64, u64, bool) {
        self.conns
            .get(&conn)
            .and_then(|c| c.channels.get(&ch))
            .map(|c| (c.publishes, c.confirms, c.confirm))
            .unwrap_or_default()
    }

    /// Queues with a consumer now (consume-ok seen, not cancelled), over
    /// every connection: a migration's target is ready to catch up only
    /// once its app consumes the source's queues again.
    pub fn consumed_queues(&self) -> std::collections::BTreeSet<String> {
        self.conns
            .values()
            .flat_map(|c| c.channels.values())
            .flat_map(|ch| ch.consumers.values())
            .map(|c| c.queue.clone())
            .collect()
    }

    /// The acked position (highest acked offset + 1) of every stream queue
    /// that has one: what a live migration's source announces and its
    /// target compares against.
    pub fn stream_positions(&self) -> BTreeMap<String, u64> {
        self.queues
            .iter()
            .filter(|(_, q)| q.stream)
            .filter_map(|(name, q)| q.next_offset.map(|n| (name.clone(), n)))
            .collect()
    }

    /// The per-queue part of a cut. `in_doubt` lists unsettled deliveries
    /// (pass `false` when the quiesce completed and nothing can be in doubt).
    pub fn queue_cuts(&self, with_in_doubt: bool) -> Vec<QueueCut> {
        let mut in_flight: HashMap<&str, Vec<&Delivery>> = HashMap::new();
        for c in self.conns.values() {
            for chl in c.channels.values() {
                for d in chl.unacked.values() {
                    in_flight.entry(d.queue.as_str()).or_default().push(d);
                }
            }
        }
        self.queues
            .iter()
            .filter(|(name, _)| !name.is_empty() || in_flight.contains_key(""))
            .map(|(name, q)| {
                let unsettled = in_flight.get(name.as_str());
                QueueCut {
                    name: name.clone(),
                    kind: if q.stream {
                        QueueKind::Stream
                    } else {
                        QueueKind::Classic
                    },
                    next_offset: if q.stream { q.next_offset } else { None },
                    offset_spec: if q.stream && q.next_offset.is_none() {
                        q.offset_spec.clone()
                    } else {
                        None
                    },
                    in_flight: unsettled.map_or(0, |v| v.len() as u64),
                    delivered: q.delivered,
                    acked: q.acked,
                    in_doubt: if with_in_doubt {
                        let mut v: Vec<InDoubt> = unsettled
                            .map(|v| {
                                v.iter()
                                    .map(|d| InDoubt {
                                        channel: d.channel,
                                        delivery_tag: d.delivery_tag,
                                        consumer_tag: d.consumer_tag.clone(),
                                        redelivered: d.redelivered,
                                        stream_offset: d.stream_offset,
                                        message_id: d.message_id.clone(),
                                    })
                                    .collect()
                            })
                            .unwrap_or_default();
                        v.sort_by_key(|d| (d.channel, d.delivery_tag));
                        v
                    } else {
                        Vec::new()
                    },
                }
            })
            .collect()
    }
}

/// Read `x-stream-offset` (headers) and message-id from content properties.
pub fn header_fields(props: &basic::AMQPProperties) -> (Option<u64>, Option<String>) {
    let offset = props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(X_STREAM_OFFSET))
        .and_then(int_of);
    let mid = props.message_id().as_ref().map(ShortString::to_string);
    (offset, mid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cut::{Cut, QuiesceReport, CUT_SCHEMA};

    fn consume(q: &str, tag: &str, args: FieldTable) -> AMQPClass {
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: q.into(),
            consumer_tag: tag.into(),
            arguments: args,
            ..Default::default()
        }))
    }
    fn consume_ok(tag: &str) -> AMQPClass {
        AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
            consumer_tag: tag.into(),
        }))
    }
    fn deliver(l: &mut Ledger, ch: u16, tag: &str, dtag: u64, offset: Option<u64>) {
        let mut d = l.delivery_from_deliver(
            1,
            ch,
            &basic::Deliver {
                consumer_tag: tag.into(),
                delivery_tag: dtag,
                ..Default::default()
            },
        );
        d.stream_offset = offset;
        l.record_delivery(1, d);
    }
    fn ack(tag: u64, multiple: bool) -> AMQPClass {
        AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag: tag,
            multiple,
        }))
    }

    #[test]
    fn classic_queue_replays_from_its_mirror_until_the_switch() {
        let mut l = Ledger::new(None);
        l.replay_mirrors(&[("orders".to_string(), "ms2m.mirror.m1.orders".to_string())].into());
        assert!(l.replaying_mirror("orders"));
        // The first consume goes to the mirror from its start, the app's
        // name kept for the consumer.
        let rw = l.client_method(1, 1, &consume("orders", "c1", FieldTable::default()));
        let Some(AMQPClass::Basic(basic::AMQPMethod::Consume(c))) = rw else {
            panic!("not rewritten: {rw:?}")
        };
        assert_eq!(c.queue.as_str(), "ms2m.mirror.m1.orders");
        assert_eq!(
            c.arguments.inner().get(X_STREAM_OFFSET),
            Some(&offset_spec_value(&OffsetSpec::Offset(0)))
        );
        l.server_method(1, 1, &consume_ok("c1"));
        let cons = l.consumers_of(1, &|q| q == "orders");
        assert_eq!(cons.len(), 1);
        assert!(cons[0].1.arguments.inner().get(X_STREAM_OFFSET).is_none());
        // Positions count on the mirror.
        deliver(&mut l, 1, "c1", 1, Some(0));
        deliver(&mut l, 1, "c1", 2, Some(1));
        assert_eq!(l.unsettled_of(&|q| q == "orders"), 2);
        l.client_method(1, 1, &ack(2, true));
        assert_eq!(l.stream_positions().get("orders"), Some(&2));
        // A reconsume (the app reconnected) continues from there.
        let rw = l.client_method(2, 1, &consume("orders", "c2", FieldTable::default()));
        let Some(AMQPClass::Basic(basic::AMQPMethod::Consume(c))) = rw else {
            panic!("not rewritten: {rw:?}")
        };
        assert_eq!(
            c.arguments.inner().get(X_STREAM_OFFSET),
            Some(&offset_spec_value(&OffsetSpec::Offset(2)))
        );
        // After the switch the queue is classic again and consumes pass.
        assert_eq!(l.switch_mirrors(), vec!["orders".to_string()]);
        assert!(!l.replaying_mirror("orders"));
        assert!(!l.stream_positions().contains_key("orders"));
        assert!(l
            .client_method(3, 1, &consume("orders", "c3", FieldTable::default()))
            .is_none());
    }

    #[test]
    fn only_acked_consumers_with_a_prefetch_can_be_mirrored() {
        let mut l = Ledger::new(None);
        let qs = vec!["orders".to_string()];
        l.client_method(1, 1, &consume("orders", "c1", FieldTable::default()));
        l.server_method(1, 1, &consume_ok("c1"));
        let e = l.check_mirrorable(&qs).unwrap_err().to_string();
        assert!(e.contains("prefetch"), "{e}");
        l.client_method(
            1,
            1,
            &AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count: 50,
                ..Default::default()
            })),
        );
        assert!(l.check_mirrorable(&qs).is_ok());
        l.client_method(
            1,
            2,
            &AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                queue: "orders".into(),
                consumer_tag: "c2".into(),
                no_ack: true,
                ..Default::default()
            })),
        );
        l.server_method(1, 2, &consume_ok("c2"));
        let e = l.check_mirrorable(&qs).unwrap_err().to_string();
        assert!(e.contains("no-ack"), "{e}");
        // Other queues do not matter.
        assert!(l.check_mirrorable(&["other".to_string()]).is_ok());
    }

    #[test]
    fn multiple_ack_clears_up_to_tag_only_on_its_channel() {
        let mut l = Ledger::new(None);
        l.client_method(1, 1, &consume("q", "", FieldTable::default()));
        l.server_method(1, 1, &consume_ok("amq.ctag-1"));
        l.client_method(1, 2, &consume("q", "c2", FieldTable::default()));
        l.server_method(1, 2, &consume_ok("c2"));
        for t in 1..=5 {
            deliver(&mut l, 1, "amq.ctag-1", t, None);
        }
        deliver(&mut l, 2, "c2", 1, None);
        deliver(&mut l, 2, "c2", 2, None);
        assert_eq!(l.unsettled(), 7);
        l.client_method(1, 1, &ack(3, true));
        let left: Vec<(u16, u64)> = l
            .unacked(1)
            .iter()
            .map(|d| (d.channel, d.delivery_tag))
            .collect();
        assert_eq!(left, vec![(1, 4), (1, 5), (2, 1), (2, 2)]);
        assert_eq!(l.unacked(1)[0].queue, "q");
        l.client_method(1, 2, &ack(0, true));
        assert_eq!(l.unsettled(), 2);
        l.client_method(1, 1, &ack(5, false));
        assert_eq!(l.unsettled(), 1);
        let t = l.totals();
        assert_eq!((t.deliveries, t.acks), (7, 6));
    }

    #[test]
    fn nack_reject_recover_close_settle() {
        let mut l = Ledger::new(None);
        l.client_method(1, 1, &consume("q", "c", FieldTable::default()));
        l.server_method(1, 1, &consume_ok("c"));
        for t in 1..=6 {
            deliver(&mut l, 1, "c", t, None);
        }
        l.client_method(
            1,
            1,
            &AMQPClass::Basic(basic::AMQPMethod::Reject(basic::Reject {
                delivery_tag: 1,
                requeue: true,
            })),
        );
        l.client_method(
            1,
            1,
            &AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                delivery_tag: 3,
                multiple: true,
                requeue: true,
            })),
        );
        assert_eq!(l.unsettled(), 3);
        l.client_method(
            1,
            1,
            &AMQPClass::Basic(basic::AMQPMethod::Recover(basic::Recover { requeue: true })),
        );
        assert_eq!(l.unsettled(), 0);
        deliver(&mut l, 1, "c", 7, None);
        l.server_method(
            1,
            1,
            &AMQPClass::Channel(channel::AMQPMethod::Close(Default::default())),
        );
        assert_eq!(l.unsettled(), 0);
        assert_eq!(l.totals().acks, 0);
    }

    #[test]
    fn stream_next_offset_is_highest_acked_plus_one() {
        let mut l = Ledger::new(None);
        let mut args = FieldTable::default();
        args.insert(
            X_STREAM_OFFSET.into(),
            AMQPValue::LongString("first".into()),
        );
        l.client_method(1, 1, &consume("s", "c", args));
        l.server_method(1, 1, &consume_ok("c"));
        let cuts = l.queue_cuts(true);
        assert_eq!(cuts[0].kind, QueueKind::Stream);
        assert_eq!(cuts[0].next_offset, None);
        assert_eq!(cuts[0].offset_spec, Some(OffsetSpec::First));
        for (t, o) in [(1, 10), (2, 11), (3, 12)] {
            deliver(&mut l, 1, "c", t, Some(o));
        }
        l.client_method(1, 1, &ack(2, true));
        let cuts = l.queue_cuts(true);
        assert_eq!(cuts[0].next_offset, Some(12));
        assert_eq!(cuts[0].in_flight, 1);
        assert_eq!(cuts[0].in_doubt[0].stream_offset, Some(12));
        assert_eq!(cuts[0].offset_spec, None);
    }

    #[test]
    fn resume_rewrites_first_consume_then_follows_progress() {
        let cut = Cut {
            schema: CUT_SCHEMA.into(),
            upstream: String::new(),
            captured_at: String::new(),
            captured_at_unix_ms: 0,
            connections: 0,
            queues: vec![QueueCut {
                name: "s".into(),
                kind: QueueKind::Stream,
                next_offset: Some(100),
                offset_spec: None,
                in_flight: 0,
                delivered: 0,
                acked: 0,
                in_doubt: vec![],
            }],
            mirrors: Default::default(),
            quiesce: QuiesceReport::default(),
        };
        let mut l = Ledger::new(Some(&cut));
        let mut args = FieldTable::default();
        args.insert(X_STREAM_OFFSET.into(), AMQPValue::LongString("next".into()));
        let rw = l.client_method(1, 1, &consume("s", "c", args.clone()));
        let Some(AMQPClass::Basic(basic::AMQPMethod::Consume(c))) = rw else {
            panic!("not rewritten")
        };
        assert_eq!(
            c.arguments.inner().get(X_STREAM_OFFSET),
            Some(&AMQPValue::LongLongInt(100))
        );
        // classic queues and other queues are untouched
        assert!(l
            .client_method(1, 1, &consume("other", "c3", args.clone()))
            .is_none());
        l.server_method(1, 1, &consume_ok("c"));
        deliver(&mut l, 1, "c", 1, Some(100));
        deliver(&mut l, 1, "c", 2, Some(101));
        l.client_method(1, 1, &ack(2, true));
        // a later "next" re-consume continues from the ledger's progress
        let rw = l.client_method(2, 1, &consume("s", "c2", args));
        let Some(AMQPClass::Basic(basic::AMQPMethod::Consume(c))) = rw else {
            panic!("not rewritten")
        };
        assert_eq!(
            c.arguments.inner().get(X_STREAM_OFFSET),
            Some(&AMQPValue::LongLongInt(102))
        );
        // an explicit position on a later consume is left alone
        let mut first = FieldTable::default();
        first.insert(
            X_STREAM_OFFSET.into(),
            AMQPValue::LongString("first".into()),
        );
        assert!(l.client_method(3, 1, &consume("s", "c3", first)).is_none());
        // the cut carries over when nothing new was acked
        let cut2 = Ledger::new(Some(&cut)).queue_cuts(false);
        assert_eq!(cut2[0].next_offset, Some(100));
    }

    #[test]
    fn confirms_and_publishes() {
        let mut l = Ledger::new(None);
        l.client_method(
            1,
            1,
            &AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
                nowait: false,
            })),
        );
        for _ in 0..3 {
            l.client_method(
                1,
                1,
                &AMQPClass::Basic(basic::AMQPMethod::Publish(Default::default())),
            );
        }
        l.server_method(1, 1, &ack(3, true));
        assert_eq!(l.publish_counts(1, 1), (3, 1, true));
        assert_eq!(l.unsettled(), 0);
    }

    #[test]
    fn suppressed_publishes_take_app_confirm_tags() {
        let publish = AMQPClass::Basic(basic::AMQPMethod::Publish(Default::default()));
        let select = AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
            nowait: false,
        }));
        let mut l = Ledger::new(None);
        // before confirm.select: dropped without a tag
        assert_eq!(l.suppressed_publish(1, 1), None);
        l.client_method(1, 1, &select);
        assert_eq!(l.suppressed_publish(1, 1), Some(1));
        assert_eq!(l.suppressed_publish(1, 1), Some(2));
        l.client_method(1, 1, &publish);
        l.client_method(1, 1, &publish);
        // another channel: its own sequence, nothing dropped
        l.client_method(1, 2, &select);
        l.client_method(1, 2, &publish);
        assert_eq!((l.confirm_shift(1, 1), l.confirm_shift(1, 2)), (2, 0));
        assert_eq!(l.publish_counts(1, 1), (2, 0, true));
        assert_eq!(l.totals().publishes, 3);
        // the broker's tag 1 on channel 1 is the app's 3rd publish
        let shifted = crate::fence::shift_confirm(&ack(1, false), l.confirm_shift(1, 1));
        assert_eq!(shifted, Some(ack(3, false)));
        // a closed and reopened channel starts over
        l.client_method(
            1,
            1,
            &AMQPClass::Channel(channel::AMQPMethod::Close(Default::default())),
        );
        assert_eq!(l.confirm_shift(1, 1), 0);
        assert_eq!(l.suppressed_publish(1, 1), None);
    }
}
