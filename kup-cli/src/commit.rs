//! The final dumps of a checkpoint as one transaction: all apps are stopped, or none.
//!
//! CRIU kills (or, with `--leave-running`, resumes) an app as soon as its own dump succeeds, so
//! with several apps one could be gone while another's dump fails, and the checkpoint holding the
//! first one's memory would not be restorable. kup holds every app at CRIU's `post-dump` action
//! instead: CRIU runs that action after all images and pages are out (the page-server session is
//! closed) and before it decides the tasks' fate, with the tasks still frozen; if the action exits
//! non-zero, CRIU undoes everything (network unlocked, TCP repair off) and lets the tasks run on.
//!
//! - [`FinalGate`]: no app enters its final dump before every app's pre-dumps succeeded.
//! - [`Hooks`]: CRIU's action script is `kup-criu-hook` (src/bin/kup-criu-hook.rs, the wire in
//!   src/hook_wire.rs); at post-dump it connects to kup's UNIX socket (in a root-only directory),
//!   names its app and waits for the verdict. A hook that cannot reach kup, or loses it, answers
//!   "abort": a kup killed while apps are held lets them run on.
//! - [`CommitGate`]: every app reports once (its dump held and copied into the store, or failed);
//!   the last one to report runs the decision (the manifest marked complete and durable) and every
//!   held app gets the same verdict.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::error::{fail, Result};
use crate::hook_wire;

/// CRIU's action script, installed beside `kup`.
const HOOK_BINARY: &str = "kup-criu-hook";

/// What every held app is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The checkpoint is durable: CRIU may stop the app (or leave it running).
    Commit,
    /// Something failed: CRIU lets the app run on as if no dump had happened.
    Abort(String),
}

/// All apps enter their final (frozen) dump together, after every app's pre-dumps: the apps are
/// down for the same short window (an app done early would otherwise be stopped while the others
/// still pre-dump), and when one app fails before that point none of them is frozen.
pub struct FinalGate {
    state: Mutex<(usize, bool)>,
    all_in: Condvar,
    apps: usize,
}

impl FinalGate {
    pub fn new(apps: usize) -> FinalGate {
        FinalGate { state: Mutex::new((0, false)), all_in: Condvar::new(), apps }
    }

    pub fn ticket(&self) -> Ticket<'_> {
        Ticket { gate: self, used: false }
    }

    fn arrive(&self, ok: bool, wait: bool) -> bool {
        let mut st = self.state.lock();
        st.0 += 1;
        st.1 |= !ok;
        self.all_in.notify_all();
        while wait && st.0 < self.apps {
            self.all_in.wait(&mut st);
        }
        !st.1
    }
}

/// One app's place at the final gate; an app that fails before the gate still arrives (as failed).
pub struct Ticket<'a> {
    gate: &'a FinalGate,
    used: bool,
}

impl Ticket<'_> {
    /// Waits for every app; true when all of them got here without failing.
    pub fn arrive(&mut self) -> bool {
        self.used = true;
        self.gate.arrive(true, true)
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if !self.used {
            // Failed before the gate: counted without waiting.
            self.gate.arrive(false, false);
        }
    }
}

/// Collects one report per app (`T`: what a ready app hands over, e.g. its manifest entry) and
/// hands every app the same verdict.
pub struct CommitGate<'d, T> {
    state: Mutex<GateState<T>>,
    decided: Condvar,
    apps: usize,
    /// Runs once, when all apps reported ready, with what they handed over in report order: makes
    /// the checkpoint durable.
    decide: Box<Decision<'d, T>>,
}

type Decision<'d, T> = dyn Fn(&[T]) -> Result<()> + Send + Sync + 'd;

struct GateState<T> {
    reported: usize,
    ready: Vec<T>,
    failures: Vec<String>,
    verdict: Option<Verdict>,
}

