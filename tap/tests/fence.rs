//! The MS2M fence and publish suppression, with lapin clients through the
//! tap against the real RabbitMQ.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation};
use ms2m_tap::{QueueKind, Resume, TapConfig, FENCE_SCHEMA};

/// A tap that suppresses the first `n` publishes.
fn start_suppressing(n: u64) -> Harness {
    require_broker();
    start_tap_resume(
        TapConfig::new(BROKER).unwrap(),
        Resume {
            cut: None,
            suppress_publishes: n,
            shadow: None,
        },
    )
}

async fn publish(ch: &Channel, q: &str, body: &[u8]) -> lapin::PublisherConfirm {
    ch.basic_publish(
        "".into(),
        q.into(),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default(),
    )
    .await
    .unwrap()
}

/// Polls `f` until it returns true (at most 10 s).
async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Everything in queue `q`, read directly from the broker: exactly `n`
/// messages, then nothing more for 300 ms. Deletes the queue.
async fn drain_direct(q: &str, n: usize) -> Vec<Vec<u8>> {
    let c = connect(BROKER).await;
    let ch = c.create_channel().await.unwrap();
    ch.basic_qos(1000, BasicQosOptions::default())
        .await
        .unwrap();
    let mut cons = ch
        .basic_consume(
            q.into(),
            "drain".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let ds = recv(&mut cons, n).await;
    recv_none(&mut cons, Duration::from_millis(300)).await;
    let _ = ch
        .queue_delete(q.into(), QueueDeleteOptions::default())
        .await;
    let _ = c.close(200, "bye".into()).await;
    ds.into_iter().map(|d| d.data).collect()
}

fn strings(v: &[Vec<u8>]) -> Vec<String> {
    v.iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect()
}

fn numbered(r: std::ops::RangeInclusive<u32>) -> Vec<String> {
    r.map(|i| i.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_counted_since_cut_and_fenced() {
    let h = start_tap(None);
    let q = unique("count");
    let a = connect(&h.url()).await;
    let b = connect(&h.url()).await;
    let a1 = a.create_channel().await.unwrap();
    let a2 = a.create_channel().await.unwrap();
    let b1 = b.create_channel().await.unwrap();
    declare_classic(&a1, &q).await;
    // k = 3 before the cut
    for i in 0..3u32 {
        publish(&a1, &q, format!("{i}").as_bytes()).await;
    }
    wait_for("3 publishes", || h.tap.stats().publishes == 3).await;
    assert_eq!(h.tap.publishes_since_cut(), 0, "no cut yet");
    let cut = h.tap.capture_cut(&ms2m_tap::Quiesce::default());
    assert_eq!(h.tap.publishes_since_cut(), 0);
    // m = 5 after it, over two connections and three channels
    a2.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    publish(&a1, &q, b"3").await;
    assert!(matches!(
        publish(&a2, &q, b"4").await.await.unwrap(),
        Confirmation::Ack(_)
    ));
    for i in 5..8u32 {
        publish(&b1, &q, format!("{i}").as_bytes()).await;
    }
    wait_for("8 publishes", || h.tap.stats().publishes == 8).await;
    assert_eq!(h.tap.publishes_since_cut(), 5);
    let fence = h.tap.fence(Duration::from_secs(2)).await;
    assert_eq!(fence.schema, FENCE_SCHEMA);
    assert_eq!(fence.publishes_after_cut, 5);
    assert!(fence.quiesce.complete, "{:?}", fence.quiesce);
    assert_eq!(fence.cut_taken_at_unix_ms, Some(cut.captured_at_unix_ms));
    assert!(fence.belongs_to(&cut));
    assert!(fence.taken_at_unix_ms >= cut.captured_at_unix_ms);
    assert_eq!(
        fence.taken_at,
        ms2m_tap::cut::rfc3339_utc(fence.taken_at_unix_ms)
    );
    // a second cut restarts the count; the old fence no longer matches it
    std::thread::sleep(Duration::from_millis(2));
    let cut2 = h.tap.capture_cut(&fence.quiesce);
    assert_eq!(h.tap.publishes_since_cut(), 0);
    assert!(!fence.belongs_to(&cut2));
    assert!(Resume::after_fence(cut2, &fence).is_err());
    h.tap.release().await;
    let got = drain_direct(&q, 8).await;
    assert_eq!(strings(&got), numbered(0..=7));
    assert_eq!(h.tap.stats().suppressed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suppression_without_confirms() {
    let h = start_suppressing(3);
    let q = unique("suppress");
    let conn = connect(&h.url()).await;
    let ch = conn.create_channel().await.unwrap();
    declare_classic(&ch, &q).await;
    for i in 1..=5u32 {
        publish(&ch, &q, format!("{i}").as_bytes()).await;
    }
    wait_for("5 publishes seen", || {
        let s = h.tap.stats();
        s.publishes + s.suppressed == 5
    })
    .await;
    let st = h.tap.stats();
    assert_eq!((st.publishes, st.suppressed), (2, 3));
    assert_eq!(
        (h.tap.suppressed_publishes(), h.tap.suppress_remaining()),
        (3, 0)
    );
    // the connection is fine after the drops
    declare_classic(&ch, &q).await;
    let got = drain_direct(&q, 2).await;
    assert_eq!(strings(&got), numbered(4..=5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suppression_with_confirms_one_by_one() {
    let h = start_suppressing(3);
    let q = unique("suppress-confirm");
    let conn = connect(&h.url()).await;
    let ch = conn.create_channel().await.unwrap();
    declare_classic(&ch, &q).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 1..=6u32 {
        let c = tokio::time::timeout(
            Duration::from_secs(5),
            publish(&ch, &q, format!("{i}").as_bytes()).await,
        )
        .await
        .unwrap_or_else(|_| panic!("no confirm for publish {i}"))
        .unwrap();
        assert!(matches!(c, Confirmation::Ack(None)), "publish {i}: {c:?}");
    }
    assert_eq!(h.tap.stats().suppressed, 3);
    let got = drain_direct(&q, 3).await;
    assert_eq!(strings(&got), numbered(4..=6));
    assert!(conn.status().connected());
}

/// A tap suppressing 3, and `n` publishes on one confirm-mode channel sent
/// without waiting, then every confirm awaited (each must be an ack): the
/// tap and the queue, for the caller to check.
async fn pipelined(name: &str, n: u32, wait: Duration) -> (Harness, String) {
    let h = start_suppressing(3);
    let q = unique(name);
    let conn = connect(&h.url()).await;
    let ch = conn.create_channel().await.unwrap();
    declare_classic(&ch, &q).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut pending = vec![];
    for i in 1..=n {
        pending.push(publish(&ch, &q, format!("{i}").as_bytes()).await);
    }
    for (i, c) in pending.into_iter().enumerate() {
        let c = tokio::time::timeout(wait, c)
            .await
            .unwrap_or_else(|_| panic!("no confirm for publish {}", i + 1))
            .unwrap();
        assert!(
            matches!(c, Confirmation::Ack(None)),
            "publish {}: {c:?}",
            i + 1
        );
    }
    (h, q)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suppression_with_confirms_pipelined() {
    // 6 publishes without waiting, then all confirms
    let (h, q) = pipelined("suppress-pipelined", 6, Duration::from_secs(5)).await;
    let got = drain_direct(&q, 3).await;
    assert_eq!(strings(&got), numbered(4..=6));
    drop(h);

    // many more, so the broker confirms with multiple=true
    let (h, q) = pipelined("suppress-many", 500, Duration::from_secs(10)).await;
    let st = h.tap.stats();
    assert_eq!((st.publishes, st.suppressed), (497, 3));
    eprintln!(
        "broker confirms for 497 publishes: {} (fewer = multiple acks)",
        st.confirms
    );
    assert!(
        st.confirms < 497,
        "the broker sent no multiple ack: the translation of multiple acks went untested"
    );
    let got = drain_direct(&q, 497).await;
    assert_eq!(strings(&got), numbered(4..=500));
}

fn big_body(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(seed as u32) as u8)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_frame_publish_is_dropped_whole() {
    let h = start_suppressing(1);
    let q = unique("suppress-big");
    let conn = connect(&h.url()).await;
    let ch = conn.create_channel().await.unwrap();
    // frame_max is negotiated at 128 KiB: 300 KiB take three body frames
    assert!(conn.configuration().frame_max() <= 128 * 1024);
    declare_classic(&ch, &q).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let first = big_body(1, 300 * 1024);
    let second = big_body(2, 300 * 1024);
    let c1 = publish(&ch, &q, &first).await;
    let c2 = publish(&ch, &q, &second).await;
    for c in [c1, c2] {
        let c = tokio::time::timeout(Duration::from_secs(5), c)
            .await
            .expect("no confirm")
            .unwrap();
        assert!(matches!(c, Confirmation::Ack(None)), "{c:?}");
    }
    // a small one on the same channel still goes through
    publish(&ch, &q, b"after").await.await.unwrap();
    let st = h.tap.stats();
    assert_eq!((st.publishes, st.suppressed), (2, 1));
    let got = drain_direct(&q, 2).await;
    assert!(got[0] == second, "the second big publish is not intact");
    assert_eq!(got[1], b"after");
}

/// An in-test app: consumes stream `input` (prefetch 5) starting at
/// `offset`, and for each message `i` publishes `r-i` to `results`
/// (confirmed), then acks the input. Counts processed messages; records a
/// confirm that is not an ack in `bad`. Ends when its connection is closed.
async fn app(
    url: String,
    input: String,
    results: String,
    offset: &'static str,
    done: Arc<AtomicU64>,
    bad: Arc<std::sync::Mutex<Vec<String>>>,
) {
    let conn = connect(&url).await;
    let cin = conn.create_channel().await.unwrap();
    let cout = conn.create_channel().await.unwrap();
    cout.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    cin.basic_qos(5, BasicQosOptions::default()).await.unwrap();
    let mut cons = consume(
        &cin,
        &input,
        "app",
        stream_args(AMQPValue::LongString(offset.into())),
    )
    .await;
    while let Some(Ok(d)) = cons.next().await {
        tokio::time::sleep(Duration::from_millis(3)).await;
        let i = body(&d);
        let c = publish(&cout, &results, format!("r-{i}").as_bytes())
            .await
            .await;
        if !matches!(c, Ok(Confirmation::Ack(None))) {
            bad.lock().unwrap().push(format!("result {i}: {c:?}"));
            return;
        }
        if d.ack(BasicAckOptions::default()).await.is_err() {
            return;
        }
        done.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_and_suppression_end_to_end() {
    let input = unique("e2e-in");
    let results = unique("e2e-out");
    let direct = connect(BROKER).await;
    let dch = direct.create_channel().await.unwrap();
    declare_stream(&dch, &input).await;
    declare_classic(&dch, &results).await;
    // Input comes in batches of 12, so the checkpoints land while the app
    // is busy (a stream consumer may get a whole chunk beyond its prefetch)
    // yet cannot have processed everything.
    publish_n(&dch, &input, 0, 12).await;

    // the source: runs, is checkpointed (leave-running) mid-way, goes on,
    // and is fenced and stopped later
    let src = start_tap(None);
    let done = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(std::sync::Mutex::new(Vec::new()));
    let task = tokio::spawn(app(
        src.url(),
        input.clone(),
        results.clone(),
        "first",
        done.clone(),
        bad.clone(),
    ));
    wait_for("8 processed", || done.load(Ordering::SeqCst) >= 8).await;
    let q = src.tap.quiesce(Duration::from_secs(5)).await;
    assert!(q.complete, "{q:?}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let at_cut = done.load(Ordering::SeqCst);
    let cut = src.tap.capture_cut(&q);
    src.tap.release().await;
    let qc = cut.queues.iter().find(|c| c.name == input).unwrap();
    assert_eq!((qc.kind, qc.next_offset), (QueueKind::Stream, Some(at_cut)));
    assert!((8..=12).contains(&at_cut), "{at_cut}");

    publish_n(&dch, &input, 12, 12).await;
    wait_for("20 processed", || done.load(Ordering::SeqCst) >= 20).await;
    let fence = src.tap.fence(Duration::from_secs(5)).await;
    assert!(fence.quiesce.complete, "{:?}", fence.quiesce);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let at_fence = done.load(Ordering::SeqCst);
    assert_eq!(fence.publishes_after_cut, at_fence - at_cut);
    assert!(fence.publishes_after_cut > 0);
    assert!((20..=24).contains(&at_fence), "{at_fence}");
    // input arriving while the source is fenced is held, not processed
    publish_n(&dch, &input, 24, 6).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(done.load(Ordering::SeqCst), at_fence);
    // stop the source
    task.abort();
    src.tap.close_for_exit().await;
    drop(src);

    // the restored app starts from the cut's state: it asks for "next",
    // the tap rewrites that to the cut, and suppresses what the source
    // already published after the cut
    let fence: ms2m_tap::Fence =
        serde_json::from_str(&serde_json::to_string(&fence).unwrap()).unwrap();
    let resume = Resume::after_fence(cut, &fence).unwrap();
    assert_eq!(resume.suppress_publishes, at_fence - at_cut);
    require_broker();
    let dst = start_tap_resume(TapConfig::new(BROKER).unwrap(), resume);
    let done2 = Arc::new(AtomicU64::new(0));
    let task = tokio::spawn(app(
        dst.url(),
        input.clone(),
        results.clone(),
        "next",
        done2.clone(),
        bad.clone(),
    ));
    wait_for("the rest processed", || {
        done2.load(Ordering::SeqCst) == 30 - at_cut
    })
    .await;
    // new input after the migration
    publish_n(&dch, &input, 30, 5).await;
    wait_for("the new input processed", || {
        done2.load(Ordering::SeqCst) == 35 - at_cut
    })
    .await;
    assert_eq!(dst.tap.suppressed_publishes(), at_fence - at_cut);
    assert_eq!(dst.tap.suppress_remaining(), 0);
    task.abort();
    assert!(bad.lock().unwrap().is_empty(), "{:?}", bad.lock().unwrap());

    let got = strings(&drain_direct(&results, 35).await);
    let want: Vec<String> = (0..35).map(|i| format!("r-{i}")).collect();
    assert_eq!(got, want, "each result exactly once, in order");
    delete_queue(BROKER, &input).await;
}
