//! lapin clients through the tap against the real RabbitMQ.

mod common;

use std::time::Duration;

use common::*;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::Confirmation;
use ms2m_tap::{OffsetSpec, QueueKind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_confirms_multiple_channels_and_multiple_ack() {
    let h = start_tap(None);
    let q = unique("classic");
    let conn = connect(&h.url()).await;
    let pub_ch = conn.create_channel().await.unwrap();
    let con_ch = conn.create_channel().await.unwrap();
    declare_classic(&pub_ch, &q).await;
    pub_ch
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut confirms = vec![];
    for i in 0..20u32 {
        confirms.push(
            pub_ch
                .basic_publish(
                    "".into(),
                    q.as_str().into(),
                    BasicPublishOptions::default(),
                    format!("{i}").as_bytes(),
                    lapin::BasicProperties::default().with_message_id(format!("m-{i}").into()),
                )
                .await
                .unwrap(),
        );
    }
    for c in confirms {
        assert!(matches!(c.await.unwrap(), Confirmation::Ack(_)));
    }
    con_ch
        .basic_qos(20, BasicQosOptions::default())
        .await
        .unwrap();
    let mut cons = consume(&con_ch, &q, "c1", FieldTable::default()).await;
    let ds = recv(&mut cons, 20).await;
    assert_eq!(
        ds.iter().map(body).collect::<Vec<_>>(),
        (0..20).collect::<Vec<_>>()
    );
    assert_eq!(h.tap.stats().unsettled, 20);
    // multiple=true on the 5th clears exactly the first five
    ds[4].ack(BasicAckOptions { multiple: true }).await.unwrap();
    ds[9].ack(BasicAckOptions::default()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(h.tap.stats().unsettled, 14);
    // the in-doubt list (quiesce incomplete) names exactly the unacked ones
    let cut = h.tap.capture_cut(&ms2m_tap::Quiesce::default());
    let qc = cut.queues.iter().find(|c| c.name == q).unwrap();
    assert_eq!(qc.kind, QueueKind::Classic);
    let ids: Vec<String> = qc
        .in_doubt
        .iter()
        .map(|d| d.message_id.clone().unwrap())
        .collect();
    let want: Vec<String> = (5..20)
        .filter(|i| *i != 9)
        .map(|i| format!("m-{i}"))
        .collect();
    assert_eq!(ids, want);
    ds[19]
        .ack(BasicAckOptions { multiple: true })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let st = h.tap.stats();
    assert_eq!(
        (st.publishes, st.deliveries, st.acks, st.unsettled),
        (20, 20, 20, 0)
    );
    assert!(st.confirms >= 1);
    delete_queue(&h.url(), &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_nack_reject_recover() {
    let h = start_tap(None);
    let q = unique("getnack");
    let conn = connect(&h.url()).await;
    let ch = conn.create_channel().await.unwrap();
    declare_classic(&ch, &q).await;
    publish_n(&ch, &q, 0, 3).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let g = ch
        .basic_get(q.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(body(&g.delivery), 0);
    assert_eq!(h.tap.stats().unsettled, 1);
    g.delivery
        .reject(BasicRejectOptions { requeue: true })
        .await
        .unwrap();
    let g = ch
        .basic_get(q.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    assert!(g.delivery.redelivered);
    g.delivery
        .nack(BasicNackOptions {
            multiple: false,
            requeue: true,
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(h.tap.stats().unsettled, 0);
    // consume without acking, then basic.recover: redelivered, ledger cleared then refilled
    ch.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    let mut cons = consume(&ch, &q, "c", FieldTable::default()).await;
    let first = recv(&mut cons, 3).await;
    assert_eq!(h.tap.stats().unsettled, 3);
    ch.basic_recover(BasicRecoverOptions { requeue: true })
        .await
        .unwrap();
    let again = recv(&mut cons, 3).await;
    assert!(again.iter().all(|d| d.redelivered));
    let mut bodies: Vec<u32> = again.iter().map(body).collect();
    bodies.sort();
    assert_eq!(bodies, vec![0, 1, 2]);
    drop(first);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(h.tap.stats().unsettled, 3);
    again[2]
        .ack(BasicAckOptions { multiple: true })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(h.tap.stats().unsettled, 0);
    delete_queue(&h.url(), &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_cancel_by_client_and_by_broker() {
    let h = start_tap(None);
    let q = unique("cancel");
    let conn = connect(&h.url()).await;
    let ch = conn.create_channel().await.unwrap();
    declare_classic(&ch, &q).await;
    let mut cons = consume(&ch, &q, "mine", FieldTable::default()).await;
    ch.basic_cancel("mine".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    publish_n(&ch, &q, 0, 1).await;
    recv_none(&mut cons, Duration::from_millis(300)).await;
    // a second consumer; the queue is deleted by someone else → broker cancels it
    let mut cons2 = consume(&ch, &q, "other", FieldTable::default()).await;
    let d = recv(&mut cons2, 1).await;
    d[0].ack(BasicAckOptions::default()).await.unwrap();
    delete_queue(common::BROKER, &q).await;
    let end = tokio::time::timeout(
        Duration::from_secs(5),
        futures_lite::StreamExt::next(&mut cons2),
    )
    .await;
    assert!(
        matches!(end, Ok(None) | Ok(Some(Err(_)))),
        "consumer not cancelled: {end:?}"
    );
    // the connection is still usable
    let ch2 = conn.create_channel().await.unwrap();
    declare_classic(&ch2, &q).await;
    delete_queue(&h.url(), &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_offsets_and_heartbeats() {
    let h = start_tap(None);
    let q = unique("stream");
    let conn = connect(&format!("{}?heartbeat=1", h.url())).await;
    let ch = conn.create_channel().await.unwrap();
    declare_stream(&ch, &q).await;
    publish_n(&ch, &q, 0, 10).await;
    ch.basic_qos(100, BasicQosOptions::default()).await.unwrap();
    let mut c1 = consume(
        &ch,
        &q,
        "c1",
        stream_args(AMQPValue::LongString("first".into())),
    )
    .await;
    let ds = recv(&mut c1, 10).await;
    assert_eq!(
        ds.iter().map(stream_offset).collect::<Vec<_>>(),
        (0..10).collect::<Vec<_>>()
    );
    for d in &ds {
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    let mut c2 = consume(&ch, &q, "c2", stream_args(AMQPValue::LongLongInt(5))).await;
    let ds2 = recv(&mut c2, 5).await;
    assert_eq!(
        ds2.iter().map(stream_offset).collect::<Vec<_>>(),
        (5..10).collect::<Vec<_>>()
    );
    ds2[4]
        .ack(BasicAckOptions { multiple: true })
        .await
        .unwrap();
    ch.basic_cancel("c2".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    // idle 3 s with a 1 s heartbeat: the connection must survive
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(conn.status().connected());
    publish_n(&ch, &q, 10, 1).await;
    let d = recv(&mut c1, 1).await;
    assert_eq!(stream_offset(&d[0]), 10);
    d[0].ack(BasicAckOptions::default()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let cut = h.tap.capture_cut(&ms2m_tap::Quiesce::default());
    let qc = cut.queues.iter().find(|c| c.name == q).unwrap();
    assert_eq!(
        (qc.kind, qc.next_offset, qc.in_flight),
        (QueueKind::Stream, Some(11), 0)
    );
    assert!(h.tap.stats().frames_from_broker > 0);
    delete_queue(&h.url(), &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiesce_holds_deliveries_and_release_forwards_in_order() {
    let h = start_tap(None);
    let q = unique("quiesce");
    let direct = connect(BROKER).await;
    let pch = direct.create_channel().await.unwrap();
    declare_classic(&pch, &q).await;
    let conn = connect(&h.url()).await;
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(50, BasicQosOptions::default()).await.unwrap();
    let mut cons = consume(&ch, &q, "c", FieldTable::default()).await;
    publish_n(&pch, &q, 0, 10).await;
    let ds = recv(&mut cons, 10).await;
    // quiesce completes once everything delivered is acked
    let tap = h.tap.clone();
    let qz = tokio::spawn(async move { tap.quiesce(Duration::from_secs(5)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!qz.is_finished(), "quiesce finished with 10 unacked");
    for d in &ds {
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    let report = qz.await.unwrap();
    assert!(report.complete, "{report:?}");
    // held: new messages do not reach the client
    publish_n(&pch, &q, 10, 10).await;
    recv_none(&mut cons, Duration::from_millis(400)).await;
    assert_eq!(h.tap.stats().held, 10);
    let cut = h.tap.capture_cut(&report);
    let qc = cut.queues.iter().find(|c| c.name == q).unwrap();
    assert_eq!(
        (qc.kind, qc.in_flight, qc.delivered, qc.acked),
        (QueueKind::Classic, 0, 10, 10)
    );
    assert!(qc.in_doubt.is_empty() && cut.quiesce.complete);
    assert!(!cut.upstream.contains("guest"));
    // release: the held ones arrive, in order
    h.tap.release().await;
    let ds = recv(&mut cons, 10).await;
    assert_eq!(
        ds.iter().map(body).collect::<Vec<_>>(),
        (10..20).collect::<Vec<_>>()
    );
    ds[9].ack(BasicAckOptions { multiple: true }).await.unwrap();
    publish_n(&pch, &q, 20, 1).await;
    let d = recv(&mut cons, 1).await;
    assert_eq!(body(&d[0]), 20);
    d[0].ack(BasicAckOptions::default()).await.unwrap();
    assert_eq!(h.tap.stats().held, 0);
    delete_queue(BROKER, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiesce_timeout_lists_in_doubt_and_exit_returns_them() {
    let h = start_tap(None);
    let q = unique("indoubt");
    let direct = connect(BROKER).await;
    let pch = direct.create_channel().await.unwrap();
    declare_classic(&pch, &q).await;
    let conn = connect(&h.url()).await;
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(50, BasicQosOptions::default()).await.unwrap();
    let mut cons = consume(&ch, &q, "c", FieldTable::default()).await;
    publish_n(&pch, &q, 0, 5).await;
    let ds = recv(&mut cons, 5).await;
    ds[1].ack(BasicAckOptions { multiple: true }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let report = h.tap.quiesce(Duration::from_millis(300)).await;
    assert!(!report.complete);
    assert_eq!((report.unsettled, report.timeout_ms), (3, 300));
    assert!(report.waited_ms >= 300);
    publish_n(&pch, &q, 5, 2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cut = h.tap.capture_cut(&report);
    let qc = cut.queues.iter().find(|c| c.name == q).unwrap();
    assert_eq!(qc.in_flight, 3);
    let ids: Vec<_> = qc
        .in_doubt
        .iter()
        .map(|d| d.message_id.clone().unwrap())
        .collect();
    assert_eq!(ids, vec!["m-2", "m-3", "m-4"]);
    assert_eq!(h.tap.stats().held, 2);
    // exit: held dropped, connection closed, unacked return to the broker
    h.tap.close_for_exit().await;
    assert_eq!(h.tap.stats().connections_active, 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let n = pch
        .queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count();
    assert_eq!(n, 5, "3 unacked + 2 held must be back in the queue");
    delete_queue(BROKER, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_cut_and_resume_rewrites_consume_next() {
    let q = unique("resume");
    let direct = connect(BROKER).await;
    let pch = direct.create_channel().await.unwrap();
    declare_stream(&pch, &q).await;
    publish_n(&pch, &q, 0, 10).await;
    // run 1: the app consumes from "first" and processes (acks) offsets 0..=9
    let cut = {
        let h = start_tap(None);
        let conn = connect(&h.url()).await;
        let ch = conn.create_channel().await.unwrap();
        ch.basic_qos(100, BasicQosOptions::default()).await.unwrap();
        let mut c = consume(
            &ch,
            &q,
            "app",
            stream_args(AMQPValue::LongString("first".into())),
        )
        .await;
        let ds = recv(&mut c, 10).await;
        let report = {
            let tap = h.tap.clone();
            let qz = tokio::spawn(async move { tap.quiesce(Duration::from_secs(5)).await });
            tokio::time::sleep(Duration::from_millis(50)).await;
            for d in &ds {
                d.ack(BasicAckOptions::default()).await.unwrap();
            }
            qz.await.unwrap()
        };
        assert!(report.complete);
        recv_none(&mut c, Duration::from_millis(200)).await;
        let cut = h.tap.capture_cut(&report);
        h.tap.close_for_exit().await;
        cut
    };
    let qc = cut.queues.iter().find(|c| c.name == q).unwrap();
    assert_eq!(
        (qc.kind, qc.next_offset, qc.offset_spec.clone()),
        (QueueKind::Stream, Some(10), None)
    );
    // messages published while the app is "down"
    publish_n(&pch, &q, 10, 6).await;
    // run 2: restored app asks for "next"; the tap starts it at the cut
    let json = serde_json::to_string(&cut).unwrap();
    let cut: ms2m_tap::Cut = serde_json::from_str(&json).unwrap();
    let h = start_tap(Some(cut));
    let conn = connect(&h.url()).await;
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(100, BasicQosOptions::default()).await.unwrap();
    let mut c = consume(
        &ch,
        &q,
        "app",
        stream_args(AMQPValue::LongString("next".into())),
    )
    .await;
    let ds = recv(&mut c, 6).await;
    assert_eq!(
        ds.iter().map(stream_offset).collect::<Vec<_>>(),
        (10..16).collect::<Vec<_>>()
    );
    assert_eq!(
        ds.iter().map(body).collect::<Vec<_>>(),
        (10..16).collect::<Vec<_>>()
    );
    recv_none(&mut c, Duration::from_millis(300)).await;
    ds[5].ack(BasicAckOptions { multiple: true }).await.unwrap();
    // a later re-consume with "next" follows the ledger's progress
    let ch2 = conn.create_channel().await.unwrap();
    ch2.basic_qos(100, BasicQosOptions::default())
        .await
        .unwrap();
    publish_n(&pch, &q, 16, 1).await;
    let mut c2 = consume(
        &ch2,
        &q,
        "app2",
        stream_args(AMQPValue::LongString("next".into())),
    )
    .await;
    let d = recv(&mut c2, 1).await;
    assert_eq!(stream_offset(&d[0]), 16);
    let cut2 = h.tap.capture_cut(&ms2m_tap::Quiesce::default());
    let qc = cut2.queues.iter().find(|c| c.name == q).unwrap();
    assert_eq!(qc.next_offset, Some(16));
    let _ = OffsetSpec::Next;
    delete_queue(BROKER, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_during_hold_drops_its_held_deliveries() {
    let h = start_tap(None);
    let q = unique("leave");
    let direct = connect(BROKER).await;
    let pch = direct.create_channel().await.unwrap();
    declare_classic(&pch, &q).await;
    let conn = connect(&h.url()).await;
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    let _cons = consume(&ch, &q, "c", FieldTable::default()).await;
    let report = h.tap.quiesce(Duration::from_secs(1)).await;
    assert!(report.complete && report.waited_ms < 100, "{report:?}");
    publish_n(&pch, &q, 0, 3).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(h.tap.stats().held, 3);
    // closing the channel: its close-ok is not held behind the held
    // deliveries, which are dropped (the broker requeues them)
    tokio::time::timeout(Duration::from_secs(2), ch.close(200, "bye".into()))
        .await
        .expect("channel.close-ok was held")
        .unwrap();
    assert_eq!(h.tap.stats().held, 0);
    // more deliveries on a second channel, then the client leaves
    let ch2 = conn.create_channel().await.unwrap();
    let _c2 = consume(&ch2, &q, "c2", FieldTable::default()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(h.tap.stats().held > 0);
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.close(200, "bye".into())).await;
    for _ in 0..100 {
        if h.tap.stats().connections_active == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let st = h.tap.stats();
    assert_eq!((st.held, st.connections_active, st.unsettled), (0, 0, 0));
    h.tap.release().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let n = pch
        .queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count();
    assert_eq!(n, 3, "held messages must be back in the queue");
    delete_queue(BROKER, &q).await;
}
