//! Moving a checkpoint directory to another containerd host over TCP: the
//! wire protocol, the sending side ([`TargetSession`], used by
//! `ms2m migrate`) and the verifying receiver ([`receive_files`], used by
//! `ms2m agent`).
//!
//! This module depends on nothing else in the crate (only on tokio, serde,
//! sha2), so tests can include it on its own.
//!
//! # Framing
//!
//! Every control message is a frame: a 4-byte big-endian length, then that
//! many bytes of JSON, a [`Message`] tagged by `"type"` (at most
//! [`MAX_FRAME`] bytes). File contents are not framed: a `file` message
//! announcing `size` bytes is followed by exactly `size` raw bytes.
//!
//! # Message sequence (C: the sender, `ms2m migrate`; A: the agent)
//!
//! ```text
//! C: hello {protocol: "ms2m.transfer", version: 1}
//! A: hello {protocol, version}                        (or error)
//! C: offer {offer, files, bytes}                       declared totals, bounded
//! A: accepted {dir}                                    (or error: e.g. the container exists)
//!    for each regular file of the directory, sorted by path:
//! C: file {path, size, mode}  <size raw bytes>  file_done {sha256}
//! C: end {files, bytes, sha256}                       sha256 of the set, see [`set_digest`]
//! A: received {files, bytes, sha256, elapsed_ms}       after checking every file's digest
//! C: restore
//! A: restored {pid, restore_ms, image_dir}            container + task created and started
//! C: commit                   |  C: abort {migration_id, reason}
//! A: committed                |  A: aborted {cleaned}  (after killing and deleting everything)
//! ```
//!
//! `abort` may come instead of any message after `accepted`. An `error`
//! from the agent ends the session: the agent has already removed everything
//! it received or created for it. A connection that drops before `commit`
//! is an abort. A sender whose stream broke mid-file (timeout, read error)
//! opens a new connection and sends `hello` then `abort {migration_id}`: the
//! agent answers once that migration's session has been cleaned up.
//!
//! Paths are relative, `/`-separated, made of plain components only (no
//! `..`, `.`, absolute paths); the receiver creates each file new in a fresh
//! 0700 directory without following symlinks, and checks each file's
//! sha256 (computed while writing) before anything is restored.

// The sending half is called by `ms2m migrate`; tests include this file on
// its own and use only part of it.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

/// Protocol name sent in `hello`.
pub const PROTOCOL: &str = "ms2m.transfer";
/// Protocol version sent in `hello`; the agent refuses another one.
pub const VERSION: u32 = 1;
/// Largest control frame (the offer carries the OCI spec), bytes.
pub const MAX_FRAME: u32 = 16 << 20;
/// Most files one transfer may carry.
pub const MAX_FILES: u64 = 100_000;
/// Most bytes one transfer may carry (all files together).
pub const MAX_BYTES: u64 = 256 << 30;
/// Longest relative path of a file, bytes.
pub const MAX_PATH_LEN: usize = 1024;
/// Deepest relative path of a file, components.
pub const MAX_PATH_DEPTH: usize = 16;
/// Timeout of one network read or write (a frame, or a chunk of a file).
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the sender waits for the agent to confirm the digests.
pub const VERIFY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the sender waits for the restore on the target.
pub const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the sender waits for the agent to clean up after an abort.
pub const ABORT_TIMEOUT: Duration = Duration::from_secs(90);

/// Size of a chunk of file data read, sent and written at once.
const CHUNK: usize = 1 << 20;
/// Socket buffer sizes (user space).
const SOCKET_BUF: usize = 256 << 10;

/// What the sender proposes to migrate: everything the target needs besides
/// the CRIU images to create the container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    /// Names this migration (the agent's directory DIR/<migration_id>).
    pub migration_id: String,
    /// The id to use on the target.
    pub container_id: String,
    /// The container's image ref (must exist, unpacked, on the target).
    pub image: String,
    /// The snapshotter of the container's rootfs.
    pub snapshotter: String,
    /// The runtime, e.g. `io.containerd.ms2m.v1`.
    pub runtime: String,
    /// The container's OCI runtime spec (JSON, from Containers.Get).
    pub spec: serde_json::Value,
    /// The container's labels.
    pub labels: std::collections::HashMap<String, String>,
}

/// One control message of the protocol (see the module documentation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// First message of each side.
    Hello {
        /// [`PROTOCOL`].
        protocol: String,
        /// [`VERSION`].
        version: u32,
        /// The sender's shared secret (the agent's `--token-file`); only
        /// the sending side sends it, and it is never logged.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    /// The sender proposes a migration and declares the totals.
    Offer {
        /// What to migrate.
        offer: Offer,
        /// How many files will follow.
        files: u64,
        /// How many bytes they hold together.
        bytes: u64,
    },
    /// The agent accepts the offer and receives into `dir`.
    Accepted {
        /// The directory on the target.
        dir: String,
    },
    /// A file follows: exactly `size` raw bytes after this frame.
    File {
        /// Relative, `/`-separated path.
        path: String,
        /// Its size, bytes.
        size: u64,
        /// Its permission bits.
        mode: u32,
    },
    /// The end of a file's bytes, with their sha256 (hex).
    FileDone {
        /// sha256 of the file's bytes, lower-case hex.
        sha256: String,
    },
    /// All files were sent.
    End {
        /// How many.
        files: u64,
        /// Their bytes together.
        bytes: u64,
        /// [`set_digest`] of all of them.
        sha256: String,
    },
    /// The agent checked every file's digest.
    Received {
        /// How many files.
        files: u64,
        /// Their bytes together.
        bytes: u64,
        /// [`set_digest`] as computed by the agent.
        sha256: String,
        /// The agent's wall time from `accepted` to the check, ms.
        elapsed_ms: f64,
    },
    /// Create and start the restored container.
    Restore,
    /// The restored task runs.
    Restored {
        /// Its PID on the target.
        pid: u32,
        /// From Tasks.Create until it runs, ms.
        restore_ms: f64,
        /// The images it was restored from, on the target.
        image_dir: String,
    },
    /// The migration succeeded: keep the target, forget the session.
    Commit,
    /// The agent forgot the session.
    Committed,
    /// The migration is abandoned. On a fresh connection (right after
    /// `hello`), it names the migration whose session to wait for.
    Abort {
        /// The migration.
        migration_id: String,
        /// Why, for the agent's log.
        reason: String,
    },
    /// The agent removed everything of the session.
    Aborted {
        /// What was cleaned up, one line each.
        cleaned: Vec<String>,
    },
    /// A refusal or failure; ends the session (already cleaned up).
    Error {
        /// What went wrong.
        message: String,
    },
}

