//! Direct container dumps against real containers: containerd (ms2m's
//! instance), containerd-shim-runc-v2, runc 1.1.5, CRIU 4.2.x and the test
//! image's `memcounter`. They must run as root and FAIL (not skip) when any
//! of those is missing.
//!
//! What they prove:
//! - a leave-running dump through the bridge keeps the container running
//!   and counting, and CRIU's frozen time is recorded; while the
//!   frozen-window (`post-dump`) hook runs, the container does not count;
//! - an exit dump through the bridge is restored by containerd's runc-v2
//!   shim (`runc restore`, via `ms2m restore`) and the counter continues
//!   from the checkpoint, with the network namespace dumped and with it
//!   declared external (a namespace with a path);
//! - a failing frozen-window hook aborts the dump and leaves the container
//!   running (freezer THAWED, counter increasing), even for an exit dump.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use criu_bridge::container::{Cgroups, DumpKnobs, RuncContainer};
use criu_bridge::rpc::{freezer_is_thawed, CriuClient, CriuFailure, Notify};

const ADDRESS: &str = "/run/ms2m/containerd/containerd.sock";
const NAMESPACE: &str = "ms2m";
const IMAGE: &str = "docker.io/library/ms2m-test:latest";
const CRIU: &str = "/usr/local/sbin/criu";
const MS2M: &str = "/usr/local/bin/ms2m";

static SERIAL: Mutex<()> = Mutex::new(());
static SEQ: AtomicU32 = AtomicU32::new(0);

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"))
}

fn ctr(args: &[&str]) -> Output {
    run(Command::new("ctr")
        .args(["--address", ADDRESS, "--namespace", NAMESPACE])
        .args(args))
}

fn ctr_ok(args: &[&str]) -> String {
    let out = ctr(args);
    assert!(
        out.status.success(),
        "ctr {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Checks (once per test) everything these tests need; panics with what is
/// missing and how to get it.
fn preflight() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these tests dump containers with CRIU: run them as root"
    );
    for (bin, hint) in [
        (CRIU, "CRIU 4.2.x (hack/setup.sh builds it)"),
        ("/usr/bin/runc", "runc 1.1.5 (apt-get install runc)"),
        ("/usr/local/bin/ctr", "ctr (hack/setup.sh)"),
        (
            "/usr/local/bin/containerd-shim-runc-v2",
            "containerd's runc shim (hack/setup.sh)",
        ),
        (MS2M, "the ms2m CLI (cargo build -p ms2m-cli; install it)"),
    ] {
        assert!(Path::new(bin).exists(), "{bin} is missing: install {hint}");
    }
    if !Path::new(ADDRESS).exists() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/start-containerd.sh");
        let out = run(&mut Command::new(&script));
        assert!(
            out.status.success() && Path::new(ADDRESS).exists(),
            "ms2m's containerd is not running and {} could not start it: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let images = ctr_ok(&["images", "ls", "-q"]);
    assert!(
        images.lines().any(|l| l.trim() == IMAGE),
        "test image {IMAGE} is missing in namespace {NAMESPACE}: run hack/build-image.sh"
    );
}

/// A runc-v2 container running memcounter; killed and removed on drop.
struct Ctr {
    id: String,
    netns: Option<String>,
    dirs: Vec<PathBuf>,
}

impl Ctr {
    /// Starts memcounter with `mib` MiB resident, counting every 10 ms. With
    /// `netns_path`, the container joins a fresh named network namespace
    /// (`ip netns add`, loopback up), i.e. one that has a path.
    fn start(tag: &str, mib: u32, netns_path: bool) -> Ctr {
        let id = format!(
            "mf-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let mut c = Ctr {
            id: id.clone(),
            netns: None,
            dirs: Vec::new(),
        };
        let mut args: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--runtime".into(),
            "io.containerd.runc.v2".into(),
        ];
        if netns_path {
            let name = id.clone();
            let out = run(Command::new("ip").args(["netns", "add", &name]));
            assert!(
                out.status.success(),
                "ip netns add: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            c.netns = Some(name.clone());
            let out = run(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]));
            assert!(out.status.success(), "ip link set lo up failed");
            args.push("--with-ns".into());
            args.push(format!("network:/run/netns/{name}"));
        }
        args.extend([
            IMAGE.to_string(),
            id.clone(),
            "/usr/local/bin/memcounter".into(),
            "--mib".into(),
            mib.to_string(),
            "--interval-ms".into(),
            "10".into(),
        ]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        ctr_ok(&refs);
        let r = c.runc();
        // Wait until it counts.
        let t0 = Instant::now();
        while read_counter(r.rootfs()).unwrap_or(0) < 20 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{id}: memcounter did not start counting"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        c
    }

    /// runc's view of the container (re-read: the pid changes on restore).
    fn runc(&self) -> RuncContainer {
        RuncContainer::load(&Path::new("/run/containerd/runc").join(NAMESPACE), &self.id)
            .unwrap_or_else(|e| panic!("{}: read runc state: {e}", self.id))
    }

    fn images_dir(&mut self, name: &str) -> PathBuf {
        let d = PathBuf::from(format!("/dev/shm/ms2m-container-tests/{}-{name}", self.id));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("create images dir");
        self.dirs.push(d.clone());
        d
    }

    fn task_status(&self) -> String {
        let out = ctr_ok(&["tasks", "ls"]);
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(self.id.as_str()))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or("NONE")
            .to_string()
    }
}

