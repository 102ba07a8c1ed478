//! The ioctls on ppp.ko's device (`/dev/kup_ppp`), the only unsafe code of PPP. The layouts and
//! request numbers are ppp-abi's, checked against kmod/include/uapi/kup_ppp.h.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use ppp_abi::{Attach, Info, Map, Page, Pin};

pub struct Device {
    file: File,
}

/// Runs one ioctl whose argument is `arg`.
///
/// # Safety
/// `arg` must be the layout `request` names (its size is encoded in the request), and every
/// pointer inside it must point to memory of the size the ABI gives that stays valid for the call.
unsafe fn ioctl<T>(file: &File, request: u64, arg: *mut T) -> io::Result<()> {
    // SAFETY: the caller's contract; the descriptor is open for the call's duration.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request as libc::c_ulong, arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Device {
    pub fn open(path: &str) -> io::Result<Device> {
        Ok(Device { file: std::fs::OpenOptions::new().read(true).write(true).open(path)? })
    }

    pub fn info(&self) -> io::Result<Info> {
        let mut info = Info::default();
        // SAFETY: INFO writes one `Info`; no pointers inside.
        unsafe { ioctl(&self.file, ppp_abi::IOC_INFO, &mut info) }?;
        Ok(info)
    }

    pub fn attach(&self, arena_start: u64, arena_size: u64, held: &[u64]) -> io::Result<()> {
        let mut a = Attach { arena_start, arena_size, held: held.as_ptr() as u64, nr_held: held.len() as u64 };
        // SAFETY: ATTACH reads one `Attach` and `nr_held` u64s at `held`, which borrows `held`.
        unsafe { ioctl(&self.file, ppp_abi::IOC_ATTACH, &mut a) }
    }

    /// Pins the present pages of `[start, start + pages.len() pages)` of `pid`; fills `pages`.
    pub fn pin(&self, pid: u32, tag: u64, start: u64, crc: bool, pages: &mut [Page]) -> io::Result<u64> {
        let mut p = Pin { pid, flags: if crc { ppp_abi::PIN_CRC } else { 0 }, tag, start, nr_pages: pages.len() as u64, pages: pages.as_mut_ptr() as u64, nr_kept: 0 };
        // SAFETY: PIN reads and writes one `Pin` and writes `nr_pages` `Page`s at `pages`, which
        // borrows `pages` mutably for the call.
        unsafe { ioctl(&self.file, ppp_abi::IOC_PIN, &mut p) }?;
        Ok(p.nr_kept)
    }

    /// The CRC of every present page of `[start, start + pages.len() pages)` of a running `pid`.
    pub fn checksum(&self, pid: u32, start: u64, pages: &mut [Page]) -> io::Result<()> {
        let mut p = Pin { pid, flags: 0, tag: 0, start, nr_pages: pages.len() as u64, pages: pages.as_mut_ptr() as u64, nr_kept: 0 };
        // SAFETY: CHECKSUM reads and writes one `Pin` and writes `nr_pages` `Page`s at `pages`,
        // which borrows `pages` mutably for the call.
        unsafe { ioctl(&self.file, ppp_abi::IOC_CHECKSUM, &mut p) }
    }

    pub fn unpin(&self, tag: u64) -> io::Result<()> {
        let mut t = tag;
        // SAFETY: UNPIN reads one u64.
        unsafe { ioctl(&self.file, ppp_abi::IOC_UNPIN, &mut t) }
    }

    /// Maps held-back pages into holes from `start` on; the answer says how far it got, also when
    /// the call failed.
    pub fn map(&self, pid: u32, start: u64, flags: u32, pages: &[Page]) -> (Map, io::Result<()>) {
        let mut m = Map { pid, flags, start, nr_pages: pages.len() as u64, pages: pages.as_ptr() as u64, ..Map::default() };
        // SAFETY: MAP reads and writes one `Map` and reads `nr_pages` `Page`s at `pages`, which
        // borrows `pages` for the call.
        let r = unsafe { ioctl(&self.file, ppp_abi::IOC_MAP, &mut m) };
        (m, r)
    }

    pub fn release(&self) -> io::Result<()> {
        // SAFETY: RELEASE takes no argument (the pointer is ignored).
        unsafe { ioctl(&self.file, ppp_abi::IOC_RELEASE, std::ptr::null_mut::<u8>()) }
    }
}
