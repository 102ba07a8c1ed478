//! The page-server side of `criu pre-dump` / `criu dump`: receives one session over the socket
//! handed to CRIU with `--ps-socket` and writes the pages into FOAM files.
//!
//! Data is gathered into runs of up to 1 MiB (FUSE handles a 4 KiB write ~30× slower than a 1 MiB
//! one, and 1 MiB is rpramfs's largest FUSE write), and every page gets a CRC. A writer thread
//! stores each run while the session thread receives and checksums the next ones, so CRIU, which
//! waits on a full socket while the app is frozen, is not held up by the store. On rpramfs a run
//! is received straight into blocks leased from the region ([`crate::direct`]), and the writer
//! checksums and commits it; there a run is a lease's worth of pages wherever they lie (up to
//! [`MAX_COMMIT_EXTENTS`] extents), so an app's scattered dirty pages cost as few round trips
//! through rpramfs's daemon as contiguous ones. Headers are read on their own (24 bytes), so that
//! page data is copied once, from the socket into the region: under emulation a copy costs more
//! than the read(2) a buffer for headers would save. Elsewhere a run is contiguous and goes through a
//! page-aligned buffer and a write. The reply to
//! OPEN2/PARENT says "a parent exists" only when the client was started for an incremental pass
//! (`--prev-images-dir` with `--track-mem`): CRIU then checks its own parent inventory, and without
//! one it aborts the dump.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver as ChannelRx, SyncSender};
use std::sync::Arc;
use std::thread::{Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use crate::direct::{Lease, MAX_COMMIT_EXTENTS, MAX_LEASE_PAGES};
use crate::foam::FoamFile;
use crate::protocol::{Cmd, Header, ProtocolError, Target, HEADER_LEN, PAGE_SIZE, PE_PARENT, PE_PRESENT};
use crate::ranges::RangeMap;
use crate::spaces::Spaces;
use crate::{read_session, session_error, Error};

/// Writes are gathered up to this size.
const RUN_BYTES: usize = 1 << 20;
/// Runs received but not yet stored (the memory the pipeline holds: 8 MiB).
const RUNS_IN_FLIGHT: usize = 8;

/// What one session named per address space.
#[derive(Clone, Debug, Default)]
pub struct TargetReport {
    /// Every page the session named (data and PE_PARENT holes) with its lazy flag.
    pub ranges: RangeMap,
    pub pages_data: u64,
    pub pages_parent: u64,
    /// With [`Receiver::parent_elsewhere`]: pages CRIU reported unchanged that no previous pass
    /// holds (kup keeps them another way, or copies them itself).
    pub unsent: RangeMap,
}

#[derive(Clone, Debug, Default)]
pub struct SessionReport {
    pub targets: BTreeMap<Target, TargetReport>,
    pub pages_data: u64,
    pub pages_parent: u64,
    pub bytes: u64,
    pub elapsed: Duration,
}

/// A page-server connection. One that reads straight from a descriptor, with no buffer of its own
/// in between (a socket), names it, so that page data goes from the socket straight into leased
/// blocks; any other is read into a buffer first and copied from there.
pub trait Session: Read + Write {
    fn unbuffered_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

impl Session for UnixStream {
    fn unbuffered_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_fd())
    }
}

pub struct Receiver<'a> {
    spaces: &'a Spaces,
    /// The previous pass's ranges: where PE_PARENT holes take their flags from.
    previous: &'a BTreeMap<Target, RangeMap>,
    has_parent: bool,
    /// PE_PARENT pages need not be in `previous` (see [`Receiver::parent_elsewhere`]).
    parent_elsewhere: bool,
    /// Counts page bytes as they arrive (progress display).
    pub progress: Option<&'a AtomicU64>,
    /// Runs when CRIU opens a task's pages stream, before the reply: CRIU has the task frozen
    /// and has not read its pagemap yet.
    before_open: Option<&'a OpenHook<'a>>,
}

/// See [`Receiver::before_open`].
pub type OpenHook<'a> = dyn Fn(Target) -> Result<(), String> + Sync + 'a;

