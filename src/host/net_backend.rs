//! The host end of a virtio-net device: a tap ([`crate::host::tap`],
//! `--net tap=NAME`) or a frame stream ([`crate::host::frame_stream`]: to
//! passt for `--net user`, or to a socket or character device for
//! `--net stream=PATH`).
//!
//! Both carry frames that start with the 12-byte `virtio_net_hdr_v1` (virtio
//! 1.2, 5.1.6) as the device sees them; only a tap passes the header's offload
//! information on (IFF_VNET_HDR), so only a tap lets the device offer the guest
//! checksum and segmentation offloads ([`NetBackend::offloads`]).

use std::io;
use std::os::fd::RawFd;

use super::frame_stream::FrameStream;
use super::tap::{Tap, TapError};

/// Where a virtio-net device's frames go.
#[derive(Debug)]
pub enum NetBackend {
    /// A host tap.
    Tap(Tap),
    /// A stream of length-prefixed frames (passt).
    Stream(FrameStream),
}

impl NetBackend {
    /// What it is, for messages: `tap NAME`, `passt`, a path.
    pub fn describe(&self) -> String {
        match self {
            NetBackend::Tap(t) => format!("tap {}", t.name()),
            NetBackend::Stream(s) => s.name().to_string(),
        }
    }

    /// The descriptor the event loop watches.
    pub fn fd(&self) -> RawFd {
        match self {
            NetBackend::Tap(t) => t.fd(),
            NetBackend::Stream(s) => s.fd(),
        }
    }

    /// Whether the vnet header's offload information reaches the other side,
    /// so the device may offer CSUM/TSO to the guest.
    pub fn offloads(&self) -> bool {
        matches!(self, NetBackend::Tap(_))
    }

    /// Whether the event loop must also tell the device when the descriptor
    /// becomes writable (a stream can hold a partly written frame).
    pub fn wants_writable(&self) -> bool {
        matches!(self, NetBackend::Stream(_))
    }

    /// Reads one frame, vnet header first, into `buf`; `Ok(None)`: none waiting.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self {
            NetBackend::Tap(t) => t.read_frame(buf),
            NetBackend::Stream(s) => s.read_frame(buf),
        }
    }

    /// Writes one frame, vnet header first (a stream overwrites the header).
    pub fn write_frame(&mut self, frame: &mut [u8]) -> io::Result<()> {
        match self {
            NetBackend::Tap(t) => t.write_frame(frame),
            NetBackend::Stream(s) => s.write_frame(frame),
        }
    }

    /// True while the backend cannot take another frame (a stream with part
    /// of a frame unwritten); a tap never blocks (a full queue drops).
    pub fn tx_blocked(&self) -> bool {
        match self {
            NetBackend::Tap(_) => false,
            NetBackend::Stream(s) => s.tx_blocked(),
        }
    }

    /// Writes what a stream holds back; nothing for a tap.
    pub fn flush(&mut self) -> io::Result<()> {
        match self {
            NetBackend::Tap(_) => Ok(()),
            NetBackend::Stream(s) => s.flush(),
        }
    }

    /// TUNSETOFFLOAD on a tap (see [`Tap::set_offload`]); nothing on a stream.
    pub fn set_offload(&self, flags: libc::c_uint) -> Result<(), TapError> {
        match self {
            NetBackend::Tap(t) => t.set_offload(flags),
            NetBackend::Stream(_) => Ok(()),
        }
    }
}
