//! The 16550 UART (COM1), the i8042 and the PCI host bridge (configuration
//! mechanism #1 at 0xcf8-0xcff) as the guest drives them: any sequence of
//! reads and writes of any width at any offset, with host input arriving in
//! between. Nothing may panic; the i8042 may stop the VM.
#![no_main]

use std::sync::Arc;
use std::time::Instant;

use ember::bus::BusDevice;
use ember::control::VmControl;
use ember::devices::i8042::I8042;
use ember::devices::irq::IrqLine;
use ember::devices::pci_host::PciHost;
use ember::devices::serial::{Serial, SerialOutput};
use ember::timeline::Timeline;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let control = Arc::new(VmControl::new().expect("an eventfd"));
    let timeline = Arc::new(Timeline::new(Instant::now()));
    let mut out = SerialOutput::new(Box::new(std::io::sink()), timeline.clone()).with_limit(4096);
    out.observe_lines(ember::control::linux_console_observer(control.clone(), timeline));
    let mut serial = Serial::new(IrqLine::None, out, None);
    let mut i8042 = I8042::new(control);
    let mut pci = PciHost::new();
    // One access per 4 bytes: [what, offset, width, value].
    for op in data.chunks_exact(4) {
        let (what, offset, width, value) = (op[0], u64::from(op[1]), usize::from(op[2] % 9), op[3]);
        let mut buf = [value; 8];
        let buf = &mut buf[..width];
        match what % 7 {
            0 => serial.write(offset % 16, buf),
            1 => serial.read(offset % 16, buf),
            2 => i8042.write(offset % 8, buf),
            3 => i8042.read(offset % 8, buf),
            4 => pci.write(offset % 8, buf),
            5 => pci.read(offset % 8, buf),
            _ => {
                if serial.input_room() > 0 {
                    serial.enqueue_input(buf);
                }
            }
        }
    }
});
