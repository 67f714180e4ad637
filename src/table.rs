//! An open-addressed hash table of small `Copy` entries, allocated once.
//!
//! [`Table`] holds the engine's pairs (pending registrations and the matches
//! remembered for replay) and its per-source counts. It is built for one
//! workload: a fixed maximum of small entries, looked up at high rates by a
//! 64-bit key, inserted and removed under heavy churn, and never resized.
//!
//! Design, and why:
//! - **Linear probing over packed slots, with a separate array of control
//!   bytes** (0 = empty, else a 7-bit fingerprint of the hash with the top bit
//!   set). A lookup scans control bytes **eight at a time** (SWAR on a `u64`,
//!   as SwissTable does with SIMD), so a miss reads one or two cache lines of
//!   control bytes and touches a slot only on a fingerprint hit (1 in 128 per
//!   occupied byte). The control array carries a copy of its first
//!   [`GROUP`] bytes after its end, so a group read never wraps.
//! - **Deletion by backward shift**: no tombstones, so heavy churn never
//!   degrades probing and never needs a rehash. The caller owns the entries'
//!   meaning: it finds, inserts and removes; the table never decides that an
//!   entry is dead (expiry is the engine's business, see [`Table::sweep`]).
//! - **Slots are packed byte arrays** (alignment 1) and the home slot comes by
//!   multiply-shift range reduction, so the slot count need not be a power of
//!   two: memory is `(size_of::<E>() + 1) / load` bytes per entry.
//! - **Keyed hashing**: the caller's 64-bit key is mixed with a secret seed,
//!   so a client cannot choose keys that pile into one cluster.
//! - **Prefetch**: [`Table::prefetch`] pulls a key's home group and slot into
//!   cache, so a caller holding a batch of keys overlaps their cache misses
//!   instead of queueing them.
//! - **Fallible allocation**: [`Table::try_new`] reports a size that overflows
//!   or cannot be allocated as an error, never a panic or an abort.
//! - **Huge pages**: the arrays are advised to transparent huge pages before
//!   they are first written, so that random probes of a table far larger than
//!   the TLB's reach do not also walk the page tables.
//!
//! The table takes no clock and does no I/O. Nothing allocates after
//! [`Table::try_new`]. The caller keeps the number of entries at or below the
//! capacity it asked for; the table then always has an empty slot, which is
//! what ends every probe.

use std::collections::TryReserveError;
use std::mem::size_of;

use crate::sys::{advise_huge_pages, prefetch};

/// Control bytes scanned at once (one `u64`).
pub const GROUP: usize = 8;
/// Control byte of an empty slot.
const EMPTY: u8 = 0;
/// Fewest slots a table has, so that a group never covers a slot twice.
const MIN_SLOTS: usize = 2 * GROUP;
/// Groups the sweep fetches ahead of its cursor.
const SWEEP_AHEAD: usize = 4;
/// Most entries one pass over a run removes (see [`Table::remove_run`]),
/// and so the most holes its list (allocated with the table) holds.
pub const MAX_RUN_REMOVALS: usize = 256;
/// Room in [`Table::remove_run`]'s list of holes: twice the most it holds,
/// so that compacting the list is rare.
const HOLES: usize = 2 * MAX_RUN_REMOVALS;
/// Bytes of that list.
const HOLES_BYTES: usize = HOLES * size_of::<usize>();
const LSB: u64 = 0x0101_0101_0101_0101;
const MSB: u64 = 0x8080_8080_8080_8080;

/// How full a table may get, as a fraction: slots = capacity * DEN / NUM.
///
/// 7/8 is SwissTable's limit. Linear probing alone degrades past about 3/4
/// (long clusters), but a SWAR scan reads a cluster eight slots per step and
/// touches no slot on the way, so the longer clusters cost a few more
/// control-byte compares, not more cache misses; and the engine keeps the
/// table below this load (expired entries are counted as held until the
/// sweep reclaims them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Load {
    /// Numerator.
    pub num: usize,
    /// Denominator.
    pub den: usize,
}

impl Load {
    /// 7/8, the engine's choice (see the type's docs).
    pub const DEFAULT: Load = Load { num: 7, den: 8 };
}

/// An entry a [`Table`] can hold: plain bytes, copied in and out.
pub trait Entry: Copy {
    /// The 64-bit value the table hashes to place this entry (the same value
    /// the caller passes to [`Table::find`] for its key).
    fn hash_input(&self) -> u64;
}

