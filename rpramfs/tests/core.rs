//! Library-level tests of the file-system core on memfd regions.

use rpramfs::error::Error;
use rpramfs::fs::{Creator, Fs, MkfsOptions, OpenOptions, SetAttr};
use rpramfs::region::Region;

const ROOT: u64 = 1;
const WHO: Creator = Creator { uid: 0, gid: 0 };

fn fresh(size: u64) -> Fs {
    let r = Region::memfd(size, false).unwrap();
    Fs::mkfs(&r, &MkfsOptions::default()).unwrap();
    Fs::open(r, &OpenOptions::default()).unwrap().0
}

/// Reopens from a copy of the region's bytes (what a new daemon or a new kernel sees).
fn reopen(fs: &Fs) -> (Fs, rpramfs::fs::MountReport) {
    let img = fs.region().snapshot();
    Fs::open(Region::memfd_from(&img).unwrap(), &OpenOptions::default()).unwrap()
}

fn file(fs: &Fs, name: &str) -> u64 {
    fs.create(ROOT, name.as_bytes(), libc::S_IFREG | 0o644, 0, WHO, None).unwrap().ino
}

#[test]
fn write_read_survives_reopen_without_close() {
    let fs = fresh(16 << 20);
    let f = file(&fs, "a");
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    assert_eq!(fs.write_file(f, 123, &data).unwrap(), data.len() as u32);
    // No close: a kill -9 leaves exactly this region.
    let (fs2, report) = reopen(&fs);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(!report.was_clean);
    let attr = fs2.lookup(ROOT, b"a").unwrap();
    assert_eq!(attr.inode.size, 123 + data.len() as u64);
    let back = fs2.read_file(attr.ino, 0, 200_000).unwrap();
    assert_eq!(&back[..123], &[0u8; 123][..]);
    assert_eq!(&back[123..], &data[..]);
}

#[test]
fn sparse_file_near_top_of_address_space() {
    let fs = fresh(8 << 20);
    let f = file(&fs, "sparse");
    let off = 0x7fff_ffff_0000u64;
    fs.write_file(f, off, b"top of user space").unwrap();
    let a = fs.getattr(f).unwrap().inode;
    assert_eq!(a.size, off + 17);
    assert_eq!(a.blocks, 1);
    assert_eq!(fs.read_file(f, off, 64).unwrap(), b"top of user space");
    assert_eq!(fs.read_file(f, 4096, 16).unwrap(), vec![0u8; 16]);
    assert_eq!(fs.seek(f, 0, libc::SEEK_DATA).unwrap(), off);
    assert_eq!(fs.seek(f, 0, libc::SEEK_HOLE).unwrap(), 0);
    assert_eq!(fs.seek(f, off, libc::SEEK_HOLE).unwrap(), off + 17);
    // Beyond 2^48 is refused, not wrapped.
    assert_eq!(fs.write_file(f, 1 << 48, b"x").unwrap_err().errno(), libc::EFBIG);
}

#[test]
fn truncate_zeroes_the_tail_and_frees_blocks() {
    let fs = fresh(8 << 20);
    let f = file(&fs, "t");
    fs.write_file(f, 0, &[0xaa; 3 * 4096]).unwrap();
    fs.setattr(f, SetAttr { size: Some(5000), ..Default::default() }).unwrap();
    assert_eq!(fs.getattr(f).unwrap().inode.blocks, 2);
    fs.setattr(f, SetAttr { size: Some(3 * 4096), ..Default::default() }).unwrap();
    let back = fs.read_file(f, 0, 3 * 4096).unwrap();
    assert!(back[..5000].iter().all(|&b| b == 0xaa));
    assert!(back[5000..].iter().all(|&b| b == 0), "stale data after truncate");
}

