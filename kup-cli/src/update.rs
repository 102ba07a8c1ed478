//! `kup update`: preflight, checkpoint, update record, clean unmount, `kexec -e`.
//!
//! Nothing is frozen until the preflight has passed: the new kernel loads, its command line keeps
//! the region's `memmap=`, the old kernel is there to fall back to, every pid exists, CRIU is
//! usable and the store has room.

use std::path::{Path, PathBuf};

use foam_store::manifest::Manifest;

use crate::checkpoint;
use crate::criu::Criu;
use crate::error::{fail, Result};
use crate::kernels;
use crate::kexec;
use crate::procs::{self, Process};
use crate::machine::{self, Milestone};
use crate::record::{self, Kernel, UpdateRecord};
use crate::{restore, resume};
use crate::report;

/// Where Debian installs kernels and their initrds.
const BOOT: &str = "/boot";

pub struct Args {
    /// None: the newest kernel in /boot (kernels.rs).
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
    /// The store directory; with `--store ram`, the rpramfs mount point.
    pub store: PathBuf,
    /// The region under the store (`--store ram`): unmounted cleanly before the switch.
    pub region: Option<PathBuf>,
    pub pids: Vec<u32>,
    pub iterations: u32,
    /// Auto-converge's CPU share (`--throttle`), see checkpoint::Args.
    pub throttle: Option<u32>,
    pub health_check: Option<String>,
    pub dry_run: bool,
    pub old_kernel: Option<PathBuf>,
    pub old_initrd: Option<PathBuf>,
    pub old_append: Option<String>,
    pub json: bool,
    pub ppp: PppMode,
    /// PPP: take (and at restore check) each kept page's CRC.
    pub ppp_crc: bool,
}

/// Whether the update keeps the apps' pages in place (PPP) or copies them through the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PppMode {
    /// PPP where the arena and the module are there and its checks pass, else FOAM (kup says why).
    Auto,
    /// PPP or refuse.
    On,
    Off,
}

