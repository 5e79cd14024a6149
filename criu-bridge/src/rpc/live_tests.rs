//! Tests against the real CRIU (`/usr/local/sbin/criu`, or `MS2M_CRIU`).
//! They need root and FAIL (not skip) when CRIU is missing. They use CRIU
//! one at a time (a static mutex) and images under
//! `/dev/shm/ms2m-criu-tests/`.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::*;
use crate::features::Features;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn criu_binary() -> PathBuf {
    let p = PathBuf::from(
        std::env::var_os("MS2M_CRIU").unwrap_or_else(|| "/usr/local/sbin/criu".into()),
    );
    assert!(
        p.exists(),
        "CRIU binary {} is missing: these tests need CRIU 4.2.x",
        p.display()
    );
    p
}

fn client() -> CriuClient {
    CriuClient::new(criu_binary())
}

/// A fresh directory for one test.
fn test_dir(name: &str) -> PathBuf {
    let d = Path::new("/dev/shm/ms2m-criu-tests").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create test dir");
    d
}

/// A single-process workload in its own session: increments an in-memory
/// counter every 20 ms and writes it to `<dir>/n`.
struct Workload {
    child: Option<Child>,
    pid: i32,
    counter: PathBuf,
}

const PY: &str = r#"
import os, sys, time
f = sys.argv[1]
i = 0
while True:
    i += 1
    with open(f + ".tmp", "w") as o:
        o.write(str(i))
    os.rename(f + ".tmp", f)
    time.sleep(0.02)
"#;

