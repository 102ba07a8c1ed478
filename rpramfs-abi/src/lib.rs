//! The ABI between the rpramfs daemon and the processes that write into it directly (kup's page
//! server, foam-store/src/direct.rs), defined once: both sides build their requests and answers
//! from these types, so a change shows up on both at once, and the layout tests below fail
//! instead of a page being stored at the wrong place. The semantics are rpramfs's
//! (rpramfs/src/fs/lease.rs, rpramfs/src/fs/crc_hint.rs, docs/rpramfs.md).
//!
//! - Direct writes: three ioctls on files of an rpramfs mount. [`IOC_DIRECT_INFO`] answers a
//!   [`DirectInfo`] (how to map the region), [`IOC_LEASE`] takes and answers a [`LeaseArg`]
//!   (fresh blocks for a file, tied to no range of it), [`IOC_COMMIT`] takes a [`CommitArg`]
//!   (those blocks become the file's pages in up to [`MAX_COMMIT_EXTENTS`] extents, with their
//!   CRC32s), so pages scattered one by one cost a round trip per lease, not one per page.
//! - Direct reads: [`IOC_MAP`] takes and answers a [`MapArg`] (the blocks that hold a range of a
//!   file's pages), so a reader that maps the region copies pages out of it without a FUSE read.
//! - CRC hints: `setxattr(file, CRC_HINT_XATTR, encode_crc_hint(offset, crcs))` hands the daemon
//!   the CRC32s of the whole blocks about to be written; `getxattr` of [`CRC_HINT_XATTR`] answers
//!   [`CRC_HINT_FORMAT`] on rpramfs only.
//!
//! Every layout is little-endian and unaligned (its fields are zerocopy's byte-order types), so
//! an argument can be read from any buffer the kernel hands over, and the bytes are the same on
//! every host. The kernel copies exactly `_IOC_SIZE(request)` bytes each way for these FUSE
//! ioctls, so each request number carries the size of its layout ([`ioc_size`]).
//!
//! ```
//! use rpramfs_abi::{ioc_size, CommitArg, Extent, LeaseArg, IOC_LEASE, MAX_LEASE_BLOCKS};
//!
//! // kup asks for 8 blocks ...
//! let mut arg = LeaseArg::request(8);
//! assert_eq!(ioc_size(IOC_LEASE), size_of::<LeaseArg>());
//! // ... (ioctl(fd, IOC_LEASE, &mut arg)) and rpramfs answers with the lease's id and its blocks.
//! let answer = LeaseArg::answer(7, &[40, 41, 42, 43, 44, 45, 46, 47]);
//! assert_eq!(answer.blocks().unwrap().collect::<Vec<_>>(), (40..48).collect::<Vec<_>>());
//! assert!(LeaseArg::request(MAX_LEASE_BLOCKS as u32 + 1).blocks().is_none());
//! // kup filled 3 of them: 1 page for offset 1 MiB, 2 for 3 MiB (blocks 40, then 41 and 42).
//! let commit = CommitArg::new(7, &[Extent::new(1 << 20, 1), Extent::new(3 << 20, 2)], [11, 12, 13].into_iter()).unwrap();
//! assert_eq!(commit.extents().unwrap().map(|e| (e.off.get(), e.n.get())).collect::<Vec<_>>(), [(1 << 20, 1), (3 << 20, 2)]);
//! ```

use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The ioctl type byte of rpramfs's requests.
pub const IOC_MAGIC: u8 = b'R';
/// Version of the direct-write layouts, the first word of the DIRECT_INFO answer. A writer that
/// finds another version does not write directly.
pub const DIRECT_VERSION: u32 = 3;
/// Largest lease (4 MiB of 4 KiB blocks): the room for block numbers and CRCs in [`LeaseArg`]
/// and [`CommitArg`].
pub const MAX_LEASE_BLOCKS: usize = 1024;
/// Most extents one commit carries (the argument must stay below `_IOC_SIZE`'s 16 KiB).
pub const MAX_COMMIT_EXTENTS: usize = 512;

