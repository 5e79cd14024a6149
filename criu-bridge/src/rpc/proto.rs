//! CRIU's RPC messages (`images/rpc.proto` of CRIU 4.2.1) as plain Rust
//! types, with hand-written protobuf encoding and decoding.
//!
//! Field numbers follow CRIU's `rpc.proto`. Optional proto2 fields are
//! `Option`s (written only when `Some`), repeated ones are `Vec`s. Fields
//! CRIU marks deprecated (`veths`, `unix_sk_ino`) and the TLS options are left
//! out; an unknown field in a decoded message is skipped, as protobuf does.

use crate::protobuf::{fields, Encoder, Field};

/// Decoding result: the error says what was malformed.
pub type DecodeResult<T> = Result<T, String>;

macro_rules! wire_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $value:expr,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vm])* $variant,)*
        }

        impl $name {
            /// The value on the wire.
            pub fn to_wire(self) -> u64 {
                match self {
                    $($name::$variant => $value,)*
                }
            }

            /// The variant for a wire value, if CRIU 4.2.1 defines it.
            pub fn from_wire(v: u64) -> Option<Self> {
                match v {
                    $($value => Some($name::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

wire_enum! {
    /// `criu_req_type`: what a request asks for (and what a response answers).
    ReqType {
        /// `EMPTY`: CRIU answers a request it could not parse with this.
        Empty = 0,
        /// `DUMP`: checkpoint a process tree.
        Dump = 1,
        /// `RESTORE`: restore a process tree.
        Restore = 2,
        /// `CHECK`: `criu check`.
        Check = 3,
        /// `PRE_DUMP`: memory pre-dump; CRIU then waits for more
        /// `PRE_DUMP`s or a final `DUMP` on the same connection.
        PreDump = 4,
        /// `PAGE_SERVER`: start a page server daemon.
        PageServer = 5,
        /// `NOTIFY`: an action-script notification (CRIU to client) or its
        /// answer (client to CRIU).
        Notify = 6,
        /// `CPUINFO_DUMP`.
        CpuinfoDump = 7,
        /// `CPUINFO_CHECK`.
        CpuinfoCheck = 8,
        /// `FEATURE_CHECK`: ask which of `criu_features` work here.
        FeatureCheck = 9,
        /// `VERSION`.
        Version = 10,
        /// `WAIT_PID`: `waitpid` in the service.
        WaitPid = 11,
        /// `PAGE_SERVER_CHLD`: page server as a child of the service.
        PageServerChld = 12,
        /// `SINGLE_PRE_DUMP`: one pre-dump, then the connection ends.
        SinglePreDump = 13,
    }
}

wire_enum! {
    /// `criu_cg_mode`: how CRIU handles cgroups on restore.
    CgMode {
        /// `IGNORE`.
        Ignore = 0,
        /// `CG_NONE`.
        None = 1,
        /// `PROPS`.
        Props = 2,
        /// `SOFT`.
        Soft = 3,
        /// `FULL`.
        Full = 4,
        /// `STRICT`.
        Strict = 5,
        /// `DEFAULT`.
        Default = 6,
    }
}

wire_enum! {
    /// `criu_network_lock_method`: how CRIU keeps the network quiet while
    /// it dumps.
    NetworkLockMethod {
        /// `IPTABLES` (CRIU's default).
        Iptables = 1,
        /// `NFTABLES` (CRIU built with libnftables).
        Nftables = 2,
        /// `SKIP`: no network lock at all.
        Skip = 3,
    }
}

wire_enum! {
    /// `criu_pre_dump_mode`: how a pre-dump reads memory.
    PreDumpMode {
        /// `SPLICE` (default): vmsplice pages out of the frozen task.
        Splice = 1,
        /// `VM_READ`: `process_vm_readv` after the task runs again (shorter
        /// freeze).
        VmRead = 2,
    }
}

fn enum_field<T>(f: &Field<'_>, what: &str, conv: fn(u64) -> Option<T>) -> DecodeResult<T> {
    let v = f.as_u64()?;
    conv(v).ok_or_else(|| format!("unknown {what} value {v}"))
}

fn ctx<T>(what: &str, r: DecodeResult<T>) -> DecodeResult<T> {
    r.map_err(|e| format!("{what}: {e}"))
}

/// `criu_page_server_info`: where a page server listens, or which socket to
/// use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageServerInfo {
    /// Address to connect to (dump) or listen on (page server).
    pub address: Option<String>,
    /// TCP port; 0 lets the page server pick one.
    pub port: Option<i32>,
    /// Page server pid (in responses).
    pub pid: Option<i32>,
    /// A connected socket fd in the CRIU process (swrk only).
    pub fd: Option<i32>,
}

impl PageServerInfo {
    fn encode(&self, e: &mut Encoder) {
        if let Some(v) = &self.address {
            e.string(1, v);
        }
        if let Some(v) = self.port {
            e.int32(2, v);
        }
        if let Some(v) = self.pid {
            e.int32(3, v);
        }
        if let Some(v) = self.fd {
            e.int32(4, v);
        }
    }

    fn decode(buf: &[u8]) -> DecodeResult<Self> {
        let mut m = Self::default();
        for (n, f) in fields(buf)? {
            match n {
                1 => m.address = Some(ctx("address", f.as_string())?),
                2 => m.port = Some(ctx("port", f.as_i32())?),
                3 => m.pid = Some(ctx("pid", f.as_i32())?),
                4 => m.fd = Some(ctx("fd", f.as_i32())?),
                _ => {}
            }
        }
        Ok(m)
    }
}

/// A required string field, or an error naming it.
fn required<T>(v: Option<T>, msg: &str, field: &str) -> DecodeResult<T> {
    v.ok_or_else(|| format!("{msg}: required field `{field}` missing"))
}

/// `ext_mount_map`: an external mount (`key` in the image, `val` on restore).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtMountMap {
    /// Mount point or key.
    pub key: String,
    /// Value.
    pub val: String,
}

/// `join_namespace`: restore into an existing namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JoinNamespace {
    /// Namespace kind (`net`, `ipc`, ...).
    pub ns: String,
    /// Path to the namespace file (`/proc/PID/ns/net`).
    pub ns_file: String,
    /// Extra option (user namespace uid/gid).
    pub extra_opt: Option<String>,
}

/// `inherit_fd`: an fd of the CRIU process that replaces the resource `key`
/// on restore (swrk only: the fd must be open in the spawned CRIU).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InheritFd {
    /// Resource key (`pipe:[1234]`, `file[...]`).
    pub key: String,
    /// The fd number, open in the CRIU process.
    pub fd: i32,
}

/// `cgroup_root`: where to restore a controller's cgroups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupRoot {
    /// Controller, or all when `None`.
    pub ctrl: Option<String>,
    /// Path.
    pub path: String,
}

