//! The sandbox every ember thread enters once set-up is done: no capabilities,
//! `PR_SET_NO_NEW_PRIVS`, and a seccomp-BPF filter per kind of thread
//! (seccomp(2), Documentation/userspace-api/seccomp_filter.rst; filters are
//! compiled by rust-vmm's `seccompiler`, and laid out behind a binary search
//! on the call number by `dispatch.rs`).
//!
//! What the guest sees: nothing. What it changes: a guest that found a bug in
//! a device and took over an ember thread can only make the system calls that
//! thread needed anyway; no new files, sockets, processes or mappings of
//! executable memory, and no privilege (root without capabilities).
//!
//! When it happens, per thread (a filter applies to the thread that installs
//! it and to threads it creates later, so each thread installs its own):
//! - a vCPU thread: first thing in the thread, before its first KVM_RUN;
//! - the main thread (the event loop, then teardown and the exit report): after
//!   the event loop's epoll, signalfd and stdin pipe exist, before it serves the
//!   first event; vCPUs wait for it before their first KVM_RUN;
//! - the serial output thread and the stdin copy thread: first thing in them.
//!
//! A call outside the filter raises SIGSYS (SECCOMP_RET_TRAP); [`handle_sigsys`]
//! prints the call's name and the thread's kind, and ember exits 125. The
//! message is what to allow, if the call is legitimate. `--seccomp=off`
//! (debugging only) skips all of it. One more, stacked, filter makes
//! `open`/`openat` fail with EACCES instead of trapping: glibc's malloc opens
//! /proc/sys/vm/overcommit_memory the first time it trims a heap, and copes
//! with the failure.

mod dispatch;
mod syscalls;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond, SeccompFilter,
    SeccompRule, TargetArch,
};
use thiserror::Error;

/// Whether ember's threads run sandboxed (`--seccomp`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompMode {
    /// Capabilities dropped, no new privileges, a filter per thread (the default).
    #[default]
    On,
    /// Nothing: for debugging only.
    Off,
}

/// The kinds of thread ember runs after set-up, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU: KVM_RUN and the devices it reaches through the buses.
    Vcpu,
    /// The thread that called `Vmm::run`: the event loop, then teardown and
    /// the exit report (`--stats`, `--timeline`).
    Main,
    /// The serial console's stdout writer (host/serial_sink.rs).
    SerialOut,
    /// Copies a non-pollable stdin (a file, /dev/null) into a pipe (event_loop.rs).
    StdinCopy,
    /// Serves the Firecracker API socket once the VM runs (api/): its clients, and the
    /// snapshot files it creates for the event loop to fill.
    Api,
}

impl ThreadKind {
    /// Every kind, for tests and the README table.
    pub const ALL: [ThreadKind; 5] =
        [ThreadKind::Vcpu, ThreadKind::Main, ThreadKind::SerialOut, ThreadKind::StdinCopy, ThreadKind::Api];

    fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Main => "main (event loop)",
            ThreadKind::SerialOut => "serial output",
            ThreadKind::StdinCopy => "stdin copy",
            ThreadKind::Api => "API",
        }
    }
}

