//! The update protocol as one state machine. `kup update`, `kup resume` (and its fallback) and
//! `kup status` all move an update only through [`next`]; the update record stores the [`State`].
//!
//! ```text
//!  Switching ──booted new──► ResumingOnNew ──healthy──► ResumedOnNew
//!     │  │                      │  │
//!     │  │                      │  └─resume failed─► FallingBack ──booted old──► ResumingOnOld ──healthy──► ResumedOnOld
//!     │  │                      └──booted old (B died while resuming: warm reset)────────────►┘      │
//!     │  └──booted old (B never reached kup resume: warm reset into the default entry)───────►┘      └─resume failed─► Failed
//!     └──switch failed (record, unmount or kexec failed on the old kernel)────────────────────►┘
//! ```
//! Every other combination is refused, and a boot where the machine already tried everything
//! (a third boot, the new kernel booted again after its resume did not finish) ends in `Failed`:
//! kup never loops between kernels, and the checkpoint stays in the store for a restore by hand.

/// Where an update is. Stored in the update record (`phase`, with `reason` for `Failed`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", tag = "phase", content = "reason")]
pub enum State {
    /// Checkpointed and recorded; `kexec -e` into the new kernel comes next.
    Switching,
    /// `kup resume` is restoring the apps on the new kernel.
    ResumingOnNew,
    /// The restore or the health check failed on the new kernel; back to the old kernel next.
    FallingBack,
    /// `kup resume` is restoring the apps on the old kernel (after a fallback, a warm reset, or a
    /// switch that never happened).
    ResumingOnOld,
    /// Done: the apps run on the new kernel and passed the health check.
    ResumedOnNew,
    /// Done, without the update: the apps run on the old kernel again.
    ResumedOnOld,
    /// Done, without the apps: kup tries nothing more; the reason says what happened.
    Failed(String),
}

/// Which kernel `kup resume` runs on, relative to the update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kernel {
    New,
    Old,
    /// Neither (its release).
    Other(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// `kup resume` started on a kernel.
    Booted(Kernel),
    /// The apps were restored and passed the health check.
    Healthy,
    /// The restore or the health check failed (why).
    ResumeFailed(String),
    /// `kup update` could not switch after the apps were stopped (why); they come back here.
    SwitchFailed(String),
    /// The way back to the old kernel failed (kexec load or exec: why).
    FallbackFailed(String),
}

/// Why [`next`] did not move the update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The update is over; nothing to do.
    Finished(State),
    /// `kup resume` runs on a kernel that is neither side of the update.
    UnknownKernel(String),
    /// The event cannot happen in this state (a bug, or a record edited by hand).
    Unexpected(State, Event),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Finished(s) => write!(f, "the update is finished ({})", s.describe()),
            Refusal::UnknownKernel(r) => write!(f, "the running kernel {r} is neither the update's old nor its new kernel; boot one of them to resume the apps"),
            Refusal::Unexpected(s, e) => write!(f, "{e:?} cannot happen while the update is {}", s.describe()),
        }
    }
}

impl State {
    pub fn is_finished(&self) -> bool {
        matches!(self, State::ResumedOnNew | State::ResumedOnOld | State::Failed(_))
    }

    /// A phrase for `kup status` and errors.
    pub fn describe(&self) -> String {
        match self {
            State::Switching => "switching to the new kernel".into(),
            State::ResumingOnNew => "resuming on the new kernel".into(),
            State::FallingBack => "falling back to the old kernel".into(),
            State::ResumingOnOld => "resuming on the old kernel".into(),
            State::ResumedOnNew => "resumed on the new kernel".into(),
            State::ResumedOnOld => "resumed on the old kernel (the update did not happen)".into(),
            State::Failed(why) => format!("failed: {why}"),
        }
    }
}

