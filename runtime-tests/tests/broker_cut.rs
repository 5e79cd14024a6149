//! The broker cut (issue 4) end to end: consumers in containers of their own
//! network namespace (no `--net-host`: only the shim's AMQP tap reaches the
//! broker), opted in with the `io.ms2m.tap.upstream` annotation, their
//! ordinary `amqp://guest:guest@localhost:5672/%2f` URL.
//!
//! - exit checkpoint (`ms2m checkpoint --exit`) mid-stream, a pause while
//!   messages pile up, `ms2m restore`: 0 lost, 0 duplicated, 0 out of order,
//!   and the manifest's `broker` cut matches the consumer's state (lapin
//!   consumer on a stream and on a classic queue);
//! - leave-running `ctr task checkpoint` of the pika consumer, kill, restore
//!   from the content store: the restored state is exactly "cut prefix +
//!   everything after"; results published by the killed source after the
//!   cut are duplicates downstream, and only those;
//! - the fence: leave-running `ms2m checkpoint`, the source goes on, `ms2m
//!   fence --kill`, `ms2m restore`: the restored instance's replayed
//!   publishes are suppressed, every result downstream exactly once (lapin
//!   and pika); a fence for a checkpoint that is not the newest is refused;
//! - a leave-running checkpoint at ~1000 msg/s: the processing pause as the
//!   consumer's own timestamps show it (printed), nothing lost or repeated;
//! - a quiesce that times out (the consumer SIGSTOPped): `quiesce.complete`
//!   false and the in-doubt deliveries recorded;
//! - a broker restart while the tap idles, a broker unreachable at
//!   checkpoint time, hostile frames against the tap.
//!
//! Needs the usual prerequisites plus ms2m's RabbitMQ node
//! (`hack/start-rabbitmq.sh`) and the release shim installed.

use std::path::Path;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ms2m_runtime_tests::amqp::{
    collect_results, connect_logged_at, consumer_run_opts, consumer_state, digest_of,
    manifest_json, queue_cut, rabbitmq_available, rabbitmqctl, restart_broker_app,
    wait_consumer_connects, wait_consumer_count, Checker, Client, Producer, ProducerConfig,
    QueueKind, ResultMsg, TestQueues,
};
use ms2m_runtime_tests::{ctr, env, ms2m, wait_until, Container, TestDir};

/// Broker tests take it shared; those that stop the broker exclusively.
static BROKER: RwLock<()> = RwLock::new(());

