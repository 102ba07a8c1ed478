//! When the pre-dumps stop: after each pre-dump, the pages it sent (the set written during the
//! pass before) decide whether another pre-dump, a throttled one, or the final dump comes next.
//! Live migration's rule (QEMU): iterate while the dirty set shrinks; when it stops shrinking,
//! slow the writer down for one more pass (auto-converge) instead of freezing it with a large set.

/// A pre-dump that sends at most this many pages (2 MiB) leaves little for the final dump.
pub const FEW_PAGES: u64 = 512;
/// The dirty set "shrinks" while a pass sends at most this share of the pages of the one before.
pub const SHRINK: f64 = 0.8;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    /// Passes in all, the final dump included (`--iterations`).
    pub max_passes: u32,
    /// The share (percent) of the CPU time it used in the pass before that the app keeps during a
    /// throttled pre-dump; `None`: never throttle.
    pub throttle: Option<u32>,
}

/// `--throttle`: `off` or the share in percent (1-100) of its CPU use an app keeps in a throttled pre-dump.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ThrottleArg(pub Option<u32>);

impl std::str::FromStr for ThrottleArg {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "off" {
            return Ok(ThrottleArg(None));
        }
        match s.trim_end_matches('%').parse::<u32>() {
            Ok(p @ 1..=100) => Ok(ThrottleArg(Some(p))),
            _ => Err(format!("{s:?} is neither `off` nor a CPU share in percent from 1 to 100")),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Next {
    PreDump { throttled: bool },
    Final(Stop),
}

/// Why the pre-dumps stopped, for the pass table and the manifest.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Stop {
    /// `--iterations` passes (or one: no dirty tracking).
    Limit(u32),
    /// The last pre-dump sent few pages.
    Few(u64),
    /// The last pre-dump sent more than [`SHRINK`] of the one before and throttling is off or
    /// out of passes.
    NotShrinking { pages: u64, before: u64 },
    /// The throttled pre-dump was the last.
    Throttled { pages: u64, before: u64 },
}

impl Policy {
    /// What comes after the pre-dumps that sent `sent[i]` pages each; `last_throttled` says the
    /// last of them ran throttled; `written`, the pages written since the last began, where known
    /// (the soft-dirty bits after the first pass, which sent the whole image).
    pub fn next(&self, sent: &[u64], last_throttled: bool, written: Option<u64>) -> Next {
        let done = sent.len() as u32;
        if done + 1 >= self.max_passes {
            return Next::Final(Stop::Limit(self.max_passes));
        }
        let (Some(&pages), Some(&before)) = (sent.last(), sent.len().checked_sub(2).and_then(|i| sent.get(i))) else {
            // Only the first pass: nothing to compare yet, but an app that wrote little since
            // needs no second.
            return match written {
                Some(w) if done == 1 && w <= FEW_PAGES => Next::Final(Stop::Few(w)),
                _ => Next::PreDump { throttled: false },
            };
        };
        if last_throttled {
            return Next::Final(Stop::Throttled { pages, before });
        }
        if pages <= FEW_PAGES {
            return Next::Final(Stop::Few(pages));
        }
        if pages as f64 > SHRINK * before as f64 {
            return match self.throttle {
                Some(_) => Next::PreDump { throttled: true },
                None => Next::Final(Stop::NotShrinking { pages, before }),
            };
        }
        Next::PreDump { throttled: false }
    }
}

/// What the passes are expected to do ([`Policy::estimate`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Estimate {
    /// Pages each pre-dump sends.
    pub sent: Vec<u64>,
    pub stop: Stop,
    /// Pages the final dump sends (with the apps frozen).
    pub final_pages: u64,
}

impl Policy {
    /// The passes for `pages` pages of apps that write `rate` distinct pages per second into a
    /// store that takes `store_rate` pages per second: a pass that sends d pages takes d /
    /// `store_rate` seconds, in which the apps write min(`pages`, `rate` x that) pages, x the
    /// throttle's share in a throttled pass (apps held to it write that much slower).
    pub fn estimate(&self, pages: u64, rate: f64, store_rate: f64) -> Estimate {
        let mut sent = vec![];
        let mut throttled = false;
        let mut next_pages = pages;
        loop {
            let written = (sent.len() == 1).then_some(next_pages);
            match self.next(&sent, throttled, written) {
                Next::Final(stop) => return Estimate { sent, stop, final_pages: next_pages },
                Next::PreDump { throttled: t } => {
                    let share = match (t, self.throttle) {
                        (true, Some(p)) => p as f64 / 100.0,
                        _ => 1.0,
                    };
                    let seconds = next_pages as f64 / store_rate.max(1.0);
                    sent.push(next_pages);
                    next_pages = ((rate * share * seconds) as u64).min(pages);
                    throttled = t;
                }
            }
        }
    }
}

