//! The shim's configuration: a TOML file, named by the container's runtime
//! options (`runtimeoptions.v1.Options{config_path}`: CRI's options for
//! non-runc runtimes, `ctr run --runtime-config-path FILE`), else
//! `/etc/ms2m/shim.toml` when it exists, else the defaults. A bad file is a
//! clear error at create. Per-container annotations override some settings
//! at checkpoint and restore time (see [`Overrides`]).
//!
//! ```toml
//! [checkpoint]
//! strategy = "auto"            # auto | direct | runc | pre-copy
//! network_lock = "auto"        # auto | iptables | nftables | skip
//! cgroups = "ignore"           # ignore | soft
//! frozen_hook_timeout_ms = 2000
//!
//! [restore]
//! lazy_pages = "auto"          # auto | always | never
//! lazy_min_rss_mib = 128
//!
//! [criu]
//! binary = "/usr/local/sbin/criu"
//! log_level = 2                # 0-4: CRIU's dump.log detail (4 = timestamps of every step)
//! helper_dir = "/usr/local/lib/ms2m/criu-helpers"   # put first on CRIU's PATH for dumps ("" = off)
//!
//! [tap]                         # the AMQP tap (docs/broker.md)
//! upstream = "amqp://guest:guest@127.0.0.1:5672/%2f"   # used by annotation value `default`
//! listen_port = 5672
//! quiesce_timeout_ms = 2000
//! max_frame = 1048576
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_shim_protos::protobuf::well_known_types::any::Any;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::options::config_path_of;

/// The configuration file read when the runtime options name none.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/ms2m/shim.toml";

/// Manifest key: the configuration file a checkpoint was taken with
/// (`{"path": FILE}`), absent when the shim ran on the defaults.
pub const MANIFEST_CONFIG_KEY: &str = "shim_config";

/// The configuration file recorded in the manifest in `dir`, if there is
/// one and it exists on this host. Anything unreadable counts as none: the
/// restore reads and checks the manifest itself and says what is wrong.
fn recorded_config(dir: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(dir.join(criu_bridge::manifest::MANIFEST_FILE)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let path = PathBuf::from(v.get(MANIFEST_CONFIG_KEY)?.get("path")?.as_str()?);
    if !path.is_file() {
        tracing::warn!(
            config = %path.display(),
            "the checkpoint was taken with a shim configuration this host does not have; using the default"
        );
        return None;
    }
    Some(path)
}

/// Annotation: the checkpoint strategy of this container.
pub const STRATEGY_ANNOTATION: &str = "io.ms2m.checkpoint.strategy";
/// Annotation: lazy pages on restore of this container.
pub const LAZY_PAGES_ANNOTATION: &str = "io.ms2m.restore.lazy-pages";
/// Annotation: a command run while the container is frozen.
pub const FROZEN_HOOK_ANNOTATION: &str = "io.ms2m.checkpoint.frozen-hook";
/// Annotation: run the AMQP tap, forwarding to this broker (`amqp://...`,
/// or `default` for the shim configuration's `[tap] upstream`).
pub const TAP_UPSTREAM_ANNOTATION: &str = "io.ms2m.tap.upstream";
/// Annotation: the tap's port inside the container (default `[tap] listen_port`).
pub const TAP_PORT_ANNOTATION: &str = "io.ms2m.tap.port";
/// Annotation: the tap's quiesce bound, ms (default `[tap] quiesce_timeout_ms`).
pub const TAP_QUIESCE_ANNOTATION: &str = "io.ms2m.tap.quiesce-timeout-ms";

/// How to checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyChoice {
    /// Let the policy choose from the detected features.
    #[default]
    Auto,
    /// CRIU's RPC driven by the shim (shortest freeze, frozen-window hook).
    Direct,
    /// `runc checkpoint` (containerd's runc shims' path).
    Runc,
    /// Iterative pre-copy where the kernel tracks dirty memory (falls back
    /// to a direct dump where it does not).
    PreCopy,
}

