//! The on-region format (docs/rpramfs-format.md is the prose version of this file).
//!
//! All integers are little-endian (x86-64 native); every structure is plain bytes (zerocopy), and
//! every pointer inside the region is a block number, never an address.

use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

pub const BLOCK_SIZE: usize = 4096;
pub const BLOCK_SHIFT: u32 = 12;
pub const MAGIC: [u8; 8] = *b"RPRAMFS1";
pub const FORMAT_VERSION: u32 = 1;

/// Block 0 and the last block hold the two superblock copies.
pub const SUPERBLOCK_A: BlockNo = BlockNo(0);
/// Block 1 holds the owner record (who has the region open).
pub const OWNER_BLOCK: BlockNo = BlockNo(1);
/// Blocks 2 and 3 hold two copies of the commit-record ring.
pub const RING_A: BlockNo = BlockNo(2);
pub const RING_B: BlockNo = BlockNo(3);
pub const FIRST_POOL_BLOCK: u32 = 4;
pub const RING_SLOTS: u64 = (BLOCK_SIZE / COMMIT_RECORD_SIZE) as u64;
pub const COMMIT_RECORD_SIZE: usize = 128;
pub const COMMIT_MAGIC: u32 = u32::from_le_bytes(*b"RPCM");
/// Smallest region: superblocks, owner, rings and a little pool.
pub const MIN_REGION_BYTES: u64 = 64 * BLOCK_SIZE as u64;
/// u32 block numbers: 16 TiB.
pub const MAX_REGION_BYTES: u64 = (u32::MAX as u64) << BLOCK_SHIFT;

/// Radix tree fan-out: 512 block pointers per 4 KiB node.
pub const FANOUT: u64 = 512;
pub const FANOUT_SHIFT: u32 = 9;
/// Height 4 covers 2^(12+36) = 2^48 bytes: the x86-64 user address space, with room to spare.
pub const MAX_HEIGHT: u8 = 4;
pub const MAX_FILE_SIZE: u64 = 1 << 48;

pub const INODE_SIZE: usize = 256;
pub const INODES_PER_BLOCK: u64 = (BLOCK_SIZE / INODE_SIZE) as u64;
pub const ROOT_INO: u64 = 1;

pub const DIRENT_SIZE: usize = 272;
pub const DIRENTS_PER_BLOCK: u64 = (BLOCK_SIZE / DIRENT_SIZE) as u64;
pub const NAME_MAX: usize = 255;

/// Inode flag: fallocate(KEEP_SIZE) mapped blocks past the end of file (fsck allows them).
pub const INODE_BLOCKS_PAST_EOF: u32 = 1;

/// Commit record flag: the file system was unmounted cleanly after this commit.
pub const COMMIT_CLEAN: u8 = 1;

/// A block number inside the region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct BlockNo(pub u32);

impl BlockNo {
    pub fn offset(self) -> ByteOffset {
        ByteOffset((self.0 as u64) << BLOCK_SHIFT)
    }
}

/// A byte offset inside the region (never a file offset, never an address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteOffset(pub u64);

impl ByteOffset {
    pub fn plus(self, n: u64) -> ByteOffset {
        ByteOffset(self.0 + n)
    }
}

/// A block pointer: where the child is and the CRC32 of its 4 KiB. The parent vouches for the
/// child (a Merkle tree): since committed blocks never change, a mismatch is real corruption.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct BlkPtr {
    pub blk: u32,
    pub crc: u32,
}

impl BlkPtr {
    pub const NULL: BlkPtr = BlkPtr { blk: 0, crc: 0 };
    pub fn is_null(self) -> bool {
        self.blk == 0
    }
    pub fn block(self) -> BlockNo {
        BlockNo(self.blk)
    }
}

/// Superblock, stored at the start of block 0 and of the last block.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Superblock {
    pub magic: [u8; 8],
    pub version: u32,
    pub block_size: u32,
    pub n_blocks: u64,
    pub region_size: u64,
    /// Physical address the region was made for (pmem resource start), 0 when unknown.
    pub phys_offset: u64,
    pub uuid: [u8; 16],
    pub created_ns: u64,
    pub features: u64,
    pub label: [u8; 48],
    pub crc: u32,
    pub _pad: u32,
}

impl Superblock {
    pub const CRC_COVERS: usize = std::mem::offset_of!(Superblock, crc);
    pub fn compute_crc(&self) -> u32 {
        crc32fast::hash(&self.as_bytes()[..Self::CRC_COVERS])
    }
    pub fn seal(&mut self) {
        self.crc = self.compute_crc();
    }
    pub fn crc_ok(&self) -> bool {
        self.crc == self.compute_crc()
    }
    pub fn label_str(&self) -> String {
        let end = self.label.iter().position(|&b| b == 0).unwrap_or(self.label.len());
        String::from_utf8_lossy(&self.label[..end]).into_owned()
    }
}

/// One slot of the commit-record ring. The valid record with the highest generation is the file
/// system; writing a new one (after a fence) is the only way a change becomes visible.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct CommitRecord {
    pub magic: u32,
    pub crc: u32,
    pub gen: u64,
    pub uuid: [u8; 16],
    pub inode_root: BlkPtr,
    pub inode_height: u8,
    pub flags: u8,
    pub _pad: [u8; 6],
    pub next_ino: u64,
    pub used_blocks: u64,
    pub n_inodes: u64,
    pub time_ns: u64,
    pub _reserved: [u8; 48],
}

