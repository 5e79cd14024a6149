//! Fuzz targets for the JSON the tap's restore path reads from a checkpoint
//! directory (issue 9, bad input): the broker cut (the manifest's `broker`
//! section), the fence (`ms2m-fence.json`) and the migration ticket
//! (`ms2m-migration.json`); and for the ledger that turns the app's and the
//! broker's methods into a cut. bolero `check!()`s run as ordinary `cargo
//! test`s (knobs: see `tests/fuzz_frames.rs`).
//!
//! For any JSON: a value or an error, never a panic; what is accepted
//! round-trips and starts a ledger; a fence is only taken for its own cut;
//! a ticket that validates names a room and a directory safely.

#[path = "../../criu-bridge/tests/support/json_fuzz.rs"]
mod json_fuzz;

use amq_protocol::protocol::{basic, channel, confirm, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable};
use bolero::{check, TypeGenerator};
use json_fuzz::{mutate, prefixes, Edit};
use ms2m_tap::cut::CUT_SCHEMA;
use ms2m_tap::ledger::{int_of, Ledger, X_STREAM_OFFSET};
use ms2m_tap::{Cut, Fence, QueueKind, Resume, Ticket};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

fn cut_sample() -> Value {
    json!({
        "schema": CUT_SCHEMA,
        "upstream": "amqp://127.0.0.1:5672/%2f",
        "captured_at": "2026-11-28T02:47:14.750Z",
        "captured_at_unix_ms": 1795834034750u64,
        "connections": 1,
        "queues": [
            {"name": "orders", "kind": "stream", "next_offset": 314, "in_flight": 1,
             "delivered": 315, "acked": 314,
             "in_doubt": [{"channel": 1, "delivery_tag": 315, "consumer_tag": "c",
                           "redelivered": false, "stream_offset": 314, "message_id": "315"}]},
            {"name": "tail", "kind": "stream", "offset_spec": {"interval": "1D"},
             "in_flight": 0, "delivered": 0, "acked": 0},
            {"name": "jobs", "kind": "classic", "in_flight": 0, "delivered": 9, "acked": 9}
        ],
        "quiesce": {"complete": false, "waited_ms": 301, "timeout_ms": 300, "unsettled": 1},
        "mirrors": {"jobs": "ms2m.mirror.ck-consumer1-1796598020627.jobs"}
    })
}

fn fence_sample() -> Value {
    json!({
        "schema": ms2m_tap::FENCE_SCHEMA,
        "taken_at": "2026-11-28T02:47:15.750Z",
        "taken_at_unix_ms": 1795834035750u64,
        "publishes_after_cut": 275,
        "cut_taken_at_unix_ms": 1795834034750u64,
        "quiesce": {"complete": true, "waited_ms": 3, "timeout_ms": 2000, "unsettled": 0},
        "queues": [{"name": "orders", "kind": "stream", "next_offset": 589,
                    "in_flight": 0, "delivered": 589, "acked": 589}]
    })
}

fn ticket_sample() -> Value {
    let mut t = Ticket::new("consumer1-1795834034750", "consumer1", 1795834034750);
    t.mirrors.insert(
        "jobs".into(),
        "ms2m.mirror.consumer1-1795834034750.jobs".into(),
    );
    serde_json::to_value(&t).expect("a ticket encodes")
}

/// Parses `bytes` as a `T`; an accepted value must encode and read back
/// equal. Truncations of what it accepted are refused.
fn parse<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(bytes: &[u8]) -> Option<T> {
    let v: T = serde_json::from_slice(bytes).ok()?;
    let again = serde_json::to_vec(&v).expect("an accepted value encodes");
    assert_eq!(serde_json::from_slice::<T>(&again).ok().as_ref(), Some(&v));
    Some(v)
}

/// What the shim does with an accepted cut at restore: a ledger resumed
/// there, and the app's first consume of each stream rewritten to the cut.
fn restore_with(cut: &Cut) {
    let mut ledger = Ledger::new(Some(cut));
    for (i, q) in cut.queues.iter().enumerate() {
        let consume = AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: q.name.as_str().into(),
            consumer_tag: format!("c{i}").into(),
            ..Default::default()
        }));
        let rewritten = ledger.client_method(1, 1, &consume);
        if let (QueueKind::Stream, Some(next), false) =
            (q.kind, q.next_offset, cut.mirrors.contains_key(&q.name))
        {
            // Cuts reach the ledger only once validated (the shim refuses
            // the rest at restore): each queue once, offsets the broker can
            // take (found by this target: they used to be clamped).
            if cut.validate().is_ok() {
                let Some(AMQPClass::Basic(basic::AMQPMethod::Consume(c))) = rewritten else {
                    panic!("stream consume of {:?} not resumed at {next}", q.name)
                };
                let at = c.arguments.inner().get(X_STREAM_OFFSET).cloned();
                assert_eq!(
                    at.as_ref().and_then(int_of),
                    Some(next),
                    "resumed at {at:?}, not {next}"
                );
            }
        }
    }
    let _ = ledger.queue_cuts(true);
}