impl StrategyChoice {
    /// The name users write.
    pub fn as_str(self) -> &'static str {
        match self {
            StrategyChoice::Auto => "auto",
            StrategyChoice::Direct => "direct",
            StrategyChoice::Runc => "runc",
            StrategyChoice::PreCopy => "pre-copy",
        }
    }

    /// Parses a user value (any case).
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(StrategyChoice::Auto),
            "direct" | "dump" => Ok(StrategyChoice::Direct),
            "runc" => Ok(StrategyChoice::Runc),
            "pre-copy" | "precopy" => Ok(StrategyChoice::PreCopy),
            _ => Err(format!(
                "unknown checkpoint strategy {s:?}: expected auto, direct, runc or pre-copy"
            )),
        }
    }
}

/// The network lock during a dump.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LockChoice {
    /// None when the container has no TCP socket, else the best method here.
    #[default]
    Auto,
    /// iptables rules.
    Iptables,
    /// An nftables table.
    Nftables,
    /// Never lock.
    Skip,
}

/// CRIU's cgroup handling in a direct dump.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CgroupsChoice {
    /// Record the paths only: `runc restore` recreates the cgroups.
    #[default]
    Ignore,
    /// As runc: CRIU dumps the cgroup properties.
    Soft,
}

/// Lazy pages on restore.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LazyChoice {
    /// When the checkpoint is large enough and userfaultfd works.
    #[default]
    Auto,
    /// Always (fails when lazy pages cannot work here).
    Always,
    /// Never.
    Never,
}

impl LazyChoice {
    /// Parses a user value (any case).
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(LazyChoice::Auto),
            "always" | "true" | "on" | "yes" => Ok(LazyChoice::Always),
            "never" | "false" | "off" | "no" => Ok(LazyChoice::Never),
            _ => Err(format!(
                "unknown lazy-pages setting {s:?}: expected auto, always or never"
            )),
        }
    }
}

/// `[checkpoint]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Strategy.
    pub strategy: StrategyChoice,
    /// Network lock.
    pub network_lock: LockChoice,
    /// Cgroup handling (direct dumps).
    pub cgroups: CgroupsChoice,
    /// Bound on the frozen-window hook, ms.
    pub frozen_hook_timeout_ms: u64,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            strategy: StrategyChoice::Auto,
            network_lock: LockChoice::Auto,
            cgroups: CgroupsChoice::Ignore,
            frozen_hook_timeout_ms: 2000,
        }
    }
}

/// `[restore]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RestoreConfig {
    /// Lazy pages.
    pub lazy_pages: LazyChoice,
    /// Lazy pages (auto) from this checkpoint size, MiB.
    pub lazy_min_rss_mib: u64,
}

impl Default for RestoreConfig {
    fn default() -> Self {
        RestoreConfig {
            lazy_pages: LazyChoice::Auto,
            lazy_min_rss_mib: 128,
        }
    }
}

/// `[criu]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CriuConfigSection {
    /// The CRIU binary (a path, or a name looked up on PATH).
    pub binary: PathBuf,
    /// CRIU's log level for the shim's dumps (0-4; `dump.log` beside the
    /// images). 4 records every step with its timestamp, for finding where
    /// a freeze goes; it costs a little time inside the freeze.
    pub log_level: i32,
    /// A directory put first on the PATH of the CRIU the shim runs for
    /// dumps, when it holds an executable `tar`: `hack/setup.sh` installs
    /// ms2m's fast tmpfs archiver (`ms2m-criu-tar`) there under that name,
    /// which takes the archiving of the container's tmpfs mounts, done
    /// while it is frozen, from ~4-5 ms to well under 1 ms per mount.
    /// Empty: CRIU uses the system's tar.
    pub helper_dir: PathBuf,
}

/// Where `hack/setup.sh` installs CRIU's helpers (see
/// [`CriuConfigSection::helper_dir`]).
pub const DEFAULT_CRIU_HELPER_DIR: &str = "/usr/local/lib/ms2m/criu-helpers";

impl Default for CriuConfigSection {
    fn default() -> Self {
        CriuConfigSection {
            binary: PathBuf::from("criu"),
            log_level: 2,
            helper_dir: PathBuf::from(DEFAULT_CRIU_HELPER_DIR),
        }
    }
}

