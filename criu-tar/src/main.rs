//! `ms2m-criu-tar`: a fast stand-in for `tar` in CRIU's tmpfs dumps.
//!
//! When CRIU dumps a container it archives every tmpfs mount of it (runc
//! containers have five: `/dev`, `/dev/shm`, `/run`, and the masked
//! `/proc/acpi` and `/sys/firmware`) by fork+exec of GNU `tar`, which itself
//! fork+execs `gzip`, while the container is frozen. That costs ~4-5 ms per
//! tmpfs, more than half of a typical freeze. ms2m installs this binary as
//! `tar` in a directory prepended to the `PATH` of the CRIU process it spawns
//! for dumps; restores keep using the system's GNU tar, so the output is a
//! gzip-compressed GNU-format tar archive that GNU tar extracts exactly like
//! its own.
//!
//! Only the one command CRIU 4.2.1 runs (`criu/filesystems.c`, `tmpfs_dump`)
//! is handled natively:
//!
//! ```text
//! tar --create --gzip --no-unquote --no-wildcards --one-file-system --check-links \
//!     --preserve-permissions --sparse --numeric-owner --directory /proc/self/fd/0 .
//! ```
//!
//! (flags in any order; `--directory DIR`, `--directory=DIR` or `-C DIR`
//! before the single member `.`; `TAR_OPTIONS` unset). Everything else —
//! other commands such as `--extract`, trees containing sparse files or
//! anything else the fast path does not reproduce exactly, and any error
//! while scanning the tree — execs the real GNU tar with the same arguments
//! before a byte has been written. The real tar is the first `tar` on `PATH`
//! that is not this program (skipping our own directory), else `/usr/bin/tar`
//! or `/bin/tar`; a copy of this program exec'd that way (it sees
//! `MS2M_CRIU_TAR_REEXEC` in its environment) only considers the latter two.
//!
//! Set `MS2M_CRIU_TAR_TRACE=1` to get one line on stderr saying whether the
//! fast path was taken or why the real tar was used instead.

use std::env;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use flate2::write::GzEncoder;
use flate2::Compression;
use ms2m_criu_tar::{archive, CRIU_CREATE_FLAGS};

const PROG: &str = "ms2m-criu-tar";
const TRACE_ENV: &str = "MS2M_CRIU_TAR_TRACE";
/// Set in the environment of the tar we exec. If it reaches us, the `tar` we
/// found on PATH was another copy of this program: go straight to the system
/// tar instead of searching PATH again (two copies could exec each other
/// forever).
const REEXEC_ENV: &str = "MS2M_CRIU_TAR_REEXEC";

fn main() -> ExitCode {
    let args: Vec<OsString> = env::args_os().collect();
    let trace = env::var_os(TRACE_ENV).is_some_and(|v| v == "1");
    let rest = args.get(1..).unwrap_or_default();

    let dir = match parse_create(rest) {
        Some(dir) if env::var_os("TAR_OPTIONS").is_none_or(|v| v.is_empty()) => dir,
        Some(_) => return exec_real_tar(&args, trace, "TAR_OPTIONS is set"),
        None => return exec_real_tar(&args, trace, "not the CRIU tmpfs dump command"),
    };
    // A duplicate of fd 1 as a plain File: no line buffering, and no unsafe.
    let out = match io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => File::from(fd),
        Err(err) => return exec_real_tar(&args, trace, &format!("standard output: {err}")),
    };
    let tree = match archive::scan(&dir) {
        Ok(tree) => tree,
        Err(err) => return exec_real_tar(&args, trace, &err.to_string()),
    };

    // Decided: from here on there is no falling back.
    if trace {
        eprintln!("{PROG}: fast path ({} members)", tree.entries.len());
    }
    for warning in &tree.warnings {
        eprintln!("{PROG}: {warning}");
    }
    match write_gzip(&tree, out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{PROG}: {err}");
            ExitCode::from(2)
        }
    }
}

/// If `args` (without argv[0]) is exactly CRIU's tmpfs dump command, the
/// directory to archive.
fn parse_create(args: &[OsString]) -> Option<PathBuf> {
    let mut seen = [false; CRIU_CREATE_FLAGS.len()];
    let mut dir: Option<&OsStr> = None;
    let mut member = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let bytes = arg.as_bytes();
        if let Some(i) = CRIU_CREATE_FLAGS.iter().position(|f| f.as_bytes() == bytes) {
            seen[i] = true;
            continue;
        }
        // `-C` is positional in GNU tar: it must come before the member.
        let value = if bytes == b"--directory" || bytes == b"-C" {
            Some(it.next()?.as_os_str())
        } else {
            bytes.strip_prefix(b"--directory=").map(OsStr::from_bytes)
        };
        if let Some(value) = value {
            if dir.is_some() || member {
                return None;
            }
            dir = Some(value);
        } else if bytes == b"." && !member && dir.is_some() {
            member = true;
        } else {
            return None;
        }
    }
    if member && seen.iter().all(|&s| s) {
        dir.map(PathBuf::from)
    } else {
        None
    }
}

