//! When to start the next pair.
//!
//! Open loop (`--rate N`): pair `k` is due at `start + k / N`, whatever the
//! server did with the earlier ones. A pair that goes out late keeps its
//! scheduled time, and latency is measured from it, so a stalled server (or
//! a stalled load generator) shows up in the histogram instead of silently
//! lowering the offered load: the "coordinated omission" correction.
//!
//! Closed loop (`--rate max --window W`): a new pair is due whenever fewer
//! than `W` are outstanding; it is scheduled "now". This finds saturation,
//! but its latencies describe a server that was never asked for more than it
//! could give.
//!
//! No I/O and no clock: callers pass `now` in nanoseconds since the run started.

use crate::pairs::Nanos;

/// How late after the end of the schedule its last pairs may still be sent.
pub const LATE_SEND_LIMIT: Nanos = 50_000_000;

/// The load model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Load {
    /// Open loop, pairs per second.
    Rate(f64),
    /// Closed loop, pairs outstanding at once.
    Window(usize),
}

/// Hands out scheduled send times between `start` and `end`.
#[derive(Clone, Debug)]
pub struct Scheduler {
    load: Load,
    start: Nanos,
    end: Nanos,
    /// Pairs handed out so far.
    issued: u64,
}

impl Scheduler {
    /// A schedule for pairs sent in `[start, end)`.
    pub fn new(load: Load, start: Nanos, end: Nanos) -> Scheduler {
        if let Load::Rate(r) = load {
            assert!(r > 0.0 && r.is_finite(), "the caller validates the rate");
        }
        Scheduler {
            load,
            start,
            end,
            issued: 0,
        }
    }

    /// The scheduled time of open-loop pair `k`.
    fn at(&self, k: u64, rate: f64) -> Nanos {
        self.start + (k as f64 * 1e9 / rate) as Nanos
    }

    /// The scheduled time of a pair that should go out at `now`, with
    /// `outstanding` pairs still awaiting replies; `None` when none is due.
    /// Call [`Scheduler::taken`] once the pair is really sent.
    pub fn due(&self, now: Nanos, outstanding: usize) -> Option<Nanos> {
        match self.load {
            Load::Rate(rate) => {
                // Pairs due before the end may go out a little after it (a
                // busy machine wakes us late), but no later than
                // LATE_SEND_LIMIT: a backlog is reported as unsent, not
                // stretched into a longer run.
                let t = self.at(self.issued, rate);
                (t <= now && t < self.end && now < self.end.saturating_add(LATE_SEND_LIMIT))
                    .then_some(t)
            }
            Load::Window(w) => {
                (now >= self.start && now < self.end && outstanding < w).then_some(now)
            }
        }
    }

    /// Records that the pair returned by `due` went out.
    pub fn taken(&mut self) {
        self.issued += 1;
    }

    /// When the next open-loop pair falls due (`None` in closed loop, where
    /// replies, not the clock, release pairs, or when the schedule is over).
    pub fn next_due(&self) -> Option<Nanos> {
        match self.load {
            Load::Rate(rate) => {
                let t = self.at(self.issued, rate);
                (t < self.end).then_some(t)
            }
            Load::Window(_) => None,
        }
    }

    /// Open loop: how many pairs the schedule puts in `[from, to)`; closed
    /// loop: `None`, there is no schedule to compare with.
    pub fn scheduled_between(&self, from: Nanos, to: Nanos) -> Option<u64> {
        let Load::Rate(rate) = self.load else {
            return None;
        };
        // Pairs with at(k) < t, for t clamped to the schedule.
        let before = |t: Nanos| -> u64 {
            let t = t.clamp(self.start, self.end);
            let mut k = ((t - self.start) as f64 * rate / 1e9).ceil() as u64;
            // Float rounding can be off by one either way; settle it exactly.
            while k > 0 && self.at(k - 1, rate) >= t {
                k -= 1;
            }
            while self.at(k, rate) < t {
                k += 1;
            }
            k
        };
        Some(before(to).saturating_sub(before(from)))
    }

    /// Pairs handed out so far.
    pub fn issued(&self) -> u64 {
        self.issued
    }

    /// Open loop: drops the pairs due before `t` that are not sent yet, and
    /// returns how many. Called when the warmup ends, so an overloaded warmup's
    /// backlog does not eat the measured window.
    pub fn skip_to(&mut self, t: Nanos) -> u64 {
        let Load::Rate(rate) = self.load else {
            return 0;
        };
        let start = self.issued;
        while self.at(self.issued, rate) < t.min(self.end) {
            self.issued += 1;
        }
        self.issued - start
    }

    /// When the schedule began.
    pub fn start(&self) -> Nanos {
        self.start
    }