/// The DIRECT_INFO answer: how a writer maps the region (open `/proc/<pid>/fd/<fd>`, the very
/// object the daemon maps, and map `region_len` bytes of it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct DirectInfo {
    /// [`DIRECT_VERSION`].
    pub version: U32,
    pub block_size: U32,
    pub region_len: U64,
    /// The daemon's pid and the descriptor it holds the region on.
    pub pid: U32,
    pub fd: U32,
    /// [`MAX_LEASE_BLOCKS`].
    pub max_lease_blocks: U32,
    pub reserved: U32,
}

/// The LEASE argument. In: `n` (blocks wanted, at most [`MAX_LEASE_BLOCKS`]); out: the lease's
/// `id` (what the commit names), `n` and the first `n` entries of `blocks`.
#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct LeaseArg {
    pub id: U64,
    pub n: U32,
    pub reserved: U32,
    pub blocks: [U32; MAX_LEASE_BLOCKS],
}

/// `n` pages of a file from the block-aligned offset `off` on.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct Extent {
    pub off: U64,
    pub n: U32,
    pub reserved: U32,
}

/// The COMMIT argument: the first `k` blocks of lease `id` become the file's pages, taken in order
/// by the first `extents` entries of `extent` (ascending, not overlapping; their `n` add up to
/// `k`), with the CRC32s in the first `k` entries of `crcs`.
#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct CommitArg {
    pub id: U64,
    pub extents: U32,
    pub k: U32,
    pub extent: [Extent; MAX_COMMIT_EXTENTS],
    pub crcs: [U32; MAX_LEASE_BLOCKS],
}

/// The MAP argument. In: `off` (block-aligned) and `n` (pages wanted, at most
/// [`MAX_LEASE_BLOCKS`]); out: `n` as asked and, in the first `n` entries of `blocks`, the block
/// that holds each of those pages of the file (0: none, a hole or past the end). Blocks move when a
/// file is written, so what a reader copies from them is vouched for by its own CRCs only.
#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct MapArg {
    pub off: U64,
    pub n: U32,
    pub reserved: U32,
    pub blocks: [U32; MAX_LEASE_BLOCKS],
}

pub const INFO_SIZE: usize = size_of::<DirectInfo>();
pub const LEASE_SIZE: usize = size_of::<LeaseArg>();
pub const COMMIT_SIZE: usize = size_of::<CommitArg>();
pub const MAP_SIZE: usize = size_of::<MapArg>();

// The generic ioctl number encoding (include/uapi/asm-generic/ioctl.h); powerpc, mips, sparc and
// alpha use other widths for `dir` and `size`.
#[cfg(not(any(
    target_arch = "x86_64",
    target_arch = "x86",
    target_arch = "aarch64",
    target_arch = "arm",
    target_arch = "riscv64",
    target_arch = "riscv32",
    target_arch = "loongarch64",
    target_arch = "s390x"
)))]
compile_error!("rpramfs-abi encodes ioctl numbers as asm-generic/ioctl.h does; this architecture encodes them otherwise");

const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;
const IOC_SIZEBITS: u32 = 14;
const IOC_SIZESHIFT: u32 = 16;
const IOC_DIRSHIFT: u32 = 30;

/// `_IOC(dir, IOC_MAGIC, nr, size)`.
const fn ioc(dir: u32, nr: u8, size: usize) -> u32 {
    assert!(size < 1 << IOC_SIZEBITS, "an ioctl argument larger than _IOC_SIZE can say");
    (dir << IOC_DIRSHIFT) | ((size as u32) << IOC_SIZESHIFT) | ((IOC_MAGIC as u32) << 8) | nr as u32
}

/// `_IOC_SIZE(request)`: the bytes the kernel copies for the request.
pub const fn ioc_size(request: u32) -> usize {
    ((request >> IOC_SIZESHIFT) & ((1 << IOC_SIZEBITS) - 1)) as usize
}

