//! `kup-criu-hook`: CRIU's action script during kup's final dumps (kup passes it as
//! `--action-script`). At `post-dump` the app's tasks are still frozen: the hook asks kup for the
//! verdict of all apps (kup-cli/src/hook_wire.rs) and exits 0 to let CRIU stop the app, 1 to make
//! CRIU undo the dump and let the app run on. Every other action passes. A binary of its own,
//! small and quick to start, because the app waits for it: under emulation the full `kup` took
//! ~70 ms to start, this one a fraction of that (docs/benchmarks.md).

#[path = "../hook_wire.rs"]
// Each binary uses its own side of the wire.
#[allow(dead_code)]
mod hook_wire;

use std::path::Path;

fn main() {
    if std::env::var("CRTOOLS_SCRIPT_ACTION").ok().as_deref() != Some("post-dump") {
        return;
    }
    let code = match verdict() {
        Ok(None) => 0,
        Ok(Some(why)) => {
            eprintln!("kup-criu-hook: not stopping the app: {why}");
            1
        }
        Err(e) => {
            eprintln!("kup-criu-hook: no verdict from kup ({e}); letting the app run on");
            1
        }
    };
    std::process::exit(code);
}

fn verdict() -> Result<Option<String>, String> {
    let dir = std::env::var_os("CRTOOLS_IMAGE_DIR").ok_or("CRIU set no CRTOOLS_IMAGE_DIR")?;
    let path = Path::new(&dir).join(hook_wire::TICKET_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (socket, app) = hook_wire::parse_ticket(&text).ok_or_else(|| format!("{}: not a kup ticket", path.display()))?;
    hook_wire::ask(Path::new(socket), app)
}
