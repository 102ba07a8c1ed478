//! A shadow-paging transaction: every block it writes is a fresh one; committed blocks are only
//! read, and those it stops referencing are freed two generations after its commit.

use std::collections::HashSet;

use crate::alloc::Allocator;
use crate::error::{Error, Result};
use crate::layout::{BlkPtr, BlockNo, BLOCK_SIZE};
use crate::region::Region;

pub type Block = [u8; BLOCK_SIZE];

pub struct Tx<'a> {
    pub region: &'a Region,
    pub alloc: &'a mut Allocator,
    /// Blocks allocated by this transaction: not reachable from any commit yet, so writable in place.
    fresh: HashSet<u32>,
    /// Committed blocks this transaction no longer references.
    freed: Vec<u32>,
    /// Operations that free space may dip into the allocator's reserve.
    pub may_use_reserve: bool,
}

impl<'a> Tx<'a> {
    pub fn new(region: &'a Region, alloc: &'a mut Allocator) -> Tx<'a> {
        Tx { region, alloc, fresh: HashSet::new(), freed: Vec::new(), may_use_reserve: false }
    }

    pub fn alloc_block(&mut self) -> Result<BlockNo> {
        let b = self.alloc.alloc(self.may_use_reserve)?;
        self.fresh.insert(b.0);
        Ok(b)
    }

    /// Takes a block allocated outside any transaction (a direct writer's lease, filled already)
    /// as one of this transaction's own: made durable before the commit record, given back to
    /// the allocator if the transaction is abandoned.
    pub fn adopt(&mut self, b: BlockNo) {
        // A retried transaction adopts again what its abandoned first try gave back.
        if !self.alloc.is_used(b.0) {
            self.alloc.mark_used(b.0);
        }
        self.fresh.insert(b.0);
    }

    /// Drops a block from the tree being built.
    pub fn free_block(&mut self, b: BlockNo) {
        if b.0 == 0 {
            return;
        }
        if self.fresh.remove(&b.0) {
            self.alloc.release(b);
        } else {
            self.freed.push(b.0);
        }
    }

    /// The block to write a new version of `old` into: `old` itself if this transaction made it,
    /// otherwise a fresh block (and `old` is freed).
    pub fn cow(&mut self, old: BlkPtr) -> Result<BlockNo> {
        if !old.is_null() && self.fresh.contains(&old.blk) {
            return Ok(old.block());
        }
        let b = self.alloc_block()?;
        if !old.is_null() {
            self.free_block(old.block());
        }
        Ok(b)
    }

    /// Writes a whole block (which must be fresh) and returns the pointer that vouches for it.
    pub fn write_block(&mut self, b: BlockNo, data: &Block) -> Result<BlkPtr> {
        self.write_block_vouched(b, data, pagecrc::crc32(data))
    }

    /// Like [`Tx::write_block`], with the block's CRC32 as the writer computed it (a CRC hint).
    fn write_block_vouched(&mut self, b: BlockNo, data: &Block, crc: u32) -> Result<BlkPtr> {
        if !self.fresh.contains(&b.0) {
            return Err(Error::corrupt(b.0, "internal: write to a committed block refused"));
        }
        self.region.write(b.offset(), data)?;
        Ok(BlkPtr { blk: b.0, crc })
    }

    /// Writes `data` as the new version of `old`.
    pub fn rewrite(&mut self, old: BlkPtr, data: &Block) -> Result<BlkPtr> {
        let b = self.cow(old)?;
        self.write_block(b, data)
    }

    /// Writes `data`, whose CRC32 the writer says is `crc`, as the new version of `old`.
    pub fn rewrite_vouched(&mut self, old: BlkPtr, data: &Block, crc: u32) -> Result<BlkPtr> {
        let b = self.cow(old)?;
        self.write_block_vouched(b, data, crc)
    }

    /// Gives back every block this transaction allocated (it is being abandoned).
    pub fn rollback(self) {
        for b in self.fresh {
            self.alloc.release(BlockNo(b));
        }
    }

    /// The blocks to make durable before the commit record, and the blocks to free after it.
    pub fn finish(self) -> (Vec<u32>, Vec<u32>) {
        (self.fresh.into_iter().collect(), self.freed)
    }
}

/// Reads a block and checks it against the CRC its parent holds.
pub fn read_verified(region: &Region, ptr: BlkPtr, buf: &mut Block, what: &dyn Fn() -> String) -> Result<()> {
    region.read_into(ptr.block().offset(), buf)?;
    if pagecrc::crc32(buf) != ptr.crc {
        return Err(Error::corrupt(ptr.blk, what()));
    }
    Ok(())
}