fn encode_pair(e: &mut Encoder, field: u32, a: &str, b: &str) {
    e.message(field, |m| {
        m.string(1, a);
        m.string(2, b);
    });
}

fn decode_ext_mnt(buf: &[u8]) -> DecodeResult<ExtMountMap> {
    let (mut key, mut val) = (None, None);
    for (n, f) in fields(buf)? {
        match n {
            1 => key = Some(f.as_string()?),
            2 => val = Some(f.as_string()?),
            _ => {}
        }
    }
    Ok(ExtMountMap {
        key: required(key, "ext_mount_map", "key")?,
        val: required(val, "ext_mount_map", "val")?,
    })
}

fn decode_join_ns(buf: &[u8]) -> DecodeResult<JoinNamespace> {
    let (mut ns, mut ns_file, mut extra_opt) = (None, None, None);
    for (n, f) in fields(buf)? {
        match n {
            1 => ns = Some(f.as_string()?),
            2 => ns_file = Some(f.as_string()?),
            3 => extra_opt = Some(f.as_string()?),
            _ => {}
        }
    }
    Ok(JoinNamespace {
        ns: required(ns, "join_namespace", "ns")?,
        ns_file: required(ns_file, "join_namespace", "ns_file")?,
        extra_opt,
    })
}

fn decode_inherit_fd(buf: &[u8]) -> DecodeResult<InheritFd> {
    let (mut key, mut fd) = (None, None);
    for (n, f) in fields(buf)? {
        match n {
            1 => key = Some(f.as_string()?),
            2 => fd = Some(f.as_i32()?),
            _ => {}
        }
    }
    Ok(InheritFd {
        key: required(key, "inherit_fd", "key")?,
        fd: required(fd, "inherit_fd", "fd")?,
    })
}

fn decode_cg_root(buf: &[u8]) -> DecodeResult<CgroupRoot> {
    let (mut ctrl, mut path) = (None, None);
    for (n, f) in fields(buf)? {
        match n {
            1 => ctrl = Some(f.as_string()?),
            2 => path = Some(f.as_string()?),
            _ => {}
        }
    }
    Ok(CgroupRoot {
        ctrl,
        path: required(path, "cgroup_root", "path")?,
    })
}

