//! CRC32 (IEEE 802.3, the value `crc32fast::hash` gives) of pages and blocks, computed by whichever
//! of two implementations is faster on the machine at hand.
//!
//! kup checksums every page it moves: FOAM's per-page CRCs, rpramfs's block pointers, and the
//! hints that hand one to the other. While an app is frozen for its final dump that checksum is
//! the largest CPU cost left. crc32fast folds with carry-less multiplication (PCLMULQDQ), ~10 GB/s
//! on hardware; under emulation (QEMU TCG, where kup's guest bench runs) each PCLMULQDQ is a
//! helper call and a slice-by-16 table runs about 1.5× faster. As the kernel picks its xor and
//! RAID6 routines at boot, the first call times both on the same 64 KiB and keeps the faster
//! one. Both compute the same function, so nothing stored depends on the choice.
//!
//! ```
//! let page = [7u8; 4096];
//! assert_eq!(pagecrc::crc32(&page), crc32fast::hash(&page));
//! ```

use std::hint::black_box;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A way of computing the same CRC32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Implementation {
    /// crc32fast: carry-less-multiply folding where the CPU has it, else its own table.
    Folding,
    /// The `crc` crate's slice-by-16 table.
    Table,
}

impl Implementation {
    /// The implementation an operator names: `folding` or `table`.
    pub fn from_name(name: &str) -> Option<Implementation> {
        match name {
            "folding" => Some(Implementation::Folding),
            "table" => Some(Implementation::Table),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Implementation::Folding => "folding (crc32fast)",
            Implementation::Table => "slice-by-16 table",
        }
    }

    /// The CRC32 of `data` computed this way.
    pub fn crc32(self, data: &[u8]) -> u32 {
        match self {
            Implementation::Folding => crc32fast::hash(data),
            Implementation::Table => TABLE.checksum(data),
        }
    }
}

const TABLE: crc::Crc<u32, crc::Table<16>> = crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_ISO_HDLC);

static CHOSEN: OnceLock<Implementation> = OnceLock::new();

/// The CRC32 of `data`, by the implementation [`implementation`] picked.
#[inline]
pub fn crc32(data: &[u8]) -> u32 {
    implementation().crc32(data)
}

/// The implementation in use: the one [`set_implementation`] gave, else the faster one as timed
/// on the first call.
pub fn implementation() -> Implementation {
    *CHOSEN.get_or_init(calibrate)
}

/// Uses `imp` from now on instead of timing both (to compare them: kup does this for
/// `KUP_CRC32=folding|table`). The choice is made once per process: after the first checksum or
/// an earlier choice this returns the implementation already in use.
pub fn set_implementation(imp: Implementation) -> Implementation {
    *CHOSEN.get_or_init(|| imp)
}

/// Times both implementations on the same 16 pages (best of three rounds each, after an untimed
/// one: an emulator translates code on its first run; ~2 ms under emulation, microseconds on
/// hardware) and returns the faster.
fn calibrate() -> Implementation {
    let sample: Vec<u8> = (0u32..16 * 4096).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    for imp in [Implementation::Folding, Implementation::Table] {
        black_box(imp.crc32(black_box(&sample)));
    }
    let best = |imp: Implementation| -> Duration {
        (0..3)
            .map(|_| {
                let t = Instant::now();
                for page in sample.chunks(4096) {
                    black_box(imp.crc32(black_box(page)));
                }
                t.elapsed()
            })
            .min()
            .unwrap()
    };
    if best(Implementation::Table) < best(Implementation::Folding) {
        Implementation::Table
    } else {
        Implementation::Folding
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_and_a_choice_made_once() {
        assert_eq!(Implementation::from_name("folding"), Some(Implementation::Folding));
        assert_eq!(Implementation::from_name("table"), Some(Implementation::Table));
        assert_eq!(Implementation::from_name("fast"), None);
        // Whichever came first (this or another test's first checksum) stays.
        let chosen = set_implementation(Implementation::Table);
        assert_eq!(implementation(), chosen);
        let other = if chosen == Implementation::Table { Implementation::Folding } else { Implementation::Table };
        assert_eq!(set_implementation(other), chosen);
    }

    #[test]
    fn known_values() {
        // The CRC-32/ISO-HDLC check value, and an empty input.
        for imp in [Implementation::Folding, Implementation::Table] {
            assert_eq!(imp.crc32(b"123456789"), 0xcbf4_3926, "{imp:?}");
            assert_eq!(imp.crc32(b""), 0, "{imp:?}");
        }
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    proptest! {
        #[test]
        fn both_implementations_agree(data in proptest::collection::vec(any::<u8>(), 0..9000)) {
            prop_assert_eq!(Implementation::Table.crc32(&data), Implementation::Folding.crc32(&data));
            prop_assert_eq!(crc32(&data), crc32fast::hash(&data));
        }
    }
}