impl Message {
    /// The message's `type`, for errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Offer { .. } => "offer",
            Message::Accepted { .. } => "accepted",
            Message::File { .. } => "file",
            Message::FileDone { .. } => "file_done",
            Message::End { .. } => "end",
            Message::Received { .. } => "received",
            Message::Restore => "restore",
            Message::Restored { .. } => "restored",
            Message::Commit => "commit",
            Message::Committed => "committed",
            Message::Abort { .. } => "abort",
            Message::Aborted { .. } => "aborted",
            Message::Error { .. } => "error",
        }
    }

    /// Our `hello`.
    pub fn hello() -> Message {
        Message::hello_with(None)
    }

    /// Our `hello`, carrying `token` (the sending side).
    pub fn hello_with(token: Option<&str>) -> Message {
        Message::Hello {
            protocol: PROTOCOL.to_string(),
            version: VERSION,
            token: token.map(str::to_string),
        }
    }
}

/// Checks a peer's `hello`.
pub fn check_hello(msg: &Message) -> Result<()> {
    match msg {
        Message::Hello {
            protocol, version, ..
        } if protocol == PROTOCOL && *version == VERSION => Ok(()),
        Message::Hello {
            protocol, version, ..
        } => bail!(
            "peer speaks {protocol} version {version}, this side {PROTOCOL} version {VERSION}"
        ),
        Message::Error { message } => bail!("peer refused: {message}"),
        other => bail!("expected hello, got {}", other.kind()),
    }
}

/// Checks the token of a peer's `hello` against `expected` (the agent's
/// `--token-file`; `None`: no token required). Compares in constant time.
pub fn check_token(msg: &Message, expected: Option<&str>) -> Result<()> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let given = match msg {
        Message::Hello { token, .. } => token.as_deref().unwrap_or(""),
        _ => "",
    };
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= (a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0)) as usize;
    }
    if diff != 0 {
        bail!("the sender did not present this agent's token (see `ms2m agent --token-file`)");
    }
    Ok(())
}

/// Reads a token file: its first line, trimmed; an empty token is an error.
pub fn read_token(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.is_empty() {
        bail!("the token file {} is empty", path.display());
    }
    Ok(token)
}

/// Writes one frame (not flushed).
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, msg: &Message) -> Result<()> {
    let body = serde_json::to_vec(msg).context("cannot encode a message")?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|l| *l <= MAX_FRAME)
        .with_context(|| {
            format!(
                "{} message of {} bytes is too large",
                msg.kind(),
                body.len()
            )
        })?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(&body).await?;
    Ok(())
}

/// Reads one frame; `None` on a clean end of stream before its first byte.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Message>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut len[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            bail!("stream ended inside a frame header");
        }
        got += n;
    }
    let len = u32::from_be_bytes(len);
    if len > MAX_FRAME {
        bail!("frame of {len} bytes is over the limit of {MAX_FRAME}");
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)
        .await
        .map_err(|e| anyhow!("stream ended inside a {len}-byte frame: {e}"))?;
    let msg = serde_json::from_slice(&body).context("malformed control message")?;
    Ok(Some(msg))
}

/// A framed TCP connection with buffered halves.
pub struct Conn {
    reader: BufReader<OwnedReadHalf>,
    writer: BufWriter<OwnedWriteHalf>,
    /// The peer's address, for errors.
    pub peer: String,
}

impl Conn {
    /// Wraps a connected stream.
    pub fn new(stream: TcpStream) -> Conn {
        let _ = stream.set_nodelay(true);
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".to_string());
        let (r, w) = stream.into_split();
        Conn {
            reader: BufReader::with_capacity(SOCKET_BUF, r),
            writer: BufWriter::with_capacity(SOCKET_BUF, w),
            peer,
        }
    }

    /// Sends `msg` and flushes, within [`IO_TIMEOUT`].
    pub async fn send(&mut self, msg: &Message) -> Result<()> {
        self.queue(msg).await?;
        self.flush().await
    }

    /// Buffers `msg` without flushing.
    pub async fn queue(&mut self, msg: &Message) -> Result<()> {
        tokio::time::timeout(IO_TIMEOUT, write_frame(&mut self.writer, msg))
            .await
            .map_err(|_| anyhow!("timed out sending {} to {}", msg.kind(), self.peer))?
            .with_context(|| format!("cannot send {} to {}", msg.kind(), self.peer))
    }

    /// Flushes buffered writes, within [`IO_TIMEOUT`].
    pub async fn flush(&mut self) -> Result<()> {
        tokio::time::timeout(IO_TIMEOUT, self.writer.flush())
            .await
            .map_err(|_| anyhow!("timed out writing to {}", self.peer))?
            .with_context(|| format!("cannot write to {}", self.peer))
    }

    /// Writes raw file bytes, within [`IO_TIMEOUT`].
    pub async fn write_raw(&mut self, data: &[u8]) -> Result<()> {
        tokio::time::timeout(IO_TIMEOUT, self.writer.write_all(data))
            .await
            .map_err(|_| anyhow!("timed out sending file data to {}", self.peer))?
            .with_context(|| format!("cannot send file data to {}", self.peer))
    }

