//! One virtio-blk request as a typed value (virtio 1.2, 5.2.6 "Device
//! Operation"): [`Request::parse`] checks a descriptor chain against the
//! spec and the disk, [`Block::execute`](super::Block) does the I/O.
//!
//! A request is one chain (5.2.6): a device-readable header (`struct
//! virtio_blk_outhdr`: type, reserved, sector; 16 bytes), data buffers, and a
//! device-writable status byte, the last byte of the chain. What the parser
//! refuses, and how the guest hears of it:
//! - no device-writable status byte at the end of the chain, or one outside
//!   guest RAM: nothing can be answered; the chain is returned with length 0
//!   ([`RequestError::NoStatus`], [`RequestError::StatusOutsideRam`]);
//! - with a status byte, a header that is write-only, short or outside guest
//!   RAM, data buffers of the wrong direction, a length that is not whole
//!   sectors or sectors past the end (all the driver's mistakes, 5.2.6.1), a
//!   write to a read-only disk (5.2.6.2: "MUST set the status byte to
//!   VIRTIO_BLK_S_IOERR for a write request if the VIRTIO_BLK_F_RO feature
//!   is offered, and MUST NOT write any data") or a GET_ID without a writable
//!   buffer: VIRTIO_BLK_S_IOERR ([`RequestError::Invalid`]);
//! - a type ember does not know parses, as [`RequestType::Unsupported`], and
//!   is answered VIRTIO_BLK_S_UNSUPP (5.2.6).
//!
//! The parser reads the header and checks addresses; it does no I/O. The
//! data buffers are borrowed from the chain, so a request costs no
//! allocation.

use thiserror::Error;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::SECTOR_SIZE;

/// `struct virtio_blk_outhdr`: type (u32), reserved (u32), sector (u64).
const OUTHDR_SIZE: u32 = 16;

/// What the parser checks a request against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskLimits {
    /// The disk's size in 512-byte sectors.
    pub capacity_sectors: u64,
    /// VIRTIO_BLK_F_RO: writes are refused.
    pub read_only: bool,
}

/// The request types of 5.2.6 (`type` in `struct virtio_blk_outhdr`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// VIRTIO_BLK_T_IN: read sectors into the data buffers.
    In,
    /// VIRTIO_BLK_T_OUT: write the data buffers to sectors.
    Out,
    /// VIRTIO_BLK_T_FLUSH: make every completed write durable.
    Flush,
    /// VIRTIO_BLK_T_GET_ID: the device's 20-byte serial into the data buffers.
    GetId,
    /// Any other type (discard, write-zeroes, ...: not offered).
    Unsupported(u32),
}

impl RequestType {
    fn from_wire(value: u32) -> RequestType {
        match value {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            other => RequestType::Unsupported(other),
        }
    }
}

/// A request that passed [`Request::parse`]: ready to execute.
#[derive(Debug)]
pub struct Request<'a> {
    /// What the driver asks for.
    pub request_type: RequestType,
    /// The first sector (In and Out; whatever the header said otherwise).
    pub sector: u64,
    /// The data buffers, in chain order: device-writable for In and GetId,
    /// device-readable for Out; In and Out ones are in guest RAM and whole
    /// sectors inside the disk.
    pub data: &'a [Descriptor],
    /// Where the status byte goes (in guest RAM).
    pub status: GuestAddress,
}

/// Why a chain is not a request ember executes.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum RequestError {
    /// The chain does not end in a device-writable byte: no answer is possible.
    #[error("request without a writable status byte: returned unanswered")]
    NoStatus,
    /// The status byte's address is not guest RAM: no answer is possible.
    #[error("status byte at {0:#x} is outside guest RAM")]
    StatusOutsideRam(u64),
    /// The request is answered VIRTIO_BLK_S_IOERR at `status`.
    #[error("{reason}")]
    Invalid {
        /// Where the status byte goes.
        status: GuestAddress,
        /// What is wrong.
        reason: InvalidRequest,
    },
}