/// `criu_opts`: everything a dump, pre-dump, restore or page server request
/// tells CRIU. Field numbers are CRIU's; `None` leaves CRIU's default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriuOpts {
    /// Images directory as an fd of the requesting process (CRIU opens
    /// `/proc/<peer>/fd/<fd>`); -1 means "use `images_dir`". Required on
    /// the wire. [`super::CriuClient`] fills it in.
    pub images_dir_fd: i32,
    /// Images directory path, used only when `images_dir_fd == -1`.
    pub images_dir: Option<String>,
    /// Root pid of the tree to dump.
    pub pid: Option<i32>,
    /// Keep the tree running after the dump (`--leave-running`).
    pub leave_running: Option<bool>,
    /// Allow external unix sockets (`--ext-unix-sk`).
    pub ext_unix_sk: Option<bool>,
    /// Dump/restore established TCP connections (`--tcp-established`).
    pub tcp_established: Option<bool>,
    /// Allow device files that changed (`--evasive-devices`).
    pub evasive_devices: Option<bool>,
    /// The tree is a shell job: its session/tty is outside (`--shell-job`).
    pub shell_job: Option<bool>,
    /// Dump/restore file locks (`--file-locks`).
    pub file_locks: Option<bool>,
    /// 0..4; CRIU's default is 2.
    pub log_level: Option<i32>,
    /// Log file name inside the work dir (no `/`).
    pub log_file: Option<String>,
    /// Page server to send pages to (dump), or to listen as (page server).
    pub ps: Option<PageServerInfo>,
    /// Send action-script notifications over RPC.
    pub notify_scripts: Option<bool>,
    /// Root of the restored tree (`--root`).
    pub root: Option<String>,
    /// Parent images dir, relative to the images dir (pre-copy).
    pub parent_img: Option<String>,
    /// Track memory changes for a later incremental dump (`--track-mem`).
    pub track_mem: Option<bool>,
    /// Punch holes in parent images as pages are rewritten (`--auto-dedup`).
    pub auto_dedup: Option<bool>,
    /// Work dir as an fd of the requesting process.
    pub work_dir_fd: Option<i32>,
    /// Allow link remaps of unlinked open files (`--link-remap`).
    pub link_remap: Option<bool>,
    /// CPU capability checks (`--cpu-cap`), a bit mask.
    pub cpu_cap: Option<u32>,
    /// Force inotify/fanotify path resolution (`--force-irmap`).
    pub force_irmap: Option<bool>,
    /// Command CRIU execs after a restore (`--exec-cmd`).
    pub exec_cmd: Vec<String>,
    /// External mount map (deprecated in CRIU in favour of `external`).
    pub ext_mnt: Vec<ExtMountMap>,
    /// Manage cgroups in soft mode (`--manage-cgroups`).
    pub manage_cgroups: Option<bool>,
    /// Cgroup roots for restore (`--cgroup-root`).
    pub cg_root: Vec<CgroupRoot>,
    /// Restore the root task as a sibling of CRIU, i.e. a child of the
    /// client (swrk only).
    pub rst_sibling: Option<bool>,
    /// Fds that replace resources on restore (`--inherit-fd`).
    pub inherit_fd: Vec<InheritFd>,
    /// Detect external mounts automatically (`--ext-mount-map auto`).
    pub auto_ext_mnt: Option<bool>,
    /// Allow external sharing for auto mounts (`--enable-external-sharing`).
    pub ext_sharing: Option<bool>,
    /// Allow external masters for auto mounts (`--enable-external-masters`).
    pub ext_masters: Option<bool>,
    /// Mount points not to dump (`--skip-mnt`).
    pub skip_mnt: Vec<String>,
    /// File systems to dump as external (`--enable-fs`).
    pub enable_fs: Vec<String>,
    /// Cgroup management mode (`--manage-cgroups=MODE`).
    pub manage_cgroups_mode: Option<CgMode>,
    /// Largest deleted-but-open file to dump, bytes (`--ghost-limit`).
    pub ghost_limit: Option<u32>,
    /// Paths for inotify path resolution (`--irmap-scan-path`).
    pub irmap_scan_paths: Vec<String>,
    /// External resources (`--external`: `mnt[...]`, `net[...]`, `veth[...]`, ...).
    pub external: Vec<String>,
    /// Namespaces (CLONE_NEW* bits; only CLONE_NEWNET) to restore empty.
    pub empty_ns: Option<u32>,
    /// Namespaces to join on restore (`--join-ns`).
    pub join_ns: Vec<JoinNamespace>,
    /// Cgroup properties to dump, inline (`--cgroup-props`).
    pub cgroup_props: Option<String>,
    /// Cgroup properties to dump, from a file (`--cgroup-props-file`).
    pub cgroup_props_file: Option<String>,
    /// Cgroup controllers to dump (`--cgroup-dump-controller`).
    pub cgroup_dump_controller: Vec<String>,
    /// Freezer cgroup to freeze the tree with, instead of ptrace alone.
    pub freeze_cgroup: Option<String>,
    /// CRIU's own timeout for freezing, seconds.
    pub timeout: Option<u32>,
    /// Skip half-open TCP connections (`--skip-in-flight`).
    pub tcp_skip_in_flight: Option<bool>,
    /// Skip sysctls the kernel lacks (`--weak-sysctls`).
    pub weak_sysctls: Option<bool>,
    /// Lazy pages: dump serves memory on demand; restore fetches it through userfaultfd (`--lazy-pages`).
    pub lazy_pages: Option<bool>,
    /// An fd of the requesting process CRIU writes `\0` to when ready
    /// (obsolete in CRIU: prefer the `status-ready` notification).
    pub status_fd: Option<i32>,
    /// Hand the pty master of an orphan pts to the client (`--orphan-pts-master`; a `orphan-pts-master` notification carries the fd).
    pub orphan_pts_master: Option<bool>,
    /// A CRIU configuration file that overrides these options (`--config`).
    pub config_file: Option<String>,
    /// Restore TCP connections closed (`--tcp-close`).
    pub tcp_close: Option<bool>,
    /// LSM profile for restored tasks (`--lsm-profile`).
    pub lsm_profile: Option<String>,
    /// Where CRIU mounts cgroup controllers (`--cgroup-yard`).
    pub cgroup_yard: Option<String>,
    /// How a pre-dump reads memory (`--pre-dump-mode`).
    pub pre_dump_mode: Option<PreDumpMode>,
    /// Socket of a pidfd store (client fd).
    pub pidfd_store_sk: Option<i32>,
    /// SELinux mount context (`--lsm-mount-context`).
    pub lsm_mount_context: Option<String>,
    /// Network lock method (`--network-lock`).
    pub network_lock: Option<NetworkLockMethod>,
    /// Old mount namespace engine (`--mntns-compat-mode`).
    pub mntns_compat_mode: Option<bool>,
    /// Skip the file permission check on restore (`--skip-file-rwx-check`).
    pub skip_file_rwx_check: Option<bool>,
    /// Run without CAP_SYS_ADMIN (`--unprivileged`).
    pub unprivileged: Option<bool>,
    /// Leave the tree stopped after a dump or restore (`--leave-stopped`).
    pub leave_stopped: Option<bool>,
    /// Print statistics to the log (`--display-stats`).
    pub display_stats: Option<bool>,
    /// Log to CRIU's stderr instead of a file (`--log-file=-`).
    pub log_to_stderr: Option<bool>,
}

impl Default for CriuOpts {
    fn default() -> Self {
        CriuOpts {
            images_dir_fd: -1,
            images_dir: None,
            pid: None,
            leave_running: None,
            ext_unix_sk: None,
            tcp_established: None,
            evasive_devices: None,
            shell_job: None,
            file_locks: None,
            log_level: None,
            log_file: None,
            ps: None,
            notify_scripts: None,
            root: None,
            parent_img: None,
            track_mem: None,
            auto_dedup: None,
            work_dir_fd: None,
            link_remap: None,
            cpu_cap: None,
            force_irmap: None,
            exec_cmd: Vec::new(),
            ext_mnt: Vec::new(),
            manage_cgroups: None,
            cg_root: Vec::new(),
            rst_sibling: None,
            inherit_fd: Vec::new(),
            auto_ext_mnt: None,
            ext_sharing: None,
            ext_masters: None,
            skip_mnt: Vec::new(),
            enable_fs: Vec::new(),
            manage_cgroups_mode: None,
            ghost_limit: None,
            irmap_scan_paths: Vec::new(),
            external: Vec::new(),
            empty_ns: None,
            join_ns: Vec::new(),
            cgroup_props: None,
            cgroup_props_file: None,
            cgroup_dump_controller: Vec::new(),
            freeze_cgroup: None,
            timeout: None,
            tcp_skip_in_flight: None,
            weak_sysctls: None,
            lazy_pages: None,
            status_fd: None,
            orphan_pts_master: None,
            config_file: None,
            tcp_close: None,
            lsm_profile: None,
            cgroup_yard: None,
            pre_dump_mode: None,
            pidfd_store_sk: None,
            lsm_mount_context: None,
            network_lock: None,
            mntns_compat_mode: None,
            skip_file_rwx_check: None,
            unprivileged: None,
            leave_stopped: None,
            display_stats: None,
            log_to_stderr: None,
        }
    }
}

