//! The host side of the serial console: the user's terminal.
//!
//! When stdin is a terminal it is put in raw mode, so every key (Ctrl-C
//! included) reaches the guest, as on a real serial line; `Ctrl-a x` quits,
//! `Ctrl-a Ctrl-a` sends a literal Ctrl-a (QEMU's `-serial mon:stdio` keys).
//! The terminal's settings are restored when the guard drops (normal exit,
//! error, signals handled by the event loop) and by a panic hook.

use std::os::fd::RawFd;
use std::sync::Mutex;

/// The escape key: Ctrl-a.
pub const ESCAPE: u8 = 0x01;

/// Saved terminal settings, for the panic hook.
static SAVED: Mutex<Option<(RawFd, libc::termios)>> = Mutex::new(None);

/// Raw mode on a terminal, undone on drop.
pub struct RawTerminal {
    fd: RawFd,
    saved: libc::termios,
}

/// True if `fd` is a terminal.
pub fn is_tty(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

impl RawTerminal {
    /// Puts terminal `fd` in raw mode; None if it is not a terminal.
    pub fn enable(fd: RawFd) -> Option<Self> {
        Self::enable_with(fd, false)
    }

    /// Raw input, but output post-processing kept on (`\n` still starts a new line): for the Linux
    /// lane's client, where the guest's bytes and the inner ember's own messages (plain `\n` lines
    /// on its stderr) share the user's terminal.
    pub fn enable_keeping_output(fd: RawFd) -> Option<Self> {
        Self::enable_with(fd, true)
    }

    fn enable_with(fd: RawFd, keep_output_processing: bool) -> Option<Self> {
        if !is_tty(fd) {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it for a valid tty fd.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is a terminal and `saved` is a valid termios to fill.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the struct we own.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Output post-processing off too (the guest sends its own CR LF), unless asked for.
        if keep_output_processing {
            raw.c_oflag |= libc::OPOST | libc::ONLCR;
        }
        // SAFETY: valid fd and termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some((fd, saved));
        install_panic_hook();
        Some(RawTerminal { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read from this same terminal.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// Puts the terminal back as [`RawTerminal::enable`] found it, if it is in raw
/// mode, for a path that ends ember without unwinding (the sandbox's SIGSYS
/// handler). Never blocks: a `try_lock` and one `tcsetattr`.
pub fn restore_terminal_now() {
    if let Ok(saved) = SAVED.try_lock()
        && let Some((fd, t)) = *saved
    {
        // SAFETY: restores saved settings on the same terminal.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) };
    }
}

fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some((fd, t)) = *SAVED.lock().unwrap_or_else(|e| e.into_inner()) {
                // SAFETY: restores saved settings on the same terminal.
                unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) };
            }
            prev(info);
        }));
    });
}

/// Tracks the `Ctrl-a` escape across reads.
#[derive(Default)]
pub struct Escape {
    armed: bool,
}

impl Escape {
    /// Filters `input` into `out`; returns true if the user asked to quit.
    pub fn filter(&mut self, input: &[u8], out: &mut Vec<u8>) -> bool {
        for &b in input {
            if self.armed {
                self.armed = false;
                match b {
                    b'x' | b'X' => return true,
                    ESCAPE => out.push(ESCAPE),
                    other => out.extend_from_slice(&[ESCAPE, other]),
                }
            } else if b == ESCAPE {
                self.armed = true;
            } else {
                out.push(b);
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_a_x_quits_even_across_reads() {
        let mut e = Escape::default();
        let mut out = Vec::new();
        assert!(!e.filter(b"ls\r\x01", &mut out));
        assert_eq!(out, b"ls\r");
        assert!(e.filter(b"x", &mut out));
    }

    #[test]
    fn ctrl_a_ctrl_a_is_a_literal() {
        let mut e = Escape::default();
        let mut out = Vec::new();
        assert!(!e.filter(b"\x01\x01a\x01b", &mut out));
        assert_eq!(out, b"\x01a\x01b");
    }

    #[test]
    fn not_a_tty() {
        assert!(RawTerminal::enable(-1).is_none());
    }
}
