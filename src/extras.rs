//! What a tool adds to a VM besides the VM itself: `VmConfig` (config.rs) says what the guest gets,
//! [`Extras`] what ember records about it and which tool-only devices sit next to ember's own.
//! `ember run` asks for exit recording (`--stats`, `--trace-exits`); `ember demo` also for the
//! registers at stop and, in its hypercall chapter, for a port of its own (demo/hypercall.rs).
//! [`crate::vmm::Vmm::new`] takes both.

use std::sync::{Arc, Mutex};

use crate::bus::BusDevice;
use crate::stats::ExitObservation;

/// What a tool adds to the VM that [`crate::config::VmConfig`] describes; `Default`: nothing.
#[derive(Clone, Debug, Default)]
pub struct Extras {
    /// What to record about VM exits (`--stats`, `--trace-exits`, `ember demo`).
    pub observe: ExitObservation,
    /// Port-I/O devices next to ember's own (`ember demo`'s hypercall chapter, tests).
    pub pio: Vec<ExtraPioDevice>,
}

/// A device a tool adds to the port-I/O bus next to ember's own.
#[derive(Clone)]
pub struct ExtraPioDevice {
    /// First port.
    pub port: u16,
    /// Number of ports.
    pub len: u16,
    /// Name in statistics and traces.
    pub name: &'static str,
    /// The device.
    pub device: Arc<Mutex<dyn BusDevice>>,
}

impl std::fmt::Debug for ExtraPioDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at port {:#x}+{}", self.name, self.port, self.len)
    }
}
