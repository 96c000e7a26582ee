//! Ethernet frames over a byte stream, the host end of a virtio-net device
//! whose other side is passt (`--net user`, [`crate::host::passt`]) or any
//! peer that speaks the same protocol (`--net stream=PATH`).
//!
//! The protocol is the one of QEMU's `-netdev stream` and passt's socket
//! (passt(1), "--socket"; QEMU docs/system/devices/net.rst): each Ethernet
//! frame, without any vnet header, is preceded by its length as a 32-bit
//! big-endian number. Nothing else crosses: no checksum or segmentation
//! offload information, so the virtio-net device offers the guest no offloads
//! on such a backend and every frame is complete (checksums filled in, at most
//! one MTU).
//!
//! What crosses here: the device hands [`FrameStream::write_frame`] a frame
//! that starts with the 12-byte `virtio_net_hdr_v1`; the header's last four
//! bytes are overwritten with the length prefix and the rest is written, so a
//! frame leaves in one write(2) without a copy. In the other direction
//! [`FrameStream::read_frame`] gathers bytes from the stream until a whole frame
//! is there, and returns it after a zeroed vnet header (no offloads: flags 0,
//! GSO_NONE), as a tap with IFF_VNET_HDR would.
//!
//! The stream is non-blocking (a Unix stream socket, or a character device
//! such as a virtio-serial port in the Linux lane's outer machine). A write
//! that does not go out whole keeps the rest of that frame in `pending`:
//! frames never interleave and none is cut, and while something is pending the
//! device takes no more frames from the guest ([`FrameStream::tx_blocked`]);
//! the event loop watches the descriptor for writability too, and the device
//! calls [`FrameStream::flush`] when it fires.
//!
//! The peer is trusted as much as a host tap is, but a length it sends that no
//! frame can have (0, or more than [`MAX_STREAM_FRAME`]) is skipped, not
//! believed: the bytes are read and dropped. End of stream (the peer exited)
//! is reported once; afterwards reads find nothing and writes are dropped.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use super::tap::VNET_HDR_LEN;

/// Bytes of the length prefix.
const PREFIX_LEN: usize = 4;
/// Largest frame accepted from the peer: a 65535-byte IP packet in an
/// Ethernet frame with a VLAN tag (passt's own limit is 65535 + 14).
pub const MAX_STREAM_FRAME: usize = 65535 + 18;
/// Size of the receive buffer: several frames per read(2).
const IN_BUF: usize = 4 * (MAX_STREAM_FRAME + PREFIX_LEN);

/// One end of a frame stream.
#[derive(Debug)]
pub struct FrameStream {
    file: File,
    /// What it is, for messages ("passt", a path).
    name: String,
    /// Bytes read and not yet returned: `inbuf[in_start..in_end]`.
    inbuf: Vec<u8>,
    in_start: usize,
    in_end: usize,
    /// Bytes of an oversized frame still to be skipped.
    skip: usize,
    /// The unwritten rest of the last frame.
    pending: Vec<u8>,
    /// The peer closed the stream.
    closed: bool,
}

impl FrameStream {
    /// A stream on `file`, which must be non-blocking.
    pub fn new(file: File, name: impl Into<String>) -> FrameStream {
        FrameStream {
            file,
            name: name.into(),
            inbuf: vec![0; IN_BUF],
            in_start: 0,
            in_end: 0,
            skip: 0,
            pending: Vec::new(),
            closed: false,
        }
    }