/// The one transition function.
pub fn next(state: &State, event: Event) -> Result<State, Refusal> {
    use Event::*;
    use State::*;
    if state.is_finished() {
        return Err(Refusal::Finished(state.clone()));
    }
    if let Booted(Kernel::Other(r)) = &event {
        return Err(Refusal::UnknownKernel(r.clone()));
    }
    Ok(match (state, event) {
        (Switching, Booted(Kernel::New)) => ResumingOnNew,
        // The new kernel never reached `kup resume` (panic, hang): a warm reset booted the
        // default entry, which kup never changes, so the old kernel.
        (Switching | ResumingOnNew | FallingBack, Booted(Kernel::Old)) => ResumingOnOld,
        (Switching, SwitchFailed(_)) => ResumingOnOld,
        (ResumingOnNew, Healthy) => ResumedOnNew,
        (ResumingOnNew, ResumeFailed(_)) => FallingBack,
        (ResumingOnNew, Booted(Kernel::New)) => Failed("the new kernel booted again while a resume on it had not finished; not trying again".into()),
        (FallingBack, Booted(Kernel::New)) => Failed("the new kernel booted again instead of the old one during the fallback".into()),
        (FallingBack, FallbackFailed(why)) => Failed(format!("could not go back to the old kernel: {why}")),
        (ResumingOnOld, Healthy) => ResumedOnOld,
        (ResumingOnOld, ResumeFailed(why)) => Failed(format!("the resume on the old kernel failed too: {why}")),
        (ResumingOnOld, Booted(_)) => Failed("a third boot: the resume on the old kernel did not finish; not trying again".into()),
        (s, e) => return Err(Refusal::Unexpected(s.clone(), e)),
    })
}

/// Milestones of an update's timeline (`kup status`), in the order they usually come.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Milestone {
    CheckpointStart,
    /// The final dump froze the apps.
    Frozen,
    CheckpointDone,
    Kexec,
    /// A kernel started (its uptime 0).
    KernelUp,
    RestoreStart,
    /// The apps' tasks run again.
    Running,
    /// A lazy restore has all memory back.
    MemoryFetched,
    /// The health check passed.
    Serving,
    Fallback,
    /// `kup update` could not switch; the apps were brought back on the old kernel.
    SwitchFailed,
}

