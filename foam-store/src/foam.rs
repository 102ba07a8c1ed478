//! One FOAM file: an address space stored sparsely at file offset == virtual address (for shared
//! memory: offset in the object), with a CRC32 per page in a companion `.crc` file at offset
//! `page_index × 4`. File systems whose maximum file size is below 2^47 (ext4: 16 TiB) get the
//! address space split into 2^40-byte segment files; [`FileMode`] says which layout a store uses.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{fallocate, FallocateFlags};
use parking_lot::Mutex;
// rpramfs's CRC hint (rpramfs/src/fs/crc_hint.rs, encoded by rpramfs-abi): the file offset of
// whole blocks about to be written, then their CRC32s, which rpramfs then stores instead of
// computing them again. `getxattr` of the name answers CRC_HINT_FORMAT on rpramfs only.
use rpramfs_abi::CRC_HINT_XATTR;
use xattr::FileExt as _;

use crate::direct::{DirectRegion, Lease};
use crate::protocol::PAGE_SIZE;
use crate::ranges::RangeMap;
use crate::Error;

const PAGE: usize = PAGE_SIZE as usize;
/// x86-64 user addresses are below 2^47; a single file must reach that far.
const SINGLE_FILE_REACH: u64 = 1 << 47;
const SPLIT_SEGMENT_BITS: u32 = 40;

/// How address spaces map to files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileMode {
    /// One file per address space (rpramfs, tmpfs, xfs, btrfs).
    Single,
    /// Segment files of `2^segment_bits` bytes (ext4 and other file systems with small files).
    Split { segment_bits: u32 },
}

impl FileMode {
    /// Finds out whether `dir`'s file system holds files reaching 2^47 bytes.
    pub fn probe(dir: &Path) -> Result<FileMode, Error> {
        let path = dir.join(".foam-size-probe");
        let f = OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&path).map_err(|e| Error::io(&path, e))?;
        let single = f.set_len(SINGLE_FILE_REACH).is_ok();
        let split_ok = single || f.set_len(1 << SPLIT_SEGMENT_BITS).is_ok();
        drop(f);
        let _ = std::fs::remove_file(&path);
        match (single, split_ok) {
            (true, _) => Ok(FileMode::Single),
            (false, true) => Ok(FileMode::Split { segment_bits: SPLIT_SEGMENT_BITS }),
            _ => Err(Error::Unsupported(format!(
                "{} cannot hold sparse files of 2^{SPLIT_SEGMENT_BITS} bytes; put the store on rpramfs, tmpfs, xfs, btrfs or ext4",
                dir.display()
            ))),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            FileMode::Single => "one sparse file per address space".into(),
            FileMode::Split { segment_bits } => format!("address spaces split into 2^{segment_bits}-byte files (small maximum file size)"),
        }
    }

    fn segment_bits(&self) -> u32 {
        match self {
            FileMode::Single => 64,
            FileMode::Split { segment_bits } => *segment_bits,
        }
    }
}

/// One address space's pages and their CRCs.
pub struct FoamFile {
    dir: PathBuf,
    stem: String,
    mode: FileMode,
    writable: bool,
    write: WriteMode,
    segments: Mutex<BTreeMap<u64, std::sync::Arc<File>>>,
    crc: File,
    /// rpramfs's region, for direct writes and reads (single-file layout only).
    direct: Option<std::sync::Arc<DirectRegion>>,
}

impl FoamFile {
    /// Opens (creating if needed) for writing; files are root-only (0600).
    pub fn create(dir: &Path, stem: &str, mode: FileMode) -> Result<FoamFile, Error> {
        let crc_path = dir.join(format!("{stem}.crc"));
        let crc = OpenOptions::new().create(true).truncate(false).read(true).write(true).mode(0o600).open(&crc_path).map_err(|e| Error::io(&crc_path, e))?;
        Ok(FoamFile { dir: dir.into(), stem: stem.into(), mode, writable: true, write: WriteMode::default(), segments: Mutex::new(BTreeMap::new()), crc, direct: None })
    }

