//! The MS2M fence: the source's publish count after the cut, and the
//! restored tap's suppression of the publishes the source already made.
//!
//! After a leave-running checkpoint the source container keeps running and
//! publishing. When it is finally stopped, [`Tap::fence`](crate::Tap::fence)
//! records how many publishes it forwarded since the checkpoint's cut
//! ([`Fence::publishes_after_cut`]). A restored tap started with
//! [`Resume::suppress_publishes`] = that count drops the restored app's first
//! publishes (it re-processes the messages from the cut on and, being
//! deterministic, re-makes exactly those publishes), so downstream sees each
//! of them once.
//!
//! # Dropping a publish
//!
//! A publish is a basic.publish method frame followed, on the same channel,
//! by a content header and as many body frames as the header's body size
//! needs; frames of other channels may interleave. The proxy keeps, per
//! channel inside a dropped publish, how much content is still due, and drops
//! that channel's frames until the content is complete.
//!
//! # Publisher confirms: the tag translation rule
//!
//! On a channel in confirm mode the app numbers its publishes 1, 2, 3, ...
//! from confirm.select; the broker numbers only the publishes it receives.
//! The tap decides "drop" for the first `P` publishes *in arrival order over
//! all connections* (one global atomic counter, decremented per publish
//! method frame). Once the counter is 0 it stays 0, and each channel's
//! publishes are decided in that channel's order, so **the dropped publishes
//! of a channel are always a prefix of that channel's publishes**: app
//! sequence numbers `1..=D` in confirm mode, where `D` is the number dropped
//! in confirm mode on that channel. `D` is final before the channel forwards
//! its first confirm-mode publish, hence before the broker confirms anything
//! there. So:
//!
//! - each dropped confirm-mode publish is acked to the app as
//!   `basic.ack(delivery_tag = its app seq, multiple = false)` once its
//!   content is complete, and
//! - every broker `basic.ack`/`basic.nack` on the channel with delivery tag
//!   `t > 0` is passed on with tag `t + D` (the `multiple` flag unchanged: a
//!   multiple ack then also covers the dropped tags, which the app has
//!   already seen confirmed; clients ignore confirmed tags in a multiple ack,
//!   lapin does). Tag 0 ("everything") is left alone.
//!
//! The synthetic acks are written to the app before any broker frame read
//! after them, so a single synthetic ack never follows a multiple ack that
//! covers it (lapin treats a single ack of an unknown tag as an error).
//!
//! # Not inside the broker's content
//!
//! A synthetic ack must not land between a content-bearing method from the
//! broker (basic.deliver, basic.get-ok, basic.return) and the end of its
//! content on the same channel: AMQP forbids any other frame there and
//! clients drop the connection. `ContentGate` follows the broker's content
//! per channel and defers the tap's frames for a channel that is inside one
//! until its last content frame has been passed on. The ordering rule above
//! still holds: the broker cannot send a confirm on that channel before the
//! content is complete either, and the deferred frames go right after the
//! completing frame.

use amq_protocol::protocol::{basic, AMQPClass};
use serde::{Deserialize, Serialize};

use crate::cut::{Cut, QueueCut, QuiesceReport};
use crate::TapError;

/// Schema tag of [`Fence`].
pub const FENCE_SCHEMA: &str = "ms2m.fence/v1";

/// What the source tap records when the source container is stopped after
/// a leave-running checkpoint: how many publishes it forwarded since the
/// checkpoint's cut.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Fence {
    /// Always [`FENCE_SCHEMA`].
    pub schema: String,
    /// When the fence was taken, RFC 3339 UTC.
    pub taken_at: String,
    /// When the fence was taken, milliseconds since the Unix epoch.
    pub taken_at_unix_ms: u64,
    /// basic.publish commands the tap forwarded upstream since the last cut
    /// it captured (all connections and channels); 0 when it captured none.
    pub publishes_after_cut: u64,
    /// [`Cut::captured_at_unix_ms`] of the last cut this tap captured, so a
    /// restore can check that the fence belongs to the checkpoint it
    /// restores ([`Fence::belongs_to`]). `None`: the tap captured no cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut_taken_at_unix_ms: Option<u64>,
    /// How the quiesce before the fence went. When it is not complete, the
    /// app may still publish for deliveries it had in hand, and those
    /// publishes are not in [`Fence::publishes_after_cut`].
    pub quiesce: QuiesceReport,
    /// Per-queue position at the fence (as in a cut), for the record.
    pub queues: Vec<QueueCut>,
}

