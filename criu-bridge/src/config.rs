//! CRIU configuration files and the decisions that go into them.
//!
//! runc reads the path of a CRIU configuration file from the OCI annotation
//! `org.criu.config` and hands it to CRIU, whose values then override what
//! runc asked for over RPC. That lets ms2m tune a dump without replacing
//! runc: the shim rewrites the file before each checkpoint or restore.

use std::fmt;
use std::path::Path;

use crate::Error;

/// The OCI annotation runc reads the CRIU configuration file path from.
pub const CRIU_CONFIG_ANNOTATION: &str = "org.criu.config";

/// How CRIU keeps the network quiet while a container is frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkLock {
    /// iptables rules in the container's network namespace (CRIU's default).
    Iptables,
    /// An nftables table.
    Nftables,
    /// No lock: right when the namespace has no TCP socket to protect, and it
    /// spares the freeze the lock and unlock (external commands).
    Skip,
}

impl NetworkLock {
    /// The value CRIU's `network-lock` option takes.
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkLock::Iptables => "iptables",
            NetworkLock::Nftables => "nftables",
            NetworkLock::Skip => "skip",
        }
    }
}

impl fmt::Display for NetworkLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The contents of a CRIU configuration file: one option a line, written
/// as CRIU's long option names without the leading dashes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CriuConfig {
    lines: Vec<String>,
}

impl CriuConfig {
    /// An empty configuration (CRIU's defaults, and what runc asks for).
    pub fn new() -> Self {
        Self::default()
    }

    /// Restore TCP connections closed rather than failing on them.
    pub fn tcp_close(self, on: bool) -> Self {
        if on {
            self.option("tcp-close", None)
        } else {
            self
        }
    }

    /// Choose the network lock method.
    pub fn network_lock(self, method: NetworkLock) -> Self {
        self.option("network-lock", Some(method.as_str()))
    }

    /// Any other CRIU long option, with or without a value.
    pub fn option(mut self, name: &str, value: Option<&str>) -> Self {
        self.lines.push(match value {
            Some(v) => format!("{name} {v}"),
            None => name.to_string(),
        });
        self
    }

    /// The file's text.
    pub fn render(&self) -> String {
        let mut out = String::from("# written by ms2m before each checkpoint and restore\n");
        for l in &self.lines {
            out.push_str(l);
            out.push('\n');
        }
        out
    }

    /// Writes the file (replacing it atomically).
    pub fn write(&self, path: &Path) -> Result<(), Error> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, self.render()).map_err(|e| Error::io("write CRIU config", &tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io("write CRIU config", path, e))
    }
}

/// True when the network namespace of process `pid` has any TCP socket in
/// use (listening or connected: a connection could arrive mid-dump).
///
/// Reads the namespace's own counters (`/proc/<pid>/net/sockstat` and
/// `sockstat6`, `TCP: inuse N`), which cost nothing, rather than listing
/// `/proc/<pid>/net/tcp`: the kernel walks the whole host's TCP hash tables
/// for that listing, ~8 ms per checkpoint on this machine kind.
pub fn netns_has_tcp(pid: u32) -> std::io::Result<bool> {
    for (file, key) in [("sockstat", "TCP:"), ("sockstat6", "TCP6:")] {
        match std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) {
            Ok(text) => match tcp_inuse(&text, key) {
                Some(n) if n > 0 => return Ok(true),
                Some(_) => {}
                None => {
                    return Err(std::io::Error::other(format!(
                        "/proc/{pid}/net/{file} has no `{key} inuse N` line"
                    )))
                }
            },
            // A kernel without IPv6 has no sockstat6.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && file == "sockstat6" => {}
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// The `inuse` count of the `key` line (`TCP:` or `TCP6:`) of a sockstat
/// file.
fn tcp_inuse(text: &str, key: &str) -> Option<u64> {
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(key))?;
    let mut words = line.split_whitespace().skip(1);
    while let Some(w) = words.next() {
        if w == "inuse" {
            return words.next()?.parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_options() {
        let c = CriuConfig::new()
            .tcp_close(true)
            .network_lock(NetworkLock::Skip);
        assert_eq!(
            c.render().lines().skip(1).collect::<Vec<_>>(),
            vec!["tcp-close", "network-lock skip"]
        );
        assert_eq!(
            CriuConfig::new().tcp_close(false).render().lines().count(),
            1
        );
    }

    #[test]
    fn reads_tcp_inuse() {
        let v4 = "sockets: used 26\nTCP: inuse 6 orphan 0 tw 2 alloc 8 mem 0\nUDP: inuse 0 mem 0\n";
        assert_eq!(tcp_inuse(v4, "TCP:"), Some(6));
        let v6 = "TCP6: inuse 0\nUDP6: inuse 0\n";
        assert_eq!(tcp_inuse(v6, "TCP6:"), Some(0));
        assert_eq!(tcp_inuse("UDP: inuse 3\n", "TCP:"), None);
        assert_eq!(tcp_inuse("TCP: orphan 0\n", "TCP:"), None);
    }

    #[test]
    fn own_netns_with_a_listener_has_tcp() {
        // The test process's own namespace, with a listener of its own.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(netns_has_tcp(std::process::id()).unwrap());
        drop(l);
    }

    #[test]
    fn writes_the_file() {
        let path = std::env::temp_dir().join(format!("criu-bridge-conf-{}", std::process::id()));
        CriuConfig::new()
            .network_lock(NetworkLock::Iptables)
            .write(&path)
            .unwrap();
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .contains("network-lock iptables"));
        std::fs::remove_file(&path).unwrap();
    }
}
