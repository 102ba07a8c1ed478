//! Arbitrary region images: opening, fsck and reading return errors, never panic.

mod common;

use common::{populated_image, read_back};
use proptest::prelude::*;
use rpramfs::fs::{Fs, OpenOptions};
use rpramfs::region::Region;

fn exercise(img: &[u8], exp: &common::Expected) {
    if let Ok((fs, report)) = Fs::open(Region::memfd_from(img).unwrap(), &OpenOptions::default()) {
        let _ = rpramfs::fsck::check(&fs, &report, true, false);
        let _ = read_back(&fs, exp);
        let _ = fs.readdir(1, 0, 1000);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random overwrites anywhere in a valid image (superblocks and rings included).
    #[test]
    fn random_overwrites(writes in prop::collection::vec((0u64..(4 << 20), any::<u8>()), 1..64)) {
        static IMG: std::sync::OnceLock<(Vec<u8>, common::Expected)> = std::sync::OnceLock::new();
        let (base, exp) = IMG.get_or_init(populated_image);
        let mut img = base.clone();
        for (off, b) in writes {
            img[off as usize] = b;
        }
        exercise(&img, exp);
    }

    /// Random block contents behind a valid superblock and ring (the parser goes deep).
    #[test]
    fn random_blocks(seed in any::<u64>(), blocks in prop::collection::vec(4usize..1023, 1..40)) {
        static IMG: std::sync::OnceLock<(Vec<u8>, common::Expected)> = std::sync::OnceLock::new();
        let (base, exp) = IMG.get_or_init(populated_image);
        let mut img = base.clone();
        let mut x = seed | 1;
        for b in blocks {
            for byte in &mut img[b * 4096..(b + 1) * 4096] {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                *byte = x as u8;
            }
        }
        exercise(&img, exp);
    }

    /// Entirely random images: refused cleanly.
    #[test]
    fn random_images(bytes in prop::collection::vec(any::<u8>(), 262_144..262_145)) {
        let r = Region::memfd_from(&bytes).unwrap();
        prop_assert!(Fs::open(r, &OpenOptions::default()).is_err());
    }
}
