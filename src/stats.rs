//! What the vCPU loop saw, for people: `--stats` (VM exits by reason, port or
//! MMIO address and owning device, with the time ember spent handling each)
//! and `--trace-exits[=N]` (the first N exits, one line each).
//!
//! Layer: ember, between KVM_RUN returning (KVM api.rst 4.10, "The kvm_run
//! structure": `exit_reason` and the `io`/`mmio` members) and the next
//! KVM_RUN. Nothing here runs unless asked: `Vcpu::run` holds an
//! `Option<Box<ExitObserver>>`, checks it once per exit, and only then reads
//! the clock. Memory is bounded: at most [`MAX_ROWS`] (reason, address) rows
//! per vCPU, each a count, a sum, a min, a max and a log2 histogram (for the
//! median), never a list of samples.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Why KVM_RUN returned, in the words of api.rst's `KVM_EXIT_*` list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExitKind {
    /// KVM_EXIT_IO, direction in: the guest ran `IN`.
    IoIn,
    /// KVM_EXIT_IO, direction out: the guest ran `OUT`.
    IoOut,
    /// KVM_EXIT_MMIO read.
    MmioRead,
    /// KVM_EXIT_MMIO write.
    MmioWrite,
    /// KVM_EXIT_HLT (no in-kernel LAPIC).
    Hlt,
    /// KVM_EXIT_SHUTDOWN: a triple fault.
    Shutdown,
    /// KVM_EXIT_INTERNAL_ERROR.
    InternalError,
    /// KVM_EXIT_SYSTEM_EVENT (reset, shutdown).
    SystemEvent,
    /// KVM_EXIT_FAIL_ENTRY.
    FailEntry,
    /// KVM_RUN returned EINTR/EAGAIN or KVM_EXIT_INTR: a kick from ember.
    Interrupted,
    /// Anything else.
    Other,
}

impl ExitKind {
    /// The short name used in tables and traces.
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::IoIn => "io-in",
            ExitKind::IoOut => "io-out",
            ExitKind::MmioRead => "mmio-read",
            ExitKind::MmioWrite => "mmio-write",
            ExitKind::Hlt => "hlt",
            ExitKind::Shutdown => "shutdown",
            ExitKind::InternalError => "internal-error",
            ExitKind::SystemEvent => "system-event",
            ExitKind::FailEntry => "fail-entry",
            ExitKind::Interrupted => "interrupted",
            ExitKind::Other => "other",
        }
    }

    fn is_io(self) -> bool {
        matches!(self, ExitKind::IoIn | ExitKind::IoOut)
    }

    fn has_address(self) -> bool {
        matches!(self, ExitKind::IoIn | ExitKind::IoOut | ExitKind::MmioRead | ExitKind::MmioWrite)
    }
}

/// One exit, as the vCPU loop hands it over after handling it.
#[derive(Clone, Copy, Debug)]
pub struct Exit<'a> {
    /// Why.
    pub kind: ExitKind,
    /// Port or guest-physical address (0 when the exit has none).
    pub addr: u64,
    /// The bytes written, or read back after the device answered.
    pub data: &'a [u8],
    /// The device that owns `addr` (`Bus::device_name`).
    pub device: Option<&'static str>,
}

/// What `--stats` and `--trace-exits` asked the vCPUs to record.
#[derive(Clone, Debug, Default)]
pub struct ExitObservation {
    /// Keep per-(reason, address) statistics.
    pub stats: bool,
    /// Print the first N exits of the VM (all vCPUs together); 0: none.
    pub trace_exits: u64,
    /// Read the vCPU's control registers when it stops (`ember demo`).
    pub snapshot_registers: bool,
}

impl ExitObservation {
    /// True when nothing is asked: the vCPU loop then carries no observer at all.
    pub fn is_off(&self) -> bool {
        !self.stats && self.trace_exits == 0 && !self.snapshot_registers
    }
}