/// The hold of [`BROKER`] a test keeps until its end (the guards are held
/// for their drop, never read).
enum BrokerLock {
    Shared(#[allow(dead_code)] RwLockReadGuard<'static, ()>),
    Exclusive(#[allow(dead_code)] RwLockWriteGuard<'static, ()>),
}

/// What every broker test starts from: the prerequisites checked (loudly),
/// [`BROKER`] taken (exclusively when the test stops the broker), a test
/// directory and fresh queues of `kind`, both named `name`. Bind the lock
/// first (`let (_lock, td, q) = ...`) so it is released last.
fn broker_test(name: &str, kind: QueueKind, exclusive: bool) -> (BrokerLock, TestDir, TestQueues) {
    env();
    rabbitmq_available();
    let lock = if exclusive {
        BrokerLock::Exclusive(BROKER.write().unwrap_or_else(|e| e.into_inner()))
    } else {
        BrokerLock::Shared(BROKER.read().unwrap_or_else(|e| e.into_inner()))
    };
    (lock, TestDir::new(name), TestQueues::new(name, kind))
}

/// What the app inside the container uses: the tap on its own loopback.
const APP_URL: &str = "amqp://guest:guest@localhost:5672/%2f";
/// The real broker, as the shim (host network namespace) reaches it.
const UPSTREAM: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// `ms2m restore [extra] ID FROM` with the restored task's output in
/// `<td>/<name>.restored.log`; returns the command's outcome and the log.
fn restore_logged(
    td: &TestDir,
    name: &str,
    c: &Container,
    from: &str,
    extra: &[&str],
) -> (ms2m_runtime_tests::CmdOut, std::path::PathBuf) {
    let log = td.join(&format!("{name}.restored.log"));
    let mut args = vec!["restore"];
    args.extend_from_slice(extra);
    args.extend(["--log", path_str(&log), &c.id, from]);
    (ms2m(&args), log)
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A consumer of `q` in a container of its own network namespace, behind
/// the tap. Extra `ctr run` flags in `extra`.
fn start_consumer(
    client: Client,
    q: &TestQueues,
    td: &TestDir,
    name: &str,
    extra: &[String],
) -> Container {
    let log = td.join(&format!("{name}.log"));
    let net = [
        format!("--annotation=io.ms2m.tap.upstream={UPSTREAM}"),
        format!("--env=AMQP_URL={APP_URL}"),
    ];
    let mut opts = consumer_run_opts(client, q, name, &log, &net);
    for f in extra {
        opts = opts.flag(f);
    }
    let c = Container::run(&format!("bc-{name}"), opts);
    wait_consumer_connects(&c, 1, Duration::from_secs(30));
    c
}

/// Results ordered by processing time.
fn by_time(results: &[ResultMsg]) -> Vec<ResultMsg> {
    let mut r = results.to_vec();
    r.sort_by_key(|m| m.processed_at_us);
    r
}

/// Asserts no loss, no duplicate, order kept, and that the consumer's own
/// state is exactly that of `1..=n`.
fn assert_exact(c: &Container, name: &str, produced: &[u64], results: &[ResultMsg], n: u64) {
    let report = Checker::new(produced.iter().copied()).check(results);
    eprintln!("{name}: {report}");
    assert!(report.is_clean(), "{name}: {report}");
    assert_eq!(report.processed_unique as u64, n, "{name}: {report}");
    assert_eq!(results.len() as u64, n, "{name}: surplus results: {report}");
    let state = wait_consumer_count(c, n, Duration::from_secs(10));
    assert_eq!(state.count, n, "{name}: state {state:?}");
    assert_eq!(
        state.digest,
        digest_of(1..=n),
        "{name}: state digest is not that of 1..={n} in order: {state:?}"
    );
}

/// The cut is consistent with the consumer's processing: every result
/// processed before the capture is at or below the cut, every one after is
/// above it, and the cut equals the count at the capture.
fn assert_cut_consistent(name: &str, results: &[ResultMsg], cut_seq: u64, captured_at_ms: u64) {
    let at_us = captured_at_ms * 1000;
    let before: Vec<&ResultMsg> = results
        .iter()
        .filter(|r| r.processed_at_us < at_us)
        .collect();
    let max_before = before.iter().map(|r| r.seq).max().unwrap_or(0);
    assert_eq!(
        max_before, cut_seq,
        "{name}: the last seq processed before the cut's capture must be the cut"
    );
    assert_eq!(
        before.len() as u64,
        cut_seq,
        "{name}: results before the cut"
    );
    for r in results.iter().filter(|r| r.processed_at_us >= at_us) {
        assert!(
            r.seq > cut_seq,
            "{name}: seq {} processed after the capture but at/below the cut {cut_seq}",
            r.seq
        );
    }
}

/// The largest gap between consecutive processing timestamps within
/// `window_us` of `around_us`, ms.
fn max_gap_ms(results: &[ResultMsg], around_us: u64, window_us: u64) -> f64 {
    let r = by_time(results);
    r.windows(2)
        .filter(|w| {
            w[1].processed_at_us + window_us >= around_us
                && w[0].processed_at_us <= around_us + window_us
        })
        .map(|w| (w[1].processed_at_us - w[0].processed_at_us) as f64 / 1000.0)
        .fold(0.0, f64::max)
}

/// Exit checkpoint mid-stream, messages pile up for 1 s, restore.
fn exit_checkpoint_and_restore(kind: QueueKind) {
    let (_lock, td, q) = broker_test(&format!("bc-exit-{}", kind.as_str()), kind, false);
    let name = format!("lapin-exit-{}", kind.as_str());
    let c = start_consumer(Client::Lapin, &q, &td, &name, &[]);
    const N: u64 = 1500;
    let producer = Producer::start(ProducerConfig::new(&q.queue, N, 300));
    wait_consumer_count(&c, 300, Duration::from_secs(20));

    let img = td.join("ck");
    let t0 = Instant::now();
    let out = ms2m(&[
        "checkpoint",
        "--exit",
        "--image-path",
        path_str(&img),
        &c.id,
    ])
    .ok();
    let ckpt_ms = t0.elapsed().as_secs_f64() * 1000.0;
    eprintln!("{}", out.stdout.trim_end());
    let status = c.status();
    assert!(
        status.is_none() || status.as_deref() == Some("STOPPED"),
        "after an exit checkpoint the task is {status:?}"
    );
    let m = manifest_json(&img);
    let broker = &m["broker"];
    eprintln!(
        "{name}: broker section: {}",
        serde_json::to_string_pretty(broker).unwrap_or_default()
    );
    assert_eq!(broker["quiesce"]["complete"], true, "{broker}");
    assert!(
        !broker.to_string().contains("guest:guest"),
        "credentials in the manifest: {broker}"
    );
    assert_eq!(m["options"]["tcp_close"], true);
    let qc = queue_cut(&m, &q.queue);
    assert_eq!(qc["kind"], kind.as_str(), "{qc}");
    assert_eq!(qc["in_flight"], 0, "{qc}");

    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    let (out, restored_log) = restore_logged(&td, &name, &c, path_str(&img), &[]);
    out.ok();
    let restore_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let restored_at = now_us();
    let s = wait_consumer_connects(&c, 2, Duration::from_secs(30));
    let reconnect = connect_logged_at(&restored_log, 2)
        .map(|t| (t as f64 - restored_at as f64) / 1000.0)
        .unwrap_or(f64::NAN);

    let rep = producer.join().unwrap_or_else(|e| panic!("producer: {e}"));
    assert_eq!(rep.confirmed.len() as u64, N);
    let results = collect_results(&q.results, N as usize, Duration::from_secs(30));
    let captured = broker["captured_at_unix_ms"].as_u64().unwrap_or(0);
    let cut_count = results
        .iter()
        .filter(|r| r.processed_at_us < captured * 1000)
        .count() as u64;
    if kind == QueueKind::Stream {
        // A fresh stream starts at offset 0: offset k holds seq k + 1.
        assert_eq!(
            qc["next_offset"].as_u64(),
            Some(cut_count),
            "{name}: next_offset vs the consumer's count at the cut: {qc}"
        );
        assert_cut_consistent(&name, &results, cut_count, captured);
    }
    eprintln!(
        "{name}: checkpoint {ckpt_ms:.0} ms (quiesce {} ms, frozen {:.1} ms), restore {restore_ms:.0} ms, \
         app reconnected {reconnect:.0} ms after the restore returned; cut at {cut_count}; state after restore {s:?}",
        broker["quiesce"]["waited_ms"],
        m["stats"]["frozen_time_us"].as_f64().unwrap_or(f64::NAN) / 1000.0,
    );
    assert_exact(&c, &name, &rep.confirmed, &results, N);
}

#[test]
fn lapin_stream_exit_checkpoint_restore_exactly_once() {
    exit_checkpoint_and_restore(QueueKind::Stream);
}

#[test]
fn lapin_classic_exit_checkpoint_restore_exactly_once() {
    exit_checkpoint_and_restore(QueueKind::Classic);
}

/// Leave-running checkpoint into the content store, the source keeps
/// running (and processing) for a while, is killed, and the checkpoint is
/// restored from the content store.
///
/// What is guaranteed: the restored instance's state is exactly "the cut
/// prefix + everything after" (its digest is that of 1..=N in order), and
/// nothing is lost. The killed source processed (and published results
/// for) messages after the cut: those seqs — and only those, all above the
/// cut — appear twice downstream. Every seq at or below the cut appears
/// exactly once. On a classic queue the same holds through the mirror: the
/// source's tap copied what it settled after the cut into a stream, and the
/// restore replays that before it consumes the queue again.
#[test]
fn pika_stream_leave_running_then_kill_restore_from_content_store() {
    leave_running_then_kill_restore_from_content_store(Client::Pika, QueueKind::Stream, "pika-cs");
}

#[test]
fn lapin_classic_leave_running_then_kill_restore_from_content_store() {
    leave_running_then_kill_restore_from_content_store(
        Client::Lapin,
        QueueKind::Classic,
        "lapin-classic-cs",
    );
}

#[test]
fn pika_classic_leave_running_then_kill_restore_from_content_store() {
    leave_running_then_kill_restore_from_content_store(
        Client::Pika,
        QueueKind::Classic,
        "pika-classic-cs",
    );
}

fn leave_running_then_kill_restore_from_content_store(client: Client, kind: QueueKind, name: &str) {
    let (_lock, td, q) = broker_test(&format!("bc-{name}"), kind, false);
    let c = start_consumer(client, &q, &td, name, &[]);
    const N: u64 = 1200;
    let producer = Producer::start(ProducerConfig::new(&q.queue, N, 300));
    wait_consumer_count(&c, 250, Duration::from_secs(20));

    let out = c.ctr_checkpoint(&[]).ok();
    let reference = out
        .stdout
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or_else(|| panic!("ctr task checkpoint printed no image name: {out}"))
        .to_string();
    assert_eq!(c.status().as_deref(), Some("RUNNING"));
    // The source keeps processing past the cut, then dies.
    std::thread::sleep(Duration::from_millis(700));
    c.kill_and_delete_task();
    let (out, _) = restore_logged(&td, name, &c, &reference, &[]);
    assert!(out.success(), "ms2m restore {} {reference}: {out}", c.id);
    eprintln!("{}", out.stdout.trim_end());
    let _cleanup = ImageCleanup(reference.clone());

    let rep = producer.join().unwrap_or_else(|e| panic!("producer: {e}"));
    assert_eq!(rep.confirmed.len() as u64, N);
    let state = wait_consumer_count(&c, N, Duration::from_secs(30));
    let results = collect_results(&q.results, N as usize + 400, Duration::from_secs(5));
    let report = Checker::new(rep.confirmed.iter().copied()).check(&results);
    eprintln!("{name}: {report}");
    assert!(report.lost.is_empty(), "{name}: {report}");
    assert!(report.unexpected.is_empty(), "{name}: {report}");
    assert_eq!(state.count, N, "restored state {state:?}");
    assert_eq!(
        state.digest,
        digest_of(1..=N),
        "the restored state must be the cut prefix + everything after, in order: {state:?}"
    );
    // The cut: the restored instance's first result is cut + 1.
    let restored_first = by_time(&results)
        .windows(2)
        .find(|w| w[1].seq <= w[0].seq)
        .map(|w| w[1].seq);
    let cut = match restored_first {
        Some(s) => s - 1,
        // The source died exactly at the cut: no repeat at all.
        None => {
            assert!(report.is_clean(), "{report}");
            return;
        }
    };
    for d in &report.duplicated {
        assert!(
            *d > cut,
            "seq {d} at/below the cut {cut} was processed twice: {report}"
        );
    }
    eprintln!(
        "{name}: cut at seq {cut}; {} results of the killed source after the cut are duplicates downstream",
        report.duplicated.len()
    );
}

/// The MS2M cutover with a fence: leave-running `ms2m checkpoint` into a
/// directory, the source keeps processing (and publishing results), a
/// second checkpoint, a fence for the *first* one (refused: it is not the
/// tap's last cut; the source keeps running and processing), then `ms2m
/// fence --kill` for the second, and `ms2m restore` of it. The restored
/// instance replays from the cut with its first publishes suppressed (the
/// ones the source had made after the cut): downstream, every result
/// exactly once, in order, and the restored state is that of 1..=N.
fn leave_running_fence_kill_restore(client: Client, name: &str) {
    leave_running_fence_kill_restore_of(client, QueueKind::Stream, name)
}

fn leave_running_fence_kill_restore_of(client: Client, kind: QueueKind, name: &str) {
    let (_lock, td, q) = broker_test(&format!("bc-{name}"), kind, false);
    let c = start_consumer(client, &q, &td, name, &[]);
    const N: u64 = 1200;
    let producer = Producer::start(ProducerConfig::new(&q.queue, N, 300));
    wait_consumer_count(&c, 150, Duration::from_secs(20));

    let (old, img) = (td.join("ck-old"), td.join("ck"));
    ms2m(&["checkpoint", "--image-path", path_str(&old), &c.id]).ok();
    std::thread::sleep(Duration::from_millis(300));
    ms2m(&["checkpoint", "--image-path", path_str(&img), &c.id]).ok();
    assert_eq!(c.status().as_deref(), Some("RUNNING"));
    // The source keeps processing past the cut.
    std::thread::sleep(Duration::from_millis(700));

    // A fence for a checkpoint that is not the newest is refused, and the
    // source goes on processing.
    let out = ms2m(&["fence", "--image-path", path_str(&old), &c.id]);
    assert!(!out.success(), "fence of a stale checkpoint worked: {out}");
    assert!(out.stderr.contains("not the tap's last cut"), "{out}");
    assert!(!old.join("ms2m-fence.json").exists());
    let n = consumer_state(&c).map(|s| s.count).unwrap_or(0);
    wait_consumer_count(&c, n + 30, Duration::from_secs(10));

    let out = ms2m(&[
        "fence",
        "--kill",
        "--json",
        "--image-path",
        path_str(&img),
        &c.id,
    ])
    .ok();
    let report: serde_json::Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("`ms2m fence --json` did not print JSON ({e}): {out}"));
    let fence = &report["fence"];
    eprintln!("{name}: fence {fence}");
    let after_cut = fence["publishes_after_cut"].as_u64().unwrap_or(0);
    assert!(
        after_cut >= 30,
        "the source published after the cut: {fence}"
    );
    assert_eq!(fence["quiesce"]["complete"], true, "{fence}");
    assert_eq!(
        fence["cut_taken_at_unix_ms"],
        manifest_json(&img)["broker"]["captured_at_unix_ms"],
        "{fence}"
    );
    let status = c.status();
    assert!(
        status.is_none() || status.as_deref() == Some("STOPPED"),
        "after fence --kill the task is {status:?}"
    );
    // `ms2m inspect` shows the fence with the checkpoint.
    let out = ms2m(&["inspect", "--json", path_str(&img)]).ok();
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("`ms2m inspect --json` did not print JSON ({e}): {out}"));
    assert_eq!(v["fence"], *fence, "{out}");
    let out = ms2m(&["inspect", path_str(&img)]).ok();
    assert!(
        out.stdout
            .contains(&format!("fence:       {after_cut} publishes after the cut")),
        "{out}"
    );

    let (out, _) = restore_logged(&td, name, &c, path_str(&img), &["--force"]);
    assert!(out.success(), "ms2m restore: {out}");
    let rep = producer.join().unwrap_or_else(|e| panic!("producer: {e}"));
    assert_eq!(rep.confirmed.len() as u64, N);
    let results = collect_results(&q.results, N as usize, Duration::from_secs(30));
    // (collect_results lingers after N: a surplus would be caught.)
    assert_exact(&c, name, &rep.confirmed, &results, N);
    eprintln!(
        "{name}: {after_cut} publishes of the source after the cut were suppressed on replay"
    );
}

#[test]
fn lapin_stream_fence_kill_restore_publishes_nothing_twice() {
    leave_running_fence_kill_restore(Client::Lapin, "lapin-fence");
}

#[test]
fn pika_stream_fence_kill_restore_publishes_nothing_twice() {
    leave_running_fence_kill_restore(Client::Pika, "pika-fence");
}

/// The same on a classic queue: the fence goes through the newest
/// checkpoint's mirror, and the restore replays it before the queue.
#[test]
fn lapin_classic_fence_kill_restore_publishes_nothing_twice() {
    leave_running_fence_kill_restore_of(Client::Lapin, QueueKind::Classic, "lapin-cfence");
}

#[test]
fn pika_classic_fence_kill_restore_publishes_nothing_twice() {
    leave_running_fence_kill_restore_of(Client::Pika, QueueKind::Classic, "pika-cfence");
}

/// The fence's refusals and its lifetime: with the consumer SIGSTOPped (it
/// cannot ack what it holds) the fence is refused after its quiesce bound
/// and its hold released; a fence without `--kill` is voided (its file
/// removed) by a later checkpoint, which releases the hold; the newest
/// checkpoint fenced with `--kill` and restored is exact.
#[test]
fn fence_refused_when_unsettled_and_voided_by_a_later_checkpoint() {
    let (_lock, td, q) = broker_test("bc-fence-life", QueueKind::Stream, false);
    let name = "lapin-fence-life";
    let c = start_consumer(
        Client::Lapin,
        &q,
        &td,
        name,
        &["--annotation=io.ms2m.tap.quiesce-timeout-ms=300".to_string()],
    );
    const N: u64 = 1500;
    let producer = Producer::start(ProducerConfig::new(&q.queue, N, 300));
    wait_consumer_count(&c, 100, Duration::from_secs(20));
    let (first, second) = (td.join("ck1"), td.join("ck2"));
    ms2m(&["checkpoint", "--image-path", path_str(&first), &c.id]).ok();

    // Stopped, the app cannot settle what the tap hands it.
    let pid = c.pid().to_string();
    let stop = std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status();
    assert!(
        stop.map(|s| s.success()).unwrap_or(false),
        "kill -STOP {pid}"
    );
    std::thread::sleep(Duration::from_millis(200));
    let out = ms2m(&["fence", "--kill", "--image-path", path_str(&first), &c.id]);
    let cont = std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status();
    assert!(
        cont.map(|s| s.success()).unwrap_or(false),
        "kill -CONT {pid}"
    );
    assert!(!out.success(), "fence of a stopped app worked: {out}");
    assert!(out.stderr.contains("did not settle"), "{out}");
    assert!(!first.join("ms2m-fence.json").exists());
    assert_eq!(c.status().as_deref(), Some("RUNNING"));
    // The hold was released: the consumer goes on.
    let n = consumer_state(&c).map(|s| s.count).unwrap_or(0);
    wait_consumer_count(&c, n + 30, Duration::from_secs(10));

    // A fence without --kill, then a later checkpoint: the fence is void.
    ms2m(&["fence", "--image-path", path_str(&first), &c.id]).ok();
    assert!(first.join("ms2m-fence.json").exists());
    ms2m(&["checkpoint", "--image-path", path_str(&second), &c.id]).ok();
    assert!(
        !first.join("ms2m-fence.json").exists(),
        "a checkpoint after the fence must remove it"
    );
    let n = consumer_state(&c).map(|s| s.count).unwrap_or(0);
    wait_consumer_count(&c, n + 30, Duration::from_secs(10));

    ms2m(&["fence", "--kill", "--image-path", path_str(&second), &c.id]).ok();
    let out = ms2m(&["restore", &c.id, path_str(&second)]);
    assert!(out.success(), "ms2m restore: {out}");
    let rep = producer.join().unwrap_or_else(|e| panic!("producer: {e}"));
    let results = collect_results(&q.results, N as usize, Duration::from_secs(30));
    assert_exact(&c, name, &rep.confirmed, &results, N);
}

/// A classic-queue consumer's older leave-running checkpoint cannot be
/// restored exactly once a newer one replaced its mirror: the restore fails
/// and names the reason, and starts nothing; the newest one, fenced and
/// killed, restores exactly.
#[test]
fn classic_restore_of_a_replaced_checkpoint_is_refused() {
    let (_lock, td, q) = broker_test("bc-classic-old", QueueKind::Classic, false);
    let name = "lapin-classic-old";
    let c = start_consumer(Client::Lapin, &q, &td, name, &[]);
    const N: u64 = 900;
    let producer = Producer::start(ProducerConfig::new(&q.queue, N, 300));
    wait_consumer_count(&c, 100, Duration::from_secs(20));
    let (old, img) = (td.join("ck-old"), td.join("ck"));
    ms2m(&["checkpoint", "--image-path", path_str(&old), &c.id]).ok();
    assert!(
        manifest_json(&old)["broker"]["mirrors"]
            .as_object()
            .is_some_and(|m| m.contains_key(&q.queue)),
        "the cut names the queue's mirror: {}",
        manifest_json(&old)["broker"]
    );
    std::thread::sleep(Duration::from_millis(300));
    ms2m(&["checkpoint", "--image-path", path_str(&img), &c.id]).ok();
    std::thread::sleep(Duration::from_millis(300));
    ms2m(&["fence", "--kill", "--image-path", path_str(&img), &c.id]).ok();

    let out = ms2m(&["restore", &c.id, path_str(&old)]);
    assert!(
        !out.success(),
        "restore of a replaced checkpoint worked: {out}"
    );
    assert!(
        out.stderr.contains("mirror stream") && out.stderr.contains("is gone"),
        "{out}"
    );
    let st = c.status();
    assert!(
        st.is_none() || st.as_deref() == Some("STOPPED"),
        "a refused restore left the task {st:?}"
    );
    let out = ms2m(&["restore", "--force", &c.id, path_str(&img)]);
    assert!(out.success(), "ms2m restore of the newest: {out}");
    let rep = producer.join().unwrap_or_else(|e| panic!("producer: {e}"));
    let results = collect_results(&q.results, N as usize, Duration::from_secs(30));
    assert_exact(&c, name, &rep.confirmed, &results, N);
}

/// Removes a checkpoint image from the content store on drop.
struct ImageCleanup(String);

impl Drop for ImageCleanup {
    fn drop(&mut self) {
        let _ = ctr(&["images", "rm", &self.0]);
    }
}

/// A leave-running checkpoint at ~1000 msg/s: the consumer continues on its
/// connection, nothing lost or repeated; prints the processing pause.
#[test]
fn leave_running_checkpoint_processing_pause_at_1000_per_s() {
    let (_lock, td, q) = broker_test("bc-lr", QueueKind::Stream, false);
    let name = "lapin-lr";
    let c = start_consumer(Client::Lapin, &q, &td, name, &[]);
    const N: u64 = 4000;
    let producer = Producer::start(ProducerConfig::new(&q.queue, N, 1000));
    wait_consumer_count(&c, 1000, Duration::from_secs(20));
    let img = td.join("ck");
    let t0 = now_us();
    ms2m(&["checkpoint", "--image-path", path_str(&img), &c.id]).ok();
    let t1 = now_us();
    assert_eq!(c.status().as_deref(), Some("RUNNING"));
    let m = manifest_json(&img);
    let rep = producer.join().unwrap_or_else(|e| panic!("producer: {e}"));
    let results = collect_results(&q.results, N as usize, Duration::from_secs(30));
    let gap = max_gap_ms(&results, (t0 + t1) / 2, (t1 - t0) / 2 + 200_000);
    let baseline = max_gap_ms(&results, t0.saturating_sub(1_500_000), 400_000);
    eprintln!(
        "{name}: leave-running checkpoint {:.0} ms wall; quiesce {} ms; CRIU frozen {:.1} ms; \
         frozen-window hook {:.2} ms; processing pause (largest gap between consecutive \
         results around the checkpoint) {gap:.1} ms (largest gap 1.5 s before: {baseline:.1} ms)",
        (t1 - t0) as f64 / 1000.0,
        m["broker"]["quiesce"]["waited_ms"],
        m["stats"]["frozen_time_us"].as_f64().unwrap_or(f64::NAN) / 1000.0,
        m["frozen_window"]["hook_duration_ms"]
            .as_f64()
            .unwrap_or(f64::NAN),
    );
    assert_eq!(m["broker"]["quiesce"]["complete"], true);
    let qc = queue_cut(&m, &q.queue);
    let captured = m["broker"]["captured_at_unix_ms"].as_u64().unwrap_or(0);
    let cut = qc["next_offset"]
        .as_u64()
        .expect("a stream cut has next_offset");
    assert_cut_consistent(name, &results, cut, captured);
    assert_exact(&c, name, &rep.confirmed, &results, N);
}

/// The consumer cannot settle its deliveries: the broker's memory alarm
/// blocks every publishing connection, so the consumer's confirmed result
/// publish (and the ack after it) never completes. The quiesce times out,
/// the cut records the in-doubt deliveries; once the alarm clears the
/// consumer (left running) loses nothing. (A SIGSTOPped consumer would be
/// the obvious stall, but CRIU cannot seize stopped threads in a frozen
/// cgroup: "Zombies with threads are not supported".)
#[test]
fn quiesce_timeout_records_in_doubt_deliveries() {
    let (_lock, td, q) = broker_test("bc-qt", QueueKind::Stream, true);
    let name = "lapin-qt";
    let c = start_consumer(
        Client::Lapin,
        &q,
        &td,
        name,
        &["--annotation=io.ms2m.tap.quiesce-timeout-ms=300".to_string()],
    );
    // A backlog first (published as fast as confirms allow): the consumer
    // must still be receiving deliveries when the alarm blocks its result
    // publishes, or it would simply idle with nothing in flight.
    const N: u64 = 3000;
    let rep = Producer::run(ProducerConfig::new(&q.queue, N, 0));
    let s = wait_consumer_count(&c, 50, Duration::from_secs(20));
    assert!(
        s.count < N / 2,
        "the consumer is too fast for this test: {s:?}"
    );
    struct Watermark;
    impl Drop for Watermark {
        fn drop(&mut self) {
            let _ = rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"]);
        }
    }
    rabbitmqctl(&["set_vm_memory_high_watermark", "0.00001"]).ok();
    let alarm = Watermark;
    // Stalled: the count stops moving.
    let mut last = consumer_state(&c).map(|s| s.count).unwrap_or(0);
    wait_until(
        "the consumer to stall under the memory alarm",
        Duration::from_secs(20),
        Duration::from_millis(700),
        || {
            let now = consumer_state(&c).map(|s| s.count).unwrap_or(0);
            let stalled = now == last;
            last = now;
            stalled.then_some(())
        },
    );
    let img = td.join("ck");
    ms2m(&["checkpoint", "--image-path", path_str(&img), &c.id]).ok();
    drop(alarm);
    let m = manifest_json(&img);
    let b = &m["broker"];
    eprintln!(
        "{name}: {}",
        serde_json::to_string_pretty(b).unwrap_or_default()
    );
    assert_eq!(b["quiesce"]["complete"], false, "{b}");
    assert!(
        b["quiesce"]["waited_ms"].as_u64().unwrap_or(0) >= 300,
        "{b}"
    );
    let qc = queue_cut(&m, &q.queue);
    let in_doubt = qc["in_doubt"].as_array().cloned().unwrap_or_default();
    assert!(
        !in_doubt.is_empty(),
        "no in-doubt deliveries recorded: {qc}"
    );
    assert_eq!(in_doubt.len() as u64, qc["in_flight"].as_u64().unwrap_or(0));
    let next = qc["next_offset"].as_u64().unwrap_or(0);
    assert_eq!(next, last, "the cut is the consumer's count: {qc}");
    for d in &in_doubt {
        let off = d["stream_offset"]
            .as_u64()
            .expect("stream deliveries carry offsets");
        assert!(
            off >= next,
            "in-doubt offset {off} below the cut {next}: {qc}"
        );
    }
    assert_eq!(c.status().as_deref(), Some("RUNNING"));
    let results = collect_results(&q.results, N as usize, Duration::from_secs(30));
    assert_exact(&c, name, &rep.confirmed, &results, N);
}

/// Publishes `first..first+100` at 500 msg/s, collects their 100 results,
/// and adds both to `produced` and `results`.
fn round_of_100(q: &TestQueues, first: u64, produced: &mut Vec<u64>, results: &mut Vec<ResultMsg>) {
    produced.extend(
        Producer::run(ProducerConfig::new(&q.queue, 100, 500).starting_at(first)).confirmed,
    );
    results.extend(collect_results(&q.results, 100, Duration::from_secs(30)));
}

/// The broker restarts while the tap idles: the consumer reconnects
/// through the tap and keeps consuming.
#[test]
fn broker_restart_while_tap_idle() {
    let (_lock, td, q) = broker_test("bc-restart", QueueKind::Classic, true);
    let name = "lapin-restart";
    let c = start_consumer(Client::Lapin, &q, &td, name, &[]);
    let (mut produced, mut results) = (Vec::new(), Vec::new());
    round_of_100(&q, 1, &mut produced, &mut results);
    wait_consumer_count(&c, 100, Duration::from_secs(10));
    restart_broker_app(|| std::thread::sleep(Duration::from_millis(500)));
    let s = wait_consumer_connects(&c, 2, Duration::from_secs(30));
    eprintln!("{name}: reconnected through the tap: {s:?}");
    round_of_100(&q, 101, &mut produced, &mut results);
    assert_exact(&c, name, &produced, &results, 200);
}

/// The broker is down at checkpoint time. Documented behaviour: the
/// checkpoint succeeds with the cut the tap has (`upstream_reachable`
/// false; the quiesce is complete because a dead broker connection leaves
/// nothing in flight) and the container keeps running; it reconnects when
/// the broker is back and loses nothing.
#[test]
fn broker_unreachable_at_checkpoint() {
    let (_lock, td, q) = broker_test("bc-down", QueueKind::Stream, true);
    let name = "lapin-down";
    let c = start_consumer(Client::Lapin, &q, &td, name, &[]);
    let (mut produced, mut results) = (Vec::new(), Vec::new());
    round_of_100(&q, 1, &mut produced, &mut results);
    wait_consumer_count(&c, 100, Duration::from_secs(10));
    let img = td.join("ck");
    let mut out = None;
    restart_broker_app(|| {
        out = Some(ms2m(&["checkpoint", "--image-path", path_str(&img), &c.id]));
    });
    let out = out.expect("the checkpoint ran");
    assert!(out.success(), "checkpoint with the broker down: {out}");
    assert_eq!(c.status().as_deref(), Some("RUNNING"));
    let m = manifest_json(&img);
    let b = &m["broker"];
    eprintln!(
        "{name}: {}",
        serde_json::to_string_pretty(b).unwrap_or_default()
    );
    assert_eq!(b["upstream_reachable"], false, "{b}");
    assert_eq!(b["quiesce"]["complete"], true, "{b}");
    assert_eq!(queue_cut(&m, &q.queue)["next_offset"], 100, "{b}");
    wait_consumer_connects(&c, 2, Duration::from_secs(30));
    round_of_100(&q, 101, &mut produced, &mut results);
    assert_exact(&c, name, &produced, &results, 200);
}

/// The broker restarts while a restored consumer replays its backlog after
/// an exit checkpoint. The tap closes the app's connection with the
/// broker's, the app reconnects through the tap, and the tap resumes the
/// stream at its own progress (the last offset the app acked + 1), not at
/// the checkpoint's cut again: the replay goes on from where it was.
///
/// What the broker restart can double is the app's own business and the
/// same without ms2m: a result the app had published when the broker went
/// away, but whose confirm it never got, is published again when the
/// message comes back (at-least-once publishing), and a message whose ack
/// had not reached the broker is delivered and processed again (the app
/// does not deduplicate). The consumer handles one delivery at a time, so
/// that is at most one message; it must be the one in flight at the
/// restart. Nothing the app had acked is processed again,
/// and nothing is lost. On a classic queue the broker redelivers what was
/// not acked, as it would to any consumer.
fn broker_restart_mid_replay(kind: QueueKind) {
    let (_lock, td, q) = broker_test(&format!("bc-replay-restart-{}", kind.as_str()), kind, true);
    let name = &format!("lapin-replay-restart-{}", kind.as_str());
    // ~2 ms of work a message: the backlog takes seconds to replay.
    let c = start_consumer(Client::Lapin, &q, &td, name, &["--env=WORK_US=2000".into()]);
    const N: u64 = 3000;
    let producer = Producer::start(ProducerConfig::new(&q.queue, N, 3000));
    wait_consumer_count(&c, 200, Duration::from_secs(20));
    let img = td.join("ck");
    ms2m(&[
        "checkpoint",
        "--exit",
        "--image-path",
        path_str(&img),
        &c.id,
    ])
    .ok();
    let cut = queue_cut(&manifest_json(&img), &q.queue)["acked"]
        .as_u64()
        .expect("the queue's cut counts what the app acked");
    // Everything is in the queue before the broker restarts (the test's
    // producer does not reconnect).
    let rep = producer.join().unwrap_or_else(|e| panic!("producer: {e}"));
    assert_eq!(rep.confirmed.len() as u64, N);

    restore_logged(&td, name, &c, path_str(&img), &[]).0.ok();
    let before = wait_consumer_count(&c, cut + 400, Duration::from_secs(30));
    let mut at_restart = None;
    restart_broker_app(|| {
        at_restart = consumer_state(&c);
        std::thread::sleep(Duration::from_millis(500));
    });
    let at_restart = at_restart.expect("the consumer's state while the broker was down");
    assert!(
        at_restart.count < N,
        "{name}: the replay was over before the broker restarted ({at_restart:?}); nothing was tested"
    );
    let s = wait_consumer_connects(&c, 3, Duration::from_secs(60));
    eprintln!("{name}: cut {cut}; {before:?} before the restart, {at_restart:?} while down; reconnected: {s:?}");

    let results = collect_results(&q.results, N as usize, Duration::from_secs(60));
    assert_exact_but_the_in_flight_one(&c, name, &rep.confirmed, &results, N, &at_restart);
}

#[test]
fn broker_restart_mid_replay_resumes_at_the_taps_progress_stream() {
    broker_restart_mid_replay(QueueKind::Stream)
}

#[test]
fn broker_restart_mid_replay_resumes_at_the_taps_progress_classic() {
    broker_restart_mid_replay(QueueKind::Classic)
}

/// The broker restarts twice around a fence. First while a source is
/// fenced (`ms2m fence` without `--kill`: its deliveries held, its
/// publishes after the cut counted): the app reconnects through the tap,
/// and the tap keeps holding what the broker delivers on the new
/// connection, so the fenced source processes and publishes nothing more.
/// Then, killed and restored, while the restored instance replays with
/// publishes still to suppress: the suppression goes on across the app's
/// reconnect. Every result exactly once.
#[test]
fn broker_restarts_during_a_fence_and_its_replay_publish_nothing_twice() {
    let (_lock, td, q) = broker_test("bc-fence-restart", QueueKind::Stream, true);
    let name = "lapin-fence-restart";
    // ~5 ms of work a message (~200 msg/s): the suppressed replay lasts
    // about 2 s, long enough to restart the broker inside it.
    let c = start_consumer(Client::Lapin, &q, &td, name, &["--env=WORK_US=5000".into()]);
    const N: u64 = 1500;
    let producer = Producer::start(ProducerConfig::new(&q.queue, N, 500));
    wait_consumer_count(&c, 150, Duration::from_secs(20));
    let img = td.join("ck");
    ms2m(&["checkpoint", "--image-path", path_str(&img), &c.id]).ok();
    let cut = queue_cut(&manifest_json(&img), &q.queue)["next_offset"]
        .as_u64()
        .expect("the stream's cut has a next_offset");
    // The source goes on past the cut, then is fenced.
    std::thread::sleep(Duration::from_secs(2));
    let out = ms2m(&["fence", "--json", "--image-path", path_str(&img), &c.id]).ok();
    let report: serde_json::Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("`ms2m fence --json` did not print JSON ({e}): {out}"));
    let after_cut = report["fence"]["publishes_after_cut"].as_u64().unwrap_or(0);
    assert!(
        after_cut >= 200,
        "the source published after the cut: {report}"
    );
    let rep = producer.join().unwrap_or_else(|e| panic!("producer: {e}"));
    assert_eq!(rep.confirmed.len() as u64, N);
    let fenced = consumer_state(&c).expect("the fenced source's state");
    assert!(
        fenced.count < N,
        "{name}: fenced after the last message: {fenced:?}"
    );

