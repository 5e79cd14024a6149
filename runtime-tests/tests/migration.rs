//! Live migration (`ms2m migrate`) of tapped consumers from host A (ms2m's
//! containerd) to host B (a second containerd in its own network namespace,
//! `hack/host-b.sh`), on real containerd, runc, CRIU and RabbitMQ: the
//! checkpoint crosses over TCP to B's agent, the target replays behind the
//! source and goes live at the fence; the checker finds nothing lost or
//! doubled, and the source's and target's state is exactly `1..=N`.

use std::sync::{RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use ms2m_runtime_tests::amqp::*;
use ms2m_runtime_tests::host_b::*;
use ms2m_runtime_tests::*;

/// One migration test at a time talks to the broker and host B.
static SERIAL: RwLock<()> = RwLock::new(());

/// What the app inside the container uses: the tap on its own loopback.
const APP_URL: &str = "amqp://guest:guest@localhost:5672/%2f";
/// The real broker, as host A's shim reaches it.
const UPSTREAM: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn setup(name: &str, kind: QueueKind) -> (RwLockReadGuard<'static, ()>, TestDir, TestQueues) {
    env();
    rabbitmq_available();
    require_host_b();
    let lock = SERIAL.read().unwrap_or_else(|e| e.into_inner());
    (lock, TestDir::new(name), TestQueues::new(name, kind))
}

/// A consumer on host A behind its tap.
fn start_consumer(client: Client, q: &TestQueues, td: &TestDir, name: &str) -> Container {
    let log = td.join(&format!("{name}.log"));
    let net = [
        format!("--annotation=io.ms2m.tap.upstream={UPSTREAM}"),
        format!("--env=AMQP_URL={APP_URL}"),
    ];
    let c = Container::run(
        &format!("mig-{name}"),
        consumer_run_opts(client, q, name, &log, &net),
    );
    wait_consumer_connects(&c, 1, Duration::from_secs(30));
    c
}

/// The migrated container on host B, removed at the end of the test.
struct OnHostB(String);

impl OnHostB {
    fn status(&self) -> Option<String> {
        let out = ctr_b(&["task", "ls"]);
        out.stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(self.0.as_str()))
            .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
    }

    fn state(&self) -> Option<ConsumerState> {
        let exec = unique_id("st");
        let out = ctr_b(&[
            "task",
            "exec",
            "--exec-id",
            &exec,
            &self.0,
            "cat",
            STATE_FILE,
        ]);
        if out.success() {
            ConsumerState::parse(&out.stdout)
        } else {
            None
        }
    }

    /// Waits (30 s at most) until the target's task runs on host B.
    fn wait_running(&self) {
        wait_until(
            "the target to run on host B",
            Duration::from_secs(30),
            Duration::from_millis(20),
            || (self.status().as_deref() == Some("RUNNING")).then_some(()),
        );
    }

    fn exists(&self) -> bool {
        ctr_b(&["containers", "ls", "-q"])
            .stdout
            .lines()
            .any(|l| l.trim() == self.0)
    }
}

impl Drop for OnHostB {
    fn drop(&mut self) {
        let _ = ctr_b(&["task", "kill", "-s", "SIGKILL", &self.0]);
        for _ in 0..50 {
            if ctr_b(&["task", "delete", &self.0]).success() || self.status().is_none() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = ctr_b(&["containers", "delete", &self.0]);
    }
}

fn migrate(id: &str, extra: &[&str]) -> (CmdOut, serde_json::Value) {
    let mut args = vec!["migrate", "--json", "--to", HOST_B_AGENT];
    args.extend_from_slice(extra);
    args.push(id);
    let out = ms2m(&args);
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("`ms2m migrate --json` did not print JSON ({e}): {out}"));
    (out, v)
}

/// The largest gap between consecutive processing timestamps (over the
/// source's and the target's results), ms.
fn max_gap_ms(results: &[ResultMsg]) -> f64 {
    let mut r = results.to_vec();
    r.sort_by_key(|m| m.processed_at_us);
    r.windows(2)
        .map(|w| (w[1].processed_at_us - w[0].processed_at_us) as f64 / 1000.0)
        .fold(0.0, f64::max)
}

