//! COM1: a 16550A UART (TI PC16550D datasheet; Linux drivers/tty/serial/8250).
//!
//! The register file is rust-vmm's `vm-superio` `Serial`, which Firecracker and
//! Cloud Hypervisor share; it passes the probe Linux's 8250 driver runs (IER
//! read-back, MCR loopback -> MSR, FIFO bits in IIR; see the tests below).
//! ember adds what sits around the chip:
//!
//! - the interrupt line: an [`IrqLine`] (an irqfd on IRQ 4) when the in-kernel
//!   irqchip exists;
//! - the output side ([`SerialOutput`]): bytes the guest writes to THR go to
//!   stdout or a file; the first one is marked on the boot timeline, and each
//!   line is handed to the observers ember attached ([`LineObserver`]: Linux's
//!   panic line in control.rs, the default guest's init markers in
//!   guest/init.rs). The UART itself knows no guest's text;
//! - the input side: the event loop pushes host bytes into the receive FIFO
//!   and is told (through `input_drained`) when the guest has emptied it.
//!
//! Data path of one byte the guest prints: vCPU `OUT 0x3f8` -> `vcpu.rs`
//! (IoOut) -> `bus.rs` (COM1 range) -> `Serial::write` (THR) -> `SerialOutput`.

use std::io::{self, Write};
use std::sync::Arc;

use vm_superio::Serial as Uart16550;
use vm_superio::serial::SerialEvents;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::devices::irq::IrqLine;
use crate::snapshot::devices::SerialState;
use crate::timeline::Timeline;

/// Tells the event loop that the receive FIFO has been drained.
pub struct InputEvents {
    drained: Option<Arc<EventFd>>,
}

impl SerialEvents for InputEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Some(evt) = &self.drained {
            let _ = evt.write(1);
        }
    }
}

/// The longest line handed to the observers; a longer one reaches them in pieces of this size.
const LINE_MAX: usize = 256;

/// Reads the guest's serial output a line at a time (without its `\n`): called on the vCPU thread
/// that prints the line, under the UART's lock, so it must not block.
pub type LineObserver = Box<dyn FnMut(&[u8]) + Send>;

/// Where the guest's serial output goes, and what ember learns from it.
pub struct SerialOutput {
    sink: Box<dyn Write + Send>,
    timeline: Arc<Timeline>,
    seen_first: bool,
    line: Vec<u8>,
    /// Bytes the sink may take in all (`--serial file:` is capped).
    limit: u64,
    written: u64,
    /// Bytes dropped: past `limit`, or because the sink failed.
    dropped: u64,
    /// The sink failed once: it is not tried again (one warning, not one per byte).
    failed: bool,
    /// What reads the output line by line ([`SerialOutput::observe_lines`]).
    observers: Vec<LineObserver>,
}

impl SerialOutput {
    /// Output to `sink`; its first byte is marked on `timeline`.
    pub fn new(sink: Box<dyn Write + Send>, timeline: Arc<Timeline>) -> Self {
        SerialOutput {
            sink,
            timeline,
            seen_first: false,
            line: Vec::with_capacity(LINE_MAX),
            limit: u64::MAX,
            written: 0,
            dropped: 0,
            failed: false,
            observers: Vec::new(),
        }
    }

    /// Hands every line the guest prints from now on to `observer`, after the ones attached before.
    pub fn observe_lines(&mut self, observer: LineObserver) {
        self.observers.push(observer);
    }

    /// Takes at most `bytes` in all, then drops the rest with one warning
    /// (`--serial file:`, [`crate::host::serial_sink::SERIAL_FILE_LIMIT`]).
    pub fn with_limit(mut self, bytes: u64) -> Self {
        self.limit = bytes;
        self
    }

    /// Bytes of guest output dropped so far (past the limit, or a failing sink).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    fn watch(&mut self, byte: u8) {
        if !self.seen_first {
            self.seen_first = true;
            self.timeline.mark("guest: first serial byte");
        }
        if byte == b'\n' || self.line.len() == LINE_MAX {
            for observe in &mut self.observers {
                observe(&self.line);
            }
            self.line.clear();
        } else {
            self.line.push(byte);
        }
    }
}