    // 1. During the fence.
    restart_broker_app(|| std::thread::sleep(Duration::from_millis(500)));
    let s = wait_consumer_connects(&c, 2, Duration::from_secs(30));
    // Long enough for a reconnected, unfenced consumer to take hundreds.
    std::thread::sleep(Duration::from_millis(1500));
    let later = consumer_state(&c).expect("the fenced source's state");
    eprintln!(
        "{name}: cut {cut}, fence {report}; fenced at {fenced:?}; reconnected {s:?}; 1.5 s later {later:?}"
    );
    assert_eq!(
        (later.count, later.last_seq),
        (fenced.count, fenced.last_seq),
        "{name}: the fenced source processed after the broker restart"
    );
    assert_eq!(c.status().as_deref(), Some("RUNNING"));

    // 2. During the restored instance's suppressed replay.
    c.kill_and_delete_task();
    restore_logged(&td, name, &c, path_str(&img), &[]).0.ok();
    wait_consumer_count(&c, cut + 100, Duration::from_secs(30));
    let mut at_restart = None;
    restart_broker_app(|| at_restart = consumer_state(&c));
    let at_restart = at_restart.expect("the restored consumer's state while the broker was down");
    assert!(
        at_restart.count < cut + after_cut,
        "{name}: the suppressed replay was over before the broker went down \
         ({at_restart:?}, cut {cut}, {after_cut} to suppress); nothing was tested"
    );
    let s = wait_consumer_connects(&c, 3, Duration::from_secs(60));
    eprintln!("{name}: restored; {at_restart:?} while the broker was down; reconnected {s:?}");
    let results = collect_results(&q.results, N as usize, Duration::from_secs(60));
    assert_exact_but_the_in_flight_one(&c, name, &rep.confirmed, &results, N, &at_restart);
}

