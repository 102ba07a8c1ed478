//! PPP, persistent physical pages: the apps' private anonymous pages stay where they are across
//! kexec instead of being copied into the store and back (kmod/ppp.c, docs/ppp.md).
//!
//! The arena is the kernel command line's `memmap=SIZE$START` reservation, hot-added by ppp.ko as
//! movable memory on every boot (`kup ppp attach`, or `kup resume` on the new kernel). Before the
//! final dump, while the apps run, every present page of theirs gets a provisional reference and
//! a CRC ([`pin_running`]); with the apps frozen, the pages written since get theirs again
//! ([`settle_frozen`]), and every kept page's PFN and CRC go into a PFN list per process in the
//! checkpoint ([`write_list`]); pages PPP cannot keep (outside the arena, shared, not anonymous)
//! go the FOAM way. On the new kernel the arena comes
//! online with those PFNs held back, and restore maps them into the restored processes before
//! they run, each checked against its CRC first.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use foam_store::manifest::{PppList, PppPages};
use foam_store::ranges::RangeMap;
use ppp_abi::{ListHead, ListRun, Page, Why};
use zerocopy::{FromBytes, IntoBytes};

use crate::error::{fail, Result};
use crate::ppp_dev::Device;

pub const DEVICE: &str = "/dev/kup_ppp";
/// The module's name (ppp.ko), for modprobe.
const MODULE: &str = "ppp";
/// Pages per PIN request.
const PIN_CHUNK: usize = 1 << 16;
const PAGE: u64 = 4096;

/// The arena: a `memmap=SIZE$START` reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arena {
    pub start: u64,
    pub size: u64,
}

impl std::fmt::Display for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{:#x}, {:#x}) ({})", self.start, self.start + self.size, crate::report::bytes(self.size))
    }
}

impl Arena {
    /// The one `memmap=SIZE$START` entry of a kernel command line (None without one).
    pub fn from_cmdline(cmdline: &str) -> Result<Option<Arena>> {
        let mut found = vec![];
        for word in cmdline.split_whitespace() {
            let Some(v) = word.strip_prefix("memmap=") else { continue };
            for one in v.split(',') {
                if let Some((size, start)) = one.split_once('$') {
                    let (size, start) = (memparse(size), memparse(start));
                    match (size, start) {
                        (Some(size), Some(start)) if size > 0 => found.push(Arena { start, size }),
                        _ => return fail(format!("cannot read the arena reservation memmap={one} of the kernel command line (want memmap=SIZE$START, e.g. memmap=2G$4G)")),
                    }
                }
            }
        }
        match found.len() {
            0 => Ok(None),
            1 => Ok(Some(found[0])),
            _ => fail(format!("the kernel command line reserves {} memmap=SIZE$START ranges; PPP uses exactly one as its arena", found.len())),
        }
    }

    pub fn running() -> Result<Option<Arena>> {
        let line = std::fs::read_to_string("/proc/cmdline").map_err(|e| format!("/proc/cmdline: {e}"))?;
        Arena::from_cmdline(&line)
    }

    fn contains(&self, pfn: u64) -> bool {
        pfn * PAGE >= self.start && pfn * PAGE < self.start + self.size
    }
}

