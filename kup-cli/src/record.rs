//! The update record (`<store>/update`): what `kup update` did and what `kup resume` must do after
//! the kernel switch — old and new kernel, the checkpoint, the state and the timeline. A
//! [`framed`](foam_store::framed) file: CRC-checked, replaced atomically.

use std::path::{Path, PathBuf};

use foam_store::framed;

use crate::error::Result;
use crate::machine::{self, Milestone, Refusal, State};
use crate::report;

pub const RECORD_FILE: &str = "update";
const KIND: &str = "kup-update";
/// 2: the state machine's states (machine.rs) replaced version 1's phases and resume counter.
const VERSION: u32 = 2;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Kernel {
    /// `uname -r` of this kernel.
    pub release: String,
    pub image: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Event {
    pub what: Milestone,
    pub kernel: String,
    pub unix_ms: u64,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct UpdateRecord {
    pub version: u32,
    /// Where the update is; it moves only through [`UpdateRecord::advance`].
    #[serde(flatten)]
    pub state: State,
    pub old: Kernel,
    pub new: Kernel,
    /// The checkpoint id in the store.
    pub checkpoint: String,
    pub apps: Vec<String>,
    pub health_check: Option<String>,
    /// Why the last resume attempt failed (the cause of a fallback).
    #[serde(default)]
    pub last_error: Option<String>,
    pub timeline: Vec<Event>,
    /// What PPP did, when the update used it (the checkpoint goes once the apps are healthy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ppp: Option<PppFigures>,
}

/// PPP's part of an update: at checkpoint, and at the last restore.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PppFigures {
    /// Pages kept in place, and present pages that went into the store instead.
    pub kept: u64,
    pub to_store: u64,
    /// Pins and CRCs before the freeze, the pages checksummed while frozen (written since), and
    /// PPP's part of the frozen time.
    pub checksum_ms: f64,
    pub crc_frozen: u64,
    /// The pages written meanwhile that each pass after the first did again before the freeze.
    #[serde(default)]
    pub catch_up: Vec<u64>,
    pub pin_ms: f64,
    /// Finding the pages written since, while frozen (not part of `pin_ms`).
    #[serde(default)]
    pub written_ms: f64,
    /// Its parts: the pins, copying the pages PPP does not keep, writing the PFN lists.
    #[serde(default)]
    pub pin_parts_ms: [f64; 3],
    /// At the last restore: pages put back in place, copied into populated addresses, and the
    /// time that took (CRC checks included).
    pub mapped: Option<u64>,
    pub copied_in: Option<u64>,
    pub map_ms: Option<f64>,
    /// Mapped pages kept intact (copied on the app's first write) until the apps were healthy.
    #[serde(default)]
    pub guarded: Option<u64>,
    /// Whether page CRCs were taken and checked (`--no-page-crc` turns them off).
    #[serde(default)]
    pub no_crc: bool,
}

impl PppFigures {
    pub fn line(&self) -> String {
        let restored = match (self.mapped, self.copied_in, self.map_ms) {
            (Some(m), Some(c), Some(ms)) => format!(
                "; restore: {m} put back in place, {c} copied (pinned on this boot, or into pages the restore had written), {ms:.1} ms {}; {} kept intact until healthy",
                if self.no_crc { "without CRC checks (--no-page-crc)" } else { "with CRC checks" },
                self.guarded.unwrap_or(0)
            ),
            _ => String::new(),
        };
        let again = if self.catch_up.is_empty() {
            String::new()
        } else {
            format!(" (then again for {} pages written meanwhile)", self.catch_up.iter().map(u64::to_string).collect::<Vec<_>>().join(", "))
        };
        format!(
            "ppp: {} pages kept in place, {} into the store; pins and CRCs {:.1} ms while running{again}, {} pages while frozen; frozen part {:.1} ms (finding them {:.1}, pins {:.1}, copies {:.1}, PFN lists {:.1}){restored}",
            self.kept, self.to_store, self.checksum_ms, self.crc_frozen, self.pin_ms + self.written_ms, self.written_ms, self.pin_parts_ms[0], self.pin_parts_ms[1], self.pin_parts_ms[2]
        )
    }
}

impl UpdateRecord {
    pub fn new(old: Kernel, new: Kernel, checkpoint: String, apps: Vec<String>, health_check: Option<String>) -> UpdateRecord {
        UpdateRecord { version: VERSION, state: State::Switching, old, new, checkpoint, apps, health_check, last_error: None, timeline: vec![], ppp: None }
    }

    pub fn path(store: &Path) -> PathBuf {
        store.join(RECORD_FILE)
    }

    /// The record, or None when no update was ever started in this store.
    pub fn load(store: &Path) -> Result<Option<UpdateRecord>> {
        let path = Self::path(store);
        if !path.exists() {
            return Ok(None);
        }
        Ok(Some(framed::load(KIND, VERSION, &path)?))
    }

    pub fn save(&self, store: &Path) -> Result<()> {
        Ok(framed::save(&Self::path(store), &framed::encode(KIND, self.version, self))?)
    }

    /// Moves the update through the state machine.
    pub fn advance(&mut self, event: machine::Event) -> std::result::Result<&State, Refusal> {
        if let machine::Event::ResumeFailed(why) = &event {
            self.last_error = Some(format!("on {}: {why}", crate::procs::kernel_release()));
        }
        self.state = machine::next(&self.state, event)?;
        Ok(&self.state)
    }

    /// Which side of the update the running kernel is.
    pub fn side(&self, running: &str) -> machine::Kernel {
        match (running == self.new.release, running == self.old.release) {
            // An update to the same release: the state tells which boot this is.
            (true, true) if self.state == State::Switching => machine::Kernel::New,
            (true, true) => machine::Kernel::Old,
            (true, false) => machine::Kernel::New,
            (false, true) => machine::Kernel::Old,
            (false, false) => machine::Kernel::Other(running.to_string()),
        }
    }

    pub fn event(&mut self, what: Milestone, unix_ms: u64) {
        self.timeline.push(Event { what, kernel: crate::procs::kernel_release(), unix_ms });
    }

    pub fn event_now(&mut self, what: Milestone) {
        self.event(what, report::unix_ms());
    }

    /// The timeline as lines with times relative to its first event.
    pub fn timeline_lines(&self) -> Vec<String> {
        let t0 = self.timeline.first().map(|e| e.unix_ms).unwrap_or(0);
        let mut prev = t0;
        self.timeline
            .iter()
            .map(|e| {
                let line = format!("  {:>9.3} s  (+{:>7.3} s)  {:<16} {}", (e.unix_ms - t0.min(e.unix_ms)) as f64 / 1e3, (e.unix_ms.saturating_sub(prev)) as f64 / 1e3, e.what.name(), e.kernel);
                prev = e.unix_ms;
                line
            })
            .collect()
    }
}

/// The release string a bzImage carries in its setup header (`kernel_version`), e.g.
/// "6.1.0-56-cloud-amd64": tells which kernel an image is before booting it.
pub fn image_release(image: &Path) -> Option<String> {
    // The version string's offset is a u16 from 0x200: what lies beyond is never needed.
    let mut b = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(std::fs::File::open(image).ok()?, 0x200 + 0x10000 + 256), &mut b).ok()?;
    if b.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let off = u16::from_le_bytes(b.get(0x20e..0x210)?.try_into().ok()?) as usize;
    if off == 0 {
        return None;
    }
    let s = b.get(0x200 + off..)?;
    let end = s.iter().position(|&c| c == 0 || c == b' ')?;
    std::str::from_utf8(&s[..end]).ok().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> UpdateRecord {
        let k = |r: &str| Kernel { release: r.into(), image: format!("/boot/vmlinuz-{r}").into(), initrd: None, cmdline: "memmap=1G!4G".into() };
        UpdateRecord::new(k("6.1.0-56-cloud-amd64"), k("6.1.0-57-cloud-amd64"), "0001-update".into(), vec!["memcached-7".into()], None)
    }

    #[test]
    fn a_record_survives_the_store_and_a_bad_one_is_refused_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        let mut rec = record();
        rec.advance(machine::Event::Booted(machine::Kernel::New)).unwrap();
        rec.event(Milestone::KernelUp, 5);
        rec.save(tmp.path()).unwrap();
        let back = UpdateRecord::load(tmp.path()).unwrap().unwrap();
        assert_eq!(back.state, State::ResumingOnNew);
        assert_eq!(back.timeline[0].what, Milestone::KernelUp);

        // Torn: cut in the middle.
        let bytes = std::fs::read(UpdateRecord::path(tmp.path())).unwrap();
        std::fs::write(UpdateRecord::path(tmp.path()), &bytes[..bytes.len() / 2]).unwrap();
        let e = UpdateRecord::load(tmp.path()).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");

        // Written by a newer kup.
        let newer = framed::encode(KIND, VERSION + 1, &rec);
        std::fs::write(UpdateRecord::path(tmp.path()), newer).unwrap();
        let e = UpdateRecord::load(tmp.path()).unwrap_err().to_string();
        assert!(e.contains(&format!("format version {} is newer than this kup understands ({VERSION}); use a newer kup", VERSION + 1)), "{e}");

        // Version 1's phases are not states of this machine: named, not guessed.
        let v1 = framed::encode(KIND, 1, &serde_json::json!({"version": 1, "phase": "resumed", "resumes": 1}));
        std::fs::write(UpdateRecord::path(tmp.path()), v1).unwrap();
        assert!(UpdateRecord::load(tmp.path()).unwrap_err().to_string().contains("unreadable content"));
    }

    #[test]
    fn the_running_kernel_is_placed_on_a_side() {
        let mut rec = record();
        assert_eq!(rec.side("6.1.0-57-cloud-amd64"), machine::Kernel::New);
        assert_eq!(rec.side("6.1.0-56-cloud-amd64"), machine::Kernel::Old);
        assert_eq!(rec.side("6.12.0-1"), machine::Kernel::Other("6.12.0-1".into()));
        rec.new.release = rec.old.release.clone();
        assert_eq!(rec.side("6.1.0-56-cloud-amd64"), machine::Kernel::New, "same release: the first boot is the new side");
        rec.state = State::FallingBack;
        assert_eq!(rec.side("6.1.0-56-cloud-amd64"), machine::Kernel::Old);
    }
}