impl Fence {
    /// True when this fence counts publishes since `cut` (the fence's tap
    /// captured `cut` last before the fence).
    pub fn belongs_to(&self, cut: &Cut) -> bool {
        self.cut_taken_at_unix_ms == Some(cut.captured_at_unix_ms)
    }
}

/// How a tap starts after a restore: see [`Tap::start_with`](crate::Tap::start_with).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resume {
    /// Rewrite the first basic.consume on each stream queue of the cut to
    /// start at the cut (as [`Tap::start`](crate::Tap::start)'s `resume`).
    pub cut: Option<Cut>,
    /// Drop the first this many basic.publish commands from the app, counted
    /// over all connections in arrival order (confirm-mode publishes are
    /// acked to the app by the tap). Normally
    /// [`Fence::publishes_after_cut`] of the source's fence.
    pub suppress_publishes: u64,
    /// The restore is the shadow of a live migration: replay behind the
    /// source, suppress every publish until the source's fence, then go
    /// live (see [`crate::migration`]). Overrides `suppress_publishes`.
    pub shadow: Option<crate::ticket::Shadow>,
}

impl Resume {
    /// Resume at `cut`, suppressing nothing.
    pub fn from_cut(cut: Option<Cut>) -> Resume {
        Resume {
            cut,
            suppress_publishes: 0,
            shadow: None,
        }
    }

    /// Resume at `cut` and suppress the publishes the source made after it,
    /// as counted by `fence`. Fails when the fence does not belong to the cut
    /// (another checkpoint's fence) or has an unknown schema.
    pub fn after_fence(cut: Cut, fence: &Fence) -> Result<Resume, TapError> {
        if fence.schema != FENCE_SCHEMA {
            return Err(TapError::Config(format!(
                "fence schema {:?} is not {FENCE_SCHEMA:?}",
                fence.schema
            )));
        }
        if !fence.belongs_to(&cut) {
            return Err(TapError::Config(format!(
                "the fence (taken at {}, counting since the cut of {:?} ms) does not belong \
                 to the cut captured at {} ({} ms)",
                fence.taken_at,
                fence.cut_taken_at_unix_ms,
                cut.captured_at,
                cut.captured_at_unix_ms
            )));
        }
        Ok(Resume {
            suppress_publishes: fence.publishes_after_cut,
            cut: Some(cut),
            shadow: None,
        })
    }
}

/// Where a dropped publish's content stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ContentDrop {
    /// Body bytes still to come; `None` until the content header arrived.
    body_left: Option<u64>,
    /// The app's confirm sequence number of the publish, when its channel is
    /// in confirm mode (the tap acks it when the content is complete).
    pub ack_tag: Option<u64>,
}

/// Result of feeding a frame to a [`ContentDrop`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DropStep {
    /// More content frames are due.
    More,
    /// The publish is complete (the frame just fed was its last).
    Done,
}

impl ContentDrop {
    /// A dropped publish whose method frame was just seen.
    pub fn new(ack_tag: Option<u64>) -> ContentDrop {
        ContentDrop {
            body_left: None,
            ack_tag,
        }
    }