/// Most (reason, address) rows one vCPU keeps; further addresses share one row.
pub const MAX_ROWS: usize = 256;
const BUCKETS: usize = 40;

/// Count, sum, min, max and a log2 histogram of handling times in ns.
#[derive(Clone, Debug)]
pub struct Timing {
    /// Exits.
    pub count: u64,
    /// Sum of handling times.
    pub sum_ns: u64,
    /// Shortest.
    pub min_ns: u64,
    /// Longest.
    pub max_ns: u64,
    /// `hist[i]`: exits that took [2^i, 2^(i+1)) ns (bucket 0 also holds 0 ns).
    hist: [u32; BUCKETS],
}

impl Default for Timing {
    fn default() -> Self {
        Timing { count: 0, sum_ns: 0, min_ns: u64::MAX, max_ns: 0, hist: [0; BUCKETS] }
    }
}

impl Timing {
    /// Adds one sample.
    pub fn add(&mut self, ns: u64) {
        self.count += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
        self.min_ns = self.min_ns.min(ns);
        self.max_ns = self.max_ns.max(ns);
        let b = (63 - ns.max(1).leading_zeros() as usize).min(BUCKETS - 1);
        self.hist[b] = self.hist[b].saturating_add(1);
    }

    /// Adds another row's samples.
    pub fn merge(&mut self, o: &Timing) {
        self.count += o.count;
        self.sum_ns = self.sum_ns.saturating_add(o.sum_ns);
        self.min_ns = self.min_ns.min(o.min_ns);
        self.max_ns = self.max_ns.max(o.max_ns);
        for (a, b) in self.hist.iter_mut().zip(o.hist.iter()) {
            *a = a.saturating_add(*b);
        }
    }

    /// The median, to within its power-of-two bucket: the bucket's midpoint,
    /// clamped to [min, max].
    pub fn median_ns(&self) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let half = self.count.div_ceil(2);
        let mut seen = 0u64;
        for (i, &n) in self.hist.iter().enumerate() {
            seen += u64::from(n);
            if seen >= half {
                let mid = (1u64 << i) + (1u64 << i) / 2;
                return mid.clamp(self.min_ns, self.max_ns);
            }
        }
        self.max_ns
    }
}

/// A row key: the reason and, for I/O and MMIO, the address (None: the
/// overflow row once [`MAX_ROWS`] addresses were seen).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RowKey {
    /// Why.
    pub kind: ExitKind,
    /// Port or address.
    pub addr: Option<u64>,
}

/// One vCPU's exit statistics.
#[derive(Clone, Debug, Default)]
pub struct ExitStats {
    rows: HashMap<RowKey, (Option<&'static str>, Timing)>,
}

impl ExitStats {
    /// Records one handled exit that took `took`.
    pub fn record(&mut self, exit: &Exit, took: Duration) {
        let mut key = RowKey { kind: exit.kind, addr: exit.kind.has_address().then_some(exit.addr) };
        if !self.rows.contains_key(&key) && self.rows.len() >= MAX_ROWS {
            key.addr = None;
        }
        let row = self.rows.entry(key).or_insert_with(|| (exit.device, Timing::default()));
        row.1.add(took.as_nanos().min(u128::from(u64::MAX)) as u64);
    }

    /// The rows, sorted by reason then address: (key, device, timing).
    pub fn rows(&self) -> Vec<(RowKey, Option<&'static str>, &Timing)> {
        let mut v: Vec<_> = self.rows.iter().map(|(k, (d, t))| (*k, *d, t)).collect();
        v.sort_by_key(|(k, _, _)| *k);
        v
    }

    /// Exits of `kind` at `addr` (any address when None).
    pub fn count(&self, kind: ExitKind, addr: Option<u64>) -> u64 {
        self.rows
            .iter()
            .filter(|(k, _)| k.kind == kind && (addr.is_none() || k.addr == addr))
            .map(|(_, (_, t))| t.count)
            .sum()
    }

