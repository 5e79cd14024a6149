//! One `criu swrk` process and the SOCK_SEQPACKET socket to it.
//!
//! `criu swrk <fd>` serves RPC requests on the inherited socket `fd`: each
//! packet is one whole protobuf message (`criu_req` in, `criu_resp` out), and
//! a notification may carry one fd as SCM_RIGHTS. The process ends after one
//! request unless `keep_open` was asked.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::proto::{decode_response, CriuResp};

/// The largest response accepted. CRIU's answers are a few hundred bytes
/// (the longest part is `cr_errmsg`, one log line).
const MAX_MESSAGE: usize = 64 * 1024;
/// How much of CRIU's stderr is kept for error messages.
const STDERR_TAIL: usize = 4096;

/// Why talking to CRIU failed, before any answer could be read.
#[derive(Debug)]
pub(crate) enum ConnError {
    /// A socket or process call failed.
    Io(io::Error),
    /// CRIU closed the socket (it exited or crashed).
    Eof,
    /// The deadline passed.
    TimedOut,
    /// CRIU sent something that is not a `criu_resp`.
    Garbage(String),
}

/// A running `criu swrk` and our end of its socket.
pub(crate) struct Conn {
    sock: OwnedFd,
    child: Child,
    stderr: Option<JoinHandle<Vec<u8>>>,
    deadline: Option<Instant>,
    reaped: Option<ExitStatus>,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl Conn {
    /// Spawns `binary swrk <fd>`. `keep_fds` are fds of this process that
    /// CRIU must inherit under the same numbers (`inherit_fd`, page server
    /// sockets); they stay close-on-exec here. `path`, when given, is
    /// CRIU's PATH.
    pub(crate) fn spawn(
        binary: &Path,
        keep_fds: &[RawFd],
        deadline: Option<Instant>,
        path: Option<&std::ffi::OsStr>,
    ) -> io::Result<Conn> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a valid array of two c_ints for the kernel to fill.
        cvt(unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        })?;
        // SAFETY: socketpair succeeded, so both fds are open and owned by
        // nobody else.
        let (ours, theirs) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let child_fd = theirs.as_raw_fd();
        let mut inherit: Vec<RawFd> = keep_fds.to_vec();
        inherit.push(child_fd);