    /// Feed the next frame of the channel (`kind` is the frame type octet,
    /// `payload` the frame payload). Errors name the protocol violation.
    pub fn feed(&mut self, kind: u8, payload: &[u8]) -> Result<DropStep, &'static str> {
        use crate::codec::{FRAME_BODY, FRAME_HEADER};
        match (kind, self.body_left) {
            (FRAME_HEADER, None) => {
                let size = payload
                    .get(4..12)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes)
                    .ok_or("short content header in a suppressed publish")?;
                self.body_left = Some(size);
                Ok(if size == 0 {
                    DropStep::Done
                } else {
                    DropStep::More
                })
            }
            (FRAME_HEADER, Some(_)) => Err("second content header in a suppressed publish"),
            (FRAME_BODY, None) => {
                Err("body frame before the content header of a suppressed publish")
            }
            (FRAME_BODY, Some(left)) => {
                let n = payload.len() as u64;
                if n > left {
                    return Err("body frames exceed the declared size of a suppressed publish");
                }
                self.body_left = Some(left - n);
                Ok(if left == n {
                    DropStep::Done
                } else {
                    DropStep::More
                })
            }
            _ => Err("method frame inside the content of a suppressed publish"),
        }
    }
}

/// A publisher confirm from the broker (basic.ack/basic.nack) with its
/// delivery tag moved up by `shift` (the confirm-mode publishes the tap
/// dropped on that channel); `None` when nothing changes.
pub(crate) fn shift_confirm(m: &AMQPClass, shift: u64) -> Option<AMQPClass> {
    if shift == 0 {
        return None;
    }
    match m {
        AMQPClass::Basic(basic::AMQPMethod::Ack(a)) if a.delivery_tag > 0 => {
            Some(AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: a.delivery_tag.saturating_add(shift),
                multiple: a.multiple,
            })))
        }
        AMQPClass::Basic(basic::AMQPMethod::Nack(n)) if n.delivery_tag > 0 => {
            Some(AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                delivery_tag: n.delivery_tag.saturating_add(shift),
                multiple: n.multiple,
                requeue: n.requeue,
            })))
        }
        _ => None,
    }
}

/// The basic.ack the tap sends the app for a dropped confirm-mode publish.
pub(crate) fn synthetic_ack(tag: u64) -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
        delivery_tag: tag,
        multiple: false,
    }))
}

/// Where the broker's content on one channel stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Content {
    /// A content-bearing method was seen; its header is due.
    AwaitHeader,
    /// This many body bytes are still due (never 0).
    Body(u64),
}

/// The broker's content stream per channel (broker → client), and the
/// tap's own frames deferred while a channel is inside a content
/// (see [the module docs](self#not-inside-the-brokers-content)).
///
/// Fed every broker frame in order ([`ContentGate::feed`]); the tap's frames
/// are offered before they are written ([`ContentGate::offer`]). Only the
/// frame type, channel, method ids and a header's body size are read.
#[derive(Debug)]
pub(crate) struct ContentGate<T> {
    state: std::collections::HashMap<u16, Content>,
    deferred: std::collections::HashMap<u16, Vec<T>>,
}

impl<T> Default for ContentGate<T> {
    fn default() -> Self {
        ContentGate {
            state: Default::default(),
            deferred: Default::default(),
        }
    }
}

impl<T> ContentGate<T> {
    /// True while channel `ch` is between a content-bearing method and the
    /// end of its content.
    pub fn mid_content(&self, ch: u16) -> bool {
        self.state.contains_key(&ch)
    }

    /// A frame of the tap's own for channel `ch`: given back when it can be
    /// written now, else kept until the channel's content is complete (then
    /// [`ContentGate::feed`] returns it, in offer order).
    pub fn offer(&mut self, ch: u16, frame: T) -> Option<T> {
        if self.mid_content(ch) {
            self.deferred.entry(ch).or_default().push(frame);
            None
        } else {
            Some(frame)
        }
    }

