//! `kup checkpoint`: incremental checkpoints through CRIU into a FOAM store.
//!
//! Passes 1..N-1 are `criu pre-dump` (the app keeps running), pass N is `criu dump` (frozen). Each
//! pass's pages arrive over a socketpair at kup's page server and are written into the same FOAM
//! files; after the final dump everything it did not name is punched out. Nothing is frozen before
//! the preflight (pids, CRIU, room in the store) has passed.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use foam_store::criu_images::read_dump_stats;
use foam_store::foam::{FileMode, WriteMode};
use foam_store::manifest::{App, Manifest, Pass, PassKind, Space, State, MANIFEST_VERSION};
use foam_store::protocol::Target;
use foam_store::ranges::RangeMap;
use foam_store::receiver::{Receiver, SessionReport};
use foam_store::spaces::Spaces;
use foam_store::store::Store;
use parking_lot::Mutex;

use crate::commit::{CommitGate, FinalGate, Held, Hooks, Ticket, Verdict};
use crate::criu::{self, Criu};
use crate::error::{fail, Result};
use crate::procs::{self, Process};
use crate::report;
use crate::staging;

pub struct Args {
    pub pids: Vec<u32>,
    pub store: PathBuf,
    pub iterations: u32,
    pub leave_running: bool,
    pub name: Option<String>,
    pub json: bool,
    /// Extra CRIU options for every pass (and kept for restore).
    pub criu_options: Vec<String>,
    /// Keep the apps' pages in place (PPP, ppp.ko) instead of only in the store.
    pub ppp: bool,
    /// PPP: take each kept page's CRC, so that restore checks it before the app can read it.
    pub ppp_crc: bool,
    /// Auto-converge: the share (percent) of its CPU use an app whose dirty set stops shrinking
    /// keeps during one more pre-dump; `None`: no throttling.
    pub throttle: Option<u32>,
}

/// PPP during one checkpoint: the module, the arena and the checkpoint's pin tag.
struct PppRun {
    dev: crate::ppp_dev::Device,
    arena: crate::ppp::Arena,
    tag: u64,
    crc: bool,
}

/// Room kept free beyond the apps' memory: CRIU's own images and the manifest.
const SLACK_BYTES: u64 = 64 << 20;