    /// Per reason: all addresses merged.
    pub fn by_kind(&self) -> Vec<(ExitKind, Timing)> {
        let mut m: HashMap<ExitKind, Timing> = HashMap::new();
        for (k, (_, t)) in &self.rows {
            m.entry(k.kind).or_default().merge(t);
        }
        let mut v: Vec<_> = m.into_iter().collect();
        v.sort_by_key(|(k, _)| *k);
        v
    }

    /// Per (reason, device): addresses of one device merged.
    pub fn by_device(&self) -> Vec<(ExitKind, &'static str, Timing)> {
        let mut m: HashMap<(ExitKind, &'static str), Timing> = HashMap::new();
        for (k, (d, t)) in &self.rows {
            let dev = d.unwrap_or(if k.kind.has_address() { "(unclaimed)" } else { "-" });
            m.entry((k.kind, dev)).or_default().merge(t);
        }
        let mut v: Vec<_> = m.into_iter().map(|((k, d), t)| (k, d, t)).collect();
        v.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        v
    }
}

/// Renders the `--stats` table: per vCPU, by reason, then by address and device.
pub fn render_table(per_vcpu: &[Option<Box<ExitStats>>]) -> String {
    let us = |ns: u64| ns as f64 / 1e3;
    let mut out = String::from("VM exits (time = ember's handling, from KVM_RUN's return to the next KVM_RUN)\n");
    out += &format!(
        "{:<5} {:<14} {:<12} {:<18} {:>9} {:>10} {:>9} {:>9} {:>9}\n",
        "vcpu", "reason", "where", "device", "count", "total ms", "min us", "med us", "max us"
    );
    for (id, stats) in per_vcpu.iter().enumerate() {
        let Some(stats) = stats else { continue };
        let mut row = |kind: &str, place: String, dev: &str, t: &Timing| {
            out += &format!(
                "{:<5} {:<14} {:<12} {:<18} {:>9} {:>10.3} {:>9.2} {:>9.2} {:>9.2}\n",
                format!("{id}"),
                kind,
                place,
                dev,
                t.count,
                t.sum_ns as f64 / 1e6,
                us(t.min_ns),
                us(t.median_ns()),
                us(t.max_ns)
            );
        };
        for (kind, t) in stats.by_kind() {
            row(kind.name(), "(all)".into(), "", &t);
        }
        for (key, dev, t) in stats.rows() {
            if !key.kind.has_address() {
                continue;
            }
            let place = match key.addr {
                Some(a) if key.kind.is_io() => format!("port {a:#x}"),
                Some(a) => format!("{a:#x}"),
                None => "(others)".into(),
            };
            row(key.kind.name(), place, dev.unwrap_or("(unclaimed)"), t);
        }
    }
    out
}

/// A vCPU's observer: its statistics and its share of the trace budget.
#[derive(Debug)]
pub struct ExitObserver {
    vcpu: u8,
    /// Statistics, when `--stats`.
    pub stats: Option<ExitStats>,
    /// Lines the whole VM may still print (shared by its vCPUs).
    trace_left: Option<Arc<AtomicU64>>,
}

impl ExitObserver {
    /// An observer for vCPU `vcpu`; None when nothing is observed.
    pub fn new(vcpu: u8, what: &ExitObservation, trace_left: &Arc<AtomicU64>) -> Option<Box<Self>> {
        if what.is_off() {
            return None;
        }
        Some(Box::new(ExitObserver {
            vcpu,
            stats: what.stats.then(ExitStats::default),
            trace_left: (what.trace_exits > 0).then(|| trace_left.clone()),
        }))
    }

