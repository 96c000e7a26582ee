//! Opening the host files a VM is built from: the kernel, the initrd and disk
//! images.
//!
//! open(2) of a FIFO blocks until the other end appears, so `--kernel FIFO`
//! would hang ember before it said a word; a directory or a character device
//! opens fine but is no image. So the type is checked with stat(2) first, the
//! file is opened with O_NONBLOCK (an open that can never block, open(2)), the
//! type is checked again on the descriptor (the path may have changed in
//! between), and O_NONBLOCK is cleared for the reads that follow.

use std::fs::{File, FileType, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// What a file may be besides a regular file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allow {
    /// Regular files only (kernel, initrd).
    RegularFile,
    /// Regular files and block devices (disk images).
    RegularFileOrBlockDevice,
}

/// Opens `path` for reading (and writing with `write`), refusing anything
/// that is not a regular file (or a block device, when `allow` says so). The
/// refusal is an `InvalidInput` error that names what the path is.
pub fn open_image(path: &Path, write: bool, allow: Allow) -> io::Result<File> {
    check_type(std::fs::metadata(path)?.file_type(), allow)?;
    let file = OpenOptions::new().read(true).write(write).custom_flags(libc::O_NONBLOCK).open(path)?;
    check_type(file.metadata()?.file_type(), allow)?;
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no memory is involved.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(file)
}

fn check_type(t: FileType, allow: Allow) -> io::Result<()> {
    let what = if t.is_file() || (t.is_block_device() && allow == Allow::RegularFileOrBlockDevice) {
        return Ok(());
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    let needed = match allow {
        Allow::RegularFile => "a regular file",
        Allow::RegularFileOrBlockDevice => "a regular file or a block device",
    };
    Err(io::Error::new(io::ErrorKind::InvalidInput, format!("it is {what}, ember needs {needed}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_fifos_and_directories_without_blocking() {
        let dir = std::env::temp_dir().join(format!("ember-host-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for (path, what) in [(&fifo, "FIFO"), (&dir, "directory")] {
            for write in [false, true] {
                let e = open_image(path, write, Allow::RegularFileOrBlockDevice).unwrap_err();
                assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
                assert!(e.to_string().contains(what), "{e}");
            }
        }
        let e = open_image(Path::new("/dev/null"), false, Allow::RegularFile).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        let file = dir.join("file");
        std::fs::write(&file, b"x").unwrap();
        let f = open_image(&file, true, Allow::RegularFile).unwrap();
        // SAFETY: F_GETFL on a descriptor we own.
        assert_eq!(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) } & libc::O_NONBLOCK, 0, "blocking again");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
