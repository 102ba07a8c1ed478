//! Direct writes into rpramfs, and direct reads out of it (the protocol is rpramfs's:
//! rpramfs/src/fs/lease.rs; its numbers and layouts are the rpramfs-abi crate's). kup maps the
//! region itself, leases fresh blocks for a file, receives pages from CRIU's socket straight into
//! those blocks, whatever their addresses, and commits them as extents with their CRCs: a page is
//! copied once (socket to region) instead of three times (socket to kup, kup to the FUSE request,
//! request to the region), and scattered pages cost no more round trips through the daemon than
//! contiguous ones. Reading, kup asks which blocks hold a file's pages (MAP) and copies them out
//! ([`DirectRegion::read`]); its own CRCs vouch for what it copied.
//!
//! The region is shared with the rpramfs daemon, another process, so this module never hands out a
//! Rust reference into it (as vm-memory does for guest memory): leased pages are filled by read(2)
//! into the mapping ([`Lease::receive`]) or by a copy ([`Lease::write`]), and read back by a copy
//! ([`Lease::read_page`]), each bounded by the lease. A [`Lease`] holds the file it was taken on,
//! whose close frees it, so it cannot outlive it, and it is committed on that same file.
//!
//! All of the unsafe code of foam-store is here: the ioctls and the copies to and from leased
//! blocks and out of a file's blocks. Whether to write directly at all is the caller's choice
//! ([`DirectRegion::probe`] only looks at what the file system offers).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::Arc;

use rpramfs_abi::{ioc_size, CommitArg, DirectInfo, Extent, LeaseArg, MapArg, IOC_COMMIT, IOC_DIRECT_INFO, IOC_LEASE, IOC_MAP};
use zerocopy::{FromBytes, IntoBytes};

use crate::protocol::PAGE_SIZE;

/// rpramfs's largest lease, and the most extents a commit carries.
pub use rpramfs_abi::{MAX_COMMIT_EXTENTS, MAX_LEASE_BLOCKS as MAX_LEASE_PAGES};

const PAGE: usize = PAGE_SIZE as usize;

/// The region of an rpramfs mount, mapped into this process.
pub struct DirectRegion {
    map: memmap2::MmapRaw,
    blocks: u64,
}

/// Fresh blocks rpramfs handed out for pages of a file: this process's alone until
/// [`Lease::commit`] says which pages they are. Every block lies inside the region (checked when
/// leased).
pub struct Lease {
    region: Arc<DirectRegion>,
    /// The file the lease was taken on: closing it frees the lease, so the lease keeps it open.
    file: Arc<File>,
    id: u64,
    blocks: Vec<u32>,
}

/// One ioctl whose argument is `arg`, which must be exactly the size the request code names: the
/// kernel copies that many bytes from and/or to it.
fn ioctl<T: FromBytes + IntoBytes>(file: &File, request: u32, arg: &mut T) -> io::Result<()> {
    if ioc_size(request) != size_of::<T>() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("ioctl {request:#x} takes {} bytes, not {}", ioc_size(request), size_of::<T>())));
    }
    // SAFETY: for these request codes the kernel (FUSE, restricted ioctl) copies exactly
    // _IOC_SIZE(request) bytes from and/or to `arg`, which is that long (checked above) and valid
    // for writes, and any bytes are a valid `T` (FromBytes).
    let r = unsafe { libc::ioctl(file.as_raw_fd(), request as _, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn out_of_lease(off: usize, len: usize, pages: usize) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("leased bytes {off}..{} asked of a lease of {pages} pages", off.saturating_add(len)))
}