/// `_IOR('R', 0x40, DirectInfo)`.
pub const IOC_DIRECT_INFO: u32 = ioc(IOC_READ, 0x40, INFO_SIZE);
/// `_IOWR('R', 0x41, LeaseArg)`.
pub const IOC_LEASE: u32 = ioc(IOC_READ | IOC_WRITE, 0x41, LEASE_SIZE);
/// `_IOW('R', 0x42, CommitArg)`.
pub const IOC_COMMIT: u32 = ioc(IOC_WRITE, 0x42, COMMIT_SIZE);
/// `_IOWR('R', 0x43, MapArg)`: direct reads (a daemon without it answers ENOTTY).
pub const IOC_MAP: u32 = ioc(IOC_READ | IOC_WRITE, 0x43, MAP_SIZE);

impl DirectInfo {
    /// The answer of a daemon at this layout version.
    pub fn new(block_size: u32, region_len: u64, pid: u32, fd: u32) -> DirectInfo {
        DirectInfo {
            version: DIRECT_VERSION.into(),
            block_size: block_size.into(),
            region_len: region_len.into(),
            pid: pid.into(),
            fd: fd.into(),
            max_lease_blocks: (MAX_LEASE_BLOCKS as u32).into(),
            reserved: 0.into(),
        }
    }

    /// All zeros (what a writer hands the kernel to fill).
    pub fn zeroed() -> DirectInfo {
        FromZeros::new_zeroed()
    }

    /// Whether a writer built from this crate understands the answer.
    pub fn is_current(&self) -> bool {
        self.version.get() == DIRECT_VERSION && self.max_lease_blocks.get() as usize == MAX_LEASE_BLOCKS
    }
}

impl LeaseArg {
    /// A request for `n` blocks.
    pub fn request(n: u32) -> LeaseArg {
        let mut a: LeaseArg = FromZeros::new_zeroed();
        a.n = n.into();
        a
    }

    /// The answer: `blocks` leased as lease `id`. Panics beyond [`MAX_LEASE_BLOCKS`].
    pub fn answer(id: u64, blocks: &[u32]) -> LeaseArg {
        assert!(blocks.len() <= MAX_LEASE_BLOCKS, "a lease of {} blocks", blocks.len());
        let mut a = LeaseArg::request(blocks.len() as u32);
        a.id = id.into();
        for (slot, &b) in a.blocks.iter_mut().zip(blocks) {
            *slot = b.into();
        }
        a
    }

    /// The first `n` block numbers; `None` when `n` exceeds the room for them.
    pub fn blocks(&self) -> Option<impl ExactSizeIterator<Item = u32> + '_> {
        let n = self.n.get() as usize;
        self.blocks.get(..n).map(|b| b.iter().map(|b| b.get()))
    }
}

impl MapArg {
    /// A request for the blocks of `n` pages from `off` on.
    pub fn request(off: u64, n: u32) -> MapArg {
        let mut a: MapArg = FromZeros::new_zeroed();
        a.off = off.into();
        a.n = n.into();
        a
    }

    /// The first `n` block numbers (0: no block); `None` when `n` exceeds the room for them.
    pub fn blocks(&self) -> Option<impl ExactSizeIterator<Item = u32> + '_> {
        let n = self.n.get() as usize;
        self.blocks.get(..n).map(|b| b.iter().map(|b| b.get()))
    }
}

impl Extent {
    pub fn new(off: u64, n: u32) -> Extent {
        Extent { off: off.into(), n: n.into(), reserved: 0.into() }
    }
}

