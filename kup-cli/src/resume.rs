//! `kup resume` (early at boot) and `kup status`.
//!
//! resume: mounts the store, reads the update record, restores the checkpoint, runs the health
//! check and records the timeline. Where the update goes next is the state machine's call
//! (machine.rs): a failure on the new kernel falls back (`kexec` into the old kernel, which
//! resumes the same checkpoint); a failure on the old kernel, or a third boot, ends failed with
//! the command that restores the apps by hand — never a loop.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use foam_store::store::Store;

use crate::criu::Criu;
use crate::error::{fail, Result};
use crate::kexec;
use crate::procs;
use crate::machine::{Event, Milestone, Refusal, State};
use crate::record::UpdateRecord;
use crate::report;
use crate::restore;

pub struct Args {
    pub store: PathBuf,
    pub region: Option<PathBuf>,
    pub mode: restore::Mode,
    pub timeout: Duration,
}

pub fn run(criu: &Criu, a: &Args) -> Result<()> {
    if let Some(region) = &a.region {
        if !kexec::is_mounted(&a.store) {
            mount_store(region, &a.store)?;
        }
    }
    let Some(mut rec) = UpdateRecord::load(&a.store)? else {
        println!("kup resume: no update in {}; nothing to do", a.store.display());
        return Ok(());
    };
    let running = procs::kernel_release();
    match rec.advance(Event::Booted(rec.side(&running))) {
        Err(Refusal::Finished(s)) => {
            println!("kup resume: the last update is finished ({}); nothing to do", s.describe());
            return Ok(());
        }
        Err(r) => return fail(format!("kup resume: {r}")),
        Ok(_) => {}
    }
    rec.event(Milestone::KernelUp, boot_unix_ms());
    rec.save(&a.store)?;
    if let State::Failed(why) = &rec.state {
        return fail(format!("{why}; {}", restore_by_hand(&rec, a)));
    }
    println!("kup resume: {} on {running} (update {} -> {}: {})", rec.checkpoint, rec.old.release, rec.new.release, rec.state.describe());

    let outcome = restore_and_check(criu, a, &mut rec, false);
    let done = match outcome {
        Ok(()) => Event::Healthy,
        Err(e) => Event::ResumeFailed(e.to_string()),
    };
    let state = rec.advance(done).map_err(|r| r.to_string())?.clone();
    match state {
        State::ResumedOnNew | State::ResumedOnOld => {
            rec.event_now(Milestone::Serving);
            rec.save(&a.store)?;
            // Only a healthy resume lets the checkpoint go.
            let dir = Store::open(&a.store)?.dir_of(&rec.checkpoint);
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                crate::messages::warn(format_args!("could not delete {}: {e}", dir.display()));
            }
            println!("kup resume: the apps run again on {running} ({}); timeline:", rec.state.describe());
            for l in rec.timeline_lines() {
                println!("{l}");
            }
            Ok(())
        }
        State::FallingBack => {
            rec.event_now(Milestone::Fallback);
            rec.save(&a.store)?;
            crate::messages::say(crate::messages::Level::Warning, &format!("kup resume: {}\nkup resume: falling back to {}", rec.last_error.as_deref().unwrap_or(""), rec.old.release));
            let e = fallback(&rec, a).unwrap_err();
            // Still here: the way back failed. The store may be unmounted by now.
            if let Some(region) = a.region.as_ref().filter(|_| !kexec::is_mounted(&a.store)) {
                let _ = mount_store(region, &a.store);
            }
            rec.advance(Event::FallbackFailed(e.to_string())).map_err(|r| r.to_string())?;
            let saved = rec.save(&a.store).err().map(|e| format!(" (the record could not be updated: {e})")).unwrap_or_default();
            fail(format!("falling back to {} failed: {e}{saved}; {}", rec.old.release, restore_by_hand(&rec, a)))
        }
        State::Failed(why) => {
            rec.save(&a.store)?;
            fail(format!("{why}; {}", restore_by_hand(&rec, a)))
        }
        s => fail(format!("kup resume: unexpected state {} after the resume", s.describe())),
    }
}

/// Restores the update's checkpoint and runs the health check, recording the timeline; `json`:
/// the restore reports as JSON.
pub fn restore_and_check(criu: &Criu, a: &Args, rec: &mut UpdateRecord, json: bool) -> Result<()> {
    let restore_start = report::unix_ms();
    rec.event(Milestone::RestoreStart, restore_start);
    crate::faults::at("restore")?;
    let apps = restore::run(criu, &restore::Args {
        store: a.store.clone(),
        checkpoint: Some(rec.checkpoint.clone()),
        mode: a.mode,
        json,
        work_root: PathBuf::from("/run/kup"),
        timeout: a.timeout,
        keep_ppp_pages: true,
    })?;
    // restore::run returns once lazy fetching is done; the apps ran again earlier.
    let at = |ms: f64| restore_start + ms as u64;
    rec.event(Milestone::Running, at(apps.iter().map(|a| a.running_ms).fold(0.0, f64::max)));
    if let Some(f) = apps.iter().filter_map(|a| a.fetched_ms).reduce(f64::max) {
        rec.event(Milestone::MemoryFetched, at(f));
    }
    if let Some(p) = &mut rec.ppp {
        p.mapped = Some(apps.iter().map(|a| a.pages_in_place).sum());
        p.copied_in = Some(apps.iter().map(|a| a.pages_copied_in).sum());
        p.map_ms = Some(apps.iter().map(|a| a.map_ms).fold(0.0, f64::max));
        p.guarded = Some(apps.iter().map(|a| a.pages_guarded).sum());
    }
    health_check(rec, &apps)?;
    if rec.ppp.is_some() {
        // Healthy: a fallback no longer needs the checkpoint's pages as they were.
        if let Err(e) = crate::ppp::release() {
            crate::messages::warn(format_args!("{e}; the checkpoint's pages stay held until the next boot"));
        }
    }
    Ok(())
}