/// Errors entering the sandbox (each ends ember with exit code 125).
#[derive(Debug, Error)]
pub enum SandboxError {
    /// A filter's rules could not be compiled to BPF.
    #[error("cannot compile the seccomp filter for the {0} thread: {1}")]
    Compile(&'static str, #[source] seccompiler::BackendError),
    /// The kernel refused a step.
    #[error("cannot {0}: {1} (--seccomp=off runs without the sandbox, for debugging)")]
    Host(&'static str, #[source] io::Error),
    /// The kernel refused the filter.
    #[error("cannot install a seccomp filter: {0} (--seccomp=off runs without the sandbox, for debugging)")]
    Install(#[source] seccompiler::Error),
}

thread_local! {
    /// This thread's kind, for the SIGSYS message (a const-initialised
    /// `Cell` without destructor: a plain TLS read, async-signal-safe).
    static KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// Puts the calling thread in the sandbox for `kind` (nothing with
/// [`SeccompMode::Off`]): capabilities dropped, no new privileges, SIGSYS
/// unblocked and handled, the filters installed. Irreversible.
pub fn enter(kind: ThreadKind, mode: SeccompMode) -> Result<(), SandboxError> {
    if mode == SeccompMode::Off {
        return Ok(());
    }
    let programs = compile(kind)?;
    drop_capabilities()?;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(SandboxError::Host("set PR_SET_NO_NEW_PRIVS", io::Error::last_os_error()));
    }
    install_sigsys_handler()?;
    KIND.with(|k| k.set(Some(kind)));
    for p in &programs {
        seccompiler::apply_filter(p).map_err(SandboxError::Install)?;
    }
    Ok(())
}

/// The BPF programs `kind`'s thread installs: the filter that turns
/// `open`/`openat` into EACCES, then its allow list (everything else traps).
pub fn compile(kind: ThreadKind) -> Result<Vec<BpfProgram>, SandboxError> {
    let err = |e| SandboxError::Compile(kind.name(), e);
    // Behind a binary search on the call number (dispatch.rs): a vCPU thread's cold install takes
    // ~95 µs instead of ~210 here, and a whole tiny-guest run 0.95x as long (250 interleaved pairs).
    let allow =
        dispatch::compile(rules(kind).map_err(err)?, SeccompAction::Trap, SeccompAction::Allow, arch()).map_err(err)?;
    let no_open: BTreeMap<i64, Vec<SeccompRule>> = [(libc::SYS_open, vec![]), (libc::SYS_openat, vec![])].into();
    let no_open = SeccompFilter::new(no_open, SeccompAction::Allow, SeccompAction::Errno(libc::EACCES as u32), arch())
        .map_err(err)?;
    // The API thread creates the snapshot files a client names: it keeps open().
    if kind == ThreadKind::Api {
        return Ok(vec![allow]);
    }
    // In this order: seccompiler's apply_filter makes a prctl first, which the
    // allow list (installed last) would trap.
    Ok(vec![no_open.try_into().map_err(err)?, allow])
}

fn arch() -> TargetArch {
    TargetArch::x86_64
}

/// `_IOC(dir, type, nr, size)` of Linux's include/uapi/asm-generic/ioctl.h.
const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
/// KVM's ioctl type (include/uapi/linux/kvm.h).
const KVMIO: u64 = 0xae;
/// `KVM_RUN`: `_IO(KVMIO, 0x80)`.
pub const KVM_RUN: u64 = ioc(0, KVMIO, 0x80, 0);
/// `KVM_GET_REGS`: `_IOR(KVMIO, 0x81, struct kvm_regs)` (crash reports, register snapshots).
pub const KVM_GET_REGS: u64 = ioc(IOC_READ, KVMIO, 0x81, std::mem::size_of::<kvm_bindings::kvm_regs>());
/// `KVM_GET_SREGS`: `_IOR(KVMIO, 0x83, struct kvm_sregs)` (register snapshots).
pub const KVM_GET_SREGS: u64 = ioc(IOC_READ, KVMIO, 0x83, std::mem::size_of::<kvm_bindings::kvm_sregs>());
/// `TUNSETOFFLOAD`: `_IOW('T', 208, unsigned int)` (virtio-net, when the guest accepts offloads).
pub const TUNSETOFFLOAD: u64 = ioc(IOC_WRITE, b'T' as u64, 208, 4);

const fn kvm_ior<T>(nr: u64) -> u64 {
    ioc(IOC_READ, KVMIO, nr, std::mem::size_of::<T>())
}
/// What a parked vCPU reads for a snapshot (snapshot/vcpu.rs), as kvm.h numbers them:
/// KVM_GET_MSRS `_IOWR(0x88, kvm_msrs)`, KVM_GET_FPU `_IOR(0x8c)`, KVM_GET_LAPIC `_IOR(0x8e)`,
/// KVM_GET_MP_STATE `_IOR(0x98)`, KVM_GET_VCPU_EVENTS `_IOR(0x9f)`, KVM_GET_DEBUGREGS `_IOR(0xa1)`,
/// KVM_GET_XSAVE `_IOR(0xa4)`, KVM_GET_XCRS `_IOR(0xa6)`.
pub const KVM_VCPU_STATE_GETS: [u64; 8] = [
    ioc(IOC_READ | IOC_WRITE, KVMIO, 0x88, std::mem::size_of::<kvm_bindings::kvm_msrs>()),
    kvm_ior::<kvm_bindings::kvm_fpu>(0x8c),
    kvm_ior::<kvm_bindings::kvm_lapic_state>(0x8e),
    kvm_ior::<kvm_bindings::kvm_mp_state>(0x98),
    kvm_ior::<kvm_bindings::kvm_vcpu_events>(0x9f),
    kvm_ior::<kvm_bindings::kvm_debugregs>(0xa1),
    kvm_ior::<kvm_bindings::kvm_xsave>(0xa4),
    kvm_ior::<kvm_bindings::kvm_xcrs>(0xa6),
];
/// What the event loop reads for a snapshot (snapshot/vm.rs): KVM_GET_IRQCHIP
/// `_IOWR(0x62, kvm_irqchip)`, KVM_GET_PIT2 `_IOR(0x9f)`, KVM_GET_CLOCK `_IOR(0x7c)`.
pub const KVM_VM_STATE_GETS: [u64; 3] = [
    ioc(IOC_READ | IOC_WRITE, KVMIO, 0x62, std::mem::size_of::<kvm_bindings::kvm_irqchip>()),
    kvm_ior::<kvm_bindings::kvm_pit_state2>(0x9f),
    kvm_ior::<kvm_bindings::kvm_clock_data>(0x7c),
];

/// Calls every thread makes: memory (never executable), locks, time, signal
/// returns, logging to stderr, thread exit.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_munmap,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // A panic's message and backtrace (RUST_BACKTRACE): the working directory,
    // /proc/self/exe and its size (the open of the binary then fails, and the
    // frames are printed without names).
    libc::SYS_getcwd,
    libc::SYS_readlink,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    // Turned into EACCES by the second filter (see the module comment).
    libc::SYS_open,
    libc::SYS_openat,
];

/// Calls of the devices (virtio-blk's image I/O, virtio-net's tap, eventfds
/// and irqfds), made on a vCPU (a trapped notify) or in the event loop.
const DEVICES: &[i64] = &[
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_lseek,
];

fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let allow = |map: &mut BTreeMap<i64, Vec<SeccompRule>>, calls: &[i64]| {
        for c in calls {
            map.insert(*c, vec![]);
        }
    };
    allow(&mut map, COMMON);
    // mmap and mprotect: never PROT_EXEC (argument 2).
    let no_exec = || -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
        Ok(vec![SeccompRule::new(vec![Cond::new(2, Len::Dword, Op::MaskedEq(libc::PROT_EXEC as u64), 0)?])?])
    };
    map.insert(libc::SYS_mmap, no_exec()?);
    map.insert(libc::SYS_mprotect, no_exec()?);
    // fcntl(fd, F_GETFD) only: std's debug check that a descriptor it closes is open.
    let getfd = Cond::new(1, Len::Dword, Op::Eq, libc::F_GETFD as u64)?;
    map.insert(libc::SYS_fcntl, vec![SeccompRule::new(vec![getfd])?]);
    let ioctls = |reqs: &[u64]| -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
        reqs.iter().map(|r| SeccompRule::new(vec![Cond::new(1, Len::Dword, Op::Eq, *r)?])).collect()
    };
    match kind {
        ThreadKind::Vcpu => {
            allow(&mut map, DEVICES);
            let mut reqs = vec![KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS, TUNSETOFFLOAD];
            reqs.extend(KVM_VCPU_STATE_GETS);
            map.insert(libc::SYS_ioctl, ioctls(&reqs)?);
        }
        ThreadKind::Main => {
            allow(&mut map, DEVICES);
            allow(
                &mut map,
                &[
                    libc::SYS_epoll_wait,
                    libc::SYS_epoll_pwait,
                    // Stdin in and out of the set as the UART's buffer fills and drains.
                    libc::SYS_epoll_ctl,
                    // --timeline's "guest memory touched".
                    libc::SYS_mincore,
                ],
            );
            // Kicking vCPU threads out of KVM_RUN at the stop: that signal only.
            let kick = Cond::new(2, Len::Dword, Op::Eq, crate::vcpu::kick_signal() as u64)?;
            map.insert(libc::SYS_tgkill, vec![SeccompRule::new(vec![kick])?]);
            // Stopping and reaping passt (`--net user`) at teardown: SIGTERM
            // through a pidfd, and waitid(P_PIDFD), so only a child ember
            // holds a pidfd for (host/passt.rs).
            let term = Cond::new(1, Len::Dword, Op::Eq, libc::SIGTERM as u64)?;
            map.insert(libc::SYS_pidfd_send_signal, vec![SeccompRule::new(vec![term])?]);
            let by_pidfd = Cond::new(0, Len::Dword, Op::Eq, libc::P_PIDFD as u64)?;
            map.insert(libc::SYS_waitid, vec![SeccompRule::new(vec![by_pidfd])?]);
            let term = [libc::TCGETS, libc::TCSETS, libc::TCSETSW, libc::TCSETSF];
            let mut reqs = vec![TUNSETOFFLOAD];
            reqs.extend(term);
            reqs.extend(KVM_VM_STATE_GETS);
            map.insert(libc::SYS_ioctl, ioctls(&reqs)?);
        }
        ThreadKind::SerialOut => {}
        // Its clients (poll, accept, read; writes are in COMMON), non-blocking sockets with a
        // write timeout, and the snapshot files: created, sized, opened for reading (the state
        // file's header when a snapshot is loaded).
        ThreadKind::Api => {
            allow(
                &mut map,
                &[
                    libc::SYS_poll,
                    libc::SYS_ppoll,
                    libc::SYS_accept,
                    libc::SYS_accept4,
                    libc::SYS_read,
                    libc::SYS_recvfrom,
                    libc::SYS_sendto,
                    libc::SYS_ftruncate,
                    libc::SYS_fsync,
                ],
            );
            map.insert(libc::SYS_ioctl, ioctls(&[libc::FIONBIO])?);
            // setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO) only: the write timeout
            // api/http.rs sets on a client (socket(7)); no other option, no
            // other level.
            let sol_socket = Cond::new(1, Len::Dword, Op::Eq, libc::SOL_SOCKET as u64)?;
            let sndtimeo = Cond::new(2, Len::Dword, Op::Eq, libc::SO_SNDTIMEO as u64)?;
            map.insert(libc::SYS_setsockopt, vec![SeccompRule::new(vec![sol_socket, sndtimeo])?]);
        }
        // std::io::copy: read/write, or the kernel's copy calls after an fstat; the console's
        // stdin reader (host/stdin_source.rs) also polls for a hang-up.
        ThreadKind::StdinCopy => allow(
            &mut map,
            &[
                libc::SYS_read,
                libc::SYS_poll,
                libc::SYS_ppoll,
                libc::SYS_statx,
                libc::SYS_fstat,
                libc::SYS_newfstatat,
                libc::SYS_copy_file_range,
                libc::SYS_sendfile,
                libc::SYS_splice,
            ],
        ),
    }
    Ok(map)
}