/// Write the archive, gzip-compressed, to `out`.
fn write_gzip(tree: &archive::Tree, out: File) -> Result<(), Box<dyn std::error::Error>> {
    let out = BufWriter::with_capacity(64 * 1024, out);
    let mut gz = GzEncoder::new(out, Compression::fast());
    archive::write_tar(tree, &mut gz)?;
    let mut out = gz
        .finish()
        .map_err(|e| format!("writing the archive: {e}"))?;
    out.flush()
        .map_err(|e| format!("writing the archive: {e}"))?;
    Ok(())
}

/// Replace this process with the real tar, same argv. Only returns on error.
fn exec_real_tar(args: &[OsString], trace: bool, reason: &str) -> ExitCode {
    let Some(tar) = find_real_tar() else {
        eprintln!(
            "{PROG}: cannot find the real GNU tar (not on PATH outside our own directory, \
             nor /usr/bin/tar or /bin/tar); needed because: {reason}"
        );
        return ExitCode::from(2);
    };
    if trace {
        eprintln!("{PROG}: falling back to {} ({reason})", tar.display());
    }
    let arg0 = args.first().map_or(OsStr::new("tar"), OsString::as_os_str);
    let err = Command::new(&tar)
        .arg0(arg0)
        .args(args.get(1..).unwrap_or_default())
        .env(REEXEC_ENV, "1")
        .exec();
    eprintln!("{PROG}: cannot exec {}: {err}", tar.display());
    ExitCode::from(2)
}

/// The first executable `tar` on PATH that is not us (not in our directory,
/// not our inode), else the usual system locations.
fn find_real_tar() -> Option<PathBuf> {
    let exe = fs::canonicalize("/proc/self/exe").ok();
    let own_dir = exe.as_deref().and_then(Path::parent);
    let own_id = exe
        .as_deref()
        .and_then(|p| fs::metadata(p).ok())
        .map(|m| (m.dev(), m.ino()));
    let usable = |candidate: &Path| match fs::metadata(candidate) {
        Ok(m) => m.is_file() && m.mode() & 0o111 != 0 && Some((m.dev(), m.ino())) != own_id,
        Err(_) => false,
    };
    let path = env::var_os("PATH").filter(|_| env::var_os(REEXEC_ENV).is_none());
    if let Some(path) = path {
        for dir in env::split_paths(&path) {
            // An empty PATH entry means the current directory, as for execvp.
            let dir = if dir.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                dir
            };
            if fs::canonicalize(&dir).ok().as_deref() == own_dir {
                continue;
            }
            let candidate = dir.join("tar");
            if usable(&candidate) {
                return Some(candidate);
            }
        }
    }
    ["/usr/bin/tar", "/bin/tar"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| usable(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    const CRIU: [&str; 12] = ms2m_criu_tar::CRIU_CREATE_ARGV;

    fn criu() -> Vec<&'static str> {
        CRIU.to_vec()
    }

    #[test]
    fn accepts_the_criu_command() {
        assert_eq!(
            parse_create(&args(&criu())),
            Some(PathBuf::from("/proc/self/fd/0"))
        );
    }

    #[test]
    fn accepts_reordered_flags_and_directory_spellings() {
        let mut a = criu();
        a.swap(0, 8);
        a.swap(2, 5);
        assert!(parse_create(&args(&a)).is_some());

        let mut a = criu();
        a.splice(9..11, ["--directory=/x"]);
        assert_eq!(parse_create(&args(&a)), Some(PathBuf::from("/x")));

        let mut a = criu();
        a[9] = "-C";
        assert_eq!(
            parse_create(&args(&a)),
            Some(PathBuf::from("/proc/self/fd/0"))
        );

        // Flags may follow the member (GNU tar permutes options).
        let mut a = criu();
        let first = a.remove(0);
        a.push(first);
        assert!(parse_create(&args(&a)).is_some());
    }

    #[test]
    fn rejects_anything_else() {
        // A flag missing.
        assert!(parse_create(&args(&criu()[1..])).is_none());
        // An extra flag.
        let mut a = criu();
        a.insert(0, "--verbose");
        assert!(parse_create(&args(&a)).is_none());
        // Another member, or another member name.
        let mut a = criu();
        a.push(".");
        assert!(parse_create(&args(&a)).is_none());
        let mut a = criu();
        a[11] = "./";
        assert!(parse_create(&args(&a)).is_none());
        // No member.
        assert!(parse_create(&args(&criu()[..11])).is_none());
        // Member before -C (GNU tar would archive the current directory).
        let mut a = criu();
        a.swap(9, 11);
        a.swap(10, 11);
        assert_eq!(a[9], ".");
        assert!(parse_create(&args(&a)).is_none());
        // Two directories.
        let mut a = criu();
        a.splice(9..9, ["-C", "/y"]);
        assert!(parse_create(&args(&a)).is_none());
        // Dangling --directory.
        let mut a = criu();
        a.truncate(10);
        assert!(parse_create(&args(&a)).is_none());
        // Other commands.
        assert!(parse_create(&args(&["--extract", "--gzip", "-C", "/x"])).is_none());
        assert!(parse_create(&args(&[])).is_none());
    }
}