/// Broker cuts: arbitrary bytes, and a real cut with random edits. An
/// accepted cut round-trips and a ledger resumes from it; a truncated one
/// is refused.
#[test]
fn cut_from_any_json() {
    let doc = cut_sample();
    check!()
        .with_type::<(Vec<u8>, Vec<Edit>)>()
        .for_each(|(raw, edits)| {
            if let Some(cut) = parse::<Cut>(raw) {
                restore_with(&cut);
            }
            let bytes = serde_json::to_vec(&mutate(doc.clone(), edits)).expect("encodes");
            if let Some(cut) = parse::<Cut>(&bytes) {
                restore_with(&cut);
                for p in prefixes(&bytes, 3) {
                    assert!(
                        serde_json::from_slice::<Cut>(p).is_err(),
                        "a truncated cut was accepted"
                    );
                }
            }
        });
}

/// Fences: an accepted fence only resumes its own cut, with its count.
#[test]
fn fence_from_any_json() {
    let doc = fence_sample();
    let cut: Cut = serde_json::from_value(cut_sample()).expect("the sample cut parses");
    check!()
        .with_type::<(Vec<u8>, Vec<Edit>)>()
        .for_each(|(raw, edits)| {
            let bytes = serde_json::to_vec(&mutate(doc.clone(), edits)).expect("encodes");
            for fence in [parse::<Fence>(raw), parse::<Fence>(&bytes)]
                .into_iter()
                .flatten()
            {
                match Resume::after_fence(cut.clone(), &fence) {
                    Ok(r) => {
                        assert!(fence.belongs_to(&cut));
                        assert_eq!(fence.schema, ms2m_tap::FENCE_SCHEMA);
                        assert_eq!(r.suppress_publishes, fence.publishes_after_cut);
                        assert_eq!(r.cut.as_ref(), Some(&cut));
                    }
                    Err(e) => assert!(!e.to_string().is_empty()),
                }
            }
        });
}

/// Tickets: one that validates names a room and is safe as a directory
/// name on the target (`--dir`/<migration id>).
#[test]
fn ticket_from_any_json() {
    let doc = ticket_sample();
    check!()
        .with_type::<(Vec<u8>, Vec<Edit>, String)>()
        .for_each(|(raw, edits, id)| {
            let mut v = mutate(doc.clone(), edits);
            if let Some(o) = v.as_object_mut().filter(|_| !id.is_empty()) {
                o.insert("migration_id".into(), json!(id));
            }
            let bytes = serde_json::to_vec(&v).expect("encodes");
            for t in [parse::<Ticket>(raw), parse::<Ticket>(&bytes)]
                .into_iter()
                .flatten()
            {
                if t.validate().is_ok() {
                    let id = &t.migration_id;
                    assert!(!id.is_empty() && id.len() <= 128);
                    assert!(
                        !id.contains('/') && !id.starts_with('.'),
                        "unsafe id {id:?}"
                    );
                    assert!(!id.contains('\0'));
                    assert_eq!(t.room(), format!("ms2m.migration.{id}"));
                }
            }
        });
}

/// One step of an app/broker conversation as the ledger sees it. Small
/// channel, tag and queue ranges so that steps meet each other.
#[derive(Debug, TypeGenerator)]
enum Step {
    Consume {
        ch: u8,
        queue: u8,
        tag: u8,
        no_ack: bool,
        offset: Option<i64>,
    },
    ConsumeOk {
        ch: u8,
        tag: u8,
    },
    Deliver {
        ch: u8,
        tag: u8,
        offset: Option<u32>,
    },
    GetThenOk {
        ch: u8,
        queue: u8,
        no_ack: bool,
    },
    Ack {
        ch: u8,
        tag: u8,
        multiple: bool,
    },
    Nack {
        ch: u8,
        tag: u8,
        multiple: bool,
    },
    Reject {
        ch: u8,
        tag: u8,
    },
    Recover {
        ch: u8,
    },
    Cancel {
        ch: u8,
        tag: u8,
        nowait: bool,
    },
    Publish {
        ch: u8,
    },
    ConfirmSelect {
        ch: u8,
    },
    BrokerConfirm {
        ch: u8,
        tag: u8,
    },
    Qos {
        ch: u8,
        prefetch: u16,
    },
    CloseChannel {
        ch: u8,
        from_broker: bool,
    },
    DropConnection,
}