/// `[tap]`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TapSection {
    /// The broker for containers whose annotation says `default`
    /// (may hold credentials: never logged).
    pub upstream: Option<String>,
    /// Port of the tap inside the container.
    pub listen_port: u16,
    /// Bound on the quiesce before a checkpoint, ms.
    pub quiesce_timeout_ms: u64,
    /// Absolute cap on AMQP frame size, bytes.
    pub max_frame: u32,
}

impl Default for TapSection {
    fn default() -> Self {
        TapSection {
            upstream: None,
            listen_port: ms2m_tap::DEFAULT_PORT,
            quiesce_timeout_ms: 2000,
            max_frame: ms2m_tap::DEFAULT_MAX_FRAME,
        }
    }
}

impl std::fmt::Debug for TapSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TapSection")
            .field("upstream", &self.upstream.as_ref().map(|_| "<redacted>"))
            .field("listen_port", &self.listen_port)
            .field("quiesce_timeout_ms", &self.quiesce_timeout_ms)
            .field("max_frame", &self.max_frame)
            .finish()
    }
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShimConfig {
    /// `[checkpoint]`.
    pub checkpoint: CheckpointConfig,
    /// `[restore]`.
    pub restore: RestoreConfig,
    /// `[criu]`.
    pub criu: CriuConfigSection,
    /// `[tap]`.
    pub tap: TapSection,
    /// Where it was read from (`None`: defaults).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

impl ShimConfig {
    /// Parses a configuration file's text.
    pub fn parse(text: &str, source: &Path) -> Result<ShimConfig> {
        let mut c: ShimConfig = toml::from_str(text).map_err(|e| {
            Error::InvalidArgument(format!(
                "ms2m shim configuration {}: {}",
                source.display(),
                e.to_string().trim()
            ))
        })?;
        if c.checkpoint.frozen_hook_timeout_ms == 0 {
            return Err(Error::InvalidArgument(format!(
                "ms2m shim configuration {}: checkpoint.frozen_hook_timeout_ms must be > 0",
                source.display()
            )));
        }
        if !(0..=4).contains(&c.criu.log_level) {
            return Err(Error::InvalidArgument(format!(
                "ms2m shim configuration {}: criu.log_level must be 0-4, not {}",
                source.display(),
                c.criu.log_level
            )));
        }
        if c.tap.max_frame < 4096 {
            return Err(Error::InvalidArgument(format!(
                "ms2m shim configuration {}: tap.max_frame must be >= 4096 (AMQP's minimum frame size)",
                source.display()
            )));
        }
        if let Some(u) = &c.tap.upstream {
            ms2m_tap::Upstream::parse(u).map_err(|e| {
                Error::InvalidArgument(format!(
                    "ms2m shim configuration {}: tap.upstream: {e}",
                    source.display()
                ))
            })?;
        }
        c.source = Some(source.to_path_buf());
        Ok(c)
    }

    /// Reads `path`.
    pub fn read(path: &Path) -> Result<ShimConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::InvalidArgument(format!(
                "ms2m shim configuration {}: cannot read it: {e}",
                path.display()
            ))
        })?;
        Self::parse(&text, path)
    }

    /// The configuration for a container created with runtime options
    /// `options`: the file they name, else [`DEFAULT_CONFIG_FILE`] if it
    /// exists, else the defaults.
    pub fn for_options(options: Option<&Any>) -> Result<ShimConfig> {
        if let Some(path) = config_path_of(options)? {
            return Self::read(&path);
        }
        let default = Path::new(DEFAULT_CONFIG_FILE);
        if default.exists() {
            return Self::read(default);
        }
        Ok(ShimConfig::default())
    }

    /// The configuration for a task create: as [`Self::for_options`], except
    /// when the options name no file and the task is restored from the
    /// checkpoint directory `checkpoint`: then the file the checkpoint was
    /// taken with (its manifest's [`MANIFEST_CONFIG_KEY`]), when this host
    /// has it. `ms2m restore` names the images in runc options, which have
    /// no place for the container's own `config_path`; without this, a
    /// container created with `--runtime-config-path` would be restored
    /// with the default configuration.
    pub fn for_create(options: Option<&Any>, checkpoint: Option<&Path>) -> Result<ShimConfig> {
        if config_path_of(options)?.is_none() {
            if let Some(path) = checkpoint.and_then(recorded_config) {
                return Self::read(&path);
            }
        }
        Self::for_options(options)
    }

    /// The helper directory for CRIU's dumps, if it is set and holds an
    /// executable `tar`.
    pub fn criu_helper_dir(&self) -> Option<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let dir = &self.criu.helper_dir;
        if dir.as_os_str().is_empty() {
            return None;
        }
        match std::fs::metadata(dir.join("tar")) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Some(dir.clone()),
            _ => None,
        }
    }

    /// The CRIU binary as a path (looked up on PATH and the sbin dirs when
    /// it is a bare name).
    pub fn criu_binary(&self) -> PathBuf {
        let b = &self.criu.binary;
        if b.components().count() > 1 || b.is_absolute() {
            return b.clone();
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/local/bin"].map(PathBuf::from))
            .map(|d| d.join(b))
            .find(|p| p.is_file())
            .unwrap_or_else(|| b.clone())
    }

    /// The frozen-window hook's bound.
    pub fn hook_timeout(&self) -> Duration {
        Duration::from_millis(self.checkpoint.frozen_hook_timeout_ms)
    }
}

