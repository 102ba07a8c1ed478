//! Direct writes: a writer on the same machine that can map the region itself (kup's page server,
//! root) leases fresh blocks for a range of a file, fills them through its own mapping, and then
//! commits them with their CRC32s in one transaction. The data crosses no FUSE request and no
//! copy in the daemon: under emulation those two copies were half of the work of storing a page
//! while an app is frozen for its final dump.
//!
//! - **Lease** (`RPRAMFS_IOC_LEASE` on an open regular file): `n` blocks for file offset `off`
//!   (block-aligned, `n` ≤ [`MAX_LEASE_BLOCKS`]). They are allocated but reachable from no commit,
//!   so nothing else reads or reuses them, and a crash (daemon or kernel) simply leaves them free
//!   at the next mount. The answer is their block numbers.
//! - **Commit** (`RPRAMFS_IOC_COMMIT`): the first `k` ≤ `n` leased blocks become the file's pages
//!   `off / 4096 ..`, with the CRCs given, in one transaction (the old pages are freed as by any
//!   write); the other `n - k` go back to the allocator. As with CRC hints the writer's CRC vouches
//!   for its data: the first block is checked on arrival (a mismatch refuses the commit with EIO
//!   and frees the lease), and every read checks every block, so a wrong CRC can make a read fail,
//!   never return wrong bytes. A commit consumes its lease whatever its outcome.
//! - A lease belongs to the open file (FUSE file handle) that took it: closing the file frees its
//!   uncommitted leases. Stores into a lease after that land in free blocks; the writer's CRCs never
//!   vouch for them, so they cannot reach a file.
//! - `RPRAMFS_IOC_DIRECT_INFO` says how to map the region: the daemon's pid and the descriptor it
//!   holds the region on (open `/proc/PID/fd/FD`: exactly the object the daemon maps, device, file
//!   or memfd), its length and the block size. Read-only mounts offer no direct writes (EROFS).
//!   Regions that log their stores (crash tests) hand out no mapping (DIRECT_INFO: ENOTTY) but
//!   lease and commit as usual: the test fills leased blocks through [`crate::region::Region::write`],
//!   so the fills are logged in order with the daemon's stores and every crash state between
//!   lease and commit is replayed (rpramfs/tests/crash_states.rs).
//!
//! The ioctl arguments are little-endian byte layouts (see [`encode_info`], [`LeaseRequest`],
//! [`CommitRequest`]); kup's side is foam-store/src/direct.rs.

use std::collections::HashMap;
use std::os::fd::AsRawFd;

use tracing::error;

use super::storage::adopt_blocks;
use super::{posix, touch_mc, Fs, Result, MAX_FILE_SIZE};
use crate::error::Error;
use crate::layout::BLOCK_SIZE;

/// Largest lease: 4 MiB. Each lease and each commit is a round trip through this daemon with the
/// writer's app frozen; kup leases this much ahead while CRIU's pages come in address order.
pub const MAX_LEASE_BLOCKS: usize = 1024;
/// Leases one open file may hold at once (kup holds at most 8: its runs in flight).
pub const MAX_LEASES_PER_HANDLE: usize = 64;
/// Version of the ioctl layouts, the first word of the DIRECT_INFO answer.
pub const DIRECT_VERSION: u32 = 2;

const IOC_MAGIC: u8 = b'R';
/// Argument sizes: the kernel copies exactly `_IOC_SIZE` bytes each way for a FUSE ioctl.
pub const INFO_SIZE: usize = 32;
pub const LEASE_SIZE: usize = 16 + 4 * MAX_LEASE_BLOCKS;
pub const COMMIT_SIZE: usize = 16 + 4 * MAX_LEASE_BLOCKS;
pub const IOC_DIRECT_INFO: u32 = nix::request_code_read!(IOC_MAGIC, 0x40, INFO_SIZE) as u32;
pub const IOC_LEASE: u32 = nix::request_code_readwrite!(IOC_MAGIC, 0x41, LEASE_SIZE) as u32;
pub const IOC_COMMIT: u32 = nix::request_code_write!(IOC_MAGIC, 0x42, COMMIT_SIZE) as u32;