impl Workload {
    fn start(dir: &Path) -> Workload {
        let counter = dir.join("n");
        let mut cmd = Command::new("python3");
        cmd.arg("-c")
            .arg(PY)
            .arg(&counter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: setsid is async-signal-safe; nothing else runs in the
        // child before exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn python3 workload");
        let w = Workload {
            pid: child.id() as i32,
            child: Some(child),
            counter,
        };
        let t0 = Instant::now();
        while w.count().unwrap_or(0) < 3 {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "workload did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        w
    }

    fn count(&self) -> Option<u64> {
        std::fs::read_to_string(&self.counter)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Waits until the counter passes `v`, or panics.
    fn assert_counts_past(&self, v: u64, what: &str) -> u64 {
        let t0 = Instant::now();
        loop {
            if let Some(c) = self.count().filter(|c| *c > v) {
                return c;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(3),
                "{what}: counter stuck at {:?} (state {:?})",
                self.count(),
                proc_state(self.pid)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Reaps the original process after CRIU killed it (exit dump).
    fn reap(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A restored process that is our child (rst_sibling): killed and reaped on
/// drop.
struct Restored(i32);

impl Drop for Restored {
    fn drop(&mut self) {
        // SAFETY: plain syscalls on a pid we restored as our own child.
        unsafe {
            libc::kill(self.0, libc::SIGKILL);
            libc::waitpid(self.0, std::ptr::null_mut(), 0);
        }
    }
}

/// The state letter of /proc/PID/stat (`R`, `S`, `t`, ...).
fn proc_state(pid: i32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces: the state follows the last ')'.
    s.rsplit_once(')')?.1.trim_start().chars().next()
}

fn dump_job(dir: &Path, pid: i32, leave_running: bool) -> Job {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).expect("create images dir");
    let mut job = Job::new(images);
    job.opts.pid = Some(pid);
    job.opts.leave_running = Some(leave_running);
    job.opts.shell_job = Some(false);
    job.opts.log_level = Some(4);
    job.opts.network_lock = Some(NetworkLockMethod::Skip.into());
    job
}

#[test]
fn version_is_4_2() {
    let _g = serial();
    let t0 = Instant::now();
    let v = client().version().expect("VERSION");
    eprintln!("VERSION: {v} {v:?} in {:?}", t0.elapsed());
    assert_eq!(
        (v.major_number, v.minor_number),
        (Some(4), Some(2)),
        "{v:?}"
    );
    assert!(v.to_string().starts_with("4.2"));
}

#[test]
fn feature_check_answers_and_matches_detection() {
    let _g = serial();
    let t0 = Instant::now();
    let f = client().check_features().expect("FEATURE_CHECK");
    eprintln!("FEATURE_CHECK: {f:?} in {:?}", t0.elapsed());
    let t1 = Instant::now();
    let det = Features::detect(&criu_binary());
    eprintln!(
        "Features::detect in {:?}: {}",
        t1.elapsed(),
        serde_json::to_string_pretty(&det).unwrap_or_default()
    );
    assert_eq!(det.criu_features, Some(f));
    assert!(det.criu_error.is_none(), "{:?}", det.criu_error);
    // Our kernel probe agrees with CRIU's (both "no" on this machine).
    assert_eq!(
        det.soft_dirty.available, f.mem_track,
        "{:?}",
        det.soft_dirty
    );
    let cli_says = Command::new(criu_binary())
        .args(["check", "--feature", "mem_dirty_track"])
        .stderr(Stdio::null())
        .status()
        .expect("criu check")
        .success();
    assert_eq!(det.soft_dirty.available, cli_says);
    // userfaultfd works for root here; CRIU's lazy pages need it.
    assert!(det.userfaultfd.available, "{:?}", det.userfaultfd);
    assert_eq!(f.lazy_pages, det.lazy_pages());
    assert!(det.network_locks.iptables || det.network_locks.nftables);
    // Cached: same Arc the second time.
    let a = Features::cached(&criu_binary());
    let b = Features::cached(&criu_binary());
    assert!(Arc::ptr_eq(&a, &b));
}

#[test]
fn check_passes() {
    let _g = serial();
    client().check().expect("criu check over RPC");
}

#[test]
fn missing_binary_is_a_spawn_failure() {
    let e = CriuClient::new("/nonexistent/criu").version().unwrap_err();
    assert_eq!(e.criu_failure(), Some(CriuFailure::Spawn), "{e}");
    assert!(e.to_string().contains("/nonexistent/criu"), "{e}");
}

#[test]
fn missing_images_dir_is_a_spawn_failure() {
    let job = Job::new("/dev/shm/ms2m-criu-tests/does-not-exist");
    let e = client().restore(&job, None).unwrap_err();
    assert_eq!(e.criu_failure(), Some(CriuFailure::Spawn), "{e}");
    assert!(e.to_string().contains("does-not-exist"), "{e}");
}

#[test]
fn dump_leave_running_hook_runs_while_frozen() {
    let _g = serial();
    let dir = test_dir("hook-frozen");
    let w = Workload::start(&dir);
    let job = dump_job(&dir, w.pid, true);
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen2 = seen.clone();
    let mut hook_checked = false;
    let t0 = Instant::now();
    let out = client()
        .dump(
            &job,
            Some(&mut |n: Notify<'_>| {
                seen2
                    .lock()
                    .map_err(|e| e.to_string())?
                    .push(n.script.to_string());
                if n.script == "post-dump" {
                    let state = proc_state(w.pid);
                    if state != Some('t') {
                        return Err(format!("tree not frozen in post-dump: state {state:?}"));
                    }
                    let before = w.count();
                    std::thread::sleep(Duration::from_millis(100));
                    let after = w.count();
                    if before != after {
                        return Err(format!(
                            "counter moved while frozen: {before:?} -> {after:?}"
                        ));
                    }
                    if !job
                        .images_dir
                        .join("pagemap-".to_string() + &w.pid.to_string() + ".img")
                        .exists()
                    {
                        return Err("images not complete at post-dump".into());
                    }
                    hook_checked = true;
                }
                Ok(())
            }),
        )
        .expect("dump");
    let wall = t0.elapsed();
    assert!(hook_checked);
    let seen = seen.lock().unwrap().clone();
    eprintln!("dump wall {wall:?}, events {:?}", out.events);
    assert!(seen.iter().any(|s| s == "pre-dump"), "{seen:?}");
    assert_eq!(
        seen.last().map(String::as_str),
        Some("post-dump"),
        "{seen:?}"
    );
    let hook_ms = out.hook_duration_ms.expect("hook duration");
    assert!((100.0..1000.0).contains(&hook_ms), "{hook_ms}");
    let started = out.hook_started_at_unix_ms.expect("hook start");
    let now = unix_ms(SystemTime::now());
    assert!(
        started <= now && now - started < 10_000,
        "{started} vs {now}"
    );
    // It runs on.
    let c = w.count().unwrap_or(0);
    w.assert_counts_past(c + 2, "after a leave-running dump");
    assert!(
        matches!(proc_state(w.pid), Some('R' | 'S')),
        "{:?}",
        proc_state(w.pid)
    );
    // CRIU's stats come back, and the freeze covered the hook.
    let stats = crate::stats::read_dump_stats(&job.images_dir).expect("stats-dump");
    eprintln!("stats: {stats:?}");
    assert!(stats.frozen_time_us >= 100_000, "{stats:?}");
    assert!(stats.pages_written > 0);
    assert!(out.log_file.ends_with("dump.log") && out.log_file.exists());
}

#[test]
fn failing_hook_aborts_dump_and_process_runs_on() {
    let _g = serial();
    let dir = test_dir("hook-fails");
    let w = Workload::start(&dir);
    // Not leave-running: on success CRIU would kill it; the hook's failure
    // must keep it alive.
    let job = dump_job(&dir, w.pid, false);
    let e = client()
        .dump(
            &job,
            Some(&mut |n: Notify<'_>| {
                if n.script == "post-dump" {
                    Err("broker position unavailable".into())
                } else {
                    Ok(())
                }
            }),
        )
        .unwrap_err();
    eprintln!("expected failure: {e}");
    assert_eq!(e.criu_failure(), Some(CriuFailure::HookFailed), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("broker position unavailable"), "{msg}");
    assert!(msg.contains("dump.log"), "{msg}");
    let c = w.count().unwrap_or(0);
    w.assert_counts_past(c + 2, "after a failed hook");
    assert!(
        matches!(proc_state(w.pid), Some('R' | 'S')),
        "{:?}",
        proc_state(w.pid)
    );
}

/// SIGKILLs the CRIU that sent `n`, then gives it 50 ms to die.
fn kill_criu(n: &Notify<'_>) {
    // SAFETY: kill(2) on the CRIU child we were told about.
    unsafe { libc::kill(n.criu_pid as i32, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(50));
}

/// Runs `job` with `c`, killing CRIU at its `post-dump` notification; the
/// dump must fail: its error.
fn dump_killing_criu_at_post_dump(c: &CriuClient, job: &Job) -> Error {
    c.dump(
        job,
        Some(&mut |n: Notify<'_>| {
            if n.script == "post-dump" {
                kill_criu(&n);
            }
            Ok(())
        }),
    )
    .unwrap_err()
}

#[test]
fn criu_killed_mid_dump_is_died_and_process_runs_on() {
    let _g = serial();
    let dir = test_dir("criu-killed");
    let w = Workload::start(&dir);
    let job = dump_job(&dir, w.pid, true);
    let spawned = Arc::new(AtomicU32::new(0));
    let s2 = spawned.clone();
    let c = client().on_spawn(move |pid| s2.store(pid, Ordering::SeqCst));
    let e = dump_killing_criu_at_post_dump(&c, &job);
    eprintln!("expected failure: {e}");
    assert_eq!(e.criu_failure(), Some(CriuFailure::Died), "{e}");
    assert!(e.to_string().contains("signal 9"), "{e}");
    assert_ne!(spawned.load(Ordering::SeqCst), 0);
    // ptrace detaches when CRIU dies: the tree runs again.
    let c = w.count().unwrap_or(0);
    w.assert_counts_past(c + 2, "after CRIU was killed");
}

#[test]
fn deadline_kills_criu_and_process_runs_on() {
    let _g = serial();
    let dir = test_dir("deadline");
    let w = Workload::start(&dir);
    let job = dump_job(&dir, w.pid, true);
    let c = client().with_timeout(Some(Duration::from_millis(300)));
    let t0 = Instant::now();
    let e = c
        .dump(
            &job,
            Some(&mut |n: Notify<'_>| {
                if n.script == "post-dump" {
                    std::thread::sleep(Duration::from_millis(500));
                }
                Ok(())
            }),
        )
        .unwrap_err();
    eprintln!("expected failure after {:?}: {e}", t0.elapsed());
    // The answer to post-dump went out past the deadline: CRIU is killed.
    assert_eq!(e.criu_failure(), Some(CriuFailure::TimedOut), "{e}");
    let c = w.count().unwrap_or(0);
    w.assert_counts_past(c + 2, "after the deadline");
}

#[test]
fn dump_exit_then_restore_continues_state() {
    let _g = serial();
    let dir = test_dir("dump-restore");
    let mut w = Workload::start(&dir);
    let job = dump_job(&dir, w.pid, false);
    let t0 = Instant::now();
    let out = client().dump(&job, None).expect("dump (exit)");
    eprintln!(
        "exit dump: wall {:?}, request {:.1} ms, events {:?}, stats {:?}",
        t0.elapsed(),
        out.wall_ms,
        out.events,
        crate::stats::read_dump_stats(&job.images_dir)
    );
    w.reap();
    let at_dump = w.count().expect("counter after dump");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(w.count(), Some(at_dump), "dumped process still running");

    let mut rjob = Job::new(&job.images_dir);
    rjob.opts.rst_sibling = Some(true);
    rjob.opts.shell_job = Some(false);
    rjob.opts.log_level = Some(4);
    let mut scripts = Vec::new();
    let t1 = Instant::now();
    let r = client()
        .restore(
            &rjob,
            Some(&mut |n: Notify<'_>| {
                scripts.push((n.script.to_string(), n.pid));
                Ok(())
            }),
        )
        .expect("restore");
    eprintln!("restore: wall {:?}, events {:?}", t1.elapsed(), r.events);
    let _restored = Restored(r.pid);
    assert_eq!(r.pid, w.pid, "CRIU restores the original pid");
    assert!(
        scripts
            .iter()
            .any(|(s, p)| s == "post-restore" && *p == Some(r.pid)),
        "{scripts:?}"
    );
    // The in-memory counter continues from where it was, not from 1.
    let after = w.assert_counts_past(at_dump, "after restore");
    assert!(
        after <= at_dump + 50,
        "counter jumped: {at_dump} -> {after}"
    );
    let stats = crate::stats::read_restore_stats(&job.images_dir).expect("stats-restore");
    eprintln!("restore stats: {stats:?}");
}

#[test]
fn pre_dump_follows_dirty_tracking() {
    let _g = serial();
    let dir = test_dir("pre-dump");
    let w = Workload::start(&dir);
    let mut job = dump_job(&dir, w.pid, true);
    job.opts.pre_dump_mode = Some(PreDumpMode::VM_READ.into());
    let tracking = Features::cached(&criu_binary()).dirty_tracking();
    let r = client().pre_dump(&job, None);
    eprintln!("pre-dump with dirty tracking = {tracking}: {r:?}");
    if tracking {
        r.expect("pre-dump where dirty tracking exists");
    } else {
        let e = r.unwrap_err();
        assert_eq!(e.criu_failure(), Some(CriuFailure::Refused), "{e}");
    }
    let c = w.count().unwrap_or(0);
    w.assert_counts_past(c + 2, "after a pre-dump");
}

#[test]
fn page_server_receives_a_dump() {
    let _g = serial();
    let dir = test_dir("page-server");
    let w = Workload::start(&dir);
    let ps_dir = dir.join("ps-images");
    std::fs::create_dir_all(&ps_dir).expect("mkdir");
    let mut ps_job = Job::new(&ps_dir);
    ps_job.opts.ps = MessageField::some(PageServerInfo {
        address: Some("127.0.0.1".into()),
        port: Some(0),
        ..Default::default()
    });
    let t0 = Instant::now();
    let ps = client().page_server(&ps_job).expect("page server");
    eprintln!("page server {ps:?} started in {:?}", t0.elapsed());
    assert!(ps.port > 0 && ps.pid > 0);
    let mut job = dump_job(&dir, w.pid, true);
    job.opts.ps = MessageField::some(PageServerInfo {
        address: Some("127.0.0.1".into()),
        port: Some(ps.port),
        ..Default::default()
    });
    client().dump(&job, None).expect("dump to the page server");
    let pages_remote = std::fs::read_dir(&ps_dir)
        .expect("read ps dir")
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().starts_with("pages-"));
    let pages_local = std::fs::read_dir(&job.images_dir)
        .expect("read images dir")
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().starts_with("pages-"));
    assert!(
        pages_remote && !pages_local,
        "remote {pages_remote} local {pages_local}"
    );
    // SAFETY: kill(2) on the page server daemon CRIU reported (it normally
    // exits after one dump already).
    unsafe { libc::kill(ps.pid, libc::SIGKILL) };
    let c = w.count().unwrap_or(0);
    w.assert_counts_past(c + 2, "after a page-server dump");
}

#[test]
fn lazy_restore_runs_before_memory_arrives() {
    let _g = serial();
    let dir = test_dir("lazy");
    let mut w = Workload::start(&dir);
    let job = dump_job(&dir, w.pid, false);
    client().dump(&job, None).expect("dump (exit)");
    w.reap();
    let at_dump = w.count().expect("counter after dump");
    let t0 = Instant::now();
    let lp = LazyPages::start(
        &criu_binary(),
        &job.images_dir,
        None,
        None,
        Duration::from_secs(5),
    )
    .expect("lazy-pages daemon");
    let mut rjob = Job::new(&job.images_dir);
    rjob.opts.rst_sibling = Some(true);
    rjob.opts.lazy_pages = Some(true);
    rjob.opts.log_level = Some(4);
    let r = client().restore(&rjob, None).expect("lazy restore");
    let restore_time = t0.elapsed();
    let _restored = Restored(r.pid);
    eprintln!(
        "lazy restore: daemon ready in {:.1} ms, restored pid {} after {restore_time:?} (request {:.1} ms)",
        lp.ready_ms, r.pid, r.wall_ms
    );
    let after = w.assert_counts_past(at_dump, "after lazy restore");
    assert!(
        after <= at_dump + 50,
        "counter jumped: {at_dump} -> {after}"
    );
    lp.wait(Duration::from_secs(10))
        .expect("lazy-pages served everything");
    let stats = crate::stats::read_restore_stats(&job.images_dir).expect("stats-restore");
    eprintln!("lazy restore stats: {stats:?}");
    w.assert_counts_past(after + 2, "after all pages arrived");
}

/// A v1 freezer cgroup holding one pid, removed on drop.
struct FreezerCgroup(PathBuf);

impl FreezerCgroup {
    fn new(name: &str, pid: i32) -> FreezerCgroup {
        let p = Path::new("/sys/fs/cgroup/freezer").join(name);
        let _ = std::fs::create_dir(&p);
        std::fs::write(p.join("cgroup.procs"), pid.to_string()).expect("join freezer cgroup");
        FreezerCgroup(p)
    }

