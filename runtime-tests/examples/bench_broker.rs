//! Broker benchmarks of issue 4, driven by `hack/bench-broker.sh` (which
//! checks the prerequisites and cleans up after a kill).
//!
//! ```text
//! bench_broker correctness stream|classic CYCLES RATE
//! bench_broker pause RUNS CTR_RUNS RATE RSS_SECONDS
//! ```
//!
//! - `correctness`: the lapin consumer (`amqp-consumer`, behind the shim's
//!   AMQP tap) on a stream or a classic queue, a producer at RATE msg/s for
//!   the whole run, CYCLES times `ms2m checkpoint --exit --image-path` +
//!   `ms2m restore`; then the checker: lost, duplicated, out of order.
//! - `pause`: the same consumer on a stream at RATE msg/s; first the shim's
//!   VmRSS sampled every 250 ms for RSS_SECONDS (tap active, under load),
//!   then RUNS leave-running `ms2m checkpoint`s and CTR_RUNS
//!   `ctr task checkpoint`s, 1.5 s apart; the processing pause of each is the
//!   largest gap between consecutive `processed_at_us` of the consumer's
//!   results around the checkpoint, minus the nominal spacing (1/RATE).
//!
//! Output: one JSON object per figure on stdout, `{"name","runtime",
//! "unit","median","min","max","runs","values",...}`; progress on stderr.
//! Any failure panics with its cause (the containers, queues and image
//! directories are removed on the way out); exit status 101 then.
//!
//! Container ids, queue names and directories start with `BENCH_TOKEN`
//! (default `bb<pid>`), so the script can clean up after a kill.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ms2m_runtime_tests::amqp::{
    collect_results, connect_logged_at, manifest_json, queue_cut, rabbitmq_available, Checker,
    ConsumerState, Producer, ProducerConfig, QueueKind, ResultMsg, TestQueues, AMQP_CONSUMER,
    STATE_FILE,
};
use ms2m_runtime_tests::{env, ms2m, wait_until, Container, RunOpts, TestDir};

/// What the app inside the container uses: the tap on its own loopback.
const APP_URL: &str = "amqp://guest:guest@localhost:5672/%2f";
/// The real broker, as the shim (host network namespace) reaches it.
const UPSTREAM: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const RUNTIME: &str = "ms2m";

fn token() -> String {
    std::env::var("BENCH_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| format!("bb{}", std::process::id()))
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("bench paths are UTF-8")
}

fn log(msg: &str) {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() % 86400)
        .unwrap_or(0);
    eprintln!(
        "[bench-broker {:02}:{:02}:{:02}] {msg}",
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
        "min": values.iter().copied().reduce(f64::min),
        "max": values.iter().copied().reduce(f64::max),
        "runs": values.len(),
        "values": values.iter().map(|v| round4(*v)).collect::<Vec<_>>(),
    });
    if let (Some(o), serde_json::Value::Object(e)) = (o.as_object_mut(), extra) {
        o.extend(e);
    }
    println!("{o}");
}

fn start_consumer(q: &TestQueues, td: &TestDir, name: &str) -> (Container, PathBuf) {
    let log = td.join(&format!("{name}.log"));
    let opts = RunOpts::command(&[AMQP_CONSUMER])
        .flag(&format!("--annotation=io.ms2m.tap.upstream={UPSTREAM}"))
        .flag(&format!("--env=AMQP_URL={APP_URL}"))
        .flag(&format!("--env=QUEUE={}", q.queue))
        .flag(&format!("--env=QUEUE_TYPE={}", q.kind.as_str()))
        .flag(&format!("--env=RESULTS_QUEUE={}", q.results))
        .flag(&format!("--env=CONSUMER_NAME={name}"))
        .log_uri(&format!("file://{}", log.display()));
    let c = Container::run(&format!("{}-{name}", token()), opts);
    wait_connected(&log, 1, Duration::from_secs(30));
    (c, log)
}

fn try_state(c: &Container) -> Option<ConsumerState> {
    let out = c.exec(&["cat", STATE_FILE]);
    if out.success() {
        ConsumerState::parse(&out.stdout)
    } else {
        None
    }
}

