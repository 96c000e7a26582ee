//! The host's side of ember's devices: what a guest's bytes meet once they
//! leave the emulated device, and which the guest never sees. The devices in
//! [`crate::devices`] stay pure emulation (bytes in, bytes out, an interrupt);
//! everything here holds a host resource.
//!
//! - `net_backend.rs`: where virtio-net's frames go: a tap (`tap.rs`, the
//!   host's TUN/TAP interface, virtio-net header offloads) or a stream of
//!   length-prefixed frames (`frame_stream.rs`, passt's protocol) to the passt
//!   that `--net user` starts and stops (`passt.rs`).
//! - `p9_server.rs`: a shared folder's file server (`-v`), a child process
//!   jailed in the folder, behind virtio-9p.
//! - `child.rs`: both helper processes, held through a pidfd.
//! - `serial_sink.rs`: the writer threads behind the UART and the console
//!   ports (a full stdout never holds the VM); `stdin_source.rs`: the reader
//!   thread that feeds a piped stdin to the console's `ember.stdin` port.
//! - `poll.rs`: poll(2) on one descriptor, for the threads that wait outside
//!   the event loop (the stdin reader, the Linux lane).

pub mod child;
pub mod frame_stream;
pub mod net_backend;
pub mod p9_server;
pub mod passt;
pub mod poll;
pub mod serial_sink;
pub mod stdin_source;
pub mod tap;
