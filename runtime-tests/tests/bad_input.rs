//! Bad input at the CLI and shim level (issue 9): checkpoint directories
//! whose manifest, broker cut, fence or migration ticket is malformed or
//! cut short, directories that are not checkpoints at all, and image paths
//! that are relative or climb with `..`. Every one ends in a clear error
//! naming what is wrong, nothing panics, and the containers involved keep
//! running (or, for the restore target, can still be restored from a good
//! checkpoint). No broker needed: the cut is parsed before anything talks
//! to one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ms2m_runtime_tests::{env, ms2m, CmdOut, Container, RunOpts, TestDir};

const T: Duration = Duration::from_secs(30);

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// A memcounter counting every 50 ms, once above 3.
fn counting(prefix: &str) -> (Container, u64) {
    let c = Container::run(prefix, RunOpts::memcounter(0, 50));
    c.wait_status("RUNNING", T);
    let n = c.wait_counter_above(3, T);
    (c, n)
}

/// `cp -a src dst` (the images and the manifest).
fn copy_dir(src: &Path, dst: &Path) {
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(src)
        .arg(dst)
        .output()
        .expect("cp runs");
    assert!(out.status.success(), "cp -a {}: {out:?}", src.display());
}

/// A command's failure is a clear error: non-zero, a message naming
/// `needle`, and no panic (a Rust panic prints "panicked at").
fn assert_clear_error(what: &str, out: &CmdOut, needle: &str) {
    assert!(!out.success(), "{what}: succeeded: {out}");
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(!all.contains("panicked"), "{what}: panicked: {out}");
    assert!(
        all.contains(needle),
        "{what}: the error does not say {needle:?}: {out}"
    );
    eprintln!("{what}: {}", out.stderr.trim());
}

/// One malformed variant of a good checkpoint: `edit` changes the copy.
struct Variant {
    name: &'static str,
    edit: fn(&Path),
    /// What `ms2m inspect` says (None: inspect shows it; the damage is in a
    /// part only the restore interprets).
    inspect: Option<&'static str>,
    /// What `ms2m restore` says.
    restore: &'static str,
}

fn manifest_of(dir: &Path) -> PathBuf {
    dir.join("ms2m-manifest.json")
}

fn rewrite_manifest(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = manifest_of(dir);
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&p).expect("manifest")).expect("manifest JSON");
    f(&mut v);
    std::fs::write(&p, serde_json::to_vec_pretty(&v).expect("encodes")).expect("write");
}

const VARIANTS: &[Variant] = &[
    Variant {
        name: "truncated manifest",
        edit: |d| {
            let p = manifest_of(d);
            let full = std::fs::read(&p).expect("manifest");
            std::fs::write(&p, &full[..full.len() / 2]).expect("write");
        },
        inspect: Some("not valid JSON"),
        restore: "not valid JSON",
    },
    Variant {
        name: "garbage manifest",
        edit: |d| std::fs::write(manifest_of(d), b"\x00\xffnot json at all").expect("write"),
        inspect: Some("not valid JSON"),
        restore: "not valid JSON",
    },
    Variant {
        name: "manifest of an unknown version",
        edit: |d| rewrite_manifest(d, |v| v["version"] = 99.into()),
        inspect: Some("version 99 is not supported"),
        restore: "version 99 is not supported",
    },
    Variant {
        name: "manifest of another schema",
        edit: |d| rewrite_manifest(d, |v| v["schema"] = "something.else".into()),
        inspect: Some("not an ms2m checkpoint manifest"),
        restore: "not an ms2m checkpoint manifest",
    },
    Variant {
        name: "manifest with a field of the wrong type",
        edit: |d| rewrite_manifest(d, |v| v["options"]["exit"] = "yes".into()),
        inspect: Some("invalid manifest"),
        restore: "invalid manifest",
    },
    Variant {
        name: "malformed broker cut",
        edit: |d| {
            rewrite_manifest(d, |v| {
                v["broker"] = serde_json::json!({
                    "schema": "ms2m.broker-cut/v1",
                    "upstream": "amqp://127.0.0.1:5672/%2f",
                    "queues": "not a list"
                })
            })
        },
        inspect: None,
        restore: "broker section is malformed",
    },
    Variant {
        name: "broker cut at a stream offset above 2^63-1",
        edit: |d| {
            rewrite_manifest(d, |v| {
                v["broker"] = serde_json::json!({
                    "schema": "ms2m.broker-cut/v1",
                    "upstream": "amqp://127.0.0.1:5672/%2f",
                    "captured_at": "2026-12-07T00:00:00.000Z",
                    "captured_at_unix_ms": 1796601600000u64,
                    "connections": 1,
                    "queues": [{"name": "s", "kind": "stream", "next_offset": 9223372036854775808u64,
                                "in_flight": 0, "delivered": 1, "acked": 1}],
                    "quiesce": {"complete": true, "waited_ms": 0, "timeout_ms": 2000, "unsettled": 0}
                })
            })
        },
        inspect: None,
        restore: "stream position 9223372036854775808 is above",
    },
    Variant {
        name: "fence without a broker cut",
        edit: |d| std::fs::write(d.join("ms2m-fence.json"), b"{\"schema\":").expect("write"),
        inspect: Some("is not JSON"),
        restore: "no broker cut",
    },
    Variant {
        name: "malformed migration ticket",
        edit: |d| std::fs::write(d.join("ms2m-migration.json"), b"[1,2").expect("write"),
        inspect: None,
        restore: "migration ticket",
    },
    Variant {
        name: "images without their inventory",
        edit: |d| std::fs::remove_file(d.join("inventory.img")).expect("rm inventory"),
        inspect: Some("no inventory.img"),
        restore: "no inventory.img",
    },
    Variant {
        name: "not a checkpoint (an empty directory)",
        edit: |d| {
            for e in std::fs::read_dir(d).expect("dir").flatten() {
                std::fs::remove_file(e.path()).expect("rm");
            }
        },
        inspect: Some("is not a checkpoint"),
        restore: "no inventory.img",
    },
];