#[test]
fn punch_hole_and_seek() {
    let fs = fresh(8 << 20);
    let f = file(&fs, "p");
    fs.write_file(f, 0, &[1; 16 * 4096]).unwrap();
    fs.fallocate(f, 4096 + 100, 3 * 4096, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE).unwrap();
    let back = fs.read_file(f, 0, 16 * 4096).unwrap();
    assert!(back[..4196].iter().all(|&b| b == 1));
    assert!(back[4196..4196 + 3 * 4096].iter().all(|&b| b == 0));
    assert!(back[4196 + 3 * 4096..].iter().all(|&b| b == 1));
    assert_eq!(fs.seek(f, 4096, libc::SEEK_HOLE).unwrap(), 2 * 4096);
    assert_eq!(fs.seek(f, 2 * 4096, libc::SEEK_DATA).unwrap(), 4 * 4096);
    assert_eq!(fs.getattr(f).unwrap().inode.blocks, 14);
}

#[test]
fn directories_links_renames() {
    let fs = fresh(8 << 20);
    let d = fs.create(ROOT, b"d", libc::S_IFDIR | 0o755, 0, WHO, None).unwrap().ino;
    let f = fs.create(d, b"f", libc::S_IFREG | 0o644, 0, WHO, None).unwrap().ino;
    fs.link(f, ROOT, b"hard").unwrap();
    assert_eq!(fs.getattr(f).unwrap().inode.nlink, 2);
    assert_eq!(fs.getattr(ROOT).unwrap().inode.nlink, 3);
    assert_eq!(fs.remove(ROOT, b"d", true).unwrap_err().errno(), libc::ENOTEMPTY);
    fs.rename(d, b"f", ROOT, b"moved", 0).unwrap();
    assert_eq!(fs.lookup(ROOT, b"moved").unwrap().ino, f);
    assert_eq!(fs.rename(ROOT, b"moved", ROOT, b"hard", libc::RENAME_NOREPLACE).unwrap_err().errno(), libc::EEXIST);
    let s = fs.create(ROOT, b"s", libc::S_IFLNK | 0o777, 0, WHO, Some(b"/target/path")).unwrap().ino;
    assert_eq!(fs.readlink(s).unwrap(), b"/target/path");
    fs.rename(ROOT, b"s", ROOT, b"d", libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs.lookup(ROOT, b"d").unwrap().ino, s);
    assert_eq!(fs.lookup(ROOT, b"s").unwrap().ino, d);
    // A directory cannot move under itself.
    let sub = fs.create(d, b"sub", libc::S_IFDIR | 0o755, 0, WHO, None).unwrap().ino;
    assert_eq!(fs.rename(ROOT, b"s", sub, b"x", 0).unwrap_err().errno(), libc::EINVAL);
    fs.remove(d, b"sub", true).unwrap();
    fs.remove(ROOT, b"s", true).unwrap();
    fs.remove(ROOT, b"hard", false).unwrap();
    assert_eq!(fs.getattr(f).unwrap().inode.nlink, 1);
    let mut names: Vec<Vec<u8>> = fs.readdir(ROOT, 0, 100).unwrap().into_iter().map(|e| e.name).collect();
    names.sort();
    assert_eq!(names, vec![b".".to_vec(), b"..".to_vec(), b"d".to_vec(), b"moved".to_vec()]);
    let (fs2, report) = reopen(&fs);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(fs2.getattr(ROOT).unwrap().inode.nlink, 2);
    assert_eq!(fs2.readlink(fs2.lookup(ROOT, b"d").unwrap().ino).unwrap(), b"/target/path");
}

#[test]
fn xattrs() {
    let fs = fresh(8 << 20);
    let f = file(&fs, "x");
    fs.setxattr(f, b"user.a", b"1", 0).unwrap();
    fs.setxattr(f, b"user.b", &[7u8; 5000], 0).unwrap();
    assert_eq!(fs.setxattr(f, b"user.a", b"2", libc::XATTR_CREATE).unwrap_err().errno(), libc::EEXIST);
    assert_eq!(fs.setxattr(f, b"user.c", b"2", libc::XATTR_REPLACE).unwrap_err().errno(), libc::ENODATA);
    assert_eq!(fs.getxattr(f, b"user.b").unwrap(), vec![7u8; 5000]);
    assert_eq!(fs.listxattr(f).unwrap(), b"user.a\0user.b\0");
    fs.removexattr(f, b"user.a").unwrap();
    assert_eq!(fs.getxattr(f, b"user.a").unwrap_err().errno(), libc::ENODATA);
}

