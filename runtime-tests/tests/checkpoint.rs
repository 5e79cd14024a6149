//! Checkpoint and restore with state continuity: leave-running and exit
//! checkpoints to an image path, the content store (`ctr c checkpoint` /
//! `ctr c restore --live`), the `ms2m` CLI, restoring one checkpoint twice, and
//! a 256 MiB workload.
//!
//! The state is memcounter's in-memory counter: after a restore it must
//! continue from (at least) the value read just before the checkpoint; a
//! restarted process would count from 1 again.

use std::path::Path;
use std::time::Duration;

use criu_bridge::manifest::Manifest;
use ms2m_runtime_tests::{
    ctr, env, file_names, ms2m, wait_until, Container, ImageRef, RunOpts, TestDir,
};

const T: Duration = Duration::from_secs(30);

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// Runs memcounter and waits until its counter is at least `min`, so that a
/// restart from 1 cannot be mistaken for a continued counter.
fn counting(prefix: &str, mib: u64, interval_ms: u64, min: u64) -> Container {
    let c = Container::run(prefix, RunOpts::memcounter(mib, interval_ms));
    c.wait_status("RUNNING", T);
    c.wait_counter_above(min - 1, Duration::from_secs(60));
    c
}

/// The CRIU images every dump of memcounter has.
fn assert_criu_images(dir: &Path) {
    let names = file_names(dir);
    for f in ["inventory.img", "pstree.img", "core-1.img", "mm-1.img"] {
        assert!(
            names.contains(f),
            "{f} missing in {}: {names:?}",
            dir.display()
        );
    }
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("pages-") && n.ends_with(".img")),
        "no pages-*.img in {}: {names:?}",
        dir.display()
    );
}

/// Total size of pages-*.img in `dir`.
fn pages_bytes(dir: &Path) -> u64 {
    file_names(dir)
        .iter()
        .filter(|n| n.starts_with("pages-"))
        .filter_map(|n| std::fs::metadata(dir.join(n)).ok())
        .map(|m| m.len())
        .sum()
}

/// Checks ms2m's manifest in `img` (only under ms2m's runtime: runc's shim
/// writes none). Returns it.
fn check_manifest(img: &Path, work: Option<&Path>, id: &str, exit: bool) -> Option<Manifest> {
    if !env().is_ms2m() {
        return None;
    }
    let m = Manifest::read(img)
        .unwrap_or_else(|e| panic!("reading ms2m's manifest in {}: {e}", img.display()));
    assert_eq!(m.container_id, id, "{m:#?}");
    assert!(m.created_at_unix_ms > 0, "{m:#?}");
    assert!(!m.created_at.is_empty(), "{m:#?}");
    let criu = m.runtime.criu_version.as_deref().unwrap_or_default();
    assert!(criu.starts_with("4."), "criu_version {criu:?}: {m:#?}");
    assert!(!m.runtime.shim.is_empty(), "{m:#?}");
    assert_eq!(m.options.exit, exit, "options.exit: {m:#?}");
    assert_eq!(
        Path::new(&m.options.image_path),
        img,
        "options.image_path: {m:#?}"
    );
    let stats = m
        .stats
        .as_ref()
        .unwrap_or_else(|| panic!("no stats: {m:#?}"));
    if let Some(w) = work {
        assert_eq!(
            m.options.work_path.as_deref().map(Path::new),
            Some(w),
            "options.work_path: {m:#?}"
        );
        // The manifest's statistics are CRIU's own, from stats-dump.
        let criu = criu_bridge::stats::read_dump_stats(w)
            .unwrap_or_else(|e| panic!("reading CRIU's stats-dump in {}: {e}", w.display()));
        assert_eq!(*stats, criu, "manifest stats differ from CRIU's stats-dump");
    }
    assert!(stats.frozen_time_us > 0, "frozen_time_us: {m:#?}");
    assert!(stats.pages_written > 0, "pages_written: {m:#?}");
    // (No order between freezing_time and frozen_time: CRIU measures them
    // over different intervals, and under load seizing the tasks can take
    // longer than dumping a small container.)
    assert!(m.timings.total_ms > 0.0, "timings: {m:#?}");
    Some(m)
}