/// Why a table could not be made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllocError {
    /// The size in bytes does not fit a `usize`.
    Overflow,
    /// The allocator refused this many bytes.
    OutOfMemory(usize),
}

impl From<TryReserveError> for AllocError {
    fn from(_: TryReserveError) -> Self {
        AllocError::OutOfMemory(0)
    }
}

/// A fixed-capacity open-addressed table. See the module docs.
pub struct Table<E: Entry> {
    /// `slots.len() + GROUP` control bytes; the last `GROUP` mirror the first.
    ctrl: Box<[u8]>,
    slots: Box<[E]>,
    len: usize,
    capacity: usize,
    seed: [u64; 2],
    /// Where the next [`Table::sweep`] starts.
    cursor: usize,
    /// [`Table::remove_run`]'s list of holes, allocated once: a fresh array
    /// on the stack cost a 4 KiB clear per call, a tenth of the engine's CPU
    /// when the table is small.
    holes: Box<[usize]>,
}

/// Slots for `capacity` entries at `load`, or `None` on overflow.
fn slot_count(capacity: usize, load: Load) -> Option<usize> {
    let slots = capacity.checked_mul(load.den)?.div_ceil(load.num.max(1));
    // At least one more slot than entries, so that a probe always ends.
    Some(slots.max(capacity.checked_add(1)?).max(MIN_SLOTS))
}

impl<E: Entry> Table<E> {
    /// Bytes a table for `capacity` entries at `load` allocates, or `None`
    /// when that overflows.
    pub fn bytes_for(capacity: usize, load: Load) -> Option<usize> {
        let slots = slot_count(capacity, load)?;
        slots
            .checked_mul(size_of::<E>())?
            .checked_add(slots.checked_add(GROUP)?)?
            .checked_add(HOLES_BYTES)
    }

    /// Allocates a table for at most `capacity` entries, every slot set to
    /// `empty` (any value: empty slots are told by their control byte).
    /// `seed` keys the hash.
    pub fn try_new(
        capacity: usize,
        load: Load,
        seed: [u64; 2],
        empty: E,
    ) -> Result<Table<E>, AllocError> {
        let slots = slot_count(capacity, load).ok_or(AllocError::Overflow)?;
        let bytes = Self::bytes_for(capacity, load).ok_or(AllocError::Overflow)?;
        let oom = |_| AllocError::OutOfMemory(bytes);
        // Reserve both arrays before writing either, so that a size that
        // cannot be had fails at once instead of after filling the first.
        let mut ctrl = Vec::new();
        ctrl.try_reserve_exact(slots + GROUP).map_err(oom)?;
        let mut entries: Vec<E> = Vec::new();
        entries.try_reserve_exact(slots).map_err(oom)?;
        advise_huge_pages(ctrl.as_ptr(), ctrl.capacity());
        advise_huge_pages(entries.as_ptr().cast(), entries.capacity() * size_of::<E>());
        ctrl.resize(slots + GROUP, EMPTY);
        entries.resize(slots, empty);
        let mut holes = Vec::new();
        holes.try_reserve_exact(HOLES).map_err(oom)?;
        holes.resize(HOLES, 0);
        Ok(Table {
            ctrl: ctrl.into_boxed_slice(),
            slots: entries.into_boxed_slice(),
            len: 0,
            capacity,
            seed: [seed[0], seed[1] | 1],
            cursor: 0,
            holes: holes.into_boxed_slice(),
        })
    }

    /// Entries held.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the table holds no entry.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most entries the caller may hold.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Slots in the table (more than the capacity; see [`Load`]).
    #[inline]
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Bytes of memory the table allocated.
    pub fn allocated_bytes(&self) -> usize {
        self.ctrl.len() + std::mem::size_of_val(&*self.slots) + HOLES_BYTES
    }

    /// The keyed hash of a key's hash input.
    #[inline]
    pub fn hash(&self, input: u64) -> u64 {
        keyed_hash(input, self.seed)
    }

    #[inline]
    fn home(&self, hash: u64) -> usize {
        ((u128::from(hash) * self.slots.len() as u128) >> 64) as usize
    }

    /// The home slot of `hash`, for tests that build runs of one home.
    #[cfg(test)]
    pub(crate) fn home_of(&self, hash: u64) -> usize {
        self.home(hash)
    }

