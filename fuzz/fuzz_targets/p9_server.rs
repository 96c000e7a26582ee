//! What a guest controls in a shared folder's server beyond the `p9` crate
//! (which has its own fuzzing): ember's rewrite of open flags and its fid-path
//! tracker, fed arbitrary requests and replies (`host/p9_server.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ember::host::p9_server::fuzz_parsers(data);
});