/// `ctr task checkpoint --exit` of `c` into `img` (work dir `work`, if
/// given), which must succeed and stop the task.
fn exit_checkpoint(c: &Container, img: &Path, work: Option<&Path>) {
    let mut args = vec!["--exit", "--image-path", path_str(img)];
    if let Some(w) = work {
        args.extend(["--work-path", path_str(w)]);
    }
    c.ctr_checkpoint(&args).ok();
    c.wait_status("STOPPED", T);
}

/// Deletes `c`'s stopped task and gives it a new one from `img` with
/// `ms2m restore`; the counter continues from `before` (see
/// [`assert_continues`], whose first value it returns).
fn restore_continues(c: &Container, img: &Path, before: u64) -> u64 {
    ctr(&["task", "delete", &c.id]).ok();
    let out = ms2m(&["restore", &c.id, path_str(img)]).ok();
    eprintln!("{out}");
    assert_continues(c, before)
}

/// A counting container (`prefix`) checkpointed into the content store
/// with `ctr containers checkpoint --task` (which leaves it running), the
/// checkpoint's ref, and the counter read just before the checkpoint.
fn checkpointed_to_store(prefix: &str) -> (Container, ImageRef, u64) {
    let c = counting(prefix, 0, 50, 30);
    let r = ImageRef::unique(prefix);
    let before = c.counter();
    ctr(&["containers", "checkpoint", "--task", &c.id, &r.name]).ok();
    (c, r, before)
}

/// After a restore: the task runs and its counter continues from at least
/// `before` (read before the checkpoint) and keeps counting.
fn assert_continues(c: &Container, before: u64) -> u64 {
    c.wait_status("RUNNING", T);
    let first = ms2m_runtime_tests::wait_until(
        "the restored task's counter",
        T,
        Duration::from_millis(20),
        || c.try_counter(),
    );
    assert!(
        first >= before,
        "restored counter {first} is below the checkpointed {before}: the state did not continue"
    );
    let later = c.wait_counter_above(first, T);
    assert!(later > first);
    first
}

#[test]
fn checkpoint_leave_running() {
    let td = TestDir::new("ck-leave");
    let c = counting("leave", 0, 50, 5);
    let img = td.join("img");
    let work = td.join("work");
    let out = c
        .ctr_checkpoint(&[
            "--image-path",
            path_str(&img),
            "--work-path",
            path_str(&work),
        ])
        .ok();
    // Still running, still counting, not frozen.
    assert_eq!(c.status().as_deref(), Some("RUNNING"), "{out}");
    if let Some(state) = c.freezer_state() {
        assert_eq!(state, "THAWED");
    }
    let v = c.counter();
    c.wait_counter_above(v, T);

    assert_criu_images(&img);
    assert!(
        file_names(&work).contains("dump.log") || file_names(&img).contains("dump.log"),
        "no dump.log in the work dir"
    );
    check_manifest(&img, Some(&work), &c.id, false);

    // A second checkpoint of the same task into another dir works too.
    let img2 = td.join("img2");
    c.ctr_checkpoint(&["--image-path", path_str(&img2)]).ok();
    assert_criu_images(&img2);
    check_manifest(&img2, None, &c.id, false);
    assert_eq!(c.status().as_deref(), Some("RUNNING"));
}

#[test]
fn exit_checkpoint_then_ms2m_restore() {
    let td = TestDir::new("ck-exit");
    let c = counting("exit", 0, 50, 30);
    let img = td.join("img");
    let work = td.join("work");
    let before = c.counter();
    exit_checkpoint(&c, &img, Some(&work));
    assert_criu_images(&img);
    check_manifest(&img, Some(&work), &c.id, true);

    let first = restore_continues(&c, &img, before);
    eprintln!("counter: {before} before the checkpoint, {first} right after the restore");
}

