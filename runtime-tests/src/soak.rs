//! The soak (issue 9): a tapped consumer under steady load for a long time,
//! a leave-running `ms2m checkpoint` every [`SoakConfig::leave_every`] and an
//! exit checkpoint + `ms2m restore` every [`SoakConfig::exit_every`] (in
//! place of that tick's leave-running one), the shim's and the consumer's
//! VmRSS sampled all along, and the checker over every result at the end.
//! `runtime-tests/tests/soak.rs` runs 2 minutes of it and asserts;
//! `hack/bench.sh soak` (`examples/bench_soak.rs`) runs 30 minutes and
//! reports, with containerd-shim-runc-v2 serving the same consumer directly
//! against the broker as the reference ([`Mode::RuncDirect`]).
//!
//! Results are checked as they arrive ([`Tally`]): a 30-minute soak at
//! 5,000 msg/s has 9 million of them, and the results queue is drained all
//! along so the broker never holds more than the consumer's lag.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::amqp::{
    block_on, connect_logged_at, consume_results, consumer_run_opts, digest_of, manifest_json,
    now_us, wait_consumer_count, Checker, Client, ConsumerState, Producer, ProducerConfig,
    QueueKind, Report, ResultMsg, ResultsGoal, Tally, TestQueues,
};
use crate::{ctr, env, ms2m, shim_pids_for, unique_id, vm_rss_kib, Container, TestDir};

/// What the app inside the container uses: the tap on its own loopback.
pub const APP_URL: &str = "amqp://guest:guest@localhost:5672/%2f";
/// The real broker, as the shim (host network namespace) reaches it.
pub const UPSTREAM: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Gaps between two processed messages at least this long are kept (to
/// attribute pauses to checkpoints).
const GAP_KEPT_US: u64 = 5_000;

/// Who serves the consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// ms2m's shim with the AMQP tap, checkpoints and restores on schedule.
    Ms2mTapped,
    /// containerd-shim-runc-v2, the consumer on the host network straight to
    /// the broker, no checkpoints (runc-v2 has no tap and no replay): the
    /// reference for the shim's memory.
    RuncDirect,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Ms2mTapped => "ms2m",
            Mode::RuncDirect => "runc-v2",
        }
    }
}

/// One soak's parameters.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    pub mode: Mode,
    pub duration: Duration,
    /// Messages per second the producer offers.
    pub rate: u64,
    /// A leave-running checkpoint this often...
    pub leave_every: Duration,
    /// ...and an exit checkpoint + restore instead at multiples of this.
    pub exit_every: Duration,
    /// RSS samples this often.
    pub sample_every: Duration,
    pub kind: QueueKind,
    /// Prefix of the container id, the queues and the directory.
    pub prefix: String,
    /// Where to copy the consumer's log and a few CRIU dump logs (bench).
    pub keep_logs: Option<PathBuf>,
    /// The consumer's `BATCH`: deliveries it processes per confirm round
    /// trip (1: one at a time, publish, confirm, ack each); its prefetch is
    /// this or 50, whichever is larger.
    pub batch: usize,
}

impl SoakConfig {
    /// The schedule: leave-running every 10 s, exit + restore every
    /// 60 s, RSS every 5 s, on a stream.
    pub fn new(mode: Mode, duration: Duration, rate: u64, prefix: &str) -> SoakConfig {
        SoakConfig {
            mode,
            duration,
            rate,
            leave_every: Duration::from_secs(10),
            exit_every: Duration::from_secs(60),
            sample_every: Duration::from_secs(5),
            kind: QueueKind::Stream,
            prefix: prefix.to_string(),
            keep_logs: None,
            batch: 1,
        }
    }
}

/// A leave-running checkpoint or an exit checkpoint + restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Leave,
    ExitRestore,
}