pub fn run(criu: &Criu, a: &Args) -> Result<Manifest> {
    // ---- preflight: nothing is frozen until all of this passed -------------------------------
    if a.pids.is_empty() {
        return fail("no --pid given");
    }
    if a.iterations == 0 {
        return fail("--iterations must be at least 1");
    }
    let procs: Vec<Process> = a.pids.iter().map(|&p| Process::inspect(p)).collect::<Result<_>>()?;
    // Processes an operator had stopped stay stopped whatever happens below.
    let stopped_before: Vec<u32> = procs.iter().flat_map(|p| p.tree()).filter(|&pid| procs::is_stopped(pid)).collect();
    let ppp_arena = if a.ppp { Some(ppp_preflight(criu)?) } else { None };
    let store = Store::open(&a.store)?;
    let mode = FileMode::probe(store.root())?;
    let memory: u64 = procs.iter().map(|p| p.memory_bytes()).sum();
    check_room(&a.store, room_needed(&procs, ppp_arena.as_ref().map(|(_, arena)| *arena))?)?;
    // PPP needs no pre-dumps: the pages stay where they are, and the final dump sends only those
    // written since kup reset their soft-dirty bits (see `start_pass`).
    let incremental = a.iterations > 1 && criu.has_dirty_tracking() && ppp_arena.is_none();
    let passes = if incremental { a.iterations } else { 1 };
    let write_mode = WriteMode::probe(store.root(), crate::direct_writes());
    // Naming the CRC32 implementation also picks it (a timing), before any app is frozen.
    let mut notes = vec![format!("store layout: {}; {}; page CRC32 by the {}, the faster here", mode.describe(), write_mode.describe(), pagecrc::implementation().name())];
    if a.iterations > 1 && !incremental && ppp_arena.is_none() {
        notes.push("this kernel has no soft-dirty tracking (CONFIG_MEM_SOFT_DIRTY), so CRIU cannot pre-dump: one full pass while the app is frozen".into());
    }

    let name = a.name.clone().unwrap_or_else(|| procs[0].comm.chars().filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c)).collect());
    let name = if name.is_empty() { "app".to_string() } else { name };
    let (id, dir) = store.create_checkpoint(&name)?;
    let ppp = ppp_arena.map(|(dev, arena)| PppRun { dev, arena, tag: crate::ppp::tag(&id), crc: a.ppp_crc });
    if let Some(p) = &ppp {
        notes.push(format!("PPP: pages in the arena {} stay in place (ppp.ko); the others go into the store", p.arena));
    }
    let staging = staging::Plan::choose(&id);
    notes.push(staging.describe());
    let mut manifest = Manifest {
        version: MANIFEST_VERSION,
        id: id.clone(),
        name,
        state: State::InProgress,
        created_unix_ms: report::unix_ms(),
        finished_unix_ms: None,
        kernel: procs::kernel_release(),
        criu_version: criu.version.clone(),
        file_mode: mode,
        incremental,
        apps: vec![],
    };
    manifest.save(&dir)?;
    if !a.json {
        println!("checkpoint {id} in {} ({} app(s), {} of memory, {passes} pass(es))", a.store.display(), procs.len(), report::bytes(memory));
        for n in &notes {
            println!("  note: {n}");
        }
    }

    // ---- the passes, all apps in parallel; the final dumps as one transaction -----------------
    let bars = report::multi_progress(a.json);
    let hooks = Hooks::new(&Path::new(HOOKS_ROOT).join(std::process::id().to_string()))?;
    let final_gate = FinalGate::new(procs.len());
    let base = manifest.clone();
    let commit_gate = CommitGate::new(procs.len(), |ready: &[(usize, App)]| {
        // The commit point: every app's final dump is held and in the store; once this manifest
        // is durable the apps may be stopped.
        let mut m = base.clone();
        let mut apps = ready.to_vec();
        apps.sort_by_key(|(i, _)| *i);
        m.apps = apps.into_iter().map(|(_, app)| app).collect();
        m.state = State::Complete;
        m.finished_unix_ms = Some(report::unix_ms());
        m.save(&dir).map_err(Into::into)
    });
    let out = Mutex::new(());
    let policy = crate::converge::Policy { max_passes: passes, throttle: a.throttle };
    let shared = Shared { criu, a, dir: &dir, mode, sync_copies: !write_mode.durable_on_reply(), policy, incremental, staging: &staging, bars: &bars, out: &out, hooks: &hooks, commit: &commit_gate, ppp: ppp.as_ref() };
    let results: Vec<std::result::Result<App, AppFailure>> = std::thread::scope(|s| {
        let handles: Vec<_> = procs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (shared, ticket) = (&shared, final_gate.ticket());
                s.spawn(move || checkpoint_app(shared, i, p, ticket))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(AppFailure::before_final("a checkpoint thread panicked".into())))).collect()
    });

    if results.iter().any(|r| r.is_err()) && !commit_gate.committed() {
        settle(&procs);
    }
    // A CRIU killed or crashed mid-dump may leave its tasks in a group stop (the SIGSTOP it used
    // while seizing them, delivered once it is gone): an app that was running runs on.
    for pid in procs.iter().flat_map(|p| p.tree()) {
        if !stopped_before.contains(&pid) && procs::is_stopped(pid) && !commit_gate.committed() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGCONT);
        }
    }
    let mut failures = Vec::new();
    for (p, r) in procs.iter().zip(results) {
        match r {
            Ok(app) => manifest.apps.push(app),
            Err(f) => failures.push((p, f)),
        }
    }
    manifest.finished_unix_ms = Some(report::unix_ms());
    if !failures.is_empty() {
        let lines: Vec<String> = procs
            .iter()
            .map(|p| {
                let what = failures.iter().find(|(q, _)| q.pid == p.pid).map_or("its dump succeeded", |(_, f)| f.why.as_str());
                let now = if procs::alive(p.pid) { "running".to_string() } else { procs::death(p.pid).map_or("GONE".into(), |d| format!("GONE, {d}")) };
                format!("  {}-{} ({now}): {what}", p.comm, p.pid)
            })
            .collect();
        if commit_gate.committed() {
            // CRIU failed after the commit (it stopped some apps, not all): the checkpoint holds
            // every app and stays restorable; only the apps that still run must be stopped first.
            return fail(format!(
                "checkpoint {id} is complete, but not every app was stopped after it:\n{}\n  the stopped apps' state is in it: stop the others and restore all with {}",
                lines.join("\n"),
                crate::resume::restore_command(&a.store, None, &id)
            ));
        }
        if let Some(p) = &ppp {
            // Not committed: the apps run on, and their pages must not stay pinned.
            if let Err(e) = p.dev.unpin(p.tag) {
                if e.raw_os_error() != Some(libc::ENOENT) {
                    crate::messages::warn(format_args!("the failed checkpoint's pages stay pinned until the next boot: {e}"));
                }
            }
        }
        let reason = failures.iter().map(|(p, f)| format!("{}-{}: {}", p.comm, p.pid, f.why)).collect::<Vec<_>>().join("; ");
        manifest.state = State::Failed(reason);
        manifest.apps.clear();
        let saved = manifest.save(&dir).err().map(|e| format!(" (marking it failed did not work either: {e})")).unwrap_or_default();
        let gone = procs.iter().filter(|p| !procs::alive(p.pid)).count();
        let fate = match gone {
            0 => "every app runs on with its memory as it was".to_string(),
            _ if lines.iter().any(|l| l.contains("failed (signal: ")) => format!(
                "{gone} app(s) GONE (not stopped by kup: a CRIU was killed while its code ran in the app, which CRIU cannot undo: see docs/operator-guide.md, \"CRIU killed mid-dump\")"
            ),
            _ => format!("{gone} app(s) GONE (not stopped by kup: see each line)"),
        };
        return fail(format!("checkpoint {id} failed and is marked failed (not restorable){saved}; {fate}:\n{}", lines.join("\n")));
    }
    // Already durable and complete since the commit; this adds CRIU's figures of the final pass.
    manifest.state = State::Complete;
    if let Err(e) = manifest.save(&dir) {
        crate::messages::warn(format_args!("checkpoint {id} is complete, but its final-pass figures were not saved: {e}"));
    }
    if a.json {
        report::print_json(&summary_json(&manifest, &notes));
    } else {
        for app in &manifest.apps {
            let frozen = app.passes.last().and_then(|p| p.criu).map(|c| c.frozen_time_us as f64 / 1e3);
            println!(
                "  {}: frozen {} ms (downtime of the final dump), image {} in {} address space(s)",
                app.name,
                frozen.map(|f| format!("{f:.1}")).unwrap_or("?".into()),
                report::bytes(app.pages() * 4096),
                app.spaces.len()
            );
            if let Some(p) = &app.ppp {
                let not: u64 = p.not_kept.values().sum();
                println!(
                    "  {}: PPP kept {} pages in place ({} went into the store); pinned and checksummed in {:.1} ms while it ran, {} pages written since while frozen; {:.1} ms of the frozen time (pins {:.1}, copies {:.1}, PFN lists {:.1})",
                    app.name, p.kept, not, p.checksum_ms, p.crc_frozen, p.pin_ms, p.pinning_ms, p.copy_ms, p.lists_ms
                );
            }
        }
        let fate = if a.leave_running { "left running" } else { "stopped by CRIU after the dump" };
        println!("checkpoint {id}: complete; the apps were {fate}; restore with: kup restore --store {}", a.store.display());
    }
    Ok(manifest)
}

/// After a failed pass, waits until no CRIU traces the apps any more (at most 2 s) and then for
/// the parasite a killed CRIU left in an app to return into the app's own code (its sigreturn
/// delivers what it left pending), so the report says which apps really run on.
fn settle(apps: &[Process]) {
    let start = Instant::now();
    while apps.iter().flat_map(|p| p.tree()).any(procs::traced) && start.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
}

/// The final dump's parent images directory under PPP, next to `criu/<pass>`: an inventory only.
const PPP_PARENT: &str = "ppp-parent";

/// Where the post-dump rendezvous sockets live (one root-only directory per kup process).
const HOOKS_ROOT: &str = "/run/kup/hooks";

/// What every app's thread shares.
struct Shared<'a> {
    criu: &'a Criu,
    a: &'a Args,
    dir: &'a Path,
    mode: FileMode,
    /// Whether copies into the store need an fsync (not on rpramfs).
    sync_copies: bool,
    /// When the pre-dumps stop; its `max_passes` is `--iterations`, or one without dirty
    /// tracking or with PPP.
    policy: crate::converge::Policy,
    incremental: bool,
    staging: &'a staging::Plan,
    bars: &'a indicatif::MultiProgress,
    out: &'a Mutex<()>,
    hooks: &'a Hooks,
    commit: &'a CommitGate<'a, (usize, App)>,
    ppp: Option<&'a PppRun>,
}

