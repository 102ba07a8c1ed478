//! FOAM checkpoint images: one sparse file per address space where file offset == virtual
//! address, written page by page across incremental passes and read back on demand (see
//! docs/design.md). CRIU is the checkpoint engine; its page-server protocol is where kup takes
//! over the memory.
//!
//! - [`protocol`]: the page-server wire format of CRIU 3.17–4.1.
//! - [`foam`], [`spaces`]: FOAM files with a CRC per page; the files of one app.
//! - [`direct`]: direct writes into rpramfs's region (leased blocks, the only `unsafe`).
//! - [`receiver`]: the page server for `criu pre-dump`/`dump`.
//! - [`lazy_server`]: the GET server for `criu lazy-pages`.
//! - [`criu_images`]: pagemap/pages synthesis for restore, dump statistics.
//! - [`manifest`], [`store`]: the checkpoint record and the store's directory layout.
//! - [`framed`]: the CRC-checked, atomically replaced record files.

pub mod criu_images;
pub mod direct;
pub mod foam;
pub mod framed;
pub mod lazy_server;
pub mod manifest;
pub mod protocol;
pub mod ranges;
pub mod receiver;
pub mod spaces;
pub mod store;

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("page-server socket: {0}")]
    Socket(std::io::Error),
    #[error(transparent)]
    Protocol(#[from] protocol::ProtocolError),
    #[error("CRIU closed the page-server connection mid-session (the dump failed; its log says why)")]
    SessionCut,
    #[error("page {vaddr:#x} of address space {space} fails its CRC (stored {want:08x}, read {got:08x}): the checkpoint is damaged and is not restored")]
    BadPage { space: String, vaddr: u64, want: u32, got: u32 },
    #[error("CRIU named {pages} pages at {vaddr:#x} of {space} unchanged since the previous pass, but no earlier pass stored them")]
    ParentMissing { space: String, vaddr: u64, pages: u32 },
    #[error("lazy-pages asked for page {vaddr:#x} of {space}, which the checkpoint does not hold")]
    UnknownPage { space: String, vaddr: u64 },
    #[error("manifest {path}: {why}")]
    BadManifest { path: PathBuf, why: String },
    #[error("{0}")]
    NoCheckpoint(String),
    #[error("{0}")]
    Unsupported(String),
    /// The caller's [`receiver::Receiver::before_open`] refused a stream.
    #[error("{0}")]
    Refused(String),
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io { path: path.into(), source }
    }
}

/// Reads exactly `buf.len()` bytes of a page-server session; the peer going away mid-way is
/// [`Error::SessionCut`].
pub(crate) fn read_session<S: std::io::Read>(sock: &mut S, buf: &mut [u8]) -> Result<(), Error> {
    sock.read_exact(buf).map_err(session_error)
}

/// A failed read of a page-server session.
pub(crate) fn session_error(e: std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => Error::SessionCut,
        _ => Error::Socket(e),
    }
}
