//! kup's record of one checkpoint: apps, pids, per-pass statistics, the final page ranges of every
//! address space, kernel, times and state.
//!
//! On disk it is a [`framed`](crate::framed) record: header line `kup-manifest <version> <length>
//! <crc32>`, then JSON.

use std::path::Path;

use crate::criu_images::DumpStats;
use crate::foam::FileMode;
use crate::framed;
use crate::ranges::Range;
use crate::Error;

pub const MANIFEST_VERSION: u32 = 1;
pub const MANIFEST_FILE: &str = "manifest";
const MANIFEST_KIND: &str = "kup-manifest";

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", tag = "state", content = "reason")]
pub enum State {
    /// Being written; a crash leaves it so, and it is never restored.
    InProgress,
    /// The final dump finished and the image is complete.
    Complete,
    /// A pass failed; the apps were left running and this checkpoint is not restorable.
    Failed(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PassKind {
    /// `criu pre-dump`: the app keeps running.
    PreDump,
    /// `criu dump`: the app is frozen for it.
    Dump,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Pass {
    pub kind: PassKind,
    /// CRIU's images directory of this pass, relative to the app's directory.
    pub criu_dir: String,
    pub pages_data: u64,
    /// Pages CRIU reported unchanged since the previous pass.
    pub pages_parent: u64,
    pub bytes: u64,
    pub seconds: f64,
    /// CRIU's own figures; `frozen_time_us` is the app's downtime within this pass.
    pub criu: Option<DumpStats>,
    /// Final dump: milliseconds the app stayed frozen at CRIU's post-dump action while kup made
    /// the checkpoint durable and all apps agreed (part of `frozen_time_us`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_ms: Option<f64>,
    /// A pre-dump that ran with the app's CPU limited (auto-converge): how.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttled: Option<String>,
}

/// One address space of the final image.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Space {
    /// `<pid>` or `shmem-<id>`: the FOAM file stem.
    pub name: String,
    pub pages: u64,
    pub ranges: Vec<Range>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct App {
    /// Directory name inside the checkpoint: `<comm>-<pid>`.
    pub name: String,
    pub pid: u32,
    pub comm: String,
    /// Options CRIU needs for this app on dump and on restore (e.g. `--shell-job`).
    pub criu_options: Vec<String>,
    pub passes: Vec<Pass>,
    pub spaces: Vec<Space>,
    /// The pages that stay in place across kexec (PPP), when the checkpoint used it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ppp: Option<PppPages>,
    /// Why the pre-dumps stopped where they did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub converged: Option<String>,
}

/// What PPP kept of one app: its pages' PFNs are in one PFN list per process
/// (kmod/include/uapi/kup_ppp.h, `struct ppp_list_head`).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PppPages {
    /// The arena (the `memmap=SIZE$START` reservation) the pages lie in, bytes.
    pub arena_start: u64,
    pub arena_size: u64,
    pub lists: Vec<PppList>,
    /// Pages kept in place, over all processes.
    pub kept: u64,
    /// Present pages PPP could not keep, by reason: their data went the FOAM way.
    pub not_kept: std::collections::BTreeMap<String, u64>,
    /// Milliseconds the pinning took while the app was frozen: in all, and its parts (the pins
    /// themselves, copying the pages PPP does not keep, writing the PFN lists).
    pub pin_ms: f64,
    #[serde(default)]
    pub pinning_ms: f64,
    #[serde(default)]
    pub copy_ms: f64,
    #[serde(default)]
    pub lists_ms: f64,
    /// Milliseconds pinning and checksumming the app's pages took before the freeze (while it ran).
    #[serde(default)]
    pub checksum_ms: f64,
    /// Kept pages checksummed while the app was frozen: those written since.
    #[serde(default)]
    pub crc_frozen: u64,
    /// The pages written meanwhile that each pass after the first before the freeze pinned,
    /// checksummed or copied again.
    #[serde(default)]
    pub catch_up: Vec<u64>,
    /// Milliseconds finding the pages written since those passes took while frozen (before CRIU
    /// reads the pagemap; not part of `pin_ms`).
    #[serde(default)]
    pub written_ms: f64,
    /// The boot that pinned them (/proc/sys/kernel/random/boot_id): on another boot they are held
    /// back and put in place, on this one they are still pinned and mapped as copies.
    #[serde(default)]
    pub boot_id: String,
    /// Whether each page's CRC was taken (and so is checked before the restored app can read it).
    #[serde(default = "yes")]
    pub crc: bool,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PppList {
    pub pid: u32,
    /// Relative to the app's directory: the list written while the app ran.
    pub file: String,
    /// The list of the changes since, written while the app was frozen (applied over `file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen: Option<String>,
    /// Pages kept in place, with the changes applied.
    pub pages: u64,
}

impl App {
    pub fn final_criu_dir(&self) -> Option<&str> {
        self.passes.iter().rev().find(|p| p.kind == PassKind::Dump).map(|p| p.criu_dir.as_str())
    }

    pub fn pages(&self) -> u64 {
        self.spaces.iter().map(|s| s.pages).sum()
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub id: String,
    pub name: String,
    #[serde(flatten)]
    pub state: State,
    pub created_unix_ms: u64,
    pub finished_unix_ms: Option<u64>,
    /// `uname -r` of the kernel the apps were checkpointed on.
    pub kernel: String,
    pub criu_version: String,
    pub file_mode: FileMode,
    /// Whether pre-dumps with soft-dirty tracking were possible; without them there is one full pass.
    pub incremental: bool,
    pub apps: Vec<App>,
}

impl Manifest {
    pub fn encode(&self) -> Vec<u8> {
        framed::encode(MANIFEST_KIND, self.version, self)
    }

    pub fn decode(bytes: &[u8], path: &Path) -> Result<Manifest, Error> {
        framed::decode(MANIFEST_KIND, MANIFEST_VERSION, bytes, path)
    }

    pub fn load(dir: &Path) -> Result<Manifest, Error> {
        framed::load(MANIFEST_KIND, MANIFEST_VERSION, &dir.join(MANIFEST_FILE))
    }

    /// Replaces the manifest atomically and durably.
    pub fn save(&self, dir: &Path) -> Result<(), Error> {
        framed::save(&dir.join(MANIFEST_FILE), &self.encode())
    }

    pub fn restorable(&self) -> bool {
        self.state == State::Complete
    }

    pub fn pages(&self) -> u64 {
        self.apps.iter().map(|a| a.pages()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            version: MANIFEST_VERSION,
            id: "0001-web".into(),
            name: "web".into(),
            state: State::Failed("criu dump exited with 1".into()),
            created_unix_ms: 1,
            finished_unix_ms: None,
            kernel: "6.1.0-56-cloud-amd64".into(),
            criu_version: "4.1.1".into(),
            file_mode: FileMode::Split { segment_bits: 40 },
            incremental: true,
            apps: vec![App {
                name: "memcached-42".into(),
                pid: 42,
                comm: "memcached".into(),
                criu_options: vec!["--tcp-established".into()],
                passes: vec![],
                spaces: vec![Space { name: "42".into(), pages: 2, ranges: vec![Range { start: 0x1000, end: 0x3000, flags: 6 }] }],
                ppp: None,
                converged: Some("the last pre-dump sent 12 pages".into()),
            }],
        }
    }

    #[test]
    fn round_trips_and_refuses_damage() {
        let dir = tempfile::tempdir().unwrap();
        let m = sample();
        m.save(dir.path()).unwrap();
        assert_eq!(Manifest::load(dir.path()).unwrap(), m);
        let path = dir.path().join(MANIFEST_FILE);
        let good = std::fs::read(&path).unwrap();

        let mut flipped = good.clone();
        let i = flipped.len() - 10;
        flipped[i] ^= 0x20;
        let e = Manifest::decode(&flipped, &path).unwrap_err().to_string();
        assert!(e.contains("CRC mismatch") && e.contains("manifest"), "{e}");

        let e = Manifest::decode(&good[..good.len() - 1], &path).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");

        let newer = String::from_utf8(good.clone()).unwrap().replacen("kup-manifest 1 ", "kup-manifest 9 ", 1);
        let e = Manifest::decode(newer.as_bytes(), &path).unwrap_err().to_string();
        assert!(e.contains("newer"), "{e}");
    }
}
