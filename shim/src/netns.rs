//! Network namespace fix-ups after a restore. `runc restore` gives the
//! container an empty network namespace (runc dumps it with `empty_ns`):
//! its loopback comes back DOWN, so nothing in it can use 127.0.0.1. The
//! shim brings `lo` up, from a thread of its own that enters the
//! container's namespace.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Sets IFF_UP on `lo` in the network namespace of `pid`. Returns whether
/// it was already up.
pub fn bring_up_loopback(pid: i32) -> std::io::Result<bool> {
    let target = File::open(format!("/proc/{pid}/ns/net"))?;
    std::thread::Builder::new()
        .name("ms2m-netns".into())
        .spawn(move || in_netns(&target))
        .map_err(std::io::Error::other)?
        .join()
        .map_err(|_| std::io::Error::other("netns thread panicked"))?
}

fn cvt(r: libc::c_int) -> std::io::Result<libc::c_int> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Runs on a dedicated thread: enters `target`, sets `lo` up, goes back.
fn in_netns(target: &File) -> std::io::Result<bool> {
    let own = File::open("/proc/thread-self/ns/net")?;
    // SAFETY: setns on a namespace fd we hold open; it affects only this
    // thread, which does nothing else and is gone afterwards.
    cvt(unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) })?;
    let result = set_lo_up();
    // SAFETY: as above, back to the thread's own namespace. If that fails
    // the thread ends anyway and no other work ever runs on it.
    let back = cvt(unsafe { libc::setns(own.as_raw_fd(), libc::CLONE_NEWNET) });
    if let Err(e) = back {
        tracing::warn!("could not return to the shim's network namespace: {e}");
    }
    result
}

fn set_lo_up() -> std::io::Result<bool> {
    // SAFETY: plain socket(2) call; the fd is owned right after.
    let fd = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` was just returned by socket(2) and is ours alone.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let name: &CStr = c"lo";
    for (dst, src) in req.ifr_name.iter_mut().zip(name.to_bytes_with_nul()) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads into the ifreq we own.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
    // SAFETY: after SIOCGIFFLAGS the union holds ifru_flags.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    let up = libc::IFF_UP as libc::c_short;
    if flags & up != 0 {
        return Ok(true);
    }
    req.ifr_ifru.ifru_flags = flags | up;
    // SAFETY: SIOCSIFFLAGS reads the ifreq we own.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) })?;
    Ok(false)
}
