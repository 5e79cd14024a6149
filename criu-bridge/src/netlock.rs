//! CRIU's network lock, left behind by a CRIU that died mid-dump.
//!
//! CRIU locks a dumped network namespace after its `network-lock`
//! notification and unlocks it after `post-dump`: an `iptables` lock is a
//! chain `CRIU` (jumped to from `INPUT` and `OUTPUT`) that drops every
//! packet without CRIU's mark, an `nftables` lock a table `inet CRIU-<run
//! id>` whose input and output chains drop by policy. A CRIU killed in
//! between (SIGKILL, a timeout) cannot unlock: the container then runs on
//! with no network at all, loopback included. [`release`] removes both
//! kinds from the namespace of a process; the caller must know no other
//! CRIU is dumping that namespace (the shim holds the container's lock).
//!
//! The iptables chain is removed with the `iptables`/`ip6tables` commands
//! (CRIU itself runs `iptables-restore`), run inside the namespace; the
//! nftables table over netlink (nfnetlink), since CRIU's libnftables
//! comes without an `nft` command on many hosts.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

/// The chain CRIU's iptables lock adds.
pub const IPTABLES_CHAIN: &str = "CRIU";
/// The prefix of the table CRIU's nftables lock adds (`inet CRIU-<id>`).
pub const NFT_TABLE_PREFIX: &str = "CRIU-";

/// Whether `pid` lives in a network namespace of its own (not this
/// process's): only then can a CRIU lock of the container's namespace be
/// told apart from the host's rules.
pub fn has_own_netns(pid: u32) -> io::Result<bool> {
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net"))?;
    let ours = std::fs::read_link("/proc/self/ns/net")?;
    Ok(theirs != ours)
}

/// Removes CRIU's network lock (both kinds) from `pid`'s network
/// namespace. Returns what was removed (empty: there was none).
pub fn release(pid: u32) -> io::Result<Vec<String>> {
    let mut removed: Vec<String> = release_iptables(pid)?
        .into_iter()
        .map(|bin| format!("{bin} chain {IPTABLES_CHAIN}"))
        .collect();
    for table in nft_lock_tables(pid)? {
        nft_delete_table(pid, NFPROTO_INET, &table)?;
        removed.push(format!("nftables table inet {table}"));
    }
    Ok(removed)
}

/// CRIU's lock tables (`inet CRIU-*`) in `pid`'s network namespace.
pub fn nft_lock_tables(pid: u32) -> io::Result<Vec<String>> {
    Ok(nft_tables(pid)?
        .into_iter()
        .filter(|(family, name)| *family == NFPROTO_INET && name.starts_with(NFT_TABLE_PREFIX))
        .map(|(_, name)| name)
        .collect())
}

/// Removes the `CRIU` chain and the jumps to it, for IPv4 and IPv6, with
/// one shell script run in `pid`'s network namespace. Its stdout says what
/// it did: the exit status of a child is not ours to read in the shim,
/// whose reaper reaps every child.
const RELEASE_IPTABLES: &str = r#"for t in iptables ip6tables; do
  command -v $t >/dev/null 2>&1 || continue
  $t -w -S CRIU >/dev/null 2>&1 || continue
  for hook in INPUT OUTPUT; do
    for i in 1 2 3 4 5 6 7 8; do $t -w -D $hook -j CRIU 2>/dev/null || break; done
  done
  if $t -w -F CRIU && $t -w -X CRIU; then echo "removed $t"; else echo "failed $t"; fi
done"#;

/// Runs [`RELEASE_IPTABLES`]; returns the tools whose chain it removed.
fn release_iptables(pid: u32) -> io::Result<Vec<String>> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    let fd = ns.as_raw_fd();
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", RELEASE_IPTABLES])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: only setns (a system call, async-signal-safe) between fork
    // and exec; `ns` outlives the spawn.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        o.read_to_string(&mut out)?;
    }
    // The shim's reaper may have reaped it already (ECHILD): stdout is
    // closed, so it has ended either way.
    let _ = child.wait();
    let mut removed = Vec::new();
    for line in out.lines() {
        match line.split_once(' ') {
            Some(("removed", t)) => removed.push(t.to_string()),
            Some(("failed", t)) => {
                return Err(io::Error::other(format!(
                    "{t} could not remove chain {IPTABLES_CHAIN} in the network namespace of {pid}"
                )))
            }
            _ => {}
        }
    }
    Ok(removed)
}

// nfnetlink, as in <linux/netfilter/nfnetlink.h> and nf_tables.h.
const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFTA_TABLE_NAME: u16 = 1;
const NFPROTO_UNSPEC: u8 = 0;
/// `inet`: the family CRIU's lock table is made in.
pub const NFPROTO_INET: u8 = 1;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;

/// A netlink socket (nfnetlink) in `pid`'s network namespace: made on a
/// thread that joined the namespace (a socket stays in the namespace it
/// was made in), so this process's own namespace is never changed.
fn nfnl_socket(pid: u32) -> io::Result<OwnedFd> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    std::thread::spawn(move || -> io::Result<OwnedFd> {
        // SAFETY: setns on this thread only (CLONE_NEWNET is per thread);
        // the thread ends right after.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: plain socket(2).
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: socket just returned it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    })
    .join()
    .map_err(|_| io::Error::other("the netlink thread panicked"))?
}

