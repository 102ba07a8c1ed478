//! CRIU's own images (core, mm, files, inventory, its log) are written into a staging directory on
//! tmpfs and copied into the store as soon as each pass ends.
//!
//! Why: while the app is frozen, CRIU writes these images at the same time as kup stores the
//! pass's pages. On rpramfs both went to the one FUSE daemon thread, so CRIU's many small writes
//! queued in front of kup's page commits (a final dump at 256 MiB, 10 % dirty, froze the app
//! 510–643 ms staged against 586–788 ms unstaged, alternating in one guest boot; docs/benchmarks.md).
//! The copy comes after CRIU has finished, outside the frozen window; a checkpoint is marked
//! complete only once every pass is in the store and synced, so nothing it needs lives only in
//! tmpfs.

use std::fs::DirBuilder;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::Result;

/// Where the staging directories live unless `KUP_STAGE_DIR` says otherwise.
const DEFAULT_ROOT: &str = "/run/kup/stage";
/// Room the staging file system must have: CRIU's images of one checkpoint (the store keeps the
/// same slack for them).
const NEEDED_BYTES: u64 = 64 << 20;

/// The staging directory of one app in one checkpoint; removed when dropped, unless a copy into
/// the store failed (then it is all there is of CRIU's images, and an error names it).
pub struct Staging {
    dir: PathBuf,
    keep: std::cell::Cell<bool>,
    /// fsync every copied file and directory (not on rpramfs, where a write is durable when it
    /// returns: the copy runs while the apps are held frozen for the commit).
    sync: bool,
}

/// Where CRIU's images of this checkpoint go first: a staging root, or (with a reason) nowhere,
/// and then CRIU writes into the store directly.
pub enum Plan {
    Staged(PathBuf),
    Direct(String),
}

impl Plan {
    /// Picks the staging root for checkpoint `id`: `$KUP_STAGE_DIR` (empty: no staging) or
    /// /run/kup/stage, if it can be made root-only and has room.
    pub fn choose(id: &str) -> Plan {
        let root = match std::env::var_os("KUP_STAGE_DIR") {
            Some(v) if v.is_empty() => return Plan::Direct("KUP_STAGE_DIR is empty".into()),
            Some(v) => PathBuf::from(v),
            None => PathBuf::from(DEFAULT_ROOT),
        };
        if let Err(e) = DirBuilder::new().recursive(true).mode(0o700).create(&root) {
            return Plan::Direct(format!("cannot create {}: {e}", root.display()));
        }
        // Root only: the images hold the app's registers, file offsets and socket queues.
        if let Err(e) = std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700)) {
            return Plan::Direct(format!("cannot make {} root-only: {e}", root.display()));
        }
        match crate::checkpoint::free_bytes(&root) {
            Ok(free) if free >= NEEDED_BYTES => Plan::Staged(root.join(id)),
            Ok(free) => Plan::Direct(format!("{} has only {} free", root.display(), crate::report::bytes(free))),
            Err(e) => Plan::Direct(e.to_string()),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Plan::Staged(dir) => format!("CRIU's images are written to {} and copied into the store after each pass", dir.display()),
            Plan::Direct(why) => format!("CRIU's images are written into the store directly ({why})"),
        }
    }

    /// The staging directory for app `name`, or None when CRIU writes into the store; `sync`: the
    /// copies into the store must be fsync'd.
    pub fn for_app(&self, name: &str, sync: bool) -> Result<Option<Staging>> {
        let Plan::Staged(root) = self else { return Ok(None) };
        let dir = root.join(name);
        // What a killed kup left under the same checkpoint id and app must not be copied along.
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(format!("{}: {e}", dir.display()).into()),
            _ => {}
        }
        DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Some(Staging { dir, keep: std::cell::Cell::new(false), sync }))
    }
}

