//! Shared test harness: rpramfs mounted through the real kernel FUSE, tmpfs beside it.
#![allow(dead_code)]

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rpramfs::fs::{Fs, MkfsOptions, OpenOptions};
use rpramfs::fuse;
use rpramfs::region::{OpenRegion, Region};

pub struct Mounted {
    pub dir: tempfile::TempDir,
    pub mp: PathBuf,
    pub region: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

impl Mounted {
    /// Makes a region file of `size` bytes, mkfs, and mounts it in this process.
    pub fn new(size: u64) -> Mounted {
        let dir = tempfile::tempdir().unwrap();
        let region = dir.path().join("region.img");
        let r = Region::open(&region, OpenRegion { create_size: Some(size), ..Default::default() }).unwrap();
        Fs::mkfs(&r, &MkfsOptions::default()).unwrap();
        drop(r);
        let mut m = Mounted { mp: dir.path().join("mnt"), region, dir, session: None };
        std::fs::create_dir(&m.mp).unwrap();
        m.mount();
        m
    }

    pub fn mount(&mut self) {
        let r = Region::open(&self.region, OpenRegion::default()).unwrap();
        let (fs, report) = Fs::open(r, &OpenOptions { read_only: false, what: "test".into() }).unwrap();
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let cfg = fuse::parse_mount_options(&[]).unwrap();
        let s = fuse::mount(Arc::new(fs), &self.mp, "test-region", &cfg).unwrap();
        self.session = Some(s.spawn().unwrap());
    }

    pub fn unmount(&mut self) {
        if let Some(s) = self.session.take() {
            s.umount_and_join().unwrap();
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mp.join(rel)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
    }
}

pub struct Tmpfs {
    pub dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn new() -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        nix::mount::mount(Some("tmpfs"), dir.path(), Some("tmpfs"), nix::mount::MsFlags::empty(), Some("size=2g,mode=0755"))
            .expect("mount tmpfs (needs root)");
        Tmpfs { dir }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

pub fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// A deterministic byte pattern.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
