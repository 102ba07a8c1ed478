//! Finding the file system in a region: superblocks, the commit rings, the mount walk that
//! rebuilds the allocator and finds damage, and writing commit records.

use std::time::{SystemTime, UNIX_EPOCH};

use zerocopy::{FromBytes, FromZeros, IntoBytes};

use super::{data_tree, now, xattr_tree, MountReport, Root};
use crate::alloc::Allocator;
use crate::error::{Error, Result};
use crate::layout::*;
use crate::owner;
use crate::region::Region;
use crate::tree::{self, Tree, Visit};
use crate::tx::{read_verified, Block};
use super::storage::validate_inode;

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
    region.read_into(RING_A.offset().plus((root.gen % RING_SLOTS) * COMMIT_RECORD_SIZE as u64), &mut buf)?;
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

pub(super) fn new_uuid() -> [u8; 16] {
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
pub(super) fn write_commit(region: &Region, sb: &Superblock, root: &Root, used: u64, flags: u8, fresh: &[u32]) -> Result<()> {
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
    region.write(RING_A.offset().plus(slot), rec.as_bytes())?;
    region.fence();
    region.write(RING_B.offset().plus(slot), rec.as_bytes())?;
    region.fence();
    region.flush(&[(RING_A.offset().0, 2 * BLOCK_SIZE as u64)])
}

pub(super) fn read_superblock(region: &Region, report: &mut MountReport) -> Result<Superblock> {
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
pub(super) fn pick_commit(region: &Region, sb: &Superblock, report: &mut MountReport) -> Result<(Root, bool)> {
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
    recs.sort_by_key(|r| std::cmp::Reverse(r.0.gen));
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
pub(super) fn mount_walk(region: &Region, sb: &Superblock, root: &Root, report: &mut MountReport) -> Allocator {
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
