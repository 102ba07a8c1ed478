//! The GET server for `criu lazy-pages --page-server --ps-socket FD`: answers each request, in the
//! order received, from the FOAM files after checking every page's CRC.
//!
//! A reply may carry fewer pages than asked (CRIU asks again for the rest) but never zero and never
//! more. A page that fails its CRC ends the session: the restored process must not run on wrong
//! bytes, so the caller stops it.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::foam::FoamFile;
use crate::protocol::{Cmd, Header, HEADER_LEN, PAGE_SIZE};
use crate::ranges::RangeMap;
use crate::{read_session, Error};

/// Pages per reply at most: 4 MiB, as large as CRIU's background requests grow.
pub const MAX_REPLY_PAGES: u32 = 1024;

/// One restored task's memory: its FOAM file and the ranges it may ask for.
pub struct LazySpace {
    pub file: Arc<FoamFile>,
    pub lazy: RangeMap,
}

#[derive(Clone, Debug, Default)]
pub struct LazyReport {
    pub requests: u64,
    pub pages: u64,
    pub elapsed: Duration,
    /// Of `elapsed`, the time spent reading and checking pages, and sending them (until the
    /// socket took the last byte: that includes waiting for CRIU to read).
    pub reading: Duration,
    pub sending: Duration,
}

/// Serves GETs until CLOSE/FORCE_CLOSE. `spaces` is keyed by the pid in the checkpoint (GET's
/// `dst_id` is the bare pid).
pub fn serve<S: Read + Write>(sock: &mut S, spaces: &BTreeMap<u32, LazySpace>, pages_done: Option<&AtomicU64>) -> Result<LazyReport, Error> {
    let start = Instant::now();
    let mut report = LazyReport::default();
    let mut out = vec![0u8; HEADER_LEN + MAX_REPLY_PAGES as usize * PAGE_SIZE as usize];
    loop {
        let mut hb = [0u8; HEADER_LEN];
        read_session(sock, &mut hb)?;
        let h = Header::parse(&hb)?;
        let t = Instant::now();
        match h.cmd {
            Cmd::Get => {
                let pid = u32::try_from(h.dst_id).map_err(|_| Error::UnknownPage { space: format!("{:#x}", h.dst_id), vaddr: h.vaddr })?;
                let space = spaces.get(&pid).ok_or(Error::UnknownPage { space: pid.to_string(), vaddr: h.vaddr })?;
                let m = h.nr_pages.min(MAX_REPLY_PAGES);
                let end = h.vaddr + m as u64 * PAGE_SIZE;
                let known: u64 = space.lazy.covered(h.vaddr, end).iter().map(|r| r.pages()).sum();
                if m == 0 || h.vaddr % PAGE_SIZE != 0 || known != m as u64 {
                    return Err(Error::UnknownPage { space: pid.to_string(), vaddr: h.vaddr });
                }
                let len = m as usize * PAGE_SIZE as usize;
                out[..HEADER_LEN].copy_from_slice(&Header::get_reply(&h, m).encode());
                space.file.read_pages(h.vaddr, &mut out[HEADER_LEN..HEADER_LEN + len])?;
                report.reading += t.elapsed();
                let t = Instant::now();
                sock.write_all(&out[..HEADER_LEN + len]).map_err(Error::Socket)?;
                report.sending += t.elapsed();
                report.requests += 1;
                report.pages += m as u64;
                if let Some(c) = pages_done {
                    c.fetch_add(m as u64, Ordering::Relaxed);
                }
            }
            Cmd::Close | Cmd::ForceClose => {
                sock.write_all(&0i32.to_le_bytes()).map_err(Error::Socket)?;
                break;
            }
            other => return Err(Error::Unsupported(format!("{other:?} in a lazy-pages session"))),
        }
    }
    report.elapsed = start.elapsed();
    Ok(report)
}