/// Pages of one address space on their way to the store.
struct Run {
    /// Page-aligned (an anonymous mapping): an O_DIRECT write of a buffer that starts mid-page
    /// spans one page more than it holds, so FUSE would split every 1 MiB run into two requests,
    /// both ending mid-block.
    buf: memmap2::MmapMut,
    /// With direct writes the pages go into blocks leased from rpramfs instead of `buf`.
    lease: Option<(Arc<FoamFile>, Lease)>,
    fill: usize,
    target: Option<Target>,
    /// Where the pages go, in the order received: (vaddr, pages), ascending. Without a lease,
    /// one extent (the run is one write).
    extents: Vec<(u64, usize)>,
    crcs: Vec<u8>,
}

impl Run {
    fn capacity(&self) -> usize {
        self.lease.as_ref().map_or(self.buf.len(), |(_, l)| l.pages() * PAGE_SIZE as usize)
    }

    /// Where the last extent ends.
    fn end(&self) -> Option<u64> {
        self.extents.last().map(|&(v, n)| v + n as u64 * PAGE_SIZE)
    }

    /// Whether pages of `t` from `at` on can go on in this run: it has room, and they follow the
    /// last extent, or (leased) lie beyond it with room for another extent.
    fn takes(&self, t: Target, at: u64) -> bool {
        if self.target != Some(t) || self.fill == self.capacity() {
            return false;
        }
        match self.end() {
            Some(end) if end == at => true,
            Some(end) => self.lease.is_some() && at > end && self.extents.len() < MAX_COMMIT_EXTENTS,
            None => false,
        }
    }

    /// Records that the next `pages` pages received go to `at`.
    fn push(&mut self, at: u64, pages: usize) {
        if self.end() == Some(at) {
            self.extents.last_mut().expect("an extent ends at `at`").1 += pages;
        } else {
            self.extents.push((at, pages));
        }
    }

    /// Reads `n` bytes (whole pages, within the capacity) of page data from the session into
    /// the run.
    fn receive<S: Session>(&mut self, sock: &mut S, n: usize) -> Result<(), Error> {
        debug_assert!(self.fill + n <= self.capacity());
        match &mut self.lease {
            None => read_session(sock, &mut self.buf[self.fill..self.fill + n])?,
            Some((file, lease)) => {
                if let Some(fd) = sock.unbuffered_fd() {
                    lease.receive(fd, self.fill, n).map_err(session_error)?;
                } else {
                    // Through `buf`, which a leased run does not use otherwise.
                    let mut done = 0;
                    while done < n {
                        let k = (n - done).min(self.buf.len());
                        read_session(sock, &mut self.buf[..k])?;
                        lease.write(self.fill + done, &self.buf[..k]).map_err(|e| Error::io(std::path::Path::new(file.stem()), e))?;
                        done += k;
                    }
                }
            }
        }
        self.fill += n;
        Ok(())
    }

    /// The CRC of every page received.
    fn checksum(&mut self) -> Result<(), Error> {
        match &self.lease {
            None => crate::foam::page_crcs(&self.buf[..self.fill], &mut self.crcs),
            Some((file, lease)) => file.leased_page_crcs(lease, self.fill / PAGE_SIZE as usize, &mut self.crcs)?,
        }
        Ok(())
    }
}

/// The writer thread and the channels to it: full runs go there, emptied ones come back.
struct Writer<'scope> {
    full: Option<SyncSender<Run>>,
    empty: ChannelRx<Run>,
    thread: Option<ScopedJoinHandle<'scope, Result<(), Error>>>,
}

