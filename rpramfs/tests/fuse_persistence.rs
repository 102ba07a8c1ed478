//! Data written through the kernel FUSE mount comes back after unmount and remount: shared
//! writable mmap, a 1 GiB file, 10,000 files.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;

use common::{pattern, Mounted};

#[test]
fn shared_writable_mmap_survives_remount() {
    let mut m = Mounted::new(64 << 20);
    let len = 3 * 4096 + 100;
    let f = OpenOptions::new().create(true).read(true).write(true).open(m.path("mapped")).unwrap();
    f.set_len(len as u64).unwrap();
    let want = pattern(42, len);
    // SAFETY: a fresh shared mapping of an open file of `len` bytes; unmapped below.
    unsafe {
        let p = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, f.as_raw_fd(), 0);
        assert_ne!(p, libc::MAP_FAILED);
        std::ptr::copy_nonoverlapping(want.as_ptr(), p.cast::<u8>(), len);
        assert_eq!(libc::msync(p, len, libc::MS_SYNC), 0);
        assert_eq!(libc::munmap(p, len), 0);
    }
    drop(f);
    m.unmount();
    m.mount();
    let mut back = Vec::new();
    File::open(m.path("mapped")).unwrap().read_to_end(&mut back).unwrap();
    assert_eq!(back.len(), len);
    assert!(back == want, "mmap'ed bytes differ after remount");
}

#[test]
fn one_gib_file() {
    let mut m = Mounted::new(1200 << 20);
    let chunk = pattern(7, 1 << 20);
    let mut f = File::create(m.path("big")).unwrap();
    let mut crc = crc32fast::Hasher::new();
    for i in 0..1024u32 {
        let mut c = chunk.clone();
        c[..4].copy_from_slice(&i.to_le_bytes());
        f.write_all(&c).unwrap();
        crc.update(&c);
    }
    f.sync_all().unwrap();
    drop(f);
    let want = crc.finalize();
    m.unmount();
    m.mount();
    let md = fs::metadata(m.path("big")).unwrap();
    assert_eq!(md.len(), 1 << 30);
    let mut f = File::open(m.path("big")).unwrap();
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        crc.update(&buf[..n]);
        total += n;
    }
    assert_eq!(total, 1 << 30);
    assert_eq!(crc.finalize(), want);
}

#[test]
fn ten_thousand_files() {
    let mut m = Mounted::new(256 << 20);
    fs::create_dir(m.path("many")).unwrap();
    for i in 0..10_000 {
        fs::write(m.path(&format!("many/file-{i:05}")), format!("content of file {i}\n")).unwrap();
    }
    m.unmount();
    m.mount();
    let mut n = 0;
    for e in fs::read_dir(m.path("many")).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        let i: u32 = name.strip_prefix("file-").unwrap().parse().unwrap();
        assert_eq!(fs::read_to_string(e.path()).unwrap(), format!("content of file {i}\n"));
        n += 1;
    }
    assert_eq!(n, 10_000);
    for i in (0..10_000).step_by(2) {
        fs::remove_file(m.path(&format!("many/file-{i:05}"))).unwrap();
    }
    assert_eq!(fs::read_dir(m.path("many")).unwrap().count(), 5_000);
}