    /// Reads exactly `buf.len()` raw bytes, within [`IO_TIMEOUT`].
    pub async fn read_raw(&mut self, buf: &mut [u8]) -> Result<()> {
        tokio::time::timeout(IO_TIMEOUT, self.reader.read_exact(buf))
            .await
            .map_err(|_| anyhow!("timed out receiving file data from {}", self.peer))?
            .map(|_| ())
            .map_err(|e| anyhow!("stream from {} ended inside a file: {e}", self.peer))
    }

    /// Receives one message within `timeout`; the end of the stream is an
    /// error.
    pub async fn recv(&mut self, timeout: Duration) -> Result<Message> {
        match tokio::time::timeout(timeout, read_frame(&mut self.reader)).await {
            Err(_) => bail!(
                "no message from {} within {}s",
                self.peer,
                timeout.as_secs()
            ),
            Ok(Err(e)) => Err(e).with_context(|| format!("cannot read from {}", self.peer)),
            Ok(Ok(None)) => bail!("{} closed the connection", self.peer),
            Ok(Ok(Some(m))) => Ok(m),
        }
    }

    /// Closes the sending half after flushing, then reads and drops what the
    /// peer still sends for up to `linger` (so the peer can read our last
    /// message before the connection is reset).
    pub async fn close_and_drain(mut self, linger: Duration) {
        let _ = self.flush().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.writer.shutdown()).await;
        let mut sink = vec![0u8; CHUNK];
        let deadline = Instant::now() + linger;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match tokio::time::timeout(left, self.reader.read(&mut sink)).await {
                Ok(Ok(n)) if n > 0 => continue,
                _ => break,
            }
        }
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// sha256 of `data`, lower-case hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// The digest of a set of files: sha256 over `"<sha256>  <path>\n"` lines
/// (as `sha256sum` prints them) sorted by path.
pub fn set_digest(files: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = files.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = Sha256::new();
    for (path, sha) in sorted {
        h.update(sha.as_bytes());
        h.update(b"  ");
        h.update(path.as_bytes());
        h.update(b"\n");
    }
    hex(&h.finalize())
}

/// Checks a received file path: relative, plain components only, bounded.
/// Returns it as a path to join to the receiving directory.
pub fn check_relative_path(path: &str) -> Result<PathBuf> {
    if path.is_empty() {
        bail!("empty file path");
    }
    if path.len() > MAX_PATH_LEN {
        bail!("file path of {} bytes is too long", path.len());
    }
    if path.contains('\0') {
        bail!("file path {path:?} contains a NUL byte");
    }
    let p = Path::new(path);
    let mut depth = 0;
    for c in p.components() {
        match c {
            Component::Normal(_) => depth += 1,
            _ => bail!("file path {path:?} escapes the checkpoint directory (only plain relative paths are accepted)"),
        }
    }
    if depth == 0 || depth > MAX_PATH_DEPTH {
        bail!("file path {path:?} has {depth} components (1 to {MAX_PATH_DEPTH} allowed)");
    }
    Ok(p.to_path_buf())
}

/// A file to send.
#[derive(Debug, Clone)]
pub struct FileEntry {
    /// Relative, `/`-separated path.
    pub path: String,
    /// Where it is here.
    pub abs: PathBuf,
    /// Its size when listed.
    pub size: u64,
    /// Its permission bits.
    pub mode: u32,
}

