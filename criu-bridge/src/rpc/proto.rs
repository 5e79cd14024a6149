//! CRIU's RPC messages (`images/rpc.proto` of CRIU 4.2.1): the types
//! protobuf-codegen generates from the vendored `proto/rpc.proto` (see
//! `build.rs`), under the names the rest of ms2m uses, and the few helpers
//! around them.
//!
//! The types are proto2 ones: an optional or required scalar field is an
//! `Option` (written only when `Some`), a repeated one a `Vec`, a nested
//! message a [`MessageField`], an enum field an `Option<`[`EnumOrUnknown`]`>`
//! (`Some(CgMode::IGNORE.into())`). Encoding fails if a required field is
//! unset; decoding checks required fields, skips unknown ones, and
//! [`decode_response`] refuses a request type CRIU 4.2.1 does not define.

use protobuf::Message;

pub use crate::proto::rpc::*;
pub use crate::proto::rpc::{
    Cgroup_root as CgroupRoot, Criu_cg_mode as CgMode, Criu_features as CriuFeaturesMsg,
    Criu_notify as NotifyMsg, Criu_opts as CriuOpts, Criu_page_server_info as PageServerInfo,
    Criu_pre_dump_mode as PreDumpMode, Criu_req as CriuReq, Criu_req_type as ReqType,
    Criu_resp as CriuResp, Criu_version as CriuVersion, Ext_mount_map as ExtMountMap,
    Inherit_fd as InheritFd, Join_namespace as JoinNamespace,
};
pub use protobuf::{EnumOrUnknown, MessageField};

/// How CRIU keeps the network quiet while it dumps: ms2m's name for
/// `criu_network_lock_method`, which strategies choose, record and match on.
/// `.into()` turns it into [`CriuOpts::network_lock`]'s value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NetworkLockMethod {
    /// `IPTABLES` (CRIU's default).
    Iptables,
    /// `NFTABLES` (CRIU built with libnftables).
    Nftables,
    /// `SKIP`: no network lock at all.
    Skip,
}

impl From<NetworkLockMethod> for Criu_network_lock_method {
    fn from(m: NetworkLockMethod) -> Self {
        match m {
            NetworkLockMethod::Iptables => Criu_network_lock_method::IPTABLES,
            NetworkLockMethod::Nftables => Criu_network_lock_method::NFTABLES,
            NetworkLockMethod::Skip => Criu_network_lock_method::SKIP,
        }
    }
}

impl From<NetworkLockMethod> for EnumOrUnknown<Criu_network_lock_method> {
    fn from(m: NetworkLockMethod) -> Self {
        EnumOrUnknown::new(m.into())
    }
}

/// An `ext_mount_map` entry: mount `key` in the image, `val` on restore.
pub fn ext_mount(key: impl Into<String>, val: impl Into<String>) -> ExtMountMap {
    ExtMountMap {
        key: Some(key.into()),
        val: Some(val.into()),
        ..Default::default()
    }
}

/// A request of type `t` with nothing else set.
pub fn request(t: ReqType) -> CriuReq {
    let mut r = CriuReq::new();
    r.set_type(t);
    r
}

/// Encodes a request as one protobuf message; fails, saying so, when a
/// required field is unset (`images_dir_fd` in options, an `ext_mnt`
/// entry's `val`, ...).
pub fn encode_request(req: &CriuReq) -> Result<Vec<u8>, String> {
    req.write_to_bytes().map_err(|e| format!("criu_req: {e}"))
}

/// Decodes CRIU's answer (or notification); the error says what was wrong
/// with it.
pub fn decode_response(buf: &[u8]) -> Result<CriuResp, String> {
    let resp = CriuResp::parse_from_bytes(buf).map_err(|e| format!("criu_resp: {e}"))?;
    if let Some(Err(v)) = resp.type_.map(|t| t.enum_value()) {
        return Err(format!("criu_resp: unknown criu_req_type value {v}"));
    }
    Ok(resp)
}