/// After a broker restart while the consumer worked: exact, except for
/// the app's own at-least-once around the one message in flight (it
/// handles one at a time), which is the same without ms2m. Its result may
/// be published again (its confirm was lost), or, when its ack had not
/// reached the broker (classic) or the tap (stream), it is delivered and
/// processed again: then the app's state holds it twice, right after
/// itself, and with publishes still to suppress its second result takes a
/// suppression, so the duplicate downstream is the last suppressed one.
/// Nothing is lost either way, and nothing else comes twice.
fn assert_exact_but_the_in_flight_one(
    c: &Container,
    name: &str,
    produced: &[u64],
    results: &[ResultMsg],
    n: u64,
    at_restart: &ms2m_runtime_tests::amqp::ConsumerState,
) {
    let report = Checker::new(produced.iter().copied()).check(results);
    eprintln!("{name}: {report}");
    assert!(report.lost.is_empty(), "{name}: lost: {report}");
    assert!(report.unexpected.is_empty(), "{name}: {report}");
    assert!(
        report.duplicated.len() <= 1,
        "{name}: more than the in-flight message came twice: {report}"
    );
    let state = wait_consumer_count(c, n, Duration::from_secs(30));
    let in_flight = [at_restart.last_seq, at_restart.last_seq + 1];
    let once = (state.count, state.digest) == (n, digest_of(1..=n));
    let twice = in_flight.iter().any(|&d| {
        let again = (1..=d).chain(std::iter::once(d)).chain(d + 1..=n);
        (state.count, state.digest) == (n + 1, digest_of(again))
    });
    assert!(
        once || twice,
        "{name}: the state is neither that of 1..={n} in order nor that with the in-flight \
         message ({in_flight:?}) twice: {state:?}; {report}"
    );
    if once {
        for &d in &report.duplicated {
            assert!(
                in_flight.contains(&d),
                "{name}: seq {d} came twice, but {in_flight:?} was in flight at the restart: {report}"
            );
        }
    }
}