/// Empties the calling thread's capability sets and bounding set (capsets
/// are per thread). A thread without CAP_SETPCAP (ember not run as root)
/// cannot shrink its bounding set, and has nothing to give up there.
fn drop_capabilities() -> Result<(), SandboxError> {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) };
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINVAL) => break, // past the last capability
                Some(libc::EPERM) => break,  // no CAP_SETPCAP
                _ => return Err(SandboxError::Host("drop capabilities", io::Error::last_os_error())),
            }
        }
    }
    #[repr(C)]
    struct CapHeader {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct CapData {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    /// `_LINUX_CAPABILITY_VERSION_3` (include/uapi/linux/capability.h): two `CapData`.
    const CAP_V3: u32 = 0x2008_0522;
    let header = CapHeader { version: CAP_V3, pid: 0 };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads a v3 header and two data structs, both live locals.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(SandboxError::Host("drop capabilities (capset)", io::Error::last_os_error()));
    }
    Ok(())
}

fn install_sigsys_handler() -> Result<(), SandboxError> {
    // SAFETY: a zeroed sigaction is valid; the handler only makes
    // async-signal-safe calls (write, _exit). Unblocking SIGSYS here matters: a
    // blocked SIGSYS from seccomp would kill ember without a word.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handle_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(SandboxError::Host("install the SIGSYS handler", io::Error::last_os_error()));
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGSYS);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
    Ok(())
}

