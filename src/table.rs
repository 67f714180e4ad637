//! An open-addressed hash table of entries that expire, allocated once.
//!
//! [`Table`] holds the pending registrations and the replay cache. It is built
//! for one workload: a fixed maximum of small `Copy` entries keyed by a `u64`,
//! each with an expiry time, inserted and removed at high rates.
//!
//! Design, and why:
//! - Linear probing over a slot array sized for a 2/3 load factor at capacity,
//!   with a separate byte array of control bytes (0 = empty, else a 7-bit
//!   fingerprint with the top bit set). A miss scans control bytes, 64 to a cache
//!   line, and touches a slot only on a fingerprint hit. Not a higher load:
//!   expiry frees slots only where the sweep passes, so just ahead of it the
//!   local load runs about a tenth above the average, and linear probing
//!   degrades steeply past 3/4 (7/8 made clusters of thousands of slots in
//!   a full replay cache).
//! - Slots are packed byte arrays (alignment 1 for address values), and the
//!   slot index comes by multiply-shift range reduction, so the slot count
//!   need not be a power of two: memory per entry stays near
//!   `(slot + 1) * 3 / 2` bytes, 28.5 for an IPv4 entry.
//! - Deletion by backward shift: no tombstones, so heavy churn never degrades
//!   probing and never needs a rehash.
//! - Keys are hashed with a keyed mixer seeded at start, so a client cannot
//!   choose IDs that collide without knowing the seed.
//! - Expiry is lazy and incremental: a lookup treats an expired entry as absent
//!   (and reclaims it); [`Table::expire`] walks a cursor over a bounded number of
//!   slots per call, so a million entries expiring at once never stall the loop.
//!   The cursor's pace counts slots passed, not entries reclaimed, so the sweep
//!   never falls behind its period when many entries expire.
//!   When the table is full, an insertion first sweeps a few slots on, then
//!   reuses an expired slot on its probe path, before it gives up.
//!
//! The table takes `now` from the caller and never reads a clock. Nothing
//! allocates after [`Table::new`]. Times are `u32` milliseconds compared with
//! wrapping arithmetic; lifetimes must stay below 2^31 ms (about 24 days), and
//! the sweep guarantees every entry is visited long before a wrap.

/// Milliseconds on the caller's monotonic clock, truncated to 32 bits.
pub type Millis = u32;

/// Load factor at capacity, as a fraction `LOAD_NUM / LOAD_DEN`.
const LOAD_NUM: usize = 2;
const LOAD_DEN: usize = 3;
/// Control byte of an empty slot.
const EMPTY: u8 = 0;
/// Most slots one `expire` call examines, so one loop turn stays short.
pub const MAX_SWEEP_PER_CALL: usize = 2048;
/// Slots a full table sweeps before an insertion falls back to reusing an
/// expired slot on its own probe path. Why sweep first: reuse admits only
/// keys whose probe path crosses an expired entry, which favours the longest
/// clusters just ahead of the sweep; fed that way, a full replay cache grew
/// one cluster over a third of its slots. Sweeping keeps expired entries
/// rare, and the room it makes goes to keys hashed anywhere.
const FULL_SWEEP: usize = 64;

#[derive(Clone, Copy)]
struct Slot<V> {
    // Byte arrays rather than integers so that a slot has the alignment of
    // its value: an IPv4 pending entry is then 18 bytes instead of 24.
    key: [u8; 8],
    expires: [u8; 4],
    value: V,
}

impl<V> Slot<V> {
    #[inline]
    fn expires(&self) -> Millis {
        Millis::from_ne_bytes(self.expires)
    }
}

/// What [`Table::insert`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inserted<V> {
    /// A new entry.
    New,
    /// A live entry with this key existed; its value and expiry were replaced.
    Replaced {
        /// The value it held.
        old: V,
        /// When it would have expired.
        old_expires: Millis,
    },
    /// Not added: the table holds `capacity` entries and none on the probe
    /// path had expired, or the caller did not allow a new entry.
    Full,
}

/// True when an entry that expires at `expires` is dead at `now`.
#[inline]
pub fn is_expired(expires: Millis, now: Millis) -> bool {
    (now.wrapping_sub(expires) as i32) >= 0
}

