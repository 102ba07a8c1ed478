//! fsck: everything the mount walk checks, plus directory structure, link counts, sizes and (with
//! `scrub`) the CRC of every data block. Read-only unless asked to repair.

use std::collections::HashMap;

use tracing::info;

use crate::fs::{build_dir_index, data_tree, xattr_tree, Fs, MountReport};
use crate::layout::*;
use crate::tree::{self, Visit};
use crate::tx::{read_verified, Block};

#[derive(Clone, Debug, Default)]
pub struct FsckReport {
    /// Damage and inconsistencies, each naming the inode/path and block.
    pub errors: Vec<String>,
    /// Harmless findings.
    pub notes: Vec<String>,
    /// What --repair changed.
    pub repaired: Vec<String>,
    pub inodes: u64,
    pub directories: u64,
    pub data_blocks: u64,
    pub scrubbed_blocks: u64,
}

impl FsckReport {
    pub fn clean(&self) -> bool {
        self.errors.is_empty()
    }
}

struct Found {
    inode: Inode,
    refs: u32,
    subdirs: u32,
    pages: u64,
}

/// Checks the file system `fs` (opened read-only, unless `repair`).
pub fn check(fs: &Fs, mount: &MountReport, scrub: bool, repair: bool) -> FsckReport {
    let mut r = FsckReport { errors: mount.errors.clone(), notes: mount.notes.clone(), ..Default::default() };
    if !mount.orphans.is_empty() {
        r.notes.push(format!("{} unlinked-but-open inodes from the last session; the next read-write mount frees them", mount.orphans.len()));
    }
    let region = fs.region();
    let inodes_tree = fs.inode_tree();

    // Every readable inode.
    let mut found: HashMap<u64, Found> = HashMap::new();
    let mut inode_blocks = Vec::new();
    tree::walk(region, inodes_tree, &mut |v| {
        if let Visit::Data { page, ptr } = v {
            inode_blocks.push((page, ptr));
        }
    });
    for (page, ptr) in inode_blocks {
        let mut buf: Block = [0; BLOCK_SIZE];
        if read_verified(region, ptr, &mut buf, &String::new).is_err() {
            continue; // reported by the mount walk
        }
        for s in 0..INODES_PER_BLOCK {
            let o = s as usize * INODE_SIZE;
            let inode = zerocopy::FromBytes::read_from_bytes(&buf[o..o + INODE_SIZE]).expect("inode size");
            let inode: Inode = inode;
            if !inode.is_free() {
                found.insert(page * INODES_PER_BLOCK + s, Found { inode, refs: 0, subdirs: 0, pages: 0 });
            }
        }
    }
    r.inodes = found.len() as u64;

    // Names for messages: ino → (parent, name).
    let mut names: HashMap<u64, (u64, String)> = HashMap::new();
    let mut dangling: Vec<(u64, Vec<u8>, String)> = Vec::new();
    let mut dirs: Vec<u64> = found.iter().filter(|(_, f)| f.inode.is_dir()).map(|(i, _)| *i).collect();
    dirs.sort_unstable();
    r.directories = dirs.len() as u64;
    for &d in &dirs {
        let dir_inode = found[&d].inode;
        let idx = match build_dir_index(region, &dir_inode) {
            Ok(i) => i,
            Err(e) => {
                r.errors.push(format!("directory inode {d}: {e}"));
                continue;
            }
        };
        for (name, e) in &idx.names {
            let shown = String::from_utf8_lossy(name).into_owned();
            if name.is_empty() || name.contains(&b'/') || name.contains(&0) || &name[..] == b"." || &name[..] == b".." {
                r.errors.push(format!("directory inode {d}: invalid entry name {shown:?} (slot {})", e.slot));
            }
            match found.get_mut(&e.ino) {
                None => dangling.push((d, name.to_vec(), format!("directory inode {d}: entry {shown:?} points at inode {} which does not exist or is unreadable", e.ino))),
                Some(t) => {
                    t.refs += 1;
                    if dtype_of_mode(t.inode.mode) != e.dtype {
                        r.errors.push(format!("directory inode {d}: entry {shown:?} says type {} but inode {} is type {}", e.dtype, e.ino, dtype_of_mode(t.inode.mode)));
                    }
                    if t.inode.is_dir() {
                        if t.inode.parent != d {
                            r.errors.push(format!("directory inode {}: its '..' is inode {} but it is linked from inode {d}", e.ino, t.inode.parent));
                        }
                        names.insert(e.ino, (d, shown));
                        found.get_mut(&d).expect("dir exists").subdirs += 1;
                    } else {
                        names.entry(e.ino).or_insert((d, shown));
                    }
                }
            }
        }
    }
    let path = |ino: u64| -> String {
        let mut parts = Vec::new();
        let mut cur = ino;
        for _ in 0..4096 {
            if cur == ROOT_INO {
                parts.reverse();
                return format!("/{}", parts.join("/"));
            }
            match names.get(&cur) {
                Some((p, n)) => {
                    parts.push(n.clone());
                    cur = *p;
                }
                None => break,
            }
        }
        format!("inode {ino}")
    };

    // Per-inode structure.
    let mut inos: Vec<u64> = found.keys().copied().collect();
    inos.sort_unstable();
    let mut fixes: Vec<(u64, u32, u64)> = Vec::new();
    for ino in inos {
        let f = found.get_mut(&ino).expect("listed");
        let i = f.inode;
        let who = format!("{} (inode {ino})", path(ino));
        let kind = i.kind();
        if !matches!(kind, libc::S_IFREG | libc::S_IFDIR | libc::S_IFLNK | libc::S_IFIFO | libc::S_IFSOCK | libc::S_IFCHR | libc::S_IFBLK) {
            r.errors.push(format!("{who}: invalid file type {:o}", i.mode));
        }
        if i.size > MAX_FILE_SIZE {
            r.errors.push(format!("{who}: size {} exceeds 2^48", i.size));
        }
        let mut pages = 0u64;
        let mut max_page = None;
        tree::walk(region, data_tree(&i), &mut |v| {
            if let Visit::Data { page, ptr } = v {
                pages += 1;
                max_page = Some(page);
                if scrub {
                    let mut buf: Block = [0; BLOCK_SIZE];
                    r.scrubbed_blocks += 1;
                    if read_verified(region, ptr, &mut buf, &String::new).is_err() {
                        r.errors.push(format!(
                            "{who}: data at offset {} (block {}) is damaged (CRC mismatch): reads of it return EIO",
                            page << BLOCK_SHIFT,
                            ptr.blk
                        ));
                    }
                }
            }
        });
        if scrub {
            tree::walk(region, xattr_tree(&i), &mut |v| {
                if let Visit::Data { ptr, .. } = v {
                    let mut buf: Block = [0; BLOCK_SIZE];
                    r.scrubbed_blocks += 1;
                    if read_verified(region, ptr, &mut buf, &String::new).is_err() {
                        r.errors.push(format!("{who}: extended attributes (block {}) are damaged", ptr.blk));
                    }
                }
            });
        }
        f.pages = pages;
        r.data_blocks += pages;
        let mut fix = false;
        if pages != i.blocks {
            r.errors.push(format!("{who}: block count says {} but {pages} blocks are mapped", i.blocks));
            fix = true;
        }
        if let Some(mp) = max_page {
            if i.is_reg() && i.flags & INODE_BLOCKS_PAST_EOF == 0 && (mp << BLOCK_SHIFT) >= i.size.next_multiple_of(BLOCK_SIZE as u64) {
                r.errors.push(format!("{who}: block at offset {} lies past the end of file ({} bytes)", mp << BLOCK_SHIFT, i.size));
            }
        }
        if i.is_symlink() && (i.size == 0 || i.size >= 4096) {
            r.errors.push(format!("{who}: symlink target length {} is invalid", i.size));
        }
        let expect_links = if i.is_dir() { 2 + f.subdirs } else { f.refs };
        if i.is_dir() && ino != ROOT_INO && f.refs != 1 && i.nlink > 0 {
            r.errors.push(format!("{who}: directory is linked from {} places", f.refs));
        }
        if i.nlink == 0 && f.refs == 0 {
            continue; // an orphan, noted above
        }
        if f.refs == 0 && ino != ROOT_INO {
            r.errors.push(format!("inode {ino}: has {} links but no directory entry reaches it", i.nlink));
        } else if i.nlink != expect_links {
            r.errors.push(format!("{who}: link count is {} but {expect_links} were found", i.nlink));
            fix = true;
        }
        if fix {
            fixes.push((ino, expect_links, pages));
        }
    }
    if !found.contains_key(&ROOT_INO) {
        r.errors.push("the root directory (inode 1) is missing or unreadable".into());
    }
    for (_, _, msg) in &dangling {
        r.errors.push(msg.clone());
    }

    if repair {
        for (dir, name, msg) in dangling {
            match fs.repair_drop_entry(dir, &name) {
                Ok(()) => r.repaired.push(format!("removed: {msg}")),
                Err(e) => r.errors.push(format!("repair failed: {msg}: {e}")),
            }
        }
        for (ino, nlink, blocks) in fixes {
            match fs.repair_counts(ino, nlink, blocks) {
                Ok(()) => r.repaired.push(format!("inode {ino}: set link count {nlink}, block count {blocks}")),
                Err(e) => r.errors.push(format!("repair of inode {ino} failed: {e}")),
            }
        }
        info!(repairs = r.repaired.len(), "fsck repairs committed");
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::{Creator, MkfsOptions, OpenOptions};
    use crate::region::Region;

    #[test]
    fn wrong_link_count_is_reported_then_repaired() {
        let r = Region::memfd(4 << 20, false).unwrap();
        Fs::mkfs(&r, &MkfsOptions::default()).unwrap();
        let (fs, report) = Fs::open(r, &OpenOptions::default()).unwrap();
        let f = fs.create(ROOT_INO, b"f", libc::S_IFREG | 0o644, 0, Creator { uid: 0, gid: 0 }, None).unwrap();
        fs.write_file(f.ino, 0, &[1; 5000]).unwrap();
        assert!(check(&fs, &report, true, false).clean());
        fs.repair_counts(f.ino, 5, 7).unwrap(); // make it wrong
        let r = check(&fs, &report, true, false);
        assert_eq!(r.errors.len(), 2, "{:?}", r.errors);
        assert!(r.errors.iter().any(|e| e.contains("/f (inode 2): link count is 5 but 1 were found")), "{:?}", r.errors);
        assert!(r.errors.iter().any(|e| e.contains("block count says 7 but 2 blocks are mapped")), "{:?}", r.errors);
        let r = check(&fs, &report, true, true);
        assert_eq!(r.repaired.len(), 1);
        assert!(check(&fs, &report, true, false).clean());
    }
}