/// Joins the producer and checks every result of `q` (0 lost, duplicated
/// or out of order, exactly `n`), then the consumer's state, read by
/// `state`, is exactly `1..=n` in order. Returns the results.
fn assert_exact(
    name: &str,
    q: &TestQueues,
    producer: Producer,
    n: u64,
    state: impl Fn() -> Option<ConsumerState>,
) -> Vec<ResultMsg> {
    let rep = producer
        .join()
        .unwrap_or_else(|e| panic!("{name}: producer: {e}"));
    assert_eq!(rep.confirmed.len() as u64, n, "{name}: producer");
    let results = collect_results(&q.results, n as usize, Duration::from_secs(60));
    let report = Checker::new(rep.confirmed.iter().copied()).check(&results);
    eprintln!(
        "{name}: {report}; largest processing gap {:.1} ms",
        max_gap_ms(&results)
    );
    assert!(report.is_clean(), "{name}: {report}");
    assert_eq!(results.len() as u64, n, "{name}: {report}");
    let st = wait_until(
        &format!("{name}: the consumer's state"),
        Duration::from_secs(20),
        Duration::from_millis(50),
        || state().filter(|s| s.count >= n),
    );
    assert_eq!(st.count, n, "{name}: {st:?}");
    assert_eq!(
        st.digest,
        digest_of(1..=n),
        "{name}: state is not 1..={n} in order: {st:?}"
    );
    results
}

fn migrate_under_load(client: Client, kind: QueueKind, name: &str, n: u64, rate: u64) {
    move_under_load(client, kind, name, n, rate, false)
}

fn move_under_load(
    client: Client,
    kind: QueueKind,
    name: &str,
    n: u64,
    rate: u64,
    stop_and_copy: bool,
) {
    let (_lock, td, q) = setup(name, kind);
    let c = start_consumer(client, &q, &td, name);
    let b = OnHostB(c.id.clone());
    let producer = Producer::start(ProducerConfig::new(&q.queue, n, rate));
    wait_consumer_count(&c, n / 5, Duration::from_secs(30));

    let t0 = Instant::now();
    let extra: &[&str] = if stop_and_copy {
        &["--stop-and-copy"]
    } else {
        &[]
    };
    let (out, v) = migrate(&c.id, extra);
    eprintln!("{name}: migrate took {:?}: {v}", t0.elapsed());
    assert!(out.success() && v["outcome"] == "migrated", "{out}");
    let phases: Vec<&str> = v["phases"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["name"].as_str()).collect())
        .unwrap_or_default();
    let want: &[&str] = if stop_and_copy {
        &["checkpoint", "transfer", "restore"]
    } else {
        assert_eq!(v["fence_publishes"], v["target_suppressed"], "{v}");
        &[
            "checkpoint",
            "transfer",
            "restore",
            "catch-up",
            "cutover",
            "source stopped",
        ]
    };
    assert_eq!(phases, want, "{v}");
    assert!(v["transfer_bytes"].as_u64().unwrap_or(0) > 1 << 20, "{v}");
    // The source is stopped, the target runs on host B.
    let st = c.status();
    assert!(
        st.is_none() || st.as_deref() == Some("STOPPED"),
        "source task is {st:?}"
    );
    assert_eq!(b.status().as_deref(), Some("RUNNING"), "target on host B");

    assert_exact(name, &q, producer, n, || b.state());
}

#[test]
fn lapin_stream_consumer_migrates_to_host_b() {
    migrate_under_load(Client::Lapin, QueueKind::Stream, "lapin-stream", 1500, 300);
}

#[test]
fn lapin_stream_consumer_moves_to_host_b_by_stop_and_copy() {
    move_under_load(
        Client::Lapin,
        QueueKind::Stream,
        "lapin-sac",
        1000,
        300,
        true,
    );
}

#[test]
fn pika_stream_consumer_migrates_to_host_b() {
    migrate_under_load(Client::Pika, QueueKind::Stream, "pika-stream", 1000, 200);
}

/// A failure after the transfer (the target's containerd killed before the
/// restore can finish, or the target killed mid-replay) aborts: the target
/// is removed, the source serves on, nothing lost or doubled.
fn aborted_migration(name: &str, fault: impl FnOnce(&OnHostB) + Send + 'static) {
    aborted_migration_of(QueueKind::Stream, name, fault)
}