/// A fixed-capacity open-addressed table of expiring entries.
pub struct Table<V: Copy> {
    ctrl: Box<[u8]>,
    slots: Box<[Slot<V>]>,
    len: usize,
    capacity: usize,
    seed: [u64; 2],
    expired: u64,
    sweep: Sweep,
}

/// The state of the incremental expiry sweep.
struct Sweep {
    cursor: usize,
    /// Slots to examine per millisecond, in 1/1024ths, so that the whole table
    /// is walked once per sweep period.
    rate_x1024: u64,
    /// Slots owed, in 1/1024ths.
    debt_x1024: u64,
    last: Option<Millis>,
}

impl<V: Copy + Default> Table<V> {
    /// Allocates a table for exactly `capacity` entries.
    ///
    /// `seed` keys the hash; `sweep_period_ms` is how long one full pass of
    /// the expiry sweep may take (a quarter of the shortest lifetime is a good
    /// choice: an expired entry is then reclaimed within that time).
    pub fn new(capacity: usize, seed: [u64; 2], sweep_period_ms: u32) -> Table<V> {
        let slots = capacity + capacity.div_ceil(LOAD_NUM) * (LOAD_DEN - LOAD_NUM) + 1;
        let empty = Slot {
            key: [0; 8],
            expires: [0; 4],
            value: V::default(),
        };
        let period = u64::from(sweep_period_ms.max(1));
        Table {
            ctrl: vec![EMPTY; slots].into_boxed_slice(),
            slots: vec![empty; slots].into_boxed_slice(),
            len: 0,
            capacity,
            seed: [seed[0], seed[1] | 1],
            expired: 0,
            sweep: Sweep {
                cursor: 0,
                rate_x1024: (slots as u64 * 1024).div_ceil(period),
                debt_x1024: 0,
                last: None,
            },
        }
    }
}

impl<V: Copy> Table<V> {
    /// Entries held, including expired ones not yet reclaimed.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the table holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most entries the table will hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes of memory the table allocated.
    pub fn allocated_bytes(&self) -> usize {
        self.ctrl.len() + std::mem::size_of_val(&*self.slots)
    }

    /// Entries reclaimed because they expired, since the table was made.
    pub fn expired_total(&self) -> u64 {
        self.expired
    }

    #[inline]
    fn hash(&self, key: u64) -> u64 {
        keyed_hash(key, self.seed)
    }

    #[inline]
    fn home(&self, hash: u64) -> usize {
        ((u128::from(hash) * self.ctrl.len() as u128) >> 64) as usize
    }

    #[inline]
    fn next(&self, i: usize) -> usize {
        if i + 1 == self.ctrl.len() {
            0
        } else {
            i + 1
        }
    }

    /// Finds `key`: `Ok(index)` where it is, or `Err(index)` of the empty slot
    /// that ends its probe sequence.
    #[inline]
    fn find(&self, key: u64) -> Result<usize, usize> {
        let hash = self.hash(key);
        let fp = fingerprint(hash);
        let want = split(key);
        let mut i = self.home(hash);
        loop {
            let c = self.ctrl[i];
            if c == EMPTY {
                return Err(i);
            }
            if c == fp && self.slots[i].key == want {
                return Ok(i);
            }
            i = self.next(i);
        }
    }

    /// The live value under `key`. An expired entry is reclaimed and reads as absent.
    #[inline]
    pub fn get(&mut self, key: u64, now: Millis) -> Option<&V> {
        let i = self.find(key).ok()?;
        if is_expired(self.slots[i].expires(), now) {
            self.remove_at(i);
            self.expired += 1;
            return None;
        }
        Some(&self.slots[i].value)
    }

    /// Removes and returns the live value under `key`.
    #[inline]
    pub fn remove(&mut self, key: u64, now: Millis) -> Option<V> {
        self.take(key, now).map(|(v, _)| v)
    }

    /// Removes the live entry under `key`, returning its value and expiry.
    #[inline]
    pub fn take(&mut self, key: u64, now: Millis) -> Option<(V, Millis)> {
        let i = self.find(key).ok()?;
        let slot = self.slots[i];
        self.remove_at(i);
        if is_expired(slot.expires(), now) {
            self.expired += 1;
            return None;
        }
        Some((slot.value, slot.expires()))
    }

    /// Inserts `value` under `key` until `expires`, replacing a live entry.
    #[inline]
    pub fn insert(&mut self, key: u64, value: V, expires: Millis, now: Millis) -> Inserted<V> {
        self.upsert(key, value, expires, now, true)
    }

