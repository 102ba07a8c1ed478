//! The `rpramfs` command as an operator runs it: bad input gets a clear message and never loses
//! stored data.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{daemon_pid, run, BIN};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Detaches a mount when a test ends, passed or failed, so no daemon outlives its test.
struct LazyUmount(std::path::PathBuf);

impl Drop for LazyUmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).stderr(std::process::Stdio::null()).status();
    }
}

/// Unmounts, retrying while the mount is briefly busy (a parallel test's fork between its
/// fork and exec can hold a descriptor for a moment), then lets the daemon finish its clean exit.
fn umount_wait(mp: &Path) {
    let mut last = String::new();
    for _ in 0..50 {
        let out = Command::new("umount").arg(mp).output().unwrap();
        if out.status.success() {
            std::thread::sleep(Duration::from_millis(300));
            return;
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("umount {} kept failing: {last}", mp.display());
}

#[test]
fn cold_region_is_refused_and_left_alone() {
    let d = tempfile::tempdir().unwrap();
    let region = d.path().join("cold.img");
    fs::write(&region, vec![0u8; 8 << 20]).unwrap();
    let mp = d.path().join("mnt");
    fs::create_dir(&mp).unwrap();
    let (rc, out) = run(&["mount", s(&region), s(&mp)]);
    assert_eq!(rc, 1, "{out}");
    assert!(out.contains("holds no rpramfs file system"), "{out}");
    assert!(out.contains("rpramfs mkfs"), "the message names the fix: {out}");
    assert!(fs::read(&region).unwrap().iter().all(|&b| b == 0), "a refused mount must not write");
    let (rc, out) = run(&["fsck", s(&region)]);
    assert_eq!(rc, 8, "{out}");
    let (rc, out) = run(&["info", s(&region)]);
    assert_eq!(rc, 1, "{out}");
}

#[test]
fn mkfs_refuses_to_erase_without_force_and_geometry_is_checked() {
    let d = tempfile::tempdir().unwrap();
    let region = d.path().join("r.img");
    assert_eq!(run(&["mkfs", s(&region), "--size", "64M"]).0, 0);
    let (rc, out) = run(&["mkfs", s(&region), "--size", "64M"]);
    assert_eq!(rc, 1);
    assert!(out.contains("already holds an rpramfs file system") && out.contains("--force"), "{out}");
    assert_eq!(run(&["mkfs", s(&region), "--force"]).0, 0);
    // A region of another size (a changed memmap=) is refused, naming both sizes.
    fs::OpenOptions::new().write(true).open(&region).unwrap().set_len(128 << 20).unwrap();
    let mp = d.path().join("mnt");
    fs::create_dir(&mp).unwrap();
    let (rc, out) = run(&["mount", s(&region), s(&mp)]);
    assert_eq!(rc, 1);
    assert!(out.contains("134217728 bytes but its superblock says 67108864"), "{out}");
    assert!(out.contains("memmap="), "{out}");
    let (rc, out) = run(&["mkfs", s(&region), "--size", "12Q"]);
    assert_ne!(rc, 0);
    assert!(out.contains("unknown size suffix"), "{out}");
}

#[test]
fn busy_region_names_its_holder_and_info_works_while_mounted() {
    let d = tempfile::tempdir().unwrap();
    let region = d.path().join("r.img");
    let (mp, mp2) = (d.path().join("a"), d.path().join("b"));
    fs::create_dir(&mp).unwrap();
    fs::create_dir(&mp2).unwrap();
    assert_eq!(run(&["mkfs", s(&region), "--size", "64M"]).0, 0);
    let (rc, out) = run(&["mount", s(&region), s(&mp), "--log", s(&d.path().join("log"))]);
    assert_eq!(rc, 0, "{out}");
    let _guard = LazyUmount(mp.clone());
    fs::write(mp.join("kept"), b"data").unwrap();
    let (rc, out) = run(&["mount", s(&region), s(&mp2)]);
    assert_eq!(rc, 1);
    assert!(out.contains("is in use by rpramfs pid") && out.contains("running"), "{out}");
    let (rc, out) = run(&["fsck", s(&region)]);
    assert_ne!(rc, 0);
    assert!(out.contains("in use by"), "{out}");
    let (rc, out) = run(&["mount", s(&region), s(&mp)]);
    assert_eq!(rc, 1);
    assert!(out.contains("already a mount point"), "{out}");
    let (rc, out) = run(&["info", s(&region)]);
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("state:        mounted"), "{out}");
    assert!(out.contains("files:        2 inodes"), "{out}");
    let (rc, out) = run(&["mount", s(&region), s(&mp2), "-o", "bogus"]);
    assert_eq!(rc, 1);
    assert!(out.contains("unknown mount option \"bogus\""), "{out}");
    umount_wait(&mp);
    let (rc, out) = run(&["info", s(&region)]);
    assert_eq!(rc, 0);
    assert!(out.contains("clean (last unmount completed)"), "{out}");
    assert_eq!(run(&["fsck", s(&region)]).0, 0);
}

#[test]
fn full_file_system_gives_enospc_and_keeps_everything() {
    let d = tempfile::tempdir().unwrap();
    let region = d.path().join("r.img");
    let mp = d.path().join("mnt");
    fs::create_dir(&mp).unwrap();
    assert_eq!(run(&["mkfs", s(&region), "--size", "16M"]).0, 0);
    assert_eq!(run(&["mount", s(&region), s(&mp), "--log", s(&d.path().join("log"))]).0, 0);
    let _guard = LazyUmount(mp.clone());
    fs::write(mp.join("first"), common::pattern(1, 1 << 20)).unwrap();
    let err = fs::write(mp.join("filler"), vec![7u8; 32 << 20]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert_eq!(fs::read(mp.join("first")).unwrap(), common::pattern(1, 1 << 20));
    fs::remove_file(mp.join("filler")).unwrap();
    fs::write(mp.join("after"), b"space is back").unwrap();
    umount_wait(&mp);
    let (rc, out) = run(&["fsck", "--scrub", s(&region)]);
    assert_eq!(rc, 0, "{out}");
}

#[test]
fn fsck_names_damage_and_exits_1() {
    let d = tempfile::tempdir().unwrap();
    let region = d.path().join("r.img");
    let (image, _) = common::populated_image();
    fs::write(&region, &image).unwrap();
    let (rc, out) = run(&["fsck", "--scrub", s(&region)]);
    assert_eq!(rc, 0, "{out}");
    // Damage one data block of "big": find it by content.
    let needle = &common::pattern(2, 300 << 10)[8192..8192 + 64];
    let pos = image.windows(64).position(|w| w == needle).unwrap();
    let mut bad = image.clone();
    bad[pos + 10] ^= 0x40;
    fs::write(&region, &bad).unwrap();
    let (rc, out) = run(&["fsck", s(&region)]);
    assert_eq!(rc, 0, "without --scrub data blocks are not read: {out}");
    let (rc, out) = run(&["fsck", "--scrub", s(&region)]);
    assert_eq!(rc, 1, "{out}");
    let block = pos / 4096;
    assert!(out.contains(&"/big (inode".to_string()) && out.contains(&format!("block {block}")), "{out}");
    assert_eq!(fs::read(&region).unwrap(), bad, "fsck without --repair must not write");
}

#[test]
fn mount_helper_for_mount_t_and_fstab() {
    let d = tempfile::tempdir().unwrap();
    let region = d.path().join("r.img");
    let mp = d.path().join("mnt");
    fs::create_dir(&mp).unwrap();
    assert_eq!(run(&["mkfs", s(&region), "--size", "32M"]).0, 0);
    // mount(8) runs /sbin/mount.<type> REGION DIR -o OPTIONS.
    let helper = Path::new("/sbin/mount.fuse.rpramfs");
    let ours = !helper.exists();
    if ours {
        std::os::unix::fs::symlink(BIN, helper).unwrap();
    }
    let out = Command::new("mount").args(["-t", "fuse.rpramfs", "-o", "noatime,nodev", s(&region), s(&mp)]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    let mounted = out.status.success() && rpramfs::mountpoint::mounted_at(&fs::canonicalize(&mp).unwrap()).is_some();
    if mounted {
        fs::write(mp.join("via-mount"), b"ok").unwrap();
        umount_wait(&mp);
    }
    if ours {
        fs::remove_file(helper).unwrap();
    }
    assert!(mounted, "mount -t fuse.rpramfs failed: {text}");
}

/// A block-device region (a loop device here; /dev/pmem0 in the guest): the msync path.
#[test]
fn block_device_region_survives_kill9() {
    let d = tempfile::tempdir().unwrap();
    let backing = d.path().join("backing.img");
    fs::write(&backing, vec![0u8; 64 << 20]).unwrap();
    let out = Command::new("losetup").args(["--find", "--show"]).arg(&backing).output().unwrap();
    if !out.status.success() {
        panic!("losetup failed (loop devices are needed for this test): {}", String::from_utf8_lossy(&out.stderr));
    }
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let _detach = Detach(dev.clone());
    let mp = d.path().join("mnt");
    fs::create_dir(&mp).unwrap();
    let (rc, out) = run(&["mkfs", &dev, "--size", "32M"]);
    assert_eq!(rc, 1, "--size must be refused for a device of another size: {out}");
    assert!(out.contains("omit --size for devices"), "{out}");
    assert_eq!(run(&["mkfs", &dev]).0, 0);
    let log = d.path().join("log");
    let (rc, out) = run(&["mount", &dev, s(&mp), "--log", s(&log)]);
    assert_eq!(rc, 0, "{out}");
    let _guard = LazyUmount(mp.clone());
    let data = common::pattern(5, 3 << 20);
    fs::write(mp.join("kept"), &data).unwrap();
    let pid = daemon_pid(&out);
    // SAFETY: killing the daemon we started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(200));
    let (rc, out) = run(&["info", &dev]);
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("block device"), "{out}");
    let (rc, out) = run(&["mount", &dev, s(&mp), "--log", s(&log)]);
    assert_eq!(rc, 0, "{out}");
    assert_eq!(fs::read(mp.join("kept")).unwrap(), data);
    umount_wait(&mp);
    let (rc, out) = run(&["fsck", "--scrub", &dev]);
    assert_eq!(rc, 0, "{out}");
    // The bytes are on the device itself, not only in this kernel's page cache of it.
    let _ = Command::new("blockdev").args(["--flushbufs", &dev]).status();
    let raw = fs::read(&backing).unwrap();
    assert!(raw.windows(64).any(|w| w == &data[4096..4096 + 64]), "data not found in the backing file");
}

/// `RPRAMFS_READY_FD` (set by `rpramfs mount` for its daemon) is checked before it is used: a value
/// that is not a number, below 3, not an open descriptor, or not open for writing is refused with
/// the variable and the value named, and nothing is mounted.
#[test]
fn ready_fd_is_validated() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let d = tempfile::tempdir().unwrap();
    let region = d.path().join("region.img");
    assert_eq!(run(&["mkfs", s(&region), "--size", "16M"]).0, 0);
    let mp = d.path().join("mnt");
    fs::create_dir(&mp).unwrap();
    let _guard = LazyUmount(mp.clone());
    // A descriptor open only for reading, placed at number 7 in the child.
    let ro = fs::File::open(&region).unwrap();
    let ro_fd = ro.as_raw_fd();
    let cases: [(&str, &str); 7] = [
        ("-1", "not a readiness pipe"),
        ("0", "not a readiness pipe"),
        ("2", "not a readiness pipe"),
        ("abc", "not a file descriptor number"),
        ("", "not a file descriptor number"),
        ("900", "descriptor 900 is not open"),
        ("7", "descriptor 7 is not open for writing"),
    ];
    for (value, why) in cases {
        let mut cmd = Command::new(BIN);
        cmd.args(["mount", s(&region), s(&mp)]).env("RPRAMFS_READY_FD", value);
        if value == "7" {
            // SAFETY: dup2 is async-signal-safe; it runs in the child between fork and exec.
            unsafe {
                cmd.pre_exec(move || if libc::dup2(ro_fd, 7) < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) });
            }
        }
        let mut child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
        let mut waited = 0;
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if waited > 100 {
                let _ = child.kill();
                let _ = child.wait();
                panic!("RPRAMFS_READY_FD={value:?}: rpramfs mount did not exit in 10 s (it took the value and mounted?)");
            }
            std::thread::sleep(Duration::from_millis(100));
            waited += 1;
        };
        let out = child.wait_with_output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(status.code(), Some(1), "RPRAMFS_READY_FD={value:?}: {text}");
        assert!(text.contains(&format!("RPRAMFS_READY_FD={value:?}")), "the message names the variable and the value {value:?}: {text}");
        assert!(text.contains(why), "RPRAMFS_READY_FD={value:?}: expected {why:?} in {text}");
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
        assert!(!mounts.contains(s(&mp)), "RPRAMFS_READY_FD={value:?}: something was mounted on {}", mp.display());
    }
    drop(ro);
    // The valid path (rpramfs mount passing its own pipe) still works.
    let (rc, out) = run(&["mount", s(&region), s(&mp)]);
    assert_eq!(rc, 0, "{out}");
    umount_wait(&mp);
}
