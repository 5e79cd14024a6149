//! The broker cut: the `broker` section of the checkpoint manifest.
//!
//! It records, for every queue the container consumed from, where the
//! container's state stands: for a stream the next offset to deliver, for a
//! classic queue whether anything was in flight. It never holds credentials.

use serde::{Deserialize, Serialize};

/// Schema tag of [`Cut`].
pub const CUT_SCHEMA: &str = "ms2m.broker-cut/v1";

/// Broker position captured while the container is frozen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cut {
    /// Always [`CUT_SCHEMA`].
    pub schema: String,
    /// Upstream broker as `amqp://host:port/vhost`, never with credentials.
    pub upstream: String,
    /// Capture time, RFC 3339 UTC.
    pub captured_at: String,
    /// Capture time, milliseconds since the Unix epoch.
    pub captured_at_unix_ms: u64,
    /// Client connections open through the tap at capture time.
    pub connections: usize,
    /// One entry per queue the container consumed from (basic.consume or
    /// basic.get), sorted by name.
    pub queues: Vec<QueueCut>,
    /// How the quiesce before the capture went.
    pub quiesce: QuiesceReport,
    /// Classic queues whose messages settled after this cut are copied to a
    /// mirror stream (queue → stream; see [`crate::mirror`]): a restore
    /// replays the stream before consuming the queue. Empty when nothing is
    /// mirrored.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub mirrors: std::collections::BTreeMap<String, String>,
}

/// The largest stream offset a cut may name: `x-stream-offset` is an AMQP
/// signed long, so a larger one cannot be asked of the broker.
pub const MAX_STREAM_OFFSET: u64 = i64::MAX as u64;

impl Cut {
    /// Checks what deserializing cannot: the schema, each queue named once,
    /// and every stream position one the broker can be asked for. A cut
    /// that fails is refused at restore rather than resumed somewhere else
    /// (a clamped or duplicated position would lose or repeat messages).
    pub fn validate(&self) -> Result<(), String> {
        if self.schema != CUT_SCHEMA {
            return Err(format!("schema {:?} is not {CUT_SCHEMA:?}", self.schema));
        }
        let mut seen = std::collections::BTreeSet::new();
        for q in &self.queues {
            if !seen.insert(q.name.as_str()) {
                return Err(format!("queue {:?} is listed twice", q.name));
            }
            let offset = match (&q.next_offset, &q.offset_spec) {
                (Some(n), _) => Some(*n),
                (None, Some(OffsetSpec::Offset(o) | OffsetSpec::Timestamp(o))) => Some(*o),
                _ => None,
            };
            if let Some(o) = offset.filter(|o| *o > MAX_STREAM_OFFSET) {
                return Err(format!(
                    "queue {:?}: stream position {o} is above {MAX_STREAM_OFFSET}, \
                     the largest x-stream-offset there is",
                    q.name
                ));
            }
        }
        Ok(())
    }
}

/// Queue type as far as the tap could tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueKind {
    /// A RabbitMQ stream (declared with `x-queue-type=stream`, consumed with
    /// `x-stream-offset`, or delivering `x-stream-offset` headers).
    Stream,
    /// Anything else (classic or quorum queue): the broker redelivers what
    /// was not acked.
    Classic,
}

/// A stream offset specification as used by `x-stream-offset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OffsetSpec {
    /// `"first"`
    First,
    /// `"last"`
    Last,
    /// `"next"`
    Next,
    /// An absolute offset.
    Offset(u64),
    /// A timestamp (seconds since the epoch).
    Timestamp(u64),
    /// Any other string (an interval such as `"1D"`).
    Interval(String),
}