    /// Records one handled exit.
    pub fn observe(&mut self, exit: &Exit, took: Duration) {
        if let Some(s) = &mut self.stats {
            s.record(exit, took);
        }
        if let Some(left) = &self.trace_left {
            let ok = left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok();
            if ok {
                eprintln!("{}", trace_line(self.vcpu, exit));
            } else {
                self.trace_left = None;
            }
        }
    }
}

/// `vcpu0 io-out port=0x3f8 size=1 data=48 'H' serial (COM1)`: one exit, for `--trace-exits`.
pub fn trace_line(vcpu: u8, e: &Exit) -> String {
    let mut s = format!("vcpu{vcpu} {}", e.kind.name());
    if e.kind.has_address() {
        if e.kind.is_io() {
            s += &format!(" port={:#x}", e.addr);
        } else {
            s += &format!(" addr={:#x}", e.addr);
        }
        s += &format!(" size={} data=", e.data.len());
        for b in e.data {
            s += &format!("{b:02x}");
        }
        let written = matches!(e.kind, ExitKind::IoOut | ExitKind::MmioWrite);
        if let (true, [b]) = (written, e.data) {
            if b.is_ascii_graphic() || *b == b' ' {
                s += &format!(" '{}'", *b as char);
            } else if *b == b'\n' {
                s += " '\\n'";
            }
        }
        s += " ";
        s += e.device.unwrap_or("(unclaimed)");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(addr: u64, b: u8) -> (u64, [u8; 1]) {
        (addr, [b])
    }

    #[test]
    fn timing_median_min_max() {
        let mut t = Timing::default();
        for ns in [100, 1000, 1100, 1200, 100_000] {
            t.add(ns);
        }
        assert_eq!((t.count, t.min_ns, t.max_ns, t.sum_ns), (5, 100, 100_000, 103_400));
        // The median (1100) lies in [1024, 2048): reported as that bucket's midpoint.
        assert_eq!(t.median_ns(), 1536);
        assert_eq!(Timing::default().median_ns(), 0);
    }

    #[test]
    fn rows_are_bounded() {
        let mut s = ExitStats::default();
        for port in 0..(MAX_ROWS as u64 + 50) {
            let (a, d) = out(port, 0);
            s.record(&Exit { kind: ExitKind::IoOut, addr: a, data: &d, device: None }, Duration::from_nanos(5));
        }
        assert_eq!(s.rows().len(), MAX_ROWS + 1);
        assert_eq!(s.count(ExitKind::IoOut, None), MAX_ROWS as u64 + 50);
        assert_eq!(s.count(ExitKind::IoOut, Some(3)), 1);
    }

    #[test]
    fn by_device_and_table() {
        let mut s = ExitStats::default();
        let d = [b'H'];
        for addr in [0x3f8, 0x3f8, 0x3fd] {
            s.record(
                &Exit { kind: ExitKind::IoOut, addr, data: &d, device: Some("serial (COM1)") },
                Duration::from_micros(2),
            );
        }
        s.record(&Exit { kind: ExitKind::Hlt, addr: 0, data: &[], device: None }, Duration::from_micros(1));
        let dev = s.by_device();
        assert_eq!(dev[0].0, ExitKind::IoOut);
        assert_eq!(dev[0].1, "serial (COM1)");
        assert_eq!(dev[0].2.count, 3);
        let table = render_table(&[Some(Box::new(s))]);
        assert!(table.contains("port 0x3f8"), "{table}");
        assert!(table.contains("hlt"), "{table}");
    }

    #[test]
    fn trace_lines() {
        let e = Exit { kind: ExitKind::IoOut, addr: 0x3f8, data: b"H", device: Some("serial (COM1)") };
        assert_eq!(trace_line(0, &e), "vcpu0 io-out port=0x3f8 size=1 data=48 'H' serial (COM1)");
        let e = Exit { kind: ExitKind::MmioWrite, addr: 0xd000_0050, data: &[0, 0, 0, 0], device: None };
        assert_eq!(trace_line(1, &e), "vcpu1 mmio-write addr=0xd0000050 size=4 data=00000000 (unclaimed)");
    }
}
