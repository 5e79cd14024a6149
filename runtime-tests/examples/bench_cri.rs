//! CRI against the ms2m CLI, in one run on one containerd (issue 10), driven
//! by `hack/bench-cri.sh`.
//!
//! ```text
//! bench_cri compare RUNS MIB
//! bench_cri pod-cost SECONDS RATE
//! ```
//!
//! - `compare`: RUNS times, interleaved, a memcounter of MIB MiB
//!   - through CRI: a pod under the `ms2m` handler, `CheckpointContainer`
//!     into an archive on /dev/shm (wall: the call), the pod removed, a new
//!     pod and `CreateContainer` from the archive + `StartContainer`
//!     (restore to running: both calls; the container is running when
//!     StartContainer returns);
//!   - through the CLI: `ctr`-run container, `ms2m checkpoint --image-path`
//!     (leave-running, like CRI's), the task killed and deleted, `ms2m
//!     restore` (returns once the task runs).
//! - `pod-cost`: what one ms2m pod costs its node: a pod with the lapin
//!   consumer behind the tap (RabbitMQ needed) consuming RATE msg/s for
//!   SECONDS; the pod's shim (one per pod: the sandbox and the consumer)
//!   and the pause process sampled: VmRSS, and the shim's CPU time over the
//!   window. Also an idle memcounter pod's shim.
//!
//! Output: one JSON object per figure on stdout (`name`, `unit`, `median`,
//! `min`, `max`, `values`), then for `compare` the ratios; progress on
//! stderr. Any failure panics with its cause (pods and containers are
//! removed on the way out).

use std::time::{Duration, Instant};

use ms2m_runtime_tests::amqp::{
    rabbitmq_available, Client, Producer, ProducerConfig, QueueKind, TestQueues,
};
use ms2m_runtime_tests::cri::{
    counter, wait_counter_above, ContainerSpec, Cri, Pod, CONTAINER_RUNNING, HANDLER,
};
use ms2m_runtime_tests::{env, ms2m, shim_pids_for, Container, RunOpts, TestDir};

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn figure(name: &str, unit: &str, values: &[f64]) -> f64 {
    let m = median(values);
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    println!(
        "{}",
        serde_json::json!({"name": name, "unit": unit, "median": m, "min": min, "max": max,
                           "runs": values.len(), "values": values})
    );
    m
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A CRI checkpoint and restore of a memcounter of `mib` MiB under
/// `handler`: (checkpoint wall, restore to running) in ms.
fn cri_round(cri: &std::sync::Arc<Cri>, td: &TestDir, handler: &str, mib: u64) -> (f64, f64) {
    let spec = ContainerSpec::memcounter("mc", mib, 20);
    let src = Pod::run(cri, &format!("bench-src-{handler}"), handler, &td.path);
    let id = src.start(&spec);
    wait_counter_above(cri, &id, 2, Duration::from_secs(10));
    let archive = td.join(&format!("mc-{handler}.tar"));
    let t0 = Instant::now();
    cri.checkpoint(&id, &archive, 60)
        .unwrap_or_else(|e| panic!("CheckpointContainer ({handler}): {e:?}"));
    let ck = ms(t0.elapsed());
    drop(src);
    let dst = Pod::run(cri, &format!("bench-dst-{handler}"), handler, &td.path);
    let mut restore = spec.clone();
    restore.image = archive.display().to_string();
    let t0 = Instant::now();
    let rid = dst
        .try_create(&restore)
        .unwrap_or_else(|e| panic!("CreateContainer from the archive ({handler}): {e:?}"));
    cri.start_container(&rid)
        .unwrap_or_else(|e| panic!("StartContainer (restore, {handler}): {e:?}"));
    let rs = ms(t0.elapsed());
    assert_eq!(cri.container_state(&rid).unwrap(), CONTAINER_RUNNING);
    let c = counter(cri, &rid).expect("restored counter");
    wait_counter_above(cri, &rid, c, Duration::from_secs(5));
    (ck, rs)
}

fn compare(runs: usize, mib: u64) {
    let cri = Cri::new();
    let (mut cri_ck, mut cri_rs, mut cli_ck, mut cli_rs) = (vec![], vec![], vec![], vec![]);
    let (mut runc_ck, mut runc_rs) = (vec![], vec![]);
    for run in 1..=runs {
        let td = TestDir::new("bench-cri");
        let (ck, rs) = cri_round(&cri, &td, HANDLER, mib);
        cri_ck.push(ck);
        cri_rs.push(rs);
        // containerd's own runc shim under CRI, for reference.
        let (ck, rs) = cri_round(&cri, &td, "runc", mib);
        runc_ck.push(ck);
        runc_rs.push(rs);

        // The CLI.
        let c = Container::run("bench-cri-cli", RunOpts::memcounter(mib, 20));
        c.wait_counter_above(2, Duration::from_secs(10));
        let img = td.join("ck");
        let img = img.to_str().expect("UTF-8 path");
        let t0 = Instant::now();
        ms2m(&["checkpoint", "--image-path", img, &c.id]).ok();
        cli_ck.push(ms(t0.elapsed()));
        c.kill_and_delete_task();
        let t0 = Instant::now();
        ms2m(&["restore", &c.id, img]).ok();
        cli_rs.push(ms(t0.elapsed()));
        let v = c.counter();
        c.wait_counter_above(v, Duration::from_secs(5));
        let i = run - 1;
        eprintln!(
            "run {run}/{runs}: CRI checkpoint {:.0} ms, restore {:.0} ms; CLI checkpoint {:.0} ms, \
             restore {:.0} ms; CRI under runc-v2: checkpoint {:.0} ms, restore {:.0} ms",
            cri_ck[i], cri_rs[i], cli_ck[i], cli_rs[i], runc_ck[i], runc_rs[i]
        );
    }
    let a = figure(&format!("cri_checkpoint_wall_{mib}mib"), "ms", &cri_ck);
    let b = figure(&format!("cli_checkpoint_wall_{mib}mib"), "ms", &cli_ck);
    let c = figure(&format!("cri_restore_to_running_{mib}mib"), "ms", &cri_rs);
    let d = figure(&format!("cli_restore_to_running_{mib}mib"), "ms", &cli_rs);
    figure(
        &format!("cri_runc_v2_checkpoint_wall_{mib}mib"),
        "ms",
        &runc_ck,
    );
    figure(
        &format!("cri_runc_v2_restore_to_running_{mib}mib"),
        "ms",
        &runc_rs,
    );
    println!(
        "{}",
        serde_json::json!({"name": "ratios", "checkpoint_cri_over_cli": a / b,
                           "restore_cri_over_cli": c / d, "target": 1.5})
    );
}

/// VmRSS (KiB) and utime+stime (clock ticks) of a process.
fn rss_and_cpu(pid: u32) -> (u64, u64) {
    let rss = ms2m_runtime_tests::vm_rss_kib(pid).unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    // After the command: state is field 3, utime 14, stime 15 (1-based).
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (rss, tick(11) + tick(12))
}

fn pause_pid(pod_id: &str) -> Option<u32> {
    // The sandbox's init: the only process whose cmdline is /pause and whose
    // parent is the pod's shim.
    let shim = *shim_pids_for(pod_id).first()?;
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let ppid: u32 = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        (ppid == shim && cmd.starts_with(b"/pause")).then_some(pid)
    })
}