impl<'scope> Writer<'scope> {
    fn start<'env>(scope: &'scope Scope<'scope, 'env>, spaces: &'env Spaces) -> Result<Writer<'scope>, Error> {
        let (full, full_rx) = sync_channel::<Run>(RUNS_IN_FLIGHT);
        let (empty_tx, empty) = sync_channel::<Run>(RUNS_IN_FLIGHT);
        for _ in 0..RUNS_IN_FLIGHT {
            let buf = memmap2::MmapMut::map_anon(RUN_BYTES).map_err(|e| Error::io(std::path::Path::new("(receive buffer)"), e))?;
            let run = Run { buf, lease: None, fill: 0, target: None, extents: Vec::new(), crcs: Vec::with_capacity(RUN_BYTES / 4096 * 4) };
            empty_tx.send(run).expect("the channel has room for every run");
        }
        let thread = std::thread::Builder::new()
            .name("foam-writer".into())
            .spawn_scoped(scope, move || {
                let mut crcs = CrcBatch::default();
                for mut run in full_rx {
                    if run.lease.is_some() {
                        // With direct writes this thread has nothing else to do but the commit,
                        // and the session thread's copy is the only other work per byte.
                        run.checksum()?;
                        let (file, lease) = run.lease.take().expect("checked above");
                        file.commit_leased_pages(lease, &run.extents, &run.crcs)?;
                        let mut at = 0;
                        for &(vaddr, n) in &run.extents {
                            crcs.add(&file, vaddr, &run.crcs[at..at + 4 * n])?;
                            at += 4 * n;
                        }
                    } else if let (Some(t), Some(&(vaddr, _))) = (run.target, run.extents.first()) {
                        spaces.get_or_create(t)?.write_pages_with_crcs(vaddr, &run.buf[..run.fill], &run.crcs)?;
                    }
                    run.fill = 0;
                    run.target = None;
                    run.extents.clear();
                    // The session may have ended (an error): nobody takes the run back then.
                    let _ = empty_tx.send(run);
                }
                crcs.flush()
            })
            .expect("spawning the FOAM writer thread");
        Ok(Writer { full: Some(full), empty, thread: Some(thread) })
    }

    /// An empty run; waits while all runs are in flight.
    fn take(&mut self) -> Result<Run, Error> {
        match self.empty.recv() {
            Ok(run) => Ok(run),
            Err(_) => Err(self.finish().err().unwrap_or_else(stopped)),
        }
    }

    /// Hands a filled run to the writer, checksumming it first unless it is leased. (Through FUSE,
    /// checksumming here while the writer waits for the store measured faster under emulation
    /// than a CRC stage of its own or checksumming in the writer; with direct writes, where the
    /// daemon does no per-byte work, the writer checksums.)
    fn store(&mut self, mut run: Run) -> Result<(), Error> {
        if run.lease.is_none() {
            run.checksum()?;
        }
        let sent = self.full.as_ref().map(|f| f.send(run).is_ok()).unwrap_or(false);
        if sent {
            Ok(())
        } else {
            Err(self.finish().err().unwrap_or_else(stopped))
        }
    }

    /// Waits until every run handed over is stored; the writer's error if it failed.
    fn finish(&mut self) -> Result<(), Error> {
        self.full = None;
        match self.thread.take() {
            Some(t) => t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
            None => Ok(()),
        }
    }
}

/// The CRCs of committed direct-write runs, gathered and written to the `.crc` file a span at a
/// time instead of one write per extent (each a round trip through rpramfs's daemon while the app
/// is frozen). Extents whose CRCs lie within one 4 KiB block of each other in the `.crc` file
/// (4 MiB of address space) share a span; a span with gaps is read first, so the CRCs of the
/// pages in between (stored by an earlier pass) stay as they are: two round trips per span
/// however scattered its pages. The writer flushes before it ends, so the session's closing
/// reply still comes after every CRC is stored.
#[derive(Default)]
struct CrcBatch {
    file: Option<Arc<FoamFile>>,
    spans: Vec<CrcSpan>,
    bytes: usize,
}

/// CRCs of the pages from `vaddr` on: `crcs[r]` for each `r` in `known` are new, the rest are
/// the stored ones (read at the flush).
struct CrcSpan {
    vaddr: u64,
    crcs: Vec<u8>,
    known: Vec<std::ops::Range<usize>>,
}

impl CrcSpan {
    fn end(&self) -> u64 {
        self.vaddr + (self.crcs.len() / 4) as u64 * PAGE_SIZE
    }
}

