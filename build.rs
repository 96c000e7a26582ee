//! Assembles ember's built-in guests (src/demo/*.S) with the host's GNU
//! binutils (`as`, `ld`: Debian's binutils, present wherever gcc is), so the
//! `ember` binary carries them and `ember demo` needs no files.
//!
//! Two include directories: src/demo (guest.inc, what the demo guests share)
//! and tests/guests (virtio_mmio.inc, the virtio-mmio setup steps that
//! src/demo/virtio.S shares with the virtio test guests, and lapic.inc, the
//! local APIC constants of src/demo/smp2.S and the smp test guest; they live
//! there because the test and bench builders already search that directory). An include is
//! named .inc, never .S: every .S in src/demo is assembled as a guest.

use std::path::{Path, PathBuf};

#[path = "tests/guests/assemble.rs"]
mod assemble;

/// The directories `.include` searches, in order.
const INCLUDE_DIRS: [&str; 2] = ["src/demo", "tests/guests"];

/// Assembles and links `src` into `out/name.elf` with the shared guest linker script.
pub fn build_guest(src: &Path, ld_script: &Path, out: &Path, name: &str) -> PathBuf {
    let obj = out.join(format!("{name}.o"));
    let elf = out.join(format!("{name}.elf"));
    let include_dirs = INCLUDE_DIRS.map(Path::new);
    assemble::assemble_and_link(src, &include_dirs, ld_script, &obj, &elf).unwrap_or_else(|e| panic!("{e}"));
    elf
}

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dir = Path::new("src/demo");
    let ld = dir.join("guest.ld");
    println!("cargo:rerun-if-changed={}", ld.display());
    // The directory itself: a new chapter's .S file must rebuild the guests.
    println!("cargo:rerun-if-changed={}", dir.display());
    for include in
        ["src/demo/guest.inc", "tests/guests/virtio_mmio.inc", "tests/guests/lapic.inc", "tests/guests/assemble.rs"]
    {
        println!("cargo:rerun-if-changed={include}");
    }
    for entry in std::fs::read_dir(dir).expect("src/demo exists") {
        let path = entry.expect("readable dir entry").path();
        if path.extension().is_some_and(|e| e == "S") {
            println!("cargo:rerun-if-changed={}", path.display());
            let name = path.file_stem().and_then(|s| s.to_str()).expect("UTF-8 file name");
            build_guest(&path, &ld, &out, name);
        }
    }
}
