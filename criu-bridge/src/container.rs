//! Dumping a runc container directly through CRIU's RPC, so that `runc
//! restore` (and so containerd's runc shims, and ms2m's) can restore it.
//!
//! [`RuncContainer::load`] reads what runc knows about a running container
//! (its `state.json` under runc's root: the libcontainer config runc built
//! from the bundle's `config.json`, the cgroup paths, the namespaces, the
//! init pid and its stdio). [`RuncContainer::dump_job`] turns that into a
//! CRIU `DUMP` request with what runc 1.1.5's `Checkpoint` asks for, and
//! [`RuncContainer::dump`] runs it and reads the statistics back:
//!
//! - the rootfs as CRIU's root, the init pid as the tree's root;
//! - the same external-mount keys runc uses on restore: bind mounts (and
//!   cgroup v1 bind mounts) keyed by their destination, symlinks resolved
//!   inside the rootfs; masked *files* keyed by their path with value
//!   `/dev/null`; device nodes keyed by their path;
//! - `descriptors.json` in the images dir: the init's stdio as runc
//!   recorded it (`external_descriptors`), which `runc restore` reads to
//!   hand the new stdio pipes to CRIU;
//! - a network (or pid) namespace that has a path is declared external as
//!   `net[<inode>]:extRootNetNS`, the key `runc restore` gives CRIU the
//!   namespace's fd under;
//! - the network namespace dumped empty (`empty_ns`), as `runc checkpoint`
//!   always does: `runc restore` also restores it empty, so a restored
//!   container's loopback is *down* (with runc's own checkpoints too) and
//!   whoever needs `127.0.0.1` there must bring `lo` up;
//! - the container's freezer cgroup, and the CRIU config file from the
//!   `org.criu.config` annotation (or runc's `/etc/criu/runc.conf`).
//!
//! On top of that, [`DumpKnobs`] holds what cuts the freeze: the network
//! lock (skipped when the namespace has no TCP socket), the cgroup mode, the
//! freeze method, the log level. Measured here (`examples/freeze_profile.rs`,
//! 16 MiB): `runc checkpoint` freezes ~150 ms, the direct dump with the
//! defaults ~70-85 ms, with [`Cgroups::Ignore`] ~55-70 ms. What remains is
//! CRIU's own work: memory (~10 ms per 16 MiB, written to tmpfs), one `tar
//! --gzip` per tmpfs mount (`/dev`, `/dev/shm`, `/run` and runc's masked
//! dirs: 3-6 ms each), the kernel walking the host's whole conntrack hash
//! for the netns' conntrack dumps (~20 ms at the host's 262144 buckets,
//! under 1 ms at 4096), and one helper fork per namespace.
//!
//! What runc does that this does not: the empty `checkpoint` marker file it
//! creates in its state dir at `post-dump` (runc never reads it back), and
//! runc's own network lock for veth interfaces (runc 1.1.5 implements it
//! for `loopback` and `veth` only; containerd's runc shims use neither).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::config::{netns_has_tcp, CRIU_CONFIG_ANNOTATION};
use crate::rpc::{
    ext_mount, freeze_freezer, freeze_freezer_and_wait, freezer_is_thawed, thaw_freezer, CgMode,
    CriuClient, CriuOpts, DumpOutcome, ExtMountMap, Job, NetworkLockMethod, Notify, NotifyFn,
};
use crate::stats::{read_dump_stats, DumpStats};
use crate::Error;

/// Where containerd's runc shims keep runc's state by default:
/// `<root>/<namespace>/<id>/state.json`.
pub const CONTAINERD_RUNC_ROOT: &str = "/run/containerd/runc";

/// The file runc writes into the images dir: the init's stdio, as
/// `["pipe:[123]", "/dev/null", ...]`.
pub const DESCRIPTORS_FILE: &str = "descriptors.json";

/// The CRIU config file runc names when the container has no
/// `org.criu.config` annotation.
pub const RUNC_DEFAULT_CRIU_CONFIG: &str = "/etc/criu/runc.conf";

/// The key runc restores an external network namespace under.
pub const EXT_NETNS_KEY: &str = "extRootNetNS";
/// The key runc restores an external pid namespace under.
pub const EXT_PIDNS_KEY: &str = "extRootPidNS";

