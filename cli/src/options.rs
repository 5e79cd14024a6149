//! The runc shim's option messages (`containerd.runc.v1`), which containerd
//! itself decodes from the task API: `CheckpointOptions` on
//! `Tasks.Checkpoint` (for the image path) and `Options` on `Tasks.Create`
//! (for `criu_image_path`, a restore from a directory).
//!
//! containerd-client does not ship these, so they are declared here with the
//! field numbers of containerd's `api/types/runc/options/oci.proto`.

use prost::Message;
use prost_types::Any;

/// Type URL containerd's typeurl registry gives [`CheckpointOptions`].
pub const CHECKPOINT_OPTIONS_TYPE_URL: &str = "containerd.runc.v1.CheckpointOptions";
/// Type URL containerd's typeurl registry gives [`RuncOptions`].
pub const RUNC_OPTIONS_TYPE_URL: &str = "containerd.runc.v1.Options";

/// `containerd.runc.v1.CheckpointOptions`.
#[derive(Clone, PartialEq, Message)]
pub struct CheckpointOptions {
    /// Stop the container after the dump.
    #[prost(bool, tag = "1")]
    pub exit: bool,
    /// Dump established TCP connections.
    #[prost(bool, tag = "2")]
    pub open_tcp: bool,
    /// Allow external Unix sockets.
    #[prost(bool, tag = "3")]
    pub external_unix_sockets: bool,
    /// Dump terminals (ptys).
    #[prost(bool, tag = "4")]
    pub terminal: bool,
    /// Dump file locks.
    #[prost(bool, tag = "5")]
    pub file_locks: bool,
    /// Namespaces to restore empty.
    #[prost(string, repeated, tag = "6")]
    pub empty_namespaces: Vec<String>,
    /// Cgroups mode: soft, full or strict.
    #[prost(string, tag = "7")]
    pub cgroups_mode: String,
    /// Where CRIU writes its images.
    #[prost(string, tag = "8")]
    pub image_path: String,
    /// CRIU's work directory (logs, `stats-dump`); kept by the runc shim
    /// only when set.
    #[prost(string, tag = "9")]
    pub work_path: String,
}

/// `containerd.runc.v1.Options`: runtime and task-create options of the
/// runc shim.
#[derive(Clone, PartialEq, Message)]
pub struct RuncOptions {
    /// Disable pivot_root.
    #[prost(bool, tag = "1")]
    pub no_pivot_root: bool,
    /// Do not create a new session keyring.
    #[prost(bool, tag = "2")]
    pub no_new_keyring: bool,
    /// Cgroup to place the shim in.
    #[prost(string, tag = "3")]
    pub shim_cgroup: String,
    /// Owner uid of the I/O pipes.
    #[prost(uint32, tag = "4")]
    pub io_uid: u32,
    /// Owner gid of the I/O pipes.
    #[prost(uint32, tag = "5")]
    pub io_gid: u32,
    /// The OCI runtime binary.
    #[prost(string, tag = "6")]
    pub binary_name: String,
    /// The OCI runtime's root directory.
    #[prost(string, tag = "7")]
    pub root: String,
    /// Use systemd cgroups.
    #[prost(bool, tag = "9")]
    pub systemd_cgroup: bool,
    /// Restore from the CRIU images in this directory.
    #[prost(string, tag = "10")]
    pub criu_image_path: String,
    /// CRIU's work directory for the restore (logs, `stats-restore`).
    #[prost(string, tag = "11")]
    pub criu_work_path: String,
    /// Task API address of a sandbox.
    #[prost(string, tag = "12")]
    pub task_api_address: String,
    /// Task API version of a sandbox.
    #[prost(uint32, tag = "13")]
    pub task_api_version: u32,
}

/// Wraps `msg` in an `Any` with the bare type URL containerd uses.
pub fn to_any<M: Message>(msg: &M, type_url: &str) -> Any {
    Any {
        type_url: type_url.to_string(),
        value: msg.encode_to_vec(),
    }
}

/// True when `type_url` names `full_name`, with or without a
/// `type.googleapis.com/`-style prefix.
pub fn type_url_is(type_url: &str, full_name: &str) -> bool {
    type_url.rsplit('/').next() == Some(full_name)
}

/// Decodes the container's runtime options when they are runc options, so a
/// restore keeps them (binary, root, cgroup driver) while adding the CRIU
/// paths. Anything else gives fresh, empty options.
pub fn runc_options_from(runtime_options: Option<&Any>) -> RuncOptions {
    runtime_options
        .filter(|any| type_url_is(&any.type_url, RUNC_OPTIONS_TYPE_URL))
        .and_then(|any| RuncOptions::decode(any.value.as_slice()).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_options_encode_with_runc_field_numbers() {
        let opts = CheckpointOptions {
            exit: true,
            image_path: "/x".into(),
            work_path: "/w".into(),
            ..Default::default()
        };
        let any = to_any(&opts, CHECKPOINT_OPTIONS_TYPE_URL);
        assert_eq!(any.type_url, "containerd.runc.v1.CheckpointOptions");
        // field 1 varint 1; field 8 "/x"; field 9 "/w"
        assert_eq!(
            any.value,
            vec![0x08, 1, 0x42, 2, b'/', b'x', 0x4a, 2, b'/', b'w']
        );
    }

    #[test]
    fn runc_options_encode_criu_paths_as_fields_10_and_11() {
        let opts = RuncOptions {
            criu_image_path: "/i".into(),
            criu_work_path: "/w".into(),
            ..Default::default()
        };
        let any = to_any(&opts, RUNC_OPTIONS_TYPE_URL);
        assert_eq!(any.type_url, "containerd.runc.v1.Options");
        assert_eq!(any.value, vec![0x52, 2, b'/', b'i', 0x5a, 2, b'/', b'w']);
    }

    #[test]
    fn keeps_runc_runtime_options_and_ignores_others() {
        let base = RuncOptions {
            binary_name: "runc".into(),
            systemd_cgroup: true,
            ..Default::default()
        };
        let any = to_any(&base, "type.googleapis.com/containerd.runc.v1.Options");
        assert_eq!(runc_options_from(Some(&any)), base);
        let other = Any {
            type_url: "io.example.Other".into(),
            value: vec![1, 2, 3],
        };
        assert_eq!(runc_options_from(Some(&other)), RuncOptions::default());
        assert_eq!(runc_options_from(None), RuncOptions::default());
    }
}
