//! The file system core: mkfs, the mount walk, transactions and every POSIX operation the FUSE
//! front end forwards. Each mutating operation is one transaction and is durable in the region
//! when it returns.

use std::collections::{BTreeSet, HashMap};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use tracing::{error, info, warn};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::alloc::Allocator;
use crate::error::{posix, Error, Result};
use crate::layout::*;
use crate::owner::{self, Owner};
use crate::region::Region;
use crate::tree::{self, Tree, Visit};
use crate::tx::{read_verified, Block, Tx};

/// The committed state: what the newest commit record points at.
#[derive(Clone, Copy, Debug)]
struct Root {
    gen: u64,
    inodes: Tree,
    next_ino: u64,
    n_inodes: u64,
}

/// What the mount walk found.
#[derive(Clone, Debug, Default)]
pub struct MountReport {
    pub generation: u64,
    /// The last commit before this open was a clean unmount.
    pub was_clean: bool,
    /// The session that had the region open last, if it did not close it.
    pub previous_owner: Option<String>,
    /// Damage found (each names the inode/path and block).
    pub errors: Vec<String>,
    /// Harmless findings (a torn commit slot, a superblock copy rewritten…).
    pub notes: Vec<String>,
    /// Inodes with no links left (unlinked while open); freed by a read-write mount.
    pub orphans: Vec<u64>,
    /// The inode table itself is damaged: writing could reuse blocks of unreachable inodes, so
    /// the mount is read-only.
    pub metadata_damage: bool,
    pub inodes: u64,
    pub used_blocks: u64,
    pub free_blocks: u64,
    pub pool_blocks: u64,
}

/// Options for [`Fs::open`].
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    pub read_only: bool,
    /// Recorded in the owner record ("mounted at /kup").
    pub what: String,
}

/// Options for [`Fs::mkfs`].
#[derive(Clone, Debug, Default)]
pub struct MkfsOptions {
    pub label: String,
    pub phys_offset: u64,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct DirEntry {
    pub slot: u64,
    pub ino: u64,
    pub dtype: u8,
}

/// DRAM index of one directory (built on first use from its slots).
#[derive(Default)]
pub(crate) struct DirIndex {
    pub names: HashMap<Box<[u8]>, DirEntry>,
    free: BTreeSet<u64>,
    n_slots: u64,
}

struct Inner {
    root: Root,
    alloc: Allocator,
    dirs: HashMap<u64, DirIndex>,
    /// FUSE lookup counts: an unlinked inode lives until the kernel forgets it.
    lookups: HashMap<u64, u64>,
}

pub struct Fs {
    region: Region,
    sb: Superblock,
    read_only: bool,
    inner: Mutex<Inner>,
}

/// File attributes as the FUSE layer needs them.
#[derive(Clone, Copy, Debug)]
pub struct Attr {
    pub ino: u64,
    pub inode: Inode,
}

/// One readdir entry.
#[derive(Clone, Debug)]
pub struct ReaddirEntry {
    pub ino: u64,
    /// Offset of the next entry.
    pub next: u64,
    pub dtype: u8,
    pub name: Vec<u8>,
}

/// Totals for statfs and `rpramfs info`.
#[derive(Clone, Copy, Debug)]
pub struct Usage {
    pub pool_blocks: u64,
    pub free_blocks: u64,
    pub available_blocks: u64,
    pub pending_blocks: u64,
    pub inodes: u64,
    pub generation: u64,
}

/// Times as (seconds, nanoseconds).
pub type Time = (i64, u32);

pub fn now() -> Time {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos())
}

/// A setattr request.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<Time>,
    pub mtime: Option<Time>,
    pub ctime: Option<Time>,
}

/// Who creates an inode.
#[derive(Clone, Copy, Debug)]
pub struct Creator {
    pub uid: u32,
    pub gid: u32,
}

pub const FALLOC_KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;
pub const FALLOC_PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE;
pub const FALLOC_ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE;

fn set_time(s: &mut i64, ns: &mut u32, t: Time) {
    *s = t.0;
    *ns = t.1;
}

fn touch_mc(i: &mut Inode, t: Time) {
    set_time(&mut i.mtime_s, &mut i.mtime_ns, t);
    set_time(&mut i.ctime_s, &mut i.ctime_ns, t);
}

fn touch_c(i: &mut Inode, t: Time) {
    set_time(&mut i.ctime_s, &mut i.ctime_ns, t);
}

pub(crate) fn data_tree(i: &Inode) -> Tree {
    Tree { ptr: i.root, height: i.height }
}

fn set_data_tree(i: &mut Inode, t: Tree) {
    i.root = t.ptr;
    i.height = t.height;
}

pub(crate) fn xattr_tree(i: &Inode) -> Tree {
    Tree { ptr: i.xattr_root, height: i.xattr_height }
}

fn page_of(off: u64) -> u64 {
    off >> BLOCK_SHIFT
}

// ---------------------------------------------------------------------------------------------
// Reading committed state (no transaction).

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
fn read_tree(region: &Region, t: Tree, off: u64, out: &mut [u8]) -> Result<usize> {
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

struct Work<'a> {
    tx: Tx<'a>,
    root: Root,
    dirs: &'a mut HashMap<u64, DirIndex>,
    lookups: &'a HashMap<u64, u64>,
    now: Time,
}

