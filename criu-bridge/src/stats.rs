//! CRIU's own timing and page statistics, read back from the `stats-dump`
//! and `stats-restore` images CRIU writes into its work directory.
//!
//! Format: a service image is a little-endian `u32` image-class magic
//! (`IMG_SERVICE_MAGIC`), a `u32` type magic (`STATS_MAGIC`), then one entry:
//! a `u32` length and a protobuf `stats_entry` (CRIU's `images/stats.proto`).
//! Times are in microseconds.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::protobuf::{fields, Field};
use crate::Error;

const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
const STATS_MAGIC: u32 = 0x5709_3306;

/// The file CRIU writes after a dump.
pub const DUMP_STATS_FILE: &str = "stats-dump";
/// The file CRIU writes after a restore.
pub const RESTORE_STATS_FILE: &str = "stats-restore";

/// What CRIU measured while dumping (`dump_stats_entry`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpStats {
    /// Time to freeze the process tree, µs.
    pub freezing_time_us: u64,
    /// Time the tree stayed frozen, µs: the service's pause.
    pub frozen_time_us: u64,
    /// Time to collect memory pages, µs.
    pub memdump_time_us: u64,
    /// Time to write memory pages, µs.
    pub memwrite_time_us: u64,
    /// Pages looked at.
    pub pages_scanned: u64,
    /// Pages not written because a parent (pre-dump) image has them.
    pub pages_skipped_parent: u64,
    /// Pages written to the images.
    pub pages_written: u64,
    /// Pages left for lazy (post-copy) restore.
    pub pages_lazy: u64,
}

/// What CRIU measured while restoring (`restore_stats_entry`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreStats {
    /// Pages compared with a parent image.
    pub pages_compared: u64,
    /// Pages skipped because they were shared copy-on-write.
    pub pages_skipped_cow: u64,
    /// Time to fork the process tree, µs.
    pub forking_time_us: u64,
    /// Time of the whole restore, µs.
    pub restore_time_us: u64,
    /// Pages restored.
    pub pages_restored: u64,
}

/// Reads CRIU's dump statistics from `path`: the `stats-dump` file itself or
/// the directory holding it (CRIU's work directory).
pub fn read_dump_stats(path: &Path) -> Result<DumpStats, Error> {
    let (file, entry) = read_stats_entry(path, DUMP_STATS_FILE)?;
    let body = nested(&file, &entry, 1, "dump")?;
    let mut s = DumpStats::default();
    for (number, field) in fields(body).map_err(|e| Error::malformed(&file, e))? {
        let Field::Varint(v) = field else { continue };
        match number {
            1 => s.freezing_time_us = v,
            2 => s.frozen_time_us = v,
            3 => s.memdump_time_us = v,
            4 => s.memwrite_time_us = v,
            5 => s.pages_scanned = v,
            6 => s.pages_skipped_parent = v,
            7 => s.pages_written = v,
            9 => s.pages_lazy = v,
            _ => {}
        }
    }
    Ok(s)
}

/// Reads CRIU's restore statistics from `path`: the `stats-restore` file
/// itself or the directory holding it.
pub fn read_restore_stats(path: &Path) -> Result<RestoreStats, Error> {
    let (file, entry) = read_stats_entry(path, RESTORE_STATS_FILE)?;
    let body = nested(&file, &entry, 2, "restore")?;
    let mut s = RestoreStats::default();
    for (number, field) in fields(body).map_err(|e| Error::malformed(&file, e))? {
        let Field::Varint(v) = field else { continue };
        match number {
            1 => s.pages_compared = v,
            2 => s.pages_skipped_cow = v,
            3 => s.forking_time_us = v,
            4 => s.restore_time_us = v,
            5 => s.pages_restored = v,
            _ => {}
        }
    }
    Ok(s)
}

fn nested<'a>(file: &Path, entry: &'a [u8], number: u32, what: &str) -> Result<&'a [u8], Error> {
    fields(entry)
        .map_err(|e| Error::malformed(file, e))?
        .into_iter()
        .find_map(|(n, f)| match (n, f) {
            (n, Field::Bytes(b)) if n == number => Some(b),
            _ => None,
        })
        .ok_or_else(|| Error::malformed(file, format!("no {what} statistics in the stats entry")))
}