impl Shared<'_> {
    /// A line of the pass table (none with --json).
    fn say(&self, line: &str) {
        if !self.a.json {
            let _g = self.out.lock();
            println!("{line}");
        }
    }
}

/// Why an app's checkpoint failed, in words that say what became of the app.
struct AppFailure {
    why: String,
}

impl AppFailure {
    fn before_final(why: String) -> AppFailure {
        AppFailure { why: format!("{why} (before its final dump: never frozen for it)") }
    }
}

/// How CRIU's run of one pass ended from kup's point of view.
enum Waited {
    Exited(std::process::ExitStatus),
    /// The final dump reached the post-dump action: the tasks are frozen until the verdict.
    Held(Held),
}

fn checkpoint_app(sh: &Shared<'_>, index: usize, p: &Process, mut ticket: Ticket<'_>) -> std::result::Result<App, AppFailure> {
    let name = format!("{}-{}", p.comm.replace(['/', ' '], "_"), p.pid);
    // Every app reports to the commit gate exactly once; an early return reports it failed.
    let mut report = ReportOnce { gate: sh.commit, name: name.clone(), done: false };
    let (mut ps, mut app) = match pre_dumps(sh, p, &name, &mut ticket) {
        Ok(v) => v,
        Err(e) => {
            report.failed(&e.0);
            return Err(AppFailure::before_final(e.0));
        }
    };
    let limit = ps.limit.take();
    final_dump(sh, index, p, &name, &ps, limit, &mut app, &mut report).map_err(|why| AppFailure { why })?;
    Ok(app)
}

/// What the passes before the final dump leave for it.
struct Passes {
    /// The throttled pass's CPU limit, held until the final dump starts (dropping it lifts it).
    limit: Option<crate::throttle::Throttle>,
    spaces: Spaces,
    staging: Option<staging::Staging>,
    options: Vec<String>,
    previous: BTreeMap<Target, RangeMap>,
    /// Every page the passes before the final dump stored (what trimming to the final image may
    /// have to punch out).
    stored: BTreeMap<Target, RangeMap>,
    /// PPP: each process's pins taken while it ran (the frozen pass takes them over), and how
    /// long those and their CRCs took.
    ppp_pre: parking_lot::Mutex<BTreeMap<u32, crate::ppp::Pinned>>,
    /// PPP: each process's pages written since the passes before the freeze, found (and their
    /// soft-dirty bits reset, so that CRIU sends none of them) when the final dump opens its pages
    /// stream.
    ppp_dirty: parking_lot::Mutex<BTreeMap<u32, RangeMap>>,
    /// PPP: how long finding those took (CRIU waits for it, the app frozen).
    ppp_dirty_ms: parking_lot::Mutex<f64>,
    /// PPP: the pages it cannot keep, copied into FOAM while the app ran.
    ppp_precopied: BTreeMap<u32, foam_store::ranges::RangeMap>,
    ppp_checksum_ms: f64,
    /// PPP: the pages written meanwhile that each pass after the first while the app ran did again.
    ppp_catch_up: Vec<u64>,
    /// PPP: each process's kept pages as its PFN list written while it ran holds them (the
    /// frozen pass writes only what changed since).
    ppp_listed: BTreeMap<u32, Vec<crate::ppp::KeptPage>>,
}

/// The app's pre-dumps (it keeps running), then the wait at the final gate.
fn pre_dumps(sh: &Shared<'_>, p: &Process, name: &str, ticket: &mut Ticket<'_>) -> Result<(Passes, App)> {
    let app_dir = sh.dir.join(name);
    let spaces = Spaces::create(&app_dir.join("mem"), sh.mode, crate::direct_writes())?;
    let staging = sh.staging.for_app(name, sh.sync_copies)?;
    let mut options = p.criu_options();
    if options.iter().any(|o| o == "--tcp-established") && !sh.a.criu_options.iter().any(|o| o.starts_with("--network-lock")) {
        options.extend(sh.criu.network_lock_options());
    }
    options.extend(sh.a.criu_options.iter().cloned());
    let mut app = App { name: name.to_string(), pid: p.pid, comm: p.comm.clone(), criu_options: options.clone(), passes: vec![], spaces: vec![], ppp: None, converged: None };
    let mut ps = Passes { limit: None, spaces, staging, options, previous: BTreeMap::new(), stored: BTreeMap::new(), ppp_pre: Default::default(), ppp_dirty: Default::default(), ppp_dirty_ms: Default::default(), ppp_precopied: BTreeMap::new(), ppp_checksum_ms: 0.0, ppp_catch_up: vec![], ppp_listed: BTreeMap::new() };
    let mut throttled = false;
    // The CPUs the app used during the last pre-dump: a throttled pass gets a share of that.
    let mut cpus = 0.0;
    let stop = loop {
        let sent: Vec<u64> = app.passes.iter().map(|pass| pass.pages_data).collect();
        // After the first pass: what a second would send (private pages; reading the bits
        // leaves them to CRIU).
        let written = if sent.len() == 1 { crate::ppp::count_soft_dirty(&p.tree()).ok() } else { None };
        match sh.policy.next(&sent, throttled, written) {
            crate::converge::Next::Final(stop) => break stop,
            crate::converge::Next::PreDump { throttled: t } => throttled = t,
        }
        let (cpu_before, started) = (procs::cpu_seconds(&p.tree()), Instant::now());
        let mut run = start_pass(sh, p, name, &ps, sent.len() as u32 + 1, PassKind::PreDump)?;
        // A throttled pass limits the app from its first page on: CRIU sends a pre-dump's pages
        // after it has thawed the app, and its parasite, which runs in the app's cgroup while the
        // app is frozen, must not be slowed down. Lifted just before the final dump's CRIU starts
        // (not later: CRIU records the app's cgroup), whatever happens.
        let mut limit = None;
        let mut not_throttled = None;
        let (session, waited) = {
            let mut start_limit = || match sh.policy.throttle.filter(|_| throttled).map(|pct| crate::throttle::Throttle::start(&p.tree(), pct, cpus)) {
                Some(Ok(t)) => limit = Some(t),
                Some(Err(e)) => not_throttled = Some(e),
                None => {}
            };
            run.serve(sh, &ps, None, Some(&mut start_limit))
        };
        run.throttle = limit.as_ref().map(|t| t.describe());
        let Waited::Exited(status) = waited? else { unreachable!("only final dumps are held") };
        let session = run.finish(&ps, status, session)?;
        cpus = (procs::cpu_seconds(&p.tree()) - cpu_before) / started.elapsed().as_secs_f64().max(1e-3);
        ps.limit = limit;
        let stats = read_dump_stats(&run.store_dir).ok();
        app.passes.push(run.record(sh, name, &session, stats));
        ps.previous = session.targets.iter().map(|(t, r)| (*t, r.ranges.clone())).collect();
        for (t, r) in &session.targets {
            let stored = ps.stored.entry(*t).or_default();
            for range in r.ranges.iter() {
                stored.insert(range.start, range.end, range.flags);
            }
        }
        if let Some(e) = not_throttled {
            // The comparison that asked for the throttle: the two pre-dumps before this one.
            sh.say(&format!("  {name}: pass {} ran unthrottled ({e}); the final dump follows", sent.len() + 1));
            break crate::converge::Stop::NotShrinking { pages: sent[sent.len() - 1], before: sent[sent.len() - 2] };
        }
    };
    if sh.policy.max_passes > 1 {
        sh.say(&format!("  {name}: pre-dumps stopped after {} pass(es): {}", app.passes.len(), stop.describe()));
    }
    app.converged = Some(stop.describe());
    if let Some(ppp) = sh.ppp {
        ppp_prepass(ppp, p, &mut ps, &app_dir)?;
    }
    if !ticket.arrive() {
        return fail("not frozen: the checkpoint of another app failed before the final dump, so this app was left running");
    }
    Ok((ps, app))
}