/// Garbage and an oversized frame header sent to the tap from inside the
/// container: those connections are closed, the consumer in the same
/// container is unaffected, the shim answers.
#[test]
fn hostile_frames_against_the_tap() {
    let (_lock, td, q) = broker_test("bc-hostile", QueueKind::Classic, false);
    let name = "lapin-hostile";
    let c = start_consumer(Client::Lapin, &q, &td, name, &[]);
    let producer = Producer::start(ProducerConfig::new(&q.queue, 500, 500));
    for script in [
        // Not AMQP at all.
        "printf 'garbage\\r\\n\\r\\n' | nc -w 3 127.0.0.1 5672; echo rc=$?",
        // A valid protocol header, then a method frame claiming ~4 GiB.
        "printf 'AMQP\\000\\000\\011\\001\\001\\000\\000\\377\\377\\377\\360xxxx' | nc -w 3 127.0.0.1 5672; echo rc=$?",
        // A frame with a bad end octet.
        "printf 'AMQP\\000\\000\\011\\001\\001\\000\\000\\000\\000\\000\\004abcd\\177' | nc -w 3 127.0.0.1 5672; echo rc=$?",
    ] {
        let t0 = Instant::now();
        let out = c.exec(&["sh", "-c", script]);
        eprintln!(
            "hostile {script:?}: {:.0} ms: {}",
            t0.elapsed().as_secs_f64() * 1000.0,
            out.stdout.trim()
        );
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "the tap did not close the hostile connection"
        );
        assert_eq!(c.status().as_deref(), Some("RUNNING"));
    }
    let rep = producer.join().unwrap_or_else(|e| panic!("producer: {e}"));
    let results = collect_results(&q.results, 500, Duration::from_secs(30));
    assert_exact(&c, name, &rep.confirmed, &results, 500);
    let s = wait_consumer_count(&c, 500, Duration::from_secs(5));
    assert_eq!(
        s.connects, 1,
        "the consumer's connection was disturbed: {s:?}"
    );
}