/// Reads the one protobuf entry of a CRIU stats image.
fn read_stats_entry(path: &Path, default_name: &str) -> Result<(PathBuf, Vec<u8>), Error> {
    let file = if path.is_dir() {
        path.join(default_name)
    } else {
        path.to_path_buf()
    };
    let data = std::fs::read(&file).map_err(|e| Error::io("read CRIU statistics", &file, e))?;
    let entry = parse_stats_image(&data).map_err(|reason| Error::malformed(&file, reason))?;
    Ok((file, entry.to_vec()))
}

fn parse_stats_image(data: &[u8]) -> Result<&[u8], String> {
    let word = |at: usize| -> Result<u32, String> {
        data.get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .ok_or_else(|| {
                format!(
                    "file too short ({} bytes) for a CRIU stats image",
                    data.len()
                )
            })
    };
    let class = word(0)?;
    if class != IMG_SERVICE_MAGIC && class != IMG_COMMON_MAGIC {
        return Err(format!("not a CRIU image (magic {class:#010x})"));
    }
    let kind = word(4)?;
    if kind != STATS_MAGIC {
        return Err(format!("not a CRIU stats image (type magic {kind:#010x})"));
    }
    let len = word(8)? as usize;
    data.get(12..12 + len)
        .ok_or_else(|| format!("stats entry of {len} bytes runs past the end of the file"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protobuf::encode_varint;

    fn message(fields: &[(u32, u64)]) -> Vec<u8> {
        let mut out = Vec::new();
        for &(n, v) in fields {
            encode_varint(u64::from(n) << 3, &mut out);
            encode_varint(v, &mut out);
        }
        out
    }

    fn image(outer_field: u32, inner: &[u8]) -> Vec<u8> {
        let mut entry = Vec::new();
        encode_varint(u64::from(outer_field) << 3 | 2, &mut entry);
        encode_varint(inner.len() as u64, &mut entry);
        entry.extend_from_slice(inner);
        let mut img = Vec::new();
        img.extend_from_slice(&IMG_SERVICE_MAGIC.to_le_bytes());
        img.extend_from_slice(&STATS_MAGIC.to_le_bytes());
        img.extend_from_slice(&(entry.len() as u32).to_le_bytes());
        img.extend_from_slice(&entry);
        img
    }

    #[test]
    fn reads_dump_stats_from_a_directory() {
        let dir = std::env::temp_dir().join(format!("criu-bridge-stats-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let inner = message(&[
            (1, 1200),
            (2, 15_000),
            (3, 900),
            (4, 2100),
            (5, 4096),
            (6, 0),
            (7, 4000),
            (9, 0),
        ]);
        std::fs::write(dir.join(DUMP_STATS_FILE), image(1, &inner)).unwrap();
        let s = read_dump_stats(&dir).unwrap();
        assert_eq!(s.freezing_time_us, 1200);
        assert_eq!(s.frozen_time_us, 15_000);
        assert_eq!(s.memwrite_time_us, 2100);
        assert_eq!(s.pages_scanned, 4096);
        assert_eq!(s.pages_written, 4000);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reads_restore_stats() {
        let dir = std::env::temp_dir().join(format!("criu-bridge-rstats-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let inner = message(&[(1, 0), (2, 0), (3, 800), (4, 45_000), (5, 4100)]);
        let file = dir.join("renamed");
        std::fs::write(&file, image(2, &inner)).unwrap();
        let s = read_restore_stats(&file).unwrap();
        assert_eq!(
            (s.forking_time_us, s.restore_time_us, s.pages_restored),
            (800, 45_000, 4100)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rejects_garbage_with_the_reason() {
        assert!(parse_stats_image(b"abc").unwrap_err().contains("too short"));
        assert!(parse_stats_image(&[0u8; 16])
            .unwrap_err()
            .contains("not a CRIU image"));
        let mut img = image(1, &message(&[(2, 5)]));
        img.truncate(img.len() - 1);
        assert!(parse_stats_image(&img)
            .unwrap_err()
            .contains("past the end"));
    }

    #[test]
    fn dump_stats_missing_from_a_restore_image() {
        let dir = std::env::temp_dir().join(format!("criu-bridge-mix-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(DUMP_STATS_FILE), image(2, &message(&[(3, 1)]))).unwrap();
        let err = read_dump_stats(&dir).unwrap_err().to_string();
        assert!(err.contains("no dump statistics"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = read_dump_stats(Path::new("/nonexistent/ms2m"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/ms2m"), "{err}");
    }
}