/// The parts of runc's `state.json` a dump needs.
#[derive(Debug, Clone, Deserialize)]
struct StateFile {
    id: String,
    init_process_pid: i32,
    #[serde(default)]
    init_process_start: u64,
    config: ConfigPart,
    #[serde(default)]
    cgroup_paths: BTreeMap<String, String>,
    #[serde(default)]
    external_descriptors: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct ConfigPart {
    rootfs: PathBuf,
    #[serde(default)]
    mounts: Vec<MountPart>,
    #[serde(default)]
    devices: Option<Vec<DevicePart>>,
    #[serde(default)]
    mask_paths: Option<Vec<String>>,
    #[serde(default)]
    namespaces: Vec<NamespacePart>,
    #[serde(default)]
    labels: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
struct MountPart {
    destination: String,
    #[serde(default)]
    device: String,
}

#[derive(Debug, Clone, Deserialize)]
struct DevicePart {
    path: String,
}

#[derive(Debug, Clone, Deserialize)]
struct NamespacePart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    path: String,
}

/// A running runc container, as runc's `state.json` describes it.
#[derive(Debug, Clone)]
pub struct RuncContainer {
    state_file: PathBuf,
    state: StateFile,
}

/// Which CRIU configuration file the dump names (settings in it override
/// the request's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConfigFile {
    /// As runc: the `org.criu.config` annotation's file (none when the
    /// annotation is empty), else `/etc/criu/runc.conf` (CRIU ignores a
    /// missing file).
    #[default]
    LikeRunc,
    /// No configuration file: the request's options are final.
    None,
    /// This file.
    Path(PathBuf),
}

/// How the network is kept quiet during the dump.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NetworkLock {
    /// No lock when the container's network namespace has no TCP socket
    /// (nothing to protect, and locking runs external commands inside the
    /// freeze); otherwise [`DumpKnobs::lock_when_tcp`].
    #[default]
    Auto,
    /// Always this method (`Skip` included).
    Always(LockMethod),
}

/// A CRIU network lock method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LockMethod {
    /// iptables rules (CRIU's default; runs `iptables-restore`).
    Iptables,
    /// An nftables table (in-process in CRIU).
    Nftables,
    /// No lock.
    Skip,
}

impl LockMethod {
    fn wire(self) -> NetworkLockMethod {
        match self {
            LockMethod::Iptables => NetworkLockMethod::Iptables,
            LockMethod::Nftables => NetworkLockMethod::Nftables,
            LockMethod::Skip => NetworkLockMethod::Skip,
        }
    }

    /// CRIU's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            LockMethod::Iptables => "iptables",
            LockMethod::Nftables => "nftables",
            LockMethod::Skip => "skip",
        }
    }
}

/// How CRIU handles cgroups in the dump.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cgroups {
    /// As runc: `manage_cgroups` on (CRIU's soft mode).
    #[default]
    Soft,
    /// `manage_cgroups_mode = IGNORE`: CRIU records the tasks' cgroup paths
    /// but neither mounts the hierarchies (≈0.5 ms per controller here)
    /// nor reads their properties. Right for `runc restore`, which creates
    /// the container's cgroups, sets their limits and puts CRIU in them
    /// before CRIU restores the tasks; wrong only when the container's
    /// tasks live in sub-cgroups of their own, which would be lost.
    Ignore,
}

/// How CRIU stops the container's tasks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Freeze {
    /// As runc: through the container's freezer cgroup (then ptrace).
    #[default]
    Cgroup,
    /// ptrace-seize task by task.
    Ptrace,
}

