//! Facts about the installed CRIU binary.

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use crate::Error;

/// CRIU's version (`4.2.1`), from `<binary> --version`. Cached per binary:
/// the shim asks on every checkpoint, CRIU does not change under it.
pub fn criu_version(binary: &str) -> Result<String, Error> {
    static CACHE: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(v) = cache.lock().ok().and_then(|c| c.get(binary).cloned()) {
        return Ok(v);
    }
    let command = format!("{binary} --version");
    let out = Command::new(binary)
        .arg("--version")
        .output()
        .map_err(|e| Error::Command {
            command: command.clone(),
            reason: e.to_string(),
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = parse_version(&text).ok_or_else(|| Error::Command {
        command,
        reason: format!("no version in its output: {:?}", text.trim()),
    })?;
    if let Ok(mut c) = cache.lock() {
        c.insert(binary.to_string(), version.clone());
    }
    Ok(version)
}

/// Finds `Version: X` in `criu --version` output.
fn parse_version(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_criu_version_output() {
        assert_eq!(
            parse_version("Version: 4.2.1\nGitID: v4.2.1\n").as_deref(),
            Some("4.2.1")
        );
        assert_eq!(parse_version("criu: unknown\n"), None);
    }

    #[test]
    fn missing_binary_is_a_clear_error() {
        let err = criu_version("/nonexistent/criu").unwrap_err().to_string();
        assert!(err.contains("/nonexistent/criu --version"), "{err}");
    }
}
