//! Fuzz target `v2`: the protocol v2 parsers on arbitrary bytes.
//!
//! The properties live in `fuzz/common/v2_check.rs`, shared with the CI
//! property test `tests/auth_v2_props.rs`: no panic; only the exact length
//! is accepted; what is accepted emits back to the same bytes; errors come
//! in order (length, magic, version, type); seed and v2 never both accept a
//! datagram. Each input is tried as is, and once more behind a valid header
//! (type chosen by its first byte) so the fuzzer reaches the field checks
//! without having to discover the magic first.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../common/v2_check.rs"]
mod v2_check;

fuzz_target!(|data: &[u8]| {
    v2_check::check_datagram(data);
    if let Some((&ty, rest)) = data.split_first() {
        let mut framed = v2_check::header(ty % 4).to_vec();
        framed.extend_from_slice(rest);
        v2_check::check_datagram(&framed);
    }
});
