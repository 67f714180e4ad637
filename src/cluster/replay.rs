//! The replay filter a member keeps per sender and lane: a sliding window
//! of sequence numbers, as IPsec (RFC 4303 §3.4.3) and WireGuard keep.
//!
//! A datagram whose sequence number is above the highest seen moves the
//! window up; one within the window is accepted once; one below the window
//! is refused. Together with the timestamp window (a datagram sent more
//! than a few seconds ago, or before this process started, is stale) a
//! captured datagram cannot be used again: inside the timestamp window its
//! sequence number is already marked, outside it the timestamp refuses it.
//! Only authenticated datagrams may touch the window (check the MAC first).

/// Sequence numbers the window remembers below the highest one seen. UDP
/// between two hosts of a cluster seldom reorders, and never by this much:
/// a lane sending 100 000 datagrams a second covers 10 ms with it.
pub const WINDOW: u64 = 1024;
const WORDS: usize = (WINDOW / 64) as usize;

/// Why a sequence number was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Already seen.
    Duplicate,
    /// Below the window: too old to tell, so refused.
    TooOld,
}

/// One lane's window. Sequence number 0 is never valid (senders start at 1).
#[derive(Clone, Debug)]
pub struct ReplayWindow {
    /// The highest sequence number accepted (0: none yet).
    top: u64,
    /// Bit `s % WINDOW` is set when `s` (within the window) was accepted.
    bits: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow {
            top: 0,
            bits: [0; WORDS],
        }
    }
}

impl ReplayWindow {
    /// Forgets everything (a new incarnation of the sender).
    pub fn reset(&mut self) {
        *self = ReplayWindow::default();
    }

    /// Whether `seq` would be accepted, without marking it.
    pub fn check(&self, seq: u64) -> Result<(), Refused> {
        if seq == 0 {
            return Err(Refused::TooOld);
        }
        if seq > self.top {
            return Ok(());
        }
        if self.top - seq >= WINDOW {
            return Err(Refused::TooOld);
        }
        if self.bit(seq) {
            Err(Refused::Duplicate)
        } else {
            Ok(())
        }
    }

    /// Accepts `seq` and marks it, or says why not.
    pub fn accept(&mut self, seq: u64) -> Result<(), Refused> {
        self.check(seq)?;
        if seq > self.top {
            // Clear the bits of the numbers the window slides over.
            let skipped = seq - self.top;
            if skipped >= WINDOW {
                self.bits = [0; WORDS];
            } else {
                for s in self.top + 1..seq {
                    self.set(s, false);
                }
            }
            self.top = seq;
        }
        self.set(seq, true);
        Ok(())
    }

    /// The highest sequence number accepted.
    pub fn top(&self) -> u64 {
        self.top
    }

    fn bit(&self, seq: u64) -> bool {
        let i = seq % WINDOW;
        self.bits[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, seq: u64, on: bool) {
        let i = seq % WINDOW;
        let w = &mut self.bits[(i / 64) as usize];
        if on {
            *w |= 1 << (i % 64);
        } else {
            *w &= !(1 << (i % 64));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn in_order_once_each() {
        let mut w = ReplayWindow::default();
        assert_eq!(w.accept(0), Err(Refused::TooOld));
        for s in 1..3000 {
            assert_eq!(w.accept(s), Ok(()));
            assert_eq!(w.accept(s), Err(Refused::Duplicate));
        }
        assert_eq!(w.accept(2999 - WINDOW), Err(Refused::TooOld));
        assert_eq!(w.accept(3000 - WINDOW), Err(Refused::Duplicate));
    }

    #[test]
    fn reordered_within_the_window() {
        let mut w = ReplayWindow::default();
        assert_eq!(w.accept(100), Ok(()));
        assert_eq!(w.accept(50), Ok(()));
        assert_eq!(w.accept(50), Err(Refused::Duplicate));
        assert_eq!(w.accept(99), Ok(()));
        assert_eq!(w.accept(100 + WINDOW - 2), Ok(()));
        // 99 is still inside, 50 has left the window.
        assert_eq!(w.accept(99), Err(Refused::Duplicate));
        assert_eq!(w.accept(50), Err(Refused::TooOld));
        // A jump past the whole window forgets everything below.
        assert_eq!(w.accept(10 * WINDOW), Ok(()));
        assert_eq!(w.accept(10 * WINDOW - 1), Ok(()));
        w.reset();
        assert_eq!(w.accept(5), Ok(()));
    }

    proptest! {
        /// Against a set of everything accepted: a number is accepted
        /// exactly when it is new and within WINDOW of the highest so far.
        #[test]
        fn agrees_with_a_set(seqs in prop::collection::vec(1u64..5000, 1..400)) {
            let mut w = ReplayWindow::default();
            let mut seen = HashSet::new();
            let mut top = 0u64;
            for s in seqs {
                let expect = if seen.contains(&s) && top - s < WINDOW {
                    Err(Refused::Duplicate)
                } else if s <= top && top - s >= WINDOW {
                    Err(Refused::TooOld)
                } else {
                    Ok(())
                };
                prop_assert_eq!(w.accept(s), expect, "seq {}", s);
                if expect.is_ok() {
                    seen.insert(s);
                    top = top.max(s);
                }
            }
        }
    }
}
