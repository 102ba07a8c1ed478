//! `kup restore`: brings a checkpoint's apps back, lazily (default) or eagerly.
//!
//! Both modes give CRIU an images directory made of the final dump's own images plus a pagemap
//! and pages image synthesized from FOAM (page CRCs checked). Lazy: private anonymous memory is
//! marked PE_LAZY and served on demand by kup's GET server to `criu lazy-pages`, so the app runs
//! as soon as its non-memory state is back. Eager: a process's own pages are holes in CRIU's
//! image; CRIU leaves the tasks stopped, kup writes the pages into them (crate::fill) and lets
//! them run; shared memory goes into the pages image.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use foam_store::criu_images::{read_pstree, write_restore_images, SynthStats};
use foam_store::lazy_server::{self, LazySpace};
use foam_store::manifest::{App, Manifest};
use foam_store::protocol::Target;
use foam_store::ranges::RangeMap;
use foam_store::spaces::Spaces;
use foam_store::store::Store;

use crate::criu::{self, Criu};
use crate::error::{fail, Result};
use crate::procs;
use crate::report;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    #[default]
    Lazy,
    Eager,
}

pub struct Args {
    pub store: PathBuf,
    pub checkpoint: Option<String>,
    pub mode: Mode,
    pub json: bool,
    /// Where CRIU's logs and the lazy-pages socket go (a local directory, not the store).
    pub work_root: PathBuf,
    /// How long CRIU may take for each step before kup kills it and reports a failure.
    pub timeout: Duration,
    /// PPP: keep the checkpoint's pages as they were until `ppp::release` (a resume does, once
    /// the apps are healthy: until then a fallback needs them); else they are released at once.
    pub keep_ppp_pages: bool,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct AppRestore {
    pub name: String,
    pub pid: u32,
    pub mode: Mode,
    /// From the start of `kup restore` until the app's tasks run again.
    pub running_ms: f64,
    /// Of that, building CRIU's images from FOAM.
    pub images_ms: f64,
    /// Lazy: until the last page was fetched in the background.
    pub fetched_ms: Option<f64>,
    pub pages_eager: u64,
    pub pages_lazy: u64,
    pub pages_served: u64,
    /// PPP: pages put back where they were (no copy), pages copied into addresses the restore had
    /// populated already (e.g. a thread's rseq area), and how long that took.
    pub pages_in_place: u64,
    pub pages_copied_in: u64,
    pub pages_guarded: u64,
    pub map_ms: f64,
    /// Eager: writing the pages into the stopped tasks (crate::fill), and how many of them went
    /// through /proc/PID/mem (mappings the process may not write).
    pub fill_ms: f64,
    pub pages_forced: u64,
    /// Of `fill_ms`, the time spent reading and checking the pages, and writing them (the two
    /// overlap).
    pub fill_read_ms: f64,
    pub fill_write_ms: f64,
    /// Lazy: the requests `criu lazy-pages` sent kup's page server, the time the server spent
    /// reading and checking pages, and sending them (including waiting for CRIU to read them).
    pub lazy_requests: u64,
    pub server_read_ms: f64,
    pub server_send_ms: f64,
}

/// PPP pages of the checkpoint being restored: the module and every process's PFN list.
struct PppRestore {
    dev: crate::ppp_dev::Device,
    lists: BTreeMap<(String, u32), Vec<crate::ppp::KeptPage>>,
    /// Apps whose pages' CRCs were taken at checkpoint (and are checked).
    crc: BTreeMap<String, bool>,
    /// The pages are still pinned by this boot's checkpoint: they are copied, not put in place.
    same_boot: bool,
}

pub fn run(criu: &Criu, a: &Args) -> Result<Vec<AppRestore>> {
    if !a.store.is_dir() {
        return fail(format!("the store {} does not exist (is the region mounted?)", a.store.display()));
    }
    let store = Store::open(&a.store)?;
    let (dir, m) = store.pick(a.checkpoint.as_deref())?;
    if !m.restorable() {
        return fail(format!("checkpoint {} is not restorable: {}", m.id, serde_json::to_string(&m.state).unwrap_or_default()));
    }
    for app in &m.apps {
        check_ids_free(&dir, app)?;
    }
    let ppp = ppp_prepare(&dir, &m)?;
    let mut mode = a.mode;
    if let Some(p) = &ppp {
        // Pages are mapped into holes; a lazy VMA (userfaultfd) refuses them.
        mode = Mode::Eager;
        if !a.json {
            if p.same_boot {
                println!("  note: checkpoint {} was taken on this boot: its PPP pages are still pinned and are mapped as copies; the rest of the memory is restored eagerly", m.id);
            } else {
                println!("  note: PPP pages are put back in place before the apps run; the rest of their memory is restored eagerly");
            }
        }
    }
    // Asking CRIU about lazy pages also has it detect (and cache) the kernel's features.
    let features_detected = mode == Mode::Lazy;
    if mode == Mode::Lazy && !criu.has_lazy_pages() {
        mode = Mode::Eager;
        if !a.json {
            println!("  note: this kernel's userfaultfd lacks what criu lazy-pages needs (uffd-noncoop); restoring eagerly");
        }
    }
    // An eager restore writes the pages of shared memory (shmem, memfds) into CRIU's pages image
    // in the store; a process's own pages go straight into it (crate::fill).
    if mode == Mode::Eager {
        let shared = m.apps.iter().flat_map(|a| &a.spaces).filter(|s| !matches!(Target::from_stem(&s.name), Some(Target::Pid(_))));
        let need: u64 = shared.flat_map(|s| &s.ranges).map(|r| r.pages() * 4096).sum();
        let free = crate::checkpoint::free_bytes(&a.store)?;
        if need > free {
            return fail(format!(
                "an eager restore writes CRIU's pages image of the apps' shared memory ({}) into the store, which has {} free; restore lazily (--lazy, the default) or free space in the store",
                report::bytes(need),
                report::bytes(free)
            ));
        }
    }
    if !a.json {
        println!("restoring checkpoint {} ({} app(s), {}, taken on {}) {}", m.id, m.apps.len(), report::bytes(m.pages() * 4096), m.kernel, if mode == Mode::Lazy { "lazily" } else { "eagerly" });
    }
    if m.apps.len() > 1 && !features_detected {
        criu.detect_kernel_features();
    }
    let start = Instant::now();
    let results: Vec<Result<AppRestore>> = std::thread::scope(|s| {
        let hs: Vec<_> = m.apps.iter().map(|app| s.spawn(|| restore_app(criu, a, &m, &dir, app, mode, ppp.as_ref(), start))).collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|_| fail("a restore thread panicked"))).collect()
    });
    let mut done = Vec::new();
    let mut errors = Vec::new();
    for (app, r) in m.apps.iter().zip(results) {
        match r {
            Ok(r) => done.push(r),
            Err(e) => errors.push(format!("{}: {e}", app.name)),
        }
    }
    if ppp.is_some() && !a.keep_ppp_pages {
        // Pages no app claimed (a failed restore's) go to the page allocator.
        if let Err(e) = crate::ppp::release() {
            crate::messages::warn(format_args!("the arena's unclaimed held-back pages stay held until the next boot: {e}"));
        }
    }
    if a.json {
        report::print_json(&serde_json::json!({ "checkpoint": m.id, "mode": mode, "apps": done, "errors": errors }));
    } else {
        for r in &done {
            let fetched = r.fetched_ms.map(|f| format!(", all memory fetched after {f:.1} ms ({} pages on demand/prefetched)", r.pages_served)).unwrap_or_default();
            let in_place = if ppp.is_some() { format!(
                ", {} pages put back in place and {} copied (pinned on this boot, or into pages the restore had written), {} of them kept intact until the apps are healthy, in {:.1} ms",
                r.pages_in_place, r.pages_copied_in, r.pages_guarded, r.map_ms
            ) } else { String::new() };
            let filled = if r.mode == Mode::Eager { format!(", memory written into the stopped tasks in {:.1} ms", r.fill_ms) } else { String::new() };
            println!("  {}: running again after {:.1} ms (images {:.1} ms{filled}){fetched}{in_place}", r.name, r.running_ms, r.images_ms);
        }
    }
    if !errors.is_empty() {
        return fail(format!("restore of checkpoint {} failed: {}", m.id, errors.join("; ")));
    }
    Ok(done)
}

