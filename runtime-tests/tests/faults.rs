//! Faults (issue 9): each must end with nothing lost, nothing left frozen
//! and a clear error.
//!
//! - containerd restarted while ms2m shims run tapped consumers under load:
//!   the shims keep their tasks and taps, containerd reconnects to them
//!   (`ctr task ls`), a checkpoint and a restore work afterwards, and the
//!   checker counts 0 lost, 0 duplicated;
//! - the shim killed with SIGKILL: containerd reports the task's exit and
//!   its cleanup (`shim delete`) leaves no process, no frozen cgroup, no
//!   tap listener and no rootfs mount behind;
//! - a leave-running checkpoint into a full image directory (a small tmpfs)
//!   and into an unwritable one: the container runs on (thawed, counting),
//!   the error names the cause, and neither `ms2m inspect` nor `ms2m
//!   restore` takes what is left for a checkpoint.
//!
//! The containerd restart takes every other test of this binary's lock
//! exclusively; under nextest it also runs alone (.config/nextest.toml).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use ms2m_runtime_tests::amqp::{
    collect_results, rabbitmq_available, start_tapped_consumer, wait_consumer_connects,
    wait_consumer_count, Checker, Client, Producer, ProducerConfig, QueueKind, TestQueues,
};
use ms2m_runtime_tests::{
    ctr, env, ms2m, run_cmd, wait_until, CmdOut, Container, Events, RunOpts, TestDir,
};

const T: Duration = Duration::from_secs(30);
const APP_URL: &str = "amqp://guest:guest@localhost:5672/%2f";
const UPSTREAM: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Tests take it shared; the containerd restart exclusively.
static CONTAINERD: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    CONTAINERD.read().unwrap_or_else(|e| e.into_inner())
}

fn exclusive() -> RwLockWriteGuard<'static, ()> {
    CONTAINERD.write().unwrap_or_else(|e| e.into_inner())
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

fn sh(script: &str) -> CmdOut {
    run_cmd(Command::new("sh").args(["-c", script]), T).unwrap_or_else(|e| panic!("{e}"))
}

// ---------------------------------------------------------------------------
// containerd restarted

/// containerd's state directory (where hack/start-containerd.sh keeps its
/// pid file).
fn containerd_state() -> PathBuf {
    PathBuf::from(
        std::env::var("MS2M_CONTAINERD_STATE").unwrap_or_else(|_| "/run/ms2m/containerd".into()),
    )
}

fn containerd_pid() -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(containerd_state().join("containerd.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (comm.trim() == "containerd").then_some(pid)
}

/// `hack/start-containerd.sh`, detached (its containerd must outlive the
/// test process and its process group) and with no file descriptor of the
/// test's but stdio: a descriptor inherited from the caller, such as the
/// `flock /tmp/ms2m-runtime.lock` the test suite runs under, would be held
/// by the new containerd for its whole life (it held that lock once).
fn start_containerd() -> CmdOut {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/start-containerd.sh");
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(
            r#"for fd in $(ls /proc/$$/fd); do [ "$fd" -gt 2 ] && eval "exec $fd>&-"; done
exec setsid "$0""#,
        )
        .arg(script)
        .stdin(Stdio::null());
    run_cmd(&mut cmd, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"))
}

/// The file descriptors of `pid` that point at `path`.
fn fds_on(pid: u32, path: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == Path::new(path)))
                .count()
        })
        .unwrap_or(0)
}

/// Puts containerd back when dropped, however the test ends.
struct RestartContainerd;

impl Drop for RestartContainerd {
    fn drop(&mut self) {
        let out = start_containerd();
        if !out.success() {
            eprintln!("could not start containerd again: {out}");
        }
    }
}

