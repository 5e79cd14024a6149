//! CRIU killed at each notification stage (issue 9), for real: the shim's
//! configuration names a wrapper around `criu-fault` (src/bin/criu-fault.rs)
//! as its CRIU binary; it relays between the shim (or runc) and the real
//! CRIU and SIGKILLs CRIU while it waits for the answer to the stage's
//! notification. Each test checks in the stand-in's log that the stage was
//! really reached.
//!
//! - checkpoint, killed at `pre-dump`, `network-lock` and `post-dump` (with
//!   an nftables and an iptables lock): the checkpoint fails naming CRIU's
//!   death and the stage; the container runs on, thawed and counting; no
//!   CRIU lock is left in its network namespace (loopback TCP works); what
//!   the dump wrote is gone, so `ms2m inspect` and `ms2m restore` refuse the
//!   directory and no task is made; a checkpoint through the same relay
//!   succeeds afterwards;
//! - restore, killed at `pre-resume` (every task restored, not resumed):
//!   the restore fails naming the stage; no restored process runs on, none
//!   is frozen; the checkpoint is intact and a second restore brings the
//!   counter back from where it was;
//! - a tapped RabbitMQ consumer killed at `post-dump`: the tap releases its
//!   hold, the consumer keeps consuming, 0 lost and 0 duplicated.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ms2m_runtime_tests::amqp::{
    collect_results, rabbitmq_available, start_tapped_consumer, wait_consumer_count, Checker,
    Client, Producer, ProducerConfig, QueueKind, TestQueues,
};
use ms2m_runtime_tests::{
    ctr, env, ms2m, run_cmd, wait_until, CmdOut, Container, RunOpts, TestDir,
};

const T: Duration = Duration::from_secs(30);
/// The CRIU the stand-in runs (hack/setup.sh installs it there).
const REAL_CRIU: &str = "/usr/local/sbin/criu";
const APP_URL: &str = "amqp://guest:guest@localhost:5672/%2f";
const UPSTREAM: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// The stand-in CRIU of one test: a wrapper script, the shim configuration
/// naming it, and the stand-in's log.
struct Fault {
    wrapper: PathBuf,
    config: PathBuf,
    log: PathBuf,
}

impl Fault {
    /// Armed to kill CRIU at `stage`; `config` is more of the shim's
    /// configuration (e.g. `[checkpoint]` settings).
    fn new(td: &TestDir, stage: &str, config: &str) -> Fault {
        assert!(
            env().is_ms2m(),
            "CRIU fault tests exercise ms2m's shim (runtime is {})",
            env().runtime
        );
        assert!(
            Path::new(REAL_CRIU).is_file(),
            "{REAL_CRIU} is missing: run hack/setup.sh"
        );
        let f = Fault {
            wrapper: td.join("criu"),
            config: td.join("shim.toml"),
            log: td.join("criu-fault.log"),
        };
        f.arm(Some(stage));
        std::fs::write(
            &f.config,
            format!("[criu]\nbinary = \"{}\"\n{config}", f.wrapper.display()),
        )
        .expect("write the shim configuration");
        f
    }

    /// Rewrites the wrapper: kill at `stage`, or only relay (`None`).
    fn arm(&self, stage: Option<&str>) {
        use std::os::unix::fs::PermissionsExt;
        let kill = stage.map(|s| format!("--kill-at {s} ")).unwrap_or_default();
        let script = format!(
            "#!/bin/sh\nexec {} --real {REAL_CRIU} --log {} {kill}-- \"$@\"\n",
            env!("CARGO_BIN_EXE_criu-fault"),
            self.log.display()
        );
        // A new file renamed over the old: a shim exec'ing it meanwhile
        // never sees it half written.
        let tmp = self.wrapper.with_extension("new");
        std::fs::write(&tmp, script).expect("write the CRIU wrapper");
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::rename(&tmp, &self.wrapper).expect("install the CRIU wrapper");
    }