    /// Replaces the live entry under `key`; adds a new one only if `may_add`
    /// (and there is room). One probe either way.
    #[inline]
    pub fn upsert(
        &mut self,
        key: u64,
        value: V,
        expires: Millis,
        now: Millis,
        may_add: bool,
    ) -> Inserted<V> {
        let slot = Slot {
            key: split(key),
            expires: expires.to_ne_bytes(),
            value,
        };
        match self.find(key) {
            Ok(i) => {
                let old = self.slots[i];
                if !is_expired(old.expires(), now) {
                    self.slots[i] = slot;
                    Inserted::Replaced {
                        old: old.value,
                        old_expires: old.expires(),
                    }
                } else if may_add {
                    self.slots[i] = slot;
                    self.expired += 1;
                    Inserted::New
                } else {
                    Inserted::Full
                }
            }
            Err(_) if !may_add => Inserted::Full,
            Err(_) if self.len >= self.capacity && self.sweep(now, FULL_SWEEP) > 0 => {
                // The sweep made room (and moved entries): probe again. The
                // key is still absent, as a sweep only removes.
                let i = self.find(key).err().unwrap_or_else(|| unreachable!());
                self.ctrl[i] = fingerprint(self.hash(key));
                self.slots[i] = slot;
                self.len += 1;
                Inserted::New
            }
            Err(_) if self.len >= self.capacity => match self.expired_on_path(key, now) {
                Some(i) => {
                    self.ctrl[i] = fingerprint(self.hash(key));
                    self.slots[i] = slot;
                    self.expired += 1;
                    Inserted::New
                }
                None => Inserted::Full,
            },
            Err(i) => {
                self.ctrl[i] = fingerprint(self.hash(key));
                self.slots[i] = slot;
                self.len += 1;
                Inserted::New
            }
        }
    }

    /// The first expired slot on `key`'s probe sequence. Overwriting it keeps
    /// every other entry reachable, since none is moved.
    fn expired_on_path(&self, key: u64, now: Millis) -> Option<usize> {
        let mut i = self.home(self.hash(key));
        while self.ctrl[i] != EMPTY {
            if is_expired(self.slots[i].expires(), now) {
                return Some(i);
            }
            i = self.next(i);
        }
        None
    }

    /// Empties slot `i` and shifts later entries of its cluster back, so that
    /// no probe sequence crosses a hole.
    fn remove_at(&mut self, mut hole: usize) {
        let mut j = hole;
        loop {
            j = self.next(j);
            if self.ctrl[j] == EMPTY {
                break;
            }
            let home = self.home(self.hash(join(self.slots[j].key)));
            // The entry at j may move into the hole only if the hole lies on
            // its probe path, i.e. cyclically within [home, j).
            let on_path = if home <= j {
                home <= hole && hole < j
            } else {
                hole >= home || hole < j
            };
            if on_path {
                self.ctrl[hole] = self.ctrl[j];
                self.slots[hole] = self.slots[j];
                hole = j;
            }
        }
        self.ctrl[hole] = EMPTY;
        self.len -= 1;
    }

    /// Reclaims expired entries, moving the cursor at most `max_slots` slots
    /// on from where the last call stopped and reclaiming at most `max_slots`
    /// entries. Returns the number reclaimed.
    pub fn sweep(&mut self, now: Millis, max_slots: usize) -> usize {
        let mut reclaimed = 0;
        let mut cursor = self.sweep.cursor;
        // One pass at most per call. Reclaiming does not move the cursor, and
        // must not use up its budget either: if it did, a region thick with
        // expired entries would slow the cursor below one pass per period,
        // more expired entries would pile up ahead of it, and it would fall
        // further behind (seen: a full replay cache grew one cluster over a
        // third of its slots).
        let mut moves = max_slots.min(self.ctrl.len());
        while moves > 0 && reclaimed < max_slots && self.len > 0 {
            if self.ctrl[cursor] != EMPTY && is_expired(self.slots[cursor].expires(), now) {
                // An entry from further on may shift into `cursor`: look again.
                self.remove_at(cursor);
                reclaimed += 1;
            } else {
                cursor = self.next(cursor);
                moves -= 1;
            }
        }
        self.sweep.cursor = cursor;
        self.expired += reclaimed as u64;
        reclaimed
    }

