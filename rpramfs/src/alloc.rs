//! The block allocator: a DRAM bitmap rebuilt by the mount walk (it is never stored), with
//! deferred frees so that the two previous generations stay intact until newer ones are committed.

use std::collections::VecDeque;

use crate::error::{Error, Result};
use crate::layout::{BlockNo, FIRST_POOL_BLOCK};

pub struct Allocator {
    bits: Vec<u64>,
    n_blocks: u32,
    free: u64,
    hint: u32,
    /// Blocks freed by generation g become reusable once generation g + 2 is committed.
    pending: VecDeque<(u64, Vec<u32>)>,
    pending_count: u64,
    /// Blocks only operations that free space (unlink, truncate, punch) may use, so that a full
    /// file system can always be emptied.
    reserve: u64,
}

impl Allocator {
    /// All pool blocks free; the superblocks, owner block and rings are used.
    pub fn new(n_blocks: u32) -> Allocator {
        let words = (n_blocks as usize).div_ceil(64);
        let mut a = Allocator {
            bits: vec![0; words],
            n_blocks,
            free: 0,
            hint: FIRST_POOL_BLOCK,
            pending: VecDeque::new(),
            pending_count: 0,
            reserve: (n_blocks as u64 / 200).clamp(16, 1024),
        };
        // Bits past n_blocks and the fixed blocks are permanently "used".
        for b in n_blocks..(words as u32 * 64) {
            a.set(b);
        }
        for b in 0..FIRST_POOL_BLOCK {
            a.set(b);
        }
        a.set(n_blocks - 1);
        a.free = a.pool_blocks();
        a
    }

    /// Blocks of the pool (everything but superblocks, owner block and rings).
    pub fn pool_blocks(&self) -> u64 {
        self.n_blocks as u64 - FIRST_POOL_BLOCK as u64 - 1
    }

    fn set(&mut self, b: u32) {
        self.bits[(b / 64) as usize] |= 1 << (b % 64);
    }

    pub fn is_used(&self, b: u32) -> bool {
        b >= self.n_blocks || self.bits[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    /// Marks a block found by the mount walk. Returns false when it was already used: a block
    /// referenced twice (cross-link) or a pointer into the fixed area.
    pub fn mark_used(&mut self, b: u32) -> bool {
        if self.is_used(b) {
            return false;
        }
        self.set(b);
        self.free -= 1;
        true
    }

    pub fn free_blocks(&self) -> u64 {
        self.free
    }

    pub fn pending_blocks(&self) -> u64 {
        self.pending_count
    }

    pub fn used_blocks(&self) -> u64 {
        self.pool_blocks() - self.free - self.pending_count
    }

    pub fn reserve(&self) -> u64 {
        self.reserve
    }

    /// Free blocks an ordinary allocation may take.
    pub fn available(&self) -> u64 {
        self.free.saturating_sub(self.reserve)
    }

    pub fn alloc(&mut self, may_use_reserve: bool) -> Result<BlockNo> {
        let floor = if may_use_reserve { 0 } else { self.reserve };
        if self.free <= floor {
            return Err(Error::NoSpace);
        }
        let words = self.bits.len();
        let start = (self.hint / 64) as usize;
        for i in 0..=words {
            let w = (start + i) % words;
            let word = self.bits[w];
            if word != u64::MAX {
                let bit = (!word).trailing_zeros();
                let b = w as u32 * 64 + bit;
                self.set(b);
                self.free -= 1;
                self.hint = b;
                return Ok(BlockNo(b));
            }
        }
        Err(Error::NoSpace)
    }

    /// Frees a block no committed generation references (allocated and dropped in one transaction).
    pub fn release(&mut self, b: BlockNo) {
        debug_assert!(self.is_used(b.0) && b.0 >= FIRST_POOL_BLOCK && b.0 < self.n_blocks - 1);
        self.bits[(b.0 / 64) as usize] &= !(1 << (b.0 % 64));
        self.free += 1;
    }

    /// Frees blocks that generation `gen` stopped referencing; reusable after `gen + 2` commits.
    pub fn defer_free(&mut self, gen: u64, blocks: Vec<u32>) {
        if blocks.is_empty() {
            return;
        }
        self.pending_count += blocks.len() as u64;
        self.pending.push_back((gen, blocks));
    }

    /// Called after generation `committed` is durable.
    pub fn committed(&mut self, committed: u64) {
        while let Some((gen, _)) = self.pending.front() {
            if gen + 2 > committed {
                break;
            }
            let (_, blocks) = self.pending.pop_front().unwrap();
            self.pending_count -= blocks.len() as u64;
            for b in blocks {
                self.release(BlockNo(b));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_until_full_then_reserve() {
        let mut a = Allocator::new(64);
        let pool = a.pool_blocks();
        assert_eq!(pool, 59);
        let mut got = Vec::new();
        while let Ok(b) = a.alloc(false) {
            got.push(b);
        }
        assert_eq!(got.len() as u64, pool - a.reserve());
        assert!(a.alloc(true).is_ok());
        assert!(got.iter().all(|b| b.0 >= FIRST_POOL_BLOCK && b.0 < 63));
    }

    #[test]
    fn deferred_frees_wait_two_generations() {
        let mut a = Allocator::new(64);
        let b = a.alloc(false).unwrap();
        let free = a.free_blocks();
        a.defer_free(5, vec![b.0]);
        a.committed(5);
        a.committed(6);
        assert_eq!(a.free_blocks(), free);
        a.committed(7);
        assert_eq!(a.free_blocks(), free + 1);
        assert_eq!(a.pending_blocks(), 0);
    }

    #[test]
    fn mark_used_detects_cross_links() {
        let mut a = Allocator::new(64);
        assert!(a.mark_used(10));
        assert!(!a.mark_used(10));
        assert!(!a.mark_used(0));
    }
}