/// Bytes per second the store takes in 1 MiB writes (32 MiB written, synced, removed).
fn store_write_rate(store: &std::path::Path) -> std::io::Result<f64> {
    use std::io::Write;
    let path = store.join(".kup-rate-probe");
    let start = std::time::Instant::now();
    let mut f = std::fs::File::create(&path)?;
    let chunk = vec![0x5au8; 1 << 20];
    for _ in 0..32 {
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    let secs = start.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok((32u64 << 20) as f64 / secs.max(1e-6))
}

/// The dry run's FOAM estimate: the apps' write rate measured over a second, the passes the
/// checkpoint's rule would make of it (converge.rs), and the final dump's share of the store's rate.
fn foam_estimate(criu: &Criu, a: &Args, procs_: &[Process], memory: u64, store_rate: f64) -> String {
    let pids: Vec<u32> = procs_.iter().flat_map(|p| p.tree()).collect();
    let pages = memory / 4096;
    let tracked = criu.has_dirty_tracking();
    let rate = match tracked.then(|| crate::ppp::write_rate(&pids, std::time::Duration::from_secs(1))) {
        None => 0.0,
        Some(Ok(r)) => r,
        Some(Err(e)) => return format!("none (measuring the apps' write rate failed: {e})"),
    };
    let policy = crate::converge::Policy { max_passes: if tracked { a.iterations } else { 1 }, throttle: a.throttle };
    let e = policy.estimate(pages, rate, store_rate / 4096.0);
    let mib = |p: u64| format!("{:.1} MiB", p as f64 / 256.0);
    let pre = if e.sent.is_empty() {
        "no pre-dump (one pass)".to_string()
    } else {
        format!("pre-dumps of {} ({})", e.sent.iter().map(|&p| mib(p)).collect::<Vec<_>>().join(", "), e.stop.describe())
    };
    let written = if tracked { format!("the apps write {:.1} MiB/s of distinct pages (measured over 1 s)", rate / 256.0) } else { "CRIU tracks no dirty pages here".into() };
    format!(
        "{written} and the store takes {:.0} MiB/s: {pre}, then a final dump of ~{} frozen for ~{:.1} s; the kernel's boot and the restore come on top",
        store_rate / 1048576.0,
        mib(e.final_pages),
        e.final_pages as f64 * 4096.0 / store_rate
    )
}

pub fn run(criu: &Criu, a: &Args) -> Result<()> {
    // ---- preflight ----------------------------------------------------------------------------
    let current_cmdline = std::fs::read_to_string("/proc/cmdline").map_err(|e| format!("/proc/cmdline: {e}"))?.trim().to_string();
    let new_cmdline = a.append.clone().unwrap_or_else(|| current_cmdline.clone());
    let old_release = procs::kernel_release();
    let (kernel, initrd, chosen) = match &a.kernel {
        Some(k) => (k.clone(), a.initrd.clone(), ""),
        None => {
            let k = kernels::newest(Path::new(BOOT), &old_release)?;
            (k.image, a.initrd.clone().or(k.initrd), " (the newest in /boot)")
        }
    };
    if !kernel.is_file() {
        return fail(format!("the new kernel {} does not exist", kernel.display()));
    }
    let new_release = record::image_release(&kernel).ok_or_else(|| format!("{} is not a bootable kernel image (no bzImage header)", kernel.display()))?;
    if let Some(i) = initrd.as_ref().filter(|i| !i.is_file()) {
        return fail(format!("the initrd {} does not exist", i.display()));
    }
    if let Some(region) = &a.region {
        for m in kexec::memmap_params(&current_cmdline) {
            if !kexec::memmap_entries(&new_cmdline).contains(&&m["memmap=".len()..]) {
                return fail(format!(
                    "the new command line drops {m}, which reserves the region holding the checkpoint; the new kernel would not find it. Add {m} to --append"
                ));
            }
        }
        if !kexec::is_mounted(&a.store) {
            return fail(format!("the store {} is not mounted (rpramfs mount {} {})", a.store.display(), region.display(), a.store.display()));
        }
    }
    let old_image = a.old_kernel.clone().unwrap_or_else(|| Path::new(BOOT).join(format!("vmlinuz-{old_release}")));
    if !old_image.is_file() {
        return fail(format!("the running kernel's image {} is missing; kup needs it to fall back (pass --old-kernel)", old_image.display()));
    }
    let old_initrd = a.old_initrd.clone().or_else(|| Some(Path::new(BOOT).join(format!("initrd.img-{old_release}"))).filter(|p| p.is_file()));
    let procs_: Vec<Process> = a.pids.iter().map(|&p| Process::inspect(p)).collect::<Result<_>>()?;
    let memory: u64 = procs_.iter().map(|p| p.memory_bytes()).sum();
    let ppp = match a.ppp {
        PppMode::Off => Err("not asked for (--no-ppp)".to_string()),
        PppMode::On => Ok(crate::ppp::plan_update(&new_release, &new_cmdline, &a.pids).map_err(|e| format!("--ppp: {e}; nothing was stopped"))?),
        PppMode::Auto => match crate::ppp::Arena::running()? {
            None => Err("no arena (memmap=SIZE$START) on the running command line".to_string()),
            Some(_) => crate::ppp::plan_update(&new_release, &new_cmdline, &a.pids).map_err(|e| e.to_string()),
        },
    };
    let arena = ppp.as_ref().ok().map(|p| p.arena);
    let free = checkpoint::check_room(&a.store, checkpoint::room_needed(&procs_, arena)?)?;
    let new = Kernel { release: new_release, image: kernel, initrd, cmdline: new_cmdline };
    let old = Kernel { release: old_release, image: old_image, initrd: old_initrd, cmdline: a.old_append.clone().unwrap_or(current_cmdline) };
    kexec::load(&new)?;

    if !a.json || a.dry_run {
        println!("kup update: {} -> {}", old.release, new.release);
        println!("  new kernel: {}{chosen} (initrd {}), command line: {}", new.image.display(), new.initrd.as_ref().map_or("none".into(), |p| p.display().to_string()), new.cmdline);
        println!("  fallback:   {} (initrd {})", old.image.display(), old.initrd.as_ref().map_or("none".into(), |p| p.display().to_string()));
        println!("  apps:       {} ({} of memory) into {}", procs_.iter().map(|p| format!("{}-{}", p.comm, p.pid)).collect::<Vec<_>>().join(", "), report::bytes(memory), a.store.display());
        match &ppp {
            Ok(plan) => println!("  memory:     {}", plan.describe()),
            Err(why) => println!("  memory:     FOAM: every page goes through the store (PPP not used: {why})"),
        }
    }
    if a.dry_run {
        kexec::unload();
        println!("  store:      {} free for {} of app memory", report::bytes(free), report::bytes(memory));
        match (&ppp, store_write_rate(&a.store)) {
            (Ok(plan), _) => println!(
                "  estimate:   CRIU's final dump sends only the pages written after kup checksummed them; pinning the {} kept pages and storing the {} others takes the rest of the frozen time; the kernel's boot and the restore come on top",
                plan.in_arena, plan.outside
            ),
            (Err(_), Ok(rate)) => println!("  estimate:   {}", foam_estimate(criu, a, &procs_, memory, rate)),
            (Err(_), Err(e)) => println!("  estimate:   none (measuring the store failed: {e})"),
        }
        println!("  preflight passed (the new kernel loads, its command line keeps the region, the pids exist, the store has room); nothing was stopped");
        return Ok(());
    }

    // ---- checkpoint ---------------------------------------------------------------------------
    let started = report::unix_ms();
    let ck = checkpoint::Args {
        pids: a.pids.clone(),
        store: a.store.clone(),
        iterations: a.iterations,
        leave_running: false,
        name: Some("update".into()),
        json: a.json,
        criu_options: vec![],
        ppp: ppp.is_ok(),
        ppp_crc: a.ppp_crc,
        throttle: a.throttle,
    };
    let m = match checkpoint::run(criu, &ck) {
        Ok(m) => m,
        Err(e) => {
            kexec::unload();
            // The checkpoint's error lists every app's state (all or nothing: none was stopped).
            return fail(format!("{e}\nkup update stopped before switching kernels; nothing was switched"));
        }
    };
    let done = m.finished_unix_ms.unwrap_or_else(report::unix_ms);
    let frozen_ms = m.apps.iter().filter_map(|a| a.passes.last()?.criu.map(|c| c.frozen_time_us / 1000)).max().unwrap_or(0);
    let mut rec = UpdateRecord::new(old, new, m.id.clone(), m.apps.iter().map(|a| a.name.clone()).collect(), a.health_check.clone());
    if m.apps.iter().any(|a| a.ppp.is_some()) {
        let ps = || m.apps.iter().filter_map(|a| a.ppp.as_ref());
        rec.ppp = Some(crate::record::PppFigures {
            kept: ps().map(|p| p.kept).sum(),
            to_store: ps().map(|p| p.not_kept.values().sum::<u64>()).sum(),
            checksum_ms: ps().map(|p| p.checksum_ms).fold(0.0, f64::max),
            crc_frozen: ps().map(|p| p.crc_frozen).sum(),
            catch_up: ps().fold(vec![], |mut sum, p| {
                sum.resize(sum.len().max(p.catch_up.len()), 0);
                sum.iter_mut().zip(&p.catch_up).for_each(|(s, n)| *s += n);
                sum
            }),
            pin_ms: ps().map(|p| p.pin_ms).fold(0.0, f64::max),
            written_ms: ps().map(|p| p.written_ms).fold(0.0, f64::max),
            pin_parts_ms: ps().map(|p| [p.pinning_ms, p.copy_ms, p.lists_ms]).fold([0.0; 3], |a, b| [a[0].max(b[0]), a[1].max(b[1]), a[2].max(b[2])]),
            no_crc: ps().any(|p| !p.crc),
            ..Default::default()
        });
    }
    rec.event(Milestone::CheckpointStart, started);
    rec.event(Milestone::Frozen, done.saturating_sub(frozen_ms));
    rec.event(Milestone::CheckpointDone, done);
    rec.event_now(Milestone::Kexec);

    // ---- switch: the apps are stopped from here on, so any failure brings them back -----------
    let switched = (|| -> Result<()> {
        crate::faults::at("update-record")?;
        rec.save(&a.store)?;
        if let Some(region) = &a.region {
            kexec::unmount_store(&a.store, region)?;
        } else {
            nix::unistd::sync();
        }
        println!("kup update: checkpoint {} stored; switching to {} now", m.id, rec.new.release);
        crate::faults::at("kexec-exec")?;
        kexec::execute()
    })();
    let cause = switched.expect_err("kexec -e returns only on failure");
    kexec::unload();
    bring_back(criu, a, &m, &mut rec, cause)
}

/// After the apps were stopped, the switch failed on the old kernel: the apps are restored from
/// the checkpoint right here, or, where that fails too, the error says where each one is and the
/// command that brings it back.
fn bring_back(criu: &Criu, a: &Args, m: &Manifest, rec: &mut UpdateRecord, cause: crate::error::Error) -> Result<()> {
    crate::messages::say(crate::messages::Level::Warning, &format!("kup update: could not switch kernels ({cause}); restoring the apps from checkpoint {} on {}", m.id, procs::kernel_release()));
    let stranded = |why: String| {
        let apps: Vec<String> = m.apps.iter().map(|p| format!("    {} (pid {}): {}", p.name, p.pid, if procs::alive(p.pid) { "running" } else { "stopped, its state is in the checkpoint" })).collect();
        format!(
            "kup update could not switch kernels: {cause}\n  and bringing the apps back failed: {why}\n  apps:\n{}\n  checkpoint {} in {} is intact; restore them with:\n    {}",
            apps.join("\n"),
            m.id,
            a.store.display(),
            resume::restore_command(&a.store, a.region.as_deref(), &m.id)
        )
    };
    // The failure may have come after the unmount.
    if let Some(region) = a.region.as_ref().filter(|_| !kexec::is_mounted(&a.store)) {
        resume::mount_store(region, &a.store).map_err(|e| stranded(format!("mounting the store again: {e}")))?;
    }
    rec.advance(machine::Event::SwitchFailed(cause.to_string())).map_err(|r| r.to_string())?;
    rec.event_now(Milestone::SwitchFailed);
    // The record may be what failed; the restore goes on without it.
    let _ = rec.save(&a.store);
    // The same restore and health check as `kup resume`, on this kernel.
    let here = resume::Args { store: a.store.clone(), region: a.region.clone(), mode: restore::Mode::Lazy, timeout: std::time::Duration::from_secs(600) };
    match resume::restore_and_check(criu, &here, rec, a.json) {
        Ok(()) => {
            rec.advance(machine::Event::Healthy).map_err(|r| r.to_string())?;
            rec.event_now(Milestone::Serving);
            let _ = rec.save(&a.store);
            // A restore brings every app back under its old pid.
            let pids: Vec<String> = m.apps.iter().map(|p| format!("{} (pid {})", p.name, p.pid)).collect();
            fail(format!(
                "kup update could not switch kernels: {cause}\n  the apps were restored from checkpoint {} and run again on {}: {}\n  (the checkpoint is kept in {}; kup status shows the update)",
                m.id,
                procs::kernel_release(),
                pids.join(", "),
                a.store.display()
            ))
        }
        Err(e) => {
            let _ = rec.advance(machine::Event::ResumeFailed(e.to_string()));
            let _ = rec.save(&a.store);
            fail(stranded(e.to_string()))
        }
    }
}