/// Malformed and truncated manifests, broker cuts, fences and tickets, and
/// directories that are not (whole) checkpoints: `ms2m inspect` and `ms2m
/// restore` refuse each with an error naming the problem; the restore
/// target is left without a running task, the source of the checkpoint
/// counts on, and a good checkpoint still restores afterwards.
#[test]
fn malformed_checkpoints_are_refused_by_inspect_and_restore() {
    env();
    let td = TestDir::new("bad-ck");
    let (src, _) = counting("bad-src");
    let good = td.join("good");
    ms2m(&["checkpoint", "--image-path", path_str(&good), &src.id]).ok();
    assert!(
        manifest_of(&good).exists(),
        "no manifest in the good checkpoint"
    );

    // The restore target: a container whose task was exit-checkpointed, so
    // it has no running task.
    let (dst, _) = counting("bad-dst");
    let dst_img = td.join("dst");
    ms2m(&[
        "checkpoint",
        "--exit",
        "--image-path",
        path_str(&dst_img),
        &dst.id,
    ])
    .ok();

    for v in VARIANTS {
        let dir = td.join(&v.name.replace(' ', "-").replace(['(', ')'], ""));
        copy_dir(&good, &dir);
        (v.edit)(&dir);
        let out = ms2m(&["inspect", path_str(&dir)]);
        match v.inspect {
            Some(needle) => assert_clear_error(&format!("inspect, {}", v.name), &out, needle),
            None => assert!(
                out.success() && !out.stderr.contains("panicked"),
                "inspect, {}: {out}",
                v.name
            ),
        }
        let out = ms2m(&["restore", "--force", &dst.id, path_str(&dir)]);
        assert_clear_error(&format!("restore, {}", v.name), &out, v.restore);
        assert_ne!(
            dst.status().as_deref(),
            Some("RUNNING"),
            "restore, {}: a task runs from a bad checkpoint",
            v.name
        );
        assert_eq!(src.status().as_deref(), Some("RUNNING"), "{}", v.name);
    }
    let n = src.counter();
    src.wait_counter_above(n, T);

    // Nothing left behind stops a good restore of the same container.
    ms2m(&["restore", "--force", &dst.id, path_str(&dst_img)]).ok();
    dst.wait_status("RUNNING", T);
    let n = dst.counter();
    dst.wait_counter_above(n, T);
}

/// A relative `--image-path` given to `ctr task checkpoint` (ctr passes it
/// as it is) would land in the shim's working directory, the bundle inside
/// containerd's state; a path with `..` hides where the images go. The shim
/// refuses both, before anything is frozen; the container counts on.
#[test]
fn relative_and_climbing_image_paths_are_refused() {
    env();
    if !env().is_ms2m() {
        return;
    }
    let td = TestDir::new("bad-path");
    let (c, before) = counting("bad-path");
    // `<td>/a/../escaped` would be `<td>/escaped`.
    let climbing = format!("{}/a/../escaped", td.path.display());
    let img = td.join("img");
    for (what, args) in [
        ("relative image path", vec!["--image-path", "relative-ck"]),
        (
            "climbing image path",
            vec!["--image-path", climbing.as_str()],
        ),
        (
            "relative work path",
            vec![
                "--image-path",
                path_str(&img),
                "--work-path",
                "relative-work",
            ],
        ),
    ] {
        let out = c.ctr_checkpoint(&args);
        assert_clear_error(what, &out, "must be an absolute path without `..`");
    }
    let bundle = format!(
        "/run/ms2m/containerd/io.containerd.runtime.v2.task/{}/{}",
        env().namespace,
        c.id
    );
    for leftover in ["relative-ck", "relative-work"] {
        assert!(
            !Path::new(&bundle).join(leftover).exists(),
            "a directory was made in the bundle: {bundle}/{leftover}"
        );
    }
    assert!(
        !td.join("escaped").exists(),
        "the climbing path was followed"
    );
    assert_eq!(c.status().as_deref(), Some("RUNNING"));
    c.wait_counter_above(before, T);
    assert!(
        !img.exists(),
        "the image directory was made for a bad work path"
    );
}