/// The kernel's memparse: a number (decimal or 0x hex) with an optional K/M/G/T suffix.
fn memparse(s: &str) -> Option<u64> {
    let (num, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        b'T' | b't' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let n = match num.strip_prefix("0x").or_else(|| num.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok()?,
        None => num.parse().ok()?,
    };
    n.checked_mul(1 << shift)
}

/// The module's device, loading the module first when it is not there.
pub fn open() -> Result<Device> {
    if !Path::new(DEVICE).exists() {
        let out = std::process::Command::new("modprobe").arg(MODULE).output();
        let release = crate::procs::kernel_release();
        let why = match out {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(String::from_utf8_lossy(&o.stderr).trim().to_string()),
            Err(e) => Some(format!("cannot run modprobe: {e}")),
        };
        if let Some(why) = why {
            return fail(format!(
                "no PPP module for kernel {release}: {DEVICE} is missing and `modprobe {MODULE}` failed ({why}); build it with `scripts/kmod/build.sh {release}` (or install kup's DKMS package), or update without --ppp (FOAM)"
            ));
        }
        let waited = std::time::Instant::now();
        while !Path::new(DEVICE).exists() {
            if waited.elapsed() > Duration::from_secs(5) {
                return fail(format!("`modprobe {MODULE}` succeeded but {DEVICE} did not appear"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Device::open(DEVICE).map_err(|e| format!("{DEVICE}: {e}").into())
}

/// Hot-adds the arena of the running command line with `held` PFNs kept back, and brings its
/// memory blocks online as movable memory. An arena already attached is accepted only when it is
/// the same and nothing has to be held.
pub fn attach(dev: &Device, arena: Arena, held: &[u64]) -> Result<()> {
    let info = dev.info().map_err(|e| format!("{DEVICE}: {e}"))?;
    if info.state & ppp_abi::STATE_ATTACHED != 0 {
        let now = Arena { start: info.arena_start, size: info.arena_size };
        if now != arena {
            return fail(format!("ppp.ko already runs the arena {now}, not {arena}"));
        }
        if !held.is_empty() && info.held_pages < held.len() as u64 {
            return fail(format!(
                "the arena {arena} came online before the checkpoint's {} pages could be held back: they may have been handed out; restore without PPP is impossible for these pages",
                held.len()
            ));
        }
        return Ok(());
    }
    if let Some(&pfn) = held.iter().find(|&&p| !arena.contains(p)) {
        return fail(format!("the checkpoint names PFN {pfn:#x}, outside the arena {arena}"));
    }
    dev.attach(arena.start, arena.size, held).map_err(|e| match e.raw_os_error() {
        Some(libc::EADDRINUSE) => format!("the arena {arena} is ordinary RAM on this kernel: it was booted without memmap=SIZE$START (see dmesg)"),
        Some(libc::ENXIO) => format!("the arena {arena} is not wholly a memmap= reservation on this kernel (see dmesg and /proc/iomem)"),
        Some(libc::EINVAL) => format!("the arena {arena} is not aligned to the kernel's memory block size ({}), or a held PFN is outside it", crate::report::bytes(info.block_size)),
        _ => format!("attaching the arena {arena}: {e} (see dmesg)"),
    })?;
    online_blocks(arena, info.block_size)
}

/// Onlines the arena's memory blocks as movable memory, so that only user pages land there.
fn online_blocks(arena: Arena, block_size: u64) -> Result<()> {
    for n in arena.start / block_size..(arena.start + arena.size) / block_size {
        let state = format!("/sys/devices/system/memory/memory{n}/state");
        let now = std::fs::read_to_string(&state).map_err(|e| format!("{state}: {e}"))?;
        if now.trim() == "offline" {
            std::fs::write(&state, "online_movable").map_err(|e| format!("onlining {state}: {e}"))?;
        }
    }
    Ok(())
}

/// `kup ppp attach`: the arena online with nothing held (a boot with no checkpoint to resume;
/// `kup resume` attaches it with the checkpoint's pages held back instead). Refused while the
/// store (when mounted) records a PPP update still to resume: its pages would be handed out.
/// `if_reserved`: without an arena on the command line, do nothing (for boot scripts).
pub fn attach_at_boot(store: &Path, if_reserved: bool) -> Result<()> {
    let Some(arena) = Arena::running()? else {
        if if_reserved {
            return Ok(());
        }
        return fail("the kernel command line reserves no arena: add memmap=SIZE$START (e.g. memmap=2G$4G; aligned to the memory block size, see docs/ppp.md)");
    };
    if let Some(rec) = crate::record::UpdateRecord::load(store)? {
        if !rec.state.is_finished() && rec.ppp.is_some() {
            return fail(format!(
                "the update to {} in {} keeps its apps' pages in the arena and is not resumed yet ({}): run `kup resume`, which attaches the arena with those pages held back",
                rec.new.release,
                store.display(),
                rec.state.describe()
            ));
        }
    }
    let dev = open()?;
    attach(&dev, arena, &[])?;
    let info = dev.info().map_err(|e| format!("{DEVICE}: {e}"))?;
    println!("ppp: arena {arena} online as movable memory (memory blocks of {})", crate::report::bytes(info.block_size));
    Ok(())
}

/// `kup ppp status`.
pub fn status(json: bool) -> Result<()> {
    let arena = Arena::running()?;
    let info = if Path::new(DEVICE).exists() { Some(Device::open(DEVICE).and_then(|d| d.info()).map_err(|e| format!("{DEVICE}: {e}"))?) } else { None };
    if json {
        crate::report::print_json(&serde_json::json!({
            "arena": arena.map(|a| serde_json::json!({ "start": a.start, "size": a.size })),
            "module": info.is_some(),
            "attached": info.is_some_and(|i| i.state & ppp_abi::STATE_ATTACHED != 0),
            "held_pages": info.map(|i| i.held_pages),
            "pinned_pages": info.map(|i| i.pinned_pages),
            "provisional": info.is_some_and(|i| i.state & ppp_abi::STATE_PROVISIONAL != 0),
            "guarded_pages": info.map(|i| i.guarded_pages),
        }));
        return Ok(());
    }
    println!("arena:  {}", arena.map_or("none (no memmap=SIZE$START on the command line)".into(), |a| a.to_string()));
    match info {
        None => println!("module: not loaded ({DEVICE} missing)"),
        Some(i) => {
            let attached = i.state & ppp_abi::STATE_ATTACHED != 0;
            println!("module: ppp.ko ABI {}, memory blocks of {}", i.abi_version, crate::report::bytes(i.block_size));
            println!("state:  {}", if attached { "attached (the arena is movable memory)" } else { "loaded, arena not attached" });
            let provisional = if i.state & ppp_abi::STATE_PROVISIONAL != 0 { " (provisionally: its apps still run)" } else { "" };
            println!("pages:  {} held back for a restore, {} pinned by a checkpoint{provisional}, {} kept intact until the apps are healthy", i.held_pages, i.pinned_pages, i.guarded_pages);
        }
    }
    Ok(())
}

/// What `kup update` found about PPP before anything stops.
pub struct Plan {
    pub arena: Arena,
    /// ppp.ko for the new kernel.
    pub module_new: String,
    /// The apps' present pages inside and outside the arena, and the arena's free pages.
    pub in_arena: u64,
    pub outside: u64,
    pub arena_free: Option<u64>,
}

impl Plan {
    pub fn describe(&self) -> String {
        format!(
            "PPP: {} of the apps' {} pages lie in the arena {} ({}), and stay in place; {} go into the store; ppp.ko for the new kernel: {}",
            self.in_arena,
            self.in_arena + self.outside,
            self.arena,
            self.arena_free.map_or("its free pages unknown".into(), |f| format!("{f} pages free")),
            self.outside,
            self.module_new
        )
    }
}

/// The preflight of an update with PPP: each error names the problem and the fix.
pub fn plan_update(new_release: &str, new_cmdline: &str, pids: &[u32]) -> Result<Plan> {
    let Some(arena) = Arena::running()? else {
        return fail("the running kernel reserves no PPP arena (memmap=SIZE$START on its command line, e.g. memmap=2G$4G; docs/ppp.md)");
    };
    match Arena::from_cmdline(new_cmdline)? {
        Some(a) if a == arena => {}
        Some(a) => return fail(format!("the new command line reserves {a} as PPP arena, not the running {arena}: the new kernel would hand out the kept pages; keep the running memmap= in --append")),
        None => return fail(format!("the new command line has no memmap=SIZE$START: the new kernel would hand out the pages kept in the arena {arena}; keep the running memmap= in --append")),
    }
    let dev = open()?;
    let info = dev.info().map_err(|e| format!("{DEVICE}: {e}"))?;
    if info.state & ppp_abi::STATE_ATTACHED == 0 {
        return fail(format!("the arena {arena} is not attached, so no app's pages are in it: run `kup ppp attach` at boot, before the apps start"));
    }
    let module_new = module_for(new_release).ok_or_else(|| {
        format!("no ppp.ko for the new kernel {new_release} (none in /lib/modules/{new_release}/modules.dep): build it with `scripts/kmod/build.sh {new_release}` or install it with DKMS (`dkms autoinstall -k {new_release}`), or update without PPP (--no-ppp)")
    })?;
    let (mut in_arena, mut outside) = (0, 0);
    for &pid in pids {
        for pid in crate::procs::Process::inspect(pid)?.tree() {
            let (i, o) = pages_by_place(pid, arena)?;
            in_arena += i;
            outside += o;
        }
    }
    let arena_free = movable_free_pages();
    if in_arena < outside {
        return fail(format!(
            "only {in_arena} of the apps' {} pages lie in the arena {arena} ({}): PPP would keep little of them. Start the apps after `kup ppp attach` (or enlarge the arena), or update without PPP (--no-ppp)",
            in_arena + outside,
            arena_free.map_or("free pages unknown".into(), |f| format!("{f} pages free"))
        ));
    }
    Ok(Plan { arena, module_new, in_arena, outside, arena_free })
}

/// Where modprobe finds ppp.ko for kernel `release`, if anywhere.
fn module_for(release: &str) -> Option<String> {
    let dir = format!("/lib/modules/{release}");
    let dep = std::fs::read_to_string(format!("{dir}/modules.dep")).ok()?;
    dep.lines()
        .filter_map(|l| l.split(':').next())
        .filter(|m| m.rsplit('/').next().is_some_and(|f| f == "ppp.ko" || f.starts_with("ppp.ko.")))
        .map(|m| format!("{dir}/{m}"))
        .find(|path| Path::new(path).is_file())
}

/// Free pages of the movable zone (the arena's) from /proc/zoneinfo.
fn movable_free_pages() -> Option<u64> {
    let z = std::fs::read_to_string("/proc/zoneinfo").ok()?;
    let at = z.find("zone  Movable")?;
    z[at..].lines().find_map(|l| l.trim().strip_prefix("pages free").and_then(|v| v.trim().parse().ok()))
}

/// (present pages in the arena, outside it) of `pid`'s private mappings.
pub fn pages_by_place(pid: u32, arena: Arena) -> Result<(u64, u64)> {
    let (mut inside, mut outside) = (0, 0);
    each_pagemap_word(pid, |_, _, w| {
        if w & PM_PRESENT != 0 {
            if arena.contains(w & PM_PFN) {
                inside += 1;
            } else {
                outside += 1;
            }
        }
    })?;
    Ok((inside, outside))
}

/// `kup ppp pin --pid P`: pins a process's pages as a checkpoint would, and unpins them again;
/// the module refuses a process that is not stopped by CRIU. With `running`, pins it
/// provisionally (as the passes before the freeze do) and then asks to confirm those pins, which
/// the module refuses unless the process is stopped; it drops them when kup exits.
pub fn pin_for_test(pid: u32, running: bool) -> Result<()> {
    let dev = open()?;
    let tag = tag(&format!("kup ppp pin {pid}"));
    if running {
        let pins = pin_running(&dev, pid, tag, false)?;
        println!("pinned {} pages of the running process {pid} provisionally", pins.entries.len());
        return dev.confirm(tag, &[pid], &[]).map_err(|e| match e.raw_os_error() {
            Some(libc::EPERM) => format!("confirming the pins of process {pid}: it is not stopped by CRIU (only a process being checkpointed can be pinned); the module drops them as kup exits").into(),
            _ => format!("confirming the pins of process {pid}: {e}").into(),
        });
    }
    let mut pinned = Pinned { pid, ..Pinned::default() };
    let pinned = pin_ranges(&dev, pid, tag, 0, &present_runs(pid)?, &mut pinned).map(|()| pinned);
    let _ = dev.unpin(tag);
    let p = pinned?;
    println!("pinned {} pages of process {pid} (and unpinned them)", p.entries.len());
    Ok(())
}

/// This boot's id: PPP pages are kept for the next kernel only.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// One page kept in place: where it is mapped, its frame, its CRC at checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeptPage {
    pub vaddr: u64,
    pub pfn: u64,
    pub crc: u32,
}

/// What PIN kept of one process.
#[derive(Clone, Default)]
pub struct Pinned {
    pub pid: u32,
    /// In address order.
    pub entries: Vec<KeptPage>,
    /// Present pages not kept: (vaddr, reason), in address order.
    pub refused: Vec<(u64, Why)>,
    /// Kept pages whose CRC was taken while the app was frozen (written since the pins).
    pub crc_frozen: u64,
    /// Frames pinned for entries since dropped (written into another frame, unmapped), and the
    /// frames of the entries re-pins added that still are entries: CONFIRM lets go of the first
    /// but not of the second (a page written in place, or moved by mremap, keeps its frame).
    let_go: Vec<u64>,
    repinned: std::collections::HashSet<u64>,
}

impl Pinned {
    /// The frames pinned for this process that no entry uses, ascending.
    pub fn unused_frames(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.let_go.iter().copied().filter(|pfn| !self.repinned.contains(pfn)).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// All its frames, for a process the final dump did not name.
    pub fn all_frames(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.let_go.iter().chain(self.entries.iter().map(|e| &e.pfn)).copied().collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Present pages not kept, by reason.
    pub fn not_kept(&self) -> BTreeMap<Why, u64> {
        let mut m = BTreeMap::new();
        for (_, w) in &self.refused {
            *m.entry(*w).or_default() += 1;
        }
        m
    }
}

/// Pins the present pages of `pid` in the `[start, end)` `ranges`, with `flags`
/// (ppp_abi::PIN_*), appending to `out`.
fn pin_ranges(dev: &Device, pid: u32, tag: u64, flags: u32, ranges: &[(u64, u64)], out: &mut Pinned) -> Result<()> {
    let mut pages = vec![Page::default(); PIN_CHUNK];
    for &(start, end) in ranges {
        let mut at = start;
        while at < end {
            let n = (((end - at) / PAGE) as usize).min(PIN_CHUNK);
            dev.pin(pid, tag, at, flags, &mut pages[..n]).map_err(|e| match e.raw_os_error() {
                Some(libc::EPERM) => format!("pinning process {pid}: it is not stopped by CRIU (only a process being checkpointed can be pinned)"),
                Some(libc::EBUSY) => format!("pinning process {pid}: another checkpoint holds pins (`kup ppp status`)"),
                Some(libc::ENODEV) => "pinning: the arena is not attached (`kup ppp attach` at boot, before the apps start)".to_string(),
                _ => format!("pinning process {pid} at {at:#x}: {e}"),
            })?;
            for (i, p) in pages[..n].iter().enumerate() {
                let va = at + i as u64 * PAGE;
                match Why::from_raw(p.why) {
                    Some(Why::Kept) => out.entries.push(KeptPage { vaddr: va, pfn: p.pfn, crc: p.crc }),
                    Some(Why::NotPresent) if flags & ppp_abi::PIN_REPIN != 0 => {}
                    Some(w) => out.refused.push((va, w)),
                    None => return fail(format!("ppp.ko answered an unknown reason {} for page {va:#x} of process {pid}", p.why)),
                }
            }
            at += n as u64 * PAGE;
        }
    }
    Ok(())
}

/// Pins every present page of `pid`'s private mappings while it runs, after its soft-dirty bits
/// were reset (with their CRCs when `crc`). The pins are provisional: the module drops them all
/// if kup ends before [`Device::confirm`].
pub fn pin_running(dev: &Device, pid: u32, tag: u64, crc: bool) -> Result<Pinned> {
    let mut pins = Pinned { pid, ..Pinned::default() };
    pin_ranges(dev, pid, tag, ppp_abi::PIN_RUNNING | crc_flag(crc), &present_runs(pid)?, &mut pins)?;
    Ok(pins)
}

/// One more pass while the app runs, after [`pin_running`]: the pages written since the last
/// reset of their soft-dirty bits ([`take_written`]: race-free) are pinned and checksummed again,
/// so that the frozen pass finds fewer. Returns those pages, and those among them PIN refused
/// (for the caller to copy again).
pub fn catch_up(dev: &Device, pins: &mut Pinned, tag: u64, crc: bool) -> Result<(RangeMap, RangeMap)> {
    let pid = pins.pid;
    let written = take_written(dev, pid)?;
    let changed: Vec<(u64, u64)> = written.iter().map(|r| (r.start, r.end)).collect();
    let mut now = Pinned { pid, ..Pinned::default() };
    pin_ranges(dev, pid, tag, ppp_abi::PIN_RUNNING | ppp_abi::PIN_REPIN | crc_flag(crc), &changed, &mut now)?;
    let refused = refused_ranges(&now);
    merge_pins(pins, now, None, &changed);
    Ok((written, refused))
}

/// The final pins of the frozen process, from those taken while it ran (`pins`): the pages the
/// final dump found present (`unsent`: CRIU sent no data for them) keep their pins unless
/// `written` since, or the kernel writes them at exit; those are pinned again now, with their
/// CRCs. The pages of the `restorer_reads` mappings (CRIU's `mm` image says which) are not kept:
/// CRIU's restorer reads them before PPP can put them back, so they must go into the images.
/// [`Pinned::unused_frames`] then lists the frames for [`Device::confirm`] to let go of.
pub fn settle_frozen(dev: &Device, pins: &mut Pinned, tag: u64, crc: bool, unsent: &RangeMap, written: &RangeMap, restorer_reads: &[(u64, u64)]) -> Result<()> {
    let pid = pins.pid;
    let exit = dev.exit_writes(pid).map_err(|e| match e.raw_os_error() {
        Some(libc::EPERM) => format!("pinning process {pid}: it is not stopped by CRIU"),
        _ => format!("process {pid}: reading the addresses its threads' exit writes: {e}"),
    })?;
    let mut repin = written.clone();
    for a in &exit {
        repin.insert(*a, a + PAGE, 0);
    }
    let mut changed = repin.clone();
    let restorer = leave_to_restorer(&mut repin, &mut changed, unsent, restorer_reads);
    let repin: Vec<(u64, u64)> = repin.iter().map(|r| (r.start, r.end)).collect();
    let changed: Vec<(u64, u64)> = changed.iter().map(|r| (r.start, r.end)).collect();
    let mut now = Pinned { pid, ..Pinned::default() };
    pin_ranges(dev, pid, tag, ppp_abi::PIN_REPIN | crc_flag(crc), &repin, &mut now)?;
    pins.crc_frozen = if crc { now.entries.len() as u64 } else { 0 };
    merge_pins(pins, now, Some(unsent), &changed);
    if !restorer.is_empty() {
        pins.refused.extend(restorer);
        pins.refused.sort_unstable_by_key(|(va, _)| *va);
    }
    Ok(())
}

/// Takes the `restorer_reads` mappings out of what is pinned again (`repin`) and puts them into
/// what gives way (`changed`); returns their pages CRIU did not send, as refused.
fn leave_to_restorer(repin: &mut RangeMap, changed: &mut RangeMap, unsent: &RangeMap, restorer_reads: &[(u64, u64)]) -> Vec<(u64, Why)> {
    let mut refused = vec![];
    for &(start, end) in restorer_reads {
        repin.remove(start, end);
        changed.insert(start, end, 0);
        for r in unsent.iter() {
            let (s, e) = (r.start.max(start), r.end.min(end));
            refused.extend((s..e).step_by(PAGE as usize).map(|va| (va, Why::RestorerReads)));
        }
    }
    refused
}

fn crc_flag(crc: bool) -> u32 {
    if crc {
        ppp_abi::PIN_CRC
    } else {
        0
    }
}

/// Whether each address (ascending) lies in sorted, disjoint [start, end) ranges.
struct Cursor<'a>(&'a [(u64, u64)], usize);

impl Cursor<'_> {
    fn has(&mut self, va: u64) -> bool {
        while self.1 < self.0.len() && self.0[self.1].1 <= va {
            self.1 += 1;
        }
        self.1 < self.0.len() && self.0[self.1].0 <= va
    }
}

/// The bookkeeping of a pass after the first: `pins`' entries at `changed` addresses (and, when
/// frozen, those outside `present`, the pages still mapped) give way to `now`'s, all in address
/// order. In place and linear, and the frames let go of are recorded (`Pinned`'s `let_go`):
/// the frozen pass runs it over every page the app has.
fn merge_pins(pins: &mut Pinned, now: Pinned, present: Option<&RangeMap>, changed: &[(u64, u64)]) {
    if present.is_none_or(|p| covers_entries(p, &pins.entries)) && replace_in_place(pins, &now, changed) {
        return;
    }
    let present: Option<Vec<(u64, u64)>> = present.map(|p| p.iter().map(|r| (r.start, r.end)).collect());
    // Whether each address (ascending) stays: in `present` (if given) and not in `changed`.
    fn stays<'a>(present: Option<&'a [(u64, u64)]>, changed: &'a [(u64, u64)]) -> impl FnMut(u64) -> bool + 'a {
        let (mut u, mut c) = (present.map(|p| Cursor(p, 0)), Cursor(changed, 0));
        move |va| u.as_mut().is_none_or(|u| u.has(va)) && !c.has(va)
    }
    let mut keep = stays(present.as_deref(), changed);
    let Pinned { entries, refused, let_go, repinned, .. } = pins;
    entries.retain(|e| {
        let still = keep(e.vaddr);
        if !still {
            repinned.remove(&e.pfn);
            let_go.push(e.pfn);
        }
        still
    });
    let mut keep = stays(present.as_deref(), changed);
    refused.retain(|(va, _)| keep(*va));
    repinned.extend(now.entries.iter().map(|e| e.pfn));
    merge_into(entries, now.entries, |e| e.vaddr);
    merge_into(refused, now.refused, |r| r.0);
}

/// Whether every entry's address lies in `present`: the gaps between its ranges hold none (a
/// binary search per gap).
fn covers_entries(present: &RangeMap, entries: &[KeptPage]) -> bool {
    let (Some(first), Some(last)) = (entries.first(), entries.last()) else { return true };
    let ranges: Vec<(u64, u64)> = present.iter().map(|r| (r.start, r.end)).collect();
    let gaps = std::iter::once(0).chain(ranges.iter().map(|r| r.1)).zip(ranges.iter().map(|r| r.0).chain(std::iter::once(u64::MAX)));
    gaps.filter(|&(s, e)| s < e && e > first.vaddr && s <= last.vaddr).all(|(s, e)| entries.partition_point(|x| x.vaddr < s) == entries.partition_point(|x| x.vaddr < e))
}

/// [`merge_pins`] when `now` has an entry at exactly the addresses of `changed` that `pins` has
/// entries at, and refused none (the pages were written in place, the usual case): the entries
/// are replaced where they are, a binary search per range. Returns false, changing nothing, when
/// it is not that case.
fn replace_in_place(pins: &mut Pinned, now: &Pinned, changed: &[(u64, u64)]) -> bool {
    let in_changed = |va: u64| changed.get(changed.partition_point(|r| r.1 <= va)).is_some_and(|r| r.0 <= va);
    if !now.refused.is_empty() || pins.refused.iter().any(|(va, _)| in_changed(*va)) {
        return false;
    }
    let span = |v: &[KeptPage], s: u64, e: u64| v.partition_point(|x| x.vaddr < s)..v.partition_point(|x| x.vaddr < e);
    let mut spans = Vec::with_capacity(changed.len());
    for &(s, e) in changed {
        let (old, new) = (span(&pins.entries, s, e), span(&now.entries, s, e));
        if old.len() != new.len() || pins.entries[old.clone()].iter().zip(&now.entries[new.clone()]).any(|(a, b)| a.vaddr != b.vaddr) {
            return false;
        }
        spans.push((old, new));
    }
    if spans.iter().map(|(_, n)| n.len()).sum::<usize>() != now.entries.len() {
        return false;
    }
    // All the frames let go of first: one may be another page's new frame.
    for (old, _) in &spans {
        for a in &pins.entries[old.clone()] {
            pins.repinned.remove(&a.pfn);
            pins.let_go.push(a.pfn);
        }
    }
    for (old, new) in spans {
        pins.entries[old].copy_from_slice(&now.entries[new]);
    }
    pins.repinned.extend(now.entries.iter().map(|e| e.pfn));
    true
}

/// Merges `b` into `a`, both in ascending `key` order, from the back: no copy of `a`.
fn merge_into<T: Copy>(a: &mut Vec<T>, b: Vec<T>, key: impl Fn(&T) -> u64) {
    let n = a.len();
    a.extend_from_slice(&b);
    let (mut i, mut j) = (n, b.len());
    while j > 0 {
        if i > 0 && key(&a[i - 1]) > key(&b[j - 1]) {
            a[i + j - 1] = a[i - 1];
            i -= 1;
        } else {
            a[i + j - 1] = b[j - 1];
            j -= 1;
        }
    }
}

/// /proc/PID/pagemap: a page is present; its frame number (shown to root only).
const PM_PRESENT: u64 = 1 << 63;
const PM_PFN: u64 = (1 << 55) - 1;
const PM_SOFT_DIRTY: u64 = 1 << 55;

/// Calls `f(mapping, vaddr, pagemap word)` for every page of `pid`'s private mappings, mapping
/// being the index of its mapping.
fn each_pagemap_word(pid: u32, mut f: impl FnMut(usize, u64, u64)) -> Result<()> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|e| format!("/proc/{pid}/maps: {e}"))?;
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).map_err(|e| format!("/proc/{pid}/pagemap: {e}"))?;
    let mut buf = vec![0u8; 8 * 8192];
    for (m, (start, end)) in private_mappings(&maps).into_iter().enumerate() {
        let mut at = start;
        while at < end {
            let n = ((end - at) / PAGE).min(8192) as usize;
            let got = pagemap.read_at(&mut buf[..n * 8], at / PAGE * 8).map_err(|e| format!("/proc/{pid}/pagemap: {e}"))?;
            if got < n * 8 {
                return fail(format!("/proc/{pid}/pagemap: short read at {at:#x}"));
            }
            for (i, w) in buf[..n * 8].chunks_exact(8).enumerate() {
                f(m, at + i as u64 * PAGE, u64::from_le_bytes(w.try_into().unwrap()));
            }
            at += n as u64 * PAGE;
        }
    }
    Ok(())
}

/// The present pages of `pid`'s private mappings written since its soft-dirty bits were last
/// reset, whose bits it then resets (ppp.ko's WRITTEN: race-free while the process runs).
pub fn take_written(dev: &Device, pid: u32) -> Result<RangeMap> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|e| format!("/proc/{pid}/maps: {e}"))?;
    let mut written = RangeMap::new();
    // At most 64 GiB of addresses per call (a 2 MiB bitmap), whatever a mapping reserves.
    const CHUNK: u64 = 1 << 24;
    const _: () = assert!(CHUNK <= ppp_abi::WRITTEN_MAX_PAGES);
    for (mut start, end) in private_mappings(&maps) {
        while start < end {
            let nr = ((end - start) / PAGE).min(CHUNK);
            let bits = dev.written(pid, start, nr).map_err(|e| match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) => format!("process {pid}: another MMU mirrors its memory (an MMU notifier, e.g. a VM or a device), so ppp.ko cannot track its writes; checkpoint without --ppp"),
                _ => format!("process {pid}: reading which pages were written at {start:#x}: {e}"),
            })?;
            for (s, e) in bit_runs(&bits, nr) {
                written.insert(start + s * PAGE, start + e * PAGE, foam_store::protocol::PE_PRESENT);
            }
            start += nr * PAGE;
        }
    }
    Ok(written)
}

