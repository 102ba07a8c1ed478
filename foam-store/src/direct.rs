//! Direct writes into rpramfs (the protocol is rpramfs's: rpramfs/src/fs/lease.rs). kup maps the
//! region itself, leases fresh blocks for a run of pages, receives the pages from CRIU's socket
//! straight into those blocks, and commits them with their CRCs: a page is copied once (socket to
//! region) instead of three times (socket to kup, kup to the FUSE request, request to the region).
//!
//! All of the unsafe code of foam-store is here: the ioctls and the views of leased blocks.
//! Set `KUP_DIRECT_WRITES=0` to write through FUSE instead.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::protocol::PAGE_SIZE;

const PAGE: usize = PAGE_SIZE as usize;
const IOC_MAGIC: u8 = b'R';
const INFO_SIZE: usize = 32;
/// rpramfs's largest lease, and so the size of the LEASE and COMMIT arguments.
pub const MAX_LEASE_PAGES: usize = 1024;
const ARG_SIZE: usize = 16 + 4 * MAX_LEASE_PAGES;
const IOC_DIRECT_INFO: libc::c_ulong = nix::request_code_read!(IOC_MAGIC, 0x40, INFO_SIZE) as libc::c_ulong;
const IOC_LEASE: libc::c_ulong = nix::request_code_readwrite!(IOC_MAGIC, 0x41, ARG_SIZE) as libc::c_ulong;
const IOC_COMMIT: libc::c_ulong = nix::request_code_write!(IOC_MAGIC, 0x42, ARG_SIZE) as libc::c_ulong;
const DIRECT_VERSION: u32 = 2;

/// The region of an rpramfs mount, mapped into this process.
pub struct DirectRegion {
    map: memmap2::MmapRaw,
    blocks: u64,
}

/// Fresh blocks rpramfs handed out for the pages of a file from `off` on: this process's alone
/// until [`DirectRegion::commit`].
pub struct Lease {
    pub off: u64,
    blocks: Vec<u32>,
}

impl Lease {
    pub fn pages(&self) -> usize {
        self.blocks.len()
    }
}

/// One ioctl whose argument is `arg` (exactly the size the request code names).
fn ioctl(file: &File, request: libc::c_ulong, arg: &mut [u8]) -> io::Result<()> {
    debug_assert_eq!(arg.len() as libc::c_ulong, (request >> 16) & 0x3fff);
    // SAFETY: for these request codes the kernel (FUSE, restricted ioctl) copies exactly
    // _IOC_SIZE(request) bytes from and/or to `arg`, which is that long and valid for writes.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), request as _, arg.as_mut_ptr()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn word(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

impl DirectRegion {
    /// Direct writes for files under `dir`, when its file system offers them (rpramfs, not
    /// read-only) and this process may open and map the region; otherwise `None`.
    pub fn probe(dir: &Path) -> Option<DirectRegion> {
        if std::env::var("KUP_DIRECT_WRITES").is_ok_and(|v| v == "0") {
            return None;
        }
        let d = File::open(dir).ok()?;
        let mut info = [0u8; INFO_SIZE];
        ioctl(&d, IOC_DIRECT_INFO, &mut info).ok()?;
        let (version, block, len, pid, fd) = (word(&info, 0), word(&info, 4), u64::from_le_bytes(info[8..16].try_into().unwrap()), word(&info, 16), word(&info, 20));
        if version != DIRECT_VERSION || block as usize != PAGE || word(&info, 24) as usize != MAX_LEASE_PAGES {
            return None;
        }
        // The very object the daemon maps (device, file or memfd), whatever its path.
        let region = OpenOptions::new().read(true).write(true).open(format!("/proc/{pid}/fd/{fd}")).ok()?;
        let map = memmap2::MmapOptions::new().len(len as usize).map_raw(&region).ok()?;
        Some(DirectRegion { map, blocks: len / PAGE_SIZE })
    }

    /// Leases `pages` fresh blocks (at most [`MAX_LEASE_PAGES`]) for `file` at `off`.
    pub fn lease(&self, file: &File, off: u64, pages: usize) -> io::Result<Lease> {
        let mut arg = vec![0u8; ARG_SIZE];
        arg[..8].copy_from_slice(&off.to_le_bytes());
        arg[8..12].copy_from_slice(&(pages as u32).to_le_bytes());
        ioctl(file, IOC_LEASE, &mut arg)?;
        let n = word(&arg, 8) as usize;
        let blocks: Vec<u32> = (0..n).map(|i| word(&arg, 16 + 4 * i)).collect();
        if n != pages || blocks.iter().any(|&b| b as u64 >= self.blocks) {
            return Err(io::Error::other(format!("rpramfs answered a lease of {pages} pages with {n} blocks ({blocks:?})")));
        }
        Ok(Lease { off, blocks })
    }

    /// The bytes of leased pages `first..first + count`, which must lie in consecutive blocks.
    pub fn pages_mut<'l>(&self, lease: &'l mut Lease, first: usize, count: usize) -> &'l mut [u8] {
        let b = lease.blocks[first];
        assert!(lease.blocks[first..first + count].windows(2).all(|w| w[1] == w[0] + 1), "pages_mut over non-consecutive blocks");
        assert!(b as u64 + count as u64 <= self.blocks);
        // SAFETY: the blocks lie inside the mapping (checked above and at lease time); rpramfs
        // neither reads nor hands out leased blocks before their commit, and the returned slice
        // borrows the lease mutably, so no other view of these bytes exists in this process.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_mut_ptr().add(b as usize * PAGE), count * PAGE) }
    }

    /// The bytes of leased page `i`.
    pub fn page<'l>(&self, lease: &'l Lease, i: usize) -> &'l [u8] {
        let b = lease.blocks[i];
        assert!((b as u64) < self.blocks);
        // SAFETY: inside the mapping; while the lease is borrowed no mutable view of it exists.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(b as usize * PAGE), PAGE) }
    }

    /// How many of the leased pages from `first` on lie in consecutive blocks (at most `max`).
    pub fn consecutive(lease: &Lease, first: usize, max: usize) -> usize {
        let end = (first + max).min(lease.blocks.len());
        1 + lease.blocks[first..end].windows(2).take_while(|w| w[1] == w[0] + 1).count()
    }

    /// Makes the first `crcs.len()` leased pages the file's pages at `lease.off`, with these CRCs
    /// (rpramfs checks the first against its data); rpramfs frees the rest of the lease.
    pub fn commit(&self, file: &File, lease: Lease, crcs: &[u32]) -> io::Result<()> {
        assert!(!crcs.is_empty() && crcs.len() <= lease.blocks.len());
        let mut arg = vec![0u8; ARG_SIZE];
        arg[..8].copy_from_slice(&lease.off.to_le_bytes());
        arg[8..12].copy_from_slice(&(crcs.len() as u32).to_le_bytes());
        for (i, c) in crcs.iter().enumerate() {
            arg[16 + 4 * i..20 + 4 * i].copy_from_slice(&c.to_le_bytes());
        }
        ioctl(file, IOC_COMMIT, &mut arg)
    }
}
