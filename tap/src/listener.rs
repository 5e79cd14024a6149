//! Listeners inside a container's network namespace.
//!
//! A socket belongs to the network namespace it was created in, whatever
//! thread later uses it. So a short-lived thread joins the target namespace
//! with setns(CLONE_NEWNET), binds the listeners, and exits; the listeners
//! are then handed to tokio on the shim's own thread.

use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};
use tracing::info;

use crate::TapError;

/// Bind `127.0.0.1:port` and `[::1]:port` in the current namespace. The IPv6
/// listener is skipped (with a log line) when the namespace has no IPv6
/// loopback. With port 0 the IPv6 listener takes the IPv4 one's port.
pub(crate) fn bind_loopback(port: u16) -> Result<Vec<TcpListener>, TapError> {
    let v4 = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .map_err(|e| TapError::io(format!("binding 127.0.0.1:{port}"), e))?;
    let port = v4
        .local_addr()
        .map_err(|e| TapError::io("reading the listener's address", e))?
        .port();
    let mut out = vec![v4];
    match TcpListener::bind(SocketAddr::from((Ipv6Addr::LOCALHOST, port))) {
        Ok(l) => out.push(l),
        Err(e) => info!("ms2m tap: not listening on [::1]:{port} (no IPv6 loopback here?): {e}"),
    }
    Ok(out)
}

/// See [`crate::Tap::listen_in_netns`].
pub(crate) fn listen_in_netns(netns: &Path, port: u16) -> Result<Vec<TcpListener>, TapError> {
    let path: PathBuf = netns.to_path_buf();
    let file = File::open(&path)
        .map_err(|e| TapError::io(format!("opening network namespace {}", path.display()), e))?;
    let handle = std::thread::Builder::new()
        .name("ms2m-tap-netns".into())
        .spawn(move || -> Result<Vec<TcpListener>, TapError> {
            // SAFETY (not `unsafe`, but the invariant that makes this sound):
            // setns(CLONE_NEWNET) only changes the network namespace of
            // *this* thread, which exists solely to bind the listeners and
            // exits right after; no other thread of the shim (in particular
            // the tokio runtime's) ever runs in the container's namespace.
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| {
                TapError::io(
                    format!("joining network namespace {}", path.display()),
                    std::io::Error::from(e),
                )
            })?;
            bind_loopback(port).map_err(|e| match e {
                TapError::Io { what, source } => TapError::Io {
                    what: format!("{what} in network namespace {}", path.display()),
                    source,
                },
                other => other,
            })
        })
        .map_err(|e| TapError::io("spawning the netns listener thread", e))?;
    handle
        .join()
        .map_err(|_| TapError::Config("the netns listener thread panicked".into()))?
}