    /// Writes data as `write` says from now on (see [`WriteMode::probe`]).
    pub fn with_write_mode(mut self, write: WriteMode) -> FoamFile {
        self.write = write;
        self
    }

    /// Writes (if opened for writing) and reads pages straight into and out of rpramfs's region
    /// from now on (see [`crate::direct`]); ignored in the split layout, which rpramfs never needs.
    pub fn with_direct(mut self, direct: Option<std::sync::Arc<DirectRegion>>) -> FoamFile {
        self.direct = direct.filter(|_| self.mode == FileMode::Single);
        self
    }

    /// Whether pages are received into leased blocks ([`FoamFile::lease`]).
    pub fn writes_directly(&self) -> bool {
        self.direct.is_some() && self.writable
    }

    /// The region and the data file, for a direct write.
    fn direct_target(&self) -> Result<(&std::sync::Arc<DirectRegion>, std::sync::Arc<File>), Error> {
        let d = self.direct.as_ref().filter(|_| self.writable).ok_or_else(|| Error::Unsupported("direct writes are off for this store".into()))?;
        Ok((d, self.segment(0)?))
    }

    /// Fresh blocks for `pages` pages, wherever they lie, to receive them into (direct writes
    /// only).
    pub fn lease(&self, pages: usize) -> Result<Lease, Error> {
        let (d, f) = self.direct_target()?;
        d.lease(f, pages).map_err(|e| Error::io(&self.segment_path(0), e))
    }

    /// The CRCs of leased pages `0..pages` as [`page_crcs`] gives them, into `out`: each page is
    /// copied out of the region into a local buffer first (the region is shared with rpramfs's
    /// daemon, so no reference into it is made).
    pub fn leased_page_crcs(&self, lease: &Lease, pages: usize, out: &mut Vec<u8>) -> Result<(), Error> {
        out.clear();
        let mut page = [0u8; PAGE];
        for i in 0..pages {
            lease.read_page(i, &mut page).map_err(|e| Error::io(&self.segment_path(0), e))?;
            out.extend_from_slice(&pagecrc::crc32(&page).to_le_bytes());
        }
        Ok(())
    }

    /// Commits the leased pages filled so far as the pages of `extents` (vaddr, pages: ascending;
    /// one CRC each, as computed by [`page_crcs`]) and stores their CRCs in the `.crc` file.
    pub fn commit_leased(&self, lease: Lease, extents: &[(u64, usize)], crcs: &[u8]) -> Result<(), Error> {
        self.commit_leased_pages(lease, extents, crcs)?;
        let mut at = 0;
        for &(vaddr, n) in extents {
            self.write_crcs(vaddr, &crcs[at..at + 4 * n])?;
            at += 4 * n;
        }
        Ok(())
    }

    /// Commits the leased pages filled so far as the pages of `extents`, vouched for by their
    /// CRCs, without storing those in the `.crc` file: the caller does that with
    /// [`FoamFile::write_crcs`] (the receiver gathers many extents' CRCs into one write).
    pub fn commit_leased_pages(&self, lease: Lease, extents: &[(u64, usize)], crcs: &[u8]) -> Result<(), Error> {
        let (_, f) = self.direct_target()?;
        if !lease.is_on(&f) {
            return Err(Error::Unsupported(format!("a lease of another file committed as {}'s pages", self.stem)));
        }
        let words: Vec<u32> = crcs.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
        lease.commit(extents, &words).map_err(|e| Error::io(&self.segment_path(0), e))
    }

    /// Stores the CRCs of the pages from `vaddr` on (4 bytes each, as [`page_crcs`] gives them).
    pub fn write_crcs(&self, vaddr: u64, crcs: &[u8]) -> Result<(), Error> {
        self.crc.write_all_at(crcs, crc_offset(vaddr)).map_err(|e| Error::io(&self.crc_path(), e))
    }