impl Stop {
    pub fn describe(&self) -> String {
        match *self {
            Stop::Limit(1) => "one pass".into(),
            Stop::Limit(n) => format!("the limit of {n} passes (--iterations)"),
            Stop::Few(p) => format!("{p} pages were written during the last pre-dump (at most {FEW_PAGES}: little left for the final dump)"),
            Stop::NotShrinking { pages, before } => format!(
                "the dirty set stopped shrinking ({before} -> {pages} pages, more than {:.0} %; the app writes about as fast as a pass stores; --throttle would slow it for one more pass)",
                SHRINK * 100.0
            ),
            Stop::Throttled { pages, before } => format!("the dirty set stopped shrinking, so the last pre-dump ran throttled ({before} -> {pages} pages)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AUTO: Policy = Policy { max_passes: 6, throttle: Some(10) };
    const OFF: Policy = Policy { max_passes: 6, throttle: None };

    #[test]
    fn the_first_pass_always_has_a_second_unless_the_limit_says_no() {
        assert_eq!(AUTO.next(&[], false, None), Next::PreDump { throttled: false });
        assert_eq!(AUTO.next(&[40_000], false, None), Next::PreDump { throttled: false });
        assert_eq!(AUTO.next(&[100], false, None), Next::PreDump { throttled: false });
        assert_eq!(AUTO.next(&[40_000], false, Some(12)), Next::Final(Stop::Few(12)));
        assert_eq!(AUTO.next(&[40_000], false, Some(9_000)), Next::PreDump { throttled: false });
        let two = Policy { max_passes: 2, ..AUTO };
        assert_eq!(two.next(&[40_000], false, None), Next::Final(Stop::Limit(2)));
        let one = Policy { max_passes: 1, ..AUTO };
        assert_eq!(one.next(&[], false, None), Next::Final(Stop::Limit(1)));
    }

    #[test]
    fn a_shrinking_set_goes_on_until_few_pages_are_left() {
        assert_eq!(AUTO.next(&[40_000, 9_000], false, None), Next::PreDump { throttled: false });
        assert_eq!(AUTO.next(&[40_000, 9_000, 2_000], false, None), Next::PreDump { throttled: false });
        assert_eq!(AUTO.next(&[40_000, 9_000, 2_000, 400], false, None), Next::Final(Stop::Few(400)));
    }

    #[test]
    fn a_set_that_stops_shrinking_gets_one_throttled_pass_or_ends() {
        // The memcached under a set load: 33624, 18904, then about as many again.
        assert_eq!(AUTO.next(&[33_624, 18_904, 17_000], false, None), Next::PreDump { throttled: true });
        assert_eq!(AUTO.next(&[33_624, 18_904, 17_000, 3_000], true, None), Next::Final(Stop::Throttled { pages: 3_000, before: 17_000 }));
        assert_eq!(OFF.next(&[33_624, 18_904, 17_000], false, None), Next::Final(Stop::NotShrinking { pages: 17_000, before: 18_904 }));
        // The whole image written again during the first pass.
        assert_eq!(AUTO.next(&[20_000, 19_000], false, None), Next::PreDump { throttled: true });
    }

    #[test]
    fn estimates_follow_the_same_rule() {
        // Idle: nothing written during the first pass, so no second.
        let idle = AUTO.estimate(30_000, 0.0, 10_000.0);
        assert_eq!((idle.sent, idle.stop, idle.final_pages), (vec![30_000], Stop::Few(0), 0));
        // Writing half as fast as the store takes pages: the set halves with every pass.
        let slow = OFF.estimate(32_768, 5_000.0, 10_000.0);
        assert_eq!(slow.sent, vec![32_768, 16_384, 8_192, 4_096, 2_048]);
        assert_eq!((slow.stop, slow.final_pages), (Stop::Limit(6), 1_024));
        // Writing as fast as the store takes pages: no shrinking; at 10 % one more pass, a tenth left.
        let fast = OFF.estimate(20_000, 10_000.0, 10_000.0);
        assert_eq!((fast.sent, fast.final_pages), (vec![20_000, 20_000], 20_000));
        let auto = AUTO.estimate(20_000, 10_000.0, 10_000.0);
        assert_eq!((auto.sent, auto.final_pages), (vec![20_000, 20_000, 20_000], 2_000));
        assert_eq!(auto.stop, Stop::Throttled { pages: 20_000, before: 20_000 });
    }

    #[test]
    fn throttle_arguments() {
        assert_eq!("off".parse::<ThrottleArg>(), Ok(ThrottleArg(None)));
        assert_eq!("25".parse::<ThrottleArg>(), Ok(ThrottleArg(Some(25))));
        assert_eq!("10%".parse::<ThrottleArg>(), Ok(ThrottleArg(Some(10))));
        for bad in ["0", "101", "", "on", "-5"] {
            assert!(bad.parse::<ThrottleArg>().unwrap_err().contains("from 1 to 100"), "{bad}");
        }
    }

    #[test]
    fn the_limit_comes_first() {
        let three = Policy { max_passes: 3, ..AUTO };
        assert_eq!(three.next(&[33_624, 18_904], false, None), Next::Final(Stop::Limit(3)));
        for s in [Stop::Limit(1), Stop::Limit(4), Stop::Few(3), Stop::NotShrinking { pages: 9, before: 10 }, Stop::Throttled { pages: 1, before: 10 }] {
            assert!(!s.describe().is_empty());
        }
    }
}