/// The options of a direct container dump. [`Default`] is what runc 1.1.5
/// asks for (`runc checkpoint` as containerd's runc shims run it), except
/// the network lock (skipped when there is no TCP socket) and the log
/// level (2, not 4: CRIU's debug log costs freeze time).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpKnobs {
    /// Keep the container running after the dump.
    pub leave_running: bool,
    /// CRIU's work dir (log, `stats-dump`); the images dir when `None`.
    pub work_dir: Option<PathBuf>,
    /// Network lock.
    pub network_lock: NetworkLock,
    /// The method [`NetworkLock::Auto`] uses when there is TCP to lock.
    pub lock_when_tcp: LockMethod,
    /// Cgroup handling.
    pub cgroups: Cgroups,
    /// Freeze method.
    pub freeze: Freeze,
    /// Declare a network namespace that has a path external (runc does).
    /// Without a path the namespace is always dumped: `runc restore` could
    /// not give it back.
    pub external_netns: bool,
    /// Dump the network namespace as empty (`empty_ns = CLONE_NEWNET`):
    /// no interfaces, addresses, routes, rules or iptables/nftables, which
    /// CRIU gets by running `ip ... save` and `iptables-save` inside the
    /// freeze. runc does this on every checkpoint *and restore* ("runc
    /// doesn't manage network devices"), so a runc restore never uses
    /// them. CRIU still dumps the conntrack tables.
    pub empty_netns: bool,
    /// Dump established TCP connections.
    pub tcp_established: bool,
    /// Do not dump the state of established TCP connections (no repair
    /// mode, no network lock needed for them); they are restored closed
    /// (CRIU `tcp-close`). The restore must ask for `tcp-close` too.
    pub tcp_close: bool,
    /// Allow external unix socket connections.
    pub ext_unix_sk: bool,
    /// The container is a shell job (terminal outside).
    pub shell_job: bool,
    /// Dump file locks.
    pub file_locks: bool,
    /// CRIU log level, 0..4 (runc: 4).
    pub log_level: i32,
    /// CRIU config file.
    pub config_file: ConfigFile,
}

impl Default for DumpKnobs {
    fn default() -> Self {
        DumpKnobs {
            leave_running: true,
            work_dir: None,
            network_lock: NetworkLock::Auto,
            lock_when_tcp: LockMethod::Iptables,
            cgroups: Cgroups::Soft,
            freeze: Freeze::Cgroup,
            external_netns: true,
            empty_netns: true,
            tcp_established: false,
            tcp_close: false,
            ext_unix_sk: false,
            shell_job: false,
            file_locks: false,
            log_level: 2,
            config_file: ConfigFile::LikeRunc,
        }
    }
}

impl DumpKnobs {
    /// Exactly runc 1.1.5's request (network lock left to CRIU, log level
    /// 4, soft cgroups, freezer cgroup), for side-by-side measurements.
    pub fn like_runc() -> Self {
        DumpKnobs {
            network_lock: NetworkLock::Always(LockMethod::Iptables),
            log_level: 4,
            ..Default::default()
        }
    }
}

/// What a direct dump did and measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerDump {
    /// The RPC outcome (notification timings, frozen-window hook).
    pub outcome: DumpOutcome,
    /// CRIU's statistics (`frozen_time_us` is the freeze).
    pub stats: Option<DumpStats>,
    /// Why the statistics could not be read, if they could not.
    pub stats_error: Option<String>,
    /// The network lock used.
    pub network_lock: LockMethod,
    /// Whether the network namespace was declared external.
    pub external_netns: bool,
    /// Building the request (state, mounts, TCP probe), ms.
    pub prepare_ms: f64,
}

impl ContainerDump {
    /// The record of a dump into `images_dir` that returned `outcome`, with
    /// CRIU's statistics read from where CRIU writes them (`knobs.work_dir`,
    /// else `images_dir`); a failure to read them is kept in `stats_error`.
    pub fn finish(
        outcome: DumpOutcome,
        images_dir: &Path,
        knobs: &DumpKnobs,
        network_lock: LockMethod,
        external_netns: bool,
        prepare_ms: f64,
    ) -> ContainerDump {
        let stats_dir = knobs.work_dir.as_deref().unwrap_or(images_dir);
        let (stats, stats_error) = match read_dump_stats(stats_dir) {
            Ok(s) => (Some(s), None),
            Err(e) => (None, Some(e.to_string())),
        };
        ContainerDump {
            outcome,
            stats,
            stats_error,
            network_lock,
            external_netns,
            prepare_ms,
        }
    }
}

fn json_err(path: &Path, e: serde_json::Error) -> Error {
    Error::malformed(path, format!("not a runc state file: {e}"))
}

impl RuncContainer {
    /// Reads `<runc_root>/<id>/state.json`. `runc_root` is runc's `--root`:
    /// for containerd's runc shims `/run/containerd/runc/<namespace>`.
    pub fn load(runc_root: &Path, id: &str) -> Result<Self, Error> {
        if id.is_empty() || id.contains('/') || id == "." || id == ".." {
            return Err(Error::malformed(
                runc_root,
                format!("invalid container id {id:?}"),
            ));
        }
        Self::from_state_file(&runc_root.join(id).join("state.json"))
    }