/// What is wrong with a request that can still be answered (VIRTIO_BLK_S_IOERR).
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum InvalidRequest {
    /// The header is device-writable or shorter than `struct virtio_blk_outhdr`.
    #[error("header descriptor is write-only or shorter than 16 bytes")]
    BadHeader,
    /// The header's address is not guest RAM.
    #[error("header at {0:#x} is outside guest RAM")]
    HeaderOutsideRam(u64),
    /// A data buffer of the wrong direction for the request type.
    #[error("data buffer of the wrong direction for request type {0}")]
    WrongDirection(u32),
    /// VIRTIO_BLK_T_OUT on a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// Not whole sectors, or sectors past the end of the disk.
    #[error("{bytes} bytes at sector {sector}: not whole sectors, or past the end ({capacity_sectors} sectors)")]
    OutOfRange {
        /// The data buffers' total length.
        bytes: u64,
        /// The first sector.
        sector: u64,
        /// The disk's size.
        capacity_sectors: u64,
    },
    /// VIRTIO_BLK_T_GET_ID without data buffers, or with a device-readable one.
    #[error("GET_ID without a writable buffer")]
    NoIdBuffer,
}

impl<'a> Request<'a> {
    /// Parses the chain `descs` (in order) against `disk`.
    pub fn parse(
        descs: &'a [Descriptor],
        mem: &GuestMemoryMmap,
        disk: DiskLimits,
    ) -> Result<Request<'a>, RequestError> {
        let Some((status, rest)) = descs.split_last() else { return Err(RequestError::NoStatus) };
        let Some((header, data)) = rest.split_first() else { return Err(RequestError::NoStatus) };
        if !status.is_write_only() || status.len() == 0 {
            return Err(RequestError::NoStatus);
        }
        let status = match status.addr().0.checked_add(u64::from(status.len()) - 1).map(GuestAddress) {
            Some(a) if mem.address_in_range(a) => a,
            _ => return Err(RequestError::StatusOutsideRam(status.addr().0)),
        };
        let invalid = |reason| RequestError::Invalid { status, reason };
        if header.is_write_only() || header.len() < OUTHDR_SIZE {
            return Err(invalid(InvalidRequest::BadHeader));
        }
        let mut h = [0u8; OUTHDR_SIZE as usize];
        if mem.read_slice(&mut h, header.addr()).is_err() {
            return Err(invalid(InvalidRequest::HeaderOutsideRam(header.addr().0)));
        }
        // The slices have the sizes of their types.
        let wire_type = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
        let request_type = RequestType::from_wire(wire_type);
        match request_type {
            RequestType::In | RequestType::Out => {
                let write = request_type == RequestType::Out;
                if data.iter().any(|d| d.is_write_only() == write) {
                    return Err(invalid(InvalidRequest::WrongDirection(wire_type)));
                }
                if write && disk.read_only {
                    return Err(invalid(InvalidRequest::ReadOnly));
                }
                let bytes: u64 = data.iter().map(|d| u64::from(d.len())).sum();
                let in_range = sector.checked_add(bytes / SECTOR_SIZE).is_some_and(|end| end <= disk.capacity_sectors);
                if !bytes.is_multiple_of(SECTOR_SIZE) || !in_range {
                    let capacity_sectors = disk.capacity_sectors;
                    return Err(invalid(InvalidRequest::OutOfRange { bytes, sector, capacity_sectors }));
                }
            }
            RequestType::GetId => {
                if data.is_empty() || data.iter().any(|d| !d.is_write_only()) {
                    return Err(invalid(InvalidRequest::NoIdBuffer));
                }
            }
            RequestType::Flush | RequestType::Unsupported(_) => {}
        }
        Ok(Request { request_type, sector, data, status })
    }
}

/// The status byte of a request (5.2.6: VIRTIO_BLK_S_*).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// VIRTIO_BLK_S_OK.
    Ok,
    /// VIRTIO_BLK_S_IOERR.
    IoErr,
    /// VIRTIO_BLK_S_UNSUPP.
    Unsupp,
}