impl Write for SerialOutput {
    /// Never fails: the guest's UART has no way to hear of a host error, and
    /// vm-superio would log every failed byte. The first failure or the limit
    /// is logged once; what is dropped is counted (reported at exit).
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            self.watch(b);
        }
        let room = usize::try_from(self.limit - self.written).unwrap_or(usize::MAX).min(buf.len());
        if room < buf.len() && !self.failed && self.dropped == 0 {
            log::warn!(
                "serial: the output reached {} MiB: the rest of the guest's output is dropped",
                self.limit >> 20
            );
        }
        if self.failed || room == 0 {
            self.dropped += buf.len() as u64;
            return Ok(buf.len());
        }
        self.dropped += (buf.len() - room) as u64;
        match self.sink.write_all(&buf[..room]) {
            Ok(()) => self.written += room as u64,
            // A closed stdout (e.g. `ember run | head -1`) must not stop the VM.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => self.failed = true,
            Err(e) => {
                log::warn!("serial: cannot write the guest's output: {e}; the rest is dropped");
                self.failed = true;
                self.dropped += room as u64;
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        // As for `write`: a failure was counted there; vm-superio flushes after every byte.
        if !self.failed {
            let _ = self.sink.flush();
        }
        Ok(())
    }
}

/// COM1 as a bus device.
pub struct Serial {
    uart: Uart16550<IrqLine, InputEvents, SerialOutput>,
    /// The guest is interrupt-driven (an irqfd exists), so it reads the
    /// receive FIFO only while it has receive interrupts enabled.
    irq_driven: bool,
    /// Shadow copies of LCR, IER and MCR, to see the guest's driver open the port.
    lcr: u8,
    ier: u8,
    mcr: u8,
    drained: Option<Arc<EventFd>>,
}

/// Register offsets and bits (Linux include/uapi/linux/serial_reg.h).
const UART_IER: u64 = 1;
const UART_LCR: u64 = 3;
const UART_MCR: u64 = 4;
const UART_IER_RDI: u8 = 0x01;
const UART_LCR_DLAB: u8 = 0x80;
const UART_MCR_OUT2: u8 = 0x08;
const UART_MCR_LOOP: u8 = 0x10;

impl Serial {
    /// A UART raising `irq`, writing to `out`, signalling `drained` when the
    /// guest has read every queued input byte (or has just become ready to).
    pub fn new(irq: IrqLine, out: SerialOutput, drained: Option<Arc<EventFd>>) -> Self {
        let irq_driven = irq.is_connected();
        let events = InputEvents { drained: drained.clone() };
        Serial { uart: Uart16550::with_events(irq, events, out), irq_driven, lcr: 0, ier: 0, mcr: 0, drained }
    }

    /// Whether the guest will take input now. An interrupt-driven guest (Linux)
    /// only reads the FIFO while a tty has the port open. Linux's 8250 driver
    /// reads the receive register and drops what it finds when it probes the
    /// port (`autoconfig`) and when it opens it (`serial8250_do_startup`), so
    /// bytes queued earlier, such as piped input sent at boot, would be lost.
    /// ember keeps them until the port is open: "received data available"
    /// interrupts on (IER.RDI) *and* the UART's interrupt line gated onto the
    /// bus (MCR.OUT2, which a PC needs and Linux sets on open), outside
    /// loopback mode. RDI alone is not enough: autoconfig's existence test
    /// writes 0x0f to IER for a moment, and a kernel that registers the port
    /// twice (legacy, then ACPI's PNP0501) runs it after input may be waiting;
    /// that lost the first bytes of piped input. A polling guest (no irqchip)
    /// takes input at any time.
    fn accepts_input(&self) -> bool {
        !self.irq_driven
            || (self.ier & UART_IER_RDI != 0 && self.mcr & UART_MCR_OUT2 != 0 && self.mcr & UART_MCR_LOOP == 0)
    }

    /// A UART in the state a snapshot saved ([`Serial::save_state`]); otherwise as [`Serial::new`].
    pub fn with_state(
        irq: IrqLine,
        out: SerialOutput,
        drained: Option<Arc<EventFd>>,
        state: &SerialState,
    ) -> Result<Self, String> {
        let irq_driven = irq.is_connected();
        let events = InputEvents { drained: drained.clone() };
        let regs = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Uart16550::from_state(&regs, irq, events, out)
            .map_err(|e| format!("the snapshot's serial port state: {e:?}"))?;
        let mcr = state.modem_control;
        Ok(Serial { uart, irq_driven, lcr: state.shadow_lcr, ier: state.shadow_ier, mcr, drained })
    }