    /// `ctr run` flag: the shim configuration naming the wrapper.
    fn flag(&self) -> String {
        format!("--runtime-config-path={}", path_str(&self.config))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The stand-in's log says CRIU was killed at `stage`.
    fn assert_killed_at(&self, stage: &str) {
        let log = self.log();
        assert!(
            log.contains(&format!("notify {stage} "))
                && log.contains(&format!("killed criu at {stage} ")),
            "CRIU was not killed at {stage}: the stage never came, or the wrapper was not used. \
             The stand-in's log:\n{log}"
        );
    }
}

fn sh(script: &str) -> CmdOut {
    run_cmd(Command::new("sh").args(["-c", script]), T).unwrap_or_else(|e| panic!("{e}"))
}

/// Loopback TCP inside `pid`'s network namespace: a CRIU lock drops it.
fn assert_network_works(pid: u32) {
    let out = sh(&format!(
        "nsenter -t {pid} -n python3 -c 'import socket\n\
         s = socket.socket(); s.bind((\"127.0.0.1\", 0)); s.listen(1)\n\
         c = socket.socket(); c.settimeout(2); c.connect(s.getsockname()); print(\"ok\")'"
    ));
    assert!(
        out.success() && out.stdout.contains("ok"),
        "loopback TCP in the container's network namespace fails (nsenter and python3 \
         needed): {out}"
    );
    let rules = sh(&format!("nsenter -t {pid} -n iptables-save"));
    assert!(rules.success(), "iptables-save in the container: {rules}");
    assert!(
        !rules.stdout.contains(":CRIU"),
        "CRIU's iptables chain is left:\n{}",
        rules.stdout
    );
    let tables = criu_bridge::netlock::nft_lock_tables(pid).expect("list nftables tables");
    assert!(
        tables.is_empty(),
        "CRIU's nftables lock is left: {tables:?}"
    );
}

/// The container runs on after the failed checkpoint: RUNNING, thawed,
/// counting past `before`, its network unlocked.
fn assert_running_on(c: &Container, before: u64) -> u64 {
    assert_eq!(c.status().as_deref(), Some("RUNNING"));
    if let Some(s) = c.freezer_state() {
        assert_eq!(s, "THAWED", "left frozen");
    }
    assert_network_works(c.pid());
    c.wait_counter_above(before, T)
}

/// What a failed dump left in `img` is no checkpoint: no images, no
/// manifest; `ms2m inspect` and `ms2m restore` refuse it; no task is made.
fn assert_no_checkpoint_left(img: &Path, name: &str) {
    let left = ms2m_runtime_tests::file_names(img);
    eprintln!("{name}: left in the image directory: {left:?}");
    for f in ["inventory.img", "ms2m-manifest.json", "pages-1.img"] {
        assert!(!left.contains(f), "{f} left by the failed dump: {left:?}");
    }
    let inspect = ms2m(&["inspect", path_str(img)]);
    assert!(
        !inspect.success() && inspect.stderr.contains("not a checkpoint"),
        "ms2m inspect takes the failed dump for a checkpoint: {inspect}"
    );
    let dst = Container::run(&format!("{name}-dst"), RunOpts::memcounter(0, 50));
    dst.wait_status("RUNNING", T);
    dst.kill_and_delete_task();
    let restore = ms2m(&["restore", &dst.id, path_str(img)]);
    assert!(
        !restore.success() && restore.stderr.contains("no inventory.img"),
        "ms2m restore takes the failed dump for a checkpoint: {restore}"
    );
    assert_eq!(dst.status(), None, "a task was made from the failed dump");
}

/// A leave-running `ms2m checkpoint` with CRIU killed at `stage`, under
/// the network lock `lock`; the error must say `note` too.
fn checkpoint_killed_at(stage: &str, lock: &str, name: &str, note: &str) {
    let td = TestDir::new(name);
    let fault = Fault::new(
        &td,
        stage,
        &format!("[checkpoint]\nnetwork_lock = \"{lock}\"\n"),
    );
    let c = Container::run(name, RunOpts::memcounter(16, 50).flag(&fault.flag()));
    c.wait_status("RUNNING", T);
    let before = c.wait_counter_above(3, T);
    let img = td.join("img");
    let out = ms2m(&[
        "checkpoint",
        "--image-path",
        path_str(&img),
        "--work-path",
        path_str(&td.join("work")),
        &c.id,
    ]);
    eprintln!("{name}: {}", out.stderr.trim());
    fault.assert_killed_at(stage);
    assert!(!out.success(), "the checkpoint succeeded: {out}");
    for cause in [
        "criu closed the connection before answering",
        &format!("after its {stage} notification"),
        note,
    ] {
        assert!(
            out.stderr.contains(cause),
            "the error lacks {cause:?}: {out}"
        );
    }
    assert!(!out.stderr.contains("panicked"), "{out}");
    let now = assert_running_on(&c, before);
    assert_no_checkpoint_left(&img, name);

    // ctr's checkpoint meets the same death the same way.
    let out = c.ctr_checkpoint(&["--image-path", path_str(&td.join("img-ctr"))]);
    assert!(
        !out.success()
            && out
                .stderr
                .contains(&format!("after its {stage} notification")),
        "ctr task checkpoint: {out}"
    );
    let now = assert_running_on(&c, now);

    // Through the same relay, not killed: the next checkpoint succeeds.
    fault.arm(None);
    let good = td.join("good");
    ms2m(&["checkpoint", "--image-path", path_str(&good), &c.id]).ok();
    assert!(good.join("inventory.img").exists() && good.join("ms2m-manifest.json").exists());
    assert!(
        fault.log().contains("answer DUMP success true"),
        "the good checkpoint did not go through the relay:\n{}",
        fault.log()
    );
    assert_running_on(&c, now);
}

/// Killed before the freeze: nothing was written but runc's descriptors.
#[test]
fn criu_killed_at_pre_dump_leaves_it_running() {
    checkpoint_killed_at("pre-dump", "auto", "cf-pre", "thawed");
}

/// Killed just before it locks the network: no lock to leave.
#[test]
fn criu_killed_at_network_lock_leaves_it_running() {
    checkpoint_killed_at("network-lock", "nftables", "cf-lock", "thawed");
}

/// Killed in the frozen window, with every image written and the network
/// locked (nftables): the shim removes the lock and the images.
#[test]
fn criu_killed_at_post_dump_unlocks_nftables_and_leaves_no_images() {
    checkpoint_killed_at(
        "post-dump",
        "nftables",
        "cf-post-nft",
        "CRIU's network lock was left in the container's network namespace and has been \
         removed (nftables table inet CRIU-",
    );
}

/// The same with CRIU's iptables lock (a `CRIU` chain).
#[test]
fn criu_killed_at_post_dump_unlocks_iptables() {
    checkpoint_killed_at(
        "post-dump",
        "iptables",
        "cf-post-ipt",
        "has been removed (iptables chain CRIU",
    );
}

/// Processes whose cgroups name the container `id`.
fn processes_of(id: &str) -> Vec<String> {
    let out = sh(&format!(
        "grep -l ':/.*{id}$' /proc/[0-9]*/cgroup 2>/dev/null; true"
    ));
    out.stdout.lines().map(str::to_string).collect()
}

/// `ctr c restore` of a checkpoint with CRIU killed at `pre-resume`: the
/// restore fails naming the stage, no restored process runs on (CRIU's
/// death released them; they were in the source's cgroups, where runc's
/// cleanup does not look), nothing frozen; a second restore (`ms2m
/// restore`) of the same checkpoint brings the counter back.
#[test]
fn criu_killed_at_pre_resume_leaves_no_half_restored_task() {
    let td = TestDir::new("cf-resume");
    let fault = Fault::new(&td, "pre-resume", "");
    // Counting every 50 ms past 60 before the checkpoint: restarted rather
    // than restored, it would read far below 60 right after the restore.
    const AT_LEAST: u64 = 60;
    let src = Container::run("cf-resume", RunOpts::memcounter(16, 50).flag(&fault.flag()));
    src.wait_status("RUNNING", T);
    src.wait_counter_above(AT_LEAST, T);
    let reference = format!("ms2m-tests/{}:ck", src.id);
    ctr(&["container", "checkpoint", "--task", &src.id, &reference]).ok();
    let _image = ImageGuard(reference.clone());
    src.kill_and_delete_task();

    // The new container carries the checkpoint's runtime options: the
    // shim configuration naming the stand-in.
    let dst = Container::adopt(&ms2m_runtime_tests::unique_id("cf-resume-dst"));
    let out = ctr(&["container", "restore", "--live", &dst.id, &reference]);
    eprintln!("restore: {}", out.stderr.trim());
    fault.assert_killed_at("pre-resume");
    assert!(!out.success(), "the restore succeeded: {out}");
    for cause in ["CRIU's last stage: pre-resume", "killed"] {
        assert!(
            out.stderr.contains(cause),
            "the error lacks {cause:?}: {out}"
        );
    }
    assert!(
        !matches!(dst.status().as_deref(), Some("RUNNING") | Some("PAUSED")),
        "the failed restore left a task: {:?}",
        dst.task()
    );
    let left = wait_until(
        "the restored processes to go",
        T,
        Duration::from_millis(50),
        || {
            let left: Vec<String> = [&src.id, &dst.id]
                .iter()
                .flat_map(|id| processes_of(id))
                .collect();
            left.is_empty().then_some(left)
        },
    );
    assert!(left.is_empty());
    assert_no_cgroup_yard(&dst.id);
    for id in [&src.id, &dst.id] {
        let freezer = PathBuf::from(format!("/sys/fs/cgroup/freezer/ms2m/{id}"));
        if let Ok(state) = std::fs::read_to_string(freezer.join("freezer.state")) {
            assert_eq!(state.trim(), "THAWED", "{} left frozen", freezer.display());
        }
    }

    // `ms2m restore` restores with the container's configuration too (it
    // names the images in runc options, which cannot carry the container's
    // own config_path; the manifest records the file): CRIU dies again.
    std::fs::write(&fault.log, "").expect("empty the stand-in's log");
    ctr(&["task", "delete", &dst.id]);
    let out = ms2m(&["restore", &dst.id, &reference]);
    assert!(
        !out.success(),
        "`ms2m restore` did not go through the configured CRIU: {out}"
    );
    fault.assert_killed_at("pre-resume");
    assert!(
        out.stderr.contains("CRIU's last stage: pre-resume"),
        "{out}"
    );
    assert_no_cgroup_yard(&dst.id);

    // The checkpoint is intact: the same container restores from it.
    fault.arm(None);
    ctr(&["task", "delete", &dst.id]);
    ms2m(&["restore", &dst.id, &reference]).ok();
    dst.wait_status("RUNNING", T);
    let back = dst.counter();
    assert!(
        back > AT_LEAST,
        "the counter restarted: {back} right after the restore, above {AT_LEAST} at the checkpoint"
    );
    dst.wait_counter_above(back, T);
}

/// CRIU mounts a cgroup yard (`.criu.cgyard.*`, a tmpfs with every
/// controller inside) in its restore work directory and unmounts it at the
/// end; one killed before that must not leave it mounted.
fn assert_no_cgroup_yard(id: &str) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let left: Vec<&str> = mounts
        .lines()
        .filter(|l| l.contains(".criu.cgyard.") && l.contains(id))
        .collect();
    assert!(
        left.is_empty(),
        "CRIU's cgroup yard is still mounted after the failed restore:\n{}",
        left.join("\n")
    );
}