/// The runs [s, e) of set bits among the first `nr` of a bitmap (bit i of word i / 64).
fn bit_runs(bits: &[u64], nr: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = vec![];
    for (w, &word) in bits.iter().enumerate() {
        let mut word = word;
        while word != 0 {
            let i = w as u64 * 64 + u64::from(word.trailing_zeros());
            word &= word - 1;
            if i >= nr {
                break;
            }
            match runs.last_mut() {
                Some((_, e)) if *e == i => *e += 1,
                _ => runs.push((i, i + 1)),
            }
        }
    }
    runs
}

/// Resets the soft-dirty bits of `pid`'s pages (and write-protects them, so the next write to
/// each sets its bit again).
pub fn reset_soft_dirty(pid: u32) -> Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "4").map_err(|e| format!("resetting the soft-dirty bits of process {pid}: {e}").into())
}

/// Present pages of the processes `pids`' private mappings written since their soft-dirty bits
/// were last reset (by CRIU's last pre-dump), which it leaves as they are.
pub fn count_soft_dirty(pids: &[u32]) -> Result<u64> {
    let mut written = 0u64;
    for &pid in pids {
        each_pagemap_word(pid, |_, _, w| written += u64::from(w & PM_PRESENT != 0 && w & PM_SOFT_DIRTY != 0))?;
    }
    Ok(written)
}