    /// Reads the state of container `id` in containerd namespace
    /// `namespace` as containerd's runc shims keep it (runc root
    /// [`CONTAINERD_RUNC_ROOT`]`/<namespace>`).
    pub fn load_containerd(namespace: &str, id: &str) -> Result<Self, Error> {
        Self::load(&Path::new(CONTAINERD_RUNC_ROOT).join(namespace), id)
    }

    /// Reads a runc `state.json`.
    pub fn from_state_file(path: &Path) -> Result<Self, Error> {
        let text =
            std::fs::read(path).map_err(|e| Error::io("read runc container state", path, e))?;
        let state: StateFile = serde_json::from_slice(&text).map_err(|e| json_err(path, e))?;
        if state.init_process_pid <= 0 {
            return Err(Error::malformed(
                path,
                format!("init pid {} is not a process", state.init_process_pid),
            ));
        }
        Ok(RuncContainer {
            state_file: path.to_path_buf(),
            state,
        })
    }

    /// The container's id.
    pub fn id(&self) -> &str {
        &self.state.id
    }

    /// The `state.json` this was read from.
    pub fn state_file(&self) -> &Path {
        &self.state_file
    }

    /// The init process (host pid).
    pub fn init_pid(&self) -> i32 {
        self.state.init_process_pid
    }

    /// The rootfs (host path).
    pub fn rootfs(&self) -> &Path {
        &self.state.config.rootfs
    }

    /// The bundle dir (runc's `bundle=` label), if recorded.
    pub fn bundle(&self) -> Option<PathBuf> {
        self.label("bundle").map(PathBuf::from)
    }