/// Every regular file under `dir` (recursively, symlinks not followed and
/// not sent), sorted by path.
pub fn list_files(dir: &Path) -> Result<Vec<FileEntry>> {
    use std::os::unix::fs::PermissionsExt;
    fn walk(root: &Path, rel: &str, out: &mut Vec<FileEntry>) -> Result<()> {
        let here = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        let entries =
            std::fs::read_dir(&here).with_context(|| format!("cannot list {}", here.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot list {}", here.display()))?;
            let name = entry.file_name();
            let name = name
                .to_str()
                .with_context(|| format!("{:?} in {} is not UTF-8", name, here.display()))?;
            let path = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            let meta = entry
                .metadata()
                .with_context(|| format!("cannot stat {}", entry.path().display()))?;
            if meta.is_dir() {
                walk(root, &path, out)?;
            } else if meta.is_file() {
                out.push(FileEntry {
                    path,
                    abs: entry.path(),
                    size: meta.len(),
                    mode: meta.permissions().mode() & 0o777,
                });
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, "", &mut out)?;
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// What the sender's file reader hands the network side.
enum Chunk {
    Data(Vec<u8>),
    Done(String),
}

/// Reads `files` in chunks, hashing as it goes (runs on a blocking thread).
fn read_files(files: Vec<FileEntry>, tx: mpsc::Sender<Chunk>) -> Result<()> {
    for f in files {
        let file = std::fs::File::open(&f.abs)
            .with_context(|| format!("cannot open {}", f.abs.display()))?;
        let mut file = file.take(f.size + 1);
        let mut h = Sha256::new();
        let mut total = 0u64;
        loop {
            let mut buf = vec![0u8; CHUNK];
            let mut n = 0;
            while n < CHUNK {
                let k = file
                    .read(&mut buf[n..])
                    .with_context(|| format!("cannot read {}", f.abs.display()))?;
                if k == 0 {
                    break;
                }
                n += k;
            }
            if n == 0 {
                break;
            }
            total += n as u64;
            if total > f.size {
                bail!("{} grew while it was sent", f.abs.display());
            }
            buf.truncate(n);
            h.update(&buf);
            if tx.blocking_send(Chunk::Data(buf)).is_err() {
                return Ok(());
            }
        }
        if total != f.size {
            bail!(
                "{} shrank while it was sent ({total} of {} bytes)",
                f.abs.display(),
                f.size
            );
        }
        if tx.blocking_send(Chunk::Done(hex(&h.finalize()))).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// What [`TargetSession::send`] moved.
#[derive(Debug, Clone, Serialize)]
pub struct TransferReport {
    /// Files sent.
    pub files: u64,
    /// Bytes sent (file contents).
    pub bytes: u64,
    /// Wall time from the offer until the agent confirmed the digests, ms.
    pub elapsed_ms: f64,
    /// [`set_digest`] of the files, confirmed by the agent.
    pub sha256: String,
    /// `bytes` over `elapsed_ms`, MiB/s.
    pub mib_per_s: f64,
    /// The directory on the target.
    pub target_dir: String,
}

/// What [`TargetSession::restore`] started.
#[derive(Debug, Clone, Serialize)]
pub struct TargetRestore {
    /// PID of the restored task on the target.
    pub pid: u32,
    /// From Tasks.Create until the task ran, on the target, ms.
    pub restore_ms: f64,
    /// The checkpoint directory on the target it was restored from.
    pub image_dir_on_target: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connected,
    Sent,
    Restored,
    /// The agent ended the session (it sent an error): nothing is left there.
    Ended,
}

/// A migration session with an agent on the target host.
pub struct TargetSession {
    addr: String,
    conn: Option<Conn>,
    phase: Phase,
    /// The stream is out of step (broken mid-message): do not reuse it.
    broken: bool,
    migration_id: Option<String>,
    container_id: String,
    /// The agent's token, sent in every `hello`.
    token: Option<String>,
}

impl TargetSession {
    /// Connects to the agent at `addr` (host:port) and exchanges `hello`,
    /// all within `timeout`.
    pub async fn connect(addr: &str, timeout: Duration) -> Result<TargetSession> {
        Self::connect_with_token(addr, timeout, None).await
    }

    /// [`TargetSession::connect`] presenting `token` (the agent's
    /// `--token-file`).
    pub async fn connect_with_token(
        addr: &str,
        timeout: Duration,
        token: Option<String>,
    ) -> Result<TargetSession> {
        let conn = Self::open(addr, timeout, token.as_deref()).await?;
        Ok(TargetSession {
            addr: addr.to_string(),
            conn: Some(conn),
            phase: Phase::Connected,
            broken: false,
            migration_id: None,
            container_id: String::new(),
            token,
        })
    }

    async fn open(addr: &str, timeout: Duration, token: Option<&str>) -> Result<Conn> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("timed out connecting to the agent at {addr}"))?
            .with_context(|| format!("cannot connect to the agent at {addr}"))?;
        let mut conn = Conn::new(stream);
        conn.send(&Message::hello_with(token)).await?;
        let reply = conn.recv(timeout).await?;
        check_hello(&reply).with_context(|| format!("handshake with the agent at {addr}"))?;
        Ok(conn)
    }

    fn what(&self) -> String {
        match &self.migration_id {
            Some(m) => format!(
                "migration {m} of container {} to {}",
                self.container_id, self.addr
            ),
            None => format!("session with the agent at {}", self.addr),
        }
    }

    fn conn(&mut self) -> Result<&mut Conn> {
        if self.phase == Phase::Ended {
            bail!("the agent ended the session");
        }
        if self.broken {
            bail!("the connection broke earlier");
        }
        self.conn.as_mut().context("not connected")
    }

    /// Receives the reply to a request; an `error` ends the session.
    async fn reply(&mut self, timeout: Duration) -> Result<Message> {
        let msg = self.conn()?.recv(timeout).await;
        match msg {
            Ok(Message::Error { message }) => {
                self.phase = Phase::Ended;
                self.conn = None;
                Err(anyhow!("the agent at {} refused: {message}", self.addr))
            }
            Ok(m) => Ok(m),
            Err(e) => {
                self.broken = true;
                Err(e)
            }
        }
    }

    /// Sends `offer` and every regular file of `dir` (recursively, sorted by
    /// path), hashing each while it is read. Returns after the agent
    /// confirmed every file's digest and the digest of the set.
    pub async fn send(&mut self, offer: &Offer, dir: &Path) -> Result<TransferReport> {
        let what = format!(
            "migration {} of container {} to {}",
            offer.migration_id, offer.container_id, self.addr
        );
        self.send_inner(offer, dir)
            .await
            .with_context(|| format!("sending {} for {what}", dir.display()))
    }

    async fn send_inner(&mut self, offer: &Offer, dir: &Path) -> Result<TransferReport> {
        if self.phase != Phase::Connected || self.migration_id.is_some() {
            bail!("send is only possible once, right after connect");
        }
        let t0 = Instant::now();
        let files = list_files(dir)?;
        let count = files.len() as u64;
        let bytes: u64 = files.iter().map(|f| f.size).sum();
        self.migration_id = Some(offer.migration_id.clone());
        self.container_id = offer.container_id.clone();

        self.conn()?
            .send(&Message::Offer {
                offer: offer.clone(),
                files: count,
                bytes,
            })
            .await
            .inspect_err(|_| self.broken = true)?;
        let target_dir = match self.reply(IO_TIMEOUT).await? {
            Message::Accepted { dir } => dir,
            m => {
                self.broken = true;
                bail!("expected accepted, got {}", m.kind());
            }
        };

        // From here until `end` the stream is inside the file sequence.
        self.broken = true;
        let (tx, mut rx) = mpsc::channel::<Chunk>(8);
        let reader = tokio::task::spawn_blocking({
            let files = files.clone();
            move || read_files(files, tx)
        });
        let mut digests = Vec::with_capacity(files.len());
        let streamed = async {
            let conn = self.conn.as_mut().context("not connected")?;
            for f in &files {
                conn.queue(&Message::File {
                    path: f.path.clone(),
                    size: f.size,
                    mode: f.mode,
                })
                .await?;
                loop {
                    match rx.recv().await {
                        Some(Chunk::Data(d)) => conn.write_raw(&d).await?,
                        Some(Chunk::Done(sha)) => {
                            conn.queue(&Message::FileDone {
                                sha256: sha.clone(),
                            })
                            .await?;
                            digests.push((f.path.clone(), sha));
                            break;
                        }
                        None => return Ok(false),
                    }
                }
            }
            anyhow::Ok(true)
        }
        .await;
        drop(rx);
        let read_result = reader
            .await
            .map_err(|e| anyhow!("the file reader panicked: {e}"))?;
        match streamed {
            Ok(true) => read_result?,
            Ok(false) => {
                read_result?;
                bail!("the file reader stopped early");
            }
            Err(e) => {
                read_result?;
                // The agent may have said why it stopped reading.
                if let Some(conn) = self.conn.as_mut() {
                    if let Ok(Message::Error { message }) = conn.recv(Duration::from_secs(2)).await
                    {
                        self.phase = Phase::Ended;
                        self.conn = None;
                        return Err(anyhow!("the agent at {} refused: {message}", self.addr));
                    }
                }
                return Err(e);
            }
        }
        let sha256 = set_digest(&digests);
        let conn = self.conn.as_mut().context("not connected")?;
        conn.send(&Message::End {
            files: count,
            bytes,
            sha256: sha256.clone(),
        })
        .await?;
        self.broken = false;
        match self.reply(VERIFY_TIMEOUT).await? {
            Message::Received {
                files: f,
                bytes: b,
                sha256: s,
                ..
            } => {
                if f != count || b != bytes || s != sha256 {
                    self.broken = true;
                    bail!("the agent confirmed {f} files, {b} bytes, set sha256 {s}; sent {count} files, {bytes} bytes, set sha256 {sha256}");
                }
            }
            m => {
                self.broken = true;
                bail!("expected received, got {}", m.kind());
            }
        }
        self.phase = Phase::Sent;
        let elapsed = t0.elapsed().as_secs_f64();
        Ok(TransferReport {
            files: count,
            bytes,
            elapsed_ms: elapsed * 1000.0,
            sha256,
            mib_per_s: if elapsed > 0.0 {
                bytes as f64 / (1 << 20) as f64 / elapsed
            } else {
                0.0
            },
            target_dir,
        })
    }

    /// Asks the agent to create the container and a task restored from the
    /// received directory on its containerd, and to start it.
    pub async fn restore(&mut self) -> Result<TargetRestore> {
        let what = self.what();
        async {
            if self.phase != Phase::Sent {
                bail!("restore needs a completed send first");
            }
            self.conn()?
                .send(&Message::Restore)
                .await
                .inspect_err(|_| self.broken = true)?;
            match self.reply(RESTORE_TIMEOUT).await? {
                Message::Restored {
                    pid,
                    restore_ms,
                    image_dir,
                } => {
                    self.phase = Phase::Restored;
                    Ok(TargetRestore {
                        pid,
                        restore_ms,
                        image_dir_on_target: image_dir,
                    })
                }
                m => {
                    self.broken = true;
                    bail!("expected restored, got {}", m.kind())
                }
            }
        }
        .await
        .with_context(|| format!("restore on the target for {what}"))
    }

    /// The migration succeeded: the agent keeps the target running and
    /// forgets the session (it removes the received images).
    pub async fn commit(mut self) -> Result<()> {
        let what = self.what();
        async {
            if self.phase != Phase::Restored {
                bail!("commit needs a restored target");
            }
            self.conn()?
                .send(&Message::Commit)
                .await
                .inspect_err(|_| self.broken = true)?;
            match self.reply(IO_TIMEOUT).await? {
                Message::Committed => Ok(()),
                m => bail!("expected committed, got {}", m.kind()),
            }
        }
        .await
        .with_context(|| format!("commit of {what}"))
    }

    /// The migration is abandoned: the agent kills (SIGKILL) and deletes the
    /// target task and container (and its snapshot), removes the images,
    /// and only then answers. Safe to call at any phase: when the stream
    /// broke, a new connection asks the agent to finish the cleanup.
    pub async fn abort(mut self, reason: &str) -> Result<()> {
        let what = self.what();
        let Some(mid) = self.migration_id.clone() else {
            return Ok(()); // Nothing was offered: nothing to clean.
        };
        if self.phase == Phase::Ended {
            return Ok(()); // The agent cleaned up before it sent its error.
        }
        let msg = Message::Abort {
            migration_id: mid,
            reason: reason.to_string(),
        };
        if !self.broken {
            if let Some(conn) = self.conn.as_mut() {
                if conn.send(&msg).await.is_ok() {
                    match conn.recv(ABORT_TIMEOUT).await {
                        Ok(Message::Aborted { .. }) => return Ok(()),
                        Ok(Message::Error { message }) => {
                            return Err(anyhow!(
                                "the agent at {} refused the abort: {message}",
                                self.addr
                            ))
                            .with_context(|| format!("abort of {what}"));
                        }
                        _ => {}
                    }
                }
            }
        }
        // Out of step: drop the connection (the agent then cleans up on its
        // own) and wait for that on a new one.
        self.conn = None;
        async {
            let mut conn = Self::open(&self.addr, IO_TIMEOUT, self.token.as_deref()).await?;
            conn.send(&msg).await?;
            match conn.recv(ABORT_TIMEOUT).await? {
                Message::Aborted { .. } => Ok(()),
                Message::Error { message } => bail!("the agent refused the abort: {message}"),
                m => bail!("expected aborted, got {}", m.kind()),
            }
        }
        .await
        .with_context(|| format!("abort of {what} (on a new connection)"))
    }
}

/// What [`receive_files`] received and checked.
#[derive(Debug, Clone)]
pub struct ReceiveReport {
    /// Files.
    pub files: u64,
    /// Bytes.
    pub bytes: u64,
    /// [`set_digest`] of the files.
    pub sha256: String,
    /// Wall time, ms.
    pub elapsed_ms: f64,
}

/// Commands of the receiver's file writer.
enum WriteCmd {
    Open {
        rel: PathBuf,
        path: String,
    },
    Data(Vec<u8>),
    Finish {
        expected: String,
        mode: u32,
        done: oneshot::Sender<Result<()>>,
    },
}

/// Writes received files under `dir` (runs on a blocking thread): each file
/// new (never through a symlink), hashed while written.
fn write_files(dir: PathBuf, mut rx: mpsc::Receiver<WriteCmd>) {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let mut current: Option<(String, Result<std::fs::File>, Sha256)> = None;
    while let Some(cmd) = rx.blocking_recv() {
        match cmd {
            WriteCmd::Open { rel, path } => {
                let target = dir.join(&rel);
                let file = (|| {
                    if let Some(parent) = rel.parent().filter(|p| !p.as_os_str().is_empty()) {
                        std::fs::DirBuilder::new()
                            .recursive(true)
                            .mode(0o700)
                            .create(dir.join(parent))
                            .with_context(|| format!("cannot create the directory of {path}"))?;
                    }
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .custom_flags(libc::O_NOFOLLOW)
                        .mode(0o600)
                        .open(&target)
                        .with_context(|| format!("cannot create {}", target.display()))
                })();
                current = Some((path, file, Sha256::new()));
            }
            WriteCmd::Data(d) => {
                if let Some((path, file, h)) = current.as_mut() {
                    h.update(&d);
                    if let Ok(f) = file {
                        if let Err(e) = f.write_all(&d) {
                            *file = Err(anyhow!("cannot write {path}: {e}"));
                        }
                    }
                }
            }
            WriteCmd::Finish {
                expected,
                mode,
                done,
            } => {
                let result = match current.take() {
                    None => Err(anyhow!("file_done without a file")),
                    Some((path, file, h)) => file.and_then(|f| {
                        let actual = hex(&h.finalize());
                        if actual != expected {
                            bail!("sha256 mismatch for {path}: the sender sent {expected}, the received bytes hash to {actual}");
                        }
                        let mode = if mode & 0o777 == 0 { 0o600 } else { mode & 0o777 };
                        f.set_permissions(std::fs::Permissions::from_mode(mode))
                            .with_context(|| format!("cannot set the mode of {path}"))
                    }),
                };
                let _ = done.send(result);
            }
        }
    }
}

/// Receives the file sequence (`file`... `end`) into `dir`, which must
/// exist and be empty, checking each file's sha256, the declared totals
/// (`files`, `bytes`, themselves bounded by [`MAX_FILES`] and
/// [`MAX_BYTES`]) and the digest of the set. On any failure `dir` is
/// removed before the error is returned.
pub async fn receive_files(
    conn: &mut Conn,
    dir: &Path,
    files: u64,
    bytes: u64,
) -> Result<ReceiveReport> {
    let t0 = Instant::now();
    let (tx, rx) = mpsc::channel::<WriteCmd>(8);
    let writer = tokio::task::spawn_blocking({
        let dir = dir.to_path_buf();
        move || write_files(dir, rx)
    });
    let result = receive_loop(conn, tx, files, bytes).await;
    // The writer ends once `tx` is gone; wait so nothing is written after
    // a removal.
    let _ = writer.await;
    match result {
        Ok((n, b, sha256)) => Ok(ReceiveReport {
            files: n,
            bytes: b,
            sha256,
            elapsed_ms: t0.elapsed().as_secs_f64() * 1000.0,
        }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(dir);
            Err(e)
        }
    }
}

async fn receive_loop(
    conn: &mut Conn,
    tx: mpsc::Sender<WriteCmd>,
    declared_files: u64,
    declared_bytes: u64,
) -> Result<(u64, u64, String)> {
    if declared_files > MAX_FILES {
        bail!("{declared_files} files offered: more than the limit of {MAX_FILES}");
    }
    if declared_bytes > MAX_BYTES {
        bail!("{declared_bytes} bytes offered: more than the limit of {MAX_BYTES}");
    }
    let writer_gone = || anyhow!("the file writer stopped");
    let mut seen = BTreeSet::new();
    let mut pending: Vec<(String, oneshot::Receiver<Result<()>>)> = Vec::new();
    let mut digests = Vec::new();
    let mut total = 0u64;
    loop {
        match conn.recv(IO_TIMEOUT).await? {
            Message::File { path, size, mode } => {
                let rel = check_relative_path(&path)?;
                if !seen.insert(path.clone()) {
                    bail!("file {path:?} sent twice");
                }
                if seen.len() as u64 > declared_files {
                    bail!("more files than the {declared_files} offered");
                }
                total = total
                    .checked_add(size)
                    .filter(|t| *t <= declared_bytes)
                    .with_context(|| {
                        format!(
                            "{path} ({size} bytes) goes over the {declared_bytes} bytes offered"
                        )
                    })?;
                tx.send(WriteCmd::Open {
                    rel,
                    path: path.clone(),
                })
                .await
                .map_err(|_| writer_gone())?;
                let mut left = size;
                while left > 0 {
                    let n = left.min(CHUNK as u64) as usize;
                    let mut buf = vec![0u8; n];
                    conn.read_raw(&mut buf)
                        .await
                        .with_context(|| format!("receiving {path}"))?;
                    tx.send(WriteCmd::Data(buf))
                        .await
                        .map_err(|_| writer_gone())?;
                    left -= n as u64;
                }
                let expected = match conn.recv(IO_TIMEOUT).await? {
                    Message::FileDone { sha256 } => sha256,
                    m => bail!("expected file_done after {path}, got {}", m.kind()),
                };
                let (done_tx, done_rx) = oneshot::channel();
                tx.send(WriteCmd::Finish {
                    expected: expected.clone(),
                    mode,
                    done: done_tx,
                })
                .await
                .map_err(|_| writer_gone())?;
                digests.push((path.clone(), expected));
                pending.push((path, done_rx));
            }
            Message::End {
                files,
                bytes,
                sha256,
            } => {
                let n = seen.len() as u64;
                if files != n || bytes != total {
                    bail!(
                        "end says {files} files, {bytes} bytes; received {n} files, {total} bytes"
                    );
                }
                if n != declared_files || total != declared_bytes {
                    bail!("received {n} files, {total} bytes; offered {declared_files} files, {declared_bytes} bytes");
                }
                for (path, rx) in pending.drain(..) {
                    rx.await
                        .map_err(|_| anyhow!("the file writer stopped before checking {path}"))??;
                }
                let ours = set_digest(&digests);
                if ours != sha256 {
                    bail!("set sha256 mismatch: the sender sent {sha256}, the received files give {ours}");
                }
                return Ok((n, total, ours));
            }
            m => bail!("expected file or end, got {}", m.kind()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "ms2m-transfer-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn offer(mid: &str) -> Offer {
        Offer {
            migration_id: mid.into(),
            container_id: "c1".into(),
            image: "docker.io/library/x:1".into(),
            snapshotter: "overlayfs".into(),
            runtime: "io.containerd.ms2m.v1".into(),
            spec: serde_json::json!({"ociVersion": "1.2.0"}),
            labels: Default::default(),
        }
    }

    async fn pair() -> (Conn, Conn) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (Conn::new(a.unwrap()), Conn::new(b.unwrap().0))
    }

    /// A receive-only agent: handshake, offer, files, then an answer to one
    /// abort. Returns the receive result.
    async fn mini_agent(l: TcpListener, dir: PathBuf) -> Result<ReceiveReport> {
        let (s, _) = l.accept().await?;
        let mut conn = Conn::new(s);
        check_hello(&conn.recv(IO_TIMEOUT).await?)?;
        conn.send(&Message::hello()).await?;
        let (files, bytes) = match conn.recv(IO_TIMEOUT).await? {
            Message::Offer { files, bytes, .. } => (files, bytes),
            m => bail!("got {}", m.kind()),
        };
        std::fs::create_dir_all(&dir)?;
        conn.send(&Message::Accepted {
            dir: dir.display().to_string(),
        })
        .await?;
        match receive_files(&mut conn, &dir, files, bytes).await {
            Ok(r) => {
                conn.send(&Message::Received {
                    files: r.files,
                    bytes: r.bytes,
                    sha256: r.sha256.clone(),
                    elapsed_ms: r.elapsed_ms,
                })
                .await?;
                if let Ok(Message::Abort { .. }) = conn.recv(IO_TIMEOUT).await {
                    conn.send(&Message::Aborted { cleaned: vec![] }).await?;
                }
                Ok(r)
            }
            Err(e) => {
                conn.send(&Message::Error {
                    message: format!("{e:#}"),
                })
                .await?;
                conn.close_and_drain(Duration::from_secs(2)).await;
                Err(e)
            }
        }
    }

    #[tokio::test]
    async fn frames_round_trip_and_limits() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let msgs = vec![
            Message::hello(),
            Message::Offer {
                offer: offer("m1"),
                files: 2,
                bytes: 10,
            },
            Message::Restore,
            Message::Abort {
                migration_id: "m".into(),
                reason: "r".into(),
            },
        ];
        for m in &msgs {
            write_frame(&mut a, m).await.unwrap();
        }
        drop(a);
        for m in &msgs {
            assert_eq!(read_frame(&mut b).await.unwrap().as_ref(), Some(m));
        }
        assert!(read_frame(&mut b).await.unwrap().is_none());

        // Over the limit, truncated, garbage.
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(&(MAX_FRAME + 1).to_be_bytes()).await.unwrap();
        let e = read_frame(&mut b).await.unwrap_err().to_string();
        assert!(e.contains("over the limit"), "{e}");
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(&100u32.to_be_bytes()).await.unwrap();
        a.write_all(b"{\"type\"").await.unwrap();
        drop(a);
        let e = read_frame(&mut b).await.unwrap_err().to_string();
        assert!(e.contains("ended inside"), "{e}");
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(&[0, 0]).await.unwrap();
        drop(a);
        assert!(read_frame(&mut b).await.is_err());
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(&3u32.to_be_bytes()).await.unwrap();
        a.write_all(b"xyz").await.unwrap();
        assert!(read_frame(&mut b).await.is_err());
        assert!(check_hello(&Message::Hello {
            protocol: PROTOCOL.into(),
            version: 2,
            token: None,
        })
        .is_err());
        // Tokens: required only when the agent has one.
        let with = Message::hello_with(Some("s3cret"));
        assert!(check_token(&with, Some("s3cret")).is_ok());
        assert!(check_token(&with, None).is_ok());
        assert!(check_token(&with, Some("s3cret2")).is_err());
        assert!(check_token(&Message::hello(), Some("s3cret")).is_err());
        let e = check_token(&Message::hello_with(Some("nope")), Some("s3cret")).unwrap_err();
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }

    #[test]
    fn path_checks() {
        for ok in ["inventory.img", "a/b.img", "a/b/c"] {
            assert!(check_relative_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "./x",
            "..",
            ".",
            "a/..",
            "a\0b",
        ] {
            assert!(check_relative_path(bad).is_err(), "{bad:?}");
        }
        assert!(check_relative_path(&"a/".repeat(MAX_PATH_DEPTH + 1)).is_err());
        assert!(check_relative_path(&"x".repeat(MAX_PATH_LEN + 1)).is_err());
    }

    #[test]
    fn set_digest_is_order_independent() {
        let a = vec![
            ("b".to_string(), sha256_hex(b"2")),
            ("a".to_string(), sha256_hex(b"1")),
        ];
        let mut b = a.clone();
        b.reverse();
        assert_eq!(set_digest(&a), set_digest(&b));
        assert_ne!(set_digest(&a), set_digest(&a[..1]));
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[tokio::test]
    async fn sends_a_directory_and_the_receiver_verifies_it() {
        let src = tmpdir("src");
        std::fs::write(src.join("inventory.img"), b"inv").unwrap();
        std::fs::write(src.join("empty.img"), b"").unwrap();
        let big: Vec<u8> = (0..(3 * CHUNK + 17)).map(|i| (i % 251) as u8).collect();
        std::fs::write(src.join("pages-1.img"), &big).unwrap();
        std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
        std::fs::write(src.join("sub/deeper/x"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", src.join("link")).unwrap();
        let dst = tmpdir("dst").join("m1");

        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let agent = tokio::spawn(mini_agent(l, dst.clone()));
        let mut s = TargetSession::connect(&addr, Duration::from_secs(5))
            .await
            .unwrap();
        let report = s.send(&offer("m1"), &src).await.unwrap();
        assert_eq!(report.files, 4);
        assert_eq!(report.bytes, big.len() as u64 + 4);
        s.abort("test").await.unwrap();
        let r = agent.await.unwrap().unwrap();
        assert_eq!(r.sha256, report.sha256);
        assert_eq!(std::fs::read(dst.join("pages-1.img")).unwrap(), big);
        assert_eq!(std::fs::read(dst.join("sub/deeper/x")).unwrap(), b"x");
        assert!(!dst.join("link").exists());
        let _ = std::fs::remove_dir_all(&src);
        let _ = std::fs::remove_dir_all(dst.parent().unwrap());
    }

    /// Runs the receiver on one end of a pair and feeds `script` into the
    /// other; returns the receiver's error and checks `dir` was removed.
    async fn refused(declared: (u64, u64), script: Vec<(Message, Vec<u8>)>) -> String {
        let (mut tx, mut rx) = pair().await;
        let dir = tmpdir("refused");
        let receiving = {
            let dir = dir.clone();
            tokio::spawn(async move { receive_files(&mut rx, &dir, declared.0, declared.1).await })
        };
        for (m, raw) in script {
            if tx.queue(&m).await.is_err() || tx.write_raw(&raw).await.is_err() {
                break;
            }
        }
        let _ = tx.flush().await;
        drop(tx);
        let e = receiving.await.unwrap().unwrap_err();
        assert!(!dir.exists(), "{} left behind", dir.display());
        format!("{e:#}")
    }

    fn file(path: &str, data: &[u8], sha: Option<&str>) -> Vec<(Message, Vec<u8>)> {
        vec![
            (
                Message::File {
                    path: path.into(),
                    size: data.len() as u64,
                    mode: 0o600,
                },
                data.to_vec(),
            ),
            (
                Message::FileDone {
                    sha256: sha.map(str::to_string).unwrap_or_else(|| sha256_hex(data)),
                },
                vec![],
            ),
        ]
    }

    fn end(files: &[(&str, &[u8])]) -> (Message, Vec<u8>) {
        let d: Vec<(String, String)> = files
            .iter()
            .map(|(p, b)| (p.to_string(), sha256_hex(b)))
            .collect();
        (
            Message::End {
                files: files.len() as u64,
                bytes: files.iter().map(|f| f.1.len() as u64).sum(),
                sha256: set_digest(&d),
            },
            vec![],
        )
    }

    #[tokio::test]
    async fn receiver_refuses_bad_streams_and_removes_the_dir() {
        // A wrong digest.
        let mut s = file("a.img", b"hello", Some(&sha256_hex(b"hellO")));
        s.push(end(&[("a.img", b"hellO")]));
        let e = refused((1, 5), s).await;
        assert!(e.contains("sha256 mismatch for a.img"), "{e}");
        // A truncated stream: 5 bytes announced, 3 sent, then EOF.
        let s = vec![(
            Message::File {
                path: "a.img".into(),
                size: 5,
                mode: 0o600,
            },
            b"hel".to_vec(),
        )];
        let e = refused((1, 5), s).await;
        assert!(e.contains("ended inside a file"), "{e}");
        // EOF before end.
        let e = refused((1, 5), file("a.img", b"hello", None)).await;
        assert!(e.contains("closed the connection"), "{e}");
        // Escaping paths.
        for p in ["../evil", "/tmp/evil", "a/../../evil"] {
            let e = refused((1, 1), file(p, b"x", None)).await;
            assert!(e.contains("escapes"), "{p}: {e}");
        }
        // More than offered; twice the same file; over the bounds.
        let mut s = file("a", b"x", None);
        s.extend(file("b", b"y", None));
        let e = refused((1, 2), s).await;
        assert!(e.contains("more files than"), "{e}");
        let e = refused((1, 1), file("a", b"xx", None)).await;
        assert!(e.contains("goes over"), "{e}");
        let mut s = file("a", b"x", None);
        s.extend(file("a", b"x", None));
        let e = refused((2, 2), s).await;
        assert!(e.contains("sent twice"), "{e}");
        let e = refused((MAX_FILES + 1, 1), vec![]).await;
        assert!(e.contains("limit"), "{e}");
        let e = refused((1, MAX_BYTES + 1), vec![]).await;
        assert!(e.contains("limit"), "{e}");
        // A file below a file of the same name.
        let mut s = file("a", b"x", None);
        s.extend(file("a/b", b"y", None));
        s.push(end(&[("a", b"x"), ("a/b", b"y")]));
        let e = refused((2, 2), s).await;
        assert!(e.contains("cannot create"), "{e}");
        // Fewer files than offered.
        let mut s = file("a", b"x", None);
        s.push(end(&[("a", b"x")]));
        let e = refused((2, 2), s).await;
        assert!(e.contains("offered"), "{e}");
    }

    #[tokio::test]
    async fn sender_reports_the_agents_refusal() {
        let src = tmpdir("refusal-src");
        std::fs::write(src.join("inventory.img"), b"inv").unwrap();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let agent = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut conn = Conn::new(s);
            conn.recv(IO_TIMEOUT).await.unwrap();
            conn.send(&Message::hello()).await.unwrap();
            conn.recv(IO_TIMEOUT).await.unwrap();
            conn.send(&Message::Error {
                message: "container c1 already exists".into(),
            })
            .await
            .unwrap();
        });
        let mut s = TargetSession::connect(&addr, Duration::from_secs(5))
            .await
            .unwrap();
        let e = format!("{:#}", s.send(&offer("m2"), &src).await.unwrap_err());
        assert!(e.contains("already exists") && e.contains("m2"), "{e}");
        agent.await.unwrap();
        // The agent ended the session: abort has nothing to do.
        s.abort("after refusal").await.unwrap();
        let _ = std::fs::remove_dir_all(&src);
    }
}