    #[inline]
    fn wrap(&self, i: usize) -> usize {
        if i >= self.slots.len() {
            i - self.slots.len()
        } else {
            i
        }
    }

    /// Slots from `from` on to `to`, cyclically (both below the slot count):
    /// a subtraction, not a division, on paths taken per entry.
    #[inline]
    fn dist(&self, from: usize, to: usize) -> usize {
        self.wrap(to + self.slots.len() - from)
    }

    #[inline]
    fn group(&self, i: usize) -> u64 {
        let mut g = [0u8; GROUP];
        g.copy_from_slice(&self.ctrl[i..i + GROUP]);
        u64::from_le_bytes(g)
    }

    #[inline]
    fn set_ctrl(&mut self, i: usize, c: u8) {
        self.ctrl[i] = c;
        if i < GROUP {
            let n = self.slots.len();
            self.ctrl[n + i] = c;
        }
    }

    /// Asks the CPU to fetch what a lookup of `hash` will read first: its
    /// home group of control bytes and its home slot. A hint only.
    #[inline]
    pub fn prefetch(&self, hash: u64) {
        let i = self.home(hash);
        prefetch(self.ctrl[i..].as_ptr());
        self.prefetch_entry(i);
    }

    /// Fetches both ends of slot `i`: an entry whose size is not a divisor
    /// of the cache line straddles two lines in some slots (a 36-byte entry
    /// in 9 of 16), and the second line is otherwise a miss of its own.
    #[inline]
    fn prefetch_entry(&self, i: usize) {
        let e = (&self.slots[i] as *const E).cast::<u8>();
        prefetch(e);
        prefetch(e.wrapping_add(size_of::<E>().saturating_sub(1)));
    }

    /// Asks the CPU to fetch slot `i` and the control bytes from it on.
    #[inline]
    pub fn prefetch_slot(&self, i: usize) {
        let i = i % self.slots.len();
        prefetch(self.ctrl[i..].as_ptr());
        self.prefetch_entry(i);
    }

    /// Finds the entry for which `eq` holds among those hashed from `hash`:
    /// `Ok(index)` where it is, or `Err(index)` of the empty slot that ends
    /// its probe sequence (where [`Table::insert_at`] puts a new one).
    #[inline]
    pub fn find(&self, hash: u64, mut eq: impl FnMut(&E) -> bool) -> Result<usize, usize> {
        let fp = fingerprint(hash);
        let mut i = self.home(hash);
        loop {
            let g = self.group(i);
            let empty = !g & MSB;
            // Bytes equal to the fingerprint (false positives are possible
            // above a true match; `eq` settles every candidate).
            let x = g ^ (LSB * u64::from(fp));
            let mut hits = x.wrapping_sub(LSB) & !x & MSB;
            if empty != 0 {
                // Only slots before the first empty one are on the probe path.
                hits &= (empty & empty.wrapping_neg()) - 1;
            }
            while hits != 0 {
                let j = self.wrap(i + (hits.trailing_zeros() / 8) as usize);
                if eq(&self.slots[j]) {
                    return Ok(j);
                }
                hits &= hits - 1;
            }
            if empty != 0 {
                return Err(self.wrap(i + (empty.trailing_zeros() / 8) as usize));
            }
            i = self.wrap(i + GROUP);
        }
    }

    /// The entry at `i` (an index from [`Table::find`] or a sweep).
    #[inline]
    pub fn get(&self, i: usize) -> &E {
        &self.slots[i]
    }

    /// The entry at `i`, to change in place. Its hash input must not change.
    #[inline]
    pub fn get_mut(&mut self, i: usize) -> &mut E {
        &mut self.slots[i]
    }

    /// True when slot `i` holds an entry.
    #[inline]
    pub fn is_full(&self, i: usize) -> bool {
        self.ctrl[i] != EMPTY
    }

    /// Puts `entry` (hashed to `hash`) into the empty slot `i` that
    /// [`Table::find`] returned for it, with no change to the table between.
    ///
    /// # Panics
    /// If the slot is not empty, or the table already holds its capacity:
    /// both are caller bugs.
    #[inline]
    pub fn insert_at(&mut self, i: usize, hash: u64, entry: E) {
        assert!(self.ctrl[i] == EMPTY && self.len < self.capacity);
        self.set_ctrl(i, fingerprint(hash));
        self.slots[i] = entry;
        self.len += 1;
    }

