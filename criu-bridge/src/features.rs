//! What this kernel and this CRIU can do, detected at runtime and cached:
//! strategies are chosen from these facts, never assumed.
//!
//! - CRIU's version and its `FEATURE_CHECK` answers (over RPC);
//! - kernel soft-dirty memory tracking (`CONFIG_MEM_SOFT_DIRTY`), probed the
//!   way CRIU's kerndat does: clear the bits through `/proc/self/clear_refs`,
//!   write a fresh page, look for bit 55 in its `/proc/self/pagemap` entry;
//! - userfaultfd (lazy pages): the `userfaultfd` syscall, else
//!   `/dev/userfaultfd`;
//! - the `PAGEMAP_SCAN` ioctl (Linux 6.7+), which CRIU uses to read page
//!   maps faster;
//! - network lock methods: `iptables-restore` on PATH (CRIU's default lock
//!   runs it), nftables when CRIU was built with libnftables
//!   (`criu check --feature network_lock_nftables`).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::rpc::{CriuClient, CriuFeatures, NetworkLockMethod};

/// Network lock methods usable here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkLocks {
    /// `iptables-restore` is on PATH (CRIU's default `iptables` lock).
    pub iptables: bool,
    /// CRIU says its nftables lock works (built with libnftables).
    pub nftables: bool,
}

/// A probe's result with the evidence behind it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    /// Whether the feature is there.
    pub available: bool,
    /// How that was found out, or why it is missing.
    pub detail: String,
}

impl Probe {
    fn yes(detail: impl Into<String>) -> Self {
        Probe {
            available: true,
            detail: detail.into(),
        }
    }

    fn no(detail: impl Into<String>) -> Self {
        Probe {
            available: false,
            detail: detail.into(),
        }
    }
}

/// Everything ms2m needs to know to choose a checkpoint strategy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Features {
    /// The CRIU binary asked.
    pub criu_binary: PathBuf,
    /// CRIU's version (`4.2.1`), `None` when CRIU could not be asked.
    pub criu_version: Option<String>,
    /// CRIU's `FEATURE_CHECK` answer, `None` when CRIU could not be asked.
    pub criu_features: Option<CriuFeatures>,
    /// Why CRIU could not be asked, if it could not.
    pub criu_error: Option<String>,
    /// Kernel soft-dirty memory tracking.
    pub soft_dirty: Probe,
    /// userfaultfd.
    pub userfaultfd: Probe,
    /// The `PAGEMAP_SCAN` ioctl.
    pub pagemap_scan: Probe,
    /// Network lock methods.
    pub network_locks: NetworkLocks,
    /// CRIU's kernel-probe cache (`/run/criu.kdat`). Without it every CRIU
    /// run re-probes the kernel (~25 ms here) before it starts working.
    pub criu_kdat_cache: Probe,
    /// When detection ran, unix ms.
    pub detected_at_unix_ms: u64,
    /// How long detection took, ms.
    pub detect_ms: f64,
}

impl Features {
    /// Detects everything now (≈50 ms: two short CRIU runs and a `criu
    /// check`). Prefer [`Features::cached`].
    pub fn detect(criu_binary: &Path) -> Features {
        let t0 = Instant::now();
        let client = CriuClient::new(criu_binary);
        let mut criu_error = Vec::new();
        let criu_version = client
            .version()
            .map(|v| v.to_string())
            .map_err(|e| criu_error.push(e.to_string()))
            .ok();
        let criu_features = client
            .check_features()
            .map_err(|e| criu_error.push(e.to_string()))
            .ok();
        let nftables =
            criu_version.is_some() && criu_check_feature(criu_binary, "network_lock_nftables");
        let f = Features {
            criu_binary: criu_binary.to_path_buf(),
            criu_version,
            criu_features,
            criu_error: (!criu_error.is_empty()).then(|| criu_error.join("; ")),
            soft_dirty: probe_soft_dirty(),
            userfaultfd: probe_userfaultfd(),
            pagemap_scan: probe_pagemap_scan(),
            network_locks: NetworkLocks {
                iptables: find_on_path("iptables-restore").is_some(),
                nftables,
            },
            criu_kdat_cache: probe_kdat_cache(Path::new(if Path::new(KDAT_DIR).is_dir() {
                KDAT_DIR
            } else {
                "/run"
            })),
            detected_at_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            detect_ms: t0.elapsed().as_secs_f64() * 1000.0,
        };
        tracing::info!(features = ?f, "detected checkpoint features");
        f
    }