    /// An OCI annotation (runc keeps them as `key=value` labels).
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.label(key)
    }

    fn label(&self, key: &str) -> Option<&str> {
        self.state
            .config
            .labels
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
    }

    /// The host path of a cgroup v1 controller's cgroup (`freezer`,
    /// `memory`, ...), or of the v2 cgroup (`""`).
    pub fn cgroup_path(&self, controller: &str) -> Option<&Path> {
        self.state
            .cgroup_paths
            .get(controller)
            .map(Path::new)
            .filter(|p| !p.as_os_str().is_empty())
    }

    /// Every cgroup runc made for the container: (controller, host path);
    /// the v2 (or hybrid unified) cgroup has controller `""`.
    pub fn cgroup_paths(&self) -> impl Iterator<Item = (&str, &Path)> {
        self.state
            .cgroup_paths
            .iter()
            .filter(|(_, p)| !p.is_empty())
            .map(|(c, p)| (c.as_str(), Path::new(p)))
    }

    /// The freezer cgroup: v1 `freezer`, else the v2 cgroup.
    pub fn freezer_cgroup(&self) -> Option<&Path> {
        self.cgroup_path("freezer").or_else(|| self.cgroup_path(""))
    }

    /// The init's stdio as runc recorded it.
    pub fn external_descriptors(&self) -> &[String] {
        &self.state.external_descriptors
    }

    /// The path configured for a namespace (`NEWNET`, `NEWPID`, ...), when
    /// the container joined an existing one.
    pub fn namespace_path(&self, kind: &str) -> Option<&str> {
        self.state
            .config
            .namespaces
            .iter()
            .find(|n| n.kind == kind)
            .map(|n| n.path.as_str())
            .filter(|p| !p.is_empty())
    }

    /// Checks that the init process is still the one runc started (same
    /// start time), so a recycled pid is never dumped.
    pub fn check_alive(&self) -> Result<(), Error> {
        let pid = self.init_pid();
        let stat_path = PathBuf::from(format!("/proc/{pid}/stat"));
        let stat = std::fs::read_to_string(&stat_path)
            .map_err(|e| Error::io("read the container's init process", &stat_path, e))?;
        // Field 22 (starttime) counts from after the ")" closing the name.
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let start: Option<u64> = after
            .split_whitespace()
            .nth(19)
            .and_then(|s| s.parse().ok());
        match start {
            Some(s) if self.state.init_process_start == 0 || s == self.state.init_process_start => {
                Ok(())
            }
            Some(s) => Err(Error::malformed(
                &self.state_file,
                format!(
                    "pid {pid} started at {s}, not at {} as runc recorded: the container's init is gone",
                    self.state.init_process_start
                ),
            )),
            None => Err(Error::malformed(&stat_path, "no start time")),
        }
    }

    /// The external-mount map runc 1.1.5 sends with a dump: keys (and, on
    /// dump, values) are the mount destinations inside the container.
    pub fn dump_ext_mounts(&self) -> Result<Vec<ExtMountMap>, Error> {
        let cfg = &self.state.config;
        let mut out: Vec<ExtMountMap> = Vec::new();
        let mut add = |dest: &str| {
            let key = resolve_in_root(&cfg.rootfs, dest);
            out.push(ext_mount(key.clone(), key));
        };
        let has_cgroupns = cfg.namespaces.iter().any(|n| n.kind == "NEWCGROUP");
        let unified = cgroup2_unified();
        let mut cgroup_v1: Option<Vec<PathBuf>> = None;
        for m in &cfg.mounts {
            match m.device.as_str() {
                "bind" => add(&m.destination),
                "cgroup" if !unified && !has_cgroupns => {
                    if cgroup_v1.is_none() {
                        cgroup_v1 = Some(cgroup_v1_mountpoints()?);
                    }
                    for mp in cgroup_v1.as_deref().unwrap_or_default() {
                        let base = mp.file_name().unwrap_or_else(|| OsStr::new(""));
                        let dest = Path::new(&m.destination).join(base);
                        add(&dest.to_string_lossy());
                    }
                }
                _ => {}
            }
        }
        // Masked files (bound to /dev/null); masked dirs are tmpfs mounts
        // and get dumped as such.
        let pid = self.init_pid();
        for p in cfg.mask_paths.as_deref().unwrap_or_default() {
            let on_host = PathBuf::from(format!("/proc/{pid}/root{p}"));
            match std::fs::metadata(&on_host) {
                Ok(md) if md.is_dir() => {}
                Ok(_) => out.push(ext_mount(p.clone(), "/dev/null")),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("look at a masked path", on_host, e)),
            }
        }
        for d in cfg.devices.as_deref().unwrap_or_default() {
            let key = resolve_in_root(&cfg.rootfs, &d.path);
            out.push(ext_mount(key.clone(), key));
        }
        Ok(out)
    }

    /// `net[<inode>]:extRootNetNS` (or the pid one) for a namespace that
    /// has a path, as runc declares it.
    fn external_ns(&self, kind: &str, criu_name: &str, key: &str) -> Result<Option<String>, Error> {
        let Some(path) = self.namespace_path(kind) else {
            return Ok(None);
        };
        let md = std::fs::metadata(path)
            .map_err(|e| Error::io("look at the container's namespace", path, e))?;
        Ok(Some(format!("{criu_name}[{}]:{key}", md.ino())))
    }

    /// Writes `descriptors.json` into `images_dir` as runc does.
    pub fn write_descriptors(&self, images_dir: &Path) -> Result<(), Error> {
        let path = images_dir.join(DESCRIPTORS_FILE);
        let json = serde_json::to_vec(&self.state.external_descriptors)
            .map_err(|e| Error::malformed(&path, e.to_string()))?;
        std::fs::write(&path, json).map_err(|e| Error::io("write runc descriptors", &path, e))
    }

    /// Builds the CRIU `DUMP` job for this container into `images_dir`
    /// (which must exist), and writes `descriptors.json` there. Returns the
    /// job, the network lock chosen and whether the netns is external.
    pub fn dump_job(
        &self,
        images_dir: &Path,
        knobs: &DumpKnobs,
    ) -> Result<(Job, LockMethod, bool), Error> {
        let pid = self.init_pid();
        let mut o = CriuOpts {
            pid: Some(pid),
            root: Some(self.rootfs().to_string_lossy().into_owned()),
            leave_running: Some(knobs.leave_running),
            log_level: Some(knobs.log_level),
            log_file: Some("dump.log".to_string()),
            shell_job: Some(knobs.shell_job),
            tcp_established: Some(knobs.tcp_established),
            ext_unix_sk: Some(knobs.ext_unix_sk),
            file_locks: Some(knobs.file_locks),
            ..Default::default()
        };
        if knobs.tcp_close {
            o.tcp_close = Some(true);
        }
        match knobs.cgroups {
            Cgroups::Soft => o.manage_cgroups = Some(true),
            Cgroups::Ignore => o.manage_cgroups_mode = Some(CgMode::IGNORE.into()),
        }
        match &knobs.config_file {
            ConfigFile::LikeRunc => match self.annotation(CRIU_CONFIG_ANNOTATION) {
                Some("") => {}
                Some(f) => o.config_file = Some(f.to_string()),
                None => o.config_file = Some(RUNC_DEFAULT_CRIU_CONFIG.to_string()),
            },
            ConfigFile::None => {}
            ConfigFile::Path(p) => o.config_file = Some(p.to_string_lossy().into_owned()),
        }
        let mut external_netns = false;
        if knobs.external_netns {
            if let Some(e) = self.external_ns("NEWNET", "net", EXT_NETNS_KEY)? {
                o.external.push(e);
                external_netns = true;
            }
        }
        if let Some(e) = self.external_ns("NEWPID", "pid", EXT_PIDNS_KEY)? {
            o.external.push(e);
        }
        if knobs.freeze == Freeze::Cgroup {
            if let Some(cg) = self.freezer_cgroup() {
                o.freeze_cgroup = Some(cg.to_string_lossy().into_owned());
            }
        }
        let lock = match knobs.network_lock {
            NetworkLock::Always(m) => m,
            NetworkLock::Auto => {
                let tcp = netns_has_tcp(pid as u32).map_err(|e| {
                    Error::io(
                        "look for TCP sockets in the container's network namespace",
                        format!("/proc/{pid}/net/tcp"),
                        e,
                    )
                })?;
                if tcp || knobs.tcp_established {
                    knobs.lock_when_tcp
                } else {
                    LockMethod::Skip
                }
            }
        };
        o.network_lock = Some(lock.wire().into());
        if knobs.empty_netns {
            o.empty_ns = Some(libc::CLONE_NEWNET as u32);
        }
        o.ext_mnt = self.dump_ext_mounts()?;
        self.write_descriptors(images_dir)?;
        let job = Job {
            images_dir: images_dir.to_path_buf(),
            work_dir: knobs.work_dir.clone(),
            opts: o,
            inherit_fds: Vec::new(),
        };
        Ok((job, lock, external_netns))
    }

    /// Dumps the container into `images_dir` (created if missing) with
    /// `client`. `notify` sees every CRIU notification; its `pre-dump`
    /// call runs while the container still runs, just before it is frozen,
    /// and its `post-dump` call while the container is frozen and its
    /// images are final (see [`crate::rpc`]). Whatever happens, the container is not left
    /// frozen by this call: when the dump fails (or leaves it running) and
    /// its freezer cgroup was thawed before, it is thawed if it is not.
    pub fn dump(
        &self,
        client: &CriuClient,
        images_dir: &Path,
        knobs: &DumpKnobs,
        notify: Option<&mut NotifyFn<'_>>,
    ) -> Result<ContainerDump, Error> {
        let t0 = Instant::now();
        self.check_alive()?;
        std::fs::create_dir_all(images_dir)
            .map_err(|e| Error::io("create the images dir", images_dir, e))?;
        if let Some(w) = &knobs.work_dir {
            std::fs::create_dir_all(w).map_err(|e| Error::io("create the work dir", w, e))?;
        }
        let (job, lock, external_netns) = self.dump_job(images_dir, knobs)?;
        let prepare_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let freezer = self.freezer_cgroup().map(Path::to_path_buf);
        let was_thawed = freezer
            .as_deref()
            .map(|cg| freezer_is_thawed(cg).unwrap_or(true));
        // With the freezer cgroup, freeze the container ourselves at CRIU's
        // `pre-dump` notification, the instant before CRIU freezes it:
        // CRIU's own freezer loop sleeps 100 ms whenever the cgroup is not
        // frozen at its first look (a busy multi-threaded app often is not),
        // and freezing there, not before CRIU starts, keeps CRIU's start-up
        // out of the freeze (its frozen_time stays the true freeze). CRIU
        // leaves the cgroup frozen, having found it so; it is thawed below.
        let pre_freeze = match (knobs.freeze, freezer.as_deref(), was_thawed) {
            (Freeze::Cgroup, Some(cg), Some(true)) => Some(cg),
            _ => None,
        };
        let mut prefrozen = false;
        let mut user = notify;
        let mut wrapped = |n: Notify<'_>| -> Result<(), String> {
            let script = n.script;
            // The caller's `pre-dump` callback runs first, while the
            // container still runs (an AMQP tap quiesces there: the app
            // must be able to ack); the freeze follows it at once.
            let r = match user.as_mut() {
                Some(f) => f(n),
                None => Ok(()),
            };
            if let (Some(cg), "pre-dump", Ok(())) = (pre_freeze, script, &r) {
                match freeze_freezer_and_wait(cg, std::time::Duration::from_secs(2)) {
                    Ok(ms) => {
                        prefrozen = true;
                        tracing::info!(freeze_ms = ms, "container frozen at pre-dump");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "freezing at pre-dump failed; CRIU freezes");
                        let _ = thaw_freezer(cg);
                    }
                }
            }
            r
        };
        let result = client.dump(&job, Some(&mut wrapped));
        // A container that ran before must run after a failed or
        // leave-running dump (CRIU does this itself; this is the net), and
        // after an exit dump frozen here, so its killed tasks can die.
        if let (Some(cg), Some(true)) = (freezer.as_deref(), was_thawed) {
            if result.is_err() || knobs.leave_running || prefrozen {
                ensure_thawed(cg);
            }
        } else if let (Some(cg), Some(false), Err(_)) = (freezer.as_deref(), was_thawed, &result) {
            // It was paused: keep it paused.
            let _ = freeze_freezer(cg);
        }
        Ok(ContainerDump::finish(
            result?,
            images_dir,
            knobs,
            lock,
            external_netns,
            prepare_ms,
        ))
    }
}

