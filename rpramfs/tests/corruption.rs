//! 1,000 random bit flips in metadata, data, superblock and commit ring: fsck reports each (naming
//! the block), reads of damaged ranges fail with EIO, no read returns wrong bytes without an error,
//! and nothing panics.

mod common;

use common::{populated_image, read_back};
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
    let (mut pool, mut eio_reads, mut detected) = (0, 0, 0);
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
        eio_reads += read_back(&fs, &expected);
    }
    eprintln!("{trials} trials: {pool} flips in referenced blocks ({detected} named by fsck), {eio_reads} reads failed with an error, 0 wrong bytes");
}
