//! Errors, each naming what went wrong and what to do about it.

use std::io;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "region {path} holds no rpramfs file system (no valid superblock; after a cold boot RAM is cleared). \
         Nothing was changed. Run `rpramfs mkfs {path}` only if you mean to erase the region"
    )]
    NoFilesystem { path: String },

    #[error("region {path} does not exist; create it with `rpramfs mkfs {path} --size SIZE` (files) or check the memmap= kernel parameter (/dev/pmem*)")]
    RegionMissing { path: String },

    #[error("region {path} cannot be used: {why}")]
    BadRegion { path: String, why: String },

    #[error("region {path} is in use by {holder}; unmount it (umount MOUNTPOINT) or stop that process first")]
    RegionBusy { path: String, holder: String },

    #[error(
        "region {path} is {region_bytes} bytes but its superblock says {sb_bytes} bytes{phys}: the region is not the one \
         this file system was made on (check memmap=SIZE!OFFSET on the kernel command line). Nothing was changed"
    )]
    GeometryMismatch { path: String, region_bytes: u64, sb_bytes: u64, phys: String },

    #[error("region {path} has rpramfs format version {found}; this rpramfs reads version {supported}. Use a matching rpramfs binary")]
    UnsupportedVersion { path: String, found: u32, supported: u32 },

    #[error("corrupted block {block}: {what} (CRC mismatch); run `rpramfs fsck` to list all damage")]
    Corrupt { block: u32, what: String },

    #[error("no space left in the region")]
    NoSpace,

    #[error("region access at {offset}+{len} is outside the {region_len}-byte region (damaged pointer?)")]
    OutOfRange { offset: u64, len: u64, region_len: u64 },

    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },

    /// A POSIX error for a file-system operation (ENOENT, EEXIST, …).
    #[error("{}", io::Error::from_raw_os_error(*.0))]
    Posix(i32),
}

impl Error {
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io { context: context.into(), source }
    }

    pub fn corrupt(block: u32, what: impl Into<String>) -> Error {
        Error::Corrupt { block, what: what.into() }
    }

    /// The errno a FUSE reply carries for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Posix(e) => *e,
            Error::NoSpace => libc::ENOSPC,
            Error::Corrupt { .. } | Error::OutOfRange { .. } => libc::EIO,
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            _ => libc::EIO,
        }
    }
}

pub fn posix<T>(errno: i32) -> Result<T> {
    Err(Error::Posix(errno))
}
