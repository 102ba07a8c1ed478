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
use crate::tree::{self, Tree};
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
    /// Blocks handed to direct writers and not yet committed (see [`lease`]).
    leases: lease::Leases,
}

pub struct Fs {
    region: Region,
    sb: Superblock,
    read_only: bool,
    inner: Mutex<Inner>,
    hints: Hints,
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

pub mod crc_hint;
pub mod lease;
mod mount;
mod storage;

pub use mount::{inspect, Info};
pub(crate) use storage::{build_dir_index, read_inode};
use crc_hint::{Hinted, Hints, HINT_FORMAT, HINT_XATTR};
use mount::*;
use storage::*;

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
            inner: Mutex::new(Inner { root, alloc, dirs: HashMap::new(), lookups: HashMap::new(), leases: Default::default() }),
            hints: Hints::default(),
        };
        if !read_only {
            owner::write(&fs.region, Some(&Owner::current(&opts.what)))?;
            fs.mutate(true, |w| {
                for &ino in &report.orphans {
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
        let used = inner.alloc.used_blocks() - inner.leases.blocks;
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
    fn mutate<R>(&self, may_use_reserve: bool, mut f: impl FnMut(&mut Work<'_>) -> Result<R>) -> Result<R> {
        if self.read_only {
            return posix(libc::EROFS);
        }
        let mut guard = self.inner.lock();
        match self.mutate_locked(&mut guard, may_use_reserve, &mut f) {
            // Blocks freed by the last commits are held back until two more generations exist;
            // when they are what is missing, write those generations and try once more.
            Err(Error::NoSpace) if guard.alloc.pending_blocks() > 0 => {
                self.release_deferred(&mut guard)?;
                self.mutate_locked(&mut guard, may_use_reserve, &mut f)
            }
            r => r,
        }
    }

    fn mutate_locked<R>(&self, inner: &mut Inner, may_use_reserve: bool, f: &mut impl FnMut(&mut Work<'_>) -> Result<R>) -> Result<R> {
        let mut tx = Tx::new(&self.region, &mut inner.alloc);
        tx.may_use_reserve = may_use_reserve;
        let mut w = Work { tx, root: inner.root, dirs: &mut inner.dirs, lookups: &inner.lookups, now: now() };
        match f(&mut w) {
            Ok(r) => {
                let Work { tx, root, .. } = w;
                let (fresh, freed) = tx.finish();
                let root = Root { gen: inner.root.gen + 1, ..root };
                // Leased blocks are allocated but belong to no commit yet.
                let used = inner.alloc.used_blocks() - freed.len() as u64 - inner.leases.blocks;
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

    /// Commits unchanged generations until every deferred free is reusable (at most two).
    fn release_deferred(&self, inner: &mut Inner) -> Result<()> {
        while inner.alloc.pending_blocks() > 0 {
            let root = Root { gen: inner.root.gen + 1, ..inner.root };
            write_commit(&self.region, &self.sb, &root, inner.alloc.used_blocks() - inner.leases.blocks, 0, &[])?;
            inner.alloc.committed(root.gen);
            inner.root = root;
        }
        Ok(())
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
        if let std::collections::hash_map::Entry::Vacant(v) = inner.dirs.entry(parent) {
            v.insert(build_dir_index(&self.region, &dir)?);
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
                write_data(&mut w.tx, &mut inode, 0, target, None)?;
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
            w.check_removable(e.ino, &target, rmdir)?;
            w.remove_entry(parent, &mut dir, name, &mut target)?;
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
                w.check_removable(d.ino, &dst_inode, src_inode.is_dir())?;
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
                w.remove_entry(newparent, &mut ndir, newname, &mut rinode)?;
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
        let hinted = self.hints.take(ino, off, data.len());
        if let Some(h) = &hinted {
            let at = (h.first - off) as usize;
            if pagecrc::crc32(&data[at..at + BLOCK_SIZE]) != h.crcs[0] {
                self.hints.forget(ino);
                error!(ino, offset = h.first, "write refused: its data does not match the CRC32 its writer hinted (user.rpramfs.write-crc32)");
                return posix(libc::EIO);
            }
        }
        self.mutate(false, |w| {
            let mut inode = w.inode(ino)?;
            if !inode.is_reg() {
                return posix(libc::EINVAL);
            }
            write_data(&mut w.tx, &mut inode, off, data, hinted.as_ref())?;
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
            if name == HINT_XATTR {
                return Ok(HINT_FORMAT.to_vec());
            }
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
        if name == HINT_XATTR {
            self.getattr(ino)?;
            return self.hints.set(ino, value);
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

    /// Drops the CRC hints given for `ino` (see [`crc_hint`]).
    pub fn forget_crc_hints(&self, ino: u64) {
        self.hints.forget(ino);
    }

    pub fn removexattr(&self, ino: u64, name: &[u8]) -> Result<()> {
        if name == HINT_XATTR {
            self.hints.forget(ino);
            return Ok(());
        }
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

    /// Space figures; deferred frees are released first, so that space freed by a removal is
    /// free at once (a `df` right after `rm` shows it, and a tool checking for room sees it).
    pub fn usage(&self) -> Usage {
        let mut inner = self.inner.lock();
        if !self.read_only && inner.alloc.pending_blocks() > 0 {
            if let Err(e) = self.release_deferred(&mut inner) {
                tracing::warn!("releasing deferred frees: {e}");
            }
        }
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