impl<'d, T> CommitGate<'d, T> {
    pub fn new(apps: usize, decide: impl Fn(&[T]) -> Result<()> + Send + Sync + 'd) -> CommitGate<'d, T> {
        let state = GateState { reported: 0, ready: vec![], failures: vec![], verdict: None };
        CommitGate { state: Mutex::new(state), decided: Condvar::new(), apps, decide: Box::new(decide) }
    }

    /// Reports app `name` ready (its final dump held and in the store) or failed, and waits for
    /// the verdict of all apps.
    pub fn report(&self, name: &str, outcome: std::result::Result<T, String>) -> Verdict {
        let mut st = self.state.lock();
        self.arrive(&mut st, name, outcome);
        while st.verdict.is_none() {
            self.decided.wait(&mut st);
        }
        st.verdict.clone().expect("decided")
    }

    /// Whether the verdict was to commit (the manifest is durable and complete).
    pub fn committed(&self) -> bool {
        self.state.lock().verdict == Some(Verdict::Commit)
    }

    /// Counts an app that holds nothing (it failed before its final dump started).
    pub fn absent(&self, name: &str, why: &str) {
        let mut st = self.state.lock();
        self.arrive(&mut st, name, Err(why.to_string()));
    }

    fn arrive(&self, st: &mut GateState<T>, name: &str, outcome: std::result::Result<T, String>) {
        st.reported += 1;
        match outcome {
            Ok(t) => st.ready.push(t),
            // Each app's own error says why; the others only need to know which failed.
            Err(_) => st.failures.push(name.to_string()),
        }
        if st.reported == self.apps {
            st.verdict = Some(if st.failures.is_empty() {
                match (self.decide)(&st.ready) {
                    Ok(()) => Verdict::Commit,
                    Err(e) => Verdict::Abort(format!("the checkpoint could not be made durable: {e}")),
                }
            } else {
                Verdict::Abort(format!("the checkpoint of {} failed", st.failures.join(", ")))
            });
            self.decided.notify_all();
        }
    }
}

/// The rendezvous between kup and the CRIU action scripts of one checkpoint.
pub struct Hooks {
    dir: PathBuf,
    socket: PathBuf,
    listener: UnixListener,
    arrived: Mutex<HashMap<String, UnixStream>>,
}

/// A final dump held at CRIU's post-dump action: the app's tasks are frozen until the verdict.
pub struct Held {
    stream: UnixStream,
}

impl Hooks {
    /// A listening socket in `dir` (created root-only); what a killed kup left beside it (a
    /// directory named by a pid that no longer runs) is removed first.
    pub fn new(dir: &Path) -> Result<Hooks> {
        if let Some(root) = dir.parent() {
            for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
                let stale = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()).is_some_and(|pid| !crate::procs::exists(pid));
                if stale {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| format!("{}: {e}", dir.display()))?;
        let socket = dir.join("post-dump.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).map_err(|e| format!("{}: {e}", socket.display()))?;
        listener.set_nonblocking(true).map_err(|e| format!("{}: {e}", socket.display()))?;
        Ok(Hooks { dir: dir.to_path_buf(), socket, listener, arrived: Mutex::new(HashMap::new()) })
    }

    /// The path to give CRIU's `--action-script` for app `name`, whose final dump writes its images
    /// into `criu_dir`: the hook binary beside this kup, with its ticket (socket and app) left in
    /// that directory, where CRIU points the hook (CRIU executes the path itself, with no
    /// arguments).
    pub fn action_script(&self, name: &str, criu_dir: &Path) -> Result<PathBuf> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find kup's own binary: {e}"))?;
        let hook = exe.with_file_name(HOOK_BINARY);
        if !hook.is_file() {
            return fail(format!("{} is missing: kup needs it beside {} for CRIU's post-dump action (reinstall kup)", hook.display(), exe.display()));
        }
        let ticket = criu_dir.join(hook_wire::TICKET_FILE);
        let io = |e: std::io::Error| format!("{}: {e}", ticket.display());
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&ticket).map_err(io)?;
        f.write_all(hook_wire::ticket(&self.socket, name).as_bytes()).map_err(io)?;
        Ok(hook)
    }

    /// App `name`'s dump, if its CRIU has reached the post-dump action.
    pub fn poll(&self, name: &str) -> Option<Held> {
        let mut arrived = self.arrived.lock();
        while let Ok((stream, _)) = self.listener.accept() {
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut line = String::new();
            if BufReader::new(&stream).read_line(&mut line).is_ok() {
                arrived.insert(line.trim().to_string(), stream);
            }
        }
        arrived.remove(name).map(|stream| Held { stream })
    }
}

