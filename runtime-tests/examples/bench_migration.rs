//! Live-migration benchmarks of issue 8, driven by `hack/bench-migration.sh`
//! (which checks the prerequisites, host B included, and cleans up after a
//! kill).
//!
//! ```text
//! bench_migration gap RUNS RATE lapin|pika
//! bench_migration catchup RUNS RATE WORK_US lapin|pika
//! bench_migration pingpong MIGRATIONS RATE lapin|pika stream|classic
//! ```
//!
//! A consumer of the test image behind the shim's tap (`amqp-consumer`,
//! lapin, or `pika_consumer.py`) on a RabbitMQ stream, one producer at RATE
//! msg/s, and `ms2m migrate --json --to AGENT ID` run on the host the
//! consumer is on (for host B: inside B's mount and network namespaces,
//! against containerd B, to host A's agent). At the end of each consumer's
//! life the producer stops, every result is collected and the checker runs
//! over all of them (lost, duplicated, out of order), and the consumer's final
//! state digest must be the digest of every produced seq in order.
//!
//! `pingpong` moves one consumer back and forth between host A (ms2m's
//! containerd) and host B (`hack/host-b.sh`). `gap` and `catchup` move a
//! fresh consumer (own queue, producer, checker) from A to B for each
//! migration, or, with `BENCH_MIGRATION_BACK=1`, one consumer back and forth
//! (moves back from B fail on this setup at the time of writing: a task
//! restored on B runs in the source's cgroup, not the one runc's state on B
//! names, so B's checkpoint cannot seize it).
//!
//! - `gap`: 2 x RUNS migrations, live and `--stop-and-copy` interleaved
//!   (L S S L L S S L ...: each mode goes A to B and B to A alike), 1.5 s
//!   apart. Per migration, from the results' `processed_at_us` sorted by
//!   time: the largest gap between consecutive results
//!   - live, at cutover: gaps touching `[fence_at - 100 ms, live_at + 100 ms]`
//!     (the report's `fence_at_unix_us` / `live_at_unix_us`);
//!   - live, whole migration: gaps touching `[command start, command end]`
//!     (includes the leave-running checkpoint's freeze);
//!   - stop-and-copy: gaps touching `[command start, command end]` (its whole
//!     downtime: exit checkpoint, transfer, restore, reconnect);
//!   - baseline: gaps touching `[start - 900 ms, start - 100 ms]`;
//!
//!   and `total_ms`, `frozen_ms`, `fence_to_live_ms` of each report.
//! - `catchup`: the consumer with `WORK_US` of simulated work per message.
//!   First its throughput with a backlog (as fast as it drains 3 s worth of
//!   messages published without a rate limit); then RUNS live migrations at
//!   RATE msg/s, or, when the consumer cannot sustain RATE (its throughput is
//!   below 1.1 x RATE), at 85 % of its throughput (said so in the output):
//!   the reports' `replay_rate`, `live_rate`, their ratio, the catch-up phase,
//!   the outcome.
//! - `pingpong`: MIGRATIONS live migrations A to B to A ..., 1 s apart, under
//!   one producer; per migration total/gap; the checker and digest over all.
//!   A migration that does not report `migrated` is counted (and its error
//!   kept); the consumer stays where it was and the next one is tried. On a
//!   classic queue each move replays the source's mirror stream first.
//!
//! Output: one JSON object per figure on stdout, `{"name","runtime","unit",
//! "median","min","max","runs","values",...}` (`runtime` names the client,
//! queue and mode); progress on stderr. With `BENCH_LOGDIR` set, every
//! migration's record (its `--json` report, start/end, gaps) goes to
//! `BENCH_LOGDIR/migrations-<figure>.jsonl`. Any failure panics with its
//! cause (the containers on A and B and the queues are removed on the way
//! out); exit status 101 then, 1 when a figure was measured but not exact.
//!
//! Container ids and queue names start with `BENCH_TOKEN` (default
//! `bm<pid>`), so the script can clean up after a kill.

use std::io::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ms2m_runtime_tests::amqp::{
    collect_results, consumer_run_opts, digest_of, rabbitmq_available, Checker, Client,
    ConsumerState, Producer, ProducerConfig, QueueKind, ResultMsg, TestQueues, STATE_FILE,
};
use ms2m_runtime_tests::host_b::{ctr_b, netns_exec, require_host_b, HOST_B_ADDRESS, HOST_B_AGENT};
use ms2m_runtime_tests::{env, ms2m, ms2m_cli, run_cmd, unique_id, wait_until, Container, TestDir};

