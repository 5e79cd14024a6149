//! Live migration between two taps through the real RabbitMQ: the target
//! (shadow) replays behind the source, suppresses its publishes until the
//! source's fence, then goes live; every result appears exactly once, in
//! order.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use ms2m_tap::{Quiesce, Resume, Shadow, TapConfig, Ticket};

/// A deterministic app: for each input `i` of stream `input` (from where the
/// tap starts it), publish `r<i>` to `output` with a confirm, then ack.
/// Counts what it processed; stops when `stop` is set.
async fn app(
    url: String,
    input: String,
    output: String,
    done: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
) {
    let c = connect(&url).await;
    let ch = c.create_channel().await.unwrap();
    ch.basic_qos(20, BasicQosOptions::default()).await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut cons = consume(
        &ch,
        &input,
        "app",
        stream_args(AMQPValue::LongString("first".into())),
    )
    .await;
    while !stop.load(Ordering::SeqCst) {
        let d = match tokio::time::timeout(Duration::from_millis(50), cons.next()).await {
            Ok(Some(Ok(d))) => d,
            Ok(_) => return,
            Err(_) => continue,
        };
        let i = body(&d);
        let conf = ch
            .basic_publish(
                "".into(),
                output.as_str().into(),
                BasicPublishOptions::default(),
                format!("r{i}").as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap();
        conf.await.unwrap();
        d.ack(BasicAckOptions::default()).await.unwrap();
        done.store(i, Ordering::SeqCst);
    }
    let _ = c.close(200, "stop".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_replays_behind_the_source_and_goes_live_at_the_fence() {
    let src = start_tap(None);
    let input = unique("mig-in");
    let output = unique("mig-out");
    const N: u32 = 600;
    let direct = connect(BROKER).await;
    let pch = direct.create_channel().await.unwrap();
    declare_stream(&pch, &input).await;
    declare_classic(&pch, &output).await;

    // The source app, and a producer at ~1 msg/ms.
    let src_done = Arc::new(AtomicU32::new(0));
    let src_stop = Arc::new(AtomicBool::new(false));
    let src_app = tokio::spawn(app(
        src.url(),
        input.clone(),
        output.clone(),
        src_done.clone(),
        src_stop.clone(),
    ));
    let producer = {
        let pch = pch.clone();
        let input = input.clone();
        tokio::spawn(async move {
            for i in 1..=N {
                publish_n(&pch, &input, i, 1).await;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let t0 = Instant::now();
    while src_done.load(Ordering::SeqCst) < 100 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the source app does not consume"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // "Checkpoint" the source: quiesce, cut, release (leave-running).
    let q: Quiesce = src.tap.quiesce(Duration::from_secs(2)).await;
    assert!(q.complete);
    let cut = src.tap.capture_cut(&q);
    src.tap.release().await;
    let cut_at = cut
        .queues
        .iter()
        .find(|c| c.name == input)
        .and_then(|c| c.next_offset)
        .unwrap();

    let ticket = Ticket::new(
        &unique("m").replace("ms2m-tap-test-", ""),
        "c1",
        cut.captured_at_unix_ms,
    );
    let link = src
        .tap
        .migration_source(&ticket)
        .await
        .expect("source link");
    let tgt = start_tap_resume(
        TapConfig::new(BROKER).unwrap(),
        Resume {
            cut: Some(cut),
            suppress_publishes: 0,
            shadow: Some(Shadow {
                ticket: ticket.clone(),
            }),
        },
    );
    let tgt_done = Arc::new(AtomicU32::new(0));
    let tgt_stop = Arc::new(AtomicBool::new(false));
    let tgt_app = tokio::spawn(app(
        tgt.url(),
        input.clone(),
        output.clone(),
        tgt_done.clone(),
        tgt_stop.clone(),
    ));
    // The shadow catches up but never passes the source.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (s, t) = (
        src_done.load(Ordering::SeqCst),
        tgt_done.load(Ordering::SeqCst),
    );
    assert!(
        t as u64 >= cut_at,
        "the shadow did not replay: source {s}, target {t}, cut {cut_at}"
    );
    assert!(
        t <= s,
        "the shadow ran ahead of the source: source {s}, target {t}"
    );
    assert!(tgt.tap.suppressed_publishes() > 0);

    // Cutover.
    let fence = link.fence(Duration::from_secs(2)).await.expect("fence");
    let fenced_at = src_done.load(Ordering::SeqCst);
    src_stop.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    while tgt_done.load(Ordering::SeqCst) < N {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the target did not go live: at {} of {N}, fence after {fenced_at}",
            tgt_done.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(tgt.tap.suppressed_publishes(), fence.publishes_after_cut);
    producer.await.unwrap();
    src_app.await.unwrap();
    src.tap.close_for_exit().await;
    tgt_stop.store(true, Ordering::SeqCst);
    tgt_app.await.unwrap();

    // Every result once, in order.
    let c = connect(BROKER).await;
    let ch = c.create_channel().await.unwrap();
    let mut cons = ch
        .basic_consume(
            output.as_str().into(),
            "drain".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut got: Vec<String> = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_millis(500), cons.next()).await
    {
        got.push(String::from_utf8_lossy(&d.data).into_owned());
    }
    let missing: Vec<u32> = (1..=N)
        .filter(|i| !got.contains(&format!("r{i}")))
        .collect();
    assert!(
        missing.is_empty(),
        "missing results {missing:?} (cut at offset {cut_at}, fence after {fenced_at}; {} results)",
        got.len()
    );
    let want: Vec<String> = (1..=N).map(|i| format!("r{i}")).collect();
    assert_eq!(got, want);
    delete_queue(BROKER, &input).await;
    delete_queue(BROKER, &output).await;
}