impl CommitRecord {
    pub fn compute_crc(&self) -> u32 {
        crc32fast::hash(&self.as_bytes()[8..])
    }
    pub fn seal(&mut self) {
        self.crc = self.compute_crc();
    }
    pub fn valid(&self, uuid: &[u8; 16]) -> bool {
        self.magic == COMMIT_MAGIC && self.crc == self.compute_crc() && &self.uuid == uuid
    }
}

/// An inode: 256 bytes, 16 per block, in a radix tree keyed by inode number.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, PartialEq, Eq)]
#[repr(C)]
pub struct Inode {
    /// File type and permission bits (S_IFMT | 07777); 0 = free slot.
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Data blocks mapped (st_blocks = blocks * 8).
    pub blocks: u64,
    pub atime_s: i64,
    pub mtime_s: i64,
    pub ctime_s: i64,
    pub crtime_s: i64,
    pub atime_ns: u32,
    pub mtime_ns: u32,
    pub ctime_ns: u32,
    pub crtime_ns: u32,
    pub rdev: u32,
    pub flags: u32,
    /// Directory the inode was last linked into (for `..` and for naming it in messages).
    pub parent: u64,
    pub root: BlkPtr,
    pub xattr_root: BlkPtr,
    pub height: u8,
    pub xattr_height: u8,
    pub _pad: [u8; 2],
    pub xattr_len: u32,
    pub generation: u64,
    pub _reserved: [u8; 128],
}

impl Inode {
    pub fn zeroed() -> Inode {
        Inode::new_zeroed()
    }
    pub fn is_free(&self) -> bool {
        self.mode == 0
    }
    pub fn kind(&self) -> u32 {
        self.mode & libc::S_IFMT
    }
    pub fn is_dir(&self) -> bool {
        self.kind() == libc::S_IFDIR
    }
    pub fn is_reg(&self) -> bool {
        self.kind() == libc::S_IFREG
    }
    pub fn is_symlink(&self) -> bool {
        self.kind() == libc::S_IFLNK
    }
    /// File types whose content lives in the data tree.
    pub fn has_data(&self) -> bool {
        self.is_reg() || self.is_dir() || self.is_symlink()
    }
}

/// A directory entry slot: 15 per block in the directory's own radix tree. A slot with ino 0 is
/// free; slots never move, so readdir offsets (the slot index) stay stable across deletions.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DirentSlot {
    pub ino: u64,
    pub name_len: u16,
    /// DT_* type of the target.
    pub dtype: u8,
    pub _pad: [u8; 5],
    pub name: [u8; 256],
}

impl DirentSlot {
    pub fn name(&self) -> &[u8] {
        &self.name[..(self.name_len as usize).min(NAME_MAX)]
    }
}

/// Byte offset of directory slot `i` inside the directory's data.
pub fn dirent_offset(slot: u64) -> u64 {
    (slot / DIRENTS_PER_BLOCK) * BLOCK_SIZE as u64 + (slot % DIRENTS_PER_BLOCK) * DIRENT_SIZE as u64
}

/// How many 4 KiB pages a tree of `height` covers.
pub fn pages_covered(height: u8) -> u64 {
    1u64 << (FANOUT_SHIFT * height as u32)
}

/// The smallest height whose tree covers page index `page`.
pub fn height_for_page(page: u64) -> u8 {
    let mut h = 0;
    while pages_covered(h) <= page {
        h += 1;
    }
    h
}

pub fn dtype_of_mode(mode: u32) -> u8 {
    match mode & libc::S_IFMT {
        libc::S_IFREG => libc::DT_REG,
        libc::S_IFDIR => libc::DT_DIR,
        libc::S_IFLNK => libc::DT_LNK,
        libc::S_IFIFO => libc::DT_FIFO,
        libc::S_IFSOCK => libc::DT_SOCK,
        libc::S_IFCHR => libc::DT_CHR,
        libc::S_IFBLK => libc::DT_BLK,
        _ => libc::DT_UNKNOWN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_the_documented_ones() {
        assert_eq!(std::mem::size_of::<Superblock>(), 128);
        assert_eq!(std::mem::size_of::<CommitRecord>(), COMMIT_RECORD_SIZE);
        assert_eq!(std::mem::size_of::<Inode>(), INODE_SIZE);
        assert_eq!(std::mem::size_of::<DirentSlot>(), DIRENT_SIZE);
        assert_eq!(RING_SLOTS, 32);
        assert_eq!(DIRENTS_PER_BLOCK, 15);
        assert_eq!(pages_covered(MAX_HEIGHT) << BLOCK_SHIFT, MAX_FILE_SIZE);
    }

    #[test]
    fn height_for_page_is_minimal() {
        assert_eq!(height_for_page(0), 0);
        assert_eq!(height_for_page(1), 1);
        assert_eq!(height_for_page(511), 1);
        assert_eq!(height_for_page(512), 2);
        assert_eq!(height_for_page((0x7fff_ffff_0000u64) >> 12), 4);
    }
}
