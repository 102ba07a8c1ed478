//! `kup inspect`: what a store holds, and with `--verify` whether every page still matches its CRC.

use std::path::Path;

use foam_store::manifest::{Manifest, State};
use foam_store::protocol::Target;
use foam_store::spaces::Spaces;
use foam_store::store::Store;

use crate::error::{fail, Result};
use crate::report;

const VERIFY_CHUNK: u64 = 1 << 20;

pub fn run(store_dir: &Path, verify: bool, json: bool) -> Result<()> {
    if !store_dir.is_dir() {
        return fail(format!("the store {} does not exist (is the region mounted?)", store_dir.display()));
    }
    let store = Store::open(store_dir)?;
    let mut bad = 0;
    let mut out = Vec::new();
    for (id, m) in store.list()? {
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                bad += 1;
                if !json {
                    println!("{id}: UNREADABLE: {e}");
                }
                out.push(serde_json::json!({ "checkpoint": id, "error": e.to_string() }));
                continue;
            }
        };
        let dir = store.dir_of(&id);
        let state = match &m.state {
            State::Complete => "complete".to_string(),
            State::InProgress => "in progress (or interrupted): not restorable".to_string(),
            State::Failed(r) => format!("FAILED: {r}"),
        };
        let verified = if verify && m.restorable() { Some(verify_checkpoint(&dir, &m)) } else { None };
        if json {
            out.push(serde_json::json!({
                "checkpoint": id,
                "state": m.state,
                "kernel": m.kernel,
                "criu": m.criu_version,
                "incremental": m.incremental,
                "file_mode": m.file_mode,
                "created_unix_ms": m.created_unix_ms,
                "apps": m.apps.iter().map(|a| serde_json::json!({
                    "name": a.name, "pid": a.pid, "pages": a.pages(), "passes": a.passes.len(),
                    "frozen_ms": a.passes.last().and_then(|p| p.criu).map(|c| c.frozen_time_us as f64 / 1e3),
                    "ppp": a.ppp.as_ref().map(|p| serde_json::json!({ "kept": p.kept, "not_kept": p.not_kept, "pin_ms": p.pin_ms, "checksum_ms": p.checksum_ms, "crc_frozen": p.crc_frozen, "catch_up": p.catch_up })),
                })).collect::<Vec<_>>(),
                "verify": verified.as_ref().map(|v| match v { Ok(n) => serde_json::json!({"ok": true, "pages": n}), Err(e) => serde_json::json!({"ok": false, "error": e}) }),
            }));
        } else {
            println!("{id}: {state}; kernel {}, CRIU {}, {}, {}", m.kernel, m.criu_version, m.file_mode.describe(), if m.incremental { "incremental" } else { "single pass" });
            for a in &m.apps {
                let frozen = a.passes.last().and_then(|p| p.criu).map(|c| format!(", frozen {:.1} ms", c.frozen_time_us as f64 / 1e3)).unwrap_or_default();
                println!("  {} (pid {}): {} in {} address space(s), {} pass(es){frozen}", a.name, a.pid, report::bytes(a.pages() * 4096), a.spaces.len(), a.passes.len());
                for p in &a.passes {
                    println!("    {:?}: {} pages sent, {} unchanged, {:.3} s", p.kind, p.pages_data, p.pages_parent, p.seconds);
                }
                if let Some(p) = &a.ppp {
                    let not: Vec<String> = p.not_kept.iter().map(|(w, n)| format!("{n} {w}")).collect();
                    println!(
                        "    PPP: {} pages kept in place; pinned and checksummed in {:.1} ms while running{}, then {} written since checksummed and all settled in {:.1} ms while frozen; not kept: {}",
                        p.kept,
                        p.checksum_ms,
                        if p.catch_up.is_empty() { String::new() } else { format!(" (again for {:?} pages written meanwhile)", p.catch_up) },
                        p.crc_frozen,
                        p.pin_ms,
                        if not.is_empty() { "none".into() } else { not.join(", ") }
                    );
                }
            }
            match &verified {
                Some(Ok(n)) => println!("  verify: CRC ok for all {n} pages"),
                Some(Err(e)) => println!("  verify: DAMAGED: {e}"),
                None => {}
            }
        }
        if matches!(verified, Some(Err(_))) {
            bad += 1;
        }
    }
    if json {
        report::print_json(&serde_json::json!({ "store": store_dir, "checkpoints": out }));
    } else if out.is_empty() && store.ids()?.is_empty() {
        println!("{}: no checkpoints", store_dir.display());
    }
    if bad > 0 {
        return fail(format!("{bad} checkpoint(s) in {} are damaged or unreadable", store_dir.display()));
    }
    Ok(())
}

/// Reads every page of the final image and checks its CRC; the number of pages, or the first bad one.
pub fn verify_checkpoint(dir: &Path, m: &Manifest) -> std::result::Result<u64, String> {
    let mut pages = 0;
    let mut buf = vec![0u8; VERIFY_CHUNK as usize];
    for app in &m.apps {
        let spaces = Spaces::open(&dir.join(&app.name).join("mem"), m.file_mode);
        for s in &app.spaces {
            let t = Target::from_stem(&s.name).ok_or_else(|| format!("{}: unknown address space {:?}", app.name, s.name))?;
            let f = spaces.get_or_create(t).map_err(|e| format!("{}: {e}", app.name))?;
            for r in &s.ranges {
                let mut at = r.start;
                while at < r.end {
                    let n = (r.end - at).min(VERIFY_CHUNK) as usize;
                    f.read_pages(at, &mut buf[..n]).map_err(|e| format!("app {}: {e}", app.name))?;
                    at += n as u64;
                    pages += n as u64 / 4096;
                }
            }
        }
    }
    Ok(pages)
}
