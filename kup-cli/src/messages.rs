//! kup's messages on stderr: errors, warnings and notes. Under systemd (kup-resume.service, a
//! unit running `kup update`), stderr is a stream into the journal, named by $JOURNAL_STREAM;
//! each line then starts with its syslog level (`<3>`, `<4>`, `<5>`), which journald strips and
//! records as the entry's priority, so `journalctl -p warning` finds them.

use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Error = 3,
    Warning = 4,
    Notice = 5,
}

impl Level {
    fn word(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warning => "warning",
            Level::Notice => "note",
        }
    }
}

/// `kup: error: …`
pub fn error(msg: impl std::fmt::Display) {
    say(Level::Error, &format!("kup: {}: {msg}", Level::Error.word()));
}

/// `kup: warning: …`
pub fn warn(msg: impl std::fmt::Display) {
    say(Level::Warning, &format!("kup: {}: {msg}", Level::Warning.word()));
}

/// `kup: note: …`
pub fn note(msg: impl std::fmt::Display) {
    say(Level::Notice, &format!("kup: {}: {msg}", Level::Notice.word()));
}

/// `text` as it is, at `level`.
pub fn say(level: Level, text: &str) {
    eprint!("{}", lines(level, text, to_journal()));
}

/// `text` with a newline, each line prefixed with its level when it goes to the journal.
fn lines(level: Level, text: &str, journal: bool) -> String {
    if !journal {
        return format!("{text}\n");
    }
    text.lines().map(|l| format!("<{}>{l}\n", level as u8)).collect()
}

/// Whether stderr is the journal's stream: $JOURNAL_STREAM is `DEVICE:INODE` of it.
fn to_journal() -> bool {
    static JOURNAL: OnceLock<bool> = OnceLock::new();
    *JOURNAL.get_or_init(|| {
        let Some(want) = std::env::var("JOURNAL_STREAM").ok() else { return false };
        std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| want == format!("{}:{}", m.dev(), m.ino()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_their_level_only_into_the_journal() {
        let text = "kup: error: checkpoint 0001 failed:\n  memcached-7 (running): criu dump failed";
        assert_eq!(lines(Level::Error, text, false), format!("{text}\n"));
        assert_eq!(lines(Level::Error, text, true), "<3>kup: error: checkpoint 0001 failed:\n<3>  memcached-7 (running): criu dump failed\n");
        assert_eq!(lines(Level::Warning, "kup: warning: x", true), "<4>kup: warning: x\n");
        assert_eq!(lines(Level::Notice, "kup: note: x", true), "<5>kup: note: x\n");
    }
}