/// Distinct pages the processes `pids` write per second, measured over `window` from their
/// soft-dirty bits (which this resets: no checkpoint may be using them).
pub fn write_rate(pids: &[u32], window: Duration) -> Result<f64> {
    for &pid in pids {
        reset_soft_dirty(pid)?;
    }
    std::thread::sleep(window);
    Ok(count_soft_dirty(pids)? as f64 / window.as_secs_f64())
}

/// Runs [start, end) of present pages of `pid`'s private mappings, each within one mapping.
fn present_runs(pid: u32) -> Result<Vec<(u64, u64)>> {
    let mut runs: Vec<(usize, u64, u64)> = vec![];
    each_pagemap_word(pid, |m, va, w| {
        if w & PM_PRESENT == 0 {
            return;
        }
        match runs.last_mut() {
            Some((rm, s, c)) if *rm == m && *s + *c * PAGE == va => *c += 1,
            _ => runs.push((m, va, 1)),
        }
    })?;
    Ok(runs.into_iter().map(|(_, s, c)| (s, s + c * PAGE)).collect())
}

/// [start, end) of the private mappings of a /proc/PID/maps text, but the kernel's own.
fn private_mappings(maps: &str) -> Vec<(u64, u64)> {
    maps.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (range, perms) = (f.next()?, f.next()?);
            let path = f.nth(3).unwrap_or("");
            if !perms.ends_with('p') || matches!(path, "[vsyscall]" | "[vdso]" | "[vvar]") {
                return None;
            }
            let (s, e) = range.split_once('-')?;
            Some((u64::from_str_radix(s, 16).ok()?, u64::from_str_radix(e, 16).ok()?))
        })
        .collect()
}