fn pod_cost(seconds: u64, rate: u64) {
    rabbitmq_available();
    let cri = Cri::new();
    let td = TestDir::new("bench-cri-cost");
    let hz = 100.0; // USER_HZ

    // An idle memcounter pod.
    let idle = Pod::run(&cri, "cost-idle", HANDLER, &td.path);
    let id = idle.start(&ContainerSpec::memcounter("mc", 1, 100));
    wait_counter_above(&cri, &id, 2, Duration::from_secs(10));
    let shim = *shim_pids_for(&idle.id)
        .first()
        .expect("the idle pod's shim");
    figure(
        "shim_rss_idle_pod_mib",
        "MiB",
        &[rss_and_cpu(shim).0 as f64 / 1024.0],
    );
    drop(idle);

    // A tapped lapin consumer under load.
    let q = TestQueues::new("bench-cri-cost", QueueKind::Stream);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
        .to_string();
    let spec = ContainerSpec::new("consumer", &Client::Lapin.command())
        .env(
            "AMQP_URL",
            &format!("amqp://guest:guest@localhost:{port}/%2f"),
        )
        .env("QUEUE", &q.queue)
        .env("QUEUE_TYPE", "stream")
        .env("RESULTS_QUEUE", &q.results)
        .env("CONSUMER_NAME", "cost")
        .annotation("io.ms2m.tap.upstream", "amqp://127.0.0.1:5672/%2f")
        .annotation("io.ms2m.tap.port", &port);
    let pod = Pod::run(&cri, "cost-tap", HANDLER, &td.path);
    let _cid = pod.start(&spec);
    let shim = *shim_pids_for(&pod.id).first().expect("the pod's shim");
    let pause = pause_pid(&pod.id).expect("the pod's pause process");
    std::thread::sleep(Duration::from_millis(500));
    let producer = Producer::start(ProducerConfig::new(&q.queue, seconds * rate, rate));
    std::thread::sleep(Duration::from_secs(1));
    let (_, cpu0) = rss_and_cpu(shim);
    let t0 = Instant::now();
    let mut rss = vec![];
    while t0.elapsed() < Duration::from_secs(seconds.saturating_sub(2).max(1)) {
        rss.push(rss_and_cpu(shim).0 as f64 / 1024.0);
        std::thread::sleep(Duration::from_millis(250));
    }
    let (_, cpu1) = rss_and_cpu(shim);
    let cpu_pct = (cpu1 - cpu0) as f64 / hz / t0.elapsed().as_secs_f64() * 100.0;
    producer.join().unwrap_or_else(|e| panic!("producer: {e}"));
    figure("shim_rss_tapped_pod_under_load_mib", "MiB", &rss);
    figure(
        &format!("shim_cpu_tapped_pod_{rate}_msg_s_percent"),
        "% of one core",
        &[cpu_pct],
    );
    figure(
        "pause_rss_mib",
        "MiB",
        &[rss_and_cpu(pause).0 as f64 / 1024.0],
    );
}

fn main() {
    env();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, d: u64| -> u64 {
        args.get(i)
            .map(|s| s.parse().unwrap_or_else(|e| panic!("argument {s:?}: {e}")))
            .unwrap_or(d)
    };
    match args.first().map(String::as_str) {
        Some("compare") => compare(num(1, 5) as usize, num(2, 16)),
        Some("pod-cost") => pod_cost(num(1, 8), num(2, 300)),
        _ => {
            eprintln!("usage: bench_cri compare RUNS MIB | bench_cri pod-cost SECONDS RATE");
            std::process::exit(2);
        }
    }
}
