//! Reading and changing the committed trees: inodes, directory slots, file data and extended
//! attributes, always through a transaction's copy-on-write.

use std::collections::HashMap;

use zerocopy::{FromBytes, FromZeros, IntoBytes};

use super::*;
use crate::error::{posix, Error, Result};
use crate::region::Region;
use crate::tree::{self, Tree};
use crate::tx::{read_verified, Block, Tx};


pub(crate) fn read_inode(region: &Region, inodes: Tree, ino: u64) -> Result<Inode> {
    let ptr = tree::lookup(region, inodes, ino / INODES_PER_BLOCK)?;
    if ptr.is_null() {
        return posix(libc::ENOENT);
    }
    let mut buf: Block = [0; BLOCK_SIZE];
    read_verified(region, ptr, &mut buf, &|| format!("inode block holding inode {ino}"))?;
    let slot = (ino % INODES_PER_BLOCK) as usize * INODE_SIZE;
    let inode = Inode::read_from_bytes(&buf[slot..slot + INODE_SIZE]).expect("inode size");
    if inode.is_free() {
        return posix(libc::ENOENT);
    }
    validate_inode(ino, &inode, ptr.blk)?;
    Ok(inode)
}

/// Limits a CRC-valid inode must still respect (defence against a buggy writer or a forged CRC).
pub(crate) fn validate_inode(ino: u64, i: &Inode, blk: u32) -> Result<()> {
    let bad = if i.height > MAX_HEIGHT || i.xattr_height > MAX_HEIGHT {
        Some("impossible tree height")
    } else if i.size > MAX_FILE_SIZE {
        Some("size beyond 2^48")
    } else if i.xattr_len as usize > XATTR_BLOB_MAX {
        Some("extended attribute list too large")
    } else if i.is_symlink() && i.size >= 4096 {
        Some("symlink target too long")
    } else {
        None
    };
    match bad {
        Some(why) => Err(Error::corrupt(blk, format!("inode {ino}: {why}"))),
        None => Ok(()),
    }
}