    /// Feed the next broker frame (`kind` the frame type octet, `payload`
    /// its payload). Returns the deferred frames of `ch` that are due right
    /// after this frame (it completed a content), in offer order; usually
    /// none. A channel.close or close-ok drops the channel's state and its
    /// deferred frames.
    pub fn feed(&mut self, ch: u16, kind: u8, payload: &[u8]) -> Vec<T> {
        use crate::codec::{FRAME_BODY, FRAME_HEADER, FRAME_METHOD};
        let complete = match (kind, self.state.get(&ch).copied()) {
            (FRAME_METHOD, _) => {
                let ids = payload.get(..4).map(|b| {
                    (
                        u16::from_be_bytes([b[0], b[1]]),
                        u16::from_be_bytes([b[2], b[3]]),
                    )
                });
                match ids {
                    // basic.return, basic.deliver, basic.get-ok; and
                    // basic.publish (the client's direction)
                    Some((60, 40 | 50 | 60 | 71)) => {
                        self.state.insert(ch, Content::AwaitHeader);
                        false
                    }
                    // channel.close, channel.close-ok
                    Some((20, 40 | 41)) => {
                        self.state.remove(&ch);
                        self.deferred.remove(&ch);
                        false
                    }
                    // Any other method ends a content (only a broker
                    // breaking the protocol sends one inside a content).
                    _ => self.state.remove(&ch).is_some(),
                }
            }
            (FRAME_HEADER, Some(Content::AwaitHeader)) => {
                let size = payload
                    .get(4..12)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes)
                    .unwrap_or(0);
                if size == 0 {
                    self.state.remove(&ch);
                    true
                } else {
                    self.state.insert(ch, Content::Body(size));
                    false
                }
            }
            (FRAME_BODY, Some(Content::Body(left))) => {
                let left = left.saturating_sub(payload.len() as u64);
                if left == 0 {
                    self.state.remove(&ch);
                    true
                } else {
                    self.state.insert(ch, Content::Body(left));
                    false
                }
            }
            // A header or body outside a content (or a second header):
            // not the gate's business.
            _ => false,
        };
        if complete {
            self.deferred.remove(&ch).unwrap_or_default()
        } else {
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{FRAME_BODY, FRAME_HEADER, FRAME_METHOD};
    use crate::cut::{rfc3339_utc, QueueKind, CUT_SCHEMA};

    fn header(size: u64) -> Vec<u8> {
        let mut p = vec![0, 60, 0, 0];
        p.extend_from_slice(&size.to_be_bytes());
        p.extend_from_slice(&[0, 0]); // no properties
        p
    }

    #[test]
    fn content_drop_follows_the_declared_size() {
        let mut d = ContentDrop::new(Some(3));
        assert_eq!(d.feed(FRAME_HEADER, &header(10)), Ok(DropStep::More));
        assert_eq!(d.feed(FRAME_BODY, &[0; 4]), Ok(DropStep::More));
        assert_eq!(d.feed(FRAME_BODY, &[0; 6]), Ok(DropStep::Done));
        assert_eq!(d.ack_tag, Some(3));
        // an empty body is complete at the header
        let mut d = ContentDrop::new(None);
        assert_eq!(d.feed(FRAME_HEADER, &header(0)), Ok(DropStep::Done));
        // violations
        let mut d = ContentDrop::new(None);
        assert!(d.feed(FRAME_BODY, &[0; 1]).is_err());
        assert!(d.feed(FRAME_HEADER, &[0; 5]).is_err());
        assert!(d.feed(FRAME_METHOD, &[0; 4]).is_err());
        let mut d = ContentDrop::new(None);
        d.feed(FRAME_HEADER, &header(2)).unwrap();
        assert!(d.feed(FRAME_BODY, &[0; 3]).is_err());
        assert!(d.feed(FRAME_HEADER, &header(2)).is_err());
    }

    fn method(class: u16, id: u16) -> Vec<u8> {
        let mut p = class.to_be_bytes().to_vec();
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&[0; 8]);
        p
    }

    const DELIVER: (u16, u16) = (60, 60);
    const GET_OK: (u16, u16) = (60, 71);
    const RETURN: (u16, u16) = (60, 50);

    #[test]
    fn gate_deliver_with_empty_body_completes_at_the_header() {
        let mut g = ContentGate::default();
        assert_eq!(g.offer(1, "before"), Some("before"));
        assert!(g
            .feed(1, FRAME_METHOD, &method(DELIVER.0, DELIVER.1))
            .is_empty());
        assert!(g.mid_content(1));
        assert_eq!(g.offer(1, "a"), None);
        assert_eq!(g.offer(1, "b"), None);
        assert_eq!(g.feed(1, FRAME_HEADER, &header(0)), vec!["a", "b"]);
        assert!(!g.mid_content(1));
        assert_eq!(g.offer(1, "after"), Some("after"));
    }

