//! The page-server side of `criu pre-dump` / `criu dump`: receives one session over the socket
//! handed to CRIU with `--ps-socket` and writes the pages into FOAM files.
//!
//! Data is gathered into large writes (FUSE handles a 4 KiB write ~30× slower than a 1 MiB one),
//! and every page gets a CRC. The reply to OPEN2/PARENT says "a parent exists" only when the
//! client was started for an incremental pass (`--prev-images-dir` with `--track-mem`): CRIU then
//! checks its own parent inventory, and without one it aborts the dump.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::protocol::{Cmd, Header, ProtocolError, Target, HEADER_LEN, PAGE_SIZE, PE_PARENT, PE_PRESENT};
use crate::ranges::RangeMap;
use crate::spaces::Spaces;
use crate::{read_session, Error};

/// Writes are gathered up to this size.
const COALESCE: usize = 4 << 20;

/// What one session named per address space.
#[derive(Clone, Debug, Default)]
pub struct TargetReport {
    /// Every page the session named (data and PE_PARENT holes) with its lazy flag.
    pub ranges: RangeMap,
    pub pages_data: u64,
    pub pages_parent: u64,
}

#[derive(Clone, Debug, Default)]
pub struct SessionReport {
    pub targets: BTreeMap<Target, TargetReport>,
    pub pages_data: u64,
    pub pages_parent: u64,
    pub bytes: u64,
    pub elapsed: Duration,
}

pub struct Receiver<'a> {
    spaces: &'a Spaces,
    /// The previous pass's ranges: where PE_PARENT holes take their flags from.
    previous: &'a BTreeMap<Target, RangeMap>,
    has_parent: bool,
    /// Counts page bytes as they arrive (progress display).
    pub progress: Option<&'a AtomicU64>,
}

/// Pages waiting to be written in one go.
struct Pending {
    buf: Vec<u8>,
    fill: usize,
    target: Option<Target>,
    vaddr: u64,
}

impl<'a> Receiver<'a> {
    pub fn new(spaces: &'a Spaces, previous: &'a BTreeMap<Target, RangeMap>, has_parent: bool) -> Receiver<'a> {
        Receiver { spaces, previous, has_parent, progress: None }
    }

    /// Serves one session until CLOSE/FORCE_CLOSE. The written files are synced before the
    /// closing reply, so a dump CRIU reports as successful is durable.
    pub fn serve<S: Read + Write>(&self, sock: &mut S) -> Result<SessionReport, Error> {
        let start = Instant::now();
        let mut report = SessionReport::default();
        let mut pending = Pending { buf: vec![0; COALESCE], fill: 0, target: None, vaddr: 0 };
        let mut current: Option<Target> = None;
        let mut offset = 0usize;
        loop {
            let mut hb = [0u8; HEADER_LEN];
            read_session(sock, &mut hb)?;
            let h = Header::parse(&hb)?;
            if h.vaddr % PAGE_SIZE != 0 {
                return Err(ProtocolError::Unaligned { offset, vaddr: h.vaddr }.into());
            }
            offset += HEADER_LEN + h.payload_len() as usize;
            match h.cmd {
                Cmd::Open2 | Cmd::Open => {
                    let t = Target::decode(h.dst_id)?;
                    current = Some(t);
                    report.targets.entry(t).or_default();
                    self.spaces.get_or_create(t)?;
                    if h.cmd == Cmd::Open2 {
                        sock.write_all(&[self.has_parent as u8]).map_err(Error::Socket)?;
                    }
                }
                Cmd::Parent => {
                    Target::decode(h.dst_id)?;
                    sock.write_all(&(self.has_parent as i32).to_le_bytes()).map_err(Error::Socket)?;
                }
                Cmd::AddF | Cmd::Add | Cmd::Hole => {
                    let t = Target::decode(h.dst_id)?;
                    if current != Some(t) {
                        return Err(Error::Protocol(ProtocolError::BadTarget(h.dst_id)));
                    }
                    let flags = match h.cmd {
                        Cmd::Add => PE_PRESENT,
                        Cmd::Hole => PE_PARENT,
                        _ => h.flags,
                    };
                    let (start, end) = (h.vaddr, h.vaddr + h.nr_pages as u64 * PAGE_SIZE);
                    let tr = report.targets.get_mut(&t).unwrap();
                    if flags & PE_PRESENT != 0 {
                        self.receive_data(sock, &mut pending, t, h.vaddr, h.nr_pages as u64 * PAGE_SIZE)?;
                        tr.ranges.insert(start, end, flags);
                        tr.pages_data += h.nr_pages as u64;
                    } else if flags & PE_PARENT != 0 {
                        // Unchanged since the previous pass: the FOAM file already holds these pages.
                        let prev = self.previous.get(&t).map(|m| m.covered(start, end)).unwrap_or_default();
                        if prev.iter().map(|r| r.pages()).sum::<u64>() != h.nr_pages as u64 {
                            return Err(Error::ParentMissing { space: t.stem(), vaddr: start, pages: h.nr_pages });
                        }
                        for r in prev {
                            tr.ranges.insert(r.start, r.end, r.flags);
                        }
                        tr.pages_parent += h.nr_pages as u64;
                    } else {
                        // PE_LAZY alone: `dump --lazy-pages` keeps the data in the frozen task; kup never asks for that.
                        return Err(Error::Unsupported(format!("pages at {start:#x} of {} came without data (flags {:#x})", t.stem(), flags)));
                    }
                }
                Cmd::Close | Cmd::ForceClose => {
                    self.flush(&mut pending)?;
                    for t in report.targets.keys() {
                        self.spaces.get_or_create(*t)?.sync()?;
                    }
                    sock.write_all(&0i32.to_le_bytes()).map_err(Error::Socket)?;
                    break;
                }
                Cmd::Get => return Err(Error::Unsupported("a GET request in a dump session".into())),
            }
        }
        for tr in report.targets.values() {
            report.pages_data += tr.pages_data;
            report.pages_parent += tr.pages_parent;
        }
        report.bytes = report.pages_data * PAGE_SIZE;
        report.elapsed = start.elapsed();
        Ok(report)
    }

    fn receive_data<S: Read>(&self, sock: &mut S, p: &mut Pending, t: Target, vaddr: u64, len: u64) -> Result<(), Error> {
        let mut at = vaddr;
        let mut left = len as usize;
        while left > 0 {
            let contiguous = p.target == Some(t) && p.vaddr + p.fill as u64 == at;
            if !contiguous || p.fill == p.buf.len() {
                self.flush(p)?;
                p.target = Some(t);
                p.vaddr = at;
            }
            let n = left.min(p.buf.len() - p.fill);
            read_session(sock, &mut p.buf[p.fill..p.fill + n])?;
            p.fill += n;
            at += n as u64;
            left -= n;
            if let Some(c) = self.progress {
                c.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn flush(&self, p: &mut Pending) -> Result<(), Error> {
        if let (Some(t), true) = (p.target, p.fill > 0) {
            self.spaces.get_or_create(t)?.write_pages(p.vaddr, &p.buf[..p.fill])?;
        }
        p.fill = 0;
        p.target = None;
        Ok(())
    }
}