#[test]
fn full_file_system_fails_cleanly_and_can_be_emptied() {
    let fs = fresh(2 << 20);
    let f = file(&fs, "big");
    let chunk = vec![0x5a; 64 << 10];
    let mut off = 0;
    let err = loop {
        match fs.write_file(f, off, &chunk) {
            Ok(_) => off += chunk.len() as u64,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, Error::NoSpace), "{err}");
    // The failed write left nothing behind: size is what was acknowledged.
    assert_eq!(fs.getattr(f).unwrap().inode.size, off);
    assert!(fs.usage().available_blocks < 32);
    // Deleting works on a full file system (reserve blocks), and the space comes back.
    fs.remove(ROOT, b"big", false).unwrap();
    for i in 0..3 {
        file(&fs, &format!("after{i}"));
    }
    let g = file(&fs, "again");
    fs.write_file(g, 0, &chunk).unwrap();
}

#[test]
fn space_freed_by_a_removal_is_usable_at_once() {
    // Freed blocks wait two generations before reuse (crash safety); neither statfs nor the next
    // big write may see the file system as full because of that.
    let fs = fresh(8 << 20);
    let chunk = vec![0x33; 64 << 10];
    let fill = |name: &str| {
        let f = file(&fs, name);
        let mut off = 0;
        while fs.write_file(f, off, &chunk).is_ok() {
            off += chunk.len() as u64;
        }
        off
    };
    let first = fill("one");
    let before = fs.usage().available_blocks;
    fs.remove(ROOT, b"one", false).unwrap();
    let after = fs.usage().available_blocks;
    assert!(after >= before + first / 4096, "statfs right after rm: {before} -> {after} blocks available, {first} bytes freed");
    // Remove and immediately refill, with statfs never called in between.
    let second = fill("two");
    assert!(second >= first - (256 << 10), "refilled {second} of {first} bytes");
    fs.remove(ROOT, b"two", false).unwrap();
    let third = fill("three");
    assert!(third >= first - (256 << 10), "refilled {third} of {first} bytes");
}

#[test]
fn orphans_are_freed_on_next_mount() {
    let fs = fresh(8 << 20);
    let f = file(&fs, "o");
    fs.remember(f);
    fs.write_file(f, 0, &[3; 10000]).unwrap();
    fs.remove(ROOT, b"o", false).unwrap();
    // Still readable while the kernel holds it.
    assert_eq!(fs.read_file(f, 0, 10).unwrap(), vec![3; 10]);
    let (fs2, report) = reopen(&fs);
    assert_eq!(report.orphans, vec![f]);
    assert!(fs2.getattr(f).is_err());
    let (_, report3) = reopen(&fs2);
    assert!(report3.orphans.is_empty());
}

#[test]
fn cold_region_is_refused_and_untouched() {
    let r = Region::memfd(4 << 20, false).unwrap();
    let before = r.snapshot();
    let err = Fs::open(r, &OpenOptions::default()).err().expect("must refuse");
    assert!(matches!(err, Error::NoFilesystem { .. }));
    assert!(err.to_string().contains("holds no rpramfs"), "{err}");
    assert!(before.iter().all(|&b| b == 0));
}

#[test]
fn many_files_in_one_directory() {
    let fs = fresh(64 << 20);
    for i in 0..2000 {
        file(&fs, &format!("f{i:05}"));
    }
    let mut seen = 0;
    let mut off = 0;
    loop {
        let ents = fs.readdir(ROOT, off, 128).unwrap();
        if ents.is_empty() {
            break;
        }
        off = ents.last().unwrap().next;
        seen += ents.iter().filter(|e| e.name.starts_with(b"f")).count();
    }
    assert_eq!(seen, 2000);
    let (fs2, report) = reopen(&fs);
    assert!(report.errors.is_empty());
    assert_eq!(report.inodes, 2001);
    assert!(fs2.lookup(ROOT, b"f01999").is_ok());
}