impl Work<'_> {
    fn region(&self) -> &Region {
        self.tx.region
    }

    fn inode(&self, ino: u64) -> Result<Inode> {
        read_inode(self.tx.region, self.root.inodes, ino)
    }

    fn put_inode(&mut self, ino: u64, inode: &Inode) -> Result<()> {
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

    fn dir(&mut self, dir: u64) -> Result<&mut DirIndex> {
        if !self.dirs.contains_key(&dir) {
            let inode = self.inode(dir)?;
            let idx = build_dir_index(self.tx.region, &inode)?;
            self.dirs.insert(dir, idx);
        }
        Ok(self.dirs.get_mut(&dir).expect("just inserted"))
    }

    fn write_slot(&mut self, dir_inode: &mut Inode, slot: u64, entry: &DirentSlot) -> Result<()> {
        let off = dirent_offset(slot);
        write_data(&mut self.tx, dir_inode, off, entry.as_bytes())?;
        dir_inode.size = dir_inode.size.max((page_of(off) + 1) << BLOCK_SHIFT);
        Ok(())
    }

    fn dir_add(&mut self, dir: u64, dir_inode: &mut Inode, name: &[u8], ino: u64, dtype: u8) -> Result<()> {
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

    fn dir_remove(&mut self, dir: u64, dir_inode: &mut Inode, name: &[u8]) -> Result<DirEntry> {
        let idx = self.dir(dir)?;
        let Some(e) = idx.names.remove(name) else { return posix(libc::ENOENT) };
        idx.free.insert(e.slot);
        self.write_slot(dir_inode, e.slot, &DirentSlot::new_zeroed())?;
        touch_mc(dir_inode, self.now);
        Ok(e)
    }

    fn lookup(&mut self, dir: u64, name: &[u8]) -> Result<Option<DirEntry>> {
        let inode = self.inode(dir)?;
        if !inode.is_dir() {
            return posix(libc::ENOTDIR);
        }
        Ok(self.dir(dir)?.names.get(name).copied())
    }

    /// Frees an inode and everything it owns.
    fn free_inode(&mut self, ino: u64, inode: &Inode) -> Result<()> {
        tree::free_subtree(&mut self.tx, inode.root, inode.height)?;
        tree::free_subtree(&mut self.tx, inode.xattr_root, inode.xattr_height)?;
        self.put_inode(ino, &Inode::zeroed())?;
        self.dirs.remove(&ino);
        self.root.n_inodes = self.root.n_inodes.saturating_sub(1);
        Ok(())
    }

    fn new_inode(&mut self, mode: u32, who: Creator, parent_ino: u64, parent: &Inode, rdev: u32) -> (u64, Inode) {
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

/// Writes `data` at `off` into an inode's data tree (copy-on-write of every page touched).
fn write_data(tx: &mut Tx<'_>, inode: &mut Inode, off: u64, data: &[u8]) -> Result<()> {
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
        let mut buf: Block = [0; BLOCK_SIZE];
        if hi - lo < BLOCK_SIZE as u64 && !old.is_null() {
            read_verified(tx.region, old, &mut buf, &|| format!("data page {page}"))?;
        }
        buf[(lo - pstart) as usize..(hi - pstart) as usize].copy_from_slice(&data[(lo - off) as usize..(hi - off) as usize]);
        if old.is_null() {
            added += 1;
        }
        tx.rewrite(old, &buf)
    })?;
    inode.blocks += added;
    set_data_tree(inode, t);
    Ok(())
}

/// Zeroes bytes `lo..hi` (inside one page) of a mapped page; holes stay holes.
fn zero_partial(tx: &mut Tx<'_>, inode: &mut Inode, lo: u64, hi: u64) -> Result<()> {
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
fn punch_range(tx: &mut Tx<'_>, inode: &mut Inode, off: u64, end: u64) -> Result<()> {
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
fn allocate_range(tx: &mut Tx<'_>, inode: &mut Inode, off: u64, end: u64, replace: bool) -> Result<()> {
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

fn load_xattrs(region: &Region, inode: &Inode) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
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

fn store_xattrs(tx: &mut Tx<'_>, inode: &mut Inode, list: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
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
    write_data(tx, &mut scratch, 0, &blob)?;
    inode.xattr_root = scratch.root;
    inode.xattr_height = scratch.height;
    inode.xattr_len = blob.len() as u32;
    Ok(())
}

const XATTR_LIST_MAX: usize = 65536;
/// Names (≤ 64 KiB in all) plus values (≤ 64 KiB each) of at most 4096 attributes.
const XATTR_BLOB_MAX: usize = 4096 * (XATTR_SIZE_MAX + 260);
const XATTR_SIZE_MAX: usize = 65536;

fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > NAME_MAX {
        return posix(libc::ENAMETOOLONG);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
        return posix(libc::EINVAL);
    }
    Ok(())
}

impl Fs {
    /// Writes a new, empty file system onto the region (erasing it).
    pub fn mkfs(region: &Region, opts: &MkfsOptions) -> Result<()> {
        if region.len() > MAX_REGION_BYTES {
            return Err(Error::BadRegion {
                path: region.name().into(),
                why: format!("{} bytes is more than the {MAX_REGION_BYTES}-byte maximum", region.len()),
            });
        }
        let n_blocks = (region.len() / BLOCK_SIZE as u64) as u32;
        let mut sb = Superblock::new_zeroed();
        sb.magic = MAGIC;
        sb.version = FORMAT_VERSION;
        sb.block_size = BLOCK_SIZE as u32;
        sb.n_blocks = n_blocks as u64;
        sb.region_size = region.len();
        sb.phys_offset = opts.phys_offset;
        sb.uuid = new_uuid();
        sb.created_ns = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        let l = opts.label.as_bytes();
        sb.label[..l.len().min(47)].copy_from_slice(&l[..l.len().min(47)]);
        sb.seal();

        // Invalidate first (a crash mid-mkfs must not leave the old file system looking valid),
        // then clear the rings and the owner record, then write the superblocks.
        let zero: Block = [0; BLOCK_SIZE];
        let last = BlockNo(n_blocks - 1);
        for b in [SUPERBLOCK_A, last, OWNER_BLOCK, RING_A, RING_B] {
            region.write(b.offset(), &zero)?;
        }
        region.fence();
        let mut alloc = Allocator::new(n_blocks);
        let mut tx = Tx::new(region, &mut alloc);
        let t = now();
        let mut root_inode = Inode::zeroed();
        root_inode.mode = libc::S_IFDIR | 0o755;
        root_inode.nlink = 2;
        root_inode.parent = ROOT_INO;
        root_inode.generation = 1;
        set_time(&mut root_inode.atime_s, &mut root_inode.atime_ns, t);
        set_time(&mut root_inode.crtime_s, &mut root_inode.crtime_ns, t);
        touch_mc(&mut root_inode, t);
        let mut inodes = Tree::EMPTY;
        tree::update_pages(&mut tx, &mut inodes, 0, 0, &mut |tx, _, old| {
            let mut buf: Block = [0; BLOCK_SIZE];
            let s = ROOT_INO as usize * INODE_SIZE;
            buf[s..s + INODE_SIZE].copy_from_slice(root_inode.as_bytes());
            tx.rewrite(old, &buf)
        })?;
        let (fresh, _) = tx.finish();
        let root = Root { gen: 1, inodes, next_ino: ROOT_INO + 1, n_inodes: 1 };
        let used = fresh.len() as u64;
        write_commit(region, &sb, &root, used, COMMIT_CLEAN, &fresh)?;
        let mut sb_block: Block = [0; BLOCK_SIZE];
        sb_block[..std::mem::size_of::<Superblock>()].copy_from_slice(sb.as_bytes());
        region.write(last.offset(), &sb_block)?;
        region.fence();
        region.write(SUPERBLOCK_A.offset(), &sb_block)?;
        region.fence();
        region.flush(&[(0, 4 * BLOCK_SIZE as u64), (last.offset().0, BLOCK_SIZE as u64)])?;
        Ok(())
    }

    /// Opens the file system on `region`: picks the newest valid commit, walks every tree
    /// (rebuilding the allocator and finding damage) and, unless read-only, records itself as the
    /// owner, frees orphans and commits an "open" generation.
    pub fn open(region: Region, opts: &OpenOptions) -> Result<(Fs, MountReport)> {
        let mut report = MountReport::default();
        let sb = read_superblock(&region, &mut report)?;
        let (root, was_clean) = pick_commit(&region, &sb, &mut report)?;
        report.generation = root.gen;
        report.was_clean = was_clean;
        if let Some(o) = owner::read(&region) {
            report.previous_owner = Some(o.describe());
        }
        let alloc = mount_walk(&region, &sb, &root, &mut report);
        report.used_blocks = alloc.used_blocks();
        report.free_blocks = alloc.free_blocks();
        report.pool_blocks = alloc.pool_blocks();
        let read_only = opts.read_only || report.metadata_damage;
        if read_only && !opts.read_only {
            warn!("the inode table is damaged: mounting read-only so that no block of an unreachable file is reused; run `rpramfs fsck`");
        }
        let fs = Fs {
            region,
            sb,
            read_only,
            inner: Mutex::new(Inner { root, alloc, dirs: HashMap::new(), lookups: HashMap::new() }),
        };
        if !read_only {
            owner::write(&fs.region, Some(&Owner::current(&opts.what)))?;
            let orphans = report.orphans.clone();
            fs.mutate(true, |w| {
                for ino in orphans {
                    if let Ok(inode) = w.inode(ino) {
                        w.free_inode(ino, &inode)?;
                    }
                }
                Ok(())
            })?;
            if !report.orphans.is_empty() {
                info!(count = report.orphans.len(), "freed orphan inodes (unlinked while open before the last shutdown)");
            }
        }
        Ok((fs, report))
    }

    /// Writes the clean-unmount commit and clears the owner record.
    pub fn close(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut inner = self.inner.lock();
        let root = inner.root;
        let used = inner.alloc.used_blocks();
        write_commit(&self.region, &self.sb, &Root { gen: root.gen + 1, ..root }, used, COMMIT_CLEAN, &[])?;
        inner.root.gen += 1;
        let g = inner.root.gen;
        inner.alloc.committed(g);
        owner::write(&self.region, None)
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    pub fn region(&self) -> &Region {
        &self.region
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Runs `f` as one transaction and commits it; on error nothing of it remains.
    fn mutate<R>(&self, may_use_reserve: bool, f: impl FnOnce(&mut Work<'_>) -> Result<R>) -> Result<R> {
        if self.read_only {
            return posix(libc::EROFS);
        }
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        let mut tx = Tx::new(&self.region, &mut inner.alloc);
        tx.may_use_reserve = may_use_reserve;
        let mut w = Work { tx, root: inner.root, dirs: &mut inner.dirs, lookups: &inner.lookups, now: now() };
        match f(&mut w) {
            Ok(r) => {
                let Work { tx, root, .. } = w;
                let (fresh, freed) = tx.finish();
                let root = Root { gen: inner.root.gen + 1, ..root };
                let used = inner.alloc.used_blocks() - freed.len() as u64;
                if let Err(e) = write_commit(&self.region, &self.sb, &root, used, 0, &fresh) {
                    // The record may or may not have reached the region; keep this session from
                    // reusing any block either generation references.
                    inner.dirs.clear();
                    return Err(e);
                }
                inner.alloc.defer_free(root.gen, freed);
                inner.alloc.committed(root.gen);
                inner.root = root;
                Ok(r)
            }
            Err(e) => {
                let Work { tx, .. } = w;
                tx.rollback();
                inner.dirs.clear();
                Err(e)
            }
        }
    }

    fn read<R>(&self, f: impl FnOnce(&Region, Tree, &mut Inner) -> Result<R>) -> Result<R> {
        let mut inner = self.inner.lock();
        let t = inner.root.inodes;
        f(&self.region, t, &mut inner)
    }

    // -----------------------------------------------------------------------------------------
    // Operations.

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        self.read(|r, t, _| Ok(Attr { ino, inode: read_inode(r, t, ino)? }))
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr> {
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        let dir = read_inode(&self.region, inner.root.inodes, parent)?;
        if !dir.is_dir() {
            return posix(libc::ENOTDIR);
        }
        if name.len() > NAME_MAX {
            return posix(libc::ENAMETOOLONG);
        }
        if !inner.dirs.contains_key(&parent) {
            let idx = build_dir_index(&self.region, &dir)?;
            inner.dirs.insert(parent, idx);
        }
        let Some(e) = inner.dirs[&parent].names.get(name).copied() else { return posix(libc::ENOENT) };
        let inode = read_inode(&self.region, inner.root.inodes, e.ino)?;
        Ok(Attr { ino: e.ino, inode })
    }

    /// Counts a FUSE lookup reference (lookup, create, mkdir, …).
    pub fn remember(&self, ino: u64) {
        if ino != ROOT_INO {
            *self.inner.lock().lookups.entry(ino).or_default() += 1;
        }
    }

    /// Drops FUSE lookup references; an unlinked inode nobody holds is freed.
    pub fn forget(&self, ino: u64, n: u64) {
        let gone = {
            let mut inner = self.inner.lock();
            let Some(c) = inner.lookups.get_mut(&ino) else { return };
            *c = c.saturating_sub(n);
            if *c > 0 {
                return;
            }
            inner.lookups.remove(&ino);
            matches!(read_inode(&self.region, inner.root.inodes, ino), Ok(i) if i.nlink == 0)
        };
        if gone && !self.read_only {
            if let Err(e) = self.mutate(true, |w| {
                let inode = w.inode(ino)?;
                w.free_inode(ino, &inode)
            }) {
                warn!(ino, error = %e, "could not free unlinked inode; the next mount frees it");
            }
        }
    }

    /// Creates a file, directory, symlink or special file.
    pub fn create(&self, parent: u64, name: &[u8], mode: u32, rdev: u32, who: Creator, symlink: Option<&[u8]>) -> Result<Attr> {
        check_name(name)?;
        if let Some(t) = symlink {
            if t.len() >= 4096 {
                return posix(libc::ENAMETOOLONG);
            }
        }
        let kind = mode & libc::S_IFMT;
        if !matches!(kind, libc::S_IFREG | libc::S_IFDIR | libc::S_IFLNK | libc::S_IFIFO | libc::S_IFSOCK | libc::S_IFCHR | libc::S_IFBLK) {
            return posix(libc::EINVAL);
        }
        self.mutate(false, |w| {
            let mut dir = w.inode(parent)?;
            if !dir.is_dir() {
                return posix(libc::ENOTDIR);
            }
            if dir.nlink == 0 {
                return posix(libc::ENOENT);
            }
            if w.lookup(parent, name)?.is_some() {
                return posix(libc::EEXIST);
            }
            let (ino, mut inode) = w.new_inode(mode, who, parent, &dir, rdev);
            if kind == libc::S_IFDIR {
                inode.nlink = 2;
                dir.nlink += 1;
                w.dirs.insert(ino, DirIndex::default());
            }
            if let Some(target) = symlink {
                write_data(&mut w.tx, &mut inode, 0, target)?;
                inode.size = target.len() as u64;
            }
            w.put_inode(ino, &inode)?;
            w.dir_add(parent, &mut dir, name, ino, dtype_of_mode(mode))?;
            w.put_inode(parent, &dir)?;
            Ok(Attr { ino, inode })
        })
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        self.read(|r, t, _| {
            let inode = read_inode(r, t, ino)?;
            if !inode.is_symlink() {
                return posix(libc::EINVAL);
            }
            let mut out = vec![0u8; inode.size as usize];
            let n = read_tree(r, data_tree(&inode), 0, &mut out)?;
            if n < out.len() {
                return Err(Error::corrupt(inode.root.blk, format!("symlink target of inode {ino}")));
            }
            Ok(out)
        })
    }

    /// unlink (dir = false) or rmdir (dir = true).
    pub fn remove(&self, parent: u64, name: &[u8], rmdir: bool) -> Result<()> {
        if name == b"." {
            return posix(libc::EINVAL);
        }
        if name == b".." {
            return posix(libc::ENOTEMPTY);
        }
        self.mutate(true, |w| {
            let mut dir = w.inode(parent)?;
            let Some(e) = w.lookup(parent, name)? else { return posix(libc::ENOENT) };
            let mut target = w.inode(e.ino)?;
            if rmdir {
                if !target.is_dir() {
                    return posix(libc::ENOTDIR);
                }
                if !w.dir(e.ino)?.names.is_empty() {
                    return posix(libc::ENOTEMPTY);
                }
            } else if target.is_dir() {
                return posix(libc::EISDIR);
            }
            w.dir_remove(parent, &mut dir, name)?;
            if target.is_dir() {
                target.nlink = 0;
                dir.nlink = dir.nlink.saturating_sub(1);
            } else {
                target.nlink = target.nlink.saturating_sub(1);
            }
            touch_c(&mut target, w.now);
            w.put_inode(parent, &dir)?;
            self.drop_link(w, e.ino, &target)
        })
    }

    /// Stores an inode that just lost a link, freeing it when nothing references it any more.
    fn drop_link(&self, w: &mut Work<'_>, ino: u64, inode: &Inode) -> Result<()> {
        let held = w.lookups.get(&ino).copied().unwrap_or(0) > 0;
        if inode.nlink == 0 && !held {
            w.free_inode(ino, inode)
        } else {
            w.put_inode(ino, inode)
        }
    }

    pub fn link(&self, ino: u64, parent: u64, name: &[u8]) -> Result<Attr> {
        check_name(name)?;
        self.mutate(false, |w| {
            let mut inode = w.inode(ino)?;
            if inode.is_dir() {
                return posix(libc::EPERM);
            }
            if inode.nlink == 0 {
                return posix(libc::ENOENT);
            }
            if inode.nlink >= u32::MAX - 1 {
                return posix(libc::EMLINK);
            }
            let mut dir = w.inode(parent)?;
            if !dir.is_dir() {
                return posix(libc::ENOTDIR);
            }
            if w.lookup(parent, name)?.is_some() {
                return posix(libc::EEXIST);
            }
            inode.nlink += 1;
            touch_c(&mut inode, w.now);
            w.put_inode(ino, &inode)?;
            w.dir_add(parent, &mut dir, name, ino, dtype_of_mode(inode.mode))?;
            w.put_inode(parent, &dir)?;
            Ok(Attr { ino, inode })
        })
    }

    /// rename(2) with RENAME_NOREPLACE / RENAME_EXCHANGE.
    pub fn rename(&self, parent: u64, name: &[u8], newparent: u64, newname: &[u8], flags: u32) -> Result<()> {
        let noreplace = flags & libc::RENAME_NOREPLACE != 0;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 || (noreplace && exchange) {
            return posix(libc::EINVAL);
        }
        check_name(newname)?;
        self.mutate(true, |w| {
            let Some(src) = w.lookup(parent, name)? else { return posix(libc::ENOENT) };
            let dst = w.lookup(newparent, newname)?;
            let mut src_inode = w.inode(src.ino)?;
            if let Some(d) = dst {
                if noreplace {
                    return posix(libc::EEXIST);
                }
                if d.ino == src.ino {
                    return Ok(()); // two links to one inode: nothing to do
                }
            } else if exchange {
                return posix(libc::ENOENT);
            }
            // A directory may not move into its own subtree.
            let check_loop = |w: &mut Work<'_>, moving: u64, into: u64| -> Result<()> {
                let mut cur = into;
                for _ in 0..4096 {
                    if cur == moving {
                        return posix(libc::EINVAL);
                    }
                    if cur == ROOT_INO {
                        return Ok(());
                    }
                    cur = w.inode(cur)?.parent;
                }
                posix(libc::ELOOP)
            };
            if src_inode.is_dir() && parent != newparent {
                check_loop(w, src.ino, newparent)?;
            }
            let now = w.now;
            if exchange {
                let d = dst.expect("checked");
                let mut dst_inode = w.inode(d.ino)?;
                if dst_inode.is_dir() && parent != newparent {
                    check_loop(w, d.ino, parent)?;
                }
                // Swap the two slots' targets.
                let mut pdir = w.inode(parent)?;
                w.dir_remove(parent, &mut pdir, name)?;
                w.dir_add(parent, &mut pdir, name, d.ino, d.dtype)?;
                w.put_inode(parent, &pdir)?;
                let mut ndir = w.inode(newparent)?;
                w.dir_remove(newparent, &mut ndir, newname)?;
                w.dir_add(newparent, &mut ndir, newname, src.ino, src.dtype)?;
                if parent != newparent {
                    let sd = src_inode.is_dir() as u32;
                    let dd = dst_inode.is_dir() as u32;
                    ndir.nlink = (ndir.nlink + sd).saturating_sub(dd);
                    w.put_inode(newparent, &ndir)?;
                    let mut pdir = w.inode(parent)?;
                    pdir.nlink = (pdir.nlink + dd).saturating_sub(sd);
                    w.put_inode(parent, &pdir)?;
                } else {
                    w.put_inode(newparent, &ndir)?;
                }
                src_inode.parent = newparent;
                dst_inode.parent = parent;
                touch_c(&mut src_inode, now);
                touch_c(&mut dst_inode, now);
                w.put_inode(src.ino, &src_inode)?;
                w.put_inode(d.ino, &dst_inode)?;
                return Ok(());
            }
            let mut replaced: Option<(u64, Inode)> = None;
            if let Some(d) = dst {
                let dst_inode = w.inode(d.ino)?;
                if src_inode.is_dir() {
                    if !dst_inode.is_dir() {
                        return posix(libc::ENOTDIR);
                    }
                    if !w.dir(d.ino)?.names.is_empty() {
                        return posix(libc::ENOTEMPTY);
                    }
                } else if dst_inode.is_dir() {
                    return posix(libc::EISDIR);
                }
                replaced = Some((d.ino, dst_inode));
            }
            let mut pdir = w.inode(parent)?;
            w.dir_remove(parent, &mut pdir, name)?;
            if src_inode.is_dir() && parent != newparent {
                pdir.nlink = pdir.nlink.saturating_sub(1);
            }
            w.put_inode(parent, &pdir)?;
            let mut ndir = w.inode(newparent)?;
            if let Some((rino, mut rinode)) = replaced {
                w.dir_remove(newparent, &mut ndir, newname)?;
                if rinode.is_dir() {
                    rinode.nlink = 0;
                    ndir.nlink = ndir.nlink.saturating_sub(1);
                } else {
                    rinode.nlink = rinode.nlink.saturating_sub(1);
                }
                touch_c(&mut rinode, now);
                self.drop_link(w, rino, &rinode)?;
            }
            w.dir_add(newparent, &mut ndir, newname, src.ino, src.dtype)?;
            if src_inode.is_dir() && parent != newparent {
                ndir.nlink += 1;
            }
            w.put_inode(newparent, &ndir)?;
            src_inode.parent = newparent;
            touch_c(&mut src_inode, now);
            w.put_inode(src.ino, &src_inode)
        })
    }

    pub fn setattr(&self, ino: u64, a: SetAttr) -> Result<Attr> {
        let shrinking = a.size.is_some();
        self.mutate(shrinking, |w| {
            let mut inode = w.inode(ino)?;
            let now = w.now;
            if let Some(mode) = a.mode {
                inode.mode = (inode.mode & libc::S_IFMT) | (mode & 0o7777);
            }
            if let Some(uid) = a.uid {
                inode.uid = uid;
            }
            if let Some(gid) = a.gid {
                inode.gid = gid;
            }
            if let Some(size) = a.size {
                if inode.is_dir() {
                    return posix(libc::EISDIR);
                }
                if !inode.is_reg() {
                    return posix(libc::EINVAL);
                }
                if size > MAX_FILE_SIZE {
                    return posix(libc::EFBIG);
                }
                if size < inode.size {
                    // Everything past the new end goes, fallocated KEEP_SIZE blocks included, so
                    // the tail of the last page reads as zeros if the file grows again.
                    punch_range(&mut w.tx, &mut inode, size, MAX_FILE_SIZE)?;
                    inode.flags &= !INODE_BLOCKS_PAST_EOF;
                }
                inode.size = size;
                touch_mc(&mut inode, now);
            }
            if let Some(t) = a.atime {
                set_time(&mut inode.atime_s, &mut inode.atime_ns, t);
            }
            if let Some(t) = a.mtime {
                set_time(&mut inode.mtime_s, &mut inode.mtime_ns, t);
            }
            touch_c(&mut inode, a.ctime.unwrap_or(now));
            w.put_inode(ino, &inode)?;
            Ok(Attr { ino, inode })
        })
    }

    /// Reads up to `size` bytes at `off` (short at end of file or before a damaged page).
    pub fn read_file(&self, ino: u64, off: u64, size: u32) -> Result<Vec<u8>> {
        let inner = self.inner.lock();
        let inode = read_inode(&self.region, inner.root.inodes, ino)?;
        if inode.is_dir() {
            return posix(libc::EISDIR);
        }
        if off >= inode.size {
            return Ok(Vec::new());
        }
        let len = (size as u64).min(inode.size - off) as usize;
        let mut out = vec![0u8; len];
        match read_tree(&self.region, data_tree(&inode), off, &mut out) {
            Ok(n) => {
                if n < len {
                    let path = self.path_of_locked(&inner, ino);
                    error!(ino, %path, offset = off + n as u64, "damaged data page: the read stops before it");
                }
                out.truncate(n);
                Ok(out)
            }
            Err(e) => {
                error!(ino, path = %self.path_of_locked(&inner, ino), offset = off, error = %e, "read of damaged data");
                Err(e)
            }
        }
    }

    pub fn write_file(&self, ino: u64, off: u64, data: &[u8]) -> Result<u32> {
        let end = off.checked_add(data.len() as u64).ok_or(Error::Posix(libc::EFBIG))?;
        if end > MAX_FILE_SIZE {
            return posix(libc::EFBIG);
        }
        self.mutate(false, |w| {
            let mut inode = w.inode(ino)?;
            if !inode.is_reg() {
                return posix(libc::EINVAL);
            }
            write_data(&mut w.tx, &mut inode, off, data)?;
            inode.size = inode.size.max(end);
            touch_mc(&mut inode, w.now);
            w.put_inode(ino, &inode)?;
            Ok(data.len() as u32)
        })
    }

    pub fn fallocate(&self, ino: u64, off: u64, len: u64, mode: i32) -> Result<()> {
        let end = off.checked_add(len).ok_or(Error::Posix(libc::EFBIG))?;
        if len == 0 {
            return posix(libc::EINVAL);
        }
        let keep = mode & FALLOC_KEEP_SIZE != 0;
        let punch = mode & FALLOC_PUNCH_HOLE != 0;
        let zero = mode & FALLOC_ZERO_RANGE != 0;
        if mode & !(FALLOC_KEEP_SIZE | FALLOC_PUNCH_HOLE | FALLOC_ZERO_RANGE) != 0 || (punch && (!keep || zero)) {
            return posix(libc::EOPNOTSUPP);
        }
        if end > MAX_FILE_SIZE {
            return posix(libc::EFBIG);
        }
        self.mutate(punch, |w| {
            let mut inode = w.inode(ino)?;
            if inode.is_dir() {
                return posix(libc::EISDIR);
            }
            if !inode.is_reg() {
                return posix(libc::ENODEV);
            }
            if punch {
                punch_range(&mut w.tx, &mut inode, off, end)?;
            } else {
                allocate_range(&mut w.tx, &mut inode, off, end, zero)?;
                if !keep {
                    inode.size = inode.size.max(end);
                } else if end > inode.size {
                    inode.flags |= INODE_BLOCKS_PAST_EOF;
                }
            }
            touch_mc(&mut inode, w.now);
            w.put_inode(ino, &inode)
        })
    }

    /// SEEK_DATA / SEEK_HOLE.
    pub fn seek(&self, ino: u64, off: u64, whence: i32) -> Result<u64> {
        self.read(|r, t, _| {
            let inode = read_inode(r, t, ino)?;
            if off >= inode.size {
                return posix(libc::ENXIO);
            }
            let tr = data_tree(&inode);
            match whence {
                libc::SEEK_DATA => match tree::next_mapped(r, tr, page_of(off))? {
                    Some(p) => {
                        let pos = off.max(p << BLOCK_SHIFT);
                        if pos >= inode.size {
                            posix(libc::ENXIO)
                        } else {
                            Ok(pos)
                        }
                    }
                    None => posix(libc::ENXIO),
                },
                libc::SEEK_HOLE => {
                    let p = tree::next_hole(r, tr, page_of(off))?;
                    Ok(off.max(p << BLOCK_SHIFT).min(inode.size))
                }
                _ => posix(libc::EINVAL),
            }
        })
    }

    /// copy_file_range: copies bytes (no sharing: every block has exactly one owner).
    pub fn copy_range(&self, src: u64, src_off: u64, dst: u64, dst_off: u64, len: u64) -> Result<u64> {
        let src_inode = self.getattr(src)?.inode;
        if !src_inode.is_reg() || !self.getattr(dst)?.inode.is_reg() {
            return posix(libc::EINVAL);
        }
        if src_off >= src_inode.size {
            return Ok(0);
        }
        // Bounded per call; callers (the kernel, cp) loop on short copies.
        let n = len.min(src_inode.size - src_off).min(16 << 20);
        let data = self.read_file(src, src_off, n as u32)?;
        self.write_file(dst, dst_off, &data)?;
        Ok(data.len() as u64)
    }

    /// Directory entries from offset `off` (0 = start; "." and ".." come first).
    pub fn readdir(&self, ino: u64, off: u64, max: usize) -> Result<Vec<ReaddirEntry>> {
        self.read(|r, t, _| {
            let dir = read_inode(r, t, ino)?;
            if !dir.is_dir() {
                return posix(libc::ENOTDIR);
            }
            let mut out = Vec::new();
            if off == 0 {
                out.push(ReaddirEntry { ino, next: 1, dtype: libc::DT_DIR, name: b".".to_vec() });
            }
            if off <= 1 {
                out.push(ReaddirEntry { ino: dir.parent, next: 2, dtype: libc::DT_DIR, name: b"..".to_vec() });
            }
            let first_slot = off.saturating_sub(2);
            let mut buf: Block = [0; BLOCK_SIZE];
            let mut reached = 0;
            let last_page = page_of(dir.size.max(1) - 1);
            let res = tree::for_each_mapped(r, data_tree(&dir), first_slot / DIRENTS_PER_BLOCK, last_page, &mut reached, &mut |page, ptr| {
                if out.len() >= max {
                    return Ok(());
                }
                read_verified(r, ptr, &mut buf, &|| format!("directory page {page} of inode {ino}"))?;
                for s in 0..DIRENTS_PER_BLOCK {
                    let slot = page * DIRENTS_PER_BLOCK + s;
                    if slot < first_slot || out.len() >= max {
                        continue;
                    }
                    let o = s as usize * DIRENT_SIZE;
                    let e = DirentSlot::read_from_bytes(&buf[o..o + DIRENT_SIZE]).expect("slot");
                    if e.ino != 0 {
                        out.push(ReaddirEntry { ino: e.ino, next: slot + 3, dtype: e.dtype, name: e.name().to_vec() });
                    }
                }
                Ok(())
            });
            match res {
                Ok(()) => Ok(out),
                Err(e) if !out.is_empty() => {
                    error!(ino, error = %e, "directory listing stops at a damaged block");
                    Ok(out)
                }
                Err(e) => Err(e),
            }
        })
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        self.read(|r, t, _| {
            let inode = read_inode(r, t, ino)?;
            load_xattrs(r, &inode)?
                .into_iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v)
                .ok_or(Error::Posix(libc::ENODATA))
        })
    }

    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>> {
        self.read(|r, t, _| {
            let inode = read_inode(r, t, ino)?;
            let mut out = Vec::new();
            for (n, _) in load_xattrs(r, &inode)? {
                out.extend_from_slice(&n);
                out.push(0);
            }
            Ok(out)
        })
    }

    pub fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        if name.is_empty() || name.len() > 255 {
            return posix(libc::ERANGE);
        }
        if value.len() > XATTR_SIZE_MAX {
            return posix(libc::E2BIG);
        }
        self.mutate(false, |w| {
            let mut inode = w.inode(ino)?;
            let mut list = load_xattrs(w.region(), &inode)?;
            let pos = list.iter().position(|(n, _)| n == name);
            match (pos, flags) {
                (Some(_), f) if f & libc::XATTR_CREATE != 0 => return posix(libc::EEXIST),
                (None, f) if f & libc::XATTR_REPLACE != 0 => return posix(libc::ENODATA),
                (Some(i), _) => list[i].1 = value.to_vec(),
                (None, _) => list.push((name.to_vec(), value.to_vec())),
            }
            let names: usize = list.iter().map(|(n, _)| n.len() + 1).sum();
            if names > XATTR_LIST_MAX || list.len() > 4096 {
                return posix(libc::ENOSPC);
            }
            store_xattrs(&mut w.tx, &mut inode, &list)?;
            touch_c(&mut inode, w.now);
            w.put_inode(ino, &inode)
        })
    }

    pub fn removexattr(&self, ino: u64, name: &[u8]) -> Result<()> {
        self.mutate(true, |w| {
            let mut inode = w.inode(ino)?;
            let mut list = load_xattrs(w.region(), &inode)?;
            let Some(i) = list.iter().position(|(n, _)| n == name) else { return posix(libc::ENODATA) };
            list.remove(i);
            store_xattrs(&mut w.tx, &mut inode, &list)?;
            touch_c(&mut inode, w.now);
            w.put_inode(ino, &inode)
        })
    }

    pub fn usage(&self) -> Usage {
        let inner = self.inner.lock();
        Usage {
            pool_blocks: inner.alloc.pool_blocks(),
            free_blocks: inner.alloc.free_blocks() + inner.alloc.pending_blocks(),
            available_blocks: inner.alloc.available(),
            pending_blocks: inner.alloc.pending_blocks(),
            inodes: inner.root.n_inodes,
            generation: inner.root.gen,
        }
    }

    /// A path for messages ("/a/b" or "inode N" when it cannot be named).
    pub fn path_of(&self, ino: u64) -> String {
        let guard = self.inner.lock();
        self.path_of_locked(&guard, ino)
    }

    fn path_of_locked(&self, inner: &Inner, ino: u64) -> String {
        let mut parts: Vec<String> = Vec::new();
        let mut cur = ino;
        for _ in 0..256 {
            if cur == ROOT_INO {
                parts.reverse();
                return format!("/{}", parts.join("/"));
            }
            let Ok(inode) = read_inode(&self.region, inner.root.inodes, cur) else { break };
            let Ok(parent) = read_inode(&self.region, inner.root.inodes, inode.parent) else { break };
            let Ok(idx) = build_dir_index(&self.region, &parent) else { break };
            let Some(name) = idx.names.iter().find(|(_, e)| e.ino == cur).map(|(n, _)| String::from_utf8_lossy(n).into_owned())
            else {
                break;
            };
            parts.push(name);
            cur = inode.parent;
        }
        format!("inode {ino}")
    }

    /// Pool blocks the committed trees reference (tests pick corruption targets from these).
    pub fn referenced_blocks(&self) -> Vec<u32> {
        let inner = self.inner.lock();
        (FIRST_POOL_BLOCK..(self.sb.n_blocks as u32 - 1)).filter(|&b| inner.alloc.is_used(b)).collect()
    }

    /// The committed inode tree (fsck).
    pub(crate) fn inode_tree(&self) -> Tree {
        self.inner.lock().root.inodes
    }

    /// fsck --repair: drops a directory entry whose target is gone or unreadable.
    pub(crate) fn repair_drop_entry(&self, dir: u64, name: &[u8]) -> Result<()> {
        self.mutate(true, |w| {
            let mut d = w.inode(dir)?;
            w.dir_remove(dir, &mut d, name)?;
            w.put_inode(dir, &d)
        })
    }

    /// fsck --repair: sets an inode's link count and block count to what the walk found.
    pub(crate) fn repair_counts(&self, ino: u64, nlink: u32, blocks: u64) -> Result<()> {
        self.mutate(true, |w| {
            let mut i = w.inode(ino)?;
            i.nlink = nlink;
            i.blocks = blocks;
            w.put_inode(ino, &i)
        })
    }
}

/// What `rpramfs info` shows: read from the superblock and the newest commit record only, so
/// it works while the region is mounted (both are CRC-checked and written atomically).
#[derive(Clone, Debug)]
pub struct Info {
    pub sb: Superblock,
    pub generation: u64,
    pub clean: bool,
    pub used_blocks: u64,
    pub pool_blocks: u64,
    pub inodes: u64,
    pub last_commit_ns: u64,
    pub owner: Option<String>,
    pub report: MountReport,
}

pub fn inspect(region: &Region) -> Result<Info> {
    let mut report = MountReport::default();
    let sb = read_superblock(region, &mut report)?;
    let (root, clean) = pick_commit(region, &sb, &mut report)?;
    let mut buf = [0u8; COMMIT_RECORD_SIZE];
    region.read_into(RING_A.offset().add((root.gen % RING_SLOTS) * COMMIT_RECORD_SIZE as u64), &mut buf)?;
    let rec = CommitRecord::read_from_bytes(&buf).expect("record size");
    let (used, time) = if rec.valid(&sb.uuid) && rec.gen == root.gen { (rec.used_blocks, rec.time_ns) } else { (0, 0) };
    Ok(Info {
        pool_blocks: Allocator::new(sb.n_blocks as u32).pool_blocks(),
        sb,
        generation: root.gen,
        clean,
        used_blocks: used,
        inodes: root.n_inodes,
        last_commit_ns: time,
        owner: owner::read(region).map(|o| o.describe()),
        report,
    })
}

fn new_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut u);
    }
    if u == [0; 16] {
        u[..8].copy_from_slice(&now().0.to_le_bytes());
        u[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    }
    u
}

/// Makes the transaction's blocks durable, then publishes `root` with a new commit record in both
/// rings (each copy fenced), then makes the record durable.
fn write_commit(region: &Region, sb: &Superblock, root: &Root, used: u64, flags: u8, fresh: &[u32]) -> Result<()> {
    if region.kind() == crate::region::RegionKind::BlockDevice && !fresh.is_empty() {
        let mut blocks = fresh.to_vec();
        blocks.sort_unstable();
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for b in blocks {
            let off = (b as u64) << BLOCK_SHIFT;
            match ranges.last_mut() {
                Some((s, l)) if *s + *l == off => *l += BLOCK_SIZE as u64,
                _ => ranges.push((off, BLOCK_SIZE as u64)),
            }
        }
        region.flush(&ranges)?;
    }
    let mut rec = CommitRecord::new_zeroed();
    rec.magic = COMMIT_MAGIC;
    rec.gen = root.gen;
    rec.uuid = sb.uuid;
    rec.inode_root = root.inodes.ptr;
    rec.inode_height = root.inodes.height;
    rec.flags = flags;
    rec.next_ino = root.next_ino;
    rec.used_blocks = used;
    rec.n_inodes = root.n_inodes;
    rec.time_ns = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    rec.seal();
    let slot = (root.gen % RING_SLOTS) * COMMIT_RECORD_SIZE as u64;
    region.fence();
    region.write(RING_A.offset().add(slot), rec.as_bytes())?;
    region.fence();
    region.write(RING_B.offset().add(slot), rec.as_bytes())?;
    region.fence();
    region.flush(&[(RING_A.offset().0, 2 * BLOCK_SIZE as u64)])
}

fn read_superblock(region: &Region, report: &mut MountReport) -> Result<Superblock> {
    let n_blocks = region.len() / BLOCK_SIZE as u64;
    let read_at = |b: u64| -> Option<Superblock> {
        let mut buf = vec![0u8; std::mem::size_of::<Superblock>()];
        region.read_into(ByteOffset(b << BLOCK_SHIFT), &mut buf).ok()?;
        Superblock::read_from_bytes(&buf).ok()
    };
    let a = read_at(0);
    // The copy sits in the last block of the region the file system was made on.
    let b = a.filter(|s| s.magic == MAGIC && s.crc_ok()).map(|s| s.n_blocks).and_then(|n| if n <= n_blocks { read_at(n - 1) } else { None });
    let b = b.or_else(|| read_at(n_blocks - 1));
    let ok = |s: &Option<Superblock>| s.filter(|s| s.magic == MAGIC && s.crc_ok());
    let sb = match (ok(&a), ok(&b)) {
        (Some(a), Some(b)) => {
            if a.as_bytes() != b.as_bytes() {
                report.errors.push("superblock copies differ; using the first".into());
            }
            a
        }
        (Some(a), None) => {
            report.errors.push(format!("superblock copy in block {} is damaged; the first copy is intact", a.n_blocks - 1));
            a
        }
        (None, Some(b)) => {
            report.errors.push("superblock in block 0 is damaged; using the copy in the last block".into());
            b
        }
        (None, None) => {
            let has_magic = a.map(|s| s.magic == MAGIC).unwrap_or(false) || b.map(|s| s.magic == MAGIC).unwrap_or(false);
            if has_magic {
                return Err(Error::corrupt(0, format!("both superblocks of {} fail their CRC", region.name())));
            }
            return Err(Error::NoFilesystem { path: region.name().into() });
        }
    };
    if sb.version != FORMAT_VERSION {
        return Err(Error::UnsupportedVersion { path: region.name().into(), found: sb.version, supported: FORMAT_VERSION });
    }
    if sb.region_size != region.len() || sb.block_size as usize != BLOCK_SIZE || sb.n_blocks != n_blocks {
        let phys = if sb.phys_offset != 0 { format!(" at physical offset {:#x}", sb.phys_offset) } else { String::new() };
        return Err(Error::GeometryMismatch { path: region.name().into(), region_bytes: region.len(), sb_bytes: sb.region_size, phys });
    }
    Ok(sb)
}

/// The newest commit record (in either ring copy) whose inode tree root verifies.
fn pick_commit(region: &Region, sb: &Superblock, report: &mut MountReport) -> Result<(Root, bool)> {
    let mut recs: Vec<(CommitRecord, &'static str, u64)> = Vec::new();
    for (ring, name) in [(RING_A, "A"), (RING_B, "B")] {
        let mut buf: Block = [0; BLOCK_SIZE];
        region.read_into(ring.offset(), &mut buf)?;
        for s in 0..RING_SLOTS {
            let o = s as usize * COMMIT_RECORD_SIZE;
            let rec = CommitRecord::read_from_bytes(&buf[o..o + COMMIT_RECORD_SIZE]).expect("record size");
            if rec.valid(&sb.uuid) && rec.gen % RING_SLOTS == s {
                recs.push((rec, name, s));
            } else if buf[o..o + COMMIT_RECORD_SIZE].iter().any(|&b| b != 0) {
                report.notes.push(format!("commit ring {name} slot {s} does not verify (an interrupted commit, or damage)"));
            }
        }
    }
    recs.sort_by(|a, b| b.0.gen.cmp(&a.0.gen));
    let newest = recs.first().map(|r| r.0.gen);
    if let Some(g) = newest {
        let copies = recs.iter().filter(|r| r.0.gen == g).count();
        if copies < 2 {
            report.notes.push(format!("newest commit (generation {g}) has one intact copy of two"));
        }
    }
    // The newest valid record is the file system. Falling back to an older one would silently
    // serve older bytes; a damaged tree root is reported instead and reads under it fail.
    if let Some((rec, ring, slot)) = recs.first() {
        if rec.inode_height > MAX_HEIGHT {
            return Err(Error::corrupt(RING_A.0, format!("commit generation {} (ring {ring} slot {slot}) has an impossible tree height", rec.gen)));
        }
        let t = Tree { ptr: rec.inode_root, height: rec.inode_height };
        let mut b: Block = [0; BLOCK_SIZE];
        if t.is_empty() || read_verified(region, t.ptr, &mut b, &String::new).is_err() {
            report.errors.push(format!(
                "the inode table root (block {}) of commit generation {} is damaged (CRC mismatch): the file system is unreadable; \
                 the mount is read-only; keep the region and ask for help before writing to it",
                rec.inode_root.blk, rec.gen
            ));
            report.metadata_damage = true;
        }
        let root = Root { gen: rec.gen, inodes: t, next_ino: rec.next_ino, n_inodes: rec.n_inodes };
        return Ok((root, rec.flags & COMMIT_CLEAN != 0));
    }
    Err(Error::corrupt(RING_A.0, format!("no usable commit record in {} (both rings damaged)", region.name())))
}

/// Walks every tree from the committed root: rebuilds the allocator, counts inodes, collects
/// orphans and reports damage. Metadata CRCs are checked; data blocks are not read.
fn mount_walk(region: &Region, sb: &Superblock, root: &Root, report: &mut MountReport) -> Allocator {
    let mut alloc = Allocator::new(sb.n_blocks as u32);
    let mark = |alloc: &mut Allocator, report: &mut MountReport, b: u32, what: &dyn Fn() -> String| {
        if b as u64 >= sb.n_blocks || b < FIRST_POOL_BLOCK || b as u64 == sb.n_blocks - 1 {
            report.errors.push(format!("{}: block pointer {b} is outside the pool", what()));
        } else if !alloc.mark_used(b) {
            report.errors.push(format!("{}: block {b} is referenced twice (cross-link)", what()));
        }
    };
    let mut inode_blocks: Vec<(u64, BlkPtr)> = Vec::new();
    tree::walk(region, root.inodes, &mut |v| match v {
        Visit::Node { ptr, ok } => {
            mark(&mut alloc, report, ptr.blk, &|| "inode table node".into());
            if !ok {
                report.errors.push(format!("inode table node in block {} is damaged (CRC mismatch): some inodes are unreadable", ptr.blk));
                report.metadata_damage = true;
            }
        }
        Visit::Data { page, ptr } => {
            mark(&mut alloc, report, ptr.blk, &|| format!("inode block {page}"));
            inode_blocks.push((page, ptr));
        }
        Visit::Unverified { ptr } => {
            let _ = alloc.mark_used(ptr.blk);
        }
    });
    let mut count = 0u64;
    for (page, ptr) in inode_blocks {
        let mut buf: Block = [0; BLOCK_SIZE];
        if read_verified(region, ptr, &mut buf, &|| String::new()).is_err() {
            report.metadata_damage = true;
            report.errors.push(format!(
                "inode block in block {} (inodes {}..{}) is damaged (CRC mismatch): those inodes read as EIO",
                ptr.blk,
                page * INODES_PER_BLOCK,
                page * INODES_PER_BLOCK + INODES_PER_BLOCK - 1
            ));
            continue;
        }
        for s in 0..INODES_PER_BLOCK {
            let o = s as usize * INODE_SIZE;
            let inode = Inode::read_from_bytes(&buf[o..o + INODE_SIZE]).expect("inode size");
            if inode.is_free() {
                continue;
            }
            let ino = page * INODES_PER_BLOCK + s;
            count += 1;
            if let Err(e) = validate_inode(ino, &inode, ptr.blk) {
                report.errors.push(e.to_string());
                report.metadata_damage = true;
                continue;
            }
            if inode.nlink == 0 {
                report.orphans.push(ino);
            }
            for (t, what) in [(data_tree(&inode), "data"), (xattr_tree(&inode), "xattr")] {
                if t.height > MAX_HEIGHT {
                    report.errors.push(format!("inode {ino}: {what} tree height {} is impossible", t.height));
                    continue;
                }
                tree::walk(region, t, &mut |v| match v {
                    Visit::Node { ptr, ok } => {
                        mark(&mut alloc, report, ptr.blk, &|| format!("inode {ino} {what} node"));
                        if !ok {
                            report.errors.push(format!(
                                "inode {ino}: {what} tree node in block {} is damaged (CRC mismatch): reads of the range it maps return EIO",
                                ptr.blk
                            ));
                        }
                    }
                    Visit::Data { page, ptr } => mark(&mut alloc, report, ptr.blk, &|| format!("inode {ino} {what} page {page}")),
                    Visit::Unverified { ptr } => {
                        let _ = alloc.mark_used(ptr.blk);
                    }
                });
            }
        }
    }
    if count != root.n_inodes {
        report.notes.push(format!("commit record counts {} inodes, the walk found {count}", root.n_inodes));
    }
    report.inodes = count;
    alloc
}