/// PPP before the freeze, while the app runs: its soft-dirty bits are reset, then every present
/// page is pinned (provisionally) and checksummed, and those it cannot keep are copied into FOAM.
/// Then, in up to [`CATCH_UP_PASSES`] more passes, the pages written meanwhile are found (ppp.ko's
/// WRITTEN, which resets their bits without missing a write) and pinned, checksummed or copied
/// again, until few are left for the final dump's frozen pass (CRIU sends none of them: see
/// `PassRun::serve`). Last, each process's PFN list goes into the app's directory in the store.
fn ppp_prepass(ppp: &PppRun, p: &Process, ps: &mut Passes, app_dir: &Path) -> Result<()> {
    let t = Instant::now();
    let pids = p.tree();
    for &pid in &pids {
        crate::ppp::reset_soft_dirty(pid)?;
        let pins = crate::ppp::pin_running(&ppp.dev, pid, ppp.tag, ppp.crc)?;
        let foam = ps.spaces.get_or_create(Target::Pid(pid))?;
        ps.ppp_precopied.insert(pid, crate::ppp::copy_pages(pid, &foam, &crate::ppp::refused_ranges(&pins), true)?);
        ps.ppp_pre.get_mut().insert(pid, pins);
    }
    let mut before = u64::MAX;
    for _ in 0..CATCH_UP_PASSES {
        let mut pages = 0;
        for &pid in &pids {
            let pins = ps.ppp_pre.get_mut().get_mut(&pid).expect("pinned above");
            let (written, refused) = crate::ppp::catch_up(&ppp.dev, pins, ppp.tag, ppp.crc)?;
            let foam = ps.spaces.get_or_create(Target::Pid(pid))?;
            let precopied = ps.ppp_precopied.get_mut(&pid).expect("copied above");
            for r in written.iter() {
                precopied.remove(r.start, r.end);
            }
            for r in crate::ppp::copy_pages(pid, &foam, &refused, true)?.iter() {
                precopied.insert(r.start, r.end, r.flags);
            }
            pages += written.pages();
        }
        ps.ppp_catch_up.push(pages);
        // Enough when few are left, or when the app writes them again as fast as they are done.
        if pages <= CATCH_UP_ENOUGH || pages * 2 > before {
            break;
        }
        before = pages;
    }
    let dir = app_dir.join("ppp");
    std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for (pid, pins) in ps.ppp_pre.get_mut().iter() {
        crate::ppp::write_list(&dir.join(format!("{pid}.pfns")), ppp.arena, *pid, &pins.entries, &[])?;
        ps.ppp_listed.insert(*pid, pins.entries.clone());
    }
    ps.ppp_checksum_ms = report::ms(t.elapsed());
    Ok(())
}

/// PPP: at most this many passes after the first while the app runs, and a pass that finds at
/// most this many pages written (2 MiB) is the last.
const CATCH_UP_PASSES: usize = 4;
const CATCH_UP_ENOUGH: u64 = 512;

