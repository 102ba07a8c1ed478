//! Direct writes: a writer on the same machine that can map the region itself (kup's page server,
//! root) leases fresh blocks for a range of a file, fills them through its own mapping, and then
//! commits them with their CRC32s in one transaction. The data crosses no FUSE request and no
//! copy in the daemon: under emulation those two copies were half of the work of storing a page
//! while an app is frozen for its final dump.
//!
//! - **Lease** (`RPRAMFS_IOC_LEASE` on an open regular file): `n` ≤ [`MAX_LEASE_BLOCKS`] blocks
//!   for that file, tied to no offset in it. They are allocated but reachable from no commit, so
//!   nothing else reads or reuses them, and a crash (daemon or kernel) simply leaves them free at
//!   the next mount. The answer is the lease's id and the block numbers.
//! - **Commit** (`RPRAMFS_IOC_COMMIT`): the first `k` ≤ `n` leased blocks become the file's pages,
//!   taken in order by up to [`MAX_COMMIT_EXTENTS`] extents (block-aligned offsets, ascending, not
//!   overlapping), with the CRCs given, in one transaction (the old pages are freed as by any
//!   write); the other `n - k` go back to the allocator. So a writer whose pages come one by one
//!   from all over an address space (an app's scattered dirty pages) pays one lease and one commit
//!   per lease's worth of pages, as one whose pages are contiguous does. As with CRC hints the
//!   writer's CRC vouches for its data: the commit's first block is checked on arrival (a mismatch
//!   refuses the commit with EIO and frees the lease), and every read checks every block, so a
//!   wrong CRC can make a read fail, never return wrong bytes. A commit consumes its lease
//!   whatever its outcome.
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
//! The request numbers and the arguments' little-endian layouts are defined once, in the
//! rpramfs-abi crate, for this daemon and for kup's side (foam-store/src/direct.rs).

use std::collections::HashMap;
use std::os::fd::AsRawFd;

use tracing::error;
use zerocopy::FromBytes;

use super::storage::adopt_blocks;
use super::{posix, touch_mc, Fs, Result, MAX_FILE_SIZE};
use crate::error::Error;
use crate::layout::BLOCK_SIZE;

// MAX_LEASE_BLOCKS (4 MiB): each lease and each commit is a round trip through this daemon with
// the writer's app frozen; kup leases this much ahead and fills it with whatever pages come next.
pub use rpramfs_abi::{DirectInfo, LeaseArg, MapArg, IOC_COMMIT, IOC_DIRECT_INFO, IOC_LEASE, IOC_MAP, MAX_COMMIT_EXTENTS, MAX_LEASE_BLOCKS};
/// Leases one open file may hold at once (kup holds at most 8: its runs in flight).
pub const MAX_LEASES_PER_HANDLE: usize = 64;

const BLOCK: u64 = BLOCK_SIZE as u64;

struct Lease {
    ino: u64,
    id: u64,
    blocks: Vec<u32>,
}

/// Outstanding leases, by file handle.
#[derive(Default)]
pub(super) struct Leases {
    by_handle: HashMap<u64, Vec<Lease>>,
    /// Blocks leased and not yet committed or freed (allocated, but in no commit's count).
    pub blocks: u64,
    /// The id the next lease gets.
    next_id: u64,
}

/// A LEASE request ([`LeaseArg`] in).
pub struct LeaseRequest {
    pub n: usize,
}

/// A COMMIT request ([`rpramfs_abi::CommitArg`]): lease `id`'s blocks, in order, as the pages
/// of `extents` (offset, pages), one CRC each.
pub struct CommitRequest {
    pub id: u64,
    pub extents: Vec<(u64, usize)>,
    pub crcs: Vec<u32>,
}

impl LeaseRequest {
    /// The request in an ioctl's argument bytes (exactly a [`LeaseArg`]).
    pub fn decode(b: &[u8]) -> Result<LeaseRequest> {
        let a = LeaseArg::ref_from_bytes(b).map_err(|_| Error::Posix(libc::EINVAL))?;
        Ok(LeaseRequest { n: a.n.get() as usize })
    }
}

/// A MAP request ([`MapArg`]): the blocks of `n` pages of a file from `off` on.
pub struct MapRequest {
    pub off: u64,
    pub n: usize,
}

impl MapRequest {
    /// The request in an ioctl's argument bytes (exactly a [`MapArg`]).
    pub fn decode(b: &[u8]) -> Result<MapRequest> {
        let a = MapArg::ref_from_bytes(b).map_err(|_| Error::Posix(libc::EINVAL))?;
        Ok(MapRequest { off: a.off.get(), n: a.n.get() as usize })
    }
}

impl CommitRequest {
    /// The request in an ioctl's argument bytes (exactly a [`rpramfs_abi::CommitArg`]).
    pub fn decode(b: &[u8]) -> Result<CommitRequest> {
        let a = rpramfs_abi::CommitArg::ref_from_bytes(b).map_err(|_| Error::Posix(libc::EINVAL))?;
        let crcs = a.crcs().ok_or(Error::Posix(libc::EINVAL))?.collect();
        let extents = a.extents().ok_or(Error::Posix(libc::EINVAL))?.map(|e| (e.off.get(), e.n.get() as usize)).collect();
        Ok(CommitRequest { id: a.id.get(), extents, crcs })
    }

