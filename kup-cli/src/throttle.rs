//! Auto-converge: the app's CPU is limited through its cgroup (v2 `cpu.max`) for one pre-dump, so
//! that it writes fewer pages than the pass stores. The limit is lifted before the final dump:
//! CRIU records the app's cgroups there, and they must be the app's own.

use crate::error::{fail, Result};
use std::path::{Path, PathBuf};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const PERIOD_US: u32 = 100_000;

/// A CPU limit in force until dropped.
pub struct Throttle {
    how: How,
    percent: u32,
    /// The CPUs the app used before (its share is of that), and the quota per period it got.
    used: f64,
    quota_us: u64,
}

enum How {
    /// The app's own cgroup has a `cpu.max`: changed in place, its old value put back.
    InPlace { cgroup: PathBuf, saved: String },
    /// The app sits in the root cgroup, which has no limit: its processes move into a child of
    /// the root for the pass and back.
    Moved { child: PathBuf, pids: Vec<u32> },
}

/// The cgroup v2 path of `pid` ("/" for the root).
fn cgroup_of(pid: u32) -> Result<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).map_err(|e| format!("/proc/{pid}/cgroup: {e}"))?;
    match text.lines().find_map(|l| l.strip_prefix("0::")) {
        Some(p) => Ok(p.to_string()),
        None => fail(format!("process {pid} is in no cgroup v2 hierarchy (/proc/{pid}/cgroup has no 0:: line)")),
    }
}

fn write(path: &Path, what: &str) -> Result<()> {
    std::fs::write(path, what).map_err(|e| format!("writing {what:?} to {}: {e}", path.display()).into())
}

impl Throttle {
    /// Limits the processes `pids` (an app's tree, `pids[0]` its root), which used `used` CPUs
    /// lately, to `percent` of that (relative, as QEMU's auto-converge: an app that uses little
    /// CPU would not notice an absolute limit, one on many CPUs would all but stop).
    pub fn start(pids: &[u32], percent: u32, used: f64) -> Result<Throttle> {
        let root = Path::new(CGROUP_ROOT);
        if !root.join("cgroup.controllers").is_file() {
            return fail(format!("no cgroup v2 file system at {CGROUP_ROOT} (mount -t cgroup2 none {CGROUP_ROOT})"));
        }
        // cpu.max takes no quota below 1 ms per period.
        let quota_us = ((PERIOD_US as f64 * used * percent.clamp(1, 100) as f64 / 100.0) as u64).max(1000);
        let quota = format!("{quota_us} {PERIOD_US}");
        let own = cgroup_of(pids[0])?;
        if own != "/" {
            let cgroup = root.join(own.trim_start_matches('/'));
            let max = cgroup.join("cpu.max");
            let saved = std::fs::read_to_string(&max)
                .map_err(|e| format!("{}: {e} (the cpu controller is not enabled for {own}: echo +cpu > its parent's cgroup.subtree_control)", max.display()))?;
            write(&max, &quota)?;
            return Ok(Throttle { how: How::InPlace { cgroup, saved: saved.trim().to_string() }, percent, used, quota_us });
        }
        let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        if !controllers.split_whitespace().any(|c| c == "cpu") {
            return fail(format!("the cgroup v2 hierarchy at {CGROUP_ROOT} has no cpu controller"));
        }
        write(&root.join("cgroup.subtree_control"), "+cpu")?;
        let child = root.join(format!("kup-throttle-{}", pids[0]));
        std::fs::create_dir_all(&child).map_err(|e| format!("{}: {e}", child.display()))?;
        let mut t = Throttle { how: How::Moved { child: child.clone(), pids: vec![] }, percent, used, quota_us };
        write(&child.join("cpu.max"), &quota)?;
        for &pid in pids {
            if cgroup_of(pid).ok().as_deref() != Some("/") {
                continue;
            }
            write(&child.join("cgroup.procs"), &pid.to_string())?;
            if let How::Moved { pids, .. } = &mut t.how {
                pids.push(pid);
            }
        }
        Ok(t)
    }

    pub fn describe(&self) -> String {
        let share = format!("{} % of the {:.2} CPU it used ({:.1} ms per {} ms)", self.percent, self.used, self.quota_us as f64 / 1e3, PERIOD_US / 1000);
        match &self.how {
            How::InPlace { cgroup, .. } => format!("{share} through {}/cpu.max", cgroup.display()),
            How::Moved { child, .. } => format!("{share} in {} (the app's cgroup is the root)", child.display()),
        }
    }

    /// Lifts the limit; the error names what is left behind and how to undo it.
    fn lift(&mut self) -> Result<()> {
        match &mut self.how {
            How::InPlace { cgroup, saved } => write(&cgroup.join("cpu.max"), saved),
            How::Moved { child, pids } => {
                let root = Path::new(CGROUP_ROOT);
                // Children the app forked during the pass are in the child cgroup too.
                let mut all = std::mem::take(pids);
                let forked = std::fs::read_to_string(child.join("cgroup.procs")).unwrap_or_default();
                all.extend(forked.lines().filter_map(|l| l.trim().parse::<u32>().ok()).filter(|p| !all.contains(p)).collect::<Vec<_>>());
                for pid in all {
                    // A process that exited meanwhile has left on its own.
                    if let Err(e) = write(&root.join("cgroup.procs"), &pid.to_string()) {
                        if crate::procs::exists(pid) {
                            return Err(e);
                        }
                    }
                }
                std::fs::remove_dir(&*child).map_err(|e| format!("removing {}: {e}", child.display()).into())
            }
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        if let Err(e) = self.lift() {
            crate::messages::warn(format_args!("the app's CPU limit ({}) could not be lifted: {e}", self.describe()));
        }
    }
}