fn aborted_migration_of(
    kind: QueueKind,
    name: &str,
    fault: impl FnOnce(&OnHostB) + Send + 'static,
) {
    let (_lock, td, q) = setup(name, kind);
    let c = start_consumer(Client::Lapin, &q, &td, name);
    let b = OnHostB(c.id.clone());
    const N: u64 = 1200;
    let producer = Producer::start(ProducerConfig::new(&q.queue, N, 200));
    wait_consumer_count(&c, 150, Duration::from_secs(30));
    let id = c.id.clone();
    // Keeps the target in shadow long enough for the fault.
    let runner = std::thread::spawn(move || {
        migrate(&id, &["--min-catch-up", "8s", "--catch-up-timeout", "20s"])
    });
    let hb = OnHostB(b.0.clone());
    fault(&hb);
    std::mem::forget(hb);
    let (out, v) = runner.join().expect("migrate thread");
    eprintln!("{name}: {v}");
    assert!(out.success(), "an aborted migration still reports: {out}");
    assert_eq!(v["outcome"], "aborted", "{v}");
    assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    // The source serves on; the target is gone.
    assert_eq!(c.status().as_deref(), Some("RUNNING"));
    assert!(!b.exists(), "the target container is still on host B");
    assert_exact(name, &q, producer, N, || consumer_state(&c));
}

#[test]
fn target_killed_mid_replay_aborts_and_the_source_serves_on() {
    aborted_migration("kill-target", |b| {
        b.wait_running();
        std::thread::sleep(Duration::from_millis(300));
        let out = ctr_b(&["task", "kill", "-s", "SIGKILL", &b.0]);
        assert!(out.success(), "{out}");
    });
}

