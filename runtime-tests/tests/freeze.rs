//! Minimal-freeze checkpoints (issue 3) against the real stack: the
//! strategy choice recorded in the manifest, the frozen-window hook (the
//! container really is frozen while it runs; a failing hook aborts the
//! checkpoint), faults that must never leave a container frozen (CRIU
//! killed mid-dump, a full image tmpfs, SIGTERM to the shim mid-dump),
//! state continuity under every strategy that runs here, lazy-pages
//! restore, loopback up after a restore, and the shim configuration.
//!
//! `MS2M_TEST_STRATEGIES` (comma-separated, default `direct,runc,pre-copy`)
//! lists the strategies the continuity test forces through the
//! `io.ms2m.checkpoint.strategy` annotation. These tests need ms2m's shim.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use criu_bridge::manifest::Manifest;
use ms2m_runtime_tests::{
    ctr, env, proc_stat_state, run_cmd, wait_until, CmdOut, Container, RunOpts, TestDir,
};

const T: Duration = Duration::from_secs(30);

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

fn require_ms2m() {
    assert!(
        env().is_ms2m(),
        "freeze tests exercise ms2m's shim: run them with MS2M_TEST_RUNTIME unset or \
         io.containerd.ms2m.v1 (runtime is {})",
        env().runtime
    );
}

/// memcounter with `flags` (annotations...), counting above `min`.
fn counting(prefix: &str, mib: u64, interval_ms: u64, min: u64, flags: &[String]) -> Container {
    require_ms2m();
    let mut opts = RunOpts::memcounter(mib, interval_ms);
    for f in flags {
        opts = opts.flag(f);
    }
    let c = Container::run(prefix, opts);
    c.wait_status("RUNNING", T);
    c.wait_counter_above(min.saturating_sub(1), Duration::from_secs(60));
    c
}

fn annotation(key: &str, value: &str) -> String {
    format!("--annotation={key}={value}")
}

/// After a failed checkpoint: the error names `cause`, the task runs, its
/// freezer is THAWED, its process is not stopped and it keeps counting.
fn assert_alive_after(c: &Container, out: &CmdOut, cause: &[&str]) {
    assert!(!out.success(), "the checkpoint must fail: {out}");
    let err = out.stderr.to_lowercase();
    assert!(
        cause.iter().any(|k| err.contains(&k.to_lowercase())),
        "the error must say why ({cause:?}): {out}"
    );
    assert_eq!(c.status().as_deref(), Some("RUNNING"), "{out}");
    if let Some(state) = c.freezer_state() {
        assert_eq!(state, "THAWED", "freezer after the failed checkpoint");
    }
    let pid = c.pid();
    let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let s = proc_stat_state(&st);
    assert!(
        !matches!(s, Some('t') | Some('T')),
        "init is stopped ({s:?}) after the failed checkpoint"
    );
    let v = c.counter();
    c.wait_counter_above(v, T);
}

/// The `criu swrk` the shim `shim_pid` runs, if any.
fn criu_of(shim_pid: u32) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let ppid: Option<u32> = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if ppid != Some(shim_pid) {
            continue;
        }
        // By name, not command line: once dumping, CRIU retitles itself
        // ("criu: dump --rpc -t PID"), so "swrk" is gone from its cmdline.
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "criu" {
            return Some(pid);
        }
    }
    None
}

/// The `criu swrk` doing the dump into `work` (its dump.log exists; the
/// shim may run other, short CRIU requests first, e.g. feature detection).
fn dumping_criu(shim_pid: u32, work: &Path) -> u32 {
    wait_until("criu swrk dumping", T, Duration::from_millis(1), || {
        if !work.join("dump.log").exists() {
            return None;
        }
        criu_of(shim_pid)
    })
}

/// Starts `ctr task checkpoint ARGS ID` on a thread.
fn checkpoint_in_background(id: &str, args: &[&str]) -> std::thread::JoinHandle<CmdOut> {
    let mut a: Vec<String> = vec!["task".into(), "checkpoint".into()];
    a.extend(args.iter().map(|s| s.to_string()));
    a.push(id.to_string());
    std::thread::spawn(move || ctr(&a))
}

