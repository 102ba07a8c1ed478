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
    let store = Store::open(&a.store)?;
    let mode = FileMode::probe(store.root())?;
    let memory: u64 = procs.iter().map(|p| p.memory_bytes()).sum();
    check_room(&a.store, memory)?;
    let incremental = a.iterations > 1 && criu.has_dirty_tracking();
    let passes = if incremental { a.iterations } else { 1 };
    // Naming the CRC32 implementation also picks it (a timing), before any app is frozen.
    let mut notes = vec![format!(
        "store layout: {}; {}; page CRC32 by the {}, the faster here",
        mode.describe(),
        WriteMode::probe(store.root(), crate::direct_writes()).describe(),
        pagecrc::implementation().name()
    )];
    if a.iterations > 1 && !incremental {
        notes.push("this kernel has no soft-dirty tracking (CONFIG_MEM_SOFT_DIRTY), so CRIU cannot pre-dump: one full pass while the app is frozen".into());
    }

    let name = a.name.clone().unwrap_or_else(|| procs[0].comm.chars().filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c)).collect());
    let name = if name.is_empty() { "app".to_string() } else { name };
    let (id, dir) = store.create_checkpoint(&name)?;
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

    // ---- the passes, all apps in parallel ----------------------------------------------------
    let bars = report::multi_progress(a.json);
    let gate = FinalGate::new(procs.len());
    let out = Mutex::new(());
    let results: Vec<Result<App>> = std::thread::scope(|s| {
        let handles: Vec<_> = procs
            .iter()
            .map(|p| {
                let (dir, staging, bars, out, gate) = (&dir, &staging, &bars, &out, &gate);
                s.spawn(move || checkpoint_app(criu, a, p, dir, mode, passes, incremental, staging, bars, out, gate.ticket()))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| fail("a checkpoint thread panicked"))).collect()
    });

    let mut errors = Vec::new();
    for (p, r) in procs.iter().zip(results) {
        match r {
            Ok(app) => manifest.apps.push(app),
            Err(e) => errors.push(format!("{}-{}: {e}", p.comm, p.pid)),
        }
    }
    manifest.finished_unix_ms = Some(report::unix_ms());
    if !errors.is_empty() {
        let reason = errors.join("; ");
        manifest.state = State::Failed(reason.clone());
        manifest.save(&dir)?;
        let alive: Vec<String> = procs.iter().map(|p| format!("{} {}", p.pid, if procs::exists(p.pid) { "running" } else { "GONE" })).collect();
        return fail(format!("checkpoint {id} failed and is marked failed (not restorable): {reason}\n  apps: {}", alive.join(", ")));
    }
    manifest.state = State::Complete;
    manifest.save(&dir)?;
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
        }
        let fate = if a.leave_running { "left running" } else { "stopped by CRIU after the dump" };
        println!("checkpoint {id}: complete; the apps were {fate}; restore with: kup restore --store {}", a.store.display());
    }
    Ok(manifest)
}