/// Removes a checkpoint image from containerd's image store.
struct ImageGuard(String);

impl Drop for ImageGuard {
    fn drop(&mut self) {
        let _ = ctr(&["image", "rm", &self.0]);
    }
}

/// A tapped stream consumer under load, CRIU killed at `post-dump` (the
/// cut was taken, the tap holds deliveries): the tap lets go, the consumer
/// keeps consuming on its one connection, and every message is processed
/// once; a checkpoint through the relay works afterwards.
#[test]
fn tapped_consumer_criu_killed_at_post_dump_keeps_consuming() {
    env();
    rabbitmq_available();
    let td = TestDir::new("cf-tap");
    let fault = Fault::new(&td, "post-dump", "");
    let q = TestQueues::new("cf-tap", QueueKind::Stream);
    let c = start_tapped_consumer(
        Client::Lapin,
        &q,
        &td,
        "cf-tap",
        UPSTREAM,
        APP_URL,
        &[fault.flag()],
    );
    const N: u64 = 800;
    let p = Producer::start(ProducerConfig::new(&q.queue, N, 200));
    let s = wait_consumer_count(&c, 100, T);
    let out = ms2m(&[
        "checkpoint",
        "--image-path",
        path_str(&td.join("img")),
        &c.id,
    ]);
    eprintln!("cf-tap: {}", out.stderr.trim());
    fault.assert_killed_at("post-dump");
    assert!(
        !out.success() && out.stderr.contains("after its post-dump notification"),
        "{out}"
    );
    assert_eq!(c.status().as_deref(), Some("RUNNING"));
    if let Some(st) = c.freezer_state() {
        assert_eq!(st, "THAWED", "left frozen");
    }
    // The hold is released: it consumes on.
    wait_consumer_count(&c, s.count + 100, T);
    assert_no_checkpoint_left(&td.join("img"), "cf-tap");

    fault.arm(None);
    ms2m(&[
        "checkpoint",
        "--image-path",
        path_str(&td.join("good")),
        &c.id,
    ])
    .ok();

    let rep = p.join().unwrap_or_else(|e| panic!("producer: {e}"));
    let results = collect_results(&q.results, N as usize, Duration::from_secs(60));
    let report = Checker::new(rep.confirmed.iter().copied()).check(&results);
    eprintln!("cf-tap: {report}");
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.processed_unique as u64, N, "{report}");
    assert_eq!(results.len() as u64, N, "duplicates downstream: {report}");
    let s = wait_consumer_count(&c, N, T);
    assert_eq!(s.connects, 1, "the consumer reconnected: {s:?}");
}