/// Starts a checkpoint of `c` into `<td>/img` (work dir `<td>/work`) on a
/// thread and waits until CRIU dumps, then 30 ms more; returns the shim's
/// pid, the dumping CRIU's pid and the thread.
fn dump_under_way(c: &Container, td: &TestDir) -> (u32, u32, std::thread::JoinHandle<CmdOut>) {
    let shim = c.shim_pid().expect("shim pid");
    let img = td.join("img");
    let work = td.join("work");
    let bg = checkpoint_in_background(
        &c.id,
        &[
            "--image-path",
            path_str(&img),
            "--work-path",
            path_str(&work),
        ],
    );
    let criu = dumping_criu(shim, &work);
    std::thread::sleep(Duration::from_millis(30));
    (shim, criu, bg)
}

fn manifest(img: &Path) -> Manifest {
    Manifest::read(img).unwrap_or_else(|e| panic!("manifest in {}: {e}", img.display()))
}

fn frozen_ms(m: &Manifest) -> f64 {
    m.stats
        .as_ref()
        .map(|s| s.frozen_time_us as f64 / 1000.0)
        .unwrap_or(-1.0)
}

/// Exit-checkpoints `c`, restores it with the ms2m CLI and checks the
/// counter continues. Returns the manifest.
fn exit_and_restore(c: &Container, td: &TestDir, name: &str) -> Manifest {
    let img = td.join(name);
    let before = c.counter();
    c.ctr_checkpoint(&["--exit", "--image-path", path_str(&img)])
        .ok();
    c.wait_status("STOPPED", T);
    let m = manifest(&img);
    ctr(&["task", "delete", &c.id]).ok();
    let out = ms2m_runtime_tests::ms2m(&["restore", &c.id, path_str(&img)]).ok();
    eprintln!("{}", out.stdout);
    c.wait_status("RUNNING", T);
    let first = wait_until("restored counter", T, Duration::from_millis(20), || {
        c.try_counter()
    });
    assert!(
        first >= before,
        "counter {first} after restore < {before} before: state lost"
    );
    c.wait_counter_above(first, T);
    m
}

#[test]
fn hook_runs_while_the_container_is_frozen() {
    require_ms2m();
    let td = TestDir::new("fz-hook");
    let out_file = td.join("hook.out");
    let script = td.join("hook.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             s1=$(cut -d')' -f2 /proc/$MS2M_INIT_PID/stat | cut -d' ' -f2)\n\
             c1=$(cat /proc/$MS2M_INIT_PID/root/tmp/counter)\n\
             sleep 0.05\n\
             s2=$(cut -d')' -f2 /proc/$MS2M_INIT_PID/stat | cut -d' ' -f2)\n\
             c2=$(cat /proc/$MS2M_INIT_PID/root/tmp/counter)\n\
             fz=$(cat /sys/fs/cgroup/freezer$(grep freezer /proc/$MS2M_INIT_PID/cgroup | cut -d: -f3)/freezer.state 2>/dev/null)\n\
             echo \"$s1 $c1 $s2 $c2 $fz $MS2M_CONTAINER_ID $MS2M_IMAGE_PATH\" > {}\n",
            out_file.display()
        ),
    )
    .expect("write hook");
    let hook = format!("/bin/sh {}", script.display());
    let c = counting(
        "fz-hook",
        16,
        5,
        20,
        &[annotation("io.ms2m.checkpoint.frozen-hook", &hook)],
    );
    let img = td.join("img");
    c.ctr_checkpoint(&["--image-path", path_str(&img)]).ok();
    let rec = std::fs::read_to_string(&out_file).expect("the hook ran and wrote its record");
    let f: Vec<&str> = rec.split_whitespace().collect();
    eprintln!("hook saw: {rec}");
    assert!(f.len() >= 4, "{rec}");
    for s in [f[0], f[2]] {
        assert!(
            s == "t" || s == "T" || f.get(4) == Some(&"FROZEN"),
            "init must be stopped while the hook runs: {rec}"
        );
    }
    assert_eq!(f[1], f[3], "the counter moved while frozen: {rec}");
    assert!(rec.contains(&c.id) && rec.contains(path_str(&img)), "{rec}");
    let m = manifest(&img);
    let fw = m
        .extensions
        .get("frozen_window")
        .unwrap_or_else(|| panic!("no frozen_window: {m:#?}"));
    assert_eq!(fw["ok"], true, "{fw}");
    assert!(
        fw["hook_duration_ms"].as_f64().unwrap_or(0.0) >= 50.0,
        "{fw}"
    );
    assert!(
        fw["hook_started_at_unix_ms"].as_u64().unwrap_or(0) > 0,
        "{fw}"
    );
    assert!(
        fw["hook"][0].as_str().unwrap_or("").contains("hook.sh"),
        "{fw}"
    );
    assert_eq!(m.strategy.name, "direct");
    // Still running and counting.
    assert_eq!(c.status().as_deref(), Some("RUNNING"));
    let v = c.counter();
    c.wait_counter_above(v, T);
}