/// `4.2.1`: major, minor, then sublevel and extra when CRIU sent them.
impl std::fmt::Display for CriuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major_number(), self.minor_number())?;
        for part in [self.sublevel, self.extra].into_iter().flatten() {
            write!(f, ".{part}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Every option ms2m knows of, set.
    fn full_opts() -> CriuOpts {
        CriuOpts {
            images_dir_fd: Some(7),
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
            ps: MessageField::some(PageServerInfo {
                address: Some("127.0.0.1".into()),
                port: Some(27000),
                pid: Some(-1),
                fd: Some(9),
                ..Default::default()
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
            ext_mnt: vec![ext_mount("/etc/hosts", "/etc/hosts")],
            manage_cgroups: Some(true),
            cg_root: vec![
                CgroupRoot {
                    path: Some("/a".into()),
                    ..Default::default()
                },
                CgroupRoot {
                    ctrl: Some("memory".into()),
                    path: Some("/b".into()),
                    ..Default::default()
                },
            ],
            rst_sibling: Some(true),
            inherit_fd: vec![InheritFd {
                key: Some("pipe:[1]".into()),
                fd: Some(5),
                ..Default::default()
            }],
            auto_ext_mnt: Some(true),
            ext_sharing: Some(false),
            ext_masters: Some(true),
            skip_mnt: vec!["/proc".into()],
            enable_fs: vec!["fuse".into()],
            manage_cgroups_mode: Some(CgMode::SOFT.into()),
            ghost_limit: Some(1 << 20),
            irmap_scan_paths: vec!["/".into()],
            external: vec!["mnt[/x]:y".into(), "net[1]:z".into()],
            empty_ns: Some(0x4000_0000),
            join_ns: vec![JoinNamespace {
                ns: Some("net".into()),
                ns_file: Some("/proc/1/ns/net".into()),
                extra_opt: Some("x".into()),
                ..Default::default()
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
            pre_dump_mode: Some(PreDumpMode::VM_READ.into()),
            pidfd_store_sk: Some(12),
            lsm_mount_context: Some("ctx".into()),
            network_lock: Some(NetworkLockMethod::Nftables.into()),
            mntns_compat_mode: Some(false),
            skip_file_rwx_check: Some(true),
            unprivileged: Some(false),
            leave_stopped: Some(false),
            display_stats: Some(true),
            log_to_stderr: Some(false),
            ..Default::default()
        }
    }

    // The bytes below were written by the hand-written encoder this module
    // replaced: the generated one must put the same requests on the wire.

    /// `full_opts()` in a `DUMP` request with every other request field set.
    /// The generated encoder writes `images_dir` (68) where `rpc.proto`
    /// declares it, after `images_dir_fd` (1); the old one wrote fields in
    /// number order. Protobuf readers (CRIU's protobuf-c too) take fields
    /// in any order.
    const FULL_REQ: &str = "080112ae03080710d2091801200128003001380040014804520864756d702e6c6f675a1c0a093132372e302e302e3110f8d20118ffffffffffffffffff01200960016a0d2f72756e2f632f726f6f74667372072e2e2f707265317801800100880108900101a001ffffffff0fa80101b2010161b2010162ba01180a0a2f6574632f686f737473120a2f6574632f686f737473c00101ca010412022f61ca010c0a066d656d6f727912022f62d00101da010c0a08706970653a5b315d1005e00101e80100f00101fa01052f70726f63820204667573659002039802808040a202012faa02096d6e745b2f785d3a79aa02086e65745b315d3a7ab0028080808004ba02180a036e6574120e2f70726f632f312f6e732f6e65741a0178ca020170d202032f7066da0203637075e202182f7379732f66732f6367726f75702f667265657a65722f63e8020af00201f8020180030188030b9003019a03132f6574632f637269752f6d73326d2e636f6e66a00301aa030a61707061726d6f723a78e203052f79617264e80302f0030cfa0303637478800402880400900401980400a2040a2f6465762f73686d2f78a80400b00401b80400180120002a0408011000302a";

    #[test]
    fn requests_encode_as_before() {
        let mut r = request(ReqType::DUMP);
        r.opts = MessageField::some(full_opts());
        r.notify_success = Some(true);
        r.keep_open = Some(false);
        r.features = MessageField::some(CriuFeaturesMsg {
            mem_track: Some(true),
            lazy_pages: Some(false),
            ..Default::default()
        });
        r.pid = Some(42);
        let wire = encode_request(&r).unwrap();
        let old = unhex(FULL_REQ);
        assert_eq!(CriuReq::parse_from_bytes(&old).unwrap(), r);
        assert_eq!(CriuReq::parse_from_bytes(&wire).unwrap(), r);
        assert_eq!(wire.len(), old.len());

        // a restore as CriuClient::restore sends it, network lock and
        // cgroup mode as a container dump sets them
        let mut r = request(ReqType::RESTORE);
        r.opts = MessageField::some(CriuOpts {
            images_dir_fd: Some(5),
            work_dir_fd: Some(6),
            log_file: Some("restore.log".into()),
            notify_scripts: Some(true),
            rst_sibling: Some(true),
            network_lock: Some(NetworkLockMethod::Skip.into()),
            manage_cgroups_mode: Some(CgMode::IGNORE.into()),
            ..Default::default()
        });
        assert_eq!(
            encode_request(&r).unwrap(),
            unhex("0802121d0805520b726573746f72652e6c6f676001880106d00101900200800403")
        );

        let mut r = request(ReqType::NOTIFY);
        r.notify_success = Some(false);
        assert_eq!(encode_request(&r).unwrap(), unhex("08061800"));

        let mut r = request(ReqType::FEATURE_CHECK);
        r.features = MessageField::some(CriuFeaturesMsg {
            mem_track: Some(true),
            lazy_pages: Some(true),
            pidfd_store: Some(true),
            ..Default::default()
        });
        assert_eq!(encode_request(&r).unwrap(), unhex("08092a06080110011801"));
    }

    #[test]
    fn unset_required_fields_are_not_sent() {
        let mut r = request(ReqType::DUMP);
        r.opts = MessageField::some(CriuOpts::default());
        assert!(encode_request(&r).unwrap_err().contains("criu_req"));
        // images_dir_fd's default is -1 ("use images_dir"), but it must be sent
        assert_eq!(r.opts.images_dir_fd(), -1);
        r.opts.mut_or_insert_default().images_dir_fd = Some(-1);
        r.opts.mut_or_insert_default().ext_mnt.push(ExtMountMap {
            key: Some("/x".into()),
            ..Default::default()
        });
        assert!(encode_request(&r).is_err(), "ext_mnt entry without val");
        r.opts.mut_or_insert_default().ext_mnt[0].val = Some("/x".into());
        let wire = encode_request(&r).unwrap();
        assert_eq!(CriuReq::parse_from_bytes(&wire).unwrap(), r);
    }

    #[test]
    fn responses_decode() {
        let v = decode_response(&unhex(
            "080a1001521c080410021a0676342e322e312001320c43524955544942494c495459",
        ))
        .unwrap();
        assert_eq!((v.type_(), v.success()), (ReqType::VERSION, true));
        assert_eq!(v.version.to_string(), "4.2.1");
        assert_eq!(v.version.gitid(), "v4.2.1");
        assert_eq!(v.version.name(), "CRIUTIBILITY");

        let n = decode_response(&unhex("080610012a110a0c706f73742d726573746f726510e121")).unwrap();
        assert_eq!(n.type_(), ReqType::NOTIFY);
        assert_eq!(
            (n.notify.script(), n.notify.pid),
            ("post-restore", Some(4321))
        );

        let d = decode_response(&unhex(
            "080110001a0038eaffffffffffffffff014a1e4572726f722028637269752f63722d64756d702e633a31293a20626f6f6d",
        ))
        .unwrap();
        assert_eq!((d.type_(), d.success()), (ReqType::DUMP, false));
        assert!(d.dump.is_some() && d.dump.restored.is_none());
        assert_eq!(d.cr_errno, Some(-22));
        assert_eq!(d.cr_errmsg(), "Error (criu/cr-dump.c:1): boom");

        let p = decode_response(&unhex("08051001320610f8d2011863")).unwrap();
        assert_eq!(
            (p.type_(), p.ps.pid, p.ps.port, p.ps.address.as_deref()),
            (ReqType::PAGE_SERVER, Some(99), Some(27000), None)
        );

        let f = decode_response(&unhex("080910014206080110001801")).unwrap();
        assert_eq!(
            (
                f.features.mem_track,
                f.features.lazy_pages,
                f.features.pidfd_store
            ),
            (Some(true), Some(false), Some(true))
        );

        let r = decode_response(&unhex("08021001220308e121")).unwrap();
        assert_eq!((r.type_(), r.restore.pid), (ReqType::RESTORE, Some(4321)));
    }

    #[test]
    fn truncated_and_garbage_responses_are_errors() {
        let buf = unhex("080a1001521c080410021a0676342e322e312001320c43524955544942494c495459");
        let full = decode_response(&buf).unwrap();
        for cut in 1..buf.len() {
            // every strict prefix either fails or lacks something; none may panic
            if let Ok(d) = decode_response(&buf[..cut]) {
                assert_ne!(d, full, "prefix {cut} decoded to the full message");
            }
        }
        assert!(decode_response(&[]).is_err(), "missing required fields");
        assert!(decode_response(&[0xff, 0xff, 0xff]).is_err());
        assert!(decode_response(&[0x0f]).is_err(), "wire type 7");
        let e = decode_response(&[0x08, 99, 0x10, 1]).unwrap_err();
        assert!(e.contains("unknown criu_req_type value 99"), "{e}");
        // success sent as a string: skipped as unknown, so success is missing
        assert!(decode_response(&[0x08, 1, 0x12, 1, b'x']).is_err());
        // version without its required major number
        assert!(decode_response(&[0x08, 10, 0x10, 1, 0x52, 2, 0x10, 2]).is_err());
        // restore answer without pid
        assert!(decode_response(&[0x08, 2, 0x10, 1, 0x22, 0]).is_err());
    }

    #[test]
    fn unknown_fields_are_skipped() {
        let mut buf = encode_request(&request(ReqType::CHECK)).unwrap();
        buf.extend([0x10, 0x01]); // success = true
        buf.extend([0xc2, 0x3e, 0x06]); // field 1000, 6 bytes
        buf.extend(b"future");
        let r = decode_response(&buf).unwrap();
        assert_eq!((r.type_(), r.success()), (ReqType::CHECK, true));
    }

    #[test]
    fn version_display() {
        let mut v = CriuVersion {
            major_number: Some(4),
            minor_number: Some(2),
            sublevel: Some(1),
            ..Default::default()
        };
        assert_eq!(v.to_string(), "4.2.1");
        v.extra = Some(3);
        assert_eq!(v.to_string(), "4.2.1.3");
        v.sublevel = None;
        assert_eq!(v.to_string(), "4.2.3");
    }

    #[test]
    fn network_lock_methods_map_to_criu_values() {
        for (m, wire) in [
            (NetworkLockMethod::Iptables, 1),
            (NetworkLockMethod::Nftables, 2),
            (NetworkLockMethod::Skip, 3),
        ] {
            let e: EnumOrUnknown<Criu_network_lock_method> = m.into();
            assert_eq!(e.value(), wire);
        }
    }
}