/// Reads the checkpoint's PFN lists and brings the arena online with their pages held back.
fn ppp_prepare(dir: &Path, m: &Manifest) -> Result<Option<PppRestore>> {
    if m.apps.iter().all(|a| a.ppp.is_none()) {
        return Ok(None);
    }
    let mut lists = BTreeMap::new();
    let mut held = vec![];
    let mut arena = None;
    let boot = crate::ppp::boot_id();
    // Taken on this very boot (a switch that failed, or a restore without one): the pages are
    // still pinned, not held back, and are mapped as copies.
    let mut same_boot = false;
    let mut crc = BTreeMap::new();
    for app in &m.apps {
        let Some(p) = &app.ppp else { continue };
        if p.boot_id == boot {
            same_boot = true;
        }
        let a = crate::ppp::Arena { start: p.arena_start, size: p.arena_size };
        if arena.is_some_and(|b| b != a) {
            return fail(format!("checkpoint {}: its apps' pages lie in different arenas", m.id));
        }
        arena = Some(a);
        crc.insert(app.name.clone(), p.crc);
        for l in &p.lists {
            let (head, entries) = crate::ppp::load_list(&dir.join(&app.name), l)?;
            held.extend(entries.iter().map(|e| e.pfn));
            lists.insert((app.name.clone(), head.pid), entries);
        }
    }
    let arena = arena.expect("an app has PPP pages");
    match crate::ppp::Arena::running()? {
        Some(now) if now == arena => {}
        Some(now) => return fail(format!("checkpoint {}'s pages lie in the arena {arena}, but this kernel reserves {now}: boot with the checkpoint's memmap=", m.id)),
        None => return fail(format!("checkpoint {}'s pages lie in the arena {arena}, but this kernel was booted without memmap=SIZE$START: they cannot be put back", m.id)),
    }
    held.sort_unstable();
    if let Some(w) = held.windows(2).find(|w| w[0] == w[1]) {
        return fail(format!("checkpoint {} names PFN {:#x} twice", m.id, w[0]));
    }
    let dev = crate::ppp::open()?;
    if same_boot {
        let info = dev.info().map_err(|e| format!("{}: {e}", crate::ppp::DEVICE))?;
        if info.pinned_pages < held.len() as u64 {
            return fail(format!(
                "checkpoint {} was taken on this boot, but only {} of its {} pages are still pinned (a release or another checkpoint let them go): it cannot be restored",
                m.id,
                info.pinned_pages,
                held.len()
            ));
        }
    } else {
        crate::ppp::attach(&dev, arena, &held)?;
    }
    Ok(Some(PppRestore { dev, lists, crc, same_boot }))
}

