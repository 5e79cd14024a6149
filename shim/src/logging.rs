//! Logging: a `tracing` subscriber writing to the log FIFO containerd hands
//! the shim (the file `log` in the shim's working directory, the bundle);
//! containerd copies what arrives there into its own log. Records of the
//! `log` crate (the containerd-shim crate uses it) are forwarded to
//! `tracing`.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use std::sync::Mutex;

use tracing::level_filters::LevelFilter;

/// Where containerd expects the shim's log: a FIFO in the working directory.
const LOG_FIFO: &str = "log";

/// Sets up logging for the shim server: to the `log` FIFO when it exists,
/// else to stderr. `debug` raises the level from info to debug.
pub fn init_server(debug: bool) {
    let level = if debug {
        LevelFilter::DEBUG
    } else {
        LevelFilter::INFO
    };
    match open_fifo() {
        Ok(fifo) => init(level, Mutex::new(fifo)),
        Err(_) => init(level, std::io::stderr),
    }
}

/// Opens the log FIFO for writing without hanging when nobody reads it
/// (ENXIO then), and makes writes blocking again afterwards so no record
/// is dropped while containerd catches up.
fn open_fifo() -> std::io::Result<std::fs::File> {
    let fifo = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(LOG_FIFO)?;
    let flags = fcntl(&fifo, FcntlArg::F_GETFL).map_err(std::io::Error::from)?;
    let flags = OFlag::from_bits_retain(flags) & !OFlag::O_NONBLOCK;
    fcntl(&fifo, FcntlArg::F_SETFL(flags)).map_err(std::io::Error::from)?;
    Ok(fifo)
}

/// Sets up logging to stderr (the `start` and `delete` actions, whose
/// stderr containerd reads).
pub fn init_stderr() {
    init(LevelFilter::WARN, std::io::stderr);
}

fn init<W>(level: LevelFilter, writer: W)
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    let subscriber = tracing_subscriber::fmt()
        .with_writer(writer)
        .with_ansi(false)
        .with_max_level(level)
        .finish();
    if tracing::subscriber::set_global_default(subscriber).is_err() {
        return;
    }
    let log_level = match level {
        LevelFilter::DEBUG | LevelFilter::TRACE => log::LevelFilter::Debug,
        LevelFilter::INFO => log::LevelFilter::Info,
        _ => log::LevelFilter::Warn,
    };
    if log::set_logger(&LOG_BRIDGE).is_ok() {
        log::set_max_level(log_level);
    }
}

/// Forwards `log` records to `tracing`.
struct LogBridge;

static LOG_BRIDGE: LogBridge = LogBridge;

impl log::Log for LogBridge {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let target = record.target();
        let msg = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(log.target = target, "{msg}"),
            log::Level::Warn => tracing::warn!(log.target = target, "{msg}"),
            log::Level::Info => tracing::info!(log.target = target, "{msg}"),
            log::Level::Debug => tracing::debug!(log.target = target, "{msg}"),
            log::Level::Trace => tracing::trace!(log.target = target, "{msg}"),
        }
    }

    fn flush(&self) {}
}