/// What a container's annotations override.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `io.ms2m.checkpoint.strategy`, raw.
    pub strategy: Option<String>,
    /// `io.ms2m.restore.lazy-pages`, raw.
    pub lazy_pages: Option<String>,
    /// `io.ms2m.checkpoint.frozen-hook`, raw.
    pub frozen_hook: Option<String>,
    /// `io.ms2m.tap.upstream`, raw (may hold credentials: never logged).
    pub tap_upstream: Option<String>,
    /// `io.ms2m.tap.port`, raw.
    pub tap_port: Option<String>,
    /// `io.ms2m.tap.quiesce-timeout-ms`, raw.
    pub tap_quiesce_timeout_ms: Option<String>,
}

impl std::fmt::Debug for Overrides {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overrides")
            .field("strategy", &self.strategy)
            .field("lazy_pages", &self.lazy_pages)
            .field("frozen_hook", &self.frozen_hook)
            .field(
                "tap_upstream",
                &self.tap_upstream.as_ref().map(|_| "<redacted>"),
            )
            .field("tap_port", &self.tap_port)
            .field("tap_quiesce_timeout_ms", &self.tap_quiesce_timeout_ms)
            .finish()
    }
}

impl Overrides {
    /// Picks the ms2m annotations out of a spec's annotations.
    pub fn from_annotations(a: &HashMap<String, String>) -> Overrides {
        let get = |k: &str| a.get(k).cloned();
        Overrides {
            strategy: get(STRATEGY_ANNOTATION),
            lazy_pages: get(LAZY_PAGES_ANNOTATION),
            frozen_hook: get(FROZEN_HOOK_ANNOTATION),
            tap_upstream: get(TAP_UPSTREAM_ANNOTATION),
            tap_port: get(TAP_PORT_ANNOTATION),
            tap_quiesce_timeout_ms: get(TAP_QUIESCE_ANNOTATION),
        }
    }

