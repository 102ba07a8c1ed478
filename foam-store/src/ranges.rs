//! Page ranges of one address space with the CRIU page flags they were dumped with.
//!
//! A dump names every page it keeps, either with data or as a PE_PARENT hole ("unchanged since the
//! previous pass"). The ranges named by the last dump are the image; whether a page may be restored
//! lazily is remembered from the pass that last sent its data.

use std::collections::BTreeMap;

use crate::protocol::{PAGE_SIZE, PE_LAZY, PE_PRESENT};

/// `[start, end)` in bytes (page-aligned) and the flags: PE_PRESENT, optionally with PE_LAZY.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Range {
    pub start: u64,
    pub end: u64,
    pub flags: u16,
}

impl Range {
    pub fn pages(&self) -> u64 {
        (self.end - self.start) / PAGE_SIZE
    }

    pub fn lazy(&self) -> bool {
        self.flags & PE_LAZY != 0
    }
}

/// Non-overlapping ranges, keyed by start; adjacent ranges with equal flags are merged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeMap {
    by_start: BTreeMap<u64, (u64, u16)>,
}

impl RangeMap {
    pub fn new() -> RangeMap {
        RangeMap::default()
    }

    pub fn from_ranges(ranges: &[Range]) -> RangeMap {
        let mut m = RangeMap::new();
        for r in ranges {
            m.insert(r.start, r.end, r.flags);
        }
        m
    }

    /// Sets `[start, end)` to `flags` (only PE_LAZY and PE_PRESENT are kept), replacing what was there.
    pub fn insert(&mut self, start: u64, end: u64, flags: u16) {
        if start >= end {
            return;
        }
        let flags = (flags & PE_LAZY) | PE_PRESENT;
        self.remove(start, end);
        let (mut start, mut end) = (start, end);
        if let Some((&s, &(e, f))) = self.by_start.range(..start).next_back() {
            if e == start && f == flags {
                self.by_start.remove(&s);
                start = s;
            }
        }
        if let Some(&(e, f)) = self.by_start.get(&end) {
            if f == flags {
                self.by_start.remove(&end);
                end = e;
            }
        }
        self.by_start.insert(start, (end, flags));
    }

    /// Forgets `[start, end)`, splitting ranges that straddle its edges.
    pub fn remove(&mut self, start: u64, end: u64) {
        if let Some((&s, &(e, f))) = self.by_start.range(..start).next_back() {
            if e > start {
                self.by_start.insert(s, (start, f));
                if e > end {
                    self.by_start.insert(end, (e, f));
                }
            }
        }
        let inside: Vec<u64> = self.by_start.range(start..end).map(|(&s, _)| s).collect();
        for s in inside {
            let (e, f) = self.by_start.remove(&s).unwrap();
            if e > end {
                self.by_start.insert(end, (e, f));
            }
        }
    }

    /// The parts of `[start, end)` this map covers, in order.
    pub fn covered(&self, start: u64, end: u64) -> Vec<Range> {
        let mut out = Vec::new();
        let first = self.by_start.range(..=start).next_back().map(|(&s, _)| s).unwrap_or(start);
        for (&s, &(e, f)) in self.by_start.range(first..end) {
            let (a, b) = (s.max(start), e.min(end));
            if a < b {
                out.push(Range { start: a, end: b, flags: f });
            }
        }
        out
    }

    pub fn iter(&self) -> impl Iterator<Item = Range> + '_ {
        self.by_start.iter().map(|(&start, &(end, flags))| Range { start, end, flags })
    }

    pub fn to_vec(&self) -> Vec<Range> {
        self.iter().collect()
    }

    pub fn pages(&self) -> u64 {
        self.iter().map(|r| r.pages()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_start.is_empty()
    }

    /// The gaps between ranges below `limit`: what a file holding exactly these ranges must not keep.
    pub fn gaps(&self, limit: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = 0;
        for r in self.iter() {
            if r.start >= limit {
                break;
            }
            if r.start > at {
                out.push((at, r.start));
            }
            at = r.end;
        }
        if at < limit {
            out.push((at, limit));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: u64 = PAGE_SIZE;
    const LAZY: u16 = PE_LAZY | PE_PRESENT;

    #[test]
    fn merges_splits_and_reports_gaps() {
        let mut m = RangeMap::new();
        m.insert(0, 4 * P, PE_PRESENT);
        m.insert(4 * P, 8 * P, PE_PRESENT);
        assert_eq!(m.to_vec(), vec![Range { start: 0, end: 8 * P, flags: PE_PRESENT }]);
        m.insert(2 * P, 3 * P, LAZY);
        assert_eq!(m.to_vec().len(), 3);
        assert_eq!(m.covered(P, 5 * P).iter().map(|r| r.pages()).sum::<u64>(), 4);
        m.remove(0, 2 * P);
        assert_eq!(m.pages(), 6);
        assert_eq!(m.gaps(10 * P), vec![(0, 2 * P), (8 * P, 10 * P)]);
    }

    proptest! {
        /// The map behaves like a per-page array of flags.
        #[test]
        fn matches_a_page_array(ops in proptest::collection::vec((0u64..64, 1u64..16, any::<bool>(), any::<bool>()), 1..40)) {
            let mut m = RangeMap::new();
            let mut pages = [None::<u16>; 80];
            for (start, len, lazy, remove) in ops {
                let end = (start + len).min(80);
                if remove {
                    m.remove(start * P, end * P);
                    for p in &mut pages[start as usize..end as usize] { *p = None; }
                } else {
                    let f = if lazy { LAZY } else { PE_PRESENT };
                    m.insert(start * P, end * P, f);
                    for p in &mut pages[start as usize..end as usize] { *p = Some(f); }
                }
            }
            let mut got = [None::<u16>; 80];
            let mut last_end = None;
            for r in m.iter() {
                prop_assert!(last_end.is_none_or(|e| e <= r.start), "overlap or unsorted");
                last_end = Some(r.end);
                for p in r.start / P..r.end / P { got[p as usize] = Some(r.flags); }
            }
            prop_assert_eq!(got, pages);
            // Adjacent ranges with equal flags are merged.
            let v = m.to_vec();
            for w in v.windows(2) {
                prop_assert!(!(w[0].end == w[1].start && w[0].flags == w[1].flags));
            }
        }
    }
}