impl DirectRegion {
    /// Direct writes for files under `dir`, when its file system offers them (rpramfs, not
    /// read-only, at this layout version) and this process may open and map the region;
    /// otherwise `None`.
    pub fn probe(dir: &Path) -> Option<DirectRegion> {
        let d = File::open(dir).ok()?;
        let mut info = DirectInfo::zeroed();
        ioctl(&d, IOC_DIRECT_INFO, &mut info).ok()?;
        if !info.is_current() || info.block_size.get() as usize != PAGE {
            return None;
        }
        let (pid, fd, len) = (info.pid.get(), info.fd.get(), info.region_len.get());
        // The very object the daemon maps (device, file or memfd), whatever its path.
        let region = OpenOptions::new().read(true).write(true).open(format!("/proc/{pid}/fd/{fd}")).ok()?;
        let map = memmap2::MmapOptions::new().len(usize::try_from(len).ok()?).map_raw(&region).ok()?;
        Some(DirectRegion { map, blocks: len / PAGE_SIZE })
    }

    /// Leases `pages` fresh blocks (1 to [`MAX_LEASE_PAGES`]) for `file`.
    pub fn lease(self: &Arc<Self>, file: Arc<File>, pages: usize) -> io::Result<Lease> {
        if pages == 0 || pages > MAX_LEASE_PAGES {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("a lease of {pages} pages (1 to {MAX_LEASE_PAGES})")));
        }
        let mut arg = LeaseArg::request(pages as u32);
        ioctl(&file, IOC_LEASE, &mut arg)?;
        let blocks: Vec<u32> = arg.blocks().map(|b| b.collect()).unwrap_or_default();
        if blocks.len() != pages || blocks.iter().any(|&b| u64::from(b) >= self.blocks) {
            return Err(io::Error::other(format!("rpramfs answered a lease of {pages} pages with {arg:?}")));
        }
        Ok(Lease { region: self.clone(), file, id: arg.id.get(), blocks })
    }

    /// Copies the pages of `file` (on this mount) from the block-aligned offset `off` on into
    /// `out` (whole pages), straight out of the region: rpramfs says which blocks hold them
    /// (MAP, [`MAX_LEASE_PAGES`] at a time), pages without a block read as zeros. Nothing vouches
    /// for the bytes but the caller's own CRCs: a write to the file meanwhile moves its pages and
    /// frees the old blocks. A daemon without MAP answers ENOTTY.
    pub fn read(&self, file: &File, off: u64, out: &mut [u8]) -> io::Result<()> {
        if !out.len().is_multiple_of(PAGE) || !off.is_multiple_of(PAGE_SIZE) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("a direct read of {} bytes at {off:#x}: whole pages only", out.len())));
        }
        for (i, chunk) in out.chunks_mut(MAX_LEASE_PAGES * PAGE).enumerate() {
            let at = off + (i * MAX_LEASE_PAGES * PAGE) as u64;
            let pages = chunk.len() / PAGE;
            let mut arg = MapArg::request(at, pages as u32);
            ioctl(file, IOC_MAP, &mut arg)?;
            let blocks: Vec<u32> = arg.blocks().map(|b| b.collect()).unwrap_or_default();
            if blocks.len() != pages || blocks.iter().any(|&b| u64::from(b) >= self.blocks) {
                return Err(io::Error::other(format!("rpramfs answered a map of {pages} pages at {at:#x} with {} blocks, or blocks outside the region", blocks.len())));
            }
            let mut p = 0;
            while p < pages {
                let b = blocks[p];
                let k = if b == 0 { 1 } else { 1 + blocks[p..].windows(2).take_while(|w| w[1] == w[0] + 1).count() };
                let dst = &mut chunk[p * PAGE..(p + k) * PAGE];
                if b == 0 {
                    dst.fill(0);
                } else {
                    let src = self.block_ptr(b, k);
                    // SAFETY: `k` pages of the mapping from block `b` on (block_ptr checks they
                    // lie inside it); `dst` is this process's own memory, not the mapping, so the
                    // two do not overlap, and no reference into the mapping is made.
                    unsafe { std::ptr::copy_nonoverlapping(src.cast_const(), dst.as_mut_ptr(), k * PAGE) };
                }
                p += k;
            }
        }
        Ok(())
    }

    /// Where block `block` starts in this process, for `pages` pages from there.
    fn block_ptr(&self, block: u32, pages: usize) -> *mut u8 {
        assert!(u64::from(block) + pages as u64 <= self.blocks, "blocks {block}+{pages} outside a region of {}", self.blocks);
        // SAFETY: the block lies inside the mapping (asserted), whose length is `blocks` pages.
        unsafe { self.map.as_mut_ptr().add(block as usize * PAGE) }
    }
}

