//! Scan a directory tree and write it as a GNU-format tar stream.
//!
//! Two phases, so that the caller can still hand the job to the real GNU tar
//! when something is not supported exactly:
//!
//! 1. [`scan`] `lstat`s everything below the root (relative to one directory
//!    fd, never following symlinks) and builds the complete member list. It
//!    writes nothing. Anything whose GNU tar representation this module does
//!    not reproduce (sparse files, unknown file types, negative mtimes) and
//!    any system-call error is returned as a [`ScanError`].
//! 2. [`write_tar`] turns the member list into a tar stream, reading regular
//!    files' contents. Errors here are final ([`WriteError`]): the caller has
//!    started writing and can no longer fall back.
//!
//! The stream mirrors what GNU tar 1.34 writes for
//! `tar --create --one-file-system --check-links --numeric-owner -C DIR .`
//! with its default `--format=gnu`: member names `./`, `./a`, `./d/`,
//! `././@LongLink` records for names and link targets longer than 100 bytes,
//! permissions including setuid/setgid/sticky, numeric owners with empty
//! user/group names, whole-second mtimes, hard links for regular files and
//! symlinks whose inode was already archived, sockets skipped with a warning,
//! and the stream padded to GNU tar's 10240-byte record size. Directories on a
//! different device than their parent are archived but not descended into.
//! Members come in GNU tar's order (pre-order, directory entries unsorted, as
//! `getdents` returns them) and headers are formatted like GNU tar's, so for
//! the same tree the uncompressed stream is byte-identical to GNU tar's.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fmt;
use std::io::{self, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use tar::{EntryType, Header};

/// Size of a tar block.
const BLOCK: usize = 512;
/// GNU tar's default record size (`-b20`): the stream is padded to a multiple.
pub const RECORD: u64 = 20 * BLOCK as u64;
/// Bytes available for a name or link target inside a tar header.
const NAME_FIELD: usize = 100;
/// Name GNU tar gives its long-name / long-link pseudo members.
const LONG_LINK_NAME: &[u8] = b"././@LongLink";

/// What a member is, with the type-specific data the header needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Directory,
    Regular {
        size: u64,
    },
    /// A regular file or symlink whose inode was archived earlier under
    /// `target` (a member name).
    HardLink {
        target: Vec<u8>,
    },
    Symlink {
        target: Vec<u8>,
    },
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
}

/// One archive member.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Member name as GNU tar writes it: `./`, `./a`, `./d/` (directories end
    /// with `/`).
    pub name: Vec<u8>,
    pub kind: Kind,
    /// `st_mode & 0o7777`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the epoch.
    pub mtime: u64,
    /// Identity at scan time; regular files are re-checked when opened.
    pub dev: libc::dev_t,
    pub ino: libc::ino_t,
}

impl Entry {
    /// Path of the member relative to the root directory (`d/b` for `./d/b`).
    fn rel_path(&self) -> &[u8] {
        let rel = self.name.strip_prefix(b"./").unwrap_or(&self.name);
        let rel = rel.strip_suffix(b"/").unwrap_or(rel);
        if rel.is_empty() {
            b"."
        } else {
            rel
        }
    }
}

/// The scanned tree: an open fd of the root plus the member list in archive
/// order (pre-order, each directory's entries in the order the kernel lists
/// them, like GNU tar).
#[derive(Debug)]
pub struct Tree {
    root: OwnedFd,
    pub entries: Vec<Entry>,
    /// Messages GNU tar would print without failing (sockets, missing links).
    /// Print them only when the fast path is actually taken.
    pub warnings: Vec<String>,
}

/// Why the fast path cannot archive the tree; the caller falls back to GNU
/// tar.
#[derive(Debug)]
pub enum ScanError {
    /// GNU tar would store this differently from what [`write_tar`] writes.
    Unsupported { path: String, what: String },
    /// A system call failed.
    Io {
        path: String,
        op: &'static str,
        source: io::Error,
    },
}

impl fmt::Display for ScanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScanError::Unsupported { path, what } => write!(f, "{path}: {what}"),
            ScanError::Io { path, op, source } => write!(f, "{path}: {op}: {source}"),
        }
    }
}

impl std::error::Error for ScanError {}

