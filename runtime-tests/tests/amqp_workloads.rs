//! The AMQP test workloads against the real broker, without a tap: the
//! containers share the host's network (`ctr run --net-host`) and reach
//! ms2m's RabbitMQ node on 127.0.0.1:5672 directly.
//!
//! - Both consumers (ms2m's own `amqp-consumer`, lapin, static; and
//!   `pika_consumer.py`, Python's pika from the host's /usr) on both queue
//!   types (classic queue, stream): 500 messages at 500 msg/s, then 0 lost,
//!   0 duplicated, 0 out of order, and the consumer's own state (count,
//!   digest) is exactly that of seq 1..=500.
//! - A broker restart (`rabbitmqctl stop_app` / `start_app`) while the
//!   consumers idle: they reconnect on their own and process what comes next.
//! - An exit checkpoint and restore of the lapin consumer with its
//!   established broker connection (`ms2m checkpoint --exit
//!   --tcp-established`, `ms2m restore`): the state continues, nothing lost
//!   or duplicated. `ctr task checkpoint` has no `--tcp-established`, so
//!   through ctr the dump fails; that must leave the consumer running.
//!
//! Needs ms2m's RabbitMQ node (`hack/start-rabbitmq.sh`) besides the usual
//! prerequisites.

use std::path::Path;
use std::sync::RwLock;
use std::time::Duration;

use ms2m_runtime_tests::amqp::{
    collect_results, consumer_run_opts, digest_of, rabbitmq_available, restart_broker_app,
    wait_consumer_connects, wait_consumer_count, Checker, Client, Producer, ProducerConfig,
    QueueKind, ResultMsg, TestQueues,
};
use ms2m_runtime_tests::{env, ms2m, Container, TestDir};

/// Broker tests take it shared; the broker-restart test exclusively (a
/// restart would break every other test's connections).
static BROKER: RwLock<()> = RwLock::new(());

const RATE: u64 = 500;

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// Runs a consumer of `q` in a container on the host network; its stdout
/// and stderr go to `<td>/<name>.log` (printed if the test fails).
fn start_consumer(client: Client, q: &TestQueues, td: &TestDir, name: &str) -> Container {
    let log = td.join(&format!("{name}.log"));
    let opts = consumer_run_opts(client, q, name, &log, &["--net-host".to_string()]);
    let c = Container::run(&format!("amqp-{}", client.name()), opts);
    wait_consumer_connects(&c, 1, Duration::from_secs(30));
    c
}

/// Publishes `first..first+n` at RATE to the queue and returns the
/// confirmed seqs.
fn produce(q: &TestQueues, first: u64, n: u64) -> Vec<u64> {
    let rep = Producer::run(ProducerConfig::new(&q.queue, n, RATE).starting_at(first));
    assert_eq!(
        rep.confirmed.len() as u64,
        n,
        "the broker confirmed only {} of {n}",
        rep.confirmed.len()
    );
    rep.confirmed
}

fn collect(q: &TestQueues, n: usize) -> Vec<ResultMsg> {
    collect_results(&q.results, n, Duration::from_secs(30))
}

/// Asserts the checker's zero counts and that the consumer's own state is
/// exactly that of having processed `1..=n` once each, in order.
fn assert_exact(c: &Container, name: &str, produced: &[u64], results: &[ResultMsg], n: u64) {
    let report = Checker::new(produced.iter().copied()).check(results);
    eprintln!("{name}: {report}");
    assert!(report.is_clean(), "{name}: {report}");
    assert_eq!(report.processed_unique as u64, n, "{name}: {report}");
    assert_eq!(results.len() as u64, n, "{name}: surplus results: {report}");
    let tally = report
        .by_consumer
        .get(name)
        .unwrap_or_else(|| panic!("no results from consumer {name}: {report}"));
    assert_eq!(tally.last_count, n, "{name}: last result's count");
    let state = wait_consumer_count(c, n, Duration::from_secs(10));
    assert_eq!(state.count, n, "{name}: state {state:?}");
    assert_eq!(state.last_seq, n, "{name}: state {state:?}");
    assert_eq!(
        state.digest,
        digest_of(1..=n),
        "{name}: state digest is not that of 1..={n} in order: {state:?}"
    );
    assert_eq!(
        tally.last_digest, state.digest,
        "{name}: last result's digest"
    );
}

fn exactly_once(client: Client, kind: QueueKind) {
    env();
    rabbitmq_available();
    let _shared = BROKER.read().unwrap_or_else(|e| e.into_inner());
    let td = TestDir::new(&format!("amqp-{}-{}", client.name(), kind.as_str()));
    let q = TestQueues::new(client.name(), kind);
    let name = format!("{}-{}", client.name(), kind.as_str());
    let c = start_consumer(client, &q, &td, &name);
    let produced = produce(&q, 1, 500);
    let results = collect(&q, 500);
    assert_exact(&c, &name, &produced, &results, 500);
}

#[test]
fn lapin_consumer_classic_queue_exactly_once() {
    exactly_once(Client::Lapin, QueueKind::Classic);
}

#[test]
fn lapin_consumer_stream_exactly_once() {
    exactly_once(Client::Lapin, QueueKind::Stream);
}

#[test]
fn pika_consumer_classic_queue_exactly_once() {
    exactly_once(Client::Pika, QueueKind::Classic);
}

