//! The ioctls on ppp.ko's device (`/dev/kup_ppp`), the only unsafe code of PPP. The layouts and
//! request numbers are ppp-abi's, checked against kmod/include/uapi/kup_ppp.h.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use ppp_abi::{Attach, Confirm, ExitWrites, Info, Map, Page, Pin, Written};

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

    /// Pins the present pages of `[start, start + pages.len() pages)` of `pid` (`flags`:
    /// ppp_abi::PIN_*); fills `pages`.
    pub fn pin(&self, pid: u32, tag: u64, start: u64, flags: u32, pages: &mut [Page]) -> io::Result<u64> {
        let mut p = Pin { pid, flags, tag, start, nr_pages: pages.len() as u64, pages: pages.as_mut_ptr() as u64, nr_kept: 0 };
        // SAFETY: PIN reads and writes one `Pin` and writes `nr_pages` `Page`s at `pages`, which
        // borrows `pages` mutably for the call.
        unsafe { ioctl(&self.file, ppp_abi::IOC_PIN, &mut p) }?;
        Ok(p.nr_kept)
    }

    /// The page addresses the kernel writes into when the threads of the stopped `pid` exit.
    pub fn exit_writes(&self, pid: u32) -> io::Result<Vec<u64>> {
        let mut room = 64;
        loop {
            let mut addrs = vec![0u64; room];
            let mut e = ExitWrites { pid, nr: room as u32, addrs: addrs.as_mut_ptr() as u64 };
            // SAFETY: EXIT_WRITES reads and writes one `ExitWrites` and writes at most `nr` u64s
            // at `addrs`, which borrows `addrs` mutably for the call.
            match unsafe { ioctl(&self.file, ppp_abi::IOC_EXIT_WRITES, &mut e) } {
                Ok(()) => {
                    addrs.truncate(e.nr as usize);
                    return Ok(addrs);
                }
                Err(err) if err.raw_os_error() == Some(libc::ENOSPC) && e.nr as usize > room => room = e.nr as usize,
                Err(err) => return Err(err),
            }
        }
    }

    /// Makes the provisional pins of the (stopped) `pids` the checkpoint's, letting go of those
    /// of `drop` (PFNs).
    pub fn confirm(&self, tag: u64, pids: &[u32], drop: &[u64]) -> io::Result<()> {
        let mut c = Confirm { tag, pids: pids.as_ptr() as u64, drop: drop.as_ptr() as u64, nr_drop: drop.len() as u64, nr_pids: pids.len() as u32, pad: 0 };
        // SAFETY: CONFIRM reads one `Confirm`, `nr_pids` u32s at `pids` and `nr_drop` u64s at
        // `drop`, which borrow `pids` and `drop`.
        unsafe { ioctl(&self.file, ppp_abi::IOC_CONFIRM, &mut c) }
    }

    /// Which of the `nr_pages` pages from `start` of `pid` were written since their soft-dirty
    /// bits were last reset (bit i of word i / 64: page i), resetting them; race-free while the
    /// process runs.
    pub fn written(&self, pid: u32, start: u64, nr_pages: u64) -> io::Result<Vec<u64>> {
        let mut bits = vec![0u64; nr_pages.div_ceil(64) as usize];
        let mut w = Written { pid, pad: 0, start, nr_pages, bitmap: bits.as_mut_ptr() as u64, nr_written: 0 };
        // SAFETY: WRITTEN reads and writes one `Written` and writes (nr_pages + 63) / 64 u64s at
        // `bitmap`, which borrows `bits` mutably for the call.
        unsafe { ioctl(&self.file, ppp_abi::IOC_WRITTEN, &mut w) }?;
        Ok(bits)
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