    /// The tap configuration of this container: `None` without the
    /// `io.ms2m.tap.upstream` annotation; an error (naming the annotation,
    /// never the credentials) for a bad value.
    pub fn tap(&self, config: &ShimConfig) -> Result<Option<ms2m_tap::TapConfig>> {
        let Some(raw) = self.tap_upstream.as_deref().map(str::trim) else {
            return Ok(None);
        };
        let url = if raw.eq_ignore_ascii_case("default") {
            config.tap.upstream.clone().ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "annotation {TAP_UPSTREAM_ANNOTATION} is \"default\", but the shim \
                     configuration{} has no [tap] upstream",
                    config
                        .source
                        .as_ref()
                        .map(|p| format!(" ({})", p.display()))
                        .unwrap_or_default()
                ))
            })?
        } else {
            raw.to_string()
        };
        let mut tc = ms2m_tap::TapConfig::new(&url).map_err(|e| {
            Error::InvalidArgument(format!("annotation {TAP_UPSTREAM_ANNOTATION}: {e}"))
        })?;
        tc.listen_port = match &self.tap_port {
            Some(p) => match p.trim().parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "annotation {TAP_PORT_ANNOTATION}: {p:?} is not a port number 1..65535"
                    )))
                }
            },
            None => config.tap.listen_port,
        };
        let ms = match &self.tap_quiesce_timeout_ms {
            Some(v) => match v.trim().parse::<u64>() {
                Ok(n) if n <= 600_000 => n,
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "annotation {TAP_QUIESCE_ANNOTATION}: {v:?} is not a number of \
                         milliseconds 0..600000"
                    )))
                }
            },
            None => config.tap.quiesce_timeout_ms,
        };
        tc.quiesce_timeout = Duration::from_millis(ms);
        tc.max_frame = config.tap.max_frame;
        Ok(Some(tc))
    }

    /// Reads the annotations of `<bundle>/config.json`.
    pub fn from_bundle(bundle: &Path) -> Result<Overrides> {
        let path = bundle.join("config.json");
        let text = std::fs::read(&path)
            .map_err(|e| Error::internal(format!("read {}", path.display()), e))?;
        let v: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?;
        let mut a = HashMap::new();
        if let Some(obj) = v.get("annotations").and_then(|x| x.as_object()) {
            for (k, val) in obj {
                if let Some(s) = val.as_str() {
                    a.insert(k.clone(), s.to_string());
                }
            }
        }
        Ok(Overrides::from_annotations(&a))
    }

    /// The strategy for this container: the annotation, else the config.
    pub fn strategy(&self, config: &ShimConfig) -> Result<(StrategyChoice, &'static str)> {
        match &self.strategy {
            Some(s) => StrategyChoice::parse(s)
                .map(|c| (c, "annotation"))
                .map_err(|e| {
                    Error::InvalidArgument(format!("annotation {STRATEGY_ANNOTATION}: {e}"))
                }),
            None => Ok((config.checkpoint.strategy, "shim configuration")),
        }
    }

    /// Lazy pages for this container: the annotation, else the config.
    pub fn lazy_pages(&self, config: &ShimConfig) -> Result<LazyChoice> {
        match &self.lazy_pages {
            Some(s) => LazyChoice::parse(s).map_err(|e| {
                Error::InvalidArgument(format!("annotation {LAZY_PAGES_ANNOTATION}: {e}"))
            }),
            None => Ok(config.restore.lazy_pages),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_full_file() {
        let d = ShimConfig::parse("", Path::new("/x.toml")).unwrap();
        assert_eq!(d.checkpoint, CheckpointConfig::default());
        assert_eq!(d.restore.lazy_min_rss_mib, 128);
        let c = ShimConfig::parse(
            "[checkpoint]\nstrategy = \"runc\"\nnetwork_lock = \"nftables\"\ncgroups = \"soft\"\n\
             frozen_hook_timeout_ms = 500\n[restore]\nlazy_pages = \"always\"\nlazy_min_rss_mib = 64\n\
             [criu]\nbinary = \"/opt/criu\"\nlog_level = 4\n",
            Path::new("/x.toml"),
        )
        .unwrap();
        assert_eq!(c.checkpoint.strategy, StrategyChoice::Runc);
        assert_eq!(c.checkpoint.network_lock, LockChoice::Nftables);
        assert_eq!(c.checkpoint.cgroups, CgroupsChoice::Soft);
        assert_eq!(c.hook_timeout(), Duration::from_millis(500));
        assert_eq!(c.restore.lazy_pages, LazyChoice::Always);
        assert_eq!(c.criu_binary(), PathBuf::from("/opt/criu"));
        assert_eq!(c.criu.log_level, 4);
        assert_eq!(d.criu.log_level, 2);
    }

    #[test]
    fn bad_files_are_clear_errors() {
        for bad in [
            "[checkpoint]\nstrategy = \"fast\"\n",
            "[checkpoint]\nunknown = 1\n",
            "[checkpoint\n",
            "[checkpoint]\nfrozen_hook_timeout_ms = 0\n",
            "[criu]\nlog_level = 7\n",
        ] {
            let e = ShimConfig::parse(bad, Path::new("/etc/ms2m/shim.toml")).unwrap_err();
            assert!(
                e.to_string().contains("/etc/ms2m/shim.toml"),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn annotations_override() {
        let cfg = ShimConfig::default();
        let mut a = HashMap::new();
        a.insert(STRATEGY_ANNOTATION.to_string(), "RUNC".to_string());
        a.insert(LAZY_PAGES_ANNOTATION.to_string(), "never".to_string());
        let o = Overrides::from_annotations(&a);
        assert_eq!(o.strategy(&cfg).unwrap().0, StrategyChoice::Runc);
        assert_eq!(o.lazy_pages(&cfg).unwrap(), LazyChoice::Never);
        a.insert(STRATEGY_ANNOTATION.to_string(), "warp".to_string());
        let e = Overrides::from_annotations(&a).strategy(&cfg).unwrap_err();
        assert!(e.to_string().contains(STRATEGY_ANNOTATION), "{e}");
        assert_eq!(
            Overrides::default().strategy(&cfg).unwrap().0,
            StrategyChoice::Auto
        );
    }

    #[test]
    fn tap_annotations() {
        let mut cfg = ShimConfig::default();
        let mut a = HashMap::new();
        assert!(Overrides::from_annotations(&a).tap(&cfg).unwrap().is_none());
        a.insert(
            TAP_UPSTREAM_ANNOTATION.to_string(),
            "amqp://guest:s3cret@127.0.0.1:5673/%2f".to_string(),
        );
        a.insert(TAP_PORT_ANNOTATION.to_string(), "5999".to_string());
        let o = Overrides::from_annotations(&a);
        assert!(!format!("{o:?}").contains("s3cret"));
        let t = o.tap(&cfg).unwrap().unwrap();
        assert_eq!(t.listen_port, 5999);
        assert_eq!(t.upstream.port, 5673);
        assert_eq!(t.quiesce_timeout, Duration::from_millis(2000));
        a.insert(TAP_QUIESCE_ANNOTATION.to_string(), "abc".to_string());
        let e = Overrides::from_annotations(&a).tap(&cfg).unwrap_err();
        assert!(e.to_string().contains(TAP_QUIESCE_ANNOTATION), "{e}");
        a.remove(TAP_QUIESCE_ANNOTATION);
        a.insert(TAP_PORT_ANNOTATION.to_string(), "0".to_string());
        assert!(Overrides::from_annotations(&a).tap(&cfg).is_err());
        a.remove(TAP_PORT_ANNOTATION);
        a.insert(
            TAP_UPSTREAM_ANNOTATION.to_string(),
            "http://x:secret@y".to_string(),
        );
        let e = Overrides::from_annotations(&a).tap(&cfg).unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
        a.insert(TAP_UPSTREAM_ANNOTATION.to_string(), "default".to_string());
        assert!(Overrides::from_annotations(&a).tap(&cfg).is_err());
        cfg = ShimConfig::parse(
            "[tap]\nupstream = \"amqp://u:p@broker:5672/v\"\nlisten_port = 5680\nquiesce_timeout_ms = 50\n",
            Path::new("/x.toml"),
        )
        .unwrap();
        assert!(!format!("{cfg:?}").contains("u:p"));
        let t = Overrides::from_annotations(&a).tap(&cfg).unwrap().unwrap();
        assert_eq!((t.upstream.host.as_str(), t.listen_port), ("broker", 5680));
        assert_eq!(t.quiesce_timeout, Duration::from_millis(50));
        assert!(ShimConfig::parse("[tap]\nmax_frame = 10\n", Path::new("/x.toml")).is_err());
        assert!(ShimConfig::parse("[tap]\nupstream = \"nope\"\n", Path::new("/x.toml")).is_err());
    }
}