/// Thaws `cg` if it is frozen or freezing (logs what it did).
fn ensure_thawed(cg: &Path) {
    match freezer_is_thawed(cg) {
        Ok(true) => {}
        Ok(false) | Err(_) => {
            if let Err(e) = thaw_freezer(cg) {
                tracing::warn!(cgroup = %cg.display(), error = %e, "could not thaw after a dump");
            } else {
                tracing::warn!(cgroup = %cg.display(), "container was left frozen after a dump: thawed");
            }
        }
    }
}

/// Whether the host runs cgroup v2 alone (`/sys/fs/cgroup` is cgroup2).
fn cgroup2_unified() -> bool {
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|mi| {
        mi.lines().any(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            f.get(4) == Some(&"/sys/fs/cgroup")
                && l.split(" - ")
                    .nth(1)
                    .is_some_and(|r| r.starts_with("cgroup2 "))
        })
    })
}

/// Mount points of the host's cgroup v1 hierarchies (one per hierarchy),
/// as runc lists them for a container's `cgroup` mount.
fn cgroup_v1_mountpoints() -> Result<Vec<PathBuf>, Error> {
    let mi = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("read mounts", "/proc/self/mountinfo", e))?;
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for l in mi.lines() {
        let Some((left, right)) = l.split_once(" - ") else {
            continue;
        };
        if !right.starts_with("cgroup ") {
            continue;
        }
        let f: Vec<&str> = left.split(' ').collect();
        let (Some(dev), Some(mp)) = (f.get(2), f.get(4)) else {
            continue;
        };
        if seen.insert(dev.to_string()) {
            out.push(PathBuf::from(unescape_mountinfo(mp)));
        }
    }
    Ok(out)
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `path` (absolute, inside the container) with symlinks resolved inside
/// `rootfs` and `..` kept from leaving it, as runc's secure join does for
/// mount keys. Falls back to the cleaned path when a component is missing.
pub fn resolve_in_root(rootfs: &Path, path: &str) -> String {
    let rel = Path::new(path)
        .strip_prefix(rootfs)
        .unwrap_or(Path::new(path));
    let mut pending: Vec<String> = rel
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            Component::ParentDir => Some("..".to_string()),
            _ => None,
        })
        .collect();
    let mut done: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(c) = pending.pop() {
        if c == ".." {
            done.pop();
            continue;
        }
        let mut here = rootfs.to_path_buf();
        for d in &done {
            here.push(d);
        }
        here.push(&c);
        match std::fs::read_link(&here) {
            Ok(target) if links < 255 => {
                links += 1;
                if target.is_absolute() {
                    done.clear();
                }
                for t in target.components().rev() {
                    match t {
                        Component::Normal(s) => pending.push(s.to_string_lossy().into_owned()),
                        Component::ParentDir => pending.push("..".to_string()),
                        _ => {}
                    }
                }
            }
            _ => done.push(c),
        }
    }
    format!("/{}", done.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_symlinks_inside_the_root() {
        let root = std::env::temp_dir().join(format!("ms2m-resolve-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
        std::os::unix::fs::symlink("/../../etc", root.join("up")).unwrap();
        assert_eq!(resolve_in_root(&root, "/lib/x"), "/usr/lib/x");
        assert_eq!(resolve_in_root(&root, "/a/../lib"), "/usr/lib");
        assert_eq!(resolve_in_root(&root, "/up/passwd"), "/etc/passwd");
        assert_eq!(resolve_in_root(&root, "/../../dev/null"), "/dev/null");
        assert_eq!(resolve_in_root(&root, "/"), "/");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn unescapes_mountinfo() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }

    const STATE: &str = r#"{
        "id": "c1", "init_process_pid": 42, "init_process_start": 7,
        "config": {
            "rootfs": "/nonexistent-rootfs",
            "mounts": [
                {"source": "proc", "destination": "/proc", "device": "proc"},
                {"source": "/host/data", "destination": "/data", "device": "bind"}
            ],
            "devices": [{"path": "/dev/null"}],
            "mask_paths": [],
            "namespaces": [{"type": "NEWNET", "path": ""}, {"type": "NEWPID", "path": ""}],
            "labels": ["bundle=/b/c1", "org.criu.config=/etc/x.conf"]
        },
        "cgroup_paths": {"freezer": "/sys/fs/cgroup/freezer/ns/c1", "": "/sys/fs/cgroup/unified/ns/c1"},
        "external_descriptors": ["pipe:[1]", "/dev/null", "pipe:[3]"]
    }"#;

    fn sample() -> RuncContainer {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("ms2m-state-{}-{n}.json", std::process::id()));
        std::fs::write(&path, STATE).unwrap();
        let c = RuncContainer::from_state_file(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        c
    }

    #[test]
    fn reads_state() {
        let c = sample();
        assert_eq!(c.id(), "c1");
        assert_eq!(c.init_pid(), 42);
        assert_eq!(c.bundle(), Some(PathBuf::from("/b/c1")));
        assert_eq!(c.annotation("org.criu.config"), Some("/etc/x.conf"));
        assert_eq!(
            c.freezer_cgroup(),
            Some(Path::new("/sys/fs/cgroup/freezer/ns/c1"))
        );
        assert_eq!(c.namespace_path("NEWNET"), None);
        let keys: Vec<String> = c
            .dump_ext_mounts()
            .unwrap()
            .into_iter()
            .map(|m| m.key.unwrap_or_default())
            .collect();
        assert_eq!(keys, vec!["/data", "/dev/null"]);
    }

    #[test]
    fn builds_a_runc_like_job() {
        let c = sample();
        let dir = std::env::temp_dir().join(format!("ms2m-job-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let knobs = DumpKnobs {
            network_lock: NetworkLock::Always(LockMethod::Skip),
            ..DumpKnobs::like_runc()
        };
        let (job, lock, ext) = c.dump_job(&dir, &knobs).unwrap();
        assert_eq!(lock, LockMethod::Skip);
        assert!(!ext);
        assert_eq!(job.opts.pid, Some(42));
        assert_eq!(job.opts.root.as_deref(), Some("/nonexistent-rootfs"));
        assert_eq!(job.opts.config_file.as_deref(), Some("/etc/x.conf"));
        assert_eq!(
            job.opts.freeze_cgroup.as_deref(),
            Some("/sys/fs/cgroup/freezer/ns/c1")
        );
        assert_eq!(job.opts.manage_cgroups, Some(true));
        assert_eq!(job.opts.empty_ns, Some(libc::CLONE_NEWNET as u32));
        assert_eq!(job.opts.ext_mnt.len(), 2);
        let d: Vec<String> =
            serde_json::from_slice(&std::fs::read(dir.join(DESCRIPTORS_FILE)).unwrap()).unwrap();
        assert_eq!(d, vec!["pipe:[1]", "/dev/null", "pipe:[3]"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rejects_bad_ids() {
        for id in ["", "..", "a/b"] {
            assert!(RuncContainer::load(Path::new("/run/containerd/runc/x"), id).is_err());
        }
    }
}