    /// The registers and receive FIFO, for a snapshot.
    pub fn save_state(&self) -> SerialState {
        let s = self.uart.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
            shadow_lcr: self.lcr,
            shadow_ier: self.ier,
        }
    }

    /// Queues host input for the guest; returns how many bytes fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&bytes[..room]) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial: cannot queue input: {e:?}");
                0
            }
        }
    }

    /// The output side (for the count of dropped bytes at exit).
    pub fn output(&self) -> &SerialOutput {
        self.uart.writer()
    }

    /// The output side, to attach a line observer (`SerialOutput::observe_lines`).
    pub fn output_mut(&mut self) -> &mut SerialOutput {
        self.uart.writer_mut()
    }

    /// Free space in the receive FIFO (0 while the guest is not listening).
    pub fn input_room(&self) -> usize {
        if self.accepts_input() { self.uart.fifo_capacity() } else { 0 }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&b), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.uart.write(off, b) {
                log::warn!("serial: {e:?}");
            }
            let was = self.accepts_input();
            match offset {
                UART_LCR => self.lcr = b,
                UART_IER if self.lcr & UART_LCR_DLAB == 0 => self.ier = b,
                UART_MCR => self.mcr = b,
                _ => {}
            }
            if !was && self.accepts_input() {
                // The driver just opened the port: wake the event loop
                // so it feeds whatever input is waiting.
                if let Some(evt) = &self.drained {
                    let _ = evt.write(1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Instant;

    // Register offsets and bits as Linux's include/uapi/linux/serial_reg.h spells them.
    const UART_TX: u64 = 0;
    const UART_RX: u64 = 0;
    const UART_IIR: u64 = 2;
    const UART_FCR: u64 = 2;
    const UART_MCR: u64 = 4;
    const UART_LSR: u64 = 5;
    const UART_MSR: u64 = 6;
    const UART_SCR: u64 = 7;
    const UART_MCR_LOOP: u8 = 0x10;
    const UART_LSR_DR: u8 = 0x01;
    const UART_LSR_THRE: u8 = 0x20;
    const UART_FCR_ENABLE_FIFO: u8 = 0x01;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn uart() -> (Serial, Shared, Arc<Timeline>) {
        let out = Shared::default();
        let timeline = Arc::new(Timeline::new(Instant::now()));
        let so = SerialOutput::new(Box::new(out.clone()), timeline.clone());
        (Serial::new(IrqLine::None, so, None), out, timeline)
    }

    fn rd(s: &mut Serial, off: u64) -> u8 {
        let mut b = [0u8];
        s.read(off, &mut b);
        b[0]
    }

    #[test]
    fn linux_8250_autoconfig_probe() {
        let (mut s, ..) = uart();
        // autoconfig(): IER read-back test.
        s.write(UART_IER, &[0]);
        assert_eq!(rd(&mut s, UART_IER) & 0x0f, 0);
        s.write(UART_IER, &[0x0f]);
        assert_eq!(rd(&mut s, UART_IER) & 0x0f, 0x0f);
        s.write(UART_IER, &[0]);
        // Loopback test: MCR loop + RTS|OUT2 must show CTS|DCD in MSR (0x90).
        s.write(UART_MCR, &[UART_MCR_LOOP | 0x0a]);
        assert_eq!(rd(&mut s, UART_MSR) & 0xf0, 0x90);
        s.write(UART_MCR, &[0]);
        // Scratch register holds a value.
        s.write(UART_SCR, &[0xa5]);
        assert_eq!(rd(&mut s, UART_SCR), 0xa5);
        // FIFO enabled: IIR bits 7:6 = 11 means a 16550A.
        s.write(UART_FCR, &[UART_FCR_ENABLE_FIFO]);
        assert_eq!(rd(&mut s, UART_IIR) >> 6, 3);
        // Divisor latch access.
        s.write(UART_LCR, &[UART_LCR_DLAB]);
        s.write(0, &[0x01]);
        s.write(1, &[0x00]);
        assert_eq!(rd(&mut s, 0), 0x01);
        s.write(UART_LCR, &[0x03]);
        // Transmitter is always ready.
        assert_ne!(rd(&mut s, UART_LSR) & UART_LSR_THRE, 0);
    }

    #[test]
    fn bytes_flow_both_ways() {
        let (mut s, out, ..) = uart();
        for b in b"hi\n" {
            s.write(UART_TX, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
        assert_eq!(rd(&mut s, UART_LSR) & UART_LSR_DR, 0);
        assert_eq!(s.enqueue_input(b"ok"), 2);
        assert_ne!(rd(&mut s, UART_LSR) & UART_LSR_DR, 0);
        assert_eq!(rd(&mut s, UART_RX), b'o');
        assert_eq!(rd(&mut s, UART_RX), b'k');
        assert_eq!(rd(&mut s, UART_LSR) & UART_LSR_DR, 0);
    }

    #[test]
    fn interrupt_driven_guest_gets_input_only_once_it_listens() {
        let out = Shared::default();
        let timeline = Arc::new(Timeline::new(Instant::now()));
        let so = SerialOutput::new(Box::new(out), timeline);
        let evt = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let drained = Arc::new(EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap());
        let mut s = Serial::new(IrqLine::Irqfd(evt), so, Some(drained.clone()));
        assert_eq!(s.input_room(), 0, "port not open yet: hold input");
        // Writing the divisor latch (DLAB set) is not an IER write.
        s.write(UART_LCR, &[UART_LCR_DLAB]);
        s.write(UART_IER, &[UART_IER_RDI]);
        assert_eq!(s.input_room(), 0);
        s.write(UART_LCR, &[0x03]);
        // autoconfig()'s existence test sets every IER bit for a moment, with OUT2 off.
        s.write(UART_IER, &[0x0f]);
        assert_eq!(s.input_room(), 0, "a probe is not an open port");
        s.write(UART_IER, &[0]);
        // Its loopback test sets OUT2, but in loopback mode.
        s.write(UART_MCR, &[UART_MCR_LOOP | 0x0a]);
        s.write(UART_IER, &[UART_IER_RDI]);
        assert_eq!(s.input_room(), 0, "loopback is not an open port");
        s.write(UART_IER, &[0]);
        // serial8250_do_startup: DTR|OUT2, then RLSI|RDI.
        s.write(UART_MCR, &[0x09]);
        assert_eq!(s.input_room(), 0);
        s.write(UART_IER, &[0x05]);
        assert_eq!(s.input_room(), 64);
        assert_eq!(drained.read().unwrap(), 1, "the event loop is woken to feed input");
        s.write(UART_IER, &[0]);
        assert_eq!(s.input_room(), 0, "port closed again");
    }

    #[test]
    fn input_respects_fifo_room() {
        let (mut s, ..) = uart();
        let big = vec![b'x'; 100];
        let n = s.enqueue_input(&big);
        assert_eq!(n, 64);
        assert_eq!(s.input_room(), 0);
        assert_eq!(s.enqueue_input(&big), 0);
    }

    #[test]
    fn hands_each_line_to_its_observers() {
        let (mut s, out, timeline) = uart();
        let lines = Arc::new(Mutex::new(Vec::new()));
        for tag in ["a", "b"] {
            let lines = lines.clone();
            s.output_mut().observe_lines(Box::new(move |l: &[u8]| {
                lines.lock().unwrap().push(format!("{tag}:{}", String::from_utf8_lossy(l)))
            }));
        }
        let long = vec![b'x'; LINE_MAX + 1];
        for b in [&b"one\ntwo\n"[..], &long, b"\n", b"unfinished"].concat() {
            s.write(UART_TX, &[b]);
        }
        assert!(timeline.at("guest: first serial byte").is_some());
        let x = "x".repeat(LINE_MAX);
        let want = ["a:one", "b:one", "a:two", "b:two", &format!("a:{x}"), &format!("b:{x}"), "a:", "b:"];
        assert_eq!(*lines.lock().unwrap(), want);
        assert_eq!(out.0.lock().unwrap().len(), 8 + LINE_MAX + 1 + 1 + 10, "observers take nothing from the output");
    }

    /// A sink that fails every write and counts the attempts.
    struct Failing(Arc<Mutex<u32>>);
    impl Write for Failing {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            *self.0.lock().unwrap() += 1;
            Err(io::Error::from_raw_os_error(libc::ENOSPC))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failing_sink_is_tried_once_and_counted() {
        let tries = Arc::new(Mutex::new(0));
        let timeline = Arc::new(Timeline::new(Instant::now()));
        let so = SerialOutput::new(Box::new(Failing(tries.clone())), timeline);
        let mut s = Serial::new(IrqLine::None, so, None);
        for b in b"hello, full disk\n" {
            s.write(UART_TX, &[*b]);
        }
        assert_eq!(*tries.lock().unwrap(), 1, "one failed write, one warning, not one per byte");
        assert_eq!(s.output().dropped(), 17);
    }

    #[test]
    fn output_stops_at_the_limit() {
        let out = Shared::default();
        let timeline = Arc::new(Timeline::new(Instant::now()));
        let so = SerialOutput::new(Box::new(out.clone()), timeline).with_limit(10);
        let mut s = Serial::new(IrqLine::None, so, None);
        for b in b"0123456789abcdef" {
            s.write(UART_TX, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"0123456789");
        assert_eq!(s.output().dropped(), 6);
    }

    #[test]
    fn odd_offsets_and_sizes_do_not_panic() {
        let (mut s, ..) = uart();
        let mut buf = [0u8; 8];
        s.read(0x1_0000, &mut buf);
        s.write(0x1_0000, &buf);
        s.read(3, &mut []);
        s.write(3, &[]);
    }
}
