//! CRIU's own timing and page statistics, read back from the `stats-dump`
//! and `stats-restore` images CRIU writes into its work directory.
//!
//! Format: a service image is a little-endian `u32` image-class magic
//! (`IMG_SERVICE_MAGIC`), a `u32` type magic (`STATS_MAGIC`), then one entry:
//! a `u32` length and a protobuf `stats_entry` (CRIU's `images/stats.proto`).
//! Times are in microseconds.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use protobuf::Message;

use crate::proto::stats::Stats_entry;
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
    let d = entry
        .dump
        .into_option()
        .ok_or_else(|| Error::malformed(&file, "no dump statistics in the stats entry"))?;
    Ok(DumpStats {
        freezing_time_us: d.freezing_time().into(),
        frozen_time_us: d.frozen_time().into(),
        memdump_time_us: d.memdump_time().into(),
        memwrite_time_us: d.memwrite_time().into(),
        pages_scanned: d.pages_scanned(),
        pages_skipped_parent: d.pages_skipped_parent(),
        pages_written: d.pages_written(),
        pages_lazy: d.pages_lazy(),
    })
}

/// Reads CRIU's restore statistics from `path`: the `stats-restore` file
/// itself or the directory holding it.
pub fn read_restore_stats(path: &Path) -> Result<RestoreStats, Error> {
    let (file, entry) = read_stats_entry(path, RESTORE_STATS_FILE)?;
    let r = entry
        .restore
        .into_option()
        .ok_or_else(|| Error::malformed(&file, "no restore statistics in the stats entry"))?;
    Ok(RestoreStats {
        pages_compared: r.pages_compared(),
        pages_skipped_cow: r.pages_skipped_cow(),
        forking_time_us: r.forking_time().into(),
        restore_time_us: r.restore_time().into(),
        pages_restored: r.pages_restored(),
    })
}

/// Reads the one `stats_entry` of a CRIU stats image. A statistic missing
/// from it reads as 0 (it is merged, not checked for required fields).
fn read_stats_entry(path: &Path, default_name: &str) -> Result<(PathBuf, Stats_entry), Error> {
    let file = if path.is_dir() {
        path.join(default_name)
    } else {
        path.to_path_buf()
    };
    let data = std::fs::read(&file).map_err(|e| Error::io("read CRIU statistics", &file, e))?;
    let bytes = parse_stats_image(&data).map_err(|reason| Error::malformed(&file, reason))?;
    let mut entry = Stats_entry::new();
    entry
        .merge_from_bytes(bytes)
        .map_err(|e| Error::malformed(&file, format!("stats_entry: {e}")))?;
    Ok((file, entry))
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
    use crate::proto::stats::{Dump_stats_entry, Restore_stats_entry};
    use protobuf::MessageField;

    /// A stats image holding `entry`'s encoding.
    fn image(entry: &[u8]) -> Vec<u8> {
        let mut img = Vec::new();
        img.extend_from_slice(&IMG_SERVICE_MAGIC.to_le_bytes());
        img.extend_from_slice(&STATS_MAGIC.to_le_bytes());
        img.extend_from_slice(&(entry.len() as u32).to_le_bytes());
        img.extend_from_slice(entry);
        img
    }

    /// A stats image of `d`, required fields or not.
    fn dump_image(d: Dump_stats_entry) -> Vec<u8> {
        let e = Stats_entry {
            dump: MessageField::some(d),
            ..Default::default()
        };
        let mut buf = Vec::new();
        let mut os = protobuf::CodedOutputStream::vec(&mut buf);
        e.compute_size();
        e.write_to_with_cached_sizes(&mut os).unwrap();
        os.flush().unwrap();
        drop(os);
        image(&buf)
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("criu-bridge-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata")
            .join(name)
    }

    #[test]
    fn reads_dump_stats_from_a_directory() {
        let dir = scratch("stats");
        let d = Dump_stats_entry {
            freezing_time: Some(1200),
            frozen_time: Some(15_000),
            memdump_time: Some(900),
            memwrite_time: Some(2100),
            pages_scanned: Some(4096),
            pages_skipped_parent: Some(0),
            pages_written: Some(4000),
            pages_lazy: Some(0),
            ..Default::default()
        };
        std::fs::write(dir.join(DUMP_STATS_FILE), dump_image(d)).unwrap();
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
        let dir = scratch("rstats");
        let e = Stats_entry {
            restore: MessageField::some(Restore_stats_entry {
                pages_compared: Some(0),
                pages_skipped_cow: Some(0),
                forking_time: Some(800),
                restore_time: Some(45_000),
                pages_restored: Some(4100),
                ..Default::default()
            }),
            ..Default::default()
        };
        let file = dir.join("renamed");
        std::fs::write(&file, image(&e.write_to_bytes().unwrap())).unwrap();
        let s = read_restore_stats(&file).unwrap();
        assert_eq!(
            (s.forking_time_us, s.restore_time_us, s.pages_restored),
            (800, 45_000, 4100)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Images CRIU 4.2.1 wrote: a `sleep` dumped, then restored.
    #[test]
    fn reads_images_criu_wrote() {
        assert_eq!(
            read_dump_stats(&fixture("stats-dump")).unwrap(),
            DumpStats {
                freezing_time_us: 176,
                frozen_time_us: 27_337,
                memdump_time_us: 739,
                memwrite_time_us: 157,
                pages_scanned: 57,
                pages_skipped_parent: 0,
                pages_written: 30,
                pages_lazy: 0,
            }
        );
        assert_eq!(
            read_restore_stats(&fixture("stats-restore")).unwrap(),
            RestoreStats {
                pages_compared: 0,
                pages_skipped_cow: 0,
                forking_time_us: 0,
                restore_time_us: 6729,
                pages_restored: 30,
            }
        );
    }

    #[test]
    fn a_missing_statistic_reads_as_zero() {
        let dir = scratch("partial");
        let d = Dump_stats_entry {
            frozen_time: Some(5),
            ..Default::default()
        };
        std::fs::write(dir.join(DUMP_STATS_FILE), dump_image(d)).unwrap();
        let s = read_dump_stats(&dir).unwrap();
        assert_eq!(
            s,
            DumpStats {
                frozen_time_us: 5,
                ..Default::default()
            }
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rejects_garbage_with_the_reason() {
        assert!(parse_stats_image(b"abc").unwrap_err().contains("too short"));
        assert!(parse_stats_image(&[0u8; 16])
            .unwrap_err()
            .contains("not a CRIU image"));
        let mut img = dump_image(Dump_stats_entry {
            frozen_time: Some(5),
            ..Default::default()
        });
        img.truncate(img.len() - 1);
        assert!(parse_stats_image(&img)
            .unwrap_err()
            .contains("past the end"));
        // a well-framed image whose entry is not protobuf
        let dir = scratch("garbage");
        let file = dir.join(DUMP_STATS_FILE);
        std::fs::write(&file, image(&[0x0a, 0x05, 1, 2])).unwrap();
        let err = read_dump_stats(&dir).unwrap_err().to_string();
        assert!(
            err.contains("stats_entry") && err.contains(DUMP_STATS_FILE),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dump_stats_missing_from_a_restore_image() {
        let dir = scratch("mix");
        std::fs::copy(fixture("stats-restore"), dir.join(DUMP_STATS_FILE)).unwrap();
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