/// Where each app is and the command that brings the apps back, when kup gives up.
fn restore_by_hand(rec: &UpdateRecord, a: &Args) -> String {
    let apps: Vec<String> = rec
        .apps
        .iter()
        .map(|name| {
            // App names are `<comm>-<pid>`, and a restored app has its old pid.
            let pid = name.rsplit('-').next().and_then(|p| p.parse::<u32>().ok());
            let now = if pid.is_some_and(procs::alive) { "runs on this kernel (restored, but not healthy)" } else { "not running" };
            format!("{name}: {now}")
        })
        .collect();
    format!(
        "apps: {}; the checkpoint {} is kept; restore the apps by hand (after stopping any that still run) with: {}",
        apps.join(", "),
        rec.checkpoint,
        restore_command(&a.store, a.region.as_deref(), &rec.checkpoint)
    )
}

/// The command that restores checkpoint `id` from `store` (mounting the store from `region` first
/// when it is not mounted).
pub fn restore_command(store: &Path, region: Option<&Path>, id: &str) -> String {
    let mount = match region {
        Some(r) if !kexec::is_mounted(store) => format!("rpramfs mount {} {} && ", r.display(), store.display()),
        _ => String::new(),
    };
    format!("{mount}kup restore --store {} --checkpoint {id}", store.display())
}

/// Back to the old kernel, which resumes the same checkpoint.
pub fn fallback(rec: &UpdateRecord, a: &Args) -> Result<()> {
    kexec::load(&rec.old)?;
    if let Some(region) = &a.region {
        kexec::unmount_store(&a.store, region)?;
    }
    kexec::execute()
}

/// The health check: the operator's command (exit 0 = healthy), or each app's tasks alive and
/// its listening TCP ports accepting connections.
pub fn health_check(rec: &UpdateRecord, apps: &[restore::AppRestore]) -> Result<()> {
    crate::faults::at("health-check")?;
    if let Some(cmd) = &rec.health_check {
        let st = Command::new("sh").arg("-c").arg(cmd).status().map_err(|e| format!("health check {cmd:?}: {e}"))?;
        return if st.success() { Ok(()) } else { fail(format!("health check {cmd:?} failed ({st})")) };
    }
    for app in apps {
        if !procs::alive(app.pid) {
            return fail(format!("health check: {} (pid {}) is not running after the restore", app.name, app.pid));
        }
        for port in listening_ports(app.pid) {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| format!("health check: {} does not accept connections on port {port}: {e}", app.name))?;
        }
    }
    Ok(())
}

/// TCP ports the process listens on (IPv4 and IPv6 sockets it holds).
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|t| t.to_string_lossy().strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')).map(str::to_string))
        .collect();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEXIP:HEXPORT, st 0A is LISTEN, inode is field 9.
            if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
                if let Some(port) = f[1].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok()) {
                    if !ports.contains(&port) {
                        ports.push(port);
                    }
                }
            }
        }
    }
    ports
}

pub fn mount_store(region: &Path, mountpoint: &Path) -> Result<()> {
    std::fs::create_dir_all(mountpoint).map_err(|e| format!("{}: {e}", mountpoint.display()))?;
    let rpramfs = std::env::current_exe().ok().map(|p| p.with_file_name("rpramfs")).filter(|p| p.is_file()).unwrap_or_else(|| PathBuf::from("rpramfs"));
    let out = Command::new(&rpramfs).arg("mount").arg(region).arg(mountpoint).output().map_err(|e| format!("cannot run {}: {e}", rpramfs.display()))?;
    if !out.status.success() {
        return fail(format!("rpramfs mount {} {} failed: {}", region.display(), mountpoint.display(), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

/// When this kernel started, from the uptime.
fn boot_unix_ms() -> u64 {
    let up: f64 = std::fs::read_to_string("/proc/uptime").ok().and_then(|s| s.split_whitespace().next()?.parse().ok()).unwrap_or(0.0);
    report::unix_ms().saturating_sub((up * 1000.0) as u64)
}

/// `kup status`: the last update and its timeline.
pub fn status(store: &Path, json: bool) -> Result<()> {
    let Some(rec) = UpdateRecord::load(store)? else {
        println!("no update recorded in {}", store.display());
        return Ok(());
    };
    if json {
        report::print_json(&serde_json::to_value(&rec).map_err(|e| e.to_string())?);
        return Ok(());
    }
    println!("update {} -> {}: {}", rec.old.release, rec.new.release, rec.state.describe());
    println!("  state: {}", serde_json::to_value(&rec.state).ok().and_then(|v| v["phase"].as_str().map(str::to_string)).unwrap_or_default());
    println!("  checkpoint {} ({})", rec.checkpoint, rec.apps.join(", "));
    if let Some(e) = &rec.last_error {
        println!("  failed resume: {}", e.replace('\n', "\n    "));
    }
    if let Some(p) = &rec.ppp {
        println!("  {}", p.line());
    }
    for l in rec.timeline_lines() {
        println!("{l}");
    }
    Ok(())
}