#[test]
fn crc_hints_are_kept_checked_on_arrival_and_never_turn_into_wrong_bytes() {
    use rpramfs::fs::crc_hint::{encode, HINT_XATTR};
    let fs = fresh(16 << 20);
    let f = file(&fs, "pages");
    let pages: Vec<u8> = (0..4 * 4096u32).map(|i| (i * 13 % 251) as u8).collect();
    let crcs: Vec<u32> = pages.chunks(4096).map(crc32fast::hash).collect();
    // The capability probe; nothing is stored or listed.
    assert_eq!(fs.getxattr(f, HINT_XATTR).unwrap(), b"1");
    fs.setxattr(f, HINT_XATTR, &encode(8192, &crcs), 0).unwrap();
    assert!(fs.listxattr(f).unwrap().is_empty());
    fs.write_file(f, 8192, &pages).unwrap();
    let (fs2, report) = reopen(&fs);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(fs2.read_file(f, 8192, pages.len() as u32).unwrap(), pages);

    // A hint that belongs to other data: the write is refused and the old bytes stay.
    let other: Vec<u8> = pages.iter().map(|b| b ^ 0xff).collect();
    fs.setxattr(f, HINT_XATTR, &encode(8192, &crcs), 0).unwrap();
    assert_eq!(fs.write_file(f, 8192, &other).unwrap_err().errno(), libc::EIO);
    assert_eq!(fs.read_file(f, 8192, pages.len() as u32).unwrap(), pages);
    // The refusal dropped the hint: the same write now goes through with computed CRCs.
    fs.write_file(f, 8192, &other).unwrap();
    assert_eq!(fs.read_file(f, 8192, other.len() as u32).unwrap(), other);

    // A hint that is right for the first block only (checked) and wrong for the second (trusted):
    // that block fails to read; its bytes are never returned.
    let mut lying = crcs.clone();
    lying[1] ^= 1;
    fs.setxattr(f, HINT_XATTR, &encode(8192, &lying), 0).unwrap();
    fs.write_file(f, 8192, &pages).unwrap();
    assert_eq!(fs.read_file(f, 8192, 4096).unwrap(), pages[..4096]);
    assert!(fs.read_file(f, 8192 + 4096, 4096).is_err());

    // Malformed hints are refused with EINVAL.
    assert_eq!(fs.setxattr(f, HINT_XATTR, &encode(100, &crcs), 0).unwrap_err().errno(), libc::EINVAL);
}

/// Fills leased blocks as a direct writer does (through the region, not through the daemon).
fn fill_lease(fs: &Fs, answer: &rpramfs::fs::lease::LeaseArg, data: &[u8]) {
    for (b, page) in answer.blocks().unwrap().zip(data.chunks(4096)) {
        fs.region().write(rpramfs::layout::BlockNo(b).offset(), page).unwrap();
    }
}