impl CriuOpts {
    /// Appends this message's fields to `e`.
    fn encode(&self, e: &mut Encoder) {
        fn b(e: &mut Encoder, n: u32, v: Option<bool>) {
            if let Some(v) = v {
                e.bool(n, v);
            }
        }
        fn i(e: &mut Encoder, n: u32, v: Option<i32>) {
            if let Some(v) = v {
                e.int32(n, v);
            }
        }
        fn u(e: &mut Encoder, n: u32, v: Option<u32>) {
            if let Some(v) = v {
                e.varint(n, u64::from(v));
            }
        }
        fn s(e: &mut Encoder, n: u32, v: &Option<String>) {
            if let Some(v) = v {
                e.string(n, v);
            }
        }
        fn rs(e: &mut Encoder, n: u32, v: &[String]) {
            for x in v {
                e.string(n, x);
            }
        }
        e.int32(1, self.images_dir_fd);
        i(e, 2, self.pid);
        b(e, 3, self.leave_running);
        b(e, 4, self.ext_unix_sk);
        b(e, 5, self.tcp_established);
        b(e, 6, self.evasive_devices);
        b(e, 7, self.shell_job);
        b(e, 8, self.file_locks);
        i(e, 9, self.log_level);
        s(e, 10, &self.log_file);
        if let Some(ps) = &self.ps {
            e.message(11, |m| ps.encode(m));
        }
        b(e, 12, self.notify_scripts);
        s(e, 13, &self.root);
        s(e, 14, &self.parent_img);
        b(e, 15, self.track_mem);
        b(e, 16, self.auto_dedup);
        i(e, 17, self.work_dir_fd);
        b(e, 18, self.link_remap);
        u(e, 20, self.cpu_cap);
        b(e, 21, self.force_irmap);
        rs(e, 22, &self.exec_cmd);
        for m in &self.ext_mnt {
            encode_pair(e, 23, &m.key, &m.val);
        }
        b(e, 24, self.manage_cgroups);
        for r in &self.cg_root {
            e.message(25, |m| {
                if let Some(c) = &r.ctrl {
                    m.string(1, c);
                }
                m.string(2, &r.path);
            });
        }
        b(e, 26, self.rst_sibling);
        for x in &self.inherit_fd {
            e.message(27, |m| {
                m.string(1, &x.key);
                m.int32(2, x.fd);
            });
        }
        b(e, 28, self.auto_ext_mnt);
        b(e, 29, self.ext_sharing);
        b(e, 30, self.ext_masters);
        rs(e, 31, &self.skip_mnt);
        rs(e, 32, &self.enable_fs);
        if let Some(v) = self.manage_cgroups_mode {
            e.varint(34, v.to_wire());
        }
        u(e, 35, self.ghost_limit);
        rs(e, 36, &self.irmap_scan_paths);
        rs(e, 37, &self.external);
        u(e, 38, self.empty_ns);
        for j in &self.join_ns {
            e.message(39, |m| {
                m.string(1, &j.ns);
                m.string(2, &j.ns_file);
                if let Some(x) = &j.extra_opt {
                    m.string(3, x);
                }
            });
        }
        s(e, 41, &self.cgroup_props);
        s(e, 42, &self.cgroup_props_file);
        rs(e, 43, &self.cgroup_dump_controller);
        s(e, 44, &self.freeze_cgroup);
        u(e, 45, self.timeout);
        b(e, 46, self.tcp_skip_in_flight);
        b(e, 47, self.weak_sysctls);
        b(e, 48, self.lazy_pages);
        i(e, 49, self.status_fd);
        b(e, 50, self.orphan_pts_master);
        s(e, 51, &self.config_file);
        b(e, 52, self.tcp_close);
        s(e, 53, &self.lsm_profile);
        s(e, 60, &self.cgroup_yard);
        if let Some(v) = self.pre_dump_mode {
            e.varint(61, v.to_wire());
        }
        i(e, 62, self.pidfd_store_sk);
        s(e, 63, &self.lsm_mount_context);
        if let Some(v) = self.network_lock {
            e.varint(64, v.to_wire());
        }
        b(e, 65, self.mntns_compat_mode);
        b(e, 66, self.skip_file_rwx_check);
        b(e, 67, self.unprivileged);
        s(e, 68, &self.images_dir);
        b(e, 69, self.leave_stopped);
        b(e, 70, self.display_stats);
        b(e, 71, self.log_to_stderr);
    }