/// The cut of one queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueCut {
    /// Queue name.
    pub name: String,
    /// Stream or classic.
    pub kind: QueueKind,
    /// Streams: highest acked offset + 1 (the first offset the container's
    /// state does not contain). `None` when nothing was ever acked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_offset: Option<u64>,
    /// Streams with no `next_offset`: the offset specification of the
    /// consumer (what a resumed consumer should start from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset_spec: Option<OffsetSpec>,
    /// Deliveries handed to the container and not yet acked/nacked/rejected
    /// at capture time (0 when the quiesce completed).
    pub in_flight: u64,
    /// Deliveries handed to the container since the tap started.
    pub delivered: u64,
    /// Deliveries acked by the container since the tap started.
    pub acked: u64,
    /// The unsettled deliveries when the quiesce timed out: the container may
    /// or may not have processed them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub in_doubt: Vec<InDoubt>,
}

/// A delivery whose fate is unknown at capture time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InDoubt {
    /// Channel number on the client connection.
    pub channel: u16,
    /// Delivery tag.
    pub delivery_tag: u64,
    /// Consumer tag (`None` for basic.get).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_tag: Option<String>,
    /// The redelivered flag of the delivery.
    pub redelivered: bool,
    /// `x-stream-offset` header, for stream deliveries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_offset: Option<u64>,
    /// The message-id property, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
}

/// Outcome of a quiesce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct QuiesceReport {
    /// True when every delivered message was settled before the timeout.
    pub complete: bool,
    /// How long the quiesce waited.
    pub waited_ms: u64,
    /// The bound it was given.
    pub timeout_ms: u64,
    /// Deliveries unsettled when the quiesce ended.
    pub unsettled: u64,
}

/// RFC 3339 UTC rendering of a Unix time in milliseconds.
pub fn rfc3339_utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let ms = unix_ms % 1000;
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil-from-days (proleptic Gregorian), Howard Hinnant's algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_utc(1_709_210_096_123), "2024-02-29T12:34:56.123Z");
    }

    #[test]
    fn validate_refuses_positions_the_broker_cannot_take() {
        let mut cut = sample();
        assert_eq!(cut.validate(), Ok(()));
        cut.queues[0].next_offset = Some(MAX_STREAM_OFFSET);
        assert_eq!(cut.validate(), Ok(()));
        cut.queues[0].next_offset = Some(MAX_STREAM_OFFSET + 1);
        let e = cut.validate().unwrap_err();
        assert!(
            e.contains("9223372036854775808") && e.contains("\"s\""),
            "{e}"
        );
        cut.queues[0].next_offset = None;
        cut.queues[0].offset_spec = Some(OffsetSpec::Offset(u64::MAX));
        assert!(cut.validate().is_err());
        cut.queues[0].offset_spec = Some(OffsetSpec::Next);
        assert_eq!(cut.validate(), Ok(()));
        let mut twice = sample();
        twice.queues.push(twice.queues[0].clone());
        assert!(twice.validate().unwrap_err().contains("listed twice"));
        let mut other = sample();
        other.schema = "ms2m.broker-cut/v9".into();
        assert!(other.validate().unwrap_err().contains("v9"));
    }

    fn sample() -> Cut {
        Cut {
            schema: CUT_SCHEMA.into(),
            upstream: "amqp://127.0.0.1:5672/%2f".into(),
            captured_at: rfc3339_utc(1),
            captured_at_unix_ms: 1,
            connections: 1,
            queues: vec![QueueCut {
                name: "s".into(),
                kind: QueueKind::Stream,
                next_offset: Some(42),
                offset_spec: None,
                in_flight: 0,
                delivered: 42,
                acked: 42,
                in_doubt: vec![],
            }],
            mirrors: Default::default(),
            quiesce: QuiesceReport {
                complete: true,
                waited_ms: 3,
                timeout_ms: 1000,
                unsettled: 0,
            },
        }
    }

    #[test]
    fn cut_json_roundtrip() {
        let cut = sample();
        let json = serde_json::to_string(&cut).unwrap();
        assert!(json.contains("\"kind\":\"stream\""));
        assert!(json.contains("\"next_offset\":42"));
        let back: Cut = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cut);
        let spec = serde_json::to_string(&OffsetSpec::Next).unwrap();
        assert_eq!(spec, "\"next\"");
    }
}