    #[test]
    fn gate_header_and_bodies_summing_to_the_size_complete() {
        for (class, id) in [DELIVER, GET_OK, RETURN] {
            let mut g = ContentGate::default();
            assert!(g.feed(3, FRAME_METHOD, &method(class, id)).is_empty());
            assert_eq!(g.offer(3, 1), None);
            assert!(g.feed(3, FRAME_HEADER, &header(10)).is_empty());
            assert_eq!(g.offer(3, 2), None);
            assert!(g.feed(3, FRAME_BODY, &[0; 4]).is_empty());
            assert!(g.mid_content(3));
            assert!(g.feed(3, FRAME_BODY, &[0; 5]).is_empty());
            assert_eq!(g.offer(3, 3), None);
            assert_eq!(g.feed(3, FRAME_BODY, &[0; 1]), vec![1, 2, 3]);
            assert!(!g.mid_content(3));
            // nothing left deferred
            assert!(g.feed(3, FRAME_METHOD, &method(60, 80)).is_empty());
        }
    }

    #[test]
    fn gate_channels_are_independent() {
        let mut g = ContentGate::default();
        g.feed(1, FRAME_METHOD, &method(DELIVER.0, DELIVER.1));
        assert_eq!(g.offer(1, "one"), None);
        assert_eq!(g.offer(2, "two"), Some("two"));
        // another channel's content does not move channel 1's
        g.feed(2, FRAME_METHOD, &method(DELIVER.0, DELIVER.1));
        assert!(g.feed(2, FRAME_HEADER, &header(0)).is_empty());
        assert!(g.feed(0, FRAME_METHOD, &method(10, 50)).is_empty());
        assert!(g.feed(2, FRAME_BODY, &[0; 3]).is_empty());
        assert!(g.mid_content(1) && !g.mid_content(2));
        assert!(g.feed(1, FRAME_HEADER, &header(2)).is_empty());
        g.feed(2, FRAME_METHOD, &method(GET_OK.0, GET_OK.1));
        assert!(g.feed(2, FRAME_HEADER, &header(5)).is_empty());
        assert_eq!(g.feed(1, FRAME_BODY, &[0; 2]), vec!["one"]);
        assert!(g.mid_content(2));
    }

    #[test]
    fn gate_ignores_content_frames_outside_a_content() {
        let mut g = ContentGate::default();
        // a header without a content method before it
        assert!(g.feed(1, FRAME_HEADER, &header(10)).is_empty());
        assert!(!g.mid_content(1));
        assert!(g.feed(1, FRAME_BODY, &[0; 10]).is_empty());
        assert_eq!(g.offer(1, 7), Some(7));
        // a second header inside a body does not restart it
        g.feed(1, FRAME_METHOD, &method(DELIVER.0, DELIVER.1));
        g.feed(1, FRAME_HEADER, &header(4));
        g.feed(1, FRAME_HEADER, &header(100));
        assert_eq!(g.offer(1, 8), None);
        assert_eq!(g.feed(1, FRAME_BODY, &[0; 4]), vec![8]);
        // heartbeats change nothing
        g.feed(1, FRAME_METHOD, &method(DELIVER.0, DELIVER.1));
        g.feed(0, crate::codec::FRAME_HEARTBEAT, &[]);
        assert!(g.mid_content(1));
    }

    #[test]
    fn gate_channel_close_drops_state_and_deferred() {
        for close in [40, 41] {
            let mut g = ContentGate::default();
            g.feed(1, FRAME_METHOD, &method(DELIVER.0, DELIVER.1));
            g.feed(1, FRAME_HEADER, &header(10));
            assert_eq!(g.offer(1, "lost"), None);
            assert!(g.feed(1, FRAME_METHOD, &method(20, close)).is_empty());
            assert!(!g.mid_content(1));
            // a new content on the reopened channel releases nothing old
            g.feed(1, FRAME_METHOD, &method(DELIVER.0, DELIVER.1));
            assert!(g.feed(1, FRAME_HEADER, &header(0)).is_empty());
        }
    }

