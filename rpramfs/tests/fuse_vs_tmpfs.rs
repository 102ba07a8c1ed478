//! The same operations through the real kernel FUSE on rpramfs and on tmpfs must give the same
//! results: contents, sizes, block counts, link counts, errors, SEEK_DATA/SEEK_HOLE answers.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use common::{cstr, pattern, Mounted, Tmpfs};

struct Log(Vec<String>);

impl Log {
    fn rec<T: std::fmt::Debug>(&mut self, what: &str, r: std::io::Result<T>) {
        let line = match r {
            Ok(v) => format!("{what} -> ok {v:?}"),
            Err(e) => format!("{what} -> err {}", e.raw_os_error().map(errname).unwrap_or_else(|| e.to_string())),
        };
        self.0.push(line);
    }
}

fn errname(e: i32) -> String {
    format!("{} ({e})", std::io::Error::from_raw_os_error(e))
}

fn cvt(r: i64) -> std::io::Result<i64> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn seek(f: &File, off: i64, whence: i32) -> std::io::Result<i64> {
    // SAFETY: plain syscall on an open fd.
    cvt(unsafe { libc::lseek(f.as_raw_fd(), off, whence) })
}

fn fallocate(f: &File, mode: i32, off: i64, len: i64) -> std::io::Result<i64> {
    // SAFETY: plain syscall on an open fd.
    cvt(unsafe { libc::fallocate(f.as_raw_fd(), mode, off, len) } as i64)
}

fn rename2(a: &Path, b: &Path, flags: u32) -> std::io::Result<i64> {
    let (a, b) = (cstr(a), cstr(b));
    // SAFETY: valid NUL-terminated paths.
    cvt(unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), flags) } as i64)
}

fn mknod(p: &Path, mode: u32, dev: u64) -> std::io::Result<i64> {
    let c = cstr(p);
    // SAFETY: valid path.
    cvt(unsafe { libc::mknod(c.as_ptr(), mode, dev) } as i64)
}

fn setxattr(p: &Path, name: &str, v: &[u8], flags: i32) -> std::io::Result<i64> {
    let (c, n) = (cstr(p), std::ffi::CString::new(name).unwrap());
    // SAFETY: valid path, name and value buffer.
    cvt(unsafe { libc::setxattr(c.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), flags) } as i64)
}

fn getxattr(p: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    let (c, n) = (cstr(p), std::ffi::CString::new(name).unwrap());
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid path, name; buffer of the stated length.
    let r = cvt(unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) } as i64)?;
    buf.truncate(r as usize);
    Ok(buf)
}

fn listxattr(p: &Path) -> std::io::Result<Vec<String>> {
    let c = cstr(p);
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid path; buffer of the stated length.
    let r = cvt(unsafe { libc::listxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) } as i64)?;
    let mut v: Vec<String> = buf[..r as usize].split(|&b| b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into()).collect();
    v.retain(|n| n.starts_with("user."));
    v.sort();
    Ok(v)
}

fn removexattr(p: &Path, name: &str) -> std::io::Result<i64> {
    let (c, n) = (cstr(p), std::ffi::CString::new(name).unwrap());
    // SAFETY: valid path and name.
    cvt(unsafe { libc::removexattr(c.as_ptr(), n.as_ptr()) } as i64)
}

fn stat_line(p: &Path) -> std::io::Result<String> {
    let m = fs::symlink_metadata(p)?;
    let blocks = if m.file_type().is_file() { m.blocks() } else { 0 };
    Ok(format!("mode={:o} nlink={} uid={} gid={} size={} blocks={blocks} rdev={}", m.mode(), m.nlink(), m.uid(), m.gid(), if m.is_dir() { 0 } else { m.size() }, m.rdev()))
}

fn read_all(p: &Path) -> std::io::Result<String> {
    let mut v = Vec::new();
    File::open(p)?.read_to_end(&mut v)?;
    Ok(format!("{} bytes crc {:08x}", v.len(), crc32fast::hash(&v)))
}

fn names(p: &Path) -> std::io::Result<Vec<String>> {
    let mut v: Vec<String> = fs::read_dir(p)?.map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned())).collect::<Result<_, _>>()?;
    v.sort();
    Ok(v)
}