    /// One turn of incremental expiry: examines as many slots as the time
    /// since the last call earns (the whole table per sweep period), at most
    /// [`MAX_SWEEP_PER_CALL`]. Returns true when work is still owed, so the
    /// caller should call again soon rather than sleep.
    pub fn expire(&mut self, now: Millis) -> bool {
        let elapsed = match self.sweep.last {
            Some(last) => u64::from(now.wrapping_sub(last).min(1 << 31)),
            None => 0,
        };
        self.sweep.last = Some(now);
        if self.len == 0 {
            self.sweep.debt_x1024 = 0;
            return false;
        }
        let owed = self.sweep.debt_x1024 + elapsed * self.sweep.rate_x1024;
        // Never owe more than one full pass: catching up further is pointless.
        let owed = owed.min(self.ctrl.len() as u64 * 1024);
        let slots = ((owed / 1024) as usize).min(MAX_SWEEP_PER_CALL);
        self.sweep(now, slots);
        self.sweep.debt_x1024 = owed - slots as u64 * 1024;
        self.len > 0 && self.sweep.debt_x1024 >= 1024
    }

    /// Visits every live entry (for tests and diagnostics; not for the hot path).
    pub fn for_each_live(&self, now: Millis, mut f: impl FnMut(u64, &V, Millis)) {
        for (c, s) in self.ctrl.iter().zip(self.slots.iter()) {
            if *c != EMPTY && !is_expired(s.expires(), now) {
                f(join(s.key), &s.value, s.expires());
            }
        }
    }
}

/// A keyed hash of a `u64`: two rounds of folded multiply (as in foldhash).
/// Cheap, and with a secret seed an outsider cannot aim keys at one slot.
/// `seed[1]` must be odd.
#[inline]
pub(crate) fn keyed_hash(key: u64, seed: [u64; 2]) -> u64 {
    let a = fold_mul(key ^ seed[0], 0x9e37_79b9_7f4a_7c15);
    fold_mul(a, seed[1])
}

#[inline]
fn fold_mul(a: u64, b: u64) -> u64 {
    let full = u128::from(a) * u128::from(b);
    (full as u64) ^ ((full >> 64) as u64)
}

#[inline]
fn fingerprint(hash: u64) -> u8 {
    // The low bits; the home slot uses the high bits.
    (hash as u8) | 0x80
}

#[inline]
fn split(key: u64) -> [u8; 8] {
    key.to_ne_bytes()
}