impl CommitArg {
    /// A commit of lease `id`'s first `crcs.len()` blocks as `extents`; `None` when there are
    /// more extents or CRCs than the argument holds, or the extents' pages are not one CRC each.
    pub fn new(id: u64, extents: &[Extent], crcs: impl ExactSizeIterator<Item = u32>) -> Option<CommitArg> {
        let k = crcs.len();
        let pages: u64 = extents.iter().map(|e| u64::from(e.n.get())).sum();
        if k > MAX_LEASE_BLOCKS || extents.len() > MAX_COMMIT_EXTENTS || pages != k as u64 {
            return None;
        }
        let mut a: CommitArg = FromZeros::new_zeroed();
        a.id = id.into();
        a.extents = (extents.len() as u32).into();
        a.k = (k as u32).into();
        a.extent[..extents.len()].copy_from_slice(extents);
        for (slot, c) in a.crcs.iter_mut().zip(crcs) {
            *slot = c.into();
        }
        Some(a)
    }

    /// The first `extents` extents; `None` when `extents` exceeds the room for them.
    pub fn extents(&self) -> Option<impl ExactSizeIterator<Item = &Extent> + '_> {
        self.extent.get(..self.extents.get() as usize).map(|e| e.iter())
    }

    /// The first `k` CRCs; `None` when `k` exceeds the room for them.
    pub fn crcs(&self) -> Option<impl ExactSizeIterator<Item = u32> + '_> {
        let k = self.k.get() as usize;
        self.crcs.get(..k).map(|c| c.iter().map(|c| c.get()))
    }
}

impl std::fmt::Debug for LeaseArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = (self.n.get() as usize).min(MAX_LEASE_BLOCKS);
        f.debug_struct("LeaseArg").field("id", &self.id.get()).field("n", &self.n.get()).field("blocks", &&self.blocks[..n]).finish()
    }
}

impl std::fmt::Debug for CommitArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let k = (self.k.get() as usize).min(MAX_LEASE_BLOCKS);
        let e = (self.extents.get() as usize).min(MAX_COMMIT_EXTENTS);
        f.debug_struct("CommitArg")
            .field("id", &self.id.get())
            .field("extents", &&self.extent[..e])
            .field("k", &self.k.get())
            .field("crcs", &&self.crcs[..k])
            .finish()
    }
}

/// The xattr name that carries CRC hints (never stored, never listed).
pub const CRC_HINT_XATTR: &str = "user.rpramfs.write-crc32";
/// What `getxattr(CRC_HINT_XATTR)` answers on rpramfs: the version of the value's format.
pub const CRC_HINT_FORMAT: &[u8] = b"1";

/// The head of a CRC hint's value; a CRC32 (u32 LE) per block follows.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct CrcHintHeader {
    /// File offset of the first hinted block.
    pub offset: U64,
}

/// The value of a hint for the blocks from file offset `offset` on.
pub fn encode_crc_hint<C: std::borrow::Borrow<u32>>(offset: u64, crcs: impl IntoIterator<Item = C>) -> Vec<u8> {
    let mut v = CrcHintHeader { offset: offset.into() }.as_bytes().to_vec();
    for c in crcs {
        v.extend_from_slice(U32::new(*c.borrow()).as_bytes());
    }
    v
}