    /// Decodes a `criu_opts` message.
    pub fn decode(buf: &[u8]) -> DecodeResult<Self> {
        let mut o = CriuOpts::default();
        let mut saw_images_dir_fd = false;
        for (n, f) in ctx("criu_opts", fields(buf))? {
            let r: DecodeResult<()> = (|| {
                match n {
                    1 => {
                        o.images_dir_fd = f.as_i32()?;
                        saw_images_dir_fd = true;
                    }
                    2 => o.pid = Some(f.as_i32()?),
                    3 => o.leave_running = Some(f.as_bool()?),
                    4 => o.ext_unix_sk = Some(f.as_bool()?),
                    5 => o.tcp_established = Some(f.as_bool()?),
                    6 => o.evasive_devices = Some(f.as_bool()?),
                    7 => o.shell_job = Some(f.as_bool()?),
                    8 => o.file_locks = Some(f.as_bool()?),
                    9 => o.log_level = Some(f.as_i32()?),
                    10 => o.log_file = Some(f.as_string()?),
                    11 => o.ps = Some(PageServerInfo::decode(f.as_bytes()?)?),
                    12 => o.notify_scripts = Some(f.as_bool()?),
                    13 => o.root = Some(f.as_string()?),
                    14 => o.parent_img = Some(f.as_string()?),
                    15 => o.track_mem = Some(f.as_bool()?),
                    16 => o.auto_dedup = Some(f.as_bool()?),
                    17 => o.work_dir_fd = Some(f.as_i32()?),
                    18 => o.link_remap = Some(f.as_bool()?),
                    20 => o.cpu_cap = Some(f.as_u32()?),
                    21 => o.force_irmap = Some(f.as_bool()?),
                    22 => o.exec_cmd.push(f.as_string()?),
                    23 => o.ext_mnt.push(decode_ext_mnt(f.as_bytes()?)?),
                    24 => o.manage_cgroups = Some(f.as_bool()?),
                    25 => o.cg_root.push(decode_cg_root(f.as_bytes()?)?),
                    26 => o.rst_sibling = Some(f.as_bool()?),
                    27 => o.inherit_fd.push(decode_inherit_fd(f.as_bytes()?)?),
                    28 => o.auto_ext_mnt = Some(f.as_bool()?),
                    29 => o.ext_sharing = Some(f.as_bool()?),
                    30 => o.ext_masters = Some(f.as_bool()?),
                    31 => o.skip_mnt.push(f.as_string()?),
                    32 => o.enable_fs.push(f.as_string()?),
                    34 => {
                        o.manage_cgroups_mode =
                            Some(enum_field(&f, "criu_cg_mode", CgMode::from_wire)?)
                    }
                    35 => o.ghost_limit = Some(f.as_u32()?),
                    36 => o.irmap_scan_paths.push(f.as_string()?),
                    37 => o.external.push(f.as_string()?),
                    38 => o.empty_ns = Some(f.as_u32()?),
                    39 => o.join_ns.push(decode_join_ns(f.as_bytes()?)?),
                    41 => o.cgroup_props = Some(f.as_string()?),
                    42 => o.cgroup_props_file = Some(f.as_string()?),
                    43 => o.cgroup_dump_controller.push(f.as_string()?),
                    44 => o.freeze_cgroup = Some(f.as_string()?),
                    45 => o.timeout = Some(f.as_u32()?),
                    46 => o.tcp_skip_in_flight = Some(f.as_bool()?),
                    47 => o.weak_sysctls = Some(f.as_bool()?),
                    48 => o.lazy_pages = Some(f.as_bool()?),
                    49 => o.status_fd = Some(f.as_i32()?),
                    50 => o.orphan_pts_master = Some(f.as_bool()?),
                    51 => o.config_file = Some(f.as_string()?),
                    52 => o.tcp_close = Some(f.as_bool()?),
                    53 => o.lsm_profile = Some(f.as_string()?),
                    60 => o.cgroup_yard = Some(f.as_string()?),
                    61 => {
                        o.pre_dump_mode = Some(enum_field(
                            &f,
                            "criu_pre_dump_mode",
                            PreDumpMode::from_wire,
                        )?)
                    }
                    62 => o.pidfd_store_sk = Some(f.as_i32()?),
                    63 => o.lsm_mount_context = Some(f.as_string()?),
                    64 => {
                        o.network_lock = Some(enum_field(
                            &f,
                            "criu_network_lock_method",
                            NetworkLockMethod::from_wire,
                        )?)
                    }
                    65 => o.mntns_compat_mode = Some(f.as_bool()?),
                    66 => o.skip_file_rwx_check = Some(f.as_bool()?),
                    67 => o.unprivileged = Some(f.as_bool()?),
                    68 => o.images_dir = Some(f.as_string()?),
                    69 => o.leave_stopped = Some(f.as_bool()?),
                    70 => o.display_stats = Some(f.as_bool()?),
                    71 => o.log_to_stderr = Some(f.as_bool()?),
                    _ => {}
                }
                Ok(())
            })();
            r.map_err(|e| format!("criu_opts field {n}: {e}"))?;
        }
        if !saw_images_dir_fd {
            return Err("criu_opts: required field `images_dir_fd` missing".into());
        }
        Ok(o)
    }
}

/// `criu_features`: the features a `FEATURE_CHECK` asks about, and the
/// answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CriuFeaturesMsg {
    /// Memory dirty tracking (soft-dirty): pre-dump / pre-copy.
    pub mem_track: Option<bool>,
    /// userfaultfd-based lazy pages (post-copy restore).
    pub lazy_pages: Option<bool>,
    /// pidfd store (pidfd_open + pidfd_getfd).
    pub pidfd_store: Option<bool>,
}

impl CriuFeaturesMsg {
    fn encode(&self, e: &mut Encoder) {
        for (n, v) in [
            (1, self.mem_track),
            (2, self.lazy_pages),
            (3, self.pidfd_store),
        ] {
            if let Some(v) = v {
                e.bool(n, v);
            }
        }
    }

    fn decode(buf: &[u8]) -> DecodeResult<Self> {
        let mut m = Self::default();
        for (n, f) in fields(buf)? {
            match n {
                1 => m.mem_track = Some(f.as_bool()?),
                2 => m.lazy_pages = Some(f.as_bool()?),
                3 => m.pidfd_store = Some(f.as_bool()?),
                _ => {}
            }
        }
        Ok(m)
    }
}

/// `criu_req`: a request to CRIU (or the answer to a notification).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriuReq {
    /// What is asked.
    pub req_type: ReqType,
    /// Options.
    pub opts: Option<CriuOpts>,
    /// For `NOTIFY` answers: whether the client's "script" succeeded.
    pub notify_success: Option<bool>,
    /// Keep the connection open for more requests (CRIU allows it only for
    /// page server, cpuinfo, feature check and version requests).
    pub keep_open: Option<bool>,
    /// For `FEATURE_CHECK`: the features to check (set to `true`).
    pub features: Option<CriuFeaturesMsg>,
    /// For `WAIT_PID`.
    pub pid: Option<u32>,
}