impl Drop for Ctr {
    fn drop(&mut self) {
        let _ = ctr(&["tasks", "kill", "-s", "KILL", &self.id]);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(3) {
            let s = self.task_status();
            if s != "RUNNING" && s != "PAUSED" {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = ctr(&["tasks", "rm", "-f", &self.id]);
        let _ = ctr(&["containers", "rm", &self.id]);
        if let Some(n) = &self.netns {
            let _ = run(Command::new("ip").args(["netns", "del", n]));
        }
        for d in &self.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn read_counter(rootfs: &Path) -> Option<u64> {
    std::fs::read_to_string(rootfs.join("tmp/counter"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Waits until the counter passes `v`; returns the value seen.
fn counts_past(rootfs: &Path, v: u64, what: &str) -> u64 {
    let t0 = Instant::now();
    loop {
        if let Some(c) = read_counter(rootfs).filter(|c| *c > v) {
            return c;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{what}: counter stuck at {:?} (wanted > {v})",
            read_counter(rootfs)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn client() -> CriuClient {
    CriuClient::new(CRIU).with_timeout(Some(Duration::from_secs(30)))
}

#[test]
fn leave_running_dump_keeps_counting_and_hook_sees_it_frozen() {
    let _g = serial();
    preflight();
    let mut c = Ctr::start("lr", 16, false);
    let r = c.runc();
    let dir = c.images_dir("lr");
    let rootfs = r.rootfs().to_path_buf();
    let pid = r.init_pid();
    let mut in_hook: Option<(u64, u64, String)> = None;
    let mut hook = |n: Notify<'_>| -> Result<(), String> {
        if n.script == "post-dump" {
            let a = read_counter(&rootfs).unwrap_or(0);
            std::thread::sleep(Duration::from_millis(60));
            let b = read_counter(&rootfs).unwrap_or(0);
            let state = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .unwrap_or_default()
                .lines()
                .find(|l| l.starts_with("State:"))
                .unwrap_or("")
                .to_string();
            in_hook = Some((a, b, state));
        }
        Ok(())
    };
    let d = r
        .dump(&client(), &dir, &DumpKnobs::default(), Some(&mut hook))
        .unwrap_or_else(|e| panic!("direct leave-running dump failed: {e}"));
    let (a, b, state) = in_hook.expect("the post-dump hook did not run");
    assert_eq!(a, b, "container counted while the frozen-window hook ran");
    assert!(
        state.contains("t (tracing stop)") || state.contains("D"),
        "init not stopped during post-dump: {state:?}"
    );
    let stats = d.stats.clone().expect("stats-dump not read");
    assert!(stats.frozen_time_us > 0, "no frozen time: {stats:?}");
    assert!(
        stats.pages_written >= 16 * 256,
        "16 MiB not dumped: {stats:?}"
    );
    assert!(d.outcome.hook_duration_ms.unwrap_or(0.0) >= 60.0);
    assert!(dir.join("descriptors.json").exists());
    assert_eq!(d.network_lock.as_str(), "skip", "no TCP: no network lock");
    // Running on, not frozen, counting.
    let fz = r.freezer_cgroup().expect("no freezer cgroup");
    assert!(freezer_is_thawed(fz).unwrap(), "left frozen");
    let after = read_counter(&rootfs).unwrap_or(0);
    counts_past(&rootfs, after + 3, "after a leave-running dump");
    assert_eq!(c.task_status(), "RUNNING");
    eprintln!(
        "leave-running dump: frozen {:.1} ms, wall {:.1} ms, hook {:.1} ms",
        stats.frozen_time_us as f64 / 1000.0,
        d.outcome.wall_ms,
        d.outcome.hook_duration_ms.unwrap_or(0.0)
    );
}

/// Exit dump through the bridge, then `ms2m restore` (containerd, runc-v2
/// shim, `runc restore`): the counter continues from the checkpoint.
fn exit_dump_then_runc_restore(tag: &str, netns_path: bool, knobs: DumpKnobs) {
    let _g = serial();
    preflight();
    let mut c = Ctr::start(tag, 16, netns_path);
    let r = c.runc();
    let dir = c.images_dir(tag);
    let rootfs = r.rootfs().to_path_buf();
    let knobs = DumpKnobs {
        leave_running: false,
        ..knobs
    };
    let d = r
        .dump(&client(), &dir, &knobs, None)
        .unwrap_or_else(|e| panic!("{tag}: direct exit dump failed: {e}"));
    assert_eq!(d.external_netns, netns_path);
    // The task is gone; its last written value is what it had counted.
    let t0 = Instant::now();
    while c.task_status() == "RUNNING" {
        assert!(t0.elapsed() < Duration::from_secs(5), "task still running");
        std::thread::sleep(Duration::from_millis(20));
    }
    let at_dump = read_counter(&rootfs).expect("counter at dump");
    // A process that restarted from scratch would write 1, 2, ...
    std::fs::write(rootfs.join("tmp/counter"), "0").expect("reset counter file");
    let out = run(Command::new(MS2M).args([
        "--address",
        ADDRESS,
        "--namespace",
        NAMESPACE,
        "restore",
        "--force",
        &c.id,
        &dir.to_string_lossy(),
    ]));
    assert!(
        out.status.success(),
        "{tag}: ms2m restore of a direct dump failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let first = counts_past(&rootfs, 0, "after restore");
    assert!(
        first >= at_dump,
        "{tag}: restored counter {first} < {at_dump} at the checkpoint: state was not restored"
    );
    counts_past(&rootfs, first + 3, "restored task counting");
    assert_eq!(c.task_status(), "RUNNING");
    // runc put the restored task into the container's cgroups.
    let r2 = c.runc();
    assert_ne!(r2.init_pid(), r.init_pid());
    let cg = std::fs::read_to_string(format!("/proc/{}/cgroup", r2.init_pid())).unwrap();
    assert!(
        cg.lines()
            .any(|l| l.contains(":freezer:") && l.ends_with(&format!("/{}", c.id))),
        "{tag}: restored task not in the container's freezer cgroup:\n{cg}"
    );
    eprintln!(
        "{tag}: exit dump frozen {:.1} ms; restored counter {first} >= {at_dump}",
        d.stats
            .map_or(f64::NAN, |s| s.frozen_time_us as f64 / 1000.0)
    );
}

#[test]
fn exit_dump_restores_through_runc_v2() {
    exit_dump_then_runc_restore("rs", false, DumpKnobs::default());
}

#[test]
fn exit_dump_with_fast_knobs_and_external_netns_restores_through_runc_v2() {
    exit_dump_then_runc_restore(
        "rsx",
        true,
        DumpKnobs {
            cgroups: Cgroups::Ignore,
            ..DumpKnobs::default()
        },
    );
}

#[test]
fn failing_hook_leaves_the_container_running() {
    let _g = serial();
    preflight();
    let mut c = Ctr::start("hf", 16, false);
    let r = c.runc();
    let dir = c.images_dir("hf");
    let rootfs = r.rootfs().to_path_buf();
    let knobs = DumpKnobs {
        leave_running: false,
        ..DumpKnobs::default()
    };
    let mut hook = |n: Notify<'_>| -> Result<(), String> {
        if n.script == "post-dump" {
            Err("injected hook failure".to_string())
        } else {
            Ok(())
        }
    };
    let err = r
        .dump(&client(), &dir, &knobs, Some(&mut hook))
        .expect_err("a dump whose hook fails must fail");
    assert_eq!(err.criu_failure(), Some(CriuFailure::HookFailed), "{err}");
    assert!(err.to_string().contains("injected hook failure"), "{err}");
    let fz = r.freezer_cgroup().expect("no freezer cgroup");
    assert_eq!(
        std::fs::read_to_string(fz.join("freezer.state"))
            .unwrap()
            .trim(),
        "THAWED"
    );
    assert!(Path::new(&format!("/proc/{}", r.init_pid())).exists());
    let now = read_counter(&rootfs).unwrap_or(0);
    counts_past(&rootfs, now + 3, "after a failed hook");
    assert_eq!(c.task_status(), "RUNNING");
}