/// The offset and CRCs of a hint's value; `None` unless it holds a header and at least one
/// whole CRC and nothing else.
pub fn decode_crc_hint(value: &[u8]) -> Option<(u64, impl ExactSizeIterator<Item = u32> + '_)> {
    let (head, rest) = CrcHintHeader::ref_from_prefix(value).ok()?;
    let crcs = <[U32]>::ref_from_bytes(rest).ok().filter(|c| !c.is_empty())?;
    Some((head.offset.get(), crcs.iter().map(|c| c.get())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    // As bindgen's `bindgen_test_layout_*`: the size and every field's offset, so that a change
    // to a layout is a failing test here, not pages stored at the wrong place.

    #[test]
    fn layout_map_arg() {
        assert_eq!(size_of::<MapArg>(), 16 + 4 * MAX_LEASE_BLOCKS);
        assert_eq!(align_of::<MapArg>(), 1);
        assert_eq!(offset_of!(MapArg, off), 0);
        assert_eq!(offset_of!(MapArg, n), 8);
        assert_eq!(offset_of!(MapArg, reserved), 12);
        assert_eq!(offset_of!(MapArg, blocks), 16);
        let a = MapArg::request(1 << 20, 3);
        assert_eq!(a.blocks().unwrap().collect::<Vec<_>>(), [0, 0, 0]);
        assert!(MapArg::request(0, MAX_LEASE_BLOCKS as u32 + 1).blocks().is_none());
    }

    #[test]
    fn layout_direct_info() {
        assert_eq!(size_of::<DirectInfo>(), 32);
        assert_eq!(align_of::<DirectInfo>(), 1);
        assert_eq!(offset_of!(DirectInfo, version), 0);
        assert_eq!(offset_of!(DirectInfo, block_size), 4);
        assert_eq!(offset_of!(DirectInfo, region_len), 8);
        assert_eq!(offset_of!(DirectInfo, pid), 16);
        assert_eq!(offset_of!(DirectInfo, fd), 20);
        assert_eq!(offset_of!(DirectInfo, max_lease_blocks), 24);
        assert_eq!(offset_of!(DirectInfo, reserved), 28);
    }

    #[test]
    fn layout_lease_arg() {
        assert_eq!(size_of::<LeaseArg>(), 16 + 4 * 1024);
        assert_eq!(align_of::<LeaseArg>(), 1);
        assert_eq!(offset_of!(LeaseArg, id), 0);
        assert_eq!(offset_of!(LeaseArg, n), 8);
        assert_eq!(offset_of!(LeaseArg, reserved), 12);
        assert_eq!(offset_of!(LeaseArg, blocks), 16);
    }

    #[test]
    fn layout_commit_arg() {
        assert_eq!(size_of::<Extent>(), 16);
        assert_eq!(offset_of!(Extent, off), 0);
        assert_eq!(offset_of!(Extent, n), 8);
        assert_eq!(offset_of!(Extent, reserved), 12);
        assert_eq!(size_of::<CommitArg>(), 16 + 16 * 512 + 4 * 1024);
        assert_eq!(align_of::<CommitArg>(), 1);
        assert_eq!(offset_of!(CommitArg, id), 0);
        assert_eq!(offset_of!(CommitArg, extents), 8);
        assert_eq!(offset_of!(CommitArg, k), 12);
        assert_eq!(offset_of!(CommitArg, extent), 16);
        assert_eq!(offset_of!(CommitArg, crcs), 16 + 16 * 512);
    }

    #[test]
    fn layout_crc_hint_header() {
        assert_eq!(size_of::<CrcHintHeader>(), 8);
        assert_eq!(offset_of!(CrcHintHeader, offset), 0);
    }

    #[test]
    #[allow(clippy::unnecessary_cast, reason = "nix's request type is u64 or u32, as libc's is")]
    fn request_numbers_carry_their_layouts_sizes() {
        assert_eq!(ioc_size(IOC_DIRECT_INFO), size_of::<DirectInfo>());
        assert_eq!(ioc_size(IOC_LEASE), size_of::<LeaseArg>());
        assert_eq!(ioc_size(IOC_COMMIT), size_of::<CommitArg>());
        assert_eq!(ioc_size(IOC_MAP), size_of::<MapArg>());
        assert_eq!(IOC_MAP as u64, nix::request_code_readwrite!(b'R', 0x43, 4112) as u64);
        // What the kernel's macros (through nix) make of the same, and the values kup has always used.
        assert_eq!(IOC_DIRECT_INFO as u64, nix::request_code_read!(b'R', 0x40, 32) as u64);
        assert_eq!(IOC_LEASE as u64, nix::request_code_readwrite!(b'R', 0x41, 4112) as u64);
        assert_eq!(IOC_COMMIT as u64, nix::request_code_write!(b'R', 0x42, 12304) as u64);
        assert_eq!(IOC_DIRECT_INFO, 0x8020_5240);
    }

    #[test]
    fn little_endian_bytes() {
        let i = DirectInfo::new(4096, 0x1_0000_0000, 77, 5);
        let b = i.as_bytes();
        assert_eq!(&b[..4], &DIRECT_VERSION.to_le_bytes());
        assert_eq!(&b[4..8], &4096u32.to_le_bytes());
        assert_eq!(&b[8..16], &0x1_0000_0000u64.to_le_bytes());
        assert_eq!(&b[16..24], &[77, 0, 0, 0, 5, 0, 0, 0]);
        assert_eq!(&b[24..28], &1024u32.to_le_bytes());
        assert!(DirectInfo::read_from_bytes(b).unwrap().is_current());

        let a = LeaseArg::answer(0x7f00_0000_1000, &[3, 0x0102_0304]);
        let b = a.as_bytes();
        assert_eq!(&b[..8], &0x7f00_0000_1000u64.to_le_bytes());
        assert_eq!(&b[8..16], &[2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[16..24], &[3, 0, 0, 0, 4, 3, 2, 1]);
        assert!(b[24..].iter().all(|&x| x == 0));

        let c = CommitArg::new(5, &[Extent::new(8192, 1), Extent::new(0x1_0000_0000, 1)], [0xdead_beef, 1].into_iter()).unwrap();
        let b = c.as_bytes();
        assert_eq!(&b[..16], &[5, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(&b[16..32], &[0, 0x20, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[32..48], &[0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        let crcs = 16 + 16 * MAX_COMMIT_EXTENTS;
        assert_eq!(&b[crcs..crcs + 8], &[0xef, 0xbe, 0xad, 0xde, 1, 0, 0, 0]);
        let back = CommitArg::read_from_bytes(b).unwrap();
        assert_eq!(back.crcs().unwrap().collect::<Vec<_>>(), vec![0xdead_beef, 1]);
        assert_eq!(back.extents().unwrap().copied().collect::<Vec<_>>(), [Extent::new(8192, 1), Extent::new(0x1_0000_0000, 1)]);
    }

    #[test]
    fn counts_beyond_the_room_are_refused() {
        let mut a = LeaseArg::request(MAX_LEASE_BLOCKS as u32);
        assert_eq!(a.blocks().unwrap().len(), MAX_LEASE_BLOCKS);
        a.n = (MAX_LEASE_BLOCKS as u32 + 1).into();
        assert!(a.blocks().is_none());
        let mut c = CommitArg::new(0, &[], std::iter::empty()).unwrap();
        c.k = u32::MAX.into();
        assert!(c.crcs().is_none());
        c.extents = (MAX_COMMIT_EXTENTS as u32 + 1).into();
        assert!(c.extents().is_none());
        // Built from too much, or from extents that are not one CRC a page.
        let one = [Extent::new(0, 1)];
        assert!(CommitArg::new(0, &[one[0]; MAX_COMMIT_EXTENTS + 1], std::iter::repeat_n(0, MAX_COMMIT_EXTENTS + 1)).is_none());
        assert!(CommitArg::new(0, &one, [1, 2].into_iter()).is_none());
        assert!(CommitArg::new(0, &[Extent::new(0, 1025)], std::iter::repeat_n(0, 1025)).is_none());
    }

    #[test]
    fn crc_hint_values() {
        let v = encode_crc_hint(8192, [1, 0x0a0b_0c0d]);
        assert_eq!(v, [&8192u64.to_le_bytes()[..], &[1, 0, 0, 0, 0x0d, 0x0c, 0x0b, 0x0a]].concat());
        let (off, crcs) = decode_crc_hint(&v).unwrap();
        assert_eq!((off, crcs.collect::<Vec<_>>()), (8192, vec![1, 0x0a0b_0c0d]));
        for bad in [&v[..7], &v[..8], &v[..13]] {
            assert!(decode_crc_hint(bad).is_none(), "{bad:?}");
        }
    }
}