/// One checkpoint (and restore) of the soak.
#[derive(Debug, Clone)]
pub struct Op {
    pub kind: OpKind,
    /// Seconds since the soak started.
    pub at_s: f64,
    pub start_us: u64,
    /// When the checkpoint command returned (leave) or the consumer
    /// consumed again after the restore (exit).
    pub end_us: u64,
    /// The `ms2m checkpoint` command's wall time.
    pub checkpoint_ms: f64,
    /// CRIU's frozen time and the tap's quiesce wait, from the manifest.
    pub frozen_ms: f64,
    pub quiesce_ms: f64,
    /// `ms2m restore`'s wall time (exit only).
    pub restore_ms: Option<f64>,
    /// The longest the consumer processed nothing around it (from the
    /// results' `processed_at_us`), filled in at the end.
    pub pause_ms: f64,
}

/// One RSS sample.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at_s: f64,
    pub shim_pid: u32,
    pub shim_kib: u64,
    pub consumer_kib: u64,
    /// Results received so far, and how far they trail the producer's
    /// nominal count (rate x time since it started).
    pub results: usize,
    pub lag: i64,
}

/// What a soak did.
#[derive(Debug, Clone)]
pub struct SoakReport {
    pub config: SoakConfig,
    pub elapsed_s: f64,
    /// The producer's confirmed messages and its achieved rate.
    pub produced: usize,
    pub producer_rate: f64,
    /// Results received (duplicates included).
    pub results: usize,
    pub check: Report,
    pub state: ConsumerState,
    /// The consumer's final digest is that of the produced seqs in order.
    pub digest_ok: bool,
    /// From the producer's stop to the last result.
    pub drain_s: f64,
    pub ops: Vec<Op>,
    pub samples: Vec<Sample>,
    /// Checkpoints or restores that failed (the soak stops at the first).
    pub failures: Vec<String>,
}

fn log(msg: &str) {
    let t = now_us() / 1_000_000;
    eprintln!(
        "[soak {:02}:{:02}:{:02}] {msg}",
        t / 3600 % 24,
        t / 60 % 60,
        t % 60
    );
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("soak paths are UTF-8")
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// What the collector thread keeps.
#[derive(Default)]
struct Collected {
    tally: Tally,
    last_at_us: u64,
    /// `(previous processed_at_us, processed_at_us)` of long gaps.
    gaps: Vec<(u64, u64)>,
}

/// The results queue drained in the background into a [`Tally`].
struct Collector {
    goal: Arc<ResultsGoal>,
    seen: Arc<Mutex<Collected>>,
    handle: thread::JoinHandle<Result<usize, String>>,
}

impl Collector {
    fn start(queue: &str, timeout: Duration) -> Collector {
        let goal = Arc::new(ResultsGoal::new(usize::MAX, timeout));
        let seen = Arc::new(Mutex::new(Collected::default()));
        let (g, s, q) = (Arc::clone(&goal), Arc::clone(&seen), queue.to_string());
        let handle = thread::spawn(move || {
            block_on(consume_results(&q, &g, |r: ResultMsg| {
                let mut c = s.lock().unwrap_or_else(|e| e.into_inner());
                if c.last_at_us > 0 && r.processed_at_us >= c.last_at_us + GAP_KEPT_US {
                    let prev = c.last_at_us;
                    c.gaps.push((prev, r.processed_at_us));
                }
                c.last_at_us = c.last_at_us.max(r.processed_at_us);
                c.tally.push(&r);
            }))
        });
        Collector { goal, seen, handle }
    }

    fn count(&self) -> usize {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .tally
            .results()
    }

    /// Waits for `expected` results (at most `timeout`), then the tally.
    fn finish(self, expected: usize, timeout: Duration) -> Collected {
        self.goal.set(expected, timeout);
        match self.handle.join() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("collecting the results: {e}"),
            Err(_) => panic!("the results collector panicked"),
        }
        match Arc::try_unwrap(self.seen) {
            Ok(m) => m.into_inner().unwrap_or_else(|e| e.into_inner()),
            Err(_) => panic!("the results collector still holds its tally"),
        }
    }
}

