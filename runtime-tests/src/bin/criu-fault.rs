//! `criu-fault`: stands in for the CRIU binary in the fault tests
//! (`tests/criu_faults.rs`) and kills the real CRIU at one notification
//! stage of a real dump or restore.
//!
//! ```text
//! criu-fault --real CRIU --log FILE [--kill-at STAGE] -- CRIU-ARGS...
//! ```
//!
//! The shim's configuration names a wrapper script as its CRIU binary
//! (`exec criu-fault --real /usr/local/sbin/criu --log L --kill-at post-dump -- "$@"`);
//! the shim runs it for its own RPC dumps (`swrk FD`) and hands it to runc
//! (`runc --criu`) for `runc restore`.
//!
//! Anything but `swrk FD` is exec'd as the real CRIU unchanged (`check`,
//! `--version`, `lazy-pages`, ...). For `swrk FD` it sits between the
//! client (the shim or runc) and a real `criu swrk` on a socket pair of its
//! own, and relays every packet both ways, with the file descriptors CRIU
//! passes along (SCM_RIGHTS). It decodes each CRIU packet as a `criu_resp`
//! and logs it. The `NOTIFY` for `STAGE` goes to the client like any
//! other (the shim runs what it runs there: the quiesce at `pre-dump`, the
//! frozen window at `post-dump`), but the client's answer never reaches
//! CRIU, which waits for it at exactly that stage: the stand-in SIGKILLs
//! the real CRIU, reaps it, logs `killed criu at STAGE`, and SIGKILLs
//! itself, so the client sees a CRIU killed by signal 9 at that stage.
//!
//! CRIU opens the request's `images_dir_fd`, `work_dir_fd` and `status_fd`
//! as `/proc/<peer>/fd/<n>`, where the peer is whoever created the socket
//! pair: that is this process now, not the client, so those fds are opened
//! here (through the client's `/proc/<pid>/fd`) and the request rewritten
//! to name them.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, ExitStatus};

use criu_bridge::rpc::proto::{decode_response, encode_request, CriuReq, ReqType};
use criu_bridge::rpc::{recv_packet, Packet};
use protobuf::Message;

/// CRIU's messages are a few hundred bytes; a restore request with many
/// external mounts is a few KiB.
const MAX_PACKET: usize = 1 << 20;
/// Room for the fds of one packet (CRIU sends at most one).
const MAX_FDS: usize = 8;

struct Opts {
    real: PathBuf,
    log: PathBuf,
    kill_at: Option<String>,
    criu_args: Vec<String>,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut real = None;
    let mut log = None;
    let mut kill_at = None;
    let mut i = 0;
    while i < args.len() {
        let value = || {
            args.get(i + 1)
                .cloned()
                .ok_or_else(|| format!("{} needs a value", args[i]))
        };
        match args[i].as_str() {
            "--real" => real = Some(PathBuf::from(value()?)),
            "--log" => log = Some(PathBuf::from(value()?)),
            "--kill-at" => kill_at = Some(value()?),
            "--" => {
                return Ok(Opts {
                    real: real.ok_or("--real is required")?,
                    log: log.ok_or("--log is required")?,
                    kill_at,
                    criu_args: args[i + 1..].to_vec(),
                })
            }
            other => return Err(format!("unknown option {other:?}")),
        }
        i += 2;
    }
    Err("missing `--` before CRIU's arguments".into())
}

/// Appends one line, prefixed with this process's pid, to the log.
struct Log {
    path: PathBuf,
}

impl Log {
    fn line(&self, text: &str) {
        let pid = std::process::id();
        if let Ok(mut f) = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
        {
            // One write per line: concurrent stand-ins do not interleave.
            let _ = f.write_all(format!("{pid} {text}\n").as_bytes());
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!(
                "criu-fault: {e}\nusage: criu-fault --real CRIU --log FILE [--kill-at STAGE] -- CRIU-ARGS..."
            );
            return ExitCode::from(2);
        }
    };
    let log = Log {
        path: opts.log.clone(),
    };
    let swrk_fd = match opts.criu_args.as_slice() {
        [cmd, fd] if cmd == "swrk" => fd.parse::<RawFd>().ok(),
        _ => None,
    };
    let Some(fd) = swrk_fd else {
        log.line(&format!("exec {}", opts.criu_args.join(" ")));
        let e = Command::new(&opts.real).args(&opts.criu_args).exec();
        eprintln!("criu-fault: exec {}: {e}", opts.real.display());
        return ExitCode::from(127);
    };
    match relay(&opts, fd, &log) {
        Ok(status) => {
            log.line(&format!("criu ended: {status}"));
            exit_like(status)
        }
        Err(e) => {
            log.line(&format!("relay failed: {e}"));
            eprintln!("criu-fault: {e}");
            ExitCode::from(1)
        }
    }
}