#[test]
fn failing_hook_aborts_and_keeps_running() {
    let td = TestDir::new("fz-false");
    let c = counting(
        "fz-false",
        16,
        20,
        5,
        &[annotation("io.ms2m.checkpoint.frozen-hook", "/bin/false")],
    );
    for exit in [false, true] {
        let img = td.join(if exit { "img-exit" } else { "img" });
        let mut args = vec!["--image-path", path_str(&img)];
        if exit {
            args.insert(0, "--exit");
        }
        let out = c.ctr_checkpoint(&args);
        assert_alive_after(&c, &out, &["frozen-window hook failed"]);
        assert!(out.stderr.contains("/bin/false"), "{out}");
    }
}

#[test]
fn criu_killed_mid_dump_leaves_it_running() {
    let td = TestDir::new("fz-kill");
    let c = counting("fz-kill", 256, 20, 5, &[]);
    let (_shim, criu, bg) = dump_under_way(&c, &td);
    let _ = Command::new("kill")
        .args(["-9", &criu.to_string()])
        .status();
    let out = bg.join().expect("ctr thread");
    assert_alive_after(
        &c,
        &out,
        &["died", "closed the connection", "killed", "signal"],
    );
}

#[test]
fn full_image_tmpfs_fails_cleanly() {
    let td = TestDir::new("fz-full");
    let c = counting("fz-full", 16, 20, 5, &[]);
    let img = td.join("tiny");
    std::fs::create_dir_all(&img).expect("mkdir");
    let out = run_cmd(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "ms2m-test-tiny"])
            .arg(&img),
        Duration::from_secs(10),
    )
    .expect("mount");
    assert!(out.success(), "mount a 1 MiB tmpfs: {out}");
    td.mounted(&img);
    let out = c.ctr_checkpoint(&["--image-path", path_str(&img)]);
    assert_alive_after(&c, &out, &["no space", "enospc", "errno 28"]);
    // Also with --exit: the container must not die.
    let out = c.ctr_checkpoint(&["--exit", "--image-path", path_str(&img)]);
    assert_alive_after(&c, &out, &["no space", "enospc", "errno 28"]);
}

#[test]
fn sigterm_to_the_shim_mid_dump_thaws() {
    let td = TestDir::new("fz-term");
    let c = counting("fz-term", 256, 10, 5, &[]);
    let (shim, _criu, bg) = dump_under_way(&c, &td);
    let _ = Command::new("kill")
        .args(["-TERM", &shim.to_string()])
        .status();
    let out = bg.join().expect("ctr thread");
    // The dump was aborted with the signal as its cause; the shim carries
    // on (exiting would make containerd delete the container).
    assert_alive_after(&c, &out, &["the shim received SIGTERM"]);
    assert!(
        Path::new(&format!("/proc/{shim}")).exists(),
        "the shim must keep serving its container"
    );
    // And it still checkpoints.
    c.ctr_checkpoint(&["--image-path", path_str(&td.join("img2"))])
        .ok();
}

#[test]
fn continuity_under_every_strategy() {
    let strategies = std::env::var("MS2M_TEST_STRATEGIES")
        .unwrap_or_else(|_| "direct,runc,pre-copy".to_string());
    for s in strategies
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let td = TestDir::new("fz-strat");
        let c = counting(
            "fz-strat",
            16,
            20,
            20,
            &[annotation("io.ms2m.checkpoint.strategy", s)],
        );
        // Leave-running first.
        let img = td.join("live");
        c.ctr_checkpoint(&["--image-path", path_str(&img)]).ok();
        let live = manifest(&img);
        assert_eq!(c.status().as_deref(), Some("RUNNING"));
        let m = exit_and_restore(&c, &td, "exit");
        let expect = if s == "pre-copy" { "direct" } else { s };
        assert_eq!(m.strategy.name, expect, "{:#?}", m.strategy);
        if s == "pre-copy" {
            assert!(
                m.strategy.reason.contains("pre-copy was forced")
                    && m.strategy.reason.contains("falling back"),
                "{:#?}",
                m.strategy
            );
        }
        assert!(m.extensions.contains_key("features"), "{m:#?}");
        eprintln!(
            "strategy {s}: frozen {:.1} ms leave-running, {:.1} ms exit",
            frozen_ms(&live),
            frozen_ms(&m)
        );
    }
}