impl Staging {
    /// Where CRIU writes the pass whose directory in the store is `rel` (e.g. "criu/2").
    pub fn dir(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// Copies the staged pass `rel` into `dest` (created 0700): regular files with their modes,
    /// symlinks as links (CRIU's `parent`), subdirectories recursively; every file and directory
    /// synced.
    pub fn persist(&self, rel: &str, dest: &Path) -> Result<()> {
        let r = copy_tree(&self.dir(rel), dest, self.sync);
        if r.is_err() {
            self.keep.set(true);
        }
        r
    }

    /// Copies one file that CRIU wrote into the staged pass `rel` after it was persisted (its
    /// figures, `stats-dump`, come after the post-dump verdict).
    pub fn persist_file(&self, rel: &str, file: &str, dest: &Path) -> Result<()> {
        copy_file(&self.dir(rel).join(file), &dest.join(file), 0o600, self.sync)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.keep.get() {
            return;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        // The checkpoint's directory goes too once its last app is done with it.
        if let Some(parent) = self.dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// Copies the regular file `from` to `to` (created with `mode`), fsync'd when `sync`.
fn copy_file(from: &Path, to: &Path, mode: u32, sync: bool) -> Result<()> {
    let io = |p: &Path, e: std::io::Error| format!("copying CRIU's images into the store: {}: {e}", p.display());
    let data = std::fs::read(from).map_err(|e| io(from, e))?;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(to).map_err(|e| io(to, e))?;
    f.write_all(&data).and_then(|()| if sync { f.sync_all() } else { Ok(()) }).map_err(|e| io(to, e))?;
    Ok(())
}

fn copy_tree(src: &Path, dest: &Path, sync: bool) -> Result<()> {
    let io = |p: &Path, e: std::io::Error| format!("copying CRIU's images into the store: {}: {e}", p.display());
    DirBuilder::new().recursive(true).mode(0o700).create(dest).map_err(|e| io(dest, e))?;
    for entry in std::fs::read_dir(src).map_err(|e| io(src, e))? {
        let entry = entry.map_err(|e| io(src, e))?;
        let (from, to) = (entry.path(), dest.join(entry.file_name()));
        let kind = entry.file_type().map_err(|e| io(&from, e))?;
        if kind.is_symlink() {
            let target = std::fs::read_link(&from).map_err(|e| io(&from, e))?;
            match std::fs::remove_file(&to) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&to, e).into()),
                _ => {}
            }
            std::os::unix::fs::symlink(&target, &to).map_err(|e| io(&to, e))?;
        } else if kind.is_dir() {
            copy_tree(&from, &to, sync)?;
        } else {
            let mode = entry.metadata().map_err(|e| io(&from, e))?.permissions().mode() & 0o777;
            copy_file(&from, &to, mode, sync)?;
        }
    }
    if sync {
        std::fs::File::open(dest).and_then(|d| d.sync_all()).map_err(|e| io(dest, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persist_copies_files_links_and_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let plan = Plan::Staged(tmp.path().join("stage/ck-1"));
        let staging = plan.for_app("app-7", true).unwrap().unwrap();
        let pass = staging.dir("criu/2");
        std::fs::create_dir_all(pass.join("sub")).unwrap();
        std::fs::write(pass.join("core-7.img"), b"core bytes").unwrap();
        std::fs::set_permissions(pass.join("core-7.img"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(pass.join("sub/x"), b"nested").unwrap();
        std::os::unix::fs::symlink("../1", pass.join("parent")).unwrap();
        let dest = tmp.path().join("store/app-7/criu/2");
        staging.persist("criu/2", &dest).unwrap();
        assert_eq!(std::fs::read(dest.join("core-7.img")).unwrap(), b"core bytes");
        assert_eq!(std::fs::metadata(dest.join("core-7.img")).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(dest.join("sub/x")).unwrap(), b"nested");
        assert_eq!(std::fs::read_link(dest.join("parent")).unwrap(), Path::new("../1"));
        assert_eq!(std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777, 0o700);
        // Persisting again (a retried copy) replaces what is there.
        std::fs::write(pass.join("core-7.img"), b"newer").unwrap();
        staging.persist("criu/2", &dest).unwrap();
        assert_eq!(std::fs::read(dest.join("core-7.img")).unwrap(), b"newer");
        drop(staging);
        assert!(!tmp.path().join("stage/ck-1").exists(), "the staging directory is removed with its last app");

        // A copy that fails keeps the staged images: they are all there is of them.
        let staging = plan.for_app("app-8", true).unwrap().unwrap();
        std::fs::create_dir_all(staging.dir("criu/1")).unwrap();
        std::fs::write(staging.dir("criu/1/core-8.img"), b"x").unwrap();
        std::fs::write(tmp.path().join("not-a-dir"), b"").unwrap();
        let err = staging.persist("criu/1", &tmp.path().join("not-a-dir/criu/1")).unwrap_err().to_string();
        assert!(err.contains("copying CRIU's images into the store"), "{err}");
        drop(staging);
        assert!(tmp.path().join("stage/ck-1/app-8/criu/1/core-8.img").exists(), "a failed copy keeps the staged images");
    }

    #[test]
    fn leftovers_of_a_killed_run_are_not_copied() {
        let tmp = tempfile::tempdir().unwrap();
        let plan = Plan::Staged(tmp.path().join("ck-1"));
        std::fs::create_dir_all(tmp.path().join("ck-1/app-7/criu/1")).unwrap();
        std::fs::write(tmp.path().join("ck-1/app-7/criu/1/stale.img"), b"old").unwrap();
        let staging = plan.for_app("app-7", true).unwrap().unwrap();
        std::fs::create_dir_all(staging.dir("criu/1")).unwrap();
        std::fs::write(staging.dir("criu/1/core-7.img"), b"new").unwrap();
        let dest = tmp.path().join("store/criu/1");
        staging.persist("criu/1", &dest).unwrap();
        assert!(dest.join("core-7.img").is_file() && !dest.join("stale.img").exists());
    }

    #[test]
    fn empty_stage_dir_means_direct() {
        // Only this test touches KUP_STAGE_DIR.
        std::env::set_var("KUP_STAGE_DIR", "");
        let plan = Plan::choose("ck-1");
        std::env::remove_var("KUP_STAGE_DIR");
        assert!(matches!(plan, Plan::Direct(_)));
        assert!(plan.describe().contains("into the store directly (KUP_STAGE_DIR is empty)"), "{}", plan.describe());
    }
}