/// The name of x86-64 system call `nr`, if it has one.
pub fn syscall_name(nr: u32) -> Option<&'static str> {
    syscalls::NAMES.binary_search_by_key(&nr, |(n, _)| *n).ok().map(|i| syscalls::NAMES[i].1)
}

/// The line [`handle_sigsys`] prints, into `buf` (no allocation); returns its length.
pub fn violation_message(buf: &mut [u8; 256], kind: Option<ThreadKind>, nr: u32) -> usize {
    let mut w = Cursor { buf, len: 0 };
    w.put("ember: the sandbox stopped ember: the ");
    w.put(kind.map_or("unknown", ThreadKind::name));
    w.put(" thread made system call ");
    w.put(syscall_name(nr).unwrap_or("?"));
    w.put(" (");
    let mut digits = [0u8; 10];
    let mut n = nr;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    w.put_bytes(&digits[i..]);
    w.put("), which its seccomp filter does not allow (src/sandbox/mod.rs); --seccomp=off runs without it\n");
    w.len
}

struct Cursor<'a> {
    buf: &'a mut [u8; 256],
    len: usize,
}

impl Cursor<'_> {
    fn put(&mut self, s: &str) {
        self.put_bytes(s.as_bytes());
    }
    fn put_bytes(&mut self, b: &[u8]) {
        let n = b.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
    }
}