#[allow(clippy::too_many_arguments)]
fn checkpoint_app(
    criu: &Criu,
    a: &Args,
    p: &Process,
    ckpt_dir: &Path,
    mode: FileMode,
    passes: u32,
    incremental: bool,
    staging: &staging::Plan,
    bars: &indicatif::MultiProgress,
    out: &Mutex<()>,
    mut ticket: Ticket<'_>,
) -> Result<App> {
    let name = format!("{}-{}", p.comm.replace(['/', ' '], "_"), p.pid);
    let app_dir = ckpt_dir.join(&name);
    let spaces = Spaces::create(&app_dir.join("mem"), mode, crate::direct_writes())?;
    let staging = staging.for_app(&name)?;
    let mut options = p.criu_options();
    if options.iter().any(|o| o == "--tcp-established") && !a.criu_options.iter().any(|o| o.starts_with("--network-lock")) {
        options.extend(criu.network_lock_options());
    }
    options.extend(a.criu_options.iter().cloned());
    let mut app = App { name: name.clone(), pid: p.pid, comm: p.comm.clone(), criu_options: options.clone(), passes: vec![], spaces: vec![] };
    let estimate = p.memory_bytes();
    let mut previous: BTreeMap<Target, RangeMap> = BTreeMap::new();
    let mut last: Option<SessionReport> = None;
    for pass in 1..=passes {
        let kind = if pass < passes { PassKind::PreDump } else { PassKind::Dump };
        if kind == PassKind::Dump && !ticket.arrive() {
            return fail("not frozen: the checkpoint of another app failed before the final dump, so this app was left running");
        }
        let criu_rel = format!("criu/{pass}");
        let store_dir = app_dir.join(&criu_rel);
        let criu_dir = staging.as_ref().map_or_else(|| store_dir.clone(), |s| s.dir(&criu_rel));
        for d in [&store_dir, &criu_dir] {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        let mut cmd = criu.command();
        cmd.arg(if kind == PassKind::Dump { "dump" } else { "pre-dump" })
            .args(["-t", &p.pid.to_string(), "-D"])
            .arg(&criu_dir)
            .args(["-o", "criu.log", "--page-server", "--ps-socket", &crate::os::CHILD_FD.to_string()])
            .args(&options);
        if incremental {
            cmd.arg("--track-mem");
            if pass > 1 {
                cmd.args(["--prev-images-dir", &format!("../{}", pass - 1)]);
            }
        }
        if kind == PassKind::Dump && a.leave_running {
            cmd.arg("--leave-running");
        }
        let stderr = std::fs::File::create(criu_dir.join("criu.stderr")).map_err(|e| format!("{}: {e}", criu_dir.display()))?;
        cmd.stdout(std::process::Stdio::null()).stderr(stderr);

        let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
        widen_send_buffer(&theirs, PAGE_SERVER_SNDBUF);
        let theirs: OwnedFd = theirs.into();
        crate::os::pass_socket(&mut cmd, &theirs);
        let received = AtomicU64::new(0);
        let bar = bars.add(report::progress_bar(estimate, a.json, format!("{name} pass {pass}/{passes}")));
        let start = Instant::now();
        let child = cmd.spawn().map_err(|e| format!("cannot start {}: {e}", criu.path.display()))?;
        drop(theirs);
        // Pre-dumps say "has parent" from the second pass on, when CRIU has --prev-images-dir.
        let has_parent = incremental && pass > 1;
        let (session, status) = std::thread::scope(|s| {
            let rx = s.spawn(|| {
                let mut sock = ours;
                let mut r = Receiver::new(&spaces, &previous, has_parent);
                r.progress = Some(&received);
                let res = r.serve(&mut sock);
                // On error, closing our end makes CRIU's next write fail, so it aborts and thaws the app.
                drop(sock);
                res
            });
            let mut child = child;
            let status = loop {
                match child.try_wait() {
                    Ok(Some(st)) => break Ok(st),
                    Ok(None) => {
                        bar.set_position(received.load(Ordering::Relaxed));
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => break Err(e),
                }
            };
            (rx.join(), status)
        });
        bar.finish_and_clear();
        let elapsed = start.elapsed();
        // Staged images go into the store before anything else looks at them, after a failure too
        // (its log is what the error names).
        let persisted = staging.as_ref().map_or(Ok(()), |s| s.persist(&criu_rel, &store_dir));
        // A failed copy leaves the staged pass in place (the error below names it).
        let log = if persisted.is_ok() { store_dir.join("criu.log") } else { criu_dir.join("criu.log") };
        let status = status.map_err(|e| format!("waiting for CRIU: {e}"))?;
        let session = session.map_err(|_| "the page-server thread panicked".to_string())?;
        if !status.success() {
            let why = match &session {
                Err(e) if !matches!(e, foam_store::Error::SessionCut) => format!(" (kup's page server: {e})"),
                _ => String::new(),
            };
            return fail(format!("criu {} (pass {pass}) failed ({status}){why}; see {}{}", if kind == PassKind::Dump { "dump" } else { "pre-dump" }, log.display(), criu::log_errors(&log)));
        }
        let session = session.map_err(|e| format!("pass {pass}: kup's page server: {e}"))?;
        persisted.map_err(|e| format!("{e}; CRIU's images of pass {pass} stay in {}", criu_dir.display()))?;
        let stats = read_dump_stats(&store_dir).ok();
        let rec = Pass {
            kind,
            criu_dir: criu_rel,
            pages_data: session.pages_data,
            pages_parent: session.pages_parent,
            bytes: session.bytes,
            seconds: elapsed.as_secs_f64(),
            criu: stats,
        };
        if !a.json {
            let _g = out.lock();
            let frozen = stats.map(|s| format!("  frozen {:.1} ms", s.frozen_time_us as f64 / 1e3)).unwrap_or_default();
            println!(
                "  {name} pass {pass}/{passes} {:<8} {:>9} pages sent {:>10}  {:>8} unchanged  {}{frozen}",
                if kind == PassKind::Dump { "dump" } else { "pre-dump" },
                session.pages_data,
                report::bytes(session.bytes),
                session.pages_parent,
                report::secs(elapsed)
            );
        }
        app.passes.push(rec);
        previous = session.targets.iter().map(|(t, r)| (*t, r.ranges.clone())).collect();
        last = Some(session);
    }

    // ---- the image is what the final dump named ------------------------------------------------
    let last = last.expect("at least one pass");
    for t in spaces.existing()? {
        match last.targets.get(&t) {
            Some(r) => spaces.get_or_create(t)?.keep_only(&r.ranges)?,
            None => spaces.remove(t)?,
        }
    }
    for (t, r) in &last.targets {
        spaces.get_or_create(*t)?.sync()?;
        app.spaces.push(Space { name: t.stem(), pages: r.ranges.pages(), ranges: r.ranges.to_vec() });
    }
    Ok(app)
}

/// All apps enter their final (frozen) dump together, after every app's pre-dumps: the apps are
/// down for the same short window (an app done early would otherwise be stopped while the others
/// still pre-dump), and when one app fails before that point none of them is stopped.
struct FinalGate {
    state: Mutex<(usize, bool)>,
    all_in: parking_lot::Condvar,
    apps: usize,
}

impl FinalGate {
    fn new(apps: usize) -> FinalGate {
        FinalGate { state: Mutex::new((0, false)), all_in: parking_lot::Condvar::new(), apps }
    }

    fn ticket(&self) -> Ticket<'_> {
        Ticket { gate: self, used: false }
    }

    fn arrive(&self, ok: bool) -> bool {
        let mut st = self.state.lock();
        st.0 += 1;
        st.1 |= !ok;
        self.all_in.notify_all();
        while st.0 < self.apps {
            self.all_in.wait(&mut st);
        }
        !st.1
    }
}

/// One app's place at the gate; an app that fails before the gate still arrives (as failed).
struct Ticket<'a> {
    gate: &'a FinalGate,
    used: bool,
}

impl Ticket<'_> {
    /// Waits for every app; true when all of them got here without failing.
    fn arrive(&mut self) -> bool {
        self.used = true;
        self.gate.arrive(true)
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if !self.used {
            // Failed before the gate: count it without waiting.
            let mut st = self.gate.state.lock();
            st.0 += 1;
            st.1 = true;
            self.gate.all_in.notify_all();
        }
    }
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
            "passes": a.passes.iter().map(|p| serde_json::json!({
                "kind": p.kind,
                "pages_sent": p.pages_data,
                "bytes_sent": p.bytes,
                "pages_unchanged": p.pages_parent,
                "seconds": p.seconds,
                "frozen_ms": p.criu.map(|c| c.frozen_time_us as f64 / 1e3),
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
            eprintln!("kup: warning: cannot widen the page-server socket's send buffer ({e}); CRIU waits longer on kup while the app is frozen");
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
