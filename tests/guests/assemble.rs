//! Assembling a tiny guest with the host's GNU binutils: `as --64`, then `ld` with a guest linker
//! script (no PVH note: tests/guests/guest.ld; with one: src/demo/guest.ld). One copy of the two
//! commands for the three builders of guests: build.rs (the demo's guests, built into ember),
//! tests/common (the test guests) and benches/virtio_blk.rs. Each includes this file with
//! `#[path]`, so it uses nothing but std.

use std::path::Path;
use std::process::Command;

/// Assembles `src` (`.include` searched in `include_dirs`, in order) into `obj`, and links it
/// with `ld_script` into `elf`. Err: the command that failed, with what it printed.
pub fn assemble_and_link(
    src: &Path,
    include_dirs: &[&Path],
    ld_script: &Path,
    obj: &Path,
    elf: &Path,
) -> Result<(), String> {
    let mut as_cmd = Command::new("as");
    as_cmd.arg("--64");
    for dir in include_dirs {
        as_cmd.arg("-I").arg(dir);
    }
    run(as_cmd.arg("-o").arg(obj).arg(src))?;
    run(Command::new("ld")
        .args(["-m", "elf_x86_64", "-n", "--no-warn-rwx-segments", "-T"])
        .arg(ld_script)
        .arg("-o")
        .arg(elf)
        .arg(obj))
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("cannot run {cmd:?}: {e} (install binutils)"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}