#[test]
fn unknown_strategy_annotation_is_a_clear_error() {
    let td = TestDir::new("fz-bad");
    let c = counting(
        "fz-bad",
        0,
        20,
        5,
        &[annotation("io.ms2m.checkpoint.strategy", "warp-speed")],
    );
    let out = c.ctr_checkpoint(&["--image-path", path_str(&td.join("img"))]);
    assert!(!out.success(), "{out}");
    assert!(
        out.stderr.contains("io.ms2m.checkpoint.strategy") && out.stderr.contains("warp-speed"),
        "{out}"
    );
    assert_eq!(c.status().as_deref(), Some("RUNNING"));
}

#[test]
fn lazy_restore_of_a_large_container() {
    let td = TestDir::new("fz-lazy");
    let c = counting("fz-lazy", 256, 20, 20, &[]);
    let t0 = Instant::now();
    let m = exit_and_restore(&c, &td, "img");
    eprintln!(
        "256 MiB: frozen {:.1} ms; exit checkpoint + restore + counter check {:?}",
        frozen_ms(&m),
        t0.elapsed()
    );
    let pages = m.stats.as_ref().map(|s| s.pages_written).unwrap_or(0);
    assert!(pages * 4096 >= 128 << 20, "{pages} pages");
    // The shim logged a lazy restore for this container.
    let log = std::fs::read_to_string("/var/log/ms2m/containerd.log").unwrap_or_default();
    assert!(
        log.lines().any(|l| l.contains(&c.id)
            && l.contains("restored: running")
            && l.contains("lazy=true")),
        "no lazy restore logged for {}",
        c.id
    );
}

#[test]
fn loopback_is_up_after_restore() {
    let td = TestDir::new("fz-lo");
    let c = counting("fz-lo", 0, 20, 5, &[]);
    exit_and_restore(&c, &td, "img");
    let out = c.exec(&["ip", "link", "show", "lo"]).ok();
    assert!(
        out.stdout.contains(",UP") || out.stdout.contains("<UP"),
        "{out}"
    );
    let out = c
        .exec(&[
            "sh",
            "-c",
            // Retries instead of fixed sleeps: on a loaded machine the
            // listener may take a while to be up.
            "(nc -l -p 7777 > /tmp/got &); i=0; \
             while [ $i -lt 50 ]; do echo hello | nc 127.0.0.1 7777 && break; \
             i=$((i+1)); sleep 0.1; done; i=0; \
             while [ $i -lt 50 ] && ! grep -q hello /tmp/got; do i=$((i+1)); sleep 0.1; done; \
             cat /tmp/got",
        ])
        .ok();
    assert!(
        out.stdout.contains("hello"),
        "loopback does not work: {out}"
    );
}

#[test]
fn shim_config_from_runtime_options() {
    require_ms2m();
    let td = TestDir::new("fz-conf");
    let good = td.join("good.toml");
    std::fs::write(&good, "[checkpoint]\nstrategy = \"runc\"\n").expect("write");
    let c = counting(
        "fz-conf",
        0,
        20,
        5,
        &[format!("--runtime-config-path={}", path_str(&good))],
    );
    let img = td.join("img");
    c.ctr_checkpoint(&["--image-path", path_str(&img)]).ok();
    let m = manifest(&img);
    assert_eq!(m.strategy.name, "runc", "{:#?}", m.strategy);
    assert!(
        m.strategy.reason.contains("shim configuration"),
        "{:#?}",
        m.strategy
    );

    let bad = td.join("bad.toml");
    std::fs::write(&bad, "[checkpoint]\nstrategy = \"fastest\"\n").expect("write");
    let id = ms2m_runtime_tests::unique_id("fz-badconf");
    let _cleanup = Container::adopt(&id);
    let out = ctr(&[
        "run",
        "-d",
        "--null-io",
        "--runtime",
        &env().runtime,
        &format!("--runtime-config-path={}", path_str(&bad)),
        &env().image,
        &id,
        "/usr/local/bin/memcounter",
    ]);
    assert!(
        !out.success(),
        "a bad configuration must fail the create: {out}"
    );
    assert!(
        out.stderr.contains(path_str(&bad)) && out.stderr.contains("fastest"),
        "{out}"
    );
}