    /// Removes the entry at `i` and shifts later entries of its cluster back,
    /// so that no probe sequence crosses a hole. Other indices held by the
    /// caller are invalid afterwards.
    pub fn remove_at(&mut self, mut hole: usize) -> E {
        let removed = self.slots[hole];
        let mut j = hole;
        loop {
            j = self.wrap(j + 1);
            if self.ctrl[j] == EMPTY {
                break;
            }
            let home = self.home(self.hash(self.slots[j].hash_input()));
            // The entry at j may move into the hole only if the hole lies on
            // its probe path: cyclically within [home, j).
            if self.dist(home, hole) < self.dist(home, j) {
                let c = self.ctrl[j];
                self.set_ctrl(hole, c);
                self.slots[hole] = self.slots[j];
                hole = j;
            }
        }
        self.set_ctrl(hole, EMPTY);
        self.len -= 1;
        removed
    }

    /// Walks at most `max_slots` slots on from where the last sweep stopped,
    /// removing every entry for which `dead` returns true (it may also do the
    /// caller's bookkeeping for the entry). Returns how many it removed and
    /// how many slots it passed (fewer than `max_slots` when it ran out of
    /// removals: the caller still owes the rest).
    ///
    /// A dead entry ends the walk's slot-by-slot pace for its run of
    /// occupied slots: [`Table::remove_run`] removes every dead entry of the
    /// rest of the run in one pass and moves the live ones back, so where
    /// many entries expire together (a run of them) the cost is the run's
    /// length once, not once per removal (a backward shift per removal made
    /// a turn that removed 2048 entries of a million expiring together take
    /// 0.45 ms). The slots of such a run count as passed. If removals used
    /// up the slot budget, a region thick with dead entries would slow the
    /// cursor below its pace, dead entries would pile up ahead of it, and it
    /// would fall further behind (seen with the first table: one cluster grew
    /// over a third of a full replay cache). At most `max_removed` removals;
    /// a run cut short by that leaves the cursor at its first hole, to be
    /// looked at again by the next call.
    pub fn sweep(
        &mut self,
        max_slots: usize,
        max_removed: usize,
        mut dead: impl FnMut(&E) -> bool,
    ) -> Swept {
        let n = self.slots.len();
        let mut removed = 0;
        let mut cursor = self.cursor;
        let budget = max_slots.min(n);
        let mut moves = budget;
        'walk: while moves > 0 && removed < max_removed && self.len > 0 {
            let first_dead = if moves >= GROUP && cursor + GROUP <= n {
                // A whole group at once. The walk is sequential but reads only
                // occupied slots, sparse ones at that: fetch a few groups
                // ahead, or every occupied slot is a cache miss it waits for.
                let ahead = cursor + SWEEP_AHEAD * GROUP;
                let ahead = if ahead < n { ahead } else { ahead % n };
                let mut full = self.group(ahead) & MSB;
                while full != 0 {
                    let j = self.wrap(ahead + (full.trailing_zeros() / 8) as usize);
                    // Both lines an entry may straddle: the sweep reads its
                    // expiry, and a removal reads the keys of the entries
                    // after it to move them back.
                    self.prefetch_entry(j);
                    full &= full - 1;
                }
                let mut occupied = self.group(cursor) & MSB;
                let mut found = None;
                while occupied != 0 {
                    let j = cursor + (occupied.trailing_zeros() / 8) as usize;
                    if dead(&self.slots[j]) {
                        found = Some(j);
                        break;
                    }
                    occupied &= occupied - 1;
                }
                match found {
                    Some(j) => j,
                    None => {
                        cursor = self.wrap(cursor + GROUP);
                        moves -= GROUP;
                        continue 'walk;
                    }
                }
            } else if self.ctrl[cursor] != EMPTY && dead(&self.slots[cursor]) {
                cursor
            } else {
                cursor = self.wrap(cursor + 1);
                moves -= 1;
                continue 'walk;
            };
            let (r, end) = self.remove_run(first_dead, max_removed - removed, &mut dead);
            removed += r;
            let end = match end {
                Ok(end) => end,
                Err(unseen) => {
                    // Out of removals within the run: go on from the first
                    // entry not looked at.
                    let passed = self.dist(cursor, unseen);
                    moves = moves.saturating_sub(passed);
                    cursor = unseen;
                    break;
                }
            };
            let passed = self.dist(cursor, end);
            moves = moves.saturating_sub(passed.max(1));
            cursor = end;
        }
        self.cursor = cursor;
        Swept {
            removed,
            passed: budget - moves,
        }
    }

    /// Removes the entry at `first` (which `dead` has just claimed), then
    /// walks the rest of its run of occupied slots once: every entry `dead`
    /// claims is removed (while `budget`, at most [`MAX_RUN_REMOVALS`],
    /// lasts), and every other entry moves back to the first empty slot on
    /// its probe path. This is deleting all of them and inserting the
    /// survivors again in order, so every entry's probe path is again free
    /// of empty slots.
    ///
    /// The empty slots made so far (the *holes*, one per removal) are kept in
    /// run order, so a survivor finds its new slot among them, the first hole
    /// at or after its home, instead of walking the slots from its home: in
    /// the long runs of a nearly full table that walk made the whole pass
    /// quadratic in the run's length (a server whose table filled stalled for
    /// good inside it).
    ///
    /// Returns the number removed and where to go on: `Ok` with the empty
    /// slot that ends the run, or `Err` with the first slot holding an entry
    /// not looked at, when the budget ran out before the end (the run is
    /// fixed up to its end either way).
    fn remove_run(
        &mut self,
        first: usize,
        budget: usize,
        dead: &mut impl FnMut(&E) -> bool,
    ) -> (usize, Result<usize, usize>) {
        let n = self.slots.len();
        let budget = budget.clamp(1, MAX_RUN_REMOVALS);
        // The holes' offsets from `first`, ascending: `buf[head..tail]` (at
        // most `budget` of them, in [`HOLES`] of room). Taken out of `self`
        // for the walk (an empty boxed slice allocates nothing) and put back
        // at the end.
        let mut buf = std::mem::take(&mut self.holes);
        // The first hole is `first` itself. The list is reused from call to
        // call, and a long run's compaction of it (below) left other offsets
        // at its start: set it, never assume it.
        buf[0] = 0;
        let (mut head, mut tail) = (0usize, 1usize);
        self.set_ctrl(first, EMPTY);
        self.len -= 1;
        let mut removed = 1;
        // Offset of the earliest slot that holds an entry not looked at (`n`:
        // none yet).
        let mut unseen = n;
        let mut k = self.wrap(first + 1);
        while self.ctrl[k] != EMPTY {
            let look = removed < budget;
            let k_off = self.dist(first, k);
            // Where the entry found at k is now: `None` if it was removed.
            let end = if look && dead(&self.slots[k]) {
                self.set_ctrl(k, EMPTY);
                self.len -= 1;
                removed += 1;
                None
            } else {
                // The first hole on the entry's probe path, cyclically within
                // [home, k): the first at or after its home, or the first of
                // all if its home lies before `first` (displaced into the run).
                let home_off = self.dist(first, self.home(self.hash(self.slots[k].hash_input())));
                let h = if home_off > k_off {
                    0
                } else {
                    buf[head..tail].partition_point(|&h| h < home_off)
                };
                if head + h < tail {
                    let hole = self.wrap(first + buf[head + h]);
                    // Take the hole out of the list (it is almost always the
                    // first); k, now empty, joins it below.
                    buf.copy_within(head..head + h, head + 1);
                    head += 1;
                    let c = self.ctrl[k];
                    self.set_ctrl(hole, c);
                    self.slots[hole] = self.slots[k];
                    self.set_ctrl(k, EMPTY);
                    Some(hole)
                } else {
                    Some(k)
                }
            };
            if end != Some(k) {
                // Removed or moved away: k is the last hole so far.
                if tail == buf.len() {
                    buf.copy_within(head..tail, 0);
                    tail -= head;
                    head = 0;
                }
                buf[tail] = k_off;
                tail += 1;
            }
            if let (false, Some(at)) = (look, end) {
                unseen = unseen.min(self.dist(first, at));
            }
            k = self.wrap(k + 1);
        }
        self.holes = buf;
        if unseen < n {
            (removed, Err(self.wrap(first + unseen)))
        } else {
            (removed, Ok(k))
        }
    }

    /// The index of the first entry at or after slot `start` (cyclically),
    /// or `None` when the table is empty. Used to sample entries.
    pub fn next_full(&self, start: usize) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        let mut i = self.wrap(start % self.slots.len());
        loop {
            let full = self.group(i) & MSB;
            if full != 0 {
                return Some(self.wrap(i + (full.trailing_zeros() / 8) as usize));
            }
            i = self.wrap(i + GROUP);
        }
    }

    /// Every entry, in slot order (for tests and diagnostics, not the hot path).
    pub fn iter(&self) -> impl Iterator<Item = &E> + '_ {
        self.ctrl[..self.slots.len()]
            .iter()
            .zip(self.slots.iter())
            .filter(|(c, _)| **c != EMPTY)
            .map(|(_, e)| e)
    }
}