impl CrcBatch {
    /// Past this many CRC bytes (64 Ki pages, 256 MiB of address space) a batch is written anyway.
    const MAX_BYTES: usize = 256 << 10;
    /// Extents closer than this (one 4 KiB block of CRCs) go into one span.
    const GAP_PAGES: u64 = 1024;

    fn add(&mut self, file: &Arc<FoamFile>, vaddr: u64, crcs: &[u8]) -> Result<(), Error> {
        let same_file = self.file.as_ref().is_some_and(|f| Arc::ptr_eq(f, file));
        let in_order = self.spans.last().is_none_or(|s| s.end() <= vaddr);
        if !same_file || !in_order || self.bytes + crcs.len() > Self::MAX_BYTES {
            self.flush()?;
            self.file = Some(file.clone());
        }
        match self.spans.last_mut() {
            Some(s) if (vaddr - s.end()) / PAGE_SIZE < Self::GAP_PAGES => {
                let gap = ((vaddr - s.end()) / PAGE_SIZE * 4) as usize;
                s.crcs.resize(s.crcs.len() + gap, 0);
                let at = s.crcs.len();
                s.crcs.extend_from_slice(crcs);
                match s.known.last_mut() {
                    Some(r) if r.end == at => r.end += crcs.len(),
                    _ => s.known.push(at..at + crcs.len()),
                }
                self.bytes += gap + crcs.len();
            }
            _ => {
                let known = std::iter::once(0..crcs.len()).collect();
                self.spans.push(CrcSpan { vaddr, crcs: crcs.to_vec(), known });
                self.bytes += crcs.len();
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Error> {
        let Some(file) = self.file.take() else { return Ok(()) };
        for s in std::mem::take(&mut self.spans) {
            if s.known.len() == 1 && s.known[0] == (0..s.crcs.len()) {
                file.write_crcs(s.vaddr, &s.crcs)?;
            } else {
                let mut stored = vec![0u8; s.crcs.len()];
                file.read_crcs(s.vaddr, &mut stored)?;
                for r in s.known {
                    stored[r.clone()].copy_from_slice(&s.crcs[r]);
                }
                file.write_crcs(s.vaddr, &stored)?;
            }
        }
        self.bytes = 0;
        Ok(())
    }
}

fn stopped() -> Error {
    Error::Unsupported("the FOAM writer thread stopped without an error".into())
}

impl<'a> Receiver<'a> {
    pub fn new(spaces: &'a Spaces, previous: &'a BTreeMap<Target, RangeMap>, has_parent: bool) -> Receiver<'a> {
        Receiver { spaces, previous, has_parent, parent_elsewhere: false, progress: None, before_open: None }
    }

    /// `f` runs when CRIU opens the pages stream of a task (OPEN2 of a pid), before the reply: the
    /// task is frozen and CRIU reads its pagemap only after the reply. An error ends the session
    /// (CRIU then fails the dump).
    pub fn before_open(mut self, f: &'a OpenHook<'a>) -> Receiver<'a> {
        self.before_open = Some(f);
        self
    }

    /// A final dump whose "parent" is no earlier pass (PPP: the pages stay in the app's memory):
    /// OPEN2 says a parent exists for tasks' address spaces, and the pages CRIU reports unchanged
    /// go into [`TargetReport::unsent`] instead of failing the session. Shared memory has no such
    /// parent (its pages are not kept in place), so CRIU sends all of it.
    pub fn parent_elsewhere(mut self) -> Receiver<'a> {
        self.has_parent = true;
        self.parent_elsewhere = true;
        self
    }

    fn has_parent_for(&self, t: Target) -> bool {
        self.has_parent && !(self.parent_elsewhere && matches!(t, Target::Shmem(_)))
    }