/// Copies into FOAM the pages of `unsent` (unchanged since the soft-dirty reset, so CRIU sent no
/// data) that PPP did not keep, reading them from the frozen process, but those `precopied` while
/// it ran (unchanged since, they are in FOAM already); returns every such page, now in FOAM.
pub fn copy_unkept(pid: u32, foam: &foam_store::foam::FoamFile, unsent: &RangeMap, kept: &[KeptPage], precopied: &RangeMap) -> Result<RangeMap> {
    let mut unkept = RangeMap::new();
    for r in unsent.iter() {
        not_kept_in(kept, r.start, r.end, &mut unkept);
    }
    let mut todo = unkept.clone();
    for r in precopied.iter() {
        todo.remove(r.start, r.end);
    }
    copy_pages(pid, foam, &todo, false)?;
    Ok(unkept)
}

/// Adds to `out` the pages of [start, end) without an entry in `kept` (in address order, one entry
/// per address): a range holds as many entries as pages exactly when all are kept, so halving the
/// ranges that are neither all kept nor all not costs a binary search per step, not a step per
/// page (this runs while the app is frozen).
fn not_kept_in(kept: &[KeptPage], start: u64, end: u64, out: &mut RangeMap) {
    let entries = kept.partition_point(|e| e.vaddr < end) - kept.partition_point(|e| e.vaddr < start);
    let pages = (end - start) / PAGE;
    if entries as u64 == pages {
        return;
    }
    if entries == 0 {
        out.insert(start, end, foam_store::protocol::PE_PRESENT);
        return;
    }
    let mid = start + pages / 2 * PAGE;
    not_kept_in(kept, start, mid, out);
    not_kept_in(kept, mid, end, out);
}

/// Copies `ranges` of `pid`'s memory into FOAM; returns what it copied. While the process runs,
/// a range it unmaps meanwhile is left out instead of failing the copy.
pub fn copy_pages(pid: u32, foam: &foam_store::foam::FoamFile, ranges: &RangeMap, running: bool) -> Result<RangeMap> {
    let mut copied = RangeMap::new();
    if ranges.is_empty() {
        return Ok(copied);
    }
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).map_err(|e| format!("/proc/{pid}/mem: {e}"))?;
    let mut buf = vec![0u8; 1 << 20];
    for r in ranges.iter() {
        let mut at = r.start;
        while at < r.end {
            let len = ((r.end - at) as usize).min(buf.len());
            match mem.read_exact_at(&mut buf[..len], at) {
                Ok(()) => {}
                Err(_) if running => break,
                Err(e) => return fail(format!("reading {len} bytes at {at:#x} of process {pid}: {e}")),
            }
            foam.write_pages(at, &buf[..len])?;
            copied.insert(at, at + len as u64, r.flags);
            at += len as u64;
        }
    }
    Ok(copied)
}

/// The present pages PIN refused (outside the arena, shared, ...), as ranges.
pub fn refused_ranges(p: &Pinned) -> RangeMap {
    let mut m = RangeMap::new();
    for (va, w) in &p.refused {
        if *w != Why::NotPresent {
            m.insert(*va, va + PAGE, foam_store::protocol::PE_PRESENT);
        }
    }
    m
}

/// Microseconds since boot, as CRIU reads /proc/uptime.
pub fn uptime_us() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/uptime").map_err(|e| format!("/proc/uptime: {e}"))?;
    let secs: f64 = text.split_whitespace().next().and_then(|s| s.parse().ok()).ok_or("cannot read /proc/uptime")?;
    Ok((secs * 1e6) as u64)
}

/// A nonzero pin tag for a checkpoint id.
pub fn tag(id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h | 1
}