/// A keyed hash of a `u64`: two rounds of folded multiply (as in foldhash).
/// Cheap, and with a secret seed an outsider cannot aim keys at one slot.
/// `seed[1]` must be odd.
#[inline]
pub fn keyed_hash(key: u64, seed: [u64; 2]) -> u64 {
    let a = fold_mul(key ^ seed[0], 0x9e37_79b9_7f4a_7c15);
    fold_mul(a, seed[1])
}

#[inline]
fn fold_mul(a: u64, b: u64) -> u64 {
    let full = u128::from(a) * u128::from(b);
    (full as u64) ^ ((full >> 64) as u64)
}

/// What one [`Table::sweep`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Swept {
    /// Entries removed.
    pub removed: usize,
    /// Slots the cursor passed.
    pub passed: usize,
}

#[inline]
fn fingerprint(hash: u64) -> u8 {
    // The low bits; the home slot uses the high bits.
    (hash as u8) | 0x80
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[derive(Clone, Copy, Default, Debug, PartialEq)]
    struct E {
        key: u64,
        value: u32,
    }

    impl Entry for E {
        fn hash_input(&self) -> u64 {
            self.key
        }
    }

    fn table(cap: usize) -> Table<E> {
        Table::try_new(cap, Load::DEFAULT, [7, 11], E::default()).unwrap()
    }

    fn get(t: &Table<E>, key: u64) -> Option<u32> {
        t.find(t.hash(key), |e| e.key == key)
            .ok()
            .map(|i| t.get(i).value)
    }

    fn put(t: &mut Table<E>, key: u64, value: u32) -> bool {
        let h = t.hash(key);
        match t.find(h, |e| e.key == key) {
            Ok(i) => {
                t.get_mut(i).value = value;
                true
            }
            Err(_) if t.len() == t.capacity() => false,
            Err(i) => {
                t.insert_at(i, h, E { key, value });
                true
            }
        }
    }

    fn del(t: &mut Table<E>, key: u64) -> Option<u32> {
        let i = t.find(t.hash(key), |e| e.key == key).ok()?;
        Some(t.remove_at(i).value)
    }

    #[test]
    fn sizes_are_checked() {
        assert_eq!(Table::<E>::bytes_for(usize::MAX, Load::DEFAULT), None);
        assert_eq!(Table::<E>::bytes_for(usize::MAX / 8, Load::DEFAULT), None);
        assert!(matches!(
            Table::try_new(usize::MAX / 64, Load::DEFAULT, [1, 2], E::default()),
            Err(AllocError::Overflow | AllocError::OutOfMemory(_))
        ));
        assert!(matches!(
            Table::try_new(1 << 45, Load::DEFAULT, [1, 2], E::default()),
            Err(AllocError::OutOfMemory(_))
        ));
        // 7/8 load: 16 bytes + 1 control byte per slot, 8/7 slots per entry.
        let t = table(1 << 20);
        let per_entry = t.allocated_bytes() as f64 / t.capacity() as f64;
        assert!((19.4..19.5).contains(&per_entry), "{per_entry}");
    }

    #[test]
    fn insert_find_remove() {
        let mut t = table(4);
        assert!(put(&mut t, 1, 10));
        assert!(put(&mut t, 1, 11));
        assert_eq!(get(&t, 1), Some(11));
        assert_eq!(get(&t, 2), None);
        assert_eq!(del(&mut t, 1), Some(11));
        assert_eq!(get(&t, 1), None);
        assert!(t.is_empty());
    }

    #[test]
    fn full_table_refuses_and_probes_end() {
        let mut t = table(3);
        for k in 0..3 {
            assert!(put(&mut t, k, 0));
        }
        assert!(!put(&mut t, 99, 0));
        assert_eq!(get(&t, 99), None);
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn sweep_removes_what_the_caller_says() {
        let mut t = table(1000);
        for k in 0..1000 {
            put(&mut t, k, k as u32);
        }
        let mut seen = 0;
        // One full pass in small steps removes every odd value.
        let mut passes = 0;
        while passes < t.slots() {
            seen += t.sweep(7, 7, |e| e.value % 2 == 1).removed;
            passes += 7;
        }
        assert_eq!(seen, 500);
        assert_eq!(t.len(), 500);
        for k in 0..1000u64 {
            assert_eq!(get(&t, k), (k % 2 == 0).then_some(k as u32));
        }
    }

    /// A run long enough that its compaction fills the list of holes and
    /// moves it back to its start, then a second run: it must begin from its
    /// own first hole, not from what the first run left in the list.
    #[test]
    fn a_long_compaction_leaves_the_next_one_whole() {
        let mut t = table(2048);
        let home = |t: &Table<E>, k: u64| t.home(t.hash(k));
        let h0 = home(&t, 0);
        // 700 keys sharing one home: one run, each survivor moves back.
        let keys: Vec<u64> = (0..).filter(|&k| home(&t, k) == h0).take(700).collect();
        for (v, &k) in keys.iter().enumerate() {
            assert!(put(&mut t, k, v as u32));
        }
        for dead in [0u32, 350] {
            let removed = t.sweep(t.slots(), usize::MAX, |e| e.value == dead).removed;
            assert_eq!(removed, 1);
        }
        assert_eq!(t.len(), 698);
        for (v, &k) in keys.iter().enumerate() {
            let want = (v != 0 && v != 350).then_some(v as u32);
            assert_eq!(get(&t, k), want, "key {k} (value {v})");
        }
        assert_eq!(t.iter().count(), 698);
    }

    /// The sweep at steps of a group or more (its group path, from cursors
    /// at any offset) reaches every entry it should remove.
    #[test]
    fn sweeps_of_any_step_reach_every_dead_entry() {
        for step in [8, 9, 13, 33, 100] {
            let mut t = table(1000);
            for k in 0..1000 {
                put(&mut t, k, k as u32);
            }
            let mut passed = 0;
            let mut removed = 0;
            // One pass over the table, no more: a slot skipped stays full.
            while passed < t.slots() {
                let s = t.sweep(step, usize::MAX, |e| e.value % 3 == 0);
                removed += s.removed;
                passed += s.passed.max(1);
            }
            assert_eq!(removed, 334, "step {step}");
            for k in 0..1000u64 {
                assert_eq!(get(&t, k), (k % 3 != 0).then_some(k as u32), "step {step}");
            }
        }
    }

    #[test]
    fn next_full_samples_entries() {
        let mut t = table(100);
        assert_eq!(t.next_full(5), None);
        put(&mut t, 42, 1);
        for start in 0..t.slots() + 20 {
            let i = t.next_full(start).unwrap();
            assert_eq!(t.get(i).key, 42);
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Put(u8, u32),
        Get(u8),
        Del(u8),
        Sweep(u8, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (any::<u8>(), any::<u32>()).prop_map(|(k, v)| Op::Put(k, v)),
            any::<u8>().prop_map(Op::Get),
            any::<u8>().prop_map(Op::Del),
            (any::<u8>(), any::<u8>()).prop_map(|(n, m)| Op::Sweep(n, m)),
        ]
    }

    proptest! {
        /// The table against a HashMap, at tiny sizes where clusters wrap
        /// around the end and groups see the mirrored control bytes.
        #[test]
        fn behaves_like_a_hashmap(cap in 1usize..40, ops in proptest::collection::vec(op(), 1..400)) {
            let mut t = table(cap);
            let mut model: HashMap<u64, u32> = HashMap::new();
            for op in ops {
                match op {
                    Op::Put(k, v) => {
                        let k = u64::from(k % 48) * 0x1_0000_0001;
                        let ok = put(&mut t, k, v);
                        let want = model.contains_key(&k) || model.len() < cap;
                        prop_assert_eq!(ok, want);
                        if ok {
                            model.insert(k, v);
                        }
                    }
                    Op::Get(k) => {
                        let k = u64::from(k % 48) * 0x1_0000_0001;
                        prop_assert_eq!(get(&t, k), model.get(&k).copied());
                    }
                    Op::Del(k) => {
                        let k = u64::from(k % 48) * 0x1_0000_0001;
                        prop_assert_eq!(del(&mut t, k), model.remove(&k));
                    }
                    Op::Sweep(n, m) => {
                        let m = u32::from(m % 4) + 2;
                        t.sweep(usize::from(n), usize::from(n % 5) + 1, |e| e.value % m == 0);
                        model.retain(|k, v| {
                            // The sweep may not have reached every such entry:
                            // keep the model in step with what the table holds.
                            *v % m != 0 || get(&t, *k).is_some()
                        });
                    }
                }
                prop_assert_eq!(t.len(), model.len());
                let live: HashMap<u64, u32> = t.iter().map(|e| (e.key, e.value)).collect();
                prop_assert_eq!(&live, &model);
            }
        }
    }

    /// Keys of a table of [`CLUSTER_CAP`] whose homes are three neighbouring
    /// slots: filled, they make one run of up to its capacity.
    const CLUSTER_CAP: usize = 2048;
    fn clustered_keys() -> &'static [u64] {
        static KEYS: std::sync::OnceLock<Vec<u64>> = std::sync::OnceLock::new();
        KEYS.get_or_init(|| {
            let t = table(CLUSTER_CAP);
            let h0 = t.home(t.hash(0));
            (0..)
                .filter(|&k| t.dist(h0, t.home(t.hash(k))) < 3)
                .take(CLUSTER_CAP)
                .collect()
        })
    }

    #[derive(Debug, Clone)]
    enum BigOp {
        Put(u16, u32),
        Del(u16),
        Sweep(u16, u16, u8),
    }

    fn big_op() -> impl Strategy<Value = BigOp> {
        prop_oneof![
            16 => (any::<u16>(), any::<u32>()).prop_map(|(k, v)| BigOp::Put(k, v)),
            2 => any::<u16>().prop_map(BigOp::Del),
            1 => (any::<u16>(), any::<u16>(), any::<u8>()).prop_map(|(n, r, m)| BigOp::Sweep(n, r, m)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// The table against a HashMap in runs of hundreds to thousands of
        /// slots, where a sweep's compaction fills and reuses its list of
        /// holes (the tiny tables above never make a run that long).
        #[test]
        fn behaves_like_a_hashmap_in_long_runs(
            fill in 600usize..CLUSTER_CAP,
            salt in any::<u32>(),
            ops in proptest::collection::vec(big_op(), 1..2000),
        ) {
            let keys = clustered_keys();
            let mut t = table(CLUSTER_CAP);
            let mut model: HashMap<u64, u32> = HashMap::new();
            // One run of `fill` entries to start from.
            for (i, &k) in keys[..fill].iter().enumerate() {
                let v = (i as u32).wrapping_mul(0x9e37_79b9) ^ salt;
                prop_assert!(put(&mut t, k, v));
                model.insert(k, v);
            }
            for op in ops {
                match op {
                    BigOp::Put(i, v) => {
                        let k = keys[usize::from(i) % keys.len()];
                        let ok = put(&mut t, k, v);
                        prop_assert_eq!(ok, model.contains_key(&k) || model.len() < CLUSTER_CAP);
                        if ok {
                            model.insert(k, v);
                        }
                    }
                    BigOp::Del(i) => {
                        let k = keys[usize::from(i) % keys.len()];
                        prop_assert_eq!(del(&mut t, k), model.remove(&k));
                    }
                    BigOp::Sweep(n, r, m) => {
                        // A few dead in each run (1 in 16), so that runs
                        // stay long and most of a compaction is moves.
                        let m = u32::from(m % 16);
                        let mut gone = Vec::new();
                        t.sweep(usize::from(n), usize::from(r) + 1, |e| {
                            let dead = e.value % 16 == m;
                            if dead {
                                gone.push(e.key);
                            }
                            dead
                        });
                        for k in gone {
                            prop_assert!(model.remove(&k).is_some(), "swept {} twice", k);
                        }
                        prop_assert_eq!(t.len(), model.len());
                        let live: HashMap<u64, u32> = t.iter().map(|e| (e.key, e.value)).collect();
                        prop_assert_eq!(&live, &model);
                    }
                }
            }
        }
    }
}