    /// The stored CRCs of the pages from `vaddr` on into `out` (4 bytes each; zeros for pages
    /// never stored).
    pub fn read_crcs(&self, vaddr: u64, out: &mut [u8]) -> Result<(), Error> {
        read_full_at(&self.crc, out, crc_offset(vaddr)).map_err(|e| Error::io(&self.crc_path(), e))
    }

    /// Opens an existing address space for reading.
    pub fn open(dir: &Path, stem: &str, mode: FileMode) -> Result<FoamFile, Error> {
        let crc_path = dir.join(format!("{stem}.crc"));
        let crc = File::open(&crc_path).map_err(|e| Error::io(&crc_path, e))?;
        Ok(FoamFile { dir: dir.into(), stem: stem.into(), mode, writable: false, write: WriteMode::default(), segments: Mutex::new(BTreeMap::new()), crc, direct: None })
    }

    pub fn stem(&self) -> &str {
        &self.stem
    }

    fn segment_path(&self, seg: u64) -> PathBuf {
        match self.mode {
            FileMode::Single => self.dir.join(format!("{}.foam", self.stem)),
            FileMode::Split { .. } => self.dir.join(format!("{}.foam.{seg:x}", self.stem)),
        }
    }

    /// The paths of the data files that exist.
    pub fn data_paths(&self) -> Vec<PathBuf> {
        match self.mode {
            FileMode::Single => vec![self.segment_path(0)].into_iter().filter(|p| p.exists()).collect(),
            FileMode::Split { .. } => {
                let prefix = format!("{}.foam.", self.stem);
                let mut v: Vec<PathBuf> = std::fs::read_dir(&self.dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|e| e.file_name().to_str().and_then(|n| n.strip_prefix(&prefix)).is_some_and(|s| u64::from_str_radix(s, 16).is_ok()))
                    .map(|e| e.path())
                    .collect();
                v.sort();
                v
            }
        }
    }

    fn segment(&self, seg: u64) -> Result<std::sync::Arc<File>, Error> {
        let mut segs = self.segments.lock();
        if let Some(f) = segs.get(&seg) {
            return Ok(f.clone());
        }
        let path = self.segment_path(seg);
        let f = if self.writable {
            let flags = if self.write.direct { nix::fcntl::OFlag::O_DIRECT.bits() } else { 0 };
            OpenOptions::new().create(true).truncate(false).read(true).write(true).mode(0o600).custom_flags(flags).open(&path)
        } else {
            File::open(&path)
        }
        .map_err(|e| Error::io(&path, e))?;
        let f = std::sync::Arc::new(f);
        segs.insert(seg, f.clone());
        Ok(f)
    }

    /// Splits `[vaddr, vaddr + len)` at segment boundaries: (segment, offset in it, offset in buffer, len).
    fn pieces(&self, vaddr: u64, len: usize) -> Vec<(u64, u64, usize, usize)> {
        let bits = self.mode.segment_bits();
        let mut out = Vec::new();
        let mut done = 0usize;
        while done < len {
            let at = vaddr + done as u64;
            let (seg, off) = if bits >= 64 { (0, at) } else { (at >> bits, at & ((1u64 << bits) - 1)) };
            let room = if bits >= 64 { u64::MAX } else { (1u64 << bits) - off };
            let n = ((len - done) as u64).min(room) as usize;
            out.push((seg, off, done, n));
            done += n;
        }
        out
    }

    /// Stores whole pages at `vaddr` and their CRCs.
    pub fn write_pages(&self, vaddr: u64, data: &[u8]) -> Result<(), Error> {
        let mut crcs = Vec::new();
        page_crcs(data, &mut crcs);
        self.write_pages_with_crcs(vaddr, data, &crcs)
    }