/// The conversation on connections 0 and 1 (`conn` picks). The broker's
/// delivery tags rise per channel from 1, as a broker numbers them; a
/// closed channel starts again at 1.
#[derive(Debug, TypeGenerator)]
struct Conversation {
    cut: Vec<Edit>,
    steps: Vec<(bool, Step)>,
}

/// The ledger under any conversation: no panic; its count of unsettled
/// deliveries is the deliveries it holds; acks never exceed deliveries; the
/// cut it makes encodes and parses back.
#[test]
fn ledger_under_any_conversation() {
    let sample = cut_sample();
    check!().with_type::<Conversation>().for_each(|conv| {
        let resume = serde_json::from_value::<Cut>(mutate(sample.clone(), &conv.cut)).ok();
        let mut ledger = Ledger::new(resume.as_ref());
        let mut next_tag: std::collections::HashMap<(u64, u16), u64> = Default::default();
        for (second, step) in &conv.steps {
            let conn = u64::from(*second);
            let q = |n: &u8| format!("q{}", n % 3);
            let tag = |n: &u8| format!("t{}", n % 3);
            match step {
                Step::Consume {
                    ch,
                    queue,
                    tag: t,
                    no_ack,
                    offset,
                } => {
                    let mut args = FieldTable::default();
                    if let Some(o) = offset {
                        args.insert(X_STREAM_OFFSET.into(), AMQPValue::LongLongInt(*o));
                    }
                    ledger.client_method(
                        conn,
                        u16::from(*ch % 3),
                        &AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                            queue: q(queue).into(),
                            consumer_tag: tag(t).into(),
                            no_ack: *no_ack,
                            arguments: args,
                            ..Default::default()
                        })),
                    );
                }
                Step::ConsumeOk { ch, tag: t } => ledger.server_method(
                    conn,
                    u16::from(*ch % 3),
                    &AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                        consumer_tag: tag(t).into(),
                    })),
                ),
                Step::Deliver { ch, tag: t, offset } => {
                    let ch = u16::from(*ch % 3);
                    let n = next_tag.entry((conn, ch)).or_insert(0);
                    *n += 1;
                    let d = ledger.delivery_from_deliver(
                        conn,
                        ch,
                        &basic::Deliver {
                            consumer_tag: tag(t).into(),
                            delivery_tag: *n,
                            redelivered: false,
                            exchange: "".into(),
                            routing_key: "".into(),
                        },
                    );
                    ledger.record_delivery(conn, d);
                    ledger.update_delivery(
                        conn,
                        ch,
                        *n,
                        offset.map(u64::from),
                        Some(format!("{n}")),
                    );
                }
                Step::GetThenOk { ch, queue, no_ack } => {
                    let ch = u16::from(*ch % 3);
                    ledger.client_method(
                        conn,
                        ch,
                        &AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
                            queue: q(queue).into(),
                            no_ack: *no_ack,
                        })),
                    );
                    let n = next_tag.entry((conn, ch)).or_insert(0);
                    *n += 1;
                    let d = ledger.delivery_from_get_ok(
                        conn,
                        ch,
                        &basic::GetOk {
                            delivery_tag: *n,
                            redelivered: false,
                            exchange: "".into(),
                            routing_key: "".into(),
                            message_count: 0,
                        },
                    );
                    ledger.record_delivery(conn, d);
                }
                Step::Ack { ch, tag, multiple } => {
                    ledger.client_method(
                        conn,
                        u16::from(*ch % 3),
                        &AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                            delivery_tag: u64::from(*tag),
                            multiple: *multiple,
                        })),
                    );
                }
                Step::Nack { ch, tag, multiple } => {
                    ledger.client_method(
                        conn,
                        u16::from(*ch % 3),
                        &AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                            delivery_tag: u64::from(*tag),
                            multiple: *multiple,
                            requeue: true,
                        })),
                    );
                }
                Step::Reject { ch, tag } => {
                    ledger.client_method(
                        conn,
                        u16::from(*ch % 3),
                        &AMQPClass::Basic(basic::AMQPMethod::Reject(basic::Reject {
                            delivery_tag: u64::from(*tag),
                            requeue: true,
                        })),
                    );
                }
                Step::Recover { ch } => {
                    ledger.client_method(
                        conn,
                        u16::from(*ch % 3),
                        &AMQPClass::Basic(basic::AMQPMethod::Recover(basic::Recover {
                            requeue: true,
                        })),
                    );
                }
                Step::Cancel { ch, tag: t, nowait } => {
                    let ch = u16::from(*ch % 3);
                    ledger.client_method(
                        conn,
                        ch,
                        &AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                            consumer_tag: tag(t).into(),
                            nowait: *nowait,
                        })),
                    );
                    if !nowait {
                        ledger.server_method(
                            conn,
                            ch,
                            &AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                                consumer_tag: tag(t).into(),
                            })),
                        );
                    }
                }
                Step::Publish { ch } => {
                    ledger.client_method(
                        conn,
                        u16::from(*ch % 3),
                        &AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                            exchange: "".into(),
                            routing_key: "out".into(),
                            mandatory: false,
                            immediate: false,
                        })),
                    );
                }
                Step::ConfirmSelect { ch } => {
                    ledger.client_method(
                        conn,
                        u16::from(*ch % 3),
                        &AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
                            nowait: false,
                        })),
                    );
                }
                Step::BrokerConfirm { ch, tag } => ledger.server_method(
                    conn,
                    u16::from(*ch % 3),
                    &AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                        delivery_tag: u64::from(*tag),
                        multiple: false,
                    })),
                ),
                Step::Qos { ch, prefetch } => {
                    ledger.client_method(
                        conn,
                        u16::from(*ch % 3),
                        &AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                            prefetch_count: *prefetch,
                            global: false,
                        })),
                    );
                }
                Step::CloseChannel { ch, from_broker } => {
                    let ch = u16::from(*ch % 3);
                    let close = AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                        reply_code: 200,
                        reply_text: "bye".into(),
                        class_id: 0,
                        method_id: 0,
                    }));
                    if *from_broker {
                        ledger.server_method(conn, ch, &close);
                    } else {
                        ledger.client_method(conn, ch, &close);
                    }
                    next_tag.remove(&(conn, ch));
                }
                Step::DropConnection => {
                    ledger.drop_conn(conn);
                    next_tag.retain(|(c, _), _| *c != conn);
                }
            }
            let held = (ledger.unacked(0).len() + ledger.unacked(1).len()) as u64;
            assert_eq!(
                ledger.unsettled(),
                held,
                "unsettled count drifted from the deliveries held"
            );
            let t = ledger.totals();
            assert!(t.acks + t.nacks + t.unsettled <= t.deliveries, "{t:?}");
        }
        for with_in_doubt in [false, true] {
            let queues = ledger.queue_cuts(with_in_doubt);
            let text = serde_json::to_string(&queues).expect("a cut encodes");
            let back: Vec<ms2m_tap::QueueCut> =
                serde_json::from_str(&text).expect("and parses back");
            assert_eq!(back, queues);
        }
    });
}