/// Bad tap annotations fail the create with a clear error and no
/// credentials in it; the container is not created.
#[test]
fn bad_tap_annotation_fails_create() {
    env();
    let td = TestDir::new("bc-bad");
    let _ = &td;
    for (ann, what) in [
        (
            "io.ms2m.tap.upstream=http://guest:s3cret@127.0.0.1",
            "io.ms2m.tap.upstream",
        ),
        ("io.ms2m.tap.port=99999", "io.ms2m.tap.port"),
    ] {
        let id = ms2m_runtime_tests::unique_id("bc-bad");
        let e = env();
        let mut args = vec![
            "run".to_string(),
            "-d".into(),
            "--null-io".into(),
            "--runtime".into(),
            e.runtime.clone(),
            format!("--annotation={UPSTREAM_OK}"),
            format!("--annotation={ann}"),
            e.image.clone(),
            id.clone(),
            "sleep".into(),
            "60".into(),
        ];
        if ann.starts_with("io.ms2m.tap.upstream") {
            args.remove(5);
        }
        let out = ctr(&args);
        let _c = Container::adopt(&id);
        assert!(!out.success(), "create with {ann} worked: {out}");
        assert!(out.stderr.contains(what), "{ann}: {out}");
        assert!(
            !out.stderr.contains("s3cret"),
            "credentials in the error: {out}"
        );
        assert!(
            !ctr(&["task", "ls"]).stdout.contains(&id),
            "a task exists after the failed create"
        );
    }
}

