//! End-to-end checks of `ms2m-criu-tar` against the real GNU tar.
//!
//! Every test runs the binary exactly the way CRIU 4.2.1 does in
//! `tmpfs_dump` (stdin = the directory opened O_RDONLY, stdout = the image
//! file, the same argv with `--directory /proc/self/fd/0 .`), extracts the
//! result with `/usr/bin/tar` the way CRIU's restore does, and compares.
//! They need root (mknod, chown, mount) and GNU tar at /usr/bin/tar.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

const OURS: &str = env!("CARGO_BIN_EXE_ms2m-criu-tar");
const GNU_TAR: &str = "/usr/bin/tar";
const TRACE: &str = "MS2M_CRIU_TAR_TRACE";

/// The argv CRIU 4.2.1 passes (after argv[0] = "tar").
use ms2m_criu_tar::CRIU_CREATE_ARGV as CRIU_CREATE;

// ---------------------------------------------------------------------------
// Fixtures.

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ms2m-criu-tar-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn sub(&self, name: &str) -> PathBuf {
        let p = self.0.join(name);
        fs::create_dir_all(&p).expect("create sub dir");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn cstr(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("no NUL in test path")
}

/// A tmpfs mounted for the duration of a test; lazily unmounted on drop, so
/// also when the test panics. Declare it after the TempDir holding it.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path) -> Tmpfs {
        let target = cstr(at);
        // SAFETY: all pointers are valid NUL-terminated strings that outlive
        // the call; the data argument is a plain string for tmpfs.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                c"size=256m".as_ptr().cast(),
            )
        };
        assert_eq!(
            rc,
            0,
            "mount tmpfs on {}: {} (tests need root)",
            at.display(),
            std::io::Error::last_os_error()
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = cstr(&self.0);
        // SAFETY: `target` is a valid NUL-terminated path.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

fn mknod(path: &Path, kind: libc::mode_t, perm: libc::mode_t, major: u32, minor: u32) {
    let p = cstr(path);
    // SAFETY: `p` is a valid NUL-terminated path; mknod does not retain it.
    let rc = unsafe { libc::mknod(p.as_ptr(), kind | perm, libc::makedev(major, minor)) };
    assert_eq!(
        rc,
        0,
        "mknod {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

fn mkfifo(path: &Path) {
    let p = cstr(path);
    // SAFETY: `p` is a valid NUL-terminated path.
    let rc = unsafe { libc::mkfifo(p.as_ptr(), 0o640) };
    assert_eq!(
        rc,
        0,
        "mkfifo {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Set atime and mtime (with a sub-second part GNU tar drops), not following
/// symlinks.
fn set_mtime(path: &Path, secs: i64) {
    let p = cstr(path);
    let ts = libc::timespec {
        tv_sec: secs,
        tv_nsec: 123_456_789,
    };
    let times = [ts, ts];
    // SAFETY: `p` is NUL-terminated and `times` points to two timespecs.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            p.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(
        rc,
        0,
        "utimensat {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Deterministic pseudo-random bytes (poorly compressible).
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Every kind of entry the fast path handles, with the attributes that must
/// survive.
fn build_tree(root: &Path) {
    fs::write(root.join("empty"), b"").unwrap();
    fs::write(root.join("small.txt"), b"hello tmpfs\n").unwrap();
    fs::write(root.join("big.bin"), noise(1 << 20)).unwrap();
    fs::create_dir_all(root.join("a/b/c")).unwrap();
    fs::write(root.join("a/b/c/deep.txt"), b"deep").unwrap();
    fs::write(root.join("a/one"), b"1").unwrap();

    fs::create_dir(root.join("sticky")).unwrap();
    chmod(&root.join("sticky"), 0o1777);
    fs::write(root.join("sticky/inside"), b"x").unwrap();
    fs::write(root.join("suid"), b"#!/bin/true\n").unwrap();
    chmod(&root.join("suid"), 0o4755);
    fs::write(root.join("private"), b"secret").unwrap();
    chmod(&root.join("private"), 0o600);

    std::os::unix::fs::symlink("small.txt", root.join("link")).unwrap();
    std::os::unix::fs::symlink("does/not/exist", root.join("dangling")).unwrap();
    let long_target = format!("/{}/{}", "t".repeat(80), "u".repeat(70));
    std::os::unix::fs::symlink(&long_target, root.join("long-target")).unwrap();
    // A hard link to a symlink: GNU tar stores it as a hard link too.
    fs::hard_link(root.join("link"), root.join("link-hard")).unwrap();

    mkfifo(&root.join("fifo"));
    mknod(&root.join("null"), libc::S_IFCHR, 0o666, 1, 3);
    mknod(&root.join("blk"), libc::S_IFBLK, 0o660, 7, 200);

    fs::write(root.join("hard1"), b"shared inode").unwrap();
    fs::create_dir(root.join("hl")).unwrap();
    fs::hard_link(root.join("hard1"), root.join("hl/hard2")).unwrap();

    let long_dir = root.join(format!("dir-{}", "d".repeat(60)));
    fs::create_dir(&long_dir).unwrap();
    fs::write(long_dir.join(format!("file-{}", "f".repeat(60))), b"long").unwrap();

    fs::create_dir(root.join("owned")).unwrap();
    fs::write(root.join("owned/file"), b"uid 1234").unwrap();
    std::os::unix::fs::symlink("file", root.join("owned/sym")).unwrap();
    std::os::unix::fs::lchown(root.join("owned/sym"), Some(1234), Some(4321)).unwrap();
    std::os::unix::fs::chown(root.join("owned/file"), Some(1234), Some(1234)).unwrap();
    std::os::unix::fs::chown(root.join("owned"), Some(1234), Some(1234)).unwrap();
    fs::write(root.join("owned/sgid"), b"g").unwrap();
    std::os::unix::fs::chown(root.join("owned/sgid"), Some(1234), Some(1234)).unwrap();
    chmod(&root.join("owned/sgid"), 0o2750);

    fs::write(root.join("we ird\\name\n"), b"odd").unwrap();
    fs::write(root.join(OsStr::from_bytes(b"caf\xe9")), b"latin-1").unwrap();

    set_all_mtimes(root, 1_600_000_000);
}

/// Give every entry below (and including) `root` its own mtime, children
/// before parents (changing a child does not touch its parent's mtime, but
/// creating it did).
fn set_all_mtimes(root: &Path, base: i64) {
    let mut paths = Vec::new();
    collect(root, &mut paths);
    paths.sort();
    for (i, p) in paths.iter().enumerate() {
        set_mtime(p, base + 1000 * i as i64);
    }

    fn collect(p: &Path, out: &mut Vec<PathBuf>) {
        let meta = fs::symlink_metadata(p).unwrap();
        if meta.is_dir() {
            for entry in fs::read_dir(p).unwrap() {
                collect(&entry.unwrap().path(), out);
            }
        }
        out.push(p.to_path_buf());
    }
}

// ---------------------------------------------------------------------------
// Running tar.

/// Run `program` with `args` the way CRIU does: argv[0] "tar", fd 0 = `dir`
/// opened O_RDONLY|O_DIRECTORY, fd 1 = `archive`, stderr captured.
fn run_like_criu(program: &str, args: &[&str], dir: &Path, archive: &Path, trace: bool) -> Output {
    let dir_fd = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir)
        .expect("open dir");
    let out = File::create(archive).expect("create archive");
    let mut cmd = Command::new(program);
    cmd.arg0("tar")
        .args(args)
        .stdin(Stdio::from(dir_fd))
        .stdout(Stdio::from(out))
        .stderr(Stdio::piped())
        .env_remove("TAR_OPTIONS");
    if trace {
        cmd.env(TRACE, "1");
    } else {
        cmd.env_remove(TRACE);
    }
    cmd.output().expect("run tar")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Archive `dir` with our binary and with GNU tar, both the CRIU way.
/// Returns (ours, gnu) archive paths; asserts both succeeded.
fn archive_both(dir: &Path, work: &TempDir) -> (PathBuf, PathBuf, Output) {
    let ours = work.path().join("ours.tar.gz");
    let gnu = work.path().join("gnu.tar.gz");
    let out = run_like_criu(OURS, &CRIU_CREATE, dir, &ours, true);
    assert!(
        out.status.success(),
        "ours failed: {out:?}\n{}",
        stderr(&out)
    );
    let g = run_like_criu(GNU_TAR, &CRIU_CREATE, dir, &gnu, false);
    assert!(g.status.success(), "GNU tar failed: {}", stderr(&g));
    (ours, gnu, out)
}

/// Extract like CRIU's restore does (plus the owner/permission flags root
/// gets by default anyway), with `program` as the tar.
fn extract_with(program: &str, archive: &Path, into: &Path, trace: bool) -> Output {
    let mut cmd = Command::new(program);
    cmd.arg0("tar")
        .args([
            "--extract",
            "--gzip",
            "--no-unquote",
            "--no-wildcards",
            "--numeric-owner",
            "--preserve-permissions",
            "--directory",
        ])
        .arg(into)
        .stdin(File::open(archive).expect("open archive"))
        .stderr(Stdio::piped())
        .env_remove("TAR_OPTIONS");
    if trace {
        cmd.env(TRACE, "1");
    }
    cmd.output().expect("run extract")
}

fn extract(archive: &Path, into: &Path) {
    let out = extract_with(GNU_TAR, archive, into, false);
    assert!(out.status.success(), "extract failed: {}", stderr(&out));
    assert_eq!(stderr(&out), "", "GNU tar warned while extracting");
}

/// `tar --list --gzip`, sorted.
fn list(archive: &Path) -> Vec<String> {
    let out = Command::new(GNU_TAR)
        .args(["--list", "--gzip", "--file"])
        .arg(archive)
        .output()
        .expect("tar --list");
    assert!(out.status.success(), "tar --list: {}", stderr(&out));
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    names.sort();
    names
}

fn gunzip(archive: &Path) -> Vec<u8> {
    let mut data = Vec::new();
    flate2::read::GzDecoder::new(File::open(archive).expect("open archive"))
        .read_to_end(&mut data)
        .expect("valid gzip");
    data
}

/// Our uncompressed stream must equal GNU tar's byte for byte (same member
/// order, same header formatting); on mismatch name the first differing
/// header.
fn assert_same_tar_stream(ours: &Path, gnu: &Path) {
    let (a, b) = (gunzip(ours), gunzip(gnu));
    if a == b {
        return;
    }
    let block = a
        .chunks(512)
        .zip(b.chunks(512))
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()) / 512);
    let name = |d: &[u8]| {
        d.get(block * 512..block * 512 + 100)
            .map(|n| String::from_utf8_lossy(n).trim_end_matches('\0').to_owned())
    };
    panic!(
        "tar streams differ (ours {} bytes, GNU {} bytes) at block {block}: ours {:?} GNU {:?}",
        a.len(),
        b.len(),
        name(&a),
        name(&b)
    );
}

// ---------------------------------------------------------------------------
// Tree comparison.

#[derive(Debug, PartialEq)]
struct Info {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    size: Option<u64>,
    content: Option<u64>,
    target: Option<PathBuf>,
    rdev: Option<(u32, u32)>,
    /// For multiply linked non-directories: the smallest path of the inode.
    link_group: Option<PathBuf>,
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Everything below `root` keyed by relative path, not descending into
/// other file systems and leaving out sockets (tar skips both).
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Info> {
    let root_dev = fs::symlink_metadata(root).unwrap().dev();
    let mut map = BTreeMap::new();
    let mut inodes: BTreeMap<u64, PathBuf> = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    let mut raw = Vec::new();
    while let Some(rel) = stack.pop() {
        let path = root.join(&rel);
        let meta = fs::symlink_metadata(&path).unwrap();
        let ft = meta.file_type();
        if ft.is_socket() {
            continue;
        }
        if ft.is_dir() && meta.dev() == root_dev {
            for entry in fs::read_dir(&path).unwrap() {
                stack.push(rel.join(entry.unwrap().file_name()));
            }
        }
        if !ft.is_dir() && meta.nlink() > 1 {
            let first = inodes.entry(meta.ino()).or_insert_with(|| rel.clone());
            if rel < *first {
                *first = rel.clone();
            }
        }
        raw.push((rel, path, meta));
    }
    for (rel, path, meta) in raw {
        let ft = meta.file_type();
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_file() {
            "file"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_char_device() {
            "char"
        } else if ft.is_block_device() {
            "block"
        } else if ft.is_fifo() {
            "fifo"
        } else {
            "other"
        };
        let rdev = (ft.is_char_device() || ft.is_block_device())
            .then(|| (libc::major(meta.rdev()), libc::minor(meta.rdev())));
        let info = Info {
            kind,
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            mtime: meta.mtime(),
            size: ft.is_file().then(|| meta.size()),
            content: ft.is_file().then(|| fnv(&fs::read(&path).unwrap())),
            target: ft.is_symlink().then(|| fs::read_link(&path).unwrap()),
            rdev,
            link_group: (!ft.is_dir() && meta.nlink() > 1).then(|| inodes[&meta.ino()].clone()),
        };
        map.insert(rel, info);
    }
    map
}

fn assert_same_tree(src: &Path, extracted: &Path) {
    let (a, b) = (snapshot(src), snapshot(extracted));
    for (path, info) in &a {
        match b.get(path) {
            Some(got) => assert_eq!(got, info, "{} differs after extraction", path.display()),
            None => panic!("{} missing after extraction", path.display()),
        }
    }
    for path in b.keys() {
        assert!(
            a.contains_key(path),
            "{} appeared from nowhere",
            path.display()
        );
    }
}

/// The full check for a populated tree at `src`.
fn roundtrip(src: &Path, work: &TempDir) {
    let (ours, gnu, out) = archive_both(src, work);
    let err = stderr(&out);
    assert!(err.contains("ms2m-criu-tar: fast path"), "{err}");
    assert!(!err.contains("falling back"), "{err}");

    let dest = work.sub("extracted");
    extract(&ours, &dest);
    assert_same_tree(src, &dest);

    let names = list(&ours);
    assert_eq!(names, list(&gnu));
    assert!(names.contains(&"./".to_owned()), "{names:?}");
    assert!(names.contains(&"./a/b/c/deep.txt".to_owned()), "{names:?}");
    assert_same_tar_stream(&ours, &gnu);
}

// ---------------------------------------------------------------------------
// Tests.

#[test]
fn full_tree_on_disk_matches_gnu_tar() {
    let work = TempDir::new("disk");
    let src = work.sub("src");
    build_tree(&src);
    roundtrip(&src, &work);
}

#[test]
fn full_tree_on_tmpfs_matches_gnu_tar() {
    let work = TempDir::new("tmpfs");
    let src = work.sub("src");
    let _mnt = Tmpfs::mount(&src);
    build_tree(&src);
    roundtrip(&src, &work);
}

#[test]
fn empty_dir_matches_gnu_tar_and_is_quiet_without_trace() {
    let work = TempDir::new("empty");
    let src = work.sub("src");
    chmod(&src, 0o755);
    set_mtime(&src, 1_234_567_890);
    let ours = work.path().join("ours.tar.gz");
    let out = run_like_criu(OURS, &CRIU_CREATE, &src, &ours, false);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), "", "nothing on stderr without {TRACE}");
    let gnu = work.path().join("gnu.tar.gz");
    let g = run_like_criu(GNU_TAR, &CRIU_CREATE, &src, &gnu, false);
    assert!(g.status.success());
    assert_eq!(list(&ours), ["./"]);
    assert_same_tar_stream(&ours, &gnu);
    let dest = work.sub("extracted");
    extract(&ours, &dest);
    assert_same_tree(&src, &dest);
}

#[test]
fn one_file_system_keeps_submount_dir_but_not_its_contents() {
    let work = TempDir::new("xdev");
    let src = work.sub("src");
    fs::write(src.join("top"), b"top").unwrap();
    let sub = src.join("sub");
    fs::create_dir(&sub).unwrap();
    let _mnt = Tmpfs::mount(&sub);
    fs::write(sub.join("inner"), b"must not be archived").unwrap();
    fs::create_dir(sub.join("inner-dir")).unwrap();
    chmod(&sub, 0o751);
    set_all_mtimes(&src, 1_500_000_000);

    let (ours, gnu, _) = archive_both(&src, &work);
    let names = list(&ours);
    assert_eq!(names, ["./", "./sub/", "./top"]);
    assert_eq!(names, list(&gnu));
    assert_same_tar_stream(&ours, &gnu);

    let dest = work.sub("extracted");
    extract(&ours, &dest);
    assert!(dest.join("sub").is_dir());
    assert!(!dest.join("sub/inner").exists());
    // The mount point directory itself keeps the tmpfs root's attributes.
    assert_same_tree(&src, &dest);
}

#[test]
fn sparse_file_falls_back_to_gnu_tar() {
    let work = TempDir::new("sparse");
    let src = work.sub("src");
    fs::write(src.join("plain"), b"plain").unwrap();
    let mut f = File::create(src.join("holes")).unwrap();
    f.set_len(64 << 20).unwrap();
    f.seek(SeekFrom::Start(32 << 20)).unwrap();
    f.write_all(b"!").unwrap();
    drop(f);
    let meta = fs::metadata(src.join("holes")).unwrap();
    assert!(meta.blocks() * 512 < meta.size(), "test file is not sparse");

    let (ours, gnu, out) = archive_both(&src, &work);
    let err = stderr(&out);
    assert!(
        err.contains("ms2m-criu-tar: falling back to /usr/bin/tar (") && err.contains("sparse"),
        "{err}"
    );
    assert!(!err.contains("fast path"), "{err}");
    assert_eq!(list(&ours), list(&gnu));
    // It was GNU tar that wrote it: a GNU sparse member, not 64 MiB of zeros.
    assert_same_tar_stream(&ours, &gnu);
    assert!(fs::metadata(&ours).unwrap().len() < 1 << 20);

    let dest = work.sub("extracted");
    extract(&ours, &dest);
    assert_same_tree(&src, &dest);
}

#[test]
fn extract_execs_the_real_tar() {
    let work = TempDir::new("extract");
    let src = work.sub("src");
    build_tree(&src);
    let (ours, _, _) = archive_both(&src, &work);

    let dest = work.sub("extracted");
    let out = extract_with(OURS, &ours, &dest, true);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(
            "ms2m-criu-tar: falling back to /usr/bin/tar (not the CRIU tmpfs dump command)"
        ),
        "{err}"
    );
    assert_same_tree(&src, &dest);
}

#[test]
fn socket_is_skipped_with_a_warning() {
    let work = TempDir::new("socket");
    let src = work.sub("src");
    fs::write(src.join("file"), b"x").unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(src.join("sock")).unwrap();

    let (ours, gnu, out) = archive_both(&src, &work);
    let err = stderr(&out);
    assert!(err.contains("fast path"), "{err}");
    assert!(
        err.contains("ms2m-criu-tar: ./sock: socket ignored"),
        "{err}"
    );
    assert_eq!(list(&ours), ["./", "./file"]);
    assert_eq!(list(&ours), list(&gnu));
    assert_same_tar_stream(&ours, &gnu);
}

/// GNU tar with --gzip writes through gzip, so it does not recognise its
/// own output file in the tree ("file is the archive; not dumped" needs
/// --file without compression): it archives it. We do the same.
#[test]
fn archive_inside_the_tree_is_archived_like_gnu_tar_gzip_does() {
    let work = TempDir::new("self");
    let src = work.sub("src");
    fs::write(src.join("keep"), b"k").unwrap();

    let ours = src.join("ours.tar.gz");
    let out = run_like_criu(OURS, &CRIU_CREATE, &src, &ours, true);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("fast path"), "{err}");
    assert_eq!(list(&ours), ["./", "./keep", "./ours.tar.gz"]);

    let gnu = src.join("gnu.tar.gz");
    let g = run_like_criu(GNU_TAR, &CRIU_CREATE, &src, &gnu, false);
    assert!(g.status.success(), "{}", stderr(&g));
    assert_eq!(
        list(&gnu),
        ["./", "./gnu.tar.gz", "./keep", "./ours.tar.gz"]
    );
}

#[test]
fn failure_after_writing_started_exits_2_without_fallback() {
    let work = TempDir::new("wfail");
    let src = work.sub("src");
    fs::write(src.join("file"), noise(256 << 10)).unwrap();
    let dir_fd = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(&src)
        .unwrap();
    // Read-only stdout: the first write fails with EBADF.
    fs::write(work.path().join("ro"), b"").unwrap();
    let ro = File::open(work.path().join("ro")).unwrap();
    let out = Command::new(OURS)
        .arg0("tar")
        .args(CRIU_CREATE)
        .stdin(dir_fd)
        .stdout(ro)
        .env(TRACE, "1")
        .env_remove("TAR_OPTIONS")
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("fast path"), "{err}");
    assert!(err.contains("ms2m-criu-tar: writing the archive:"), "{err}");
    assert!(!err.contains("falling back"), "{err}");
}

#[test]
fn tar_options_forces_fallback() {
    let work = TempDir::new("taropts");
    let src = work.sub("src");
    fs::write(src.join("keep"), b"k").unwrap();
    fs::write(src.join("skip.log"), b"s").unwrap();
    let archive = work.path().join("a.tar.gz");
    let dir_fd = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(&src)
        .unwrap();
    let out = Command::new(OURS)
        .arg0("tar")
        .args(CRIU_CREATE)
        .stdin(dir_fd)
        .stdout(File::create(&archive).unwrap())
        .env(TRACE, "1")
        .env("TAR_OPTIONS", "--exclude=*.log")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("falling back to /usr/bin/tar (TAR_OPTIONS is set)"));
    assert_eq!(list(&archive), ["./", "./keep"]);
}