/// Starts the consumer as `mode` says; returns it and its log file.
fn start_consumer(cfg: &SoakConfig, q: &TestQueues, td: &TestDir) -> (Container, PathBuf) {
    let name = format!("soak-{}", cfg.mode.name());
    let log = td.join(&format!("{name}.log"));
    let net: Vec<String> = match cfg.mode {
        Mode::Ms2mTapped => vec![
            format!("--annotation=io.ms2m.tap.upstream={UPSTREAM}"),
            format!("--env=AMQP_URL={}", APP_URL),
        ],
        Mode::RuncDirect => vec![
            "--net-host".to_string(),
            format!("--env=AMQP_URL={UPSTREAM}"),
        ],
    };
    let opts = consumer_run_opts(Client::Lapin, q, &name, &log, &net)
        .flag(&format!("--env=BATCH={}", cfg.batch))
        // A batch can only be as large as what the broker may have out.
        .flag(&format!("--env=PREFETCH={}", cfg.batch.max(50)));
    let runtime = match cfg.mode {
        Mode::Ms2mTapped => crate::MS2M_RUNTIME,
        Mode::RuncDirect => crate::RUNC_RUNTIME,
    };
    let c = Container::adopt(&unique_id(&format!("{}-{}", cfg.prefix, cfg.mode.name())));
    let mut args: Vec<String> = vec![
        "run".into(),
        "-d".into(),
        "--runtime".into(),
        runtime.into(),
    ];
    args.extend(opts.flags);
    args.push(env().image.clone());
    args.push(c.id.clone());
    args.extend(opts.args);
    ctr(&args).ok();
    wait_connected(&log, 1);
    (c, log)
}

fn wait_connected(log: &Path, n: u64) -> u64 {
    crate::wait_until(
        &format!("the consumer's connection #{n} in {}", log.display()),
        Duration::from_secs(60),
        Duration::from_millis(5),
        || connect_logged_at(log, n),
    )
}

/// The shim's VmRSS (the largest of the processes with `-id ID`: the
/// serving shim, not a transient `start`) and its pid.
fn shim_rss(id: &str) -> Option<(u32, u64)> {
    shim_pids_for(id)
        .into_iter()
        .filter_map(|p| Some((p, vm_rss_kib(p)?)))
        .max_by_key(|(_, k)| *k)
}