    /// What the stream is connected to.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The descriptor, for the event loop.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Reads one frame into `buf` after a zeroed vnet header
    /// ([`VNET_HDR_LEN`] bytes); `Ok(None)` when no whole frame is waiting.
    /// `buf` must hold [`VNET_HDR_LEN`] + [`MAX_STREAM_FRAME`] bytes.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            if let Some(len) = self.take_frame(buf) {
                return Ok(Some(len));
            }
            if self.closed {
                return Ok(None);
            }
            // Room at the end: move what is left to the front.
            if self.in_start > 0 {
                self.inbuf.copy_within(self.in_start..self.in_end, 0);
                self.in_end -= self.in_start;
                self.in_start = 0;
            }
            let room = &mut self.inbuf[self.in_end..];
            // SAFETY: reads at most room.len() bytes into `room`.
            let n = unsafe { libc::read(self.file.as_raw_fd(), room.as_mut_ptr().cast(), room.len()) };
            if n > 0 {
                self.in_end += n as usize;
                continue;
            }
            if n == 0 {
                self.closed = true;
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("{} closed the stream", self.name)));
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(None),
                _ => return Err(e),
            }
        }
    }

    /// Takes one whole frame out of `inbuf`, skipping impossible ones.
    fn take_frame(&mut self, buf: &mut [u8]) -> Option<usize> {
        loop {
            let avail = self.in_end - self.in_start;
            if self.skip > 0 {
                let n = self.skip.min(avail);
                self.skip -= n;
                self.in_start += n;
                if self.skip > 0 {
                    return None;
                }
                continue;
            }
            if avail < PREFIX_LEN {
                return None;
            }
            let p = &self.inbuf[self.in_start..self.in_start + PREFIX_LEN];
            let len = u32::from_be_bytes([p[0], p[1], p[2], p[3]]) as usize;
            if len == 0 || len > MAX_STREAM_FRAME || VNET_HDR_LEN + len > buf.len() {
                log::warn!("{}: a frame of {len} bytes: skipped", self.name);
                self.in_start += PREFIX_LEN;
                self.skip = len;
                continue;
            }
            if avail < PREFIX_LEN + len {
                return None;
            }
            let at = self.in_start + PREFIX_LEN;
            buf[..VNET_HDR_LEN].fill(0);
            buf[VNET_HDR_LEN..VNET_HDR_LEN + len].copy_from_slice(&self.inbuf[at..at + len]);
            self.in_start = at + len;
            if self.in_start == self.in_end {
                self.in_start = 0;
                self.in_end = 0;
            }
            return Some(VNET_HDR_LEN + len);
        }
    }

    /// True while part of a frame waits to be written: the device must not
    /// take another from the guest until [`FrameStream::flush`] empties it.
    pub fn tx_blocked(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Writes one frame that starts with a vnet header (which is not sent).
    /// Whatever the stream does not take now is kept and sent by `flush`.
    /// `frame` is changed: the length prefix goes over the header's end.
    pub fn write_frame(&mut self, frame: &mut [u8]) -> io::Result<()> {
        if frame.len() < VNET_HDR_LEN {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a frame shorter than its vnet header"));
        }
        if self.closed {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, format!("{} closed the stream", self.name)));
        }
        let len = frame.len() - VNET_HDR_LEN;
        let start = VNET_HDR_LEN - PREFIX_LEN;
        frame[start..VNET_HDR_LEN].copy_from_slice(&(len as u32).to_be_bytes());
        let out = &frame[start..];
        if !self.pending.is_empty() {
            // Only reached if the caller ignored tx_blocked: keep the order.
            self.pending.extend_from_slice(out);
            return self.flush();
        }
        let written = self.write_some(out)?;
        if written < out.len() {
            self.pending.extend_from_slice(&out[written..]);
        }
        Ok(())
    }

    /// Writes what is pending, as far as the stream takes it.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let written = match self.write_some(&pending) {
            Ok(n) => n,
            Err(e) => {
                // The peer is gone (EPIPE) or broken: nothing more can go out.
                self.closed = true;
                return Err(e);
            }
        };
        self.pending = pending;
        self.pending.drain(..written);
        Ok(())
    }

    /// One write(2), retried on EINTR; EAGAIN is 0 bytes.
    fn write_some(&mut self, data: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: writes data.len() bytes from `data`.
            let n = unsafe { libc::write(self.file.as_raw_fd(), data.as_ptr().cast(), data.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(0),
                _ => {
                    if e.raw_os_error() == Some(libc::EPIPE) {
                        self.closed = true;
                    }
                    return Err(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    fn pair() -> (FrameStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (FrameStream::new(File::from(std::os::fd::OwnedFd::from(a)), "test"), b)
    }

    fn framed(payload: &[u8]) -> Vec<u8> {
        let mut v = (payload.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn frames_split_across_reads_and_several_per_read() {
        let (mut s, mut peer) = pair();
        let mut buf = vec![0xffu8; VNET_HDR_LEN + MAX_STREAM_FRAME];
        let a: Vec<u8> = (0..60).collect();
        let b: Vec<u8> = (0..100).map(|i| i as u8 ^ 0x5a).collect();
        let wire = [framed(&a), framed(&b)].concat();
        peer.write_all(&wire[..3]).unwrap();
        assert_eq!(s.read_frame(&mut buf).unwrap(), None, "half a prefix");
        peer.write_all(&wire[3..40]).unwrap();
        assert_eq!(s.read_frame(&mut buf).unwrap(), None, "half a frame");
        peer.write_all(&wire[40..]).unwrap();
        assert_eq!(s.read_frame(&mut buf).unwrap(), Some(VNET_HDR_LEN + 60));
        assert_eq!(&buf[..VNET_HDR_LEN], &[0; VNET_HDR_LEN], "a zeroed vnet header");
        assert_eq!(&buf[VNET_HDR_LEN..VNET_HDR_LEN + 60], &a[..]);
        assert_eq!(s.read_frame(&mut buf).unwrap(), Some(VNET_HDR_LEN + 100));
        assert_eq!(&buf[VNET_HDR_LEN..VNET_HDR_LEN + 100], &b[..]);
        assert_eq!(s.read_frame(&mut buf).unwrap(), None);
    }

    #[test]
    fn impossible_lengths_are_skipped() {
        let (mut s, mut peer) = pair();
        let mut buf = vec![0u8; VNET_HDR_LEN + MAX_STREAM_FRAME];
        let big = vec![7u8; MAX_STREAM_FRAME + 1];
        peer.write_all(&framed(&[])).unwrap();
        let good = [1u8; 20];
        let wire = [framed(&big), framed(&good)].concat();
        let writer = std::thread::spawn(move || peer.write_all(&wire).map(|_| peer));
        let mut got = None;
        for _ in 0..1000 {
            if let Some(n) = s.read_frame(&mut buf).unwrap() {
                got = Some(n);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let _peer = writer.join().unwrap().unwrap();
        assert_eq!(got, Some(VNET_HDR_LEN + 20));
        assert_eq!(&buf[VNET_HDR_LEN..VNET_HDR_LEN + 20], &good);
    }

    #[test]
    fn writes_prefix_the_length_and_keep_a_partial_frame() {
        let (mut s, mut peer) = pair();
        let mut f = vec![0xaau8; VNET_HDR_LEN];
        f.extend((0..50).map(|i| i as u8));
        s.write_frame(&mut f.clone()).unwrap();
        let mut got = vec![0u8; 54];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got[..4], &50u32.to_be_bytes());
        assert_eq!(&got[4..], &f[VNET_HDR_LEN..]);
        // Fill the socket until a frame goes out only in part.
        let mut big = vec![0u8; VNET_HDR_LEN + 60000];
        let mut sent = 0;
        while !s.tx_blocked() {
            s.write_frame(&mut big).unwrap();
            sent += 1;
            assert!(sent < 10_000);
        }
        // The reader drains; flushing finishes the frame and nothing is cut.
        let reader = std::thread::spawn(move || {
            let mut frames = 0;
            let mut hdr = [0u8; 4];
            while peer.read_exact(&mut hdr).is_ok() {
                let mut body = vec![0u8; u32::from_be_bytes(hdr) as usize];
                peer.read_exact(&mut body).unwrap();
                frames += 1;
            }
            frames
        });
        while s.tx_blocked() {
            s.flush().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        drop(s);
        assert_eq!(reader.join().unwrap(), sent);
    }

    #[test]
    fn end_of_stream_is_reported_once() {
        let (mut s, peer) = pair();
        drop(peer);
        let mut buf = vec![0u8; VNET_HDR_LEN + MAX_STREAM_FRAME];
        assert!(s.read_frame(&mut buf).is_err());
        assert_eq!(s.read_frame(&mut buf).unwrap(), None);
        assert!(s.write_frame(&mut [0u8; 40]).is_err());
    }
}