impl Lease {
    pub fn pages(&self) -> usize {
        self.blocks.len()
    }

    /// Whether this lease was taken on `file` (and will be committed there).
    pub fn is_on(&self, file: &Arc<File>) -> bool {
        Arc::ptr_eq(&self.file, file)
    }

    /// Leased bytes `off..off + len` (counted from the first leased page) as runs of consecutive
    /// blocks: (the run's offset from `off`, where it starts in this process, bytes). Checks the
    /// range against the lease.
    fn runs(&self, off: usize, len: usize) -> io::Result<impl Iterator<Item = (usize, *mut u8, usize)> + '_> {
        let end = off.checked_add(len).filter(|&e| e <= self.blocks.len() * PAGE).ok_or_else(|| out_of_lease(off, len, self.blocks.len()))?;
        let mut at = off;
        Ok(std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let (page, last) = (at / PAGE, (end - 1) / PAGE);
            let k = 1 + self.blocks[page..=last].windows(2).take_while(|w| w[1] == w[0] + 1).count();
            let run_end = ((page + k) * PAGE).min(end);
            // SAFETY: `at % PAGE` < PAGE, inside the first of the `k` blocks block_ptr checked.
            let ptr = unsafe { self.region.block_ptr(self.blocks[page], k).add(at % PAGE) };
            let run = (at - off, ptr, run_end - at);
            at = run_end;
            Some(run)
        }))
    }

    /// Reads exactly `len` bytes from `fd` (a stream: CRIU's page-server socket) into the lease
    /// from byte `off` on, with read(2) straight into the region. The stream ending first is
    /// [`io::ErrorKind::UnexpectedEof`].
    pub fn receive(&mut self, fd: BorrowedFd<'_>, off: usize, len: usize) -> io::Result<()> {
        for (_, mut ptr, mut left) in self.runs(off, len)? {
            while left > 0 {
                // SAFETY: `ptr..ptr + left` lies inside this lease's blocks in the mapping (runs
                // checks both); rpramfs neither reads nor hands out leased blocks before their
                // commit, this process holds no reference into the mapping, and `&mut self` keeps
                // other users of this lease out. The kernel writes at most `left` bytes there.
                let r = unsafe { libc::read(fd.as_raw_fd(), ptr.cast(), left) };
                match r {
                    0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                    r if r < 0 => {
                        let e = io::Error::last_os_error();
                        if e.kind() != io::ErrorKind::Interrupted {
                            return Err(e);
                        }
                    }
                    r => {
                        let r = r as usize;
                        // SAFETY: r ≤ left, so the pointer stays inside the run (or one past it).
                        ptr = unsafe { ptr.add(r) };
                        left -= r;
                    }
                }
            }
        }
        Ok(())
    }

    /// Copies `data` into the lease from byte `off` on.
    pub fn write(&mut self, off: usize, data: &[u8]) -> io::Result<()> {
        for (at, ptr, k) in self.runs(off, data.len())? {
            let src = &data[at..at + k];
            // SAFETY: the destination is `k` bytes of this lease's blocks in the mapping (checked
            // by runs), which no reference in this process covers, so it cannot overlap `src`.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), ptr, k) };
        }
        Ok(())
    }

    /// Copies leased page `i` out into `out`.
    pub fn read_page(&self, i: usize, out: &mut [u8; PAGE]) -> io::Result<()> {
        for (_, ptr, _) in self.runs(i.saturating_mul(PAGE), PAGE)? {
            // SAFETY: one page of this lease's blocks in the mapping (checked by runs); `out` is
            // this process's own memory, not the mapping, so the two do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(ptr.cast_const(), out.as_mut_ptr(), PAGE) };
        }
        Ok(())
    }

    /// Makes the first `crcs.len()` leased pages, in order, the file's pages of `extents` (file
    /// offset, pages: ascending, up to [`MAX_COMMIT_EXTENTS`]), with these CRCs (rpramfs checks
    /// the first against its data); rpramfs frees the rest of the lease.
    pub fn commit(self, extents: &[(u64, usize)], crcs: &[u32]) -> io::Result<()> {
        if crcs.is_empty() || crcs.len() > self.blocks.len() {
            return Err(out_of_lease(0, crcs.len(), self.blocks.len()));
        }
        let extents: Vec<Extent> = extents.iter().map(|&(off, n)| Extent::new(off, n as u32)).collect();
        let mut arg = CommitArg::new(self.id, &extents, crcs.iter().copied()).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("a commit of {} extents with {} CRCs (at most {MAX_COMMIT_EXTENTS} extents, one CRC a page)", extents.len(), crcs.len()))
        })?;
        ioctl(&self.file, IOC_COMMIT, &mut arg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lease over an anonymous "region" (no rpramfs: the ioctls are not involved).
    fn lease(blocks: Vec<u32>) -> Lease {
        let map = memmap2::MmapOptions::new().len(16 * PAGE).map_anon().unwrap().into();
        let region = Arc::new(DirectRegion { map, blocks: 16 });
        Lease { region, file: Arc::new(File::open("/dev/null").unwrap()), id: 0, blocks }
    }

    #[test]
    fn copies_follow_the_blocks_and_stay_in_the_lease() {
        let mut l = lease(vec![3, 4, 9, 10, 11, 1]);
        let data: Vec<u8> = (0..6 * PAGE).map(|i| (i / PAGE * 31 + i % 251) as u8).collect();
        // In two pieces that split pages (a buffered part, then the rest).
        l.write(0, &data[..PAGE + 100]).unwrap();
        l.write(PAGE + 100, &data[PAGE + 100..]).unwrap();
        let mut page = [0u8; PAGE];
        for i in 0..6 {
            l.read_page(i, &mut page).unwrap();
            assert_eq!(page[..], data[i * PAGE..(i + 1) * PAGE], "page {i}");
        }
        let runs = |off, len| l.runs(off, len).unwrap().map(|(at, _, k)| (at, k)).collect::<Vec<_>>();
        assert_eq!(runs(0, 6 * PAGE), vec![(0, 2 * PAGE), (2 * PAGE, 3 * PAGE), (5 * PAGE, PAGE)]);
        assert_eq!(runs(PAGE + 7, 2 * PAGE), vec![(0, PAGE - 7), (PAGE - 7, PAGE + 7)]);
        // Through a descriptor, into pages 1..3, starting mid-page.
        let (mut tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut tx, &vec![0xab; 2 * PAGE]).unwrap();
        l.receive(std::os::fd::AsFd::as_fd(&rx), PAGE, 100).unwrap();
        l.receive(std::os::fd::AsFd::as_fd(&rx), PAGE + 100, 2 * PAGE - 100).unwrap();
        for (i, want) in [(0, data[0]), (1, 0xab), (2, 0xab), (3, data[3 * PAGE])] {
            l.read_page(i, &mut page).unwrap();
            assert!(page.iter().all(|&b| b == want) || i == 0 || i == 3, "page {i}");
            assert_eq!(page[0], want, "page {i}");
        }
        drop(tx);
        assert_eq!(l.receive(std::os::fd::AsFd::as_fd(&rx), 0, 1).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        // Out of the lease: refused, nothing written.
        assert!(l.write(5 * PAGE, &data[..2 * PAGE]).is_err());
        assert!(l.write(6 * PAGE, &data[..1]).is_err());
        assert!(l.read_page(6, &mut page).is_err());
        assert!(l.runs(usize::MAX, 2).is_err());
        assert!(l.read_page(usize::MAX, &mut page).is_err());
    }

    #[test]
    fn request_sizes_are_checked() {
        let f = File::open("/dev/null").unwrap();
        let mut small = [0u8; 16];
        assert_eq!(ioctl(&f, IOC_LEASE, &mut small).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }
}