const BLOCK: u64 = BLOCK_SIZE as u64;

struct Lease {
    ino: u64,
    off: u64,
    blocks: Vec<u32>,
}

/// Outstanding leases, by file handle.
#[derive(Default)]
pub(super) struct Leases {
    by_handle: HashMap<u64, Vec<Lease>>,
    /// Blocks leased and not yet committed or freed (allocated, but in no commit's count).
    pub blocks: u64,
}

/// `off u64, n u32, 0u32` (then room for the answer's block numbers).
pub struct LeaseRequest {
    pub off: u64,
    pub n: usize,
}

/// `off u64, k u32, 0u32, crc u32 × k`.
pub struct CommitRequest {
    pub off: u64,
    pub crcs: Vec<u32>,
}

fn word(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

impl LeaseRequest {
    pub fn decode(b: &[u8]) -> Result<LeaseRequest> {
        if b.len() < 16 {
            return posix(libc::EINVAL);
        }
        Ok(LeaseRequest { off: u64::from_le_bytes(b[..8].try_into().unwrap()), n: word(b, 8) as usize })
    }
}

impl CommitRequest {
    pub fn decode(b: &[u8]) -> Result<CommitRequest> {
        if b.len() < 16 {
            return posix(libc::EINVAL);
        }
        let k = word(b, 8) as usize;
        if k > MAX_LEASE_BLOCKS || b.len() < 16 + 4 * k {
            return posix(libc::EINVAL);
        }
        Ok(CommitRequest { off: u64::from_le_bytes(b[..8].try_into().unwrap()), crcs: (0..k).map(|i| word(b, 16 + 4 * i)).collect() })
    }
}

/// The DIRECT_INFO answer: version, block size, region length, daemon pid, region descriptor.
pub fn encode_info(region_len: u64, pid: u32, fd: u32) -> [u8; INFO_SIZE] {
    let mut out = [0u8; INFO_SIZE];
    out[..4].copy_from_slice(&DIRECT_VERSION.to_le_bytes());
    out[4..8].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
    out[8..16].copy_from_slice(&region_len.to_le_bytes());
    out[16..20].copy_from_slice(&pid.to_le_bytes());
    out[20..24].copy_from_slice(&fd.to_le_bytes());
    out[24..28].copy_from_slice(&(MAX_LEASE_BLOCKS as u32).to_le_bytes());
    out
}

/// The LEASE answer: the request's offset and count, then the block numbers.
fn encode_lease(off: u64, blocks: &[u32]) -> Vec<u8> {
    let mut out = vec![0u8; LEASE_SIZE];
    out[..8].copy_from_slice(&off.to_le_bytes());
    out[8..12].copy_from_slice(&(blocks.len() as u32).to_le_bytes());
    for (i, b) in blocks.iter().enumerate() {
        out[16 + 4 * i..20 + 4 * i].copy_from_slice(&b.to_le_bytes());
    }
    out
}

impl Fs {
    /// Whether this mount offers direct writes at all.
    fn direct_writes_allowed(&self) -> Result<()> {
        if self.read_only {
            return posix(libc::EROFS);
        }
        Ok(())
    }

    /// What a direct writer needs to map the region (the DIRECT_INFO answer).
    pub fn direct_info(&self) -> Result<[u8; INFO_SIZE]> {
        self.direct_writes_allowed()?;
        if self.region.logs_stores() {
            // A writer's own mapping would store past the crash tests' log: on a logged region
            // leased blocks are filled through `Region::write`, which logs them like the daemon's.
            return posix(libc::ENOTTY);
        }
        Ok(encode_info(self.region.len(), std::process::id(), self.region.file().as_raw_fd() as u32))
    }

    /// Leases `n` fresh blocks for the regular file `ino` at `off` on behalf of handle `fh`;
    /// returns the LEASE answer.
    pub fn lease(&self, fh: u64, ino: u64, req: &LeaseRequest) -> Result<Vec<u8>> {
        self.direct_writes_allowed()?;
        let end = req.off.checked_add(req.n as u64 * BLOCK).ok_or(Error::Posix(libc::EFBIG))?;
        if req.n == 0 || req.n > MAX_LEASE_BLOCKS || !req.off.is_multiple_of(BLOCK) {
            return posix(libc::EINVAL);
        }
        if end > MAX_FILE_SIZE {
            return posix(libc::EFBIG);
        }
        if !self.getattr(ino)?.inode.is_reg() {
            return posix(libc::EINVAL);
        }
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        if inner.leases.by_handle.get(&fh).map_or(0, Vec::len) >= MAX_LEASES_PER_HANDLE {
            return posix(libc::EBUSY);
        }
        if inner.alloc.available() < req.n as u64 && inner.alloc.pending_blocks() > 0 {
            self.release_deferred(inner)?;
        }
        if inner.alloc.available() < req.n as u64 {
            return Err(Error::NoSpace);
        }
        let mut blocks = Vec::with_capacity(req.n);
        for _ in 0..req.n {
            blocks.push(inner.alloc.alloc(false)?.0);
        }
        inner.leases.blocks += blocks.len() as u64;
        let answer = encode_lease(req.off, &blocks);
        inner.leases.by_handle.entry(fh).or_default().push(Lease { ino, off: req.off, blocks });
        Ok(answer)
    }

    /// Commits the first `crcs.len()` blocks of handle `fh`'s lease at `off` as pages of `ino`
    /// and frees the rest of the lease.
    pub fn commit_lease(&self, fh: u64, ino: u64, req: &CommitRequest) -> Result<()> {
        let lease = {
            let mut inner = self.inner.lock();
            let list = inner.leases.by_handle.get_mut(&fh).ok_or(Error::Posix(libc::ENOENT))?;
            let i = list.iter().position(|l| l.ino == ino && l.off == req.off).ok_or(Error::Posix(libc::ENOENT))?;
            let lease = list.swap_remove(i);
            if list.is_empty() {
                inner.leases.by_handle.remove(&fh);
            }
            inner.leases.blocks -= lease.blocks.len() as u64;
            lease
        };
        let k = req.crcs.len();
        if k == 0 || k > lease.blocks.len() {
            self.free_leased(&lease.blocks);
            return posix(libc::EINVAL);
        }
        self.free_leased(&lease.blocks[k..]);
        let used = &lease.blocks[..k];
        let mut first = [0u8; BLOCK_SIZE];
        self.region.read_into(crate::layout::BlockNo(used[0]).offset(), &mut first)?;
        if pagecrc::crc32(&first) != req.crcs[0] {
            self.free_leased(used);
            error!(ino, offset = req.off, "direct write refused: its first block does not match the CRC32 its writer gave");
            return posix(libc::EIO);
        }
        let end = req.off + k as u64 * BLOCK;
        // A failed transaction gives the adopted blocks back to the allocator itself.
        self.mutate(false, |w| {
            let mut inode = w.inode(ino)?;
            if !inode.is_reg() {
                return posix(libc::EINVAL);
            }
            adopt_blocks(&mut w.tx, &mut inode, req.off, used, &req.crcs)?;
            inode.size = inode.size.max(end);
            touch_mc(&mut inode, w.now);
            w.put_inode(ino, &inode)
        })
    }

    /// Frees every lease handle `fh` still holds (the file was closed).
    pub fn release_handle(&self, fh: u64) {
        let mut inner = self.inner.lock();
        for lease in inner.leases.by_handle.remove(&fh).unwrap_or_default() {
            inner.leases.blocks -= lease.blocks.len() as u64;
            release_blocks(&mut inner.alloc, &lease.blocks);
        }
    }

    /// Gives back blocks of a lease that was taken off the table (`leases.blocks` already counts
    /// them out).
    fn free_leased(&self, blocks: &[u32]) {
        release_blocks(&mut self.inner.lock().alloc, blocks);
    }
}

fn release_blocks(alloc: &mut crate::alloc::Allocator, blocks: &[u32]) {
    for &b in blocks {
        alloc.release(crate::layout::BlockNo(b));
    }
}