/// Ends this process the way CRIU ended.
fn exit_like(status: ExitStatus) -> ExitCode {
    if let Some(sig) = status.signal() {
        die_by(sig);
    }
    ExitCode::from(status.code().unwrap_or(1).clamp(0, 255) as u8)
}

fn die_by(sig: libc::c_int) -> ! {
    // SAFETY: signal/raise on this process; SIG_DFL makes the signal fatal.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
        libc::_exit(128 + sig)
    }
}

fn cvt(r: libc::c_int, what: &str) -> Result<libc::c_int, String> {
    if r < 0 {
        Err(format!("{what}: {}", io::Error::last_os_error()))
    } else {
        Ok(r)
    }
}

fn relay(opts: &Opts, client_fd: RawFd, log: &Log) -> Result<ExitStatus, String> {
    // SAFETY: `swrk FD` names a socket our parent made us inherit; we own
    // it from here on.
    let client = unsafe { OwnedFd::from_raw_fd(client_fd) };
    // The real CRIU must not inherit the client's socket: the client would
    // not see it close when CRIU dies.
    // SAFETY: fcntl on an fd we own.
    cvt(
        unsafe { libc::fcntl(client_fd, libc::F_SETFD, libc::FD_CLOEXEC) },
        "fcntl",
    )?;
    let peer = peer_pid(&client)?;
    let (ours, theirs) = socketpair()?;
    let theirs_fd = theirs.as_raw_fd();
    let mut cmd = Command::new(&opts.real);
    cmd.arg("swrk").arg(theirs_fd.to_string());
    // SAFETY: only fcntl (async-signal-safe) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(theirs_fd, libc::F_SETFD, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("start {} swrk: {e}", opts.real.display()))?;
    drop(theirs);
    log.line(&format!(
        "swrk: client pid {peer}, real criu pid {}, kill at {}",
        child.id(),
        opts.kill_at.as_deref().unwrap_or("-")
    ));
    // The fds CRIU opens through /proc/<our pid>/fd: open until CRIU ends.
    let mut reopened: Vec<OwnedFd> = Vec::new();
    let mut client_open = true;
    // The stage's notification went to the client: its answer is CRIU's end.
    let mut armed: Option<String> = None;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: if client_open { client.as_raw_fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: ours.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(format!("poll: {e}"));
        }
        if fds[0].revents != 0 {
            let packet = recv(&client)?;
            if let Some(stage) = &armed {
                kill_at_stage(&mut child, stage, log);
            }
            match packet {
                None => {
                    log.line("client closed its socket");
                    client_open = false;
                    // SAFETY: shutdown on a socket we own.
                    unsafe { libc::shutdown(ours.as_raw_fd(), libc::SHUT_WR) };
                }
                Some((buf, passed)) => {
                    let buf = rewrite_request(&buf, peer, &mut reopened, log)?;
                    send_packet(&ours, &buf, &passed)?;
                }
            }
        }
        if fds[1].revents != 0 {
            let Some((buf, passed)) = recv(&ours)? else {
                log.line("criu closed its socket");
                break;
            };
            let script = match decode_response(&buf) {
                Ok(resp) if resp.type_() == ReqType::NOTIFY => {
                    let s = resp.notify.script().to_string();
                    log.line(&format!("notify {s} (fds {})", passed.len()));
                    Some(s)
                }
                Ok(resp) => {
                    log.line(&format!(
                        "answer {:?} success {}",
                        resp.type_(),
                        resp.success()
                    ));
                    None
                }
                Err(e) => {
                    log.line(&format!("undecodable packet from criu: {e}"));
                    None
                }
            };
            if script.is_some() && script == opts.kill_at {
                if !client_open {
                    kill_at_stage(&mut child, script.as_deref().unwrap_or_default(), log);
                }
                armed = script;
            }
            if client_open {
                send_packet(&client, &buf, &passed)?;
            }
        }
    }
    drop(ours);
    let status = child.wait().map_err(|e| format!("wait for criu: {e}"))?;
    drop(reopened);
    Ok(status)
}