/// The ledger with one unsettled stream delivery (tag 1) on channel 1.
fn one_delivery(offset: Option<u64>) -> Ledger {
    let mut l = Ledger::new(None);
    let d = l.delivery_from_deliver(
        0,
        1,
        &basic::Deliver {
            consumer_tag: "c".into(),
            delivery_tag: 1,
            redelivered: false,
            exchange: "".into(),
            routing_key: "".into(),
        },
    );
    l.record_delivery(0, d);
    l.update_delivery(0, 1, 1, offset, None);
    l
}

fn ack(tag: u64, multiple: bool) -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
        delivery_tag: tag,
        multiple,
    }))
}

/// Found by these targets (fixed in tap/src/ledger.rs): an app's
/// `basic.ack(delivery_tag = u64::MAX, multiple)` overflowed `tag + 1` in
/// `Ledger::settle` (a panic in debug builds; in release it wrapped and
/// settled nothing).
#[test]
fn ack_multiple_of_the_largest_tag_settles_everything() {
    let mut l = one_delivery(Some(7));
    l.client_method(0, 1, &ack(u64::MAX, true));
    assert_eq!(l.unsettled(), 0);
}

/// Found by these targets (fixed in tap/src/ledger.rs): a delivery whose
/// `x-stream-offset` header is u64::MAX overflowed `o + 1` in
/// `Ledger::progress` when acked (debug: panic; release: the cut's
/// `next_offset` wrapped to 0, a restore would replay the stream from its
/// start). The header is read from any delivery's properties, so on a
/// classic queue a publisher sets it.
#[test]
fn ack_of_the_largest_stream_offset_does_not_wrap() {
    let mut l = one_delivery(Some(u64::MAX));
    l.client_method(0, 1, &ack(1, false));
    let cuts = l.queue_cuts(false);
    assert!(cuts.iter().all(|q| q.next_offset != Some(0)), "{cuts:?}");
}