const UPSTREAM_OK: &str = "io.ms2m.tap.upstream=amqp://guest:guest@127.0.0.1:5672/%2f";

/// Failed checkpoints never leave deliveries held: a dump into a read-only
/// directory fails after the quiesce (the tap is released, the consumer
/// goes on), and a forced `runc` strategy is refused before anything is
/// held. Nothing is lost either way.
#[test]
fn failed_checkpoints_release_the_tap() {
    let (_lock, td, q) = broker_test("bc-fail", QueueKind::Stream, false);
    let name = "lapin-fail";
    let c = start_consumer(
        Client::Lapin,
        &q,
        &td,
        name,
        &["--annotation=io.ms2m.checkpoint.strategy=runc".to_string()],
    );
    const N: u64 = 900;
    let producer = Producer::start(ProducerConfig::new(&q.queue, N, 300));
    wait_consumer_count(&c, 100, Duration::from_secs(20));
    let out = ms2m(&[
        "checkpoint",
        "--image-path",
        path_str(&td.join("runc")),
        &c.id,
    ]);
    assert!(
        !out.success(),
        "a tap with a forced runc strategy was checkpointed"
    );
    assert!(out.stderr.contains("direct strategy"), "{out}");
    goes_on_then_exact(&c, name, &q, producer, N);
}

