//! CRC32 hints: a writer that already holds the CRC32 of every whole block it is about to write
//! (kup's page server computes one per page for its FOAM files) hands them over with
//! `setxattr(file, "user.rpramfs.write-crc32", offset ‖ crc…)`, and the writes of those blocks
//! store them in their block pointers instead of computing the same checksum again. Under
//! emulation that checksum is the daemon's largest cost while an app is frozen for its dump.
//!
//! Trust: the checksum then vouches for the bytes the writer meant, not for the bytes that
//! arrived, which makes it end to end (a page damaged on its way reads back as damaged). A wrong
//! hint cannot make a read return wrong bytes, only fail: every read checks its block against the
//! pointer's CRC. The first hinted block of every write is checked on arrival, so a writer whose
//! hints do not belong to its data (another offset, stale values) has that write refused with EIO.
//!
//! Hints live in the daemon's memory only, per inode: they are used in file order by the writes
//! that continue exactly where the last hinted write stopped, dropped by any other write, and
//! forgotten when the file is opened again. `getxattr` of the name answers the hint format
//! version ("1"), so a writer can tell rpramfs from a file system that would store the value.

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::error::{posix, Result};
use crate::layout::BLOCK_SIZE;

/// The xattr name that carries hints (never stored, never listed).
pub const HINT_XATTR: &[u8] = rpramfs_abi::CRC_HINT_XATTR.as_bytes();
/// What `getxattr(HINT_XATTR)` answers: the version of the value's format.
pub use rpramfs_abi::CRC_HINT_FORMAT as HINT_FORMAT;
/// The value of a hint for blocks from `offset` on (what a writer passes to setxattr).
pub use rpramfs_abi::encode_crc_hint as encode;

const BLOCK: u64 = BLOCK_SIZE as u64;

/// The CRCs of consecutive blocks from `next` on.
struct Hint {
    next: u64,
    crcs: std::collections::VecDeque<u32>,
}

/// CRCs one write may use: for its whole blocks from file offset `first` on.
pub struct Hinted {
    pub first: u64,
    pub crcs: Vec<u32>,
}

impl Hinted {
    /// The hinted CRC of the block at file offset `at`, if this write has one.
    pub fn crc_at(&self, at: u64) -> Option<u32> {
        let i = at.checked_sub(self.first)? / BLOCK;
        at.is_multiple_of(BLOCK).then(|| self.crcs.get(i as usize).copied()).flatten()
    }
}

#[derive(Default)]
pub struct Hints(Mutex<HashMap<u64, Hint>>);

impl Hints {
    /// Takes a hint (see [`rpramfs_abi::decode_crc_hint`]) for blocks from a block-aligned file
    /// offset on. Replaces the inode's earlier hint.
    pub fn set(&self, ino: u64, value: &[u8]) -> Result<()> {
        let Some((next, crcs)) = rpramfs_abi::decode_crc_hint(value) else { return posix(libc::EINVAL) };
        if !next.is_multiple_of(BLOCK) {
            return posix(libc::EINVAL);
        }
        self.0.lock().insert(ino, Hint { next, crcs: crcs.collect() });
        Ok(())
    }

    pub fn forget(&self, ino: u64) {
        self.0.lock().remove(&ino);
    }

    /// The hinted CRCs for the whole blocks of a write of `len` bytes at `off`, when it continues
    /// where the hint stands; any other write that covers a whole block drops the hint.
    pub fn take(&self, ino: u64, off: u64, len: usize) -> Option<Hinted> {
        let first = off.div_ceil(BLOCK) * BLOCK;
        let end = (off + len as u64) / BLOCK * BLOCK;
        if end <= first {
            return None;
        }
        let mut hints = self.0.lock();
        let hint = hints.get_mut(&ino)?;
        let n = ((end - first) / BLOCK) as usize;
        if hint.next != first || hint.crcs.len() < n {
            hints.remove(&ino);
            return None;
        }
        let crcs: Vec<u32> = hint.crcs.drain(..n).collect();
        hint.next = end;
        if hint.crcs.is_empty() {
            hints.remove(&ino);
        }
        Some(Hinted { first, crcs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_are_used_in_file_order_and_dropped_by_other_writes() {
        let h = Hints::default();
        h.set(5, &encode(8192, [1, 2, 3, 4])).unwrap();
        // A write that starts mid-block uses the hints of the whole blocks it covers.
        let a = h.take(5, 8192 - 100, 100 + 2 * 4096 + 7).unwrap();
        assert_eq!((a.first, a.crcs.as_slice()), (8192, &[1, 2][..]));
        assert_eq!((a.crc_at(8192), a.crc_at(12288), a.crc_at(16384), a.crc_at(8193)), (Some(1), Some(2), None, None));
        // No whole block: the hint stays.
        assert!(h.take(5, 16384 + 7, 100).is_none());
        assert_eq!(h.take(5, 16384, 4096).unwrap().crcs, vec![3]);
        // Elsewhere: the rest is dropped.
        assert!(h.take(5, 0, 4096).is_none());
        assert!(h.take(5, 20480, 4096).is_none());
        // Used up.
        h.set(6, &encode(0, [9])).unwrap();
        assert_eq!(h.take(6, 0, 4096).unwrap().crcs, vec![9]);
        assert!(h.take(6, 4096, 4096).is_none());
        // More blocks than hinted: nothing hinted, hint dropped.
        h.set(7, &encode(0, [9])).unwrap();
        assert!(h.take(7, 0, 8192).is_none());
        assert!(h.take(7, 0, 4096).is_none());
    }

    #[test]
    fn malformed_hints_are_refused() {
        let h = Hints::default();
        for bad in [vec![0u8; 8], vec![0u8; 13], encode(100, [1])] {
            assert!(h.set(1, &bad).is_err(), "{bad:?}");
        }
    }
}
