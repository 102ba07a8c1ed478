//! What kup needs to know about the processes it checkpoints, from /proc.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::error::{fail, Result};

pub struct Process {
    pub pid: u32,
    pub comm: String,
    pub sid: u32,
}

impl Process {
    /// A live process, or an error saying why it cannot be checkpointed.
    pub fn inspect(pid: u32) -> Result<Process> {
        let stat = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(s) => s,
            Err(_) => return fail(format!("no process with pid {pid}: it is not running (check the pid; kup checkpoints running processes)")),
        };
        // comm is in parentheses and may contain spaces; the fields after it are space-separated.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { return fail(format!("/proc/{pid}/stat is unreadable")) };
        let comm = stat[open + 1..close].to_string();
        let rest: Vec<&str> = stat[close + 2..].split(' ').collect();
        let state = rest.first().copied().unwrap_or("?");
        if state == "Z" || state == "X" {
            return fail(format!("pid {pid} ({comm}) has exited (zombie); there is nothing left to checkpoint"));
        }
        let sid = rest.get(3).and_then(|s| s.parse().ok()).unwrap_or(0);
        if pid == 1 {
            return fail("pid 1 is the init process; CRIU checkpoints applications, not init");
        }
        // Kernel threads have no executable (and no user memory).
        if std::fs::read_link(format!("/proc/{pid}/exe")).is_err() {
            return fail(format!("pid {pid} ({comm}) is a kernel thread (it has no executable); only user processes can be checkpointed"));
        }
        Ok(Process { pid, comm, sid })
    }

    /// The process and all its descendants.
    pub fn tree(&self) -> Vec<u32> {
        let mut out = vec![self.pid];
        let mut i = 0;
        while i < out.len() {
            let p = out[i];
            for task in std::fs::read_dir(format!("/proc/{p}/task")).into_iter().flatten().flatten() {
                let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
                out.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()).filter(|c| !out.contains(c)).collect::<Vec<_>>());
            }
            i += 1;
        }
        out
    }

    /// Anonymous and shared memory of the tree: what a checkpoint stores (an upper bound, since
    /// shared pages count once per process).
    pub fn memory_bytes(&self) -> u64 {
        self.tree()
            .iter()
            .map(|p| {
                let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
                status
                    .lines()
                    .filter(|l| l.starts_with("RssAnon:") || l.starts_with("RssShmem:"))
                    .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                    .sum::<u64>()
                    * 1024
            })
            .sum()
    }

    /// Whether any process of the tree holds a socket (CRIU then needs `--tcp-established`).
    pub fn has_sockets(&self) -> bool {
        self.tree().iter().any(|p| {
            std::fs::read_dir(format!("/proc/{p}/fd")).into_iter().flatten().flatten().any(|fd| {
                std::fs::read_link(fd.path()).is_ok_and(|t: PathBuf| t.to_string_lossy().starts_with("socket:"))
            })
        })
    }

    /// CRIU options this process needs on dump and restore.
    pub fn criu_options(&self) -> Vec<String> {
        let mut v = Vec::new();
        // Started from a shell: the session leader is outside the dumped tree.
        if self.sid != self.pid {
            v.push("--shell-job".to_string());
        }
        if self.has_sockets() {
            v.push("--tcp-established".to_string());
            // A client connecting at the moment of the final dump sits in the listen queue, not
            // yet accepted; CRIU cannot carry that over, so it is dropped and the client retries.
            v.push("--skip-in-flight".to_string());
        }
        v
    }
}

/// The process a task (thread) id belongs to.
pub fn tgid(id: u32) -> Option<u32> {
    status_field(format!("/proc/{id}/status"), "Tgid")?.parse().ok()
}

/// The value of `key` in a /proc status file (`/proc/PID/status`, `/proc/PID/task/TID/status`);
/// `None` when the task is gone or the kernel has no such field.
fn status_field(file: impl AsRef<std::path::Path>, key: &str) -> Option<String> {
    let status = std::fs::read_to_string(file).ok()?;
    status.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':')).map(|v| v.trim().to_string())
}

pub fn exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether `pid` runs: it exists, is not a zombie (a process that died keeps its /proc entry
/// until its parent reaps it) and is not dumping core (killed, and writing its memory out first).
pub fn alive(pid: u32) -> bool {
    let dumping = || status_field(format!("/proc/{pid}/status"), "CoreDumping").is_some_and(|v| v == "1");
    stat_fields(pid).is_some_and(|f| f.first().is_some_and(|st| st != "Z" && st != "X")) && !dumping()
}

/// How a zombie `pid` died, e.g. "killed by SIGPIPE", from its wait status (/proc/PID/stat field
/// 52); `None` for a live or reaped process.
pub fn death(pid: u32) -> Option<String> {
    let f = stat_fields(pid)?;
    if f.first()? != "Z" {
        return None;
    }
    let status: i32 = f.get(49)?.parse().ok()?;
    Some(match status & 0x7f {
        0 => format!("exited with status {}", (status >> 8) & 0xff),
        sig => format!("killed by {}", nix::sys::signal::Signal::try_from(sig).map_or_else(|_| format!("signal {sig}"), |s| s.as_str().to_string())),
    })
}

/// Whether any thread of `pid` is traced (by a CRIU, while its parasite may still be in the app).
pub fn traced(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks.flatten().any(|t| status_field(t.path().join("status"), "TracerPid").is_some_and(|v| v != "0"))
}

/// The fields of /proc/PID/stat after the comm (which may hold spaces), from the state (field 3)
/// on; `None` when the process is gone.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat.rsplit_once(')')?.1.split_whitespace().map(str::to_string).collect())
}

/// Whether `pid` is in a group stop (state T in /proc/PID/stat).
pub fn is_stopped(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| f.first().is_some_and(|st| st == "T"))
}

/// CPU seconds the processes `pids` have used so far (user and system, all their threads; a
/// process that is gone counts 0).
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    let ticks_per_s = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    let ticks = |pid: u32| -> Option<u64> {
        // Fields 14 and 15: utime, stime.
        let f = stat_fields(pid)?;
        Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
    };
    pids.iter().filter_map(|&p| ticks(p)).sum::<u64>() as f64 / ticks_per_s
}

/// Waits until `pid` no longer exists (its parent reaped it); restore needs the pid free.
pub fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let start = Instant::now();
    while exists(pid) {
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

pub fn kernel_release() -> String {
    nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zombie_is_not_alive_and_says_how_it_died() {
        // A child killed by SIGPIPE, not yet reaped: /proc still lists it.
        let mut child = std::process::Command::new("sh").args(["-c", "kill -PIPE $$; sleep 10"]).spawn().unwrap();
        let pid = child.id();
        let start = Instant::now();
        while alive(pid) {
            assert!(start.elapsed() < Duration::from_secs(10), "pid {pid} still runs");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(exists(pid), "a zombie keeps its /proc entry");
        assert_eq!(death(pid).as_deref(), Some("killed by SIGPIPE"));
        child.wait().unwrap();
        assert!(!exists(pid) && death(pid).is_none());
        assert!(alive(std::process::id()) && death(std::process::id()).is_none());
    }
}
