//! A container process's stdio: the FIFOs (or `file://` paths) containerd
//! hands over, the pipes between them and the process, and the pty runc
//! sends back over `--console-socket` for terminal processes.

use std::fs::{File, OpenOptions};
use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_shim::asynchronous::io::{IoTasks, Pty};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use tokio::net::unix::pipe;

use crate::error::{Error, Result};
use crate::runc::ProcessStdio;

/// The stdio paths of a process, as containerd sent them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    /// Stdin FIFO (empty: none).
    pub stdin: String,
    /// Stdout FIFO or `file://` URL (empty: none).
    pub stdout: String,
    /// Stderr FIFO or `file://` URL (empty: none).
    pub stderr: String,
    /// The process has a terminal.
    pub terminal: bool,
}

/// Where one output stream goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    None,
    Fifo(String),
    File(PathBuf),
}

fn parse_target(s: &str) -> Result<Target> {
    if s.is_empty() {
        return Ok(Target::None);
    }
    if let Some(path) = s.strip_prefix("file://") {
        return Ok(Target::File(PathBuf::from(path)));
    }
    if let Some(scheme_end) = s.find("://") {
        return Err(Error::InvalidArgument(format!(
            "stdio {s:?}: scheme {:?} is not supported by the ms2m shim (use FIFOs or file://)",
            &s[..scheme_end]
        )));
    }
    Ok(Target::Fifo(s.to_string()))
}

/// The shim's side of a process's stdio: the copy tasks and, for a
/// terminal, the pty master.
#[derive(Clone, Default)]
pub struct ProcessIo {
    /// The copy tasks between containerd's FIFOs and the process.
    pub tasks: IoTasks,
    /// The pty master of a terminal process.
    pub console: Option<Pty>,
}

impl ProcessIo {
    /// Closes the process's stdin (containerd's `CloseIO`).
    pub fn close_stdin(&self) {
        self.tasks.close_input();
    }

    /// Waits (bounded) for output to drain, then stops all copies.
    pub async fn shutdown(&self) {
        self.tasks.shutdown().await;
    }

