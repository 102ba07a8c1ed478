//! kup's messages as systemd's journal receives them: with $JOURNAL_STREAM naming stderr (as
//! systemd sets it for a unit's output), each line carries its syslog level; otherwise none.
//! Needs no CRIU and no store.

use std::os::unix::fs::MetadataExt;
use std::process::Command;

fn kup_stderr(journal: bool) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stderr");
    let file = std::fs::File::create(&path).unwrap();
    let m = file.metadata().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kup"));
    cmd.args(["inspect", "/nonexistent/kup-store"]).stderr(file);
    if journal {
        cmd.env("JOURNAL_STREAM", format!("{}:{}", m.dev(), m.ino()));
    } else {
        // A stream that is not kup's stderr (a unit whose output goes elsewhere) counts as none.
        cmd.env("JOURNAL_STREAM", format!("{}:{}", m.dev(), m.ino() + 1));
    }
    let status = cmd.status().unwrap();
    (status.code().unwrap_or(-1), std::fs::read_to_string(&path).unwrap())
}

#[test]
fn an_error_reaches_the_journal_with_its_level() {
    let (code, err) = kup_stderr(true);
    assert_eq!(code, 1, "{err}");
    assert!(err.starts_with("<3>kup: error: the store /nonexistent/kup-store does not exist"), "{err}");
    let (code, err) = kup_stderr(false);
    assert_eq!(code, 1, "{err}");
    assert!(err.starts_with("kup: error: the store /nonexistent/kup-store does not exist"), "{err}");
}