/// Writes a process's PFN list durably: runs of `entries` at consecutive addresses and frames,
/// and runs of the `gone` address ranges (only in a list of changes), then the pages' CRCs
/// (kmod/include/uapi/kup_ppp.h).
pub fn write_list(path: &Path, arena: Arena, pid: u32, entries: &[KeptPage], gone: &[(u64, u64)]) -> Result<()> {
    let mut runs: Vec<ListRun> = vec![];
    for e in entries {
        match runs.last_mut() {
            Some(r) if r.vaddr + r.nr_pages as u64 * PAGE == e.vaddr && r.pfn + r.nr_pages as u64 == e.pfn && r.nr_pages < u32::MAX => r.nr_pages += 1,
            _ => runs.push(ListRun { vaddr: e.vaddr, pfn: e.pfn, nr_pages: 1, flags: 0 }),
        }
    }
    for &(start, end) in gone {
        for at in (start..end).step_by(u32::MAX as usize * PAGE as usize) {
            let nr_pages = ((end - at) / PAGE).min(u32::MAX as u64) as u32;
            runs.push(ListRun { vaddr: at, pfn: 0, nr_pages, flags: ppp_abi::LIST_GONE });
        }
    }
    runs.sort_by_key(|r| r.vaddr);
    let mut body = runs.as_bytes().to_vec();
    body.extend(entries.iter().flat_map(|e| e.crc.to_le_bytes()));
    let head = ListHead {
        magic: ppp_abi::LIST_MAGIC,
        version: ppp_abi::LIST_VERSION,
        arena_start: arena.start,
        arena_size: arena.size,
        nr_pages: entries.len() as u64,
        nr_runs: runs.len() as u64,
        pid,
        crc: crc32fast::hash(&body),
    };
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(head.as_bytes()).and_then(|()| f.write_all(&body)).and_then(|()| f.sync_all()).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}

/// One PFN list read back: its head, its pages and its `gone` ranges, in address order.
pub type List = (ListHead, Vec<KeptPage>, Vec<(u64, u64)>);

/// Reads a PFN list back, checking its head, its CRC and that its runs add up.
pub fn read_list(path: &Path) -> Result<List> {
    let mut bytes = vec![];
    std::fs::File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(|e| format!("{}: {e}", path.display()))?;
    let bad = |why: String| -> Result<List> { fail(format!("the PFN list {} is damaged ({why}): this checkpoint's pages cannot be put back in place", path.display())) };
    let Ok((head, rest)) = ListHead::read_from_prefix(&bytes) else { return bad(format!("{} bytes, shorter than its head", bytes.len())) };
    if head.magic != ppp_abi::LIST_MAGIC || head.version != ppp_abi::LIST_VERSION {
        return bad(format!("magic {:#x} version {}, want {:#x} version {}", head.magic, head.version, ppp_abi::LIST_MAGIC, ppp_abi::LIST_VERSION));
    }
    let runs_len = head.nr_runs as usize * size_of::<ListRun>();
    let want = runs_len + head.nr_pages as usize * 4;
    if rest.len() != want {
        return bad(format!("{} bytes after the head for {} runs and {} pages, want {want}", rest.len(), head.nr_runs, head.nr_pages));
    }
    if crc32fast::hash(rest) != head.crc {
        return bad("CRC mismatch".into());
    }
    let (runs, crcs) = rest.split_at(runs_len);
    let (mut out, mut gone) = (Vec::with_capacity(head.nr_pages as usize), vec![]);
    let mut crcs = crcs.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap()));
    let mut end = 0;
    for r in runs.chunks_exact(size_of::<ListRun>()).map(|c| ListRun::read_from_bytes(c).unwrap()) {
        if r.vaddr < end || r.nr_pages == 0 || r.flags & !ppp_abi::LIST_GONE != 0 {
            return bad(format!("a run at {:#x} overlaps the one before, is empty or has flags {:#x}", r.vaddr, r.flags));
        }
        end = r.vaddr + r.nr_pages as u64 * PAGE;
        if r.flags & ppp_abi::LIST_GONE != 0 {
            gone.push((r.vaddr, end));
            continue;
        }
        for i in 0..r.nr_pages as u64 {
            let Some(crc) = crcs.next() else { return bad("more pages in the runs than CRCs".into()) };
            out.push(KeptPage { vaddr: r.vaddr + i * PAGE, pfn: r.pfn + i, crc });
        }
    }
    if out.len() as u64 != head.nr_pages {
        return bad(format!("its runs name {} pages, not {}", out.len(), head.nr_pages));
    }
    Ok((head, out, gone))
}

/// A process's kept pages from its list in the manifest: the list written while it ran, with
/// the changes written while it was frozen applied.
pub fn load_list(app_dir: &Path, l: &PppList) -> Result<(ListHead, Vec<KeptPage>)> {
    let (head, mut entries, gone) = read_list(&app_dir.join(&l.file))?;
    if !gone.is_empty() {
        return fail(format!("the PFN list {} removes pages, which only a list of changes does", app_dir.join(&l.file).display()));
    }
    if let Some(frozen) = &l.frozen {
        let path = app_dir.join(frozen);
        let (h, changed, mut gone) = read_list(&path)?;
        if (h.pid, h.arena_start, h.arena_size) != (head.pid, head.arena_start, head.arena_size) {
            return fail(format!("the PFN list {} is for process {} in another arena than {}", path.display(), h.pid, l.file));
        }
        gone.extend(changed.iter().map(|e| (e.vaddr, e.vaddr + PAGE)));
        gone.sort_unstable();
        let mut at = Cursor(&gone, 0);
        entries.retain(|e| !at.has(e.vaddr));
        merge_into(&mut entries, changed, |e| e.vaddr);
    }
    if entries.len() as u64 != l.pages {
        return fail(format!("the PFN lists of process {} name {} pages, the manifest {}", head.pid, entries.len(), l.pages));
    }
    Ok((head, entries))
}

/// What the list of changes holds: the entries of `now` that `before` lacks or has otherwise, and
/// the address ranges of `before`'s entries that `now` lacks. Both in address order.
pub fn list_changes(before: &[KeptPage], now: &[KeptPage]) -> (Vec<KeptPage>, Vec<(u64, u64)>) {
    let (mut changed, mut gone) = (vec![], Vec::<(u64, u64)>::new());
    let mut drop = |va: u64| match gone.last_mut() {
        Some((_, e)) if *e == va => *e += PAGE,
        _ => gone.push((va, va + PAGE)),
    };
    let (mut i, mut j) = (0, 0);
    while i < before.len() || j < now.len() {
        match (before.get(i), now.get(j)) {
            (Some(b), Some(n)) if b.vaddr == n.vaddr => {
                if b != n {
                    changed.push(*n);
                }
                i += 1;
                j += 1;
            }
            (Some(b), n) if n.is_none_or(|n| b.vaddr < n.vaddr) => {
                drop(b.vaddr);
                i += 1;
            }
            (_, Some(n)) => {
                changed.push(*n);
                j += 1;
            }
            (_, None) => unreachable!("one of the lists has entries left"),
        }
    }
    (changed, gone)
}

/// What mapping a process's kept pages back did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Mapped {
    /// Put in place (no copy).
    pub in_place: u64,
    /// Mapped as copies: pinned on this boot, or into an address the restore had populated.
    pub copied: u64,
    /// Kept intact until [`release`] (a write by the app copies the page first).
    pub guarded: u64,
}

/// Maps a process's kept pages back, CRC first; with `guard`, the checkpoint's pages stay as they
/// were until [`release`], for a fallback. The error names the page.
pub fn map_process(dev: &Device, app: &str, pid: u32, entries: &[KeptPage], verify: bool, guard: bool) -> Result<Mapped> {
    let mut done = Mapped::default();
    let flags = if verify { ppp_abi::MAP_VERIFY } else { 0 } | if guard { ppp_abi::MAP_GUARD } else { 0 };
    let mut i = 0;
    while i < entries.len() {
        let mut j = i + 1;
        while j < entries.len() && entries[j].vaddr == entries[j - 1].vaddr + PAGE {
            j += 1;
        }
        let pages: Vec<Page> = entries[i..j].iter().map(|e| Page { pfn: e.pfn, crc: e.crc, why: 0 }).collect();
        let (m, r) = dev.map(pid, entries[i].vaddr, flags, &pages);
        done.in_place += m.nr_mapped;
        done.copied += m.nr_copied;
        done.guarded += m.nr_guarded;
        if let Err(e) = r {
            let k = i + (m.failed as usize).min(j - i - 1);
            let why = Why::from_raw(m.failed_why).map_or_else(|| format!("reason {}", m.failed_why), |w| w.describe().to_string());
            return fail(format!(
                "{app}: the page at {:#x} of process {pid} (PFN {:#x}) was not put back: {why} ({e}); nothing of it is mapped where the check failed",
                entries[k].vaddr, entries[k].pfn
            ));
        }
        i = j;
    }
    Ok(done)
}

