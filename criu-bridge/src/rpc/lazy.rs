//! CRIU's lazy-pages daemon (`criu lazy-pages`), the other half of a lazy
//! (post-copy) restore. CRIU's RPC cannot start it, so it is a plain child
//! process.
//!
//! A lazy restore: start the daemon on the images ([`LazyPages::start`]),
//! then [`super::CriuClient::restore`] with [`super::CriuOpts::lazy_pages`]
//! set and the same work dir (the two meet on the unix socket
//! `lazy-pages.socket` in it). The restored tasks run at once; the daemon
//! fills their memory through userfaultfd on first touch and pushes the
//! rest in the background, then exits ([`LazyPages::wait`]).

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::conn::describe_status;
use super::{criu_err, CriuFailure};
use crate::Error;

/// A running `criu lazy-pages` daemon. Killed on drop if still running.
#[derive(Debug)]
pub struct LazyPages {
    child: Child,
    log_file: PathBuf,
    /// When it said it was ready, ms after it was spawned.
    pub ready_ms: f64,
}

impl LazyPages {
    /// Starts `criu lazy-pages` on `images_dir` (work dir `work_dir`, or the
    /// images dir), optionally fetching pages from a remote page server
    /// (`criu page-server --lazy-pages` at `page_server` = address, port)
    /// instead of local images, and waits until it is ready (`--status-fd`),
    /// at most `timeout`.
    pub fn start(
        binary: &Path,
        images_dir: &Path,
        work_dir: Option<&Path>,
        page_server: Option<(&str, u16)>,
        timeout: Duration,
    ) -> Result<LazyPages, Error> {
        let action = format!("start criu lazy-pages on {}", images_dir.display());
        let t0 = Instant::now();
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a valid array of two c_ints for the kernel to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
            return Err(criu_err(
                &action,
                CriuFailure::Spawn,
                format!("pipe: {}", io::Error::last_os_error()),
            ));
        }
        // SAFETY: pipe2 succeeded: both fds are open and ours alone.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let status_fd = wr.as_raw_fd();
        let work = work_dir.unwrap_or(images_dir);
        let log_file = work.join("lazy-pages.log");
        let mut cmd = Command::new(binary);
        cmd.arg("lazy-pages")
            .arg("--images-dir")
            .arg(images_dir)
            .arg("--work-dir")
            .arg(work)
            .args(["-o", "lazy-pages.log", "-v4", "--status-fd"])
            .arg(status_fd.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((addr, port)) = page_server {
            cmd.arg("--page-server")
                .arg("--address")
                .arg(addr)
                .arg("--port")
                .arg(port.to_string());
        }
        // SAFETY: runs in the forked child before exec; fcntl is
        // async-signal-safe and nothing is allocated.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(status_fd, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| {
            criu_err(
                &action,
                CriuFailure::Spawn,
                format!("start {} lazy-pages: {e}", binary.display()),
            )
        })?;
        drop(wr);
        let mut lp = LazyPages {
            child,
            log_file,
            ready_ms: 0.0,
        };
        match wait_status(&rd, t0 + timeout) {
            Ok(true) => {
                lp.ready_ms = t0.elapsed().as_secs_f64() * 1000.0;
                Ok(lp)
            }
            Ok(false) => {
                let status = lp.child.wait().map(describe_status).unwrap_or_default();
                Err(criu_err(
                    &action,
                    CriuFailure::Died,
                    format!(
                        "it exited before it was ready ({status}); log: {}",
                        lp.log_file.display()
                    ),
                ))
            }
            Err(e) => {
                let failure = if e.kind() == io::ErrorKind::TimedOut {
                    CriuFailure::TimedOut
                } else {
                    CriuFailure::Died
                };
                Err(criu_err(
                    &action,
                    failure,
                    format!("{e}; log: {}", lp.log_file.display()),
                ))
            }
        }
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The daemon's log.
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// Waits (at most `timeout`) until the daemon has served every page and
    /// exited; an error when it failed or took too long (it is then killed).
    pub fn wait(mut self, timeout: Duration) -> Result<(), Error> {
        let action = "wait for criu lazy-pages to finish";
        let limit = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) if s.success() => return Ok(()),
                Ok(Some(s)) => {
                    return Err(criu_err(
                        action,
                        CriuFailure::Refused,
                        format!("{}; log: {}", describe_status(s), self.log_file.display()),
                    ))
                }
                Ok(None) if Instant::now() < limit => std::thread::sleep(Duration::from_millis(2)),
                Ok(None) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(criu_err(
                        action,
                        CriuFailure::TimedOut,
                        format!(
                            "still serving after {timeout:?}; killed; log: {}",
                            self.log_file.display()
                        ),
                    ));
                }
                Err(e) => return Err(criu_err(action, CriuFailure::Died, e.to_string())),
            }
        }
    }
}

impl Drop for LazyPages {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits for CRIU's `\0` on the status pipe: `Ok(true)` ready, `Ok(false)`
/// the pipe closed first (CRIU died).
fn wait_status(rd: &OwnedFd, deadline: Instant) -> io::Result<bool> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "not ready before the deadline",
            ));
        }
        let mut p = libc::pollfd {
            fd: rd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().saturating_add(1).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `p` is one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            continue;
        }
        let mut b = [0u8; 1];
        let mut f = std::fs::File::from(rd.try_clone()?);
        return match f.read(&mut b) {
            Ok(1) => Ok(true),
            Ok(_) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Err(e),
        };
    }
}