#[test]
fn real_tar_lookup_never_finds_ourselves() {
    let work = TempDir::new("path");
    // Copies of us named `tar` (each in its own directory) and a symlink
    // named `tar` pointing at the original (another directory, same
    // program), ahead of /usr/bin on PATH.
    let copy_a = work.sub("copy-a");
    let copy_b = work.sub("copy-b");
    for dir in [&copy_a, &copy_b] {
        fs::copy(OURS, dir.join("tar")).unwrap();
        chmod(&dir.join("tar"), 0o755);
    }
    let link_dir = work.sub("link");
    std::os::unix::fs::symlink(OURS, link_dir.join("tar")).unwrap();

    let cases = [
        // Our own directory is skipped.
        (copy_a.join("tar"), vec![&copy_a]),
        // A symlink to us elsewhere on PATH is skipped.
        (link_dir.join("tar"), vec![&link_dir]),
        // Two copies: a finds b, b (seeing it was exec'd by one of us) goes
        // straight to /usr/bin/tar instead of back to a.
        (copy_a.join("tar"), vec![&copy_a, &copy_b]),
    ];
    for (tar, dirs) in cases {
        let mut path: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        path.extend(["/usr/bin".into(), "/bin".into()]);
        let path = path.join(":");
        let out = Command::new(&tar)
            .arg0("tar")
            .arg("--version")
            .env("PATH", &path)
            .env(TRACE, "1")
            .env_remove("MS2M_CRIU_TAR_REEXEC")
            .output()
            .unwrap();
        let err = stderr(&out);
        assert!(out.status.success(), "{err}");
        assert!(
            String::from_utf8_lossy(&out.stdout).starts_with("tar (GNU tar)"),
            "{} via PATH={path}: {out:?}",
            tar.display()
        );
        let hops: Vec<&str> = err.lines().collect();
        assert_eq!(hops.len(), dirs.len(), "{err}");
        assert!(
            hops.last()
                .unwrap()
                .contains("falling back to /usr/bin/tar"),
            "{err}"
        );
    }
}