impl CriuReq {
    /// A request of type `t` with nothing else set.
    pub fn new(t: ReqType) -> Self {
        CriuReq {
            req_type: t,
            opts: None,
            notify_success: None,
            keep_open: None,
            features: None,
            pid: None,
        }
    }

    /// Encodes the request as one protobuf message.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::new();
        e.varint(1, self.req_type.to_wire());
        if let Some(o) = &self.opts {
            e.message(2, |m| o.encode(m));
        }
        if let Some(v) = self.notify_success {
            e.bool(3, v);
        }
        if let Some(v) = self.keep_open {
            e.bool(4, v);
        }
        if let Some(f) = &self.features {
            e.message(5, |m| f.encode(m));
        }
        if let Some(v) = self.pid {
            e.varint(6, u64::from(v));
        }
        e.finish()
    }

    /// Decodes a request.
    pub fn decode(buf: &[u8]) -> DecodeResult<Self> {
        let mut t = None;
        let mut r = CriuReq::new(ReqType::Empty);
        for (n, f) in ctx("criu_req", fields(buf))? {
            match n {
                1 => t = Some(enum_field(&f, "criu_req_type", ReqType::from_wire)?),
                2 => r.opts = Some(CriuOpts::decode(f.as_bytes()?)?),
                3 => r.notify_success = Some(ctx("notify_success", f.as_bool())?),
                4 => r.keep_open = Some(ctx("keep_open", f.as_bool())?),
                5 => r.features = Some(ctx("features", CriuFeaturesMsg::decode(f.as_bytes()?))?),
                6 => r.pid = Some(ctx("pid", f.as_u32())?),
                _ => {}
            }
        }
        r.req_type = required(t, "criu_req", "type")?;
        Ok(r)
    }
}

/// `criu_version`: CRIU's version, as `VERSION` answers it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CriuVersion {
    /// Major number (4).
    pub major: i32,
    /// Minor number (2).
    pub minor: i32,
    /// Git id, when CRIU was built from git.
    pub gitid: Option<String>,
    /// Sublevel (1 in 4.2.1).
    pub sublevel: Option<i32>,
    /// Extra number.
    pub extra: Option<i32>,
    /// Release name.
    pub name: Option<String>,
}

impl std::fmt::Display for CriuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)?;
        if let Some(s) = self.sublevel {
            write!(f, ".{s}")?;
        }
        if let Some(x) = self.extra {
            write!(f, ".{x}")?;
        }
        Ok(())
    }
}

impl CriuVersion {
    fn encode(&self, e: &mut Encoder) {
        e.int32(1, self.major);
        e.int32(2, self.minor);
        if let Some(v) = &self.gitid {
            e.string(3, v);
        }
        if let Some(v) = self.sublevel {
            e.int32(4, v);
        }
        if let Some(v) = self.extra {
            e.int32(5, v);
        }
        if let Some(v) = &self.name {
            e.string(6, v);
        }
    }

    fn decode(buf: &[u8]) -> DecodeResult<Self> {
        let (mut major, mut minor) = (None, None);
        let mut v = CriuVersion::default();
        for (n, f) in fields(buf)? {
            match n {
                1 => major = Some(f.as_i32()?),
                2 => minor = Some(f.as_i32()?),
                3 => v.gitid = Some(f.as_string()?),
                4 => v.sublevel = Some(f.as_i32()?),
                5 => v.extra = Some(f.as_i32()?),
                6 => v.name = Some(f.as_string()?),
                _ => {}
            }
        }
        v.major = required(major, "criu_version", "major_number")?;
        v.minor = required(minor, "criu_version", "minor_number")?;
        Ok(v)
    }
}

/// `criu_notify`: an action-script notification.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotifyMsg {
    /// The action (`pre-dump`, `post-dump`, `network-lock`, ...).
    pub script: Option<String>,
    /// The root pid, for `setup-namespaces` and `post-restore`.
    pub pid: Option<i32>,
}

/// `criu_resp`: CRIU's answer to a request, or a notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriuResp {
    /// The request type this answers (`NOTIFY` for notifications, `EMPTY`
    /// when CRIU could not read the request).
    pub resp_type: ReqType,
    /// Whether the request succeeded.
    pub success: bool,
    /// `criu_dump_resp.restored`: set when a self-dump got restored.
    pub dump_restored: Option<Option<bool>>,
    /// `criu_restore_resp.pid`: the restored root pid.
    pub restore_pid: Option<i32>,
    /// A notification.
    pub notify: Option<NotifyMsg>,
    /// Page server info (`PAGE_SERVER` answers).
    pub ps: Option<PageServerInfo>,
    /// CRIU's error number (`cr-errno.h`), if set.
    pub cr_errno: Option<i32>,
    /// Features (`FEATURE_CHECK` answers).
    pub features: Option<CriuFeaturesMsg>,
    /// CRIU's first logged error.
    pub cr_errmsg: Option<String>,
    /// Version (`VERSION` answers).
    pub version: Option<CriuVersion>,
    /// Wait status (`WAIT_PID` answers).
    pub status: Option<i32>,
}

impl CriuResp {
    /// A response of type `t` with nothing else set.
    pub fn new(t: ReqType, success: bool) -> Self {
        CriuResp {
            resp_type: t,
            success,
            dump_restored: None,
            restore_pid: None,
            notify: None,
            ps: None,
            cr_errno: None,
            features: None,
            cr_errmsg: None,
            version: None,
            status: None,
        }
    }