/// The checkpoint's pages are no longer needed (the restored apps are healthy): the module gives
/// the unclaimed held pages to the allocator and drops its guard references.
pub fn release() -> Result<()> {
    if !Path::new(DEVICE).exists() {
        return Ok(());
    }
    Device::open(DEVICE).and_then(|d| d.release()).map_err(|e| format!("{DEVICE}: releasing the checkpoint's pages: {e}").into())
}

/// The manifest's record of what PPP kept of an app.
pub fn summary(arena: Arena, lists: Vec<PppList>, not_kept: &BTreeMap<Why, u64>, pin_ms: f64, checksum_ms: f64, crc_frozen: u64) -> PppPages {
    PppPages {
        crc: true,
        boot_id: boot_id(),
        checksum_ms,
        crc_frozen,
        catch_up: vec![],
        written_ms: 0.0,
        arena_start: arena.start,
        arena_size: arena.size,
        kept: lists.iter().map(|l| l.pages).sum(),
        lists,
        not_kept: not_kept.iter().map(|(w, n)| (w.c_name().trim_start_matches("PPP_").to_ascii_lowercase(), *n)).collect(),
        pin_ms,
        pinning_ms: 0.0,
        copy_ms: 0.0,
        lists_ms: 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_arena_is_the_one_dollar_reservation() {
        assert_eq!(Arena::from_cmdline("console=ttyS0 memmap=512M!1G memmap=2G$4G quiet").unwrap(), Some(Arena { start: 4 << 30, size: 2 << 30 }));
        assert_eq!(Arena::from_cmdline("memmap=512M!1G,0x80000000$0x100000000").unwrap(), Some(Arena { start: 4 << 30, size: 2 << 30 }));
        assert_eq!(Arena::from_cmdline("memmap=512M!1G").unwrap(), None);
        assert!(Arena::from_cmdline("memmap=2G$4G memmap=1G$8G").unwrap_err().to_string().contains("exactly one"));
        assert!(Arena::from_cmdline("memmap=2X$4G").unwrap_err().to_string().contains("memmap=2X$4G"));
    }

    #[test]
    fn the_pages_criu_restores_itself_are_neither_kept_nor_pinned_again() {
        let map = |rs: &[(u64, u64)]| {
            let mut m = RangeMap::new();
            for &(s, e) in rs {
                m.insert(s, e, 0);
            }
            m
        };
        let pairs = |m: &RangeMap| m.iter().map(|r| (r.start, r.end)).collect::<Vec<_>>();
        // Pages 1-2 written since the pins; the restorer reads pages 2-3 (a vDSO); CRIU sent
        // page 3 (soft-dirty), so only page 2 is left for kup to copy.
        let (mut repin, unsent) = (map(&[(0x1000, 0x3000)]), map(&[(0, 0x3000), (0x4000, 0x5000)]));
        let mut changed = repin.clone();
        let refused = leave_to_restorer(&mut repin, &mut changed, &unsent, &[(0x2000, 0x4000)]);
        assert_eq!(pairs(&repin), vec![(0x1000, 0x2000)]);
        assert_eq!(pairs(&changed), vec![(0x1000, 0x4000)]);
        assert_eq!(refused, vec![(0x2000, Why::RestorerReads)]);
    }

    #[test]
    fn the_unchanged_pages_not_kept_are_copied_from_the_process() {
        // Eight pages of this very process, page-aligned, each filled with its index.
        let layout = std::alloc::Layout::from_size_align(8 * 4096, 4096).unwrap();
        // SAFETY: a non-zero size with a valid alignment; freed below with the same layout.
        let buf = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!buf.is_null());
        // SAFETY: `buf` is 8 pages long and owned by this test.
        let pages = unsafe { std::slice::from_raw_parts_mut(buf, 8 * 4096) };
        for (i, p) in pages.chunks_mut(4096).enumerate() {
            p.fill(i as u8 + 1);
        }
        let base = buf as u64;
        let dir = tempfile::tempdir().unwrap();
        let foam = foam_store::foam::FoamFile::create(dir.path(), "1", foam_store::foam::FileMode::probe(dir.path()).unwrap()).unwrap();
        let mut unsent = RangeMap::new();
        unsent.insert(base, base + 8 * PAGE, foam_store::protocol::PE_PRESENT);
        // Pages 1, 2 and 6 stay in place.
        let kept: Vec<KeptPage> = [1u64, 2, 6].iter().map(|i| KeptPage { vaddr: base + i * PAGE, pfn: 0, crc: 0 }).collect();
        // Page 4 was copied while the process ran; it is not copied again.
        let mut early = RangeMap::new();
        early.insert(base + 4 * PAGE, base + 5 * PAGE, foam_store::protocol::PE_PRESENT);
        assert_eq!(copy_pages(std::process::id(), &foam, &early, true).unwrap().pages(), 1);
        pages[4 * 4096..5 * 4096].fill(0xee);
        let copied = copy_unkept(std::process::id(), &foam, &unsent, &kept, &early).unwrap();
        let runs: Vec<(u64, u64)> = copied.iter().map(|r| ((r.start - base) / PAGE, (r.end - base) / PAGE)).collect();
        assert_eq!(runs, vec![(0, 1), (3, 6), (7, 8)]);
        let mut page = vec![0u8; 4096];
        for i in [0u64, 3, 4, 5, 7] {
            foam.read_pages(base + i * PAGE, &mut page).unwrap();
            assert!(page.iter().all(|&b| b == i as u8 + 1), "page {i}");
        }
        // SAFETY: allocated above with this layout, not used after.
        unsafe { std::alloc::dealloc(buf, layout) };
    }

    #[test]
    fn a_pfn_list_reads_back_and_a_damaged_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("1.pfns");
        let entries: Vec<KeptPage> = (0..100).map(|i| KeptPage { vaddr: 0x7000_0000 + i * PAGE, pfn: 0x10_0000 + i + (i / 10) * 7, crc: i as u32 }).collect();
        let arena = Arena { start: 4 << 30, size: 2 << 30 };
        write_list(&path, arena, 1, &entries, &[]).unwrap();
        let (head, back, gone) = read_list(&path).unwrap();
        assert_eq!((head.pid, head.arena_start, head.nr_runs, back, gone), (1, 4 << 30, 10, entries.clone(), vec![]));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[size_of::<ListHead>() + 9] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(read_list(&path).unwrap_err().to_string().contains("CRC mismatch"));
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(read_list(&path).unwrap_err().to_string().contains("bytes after the head"));
    }

    #[test]
    fn the_list_written_while_frozen_carries_only_the_changes() {
        let va = |i: u64| 0x7000_0000 + i * PAGE;
        let kept = |i: u64, pfn: u64, crc: u32| KeptPage { vaddr: va(i), pfn, crc };
        let before: Vec<KeptPage> = (0..10).map(|i| kept(i, 100 + i, i as u32)).collect();
        // Page 2 written in place (new CRC), 3 moved to another frame, 5-6 unmapped, 12 new.
        let mut now: Vec<KeptPage> = before.iter().filter(|e| !(5..7).contains(&((e.vaddr - va(0)) / PAGE))).copied().collect();
        now[2].crc = 77;
        now[3].pfn = 300;
        now.push(kept(12, 112, 12));
        let (changed, gone) = list_changes(&before, &now);
        assert_eq!(changed, vec![now[2], now[3], kept(12, 112, 12)]);
        assert_eq!(gone, vec![(va(5), va(7))]);
        assert_eq!(list_changes(&now, &now), (vec![], vec![]));
        // Written as two lists, read back as the final one.
        let dir = tempfile::tempdir().unwrap();
        let arena = Arena { start: 4 << 30, size: 2 << 30 };
        write_list(&dir.path().join("7.pfns"), arena, 7, &before, &[]).unwrap();
        write_list(&dir.path().join("7.frozen.pfns"), arena, 7, &changed, &gone).unwrap();
        let mut l = PppList { pid: 7, file: "7.pfns".into(), frozen: Some("7.frozen.pfns".into()), pages: now.len() as u64 };
        assert_eq!(load_list(dir.path(), &l).unwrap().1, now);
        l.pages += 1;
        assert!(load_list(dir.path(), &l).unwrap_err().to_string().contains("the manifest"));
        // Removing pages is only for the list of changes.
        let l = PppList { pid: 7, file: "7.frozen.pfns".into(), frozen: None, pages: changed.len() as u64 };
        assert!(load_list(dir.path(), &l).unwrap_err().to_string().contains("only a list of changes"));
    }

    #[test]
    fn the_frozen_pins_keep_the_unchanged_pages_and_let_go_of_the_others() {
        let va = |i: u64| 0x7000_0000 + i * PAGE;
        let kept = |i: u64, pfn: u64, crc: u32| KeptPage { vaddr: va(i), pfn, crc };
        // Pinned while running: pages 0..8, page 8 not in the arena.
        let mut pins = Pinned { pid: 7, entries: (0..8).map(|i| kept(i, 100 + i, i as u32)).collect(), refused: vec![(va(8), Why::NotArena)], ..Pinned::default() };
        // The final dump: pages 0, 1, 6, 8 and 9 present; 2, 3 and 9 written since (mremap moved
        // page 7 to 9, frame and all); 4, 5 and 7 unmapped; page 0 is where a thread's exit writes go.
        let mut unsent = RangeMap::new();
        unsent.insert(va(0), va(4), 0);
        unsent.insert(va(6), va(7), 0);
        unsent.insert(va(8), va(10), 0);
        let changed = [(va(0), va(1)), (va(2), va(4)), (va(9), va(10))];
        // Pinned again while frozen: page 2 in place (a new CRC), 3 in a new frame, 9 the frame
        // pinned as page 7 (kept without another reference), 0 refused.
        let now = Pinned { pid: 7, entries: vec![kept(2, 102, 0xa2), kept(3, 200, 0xa3), kept(9, 107, 7)], refused: vec![(va(0), Why::ExitWrite)], ..Pinned::default() };
        merge_pins(&mut pins, now, Some(&unsent), &changed);
        assert_eq!(pins.entries, vec![kept(1, 101, 1), kept(2, 102, 0xa2), kept(3, 200, 0xa3), kept(6, 106, 6), kept(9, 107, 7)]);
        assert_eq!(pins.refused, vec![(va(0), Why::ExitWrite), (va(8), Why::NotArena)]);
        // Page 0 (exit writes), page 3's old frame and the unmapped 4 and 5; not 102 (written in
        // place) or 107 (moved to page 9).
        assert_eq!(pins.unused_frames(), vec![100, 103, 104, 105]);
        assert_eq!(pins.all_frames(), vec![100, 101, 102, 103, 104, 105, 106, 107, 200]);
        let mut a = vec![1, 4, 6, 9];
        merge_into(&mut a, vec![0, 5, 10], |x| *x);
        assert_eq!(a, vec![0, 1, 4, 5, 6, 9, 10]);
    }

    #[test]
    fn passes_while_running_then_frozen_let_go_only_of_frames_no_entry_uses() {
        let va = |i: u64| 0x7000_0000 + i * PAGE;
        let kept = |i: u64, pfn: u64| KeptPage { vaddr: va(i), pfn, crc: 0 };
        let mut pins = Pinned { pid: 7, entries: (0..4).map(|i| kept(i, 100 + i)).collect(), ..Pinned::default() };
        // A pass while running: page 1 written in place, page 2 into a new frame (MADV_DONTNEED
        // and a fault), page 3 refused now (shared after a fork); nothing is filtered as unmapped.
        let now = Pinned { pid: 7, entries: vec![kept(1, 101), kept(2, 300)], refused: vec![(va(3), Why::Shared)], ..Pinned::default() };
        merge_pins(&mut pins, now, None, &[(va(1), va(4))]);
        assert_eq!(pins.entries, vec![kept(0, 100), kept(1, 101), kept(2, 300)]);
        assert_eq!(pins.refused, vec![(va(3), Why::Shared)]);
        assert_eq!(pins.unused_frames(), vec![102, 103]);
        // Frozen: page 0 written into the frame page 3 had (let go of above), page 2 written into
        // another frame again, page 1 unmapped.
        let mut unsent = RangeMap::new();
        unsent.insert(va(0), va(1), 0);
        unsent.insert(va(2), va(3), 0);
        let now = Pinned { pid: 7, entries: vec![kept(0, 103), kept(2, 301)], ..Pinned::default() };
        merge_pins(&mut pins, now, Some(&unsent), &[(va(0), va(1)), (va(2), va(3))]);
        assert_eq!(pins.entries, vec![kept(0, 103), kept(2, 301)]);
        // Not 103 (an entry again), nor 301; 300 (an added frame let go of), 100 and 101.
        assert_eq!(pins.unused_frames(), vec![100, 101, 102, 300]);
    }

    #[test]
    fn the_written_bitmap_gives_runs_of_pages() {
        let bits = [0b1011u64 | 1 << 63, 0b1 | 1 << 5, u64::MAX];
        assert_eq!(bit_runs(&bits, 134), vec![(0, 2), (3, 4), (63, 65), (69, 70), (128, 134)]);
        assert_eq!(bit_runs(&[0, 0], 128), vec![]);
    }

    #[test]
    fn pages_written_in_place_are_replaced_where_they_are() {
        let va = |i: u64| 0x7000_0000 + i * PAGE;
        let kept = |i: u64, pfn: u64, crc: u32| KeptPage { vaddr: va(i), pfn, crc };
        let mut pins = Pinned { pid: 7, entries: (0..6).map(|i| kept(i, 100 + i, 0)).collect(), refused: vec![(va(9), Why::NotArena)], ..Pinned::default() };
        // Pages 1 and 2 written in place; 4 and 5 swapped frames (the one let go of is the other's).
        let now = Pinned { pid: 7, entries: vec![kept(1, 101, 1), kept(2, 102, 2), kept(4, 105, 4), kept(5, 104, 5)], ..Pinned::default() };
        let changed = [(va(1), va(3)), (va(4), va(6))];
        assert!(replace_in_place(&mut pins.clone(), &now, &changed));
        let mut unsent = RangeMap::new();
        unsent.insert(va(0), va(6), 0);
        unsent.insert(va(9), va(10), 0);
        merge_pins(&mut pins, now, Some(&unsent), &changed);
        assert_eq!(pins.entries, vec![kept(0, 100, 0), kept(1, 101, 1), kept(2, 102, 2), kept(3, 103, 0), kept(4, 105, 4), kept(5, 104, 5)]);
        assert_eq!(pins.refused, vec![(va(9), Why::NotArena)]);
        assert_eq!(pins.unused_frames(), Vec::<u64>::new());
        // Not in place: a page unmapped since (3 is outside the present pages).
        let mut unsent = RangeMap::new();
        unsent.insert(va(0), va(3), 0);
        unsent.insert(va(4), va(6), 0);
        assert!(!covers_entries(&unsent, &pins.entries));
        merge_pins(&mut pins, Pinned::default(), Some(&unsent), &[]);
        assert_eq!(pins.entries.len(), 5);
        assert_eq!(pins.unused_frames(), vec![103]);
    }
}