    /// Stores whole pages at `vaddr` with their CRCs as computed by [`page_crcs`] (the receiver
    /// computes them on another thread while the previous write is under way).
    pub fn write_pages_with_crcs(&self, vaddr: u64, data: &[u8], crcs: &[u8]) -> Result<(), Error> {
        debug_assert!(vaddr.is_multiple_of(PAGE_SIZE) && data.len().is_multiple_of(PAGE));
        debug_assert_eq!(crcs.len(), data.len() / PAGE * 4);
        for (seg, off, at, n) in self.pieces(vaddr, data.len()) {
            let f = self.segment(seg)?;
            if self.write.crc_hints {
                let words = crcs[at / PAGE * 4..(at + n) / PAGE * 4].chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap()));
                let hint = rpramfs_abi::encode_crc_hint(off, words);
                f.set_xattr(CRC_HINT_XATTR, &hint).map_err(|e| Error::io(&self.segment_path(seg), e))?;
            }
            f.write_all_at(&data[at..at + n], off).map_err(|e| Error::io(&self.segment_path(seg), e))?;
        }
        self.write_crcs(vaddr, crcs)
    }

    /// Reads whole pages at `vaddr` into `buf`, checking every page against its CRC; out of
    /// rpramfs's region where it offers that (one copy, no FUSE read), else through the file.
    pub fn read_pages(&self, vaddr: u64, buf: &mut [u8]) -> Result<(), Error> {
        for (seg, off, at, n) in self.pieces(vaddr, buf.len()) {
            let f = self.segment(seg)?;
            let piece = &mut buf[at..at + n];
            let direct = self.direct.as_ref().map(|d| d.read(&f, off, piece));
            if !matches!(direct, Some(Ok(()))) {
                read_full_at(&f, piece, off).map_err(|e| Error::io(&self.segment_path(seg), e))?;
            }
        }
        let mut crcs = vec![0u8; buf.len() / PAGE * 4];
        read_full_at(&self.crc, &mut crcs, crc_offset(vaddr)).map_err(|e| Error::io(&self.crc_path(), e))?;
        for (i, page) in buf.chunks_exact(PAGE).enumerate() {
            let want = u32::from_le_bytes(crcs[i * 4..i * 4 + 4].try_into().unwrap());
            let got = pagecrc::crc32(page);
            if want != got {
                return Err(Error::BadPage { space: self.stem.clone(), vaddr: vaddr + (i * PAGE) as u64, want, got });
            }
        }
        Ok(())
    }

    fn crc_path(&self) -> PathBuf {
        self.dir.join(format!("{}.crc", self.stem))
    }

    /// Punches out what earlier passes stored (`stored`) and the last dump's image (`keep`) no
    /// longer names, so the files hold exactly that image. Pages never stored need no punch: each
    /// is a round trip through FUSE, and a sparse image has a gap per run.
    pub fn keep_only(&self, keep: &RangeMap, stored: &RangeMap) -> Result<(), Error> {
        let mut dropped = stored.clone();
        for r in keep.iter() {
            dropped.remove(r.start, r.end);
        }
        for r in dropped.iter() {
            for (seg, off, _, n) in self.pieces(r.start, (r.end - r.start) as usize) {
                let f = self.segment(seg)?;
                punch(&f, off, n as u64).map_err(|e| Error::io(&self.segment_path(seg), e))?;
            }
            // Their CRCs where they fill whole blocks of the `.crc` file: the few bytes at the
            // edges are never read (the manifest does not name their pages).
            let (a, b) = (crc_offset(r.start).next_multiple_of(4096), crc_offset(r.end) / 4096 * 4096);
            if a < b {
                punch(&self.crc, a, b - a).map_err(|e| Error::io(&self.crc_path(), e))?;
            }
        }
        Ok(())
    }

    /// Makes everything written durable.
    pub fn sync(&self) -> Result<(), Error> {
        for (seg, f) in self.segments.lock().iter() {
            f.sync_data().map_err(|e| Error::io(&self.segment_path(*seg), e))?;
        }
        self.crc.sync_data().map_err(|e| Error::io(&self.crc_path(), e))
    }

    /// Bytes of storage the data files use (not their apparent size).
    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.data_paths().iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.blocks() * 512).sum()
    }
}

