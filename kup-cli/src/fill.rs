//! The memory of an eager restore: FOAM's pages written straight into the restored process while
//! CRIU leaves it stopped, each page checked against its CRC first. One copy into the process (as
//! `criu restore` reads its own pages image) instead of writing CRIU's pages image into the store
//! and CRIU reading it back (four copies through FUSE), and no room in the store for that image.
//!
//! Pages go in with process_vm_writev(2); a page in a mapping the process may not write (a
//! read-only private file mapping CRIU restored with its dumped copy-on-write pages) goes through
//! /proc/PID/mem, which writes such pages as a debugger does. Reading and checking (FUSE and CRC)
//! runs on its own thread, one chunk ahead of the writes.

use std::fs::OpenOptions;
use std::io::IoSlice;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::{Duration, Instant};

use foam_store::foam::FoamFile;
use foam_store::ranges::RangeMap;
use nix::sys::uio::{process_vm_writev, RemoteIoVec};
use nix::unistd::Pid;

const PAGE: usize = 4096;
/// Pages read and checked per chunk (1 MiB): large enough that a FUSE read and a
/// process_vm_writev each move a lot per call, small enough to stay in the caches.
const CHUNK: usize = 256 * PAGE;
/// One chunk being read, one waiting, one being written.
const BUFFERS: usize = 3;

#[derive(Clone, Copy, Debug, Default)]
pub struct Filled {
    pub pages: u64,
    /// Of those, written through /proc/PID/mem (mappings the process may not write).
    pub forced: u64,
    /// Time spent reading and checking the pages, and writing them (the two overlap).
    pub read: Duration,
    pub write: Duration,
}

/// Writes the pages of `ranges` from `file` into the stopped process `pid`. On an error the
/// process holds some of its memory only: the caller must not let it run.
pub fn fill(pid: u32, file: &FoamFile, ranges: &RangeMap) -> Result<Filled, String> {
    let (to_writer, chunks) = sync_channel::<Result<(u64, Vec<u8>), String>>(1);
    let (to_reader, spare) = sync_channel::<Vec<u8>>(BUFFERS);
    std::thread::scope(|s| {
        let reader = s.spawn(move || read_chunks(file, ranges, to_writer, spare));
        let r = write_chunks(pid, &chunks, &to_reader);
        // Ends the reader if the writer stopped early: its next send or receive fails.
        drop(chunks);
        drop(to_reader);
        let read = reader.join().map_err(|_| "the thread reading the pages panicked".to_string())?;
        r.map(|f| Filled { read, ..f })
    })
}

/// Returns the time spent reading.
fn read_chunks(file: &FoamFile, ranges: &RangeMap, out: SyncSender<Result<(u64, Vec<u8>), String>>, spare: Receiver<Vec<u8>>) -> Duration {
    let mut busy = Duration::ZERO;
    let mut bufs = BUFFERS;
    for r in ranges.iter() {
        let mut at = r.start;
        while at < r.end {
            let len = ((r.end - at) as usize).min(CHUNK);
            let mut buf = if bufs > 0 {
                bufs -= 1;
                vec![0u8; CHUNK]
            } else {
                match spare.recv() {
                    Ok(b) => b,
                    Err(_) => return busy,
                }
            };
            buf.truncate(len);
            let t = Instant::now();
            let item = file.read_pages(at, &mut buf).map(|_| (at, buf)).map_err(|e| e.to_string());
            busy += t.elapsed();
            let failed = item.is_err();
            if out.send(item).is_err() || failed {
                return busy;
            }
            at += len as u64;
        }
    }
    busy
}

fn write_chunks(pid: u32, chunks: &Receiver<Result<(u64, Vec<u8>), String>>, spare: &SyncSender<Vec<u8>>) -> Result<Filled, String> {
    let mut done = Filled::default();
    let mut mem = None;
    for item in chunks {
        let (vaddr, mut buf) = item?;
        let t = Instant::now();
        let mut off = 0;
        while off < buf.len() {
            let local = [IoSlice::new(&buf[off..])];
            let remote = [RemoteIoVec { base: (vaddr as usize) + off, len: buf.len() - off }];
            match process_vm_writev(Pid::from_raw(pid as i32), &local, &remote) {
                // Whole pages: a partial write stops at the first page it cannot write.
                Ok(n) if n > 0 => off += n / PAGE * PAGE,
                Ok(_) | Err(nix::errno::Errno::EFAULT) => {
                    let f = match &mut mem {
                        Some(f) => f,
                        None => mem.insert(OpenOptions::new().write(true).open(format!("/proc/{pid}/mem")).map_err(|e| format!("/proc/{pid}/mem: {e}"))?),
                    };
                    let at = vaddr + off as u64;
                    f.write_all_at(&buf[off..off + PAGE], at).map_err(|e| format!("cannot write page {at:#x} into pid {pid}: {e}"))?;
                    done.forced += 1;
                    off += PAGE;
                }
                Err(e) => return Err(format!("cannot write pages {:#x}..{:#x} into pid {pid} (process_vm_writev): {e}", vaddr + off as u64, vaddr + buf.len() as u64)),
            }
        }
        done.pages += (buf.len() / PAGE) as u64;
        done.write += t.elapsed();
        buf.resize(CHUNK, 0);
        let _ = spare.send(buf);
    }
    Ok(done)
}