/// Stops ms2m's containerd (SIGTERM, as a service manager would), waits
/// `down`, starts it again with hack/start-containerd.sh. Returns how long
/// it was unreachable.
fn restart_containerd(down: Duration) -> Duration {
    let pid = containerd_pid().expect("containerd's pid file names no running containerd");
    let guard = RestartContainerd;
    let t0 = Instant::now();
    kill_pid(pid, "TERM");
    wait_until("containerd to exit", T, Duration::from_millis(20), || {
        (!Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    });
    std::thread::sleep(down);
    drop(guard);
    let out = ctr(&["version"]);
    assert!(out.success(), "containerd did not come back: {out}");
    let new = containerd_pid().expect("the new containerd's pid file");
    assert_eq!(
        fds_on(new, "/tmp/ms2m-runtime.lock"),
        0,
        "the new containerd holds the test suite's lock"
    );
    t0.elapsed()
}

fn kill_pid(pid: u32, sig: &str) {
    let out = sh(&format!("kill -{sig} {pid}"));
    assert!(out.success(), "kill -{sig} {pid}: {out}");
}

/// containerd restarted under load: two tapped consumers (a stream and a
/// classic queue) at 200 msg/s each; containerd is down ~1 s. The shims and
/// their taps live on (same pids, the consumers never reconnect),
/// containerd lists the tasks again, an exit checkpoint and a restore of
/// each work after it, and every message is processed exactly once.
#[test]
fn containerd_restart_under_load_keeps_tasks_and_taps() {
    env();
    rabbitmq_available();
    let _lock = exclusive();
    let td = TestDir::new("f-ctrd");
    let mut runs = vec![];
    for (kind, name) in [
        (QueueKind::Stream, "f-ctrd-s"),
        (QueueKind::Classic, "f-ctrd-c"),
    ] {
        let q = TestQueues::new(name, kind);
        let c = start_tapped_consumer(Client::Lapin, &q, &td, name, UPSTREAM, APP_URL, &[]);
        let p = Producer::start(ProducerConfig::new(&q.queue, 1200, 200));
        runs.push((q, c, p));
    }
    let before: Vec<(u32, u32)> = runs
        .iter()
        .map(|(_, c, _)| (c.pid(), c.shim_pid().expect("shim")))
        .collect();
    for (_, c, _) in &runs {
        wait_consumer_count(c, 100, T);
    }

    let gap = restart_containerd(Duration::from_secs(1));
    eprintln!(
        "containerd unreachable for {:.0} ms",
        gap.as_secs_f64() * 1000.0
    );

    for ((_, c, _), (pid, shim)) in runs.iter().zip(&before) {
        assert_eq!(c.task(), Some((*pid, "RUNNING".to_string())), "{}", c.id);
        assert_eq!(c.shim_pid(), Some(*shim), "{}: another shim", c.id);
    }
    // A checkpoint and a restore through the restarted containerd.
    for (i, (_, c, _)) in runs.iter().enumerate() {
        let img = td.join(&format!("img{i}"));
        ms2m(&[
            "checkpoint",
            "--exit",
            "--image-path",
            path_str(&img),
            &c.id,
        ])
        .ok();
        ms2m(&["restore", &c.id, path_str(&img)]).ok();
        c.wait_status("RUNNING", T);
    }
    for (q, c, p) in runs {
        let rep = p.join().unwrap_or_else(|e| panic!("producer: {e}"));
        let results = collect_results(&q.results, 1200, Duration::from_secs(60));
        let report = Checker::new(rep.confirmed.iter().copied()).check(&results);
        eprintln!("{}: {report}", c.id);
        assert!(report.is_clean(), "{}: {report}", c.id);
        assert_eq!(report.processed_unique, 1200, "{report}");
        assert_eq!(
            results.len(),
            1200,
            "{}: duplicates downstream: {report}",
            c.id
        );
        let s = wait_consumer_count(&c, 1200, T);
        // Connection 1 until the exit checkpoint, 2 after the restore:
        // containerd's restart did not touch the tap's connections.
        assert_eq!(s.connects, 2, "{}: {s:?}", c.id);
    }
}

// ---------------------------------------------------------------------------
// the shim killed

/// The mounts (`/proc/self/mounts` lines) that mention `needle`.
fn mounts_with(needle: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// SIGKILL to the shim of a running tapped consumer: containerd reports
/// the task's exit (an event, and `ctr task ls` shows it stopped or gone,
/// never running), and its cleanup (`containerd-shim-ms2m-v1 delete`)
/// leaves no process of the container, no frozen cgroup, no listener of the
/// tap and no rootfs mount. The container can be given a new task.
#[test]
fn shim_sigkill_is_reported_and_cleaned_up() {
    env();
    rabbitmq_available();
    let _lock = shared();
    let td = TestDir::new("f-kill");
    let q = TestQueues::new("f-kill", QueueKind::Stream);
    let c = start_tapped_consumer(Client::Lapin, &q, &td, "f-kill", UPSTREAM, APP_URL, &[]);
    let pid = c.pid();
    let shim = c.shim_pid().expect("shim");
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    let freezer = ms2m_runtime_tests::cgroup_v1_path(&cg, "freezer")
        .map(|p| PathBuf::from(format!("/sys/fs/cgroup/freezer{p}")));
    let netns = std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("netns");
    assert!(
        !mounts_with(&c.id).is_empty(),
        "no mount of the container to check"
    );
    let events = Events::start();

    kill_pid(shim, "KILL");
    let ev = events.wait_for("/tasks/exit", &c.id, T);
    eprintln!("after SIGKILL of the shim: {:?}", ev.payload);
    wait_until(
        "the task to be reported stopped or gone",
        T,
        Duration::from_millis(50),
        || match c.status() {
            Some(s) if s == "RUNNING" => None,
            _ => Some(()),
        },
    );
    wait_until(
        "the container's init to be gone",
        T,
        Duration::from_millis(50),
        || (!Path::new(&format!("/proc/{pid}")).exists()).then_some(()),
    );
    // No process left in the container's freezer cgroup, none frozen.
    if let Some(f) = &freezer {
        if f.exists() {
            let procs = std::fs::read_to_string(f.join("cgroup.procs")).unwrap_or_default();
            assert!(
                procs.trim().is_empty(),
                "processes left in {}: {procs}",
                f.display()
            );
            let state = std::fs::read_to_string(f.join("freezer.state")).unwrap_or_default();
            assert_ne!(state.trim(), "FROZEN", "{} left frozen", f.display());
        }
    }
    // No process of the container's network namespace (the tap's
    // listeners lived there), and no shim for it. containerd's cleanup of a
    // dead shim kills what is left asynchronously: wait for it (bounded),
    // and name the stragglers (pid and command line) if they stay.
    let holders = || {
        sh(&format!(
            "for p in /proc/[0-9]*; do [ \"$(readlink $p/ns/net 2>/dev/null)\" = '{}' ] && echo \"${{p#/proc/}} $(tr '\\0' ' ' < $p/cmdline 2>/dev/null)\"; done; true",
            netns.display()
        ))
        .ok()
        .stdout
    };
    let mut left = holders();
    let t0 = std::time::Instant::now();
    while !left.trim().is_empty() && t0.elapsed() < T {
        std::thread::sleep(Duration::from_millis(100));
        left = holders();
    }
    assert!(
        left.trim().is_empty(),
        "processes still in the container's netns after {:?}: {left}",
        t0.elapsed()
    );
    assert!(c.shim_pid().is_none(), "a shim runs for {} again", c.id);
    wait_until(
        "the rootfs mount to go",
        T,
        Duration::from_millis(50),
        || mounts_with(&c.id).is_empty().then_some(()),
    );
    // The container takes a new task.
    ctr(&["task", "delete", "--force", &c.id]);
    let out = ctr(&["task", "start", "--null-io", "-d", &c.id]);
    assert!(out.success(), "a new task after the shim's death: {out}");
    wait_consumer_connects(&c, 1, T);
}

// ---------------------------------------------------------------------------
// image directory full or unwritable

/// Mounts a tmpfs of `size` at `dir` (created), unmounted with `td`.
fn mount_tmpfs(td: &TestDir, dir: &Path, opts: &str) {
    std::fs::create_dir_all(dir).expect("mount point");
    let out = run_cmd(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "ms2m-test-fault"])
            .arg(dir),
        T,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.success(), "mount tmpfs (needs root): {out}");
    td.mounted(dir);
}

