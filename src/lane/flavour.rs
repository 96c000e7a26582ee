//! Which KVM the host offers, and so whether Linux guests run on it directly.
//!
//! Read from `/dev/kvm` (present, openable) and `/sys/module/{kvm_intel,kvm_amd,kvm_pvm}` (which
//! backend module is loaded), with the `vmx`/`svm` flags of `/proc/cpuinfo` as a hint for the message
//! when no backend is loaded. `kvm_pvm` is a software ("pagetable-based") KVM: tiny freestanding guests
//! run under it, but an unmodified Linux guest crawls and its user space dies on the first syscall, so
//! ember's Linux guests go to the nested lane there (see [`super::nested`]).

use std::fmt;
use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::path::Path;

/// The host's KVM, as far as running Linux guests is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmFlavour {
    /// `/dev/kvm` does not exist.
    Absent {
        /// The CPU has `vmx` or `svm` (so loading a module would help).
        cpu_has_hw_virt: bool,
    },
    /// `/dev/kvm` exists but this user may not open it.
    NotPermitted,
    /// Intel VMX (`kvm_intel`).
    Intel,
    /// AMD SVM (`kvm_amd`).
    Amd,
    /// Software virtualization (`kvm_pvm`).
    Pvm,
    /// `/dev/kvm` works but no known backend module is visible.
    Other,
}

impl KvmFlavour {
    /// Probes this host.
    pub fn detect() -> KvmFlavour {
        Self::detect_at(Path::new("/"))
    }

    /// Probes a host whose `/dev`, `/sys` and `/proc` are under `root` (for tests).
    pub fn detect_at(root: &Path) -> KvmFlavour {
        let dev = root.join("dev/kvm");
        if !dev.exists() {
            let cpuinfo = std::fs::read_to_string(root.join("proc/cpuinfo")).unwrap_or_default();
            return KvmFlavour::Absent { cpu_has_hw_virt: cpu_has_hw_virt(&cpuinfo) };
        }
        if let Err(e) = OpenOptions::new().read(true).write(true).open(&dev)
            && e.kind() == ErrorKind::PermissionDenied
        {
            return KvmFlavour::NotPermitted;
        }
        let loaded = |m: &str| root.join("sys/module").join(m).exists();
        if loaded("kvm_pvm") {
            KvmFlavour::Pvm
        } else if loaded("kvm_intel") {
            KvmFlavour::Intel
        } else if loaded("kvm_amd") {
            KvmFlavour::Amd
        } else {
            KvmFlavour::Other
        }
    }

    /// Whether ember can boot Linux guests on this host's `/dev/kvm` itself (hardware VMX/SVM).
    pub fn runs_linux_directly(&self) -> bool {
        matches!(self, KvmFlavour::Intel | KvmFlavour::Amd)
    }

    /// Whether Linux guests need the nested lane (an emulated SVM machine) on this host.
    pub fn needs_nested_lane(&self) -> bool {
        !self.runs_linux_directly()
    }
}

fn cpu_has_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .any(|f| f == "vmx" || f == "svm")
}

impl fmt::Display for KvmFlavour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvmFlavour::Absent { cpu_has_hw_virt: true } => {
                write!(f, "no /dev/kvm (the CPU has VMX/SVM: modprobe kvm_intel or kvm_amd)")
            }
            KvmFlavour::Absent { cpu_has_hw_virt: false } => {
                write!(f, "no /dev/kvm: Linux guests run in the nested lane")
            }
            KvmFlavour::NotPermitted => {
                write!(f, "/dev/kvm not permitted (add this user to group kvm)")
            }
            KvmFlavour::Intel => write!(f, "hardware VMX (kvm_intel)"),
            KvmFlavour::Amd => write!(f, "hardware SVM (kvm_amd)"),
            KvmFlavour::Pvm => write!(f, "software (kvm_pvm): Linux guests run in the nested lane"),
            KvmFlavour::Other => write!(f, "unknown KVM backend: Linux guests run in the nested lane"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn fake_root(modules: &[&str], kvm: bool, flags: &str) -> std::path::PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let root = std::env::temp_dir().join(format!("ember-flavour-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("dev")).unwrap();
        fs::create_dir_all(root.join("proc")).unwrap();
        for m in modules {
            fs::create_dir_all(root.join("sys/module").join(m)).unwrap();
        }
        if kvm {
            // A regular file stands in for the device node: it opens read-write.
            fs::write(root.join("dev/kvm"), b"").unwrap();
        }
        fs::write(root.join("proc/cpuinfo"), format!("processor\t: 0\nflags\t\t: fpu {flags} sse\n")).unwrap();
        root
    }

    #[test]
    fn backends() {
        let cases: [(&[&str], KvmFlavour); 4] = [
            (&["kvm", "kvm_pvm"], KvmFlavour::Pvm),
            (&["kvm", "kvm_intel"], KvmFlavour::Intel),
            (&["kvm", "kvm_amd"], KvmFlavour::Amd),
            (&["kvm"], KvmFlavour::Other),
        ];
        for (mods, want) in cases {
            let root = fake_root(mods, true, "");
            assert_eq!(KvmFlavour::detect_at(&root), want);
            fs::remove_dir_all(root).unwrap();
        }
    }

    #[test]
    fn absent() {
        let root = fake_root(&[], false, "svm");
        assert_eq!(KvmFlavour::detect_at(&root), KvmFlavour::Absent { cpu_has_hw_virt: true });
        fs::remove_dir_all(root).unwrap();
        let root = fake_root(&[], false, "");
        assert_eq!(KvmFlavour::detect_at(&root), KvmFlavour::Absent { cpu_has_hw_virt: false });
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn lanes_and_descriptions() {
        assert!(KvmFlavour::Amd.runs_linux_directly());
        assert!(KvmFlavour::Intel.runs_linux_directly());
        assert!(KvmFlavour::Pvm.needs_nested_lane());
        assert_eq!(KvmFlavour::Amd.to_string(), "hardware SVM (kvm_amd)");
        assert_eq!(KvmFlavour::Pvm.to_string(), "software (kvm_pvm): Linux guests run in the nested lane");
    }
}
