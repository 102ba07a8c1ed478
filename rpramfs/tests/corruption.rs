//! 1,000 random bit flips in metadata, data, superblock and commit ring: fsck reports each (naming
//! the block), reads of damaged ranges fail with EIO, no read returns wrong bytes without an error,
//! and nothing panics.

mod common;

use common::{populated_image, read_back_failures};
use rpramfs::fs::{Fs, OpenOptions};
use rpramfs::layout::{COMMIT_RECORD_SIZE, RING_A, RING_B};
use rpramfs::region::Region;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn thousand_bit_flips() {
    let (image, expected) = populated_image();
    let (fs, report) = Fs::open(Region::memfd_from(&image).unwrap(), &OpenOptions { read_only: true, what: String::new() }).unwrap();
    let used = fs.referenced_blocks();
    let gen = report.generation;
    drop(fs);
    assert!(used.len() > 50, "the image should reference many blocks ({})", used.len());
    let trials = std::env::var("RPRAMFS_FLIP_TRIALS").ok().and_then(|s| s.parse().ok()).unwrap_or(1000u64);
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let (mut pool, mut eio_reads, mut detected, mut data_flips) = (0, 0, 0, 0);
    for t in 0..trials {
        let mut img = image.clone();
        let kind = rng.below(10);
        let (byte, target) = if kind < 8 {
            let b = used[rng.below(used.len() as u64) as usize];
            pool += 1;
            (b as u64 * 4096 + rng.below(4096), Some(b))
        } else if kind == 8 {
            (rng.below(124), None) // superblock A: everything its CRC covers, and the CRC
        } else {
            let ring = if rng.below(2) == 0 { RING_A } else { RING_B };
            let slot = gen % 32;
            (ring.0 as u64 * 4096 + slot * COMMIT_RECORD_SIZE as u64 + rng.below(COMMIT_RECORD_SIZE as u64), None)
        };
        img[byte as usize] ^= 1 << rng.below(8);
        let opened = Fs::open(Region::memfd_from(&img).unwrap(), &OpenOptions::default());
        let (fs, report) = opened.unwrap_or_else(|e| panic!("trial {t}: one flipped bit at byte {byte} made the region unmountable: {e}"));
        let f = rpramfs::fsck::check(&fs, &report, true, false);
        match target {
            Some(b) => {
                let needle = format!("block {b}");
                assert!(
                    f.errors.iter().any(|e| e.contains(&needle)),
                    "trial {t}: flip in referenced block {b} (byte {byte}) not reported by fsck: {:?}",
                    f.errors
                );
                detected += 1;
            }
            None => {
                assert!(!f.errors.is_empty() || !f.notes.is_empty(), "trial {t}: flip at byte {byte} went unnoticed");
            }
        }
        let failures = read_back_failures(&fs, &expected);
        // Every failed read or lookup says EIO: damage is reported as damage, never as another error.
        assert!(failures.iter().all(|f| f.errno == libc::EIO), "trial {t}: flip at byte {byte}: a read failed with another errno than EIO: {failures:?}");
        // A flip in a data page: fsck names the file and the offset, and reading that page must fail
        // with EIO (read_back reads every expected byte); for a directory, the lookups below it.
        if let Some(b) = target {
            let tag = format!("(block {b}) is damaged (CRC mismatch): reads of it return EIO");
            for e in f.errors.iter().filter(|e| e.contains(&tag)) {
                let (who, rest) = e.split_once(": data at offset ").unwrap_or_else(|| panic!("trial {t}: unexpected fsck line {e:?}"));
                let offset: u64 = rest.split(' ').next().and_then(|o| o.parse().ok()).unwrap_or_else(|| panic!("trial {t}: no offset in {e:?}"));
                let path = who.split(" (inode ").next().unwrap().trim_start_matches('/');
                data_flips += 1;
                if expected.iter().any(|(p, _)| p == path) {
                    assert!(
                        failures.iter().any(|f| f.path == path && f.offset == Some(offset) && f.errno == libc::EIO),
                        "trial {t}: flip in the data of {path} at offset {offset} (block {b}, byte {byte}) did not make that read fail with EIO; failed reads: {failures:?}"
                    );
                } else if path == "link" {
                    // The symlink's target lives in its data page: readlink fails with EIO.
                    let ino = fs.lookup(1, b"link").unwrap_or_else(|e| panic!("trial {t}: lookup of link: {e}")).ino;
                    let r = fs.readlink(ino);
                    assert!(
                        matches!(&r, Err(e) if e.errno() == libc::EIO),
                        "trial {t}: flip in the target of the symlink (block {b}, byte {byte}): readlink gave {r:?}, not EIO"
                    );
                } else {
                    // A directory's entries: looking up what lies below it fails with EIO.
                    let below = |p: &str| path.is_empty() || p.starts_with(&format!("{path}/"));
                    assert!(
                        failures.iter().any(|f| below(&f.path) && f.offset.is_none() && f.errno == libc::EIO),
                        "trial {t}: flip in the entries of directory /{path} (block {b}, byte {byte}) made no lookup below it fail with EIO; failed reads: {failures:?}"
                    );
                }
            }
        }
        eio_reads += failures.len();
    }
    eprintln!("{trials} trials: {pool} flips in referenced blocks ({detected} named by fsck, {data_flips} in data pages of files, directories or the symlink, each an EIO read or lookup), {eio_reads} reads failed with EIO, 0 wrong bytes");
    // The test is about EIO on damaged data: it must have flipped data and seen the reads fail.
    if trials >= 100 {
        assert!(data_flips > trials / 10, "only {data_flips} of {trials} flips hit data pages; the test no longer exercises data damage");
    }
}