#[test]
fn ms2m_cli_checkpoint_exit_and_restore() {
    let td = TestDir::new("cli-exit");
    let c = counting("cli", 0, 50, 30);
    let img = td.join("img");
    let work = td.join("work");
    let before = c.counter();
    let out = ms2m(&[
        "checkpoint",
        "--exit",
        "--image-path",
        path_str(&img),
        "--work-path",
        path_str(&work),
        "--json",
        &c.id,
    ])
    .ok();
    let report: serde_json::Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("`ms2m checkpoint --json` did not print JSON ({e}): {out}"));
    assert!(report.is_object(), "{out}");
    c.wait_status("STOPPED", T);
    assert_criu_images(&img);
    check_manifest(&img, Some(&work), &c.id, true);

    // inspect shows the checkpoint, as text and as JSON; with ms2m's shim
    // that includes the manifest (runc's shim writes none).
    let text = ms2m(&["inspect", path_str(&img)]).ok();
    let json = ms2m(&["inspect", "--json", path_str(&img)]).ok();
    let v: serde_json::Value = serde_json::from_str(json.stdout.trim())
        .unwrap_or_else(|e| panic!("`ms2m inspect --json` did not print JSON ({e}): {json}"));
    if env().is_ms2m() {
        assert!(text.stdout.contains(&c.id), "{text}");
        assert!(json.stdout.contains(&c.id), "{v}");
    }

    // No `ctr task delete` here: ms2m restore replaces the stopped task.
    let out = ms2m(&["restore", "--json", &c.id, path_str(&img)]).ok();
    serde_json::from_str::<serde_json::Value>(out.stdout.trim())
        .unwrap_or_else(|e| panic!("`ms2m restore --json` did not print JSON ({e}): {out}"));
    assert_continues(&c, before);
}

#[test]
fn content_store_checkpoint_and_live_restore() {
    let (c, r, before) = checkpointed_to_store("cs");
    // `ctr c checkpoint --task` leaves the task running.
    assert_eq!(c.status().as_deref(), Some("RUNNING"));
    let images = ctr(&["images", "ls", "-q"]).ok();
    assert!(
        images.stdout.lines().any(|l| l.trim() == r.name),
        "{images}"
    );

    // Stop and delete the original, restore under a new id.
    c.kill_and_delete_task();
    drop(c);
    let restored = Container::adopt(&ms2m_runtime_tests::unique_id("cs-r"));
    ctr(&["containers", "restore", "--live", &restored.id, &r.name]).ok();
    assert_continues(&restored, before);
}

#[test]
fn ms2m_restore_from_checkpoint_ref() {
    let (c, r, before) = checkpointed_to_store("ref");
    // `ms2m restore` gives an existing container a new task: kill the old
    // task, keep the container.
    c.kill_and_delete_task();
    let out = ms2m(&["restore", &c.id, &r.name]).ok();
    eprintln!("{out}");
    assert_continues(&c, before);
}

#[test]
fn same_checkpoint_ref_restored_twice() {
    let (c, r, before) = checkpointed_to_store("twice");
    c.kill_and_delete_task();
    drop(c);

    let mut firsts = Vec::new();
    for n in 0..2 {
        let restored = Container::adopt(&ms2m_runtime_tests::unique_id(&format!("twice{n}")));
        ctr(&["containers", "restore", "--live", &restored.id, &r.name]).ok();
        firsts.push(assert_continues(&restored, before));
        // Delete before the next restore (same checkpoint, one after the other).
        drop(restored);
    }
    eprintln!("checkpointed after {before}, restored at {firsts:?}");
}

#[test]
fn same_image_dir_restored_twice() {
    let td = TestDir::new("dir-twice");
    let c = counting("dtwice", 0, 50, 30);
    let img = td.join("img");
    let before = c.counter();
    exit_checkpoint(&c, &img, None);
    ctr(&["task", "delete", &c.id]).ok();
    for _ in 0..2 {
        ms2m(&["restore", &c.id, path_str(&img)]).ok();
        assert_continues(&c, before);
        c.kill_and_delete_task();
    }
}