/// Puts an app's PPP pages back into its restored, still stopped, processes (CRC first), then lets
/// them run. On failure the restored tasks are killed: they must not run on missing memory.
fn ppp_map_and_start(p: &PppRestore, app: &App, guard: bool, out: &mut AppRestore) -> Result<()> {
    let t = Instant::now();
    for ((name, pid), entries) in p.lists.range((app.name.clone(), 0)..=(app.name.clone(), u32::MAX)) {
        let verify = p.crc.get(name).copied().unwrap_or(true);
        match crate::ppp::map_process(&p.dev, name, *pid, entries, verify, guard) {
            Ok(m) => {
                out.pages_in_place += m.in_place;
                out.pages_copied_in += m.copied;
                out.pages_guarded += m.guarded;
            }
            Err(e) => {
                kill_tasks(app);
                return fail(format!("{e}; the restored tasks of {} were killed", app.name));
            }
        }
    }
    out.map_ms = report::ms(t.elapsed());
    start_tasks(app);
    Ok(())
}

/// Lets the tasks `criu restore --leave-stopped` left stopped run.
fn start_tasks(app: &App) {
    for s in &app.spaces {
        if let Some(Target::Pid(pid)) = Target::from_stem(&s.name) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGCONT);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn restore_app(criu: &Criu, a: &Args, m: &Manifest, ckpt_dir: &Path, app: &App, mode: Mode, ppp: Option<&PppRestore>, start: Instant) -> Result<AppRestore> {
    let app_dir = ckpt_dir.join(&app.name);
    let Some(final_rel) = app.final_criu_dir() else { return fail("the checkpoint has no final dump") };
    let final_dir = app_dir.join(final_rel);
    // CRIU's images for this restore, in the store next to the checkpoint (pages images can be large).
    let images = app_dir.join("restore");
    if images.exists() {
        std::fs::remove_dir_all(&images).map_err(|e| format!("{}: {e}", images.display()))?;
    }
    mkdir_private(&images)?;
    for e in std::fs::read_dir(&final_dir).map_err(|e| format!("{}: {e}", final_dir.display()))? {
        let e = e.map_err(|e| format!("{}: {e}", final_dir.display()))?;
        let n = e.file_name().to_string_lossy().into_owned();
        let ours = n.starts_with("pagemap-") || n.starts_with("pages-") || n == "parent" || n.starts_with("criu.") || n == "stats-dump";
        if !ours && e.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::copy(e.path(), images.join(&n)).map_err(|err| format!("{}: {err}", e.path().display()))?;
        }
    }
    let spaces = Spaces::open(&app_dir.join("mem"), m.file_mode);
    let mut lazy_spaces = BTreeMap::new();
    let mut synth = SynthStats::default();
    let mut fills = Vec::new();
    for (i, s) in app.spaces.iter().enumerate() {
        let t = Target::from_stem(&s.name).ok_or_else(|| format!("manifest names an unknown address space {:?}", s.name))?;
        let file = spaces.get_or_create(t)?;
        let mut ranges = RangeMap::from_ranges(&s.ranges);
        if let (Some(p), Target::Pid(pid)) = (ppp, t) {
            // Pages put back in place are holes in CRIU's image.
            for e in p.lists.get(&(app.name.clone(), pid)).into_iter().flatten() {
                ranges.remove(e.vaddr, e.vaddr + 4096);
            }
        }
        if let (Mode::Eager, Target::Pid(pid)) = (mode, t) {
            // The pages CRIU could restore lazily (private anonymous memory, not stacks) may be
            // missing while it restores: kup writes them into the stopped process itself
            // (crate::fill), and they are holes in CRIU's image, as PPP's are.
            let fill = RangeMap::from_ranges(&ranges.iter().filter(|r| r.lazy()).collect::<Vec<_>>());
            for r in fill.iter() {
                ranges.remove(r.start, r.end);
            }
            synth.pages_copied += fill.pages();
            fills.push((pid, Arc::clone(&file), fill));
        }
        let st = write_restore_images(&images, t, i as u32 + 1, Some(&file), &ranges, mode == Mode::Lazy)
            .map_err(|e| format!("{e} (app {}, address space {})", app.name, s.name))?;
        synth.pages_copied += st.pages_copied;
        synth.pages_lazy += st.pages_lazy;
        if let (Target::Pid(pid), true) = (t, st.pages_lazy > 0) {
            let lazy = RangeMap::from_ranges(&s.ranges.iter().filter(|r| r.lazy()).copied().collect::<Vec<_>>());
            lazy_spaces.insert(pid, LazySpace { file: Arc::clone(&file), lazy });
        }
    }
    let images_ms = report::ms(start.elapsed());
    let work = a.work_root.join(&m.id).join(&app.name);
    if work.exists() {
        std::fs::remove_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    }
    mkdir_private(&work)?;
    let mut restore = criu.command();
    restore.arg("restore").arg("-D").arg(&images).arg("-W").arg(&work).args(["-o", "restore.log", "-d"]).args(&app.criu_options);
    restore.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    let restore_log = work.join("restore.log");
    let mut out = AppRestore { name: app.name.clone(), pid: app.pid, mode, images_ms, pages_eager: synth.pages_copied, pages_lazy: synth.pages_lazy, ..AppRestore::default() };
    if ppp.is_some() || !fills.is_empty() {
        // The tasks wait, stopped, until their pages are back.
        restore.arg("--leave-stopped");
    }

    if mode == Mode::Eager || lazy_spaces.is_empty() {
        let child = criu.spawn(&mut restore)?;
        criu::finish(child, "criu restore", &restore_log, a.timeout)?;
        let t = Instant::now();
        for (pid, file, ranges) in &fills {
            match crate::fill::fill(*pid, file, ranges) {
                Ok(f) => {
                    out.pages_forced += f.forced;
                    out.fill_read_ms += report::ms(f.read);
                    out.fill_write_ms += report::ms(f.write);
                }
                Err(e) => {
                    // The app must not run on part of its memory.
                    kill_tasks(app);
                    return fail(format!("{e} (app {}); its restored tasks were killed", app.name));
                }
            }
        }
        out.fill_ms = report::ms(t.elapsed());
        if let Some(p) = ppp {
            ppp_map_and_start(p, app, a.keep_ppp_pages, &mut out)?;
        } else if !fills.is_empty() {
            start_tasks(app);
        }
        out.running_ms = report::ms(start.elapsed());
        remove_images(&images);
        return Ok(out);
    }

    // Lazy: kup's GET server ← socketpair → criu lazy-pages ← userfaultfds ← criu restore.
    let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    let theirs: OwnedFd = theirs.into();
    let mut daemon = criu.command();
    daemon.arg("lazy-pages").arg("-D").arg(&images).arg("-W").arg(&work);
    daemon.args(["-o", "lazy-pages.log", "--page-server", "--ps-socket", &crate::os::CHILD_FD.to_string()]);
    daemon.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    crate::os::pass_socket(&mut daemon, &theirs);
    let mut daemon = criu.spawn(&mut daemon)?;
    drop(theirs);
    let daemon_log = work.join("lazy-pages.log");
    let served = AtomicU64::new(0);
    let result = std::thread::scope(|s| -> Result<()> {
        let server = s.spawn(|| {
            let mut sock = ours;
            let r = lazy_server::serve(&mut sock, &lazy_spaces, Some(&served));
            drop(sock);
            r
        });
        // restore hands the userfaultfds over lazy-pages.socket, which the daemon creates.
        let sock_path = work.join("lazy-pages.socket");
        let waited = Instant::now();
        while !sock_path.exists() {
            if let Ok(Some(st)) = daemon.try_wait() {
                return fail(format!("criu lazy-pages exited early ({st}); see {}{}", daemon_log.display(), criu::log_errors(&daemon_log)));
            }
            if waited.elapsed() > Duration::from_secs(30) {
                let _ = daemon.kill();
                let _ = daemon.wait();
                return fail(format!("criu lazy-pages did not start within 30 s; see {}", daemon_log.display()));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        restore.arg("--lazy-pages");
        let child = criu.spawn(&mut restore)?;
        if let Err(e) = criu::finish(child, "criu restore --lazy-pages", &restore_log, a.timeout) {
            // The daemon's exit closes its socket, which ends the server thread.
            let _ = daemon.kill();
            let _ = daemon.wait();
            return Err(e);
        }
        out.running_ms = report::ms(start.elapsed());
        // Killing a stuck daemon closes its end of the socket, which ends the server thread.
        let daemon_status = criu::wait_timeout(&mut daemon, a.timeout).map_err(|e| format!("criu lazy-pages: {e}"))?;
        let served_result = server.join().map_err(|_| "the lazy-pages server thread panicked".to_string())?;
        let Some(daemon_status) = daemon_status else {
            kill_tasks(app);
            return fail(format!("criu lazy-pages did not finish fetching within {} s and was killed, and so were the restored tasks of {}; see {}", a.timeout.as_secs(), app.name, daemon_log.display()));
        };
        match served_result {
            Ok(r) => {
                out.pages_served = r.pages;
                out.lazy_requests = r.requests;
                out.server_read_ms = report::ms(r.reading);
                out.server_send_ms = report::ms(r.sending);
                if !daemon_status.success() {
                    return fail(format!("criu lazy-pages failed ({daemon_status}); see {}{}", daemon_log.display(), criu::log_errors(&daemon_log)));
                }
                out.fetched_ms = Some(report::ms(start.elapsed()));
                Ok(())
            }
            Err(e) => {
                // The app must not run on missing or wrong memory: stop what was restored.
                kill_tasks(app);
                fail(format!("{e}; the restored tasks of {} were killed", app.name))
            }
        }
    });
    result?;
    out.pages_served = served.load(Ordering::Relaxed).max(out.pages_served);
    remove_images(&images);
    Ok(out)
}

/// The synthesized images are a copy of the checkpoint; once the app runs they only take room.
fn remove_images(images: &Path) {
    if let Err(e) = std::fs::remove_dir_all(images) {
        crate::messages::warn(format_args!("could not remove {}: {e}", images.display()));
    }
}

/// CRIU restores every process and thread under its old id: all of them must be free.
fn check_ids_free(ckpt_dir: &Path, app: &App) -> Result<()> {
    let Some(final_rel) = app.final_criu_dir() else { return fail(format!("{}: the checkpoint has no final dump", app.name)) };
    let tree = read_pstree(&ckpt_dir.join(&app.name).join(final_rel))?;
    for (pid, threads) in &tree {
        for id in std::iter::once(pid).chain(threads) {
            // A just-dumped task is reaped by its parent a moment after CRIU kills it.
            if procs::exists(*id) && !procs::wait_gone(*id, Duration::from_secs(3)) {
                let holder = procs::Process::inspect(*id).map(|p| format!("{} (pid {})", p.comm, procs::tgid(*id).unwrap_or(*id))).unwrap_or_else(|_| "another task".into());
                return fail(format!(
                    "id {id} (a task of {}) is in use by {holder}: CRIU restores every process and thread under its old id; stop that process (if it is the checkpointed app itself, it was checkpointed with --leave-running)",
                    app.name
                ));
            }
        }
    }
    Ok(())
}

fn kill_tasks(app: &App) {
    for s in &app.spaces {
        if let Some(Target::Pid(pid)) = Target::from_stem(&s.name) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

fn mkdir_private(p: &Path) -> Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(p).map_err(|e| format!("{}: {e}", p.display()).into())
}