        let mut cmd = Command::new(binary);
        cmd.arg("swrk")
            .arg(child_fd.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(p) = path {
            cmd.env("PATH", p);
        }
        // SAFETY: the closure runs in the forked child before exec and only
        // calls fcntl, which is async-signal-safe; it allocates nothing
        // (`inherit` was built before the fork).
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &inherit {
                    // Clear FD_CLOEXEC so the fd survives the exec.
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        drop(theirs);
        let stderr = child.stderr.take().map(|mut e| {
            std::thread::spawn(move || {
                let mut tail = Vec::new();
                let mut buf = [0u8; 1024];
                loop {
                    match e.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            tail.extend_from_slice(&buf[..n]);
                            if tail.len() > STDERR_TAIL {
                                let cut = tail.len() - STDERR_TAIL;
                                tail.drain(..cut);
                            }
                        }
                    }
                }
                tail
            })
        });
        Ok(Conn {
            sock: ours,
            child,
            stderr,
            deadline,
            reaped: None,
        })
    }

    /// CRIU's pid.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends one encoded request.
    pub(crate) fn send(&mut self, buf: &[u8]) -> Result<(), ConnError> {
        loop {
            // SAFETY: `buf` is valid for `buf.len()` bytes for the call's
            // duration; the socket fd is open (owned by self).
            let n = unsafe {
                libc::send(
                    self.sock.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EPIPE) | Some(libc::ECONNRESET) => return Err(ConnError::Eof),
                _ => return Err(ConnError::Io(e)),
            }
        }
    }

    /// Waits (until the deadline) for one message; returns it and the fd
    /// that came with it, if any.
    pub(crate) fn recv(&mut self) -> Result<(CriuResp, Option<OwnedFd>), ConnError> {
        self.wait_readable()?;
        recv_resp(&self.sock)
    }

    fn wait_readable(&mut self) -> Result<(), ConnError> {
        loop {
            let timeout_ms: libc::c_int = match self.deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(ConnError::TimedOut);
                    }
                    // Round up so we never spin on a sub-millisecond rest.
                    left.as_millis().saturating_add(1).min(i32::MAX as u128) as libc::c_int
                }
            };
            let mut p = libc::pollfd {
                fd: self.sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `p` is one valid pollfd.
            let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(ConnError::Io(e));
            }
            if r > 0 {
                // POLLHUP/POLLERR: recvmsg will report EOF or the error.
                return Ok(());
            }
        }
    }

    /// Kills CRIU (SIGKILL) and reaps it.
    pub(crate) fn kill(&mut self) -> Option<ExitStatus> {
        let _ = self.child.kill();
        self.wait()
    }

    /// Waits for CRIU to exit (it does after answering its request), at most
    /// five seconds, killing it after that.
    pub(crate) fn wait(&mut self) -> Option<ExitStatus> {
        if let Some(s) = self.reaped {
            return Some(s);
        }
        let limit = Instant::now() + Duration::from_secs(5);
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) => {
                    self.reaped = Some(s);
                    return Some(s);
                }
                Ok(None) if Instant::now() < limit => {
                    std::thread::sleep(Duration::from_micros(200));
                }
                Ok(None) => {
                    let _ = self.child.kill();
                    let s = self.child.wait().ok();
                    self.reaped = s;
                    return s;
                }
                Err(_) => return None,
            }
        }
    }

    /// Waits for CRIU's exit and describes it with the tail of its stderr.
    pub(crate) fn exit_report(&mut self) -> String {
        let status = self.wait();
        let mut out = match status {
            Some(s) => describe_status(s),
            None => "criu's exit status is unknown".to_string(),
        };
        // CRIU's daemons (a page server) may inherit the pipe and keep it
        // open: give the reader a moment, never block on it.
        let until = Instant::now() + Duration::from_millis(50);
        while self.stderr.as_ref().is_some_and(|h| !h.is_finished()) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Some(h) = self.stderr.take().filter(|h| h.is_finished()) {
            if let Ok(tail) = h.join() {
                let text = String::from_utf8_lossy(&tail);
                let text = text.trim();
                if !text.is_empty() {
                    out.push_str("; stderr: ");
                    out.push_str(text);
                }
            }
        }
        out
    }
}

/// Reads one packet from `sock` (blocking) and decodes it as a
/// `criu_resp`, with the fd that came along (SCM_RIGHTS), if any.
pub(crate) fn recv_resp(sock: &OwnedFd) -> Result<(CriuResp, Option<OwnedFd>), ConnError> {
    let (buf, fds) = match recv_packet(sock, MAX_MESSAGE) {
        Ok(Some(p)) => p,
        Ok(None) => return Err(ConnError::Eof),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            return Err(ConnError::Garbage(e.to_string()))
        }
        Err(e) => return Err(ConnError::Io(e)),
    };
    let resp = decode_response(&buf).map_err(ConnError::Garbage)?;
    // Keep the first fd; extra ones (never sent by CRIU 4.2) are closed.
    Ok((resp, fds.into_iter().next()))
}

/// A packet and the fds that came with it.
pub type Packet = (Vec<u8>, Vec<OwnedFd>);