/// Whether pages may go straight into rpramfs's region where the store offers that: the
/// operator's choice, which the `kup` binary reads from `KUP_DIRECT_WRITES` (`0`: off).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DirectWrites {
    /// Direct writes wherever the file system offers them.
    #[default]
    IfOffered,
    /// Never: pages go through the file system's write path.
    Off,
}

/// How data files are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteMode {
    /// With O_DIRECT.
    pub direct: bool,
    /// Each write preceded by a CRC hint with the pages' CRCs.
    pub crc_hints: bool,
    /// Pages received straight into rpramfs's region and committed with their CRCs (direct
    /// writes, [`crate::direct`]); O_DIRECT and hints then serve only what is not leased.
    pub region: bool,
}

impl WriteMode {
    /// Whether the store is rpramfs (it answered the CRC-hint probe, which direct writes also
    /// need): every request is committed before its reply, and rpramfs keeps no write-back cache,
    /// so a write is durable when it returns and an fsync adds a round trip and nothing else.
    pub fn durable_on_reply(&self) -> bool {
        self.crc_hints
    }

    /// What pays in `dir`. On rpramfs direct writes, unless `direct` is off. On FUSE
    /// (rpramfs) a buffered write first copies every page into the page cache (pages the dump never reads again, allocated and zeroed while the app is
    /// frozen), so O_DIRECT, which hands the buffer to the daemon. On rpramfs also CRC hints: the
    /// page CRCs the FOAM file keeps anyway, which spare the daemon computing them again.
    /// Elsewhere buffered writes: O_DIRECT would need aligned buffers (ext4, xfs) or is refused
    /// (tmpfs before 6.6).
    pub fn probe(dir: &Path, direct: DirectWrites) -> WriteMode {
        Self::probe_with_region(dir, direct).0
    }

    /// [`WriteMode::probe`], with the region mapped when direct writes are on.
    pub fn probe_with_region(dir: &Path, direct: DirectWrites) -> (WriteMode, Option<DirectRegion>) {
        let fuse = nix::sys::statfs::statfs(dir).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::FUSE_SUPER_MAGIC);
        let crc_hints = fuse && xattr::get(dir, CRC_HINT_XATTR).ok().flatten().is_some_and(|v| v == rpramfs_abi::CRC_HINT_FORMAT);
        let region = if crc_hints && direct == DirectWrites::IfOffered { DirectRegion::probe(dir) } else { None };
        (WriteMode { direct: fuse, crc_hints, region: region.is_some() }, region)
    }

    pub fn describe(&self) -> &'static str {
        match (self.direct, self.crc_hints, self.region) {
            (_, _, true) => "pages received straight into rpramfs's region and committed with their CRCs (direct writes)",
            (true, true, _) => "data written with O_DIRECT, page CRCs handed to rpramfs (CRC hints)",
            (true, false, _) => "data written with O_DIRECT",
            _ => "data written through the page cache",
        }
    }
}

/// The CRCs of whole pages, as stored in the `.crc` file (4 bytes each, little-endian), into `out`.
pub fn page_crcs(data: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend(data.chunks_exact(PAGE).flat_map(|p| pagecrc::crc32(p).to_le_bytes()));
}

fn crc_offset(vaddr: u64) -> u64 {
    vaddr / PAGE_SIZE * 4
}