    /// Encodes the response (CRIU's side; used by tests and fakes).
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::new();
        e.varint(1, self.resp_type.to_wire());
        e.bool(2, self.success);
        if let Some(d) = self.dump_restored {
            e.message(3, |m| {
                if let Some(r) = d {
                    m.bool(1, r);
                }
            });
        }
        if let Some(pid) = self.restore_pid {
            e.message(4, |m| m.int32(1, pid));
        }
        if let Some(n) = &self.notify {
            e.message(5, |m| {
                if let Some(s) = &n.script {
                    m.string(1, s);
                }
                if let Some(p) = n.pid {
                    m.int32(2, p);
                }
            });
        }
        if let Some(ps) = &self.ps {
            e.message(6, |m| ps.encode(m));
        }
        if let Some(v) = self.cr_errno {
            e.int32(7, v);
        }
        if let Some(f) = &self.features {
            e.message(8, |m| f.encode(m));
        }
        if let Some(v) = &self.cr_errmsg {
            e.string(9, v);
        }
        if let Some(v) = &self.version {
            e.message(10, |m| v.encode(m));
        }
        if let Some(v) = self.status {
            e.int32(11, v);
        }
        e.finish()
    }

    /// Decodes a response; an error says what was wrong with it.
    pub fn decode(buf: &[u8]) -> DecodeResult<Self> {
        let (mut t, mut success) = (None, None);
        let mut r = CriuResp::new(ReqType::Empty, false);
        for (n, f) in ctx("criu_resp", fields(buf))? {
            let res: DecodeResult<()> = (|| {
                match n {
                    1 => t = Some(enum_field(&f, "criu_req_type", ReqType::from_wire)?),
                    2 => success = Some(f.as_bool()?),
                    3 => {
                        let mut restored = None;
                        for (k, g) in fields(f.as_bytes()?)? {
                            if k == 1 {
                                restored = Some(g.as_bool()?);
                            }
                        }
                        r.dump_restored = Some(restored);
                    }
                    4 => {
                        let mut pid = None;
                        for (k, g) in fields(f.as_bytes()?)? {
                            if k == 1 {
                                pid = Some(g.as_i32()?);
                            }
                        }
                        r.restore_pid = Some(required(pid, "criu_restore_resp", "pid")?);
                    }
                    5 => {
                        let mut m = NotifyMsg::default();
                        for (k, g) in fields(f.as_bytes()?)? {
                            match k {
                                1 => m.script = Some(g.as_string()?),
                                2 => m.pid = Some(g.as_i32()?),
                                _ => {}
                            }
                        }
                        r.notify = Some(m);
                    }
                    6 => r.ps = Some(PageServerInfo::decode(f.as_bytes()?)?),
                    7 => r.cr_errno = Some(f.as_i32()?),
                    8 => r.features = Some(CriuFeaturesMsg::decode(f.as_bytes()?)?),
                    9 => r.cr_errmsg = Some(f.as_string()?),
                    10 => r.version = Some(CriuVersion::decode(f.as_bytes()?)?),
                    11 => r.status = Some(f.as_i32()?),
                    _ => {}
                }
                Ok(())
            })();
            res.map_err(|e| format!("criu_resp field {n}: {e}"))?;
        }
        r.resp_type = required(t, "criu_resp", "type")?;
        r.success = required(success, "criu_resp", "success")?;
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full_opts() -> CriuOpts {
        CriuOpts {
            images_dir_fd: 7,
            images_dir: Some("/dev/shm/x".into()),
            pid: Some(1234),
            leave_running: Some(true),
            ext_unix_sk: Some(true),
            tcp_established: Some(false),
            evasive_devices: Some(true),
            shell_job: Some(false),
            file_locks: Some(true),
            log_level: Some(4),
            log_file: Some("dump.log".into()),
            ps: Some(PageServerInfo {
                address: Some("127.0.0.1".into()),
                port: Some(27000),
                pid: Some(-1),
                fd: Some(9),
            }),
            notify_scripts: Some(true),
            root: Some("/run/c/rootfs".into()),
            parent_img: Some("../pre1".into()),
            track_mem: Some(true),
            auto_dedup: Some(false),
            work_dir_fd: Some(8),
            link_remap: Some(true),
            cpu_cap: Some(0xffff_ffff),
            force_irmap: Some(true),
            exec_cmd: vec!["a".into(), "b".into()],
            ext_mnt: vec![ExtMountMap {
                key: "/etc/hosts".into(),
                val: "/etc/hosts".into(),
            }],
            manage_cgroups: Some(true),
            cg_root: vec![
                CgroupRoot {
                    ctrl: None,
                    path: "/a".into(),
                },
                CgroupRoot {
                    ctrl: Some("memory".into()),
                    path: "/b".into(),
                },
            ],
            rst_sibling: Some(true),
            inherit_fd: vec![InheritFd {
                key: "pipe:[1]".into(),
                fd: 5,
            }],
            auto_ext_mnt: Some(true),
            ext_sharing: Some(false),
            ext_masters: Some(true),
            skip_mnt: vec!["/proc".into()],
            enable_fs: vec!["fuse".into()],
            manage_cgroups_mode: Some(CgMode::Soft),
            ghost_limit: Some(1 << 20),
            irmap_scan_paths: vec!["/".into()],
            external: vec!["mnt[/x]:y".into(), "net[1]:z".into()],
            empty_ns: Some(0x4000_0000),
            join_ns: vec![JoinNamespace {
                ns: "net".into(),
                ns_file: "/proc/1/ns/net".into(),
                extra_opt: Some("x".into()),
            }],
            cgroup_props: Some("p".into()),
            cgroup_props_file: Some("/pf".into()),
            cgroup_dump_controller: vec!["cpu".into()],
            freeze_cgroup: Some("/sys/fs/cgroup/freezer/c".into()),
            timeout: Some(10),
            tcp_skip_in_flight: Some(true),
            weak_sysctls: Some(true),
            lazy_pages: Some(true),
            status_fd: Some(11),
            orphan_pts_master: Some(true),
            config_file: Some("/etc/criu/ms2m.conf".into()),
            tcp_close: Some(true),
            lsm_profile: Some("apparmor:x".into()),
            cgroup_yard: Some("/yard".into()),
            pre_dump_mode: Some(PreDumpMode::VmRead),
            pidfd_store_sk: Some(12),
            lsm_mount_context: Some("ctx".into()),
            network_lock: Some(NetworkLockMethod::Nftables),
            mntns_compat_mode: Some(false),
            skip_file_rwx_check: Some(true),
            unprivileged: Some(false),
            leave_stopped: Some(false),
            display_stats: Some(true),
            log_to_stderr: Some(false),
        }
    }

    #[test]
    fn request_round_trip_every_type() {
        for t in 0..=13 {
            let t = ReqType::from_wire(t).unwrap();
            let mut r = CriuReq::new(t);
            assert_eq!(CriuReq::decode(&r.encode()).unwrap(), r);
            r.opts = Some(full_opts());
            r.notify_success = Some(true);
            r.keep_open = Some(false);
            r.features = Some(CriuFeaturesMsg {
                mem_track: Some(true),
                lazy_pages: Some(false),
                pidfd_store: None,
            });
            r.pid = Some(42);
            assert_eq!(CriuReq::decode(&r.encode()).unwrap(), r);
        }
        assert_eq!(ReqType::from_wire(14), None);
    }

    #[test]
    fn default_opts_round_trip_and_carry_required_field() {
        let o = CriuOpts::default();
        let mut e = Encoder::new();
        o.encode(&mut e);
        let buf = e.finish();
        // images_dir_fd = -1 is always written (required in proto2)
        assert_eq!(buf[0], 0x08);
        assert_eq!(CriuOpts::decode(&buf).unwrap(), o);
        assert!(CriuOpts::decode(&[]).is_err());
    }

    #[test]
    fn response_round_trip_every_shape() {
        let mut shapes = vec![CriuResp::new(ReqType::Empty, false)];
        let mut r = CriuResp::new(ReqType::Dump, true);
        r.dump_restored = Some(Some(false));
        shapes.push(r.clone());
        r.dump_restored = Some(None);
        shapes.push(r);
        let mut r = CriuResp::new(ReqType::Restore, true);
        r.restore_pid = Some(4321);
        shapes.push(r);
        let mut r = CriuResp::new(ReqType::Notify, true);
        r.notify = Some(NotifyMsg {
            script: Some("post-dump".into()),
            pid: Some(7),
        });
        shapes.push(r);
        let mut r = CriuResp::new(ReqType::PageServer, true);
        r.ps = Some(PageServerInfo {
            address: None,
            port: Some(1234),
            pid: Some(99),
            fd: None,
        });
        shapes.push(r);
        let mut r = CriuResp::new(ReqType::FeatureCheck, true);
        r.features = Some(CriuFeaturesMsg {
            mem_track: Some(false),
            lazy_pages: Some(true),
            pidfd_store: Some(true),
        });
        shapes.push(r);
        let mut r = CriuResp::new(ReqType::Version, true);
        r.version = Some(CriuVersion {
            major: 4,
            minor: 2,
            gitid: Some("v4.2.1".into()),
            sublevel: Some(1),
            extra: Some(0),
            name: Some("x".into()),
        });
        shapes.push(r);
        let mut r = CriuResp::new(ReqType::Dump, false);
        r.cr_errno = Some(-22);
        r.cr_errmsg = Some("Error (criu/cr-dump.c:1): boom".into());
        shapes.push(r);
        let mut r = CriuResp::new(ReqType::WaitPid, true);
        r.status = Some(256);
        shapes.push(r);
        for r in shapes {
            assert_eq!(CriuResp::decode(&r.encode()).unwrap(), r, "{r:?}");
        }
    }

    #[test]
    fn version_display() {
        let v = CriuVersion {
            major: 4,
            minor: 2,
            sublevel: Some(1),
            ..Default::default()
        };
        assert_eq!(v.to_string(), "4.2.1");
    }

    #[test]
    fn truncated_and_garbage_input_are_errors() {
        let mut r = CriuResp::new(ReqType::Version, true);
        r.version = Some(CriuVersion {
            major: 4,
            minor: 2,
            gitid: Some("v4.2.1".into()),
            ..Default::default()
        });
        let buf = r.encode();
        for cut in 1..buf.len() {
            // every strict prefix either fails or lacks something; none may panic
            if let Ok(d) = CriuResp::decode(&buf[..cut]) {
                assert_ne!(d, r, "prefix {cut} decoded to the full message");
            }
        }
        assert!(CriuResp::decode(&[]).is_err(), "missing required fields");
        assert!(CriuResp::decode(&[0xff, 0xff, 0xff]).is_err());
        assert!(CriuResp::decode(&[0x0f]).is_err(), "wire type 7");
        // type = 99 is not a criu_req_type
        assert!(CriuResp::decode(&[0x08, 99, 0x10, 1]).is_err());
        // success as a string
        assert!(CriuResp::decode(&[0x08, 1, 0x12, 1, b'x']).is_err());
        // version without its required major number
        assert!(CriuResp::decode(&[0x08, 10, 0x10, 1, 0x52, 2, 0x10, 2]).is_err());
        // restore answer without pid
        assert!(CriuResp::decode(&[0x08, 2, 0x10, 1, 0x22, 0]).is_err());
        assert!(CriuReq::decode(&[0x12, 0]).is_err(), "req without type");
        let mut e = Encoder::new();
        e.varint(1, 1);
        e.message(2, |m| m.varint(34, 77));
        assert!(CriuReq::decode(&e.finish()).is_err(), "unknown cg mode");
    }

    #[test]
    fn unknown_fields_are_skipped() {
        let mut r = CriuResp::new(ReqType::Check, true).encode();
        let mut e = Encoder::new();
        e.string(1000, "future");
        r.extend(e.finish());
        assert_eq!(
            CriuResp::decode(&r).unwrap(),
            CriuResp::new(ReqType::Check, true)
        );
    }
}