/// Reads one packet of at most `max` bytes from a SOCK_SEQPACKET socket
/// (blocking), with the fds that came along (SCM_RIGHTS, close-on-exec);
/// `Ok(None)` at end of stream (or a reset connection), an
/// `InvalidData` error for a longer packet. Public for what relays CRIU's
/// socket (the fault tests' stand-in CRIU).
pub fn recv_packet(sock: &OwnedFd, max: usize) -> io::Result<Option<Packet>> {
    let mut buf = vec![0u8; max];
    // Room for a few fds; CRIU sends at most one.
    const FDS: usize = 4;
    let space =
        // SAFETY: CMSG_SPACE only computes a size.
        unsafe { libc::CMSG_SPACE((FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let n = loop {
        // SAFETY: `msg` points at `iov` (into `buf`) and `cbuf`, both
        // alive and sized as declared for the call's duration.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::ECONNRESET) => return Ok(None),
            _ => return Err(e),
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the CMSG_* macros walk the control buffer the kernel just
    // filled, within `msg_controllen`; SCM_RIGHTS data is an array of
    // fds newly installed in this process, which we take ownership of.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    if msg.msg_flags & libc::MSG_TRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message longer than {max} bytes"),
        ));
    }
    buf.truncate(n);
    Ok(Some((buf, fds)))
}

/// "criu exited with status 1" / "criu was killed by signal 9".
pub(crate) fn describe_status(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("criu exited with status {c}"),
        (None, Some(sig)) => format!("criu was killed by signal {sig}"),
        _ => format!("criu ended: {s}"),
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.reaped.is_none() {
            // Never leave a CRIU behind (nor a zombie).
            if let Ok(None) = self.child.try_wait() {
                let _ = self.child.kill();
            }
            let _ = self.child.wait();
        }
        // The stderr reader ends by itself when the pipe closes; it is not
        // joined here (a CRIU daemon may hold the pipe open).
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::proto::{NotifyMsg, ReqType};
    use protobuf::{Message, MessageField};

    fn pair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: valid array for the kernel to fill.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0);
        // SAFETY: both fds are new and ours.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    /// Sends `data` with `fd` attached, as CRIU's send_fds does.
    fn send_with_fd(sock: &OwnedFd, data: &[u8], fd: RawFd) {
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut _,
            iov_len: data.len(),
        };
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
        let mut cbuf = vec![0u64; space.div_ceil(8)];
        // SAFETY: zeroed msghdr is a valid empty value; the pointers set
        // below stay valid for the sendmsg call; CMSG_* stay within cbuf.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd);
            assert!(libc::sendmsg(sock.as_raw_fd(), &msg, 0) >= 0);
        }
    }

    #[test]
    fn notification_with_fd_is_received() {
        let (a, b) = pair();
        let mut r = CriuResp::new();
        r.set_type(ReqType::NOTIFY);
        r.set_success(true);
        r.notify = MessageField::some(NotifyMsg {
            script: Some("orphan-pts-master".into()),
            ..Default::default()
        });
        let (p0, p1) = pair();
        send_with_fd(&b, &r.write_to_bytes().unwrap(), p1.as_raw_fd());
        drop(p1);
        let (got, fd) = recv_resp(&a).unwrap();
        assert_eq!(got, r);
        let fd = fd.expect("fd passed along");
        // the passed fd is the other end of p0: a byte goes through
        // SAFETY: valid buffers and open fds.
        unsafe {
            assert_eq!(libc::write(fd.as_raw_fd(), b"x".as_ptr().cast(), 1), 1);
            let mut c = [0u8; 1];
            assert_eq!(libc::read(p0.as_raw_fd(), c.as_mut_ptr().cast(), 1), 1);
            assert_eq!(&c, b"x");
            // close-on-exec was set on receipt
            assert_eq!(
                libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) & libc::FD_CLOEXEC,
                libc::FD_CLOEXEC
            );
        }
    }

    #[test]
    fn garbage_and_eof_are_told_apart() {
        let (a, b) = pair();
        // SAFETY: valid buffer, open fd.
        unsafe { libc::send(b.as_raw_fd(), [0xffu8, 0xff].as_ptr().cast(), 2, 0) };
        assert!(matches!(recv_resp(&a), Err(ConnError::Garbage(_))));
        drop(b);
        assert!(matches!(recv_resp(&a), Err(ConnError::Eof)));
    }
}