impl Status {
    /// The byte the driver reads.
    pub fn byte(self) -> u8 {
        (match self {
            Status::Ok => VIRTIO_BLK_S_OK,
            Status::IoErr => VIRTIO_BLK_S_IOERR,
            Status::Unsupp => VIRTIO_BLK_S_UNSUPP,
        }) as u8
    }
}

/// How an executed request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The status byte.
    pub status: Status,
    /// Bytes written into the guest's data buffers (the used length is one
    /// more: the status byte).
    pub bytes_written: u32,
}

impl Outcome {
    /// The request failed; nothing the guest can rely on was written.
    pub const IOERR: Outcome = Outcome { status: Status::IoErr, bytes_written: 0 };
    /// The request succeeded and wrote `bytes_written` bytes into the guest's buffers.
    pub fn ok(bytes_written: u32) -> Outcome {
        Outcome { status: Status::Ok, bytes_written }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testutil::{self, DATA};
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const HDR: u64 = DATA;
    const BUF: u64 = DATA + 0x1000;
    const STATUS: u64 = DATA + 0x100;
    const DISK: DiskLimits = DiskLimits { capacity_sectors: 8, read_only: false };

    fn d(addr: u64, len: u32, flags: u16) -> Descriptor {
        Descriptor::new(addr, len, flags, 0)
    }

    /// Writes a header of `request_type` at `sector`; returns the chain header, one buffer, status.
    fn chain(mem: &GuestMemoryMmap, request_type: u32, sector: u64, len: u32, flags: u16) -> [Descriptor; 3] {
        mem.write_obj(request_type, GuestAddress(HDR)).unwrap();
        mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        [d(HDR, 16, 0), d(BUF, len, flags), d(STATUS, 1, W)]
    }

    /// The error of a parse that should have failed.
    fn error(r: Result<Request, RequestError>) -> RequestError {
        r.expect_err("a parse error")
    }

    fn reason(r: Result<Request, RequestError>) -> InvalidRequest {
        match r {
            Err(RequestError::Invalid { status, reason }) => {
                assert_eq!(status, GuestAddress(STATUS));
                reason
            }
            other => panic!("not an IOERR answer: {other:?}"),
        }
    }

    #[test]
    fn a_read_parses_into_its_parts() {
        let mem = testutil::memory();
        let c = chain(&mem, VIRTIO_BLK_T_IN, 2, 1024, W);
        let r = Request::parse(&c, &mem, DISK).unwrap();
        assert_eq!((r.request_type, r.sector, r.status), (RequestType::In, 2, GuestAddress(STATUS)));
        assert_eq!((r.data.len(), r.data[0].addr(), r.data[0].len()), (1, GuestAddress(BUF), 1024));
        // A longer status descriptor: the status is its last byte.
        let mut c = c;
        c[2] = d(STATUS, 4, W);
        assert_eq!(Request::parse(&c, &mem, DISK).unwrap().status, GuestAddress(STATUS + 3));
    }

    #[test]
    fn an_unknown_type_parses_and_is_unsupported() {
        let mem = testutil::memory();
        let c = chain(&mem, 99, 0, 512, 0);
        assert_eq!(Request::parse(&c, &mem, DISK).unwrap().request_type, RequestType::Unsupported(99));
        let c = chain(&mem, VIRTIO_BLK_T_FLUSH, 0, 0, 0);
        assert_eq!(Request::parse(&[c[0], c[2]], &mem, DISK).unwrap().request_type, RequestType::Flush);
    }

    #[test]
    fn without_a_status_byte_nothing_can_be_answered() {
        let mem = testutil::memory();
        let c = chain(&mem, VIRTIO_BLK_T_IN, 0, 512, W);
        assert_eq!(error(Request::parse(&[], &mem, DISK)), RequestError::NoStatus);
        assert_eq!(error(Request::parse(&c[2..], &mem, DISK)), RequestError::NoStatus, "a lone status byte");
        assert_eq!(error(Request::parse(&[c[0], d(STATUS, 1, 0)], &mem, DISK)), RequestError::NoStatus, "read-only");
        assert_eq!(error(Request::parse(&[c[0], d(STATUS, 0, W)], &mem, DISK)), RequestError::NoStatus, "empty");
        let outside = d(0x20_0000, 1, W);
        assert_eq!(error(Request::parse(&[c[0], outside], &mem, DISK)), RequestError::StatusOutsideRam(0x20_0000));
        let wraps = d(u64::MAX, 2, W);
        assert_eq!(error(Request::parse(&[c[0], wraps], &mem, DISK)), RequestError::StatusOutsideRam(u64::MAX));
    }

    #[test]
    fn a_bad_header_is_an_ioerr() {
        let mem = testutil::memory();
        let c = chain(&mem, VIRTIO_BLK_T_IN, 0, 512, W);
        assert_eq!(reason(Request::parse(&[d(HDR, 8, 0), c[1], c[2]], &mem, DISK)), InvalidRequest::BadHeader);
        assert_eq!(reason(Request::parse(&[d(HDR, 16, W), c[1], c[2]], &mem, DISK)), InvalidRequest::BadHeader);
        let far = d(0x10_0000 - 8, 16, 0);
        assert_eq!(
            reason(Request::parse(&[far, c[1], c[2]], &mem, DISK)),
            InvalidRequest::HeaderOutsideRam(far.addr().0)
        );
    }

    #[test]
    fn bad_data_is_an_ioerr() {
        let mem = testutil::memory();
        let parse =
            |t, sector, len, flags, disk| reason(Request::parse(&chain(&mem, t, sector, len, flags), &mem, disk));
        assert_eq!(parse(VIRTIO_BLK_T_IN, 0, 512, 0, DISK), InvalidRequest::WrongDirection(VIRTIO_BLK_T_IN));
        assert_eq!(parse(VIRTIO_BLK_T_OUT, 0, 512, W, DISK), InvalidRequest::WrongDirection(VIRTIO_BLK_T_OUT));
        let past = InvalidRequest::OutOfRange { bytes: 1024, sector: 7, capacity_sectors: 8 };
        assert_eq!(parse(VIRTIO_BLK_T_IN, 7, 1024, W, DISK), past);
        assert!(matches!(parse(VIRTIO_BLK_T_IN, u64::MAX, 512, W, DISK), InvalidRequest::OutOfRange { .. }));
        assert!(matches!(parse(VIRTIO_BLK_T_OUT, 0, 100, 0, DISK), InvalidRequest::OutOfRange { .. }));
        assert_eq!(parse(VIRTIO_BLK_T_GET_ID, 0, 20, 0, DISK), InvalidRequest::NoIdBuffer);
        let c = chain(&mem, VIRTIO_BLK_T_GET_ID, 0, 0, 0);
        assert_eq!(reason(Request::parse(&[c[0], c[2]], &mem, DISK)), InvalidRequest::NoIdBuffer);
    }

    #[test]
    fn a_read_only_disk_refuses_writes_only() {
        let mem = testutil::memory();
        let ro = DiskLimits { read_only: true, ..DISK };
        let c = chain(&mem, VIRTIO_BLK_T_OUT, 0, 512, 0);
        assert_eq!(reason(Request::parse(&c, &mem, ro)), InvalidRequest::ReadOnly);
        // The direction is checked first, as it always was.
        let c = chain(&mem, VIRTIO_BLK_T_OUT, 0, 512, W);
        assert_eq!(reason(Request::parse(&c, &mem, ro)), InvalidRequest::WrongDirection(VIRTIO_BLK_T_OUT));
        let c = chain(&mem, VIRTIO_BLK_T_IN, 0, 512, W);
        assert_eq!(Request::parse(&c, &mem, ro).unwrap().request_type, RequestType::In);
        let c = chain(&mem, VIRTIO_BLK_T_FLUSH, 0, 0, 0);
        assert_eq!(Request::parse(&[c[0], c[2]], &mem, ro).unwrap().request_type, RequestType::Flush);
    }
}