fn wait_count(c: &Container, count: u64, timeout: Duration) -> ConsumerState {
    wait_until(
        &format!("consumer {} to have processed {count}", c.id),
        timeout,
        Duration::from_millis(50),
        || try_state(c).filter(|s| s.count >= count),
    )
}

fn wait_connected(log: &Path, n: u64, timeout: Duration) -> u64 {
    wait_until(
        &format!("connection #{n} in {}", log.display()),
        timeout,
        Duration::from_millis(2),
        || connect_logged_at(log, n),
    )
}

fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// Producer, exit checkpoint/restore cycles, checker.
fn correctness(kind: QueueKind, cycles: u64, rate: u64) -> bool {
    let k = kind.as_str();
    let td = TestDir::new(&format!("{}-corr-{k}", token()));
    let q = TestQueues::new(&format!("{}-{k}", token()), kind);
    let name = format!("lapin-{k}");
    let (c, clog) = start_consumer(&q, &td, &name);
    // Enough for any run; stopped after the last cycle.
    let producer = Producer::start(ProducerConfig::new(&q.queue, u64::MAX / 4, rate));
    wait_count(&c, rate / 2, Duration::from_secs(30));
    let (mut cycle_ms, mut ckpt_ms, mut restore_ms, mut reconnect_ms) =
        (vec![], vec![], vec![], vec![]);
    let (mut frozen_ms, mut quiesce_ms, mut cut_advance) = (vec![], vec![], vec![]);
    let mut quiesce_incomplete = 0u64;
    let mut last_cut: Option<f64> = None;
    let t_all = Instant::now();
    for i in 1..=cycles {
        // Let the consumer catch up and process live messages between cycles.
        std::thread::sleep(Duration::from_millis(300));
        producer_alive(&producer, &format!("{k} cycle {i}"));
        let img = td.join(&format!("ck{i}"));
        let t0_us = now_us();
        let t0 = Instant::now();
        let out = ms2m(&[
            "checkpoint",
            "--exit",
            "--image-path",
            path_str(&img),
            &c.id,
        ]);
        assert!(out.success(), "cycle {i}: ms2m checkpoint --exit: {out}");
        let ck = t0.elapsed().as_secs_f64() * 1000.0;
        let m = manifest_json(&img);
        let b = &m["broker"];
        if b["quiesce"]["complete"] != true {
            quiesce_incomplete += 1;
        }
        quiesce_ms.push(f(&b["quiesce"]["waited_ms"]));
        frozen_ms.push(f(&m["stats"]["frozen_time_us"]) / 1000.0);
        let qc = queue_cut(&m, &q.queue);
        let cut = if kind == QueueKind::Stream {
            f(&qc["next_offset"])
        } else {
            f(&qc["acked"])
        };
        let t1 = Instant::now();
        let out = ms2m(&[
            "restore",
            "--log",
            path_str(&clog),
            "--work-path",
            path_str(&td.join(&format!("rw{i}"))),
            &c.id,
            path_str(&img),
        ]);
        assert!(out.success(), "cycle {i}: ms2m restore: {out}");
        let rs = t1.elapsed().as_secs_f64() * 1000.0;
        let at = wait_connected(&clog, i + 1, Duration::from_secs(30));
        let total = (at as f64 - t0_us as f64) / 1000.0;
        if i <= 3 {
            keep_dump_log(&img, &format!("{k}-cycle-{i}"));
        }
        let _ = std::fs::remove_dir_all(&img);
        let _ = std::fs::remove_dir_all(img.with_file_name(format!("ck{i}-work")));
        let _ = std::fs::remove_dir_all(td.join(&format!("rw{i}")));
        ckpt_ms.push(ck);
        restore_ms.push(rs);
        reconnect_ms.push(total - ck - rs);
        cycle_ms.push(total);
        if kind == QueueKind::Stream {
            if let Some(l) = last_cut {
                cut_advance.push(cut - l);
            }
            last_cut = Some(cut);
        } else {
            // A classic cut counts the acks of the restored connection only.
            cut_advance.push(cut);
        }
        log(&format!(
            "{k} cycle {i}/{cycles}: checkpoint {ck:.0} ms (quiesce {} ms, frozen {:.1} ms), restore {rs:.0} ms, \
             consuming again {total:.0} ms after the checkpoint started; cut {cut}",
            b["quiesce"]["waited_ms"],
            f(&m["stats"]["frozen_time_us"]) / 1000.0
        ));
    }
    std::thread::sleep(Duration::from_millis(300));
    producer.stop();
    let rep = producer.join().unwrap_or_else(|e| panic!("producer: {e}"));
    let n = rep.confirmed.len() as u64;
    log(&format!(
        "{k}: {cycles} cycles in {:.0} s; producer confirmed {n}; waiting for the consumer",
        t_all.elapsed().as_secs_f64()
    ));
    let state = wait_count(&c, n, Duration::from_secs(120));
    let results = collect_results(&q.results, n as usize, Duration::from_secs(120));
    let report = Checker::new(rep.confirmed.iter().copied()).check(&results);
    log(&format!("{k}: {report}"));
    let digest_ok =
        state.digest == ms2m_runtime_tests::amqp::digest_of(rep.confirmed.iter().copied());
    let v = format!("lapin-{k}");
    let extra = serde_json::json!({
        "cycles": cycles, "rate": rate, "produced": n, "results": results.len(),
        "processed_unique": report.processed_unique, "unexpected": report.unexpected.len(),
        "state_count": state.count, "state_digest_matches": digest_ok,
        "connects": state.connects, "quiesce_incomplete": quiesce_incomplete,
    });
    figure(
        "broker_lost",
        &v,
        "messages",
        &[report.lost.len() as f64],
        extra.clone(),
    );
    figure(
        "broker_duplicated",
        &v,
        "messages",
        &[report.duplicated.len() as f64],
        extra.clone(),
    );
    figure(
        "broker_out_of_order",
        &v,
        "messages",
        &[report.out_of_order as f64],
        extra,
    );
    figure(
        "broker_cycle_ms",
        &v,
        "ms",
        &cycle_ms,
        serde_json::json!({"what": "ms2m checkpoint --exit start to the consumer's next basic.consume (its log)"}),
    );
    figure(
        "broker_cycle_checkpoint_ms",
        &v,
        "ms",
        &ckpt_ms,
        serde_json::json!({}),
    );
    figure(
        "broker_cycle_restore_ms",
        &v,
        "ms",
        &restore_ms,
        serde_json::json!({}),
    );
    figure(
        "broker_cycle_reconnect_ms",
        &v,
        "ms",
        &reconnect_ms,
        serde_json::json!({"what": "restore returned to the consumer's basic.consume"}),
    );
    figure(
        "broker_cycle_quiesce_ms",
        &v,
        "ms",
        &quiesce_ms,
        serde_json::json!({}),
    );
    figure(
        "broker_cycle_frozen_ms",
        &v,
        "ms",
        &frozen_ms,
        serde_json::json!({}),
    );
    figure(
        "broker_cycle_cut_advance",
        &v,
        "messages",
        &cut_advance,
        serde_json::json!({"what": if kind == QueueKind::Stream { "next_offset growth between consecutive cuts" } else { "acks on the restored connection before the next cut" }}),
    );
    let clean = report.is_clean() && digest_ok && state.count == n && results.len() as u64 == n;
    if !clean {
        log(&format!(
            "{k}: NOT exact: {report}; state {state:?}; digest of 1..{n} matches: {digest_ok}"
        ));
    }
    clean
}

