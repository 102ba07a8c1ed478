//! The update record (`<store>/update`): what `kup update` did and what `kup resume` must do after
//! the kernel switch — old and new kernel, the checkpoint, the phase and the timeline. A
//! [`framed`](foam_store::framed) file: CRC-checked, replaced atomically.

use std::path::{Path, PathBuf};

use foam_store::framed;

use crate::error::Result;
use crate::report;

pub const RECORD_FILE: &str = "update";
const KIND: &str = "kup-update";
const VERSION: u32 = 1;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Kernel {
    /// `uname -r` of this kernel.
    pub release: String,
    pub image: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", tag = "phase", content = "reason")]
pub enum Phase {
    /// Checkpointed; `kexec -e` into the new kernel comes next.
    Switching,
    /// The restore or health check failed on the new kernel; going back to the old one.
    FallingBack,
    /// The apps run again and passed the health check.
    Resumed,
    /// Resuming failed where no further fallback exists; the reason says what to do.
    Failed(String),
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Event {
    pub what: String,
    pub kernel: String,
    pub unix_ms: u64,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct UpdateRecord {
    pub version: u32,
    #[serde(flatten)]
    pub phase: Phase,
    pub old: Kernel,
    pub new: Kernel,
    /// The checkpoint id in the store.
    pub checkpoint: String,
    pub apps: Vec<String>,
    pub health_check: Option<String>,
    /// `kup resume` attempts so far; a second failure stops instead of looping.
    pub resumes: u32,
    /// Why the last resume attempt failed (the cause of a fallback).
    #[serde(default)]
    pub last_error: Option<String>,
    pub timeline: Vec<Event>,
}

impl UpdateRecord {
    pub fn new(old: Kernel, new: Kernel, checkpoint: String, apps: Vec<String>, health_check: Option<String>) -> UpdateRecord {
        UpdateRecord { version: VERSION, phase: Phase::Switching, old, new, checkpoint, apps, health_check, resumes: 0, last_error: None, timeline: vec![] }
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

    pub fn event(&mut self, what: &str, unix_ms: u64) {
        self.timeline.push(Event { what: what.into(), kernel: crate::procs::kernel_release(), unix_ms });
    }

    pub fn event_now(&mut self, what: &str) {
        self.event(what, report::unix_ms());
    }

    /// The timeline as lines with times relative to its first event.
    pub fn timeline_lines(&self) -> Vec<String> {
        let t0 = self.timeline.first().map(|e| e.unix_ms).unwrap_or(0);
        let mut prev = t0;
        self.timeline
            .iter()
            .map(|e| {
                let line = format!("  {:>9.3} s  (+{:>7.3} s)  {:<16} {}", (e.unix_ms - t0.min(e.unix_ms)) as f64 / 1e3, (e.unix_ms.saturating_sub(prev)) as f64 / 1e3, e.what, e.kernel);
                prev = e.unix_ms;
                line
            })
            .collect()
    }
}

/// The release string a bzImage carries in its setup header (`kernel_version`), e.g.
/// "6.1.0-56-cloud-amd64": tells which kernel an image is before booting it.
pub fn image_release(image: &Path) -> Option<String> {
    let b = std::fs::read(image).ok()?;
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