    /// Detects once per CRIU binary per process, then answers from the
    /// cache.
    pub fn cached(criu_binary: &Path) -> Arc<Features> {
        static CACHE: OnceLock<Mutex<HashMap<PathBuf, Arc<Features>>>> = OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        if let Some(f) = cache.lock().ok().and_then(|c| c.get(criu_binary).cloned()) {
            return f;
        }
        let f = Arc::new(Features::from_disk_or_detect(criu_binary));
        if let Ok(mut c) = cache.lock() {
            c.entry(criu_binary.to_path_buf())
                .or_insert_with(|| f.clone());
        }
        f
    }

    /// Detection costs ~70 ms (CRIU's FEATURE_CHECK, kernel probes) and every
    /// shim process would pay it on its first checkpoint. The result is
    /// kept in [`FEATURES_CACHE_DIR`], keyed by the CRIU binary (path, size,
    /// mtime), the kernel release and the boot id, so a new shim on the same
    /// boot with the same CRIU reads it instead. Any problem with the file
    /// means detecting afresh.
    fn from_disk_or_detect(criu_binary: &Path) -> Features {
        let Some(file) = disk_cache_file(criu_binary) else {
            return Features::detect(criu_binary);
        };
        if let Some(f) = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice::<Features>(&b).ok())
        {
            return f;
        }
        let f = Features::detect(criu_binary);
        if let Ok(json) = serde_json::to_vec(&f) {
            let tmp = file.with_extension(format!("tmp{}", std::process::id()));
            let _ = std::fs::create_dir_all(FEATURES_CACHE_DIR)
                .and_then(|()| std::fs::write(&tmp, json))
                .and_then(|()| std::fs::rename(&tmp, &file));
        }
        f
    }

    /// Iterative pre-copy is possible: the kernel tracks dirty memory and
    /// CRIU agrees (when it could be asked).
    pub fn dirty_tracking(&self) -> bool {
        self.soft_dirty.available && self.criu_features.is_none_or(|c| c.mem_track)
    }

    /// Lazy (post-copy) restore is possible: userfaultfd works and CRIU
    /// agrees (it also needs the non-cooperative uffd events).
    pub fn lazy_pages(&self) -> bool {
        self.userfaultfd.available && self.criu_features.is_some_and(|c| c.lazy_pages)
    }

    /// The network lock to use when one is needed: nftables (in-process in
    /// CRIU, no helper binary to run during the freeze) over iptables.
    pub fn best_network_lock(&self) -> Option<NetworkLockMethod> {
        if self.network_locks.nftables {
            Some(NetworkLockMethod::Nftables)
        } else if self.network_locks.iptables {
            Some(NetworkLockMethod::Iptables)
        } else {
            None
        }
    }
}

