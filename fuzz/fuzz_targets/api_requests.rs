//! What an API client controls: the bytes of an HTTP request on the socket (`api/http.rs`),
//! the JSON bodies of Firecracker's endpoints and of `--config-file` (`api/model.rs`), and a
//! snapshot's state file (`snapshot/`, which `PUT /snapshot/load` names). Beyond "no panic":
//! a parsed request never claims more bytes than it was given, and an accepted state file
//! round-trips through the writer.
#![no_main]

use ember::api::http::{Parsed, parse};
use ember::api::model::{Drive, MachineConfig, NetworkInterface, SnapshotLoad, VmResources};
use ember::snapshot::{decode_state, write_state};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Parsed::Request(req, used) => {
            assert!(used <= data.len());
            let _ = serde_json::from_slice::<MachineConfig>(&req.body).map(|m| m.check());
            let _ = serde_json::from_slice::<Drive>(&req.body).map(|d| d.check());
            let _ = serde_json::from_slice::<NetworkInterface>(&req.body);
            let _ = serde_json::from_slice::<SnapshotLoad>(&req.body).map(|l| l.memory_path());
            if let Ok(text) = std::str::from_utf8(&req.body)
                && let Ok(r) = VmResources::from_config_file(text)
            {
                let _ = r.vm_config(&ember::config::SerialMode::None, ember::sandbox::SeccompMode::Off);
            }
        }
        Parsed::Incomplete | Parsed::Error(_) => {}
    }
    if let Ok(snap) = decode_state(data, "fuzz") {
        let mut out = Vec::new();
        write_state(&snap, &mut out, "fuzz").expect("a decoded state encodes");
        decode_state(&out, "fuzz").expect("an encoded state decodes");
    }
});
