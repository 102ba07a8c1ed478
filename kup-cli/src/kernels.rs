//! The kernels installed in /boot, and the one `kup update` switches to when no `--kernel` is
//! given: the newest, as `systemctl kexec` loads the default boot entry and Debian's boot loader
//! configuration puts the newest kernel first.

use std::cmp::Ordering;
use std::path::{Path, PathBuf};

use crate::error::{fail, Result};

/// A kernel image in the boot directory and the initrd beside it (if there is one).
#[derive(Debug, PartialEq, Eq)]
pub struct Installed {
    pub release: String,
    pub image: PathBuf,
    pub initrd: Option<PathBuf>,
}

/// Every `vmlinuz-<release>` in `boot` whose image is that release, oldest first (Debian's version
/// order).
pub fn installed(boot: &Path) -> Result<Vec<Installed>> {
    let entries = std::fs::read_dir(boot).map_err(|e| format!("{}: {e}", boot.display()))?;
    let mut v: Vec<Installed> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let release = name.strip_prefix("vmlinuz-")?.to_string();
            let image = e.path();
            // The image must hold the release its name says (a dangling link, a directory or a
            // file copied under another name is no kernel to pick by name).
            if crate::record::image_release(&image).as_deref() != Some(release.as_str()) {
                return None;
            }
            let initrd = Some(boot.join(format!("initrd.img-{release}"))).filter(|p| p.is_file());
            Some(Installed { release, image, initrd })
        })
        .collect();
    v.sort_by(|a, b| version_cmp(&a.release, &b.release));
    Ok(v)
}

/// The newest kernel in `boot`, which must be newer than the `running` release.
pub fn newest(boot: &Path, running: &str) -> Result<Installed> {
    let Some(k) = installed(boot)?.pop() else {
        return fail(format!(
            "no kernel in {} (no vmlinuz-<release> whose image is that release): install one (apt-get install linux-image-amd64) or pass --kernel",
            boot.display()
        ));
    };
    match version_cmp(&k.release, running) {
        Ordering::Greater => Ok(k),
        Ordering::Equal => fail(format!(
            "the newest kernel in {} is the running one ({running}): there is nothing newer to switch to; install one (apt-get upgrade) or pass --kernel",
            boot.display()
        )),
        Ordering::Less => fail(format!(
            "the newest kernel in {} ({}) is older than the running one ({running}); pass --kernel to switch to it anyway",
            boot.display(),
            k.release
        )),
    }
}