#[test]
fn ctrl_c_aborts_and_the_source_serves_on() {
    let (_lock, td, q) = setup("ctrl-c", QueueKind::Stream);
    let c = start_consumer(Client::Lapin, &q, &td, "ctrl-c");
    let b = OnHostB(c.id.clone());
    const N: u64 = 1000;
    let producer = Producer::start(ProducerConfig::new(&q.queue, N, 200));
    wait_consumer_count(&c, 150, Duration::from_secs(30));
    let cli = ms2m_cli();
    let env = env();
    let child = std::process::Command::new(cli)
        .args(["--address", &env.address, "--namespace", &env.namespace])
        .args([
            "migrate",
            "--json",
            "--min-catch-up",
            "20s",
            "--catch-up-timeout",
            "30s",
            "--to",
            HOST_B_AGENT,
            &c.id,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn ms2m migrate");
    let pid = child.id().to_string();
    b.wait_running();
    let kill = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status();
    assert!(kill.is_ok_and(|s| s.success()), "kill -INT {pid}");
    let out = child.wait_with_output().expect("wait ms2m migrate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "no JSON after Ctrl-C ({e}): {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(v["outcome"], "aborted", "{v}");
    assert!(
        v["error"].as_str().unwrap_or("").contains("interrupted"),
        "{v}"
    );
    assert_eq!(c.status().as_deref(), Some("RUNNING"));
    assert!(!b.exists(), "the target container is still on host B");
    assert_exact("ctrl-c", &q, producer, N, || consumer_state(&c));
}

/// Host B's containerd is down when the checkpoint arrives: the agent
/// cannot restore, the migration aborts, the source serves on.
#[test]
fn target_containerd_down_aborts_and_the_source_serves_on() {
    let (_lock, td, q) = setup("cd-down", QueueKind::Stream);
    let c = start_consumer(Client::Lapin, &q, &td, "cd-down");
    let b = OnHostB(c.id.clone());
    const N: u64 = 800;
    let producer = Producer::start(ProducerConfig::new(&q.queue, N, 200));
    wait_consumer_count(&c, 100, Duration::from_secs(30));
    kill_containerd_b();
    let (out, v) = migrate(&c.id, &[]);
    start_containerd_b();
    eprintln!("cd-down: {v}");
    assert!(out.success(), "{out}");
    assert_eq!(v["outcome"], "aborted", "{v}");
    assert!(
        v["error"].as_str().unwrap_or("").contains("containerd"),
        "{v}"
    );
    assert_eq!(c.status().as_deref(), Some("RUNNING"));
    assert!(!b.exists(), "a target container was left on host B");
    assert_exact("cd-down", &q, producer, N, || consumer_state(&c));
}

/// The broker restarts while the target catches up: every link drops, the
/// migration aborts, the target is removed; the source's app reconnects
/// through its tap and loses nothing.
#[test]
fn broker_restart_during_catch_up_aborts_and_the_source_serves_on() {
    let (_lock, td, q) = setup("broker-restart", QueueKind::Stream);
    let c = start_consumer(Client::Lapin, &q, &td, "broker-restart");
    let b = OnHostB(c.id.clone());
    let producer = Producer::start(ProducerConfig::new(&q.queue, 600, 300));
    wait_consumer_count(&c, 100, Duration::from_secs(30));
    let id = c.id.clone();
    let runner = std::thread::spawn(move || {
        migrate(&id, &["--min-catch-up", "8s", "--catch-up-timeout", "20s"])
    });
    b.wait_running();
    // (The test producer does not survive a broker restart: it finishes first.)
    let mut produced = producer
        .join()
        .unwrap_or_else(|e| panic!("producer: {e}"))
        .confirmed;
    restart_broker_app(|| std::thread::sleep(Duration::from_millis(300)));
    let (out, v) = runner.join().expect("migrate thread");
    eprintln!("broker-restart: {v}");
    assert!(out.success(), "{out}");
    assert_eq!(v["outcome"], "aborted", "{v}");
    assert_eq!(c.status().as_deref(), Some("RUNNING"));
    assert!(!b.exists(), "the target container is still on host B");
    wait_consumer_connects(&c, 2, Duration::from_secs(30));
    let more = Producer::run(ProducerConfig::new(&q.queue, 200, 200).starting_at(601));
    produced.extend(more.confirmed);
    let results = collect_results(&q.results, 800, Duration::from_secs(60));
    let report = Checker::new(produced.iter().copied()).check(&results);
    eprintln!("broker-restart: {report}");
    assert!(report.is_clean(), "{report}");
    let state = wait_consumer_count(&c, 800, Duration::from_secs(20));
    assert_eq!(state.digest, digest_of(1..=800), "{state:?}");
}

/// Live migration of a classic-queue consumer is refused after the
/// checkpoint (the source serves on); `--stop-and-copy` moves it exactly.
/// A classic-queue consumer moves live: the source's tap copies what it
/// settles after the cut into the migration's mirror stream, the target
/// replays that first and takes the queue over at the fence.
#[test]
fn lapin_classic_consumer_migrates_to_host_b() {
    migrate_under_load(
        Client::Lapin,
        QueueKind::Classic,
        "lapin-classic",
        1500,
        300,
    );
}

#[test]
fn pika_classic_consumer_migrates_to_host_b() {
    migrate_under_load(Client::Pika, QueueKind::Classic, "pika-classic", 1000, 200);
}

/// A classic-queue migration aborted mid-replay: the source never stopped
/// consuming its queue, and the mirror streams are deleted.
#[test]
fn classic_target_killed_mid_replay_aborts_and_the_source_serves_on() {
    aborted_migration_of(QueueKind::Classic, "classic-kill", |b| {
        b.wait_running();
        std::thread::sleep(Duration::from_millis(300));
        let out = ctr_b(&["task", "kill", "-s", "SIGKILL", &b.0]);
        assert!(out.success(), "{out}");
    });
    // Deleted in the background by the source's tap after the abort.
    let mut names = String::new();
    for _ in 0..50 {
        names = rabbitmqctl(&["-q", "list_queues", "name"]).stdout;
        if !names.contains("ms2m.mirror.mig-classic-kill") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !names.contains("ms2m.mirror.mig-classic-kill"),
        "mirror streams left behind:\n{names}"
    );
}

/// Host A's agent (hack/host-b.sh starts it beside host B's).
const HOST_A_AGENT: &str = "10.88.0.1:7101";

/// A consumer moves A → B → A → B under load (the second move runs
/// `ms2m migrate` on host B, inside its namespaces): each restored task
/// lives in its own host's cgroups, so the next checkpoint freezes it.
#[test]
fn stream_consumer_migrates_back_and_forth() {
    let (_lock, td, q) = setup("pingpong", QueueKind::Stream);
    let c = start_consumer(Client::Lapin, &q, &td, "pingpong");
    let b = OnHostB(c.id.clone());
    const N: u64 = 2000;
    let producer = Producer::start(ProducerConfig::new(&q.queue, N, 300));
    wait_consumer_count(&c, 100, Duration::from_secs(30));
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(400));
        let (out, v) = if round % 2 == 0 {
            migrate(&c.id, &[])
        } else {
            let out = netns_exec(&[
                "ms2m",
                "--address",
                HOST_B_ADDRESS,
                "--namespace",
                "ms2m",
                "migrate",
                "--json",
                "--to",
                HOST_A_AGENT,
                &c.id,
            ]);
            let v: serde_json::Value = serde_json::from_str(out.stdout.trim())
                .unwrap_or_else(|e| panic!("migrate on host B did not print JSON ({e}): {out}"));
            (out, v)
        };
        eprintln!("pingpong round {round}: {v}");
        assert!(
            out.success() && v["outcome"] == "migrated",
            "round {round}: {out}"
        );
    }
    assert_eq!(b.status().as_deref(), Some("RUNNING"), "after A→B→A→B");
    assert_exact("pingpong", &q, producer, N, || b.state());
}