/// One nfnetlink message: header, `nfgenmsg`, attributes.
fn nl_message(
    msg_type: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    attrs: &[u8],
) -> Vec<u8> {
    let len = NLMSG_HDRLEN + NFGENMSG_LEN + attrs.len();
    let mut m = Vec::with_capacity(len);
    m.extend((len as u32).to_ne_bytes());
    m.extend(msg_type.to_ne_bytes());
    m.extend(flags.to_ne_bytes());
    m.extend(seq.to_ne_bytes());
    m.extend(0u32.to_ne_bytes());
    m.push(family);
    m.push(0); // NFNETLINK_V0
    m.extend(res_id.to_be_bytes());
    m.extend(attrs);
    m
}

/// A NUL-terminated string attribute, padded to 4 bytes.
fn nl_attr_str(kind: u16, value: &str) -> Vec<u8> {
    let len = 4 + value.len() + 1;
    let mut a = Vec::with_capacity(len.next_multiple_of(4));
    a.extend((len as u16).to_ne_bytes());
    a.extend(kind.to_ne_bytes());
    a.extend(value.as_bytes());
    a.push(0);
    a.resize(len.next_multiple_of(4), 0);
    a
}

fn send_all(sock: &OwnedFd, buf: &[u8]) -> io::Result<()> {
    // SAFETY: a zeroed sockaddr_nl is the kernel's address (pid 0).
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: `buf` and `addr` are valid for the call.
    let n = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            0,
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads netlink messages until `NLMSG_DONE` or an error/ack for `seq`;
/// calls `each` with (type, payload after the header) of the others.
fn recv_until_done(sock: &OwnedFd, mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: `buf` is valid for its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut rest = &buf[..n as usize];
        while rest.len() >= NLMSG_HDRLEN {
            let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let kind = u16::from_ne_bytes([rest[4], rest[5]]);
            if len < NLMSG_HDRLEN || len > rest.len() {
                return Err(io::Error::other("a malformed netlink message"));
            }
            let payload = &rest[NLMSG_HDRLEN..len];
            match kind as libc::c_int {
                libc::NLMSG_DONE => return Ok(()),
                libc::NLMSG_ERROR => {
                    let code = payload
                        .get(..4)
                        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                        .unwrap_or(-libc::EPROTO);
                    if code == 0 {
                        return Ok(()); // the ack
                    }
                    return Err(io::Error::from_raw_os_error(-code));
                }
                _ => each(kind, payload),
            }
            rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        }
    }
}

/// Every nftables table in `pid`'s network namespace: (family, name).
pub fn nft_tables(pid: u32) -> io::Result<Vec<(u8, String)>> {
    let sock = nfnl_socket(pid)?;
    let kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE;
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    send_all(&sock, &nl_message(kind, flags, 1, NFPROTO_UNSPEC, 0, &[]))?;
    let mut tables = Vec::new();
    recv_until_done(&sock, |t, payload| {
        if t != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE || payload.len() < NFGENMSG_LEN {
            return;
        }
        let family = payload[0];
        let mut attrs = &payload[NFGENMSG_LEN..];
        while attrs.len() >= 4 {
            let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
            let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
            if len < 4 || len > attrs.len() {
                break;
            }
            if kind == NFTA_TABLE_NAME {
                let v = &attrs[4..len];
                let v = v.split(|b| *b == 0).next().unwrap_or_default();
                tables.push((family, String::from_utf8_lossy(v).into_owned()));
            }
            attrs = &attrs[len.next_multiple_of(4).min(attrs.len())..];
        }
    })?;
    Ok(tables)
}

/// Deletes table `family name` in `pid`'s network namespace (one nftables
/// transaction: batch begin, delete, batch end).
fn nft_delete_table(pid: u32, family: u8, name: &str) -> io::Result<()> {
    let sock = nfnl_socket(pid)?;
    let req = libc::NLM_F_REQUEST as u16;
    let mut batch = nl_message(
        NFNL_MSG_BATCH_BEGIN,
        req,
        1,
        NFPROTO_UNSPEC,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    batch.extend(nl_message(
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELTABLE,
        req | libc::NLM_F_ACK as u16,
        2,
        family,
        0,
        &nl_attr_str(NFTA_TABLE_NAME, name),
    ));
    batch.extend(nl_message(
        NFNL_MSG_BATCH_END,
        req,
        3,
        NFPROTO_UNSPEC,
        NFNL_SUBSYS_NFTABLES,
        &[],
    ));
    send_all(&sock, &batch)?;
    recv_until_done(&sock, |_, _| {})
        .map_err(|e| io::Error::new(e.kind(), format!("delete nftables table {name}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_laid_out_as_the_kernel_reads_them() {
        let a = nl_attr_str(NFTA_TABLE_NAME, "CRIU-1");
        assert_eq!(a.len(), 12, "4 + 6 + NUL, padded to 12");
        assert_eq!(u16::from_ne_bytes([a[0], a[1]]), 11);
        assert_eq!(&a[4..11], b"CRIU-1\0");
        let m = nl_message(0x0a02, 5, 7, NFPROTO_INET, 10, &a);
        assert_eq!(m.len(), NLMSG_HDRLEN + NFGENMSG_LEN + 12);
        assert_eq!(
            u32::from_ne_bytes([m[0], m[1], m[2], m[3]]) as usize,
            m.len()
        );
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), 0x0a02);
        assert_eq!(m[16], NFPROTO_INET);
        assert_eq!(&m[18..20], &10u16.to_be_bytes());
    }

    /// This process's own namespace lists its tables (needs root and
    /// nf_tables; an unprivileged run gets EPERM, which is not a layout
    /// error).
    #[test]
    fn own_tables_list_or_are_refused() {
        match nft_tables(std::process::id()) {
            Ok(_) => {}
            Err(e) => assert!(
                matches!(
                    e.raw_os_error(),
                    Some(libc::EPERM) | Some(libc::EPROTONOSUPPORT)
                ),
                "{e}"
            ),
        }
    }
}