    #[test]
    fn gate_method_inside_a_content_ends_it() {
        let mut g = ContentGate::default();
        g.feed(1, FRAME_METHOD, &method(DELIVER.0, DELIVER.1));
        g.feed(1, FRAME_HEADER, &header(10));
        assert_eq!(g.offer(1, 1), None);
        assert_eq!(g.feed(1, FRAME_METHOD, &method(60, 80)), vec![1]);
        assert!(!g.mid_content(1));
        // a short header completes rather than wedging the channel
        g.feed(1, FRAME_METHOD, &method(DELIVER.0, DELIVER.1));
        assert_eq!(g.offer(1, 2), None);
        assert_eq!(g.feed(1, FRAME_HEADER, &[0, 60]), vec![2]);
    }

    #[test]
    fn confirms_shift_keeps_multiple_and_tag_zero() {
        let ack = |t, m| {
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: t,
                multiple: m,
            }))
        };
        assert_eq!(shift_confirm(&ack(1, false), 0), None);
        assert_eq!(shift_confirm(&ack(1, false), 3), Some(ack(4, false)));
        assert_eq!(shift_confirm(&ack(2, true), 3), Some(ack(5, true)));
        assert_eq!(shift_confirm(&ack(0, true), 3), None);
        let nack = AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
            delivery_tag: 7,
            multiple: true,
            requeue: false,
        }));
        let Some(AMQPClass::Basic(basic::AMQPMethod::Nack(n))) = shift_confirm(&nack, 2) else {
            panic!("nack not shifted")
        };
        assert_eq!((n.delivery_tag, n.multiple, n.requeue), (9, true, false));
        let other = AMQPClass::Basic(basic::AMQPMethod::Qos(Default::default()));
        assert_eq!(shift_confirm(&other, 2), None);
    }

    fn cut(at: u64) -> Cut {
        Cut {
            schema: CUT_SCHEMA.into(),
            upstream: "amqp://127.0.0.1:5672/%2f".into(),
            captured_at: rfc3339_utc(at),
            captured_at_unix_ms: at,
            connections: 1,
            queues: vec![],
            mirrors: Default::default(),
            quiesce: QuiesceReport::default(),
        }
    }

    #[test]
    fn fence_json_and_resume_check() {
        let fence = Fence {
            schema: FENCE_SCHEMA.into(),
            taken_at: rfc3339_utc(2_000),
            taken_at_unix_ms: 2_000,
            publishes_after_cut: 7,
            cut_taken_at_unix_ms: Some(1_000),
            quiesce: QuiesceReport {
                complete: true,
                waited_ms: 1,
                timeout_ms: 100,
                unsettled: 0,
            },
            queues: vec![QueueCut {
                name: "s".into(),
                kind: QueueKind::Stream,
                next_offset: Some(9),
                offset_spec: None,
                in_flight: 0,
                delivered: 9,
                acked: 9,
                in_doubt: vec![],
            }],
        };
        let json = serde_json::to_string(&fence).unwrap();
        assert!(json.contains("\"schema\":\"ms2m.fence/v1\""));
        assert!(json.contains("\"publishes_after_cut\":7"));
        let back: Fence = serde_json::from_str(&json).unwrap();
        assert_eq!(back, fence);
        let r = Resume::after_fence(cut(1_000), &fence).unwrap();
        assert_eq!(r.suppress_publishes, 7);
        assert_eq!(r.cut, Some(cut(1_000)));
        assert!(Resume::after_fence(cut(999), &fence).is_err());
        let mut other = fence.clone();
        other.cut_taken_at_unix_ms = None;
        assert!(Resume::after_fence(cut(1_000), &other).is_err());
        assert_eq!(Resume::from_cut(None), Resume::default());
    }
}