fn f64_of(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// Removes an image directory and its `-work` sibling.
fn remove_image(img: &Path) {
    let _ = std::fs::remove_dir_all(img);
    let mut work = img.as_os_str().to_owned();
    work.push("-work");
    let _ = std::fs::remove_dir_all(PathBuf::from(work));
}

fn keep_dump_log(cfg: &SoakConfig, img: &Path, name: &str) {
    let Some(dir) = &cfg.keep_logs else { return };
    let mut work = img.as_os_str().to_owned();
    work.push("-work");
    for d in [PathBuf::from(work), img.to_path_buf()] {
        if d.join("dump.log").is_file() {
            let _ = std::fs::copy(d.join("dump.log"), dir.join(format!("{name}-dump.log")));
            return;
        }
    }
}

/// The consumer under soak: its container, directory, log and how many
/// times it has reached basic.consume.
struct Subject {
    c: Container,
    td: TestDir,
    log: PathBuf,
    connects: u64,
}

/// Runs one checkpoint (leave-running or exit + restore) number `i`.
fn checkpoint_op(
    cfg: &SoakConfig,
    subject: &mut Subject,
    kind: OpKind,
    i: u64,
    at_s: f64,
) -> Result<Op, String> {
    let Subject {
        c,
        td,
        log: clog,
        connects,
    } = subject;
    let img = td.join(&format!("ck{i}"));
    let start_us = now_us();
    let t0 = Instant::now();
    let mut args = vec!["checkpoint"];
    if kind == OpKind::ExitRestore {
        args.push("--exit");
    }
    args.extend(["--image-path", path_str(&img), &c.id]);
    let out = ms2m(&args);
    let checkpoint_ms = t0.elapsed().as_secs_f64() * 1000.0;
    if !out.success() {
        remove_image(&img);
        return Err(format!("checkpoint {i} ({kind:?}) at {at_s:.0} s: {out}"));
    }
    let m = manifest_json(&img);
    let frozen_ms = f64_of(&m["stats"]["frozen_time_us"]) / 1000.0;
    let quiesce_ms = f64_of(&m["broker"]["quiesce"]["waited_ms"]);
    let mut op = Op {
        kind,
        at_s,
        start_us,
        end_us: now_us(),
        checkpoint_ms,
        frozen_ms,
        quiesce_ms,
        restore_ms: None,
        pause_ms: f64::NAN,
    };
    if i <= 2 || (kind == OpKind::ExitRestore && *connects <= 2) {
        keep_dump_log(cfg, &img, &format!("{kind:?}-{i}"));
    }
    if kind == OpKind::ExitRestore {
        let work = td.join(&format!("rw{i}"));
        let t1 = Instant::now();
        let out = ms2m(&[
            "restore",
            "--log",
            path_str(clog),
            "--work-path",
            path_str(&work),
            &c.id,
            path_str(&img),
        ]);
        op.restore_ms = Some(t1.elapsed().as_secs_f64() * 1000.0);
        let _ = std::fs::remove_dir_all(&work);
        remove_image(&img);
        if !out.success() {
            return Err(format!("restore {i} at {at_s:.0} s: {out}"));
        }
        *connects += 1;
        op.end_us = wait_connected(clog, *connects);
    } else {
        remove_image(&img);
        match c.status().as_deref() {
            Some("RUNNING") => {}
            other => {
                return Err(format!(
                    "after leave-running checkpoint {i} at {at_s:.0} s the task is {other:?}"
                ))
            }
        }
    }
    Ok(op)
}

/// The longest gap between two processed messages that touches
/// `[from_us, to_us]`, in ms (0 when none was kept).
fn pause_around(gaps: &[(u64, u64)], from_us: u64, to_us: u64) -> f64 {
    gaps.iter()
        .filter(|(a, b)| *b >= from_us && *a <= to_us)
        .map(|(a, b)| (b - a) as f64 / 1000.0)
        .fold(0.0, f64::max)
}

/// Runs one soak; panics when the setup fails (no broker, no consumer),
/// records checkpoint or restore failures in the report and stops there.
pub fn run(cfg: &SoakConfig) -> SoakReport {
    crate::env();
    crate::amqp::rabbitmq_available();
    if cfg.mode == Mode::Ms2mTapped {
        crate::ms2m_cli();
    }
    let td = TestDir::new(&format!("{}-soak-{}", cfg.prefix, cfg.mode.name()));
    let q = TestQueues::new(&format!("{}-soak", cfg.prefix), cfg.kind);
    let (c, log_path) = start_consumer(cfg, &q, &td);
    let mut subject = Subject {
        c,
        td,
        log: log_path,
        connects: 1,
    };
    let collector = Collector::start(&q.results, cfg.duration * 4 + Duration::from_secs(600));
    let producer = Producer::start(ProducerConfig::new(&q.queue, u64::MAX / 4, cfg.rate));
    let t_producer = Instant::now();
    // Warm up: two seconds of load before the first sample.
    wait_consumer_count(&subject.c, cfg.rate * 2, Duration::from_secs(60));
    let schedule = match cfg.mode {
        Mode::Ms2mTapped => format!(
            "leave-running checkpoint every {:?}, exit checkpoint + restore every {:?}",
            cfg.leave_every, cfg.exit_every
        ),
        Mode::RuncDirect => "no checkpoints".to_string(),
    };
    log(&format!(
        "{}: consumer {} at {} msg/s for {:.0} s ({schedule})",
        cfg.mode.name(),
        subject.c.id,
        cfg.rate,
        cfg.duration.as_secs_f64(),
    ));
    let start = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let mut ops: Vec<Op> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let sample = |at: f64, samples: &mut Vec<Sample>, subject: &Subject| {
        let c = &subject.c;
        let results = collector.count();
        let nominal = (t_producer.elapsed().as_secs_f64() * cfg.rate as f64) as i64;
        let (shim_pid, shim_kib) = shim_rss(&c.id).unwrap_or((0, 0));
        let consumer_kib = c.task().and_then(|(p, _)| vm_rss_kib(p)).unwrap_or(0);
        if shim_kib == 0 || consumer_kib == 0 {
            log(&format!(
                "at {at:.0} s: no RSS for the shim ({shim_pid}) or the consumer"
            ));
        }
        samples.push(Sample {
            at_s: at,
            shim_pid,
            shim_kib,
            consumer_kib,
            results,
            lag: nominal - results as i64,
        });
    };
    sample(0.0, &mut samples, &subject);
    let mut tick = 0u64;
    let mut next_sample = cfg.sample_every;
    loop {
        let next_tick = cfg.leave_every * (tick as u32 + 1);
        let next = if cfg.mode == Mode::Ms2mTapped {
            next_tick.min(next_sample)
        } else {
            next_sample
        };
        if next > cfg.duration || !failures.is_empty() {
            break;
        }
        if let Some(d) = next.checked_sub(start.elapsed()) {
            thread::sleep(d);
        }
        if producer.is_finished() {
            failures.push(format!(
                "the producer stopped at {:.0} s (did something restart RabbitMQ or raise an alarm?)",
                start.elapsed().as_secs_f64()
            ));
            break;
        }
        if next == next_sample {
            sample(start.elapsed().as_secs_f64(), &mut samples, &subject);
            let s = &samples[samples.len() - 1];
            if s.at_s as u64 % 60 < cfg.sample_every.as_secs().max(1) {
                log(&format!(
                    "{:.0} s: shim {} {:.2} MiB, consumer {:.2} MiB, {} results, lag {}",
                    s.at_s,
                    s.shim_pid,
                    mib(s.shim_kib),
                    mib(s.consumer_kib),
                    s.results,
                    s.lag
                ));
            }
            next_sample += cfg.sample_every;
        }
        if cfg.mode == Mode::Ms2mTapped && next == next_tick {
            tick += 1;
            let exit = next_tick
                .as_millis()
                .is_multiple_of(cfg.exit_every.as_millis().max(1));
            let kind = if exit {
                OpKind::ExitRestore
            } else {
                OpKind::Leave
            };
            let at_s = start.elapsed().as_secs_f64();
            match checkpoint_op(cfg, &mut subject, kind, tick, at_s) {
                Ok(op) => {
                    if exit {
                        log(&format!(
                            "{at_s:.0} s: exit checkpoint {:.0} ms (frozen {:.1} ms, quiesce {} ms), restore {:.0} ms, consuming again {:.0} ms after the checkpoint started",
                            op.checkpoint_ms,
                            op.frozen_ms,
                            op.quiesce_ms,
                            op.restore_ms.unwrap_or(f64::NAN),
                            (op.end_us - op.start_us) as f64 / 1000.0
                        ));
                    }
                    ops.push(op);
                }
                Err(e) => {
                    log(&format!("FAILED: {e}"));
                    failures.push(e);
                }
            }
        }
    }
    // A restore on the last tick made a fresh shim: let it serve a while so
    // the last sample is of a shim under load.
    if ops.last().is_some_and(|o| o.kind == OpKind::ExitRestore) {
        thread::sleep(cfg.sample_every);
    }
    sample(start.elapsed().as_secs_f64(), &mut samples, &subject);
    let elapsed_s = start.elapsed().as_secs_f64();
    producer.stop();
    let stopped = Instant::now();
    let rep = producer
        .join()
        .unwrap_or_else(|e| panic!("the producer failed: {e}"));
    let n = rep.confirmed.len();
    log(&format!(
        "{}: {elapsed_s:.0} s, {} checkpoints; producer confirmed {n} ({:.0} msg/s); draining",
        cfg.mode.name(),
        ops.len(),
        n as f64 / rep.elapsed.as_secs_f64()
    ));
    let drain_timeout = Duration::from_secs(120) + Duration::from_secs(n as u64 / cfg.rate.max(1));
    let collected = collector.finish(n, drain_timeout);
    let drain_s = stopped.elapsed().as_secs_f64();
    let state = wait_consumer_count(&subject.c, n as u64, Duration::from_secs(30));
    let digest_ok = state.digest == digest_of(rep.confirmed.iter().copied());
    let check = Checker::new(rep.confirmed.iter().copied()).verdict(&collected.tally);
    for op in &mut ops {
        op.pause_ms = pause_around(&collected.gaps, op.start_us, op.end_us + 200_000);
    }
    if let Some(dir) = &cfg.keep_logs {
        let _ = std::fs::copy(
            &subject.log,
            dir.join(format!("soak-{}-consumer.log", cfg.mode.name())),
        );
    }
    let report = SoakReport {
        config: cfg.clone(),
        elapsed_s,
        produced: n,
        producer_rate: n as f64 / rep.elapsed.as_secs_f64(),
        results: collected.tally.results(),
        check,
        state,
        digest_ok,
        drain_s,
        ops,
        samples,
        failures,
    };
    log(&report.summary());
    report
}

/// RSS figures of one process kind over the samples, in MiB.
#[derive(Debug, Clone, Copy)]
pub struct RssFigures {
    pub start: f64,
    pub end: f64,
    pub max: f64,
    pub min: f64,
}

fn rss_figures(v: impl Iterator<Item = u64>) -> RssFigures {
    let v: Vec<f64> = v.filter(|k| *k > 0).map(mib).collect();
    RssFigures {
        start: v.first().copied().unwrap_or(f64::NAN),
        end: v.last().copied().unwrap_or(f64::NAN),
        max: v.iter().copied().fold(f64::NAN, f64::max),
        min: v.iter().copied().fold(f64::NAN, f64::min),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn max_of(v: impl Iterator<Item = f64>) -> f64 {
    v.fold(f64::NAN, f64::max)
}

impl SoakReport {
    /// Checker clean, every result once, the consumer's state exact, no
    /// failed checkpoint or restore.
    pub fn exact(&self) -> bool {
        self.failures.is_empty()
            && self.check.is_clean()
            && self.results == self.produced
            && self.state.count == self.produced as u64
            && self.digest_ok
    }

    pub fn shim_rss(&self) -> RssFigures {
        rss_figures(self.samples.iter().map(|s| s.shim_kib))
    }

    pub fn consumer_rss(&self) -> RssFigures {
        rss_figures(self.samples.iter().map(|s| s.consumer_kib))
    }

    /// Per shim instance (pid): first and last sample, in MiB, in order.
    pub fn shim_instances(&self) -> Vec<(u32, f64, f64, usize)> {
        let mut out: Vec<(u32, f64, f64, usize)> = Vec::new();
        for s in self.samples.iter().filter(|s| s.shim_kib > 0) {
            match out.last_mut() {
                Some(last) if last.0 == s.shim_pid => {
                    last.2 = mib(s.shim_kib);
                    last.3 += 1;
                }
                _ => out.push((s.shim_pid, mib(s.shim_kib), mib(s.shim_kib), 1)),
            }
        }
        out
    }

    fn ops_of(&self, kind: OpKind) -> impl Iterator<Item = &Op> {
        self.ops.iter().filter(move |o| o.kind == kind)
    }

    /// A few lines for a log or a failed assertion.
    pub fn summary(&self) -> String {
        let (shim, cons) = (self.shim_rss(), self.consumer_rss());
        let leave: Vec<&Op> = self.ops_of(OpKind::Leave).collect();
        let exit: Vec<&Op> = self.ops_of(OpKind::ExitRestore).collect();
        let med = |ops: &[&Op], f: fn(&Op) -> f64| median(ops.iter().map(|o| f(o)).collect());
        let mut s = format!(
            "{} soak, {:.0} s at {} msg/s offered ({:.0} achieved): {} produced, {} results, {}; \
             consumer state count {} digest {}; drained {:.1} s after the producer stopped\n  \
             {} leave-running checkpoints (frozen median {:.1} ms, pause median {:.1} ms, max {:.1} ms), \
             {} exit checkpoints + restores (checkpoint median {:.0} ms, restore {:.0} ms, \
             interruption median {:.0} ms, max {:.0} ms)\n  \
             shim RSS start {:.2} end {:.2} max {:.2} MiB; consumer RSS start {:.2} end {:.2} max {:.2} MiB",
            self.config.mode.name(),
            self.elapsed_s,
            self.config.rate,
            self.producer_rate,
            self.produced,
            self.results,
            self.check,
            self.state.count,
            if self.digest_ok { "exact" } else { "WRONG" },
            self.drain_s,
            leave.len(),
            med(&leave, |o| o.frozen_ms),
            med(&leave, |o| o.pause_ms),
            max_of(leave.iter().map(|o| o.pause_ms)),
            exit.len(),
            med(&exit, |o| o.checkpoint_ms),
            med(&exit, |o| o.restore_ms.unwrap_or(f64::NAN)),
            med(&exit, |o| o.pause_ms),
            max_of(exit.iter().map(|o| o.pause_ms)),
            shim.start,
            shim.end,
            shim.max,
            cons.start,
            cons.end,
            cons.max,
        );
        let inst = self.shim_instances();
        if inst.len() > 1 {
            let firsts: Vec<String> = inst.iter().map(|i| format!("{:.2}", i.1)).collect();
            let lasts: Vec<String> = inst.iter().map(|i| format!("{:.2}", i.2)).collect();
            s.push_str(&format!(
                "\n  {} shim instances: first samples {} MiB; last samples {} MiB",
                inst.len(),
                firsts.join(" "),
                lasts.join(" ")
            ));
        }
        for f in &self.failures {
            s.push_str(&format!("\n  FAILED: {f}"));
        }
        s
    }

    /// The report as one JSON object (the bench's result line).
    pub fn json(&self) -> serde_json::Value {
        let (shim, cons) = (self.shim_rss(), self.consumer_rss());
        let rss = |r: RssFigures| serde_json::json!({"start": r.start, "end": r.end, "max": r.max, "min": r.min});
        let ops = |kind: OpKind| {
            let v: Vec<&Op> = self.ops_of(kind).collect();
            let col = |f: fn(&Op) -> f64| -> Vec<f64> {
                v.iter().map(|o| (f(o) * 10.0).round() / 10.0).collect()
            };
            serde_json::json!({
                "count": v.len(),
                "checkpoint_ms": col(|o| o.checkpoint_ms),
                "frozen_ms": col(|o| o.frozen_ms),
                "quiesce_ms": col(|o| o.quiesce_ms),
                "restore_ms": col(|o| o.restore_ms.unwrap_or(f64::NAN)),
                "pause_ms": col(|o| o.pause_ms),
            })
        };
        let mut by_min: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        for s in &self.samples {
            by_min.insert(s.at_s as u64 / 60, (mib(s.shim_kib), mib(s.consumer_kib)));
        }
        serde_json::json!({
            "name": "soak",
            "runtime": self.config.mode.name(),
            "seconds": (self.elapsed_s * 10.0).round() / 10.0,
            "rate": self.config.rate,
            "batch": self.config.batch,
            "producer_rate": self.producer_rate.round(),
            "queue": self.config.kind.as_str(),
            "produced": self.produced,
            "results": self.results,
            "lost": self.check.lost.len(),
            "duplicated": self.check.duplicated.len(),
            "out_of_order": self.check.out_of_order,
            "unexpected": self.check.unexpected.len(),
            "state_count": self.state.count,
            "state_digest_exact": self.digest_ok,
            "drain_s": (self.drain_s * 10.0).round() / 10.0,
            "max_lag": self.samples.iter().map(|s| s.lag).max(),
            "leave_running": ops(OpKind::Leave),
            "exit_restore": ops(OpKind::ExitRestore),
            "shim_rss_mib": rss(shim),
            "consumer_rss_mib": rss(cons),
            "shim_instances_mib": self.shim_instances().iter().map(|i| serde_json::json!([i.1, i.2])).collect::<Vec<_>>(),
            "rss_last_sample_per_minute_mib": by_min.values().map(|(s, c)| serde_json::json!([s, c])).collect::<Vec<_>>(),
            "failures": self.failures,
            "exact": self.exact(),
        })
    }
}

/// The consumer's throughput ceiling behind the tap (or directly): the
/// producer publishes as fast as confirms allow for 5 s (a backlog of tens
/// of thousands), then stops, and the consumer's results per second while
/// it works through that backlog for `secs` (nothing else loading the
/// broker) are its capacity. Returns `(producer msg/s, consumer msg/s)`.
pub fn capacity(mode: Mode, secs: u64, batch: usize, prefix: &str) -> (f64, f64) {
    crate::env();
    crate::amqp::rabbitmq_available();
    let mut cfg = SoakConfig::new(mode, Duration::from_secs(secs), 0, prefix);
    cfg.batch = batch;
    let td = TestDir::new(&format!("{prefix}-capacity-{}", mode.name()));
    let q = TestQueues::new(&format!("{prefix}-cap"), QueueKind::Stream);
    let (_c, _log) = start_consumer(&cfg, &q, &td);
    let collector = Collector::start(&q.results, Duration::from_secs(secs + 600));
    let producer = Producer::start(ProducerConfig::new(&q.queue, u64::MAX / 4, 0));
    thread::sleep(Duration::from_secs(5));
    producer.stop();
    let rep = producer
        .join()
        .unwrap_or_else(|e| panic!("the producer failed: {e}"));
    let producer_rate = rep.confirmed.len() as f64 / rep.elapsed.as_secs_f64();
    let (t0, n0) = (Instant::now(), collector.count());
    thread::sleep(Duration::from_secs(secs.max(1)));
    let n1 = collector.count();
    let consumer_rate = (n1 - n0) as f64 / t0.elapsed().as_secs_f64();
    if n1 >= rep.confirmed.len() {
        log("capacity: the consumer emptied the backlog before the end: the figure is a lower bound");
    }
    // The rest of the backlog is not drained: the queues go with `q`.
    collector.goal.set(0, Duration::ZERO);
    let _ = collector.handle.join();
    log(&format!(
        "capacity {}: producer {producer_rate:.0} msg/s (confirmed), consumer {consumer_rate:.0} msg/s",
        mode.name()
    ));
    (producer_rate, consumer_rate)
}

/// Removes what a killed soak left behind: containers, queues and
/// directories whose names start with `prefix` (the bench's token).
pub fn cleanup(prefix: &str) {
    let lead = format!("{prefix}-");
    for id in ctr(&["containers", "ls", "-q"]).stdout.lines() {
        if id.trim().starts_with(&lead) {
            eprintln!("cleanup: container {}", id.trim());
            drop(Container::adopt(id.trim()));
        }
    }
    let queues = crate::amqp::rabbitmqctl(&["-q", "list_queues", "name"]);
    for q in queues.stdout.lines().map(str::trim) {
        if q.starts_with(&format!("ms2m-t-{lead}")) {
            eprintln!("cleanup: queue {q}");
            if let Err(e) = crate::amqp::delete_queue(q) {
                eprintln!("cleanup: {e}");
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(crate::TEST_ROOT) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&lead) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}