/// Copies CRIU's dump.log of a checkpoint (in `<img>-work` or `<img>`) to
/// `$BENCH_LOGDIR/<name>-dump.log` when BENCH_LOGDIR is set.
fn keep_dump_log(img: &Path, name: &str) {
    let Some(dir) = std::env::var_os("BENCH_LOGDIR") else {
        return;
    };
    let work = img.with_file_name(format!(
        "{}-work",
        img.file_name().and_then(|n| n.to_str()).unwrap_or("img")
    ));
    for d in [work.as_path(), img] {
        let src = d.join("dump.log");
        if src.is_file() {
            let dst = Path::new(&dir).join(format!("{name}-dump.log"));
            if let Err(e) = std::fs::copy(&src, &dst) {
                log(&format!("keeping {}: {e}", src.display()));
            }
            return;
        }
    }
}

/// The producer runs for the whole figure; if it ended, its connection to
/// the broker broke (a broker restart by something else on this machine?)
/// and the figure would measure an idle consumer: stop with its error.
fn producer_alive(p: &Producer, when: &str) {
    if p.is_finished() {
        panic!(
            "{when}: the producer stopped early (did something restart RabbitMQ or raise a memory alarm? \
             other broker tests must not run at the same time)"
        );
    }
}

fn max_gap_us(results: &[ResultMsg], from_us: u64, to_us: u64) -> u64 {
    let mut r: Vec<u64> = results.iter().map(|m| m.processed_at_us).collect();
    r.sort_unstable();
    r.windows(2)
        .filter(|w| w[1] >= from_us && w[0] <= to_us)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or(0)
}

