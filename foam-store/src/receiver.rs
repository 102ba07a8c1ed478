//! The page-server side of `criu pre-dump` / `criu dump`: receives one session over the socket
//! handed to CRIU with `--ps-socket` and writes the pages into FOAM files.
//!
//! Data is gathered into runs of up to 1 MiB (FUSE handles a 4 KiB write ~30× slower than a 1 MiB
//! one, and 1 MiB is rpramfs's largest FUSE write), and every page gets a CRC. A writer thread
//! stores each run while the session thread receives and checksums the next ones, so CRIU, which
//! waits on a full socket while the app is frozen, is not held up by the store. On rpramfs a run
//! is received straight into blocks leased from the region ([`crate::direct`]), and the writer
//! checksums and commits it; elsewhere it goes through a page-aligned buffer and a write. The reply to
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

use crate::direct::{Lease, MAX_LEASE_PAGES};
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

/// Contiguous pages of one address space on their way to the store.
struct Run {
    /// Page-aligned (an anonymous mapping): an O_DIRECT write of a buffer that starts mid-page
    /// spans one page more than it holds, so FUSE would split every 1 MiB run into two requests,
    /// both ending mid-block.
    buf: memmap2::MmapMut,
    /// With direct writes the pages go into blocks leased from rpramfs instead of `buf`.
    lease: Option<(Arc<FoamFile>, Lease)>,
    fill: usize,
    target: Option<Target>,
    vaddr: u64,
    crcs: Vec<u8>,
}

impl Run {
    fn capacity(&self) -> usize {
        self.lease.as_ref().map_or(self.buf.len(), |(_, l)| l.pages() * PAGE_SIZE as usize)
    }

    /// Reads `n` bytes (whole pages, within the capacity) of page data from the session into
    /// the run.
    fn receive<S: Session>(&mut self, sock: &mut S, n: usize) -> Result<(), Error> {
        debug_assert!(self.fill + n <= self.capacity());
        match &mut self.lease {
            None => read_session(sock, &mut self.buf[self.fill..self.fill + n])?,
            Some((file, lease)) => {
                let page = PAGE_SIZE as usize;
                let (first, count) = (self.fill / page, n / page);
                if let Some(fd) = sock.unbuffered_fd() {
                    lease.receive(fd, first, count).map_err(session_error)?;
                } else {
                    // Through `buf`, which a leased run does not use otherwise.
                    let mut done = 0;
                    while done < count {
                        let k = (count - done).min(self.buf.len() / page);
                        read_session(sock, &mut self.buf[..k * page])?;
                        lease.write(first + done, &self.buf[..k * page]).map_err(|e| Error::io(std::path::Path::new(file.stem()), e))?;
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
            let run = Run { buf, lease: None, fill: 0, target: None, vaddr: 0, crcs: Vec::with_capacity(RUN_BYTES / 4096 * 4) };
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
                        let vaddr = lease.off();
                        file.commit_leased_pages(lease, &run.crcs)?;
                        crcs.add(&file, vaddr, &run.crcs)?;
                    } else if let Some(t) = run.target {
                        spaces.get_or_create(t)?.write_pages_with_crcs(run.vaddr, &run.buf[..run.fill], &run.crcs)?;
                    }
                    run.fill = 0;
                    run.target = None;
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

/// The CRCs of committed direct-write runs, gathered while the runs are contiguous and written to
/// the `.crc` file in one go: one FUSE write per contiguous range of a pass instead of one per
/// run, each a round trip through rpramfs's daemon while the app is frozen. The writer flushes
/// before it ends, so the session's closing reply still comes after every CRC is stored.
#[derive(Default)]
struct CrcBatch {
    pending: Option<(Arc<FoamFile>, u64, Vec<u8>)>,
}

impl CrcBatch {
    /// Past this many CRC bytes (64 Ki pages, 256 MiB of data) a batch is written anyway.
    const MAX_BYTES: usize = 256 << 10;

    fn add(&mut self, file: &Arc<FoamFile>, vaddr: u64, crcs: &[u8]) -> Result<(), Error> {
        if let Some((f, start, bytes)) = &mut self.pending {
            let end = *start + (bytes.len() / 4) as u64 * PAGE_SIZE;
            if Arc::ptr_eq(f, file) && end == vaddr && bytes.len() + crcs.len() <= Self::MAX_BYTES {
                bytes.extend_from_slice(crcs);
                return Ok(());
            }
            self.flush()?;
        }
        self.pending = Some((file.clone(), vaddr, crcs.to_vec()));
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Error> {
        match self.pending.take() {
            Some((f, vaddr, bytes)) => f.write_crcs(vaddr, &bytes),
            None => Ok(()),
        }
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
            let contiguous = run.target == Some(t) && run.vaddr + run.fill as u64 == at;
            if !contiguous || run.fill == run.capacity() {
                if run.fill > 0 {
                    let next = writer.take()?;
                    writer.store(std::mem::replace(run, next))?;
                }
                run.target = Some(t);
                run.vaddr = at;
                // Direct writes: blocks for the rest of this header's pages, or, when the pages
                // are coming in address order (this header goes on where the last run ended), as
                // many as a lease holds, so the next contiguous headers fill the same run: each
                // lease and commit is a round trip through rpramfs's daemon. A commit gives back
                // what a run left unused.
                run.lease = None;
                let file = self.spaces.get_or_create(t)?;
                if file.writes_directly() {
                    let needed = left / PAGE_SIZE as usize;
                    let pages = if contiguous { MAX_LEASE_PAGES } else { needed.min(MAX_LEASE_PAGES) };
                    // A store about to fill up may have room for this header but not for a
                    // whole lease ahead.
                    let lease = match file.lease(at, pages) {
                        Err(_) if pages > needed => file.lease(at, needed)?,
                        r => r?,
                    };
                    run.lease = Some((file, lease));
                }
            }
            let n = left.min(run.capacity() - run.fill);
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