impl Drop for Hooks {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Held {
    /// Tells CRIU's action what to do; CRIU then stops the app (commit) or lets it run (abort).
    pub fn release(mut self, verdict: &Verdict) -> Result<()> {
        let msg = hook_wire::verdict_line(match verdict {
            Verdict::Commit => None,
            Verdict::Abort(why) => Some(why),
        });
        self.stream.write_all(msg.as_bytes()).map_err(|e| format!("telling CRIU's post-dump action the verdict: {e}").into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_failure_aborts_every_app_and_skips_the_decision() {
        let decided = std::sync::atomic::AtomicBool::new(false);
        let gate = CommitGate::new(3, |_: &[()]| {
            decided.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        });
        let verdicts: Vec<Verdict> = std::thread::scope(|s| {
            let hs: Vec<_> = [("a", Ok(())), ("b", Err("criu dump failed".to_string())), ("c", Ok(()))]
                .into_iter()
                .map(|(n, o)| {
                    let gate = &gate;
                    s.spawn(move || gate.report(n, o))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(verdicts.iter().all(|v| *v == Verdict::Abort("the checkpoint of b failed".into())), "{verdicts:?}");
        assert!(!decided.load(std::sync::atomic::Ordering::SeqCst), "the manifest must not be completed");
    }

    #[test]
    fn commit_only_after_the_decision_and_a_failed_decision_aborts() {
        let seen = Mutex::new(vec![]);
        let gate = CommitGate::new(2, |ready: &[&str]| {
            seen.lock().extend_from_slice(ready);
            Ok(())
        });
        let v: Vec<Verdict> = std::thread::scope(|s| {
            let h = s.spawn(|| gate.report("a", Ok("entry a")));
            std::thread::sleep(Duration::from_millis(20));
            assert!(seen.lock().is_empty(), "decided before every app reported");
            let v2 = gate.report("b", Ok("entry b"));
            vec![h.join().unwrap(), v2]
        });
        assert_eq!(v, vec![Verdict::Commit, Verdict::Commit]);
        assert_eq!(seen.lock().len(), 2, "the decision saw every app's entry");

        let gate = CommitGate::new(1, |_: &[()]| fail("No space left on device"));
        assert!(matches!(gate.report("a", Ok(())), Verdict::Abort(w) if w.contains("could not be made durable") && w.contains("No space")));

        let gate = CommitGate::new(2, |_: &[()]| Ok(()));
        gate.absent("a", "pre-dump failed");
        assert_eq!(gate.report("b", Ok(())), Verdict::Abort("the checkpoint of a failed".into()));
    }

    #[test]
    fn the_hook_gets_the_verdict_and_a_lost_kup_means_abort() {
        let tmp = tempfile::tempdir().unwrap();
        let hooks = Hooks::new(&tmp.path().join("h")).unwrap();
        // Unit tests run from target/*/deps, where no hook binary lies beside them: refused by name.
        let e = hooks.action_script("memcached-7", tmp.path()).unwrap_err().to_string();
        assert!(e.contains("kup-criu-hook is missing") && e.contains("reinstall kup"), "{e}");
        let ask = |app: &'static str| {
            let sock = hooks.socket.clone();
            std::thread::spawn(move || hook_wire::ask(&sock, app))
        };
        let wait = |app: &str| loop {
            if let Some(h) = hooks.poll(app) {
                break h;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let hook = ask("memcached-7");
        wait("memcached-7").release(&Verdict::Abort("the checkpoint of b failed".into())).unwrap();
        assert_eq!(hook.join().unwrap(), Ok(Some("the checkpoint of b failed".into())));

        let hook = ask("x-1");
        wait("x-1").release(&Verdict::Commit).unwrap();
        assert_eq!(hook.join().unwrap(), Ok(None));

        let hook = ask("x-2");
        drop(wait("x-2"));
        assert!(hook.join().unwrap().is_err(), "a connection closed without a verdict is no commit");
        drop(hooks);
        assert!(!tmp.path().join("h").exists());
        assert!(hook_wire::ask(&tmp.path().join("h/post-dump.sock"), "x").is_err(), "no kup: no verdict");
    }

    #[test]
    fn the_ticket_names_the_socket_and_the_app() {
        let t = hook_wire::ticket(Path::new("/run/kup/hooks/7/post-dump.sock"), "memcached-20001");
        assert_eq!(hook_wire::parse_ticket(&t), Some(("/run/kup/hooks/7/post-dump.sock", "memcached-20001")));
        assert_eq!(hook_wire::parse_ticket("only-one-line\n"), None);
        assert_eq!(hook_wire::verdict_line(Some("a\nb")), "abort a b\n");
    }
}