#[test]
fn large_256mib_checkpoint_and_restore() {
    let td = TestDir::new("ck-256");
    let c = counting("big", 256, 50, 10);
    let rss = c.rss_kib().expect("VmRSS of the workload");
    assert!(rss >= 256 * 1024, "workload RSS only {rss} KiB");
    let img = td.join("img");
    let work = td.join("work");
    let before = c.counter();
    exit_checkpoint(&c, &img, Some(&work));
    assert_criu_images(&img);
    let pages = pages_bytes(&img);
    assert!(pages >= 256 << 20, "pages images hold only {pages} bytes");
    if let Some(m) = check_manifest(&img, Some(&work), &c.id, true) {
        let written = m.stats.map(|s| s.pages_written).unwrap_or(0);
        assert!(
            written >= 65536,
            "pages_written {written} < 256 MiB of pages"
        );
    }
    restore_continues(&c, &img, before);
    // A checkpoint this large is restored lazily by default: the task runs
    // at once and CRIU's lazy-pages daemon pushes the rest of its memory in
    // the background, so the whole 256 MiB must become resident shortly.
    wait_until(
        "the restored workload's whole 256 MiB resident",
        Duration::from_secs(20),
        Duration::from_millis(50),
        || {
            let rss = c.rss_kib().expect("VmRSS of the restored workload");
            (rss >= 256 * 1024).then_some(rss)
        },
    );
}

/// A restored task is a full task: exec, ps, pause/resume, and its exit is
/// reaped and reported (the shim must be the restored process's reaper).
#[test]
fn restored_task_lifecycle() {
    let td = TestDir::new("restored-life");
    let events = ms2m_runtime_tests::Events::start();
    let c = counting("rlife", 0, 50, 10);
    let img = td.join("img");
    let before = c.counter();
    exit_checkpoint(&c, &img, None);
    restore_continues(&c, &img, before);

    let pid = c.pid();
    // The restored task's create (naming the checkpoint) and start (with
    // its pid) were published.
    let create = events.wait_for_match("/tasks/create", &c.id, T, |e| {
        e.payload.get("checkpoint").is_some()
    });
    assert_eq!(create.payload["checkpoint"], path_str(&img), "{create:?}");
    events.wait_for_match("/tasks/start", &c.id, T, |e| {
        e.payload["pid"].as_u64() == Some(u64::from(pid))
    });
    let out = ctr(&["task", "ps", &c.id]).ok();
    assert!(
        out.stdout
            .lines()
            .skip(1)
            .any(|l| l.split_whitespace().next() == Some(&pid.to_string())),
        "restored pid {pid} not in ps: {out}"
    );
    let out = c.exec(&["sh", "-c", "echo in-restored; exit 6"]);
    assert_eq!(out.code, Some(6), "{out}");
    assert_eq!(out.stdout.trim(), "in-restored", "{out}");

    ctr(&["task", "pause", &c.id]).ok();
    c.wait_status("PAUSED", T);
    ctr(&["task", "resume", &c.id]).ok();
    c.wait_status("RUNNING", T);
    let v = c.counter();
    c.wait_counter_above(v, T);

    // SIGTERM: memcounter exits 0; the exit of the restored pid is reported.
    ctr(&["task", "kill", &c.id]).ok();
    c.wait_status("STOPPED", T);
    let exit = events.wait_for_match("/tasks/exit", &c.id, T, |e| {
        e.payload["pid"].as_u64() == Some(u64::from(pid))
    });
    assert_eq!(
        exit.payload["exit_status"].as_u64().unwrap_or(0),
        0,
        "{exit:?}"
    );
}

/// checkpoint -> restore -> checkpoint -> restore: the count carries through
/// both generations.
#[test]
fn restored_task_can_be_checkpointed_again() {
    let td = TestDir::new("chain");
    let c = counting("chain", 0, 50, 10);
    let mut before = c.counter();
    for gen in 0..2 {
        let img = td.join(&format!("img{gen}"));
        let work = td.join(&format!("work{gen}"));
        c.ctr_checkpoint(&[
            "--exit",
            "--image-path",
            path_str(&img),
            "--work-path",
            path_str(&work),
        ])
        .ok();
        c.wait_status("STOPPED", T);
        check_manifest(&img, Some(&work), &c.id, true);
        ctr(&["task", "delete", &c.id]).ok();
        ms2m(&["restore", &c.id, path_str(&img)]).ok();
        let first = assert_continues(&c, before);
        before = c.wait_counter_above(first + 5, T);
    }
}