fn shim_rss_kib(c: &Container) -> Option<u64> {
    // The shim that serves the task: the longest-lived `-id ID` process.
    ms2m_runtime_tests::shim_pids_for(&c.id)
        .into_iter()
        .filter_map(ms2m_runtime_tests::vm_rss_kib)
        .max()
}

/// Shim RSS under load, then leave-running checkpoints and their pauses.
fn pause(runs: u64, ctr_runs: u64, rate: u64, rss_secs: u64) -> bool {
    let td = TestDir::new(&format!("{}-pause", token()));
    let q = TestQueues::new(&format!("{}-pause", token()), QueueKind::Stream);
    let (c, _log) = start_consumer(&q, &td, "lapin-pause");
    let producer = Producer::start(ProducerConfig::new(&q.queue, u64::MAX / 4, rate));
    wait_count(&c, rate, Duration::from_secs(30));

    let mut rss = vec![];
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(rss_secs) {
        match shim_rss_kib(&c) {
            Some(k) => rss.push(k as f64 / 1024.0),
            None => panic!("no shim process with -id {} found", c.id),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    log(&format!(
        "shim VmRSS under {rate} msg/s with the tap: median {:.2} MiB over {} samples",
        median(&rss).unwrap_or(f64::NAN),
        rss.len()
    ));

    // (variant, t0, t1, quiesce ms, frozen ms)
    let mut marks: Vec<(&str, u64, u64, f64, f64)> = vec![];
    let plan: Vec<&str> = (0..runs)
        .map(|_| "ms2m-checkpoint")
        .chain((0..ctr_runs).map(|_| "ctr-task-checkpoint"))
        .collect();
    for (i, variant) in plan.iter().enumerate() {
        std::thread::sleep(Duration::from_millis(1500));
        producer_alive(&producer, &format!("{variant} run {i}"));
        let img = td.join(&format!("lr{i}"));
        let t0 = now_us();
        let out = if *variant == "ms2m-checkpoint" {
            ms2m(&["checkpoint", "--image-path", path_str(&img), &c.id])
        } else {
            c.ctr_checkpoint(&["--image-path", path_str(&img)])
        };
        let t1 = now_us();
        assert!(out.success(), "{variant} run {i}: {out}");
        assert_eq!(c.status().as_deref(), Some("RUNNING"), "after {variant}");
        let (qz, fz) = match std::fs::read_to_string(img.join("ms2m-manifest.json")) {
            Ok(text) => {
                let m: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                (
                    f(&m["broker"]["quiesce"]["waited_ms"]),
                    f(&m["stats"]["frozen_time_us"]) / 1000.0,
                )
            }
            Err(_) => (f64::NAN, f64::NAN),
        };
        log(&format!(
            "{variant} run {i}: {:.0} ms wall, quiesce {qz} ms, frozen {fz:.1} ms",
            (t1 - t0) as f64 / 1000.0
        ));
        marks.push((variant, t0, t1, qz, fz));
        keep_dump_log(&img, &format!("pause-{variant}-{i}"));
        let _ = std::fs::remove_dir_all(&img);
        let _ = std::fs::remove_dir_all(img.with_file_name(format!("lr{i}-work")));
    }
    let mut rss_after = vec![];
    for _ in 0..8 {
        if let Some(k) = shim_rss_kib(&c) {
            rss_after.push(k as f64 / 1024.0);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    std::thread::sleep(Duration::from_millis(500));
    producer.stop();
    let rep = producer.join().unwrap_or_else(|e| panic!("producer: {e}"));
    let n = rep.confirmed.len() as u64;
    let state = wait_count(&c, n, Duration::from_secs(60));
    let results = collect_results(&q.results, n as usize, Duration::from_secs(60));
    let report = Checker::new(rep.confirmed.iter().copied()).check(&results);
    log(&format!("pause: {report}; state count {}", state.count));
    let nominal_ms = 1000.0 / rate as f64;
    let mut ok = report.is_clean() && results.len() as u64 == n;
    for variant in ["ms2m-checkpoint", "ctr-task-checkpoint"] {
        let ms: Vec<_> = marks.iter().filter(|m| m.0 == variant).collect();
        if ms.is_empty() {
            continue;
        }
        let (mut pause, mut gap, mut base, mut wall, mut qz, mut fz) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for (_, t0, t1, q, fr) in ms {
            // Gaps that touch the checkpoint command (plus 200 ms after it:
            // the consumer's backlog drains after the thaw).
            let g = max_gap_us(&results, *t0, *t1 + 200_000) as f64 / 1000.0;
            let b = max_gap_us(
                &results,
                t0.saturating_sub(1_200_000),
                t0.saturating_sub(400_000),
            ) as f64
                / 1000.0;
            gap.push(g);
            pause.push((g - nominal_ms).max(0.0));
            base.push(b);
            wall.push((t1 - t0) as f64 / 1000.0);
            qz.push(*q);
            fz.push(*fr);
        }
        let what = if variant == "ms2m-checkpoint" {
            "ms2m checkpoint (leave-running, no client pause)"
        } else {
            "ctr task checkpoint --image-path (ctr pauses the task around it)"
        };
        log(&format!(
            "{variant}: pauses {pause:?} ms, baseline gaps {base:?} ms"
        ));
        figure(
            "processing_pause_ms",
            variant,
            "ms",
            &pause,
            serde_json::json!({"rate": rate, "what": what, "nominal_spacing_ms": nominal_ms, "exact": report.is_clean()}),
        );
        figure(
            "processing_max_gap_ms",
            variant,
            "ms",
            &gap,
            serde_json::json!({}),
        );
        figure(
            "processing_baseline_gap_ms",
            variant,
            "ms",
            &base,
            serde_json::json!({"what": "largest gap 1.2 s to 0.4 s before each checkpoint"}),
        );
        figure(
            "leave_running_checkpoint_wall_ms",
            variant,
            "ms",
            &wall,
            serde_json::json!({}),
        );
        figure(
            "leave_running_quiesce_ms",
            variant,
            "ms",
            &qz,
            serde_json::json!({}),
        );
        figure(
            "leave_running_frozen_ms",
            variant,
            "ms",
            &fz,
            serde_json::json!({}),
        );
    }
    figure(
        "shim_rss_tap_mib",
        RUNTIME,
        "MiB",
        &rss,
        serde_json::json!({"rate": rate, "what": "VmRSS of containerd-shim-ms2m-v1 serving the container, tap active, sampled every 250 ms before any checkpoint"}),
    );
    figure(
        "shim_rss_tap_after_checkpoints_mib",
        RUNTIME,
        "MiB",
        &rss_after,
        serde_json::json!({"rate": rate}),
    );
    if !ok {
        log(&format!("pause: NOT exact: {report}"));
    }
    ok &= state.count == n;
    ok
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> T {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("argument {i} ({what}) missing or not a number: {args:?}"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    env();
    rabbitmq_available();
    let clean = match args.get(1).map(String::as_str) {
        Some("correctness") => {
            let kind = match args.get(2).map(String::as_str) {
                Some("stream") => QueueKind::Stream,
                Some("classic") => QueueKind::Classic,
                other => panic!("correctness: expected stream or classic, got {other:?}"),
            };
            correctness(kind, arg(&args, 3, "cycles"), arg(&args, 4, "rate"))
        }
        Some("pause") => pause(
            arg(&args, 2, "runs"),
            arg(&args, 3, "ctr runs"),
            arg(&args, 4, "rate"),
            arg(&args, 5, "rss seconds"),
        ),
        _ => {
            eprintln!("usage: bench_broker correctness stream|classic CYCLES RATE | pause RUNS CTR_RUNS RATE RSS_SECONDS");
            std::process::exit(2);
        }
    };
    if !clean {
        std::process::exit(1);
    }
}