/// Reads `len` bytes at `off` of a data tree into `out` (holes read as zeros). On damage, returns
/// the bytes before the first damaged page if there are any, else the error.
pub(super) fn read_tree(region: &Region, t: Tree, off: u64, out: &mut [u8]) -> Result<usize> {
    out.fill(0);
    if out.is_empty() {
        return Ok(0);
    }
    let end = off + out.len() as u64;
    let mut reached = page_of(off);
    let mut buf: Block = [0; BLOCK_SIZE];
    let res = tree::for_each_mapped(region, t, page_of(off), page_of(end - 1), &mut reached, &mut |page, ptr| {
        read_verified(region, ptr, &mut buf, &|| format!("data page {page}"))?;
        let pstart = page << BLOCK_SHIFT;
        let lo = off.max(pstart);
        let hi = end.min(pstart + BLOCK_SIZE as u64);
        out[(lo - off) as usize..(hi - off) as usize].copy_from_slice(&buf[(lo - pstart) as usize..(hi - pstart) as usize]);
        Ok(())
    });
    match res {
        Ok(()) => Ok(out.len()),
        Err(e) => {
            let good = (reached << BLOCK_SHIFT).saturating_sub(off) as usize;
            if good > 0 {
                Ok(good.min(out.len()))
            } else {
                Err(e)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A transaction in progress.

pub(super) struct Work<'a> {
    pub(super) tx: Tx<'a>,
    pub(super) root: Root,
    pub(super) dirs: &'a mut HashMap<u64, DirIndex>,
    pub(super) lookups: &'a HashMap<u64, u64>,
    pub(super) now: Time,
}

impl Work<'_> {
    pub(super) fn region(&self) -> &Region {
        self.tx.region
    }

    pub(super) fn inode(&self, ino: u64) -> Result<Inode> {
        read_inode(self.tx.region, self.root.inodes, ino)
    }

    pub(super) fn put_inode(&mut self, ino: u64, inode: &Inode) -> Result<()> {
        let page = ino / INODES_PER_BLOCK;
        let slot = (ino % INODES_PER_BLOCK) as usize * INODE_SIZE;
        let mut inodes = self.root.inodes;
        tree::update_pages(&mut self.tx, &mut inodes, page, page, &mut |tx, _, old| {
            let mut buf: Block = [0; BLOCK_SIZE];
            if !old.is_null() {
                read_verified(tx.region, old, &mut buf, &|| format!("inode block holding inode {ino}"))?;
            }
            buf[slot..slot + INODE_SIZE].copy_from_slice(inode.as_bytes());
            if buf.iter().all(|&b| b == 0) {
                tx.free_block(old.block());
                return Ok(BlkPtr::NULL);
            }
            tx.rewrite(old, &buf)
        })?;
        self.root.inodes = inodes;
        Ok(())
    }

    pub(super) fn dir(&mut self, dir: u64) -> Result<&mut DirIndex> {
        if !self.dirs.contains_key(&dir) {
            let inode = self.inode(dir)?;
            let idx = build_dir_index(self.tx.region, &inode)?;
            self.dirs.insert(dir, idx);
        }
        Ok(self.dirs.get_mut(&dir).expect("just inserted"))
    }

    pub(super) fn write_slot(&mut self, dir_inode: &mut Inode, slot: u64, entry: &DirentSlot) -> Result<()> {
        let off = dirent_offset(slot);
        write_data(&mut self.tx, dir_inode, off, entry.as_bytes(), None)?;
        dir_inode.size = dir_inode.size.max((page_of(off) + 1) << BLOCK_SHIFT);
        Ok(())
    }

    pub(super) fn dir_add(&mut self, dir: u64, dir_inode: &mut Inode, name: &[u8], ino: u64, dtype: u8) -> Result<()> {
        let idx = self.dir(dir)?;
        let slot = idx.free.pop_first().unwrap_or(idx.n_slots);
        idx.n_slots = idx.n_slots.max(slot + 1);
        idx.names.insert(name.into(), DirEntry { slot, ino, dtype });
        let mut e = DirentSlot::new_zeroed();
        e.ino = ino;
        e.dtype = dtype;
        e.name_len = name.len() as u16;
        e.name[..name.len()].copy_from_slice(name);
        self.write_slot(dir_inode, slot, &e)?;
        touch_mc(dir_inode, self.now);
        Ok(())
    }

    pub(super) fn dir_remove(&mut self, dir: u64, dir_inode: &mut Inode, name: &[u8]) -> Result<DirEntry> {
        let idx = self.dir(dir)?;
        let Some(e) = idx.names.remove(name) else { return posix(libc::ENOENT) };
        idx.free.insert(e.slot);
        self.write_slot(dir_inode, e.slot, &DirentSlot::new_zeroed())?;
        touch_mc(dir_inode, self.now);
        Ok(e)
    }

    /// Removes the entry `name` of `dir` that leads to `target` and drops the link it held: a
    /// directory loses its own links and its parent's `..` link, anything else one link.
    pub(super) fn remove_entry(&mut self, dir: u64, dir_inode: &mut Inode, name: &[u8], target: &mut Inode) -> Result<()> {
        self.dir_remove(dir, dir_inode, name)?;
        if target.is_dir() {
            target.nlink = 0;
            dir_inode.nlink = dir_inode.nlink.saturating_sub(1);
        } else {
            target.nlink = target.nlink.saturating_sub(1);
        }
        touch_c(target, self.now);
        Ok(())
    }

    /// Whether an entry may go away as a directory (rmdir, or replaced by a directory in a
    /// rename) or as a non-directory (unlink, replaced by a file).
    pub(super) fn check_removable(&mut self, ino: u64, inode: &Inode, as_dir: bool) -> Result<()> {
        if as_dir {
            if !inode.is_dir() {
                return posix(libc::ENOTDIR);
            }
            if !self.dir(ino)?.names.is_empty() {
                return posix(libc::ENOTEMPTY);
            }
        } else if inode.is_dir() {
            return posix(libc::EISDIR);
        }
        Ok(())
    }

    pub(super) fn lookup(&mut self, dir: u64, name: &[u8]) -> Result<Option<DirEntry>> {
        let inode = self.inode(dir)?;
        if !inode.is_dir() {
            return posix(libc::ENOTDIR);
        }
        Ok(self.dir(dir)?.names.get(name).copied())
    }

    /// Frees an inode and everything it owns.
    pub(super) fn free_inode(&mut self, ino: u64, inode: &Inode) -> Result<()> {
        tree::free_subtree(&mut self.tx, inode.root, inode.height)?;
        tree::free_subtree(&mut self.tx, inode.xattr_root, inode.xattr_height)?;
        self.put_inode(ino, &Inode::zeroed())?;
        self.dirs.remove(&ino);
        self.root.n_inodes = self.root.n_inodes.saturating_sub(1);
        Ok(())
    }

    pub(super) fn new_inode(&mut self, mode: u32, who: Creator, parent_ino: u64, parent: &Inode, rdev: u32) -> (u64, Inode) {
        let ino = self.root.next_ino;
        self.root.next_ino += 1;
        self.root.n_inodes += 1;
        let mut i = Inode::zeroed();
        i.mode = mode;
        i.uid = who.uid;
        i.gid = who.gid;
        // Set-group-ID directories hand their group (and, to subdirectories, the bit) down.
        if parent.mode & libc::S_ISGID != 0 {
            i.gid = parent.gid;
            if mode & libc::S_IFMT == libc::S_IFDIR {
                i.mode |= libc::S_ISGID;
            }
        }
        i.nlink = 1;
        i.rdev = rdev;
        i.parent = parent_ino;
        i.generation = self.root.gen + 1;
        let t = self.now;
        set_time(&mut i.atime_s, &mut i.atime_ns, t);
        set_time(&mut i.crtime_s, &mut i.crtime_ns, t);
        touch_mc(&mut i, t);
        (ino, i)
    }
}

pub(crate) fn build_dir_index(region: &Region, dir: &Inode) -> Result<DirIndex> {
    let mut idx = DirIndex::default();
    let mut buf: Block = [0; BLOCK_SIZE];
    let mut reached = 0;
    let last_page = page_of(dir.size.max(1) - 1);
    let mut pages = 0u64;
    tree::for_each_mapped(region, data_tree(dir), 0, last_page, &mut reached, &mut |page, ptr| {
        read_verified(region, ptr, &mut buf, &|| format!("directory page {page}"))?;
        for s in 0..DIRENTS_PER_BLOCK {
            let off = (s as usize) * DIRENT_SIZE;
            let e = DirentSlot::read_from_bytes(&buf[off..off + DIRENT_SIZE]).expect("slot size");
            let slot = page * DIRENTS_PER_BLOCK + s;
            if e.ino != 0 {
                idx.names.insert(e.name().into(), DirEntry { slot, ino: e.ino, dtype: e.dtype });
            }
        }
        pages = pages.max(page + 1);
        Ok(())
    })?;
    idx.n_slots = pages * DIRENTS_PER_BLOCK;
    let used: std::collections::HashSet<u64> = idx.names.values().map(|e| e.slot).collect();
    idx.free = (0..idx.n_slots).filter(|s| !used.contains(s)).collect();
    Ok(idx)
}

/// Writes `data` at `off` into an inode's data tree (copy-on-write of every page touched); whole
/// pages with a CRC in `hinted` keep that CRC instead of a computed one.
pub(super) fn write_data(tx: &mut Tx<'_>, inode: &mut Inode, off: u64, data: &[u8], hinted: Option<&Hinted>) -> Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    let end = off + data.len() as u64;
    let mut t = data_tree(inode);
    let mut added = 0u64;
    tree::update_pages(tx, &mut t, page_of(off), page_of(end - 1), &mut |tx, page, old| {
        let pstart = page << BLOCK_SHIFT;
        let lo = off.max(pstart);
        let hi = end.min(pstart + BLOCK_SIZE as u64);
        if old.is_null() {
            added += 1;
        }
        let part = &data[(lo - off) as usize..(hi - off) as usize];
        if let Ok(whole) = <&Block>::try_from(part) {
            // A whole page goes straight from the request into its block.
            return match hinted.and_then(|h| h.crc_at(pstart)) {
                Some(crc) => tx.rewrite_vouched(old, whole, crc),
                None => tx.rewrite(old, whole),
            };
        }
        let mut buf: Block = [0; BLOCK_SIZE];
        if !old.is_null() {
            read_verified(tx.region, old, &mut buf, &|| format!("data page {page}"))?;
        }
        buf[(lo - pstart) as usize..(hi - pstart) as usize].copy_from_slice(part);
        tx.rewrite(old, &buf)
    })?;
    inode.blocks += added;
    set_data_tree(inode, t);
    Ok(())
}

/// Makes the filled blocks `blocks` (with their CRCs), in order, the file's pages of `extents`
/// (byte offset, pages: block-aligned, ascending, not overlapping, as many pages as blocks),
/// freeing the pages they replace, in one walk of the file's tree (a direct writer's commit, see
/// [`super::lease`]).
pub(super) fn adopt_blocks(tx: &mut Tx<'_>, inode: &mut Inode, extents: &[(u64, usize)], blocks: &[u32], crcs: &[u32]) -> Result<()> {
    debug_assert_eq!(blocks.len(), crcs.len());
    debug_assert_eq!(extents.iter().map(|e| e.1).sum::<usize>(), blocks.len());
    for &b in blocks {
        tx.adopt(BlockNo(b));
    }
    let ranges: Vec<(u64, u64)> = extents.iter().map(|&(off, n)| (page_of(off), page_of(off) + n as u64 - 1)).collect();
    let mut t = data_tree(inode);
    let mut added = 0u64;
    // The walk visits the extents' pages in ascending order: the order of the blocks.
    let mut i = 0usize;
    tree::update_ranges(tx, &mut t, &ranges, &mut |tx, _page, old| {
        if old.is_null() {
            added += 1;
        } else {
            tx.free_block(old.block());
        }
        let new = BlkPtr { blk: blocks[i], crc: crcs[i] };
        i += 1;
        Ok(new)
    })?;
    debug_assert_eq!(i, blocks.len());
    inode.blocks += added;
    set_data_tree(inode, t);
    Ok(())
}

/// Zeroes bytes `lo..hi` (inside one page) of a mapped page; holes stay holes.
pub(super) fn zero_partial(tx: &mut Tx<'_>, inode: &mut Inode, lo: u64, hi: u64) -> Result<()> {
    if lo >= hi {
        return Ok(());
    }
    let page = page_of(lo);
    let mut t = data_tree(inode);
    if tree::lookup(tx.region, t, page)?.is_null() {
        return Ok(());
    }
    tree::update_pages(tx, &mut t, page, page, &mut |tx, _, old| {
        let mut buf: Block = [0; BLOCK_SIZE];
        read_verified(tx.region, old, &mut buf, &|| format!("data page {page}"))?;
        let pstart = page << BLOCK_SHIFT;
        buf[(lo - pstart) as usize..(hi - pstart) as usize].fill(0);
        tx.rewrite(old, &buf)
    })?;
    set_data_tree(inode, t);
    Ok(())
}

/// Makes `off..end` read as zeros: whole pages become holes, partial pages are zeroed.
pub(super) fn punch_range(tx: &mut Tx<'_>, inode: &mut Inode, off: u64, end: u64) -> Result<()> {
    if off >= end {
        return Ok(());
    }
    let page_mask = BLOCK_SIZE as u64 - 1;
    let (first, last) = (page_of(off), page_of(end - 1));
    let mut full_first = first;
    let mut full_last = last;
    if first == last && (off & page_mask != 0 || end & page_mask != 0) {
        return zero_partial(tx, inode, off, end);
    }
    if off & page_mask != 0 {
        zero_partial(tx, inode, off, (first + 1) << BLOCK_SHIFT)?;
        full_first += 1;
    }
    if end & page_mask != 0 {
        zero_partial(tx, inode, last << BLOCK_SHIFT, end)?;
        full_last -= 1;
    }
    if full_first <= full_last {
        let mut t = data_tree(inode);
        inode.blocks = inode.blocks.saturating_sub(tree::punch(tx, &mut t, full_first, full_last)?);
        set_data_tree(inode, t);
    }
    Ok(())
}

/// Maps zero-filled blocks into the holes of `off..end` (fallocate); `replace` also replaces
/// mapped whole pages with zeros (ZERO_RANGE).
pub(super) fn allocate_range(tx: &mut Tx<'_>, inode: &mut Inode, off: u64, end: u64, replace: bool) -> Result<()> {
    if off >= end {
        return Ok(());
    }
    let mut t = data_tree(inode);
    let mut added = 0u64;
    let zero: Block = [0; BLOCK_SIZE];
    tree::update_pages(tx, &mut t, page_of(off), page_of(end - 1), &mut |tx, page, old| {
        let pstart = page << BLOCK_SHIFT;
        let whole = off <= pstart && end >= pstart + BLOCK_SIZE as u64;
        if old.is_null() {
            added += 1;
            return tx.rewrite(old, &zero);
        }
        if !replace {
            return Ok(old);
        }
        let mut buf: Block = [0; BLOCK_SIZE];
        if !whole {
            read_verified(tx.region, old, &mut buf, &|| format!("data page {page}"))?;
            let lo = off.max(pstart) - pstart;
            let hi = end.min(pstart + BLOCK_SIZE as u64) - pstart;
            buf[lo as usize..hi as usize].fill(0);
        }
        tx.rewrite(old, &buf)
    })?;
    inode.blocks += added;
    set_data_tree(inode, t);
    Ok(())
}

pub(super) fn load_xattrs(region: &Region, inode: &Inode) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut blob = vec![0u8; inode.xattr_len as usize];
    let n = read_tree(region, xattr_tree(inode), 0, &mut blob)?;
    if n < blob.len() {
        return Err(Error::corrupt(inode.xattr_root.blk, "extended attributes"));
    }
    let mut out = Vec::new();
    let mut p = 0usize;
    while p + 5 <= blob.len() {
        let nl = blob[p] as usize;
        let vl = u32::from_le_bytes(blob[p + 1..p + 5].try_into().unwrap()) as usize;
        p += 5;
        if p + nl + vl > blob.len() {
            return Err(Error::corrupt(inode.xattr_root.blk, "extended attribute list is truncated"));
        }
        out.push((blob[p..p + nl].to_vec(), blob[p + nl..p + nl + vl].to_vec()));
        p += nl + vl;
    }
    Ok(out)
}

pub(super) fn store_xattrs(tx: &mut Tx<'_>, inode: &mut Inode, list: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
    let mut blob = Vec::new();
    for (n, v) in list {
        blob.push(n.len() as u8);
        blob.extend_from_slice(&(v.len() as u32).to_le_bytes());
        blob.extend_from_slice(n);
        blob.extend_from_slice(v);
    }
    let mut t = xattr_tree(inode);
    tree::free_subtree(tx, t.ptr, t.height)?;
    t = Tree::EMPTY;
    // Written as a fresh tree: the blob is small (bounded by XATTR_LIST_MAX).
    let mut scratch = Inode::zeroed();
    set_data_tree(&mut scratch, t);
    write_data(tx, &mut scratch, 0, &blob, None)?;
    inode.xattr_root = scratch.root;
    inode.xattr_height = scratch.height;
    inode.xattr_len = blob.len() as u32;
    Ok(())
}

pub(super) const XATTR_LIST_MAX: usize = 65536;
/// Names (≤ 64 KiB in all) plus values (≤ 64 KiB each) of at most 4096 attributes.
pub(super) const XATTR_BLOB_MAX: usize = 4096 * (XATTR_SIZE_MAX + 260);
pub(super) const XATTR_SIZE_MAX: usize = 65536;

pub(super) fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > NAME_MAX {
        return posix(libc::ENAMETOOLONG);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
        return posix(libc::EINVAL);
    }
    Ok(())
}