/// Debian's version order (dpkg's, on the upstream part): runs of non-digits compare character by
/// character, with `~` before anything, even the end, and letters before other characters; runs
/// of digits compare as numbers.
pub fn version_cmp(a: &str, b: &str) -> Ordering {
    fn weight(c: Option<u8>) -> i32 {
        match c {
            None => 0,
            Some(b'~') => -1,
            Some(c) if c.is_ascii_digit() => 0,
            Some(c) if c.is_ascii_alphabetic() => c as i32,
            Some(c) => c as i32 + 256,
        }
    }
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        // The non-digit run.
        while (i < a.len() && !a[i].is_ascii_digit()) || (j < b.len() && !b[j].is_ascii_digit()) {
            let (ca, cb) = (a.get(i).copied().filter(|c| !c.is_ascii_digit()), b.get(j).copied().filter(|c| !c.is_ascii_digit()));
            let (wa, wb) = (weight(ca), weight(cb));
            if wa != wb {
                return wa.cmp(&wb);
            }
            i += ca.is_some() as usize;
            j += cb.is_some() as usize;
        }
        // The digit run, as a number (leading zeros do not count).
        let run = |s: &[u8], mut k: usize| {
            while k < s.len() && s[k] == b'0' {
                k += 1;
            }
            let start = k;
            while k < s.len() && s[k].is_ascii_digit() {
                k += 1;
            }
            (start, k)
        };
        let ((sa, ea), (sb, eb)) = (run(a, i), run(b, j));
        let by_number = (ea - sa).cmp(&(eb - sb)).then_with(|| a[sa..ea].cmp(&b[sb..eb]));
        if by_number != Ordering::Equal {
            return by_number;
        }
        (i, j) = (ea, eb);
    }
    Ordering::Equal
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_sort_as_debian_sorts_them() {
        let sorted = [
            "5.10.0-9-cloud-amd64",
            "6.1.0-9-cloud-amd64",
            "6.1.0-10-cloud-amd64",
            "6.1.0-56-cloud-amd64",
            "6.1.0-57-cloud-amd64",
            "6.12.9~rc1-cloud-amd64",
            "6.12.9+deb13-cloud-amd64",
            "6.12.38+deb13-cloud-amd64",
            "7.2.13+deb14-cloud-amd64",
        ];
        for (i, a) in sorted.iter().enumerate() {
            for (j, b) in sorted.iter().enumerate() {
                assert_eq!(version_cmp(a, b), i.cmp(&j), "{a} against {b}");
            }
        }
        assert_eq!(version_cmp("6.1.0-057", "6.1.0-57"), Ordering::Equal);
    }

    #[test]
    fn the_newest_installed_kernel_is_taken_with_its_initrd() {
        let boot = tempfile::tempdir().unwrap();
        let touch = |name: &str| std::fs::write(boot.path().join(name), b"x").unwrap();
        // A bzImage's setup header: "HdrS" at 0x202, the version string's offset from 0x200 at 0x20e.
        let kernel = |name: &str, release: &str| {
            let mut b = vec![0u8; 0x1000];
            b[0x202..0x206].copy_from_slice(b"HdrS");
            b[0x20e..0x210].copy_from_slice(&0x600u16.to_le_bytes());
            b[0x800..0x800 + release.len()].copy_from_slice(release.as_bytes());
            b[0x800 + release.len()] = b' ';
            std::fs::write(boot.path().join(name), b).unwrap();
        };
        let none = newest(boot.path(), "6.1.0-56-cloud-amd64").unwrap_err().0;
        assert!(none.contains("no kernel in") && none.contains("--kernel"), "{none}");
        for r in ["6.1.0-56-cloud-amd64", "6.1.0-9-cloud-amd64"] {
            kernel(&format!("vmlinuz-{r}"), r);
            touch(&format!("initrd.img-{r}"));
        }
        let same = newest(boot.path(), "6.1.0-56-cloud-amd64").unwrap_err().0;
        assert!(same.contains("is the running one") && same.contains("--kernel"), "{same}");
        let older = newest(boot.path(), "6.12.9+deb13-cloud-amd64").unwrap_err().0;
        assert!(older.contains("older than the running one"), "{older}");
        // A newer kernel without an initrd, and what is no kernel to pick by name: a file that is no
        // kernel, an image under another release's name, a directory, a dangling link.
        kernel("vmlinuz-6.1.0-57-cloud-amd64", "6.1.0-57-cloud-amd64");
        touch("vmlinuz-9.9.9");
        kernel("vmlinuz-b", "6.1.0-57-cloud-amd64");
        kernel("vmlinuz-9.9.8", "6.1.0-57-cloud-amd64");
        std::fs::create_dir(boot.path().join("vmlinuz-99")).unwrap();
        std::os::unix::fs::symlink("/nonexistent", boot.path().join("vmlinuz-98")).unwrap();
        let k = newest(boot.path(), "6.1.0-56-cloud-amd64").unwrap();
        assert_eq!(k, Installed { release: "6.1.0-57-cloud-amd64".into(), image: boot.path().join("vmlinuz-6.1.0-57-cloud-amd64"), initrd: None });
        touch("initrd.img-6.1.0-57-cloud-amd64");
        assert_eq!(newest(boot.path(), "6.1.0-56-cloud-amd64").unwrap().initrd, Some(boot.path().join("initrd.img-6.1.0-57-cloud-amd64")));
        let all: Vec<String> = installed(boot.path()).unwrap().into_iter().map(|k| k.release).collect();
        assert_eq!(all, ["6.1.0-9-cloud-amd64", "6.1.0-56-cloud-amd64", "6.1.0-57-cloud-amd64"]);
    }
}
