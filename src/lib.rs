//! ember: a small KVM virtual machine monitor.
//!
//! # Code map
//! The boot sequence, in the order `Vmm::new` runs it:
//! - [`config`]: what the user asked for, validated before any KVM call.
//! - [`extras`]: what a tool adds beside it: exit recording (`--stats`,
//!   `ember demo`), a demo's extra port-I/O device.
//! - [`vmm`]: the recipe: /dev/kvm -> VM -> memory -> kernel -> devices -> vCPUs.
//! - [`memory`]: guest RAM (vm-memory) and KVM memory slots; the MMIO gap.
//! - [`boot`]: ELF/PVH and bzImage loading (linux-loader), initrd, cmdline, e820.
//! - [`host_file`]: opening the kernel, initrd and disk images (no hang on a FIFO).
//! - [`x86`]: CPUID, MSRs, GDT/page tables/registers, LAPIC pins, MP table,
//!   ACPI tables (`x86/acpi.rs`: hardware-reduced FADT, DSDT with `\_S5` and
//!   the virtio-mmio devices, MADT).
//! - [`layout`]: every guest address, port and IRQ.
//!
//! Running:
//! - [`vcpu`]: one thread per vCPU; the KVM_RUN loop routes exits to a [`bus`],
//!   and one pure function (`vcpu::route`) says what every exit means.
//! - [`bus`]: address range -> device, one bus for port I/O and one for MMIO.
//! - [`devices`]: one interrupt type for all of them (`devices/irq.rs`:
//!   `IrqLine`, an irqfd), the 16550 UART, the i8042 reset line, the exit device, the
//!   ACPI sleep registers (`devices/acpi_sleep.rs`: power off), an empty PCI
//!   bus's host bridge (`devices/pci_host.rs`: config mechanism #1), and
//!   virtio-mmio (`devices/virtio/`: the transport, the split-virtqueue walk
//!   every device shares (`virtio/queue.rs`), virtio-blk, virtio-net,
//!   virtio-rng, virtio-console, virtio-9p): what the guest sees.
//! - [`host`]: the host's ends of those devices, which the guest never sees:
//!   behind virtio-net (`host/net_backend.rs`) a tap (`host/tap.rs`), or a
//!   stream of length-prefixed frames (`host/frame_stream.rs`) to the passt
//!   that `--net user` starts and stops (`host/passt.rs`); behind virtio-9p,
//!   a shared folder's file server, a jailed child process
//!   (`host/p9_server.rs`); both helpers held through pidfds
//!   (`host/child.rs`); the writer threads behind the UART and the console
//!   ports (`host/serial_sink.rs`) and the stdin reader (`host/stdin_source.rs`);
//!   poll(2) on one descriptor for the threads outside the event loop
//!   (`host/poll.rs`).
//! - [`event_loop`]: epoll on the main thread: stdin, signals, stop requests.
//! - [`console`]: raw terminal mode and the `Ctrl-a x` escape.
//! - [`control`]: how a VM comes to an end, and why (Linux's panic line among
//!   the reasons: an observer of the UART's output lines).
//! - [`timeline`]: timestamps of the boot, for `--timeline` and benchmarks.
//! - [`stats`]: VM exits by reason, address and device (`--stats`, `--trace-exits`).
//! - [`sandbox`]: what each thread may still do once set-up is done: a seccomp
//!   filter per kind of thread (its call numbers behind a binary search:
//!   `sandbox/dispatch.rs`), no capabilities, no new privileges.
//!
//! Pausing and snapshots:
//! - [`pause`]: the handshake that parks every vCPU thread outside KVM_RUN.
//! - [`requests`]: pause, resume, snapshot, Ctrl-Alt-Del, served by the event loop.
//! - [`snapshot`]: the state file (format, checksum, CPU model), the memory
//!   file, and the vCPU, VM and device states in them; `Vmm::restore` in
//!   [`vmm`] is the restore recipe, parallel to `Vmm::new`.
//! - [`api`]: Firecracker's API on a Unix socket (a small HTTP/1.1 server, its
//!   JSON bodies, the before/after-InstanceStart rules) and `--config-file`.
//!
//! Path of `PUT /snapshot/create`: `api/http.rs` (parse) -> `api/mod.rs`
//! (paused? create the files) -> `requests.rs` (channel + eventfd) ->
//! `event_loop.rs` (`Token::Requests`) -> `snapshot/` (VM and device states,
//! the vCPU states each parked vCPU saved, then guest RAM) -> 204.
//!
//! Data path of one byte the guest prints: `vcpu.rs` (IoOut) -> `bus.rs` ->
//! `devices/serial.rs` (THR) -> stdout.
//!
//! Data path of one virtio-blk request: the guest's QUEUE_NOTIFY write is an
//! ioeventfd -> `event_loop.rs` (`Token::Queue`) -> `devices/virtio/mmio.rs`
//! (notify) -> `devices/virtio/block.rs` (pop the chain) ->
//! `devices/virtio/block/request.rs` (parse and check: `Request::parse`) ->
//! `block.rs` again (`Block::execute`: pread/pwrite; status byte, add_used)
//! -> interrupt through an irqfd.
//!
//! Data path of one byte the command writes to stdout (`--output split`):
//! the guest's write to its console port queues a chain -> ioeventfd ->
//! `event_loop.rs` -> `devices/virtio/console.rs` (copy into the port's sink)
//! -> `host/serial_sink.rs` (writer thread) -> ember's stdout. Piped stdin
//! takes the way back: `host/stdin_source.rs` (reader thread) -> eventfd ->
//! `event_loop.rs` (`Token::Tap`) -> `console.rs` (copy into the `ember.stdin`
//! port's receive buffers; PORT_OPEN 0 at the end of the input).
//!
//! Data path of one shared-folder request (`-v`): the guest's notify ->
//! `event_loop.rs` -> `devices/virtio/mmio.rs` -> `devices/virtio/p9.rs`
//! (the chain's bytes) -> `host/p9_server.rs` (socket to the jailed
//! server process, the `p9` crate, the host's file system) -> the reply into
//! the chain, add_used -> irqfd.
//!
//! Data path of one received frame: the tap becomes readable -> `event_loop.rs`
//! (`Token::Tap`, edge-triggered) -> `devices/virtio/mmio.rs` (host_event) ->
//! `devices/virtio/net.rs` (read, copy into receive buffers, add_used) -> irqfd.
//! A transmitted frame takes the virtio-blk path to `net.rs`, which writes it to the tap.
//! With `--net user` the tap is a socket to passt (`host/frame_stream.rs`:
//! the vnet header swapped for a 4-byte length), which turns frames into host
//! sockets; a frame it cannot take whole yet waits there, and the event loop's
//! writable event on the socket resumes the transmit queue.
//!
//! Around the core: [`demo`] (built-in guests), [`guest`] (the default Linux
//! guest: build, cache, passing a command to its init, the lines its init
//! prints (`guest/init.rs`: ready, snapshot point); the fio/iperf3 tools
//! image), [`image`] (container images: references, registry pulls and
//! archives into a store, layers flattened into a squashfs root, the
//! `docker run` rules for the command), [`lane`] (the nested machine that runs
//! Linux guests on hosts whose KVM cannot; `lane/fallback.rs`: when `ember
//! run` goes there, and the inner ember's command line), [`bench`] (`ember bench`: the same
//! payload, or the same image, on the host, in containers and in VMs).
//!
//! Path of `ember run IMAGE CMD`: `main.rs` (docker-style arguments) ->
//! `image/reference.rs` -> `image/registry.rs` or `image/archive.rs` (blobs
//! into `image/store.rs`, digests checked) -> `image/rootfs.rs` (squashfs disk)
//! -> `image/spec.rs` (the command, appended to the initramfs) -> the default
//! guest boots with the disk as /dev/vda; its init (guest-kernels/init) and
//! `ember-exec` enter the image.
#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod api;
pub mod bench;
pub mod boot;
pub mod bus;
pub mod config;
pub mod console;
pub mod control;
pub mod demo;
pub mod devices;
pub mod event_loop;
pub mod extras;
pub mod guest;
pub mod host;
pub mod host_file;
pub mod image;
pub mod lane;
pub mod layout;
pub mod memory;
pub mod pause;
pub mod requests;
pub mod sandbox;
pub mod snapshot;
pub mod stats;
pub mod timeline;
pub mod vcpu;
pub mod vmm;
pub mod x86;

/// An error and its causes as one line, `outer: cause: cause`, each cause
/// once (some libraries, linux-loader among them, repeat their cause in their
/// own message). The CLI and `ember bench` print errors through this.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg += &format!(": {text}");
        }
        src = s.source();
    }
    msg
}