#[test]
fn failed_dump_releases_the_tap() {
    let (_lock, td, q) = broker_test("bc-faildump", QueueKind::Stream, false);
    let name = "lapin-faildump";
    let c = start_consumer(Client::Lapin, &q, &td, name, &[]);
    const N: u64 = 900;
    let producer = Producer::start(ProducerConfig::new(&q.queue, N, 300));
    wait_consumer_count(&c, 100, Duration::from_secs(20));
    let ro = td.join("ro");
    ms2m_runtime_tests::mount_readonly_tmpfs(&td, &ro);
    let out = ms2m(&["checkpoint", "--image-path", path_str(&ro), &c.id]);
    assert!(
        !out.success(),
        "a checkpoint into a read-only tmpfs worked: {out}"
    );
    goes_on_then_exact(&c, name, &q, producer, N);
}

/// After a failed checkpoint the consumer runs and deliveries flow again
/// (a held tap would stall it: 50 more are processed); then all `n` of
/// `producer`'s messages are processed exactly once.
fn goes_on_then_exact(c: &Container, name: &str, q: &TestQueues, producer: Producer, n: u64) {
    assert_eq!(c.status().as_deref(), Some("RUNNING"));
    let before = wait_consumer_count(c, 1, Duration::from_secs(5)).count;
    wait_consumer_count(c, before + 50, Duration::from_secs(10));
    let rep = producer.join().unwrap_or_else(|e| panic!("producer: {e}"));
    let results = collect_results(&q.results, n as usize, Duration::from_secs(30));
    assert_exact(c, name, &rep.confirmed, &results, n);
}