/// The final dump, held at CRIU's post-dump action until every app's is in the store. The error
/// says what became of the app.
#[allow(clippy::too_many_arguments)]
fn final_dump(sh: &Shared<'_>, index: usize, p: &Process, name: &str, ps: &Passes, limit: Option<crate::throttle::Throttle>, app: &mut App, report: &mut ReportOnce<'_>) -> std::result::Result<(), String> {
    drop(limit);
    let mut run = match start_pass(sh, p, name, ps, app.passes.len() as u32 + 1, PassKind::Dump) {
        Ok(r) => r,
        Err(e) => {
            report.failed(&e.0);
            return Err(AppFailure::before_final(e.0).why);
        }
    };
    let (session, waited) = run.serve(sh, ps, Some(name), None);
    let held = match waited {
        Ok(Waited::Held(held)) => held,
        Ok(Waited::Exited(status)) => {
            // CRIU ended without asking: a failed dump (CRIU let the app run on), or a CRIU that
            // did not run the action (then it stopped the app on its own: say so).
            let why = match run.finish(ps, status, session) {
                Err(e) => format!("{}; CRIU let the app run on", e.0),
                Ok(_) => "CRIU finished the final dump without running kup's post-dump action, so it stopped the app on its own".into(),
            };
            report.failed(&why);
            return Err(why);
        }
        Err(e) => {
            report.failed(&e.0);
            return Err(e.0);
        }
    };
    // Frozen from here until the verdict: this app's part of the checkpoint goes into the store.
    let held_at = Instant::now();
    let prepared = (|| -> Result<SessionReport> {
        let session = session.map_err(|_| "the page-server thread panicked".to_string())?.map_err(|e| format!("kup's page server: {e}"))?;
        if let Some(s) = &ps.staging {
            s.persist(&run.rel, &run.store_dir).map_err(|e| format!("{e}; CRIU's images of the final dump stay in {}", run.criu_dir.display()))?;
        }
        let mut session = session;
        if let Some(p) = sh.ppp {
            app.ppp = Some(pin_app(p, ps, &sh.dir.join(name), &run.criu_dir, &mut session)?);
        }
        app.spaces = final_image(&ps.spaces, &session)?;
        Ok(session)
    })();
    let verdict = match &prepared {
        Ok(session) => {
            let mut entry = app.clone();
            entry.passes.push(run.pass_record(session, None));
            report.ready(index, entry)
        }
        Err(e) => {
            report.failed(&e.0);
            Verdict::Abort(format!("{name}: {}", e.0))
        }
    };
    let told = held.release(&verdict);
    run.held = Some(held_at.elapsed());
    let status = run.child.wait().map_err(|e| format!("waiting for CRIU: {e}"))?;
    match (verdict, prepared) {
        (Verdict::Commit, Ok(session)) if status.success() => {
            // CRIU writes its figures (stats-dump) after the verdict.
            let stats = match &ps.staging {
                Some(s) => s.persist_file(&run.rel, "stats-dump", &run.store_dir).ok().and_then(|()| read_dump_stats(&run.store_dir).ok()),
                None => read_dump_stats(&run.store_dir).ok(),
            };
            app.passes.push(run.record(sh, name, &session, stats));
            if let Err(e) = trim_to_final_image(ps, &session) {
                crate::messages::warn(format_args!("{name}: pages the final dump no longer names stay in the store (they are never restored): {e}"));
            }
            Ok(())
        }
        (Verdict::Commit, _) => {
            let told = told.err().map(|e| format!("; {e}")).unwrap_or_default();
            Err(format!("the checkpoint was committed, but CRIU let the app run on instead of stopping it ({status}{told}); see {}", run.log().display()))
        }
        (Verdict::Abort(why), Ok(_)) => Err(format!("its final dump succeeded and was undone (the app runs on): {why}")),
        (Verdict::Abort(_), Err(e)) => Err(format!("{}; its final dump was undone (the app runs on)", e.0)),
    }
}

/// Nothing is frozen unless the module runs the arena of this kernel's command line.
fn ppp_preflight(criu: &Criu) -> Result<(crate::ppp_dev::Device, crate::ppp::Arena)> {
    if !criu.has_dirty_tracking() {
        return fail("--ppp: this kernel has no soft-dirty tracking (CONFIG_MEM_SOFT_DIRTY), which keeps the final dump from sending the pages that stay in place; checkpoint without --ppp");
    }
    let Some(arena) = crate::ppp::Arena::running()? else {
        return fail("--ppp: the kernel command line reserves no arena (memmap=SIZE$START, e.g. memmap=2G$4G; see docs/ppp.md); checkpoint without --ppp");
    };
    let dev = crate::ppp::open()?;
    let info = dev.info().map_err(|e| format!("{}: {e}", crate::ppp::DEVICE))?;
    if info.state & ppp_abi::STATE_ATTACHED == 0 {
        return fail(format!("--ppp: the arena {arena} is not attached, so no app's pages are in it: run `kup ppp attach` at boot, before the apps start"));
    }
    if (info.arena_start, info.arena_size) != (arena.start, arena.size) {
        return fail(format!("--ppp: ppp.ko runs the arena [{:#x}, {:#x}), not the command line's {arena}", info.arena_start, info.arena_start + info.arena_size));
    }
    Ok((dev, arena))
}

/// The store's room a checkpoint needs: the apps' memory, or with PPP only what lies outside the
/// arena (the pages that go the FOAM way).
pub fn room_needed(procs: &[Process], ppp: Option<crate::ppp::Arena>) -> Result<u64> {
    let Some(arena) = ppp else { return Ok(procs.iter().map(|p| p.memory_bytes()).sum()) };
    let mut outside = 0;
    for p in procs {
        for pid in p.tree() {
            outside += crate::ppp::pages_by_place(pid, arena)?.1 * 4096;
        }
    }
    Ok(outside)
}