/// What the app inside the container uses: the tap on its own loopback.
const APP_URL: &str = "amqp://guest:guest@localhost:5672/%2f";
/// The real broker, as host A's shim reaches it.
const UPSTREAM: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Host A's agent, as host B reaches it (`MS2M_HOSTA_AGENT`).
fn host_a_agent() -> String {
    std::env::var("MS2M_HOSTA_AGENT")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "10.88.0.1:7101".to_string())
}

fn token() -> String {
    std::env::var("BENCH_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| format!("bm{}", std::process::id()))
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn log(msg: &str) {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() % 86400)
        .unwrap_or(0);
    eprintln!(
        "[bench-migration {:02}:{:02}:{:02}] {msg}",
        t / 3600,
        t / 60 % 60,
        t % 60
    );
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

fn percentile(v: &[f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let i = ((p / 100.0) * (s.len() - 1) as f64).round() as usize;
    Some(s[i.min(s.len() - 1)])
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// Prints one figure as a JSON line.
fn figure(name: &str, variant: &str, unit: &str, values: &[f64], extra: serde_json::Value) {
    let mut o = serde_json::json!({
        "name": name,
        "runtime": variant,
        "unit": unit,
        "median": median(values).map(round4),
        "p90": percentile(values, 90.0).map(round4),
        "min": values.iter().copied().reduce(f64::min),
        "max": values.iter().copied().reduce(f64::max),
        "runs": values.len(),
        "values": values.iter().map(|v| round4(*v)).collect::<Vec<_>>(),
    });
    if let (Some(o), serde_json::Value::Object(e)) = (o.as_object_mut(), extra) {
        o.extend(e);
    }
    println!("{o}");
    let _ = std::io::stdout().flush();
}

/// Appends one record to `$BENCH_LOGDIR/migrations-<fig>.jsonl`.
fn record(fig: &str, rec: &serde_json::Value) {
    let Some(dir) = std::env::var_os("BENCH_LOGDIR") else {
        return;
    };
    let p = std::path::Path::new(&dir).join(format!("migrations-{fig}.jsonl"));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p);
    if let Ok(mut f) = f {
        let _ = writeln!(f, "{rec}");
    }
}

fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// The largest gap (µs) between consecutive `processed_at_us` (sorted) among
/// the pairs that touch `[from_us, to_us]`.
fn max_gap_us(sorted: &[u64], from_us: u64, to_us: u64) -> u64 {
    sorted
        .windows(2)
        .filter(|w| w[1] >= from_us && w[0] <= to_us)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or(0)
}

/// The consumer, wherever it is: host A (`on_b == false`) or host B. The
/// [`Container`] cleans up on A; `Drop` cleans up on B.
struct Moving {
    a: Container,
    on_b: bool,
}

impl Moving {
    fn id(&self) -> &str {
        &self.a.id
    }

    fn host(&self) -> &'static str {
        if self.on_b {
            "B"
        } else {
            "A"
        }
    }

    fn state(&self) -> Option<ConsumerState> {
        let out = if self.on_b {
            let exec = unique_id("st");
            ctr_b(&[
                "task",
                "exec",
                "--exec-id",
                &exec,
                self.id(),
                "cat",
                STATE_FILE,
            ])
        } else {
            self.a.exec(&["cat", STATE_FILE])
        };
        if out.success() {
            ConsumerState::parse(&out.stdout)
        } else {
            None
        }
    }

    fn wait_count(&self, count: u64, timeout: Duration) -> ConsumerState {
        wait_until(
            &format!(
                "consumer {} on host {} to have processed {count}",
                self.id(),
                self.host()
            ),
            timeout,
            Duration::from_millis(50),
            || self.state().filter(|s| s.count >= count),
        )
    }

    /// `ms2m migrate --json` from where the consumer is to the other host;
    /// returns (success, report or null, stderr, start µs, end µs).
    fn migrate(&mut self, stop_and_copy: bool) -> Migration {
        let mut args: Vec<String> = vec!["migrate".into(), "--json".into(), "--to".into()];
        args.push(if self.on_b {
            host_a_agent()
        } else {
            HOST_B_AGENT.to_string()
        });
        if stop_and_copy {
            args.push("--stop-and-copy".into());
        }
        args.push(self.id().to_string());
        let from = self.host();
        let t0 = now_us();
        let out = if self.on_b {
            let env = env();
            let mut full: Vec<String> = vec![
                ms2m_cli().display().to_string(),
                "--address".into(),
                HOST_B_ADDRESS.into(),
                "--namespace".into(),
                env.namespace.clone(),
            ];
            full.extend(args);
            netns_exec(&full)
        } else {
            ms2m(&args)
        };
        let t1 = now_us();
        let report: serde_json::Value =
            serde_json::from_str(out.stdout.trim()).unwrap_or(serde_json::Value::Null);
        let migrated = out.success() && report["outcome"] == "migrated";
        if migrated {
            self.on_b = !self.on_b;
        }
        let error = if migrated {
            None
        } else {
            Some(
                report["error"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| {
                        format!(
                            "exit {:?}: {} {}",
                            out.code,
                            out.stderr.trim(),
                            out.stdout.trim()
                        )
                    }),
            )
        };
        Migration {
            mode: if stop_and_copy {
                "stop-and-copy"
            } else {
                "live"
            },
            from,
            t0,
            t1,
            report,
            error,
            gap_cutover_ms: None,
            gap_whole_ms: 0.0,
            gap_baseline_ms: 0.0,
        }
    }
}

impl Drop for Moving {
    /// Best effort, never panics: the container on host B, if any (the
    /// [`Container`] cleans up on A). Init first: `kill --all` goes by the
    /// container's cgroup, which may not hold a restored process.
    fn drop(&mut self) {
        let id = self.a.id.clone();
        let env = env();
        let b = |args: &[&str]| {
            let mut cmd = std::process::Command::new(&env.ctr);
            cmd.args(["--address", HOST_B_ADDRESS, "--namespace", &env.namespace])
                .args(args);
            run_cmd(&mut cmd, Duration::from_secs(20))
        };
        let listed = |o: &Result<ms2m_runtime_tests::CmdOut, String>| {
            o.as_ref().is_ok_and(|o| {
                o.stdout
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some(id.as_str()))
            })
        };
        if !listed(&b(&["containers", "ls"])) {
            return;
        }
        let _ = b(&["task", "kill", "-s", "SIGKILL", &id]);
        let _ = b(&["task", "kill", "-a", "-s", "SIGKILL", &id]);
        for _ in 0..50 {
            let ls = b(&["task", "ls"]);
            let running = ls.as_ref().is_ok_and(|o| {
                o.stdout.lines().any(|l| {
                    let mut w = l.split_whitespace();
                    w.next() == Some(id.as_str()) && w.nth(1) != Some("STOPPED")
                })
            });
            if !running {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = b(&["task", "delete", &id]);
        let _ = b(&["containers", "delete", &id]);
        if listed(&b(&["containers", "ls"])) {
            eprintln!("cleanup: container {id} is still on host B");
        }
    }
}

/// One migration and what the results say about it.
struct Migration {
    mode: &'static str,
    from: &'static str,
    t0: u64,
    t1: u64,
    report: serde_json::Value,
    error: Option<String>,
    gap_cutover_ms: Option<f64>,
    gap_whole_ms: f64,
    gap_baseline_ms: f64,
}

impl Migration {
    fn ok(&self) -> bool {
        self.error.is_none()
    }

    fn total_ms(&self) -> f64 {
        f(&self.report["total_ms"])
    }

    /// Fills in the gaps from the results' sorted timestamps.
    fn measure(&mut self, sorted: &[u64]) {
        self.gap_whole_ms = max_gap_us(sorted, self.t0, self.t1) as f64 / 1000.0;
        self.gap_baseline_ms = max_gap_us(
            sorted,
            self.t0.saturating_sub(900_000),
            self.t0.saturating_sub(100_000),
        ) as f64
            / 1000.0;
        if let (Some(fence), Some(live)) = (
            self.report["fence_at_unix_us"].as_u64(),
            self.report["live_at_unix_us"].as_u64(),
        ) {
            if self.mode == "live" && self.ok() {
                self.gap_cutover_ms = Some(
                    max_gap_us(sorted, fence.saturating_sub(100_000), live + 100_000) as f64
                        / 1000.0,
                );
            }
        }
    }

    fn json(&self, i: usize) -> serde_json::Value {
        serde_json::json!({
            "i": i, "mode": self.mode, "from": self.from, "start_unix_us": self.t0,
            "end_unix_us": self.t1, "wall_ms": (self.t1 - self.t0) as f64 / 1000.0,
            "error": self.error, "gap_cutover_ms": self.gap_cutover_ms,
            "gap_whole_ms": self.gap_whole_ms, "gap_baseline_ms": self.gap_baseline_ms,
            "report": self.report,
        })
    }
}

/// The producer runs for the whole figure; if it ended, its connection to
/// the broker broke and the figure would measure an idle consumer.
fn producer_alive(p: &Producer, when: &str) {
    if p.is_finished() {
        panic!(
            "{when}: the producer stopped early (did something restart RabbitMQ or raise a memory alarm? \
             other broker tests must not run at the same time)"
        );
    }
}

/// A consumer on host A behind its tap, consuming; `work_us` of simulated
/// work per message.
fn start_consumer(
    client: Client,
    q: &TestQueues,
    td: &TestDir,
    name: &str,
    work_us: u64,
) -> Moving {
    let log = td.join(&format!("{name}.log"));
    let net = [
        format!("--annotation=io.ms2m.tap.upstream={UPSTREAM}"),
        format!("--env=AMQP_URL={APP_URL}"),
        format!("--env=WORK_US={work_us}"),
    ];
    let c = Container::run(
        &format!("{}-{name}", token()),
        consumer_run_opts(client, q, name, &log, &net),
    );
    let m = Moving { a: c, on_b: false };
    wait_until(
        &format!("consumer {} to be consuming", m.id()),
        Duration::from_secs(30),
        Duration::from_millis(50),
        || m.state().filter(|s| s.connects >= 1),
    );
    m
}

/// What a figure's run gives back for its figures.
struct Run {
    migrations: Vec<Migration>,
    produced: Vec<u64>,
    results: Vec<ResultMsg>,
    clean: bool,
    summary: serde_json::Value,
}

/// Starts a producer at `rate`, moves the consumer by `plan` (true:
/// stop-and-copy) with `pause` between moves, then checks everything.
#[allow(clippy::too_many_arguments)]
fn run_plan(
    fig: &str,
    client: Client,
    kind: QueueKind,
    rate: u64,
    work_us: u64,
    plan: &[bool],
    pause: Duration,
    progress_every: usize,
) -> Run {
    let k = kind.as_str();
    let td = TestDir::new(&format!("{}-{fig}", token()));
    let q = TestQueues::new(&format!("{}-{fig}", token()), kind);
    let name = format!("{}-{k}", client.name());
    let mut c = start_consumer(client, &q, &td, &name, work_us);
    let producer = Producer::start(ProducerConfig::new(&q.queue, u64::MAX / 4, rate));
    c.wait_count((rate / 2).max(3), Duration::from_secs(60));
    let mut migrations = Vec::new();
    let mut consecutive_failures = 0;
    let t_all = Instant::now();
    for (i, sac) in plan.iter().enumerate() {
        std::thread::sleep(pause);
        producer_alive(&producer, &format!("{fig} migration {}", i + 1));
        let m = c.migrate(*sac);
        let line = format!(
            "{fig} {}/{}: {} {}->{} {}: total {:.0} ms, frozen {} ms, fence->live {} ms, catch-up replay {} / live {} msg/s",
            i + 1,
            plan.len(),
            m.mode,
            m.from,
            if m.from == "A" { "B" } else { "A" },
            if m.ok() { "migrated" } else { "FAILED" },
            m.total_ms(),
            m.report["frozen_ms"],
            m.report["fence_to_live_ms"],
            m.report["catch_up"]["replay_rate"],
            m.report["catch_up"]["live_rate"],
        );
        if !m.ok() || (i + 1) % progress_every == 0 || i == 0 {
            log(&line);
        }
        if let Some(e) = &m.error {
            log(&format!("{fig} {}: error: {e}", i + 1));
            consecutive_failures += 1;
            migrations.push(m);
            // The consumer stayed where it was: the next move would be the
            // same one again.
            if consecutive_failures >= 3 || c.on_b {
                log(&format!(
                    "{fig}: stopping the plan ({})",
                    if c.on_b {
                        "the consumer stayed on host B: the next move would be the same"
                    } else {
                        "3 failures in a row"
                    }
                ));
                break;
            }
            continue;
        }
        consecutive_failures = 0;
        migrations.push(m);
        // The consumer serves again on its new host before the next move.
        let s0 = c.state().map(|s| s.count).unwrap_or(0);
        c.wait_count(s0 + 1, Duration::from_secs(60));
    }
    std::thread::sleep(pause);
    producer.stop();
    let rep = producer.join().unwrap_or_else(|e| panic!("producer: {e}"));
    let n = rep.confirmed.len() as u64;
    log(&format!(
        "{fig}: {} migrations in {:.0} s; producer confirmed {n}; waiting for the consumer on host {}",
        migrations.len(),
        t_all.elapsed().as_secs_f64(),
        c.host()
    ));
    let drain = Duration::from_secs(60 + n / 200);
    let state = wait_until(
        &format!(
            "consumer {} on host {} to have processed {n}",
            c.id(),
            c.host()
        ),
        drain,
        Duration::from_millis(200),
        || c.state().filter(|s| s.count >= n),
    );
    let results = collect_results(&q.results, n as usize, drain);
    let report = Checker::new(rep.confirmed.iter().copied()).check(&results);
    let digest_ok = state.digest == digest_of(rep.confirmed.iter().copied());
    log(&format!(
        "{fig}: {report}; final state on host {}: count {} digest {:016x} (digest of 1..={n}: {})",
        c.host(),
        state.count,
        state.digest,
        if digest_ok { "matches" } else { "DIFFERS" }
    ));
    let mut sorted: Vec<u64> = results.iter().map(|r| r.processed_at_us).collect();
    sorted.sort_unstable();
    for (i, m) in migrations.iter_mut().enumerate() {
        m.measure(&sorted);
        record(fig, &m.json(i + 1));
    }
    let clean = report.is_clean()
        && digest_ok
        && state.count == n
        && results.len() as u64 == n
        && migrations.iter().all(Migration::ok);
    let summary = serde_json::json!({
        "client": client.name(), "queue": k, "rate": rate, "work_us": work_us,
        "migrations": migrations.len(), "migrated": migrations.iter().filter(|m| m.ok()).count(),
        "failed": migrations.iter().filter(|m| !m.ok()).count(),
        "produced": n, "results": results.len(), "lost": report.lost.len(),
        "duplicated": report.duplicated.len(), "out_of_order": report.out_of_order,
        "unexpected": report.unexpected.len(), "state_count": state.count,
        "state_digest_matches": digest_ok, "final_host": c.host(), "connects": state.connects,
        "errors": migrations.iter().filter_map(|m| m.error.clone()).collect::<Vec<_>>(),
    });
    Run {
        migrations,
        produced: rep.confirmed,
        results,
        clean,
        summary,
    }
}

/// Whether `gap` and `catchup` move one consumer back and forth
/// (`BENCH_MIGRATION_BACK=1`) or, by default, move a fresh consumer (own
/// queue, producer and checker) from A to B for each migration: moving a
/// consumer back from host B fails on this setup (see docs/benchmarks.md).
fn back_and_forth() -> bool {
    std::env::var("BENCH_MIGRATION_BACK").is_ok_and(|v| v == "1")
}

/// `run_plan`, or with fresh consumers one `run_plan` per migration (all
/// from A to B), merged.
#[allow(clippy::too_many_arguments)]
fn run_moves(
    fig: &str,
    client: Client,
    kind: QueueKind,
    rate: u64,
    work_us: u64,
    plan: &[bool],
    pause: Duration,
) -> Run {
    if back_and_forth() {
        return run_plan(fig, client, kind, rate, work_us, plan, pause, 1);
    }
    let mut all = Run {
        migrations: vec![],
        produced: vec![],
        results: vec![],
        clean: true,
        summary: serde_json::Value::Null,
    };
    let mut sum = serde_json::json!({
        "client": client.name(), "queue": kind.as_str(), "rate": rate, "work_us": work_us,
        "moves": "a fresh consumer per migration, host A to host B",
        "migrations": 0, "migrated": 0, "failed": 0, "produced": 0, "results": 0, "lost": 0,
        "duplicated": 0, "out_of_order": 0, "unexpected": 0, "state_digest_matches": true,
        "errors": [],
    });
    for (i, sac) in plan.iter().enumerate() {
        let r = run_plan(
            &format!("{fig}-{}", i + 1),
            client,
            kind,
            rate,
            work_us,
            &[*sac],
            pause,
            1,
        );
        for k in [
            "migrations",
            "migrated",
            "failed",
            "produced",
            "results",
            "lost",
            "duplicated",
            "out_of_order",
            "unexpected",
        ] {
            sum[k] = (sum[k].as_u64().unwrap_or(0) + r.summary[k].as_u64().unwrap_or(0)).into();
        }
        if r.summary["state_digest_matches"] != true {
            sum["state_digest_matches"] = false.into();
        }
        if let (Some(a), Some(e)) = (sum["errors"].as_array_mut(), r.summary["errors"].as_array()) {
            a.extend(e.iter().cloned());
        }
        all.clean &= r.clean;
        all.migrations.extend(r.migrations);
    }
    all.summary = sum;
    all
}

fn vals(ms: &[&Migration], g: impl Fn(&Migration) -> Option<f64>) -> Vec<f64> {
    ms.iter()
        .filter_map(|m| g(m))
        .filter(|v| v.is_finite())
        .collect()
}

/// Figures common to every run: per mode, totals and gaps.
fn mode_figures(prefix: &str, variant: &str, run: &Run, rate: u64) {
    for mode in ["live", "stop-and-copy"] {
        let ms: Vec<&Migration> = run
            .migrations
            .iter()
            .filter(|m| m.mode == mode && m.ok())
            .collect();
        if ms.is_empty() {
            continue;
        }
        let v = format!("{variant}-{mode}");
        let x = serde_json::json!({"rate": rate, "nominal_spacing_ms": 1000.0 / rate as f64});
        figure(
            &format!("{prefix}_total_ms"),
            &v,
            "ms",
            &vals(&ms, |m| Some(m.total_ms())),
            serde_json::json!({"rate": rate, "what": "total_ms of `ms2m migrate --json`"}),
        );
        if mode == "live" {
            figure(
                &format!("{prefix}_gap_cutover_ms"),
                &v,
                "ms",
                &vals(&ms, |m| m.gap_cutover_ms),
                serde_json::json!({"rate": rate, "nominal_spacing_ms": 1000.0 / rate as f64,
                    "what": "largest gap between consecutive processed_at_us touching [fence_at - 100 ms, live_at + 100 ms]"}),
            );
            figure(
                &format!("{prefix}_gap_whole_ms"),
                &v,
                "ms",
                &vals(&ms, |m| Some(m.gap_whole_ms)),
                serde_json::json!({"rate": rate, "nominal_spacing_ms": 1000.0 / rate as f64,
                    "what": "largest gap touching the whole ms2m migrate command (includes the leave-running checkpoint's freeze)"}),
            );
            figure(
                &format!("{prefix}_fence_to_live_ms"),
                &v,
                "ms",
                &vals(&ms, |m| m.report["fence_to_live_ms"].as_f64()),
                x.clone(),
            );
            figure(
                &format!("{prefix}_catch_up_ms"),
                &v,
                "ms",
                &vals(&ms, |m| phase_ms(&m.report, "catch-up")),
                x.clone(),
            );
        } else {
            figure(
                &format!("{prefix}_gap_ms"),
                &v,
                "ms",
                &vals(&ms, |m| Some(m.gap_whole_ms)),
                serde_json::json!({"rate": rate, "nominal_spacing_ms": 1000.0 / rate as f64,
                    "what": "largest gap touching the whole ms2m migrate --stop-and-copy command (its downtime)"}),
            );
        }
        figure(
            &format!("{prefix}_frozen_ms"),
            &v,
            "ms",
            &vals(&ms, |m| m.report["frozen_ms"].as_f64()),
            x.clone(),
        );
        figure(
            &format!("{prefix}_gap_baseline_ms"),
            &v,
            "ms",
            &vals(&ms, |m| Some(m.gap_baseline_ms)),
            serde_json::json!({"rate": rate, "what": "largest gap touching [start - 900 ms, start - 100 ms]"}),
        );
        for ph in ["checkpoint", "transfer", "restore", "cutover"] {
            let pv = vals(&ms, |m| phase_ms(&m.report, ph));
            if !pv.is_empty() {
                figure(
                    &format!("{prefix}_phase_{}_ms", ph.replace('-', "_")),
                    &v,
                    "ms",
                    &pv,
                    x.clone(),
                );
            }
        }
    }
}

fn phase_ms(report: &serde_json::Value, name: &str) -> Option<f64> {
    report["phases"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["ms"].as_f64())
}

fn exactness_figures(prefix: &str, variant: &str, run: &Run) {
    let s = &run.summary;
    for (name, key) in [
        ("lost", "lost"),
        ("duplicated", "duplicated"),
        ("out_of_order", "out_of_order"),
        ("failed_migrations", "failed"),
    ] {
        figure(
            &format!("{prefix}_{name}"),
            variant,
            "count",
            &[f(&s[key])],
            if key == "lost" {
                s.clone()
            } else {
                serde_json::json!({})
            },
        );
    }
    figure(
        &format!("{prefix}_digest_matches"),
        variant,
        "bool",
        &[if s["state_digest_matches"] == true {
            1.0
        } else {
            0.0
        }],
        serde_json::json!({}),
    );
}

/// L S S L L S S L ...: each mode moves A to B and B to A equally often.
fn interleaved(runs: usize) -> Vec<bool> {
    (0..2 * runs).map(|i| matches!(i % 4, 1 | 2)).collect()
}

fn gap(runs: usize, rate: u64, client: Client, kind: QueueKind) -> bool {
    let fig = format!("gap-{}-{}-{rate}", client.name(), kind.as_str());
    let run = run_moves(
        &fig,
        client,
        kind,
        rate,
        0,
        &interleaved(runs),
        Duration::from_millis(1500),
    );
    let variant = format!("{}-{}", client.name(), kind.as_str());
    let prefix = format!("mig{rate}");
    mode_figures(&prefix, &variant, &run, rate);
    exactness_figures(&prefix, &variant, &run);
    let live: Vec<f64> = run
        .migrations
        .iter()
        .filter_map(|m| m.gap_cutover_ms)
        .collect();
    let sac: Vec<f64> = run
        .migrations
        .iter()
        .filter(|m| m.mode == "stop-and-copy" && m.ok())
        .map(|m| m.gap_whole_ms)
        .collect();
    if let (Some(l), Some(s)) = (median(&live), median(&sac)) {
        figure(
            &format!("{prefix}_gap_reduction"),
            &variant,
            "fraction",
            &[1.0 - l / s],
            serde_json::json!({"what": "1 - median live gap at cutover / median stop-and-copy gap",
                "live_median_ms": l, "stop_and_copy_median_ms": s}),
        );
    }
    let lt: Vec<f64> = run
        .migrations
        .iter()
        .filter(|m| m.mode == "live" && m.ok())
        .map(Migration::total_ms)
        .collect();
    let st: Vec<f64> = run
        .migrations
        .iter()
        .filter(|m| m.mode == "stop-and-copy" && m.ok())
        .map(Migration::total_ms)
        .collect();
    if let (Some(l), Some(s)) = (median(&lt), median(&st)) {
        figure(
            &format!("{prefix}_total_ratio"),
            &variant,
            "ratio",
            &[l / s],
            serde_json::json!({"what": "median live total_ms / median stop-and-copy total_ms"}),
        );
    }
    run.clean
}

/// The consumer's throughput with a backlog: `n` messages published without
/// a rate limit, drained by a fresh consumer with `work_us`.
fn throughput(client: Client, work_us: u64, n: u64) -> f64 {
    let fig = format!("tput-{}", client.name());
    let td = TestDir::new(&format!("{}-{fig}", token()));
    let q = TestQueues::new(&format!("{}-{fig}", token()), QueueKind::Stream);
    let name = format!("{}-tput", client.name());
    let c = start_consumer(client, &q, &td, &name, work_us);
    let rep = Producer::run(ProducerConfig::new(&q.queue, n, 0));
    let state = c.wait_count(n, Duration::from_secs(60 + n / 100));
    let results = collect_results(&q.results, n as usize, Duration::from_secs(60));
    let mut t: Vec<u64> = results.iter().map(|r| r.processed_at_us).collect();
    t.sort_unstable();
    // Skip the first 10 %: the consumer may have started before the backlog.
    let skip = t.len() / 10;
    let tput = if t.len() > skip + 1 {
        (t.len() - skip - 1) as f64 / ((t[t.len() - 1] - t[skip]) as f64 / 1e6)
    } else {
        f64::NAN
    };
    log(&format!(
        "throughput of {} with WORK_US={work_us}: {tput:.0} msg/s ({} confirmed, state count {})",
        client.name(),
        rep.confirmed.len(),
        state.count
    ));
    tput
}

fn catchup(runs: usize, rate: u64, work_us: u64, client: Client) -> bool {
    let tput = throughput(client, work_us, 3000.max(3 * rate));
    let variant = format!("{}-stream-work{work_us}us", client.name());
    figure(
        "consumer_throughput_msgs",
        &variant,
        "msg/s",
        &[tput],
        serde_json::json!({"work_us": work_us, "what": "drain rate of a backlog (results' processed_at_us, first 10 % skipped)"}),
    );
    let sustains = tput >= 1.1 * rate as f64;
    let live_rate = if sustains {
        rate
    } else {
        let r = ((0.85 * tput) / 50.0).floor() as u64 * 50;
        log(&format!(
            "the consumer with WORK_US={work_us} cannot keep up with {rate} msg/s (it drains {tput:.0} msg/s): measuring at {r} msg/s"
        ));
        r.max(50)
    };
    let fig = format!("catchup-{}-{live_rate}", client.name());
    let run = run_moves(
        &fig,
        client,
        QueueKind::Stream,
        live_rate,
        work_us,
        &vec![false; runs],
        Duration::from_millis(1500),
    );
    let ms: Vec<&Migration> = run.migrations.iter().filter(|m| m.ok()).collect();
    let x = serde_json::json!({"requested_rate": rate, "rate": live_rate, "work_us": work_us,
        "consumer_sustains_requested_rate": sustains, "consumer_throughput_msgs": tput,
        "migrated": ms.len(), "attempted": run.migrations.len()});
    let prefix = format!("catchup{live_rate}");
    figure(
        &format!("{prefix}_replay_rate"),
        &variant,
        "msg/s",
        &vals(&ms, |m| m.report["catch_up"]["replay_rate"].as_f64()),
        x.clone(),
    );
    figure(
        &format!("{prefix}_live_rate"),
        &variant,
        "msg/s",
        &vals(&ms, |m| m.report["catch_up"]["live_rate"].as_f64()),
        x.clone(),
    );
    figure(
        &format!("{prefix}_replay_live_ratio"),
        &variant,
        "ratio",
        &vals(&ms, |m| {
            Some(
                m.report["catch_up"]["replay_rate"].as_f64()?
                    / m.report["catch_up"]["live_rate"].as_f64()?,
            )
        }),
        x.clone(),
    );
    figure(
        &format!("{prefix}_initial_lag"),
        &variant,
        "messages",
        &vals(&ms, |m| m.report["catch_up"]["initial_lag"].as_f64()),
        x.clone(),
    );
    figure(
        &format!("{prefix}_final_lag"),
        &variant,
        "messages",
        &vals(&ms, |m| m.report["catch_up"]["final_lag"].as_f64()),
        x.clone(),
    );
    figure(
        &format!("{prefix}_migrated"),
        &variant,
        "fraction",
        &[ms.len() as f64 / run.migrations.len().max(1) as f64],
        x,
    );
    mode_figures(&prefix, &variant, &run, live_rate);
    exactness_figures(&prefix, &variant, &run);
    let _ = (&run.produced, &run.results);
    run.clean
}

fn pingpong(migrations: usize, rate: u64, client: Client, kind: QueueKind) -> bool {
    let fig = format!("pingpong-{}-{}-{rate}", client.name(), kind.as_str());
    let run = run_plan(
        &fig,
        client,
        kind,
        rate,
        0,
        &vec![false; migrations],
        Duration::from_millis(1000),
        5,
    );
    let variant = format!("{}-{}", client.name(), kind.as_str());
    let prefix = format!("pingpong{rate}");
    if kind == QueueKind::Classic && run.migrations.iter().any(|m| !m.ok()) {
        let e = run
            .migrations
            .iter()
            .find_map(|m| m.error.clone())
            .unwrap_or_default();
        figure(
            &format!("{prefix}_classic_migrated"),
            &variant,
            "count",
            &[run.migrations.iter().filter(|m| m.ok()).count() as f64],
            serde_json::json!({"refusal": e, "summary": run.summary}),
        );
        // The checker still ran: the source served on after the refusal.
        exactness_figures(&prefix, &variant, &run);
        // A refusal is the expected answer here, not a failure of the bench.
        return run.summary["lost"] == 0
            && run.summary["duplicated"] == 0
            && run.summary["out_of_order"] == 0;
    }
    mode_figures(&prefix, &variant, &run, rate);
    exactness_figures(&prefix, &variant, &run);
    run.clean
}

/// The queue kind in `args[i]`: `stream` (the default) or `classic`.
fn kind_arg(args: &[String], i: usize) -> QueueKind {
    match args.get(i).map(String::as_str) {
        Some("stream") | None => QueueKind::Stream,
        Some("classic") => QueueKind::Classic,
        other => panic!("expected stream or classic, got {other:?}"),
    }
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> T {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("argument {i} ({what}) missing or not valid: {args:?}"))
}

fn client_arg(args: &[String], i: usize) -> Client {
    match args.get(i).map(String::as_str) {
        Some("lapin") => Client::Lapin,
        Some("pika") => Client::Pika,
        other => panic!("argument {i}: expected lapin or pika, got {other:?}"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    env();
    rabbitmq_available();
    require_host_b();
    let clean = match args.get(1).map(String::as_str) {
        Some("gap") => gap(
            arg(&args, 2, "runs"),
            arg(&args, 3, "rate"),
            client_arg(&args, 4),
            kind_arg(&args, 5),
        ),
        Some("catchup") => catchup(
            arg(&args, 2, "runs"),
            arg(&args, 3, "rate"),
            arg(&args, 4, "work us"),
            client_arg(&args, 5),
        ),
        Some("pingpong") => pingpong(
            arg(&args, 2, "migrations"),
            arg(&args, 3, "rate"),
            client_arg(&args, 4),
            kind_arg(&args, 5),
        ),
        _ => {
            eprintln!(
                "usage: bench_migration gap RUNS RATE lapin|pika | catchup RUNS RATE WORK_US lapin|pika | \
                 pingpong MIGRATIONS RATE lapin|pika [stream|classic]"
            );
            std::process::exit(2);
        }
    };
    if !clean {
        std::process::exit(1);
    }
}