    /// Checks the extents: at least one, each non-empty, block-aligned and inside the largest
    /// file, ascending without overlaps, and one CRC for each of their pages. Returns the end of
    /// the last one.
    fn check(&self) -> Result<u64> {
        let mut end = 0u64;
        let mut pages = 0usize;
        for (i, &(off, n)) in self.extents.iter().enumerate() {
            if n == 0 || !off.is_multiple_of(BLOCK) || (i > 0 && off < end) {
                return posix(libc::EINVAL);
            }
            end = off.checked_add(n as u64 * BLOCK).filter(|&e| e <= MAX_FILE_SIZE).ok_or(Error::Posix(libc::EFBIG))?;
            pages += n;
        }
        if self.extents.is_empty() || pages != self.crcs.len() {
            return posix(libc::EINVAL);
        }
        Ok(end)
    }
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
    pub fn direct_info(&self) -> Result<DirectInfo> {
        self.direct_writes_allowed()?;
        if self.region.logs_stores() {
            // A writer's own mapping would store past the crash tests' log: on a logged region
            // leased blocks are filled through `Region::write`, which logs them like the daemon's.
            return posix(libc::ENOTTY);
        }
        Ok(DirectInfo::new(BLOCK_SIZE as u32, self.region.len(), std::process::id(), self.region.file().as_raw_fd() as u32))
    }

    /// The blocks that hold pages `off/4096 ..+ n` of the regular file `ino` (the MAP answer; 0
    /// for a page without one). The reader copies out of them and checks its own CRCs: a block
    /// freed and reused by a write after this answer fails those checks.
    pub fn map_blocks(&self, ino: u64, req: &MapRequest) -> Result<MapArg> {
        self.direct_writes_allowed()?;
        if req.n == 0 || req.n > MAX_LEASE_BLOCKS || !req.off.is_multiple_of(BLOCK) {
            return posix(libc::EINVAL);
        }
        let inner = self.inner.lock();
        let inode = super::storage::read_inode(&self.region, inner.root.inodes, ino)?;
        if !inode.is_reg() {
            return posix(libc::EINVAL);
        }
        let mut answer = MapArg::request(req.off, req.n as u32);
        let first = req.off / BLOCK;
        let last = (first + req.n as u64 - 1).min(inode.size.div_ceil(BLOCK).saturating_sub(1));
        if inode.size > req.off {
            let mut reached = first;
            crate::tree::for_each_mapped(&self.region, super::data_tree(&inode), first, last, &mut reached, &mut |page, ptr| {
                answer.blocks[(page - first) as usize] = ptr.blk.into();
                Ok(())
            })?;
        }
        Ok(answer)
    }

    /// Leases `n` fresh blocks for the regular file `ino` on behalf of handle `fh`; returns the
    /// LEASE answer.
    pub fn lease(&self, fh: u64, ino: u64, req: &LeaseRequest) -> Result<LeaseArg> {
        self.direct_writes_allowed()?;
        if req.n == 0 || req.n > MAX_LEASE_BLOCKS {
            return posix(libc::EINVAL);
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
        let id = inner.leases.next_id;
        inner.leases.next_id += 1;
        let answer = LeaseArg::answer(id, &blocks);
        inner.leases.by_handle.entry(fh).or_default().push(Lease { ino, id, blocks });
        Ok(answer)
    }

    /// Commits the first `crcs.len()` blocks of handle `fh`'s lease `id` as the pages of the
    /// request's extents in `ino` and frees the rest of the lease.
    pub fn commit_lease(&self, fh: u64, ino: u64, req: &CommitRequest) -> Result<()> {
        let lease = {
            let mut inner = self.inner.lock();
            let list = inner.leases.by_handle.get_mut(&fh).ok_or(Error::Posix(libc::ENOENT))?;
            let i = list.iter().position(|l| l.ino == ino && l.id == req.id).ok_or(Error::Posix(libc::ENOENT))?;
            let lease = list.swap_remove(i);
            if list.is_empty() {
                inner.leases.by_handle.remove(&fh);
            }
            inner.leases.blocks -= lease.blocks.len() as u64;
            lease
        };
        let k = req.crcs.len();
        let checked = req.check().and_then(|end| if k <= lease.blocks.len() { Ok(end) } else { posix(libc::EINVAL) });
        let end = match checked {
            Ok(end) => end,
            Err(e) => {
                self.free_leased(&lease.blocks);
                return Err(e);
            }
        };
        self.free_leased(&lease.blocks[k..]);
        let used = &lease.blocks[..k];
        let mut first = [0u8; BLOCK_SIZE];
        self.region.read_into(crate::layout::BlockNo(used[0]).offset(), &mut first)?;
        if pagecrc::crc32(&first) != req.crcs[0] {
            self.free_leased(used);
            error!(ino, offset = req.extents[0].0, "direct write refused: its first block does not match the CRC32 its writer gave");
            return posix(libc::EIO);
        }
        // A failed transaction gives the adopted blocks back to the allocator itself.
        self.mutate(false, |w| {
            let mut inode = w.inode(ino)?;
            if !inode.is_reg() {
                return posix(libc::EINVAL);
            }
            adopt_blocks(&mut w.tx, &mut inode, &req.extents, used, &req.crcs)?;
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