/// Pins every process of a frozen app (CRIU's images of the final dump in `criu_dir`), copies into
/// FOAM the unchanged pages it cannot keep (CRIU did not send them), and writes the PFN lists into
/// the store (durably: they are part of what the commit makes restorable).
fn pin_app(p: &PppRun, ps: &Passes, app_dir: &Path, criu_dir: &Path, session: &mut SessionReport) -> Result<foam_store::manifest::PppPages> {
    let spaces = &ps.spaces;
    let mut crc_frozen = 0;
    // Pinning, copying the pages PPP does not keep, writing the PFN lists.
    let mut parts = [0.0; 3];
    let t = Instant::now();
    let dir = app_dir.join("ppp");
    let mut lists = vec![];
    let mut not_kept = BTreeMap::new();
    // The PFNs pinned while the app ran that it no longer maps (none, for a process the final dump
    // did not name).
    let mut stale: Vec<u64> = vec![];
    let mut pre_pins = std::mem::take(&mut *ps.ppp_pre.lock());
    let pids: Vec<u32> = pre_pins.keys().copied().collect();
    let named: Vec<u32> = session.targets.keys().filter_map(|t| if let Target::Pid(pid) = t { Some(*pid) } else { None }).collect();
    for (pid, pre) in &pre_pins {
        if !named.contains(pid) {
            stale.extend(pre.all_frames());
        }
    }
    for (t, tr) in session.targets.iter_mut() {
        let Target::Pid(pid) = *t else {
            if !tr.unsent.is_empty() {
                // The page server told CRIU shared memory has no parent: it must send all of it.
                return fail(format!("PPP: CRIU named {} pages of shared memory {} unchanged without sending them, which it was told not to; checkpoint without --ppp", tr.unsent.pages(), t.stem()));
            }
            continue;
        };
        let step = Instant::now();
        let mut pinned = pre_pins.remove(&pid).ok_or_else(|| format!("PPP: CRIU dumped process {pid}, which was not pinned before the freeze (did the app fork?)"))?;
        let mut changed = ps.ppp_dirty.lock().remove(&pid).ok_or_else(|| format!("PPP: the final dump of process {pid} did not open its pages stream"))?;
        for r in tr.ranges.iter() {
            changed.insert(r.start, r.end, r.flags);
        }
        let restorer_reads = foam_store::criu_images::restorer_read_vmas(criu_dir, pid).map_err(|e| format!("PPP: {e}"))?;
        crate::ppp::settle_frozen(&p.dev, &mut pinned, p.tag, p.crc, &tr.unsent, &changed, &restorer_reads)?;
        stale.extend(pinned.unused_frames());
        parts[0] += report::ms(step.elapsed());
        crc_frozen += pinned.crc_frozen;
        let step = Instant::now();
        // A page copied while the app ran and written since is copied again.
        let mut precopied = ps.ppp_precopied.get(&pid).cloned().unwrap_or_default();
        for r in changed.iter() {
            precopied.remove(r.start, r.end);
        }
        let copied = crate::ppp::copy_unkept(pid, &*spaces.get_or_create(*t)?, &tr.unsent, &pinned.entries, &precopied)?;
        for r in copied.iter() {
            tr.ranges.insert(r.start, r.end, r.flags);
        }
        parts[1] += report::ms(step.elapsed());
        let step = Instant::now();
        let listed = ps.ppp_listed.get(&pid).expect("listed with the pins");
        let (changed, gone) = crate::ppp::list_changes(listed, &pinned.entries);
        let frozen = format!("ppp/{pid}.frozen.pfns");
        crate::ppp::write_list(&app_dir.join(&frozen), p.arena, pid, &changed, &gone)?;
        parts[2] += report::ms(step.elapsed());
        for (w, n) in pinned.not_kept() {
            *not_kept.entry(w).or_insert(0) += n;
        }
        lists.push(foam_store::manifest::PppList { pid, file: format!("ppp/{pid}.pfns"), frozen: Some(frozen), pages: pinned.entries.len() as u64 });
    }
    let step = Instant::now();
    p.dev.confirm(p.tag, &pids, &stale).map_err(|e| match e.raw_os_error() {
        Some(libc::EPERM) => "PPP: a process pinned before the freeze is no longer stopped by CRIU".to_string(),
        Some(libc::ESRCH) => "PPP: a process pinned before the freeze has exited".to_string(),
        _ => format!("PPP: confirming the pins (letting go of {} no longer mapped): {e}", stale.len()),
    })?;
    parts[0] += report::ms(step.elapsed());
    std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut summary = crate::ppp::summary(p.arena, lists, &not_kept, report::ms(t.elapsed()), ps.ppp_checksum_ms, crc_frozen);
    summary.catch_up = ps.ppp_catch_up.clone();
    summary.written_ms = *ps.ppp_dirty_ms.lock();
    [summary.pinning_ms, summary.copy_ms, summary.lists_ms] = parts;
    summary.crc = p.crc;
    Ok(summary)
}

/// Reports an app to the commit gate exactly once.
struct ReportOnce<'g> {
    gate: &'g CommitGate<'g, (usize, App)>,
    name: String,
    done: bool,
}

impl ReportOnce<'_> {
    fn ready(&mut self, index: usize, app: App) -> Verdict {
        self.done = true;
        self.gate.report(&self.name, Ok((index, app)))
    }

    fn failed(&mut self, why: &str) {
        if !std::mem::replace(&mut self.done, true) {
            self.gate.absent(&self.name, why);
        }
    }
}

impl Drop for ReportOnce<'_> {
    fn drop(&mut self) {
        self.failed("its checkpoint stopped early");
    }
}

/// One CRIU run of one pass.
struct PassRun {
    pass: u32,
    kind: PassKind,
    /// CRIU's images directory relative to the app's directory ("criu/2").
    rel: String,
    store_dir: PathBuf,
    criu_dir: PathBuf,
    child: std::process::Child,
    ours: Option<UnixStream>,
    received: AtomicU64,
    bar: indicatif::ProgressBar,
    start: Instant,
    elapsed: Duration,
    /// Final dump: from CRIU's post-dump action until kup gave the verdict.
    held: Option<Duration>,
    /// A pre-dump that ran with the app's CPU limited: how.
    throttle: Option<String>,
}

fn start_pass(sh: &Shared<'_>, p: &Process, name: &str, ps: &Passes, pass: u32, kind: PassKind) -> Result<PassRun> {
    let rel = format!("criu/{pass}");
    let store_dir = sh.dir.join(name).join(&rel);
    let criu_dir = ps.staging.as_ref().map_or_else(|| store_dir.clone(), |s| s.dir(&rel));
    for d in [&store_dir, &criu_dir] {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let mut cmd = sh.criu.command();
    cmd.arg(if kind == PassKind::Dump { "dump" } else { "pre-dump" })
        .args(["-t", &p.pid.to_string(), "-D"])
        .arg(&criu_dir)
        .args(["-o", "criu.log", "--page-server", "--ps-socket", &crate::os::CHILD_FD.to_string()])
        .args(&ps.options);
    if sh.incremental {
        cmd.arg("--track-mem");
        if pass > 1 {
            cmd.args(["--prev-images-dir", &format!("../{}", pass - 1)]);
        }
    }
    if sh.ppp.is_some() {
        // The parent of the final dump is the app's own memory: with the soft-dirty bits reset
        // before the checksums (`ppp_prepass`), CRIU sends only the pages written since and names
        // the others unchanged. Its pid-reuse check reads the parent's inventory: one written now,
        // after the app started.
        let base = criu_dir.parent().expect("criu/<pass>").join(PPP_PARENT);
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&base).map_err(|e| format!("{}: {e}", base.display()))?;
        foam_store::criu_images::write_parent_inventory(&base, crate::ppp::uptime_us()?)?;
        cmd.args(["--track-mem", "--prev-images-dir", &format!("../{PPP_PARENT}")]);
    }
    if kind == PassKind::Dump {
        cmd.arg("--action-script").arg(sh.hooks.action_script(name, &criu_dir)?);
        if sh.a.leave_running {
            cmd.arg("--leave-running");
        }
    }
    let stderr = std::fs::File::create(criu_dir.join("criu.stderr")).map_err(|e| format!("{}: {e}", criu_dir.display()))?;
    cmd.stdout(std::process::Stdio::null()).stderr(stderr);
    // Its own process group: a Ctrl-C at kup's terminal does not kill CRIU with its parasite in an
    // app, and the helpers a killed CRIU leaves behind can be found (`serve`).
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);

    let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    widen_send_buffer(&theirs, PAGE_SERVER_SNDBUF);
    let theirs: OwnedFd = theirs.into();
    crate::os::pass_socket(&mut cmd, &theirs);
    let bar = sh.bars.add(report::progress_bar(p.memory_bytes(), sh.a.json, format!("{name} pass {pass}/{}", sh.policy.max_passes)));
    let start = Instant::now();
    let child = sh.criu.spawn(&mut cmd)?;
    drop(theirs);
    Ok(PassRun { pass, kind, rel, store_dir, criu_dir, child, ours: Some(ours), received: AtomicU64::new(0), bar, start, elapsed: Duration::ZERO, held: None, throttle: None })
}

