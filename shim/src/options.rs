//! The option messages containerd hands the shim as protobuf `Any`s,
//! decoded in one place: runc's runtime options (create), CRI's
//! `runtimeoptions.v1.Options` (which names the shim's configuration file)
//! and the checkpoint options. They all key on the message's type name, so
//! keeping them here lets [`crate::container`], [`crate::config`] and
//! [`crate::checkpoint`] decode what they need without importing each other.

use std::path::PathBuf;

use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::shim::oci::{CheckpointOptions, Options as RuncOptions};

use crate::error::{Error, Result};

/// The type of containerd's runc runtime options.
const RUNC_OPTIONS_TYPE: &str = "containerd.runc.v1.Options";

/// The type of containerd's checkpoint options for runc runtimes.
const CHECKPOINT_OPTIONS_TYPE: &str = "containerd.runc.v1.CheckpointOptions";

/// The type of CRI's runtime options for non-runc runtimes.
const RUNTIME_OPTIONS_TYPE: &str = "runtimeoptions.v1.Options";

/// Decodes containerd's runc runtime options; other option types are
/// ignored (default options).
pub fn parse_runc_options(any: Option<&Any>) -> Result<RuncOptions> {
    let Some(any) = any.filter(|a| !a.type_url.is_empty()) else {
        return Ok(RuncOptions::default());
    };
    if type_name(&any.type_url) != RUNC_OPTIONS_TYPE {
        tracing::debug!(type_url = %any.type_url, "ignoring task options of another type");
        return Ok(RuncOptions::default());
    }
    RuncOptions::parse_from_bytes(&any.value)
        .map_err(|e| Error::InvalidArgument(format!("decode {RUNC_OPTIONS_TYPE}: {e}")))
}

/// The message name of a type URL (`type.googleapis.com/a.b.C` -> `a.b.C`).
pub fn type_name(type_url: &str) -> &str {
    type_url.rsplit('/').next().unwrap_or(type_url)
}

/// Decodes the request's checkpoint options (none: defaults).
pub fn parse_checkpoint_options(any: Option<&Any>) -> Result<CheckpointOptions> {
    let Some(any) = any.filter(|a| !a.type_url.is_empty()) else {
        return Ok(CheckpointOptions::default());
    };
    if type_name(&any.type_url) != CHECKPOINT_OPTIONS_TYPE {
        return Err(Error::InvalidArgument(format!(
            "checkpoint options of type {:?} are not supported (expected {CHECKPOINT_OPTIONS_TYPE})",
            any.type_url
        )));
    }
    CheckpointOptions::parse_from_bytes(&any.value)
        .map_err(|e| Error::InvalidArgument(format!("decode {CHECKPOINT_OPTIONS_TYPE}: {e}")))
}

/// The config file named by `runtimeoptions.v1.Options`, if the options
/// are of that type and name one.
pub fn config_path_of(options: Option<&Any>) -> Result<Option<PathBuf>> {
    let Some(any) = options.filter(|a| !a.type_url.is_empty()) else {
        return Ok(None);
    };
    if type_name(&any.type_url) != RUNTIME_OPTIONS_TYPE {
        return Ok(None);
    }
    let fields = decode_strings(&any.value)
        .map_err(|e| Error::InvalidArgument(format!("decode {RUNTIME_OPTIONS_TYPE}: {e}")))?;
    // runtimeoptions.v1.Options: 1 type_url, 2 config_path, 3 config_body.
    Ok(fields
        .into_iter()
        .find(|(n, s)| *n == 2 && !s.is_empty())
        .map(|(_, s)| PathBuf::from(s)))
}

/// The length-delimited string fields of a protobuf message, as (field
/// number, value); other wire types are skipped.
fn decode_strings(mut b: &[u8]) -> std::result::Result<Vec<(u64, String)>, String> {
    fn varint(b: &mut &[u8]) -> std::result::Result<u64, String> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first().ok_or("truncated varint")?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                varint(&mut b)?;
            }
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                if b.len() < n {
                    return Err("truncated fixed field".into());
                }
                b = &b[n..];
            }
            2 => {
                let len = usize::try_from(varint(&mut b)?).map_err(|e| e.to_string())?;
                if b.len() < len {
                    return Err("truncated string".into());
                }
                let (s, rest) = b.split_at(len);
                b = rest;
                out.push((
                    field,
                    String::from_utf8(s.to_vec()).map_err(|e| e.to_string())?,
                ));
            }
            w => return Err(format!("unsupported wire type {w}")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_of_other_types_are_ignored() {
        let any = Any {
            type_url: "io.containerd.something.Else".into(),
            value: vec![1, 2, 3],
            ..Default::default()
        };
        assert_eq!(
            parse_runc_options(Some(&any)).unwrap(),
            RuncOptions::default()
        );
        assert_eq!(parse_runc_options(None).unwrap(), RuncOptions::default());
    }

    #[test]
    fn runc_options_are_decoded() {
        let opts = RuncOptions {
            criu_image_path: "/dev/shm/img".into(),
            root: "/run/x".into(),
            ..Default::default()
        };
        let any = Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: opts.write_to_bytes().unwrap(),
            ..Default::default()
        };
        let got = parse_runc_options(Some(&any)).unwrap();
        assert_eq!(got.criu_image_path, "/dev/shm/img");
        assert_eq!(got.root, "/run/x");
        let bad = Any {
            type_url: "type.googleapis.com/containerd.runc.v1.Options".into(),
            value: vec![0xff, 0xff, 0xff],
            ..Default::default()
        };
        assert!(parse_runc_options(Some(&bad)).is_err());
    }

    #[test]
    fn decodes_checkpoint_options() {
        let opts = CheckpointOptions {
            exit: true,
            open_tcp: true,
            image_path: "/dev/shm/x".into(),
            work_path: "/dev/shm/w".into(),
            empty_namespaces: vec!["network".into()],
            ..Default::default()
        };
        let any = Any {
            type_url: "containerd.runc.v1.CheckpointOptions".into(),
            value: opts.write_to_bytes().unwrap(),
            ..Default::default()
        };
        assert_eq!(parse_checkpoint_options(Some(&any)).unwrap(), opts);
        assert_eq!(
            parse_checkpoint_options(None).unwrap(),
            CheckpointOptions::default()
        );
    }

    #[test]
    fn rejects_foreign_options() {
        let any = Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: vec![],
            ..Default::default()
        };
        assert!(matches!(
            parse_checkpoint_options(Some(&any)),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn decodes_runtime_options() {
        // type_url = "x", config_path = "/etc/ms2m/a.toml"
        let mut v = vec![0x0a, 1, b'x', 0x12, 16];
        v.extend_from_slice(b"/etc/ms2m/a.toml");
        let any = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: v,
            ..Default::default()
        };
        assert_eq!(
            config_path_of(Some(&any)).unwrap(),
            Some(PathBuf::from("/etc/ms2m/a.toml"))
        );
        let other = Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: vec![],
            ..Default::default()
        };
        assert_eq!(config_path_of(Some(&other)).unwrap(), None);
        let bad = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: vec![0x12, 50, b'a'],
            ..Default::default()
        };
        assert!(config_path_of(Some(&bad)).is_err());
    }
}