    /// Sets the terminal size of a terminal process.
    pub fn resize(&self, width: u32, height: u32) -> Result<()> {
        let Some(console) = &self.console else {
            return Err(Error::FailedPrecondition(
                "process has no terminal to resize".into(),
            ));
        };
        let ws = libc::winsize {
            ws_row: height.min(u16::MAX as u32) as u16,
            ws_col: width.min(u16::MAX as u32) as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a `winsize` from the pointer, which
        // points to a live, initialised value; the fd is the pty master we
        // own for the duration of the call.
        let rc = unsafe { libc::ioctl(console.as_fd().as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc < 0 {
            return Err(Error::internal(
                "resize terminal",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

/// Sets up pipes for a non-terminal process: returns the process's ends
/// (for runc) and starts copying between the pipes and containerd's FIFOs.
pub fn pipes(paths: &StdioPaths) -> Result<(ProcessStdio, ProcessIo)> {
    let io = ProcessIo::default();
    let mut child = ProcessStdio::default();
    let ctx = |what: &str, path: &str| format!("set up {what} {path}");

    if !paths.stdin.is_empty() {
        let (r, w) = std::io::pipe().map_err(|e| Error::internal("create stdin pipe", e))?;
        child.stdin = Some(OwnedFd::from(r));
        let sender = pipe::Sender::from_owned_fd(OwnedFd::from(w))
            .map_err(|e| Error::internal(ctx("stdin", &paths.stdin), e))?;
        io.tasks
            .copy_from_fifo(&paths.stdin, sender)
            .map_err(|e| Error::internal(ctx("stdin", &paths.stdin), e))?;
    }
    for (name, path, slot) in [
        ("stdout", &paths.stdout, &mut child.stdout),
        ("stderr", &paths.stderr, &mut child.stderr),
    ] {
        match parse_target(path)? {
            Target::None => {}
            Target::File(file) => {
                if let Some(dir) = file.parent() {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| Error::internal(ctx(name, path), e))?;
                }
                let f = OpenOptions::new()
                    .append(true)
                    .create(true)
                    .mode(0o640)
                    .open(&file)
                    .map_err(|e| Error::internal(ctx(name, path), e))?;
                // The process gets a pipe, not the file: CRIU cannot dump a
                // descriptor of a host file outside the container's mounts,
                // so a file given directly would make every checkpoint fail.
                let (r, w) = std::io::pipe()
                    .map_err(|e| Error::internal(format!("create {name} pipe"), e))?;
                *slot = Some(OwnedFd::from(w));
                let mut receiver = pipe::Receiver::from_owned_fd(OwnedFd::from(r))
                    .map_err(|e| Error::internal(ctx(name, path), e))?;
                let mut out = tokio::fs::File::from_std(f);
                let what = ctx(name, path);
                tokio::spawn(async move {
                    if let Err(e) = tokio::io::copy(&mut receiver, &mut out).await {
                        tracing::warn!(error = %e, "{what}: copy to the log file stopped");
                    }
                });
            }
            Target::Fifo(fifo) => {
                let (r, w) = std::io::pipe()
                    .map_err(|e| Error::internal(format!("create {name} pipe"), e))?;
                *slot = Some(OwnedFd::from(w));
                let receiver = pipe::Receiver::from_owned_fd(OwnedFd::from(r))
                    .map_err(|e| Error::internal(ctx(name, path), e))?;
                io.tasks
                    .copy_to_fifo(receiver, &fifo)
                    .map_err(|e| Error::internal(ctx(name, path), e))?;
            }
        }
    }
    Ok((child, io))
}

/// Starts copying between a terminal process's pty master and containerd's
/// FIFOs (stderr goes to the terminal too).
pub fn attach_console(paths: &StdioPaths, master: File) -> Result<ProcessIo> {
    let pty = Pty::new(master).map_err(|e| Error::internal("set up the terminal", e))?;
    let io = ProcessIo {
        tasks: IoTasks::default(),
        console: Some(pty.clone()),
    };
    if !paths.stdin.is_empty() {
        io.tasks
            .copy_from_fifo(&paths.stdin, pty.clone())
            .map_err(|e| Error::internal(format!("set up stdin {}", paths.stdin), e))?;
    }
    match parse_target(&paths.stdout)? {
        Target::None => {}
        Target::Fifo(fifo) => io
            .tasks
            .copy_to_fifo(pty, &fifo)
            .map_err(|e| Error::internal(format!("set up stdout {fifo}"), e))?,
        Target::File(_) => {
            return Err(Error::InvalidArgument(
                "a terminal process's stdout must be a FIFO".into(),
            ))
        }
    }
    Ok(io)
}

/// A listening socket runc connects to with `--console-socket` to hand
/// over the pty master of a terminal process.
pub struct ConsoleSocket {
    dir: PathBuf,
    path: PathBuf,
    listener: std::os::unix::net::UnixListener,
}

impl ConsoleSocket {
    /// A new socket in a private directory under `parent`.
    pub fn new(parent: &Path) -> Result<Self> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = parent.join(format!("pty-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::internal(format!("create {}", dir.display()), e))?;
        let path = dir.join("pty.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path)
            .map_err(|e| Error::internal(format!("listen on {}", path.display()), e))?;
        Ok(ConsoleSocket {
            dir,
            path,
            listener,
        })
    }

    /// The socket's path, for `--console-socket`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Receives the pty master runc sent. Call after the runc command that
    /// was given the socket has succeeded (runc has connected by then).
    pub async fn receive_master(&self) -> Result<File> {
        self.listener
            .set_nonblocking(true)
            .map_err(|e| Error::internal("console socket", e))?;
        let listener = tokio::net::UnixListener::from_std(
            self.listener
                .try_clone()
                .map_err(|e| Error::internal("console socket", e))?,
        )
        .map_err(|e| Error::internal("console socket", e))?;
        let (stream, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .map_err(|_| Error::Internal("runc did not connect to the console socket".into()))?
            .map_err(|e| Error::internal("accept on the console socket", e))?;
        let stream = stream
            .into_std()
            .map_err(|e| Error::internal("console socket", e))?;
        stream
            .set_nonblocking(false)
            .map_err(|e| Error::internal("console socket", e))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| Error::internal("console socket", e))?;
        let fd = recv_fd(stream.as_raw_fd())
            .map_err(|e| Error::internal("receive the pty master from runc", e))?;
        // SAFETY: `fd` was just received over SCM_RIGHTS: a new descriptor
        // that nothing else in this process owns.
        Ok(unsafe { File::from_raw_fd(fd) })
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn recv_fd(sock: RawFd) -> std::io::Result<RawFd> {
    let mut name = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut name)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(std::io::Error::from)?;
    for cmsg in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            if let Some(fd) = fds.first() {
                return Ok(*fd);
            }
        }
    }
    Err(std::io::Error::other(
        "no file descriptor in runc's message",
    ))
}

/// The directory for console sockets (socket paths must stay short).
pub fn console_socket_dir() -> PathBuf {
    std::env::temp_dir()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdio_targets() {
        assert_eq!(parse_target("").unwrap(), Target::None);
        assert_eq!(
            parse_target("/run/fifo/out").unwrap(),
            Target::Fifo("/run/fifo/out".into())
        );
        assert_eq!(
            parse_target("file:///var/log/c1.log").unwrap(),
            Target::File("/var/log/c1.log".into())
        );
        assert!(matches!(
            parse_target("binary:///usr/bin/logger"),
            Err(Error::InvalidArgument(_))
        ));
    }
}