/// SIGSYS from a seccomp trap: says which call, from which thread, and ends
/// ember with 125 (an ember failure: README, "Exit codes").
extern "C" fn handle_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // `struct siginfo` for SIGSYS (include/uapi/asm-generic/siginfo.h): after
    // signo, errno, code and padding (16 bytes), `_sigsys { void *_call_addr;
    // int _syscall; unsigned _arch; }`: the call number is at byte 24.
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let nr = unsafe { *(info as *const u8).add(24).cast::<i32>() } as u32;
    let kind = KIND.try_with(|k| k.get()).ok().flatten();
    let mut buf = [0u8; 256];
    let len = violation_message(&mut buf, kind, nr);
    crate::console::restore_terminal_now();
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `buf` is live.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(125);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles_to_bpf() {
        for kind in ThreadKind::ALL {
            let progs = compile(kind).unwrap();
            assert_eq!(progs.len(), if kind == ThreadKind::Api { 1 } else { 2 });
            assert!(progs.iter().all(|p| !p.is_empty() && p.len() < u16::MAX as usize), "{kind:?}");
        }
    }

    #[test]
    fn names_are_sorted_and_known() {
        assert!(syscalls::NAMES.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(syscall_name(libc::SYS_socket as u32), Some("socket"));
        assert_eq!(syscall_name(libc::SYS_ioctl as u32), Some("ioctl"));
        assert_eq!(syscall_name(9999), None);
    }

    #[test]
    fn message_names_the_call_and_thread() {
        let mut buf = [0u8; 256];
        let n = violation_message(&mut buf, Some(ThreadKind::Vcpu), libc::SYS_socket as u32);
        let s = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(s.contains("the vCPU thread made system call socket (41)"), "{s}");
        assert!(s.ends_with('\n'));
    }

    #[test]
    fn ioctl_numbers_match_linux() {
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(TUNSETOFFLOAD, 0x4004_54d0);
        // From Linux's headers: KVM_GET_MSRS, KVM_GET_XSAVE, KVM_GET_IRQCHIP, KVM_GET_CLOCK.
        assert_eq!(KVM_VCPU_STATE_GETS[0], 0xc008_ae88);
        assert_eq!(KVM_VCPU_STATE_GETS[6], 0x9000_aea4);
        assert_eq!(KVM_VM_STATE_GETS[0], 0xc208_ae62);
        assert_eq!(KVM_VM_STATE_GETS[2], 0x8030_ae7c);
    }

    /// What a sandboxed thread does in the child process of the tests below,
    /// chosen by `EMBER_SANDBOX_CHILD`.
    #[test]
    #[ignore = "run by the tests below in a child process"]
    fn sandbox_child() {
        let Ok(what) = std::env::var("EMBER_SANDBOX_CHILD") else { return };
        if let Some(option) = what.strip_prefix("api-setsockopt-").map(str::to_owned) {
            // The API thread's one socket option, then another (made before
            // the filter: the API thread may not create sockets).
            let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
            let t = std::thread::spawn(move || {
                enter(ThreadKind::Api, SeccompMode::On).unwrap();
                let name = if option == "sndtimeo" { libc::SO_SNDTIMEO } else { libc::SO_RCVBUF };
                let tv = libc::timeval { tv_sec: 1, tv_usec: 0 };
                let len = if option == "sndtimeo" { std::mem::size_of_val(&tv) } else { 4 };
                // SAFETY: setsockopt reads `len` bytes of a live timeval on our own socket.
                let rc = unsafe {
                    libc::setsockopt(
                        std::os::fd::AsRawFd::as_raw_fd(&a),
                        libc::SOL_SOCKET,
                        name,
                        (&raw const tv).cast(),
                        len as u32,
                    )
                };
                eprintln!("setsockopt {option}: {rc}");
            });
            t.join().unwrap();
            std::process::exit(0);
        }
        let t = std::thread::spawn(move || {
            enter(ThreadKind::Vcpu, SeccompMode::On).unwrap();
            match what.as_str() {
                // Allowed: a write, memory, an eventfd-style read on a pipe.
                "allowed" => {
                    let v = vec![7u8; 1 << 20];
                    drop(v);
                    eprintln!("still alive");
                    // SAFETY: a write of a live buffer to stderr.
                    unsafe { libc::write(2, b"ok\n".as_ptr().cast(), 3) };
                }
                // Forbidden: a socket (what an attacker would want first).
                "socket" => {
                    // SAFETY: integer arguments only.
                    unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
                }
                // Forbidden: an ioctl the vCPU does not make (KVM_CREATE_VCPU on fd 0).
                "ioctl" => {
                    // SAFETY: integer arguments only.
                    unsafe { libc::ioctl(0, 0xae41, 0) };
                }
                // open becomes EACCES, not a trap.
                "open" => {
                    let e = std::fs::File::open("/proc/sys/vm/overcommit_memory").unwrap_err();
                    assert_eq!(e.raw_os_error(), Some(libc::EACCES));
                    eprintln!("open refused");
                }
                _ => unreachable!(),
            }
        });
        t.join().unwrap();
        std::process::exit(0);
    }

    fn child(what: &str) -> (i32, String) {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "sandbox::tests::sandbox_child", "--ignored", "--nocapture", "--test-threads=1"])
            .env("EMBER_SANDBOX_CHILD", what)
            .output()
            .unwrap();
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    #[test]
    fn a_vcpu_thread_may_do_its_work() {
        let (code, err) = child("allowed");
        assert_eq!(code, 0, "{err}");
        assert!(err.contains("still alive") && err.contains("ok"), "{err}");
        let (code, err) = child("open");
        assert_eq!(code, 0, "{err}");
        assert!(err.contains("open refused"), "{err}");
    }

    #[test]
    fn a_forbidden_call_from_a_vcpu_thread_is_reported_by_name() {
        let (code, err) = child("socket");
        assert_eq!(code, 125, "{err}");
        assert!(err.contains("the vCPU thread made system call socket (41)"), "{err}");
        let (code, err) = child("ioctl");
        assert_eq!(code, 125, "{err}");
        assert!(err.contains("the vCPU thread made system call ioctl (16)"), "{err}");
    }

    #[test]
    fn the_api_thread_sets_its_write_timeout_and_no_other_socket_option() {
        let (code, err) = child("api-setsockopt-sndtimeo");
        assert_eq!(code, 0, "{err}");
        assert!(err.contains("setsockopt sndtimeo: 0"), "{err}");
        let (code, err) = child("api-setsockopt-rcvbuf");
        assert_eq!(code, 125, "{err}");
        assert!(err.contains("the API thread made system call setsockopt (54)"), "{err}");
    }
}
