//! Mount-point checks: a dead daemon leaves a FUSE mount whose every access fails with ENOTCONN;
//! the next mount detaches it and takes over, instead of asking the operator to clean up.

use std::path::Path;

use tracing::warn;

use crate::error::{Error, Result};

/// Makes `mp` ready to mount on: an existing directory that is not a live mount point.
pub fn prepare(mp: &Path) -> Result<()> {
    let shown = mp.display().to_string();
    match std::fs::metadata(mp) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            nix::mount::umount2(mp, nix::mount::MntFlags::MNT_DETACH)
                .map_err(|e| Error::io(format!("detaching the stale mount at {shown}"), e.into()))?;
            warn!(mountpoint = %shown, "detached a stale mount left by a dead rpramfs daemon");
            return prepare(mp);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::BadRegion { path: shown.clone(), why: format!("mount point {shown} does not exist; create it with `mkdir -p {shown}`") })
        }
        Err(e) => return Err(Error::io(format!("checking mount point {shown}"), e)),
        Ok(m) if !m.is_dir() => return Err(Error::BadRegion { path: shown.clone(), why: "the mount point is not a directory".into() }),
        Ok(_) => {}
    }
    let canon = std::fs::canonicalize(mp).map_err(|e| Error::io(format!("resolving {shown}"), e))?;
    if let Some(fstype) = mounted_at(&canon) {
        // stat may be answered from the kernel's attribute cache; statfs always asks the daemon.
        if fstype.starts_with("fuse") && nix::sys::statfs::statfs(&canon).err() == Some(nix::errno::Errno::ENOTCONN) {
            nix::mount::umount2(&canon, nix::mount::MntFlags::MNT_DETACH)
                .map_err(|e| Error::io(format!("detaching the stale mount at {shown}"), e.into()))?;
            warn!(mountpoint = %shown, "detached a stale mount left by a dead rpramfs daemon");
            return prepare(mp);
        }
        return Err(Error::BadRegion {
            path: shown.clone(),
            why: format!("{shown} is already a mount point ({fstype}); unmount it first (umount {shown})"),
        });
    }
    Ok(())
}

/// The file-system type mounted at `path`, if any (from /proc/self/mountinfo).
pub fn mounted_at(path: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.to_string_lossy();
    info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let mp = unescape(f.get(4)?);
        if mp != want {
            return None;
        }
        let dash = f.iter().position(|x| *x == "-")?;
        f.get(dash + 1).map(|s| s.to_string())
    })
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push(u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("0"), 8).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
