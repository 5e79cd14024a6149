//! The soak, short (issue 9): the lapin consumer behind ms2m's tap on a
//! stream under steady load for 2 minutes (`MS2M_SOAK_SECONDS`, default
//! 120), a leave-running `ms2m checkpoint` every 10 s and an exit
//! checkpoint and `ms2m restore` every 60 s in its place; then every checkpoint and
//! restore succeeded, the checker finds 0 lost, 0 duplicated, 0 out of
//! order, the consumer's own state is that of every produced message once
//! in order, and the shim's and the consumer's RSS stay flat. The
//! 30-minute run is `hack/bench.sh soak` (docs/benchmarks.md).
//!
//! Needs ms2m's RabbitMQ node (`hack/start-rabbitmq.sh`) besides the usual
//! prerequisites; it runs in the `rabbitmq` test group.

use std::time::Duration;

use ms2m_runtime_tests::soak::{run, Mode, OpKind, SoakConfig};

/// The offered rate, the 5,000 msg/s. The test consumer processes
/// [`BATCH`] deliveries per confirm round trip (one at a time it tops out
/// at ~1,500 msg/s alone and ~400 msg/s beside a producer on this 2-core
/// machine; docs/benchmarks.md, "Soak").
const RATE: u64 = 5000;
/// The consumer's `BATCH` (and prefetch): results published back to back,
/// then one `multiple` ack once all are confirmed.
const BATCH: usize = 200;
/// How much the shim's VmRSS may grow from the first sample to the last,
/// and above the first at any sample (MiB). The tap's buffers and the
/// shim's allocator reach their working size during the warm-up; a leak of
/// a few bytes per message (600,000 messages) or of a checkpoint's
/// buffers per checkpoint (12) exceeds these.
const SHIM_GROWTH_MIB: f64 = 2.0;
const SHIM_PEAK_MIB: f64 = 6.0;
/// The consumer's (a restored process maps its pages again).
const CONSUMER_GROWTH_MIB: f64 = 4.0;

#[test]
fn soak_two_minutes_checkpoints_and_restores_exactly_once_with_flat_rss() {
    let secs: u64 = std::env::var("MS2M_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let rate: u64 = std::env::var("MS2M_SOAK_RATE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(RATE);
    let mut cfg = SoakConfig::new(Mode::Ms2mTapped, Duration::from_secs(secs), rate, "soak");
    cfg.batch = BATCH;
    let r = run(&cfg);
    let summary = r.summary();
    eprintln!("{summary}\n{}", r.json());

    assert!(
        r.failures.is_empty(),
        "a checkpoint or restore failed:\n{summary}"
    );
    let ticks = secs / 10;
    let exits = secs / 60;
    let n_exit = r
        .ops
        .iter()
        .filter(|o| o.kind == OpKind::ExitRestore)
        .count() as u64;
    let n_leave = r.ops.iter().filter(|o| o.kind == OpKind::Leave).count() as u64;
    assert_eq!(
        (n_leave, n_exit),
        (ticks - exits, exits),
        "(leave-running, exit + restore) cycles done:\n{summary}"
    );
    assert!(
        r.state.connects > exits,
        "the consumer reconnected {} times for {exits} restores:\n{summary}",
        r.state.connects - 1
    );
    assert!(
        r.produced as f64 >= 0.9 * (rate * secs) as f64,
        "the producer fell behind its rate ({} of {}):\n{summary}",
        r.produced,
        rate * secs
    );
    assert!(r.check.is_clean(), "the checker:\n{summary}");
    assert_eq!(r.results, r.produced, "surplus results:\n{summary}");
    assert_eq!(
        r.state.count, r.produced as u64,
        "the consumer's state:\n{summary}"
    );
    assert!(
        r.digest_ok,
        "the consumer's digest is not that of the produced seqs in order:\n{summary}"
    );

    let (shim, cons) = (r.shim_rss(), r.consumer_rss());
    let samples = r
        .samples
        .iter()
        .filter(|s| s.shim_kib > 0 && s.consumer_kib > 0)
        .count();
    assert_eq!(
        samples,
        r.samples.len(),
        "samples without a shim or consumer RSS:\n{summary}"
    );
    assert!(
        shim.end <= shim.start + SHIM_GROWTH_MIB,
        "the shim's RSS grew from {:.2} to {:.2} MiB (bound +{SHIM_GROWTH_MIB} MiB):\n{summary}",
        shim.start,
        shim.end
    );
    assert!(
        shim.max <= shim.start + SHIM_PEAK_MIB,
        "the shim's RSS peaked at {:.2} MiB from {:.2} (bound +{SHIM_PEAK_MIB} MiB):\n{summary}",
        shim.max,
        shim.start
    );
    assert!(
        cons.end <= cons.start + CONSUMER_GROWTH_MIB,
        "the consumer's RSS grew from {:.2} to {:.2} MiB (bound +{CONSUMER_GROWTH_MIB} MiB):\n{summary}",
        cons.start,
        cons.end
    );
}
