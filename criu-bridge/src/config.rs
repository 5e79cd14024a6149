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

/// True when the network namespace of process `pid` has any TCP socket, in
/// any state (listening ones too: a connection could arrive mid-dump).
pub fn netns_has_tcp(pid: u32) -> std::io::Result<bool> {
    for table in ["tcp", "tcp6"] {
        match std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) {
            Ok(text) if count_sockets(&text) > 0 => return Ok(true),
            Ok(_) => {}
            // A kernel without IPv6 has no tcp6 table.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && table == "tcp6" => {}
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// Sockets listed in a /proc/net/tcp table (every line after the header).
fn count_sockets(table: &str) -> usize {
    table
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .count()
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
    fn counts_tcp_sockets() {
        let header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";
        assert_eq!(count_sockets(header), 0);
        let one = format!("{header}   0: 0100007F:1628 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1 0 100 0 0 10 0\n");
        assert_eq!(count_sockets(&one), 1);
    }

    #[test]
    fn own_netns_is_readable() {
        // The test process's own namespace: the call must succeed either way.
        netns_has_tcp(std::process::id()).unwrap();
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
