//! Finding CRIU, checking that it is a version kup speaks, and running it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::error::{fail, Result};

/// CRIU versions whose page-server protocol kup speaks: 3.17 up to (not including) 4.2.
const OLDEST: (u32, u32) = (3, 17);
const FIRST_UNSUPPORTED: (u32, u32) = (4, 2);

#[derive(Debug)]
pub struct Criu {
    pub path: PathBuf,
    pub version: String,
}

impl Criu {
    /// `--criu PATH`, else `$KUP_CRIU`, else the first of `criu` on PATH and the copy the
    /// project's setup installs for hosts whose own CRIU does not work (/opt/kup/criu/bin/criu)
    /// that kup speaks and that passes `criu check` on this kernel.
    pub fn locate(explicit: Option<&Path>) -> Result<Criu> {
        if let Some(p) = explicit.map(PathBuf::from).or_else(|| std::env::var_os("KUP_CRIU").map(PathBuf::from)) {
            if !p.is_file() {
                return fail(format!("CRIU not found at {}; install it (`apt-get install criu`, or scripts/criu-host/install.sh where Debian's does not run) or pass --criu PATH", p.display()));
            }
            return Criu::probe(p).map_err(Into::into);
        }
        let mut candidates: Vec<PathBuf> = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).map(|d| d.join("criu")).collect()).unwrap_or_default();
        candidates.push("/opt/kup/criu/bin/criu".into());
        Criu::choose(candidates)
    }

    /// The first of `candidates` that is a CRIU kup speaks and that passes `criu check` here
    /// (checked only when there is a choice to make), saying why any before it were skipped.
    fn choose(candidates: Vec<PathBuf>) -> Result<Criu> {
        let mut seen: Vec<PathBuf> = Vec::new();
        for p in candidates.into_iter().filter(|p| p.is_file()) {
            let real = std::fs::canonicalize(&p).unwrap_or_else(|_| p.clone());
            if !seen.contains(&real) {
                seen.push(real);
            }
        }
        if seen.is_empty() {
            return fail("CRIU not found (looked for criu on PATH and /opt/kup/criu/bin/criu); install it (`apt-get install criu`, or scripts/criu-host/install.sh where Debian's does not run) or pass --criu PATH");
        }
        let several = seen.len() > 1;
        let mut skipped = Vec::new();
        let mut usable = None;
        for path in seen {
            let c = match Criu::probe(path.clone()) {
                Ok(c) => c,
                Err(e) => {
                    skipped.push(e);
                    continue;
                }
            };
            match if several { c.works() } else { Ok(()) } {
                Ok(()) => {
                    if !skipped.is_empty() {
                        crate::messages::note(format_args!("using CRIU {} ({}); skipped {}", c.version, c.path.display(), skipped.join("; ")));
                    }
                    return Ok(c);
                }
                Err(why) => {
                    skipped.push(format!("{} (CRIU {}): `criu check` fails here: {why}", c.path.display(), c.version));
                    usable.get_or_insert(c);
                }
            }
        }
        match usable {
            // As before the check existed: the first one kup speaks; its own errors will say more.
            Some(c) => {
                crate::messages::warn(format_args!("no CRIU passes `criu check` on this kernel ({}); using {}", skipped.join("; "), c.path.display()));
                Ok(c)
            }
            None => fail(format!("no usable CRIU: {}", skipped.join("; "))),
        }
    }

    /// The CRIU at `path`, if it is one kup speaks.
    fn probe(path: PathBuf) -> std::result::Result<Criu, String> {
        let out = Command::new(&path).arg("--version").output().map_err(|e| format!("cannot run {}: {e}", path.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let Some(version) = text.lines().find_map(|l| l.strip_prefix("Version:")).map(|v| v.trim().to_string()) else {
            return Err(format!("{} --version printed no version ({:?}); is it CRIU?", path.display(), text.trim()));
        };
        check_version(&version).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Criu { path, version })
    }

    /// Whether `criu check` passes on this kernel; else its first error line.
    fn works(&self) -> std::result::Result<(), String> {
        let out = self.command().arg("check").output().map_err(|e| format!("cannot run it: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
        Err(text.lines().find(|l| l.contains("Error")).or(text.lines().last()).unwrap_or("no output").trim().to_string())
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.path);
        c.stdin(Stdio::null());
        c
    }

    /// Starts a CRIU built by `command`, out of the OOM killer's reach where kup may do that
    /// (CAP_SYS_RESOURCE): a CRIU killed while its code runs in an app can take the app with it
    /// (docs/operator-guide.md, "CRIU killed mid-dump").
    pub fn spawn(&self, cmd: &mut Command) -> Result<Child> {
        let child = cmd.spawn().map_err(|e| format!("cannot start {}: {e}", self.path.display()))?;
        // CRIU is still parsing its options here: nothing of the app is at stake before this. A
        // refusal (a container without CAP_SYS_RESOURCE) leaves CRIU as likely a pick as before.
        let _ = std::fs::write(format!("/proc/{}/oom_score_adj", child.id()), "-1000");
        Ok(child)
    }

    fn has_feature(&self, feature: &str) -> bool {
        self.command().args(["check", "--feature", feature]).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
    }

    /// Makes CRIU detect this kernel's features once and cache them (/run/criu.kdat), before
    /// several CRIUs start together: CRIU 3.17 detecting them in two processes at once on a fresh
    /// boot can fail in one ("kerndat_has_nftables_concat failed", seen restoring two memcached
    /// instances after a kexec).
    pub fn detect_kernel_features(&self) {
        self.has_feature("mem_dirty_track");
    }

    /// Whether this kernel tracks dirty pages for CRIU (soft-dirty bits): needed for pre-dumps.
    pub fn has_dirty_tracking(&self) -> bool {
        self.has_feature("mem_dirty_track")
    }

    /// How CRIU should lock TCP connections while it works on them: its default is iptables;
    /// where that tool is missing (minimal images, the test guests) nftables, through the
    /// libnftables Debian's CRIU links.
    pub fn network_lock_options(&self) -> Vec<String> {
        let has_iptables = std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("iptables").is_file()));
        if has_iptables {
            vec![]
        } else {
            vec!["--network-lock".into(), "nftables".into()]
        }
    }

    /// Whether userfaultfd supports what `criu lazy-pages` needs.
    pub fn has_lazy_pages(&self) -> bool {
        self.has_feature("uffd-noncoop")
    }
}

