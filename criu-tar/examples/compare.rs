//! Time `ms2m-criu-tar` against GNU tar for CRIU's tmpfs dump command.
//!
//! ```text
//! cargo build --release -p ms2m-criu-tar --bins --examples
//! target/release/examples/compare [PATH-TO-ms2m-criu-tar] [RUNS]
//! ```
//!
//! Each run is one fork+exec of the tool exactly as CRIU does it (stdin = the
//! directory, stdout = an image file, the same argv), timed from spawn to
//! exit; runs of the two tools are interleaved. Trees live on a fresh tmpfs
//! when we may mount one (root), else in the temp directory.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ms2m_criu_tar::CRIU_CREATE_ARGV as ARGS;

fn main() {
    let mut args = std::env::args().skip(1);
    let ours = args.next().map(PathBuf::from).unwrap_or_else(|| {
        let exe = std::env::current_exe().expect("current_exe");
        exe.parent()
            .and_then(Path::parent)
            .expect("target/<profile>/examples/compare")
            .join("ms2m-criu-tar")
    });
    let runs: usize = args.next().map_or(20, |r| r.parse().expect("RUNS"));
    assert!(ours.exists(), "{} not built", ours.display());

    let base = std::env::temp_dir().join(format!("ms2m-criu-tar-compare-{}", std::process::id()));
    fs::create_dir_all(&base).expect("temp dir");
    let mounted = mount_tmpfs(&base);

    let empty = base.join("empty");
    fs::create_dir(&empty).unwrap();
    let dev = base.join("dev");
    dev_like(&dev);
    let run = base.join("run");
    run_like(&run);
    let image = base.join("image.tar.gz");

    println!(
        "{runs} runs each, trees on {}; ours = {}",
        if mounted { "tmpfs" } else { "the temp dir" },
        ours.display()
    );
    println!(
        "{:<24} {:>12} {:>12} {:>8}",
        "tree", "ours median", "GNU median", "speedup"
    );
    for (name, dir) in [
        ("empty dir", &empty),
        ("/dev-like", &dev),
        ("/run-like", &run),
    ] {
        let mut a = Vec::new();
        let mut b = Vec::new();
        for _ in 0..runs {
            a.push(time(&ours, dir, &image));
            b.push(time(Path::new("/usr/bin/tar"), dir, &image));
        }
        let (ma, mb) = (median(&mut a), median(&mut b));
        println!(
            "{name:<24} {:>9.3} ms {:>9.3} ms {:>7.1}x",
            ms(ma),
            ms(mb),
            mb.as_secs_f64() / ma.as_secs_f64()
        );
    }

    if mounted {
        let target = CString::new(base.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `target` is a valid NUL-terminated path.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
    let _ = fs::remove_dir_all(&base);
}

fn time(tool: &Path, dir: &Path, image: &Path) -> Duration {
    let stdin = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir)
        .unwrap();
    let stdout = File::create(image).unwrap();
    let start = Instant::now();
    let status = Command::new(tool)
        .arg0("tar")
        .args(ARGS)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    let took = start.elapsed();
    assert!(status.success(), "{} failed", tool.display());
    took
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mount_tmpfs(at: &Path) -> bool {
    let target = CString::new(at.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: all arguments are valid NUL-terminated strings.
    unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            c"size=64m".as_ptr().cast(),
        ) == 0
    }
}

fn mknod(path: &Path, kind: libc::mode_t, major: u32, minor: u32) {
    let p = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `p` is a valid NUL-terminated path.
    let rc = unsafe { libc::mknod(p.as_ptr(), kind | 0o666, libc::makedev(major, minor)) };
    assert_eq!(rc, 0, "mknod {} (needs root)", path.display());
}

/// What runc puts in a container's /dev tmpfs.
fn dev_like(dev: &Path) {
    fs::create_dir(dev).unwrap();
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        mknod(&dev.join(name), libc::S_IFCHR, major, minor);
    }
    for d in ["pts", "shm", "mqueue"] {
        fs::create_dir(dev.join(d)).unwrap();
    }
    for (name, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("core", "/proc/kcore"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(name)).unwrap();
    }
}

/// A small /run: a few directories and small files.
fn run_like(run: &Path) {
    fs::create_dir_all(run.join("secrets/kubernetes.io/serviceaccount")).unwrap();
    fs::create_dir_all(run.join("lock")).unwrap();
    fs::write(run.join("app.pid"), b"1\n").unwrap();
    for (i, name) in ["ca.crt", "namespace", "token"].iter().enumerate() {
        let data = vec![b'a' + i as u8; 1000 * (i + 1)];
        fs::write(
            run.join("secrets/kubernetes.io/serviceaccount").join(name),
            data,
        )
        .unwrap();
    }
}
