//! The post-dump rendezvous between kup and `kup-criu-hook` (CRIU's action script during kup's
//! final dumps): the one definition of what each side writes, used by both binaries.
//!
//! kup writes [`TICKET_FILE`] into CRIU's images directory before the final dump: the socket's
//! path and the app's name, a line each. At post-dump the hook reads it (CRIU names the directory
//! in `CRTOOLS_IMAGE_DIR`), connects, sends the app's name as a line and reads one line back:
//! [`COMMIT`], or [`ABORT`] and the reason. Anything else, or no answer, is an abort.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// In CRIU's images directory of a final dump.
pub const TICKET_FILE: &str = "kup-post-dump";
pub const COMMIT: &str = "commit";
pub const ABORT: &str = "abort";

/// The ticket's text for app `app` waiting on `socket`.
pub fn ticket(socket: &Path, app: &str) -> String {
    format!("{}\n{app}\n", socket.display())
}

/// (socket, app) from a ticket's text.
pub fn parse_ticket(text: &str) -> Option<(&str, &str)> {
    let mut lines = text.lines();
    Some((lines.next().filter(|l| !l.is_empty())?, lines.next().filter(|l| !l.is_empty())?))
}

/// The verdict line kup sends: `None` commits, `Some(why)` aborts.
pub fn verdict_line(abort: Option<&str>) -> String {
    match abort {
        None => format!("{COMMIT}\n"),
        Some(why) => format!("{ABORT} {}\n", why.replace('\n', " ")),
    }
}

/// The hook's side: announces `app` on `socket` and waits for the verdict. `Ok(None)`: commit;
/// `Ok(Some(why))`: abort; `Err`: no verdict (kup is gone), which the hook treats as an abort.
pub fn ask(socket: &Path, app: &str) -> Result<Option<String>, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    s.write_all(format!("{app}\n").as_bytes()).map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).map_err(|e| e.to_string())?;
    let line = line.trim_end();
    match line.split_once(' ').unwrap_or((line, "")) {
        (COMMIT, "") => Ok(None),
        (ABORT, why) => Ok(Some(why.to_string())),
        _ if line.is_empty() => Err("kup closed the connection without a verdict".into()),
        _ => Err(format!("unexpected answer {line:?}")),
    }
}
