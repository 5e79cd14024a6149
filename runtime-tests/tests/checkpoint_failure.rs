//! A failed checkpoint returns a clear error to ctr and leaves the task
//! running: not frozen, not dead, still counting, and checkpointable again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ms2m_runtime_tests::{mount_readonly_tmpfs, CmdOut, Container, RunOpts, TestDir};

const T: Duration = Duration::from_secs(30);

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// A running memcounter of `mib` MiB counting every 50 ms, and its counter
/// once above 3.
fn counting(prefix: &str, mib: u64) -> (Container, u64) {
    let c = Container::run(prefix, RunOpts::memcounter(mib, 50));
    c.wait_status("RUNNING", T);
    let before = c.wait_counter_above(3, T);
    (c, before)
}

/// A read-only tmpfs `<td>/ro` for the images and the (writable) work dir
/// `<td>/work`.
fn readonly_image_dir(td: &TestDir) -> (PathBuf, PathBuf) {
    let ro = td.join("ro");
    mount_readonly_tmpfs(td, &ro);
    (ro, td.join("work"))
}

/// Checks the task after a failed checkpoint, then shows that a checkpoint
/// to a good path still works.
fn assert_survived(c: &Container, td: &TestDir, out: &CmdOut, before: u64) {
    assert!(!out.success(), "checkpoint to a bad path succeeded: {out}");
    let msg = out.stderr.trim();
    assert!(!msg.is_empty(), "ctr failed without a message: {out}");
    eprintln!("ctr's error (expected): {msg}");

    assert_eq!(
        c.status().as_deref(),
        Some("RUNNING"),
        "task not RUNNING after a failed checkpoint: {out}"
    );
    if let Some(state) = c.freezer_state() {
        assert_eq!(
            state, "THAWED",
            "task left frozen after a failed checkpoint"
        );
    }
    // Still counting, from where it was (not restarted).
    let now = c.wait_counter_above(before, T);
    assert!(now > before);

    // The shim is not wedged: the next checkpoint succeeds.
    let good = td.join("good");
    c.ctr_checkpoint(&["--image-path", path_str(&good)]).ok();
    assert!(
        good.join("inventory.img").exists(),
        "no images after the retry"
    );
    assert_eq!(c.status().as_deref(), Some("RUNNING"));
    c.wait_counter_above(now, T);
}

#[test]
fn checkpoint_to_path_under_a_regular_file_fails_and_task_keeps_running() {
    let td = TestDir::new("fail-file");
    let (c, before) = counting("ffile", 0);
    let file = td.join("a-file");
    std::fs::write(&file, b"not a directory").expect("writing the blocking file");
    let bad = file.join("img");
    let out = c.ctr_checkpoint(&["--image-path", path_str(&bad)]);
    assert_survived(&c, &td, &out, before);
}

#[test]
fn checkpoint_to_readonly_tmpfs_fails_and_task_keeps_running() {
    let td = TestDir::new("fail-ro");
    let (c, before) = counting("fro", 16);
    // The image dir exists but nothing can be written into it: CRIU fails
    // after it froze the task. The work dir is writable, so logs survive.
    let (ro, work) = readonly_image_dir(&td);
    let out = c.ctr_checkpoint(&[
        "--image-path",
        path_str(&ro),
        "--work-path",
        path_str(&work),
    ]);
    assert_survived(&c, &td, &out, before);
}

#[test]
fn exit_checkpoint_failure_leaves_task_running() {
    let td = TestDir::new("fail-exit");
    let (c, before) = counting("fexit", 0);
    let (ro, work) = readonly_image_dir(&td);
    // Even with --exit, a failed dump must not kill the task.
    let out = c.ctr_checkpoint(&[
        "--exit",
        "--image-path",
        path_str(&ro),
        "--work-path",
        path_str(&work),
    ]);
    assert_survived(&c, &td, &out, before);
}