type Session = std::thread::Result<std::result::Result<SessionReport, foam_store::Error>>;

impl PassRun {
    fn verb(&self) -> &'static str {
        if self.kind == PassKind::Dump {
            "dump"
        } else {
            "pre-dump"
        }
    }

    /// Serves CRIU's pages until CRIU exits or, for the final dump of app `hold`, reaches the
    /// post-dump action.
    /// Serves the pass until CRIU exits (or, `hold`, is held at post-dump); `on_pages` runs once,
    /// when the first page data has arrived.
    fn serve(&mut self, sh: &Shared<'_>, ps: &Passes, hold: Option<&str>, mut on_pages: Option<&mut dyn FnMut()>) -> (Session, Result<Waited>) {
        // Pre-dumps say "has parent" from the second pass on, when CRIU has --prev-images-dir;
        // under PPP the final dump's parent is the app's memory itself.
        let has_parent = sh.incremental && self.pass > 1;
        let parent_elsewhere = sh.ppp.is_some() && self.kind == PassKind::Dump;
        let sock = self.ours.take().expect("served once");
        let (child, received, bar) = (&mut self.child, &self.received, &self.bar);
        let (spaces, previous) = (&ps.spaces, &ps.previous);
        // PPP: the pages written since the passes before the freeze are found and their soft-dirty
        // bits reset before CRIU reads the pagemap, so CRIU sends no page data: the pins keep every
        // page.
        let (dirty_pages, dirty_ms) = (&ps.ppp_dirty, &ps.ppp_dirty_ms);
        let take_dirty = |t: Target| -> std::result::Result<(), String> {
            let Target::Pid(pid) = t else { return Ok(()) };
            let t = Instant::now();
            let dirty = crate::ppp::take_written(&sh.ppp.expect("PPP").dev, pid).map_err(|e| e.0)?;
            *dirty_ms.lock() += report::ms(t.elapsed());
            // Should CRIU open a process's stream twice, the second finds the bits reset.
            let mut all = dirty_pages.lock();
            let seen = all.entry(pid).or_default();
            for r in dirty.iter() {
                seen.insert(r.start, r.end, r.flags);
            }
            Ok(())
        };
        let shut = sock.try_clone().ok();
        let (session, waited) = std::thread::scope(|s| {
            let rx = s.spawn(move || {
                let mut sock = sock;
                let mut r = Receiver::new(spaces, previous, has_parent);
                if parent_elsewhere {
                    r = r.parent_elsewhere().before_open(&take_dirty);
                }
                r.progress = Some(received);
                let res = r.serve(&mut sock);
                // On error, shutting our end makes CRIU's next write (or its wait for an answer)
                // fail, so it aborts and thaws the app (`shut` keeps the socket itself open).
                if res.is_err() {
                    let _ = sock.shutdown(std::net::Shutdown::Both);
                }
                res
            });
            let waited = loop {
                match child.try_wait() {
                    Ok(Some(st)) => break Ok(Waited::Exited(st)),
                    Ok(None) => {}
                    Err(e) => break fail(format!("waiting for CRIU: {e}")),
                }
                if let Some(held) = hold.and_then(|name| sh.hooks.poll(name)) {
                    break Ok(Waited::Held(held));
                }
                let got = received.load(Ordering::Relaxed);
                if got > 0 {
                    if let Some(f) = on_pages.take() {
                        f();
                    }
                }
                bar.set_position(got);
                // The final dump is polled often: the app is frozen while kup has not noticed.
                std::thread::sleep(Duration::from_millis(if hold.is_some() { 2 } else { 50 }));
            };
            if let Ok(Waited::Exited(st)) = &waited {
                if !st.success() {
                    // A CRIU killed while a kernel-feature probe it forked had stopped itself leaves
                    // that probe stopped for good, holding the page-server socket: it goes too.
                    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL);
                }
                // What CRIU sent is still read; then the receiver ends even if a process CRIU forked
                // still holds CRIU's end.
                if let Some(s) = &shut {
                    let _ = s.shutdown(std::net::Shutdown::Read);
                }
            }
            (rx.join(), waited)
        });
        self.bar.finish_and_clear();
        self.elapsed = self.start.elapsed();
        (session, waited)
    }

    /// CRIU's log of this pass: in the store once copied there, else where it was written.
    fn log(&self) -> PathBuf {
        let in_store = self.store_dir.join("criu.log");
        if in_store.is_file() {
            in_store
        } else {
            self.criu_dir.join("criu.log")
        }
    }

    /// After CRIU exited on its own: its images go into the store (after a failure too: its log is
    /// what the error names), then its status and the page server's result decide.
    fn finish(&self, ps: &Passes, status: std::process::ExitStatus, session: Session) -> Result<SessionReport> {
        let persisted = ps.staging.as_ref().map_or(Ok(()), |s| s.persist(&self.rel, &self.store_dir));
        let session = session.map_err(|_| "the page-server thread panicked".to_string())?;
        let pass = self.pass;
        if !status.success() {
            let why = match &session {
                Err(e) if !matches!(e, foam_store::Error::SessionCut) => format!(" (kup's page server: {e})"),
                _ => String::new(),
            };
            let log = self.log();
            return fail(format!("criu {} (pass {pass}) failed ({status}){why}; see {}{}", self.verb(), log.display(), criu::log_errors(&log)));
        }
        let session = session.map_err(|e| format!("pass {pass}: kup's page server: {e}"))?;
        persisted.map_err(|e| format!("{e}; CRIU's images of pass {pass} stay in {}", self.criu_dir.display()))?;
        Ok(session)
    }

    fn pass_record(&self, session: &SessionReport, stats: Option<foam_store::criu_images::DumpStats>) -> Pass {
        Pass {
            kind: self.kind,
            criu_dir: self.rel.clone(),
            pages_data: session.pages_data,
            pages_parent: session.pages_parent,
            bytes: session.bytes,
            seconds: self.elapsed.as_secs_f64(),
            criu: stats,
            held_ms: self.held.map(|d| d.as_secs_f64() * 1e3),
            throttled: self.throttle.clone(),
        }
    }

    /// The pass's record, printed as a line of the pass table.
    fn record(&self, sh: &Shared<'_>, name: &str, session: &SessionReport, stats: Option<foam_store::criu_images::DumpStats>) -> Pass {
        if !sh.a.json {
            let _g = sh.out.lock();
            let mut frozen = stats.map(|s| format!("  frozen {:.1} ms", s.frozen_time_us as f64 / 1e3)).unwrap_or_default();
            if let Some(h) = self.held {
                frozen.push_str(&format!(" (held {:.1} ms for the commit)", h.as_secs_f64() * 1e3));
            }
            if let Some(t) = &self.throttle {
                frozen.push_str(&format!("  throttled: {t}"));
            }
            println!(
                "  {name} pass {}/{} {:<8} {:>9} pages sent {:>10}  {:>8} unchanged  {}{frozen}",
                self.pass,
                sh.policy.max_passes,
                self.verb(),
                session.pages_data,
                report::bytes(session.bytes),
                session.pages_parent,
                report::secs(self.elapsed)
            );
        }
        self.pass_record(session, stats)
    }
}