/// Reads `buf.len()` bytes at `off`; bytes past the end of the file read as zero (a sparse tail).
fn read_full_at(f: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn punch(f: &File, off: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    fallocate(f, FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE, off as i64, len as i64).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{PE_LAZY, PE_PRESENT};

    fn page(v: u8) -> Vec<u8> {
        vec![v; PAGE]
    }

    #[test]
    fn pages_round_trip_at_high_addresses_in_both_modes() {
        // Whatever /tmp supports (ext4 here: split), and small segments to cross their boundaries.
        let probed = FileMode::probe(&std::env::temp_dir()).unwrap();
        for mode in [probed, FileMode::Split { segment_bits: 20 }] {
            let dir = tempfile::tempdir().unwrap();
            let f = FoamFile::create(dir.path(), "42", mode).unwrap();
            let top = 0x7fff_ffff_e000u64;
            let mut two = page(1);
            two.extend(page(2));
            f.write_pages(top, &two).unwrap();
            // Straddles a 1 MiB segment boundary in split mode.
            let mut three = page(3);
            three.extend(page(4));
            three.extend(page(5));
            f.write_pages((1 << 20) - PAGE_SIZE, &three).unwrap();
            drop(f);
            let r = FoamFile::open(dir.path(), "42", mode).unwrap();
            let mut buf = vec![0; 2 * PAGE];
            r.read_pages(top, &mut buf).unwrap();
            assert_eq!(buf, two);
            let mut buf = vec![0; 3 * PAGE];
            r.read_pages((1 << 20) - PAGE_SIZE, &mut buf).unwrap();
            assert_eq!(buf, three);
            assert!(r.allocated_bytes() <= 64 * PAGE as u64, "sparse: {}", r.allocated_bytes());
        }
    }

    #[test]
    fn a_flipped_byte_is_named_and_never_returned() {
        let dir = tempfile::tempdir().unwrap();
        let f = FoamFile::create(dir.path(), "7", FileMode::Single).unwrap();
        f.write_pages(0x10000, &[page(9), page(8)].concat()).unwrap();
        let data = dir.path().join("7.foam");
        let file = OpenOptions::new().write(true).open(&data).unwrap();
        file.write_all_at(&[0x55], 0x11000 + 100).unwrap();
        let mut buf = vec![0; 2 * PAGE];
        match f.read_pages(0x10000, &mut buf) {
            Err(Error::BadPage { vaddr, space, .. }) => assert_eq!((vaddr, space.as_str()), (0x11000, "7")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn keep_only_punches_what_the_last_dump_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let f = FoamFile::create(dir.path(), "1", FileMode::Single).unwrap();
        f.write_pages(0, &vec![7u8; 64 * PAGE]).unwrap();
        let mut keep = RangeMap::new();
        keep.insert(8 * PAGE_SIZE, 16 * PAGE_SIZE, PE_PRESENT | PE_LAZY);
        let mut stored = RangeMap::new();
        stored.insert(0, 64 * PAGE_SIZE, PE_PRESENT);
        // What was stored and is kept: nothing to punch.
        f.keep_only(&stored, &stored).unwrap();
        assert!(f.allocated_bytes() >= 64 * PAGE as u64, "{}", f.allocated_bytes());
        f.keep_only(&keep, &stored).unwrap();
        let mut buf = vec![0; 8 * PAGE];
        f.read_pages(8 * PAGE_SIZE, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 7));
        let raw = std::fs::read(dir.path().join("1.foam")).unwrap();
        assert!(raw[..8 * PAGE].iter().all(|&b| b == 0) && raw[16 * PAGE..].iter().all(|&b| b == 0));
        assert!(f.allocated_bytes() <= 8 * PAGE as u64 + 4096, "{}", f.allocated_bytes());
    }

    #[test]
    fn probe_picks_single_files_on_tmpfs_like_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let mode = FileMode::probe(dir.path()).unwrap();
        assert!(!dir.path().join(".foam-size-probe").exists());
        // /tmp is ext4 or tmpfs here; both are handled, and the mode says which.
        assert!(!mode.describe().is_empty());
    }
}