/// `criu check --feature NAME` exits 0.
fn criu_check_feature(binary: &Path, name: &str) -> bool {
    Command::new(binary)
        .args(["check", "--feature", name])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The first executable `name` in PATH (plus the sbin dirs, which a
/// service's PATH may lack).
pub(crate) fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Where detected features are kept between shim processes (see
/// [`Features::cached`]).
pub const FEATURES_CACHE_DIR: &str = "/run/ms2m/features";

/// The cache file for `criu_binary` on this boot and kernel, or `None`
/// when the facts that key it cannot be read.
fn disk_cache_file(criu_binary: &Path) -> Option<PathBuf> {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::MetadataExt;
    let resolved = if criu_binary.is_absolute() {
        criu_binary.to_path_buf()
    } else {
        find_on_path(&criu_binary.to_string_lossy())?
    };
    let meta = std::fs::metadata(&resolved).ok()?;
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (
        resolved,
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        boot_id.trim(),
        release.trim(),
    )
        .hash(&mut h);
    Some(Path::new(FEATURES_CACHE_DIR).join(format!("{:016x}.json", h.finish())))
}

/// Where ms2m's CRIU build keeps its kernel-probe cache (`make
/// RUNDIR=/run/criu`, a tmpfs mounted by `hack/setup.sh`): CRIU refuses to
/// keep the cache on a `/run` that is not tmpfs, as on this project's hosts.
pub const KDAT_DIR: &str = "/run/criu";

/// CRIU (as root) caches its kernel probe in `<run>/criu.kdat`, writing
/// `criu.kdat.tmp` (O_EXCL) and renaming it. A CRIU killed in between
/// leaves the empty `.tmp` behind, and from then on no CRIU writes the
/// cache.
fn probe_kdat_cache(run: &Path) -> Probe {
    let cache = run.join("criu.kdat");
    let tmp = run.join("criu.kdat.tmp");
    if cache.exists() {
        Probe::yes(format!("{} exists", cache.display()))
    } else if tmp.exists() {
        Probe::no(format!(
            "{} is missing and a stale {} keeps CRIU from writing it: \
             every CRIU run re-probes the kernel; remove the .tmp file",
            cache.display(),
            tmp.display()
        ))
    } else {
        Probe::no(format!(
            "{} is missing (the next CRIU run writes it)",
            cache.display()
        ))
    }
}

const PAGE: usize = 4096;
/// Pagemap entry bits.
const PME_PRESENT: u64 = 1 << 63;
const PME_SOFT_DIRTY: u64 = 1 << 55;

/// An anonymous private page, unmapped on drop.
struct Page(*mut u8);

impl Page {
    fn new() -> std::io::Result<Page> {
        // SAFETY: anonymous private mapping with no address hint; the result
        // is checked against MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Page(p.cast()))
    }

    fn touch(&self) {
        // SAFETY: self.0 is a live writable mapping of PAGE bytes.
        unsafe { std::ptr::write_volatile(self.0, 1) }
    }

    fn addr(&self) -> usize {
        self.0 as usize
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        // SAFETY: self.0 was returned by mmap for PAGE bytes and is unmapped
        // once, here.
        unsafe {
            libc::munmap(self.0.cast(), PAGE);
        }
    }
}

fn probe_soft_dirty() -> Probe {
    let page = match Page::new() {
        Ok(p) => p,
        Err(e) => return Probe::no(format!("mmap a test page: {e}")),
    };
    let clear = OpenOptions::new()
        .write(true)
        .open("/proc/self/clear_refs")
        .and_then(|mut f| f.write_all(b"4"));
    match clear {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            return Probe::no("/proc/self/clear_refs refuses 4 (no soft-dirty)")
        }
        Err(e) => return Probe::no(format!("write 4 to /proc/self/clear_refs: {e}")),
        Ok(()) => {}
    }
    page.touch();
    let entry = File::open("/proc/self/pagemap").and_then(|mut f| {
        f.seek(SeekFrom::Start((page.addr() / PAGE * 8) as u64))?;
        let mut b = [0u8; 8];
        f.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    });
    match entry {
        Err(e) => Probe::no(format!("read /proc/self/pagemap: {e}")),
        Ok(e) if e & PME_PRESENT == 0 => Probe::no("test page not present in pagemap"),
        Ok(e) if e & PME_SOFT_DIRTY != 0 => {
            Probe::yes("a page written after clear_refs=4 has the soft-dirty bit")
        }
        Ok(_) => Probe::no(
            "a page written after clear_refs=4 lacks the soft-dirty bit \
             (kernel without CONFIG_MEM_SOFT_DIRTY)",
        ),
    }
}

fn probe_userfaultfd() -> Probe {
    // SAFETY: userfaultfd takes one flags argument and returns a new fd or
    // -1; the fd is closed right away.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd >= 0 {
        // SAFETY: fd is a new fd we own.
        unsafe { libc::close(fd as libc::c_int) };
        return Probe::yes("userfaultfd(2) succeeds");
    }
    let err = std::io::Error::last_os_error();
    match OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    {
        Ok(_) => Probe::yes(format!(
            "userfaultfd(2) refused ({err}) but /dev/userfaultfd opens"
        )),
        Err(e2) => Probe::no(format!("userfaultfd(2): {err}; /dev/userfaultfd: {e2}")),
    }
}

/// `struct pm_scan_arg` of `<linux/fs.h>`.
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong = (3 << 30)
    | ((std::mem::size_of::<PmScanArg>() as libc::c_ulong) << 16)
    | ((b'f' as libc::c_ulong) << 8)
    | 16;
const PAGE_IS_PRESENT: u64 = 1 << 3;

fn probe_pagemap_scan() -> Probe {
    let page = match Page::new() {
        Ok(p) => p,
        Err(e) => return Probe::no(format!("mmap a test page: {e}")),
    };
    page.touch();
    let f = match File::open("/proc/self/pagemap") {
        Ok(f) => f,
        Err(e) => return Probe::no(format!("open /proc/self/pagemap: {e}")),
    };
    let mut regions = [PageRegion::default(); 1];
    let mut arg = PmScanArg {
        size: std::mem::size_of::<PmScanArg>() as u64,
        start: page.addr() as u64,
        end: (page.addr() + PAGE) as u64,
        vec: regions.as_mut_ptr() as u64,
        vec_len: 1,
        category_anyof_mask: PAGE_IS_PRESENT,
        return_mask: PAGE_IS_PRESENT,
        ..Default::default()
    };
    // SAFETY: `arg` is a valid pm_scan_arg whose `vec` points at `regions`
    // (one element, as vec_len says); both outlive the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
    if r >= 0 {
        Probe::yes(format!("ioctl(PAGEMAP_SCAN) works ({r} region)"))
    } else {
        Probe::no(format!(
            "ioctl(PAGEMAP_SCAN): {}",
            std::io::Error::last_os_error()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pagemap_scan_ioctl_number_matches_the_kernel() {
        // _IOWR('f', 16, struct pm_scan_arg) with a 96-byte argument.
        assert_eq!(std::mem::size_of::<PmScanArg>(), 96);
        assert_eq!(PAGEMAP_SCAN, 0xC060_6610);
    }

    #[test]
    fn kdat_cache_probe() {
        let d = std::env::temp_dir().join(format!("ms2m-kdat-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        assert!(!probe_kdat_cache(&d).available);
        std::fs::write(d.join("criu.kdat.tmp"), b"").unwrap();
        let p = probe_kdat_cache(&d);
        assert!(!p.available && p.detail.contains("stale"), "{p:?}");
        std::fs::write(d.join("criu.kdat"), b"x").unwrap();
        assert!(probe_kdat_cache(&d).available);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn finds_sh_on_path() {
        assert!(find_on_path("sh").is_some());
        assert!(find_on_path("no-such-binary-ms2m").is_none());
    }

    #[test]
    fn missing_criu_is_reported_not_fatal() {
        let f = Features::detect(Path::new("/nonexistent/criu"));
        assert!(f.criu_version.is_none());
        assert!(f.criu_features.is_none());
        assert!(f
            .criu_error
            .as_deref()
            .unwrap_or("")
            .contains("/nonexistent/criu"));
        assert!(!f.lazy_pages());
        assert!(!f.network_locks.nftables);
    }
}