#[test]
fn direct_writes_commit_leased_blocks_and_never_leak_or_lie() {
    use rpramfs::fs::lease::{CommitRequest, LeaseRequest, MAX_LEASE_BLOCKS, MAX_LEASES_PER_HANDLE};
    let fs = fresh(16 << 20);
    let f = file(&fs, "space.foam");
    let free0 = fs.usage().free_blocks;
    let pages: Vec<u8> = (0..8 * 4096u32).map(|i| (i * 29 % 253) as u8).collect();
    let crcs: Vec<u32> = pages.chunks(4096).map(crc32fast::hash).collect();
    assert!(fs.direct_info().is_ok());
    let commit = |id: u64, off: u64, crcs: &[u32]| CommitRequest { id, extents: vec![(off, crcs.len())], crcs: crcs.to_vec() };

    // Lease 8 blocks, fill 6, commit 6: those read back (also after a crash), the other 2 are free again.
    let off = 0x7f00_0000_0000u64;
    let ans = fs.lease(7, f, &LeaseRequest { n: 8 }).unwrap();
    assert_eq!(fs.usage().free_blocks, free0 - 8);
    fill_lease(&fs, &ans, &pages);
    fs.commit_lease(7, f, &commit(ans.id.get(), off, &crcs[..6])).unwrap();
    assert_eq!(fs.read_file(f, off, 6 * 4096).unwrap(), pages[..6 * 4096]);
    assert_eq!(fs.getattr(f).unwrap().inode.size, off + 6 * 4096);
    assert_eq!(fs.getattr(f).unwrap().inode.blocks, 6);
    let (fs2, report) = reopen(&fs);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(fs2.read_file(f, off, 6 * 4096).unwrap(), pages[..6 * 4096]);
    let free1 = fs.usage().free_blocks;

    // Overwriting committed pages: the new bytes, and the old blocks are freed (two generations on).
    let other: Vec<u8> = pages.iter().map(|b| b ^ 0x5a).collect();
    let ans = fs.lease(7, f, &LeaseRequest { n: 2 }).unwrap();
    fill_lease(&fs, &ans, &other);
    let ocrcs: Vec<u32> = other.chunks(4096).map(crc32fast::hash).collect();
    fs.commit_lease(7, f, &commit(ans.id.get(), off, &ocrcs[..2])).unwrap();
    assert_eq!(fs.read_file(f, off, 4096 * 3).unwrap(), [&other[..8192], &pages[8192..12288]].concat());

    // Scattered pages from one lease in one commit: leased blocks 0..7 become pages 10, 12, 13,
    // 511, 512, 513 (across two leaves) and 262149 (under another node two levels up) of another
    // file, holes stay holes; the same after a remount.
    let g = file(&fs, "scattered.foam");
    let ans = fs.lease(7, g, &LeaseRequest { n: 8 }).unwrap();
    fill_lease(&fs, &ans, &pages);
    let extents = vec![(10 * 4096, 1), (12 * 4096, 2), (511 * 4096, 3), (262_149 * 4096, 1)];
    fs.commit_lease(7, g, &CommitRequest { id: ans.id.get(), extents, crcs: crcs[..7].to_vec() }).unwrap();
    let page = |i: usize| &pages[i * 4096..(i + 1) * 4096];
    let zero = [0u8; 4096];
    let want: [(u64, &[u8]); 10] =
        [(10, page(0)), (12, page(1)), (13, page(2)), (511, page(3)), (512, page(4)), (513, page(5)), (262_149, page(6)), (11, &zero), (14, &zero), (514, &zero)];
    for (at, bytes) in want {
        assert_eq!(fs.read_file(g, at * 4096, 4096).unwrap(), bytes, "page {at}");
    }
    assert_eq!((fs.getattr(g).unwrap().inode.size, fs.getattr(g).unwrap().inode.blocks), (262_150 * 4096, 7));
    let (fs2, report) = reopen(&fs);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    for (at, bytes) in want {
        assert_eq!(fs2.read_file(g, at * 4096, 4096).unwrap(), bytes, "page {at} after a remount");
    }

    // A commit whose first CRC does not match its data: EIO, the file keeps its bytes, the lease is freed.
    let ans = fs.lease(7, f, &LeaseRequest { n: 2 }).unwrap();
    fill_lease(&fs, &ans, &pages);
    assert_eq!(fs.commit_lease(7, f, &commit(ans.id.get(), off, &ocrcs[..2])).unwrap_err().errno(), libc::EIO);
    assert_eq!(fs.read_file(f, off, 8192).unwrap(), other[..8192]);
    // A CRC right for the first block (checked) and wrong for the second (vouched): that block
    // fails to read and its bytes are never returned.
    let ans = fs.lease(7, f, &LeaseRequest { n: 2 }).unwrap();
    fill_lease(&fs, &ans, &pages);
    fs.commit_lease(7, f, &commit(ans.id.get(), off, &[crcs[0], crcs[1] ^ 1])).unwrap();
    assert_eq!(fs.read_file(f, off, 4096).unwrap(), pages[..4096]);
    assert!(fs.read_file(f, off + 4096, 4096).is_err());

    // Bad requests.
    let errno = |r: rpramfs::error::Result<rpramfs::fs::lease::LeaseArg>| r.unwrap_err().errno();
    assert_eq!(errno(fs.lease(7, f, &LeaseRequest { n: 0 })), libc::EINVAL);
    assert_eq!(errno(fs.lease(7, f, &LeaseRequest { n: MAX_LEASE_BLOCKS + 1 })), libc::EINVAL);
    assert_eq!(errno(fs.lease(7, ROOT, &LeaseRequest { n: 1 })), libc::EINVAL);
    assert_eq!(fs.commit_lease(7, f, &commit(12345, 0, &[1])).unwrap_err().errno(), libc::ENOENT);
    // Extents that do not fit the lease, are unaligned, overlap, go backwards, are empty, reach
    // past the largest file, or are not one CRC a page: refused, and each consumed its lease.
    let two = vec![1, 2];
    // (blocks leased, extents, CRCs, errno)
    let bad: [(usize, Vec<(u64, usize)>, Vec<u32>, i32); 8] = [
        (1, vec![(0, 2)], two.clone(), libc::EINVAL),
        (3, vec![(100, 1)], vec![1], libc::EINVAL),
        (3, vec![(0, 2), (4096, 1)], vec![1, 2, 3], libc::EINVAL),
        (3, vec![(8192, 1), (0, 1)], two.clone(), libc::EINVAL),
        (3, vec![(0, 0)], vec![], libc::EINVAL),
        (3, vec![(1 << 48, 1)], vec![1], libc::EFBIG),
        (3, vec![(0, 1)], two.clone(), libc::EINVAL),
        (3, vec![], vec![], libc::EINVAL),
    ];
    for (n, extents, crcs, want) in bad {
        let ans = fs.lease(7, f, &LeaseRequest { n }).unwrap();
        let id = ans.id.get();
        let what = format!("{extents:?} {crcs:?}");
        assert_eq!(fs.commit_lease(7, f, &CommitRequest { id, extents, crcs }).unwrap_err().errno(), want, "{what}");
        // That commit consumed its lease.
        assert_eq!(fs.commit_lease(7, f, &commit(id, 0, &[1])).unwrap_err().errno(), libc::ENOENT, "{what}");
    }
    // A lease is its file's: committing it on another file finds nothing.
    let ans = fs.lease(7, f, &LeaseRequest { n: 1 }).unwrap();
    assert_eq!(fs.commit_lease(7, g, &commit(ans.id.get(), 0, &[1])).unwrap_err().errno(), libc::ENOENT);
    fs.release_handle(7);
    for _ in 0..MAX_LEASES_PER_HANDLE {
        fs.lease(9, f, &LeaseRequest { n: 1 }).unwrap();
    }
    assert_eq!(errno(fs.lease(9, f, &LeaseRequest { n: 1 })), libc::EBUSY);

    // Closing the handle frees what it never committed; so does a crash (the mount walk).
    fs.release_handle(9);
    let free2 = fs.usage().free_blocks + fs.usage().pending_blocks;
    fs.lease(11, f, &LeaseRequest { n: 200 }).unwrap();
    let (fs3, report) = reopen(&fs);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(fs3.usage().free_blocks + fs3.usage().pending_blocks, free2);
    fs.release_handle(11);
    assert_eq!(fs.usage().free_blocks + fs.usage().pending_blocks, free2);
    assert!(free1 < free0);
}