/// The operation script; every result goes into the log.
fn script(root: &Path) -> Vec<String> {
    let mut l = Log(Vec::new());
    let p = |n: &str| root.join(n);

    // Plain files, overwrite, holes, truncate.
    let f1 = OpenOptions::new().create(true).read(true).write(true).open(p("f1")).unwrap();
    l.rec("pwrite f1@0", f1.write_at(&pattern(1, 10_000), 0));
    l.rec("pwrite f1@5000", f1.write_at(&pattern(2, 300), 5000));
    l.rec("pwrite f1@70000", f1.write_at(&pattern(3, 5), 70_000));
    l.rec("stat f1", stat_line(&p("f1")));
    l.rec("read f1", read_all(&p("f1")));
    l.rec("truncate f1 5001", f1.set_len(5001));
    l.rec("truncate f1 9000", f1.set_len(9000));
    l.rec("read f1", read_all(&p("f1")));
    l.rec("stat f1", stat_line(&p("f1")));
    l.rec("seek_data f1 0", seek(&f1, 0, libc::SEEK_DATA));
    l.rec("seek_hole f1 0", seek(&f1, 0, libc::SEEK_HOLE));
    l.rec("seek_data f1 9000", seek(&f1, 9000, libc::SEEK_DATA));

    // A sparse file with data near the top of the x86-64 user address space.
    let top = 0x7fff_ffff_0000i64;
    let sp = OpenOptions::new().create(true).read(true).write(true).open(p("sparse")).unwrap();
    l.rec("pwrite sparse@top", sp.write_at(&pattern(4, 12_345), top as u64));
    l.rec("pwrite sparse@1M", sp.write_at(&pattern(5, 4096), 1 << 20));
    l.rec("stat sparse", stat_line(&p("sparse")));
    for (w, off) in [(libc::SEEK_DATA, 0), (libc::SEEK_HOLE, 0), (libc::SEEK_DATA, (1 << 20) + 4096), (libc::SEEK_HOLE, 1 << 20), (libc::SEEK_DATA, top + 100), (libc::SEEK_HOLE, top), (libc::SEEK_DATA, top + 12_345)] {
        l.rec(&format!("seek {w} sparse {off}"), seek(&sp, off, w));
    }
    let mut buf = vec![0u8; 12_345];
    l.rec("pread sparse@top", sp.read_exact_at(&mut buf, top as u64).map(|_| crc32fast::hash(&buf)));
    l.rec("pread sparse@2M", { let mut b = [1u8; 100]; sp.read_exact_at(&mut b, 2 << 20).map(|_| b.iter().all(|&x| x == 0)) });

    // Punch holes.
    let ph = OpenOptions::new().create(true).read(true).write(true).open(p("punch")).unwrap();
    l.rec("pwrite punch", ph.write_at(&pattern(6, 64 << 10), 0));
    l.rec("punch 4196+12288", fallocate(&ph, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 4096 + 100, 3 * 4096));
    l.rec("punch unaligned tail", fallocate(&ph, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 60_000, 100_000));
    l.rec("punch without keep", fallocate(&ph, libc::FALLOC_FL_PUNCH_HOLE, 0, 4096));
    l.rec("read punch", read_all(&p("punch")));
    l.rec("stat punch", stat_line(&p("punch")));
    l.rec("seek_hole punch 0", seek(&ph, 0, libc::SEEK_HOLE));
    l.rec("seek_data punch 8192", seek(&ph, 8192, libc::SEEK_DATA));
    l.rec("seek_hole punch 20000", seek(&ph, 20000, libc::SEEK_HOLE));

    // fallocate.
    let fa = OpenOptions::new().create(true).read(true).write(true).open(p("falloc")).unwrap();
    l.rec("fallocate 0..20000", fallocate(&fa, 0, 0, 20_000));
    l.rec("stat falloc", stat_line(&p("falloc")));
    l.rec("fallocate keep 40000+8192", fallocate(&fa, libc::FALLOC_FL_KEEP_SIZE, 40_000, 8192));
    l.rec("stat falloc", stat_line(&p("falloc")));
    l.rec("read falloc", read_all(&p("falloc")));

    // Errors on names.
    l.rec("create excl existing", OpenOptions::new().write(true).create_new(true).open(p("f1")).map(|_| ()));
    l.rec("open missing", File::open(p("missing")).map(|_| ()));
    l.rec("long name", File::create(p(&"n".repeat(256))).map(|_| ()));
    l.rec("255 name", File::create(p(&"n".repeat(255))).map(|_| ()));

    // Directories.
    l.rec("mkdir d", fs::create_dir(p("d")));
    l.rec("mkdir d again", fs::create_dir(p("d")));
    l.rec("create d/x", File::create(p("d/x")).map(|_| ()));
    l.rec("mkdir d/sub", fs::create_dir(p("d/sub")));
    l.rec("rmdir d", fs::remove_dir(p("d")));
    l.rec("unlink d", fs::remove_file(p("d")));
    l.rec("rmdir d/x", fs::remove_dir(p("d/x")));
    l.rec("stat d", stat_line(&p("d")));
    l.rec("stat root", stat_line(root));
    l.rec("create under file", File::create(p("f1/x")).map(|_| ()));

    // Links.
    l.rec("link f1 d/f1link", fs::hard_link(p("f1"), p("d/f1link")));
    l.rec("stat f1", stat_line(&p("f1")));
    l.rec("link dir", fs::hard_link(p("d"), p("dlink")));
    l.rec("link onto existing", fs::hard_link(p("f1"), p("punch")));
    l.rec("symlink s", std::os::unix::fs::symlink("f1", p("s")));
    l.rec("readlink s", fs::read_link(p("s")));
    l.rec("lstat s", fs::symlink_metadata(p("s")).map(|m| (m.file_type().is_symlink(), m.len())));
    l.rec("stat through s", stat_line(&fs::canonicalize(p("s")).unwrap()));
    l.rec("long symlink", std::os::unix::fs::symlink("x".repeat(4000), p("longlink")).and_then(|_| fs::read_link(p("longlink")).map(|t| t.as_os_str().len())));

    // Special files.
    l.rec("mkfifo", mknod(&p("fifo"), libc::S_IFIFO | 0o640, 0));
    l.rec("mksock", mknod(&p("sock"), libc::S_IFSOCK | 0o600, 0));
    l.rec("mkchr", mknod(&p("null"), libc::S_IFCHR | 0o666, libc::makedev(1, 3)));
    l.rec("mkblk", mknod(&p("blk"), libc::S_IFBLK | 0o600, libc::makedev(7, 0)));
    for n in ["fifo", "sock", "null", "blk"] {
        l.rec(&format!("stat {n}"), stat_line(&p(n)));
    }

    // Ownership, permissions, times.
    l.rec("chmod f1", fs::set_permissions(p("f1"), fs::Permissions::from_mode(0o4711)));
    l.rec("chown f1", std::os::unix::fs::chown(p("f1"), Some(1000), Some(1001)));
    let times = [libc::timespec { tv_sec: 1_000_000, tv_nsec: 5 }, libc::timespec { tv_sec: 2_000_000, tv_nsec: 7 }];
    let c = cstr(&p("f1"));
    // SAFETY: valid path and a two-element timespec array.
    l.rec("utimens f1", cvt(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) } as i64));
    l.rec("stat f1", stat_line(&p("f1")));
    l.rec("times f1", fs::metadata(p("f1")).map(|m| (m.atime(), m.atime_nsec(), m.mtime(), m.mtime_nsec())));

    // Renames.
    l.rec("rename f1 f2", fs::rename(p("f1"), p("f2")));
    l.rec("rename punch over f2", fs::rename(p("punch"), p("f2")));
    l.rec("stat f2", stat_line(&p("f2")));
    l.rec("stat d/f1link", stat_line(&p("d/f1link")));
    l.rec("mkdir e", fs::create_dir(p("e")));
    l.rec("mkdir e2", fs::create_dir(p("e2")));
    l.rec("rename e over e2", fs::rename(p("e"), p("e2")));
    l.rec("rename e2 over d (nonempty)", fs::rename(p("e2"), p("d")));
    l.rec("rename f2 over d", fs::rename(p("f2"), p("d")));
    l.rec("rename e2 over f2", fs::rename(p("e2"), p("f2")));
    l.rec("noreplace", rename2(&p("f2"), &p("sparse"), libc::RENAME_NOREPLACE));
    l.rec("noreplace ok", rename2(&p("f2"), &p("f3"), libc::RENAME_NOREPLACE));
    l.rec("exchange f3 d", rename2(&p("f3"), &p("d"), libc::RENAME_EXCHANGE));
    l.rec("stat d", stat_line(&p("d")));
    l.rec("stat f3", stat_line(&p("f3")));
    l.rec("exchange missing", rename2(&p("f3"), &p("nothing"), libc::RENAME_EXCHANGE));
    l.rec("rename into own subtree", fs::rename(p("f3"), p("f3/sub/x")));
    l.rec("rename missing", fs::rename(p("nothing"), p("x")));
    l.rec("stat root", stat_line(root));
    l.rec("stat f3", stat_line(&p("f3")));

    // Extended attributes.
    l.rec("setxattr a", setxattr(&p("d"), "user.a", b"alpha", 0));
    l.rec("setxattr b", setxattr(&p("d"), "user.b", &pattern(7, 3000), 0));
    l.rec("setxattr create existing", setxattr(&p("d"), "user.a", b"x", libc::XATTR_CREATE));
    l.rec("setxattr replace missing", setxattr(&p("d"), "user.c", b"x", libc::XATTR_REPLACE));
    l.rec("setxattr replace", setxattr(&p("d"), "user.a", b"beta", libc::XATTR_REPLACE));
    l.rec("getxattr a", getxattr(&p("d"), "user.a"));
    l.rec("getxattr b", getxattr(&p("d"), "user.b").map(|v| crc32fast::hash(&v)));
    l.rec("listxattr", listxattr(&p("d")));
    l.rec("removexattr a", removexattr(&p("d"), "user.a"));
    l.rec("getxattr removed", getxattr(&p("d"), "user.a"));
    l.rec("removexattr missing", removexattr(&p("d"), "user.zz"));

    // copy_file_range.
    let src = File::open(p("d")).unwrap();
    let dst = OpenOptions::new().create(true).write(true).open(p("copy")).unwrap();
    let (mut off_in, mut off_out) = (10i64, 100i64);
    // SAFETY: valid fds and offset pointers.
    let r = cvt(unsafe { libc::copy_file_range(src.as_raw_fd(), &mut off_in, dst.as_raw_fd(), &mut off_out, 3000, 0) } as i64);
    l.rec("copy_file_range", r);
    l.rec("read copy", read_all(&p("copy")));

    // An unlinked file stays readable through an open descriptor.
    let mut held = OpenOptions::new().create(true).read(true).write(true).open(p("held")).unwrap();
    l.rec("write held", held.write_at(b"still here", 0));
    l.rec("unlink held", fs::remove_file(p("held")));
    l.rec("fstat held", held.metadata().map(|m| (m.nlink(), m.len())));
    let mut s = String::new();
    held.seek(SeekFrom::Start(0)).unwrap();
    l.rec("read held", held.read_to_string(&mut s).map(|_| s.clone()));

    l.rec("ls root", names(root));
    l.rec("ls d", names(&p("d")));
    l.rec("open dir for write", OpenOptions::new().write(true).open(p("d")).map(|_| ()));
    l.rec("rmdir root entry file", fs::remove_dir(p("sparse")));
    let _ = OpenOptions::new().custom_flags(0);
    l.0
}

#[test]
fn same_results_as_tmpfs() {
    let tmp = Tmpfs::new();
    let rp = Mounted::new(256 << 20);
    let expect = script(tmp.path());
    let got = script(&rp.mp);
    for (i, (e, g)) in expect.iter().zip(got.iter()).enumerate() {
        assert_eq!(g, e, "step {i} differs (left: rpramfs, right: tmpfs)");
    }
    assert_eq!(got.len(), expect.len());
    assert!(got.len() > 100, "the script ran only {} steps", got.len());
}