/// A corrupted checkpoint: the restore fails with a message, and leaves
/// nothing behind that stops a good restore of the same container.
#[test]
fn corrupted_checkpoint_restore_fails_cleanly() {
    let td = TestDir::new("corrupt");
    let c = counting("corrupt", 0, 50, 10);
    let img = td.join("img");
    let before = c.counter();
    exit_checkpoint(&c, &img, None);
    ctr(&["task", "delete", &c.id]).ok();

    // A copy of the images without the process tree.
    let bad = td.subdir("bad");
    for name in file_names(&img) {
        if name != "pstree.img" {
            std::fs::copy(img.join(&name), bad.join(&name))
                .unwrap_or_else(|e| panic!("copying {name}: {e}"));
        }
    }
    let out = ms2m(&["restore", &c.id, path_str(&bad)]);
    assert!(
        !out.success(),
        "restore from a broken checkpoint succeeded: {out}"
    );
    assert!(
        !out.stderr.trim().is_empty(),
        "failed without a message: {out}"
    );
    eprintln!("ms2m's error (expected): {}", out.stderr.trim());
    assert_ne!(c.status().as_deref(), Some("RUNNING"), "{out}");

    // The good checkpoint still restores into the same container.
    ms2m(&["restore", "--force", &c.id, path_str(&img)]).ok();
    assert_continues(&c, before);
}

/// `ctr c checkpoint --task --rw` and `ctr c restore --live --rw`: the
/// container's writable layer travels with the checkpoint.
#[test]
fn content_store_rw_layer_restored() {
    let c = counting("rw", 0, 50, 10);
    let r = ImageRef::unique("rw");
    c.exec(&["sh", "-c", "echo rw-marker > /root/marker"]).ok();
    let before = c.counter();
    ctr(&["containers", "checkpoint", "--task", "--rw", &c.id, &r.name]).ok();
    c.kill_and_delete_task();
    drop(c);
    let restored = Container::adopt(&ms2m_runtime_tests::unique_id("rw-r"));
    ctr(&[
        "containers",
        "restore",
        "--live",
        "--rw",
        &restored.id,
        &r.name,
    ])
    .ok();
    assert_continues(&restored, before);
    let out = restored.exec(&["cat", "/root/marker"]).ok();
    assert_eq!(out.stdout.trim(), "rw-marker", "{out}");
}

/// Content store chain: checkpoint, restore under a new id, checkpoint the
/// restored task, restore again: the count carries through.
#[test]
fn content_store_restored_task_checkpointed_again() {
    let c = counting("cschain", 0, 50, 10);
    let mut before = c.counter();
    let mut current = c;
    for gen in 0..2 {
        let r = ImageRef::unique(&format!("cschain{gen}"));
        ctr(&["containers", "checkpoint", "--task", &current.id, &r.name]).ok();
        current.kill_and_delete_task();
        drop(current);
        let next = Container::adopt(&ms2m_runtime_tests::unique_id(&format!("cschain-r{gen}")));
        ctr(&["containers", "restore", "--live", &next.id, &r.name]).ok();
        let first = assert_continues(&next, before);
        before = next.wait_counter_above(first + 5, T);
        current = next;
    }
}

/// A leave-running checkpoint of a paused task leaves it paused (the user
/// paused it), and it resumes and counts on afterwards.
#[test]
fn checkpoint_of_paused_task_keeps_it_paused() {
    let td = TestDir::new("ck-paused");
    let c = counting("paused", 0, 50, 5);
    ctr(&["task", "pause", &c.id]).ok();
    c.wait_status("PAUSED", T);
    let img = td.join("img");
    c.ctr_checkpoint(&["--image-path", path_str(&img)]).ok();
    assert_criu_images(&img);
    assert_eq!(c.status().as_deref(), Some("PAUSED"));
    if let Some(state) = c.freezer_state() {
        assert_eq!(
            state, "FROZEN",
            "a paused task was thawed by the checkpoint"
        );
    }
    let v = c.host_counter().expect("counter through /proc/PID/root");
    ctr(&["task", "resume", &c.id]).ok();
    c.wait_status("RUNNING", T);
    c.wait_counter_above(v, T);
}