#[test]
fn pika_consumer_stream_exactly_once() {
    exactly_once(Client::Pika, QueueKind::Stream);
}

/// Both clients on both queue types, one broker restart while they idle.
#[test]
fn consumers_reconnect_after_broker_restart() {
    env();
    rabbitmq_available();
    let _exclusive = BROKER.write().unwrap_or_else(|e| e.into_inner());
    let td = TestDir::new("amqp-restart");
    let mut setups = Vec::new();
    for client in [Client::Lapin, Client::Pika] {
        for kind in [QueueKind::Classic, QueueKind::Stream] {
            let q = TestQueues::new(&format!("rs-{}", client.name()), kind);
            let name = format!("{}-{}", client.name(), kind.as_str());
            let c = start_consumer(client, &q, &td, &name);
            // Containers drop before their queues: a consumer alive after the
            // queue's deletion would declare it again.
            setups.push((name, c, q));
        }
    }
    const N: u64 = 100;
    // Before: each consumer processes 1..=N.
    let producers: Vec<_> = setups
        .iter()
        .map(|(_, _, q)| Producer::start(ProducerConfig::new(&q.queue, N, RATE)))
        .collect();
    let mut produced: Vec<Vec<u64>> = producers
        .into_iter()
        .map(|p| p.join().unwrap_or_else(|e| panic!("producer: {e}")))
        .map(|r| r.confirmed)
        .collect();
    let mut results: Vec<Vec<ResultMsg>> = setups
        .iter()
        .map(|(_, _, q)| collect(q, N as usize))
        .collect();
    for (name, c, _) in &setups {
        let s = wait_consumer_count(c, N, Duration::from_secs(10));
        assert_eq!(s.connects, 1, "{name}: {s:?}");
    }

    restart_broker_app(|| std::thread::sleep(Duration::from_millis(500)));
    for (name, c, _) in &setups {
        let s = wait_consumer_connects(c, 2, Duration::from_secs(30));
        eprintln!("{name} reconnected: {s:?}");
    }

    // After: N+1..=2N, processed on the new connections.
    let producers: Vec<_> = setups
        .iter()
        .map(|(_, _, q)| Producer::start(ProducerConfig::new(&q.queue, N, RATE).starting_at(N + 1)))
        .collect();
    for (i, p) in producers.into_iter().enumerate() {
        let rep = p.join().unwrap_or_else(|e| panic!("producer: {e}"));
        produced[i].extend(rep.confirmed);
    }
    for (i, (_, _, q)) in setups.iter().enumerate() {
        results[i].extend(collect(q, N as usize));
    }
    for (i, (name, c, _)) in setups.iter().enumerate() {
        assert_exact(c, name, &produced[i], &results[i], 2 * N);
    }
}

/// Exit checkpoint + restore of the lapin consumer holding an established
/// broker connection on the host network.
#[test]
fn lapin_consumer_exit_checkpoint_and_restore_on_host_network() {
    env();
    rabbitmq_available();
    let _shared = BROKER.read().unwrap_or_else(|e| e.into_inner());
    let td = TestDir::new("amqp-ckpt");
    let q = TestQueues::new("ck-lapin", QueueKind::Classic);
    let name = "lapin-ckpt";
    let c = start_consumer(Client::Lapin, &q, &td, name);
    let mut produced = produce(&q, 1, 250);
    let mut results = collect(&q, 250);
    wait_consumer_count(&c, 250, Duration::from_secs(10));

    // ctr cannot ask for --tcp-established: CRIU refuses the connected
    // socket. That must fail cleanly and leave the consumer running.
    let img_ctr = td.join("ctr-ck");
    let out = c.ctr_checkpoint(&["--exit", "--image-path", path_str(&img_ctr)]);
    assert!(
        !out.success(),
        "ctr task checkpoint of an established TCP connection unexpectedly worked: {out}"
    );
    assert_eq!(
        c.status().as_deref(),
        Some("RUNNING"),
        "a failed checkpoint must leave the task running: {out}"
    );

    let img = td.join("ck");
    let out = ms2m(&[
        "checkpoint",
        "--exit",
        "--tcp-established",
        "--image-path",
        path_str(&img),
        &c.id,
    ])
    .ok();
    eprintln!("{}", out.stdout.trim_end());
    let status = c.status();
    assert!(
        status.is_none() || status.as_deref() == Some("STOPPED"),
        "after an exit checkpoint the task is {status:?}"
    );
    let restored_log = td.join("restored.log");
    ms2m(&[
        "restore",
        "--log",
        path_str(&restored_log),
        &c.id,
        path_str(&img),
    ])
    .ok();
    let s = wait_consumer_connects(&c, 1, Duration::from_secs(30));
    assert_eq!(s.count, 250, "the restored state must continue: {s:?}");

    produced.extend(produce(&q, 251, 250));
    results.extend(collect(&q, 250));
    let s = wait_consumer_count(&c, 500, Duration::from_secs(10));
    eprintln!(
        "restored consumer: {s:?} (connects {} = {})",
        s.connects,
        if s.connects == 1 {
            "CRIU restored the established connection"
        } else {
            "it reconnected"
        }
    );
    assert_exact(&c, name, &produced, &results, 500);
}