    /// Ends the schedule early (no pair is due at or after `end`).
    pub fn stop_at(&mut self, end: Nanos) {
        self.end = self.end.min(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Nanos = 1_000_000;
    const S: Nanos = 1_000_000_000;

    /// Issues everything due at `now`, returning the scheduled times.
    fn drain(s: &mut Scheduler, now: Nanos, outstanding: usize) -> Vec<Nanos> {
        let mut out = Vec::new();
        while let Some(t) = s.due(now, outstanding + out.len()) {
            out.push(t);
            s.taken();
        }
        out
    }

    #[test]
    fn open_loop_spaces_pairs_evenly() {
        let mut s = Scheduler::new(Load::Rate(1000.0), 10 * MS, 10 * MS + S);
        assert_eq!(s.due(9 * MS, 0), None);
        assert_eq!(s.next_due(), Some(10 * MS));
        assert_eq!(drain(&mut s, 10 * MS, 0), vec![10 * MS]);
        assert_eq!(s.next_due(), Some(11 * MS));
        assert_eq!(drain(&mut s, 11 * MS - 1, 0), vec![]);
        assert_eq!(drain(&mut s, 13 * MS, 0), vec![11 * MS, 12 * MS, 13 * MS]);
    }

    #[test]
    fn open_loop_ignores_outstanding_pairs_and_keeps_late_times() {
        // The server answered nothing for 50 ms: the pairs due meanwhile keep
        // their scheduled times, so their latency includes the stall.
        let mut s = Scheduler::new(Load::Rate(100.0), 0, S);
        let due = drain(&mut s, 50 * MS, 1_000_000);
        assert_eq!(due, vec![0, 10 * MS, 20 * MS, 30 * MS, 40 * MS, 50 * MS]);
    }

    #[test]
    fn open_loop_stops_at_the_end_and_counts_its_schedule() {
        let mut s = Scheduler::new(Load::Rate(1000.0), 0, S);
        assert_eq!(drain(&mut s, S - 1, 0).len(), 1000);
        assert_eq!(s.next_due(), None);
        assert_eq!(s.scheduled_between(0, S), Some(1000));
        assert_eq!(s.scheduled_between(0, S / 2), Some(500));
        assert_eq!(s.scheduled_between(S / 2, S), Some(500));
        assert_eq!(s.scheduled_between(S / 2 + 1, S), Some(499));
        let odd = Scheduler::new(Load::Rate(3.0), 0, S);
        assert_eq!(odd.scheduled_between(0, S), Some(3));
        assert_eq!(odd.scheduled_between(1, S), Some(2));
    }

    #[test]
    fn open_loop_sends_no_backlog_after_the_end() {
        let mut s = Scheduler::new(Load::Rate(1000.0), 0, S);
        assert_eq!(drain(&mut s, S / 2, 0).len(), 501);
        // Stalled until well past the end: the other 499 are never sent.
        assert_eq!(drain(&mut s, S + LATE_SEND_LIMIT, 0).len(), 0);
        assert_eq!(s.scheduled_between(0, S).unwrap() - s.issued(), 499);
    }

    #[test]
    fn the_last_pairs_may_go_out_slightly_late() {
        let mut s = Scheduler::new(Load::Rate(1000.0), 0, S);
        assert_eq!(drain(&mut s, S - 3 * MS, 0).len(), 998);
        assert_eq!(drain(&mut s, S + 10 * MS, 0), vec![S - 2 * MS, S - MS]);
    }

    #[test]
    fn the_warmup_backlog_is_dropped() {
        let mut s = Scheduler::new(Load::Rate(1000.0), 0, S);
        assert_eq!(drain(&mut s, 0, 0).len(), 1);
        assert_eq!(s.skip_to(100 * MS), 99);
        assert_eq!(drain(&mut s, 100 * MS, 0), vec![100 * MS]);
        assert_eq!(s.skip_to(100 * MS), 0);
        let mut closed = Scheduler::new(Load::Window(1), 0, S);
        assert_eq!(closed.skip_to(S), 0);
    }

    #[test]
    fn fractional_rates_work() {
        let mut s = Scheduler::new(Load::Rate(0.5), 0, 10 * S);
        assert_eq!(
            drain(&mut s, 10 * S - 1, 0),
            vec![0, 2 * S, 4 * S, 6 * S, 8 * S]
        );
    }

    #[test]
    fn closed_loop_keeps_the_window_full() {
        let mut s = Scheduler::new(Load::Window(3), MS, S);
        assert_eq!(s.due(0, 0), None);
        assert_eq!(drain(&mut s, 5 * MS, 0), vec![5 * MS; 3]);
        assert_eq!(s.due(6 * MS, 3), None);
        assert_eq!(s.due(6 * MS, 2), Some(6 * MS));
        assert_eq!(s.due(S, 0), None);
        assert_eq!(s.next_due(), None);
        assert_eq!(s.scheduled_between(0, S), None);
    }
}