impl Milestone {
    pub fn name(self) -> String {
        serde_json::to_value(self).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::Event::*;
    use super::Kernel::*;
    use super::State::*;
    use super::*;

    fn failed() -> State {
        Failed(String::new())
    }

    /// One path: its name and each event with the state it must lead to (Err: refused).
    type Path<'a> = (&'a str, &'a [(Event, Result<State, ()>)]);

    /// Every path an update can take, one event after another, with the state after each.
    #[test]
    fn every_transition() {
        #[rustfmt::skip]
        let paths: &[Path<'_>] = &[
            ("success", &[(Booted(New), Ok(ResumingOnNew)), (Healthy, Ok(ResumedOnNew))]),
            ("restore fails on the new kernel, the old one resumes", &[
                (Booted(New), Ok(ResumingOnNew)), (ResumeFailed("criu restore failed".into()), Ok(FallingBack)),
                (Booted(Old), Ok(ResumingOnOld)), (Healthy, Ok(ResumedOnOld))]),
            ("failed health check on the new kernel", &[
                (Booted(New), Ok(ResumingOnNew)), (ResumeFailed("health check failed".into()), Ok(FallingBack)),
                (Booted(Old), Ok(ResumingOnOld)), (Healthy, Ok(ResumedOnOld))]),
            ("the new kernel never reaches kup resume: warm reset into the old one", &[
                (Booted(Old), Ok(ResumingOnOld)), (Healthy, Ok(ResumedOnOld))]),
            ("the new kernel dies during its resume: warm reset into the old one", &[
                (Booted(New), Ok(ResumingOnNew)), (Booted(Old), Ok(ResumingOnOld)), (Healthy, Ok(ResumedOnOld))]),
            ("a failure on the old kernel too", &[
                (Booted(New), Ok(ResumingOnNew)), (ResumeFailed("x".into()), Ok(FallingBack)),
                (Booted(Old), Ok(ResumingOnOld)), (ResumeFailed("y".into()), Ok(failed()))]),
            ("a third boot", &[
                (Booted(New), Ok(ResumingOnNew)), (ResumeFailed("x".into()), Ok(FallingBack)),
                (Booted(Old), Ok(ResumingOnOld)), (Booted(Old), Ok(failed()))]),
            ("the new kernel boots again after its resume did not finish", &[
                (Booted(New), Ok(ResumingOnNew)), (Booted(New), Ok(failed()))]),
            ("the fallback lands on the new kernel again", &[
                (Booted(New), Ok(ResumingOnNew)), (ResumeFailed("x".into()), Ok(FallingBack)), (Booted(New), Ok(failed()))]),
            ("the way back cannot be loaded", &[
                (Booted(New), Ok(ResumingOnNew)), (ResumeFailed("x".into()), Ok(FallingBack)),
                (FallbackFailed("kexec -s -l failed".into()), Ok(failed()))]),
            ("kexec -e fails on the old kernel: the apps come back there", &[
                (SwitchFailed("kexec -e returned".into()), Ok(ResumingOnOld)), (Healthy, Ok(ResumedOnOld))]),
            ("finished updates refuse everything", &[
                (Booted(New), Ok(ResumingOnNew)), (Healthy, Ok(ResumedOnNew)), (Booted(New), Err(())), (Booted(Old), Err(())), (Healthy, Err(()))]),
            ("a failed update stays failed", &[
                (Booted(New), Ok(ResumingOnNew)), (Booted(New), Ok(failed())), (Booted(Old), Err(()))]),
            ("a kernel that is neither side is refused and changes nothing", &[
                (Booted(Other("6.1.0-99".into())), Err(())), (Booted(New), Ok(ResumingOnNew))]),
            ("events that cannot happen", &[
                (Healthy, Err(())), (ResumeFailed("x".into()), Err(())), (FallbackFailed("x".into()), Err(())),
                (Booted(New), Ok(ResumingOnNew)), (SwitchFailed("x".into()), Err(()))]),
        ];
        for (name, steps) in paths {
            let mut state = Switching;
            for (i, (event, want)) in steps.iter().enumerate() {
                let got = next(&state, event.clone());
                let ok = match (&got, want) {
                    (Ok(Failed(_)), Ok(Failed(_))) => true,
                    (Ok(g), Ok(w)) => g == w,
                    (Err(_), Err(())) => true,
                    _ => false,
                };
                assert!(ok, "{name}, step {i}: {state:?} + {event:?} gave {got:?}, wanted {want:?}");
                if let Ok(s) = got {
                    state = s;
                }
            }
        }
    }

    #[test]
    fn refusals_say_what_to_do() {
        assert!(next(&ResumedOnNew, Booted(New)).unwrap_err().to_string().contains("finished (resumed on the new kernel)"));
        let e = next(&Switching, Booted(Other("6.1.0-99-cloud-amd64".into()))).unwrap_err().to_string();
        assert!(e.contains("6.1.0-99-cloud-amd64 is neither") && e.contains("boot one of them"), "{e}");
        let Ok(Failed(why)) = next(&ResumingOnOld, Booted(Old)) else { panic!() };
        assert!(why.contains("third boot"), "{why}");
    }

    #[test]
    fn the_record_keeps_the_state_and_the_milestone_names() {
        for (s, json) in [
            (Switching, r#"{"phase":"switching"}"#),
            (ResumedOnOld, r#"{"phase":"resumed-on-old"}"#),
            (Failed("why".into()), r#"{"phase":"failed","reason":"why"}"#),
        ] {
            assert_eq!(serde_json::to_string(&s).unwrap(), json);
            assert_eq!(serde_json::from_str::<State>(json).unwrap(), s);
        }
        // The guest scenarios and operators' scripts read these names from `kup status`.
        assert_eq!(Milestone::KernelUp.name(), "kernel-up");
        assert_eq!(Milestone::MemoryFetched.name(), "memory-fetched");
        assert_eq!(Milestone::CheckpointStart.name(), "checkpoint-start");
    }
}