fn check_version(v: &str) -> std::result::Result<(), String> {
    let mut parts = v.split('.').map(|p| p.parse::<u32>());
    let (Some(Ok(major)), Some(Ok(minor))) = (parts.next(), parts.next()) else {
        return Err(format!("cannot parse CRIU version {v:?}"));
    };
    if (major, minor) < OLDEST {
        return Err(format!("CRIU {v} is too old; kup needs 3.17 to 4.1"));
    }
    if (major, minor) >= FIRST_UNSUPPORTED {
        return Err(format!(
            "CRIU {v} is not supported: 4.2 changed the page-server protocol (32-byte header) and the pagemap image; use CRIU 3.17 to 4.1 (Debian bookworm or trixie)"
        ));
    }
    Ok(())
}

/// Waits for CRIU (killing it after `limit`) and turns a failure into an error that points at
/// its log.
pub fn finish(mut child: Child, what: &str, log: &Path, limit: Duration) -> Result<()> {
    let status = match wait_timeout(&mut child, limit).map_err(|e| format!("{what}: {e}"))? {
        Some(st) => st,
        None => return fail(format!("{what} did not finish within {} s and was killed; see {}{}", limit.as_secs(), log.display(), log_errors(log))),
    };
    if status.success() {
        return Ok(());
    }
    let tail = log_errors(log);
    fail(format!("{what} failed ({status}); {}{tail}", log.display()))
}

/// The child's exit status, or None after killing it when `limit` passed first.
pub fn wait_timeout(child: &mut Child, limit: Duration) -> std::io::Result<Option<ExitStatus>> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st));
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The error lines of a CRIU log, for messages.
pub fn log_errors(log: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(log) else { return String::new() };
    let errs: Vec<&str> = text.lines().filter(|l| l.contains("Error") && !l.contains("RLIMIT_NOFILE")).collect();
    if errs.is_empty() {
        return String::new();
    }
    format!(":\n  {}", errs[errs.len().saturating_sub(6)..].join("\n  "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_criu_that_works_here_is_chosen() {
        let dir = tempfile::tempdir().unwrap();
        // A fake CRIU: its version, and whether `criu check` passes.
        let fake = |name: &str, version: &str, check_ok: bool| -> PathBuf {
            let p = dir.path().join(name);
            let check = if check_ok { "echo 'Looks good.'; exit 0" } else { "echo 'Error (criu/vdso.c:613): vdso: Failed to fill self vdso symtable' >&2; exit 1" };
            std::fs::write(&p, format!("#!/bin/sh\ncase \"$1\" in --version) echo 'Version: {version}';; check) {check};; esac\n")).unwrap();
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
            p
        };
        let broken = fake("bookworm", "3.17.1", false);
        let good = fake("trixie", "4.1.1", true);
        let newer = fake("sid", "4.2.1", true);
        let missing = dir.path().join("none");
        let c = Criu::choose(vec![missing.clone(), broken.clone(), newer.clone(), good.clone()]).unwrap();
        assert_eq!((c.path.as_path(), c.version.as_str()), (good.as_path(), "4.1.1"));
        // One candidate only: taken without `criu check` (no choice to make, no time spent).
        assert_eq!(Criu::choose(vec![broken.clone()]).unwrap().path, broken);
        // None passes: the first kup speaks, as before the check.
        let again = fake("bookworm2", "3.17.1", false);
        assert_eq!(Criu::choose(vec![newer.clone(), broken.clone(), again]).unwrap().path, broken);
        let e = Criu::choose(vec![newer.clone()]).unwrap_err().0;
        assert!(e.contains("no usable CRIU") && e.contains("4.2"), "{e}");
        let e = Criu::choose(vec![missing]).unwrap_err().0;
        assert!(e.contains("CRIU not found"), "{e}");
        // The same CRIU twice on PATH (a symlink) counts once.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&broken, &link).unwrap();
        assert_eq!(Criu::choose(vec![broken.clone(), link]).unwrap().path, broken);
    }

    #[test]
    fn versions() {
        assert!(check_version("3.17.1").is_ok());
        assert!(check_version("4.1.1").is_ok());
        assert!(check_version("4.2").unwrap_err().contains("4.2 changed the page-server protocol"));
        assert!(check_version("3.16.1").unwrap_err().contains("too old"));
        assert!(check_version("x").is_err());
    }
}