/// The final image's address spaces: what the final dump named, each FOAM file synced. Pages
/// outside these ranges are never read (restore and inspect follow the manifest), so punching them
/// out ([`trim_to_final_image`]) can wait until the app no longer waits on kup.
fn final_image(spaces: &Spaces, last: &SessionReport) -> Result<Vec<Space>> {
    let mut out = Vec::new();
    for (t, r) in &last.targets {
        spaces.get_or_create(*t)?.sync()?;
        out.push(Space { name: t.stem(), pages: r.ranges.pages(), ranges: r.ranges.to_vec() });
    }
    Ok(out)
}

/// Frees what earlier passes stored and the final dump no longer names (unmapped since); the
/// pages PPP copied while the app ran count as stored.
fn trim_to_final_image(ps: &Passes, last: &SessionReport) -> Result<()> {
    for t in ps.spaces.existing()? {
        match last.targets.get(&t) {
            Some(r) => {
                let mut stored = ps.stored.get(&t).cloned().unwrap_or_default();
                if let Target::Pid(pid) = t {
                    for range in ps.ppp_precopied.get(&pid).iter().flat_map(|m| m.iter()) {
                        stored.insert(range.start, range.end, range.flags);
                    }
                }
                ps.spaces.get_or_create(t)?.keep_only(&r.ranges, &stored)?
            }
            None => ps.spaces.remove(t)?,
        }
    }
    Ok(())
}

/// Fails unless the store has room for `memory` bytes of app memory plus CRIU's images; returns
/// the free bytes.
pub fn check_room(store: &Path, memory: u64) -> Result<u64> {
    let free = free_bytes(store)?;
    if memory + SLACK_BYTES > free {
        return fail(format!(
            "the store {} has {} free, but the apps hold {} of memory (plus {} for CRIU's images); free space in the store or use a larger region",
            store.display(),
            report::bytes(free),
            report::bytes(memory),
            report::bytes(SLACK_BYTES)
        ));
    }
    Ok(free)
}

pub fn free_bytes(dir: &Path) -> Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(|e| format!("{}: statvfs: {e}", dir.display()))?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

pub fn summary_json(m: &Manifest, notes: &[String]) -> serde_json::Value {
    serde_json::json!({
        "checkpoint": m.id,
        "state": m.state,
        "incremental": m.incremental,
        "file_mode": m.file_mode,
        "notes": notes,
        "apps": m.apps.iter().map(|a| serde_json::json!({
            "name": a.name,
            "pid": a.pid,
            "pages": a.pages(),
            "frozen_ms": a.passes.last().and_then(|p| p.criu).map(|c| c.frozen_time_us as f64 / 1e3),
            "ppp": a.ppp,
            "converged": a.converged,
            "passes": a.passes.iter().map(|p| serde_json::json!({
                "kind": p.kind,
                "pages_sent": p.pages_data,
                "bytes_sent": p.bytes,
                "pages_unchanged": p.pages_parent,
                "seconds": p.seconds,
                "frozen_ms": p.criu.map(|c| c.frozen_time_us as f64 / 1e3),
                "held_ms": p.held_ms,
                "throttled": p.throttled,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// How much page data CRIU's end of the page-server socket may hold unread: enough for a final
/// pass of a few hundred MiB of working set at 10 % dirty. CRIU then hands over a pass's pages
/// as fast as it collects them and goes on to its other images while kup is still storing pages
/// (with the default 208 KiB it waited on kup for every chunk, with the app frozen). Little memory
/// is at stake: CRIU splices the frozen app's pages into the socket by reference, and it holds
/// those pages in its page pipes anyway.
const PAGE_SERVER_SNDBUF: usize = 32 << 20;

/// Lets `sock` hold `bytes` of unread data before its writer blocks: `SO_SNDBUFFORCE` (root may go
/// past net.core.wmem_max), else `SO_SNDBUF` up to that limit. With the default buffer dumps
/// still work, only slower, so a refusal is a warning.
fn widen_send_buffer(sock: &impl std::os::fd::AsFd, bytes: usize) {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(sock, sockopt::SndBufForce, &bytes).is_err() {
        if let Err(e) = setsockopt(sock, sockopt::SndBuf, &bytes) {
            crate::messages::warn(format_args!("cannot widen the page-server socket's send buffer ({e}); CRIU waits longer on kup while the app is frozen"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{getsockopt, sockopt};

    #[test]
    fn the_page_server_socket_holds_a_whole_final_pass() {
        let (_ours, theirs) = UnixStream::pair().unwrap();
        let before = getsockopt(&theirs, sockopt::SndBuf).unwrap();
        widen_send_buffer(&theirs, PAGE_SERVER_SNDBUF);
        let after = getsockopt(&theirs, sockopt::SndBuf).unwrap();
        // The kernel doubles what it is given (bookkeeping overhead); without root only
        // net.core.wmem_max is allowed, and the socket must still have grown or kept its size.
        if nix::unistd::geteuid().is_root() {
            assert!(after >= PAGE_SERVER_SNDBUF, "SO_SNDBUF {before} -> {after}, wanted {PAGE_SERVER_SNDBUF}");
        } else {
            assert!(after >= before, "SO_SNDBUF shrank: {before} -> {after}");
        }
    }
}