    fn state(&self) -> String {
        std::fs::read_to_string(self.0.join("freezer.state"))
            .unwrap_or_default()
            .trim()
            .to_string()
    }
}

impl Drop for FreezerCgroup {
    fn drop(&mut self) {
        let _ = thaw_freezer(&self.0);
        if let Ok(procs) = std::fs::read_to_string(self.0.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = std::fs::write("/sys/fs/cgroup/freezer/cgroup.procs", pid);
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn freezer_cgroup_is_thawed_when_criu_dies() {
    let _g = serial();
    let dir = test_dir("freezer");
    let w = Workload::start(&dir);
    let cg = FreezerCgroup::new(&format!("ms2m-criu-test-{}", std::process::id()), w.pid);
    let mut job = dump_job(&dir, w.pid, true);
    job.opts.freeze_cgroup = Some(cg.0.to_string_lossy().into_owned());
    let mut seen = (None, String::new());
    let e = client()
        .dump(
            &job,
            Some(&mut |n: Notify<'_>| {
                if n.script == "post-dump" {
                    // CRIU froze the cgroup to seize the tasks and thawed it
                    // again: ptrace alone holds them now.
                    seen = (proc_state(w.pid), cg.state());
                    // Simulate CRIU dying while the cgroup is frozen.
                    std::fs::write(cg.0.join("freezer.state"), "FROZEN")
                        .map_err(|e| e.to_string())?;
                    kill_criu(&n);
                }
                Ok(())
            }),
        )
        .unwrap_err();
    eprintln!("seen in post-dump {seen:?}; error: {e}");
    assert_eq!(seen, (Some('t'), "THAWED".to_string()));
    assert_eq!(e.criu_failure(), Some(CriuFailure::Died), "{e}");
    assert!(
        e.to_string().contains("thawed /sys/fs/cgroup/freezer/"),
        "{e}"
    );
    assert_eq!(cg.state(), "THAWED");
    let c = w.count().unwrap_or(0);
    w.assert_counts_past(c + 2, "after CRIU died with the cgroup frozen");
}

#[test]
fn paused_cgroup_stays_paused_when_criu_dies() {
    let _g = serial();
    let dir = test_dir("freezer-paused");
    let w = Workload::start(&dir);
    let cg = FreezerCgroup::new(&format!("ms2m-criu-paused-{}", std::process::id()), w.pid);
    std::fs::write(cg.0.join("freezer.state"), "FROZEN").expect("pause");
    let mut job = dump_job(&dir, w.pid, true);
    job.opts.freeze_cgroup = Some(cg.0.to_string_lossy().into_owned());
    let e = dump_killing_criu_at_post_dump(&client(), &job);
    eprintln!("error: {e}; state {}", cg.state());
    assert_eq!(e.criu_failure(), Some(CriuFailure::Died), "{e}");
    assert!(e.to_string().contains("re-froze"), "{e}");
    assert_eq!(cg.state(), "FROZEN");
    let c = w.count();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(w.count(), c, "a paused container must stay paused");
}

#[test]
fn leave_running_dump_without_callback() {
    let _g = serial();
    let dir = test_dir("plain");
    let w = Workload::start(&dir);
    let job = dump_job(&dir, w.pid, true);
    let t0 = Instant::now();
    let out = client().dump(&job, None).expect("dump");
    let wall = t0.elapsed();
    let stats = crate::stats::read_dump_stats(&job.images_dir).expect("stats-dump");
    eprintln!(
        "leave-running dump, no callback: call {wall:?}, request {:.1} ms, frozen {} us, stats {stats:?}",
        out.wall_ms, stats.frozen_time_us
    );
    assert!(out.events.is_empty() && out.hook_duration_ms.is_none());
    assert!(out.hook_started_at_unix_ms.is_none());
    let c = w.count().unwrap_or(0);
    w.assert_counts_past(c + 2, "after a plain dump");
}