/// A leave-running `ms2m checkpoint` into `img` fails with `cause` in its
/// error; the container runs on, thawed and counting; `ms2m inspect` and
/// `ms2m restore` refuse what is left; a good checkpoint works after.
fn failed_checkpoint_leaves_no_checkpoint(
    name: &str,
    mib: u64,
    img: &Path,
    cause: &str,
    td: &TestDir,
) {
    let c = Container::run(name, RunOpts::memcounter(mib, 50));
    c.wait_status("RUNNING", T);
    let before = c.wait_counter_above(3, T);
    let work = td.join(&format!("{name}-work"));
    let out = ms2m(&[
        "checkpoint",
        "--image-path",
        path_str(img),
        "--work-path",
        path_str(&work),
        &c.id,
    ]);
    assert!(
        !out.success(),
        "checkpoint into {} succeeded: {out}",
        img.display()
    );
    assert!(
        out.stderr.contains(cause),
        "the error does not name {cause:?}: {out}"
    );
    assert!(!out.stderr.contains("panicked"), "{out}");
    eprintln!("{name}: {}", out.stderr.trim());
    assert_eq!(c.status().as_deref(), Some("RUNNING"));
    if let Some(s) = c.freezer_state() {
        assert_eq!(s, "THAWED", "left frozen");
    }
    c.wait_counter_above(before, T);

    let left = ms2m_runtime_tests::file_names(img);
    eprintln!("{name}: left in the image directory: {left:?}");
    assert!(
        !left.contains("ms2m-manifest.json"),
        "a manifest beside a failed dump: {left:?}"
    );
    let inspect = ms2m(&["inspect", path_str(img)]);
    assert!(
        !inspect.success(),
        "ms2m inspect takes the failed dump for a checkpoint: {inspect}"
    );
    assert!(!inspect.stderr.contains("panicked"), "{inspect}");
    // The restore target: a container without a running task.
    let dst = Container::run(&format!("{name}-dst"), RunOpts::memcounter(0, 50));
    dst.wait_status("RUNNING", T);
    dst.kill_and_delete_task();
    let restore = ms2m(&["restore", &dst.id, path_str(img)]);
    assert!(
        !restore.success(),
        "ms2m restore takes the failed dump for a checkpoint: {restore}"
    );
    assert!(!restore.stderr.contains("panicked"), "{restore}");
    assert_eq!(dst.status(), None, "a task was made from the failed dump");

    let good = td.join(&format!("{name}-good"));
    ms2m(&["checkpoint", "--image-path", path_str(&good), &c.id]).ok();
    assert_eq!(c.status().as_deref(), Some("RUNNING"));
}

/// A 16 MiB container checkpointed into a 1 MiB tmpfs.
#[test]
fn full_image_directory_leaves_the_container_running() {
    env();
    let _lock = shared();
    let td = TestDir::new("f-full");
    let mnt = td.join("small");
    mount_tmpfs(&td, &mnt, "size=1m");
    failed_checkpoint_leaves_no_checkpoint(
        "f-full",
        16,
        &mnt.join("img"),
        "No space left on device",
        &td,
    );
}

/// An image directory on a read-only tmpfs.
#[test]
fn unwritable_image_directory_leaves_the_container_running() {
    env();
    let _lock = shared();
    let td = TestDir::new("f-ro");
    let mnt = td.join("ro");
    mount_tmpfs(&td, &mnt, "ro,size=1m");
    // The directory exists (the CLI has nothing to create): the shim and
    // CRIU meet the read-only file system.
    failed_checkpoint_leaves_no_checkpoint("f-ro", 0, &mnt, "Read-only file system", &td);
}