#[test]
fn regions_that_log_their_stores_hand_out_no_mapping_but_lease() {
    use rpramfs::fs::lease::{CommitRequest, LeaseRequest};
    use rpramfs::region::Store;
    let r = Region::memfd(8 << 20, true).unwrap();
    Fs::mkfs(&r, &MkfsOptions::default()).unwrap();
    let fs = Fs::open(r, &OpenOptions::default()).unwrap().0;
    // No writer gets a mapping whose stores would bypass the log ...
    assert_eq!(fs.direct_info().unwrap_err().errno(), libc::ENOTTY);
    // ... but leases and commits work, and fills through the region are logged.
    let f = file(&fs, "x");
    let ans = fs.lease(1, f, &LeaseRequest { n: 1 }).unwrap();
    fs.region().take_store_log();
    let page = vec![0x5au8; 4096];
    fill_lease(&fs, &ans, &page);
    let log = fs.region().take_store_log();
    assert!(matches!(&log[..], [Store::Write { bytes, .. }] if *bytes == page), "{} stores logged", log.len());
    fs.commit_lease(1, f, &CommitRequest { id: ans.id.get(), extents: vec![(0, 1)], crcs: vec![crc32fast::hash(&page)] }).unwrap();
    assert_eq!(fs.read_file(f, 0, 4096).unwrap(), page);
}