/// CRIU waits for our answer to `stage`'s notification: kill it there, then
/// ourselves, so the client sees CRIU killed by SIGKILL.
fn kill_at_stage(child: &mut Child, stage: &str, log: &Log) -> ! {
    let pid = child.id();
    let _ = child.kill();
    let status = child.wait();
    log.line(&format!(
        "killed criu at {stage} (pid {pid}): {}",
        match status {
            Ok(s) => s.to_string(),
            Err(e) => format!("wait failed: {e}"),
        }
    ));
    die_by(libc::SIGKILL)
}

/// A request from the client, with its fds rebased onto this process: each
/// fd CRIU resolves through `/proc/<peer>/fd/<n>` is opened here and the
/// request names our copy. Other packets (answers to notifications) pass
/// unchanged.
fn rewrite_request(
    buf: &[u8],
    peer: u32,
    reopened: &mut Vec<OwnedFd>,
    log: &Log,
) -> Result<Vec<u8>, String> {
    let Ok(mut req) = CriuReq::parse_from_bytes(buf) else {
        log.line("undecodable packet from the client: passed on");
        return Ok(buf.to_vec());
    };
    if req.type_() == ReqType::NOTIFY {
        log.line(&format!("client answers success {}", req.notify_success()));
        return Ok(buf.to_vec());
    }
    log.line(&format!("request {:?}", req.type_()));
    if let Some(o) = req.opts.as_mut() {
        let mut rebase = |slot: &mut Option<i32>, what: &str| -> Result<(), String> {
            let Some(n) = slot.filter(|n| *n >= 0) else {
                return Ok(());
            };
            let path = format!("/proc/{peer}/fd/{n}");
            let c = std::ffi::CString::new(path.clone()).map_err(|e| e.to_string())?;
            // SAFETY: a valid C string; O_PATH opens nothing but a handle.
            let fd = cvt(
                unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) },
                &format!("open {what} {path}"),
            )?;
            // SAFETY: open just returned this fd to us.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            *slot = Some(owned.as_raw_fd());
            reopened.push(owned);
            Ok(())
        };
        let mut images = Some(o.images_dir_fd());
        rebase(&mut images, "images_dir_fd")?;
        o.images_dir_fd = images;
        rebase(&mut o.work_dir_fd, "work_dir_fd")?;
        rebase(&mut o.status_fd, "status_fd")?;
    }
    encode_request(&req)
}

/// The pid of whoever created the socket pair `sock` belongs to.
fn peer_pid(sock: &OwnedFd) -> Result<u32, String> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a valid ucred of `len` bytes.
    cvt(
        unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        },
        "SO_PEERCRED",
    )?;
    Ok(cred.pid as u32)
}

fn socketpair() -> Result<(OwnedFd, OwnedFd), String> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: a valid array of two c_ints for the kernel to fill.
    cvt(
        unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        },
        "socketpair",
    )?;
    // SAFETY: both fds are new and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn cmsg_space() -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) as usize }
}

/// One packet and its fds; `None` at end of stream.
fn recv(sock: &OwnedFd) -> Result<Option<Packet>, String> {
    recv_packet(sock, MAX_PACKET).map_err(|e| format!("recvmsg: {e}"))
}

/// Sends one packet with `fds` attached (SCM_RIGHTS).
fn send_packet(sock: &OwnedFd, data: &[u8], fds: &[OwnedFd]) -> Result<(), String> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut _,
        iov_len: data.len(),
    };
    let space = cmsg_space();
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: all-zero is a valid empty msghdr.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let n = fds.len().min(MAX_FDS);
        msg.msg_control = cbuf.as_mut_ptr().cast();
        // SAFETY: CMSG_* stay within cbuf, sized for MAX_FDS fds.
        unsafe {
            msg.msg_controllen = libc::CMSG_SPACE((n * std::mem::size_of::<RawFd>()) as u32) as _;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN((n * std::mem::size_of::<RawFd>()) as u32) as _;
            let data = libc::CMSG_DATA(c).cast::<RawFd>();
            for (i, fd) in fds.iter().take(n).enumerate() {
                std::ptr::write_unaligned(data.add(i), fd.as_raw_fd());
            }
        }
    }
    loop {
        // SAFETY: `msg` points at `iov` and `cbuf`, alive for the call.
        let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if r >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(format!("sendmsg: {e}"));
        }
    }
}
