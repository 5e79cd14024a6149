//! The library half of `ms2m-criu-tar` (the binary is `src/main.rs`): the
//! tree scan and tar writer ([`archive`]) and the one command line CRIU
//! runs, shared by the binary, its tests and its examples.

pub mod archive;

/// The argv (after argv[0] = `tar`) CRIU 4.2.1 runs to archive a tmpfs
/// mount (`criu/filesystems.c`, `tmpfs_dump`): fd 0 is the mount's root
/// directory, fd 1 the image file.
pub const CRIU_CREATE_ARGV: [&str; 12] = [
    "--create",
    "--gzip",
    "--no-unquote",
    "--no-wildcards",
    "--one-file-system",
    "--check-links",
    "--preserve-permissions",
    "--sparse",
    "--numeric-owner",
    "--directory",
    "/proc/self/fd/0",
    ".",
];

/// The flags of that command; all must be present, in any order.
pub const CRIU_CREATE_FLAGS: &[&str] = CRIU_CREATE_ARGV.split_at(9).0;
