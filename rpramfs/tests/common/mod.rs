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

pub const ROOT: u64 = 1;

/// What a populated image holds: path → (offset, bytes) segments.
pub type Expected = Vec<(String, Vec<(u64, Vec<u8>)>)>;

/// A small, cleanly unmounted region image with files, a sparse file at 2^47, a directory of
/// files, a symlink and extended attributes.
pub fn populated_image() -> (Vec<u8>, Expected) {
    use rpramfs::fs::Creator;
    let who = Creator { uid: 0, gid: 0 };
    let region = Region::memfd(4 << 20, false).unwrap();
    Fs::mkfs(&region, &MkfsOptions::default()).unwrap();
    let (fs, _) = Fs::open(region, &OpenOptions::default()).unwrap();
    let mut exp: Expected = Vec::new();
    let mut file = |dir: u64, name: &str, path: &str, segs: Vec<(u64, Vec<u8>)>| {
        let ino = fs.create(dir, name.as_bytes(), libc::S_IFREG | 0o644, 0, who, None).unwrap().ino;
        for (off, d) in &segs {
            fs.write_file(ino, *off, d).unwrap();
        }
        exp.push((path.to_string(), segs));
        ino
    };
    file(ROOT, "small", "small", vec![(0, pattern(1, 100))]);
    let big = file(ROOT, "big", "big", vec![(0, pattern(2, 300 << 10))]);
    file(ROOT, "sparse", "sparse", vec![(0, pattern(3, 5000)), (1 << 47, pattern(4, 9000))]);
    let d = fs.create(ROOT, b"d", libc::S_IFDIR | 0o755, 0, who, None).unwrap().ino;
    for i in 0..40 {
        file(d, &format!("f{i}"), &format!("d/f{i}"), vec![(0, pattern(100 + i, 700 + i as usize * 50))]);
    }
    fs.create(ROOT, b"link", libc::S_IFLNK | 0o777, 0, who, Some(b"d/f1")).unwrap();
    fs.setxattr(big, b"user.note", &pattern(9, 6000), 0).unwrap();
    fs.close().unwrap();
    (fs.region().snapshot(), exp)
}

/// Reads every expected byte; returns how many reads failed. Panics if a read returns wrong
/// bytes without an error.
pub fn read_back(fs: &Fs, exp: &Expected) -> usize {
    read_back_failures(fs, exp).len()
}

/// A read (or the lookup before it) that failed: the file's path as in [`Expected`], the offset
/// of the read (None for a failed lookup) and its errno.
#[derive(Debug)]
pub struct ReadFailure {
    pub path: String,
    pub offset: Option<u64>,
    pub errno: i32,
}

/// Reads every expected byte; returns the reads that failed. Panics if a read returns wrong
/// bytes without an error. After a failed read it goes on at the next page.
pub fn read_back_failures(fs: &Fs, exp: &Expected) -> Vec<ReadFailure> {
    let mut failed = Vec::new();
    for (path, segs) in exp {
        let mut dir = ROOT;
        let mut ino = None;
        let parts: Vec<&str> = path.split('/').collect();
        for (i, p) in parts.iter().enumerate() {
            match fs.lookup(dir, p.as_bytes()) {
                Ok(a) if i + 1 == parts.len() => ino = Some(a.ino),
                Ok(a) => dir = a.ino,
                Err(e) => {
                    failed.push(ReadFailure { path: path.clone(), offset: None, errno: e.errno() });
                    break;
                }
            }
        }
        let Some(ino) = ino else {
            continue;
        };
        for (off, want) in segs {
            let mut pos = 0usize;
            while pos < want.len() {
                match fs.read_file(ino, off + pos as u64, (want.len() - pos).min(64 << 10) as u32) {
                    Ok(got) if got.is_empty() => panic!("{path}: read at {} returned nothing", off + pos as u64),
                    Ok(got) => {
                        assert!(got[..] == want[pos..pos + got.len()], "{path}: WRONG BYTES at {} without an error", off + pos as u64);
                        pos += got.len();
                    }
                    Err(e) => {
                        failed.push(ReadFailure { path: path.clone(), offset: Some(off + pos as u64), errno: e.errno() });
                        // Skip the damaged page.
                        pos = ((pos as u64 + off) / 4096 * 4096 + 4096 - off) as usize;
                    }
                }
            }
        }
    }
    failed
}

/// The `rpramfs` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_rpramfs");

/// Runs `rpramfs ARGS`; returns the exit code and stdout+stderr.
pub fn run(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(BIN).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// The daemon pid `rpramfs mount` prints.
pub fn daemon_pid(mount_output: &str) -> i32 {
    let s = mount_output.split("daemon pid ").nth(1).expect("mount prints the daemon pid");
    s.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
}