/// What the container sees of its tmpfs mounts: every entry under /run,
/// /dev/shm and /dev (type, mode, owner, size or device, link target) and
/// the checksum of every regular file (busybox `find`, `stat`, `md5sum`).
fn tmpfs_listing(c: &Container) -> String {
    let script = "cd / && for d in run dev/shm dev; do \
                  find $d -xdev | sort | while read -r p; do \
                  stat -c '%n %F %a %h %u:%g %s %t,%T %N' \"$p\"; \
                  [ -f \"$p\" ] && [ -r \"$p\" ] && md5sum \"$p\"; done; done; true";
    let out = c.exec(&["sh", "-c", script]).ok();
    assert!(
        out.stdout.lines().count() > 10,
        "listing of the container's tmpfs mounts is too short: {out}"
    );
    out.stdout
}

/// The contents of the container's tmpfs mounts (archived by CRIU while it
/// is frozen; by ms2m's fast archiver when setup installed it) come back
/// exactly after an exit checkpoint and a restore: files, a 1 MiB file, a
/// symlink, a FIFO, a hard link, a setuid file owned by another user, a
/// long path, and a device node made inside the container.
#[test]
fn tmpfs_contents_survive_exit_checkpoint_and_restore() {
    let td = TestDir::new("ck-tmpfs");
    let c = counting("tmpfs", 0, 50, 5);
    let long = format!("/run/{}", ["deep-directory-name"; 8].join("/"));
    let script = format!(
        "set -e; mkdir -p /run/app/sub {long} /dev/shm/seg; echo state-1 > /run/app/state; \
         dd if=/dev/urandom of=/run/app/big bs=1024 count=1024 2>/dev/null; \
         ln -s ../app/state /run/app/sub/link; mkfifo /run/app/fifo; \
         ln /run/app/state /run/app/hard; echo x > /run/app/suid; chown 1234:4321 /run/app/suid; \
         chmod 4750 /run/app/suid; chmod 1777 /run/app/sub; echo deep > {long}/file; \
         echo shared > /dev/shm/seg/data; mknod /dev/ms2m-null c 1 3"
    );
    c.exec(&["sh", "-c", &script]).ok();
    let before = tmpfs_listing(&c);
    assert!(
        before.contains("run/app/suid") && before.contains("dev/ms2m-null"),
        "{before}"
    );

    let img = td.join("img");
    let out = ms2m(&[
        "checkpoint",
        "--exit",
        "--image-path",
        path_str(&img),
        &c.id,
    ])
    .ok();
    eprintln!("{out}");
    c.wait_status("STOPPED", T);
    if env().is_ms2m() {
        let m = Manifest::read(&img).expect("ms2m's manifest");
        let helpers = std::env::var("MS2M_CRIU_HELPERS")
            .unwrap_or_else(|_| "/usr/local/lib/ms2m/criu-helpers".into());
        if Path::new(&helpers).join("tar").exists() {
            assert!(
                m.strategy.reason.contains(&helpers),
                "the dump did not use the fast archiver in {helpers}: {}",
                m.strategy.reason
            );
        }
    }
    let out = ms2m(&["restore", &c.id, path_str(&img)]).ok();
    eprintln!("{out}");
    c.wait_status("RUNNING", T);
    let after = tmpfs_listing(&c);
    let (b, a): (Vec<_>, Vec<_>) = (before.lines().collect(), after.lines().collect());
    for (x, y) in b.iter().zip(a.iter()) {
        assert_eq!(x, y, "tmpfs entry differs after the restore");
    }
    assert_eq!(b.len(), a.len(), "before:\n{before}\nafter:\n{after}");
}
