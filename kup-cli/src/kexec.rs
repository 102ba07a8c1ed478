//! Switching kernels: `kexec -s -l` (loading, part of the preflight) and `kexec -e`, and taking the
//! store down cleanly before the switch.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{fail, Result};
use crate::record::Kernel;

/// Loads `k` for a later `kexec -e`; a kernel that does not load is reported with kexec's words.
pub fn load(k: &Kernel) -> Result<()> {
    crate::faults::at("kexec-load").map_err(|e| format!("the kernel {} does not load: {e}", k.image.display()))?;
    let mut cmd = Command::new("kexec");
    cmd.args(["-s", "-l"]).arg(&k.image);
    if let Some(i) = &k.initrd {
        cmd.arg(format!("--initrd={}", i.display()));
    }
    cmd.arg(format!("--append={}", k.cmdline)).stdin(Stdio::null());
    let out = cmd.output().map_err(|e| format!("cannot run kexec ({e}); install kexec-tools"))?;
    if !out.status.success() {
        return fail(format!(
            "the kernel {} does not load (kexec -s -l: {}): {}",
            k.image.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

pub fn unload() {
    let _ = Command::new("kexec").arg("-u").stdin(Stdio::null()).stderr(Stdio::null()).status();
}

/// Jumps into the loaded kernel. Returns only on failure.
pub fn execute() -> Result<()> {
    nix::unistd::sync();
    let out = Command::new("kexec").arg("-e").stdin(Stdio::null()).output().map_err(|e| format!("cannot run kexec: {e}"))?;
    fail(format!("kexec -e returned ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
}

/// The `memmap=…!…` parameters of a command line: the reserved regions that hold the store.
pub fn memmap_params(cmdline: &str) -> Vec<String> {
    memmap_entries(cmdline).into_iter().filter(|e| e.contains('!')).map(|e| format!("memmap={e}")).collect()
}

/// Every entry of every `memmap=` of a command line (`memmap=A,B` has two).
pub fn memmap_entries(cmdline: &str) -> Vec<&str> {
    cmdline.split_whitespace().filter_map(|w| w.strip_prefix("memmap=")).flat_map(|v| v.split(',')).collect()
}

/// Unmounts the store and waits until the rpramfs daemon has written its clean-unmount record
/// and released the region.
pub fn unmount_store(mountpoint: &Path, region: &Path) -> Result<()> {
    let out = Command::new("umount").arg(mountpoint).stdin(Stdio::null()).output().map_err(|e| format!("umount: {e}"))?;
    if !out.status.success() {
        return fail(format!("umount {} failed: {}", mountpoint.display(), String::from_utf8_lossy(&out.stderr).trim()));
    }
    let start = Instant::now();
    loop {
        let f = std::fs::OpenOptions::new().read(true).open(region).map_err(|e| format!("{}: {e}", region.display()))?;
        if nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).is_ok() {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(30) {
            return fail(format!("the rpramfs daemon of {} did not exit within 30 s of the unmount", region.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `mountpoint` is a mount point (listed in /proc/mounts).
pub fn is_mounted(mountpoint: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mp = mountpoint.to_string_lossy();
    mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(&*mp))
}

#[cfg(test)]
mod tests {
    #[test]
    fn memmap_params_are_the_reserved_regions() {
        assert_eq!(super::memmap_params("console=ttyS0 memmap=512M!1G quiet memmap=64K$0x1000"), vec!["memmap=512M!1G"]);
        assert_eq!(super::memmap_params("memmap=512M!1G,2G$4G"), vec!["memmap=512M!1G"]);
        assert_eq!(super::memmap_entries("memmap=512M!1G,2G$4G quiet memmap=1G!8G"), vec!["512M!1G", "2G$4G", "1G!8G"]);
        assert!(super::memmap_params("quiet").is_empty());
    }
}