    /// Serves one session until CLOSE/FORCE_CLOSE. The written files are synced before the
    /// closing reply, so a dump CRIU reports as successful is durable.
    pub fn serve<S: Session>(&self, sock: &mut S) -> Result<SessionReport, Error> {
        let start = Instant::now();
        let mut report = std::thread::scope(|scope| {
            let mut writer = Writer::start(scope, self.spaces)?;
            let r = self.session(sock, &mut writer);
            // On an error the writer still finishes what it has (and its own error, if any, is
            // the cause: the session saw only the closed channel).
            let w = writer.finish();
            match w {
                Err(e) => Err(e),
                Ok(()) => r,
            }
        })?;
        for tr in report.targets.values() {
            report.pages_data += tr.pages_data;
            report.pages_parent += tr.pages_parent;
        }
        report.bytes = report.pages_data * PAGE_SIZE;
        report.elapsed = start.elapsed();
        Ok(report)
    }

    /// The session's commands, up to and including the closing reply.
    fn session<S: Session>(&self, sock: &mut S, writer: &mut Writer) -> Result<SessionReport, Error> {
        let mut report = SessionReport::default();
        let mut pending = writer.take()?;
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
                    if let (Some(f), Target::Pid(_)) = (self.before_open, t) {
                        f(t).map_err(Error::Refused)?;
                    }
                    if h.cmd == Cmd::Open2 {
                        sock.write_all(&[self.has_parent_for(t) as u8]).map_err(Error::Socket)?;
                    }
                }
                Cmd::Parent => {
                    let t = Target::decode(h.dst_id)?;
                    sock.write_all(&(self.has_parent_for(t) as i32).to_le_bytes()).map_err(Error::Socket)?;
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
                        self.receive_data(sock, writer, &mut pending, t, h.vaddr, h.nr_pages as u64 * PAGE_SIZE)?;
                        tr.ranges.insert(start, end, flags);
                        tr.pages_data += h.nr_pages as u64;
                    } else if flags & PE_PARENT != 0 {
                        // Unchanged since the previous pass: the FOAM file already holds these pages.
                        let prev = self.previous.get(&t).map(|m| m.covered(start, end)).unwrap_or_default();
                        if self.parent_elsewhere && prev.is_empty() {
                            tr.unsent.insert(start, end, PE_PRESENT);
                            tr.pages_parent += h.nr_pages as u64;
                            continue;
                        }
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
                    if pending.fill > 0 {
                        writer.store(pending)?;
                    }
                    writer.finish()?;
                    for t in report.targets.keys() {
                        self.spaces.get_or_create(*t)?.sync()?;
                    }
                    sock.write_all(&0i32.to_le_bytes()).map_err(Error::Socket)?;
                    break;
                }
                Cmd::Get => return Err(Error::Unsupported("a GET request in a dump session".into())),
            }
        }
        Ok(report)
    }

    fn receive_data<S: Session>(&self, sock: &mut S, writer: &mut Writer, run: &mut Run, t: Target, vaddr: u64, len: u64) -> Result<(), Error> {
        let mut at = vaddr;
        let mut left = len as usize;
        while left > 0 {
            if !run.takes(t, at) {
                if run.fill > 0 {
                    let next = writer.take()?;
                    writer.store(std::mem::replace(run, next))?;
                }
                run.target = Some(t);
                run.extents.clear();
                // Direct writes: a lease's worth of blocks, which the next headers of this address
                // space fill wherever their pages lie (each lease and commit is a round trip
                // through rpramfs's daemon). A commit gives back what a run left unused.
                run.lease = None;
                let file = self.spaces.get_or_create(t)?;
                if file.writes_directly() {
                    let needed = (left / PAGE_SIZE as usize).min(MAX_LEASE_PAGES);
                    // A store about to fill up may have room for this header but not for a
                    // whole lease ahead.
                    let lease = match file.lease(MAX_LEASE_PAGES) {
                        Err(_) if MAX_LEASE_PAGES > needed => file.lease(needed)?,
                        r => r?,
                    };
                    run.lease = Some((file, lease));
                }
            }
            let n = left.min(run.capacity() - run.fill);
            run.push(at, n / PAGE_SIZE as usize);
            run.receive(sock, n)?;
            at += n as u64;
            left -= n;
            if let Some(c) = self.progress {
                c.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}