/// A failure after writing started: fatal.
#[derive(Debug)]
pub enum WriteError {
    /// Reading a member's data failed or it changed since the scan.
    Input {
        path: String,
        op: &'static str,
        source: io::Error,
    },
    /// Writing the archive failed.
    Output(io::Error),
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteError::Input { path, op, source } => write!(f, "{path}: {op}: {source}"),
            WriteError::Output(source) => write!(f, "writing the archive: {source}"),
        }
    }
}

impl std::error::Error for WriteError {}

fn display(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

// ---------------------------------------------------------------------------
// Thin safe wrappers around the *at system calls.

/// The `lstat` fields the archive needs, in fixed-width types.
#[derive(Debug, Clone, Copy)]
struct Meta {
    mode: u32,
    nlink: libc::nlink_t,
    uid: u32,
    gid: u32,
    size: i64,
    blocks: i64,
    mtime: i64,
    dev: libc::dev_t,
    ino: libc::ino_t,
    rdev: libc::dev_t,
}

impl Meta {
    fn file_type(&self) -> u32 {
        self.mode & libc::S_IFMT
    }
}

/// `fstatat(dirfd, name, flags)`; with an empty name and `AT_EMPTY_PATH` it
/// is `fstat(dirfd)`.
fn stat_at(dirfd: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<Meta> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `name` is a valid NUL-terminated string and `st` points to
    // writable memory of the size and alignment of `struct stat`, which is all
    // fstatat writes to.
    let rc = unsafe { libc::fstatat(dirfd, name.as_ptr(), st.as_mut_ptr(), flags) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatat returned 0, so it filled in the whole struct.
    let st = unsafe { st.assume_init() };
    Ok(Meta {
        mode: st.st_mode,
        nlink: st.st_nlink,
        uid: st.st_uid,
        gid: st.st_gid,
        size: st.st_size,
        blocks: st.st_blocks,
        mtime: st.st_mtime,
        dev: st.st_dev,
        ino: st.st_ino,
        rdev: st.st_rdev,
    })
}

fn fstat(fd: &OwnedFd) -> io::Result<Meta> {
    stat_at(fd.as_raw_fd(), c"", libc::AT_EMPTY_PATH)
}

/// `openat(dirfd, path, flags | O_CLOEXEC)`.
fn open_at(dirfd: RawFd, path: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: `path` is a valid NUL-terminated string; `flags` never contains
    // O_CREAT or O_TMPFILE, so no mode argument is read.
    let fd = unsafe { libc::openat(dirfd, path.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `readlinkat(dirfd, name)`; `hint` is the size lstat reported.
fn read_link_at(dirfd: RawFd, name: &CStr, hint: usize) -> io::Result<Vec<u8>> {
    let mut cap = hint.max(64) + 1;
    loop {
        let mut buf = vec![0u8; cap];
        // SAFETY: `name` is NUL-terminated; `buf` is valid for writes of
        // `buf.len()` bytes and readlinkat writes at most that many.
        let n =
            unsafe { libc::readlinkat(dirfd, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        if n < buf.len() {
            buf.truncate(n);
            return Ok(buf);
        }
        // Possibly truncated: retry with more room.
        cap = cap
            .checked_mul(2)
            .ok_or_else(|| io::Error::other("symlink target too long"))?;
    }
}

/// Names in the directory `fd` (without `.` and `..`), via getdents64, using
/// `buf` as scratch space. `fd` must be freshly opened: reading advances its
/// offset.
fn read_dir_names(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<Vec<Vec<u8>>> {
    // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
    const RECLEN_AT: usize = 16;
    const NAME_AT: usize = 19;
    let mut names = Vec::new();
    loop {
        // SAFETY: getdents64 writes at most `buf.len()` bytes of dirent
        // records into `buf`, which is valid for writes of that many bytes;
        // `fd` is an open directory descriptor for the duration of the call.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                fd.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        if n == 0 {
            return Ok(names);
        }
        let mut records = buf
            .get(..n)
            .ok_or_else(|| io::Error::other("getdents64 overran"))?;
        while !records.is_empty() {
            let bad = || io::Error::other("malformed getdents64 record");
            let reclen = records.get(RECLEN_AT..RECLEN_AT + 2).ok_or_else(bad)?;
            let reclen = usize::from(u16::from_ne_bytes([reclen[0], reclen[1]]));
            let record = records.get(..reclen).ok_or_else(bad)?;
            let name = record.get(NAME_AT..).ok_or_else(bad)?;
            let name = CStr::from_bytes_until_nul(name)
                .map_err(|_| bad())?
                .to_bytes();
            if name != b"." && name != b".." {
                names.push(name.to_vec());
            }
            records = &records[reclen.max(1)..];
        }
    }
}

// ---------------------------------------------------------------------------
// Scan.

/// Scan `dir` (followed if it is a symlink, like GNU tar's `-C`) and
/// everything below it.
///
/// Unlike `tar --file`, `tar --gzip` to stdout does not recognise its own
/// output file inside the tree (gzip writes it, not tar): it archives it in
/// whatever state it is in. So does this.
pub fn scan(dir: &Path) -> Result<Tree, ScanError> {
    let shown = dir.display().to_string();
    let cdir = CString::new(dir.as_os_str().as_bytes()).map_err(|_| ScanError::Unsupported {
        path: shown.clone(),
        what: "NUL byte in directory name".into(),
    })?;
    let root =
        open_at(libc::AT_FDCWD, &cdir, libc::O_RDONLY | libc::O_DIRECTORY).map_err(|source| {
            ScanError::Io {
                path: shown.clone(),
                op: "open directory",
                source,
            }
        })?;
    let meta = fstat(&root).map_err(|source| ScanError::Io {
        path: shown,
        op: "stat",
        source,
    })?;
    let mut scanner = Scanner {
        entries: Vec::new(),
        warnings: Vec::new(),
        links: HashMap::new(),
        dirents: vec![0; DIRENT_BUF],
    };
    let name = b"./".to_vec();
    scanner.push(name.clone(), Kind::Directory, &meta)?;
    scanner.walk(&root, &name, meta.dev)?;
    let mut warnings = scanner.warnings;
    // --check-links: GNU tar warns (exit status unaffected) about hard-linked
    // files whose other names are outside the archive.
    let mut missing: Vec<&Link> = scanner
        .links
        .values()
        .filter(|l| l.seen < l.nlink)
        .collect();
    missing.sort_by_key(|l| l.order);
    for link in missing {
        warnings.push(format!("Missing links to '{}'.", display(&link.name)));
    }
    Ok(Tree {
        root,
        entries: scanner.entries,
        warnings,
    })
}

/// First archived name of a multiply linked inode.
struct Link {
    name: Vec<u8>,
    nlink: libc::nlink_t,
    seen: libc::nlink_t,
    order: usize,
}

/// getdents64 buffer size: a few hundred names per call.
const DIRENT_BUF: usize = 16 * 1024;

struct Scanner {
    entries: Vec<Entry>,
    warnings: Vec<String>,
    links: HashMap<(libc::dev_t, libc::ino_t), Link>,
    /// Scratch space for getdents64, shared by all directories (each one is
    /// listed completely before any subdirectory is).
    dirents: Vec<u8>,
}

impl Scanner {
    fn push(&mut self, name: Vec<u8>, kind: Kind, meta: &Meta) -> Result<(), ScanError> {
        let mtime = u64::try_from(meta.mtime).map_err(|_| ScanError::Unsupported {
            path: display(&name),
            what: format!("negative mtime {}", meta.mtime),
        })?;
        self.entries.push(Entry {
            name,
            kind,
            mode: meta.mode & 0o7777,
            uid: meta.uid,
            gid: meta.gid,
            mtime,
            dev: meta.dev,
            ino: meta.ino,
        });
        Ok(())
    }

    /// GNU tar stores a regular file or symlink whose inode it already
    /// archived as a hard link to the first name (devices and FIFOs are
    /// always stored in full).
    fn hard_link(&mut self, name: &[u8], meta: &Meta) -> Option<Kind> {
        if meta.nlink <= 1 {
            return None;
        }
        let order = self.links.len();
        match self.links.entry((meta.dev, meta.ino)) {
            std::collections::hash_map::Entry::Occupied(mut first) => {
                let first = first.get_mut();
                first.seen += 1;
                Some(Kind::HardLink {
                    target: first.name.clone(),
                })
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(Link {
                    name: name.to_vec(),
                    nlink: meta.nlink,
                    seen: 1,
                    order,
                });
                None
            }
        }
    }

    /// Archive the contents of the directory `dir` (member name `prefix`,
    /// ending with `/`, on device `dev`).
    fn walk(&mut self, dir: &OwnedFd, prefix: &[u8], dev: libc::dev_t) -> Result<(), ScanError> {
        // Directory order, unsorted: GNU tar's default (--sort=none) does the
        // same, so members (and which name of a hard-linked file carries the
        // data) come out in the same order as GNU tar's.
        let names = read_dir_names(dir, &mut self.dirents).map_err(|source| ScanError::Io {
            path: display(prefix),
            op: "read directory",
            source,
        })?;
        for base in names {
            let mut name = Vec::with_capacity(prefix.len() + base.len() + 1);
            name.extend_from_slice(prefix);
            name.extend_from_slice(&base);
            let io_err = |op: &'static str, name: &[u8]| {
                let path = display(name);
                move |source| ScanError::Io { path, op, source }
            };
            let cbase = CString::new(base).map_err(|_| ScanError::Unsupported {
                path: display(&name),
                what: "NUL byte in file name".into(),
            })?;
            let meta = stat_at(dir.as_raw_fd(), &cbase, libc::AT_SYMLINK_NOFOLLOW)
                .map_err(io_err("lstat", &name))?;
            match meta.file_type() {
                libc::S_IFDIR => {
                    name.push(b'/');
                    self.push(name.clone(), Kind::Directory, &meta)?;
                    // --one-file-system: a mount point of another file system
                    // is archived as a directory but not descended into.
                    if meta.dev != dev {
                        continue;
                    }
                    let child = open_at(
                        dir.as_raw_fd(),
                        &cbase,
                        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    )
                    .map_err(io_err("open directory", &name))?;
                    let now = fstat(&child).map_err(io_err("stat", &name))?;
                    if (now.dev, now.ino) != (meta.dev, meta.ino) {
                        return Err(ScanError::Unsupported {
                            path: display(&name),
                            what: "directory replaced while scanning".into(),
                        });
                    }
                    self.walk(&child, &name, dev)?;
                }
                libc::S_IFREG => {
                    let size = u64::try_from(meta.size).unwrap_or(0);
                    let blocks = u64::try_from(meta.blocks).unwrap_or(0);
                    // GNU tar's --sparse test (ST_IS_SPARSE): fewer blocks
                    // allocated than the size needs. It would store such a
                    // file as a GNU sparse member; let it.
                    if size > 0 && blocks.saturating_mul(512) < size {
                        return Err(ScanError::Unsupported {
                            path: display(&name),
                            what: format!("sparse file ({size} bytes, {blocks} blocks)"),
                        });
                    }
                    let kind = self
                        .hard_link(&name, &meta)
                        .unwrap_or(Kind::Regular { size });
                    self.push(name, kind, &meta)?;
                }
                libc::S_IFLNK => {
                    let kind = match self.hard_link(&name, &meta) {
                        Some(link) => link,
                        None => {
                            let hint = usize::try_from(meta.size).unwrap_or(0);
                            let target = read_link_at(dir.as_raw_fd(), &cbase, hint)
                                .map_err(io_err("readlink", &name))?;
                            Kind::Symlink { target }
                        }
                    };
                    self.push(name, kind, &meta)?;
                }
                libc::S_IFCHR | libc::S_IFBLK => {
                    let (major, minor) = (libc::major(meta.rdev), libc::minor(meta.rdev));
                    let kind = if meta.file_type() == libc::S_IFCHR {
                        Kind::CharDevice { major, minor }
                    } else {
                        Kind::BlockDevice { major, minor }
                    };
                    self.push(name, kind, &meta)?;
                }
                libc::S_IFIFO => self.push(name, Kind::Fifo, &meta)?,
                libc::S_IFSOCK => {
                    self.warnings
                        .push(format!("{}: socket ignored", display(&name)));
                }
                other => {
                    return Err(ScanError::Unsupported {
                        path: display(&name),
                        what: format!("unknown file type {other:#o}"),
                    })
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Write.

/// Tracks the stream position so the end can be padded to a full record.
struct TarWriter<'a, W: Write> {
    out: &'a mut W,
    pos: u64,
}

impl<W: Write> TarWriter<'_, W> {
    fn write(&mut self, data: &[u8]) -> Result<(), WriteError> {
        self.out.write_all(data).map_err(WriteError::Output)?;
        self.pos += data.len() as u64;
        Ok(())
    }

    /// Zero-fill to the next multiple of `unit`.
    fn pad_to(&mut self, unit: u64) -> Result<(), WriteError> {
        const ZEROS: [u8; BLOCK] = [0; BLOCK];
        let mut left = (unit - self.pos % unit) % unit;
        while left > 0 {
            let n = left.min(BLOCK as u64);
            self.write(&ZEROS[..n as usize])?;
            left -= n;
        }
        Ok(())
    }

    /// A `././@LongLink` pseudo member of type `kind` carrying `long` (a name
    /// or link target longer than a header field), as GNU tar writes it.
    fn long_link(&mut self, kind: EntryType, long: &[u8]) -> Result<(), WriteError> {
        let mut header = Header::new_gnu();
        set_field(&mut header.as_old_mut().name, LONG_LINK_NAME);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_size(long.len() as u64 + 1);
        header.set_entry_type(kind);
        set_gnu_cksum(&mut header);
        self.write(header.as_bytes())?;
        self.write(long)?;
        self.write(&[0])?;
        self.pad_to(BLOCK as u64)
    }
}

/// Copy `value` into a header field, truncating like GNU tar does after
/// writing the full value in a long-link record.
fn set_field(field: &mut [u8], value: &[u8]) {
    let n = value.len().min(field.len());
    field[..n].copy_from_slice(&value[..n]);
}

/// Fill in the header checksum formatted the way GNU tar does (six octal
/// digits, NUL, space) rather than the tar crate's seven digits and NUL. Both
/// are valid; matching GNU tar makes our headers byte-identical to its.
fn set_gnu_cksum(header: &mut Header) {
    let cksum = &mut header.as_old_mut().cksum;
    cksum.fill(b' ');
    let sum: u32 = header.as_bytes().iter().map(|&b| u32::from(b)).sum();
    // The sum of 512 bytes is at most 512 * 255 = 0o376000: six digits.
    let digits = format!("{sum:06o}");
    let cksum = &mut header.as_old_mut().cksum;
    cksum[..6].copy_from_slice(&digits.as_bytes()[..6]);
    cksum[6] = 0;
    cksum[7] = b' ';
}

fn header_for(entry: &Entry) -> Header {
    let mut header = Header::new_gnu();
    header.set_mode(entry.mode);
    header.set_uid(u64::from(entry.uid));
    header.set_gid(u64::from(entry.gid));
    header.set_mtime(entry.mtime);
    header.set_size(0);
    let (kind, device) = match &entry.kind {
        Kind::Directory => (EntryType::Directory, None),
        Kind::Regular { size } => {
            header.set_size(*size);
            (EntryType::Regular, None)
        }
        Kind::HardLink { .. } => (EntryType::Link, None),
        Kind::Symlink { .. } => (EntryType::Symlink, None),
        Kind::CharDevice { major, minor } => (EntryType::Char, Some((*major, *minor))),
        Kind::BlockDevice { major, minor } => (EntryType::Block, Some((*major, *minor))),
        Kind::Fifo => (EntryType::Fifo, None),
    };
    header.set_entry_type(kind);
    if let (Some((major, minor)), Some(gnu)) = (device, header.as_gnu_mut()) {
        gnu.set_device_major(major);
        gnu.set_device_minor(minor);
    }
    header
}

/// Write `tree` as an uncompressed tar stream to `out`. Does not flush.
pub fn write_tar<W: Write>(tree: &Tree, out: &mut W) -> Result<(), WriteError> {
    let mut w = TarWriter { out, pos: 0 };
    let mut buf = Vec::new();
    for entry in &tree.entries {
        let mut header = header_for(entry);
        let target = match &entry.kind {
            Kind::HardLink { target } | Kind::Symlink { target } => Some(target.as_slice()),
            _ => None,
        };
        if let Some(target) = target {
            if target.len() > NAME_FIELD {
                w.long_link(EntryType::GNULongLink, target)?;
            }
            set_field(&mut header.as_old_mut().linkname, target);
        }
        if entry.name.len() > NAME_FIELD {
            w.long_link(EntryType::GNULongName, &entry.name)?;
        }
        set_field(&mut header.as_old_mut().name, &entry.name);
        set_gnu_cksum(&mut header);
        w.write(header.as_bytes())?;
        if let Kind::Regular { size } = entry.kind {
            if size > 0 {
                if buf.is_empty() {
                    buf = vec![0u8; 128 * 1024];
                }
                copy_file(tree, entry, size, &mut buf, &mut w)?;
                w.pad_to(BLOCK as u64)?;
            }
        }
    }
    // End of archive: two zero blocks, then fill the last record.
    w.write(&[0u8; 2 * BLOCK])?;
    w.pad_to(RECORD)
}

/// Append exactly `size` bytes of the regular file `entry` to the stream.
fn copy_file<W: Write>(
    tree: &Tree,
    entry: &Entry,
    size: u64,
    buf: &mut [u8],
    w: &mut TarWriter<'_, W>,
) -> Result<(), WriteError> {
    let input = |op: &'static str| {
        let path = display(&entry.name);
        move |source| WriteError::Input { path, op, source }
    };
    let rel = CString::new(entry.rel_path()).map_err(|_| {
        input("open")(io::Error::new(
            io::ErrorKind::InvalidInput,
            "NUL byte in file name",
        ))
    })?;
    let fd = open_at(
        tree.root.as_raw_fd(),
        &rel,
        libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NOCTTY,
    )
    .map_err(input("open"))?;
    let now = fstat(&fd).map_err(input("stat"))?;
    if now.file_type() != libc::S_IFREG || (now.dev, now.ino) != (entry.dev, entry.ino) {
        return Err(input("open")(io::Error::other(
            "file replaced since it was scanned",
        )));
    }
    let mut file = std::fs::File::from(fd);
    let mut left = size;
    while left > 0 {
        let want = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
        let n = match io::Read::read(&mut file, &mut buf[..want]) {
            Ok(0) => {
                return Err(input("read")(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("file shrank by {left} bytes since it was scanned"),
                )))
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(input("read")(e)),
        };
        w.write(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::io::Read;
    use std::path::PathBuf;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let dir = std::env::temp_dir()
                .join(format!("ms2m-criu-tar-unit-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).expect("create temp dir");
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn archive(tree: &Tree) -> Vec<u8> {
        let mut out = Vec::new();
        write_tar(tree, &mut out).expect("write_tar");
        out
    }

    /// (path, type, link target, data) of one member.
    type Member = (Vec<u8>, EntryType, Option<Vec<u8>>, Vec<u8>);

    /// Every member, read back with the tar crate's reader (which resolves
    /// GNU long names).
    fn members(data: &[u8]) -> Vec<Member> {
        let mut archive = tar::Archive::new(data);
        let mut out = Vec::new();
        for entry in archive.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let path = entry.path_bytes().into_owned();
            let kind = entry.header().entry_type();
            let link = entry.link_name_bytes().map(|l| l.into_owned());
            let mut data = Vec::new();
            entry.read_to_end(&mut data).expect("read data");
            out.push((path, kind, link, data));
        }
        out
    }

    #[test]
    fn names_types_and_record_padding() {
        let tmp = TempDir::new("names");
        let root = &tmp.0;
        fs::create_dir(root.join("d")).unwrap();
        fs::write(root.join("d/b"), b"hello").unwrap();
        fs::write(root.join("a"), b"").unwrap();
        std::os::unix::fs::symlink("a", root.join("s")).unwrap();
        fs::hard_link(root.join("d/b"), root.join("h")).unwrap();

        let tree = scan(root).expect("scan");
        assert_eq!(tree.entries[0].name, b"./");
        let mut names: Vec<&[u8]> = tree.entries.iter().map(|e| e.name.as_slice()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [&b"./"[..], b"./a", b"./d/", b"./d/b", b"./h", b"./s"]
        );
        let data = archive(&tree);
        assert_eq!(
            data.len() as u64 % RECORD,
            0,
            "padded to a 10240-byte record"
        );
        let got = members(&data);
        let find = |name: &[u8]| got.iter().find(|m| m.0 == name).expect("member");
        // Whichever of d/b and h comes first carries the data, the other one
        // is a hard link to it.
        let (b, h) = (find(b"./d/b"), find(b"./h"));
        let (first, second) = if b.1 == EntryType::Regular {
            (b, h)
        } else {
            (h, b)
        };
        assert_eq!(first.1, EntryType::Regular);
        assert_eq!(first.3, b"hello");
        assert_eq!(second.1, EntryType::Link);
        assert_eq!(second.2.as_deref(), Some(first.0.as_slice()));
        let s = find(b"./s");
        assert_eq!(s.1, EntryType::Symlink);
        assert_eq!(s.2.as_deref(), Some(&b"a"[..]));
        assert_eq!(find(b"./d/").1, EntryType::Directory);
        // Missing-links bookkeeping: both names of d/b are inside the tree.
        assert!(tree.warnings.is_empty(), "{:?}", tree.warnings);
    }

    #[test]
    fn long_names_and_targets_use_gnu_long_link_records() {
        let tmp = TempDir::new("long");
        let root = &tmp.0;
        // "./" + 98 bytes = exactly 100: fits the header field, no LongLink.
        let exact = "e".repeat(98);
        fs::write(root.join(&exact), b"x").unwrap();
        let long_dir = "d".repeat(120);
        fs::create_dir(root.join(&long_dir)).unwrap();
        let target = "t".repeat(150);
        std::os::unix::fs::symlink(&target, root.join("l")).unwrap();

        let data = archive(&scan(root).expect("scan"));
        let got = members(&data);
        let names: Vec<String> = got.iter().map(|m| display(&m.0)).collect();
        assert!(names.contains(&format!("./{long_dir}/")), "{names:?}");
        assert!(names.contains(&format!("./{exact}")), "{names:?}");
        let link = got.iter().find(|m| m.0 == b"./l").expect("symlink member");
        assert_eq!(link.2.as_deref(), Some(target.as_bytes()));
        // Exactly two raw LongLink headers: the directory name and the target.
        let raw_long = data
            .chunks(BLOCK)
            .filter(|b| b.starts_with(LONG_LINK_NAME))
            .count();
        assert_eq!(raw_long, 2);
    }

    #[test]
    fn file_vanishing_after_scan_is_a_write_error_naming_it() {
        let tmp = TempDir::new("vanish");
        fs::write(tmp.0.join("gone"), b"data").unwrap();
        let tree = scan(&tmp.0).expect("scan");
        fs::remove_file(tmp.0.join("gone")).unwrap();
        let err = write_tar(&tree, &mut Vec::new()).expect_err("must fail");
        let msg = err.to_string();
        assert!(msg.contains("./gone") && msg.contains("open"), "{msg}");
    }

    #[test]
    fn file_shrinking_after_scan_is_a_write_error() {
        let tmp = TempDir::new("shrink");
        fs::write(tmp.0.join("f"), b"0123456789").unwrap();
        let tree = scan(&tmp.0).expect("scan");
        fs::write(tmp.0.join("f"), b"0123").unwrap();
        let err = write_tar(&tree, &mut Vec::new()).expect_err("must fail");
        let msg = err.to_string();
        assert!(msg.contains("./f") && msg.contains("shrank"), "{msg}");
    }

    #[test]
    fn sparse_file_is_unsupported() {
        let tmp = TempDir::new("sparse");
        let f = fs::File::create(tmp.0.join("holes")).unwrap();
        f.set_len(16 << 20).unwrap();
        match scan(&tmp.0) {
            Err(ScanError::Unsupported { path, what }) => {
                assert_eq!(path, "./holes");
                assert!(what.contains("sparse"), "{what}");
            }
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }

    #[test]
    fn missing_links_are_reported() {
        let tmp = TempDir::new("missing");
        fs::create_dir(tmp.0.join("in")).unwrap();
        fs::write(tmp.0.join("in/f"), b"x").unwrap();
        fs::hard_link(tmp.0.join("in/f"), tmp.0.join("outside")).unwrap();
        let tree = scan(&tmp.0.join("in")).expect("scan");
        assert_eq!(tree.warnings, ["Missing links to './f'."]);
    }
}