#[inline]
fn join(key: [u8; 8]) -> u64 {
    u64::from_ne_bytes(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn table(cap: usize) -> Table<u32> {
        Table::new(cap, [7, 11], 1000)
    }

    #[test]
    fn ipv4_sized_slots_stay_small() {
        #[derive(Clone, Copy, Default)]
        struct V4 {
            _ip: [u8; 4],
            _port: [u8; 2],
        }
        let t: Table<V4> = Table::new(1 << 20, [1, 2], 1000);
        let per_entry = t.allocated_bytes() as f64 / t.capacity() as f64;
        assert!(per_entry <= 32.0, "{per_entry} bytes per entry");
    }

    #[test]
    fn insert_get_remove() {
        let mut t = table(4);
        assert_eq!(t.insert(1, 10, 100, 0), Inserted::New);
        assert_eq!(
            t.insert(1, 11, 100, 0),
            Inserted::Replaced {
                old: 10,
                old_expires: 100
            }
        );
        assert_eq!(t.upsert(2, 0, 100, 0, false), Inserted::Full);
        assert_eq!(t.get(1, 0), Some(&11));
        assert_eq!(t.remove(1, 0), Some(11));
        assert_eq!(t.get(1, 0), None);
        assert!(t.is_empty());
    }

    #[test]
    fn full_table_refuses_but_reuses_expired() {
        let mut t = table(3);
        for k in 0..3 {
            assert_eq!(t.insert(k, 0, 10 + k as u32, 0), Inserted::New);
        }
        assert_eq!(t.insert(99, 0, 100, 5), Inserted::Full);
        // At 10 the first entry is dead. The new key's probe path may not
        // reach it, so sweep and try again: the sweep reclaims it.
        if t.insert(99, 0, 100, 10) == Inserted::Full {
            assert_eq!(t.sweep(10, usize::MAX), 1);
            assert_eq!(t.insert(99, 0, 100, 10), Inserted::New);
        }
        assert_eq!(t.len(), 3);
        assert_eq!(t.get(1, 10), Some(&0));
        assert_eq!(t.get(2, 10), Some(&0));
    }

    #[test]
    fn expired_entries_read_as_absent() {
        let mut t = table(8);
        t.insert(5, 1, 50, 0);
        assert_eq!(t.get(5, 49), Some(&1));
        assert_eq!(t.get(5, 50), None);
        assert_eq!(t.len(), 0);
        assert_eq!(t.expired_total(), 1);
    }

    #[test]
    fn wrapping_clock() {
        let mut t = table(8);
        let now = u32::MAX - 5;
        t.insert(5, 1, now.wrapping_add(10), now);
        assert_eq!(t.get(5, now.wrapping_add(9)), Some(&1));
        assert_eq!(t.get(5, now.wrapping_add(10)), None);
    }

    #[test]
    fn expire_is_bounded_and_eventually_complete() {
        let n = 100_000;
        let mut t = table(n);
        for k in 0..n as u64 {
            t.insert(k, 0, 1000, 0);
        }
        t.expire(0);
        let mut now = 1000;
        let mut calls = 0;
        while !t.is_empty() {
            now += 1;
            t.expire(now);
            calls += 1;
            assert!(calls < 10_000, "sweep does not finish");
        }
        assert_eq!(t.expired_total(), n as u64);
        // Each call may reclaim at most MAX_SWEEP_PER_CALL entries.
        assert!(calls >= n / MAX_SWEEP_PER_CALL);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8, u32),
        Get(u8),
        Remove(u8),
        Tick(u8),
        Sweep(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (any::<u8>(), any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            any::<u8>().prop_map(Op::Get),
            any::<u8>().prop_map(Op::Remove),
            any::<u8>().prop_map(Op::Tick),
            any::<u8>().prop_map(Op::Sweep),
        ]
    }

    proptest! {
        /// The table against a HashMap model with the same expiry rules.
        #[test]
        fn behaves_like_a_hashmap(cap in 1usize..40, ttl in 1u32..60, ops in proptest::collection::vec(op(), 1..400)) {
            let mut t = table(cap);
            let mut model: HashMap<u64, (u32, Millis)> = HashMap::new();
            let mut now: Millis = u32::MAX - 300; // cross the wrap
            for op in ops {
                model.retain(|_, (_, exp)| !is_expired(*exp, now));
                match op {
                    Op::Insert(k, v) => {
                        let k = u64::from(k % 48) * 0x1_0000_0001;
                        let got = t.insert(k, v, now.wrapping_add(ttl), now);
                        let want = if let Some(&(old, old_expires)) = model.get(&k) {
                            Inserted::Replaced { old, old_expires }
                        } else if model.len() >= cap {
                            Inserted::Full
                        } else {
                            Inserted::New
                        };
                        if want == Inserted::Full {
                            // Held-but-expired entries may still fill the table;
                            // the table must never go over capacity or evict the living.
                            prop_assert!(got == Inserted::Full || got == Inserted::New);
                        } else if want == Inserted::New {
                            // Expired-but-held entries can make a fresh insert fail.
                            prop_assert!(got == Inserted::New || (got == Inserted::Full && t.len() >= cap));
                        } else {
                            prop_assert_eq!(got, want);
                        }
                        if got != Inserted::Full {
                            model.insert(k, (v, now.wrapping_add(ttl)));
                        }
                    }
                    Op::Get(k) => {
                        let k = u64::from(k % 48) * 0x1_0000_0001;
                        prop_assert_eq!(t.get(k, now).copied(), model.get(&k).map(|e| e.0));
                    }
                    Op::Remove(k) => {
                        let k = u64::from(k % 48) * 0x1_0000_0001;
                        prop_assert_eq!(t.remove(k, now), model.remove(&k).map(|e| e.0));
                    }
                    Op::Tick(d) => now = now.wrapping_add(u32::from(d % 16)),
                    Op::Sweep(n) => { t.sweep(now, usize::from(n)); }
                }
                model.retain(|_, (_, exp)| !is_expired(*exp, now));
                prop_assert!(t.len() <= cap);
                prop_assert!(t.len() >= model.len());
                let mut live = HashMap::new();
                t.for_each_live(now, |k, v, e| { live.insert(k, (*v, e)); });
                prop_assert_eq!(&live, &model);
            }
        }
    }
}
