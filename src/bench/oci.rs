//! OCI bundles and cgroups for the container runtimes (crun, runc).
//!
//! The bundle's rootfs is the guest's busybox tree: Debian's busybox-static (`/bin/busybox`,
//! the same binary `guest-kernels/initramfs.sh` puts in the initramfs) with one symlink per
//! applet. `config.json` (OCI runtime spec 1.0) runs the payload with pid, mount, ipc, uts and
//! an empty network namespace, and the VM's limits as cgroup limits: `--cpus` as a CPU quota,
//! `--memory` as the memory limit.
//!
//! Memory: every launch (of any runtime) runs in a memory cgroup of its own that ember creates
//! under its own cgroup (the child joins it before exec), and a container additionally gets a
//! parent cgroup (`.../ember-bench-<pid>-c<n>`) in which the runtime makes the container's cgroup.
//! The runtime removes the container's cgroup at exit; the parent's peak
//! (`memory.max_usage_in_bytes` on cgroup v1, `memory.peak` on v2) still holds the container's
//! peak charge (user memory, page tables, kernel memory); then ember removes both.
//! Why not `wait4`'s `ru_maxrss`: a child started by vfork/posix_spawn inherits its parent's peak
//! RSS at exec (the kernel keeps the old mm's high-water mark), so ember bench's own size leaks
//! into every number; a cgroup counts only what the launch itself charged.
//!
//! The hybrid cgroup layout (v1 controllers plus `/sys/fs/cgroup/unified`, which here has the
//! hugetlb controller enabled) makes crun refuse to start ("cgroups in hybrid mode not supported,
//! drop all controllers from cgroupv2"). crun is therefore started in a private mount namespace
//! where `/sys/fs/cgroup/unified` is unmounted, so it sees a plain v1 layout: see
//! [`hide_unified_cgroup`]. runc copes with the hybrid layout as it is.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The cgroup hierarchies mounted under /sys/fs/cgroup (v1 controllers, the unified v2 tree),
/// or /sys/fs/cgroup itself when it is a pure v2 mount.
pub fn cgroup_roots() -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        return vec![root.to_path_buf()];
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(root)
        .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.join("cgroup.procs").exists()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Whether crun needs the unified hierarchy hidden: a hybrid layout whose v2 tree has controllers.
pub fn unified_has_controllers() -> bool {
    std::fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers").is_ok_and(|s| !s.trim().is_empty())
}

/// For `pre_exec`: a private mount namespace without `/sys/fs/cgroup/unified`, so crun sees a v1
/// layout. Only async-signal-safe system calls. The namespace dies with the runtime's process.
pub fn hide_unified_cgroup() -> io::Result<()> {
    // SAFETY: unshare/mount/umount2 take no pointers but the static C strings below.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        if libc::umount2(c"/sys/fs/cgroup/unified".as_ptr(), libc::MNT_DETACH) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Builds the busybox rootfs at `dir/rootfs` (once per bench run).
pub fn create_rootfs(dir: &Path) -> io::Result<PathBuf> {
    let root = dir.join("rootfs");
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin)?;
    for d in ["proc", "sys", "dev", "tmp", "etc", "root"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy("/bin/busybox", bin.join("busybox"))?;
    let list = Command::new("/bin/busybox").arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if !applet.is_empty() && applet != "busybox" && !applet.contains('/') {
            let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
        }
    }
    build_getpid(&root.join("sbin"), dir)?;
    Ok(root)
}

/// Compiles `ember-getpid` (the syscall-cost workload; the same source the
/// default guest's initramfs carries) into `sbin`, with the flags initramfs.sh uses.
fn build_getpid(sbin: &Path, work: &Path) -> io::Result<()> {
    std::fs::create_dir_all(sbin)?;
    let src = work.join("ember-getpid.c");
    std::fs::write(&src, crate::guest::GETPID_SOURCE)?;
    std::fs::write(work.join("freestanding.h"), crate::guest::FREESTANDING_HEADER)?;
    let out = Command::new("gcc")
        .args(["-Os", "-static", "-nostdlib", "-ffreestanding", "-fno-pie", "-no-pie", "-fno-stack-protector"])
        .args(["-fno-asynchronous-unwind-tables", "-Wl,--build-id=none", "-s", "-o"])
        .arg(sbin.join("ember-getpid"))
        .arg(&src)
        .output()
        .map_err(|e| {
            io::Error::new(e.kind(), format!("running gcc to build ember-getpid (apt-get install gcc): {e}"))
        })?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "gcc failed on ember-getpid.c: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// The container's limits: the VM's `--cpus` and `--memory`.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// CPUs (CPU quota = cpus x period).
    pub cpus: u32,
    /// Memory limit, bytes.
    pub mem_bytes: u64,
}

/// CFS period used for the CPU quota, microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;

/// The OCI config.json for `args` in `rootfs`, limited by `limits`, in cgroup `cgroups_path`.
pub fn config_json(
    args: &[String],
    rootfs: &Path,
    hostname: &str,
    limits: Limits,
    cgroups_path: &str,
) -> serde_json::Value {
    let ns = |t: &str| serde_json::json!({ "type": t });
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": args,
            "env": ["PATH=/bin:/sbin:/usr/bin:/usr/sbin", "HOME=/root"],
            "cwd": "/",
            "noNewPrivileges": true,
        },
        "root": { "path": rootfs, "readonly": false },
        "hostname": hostname,
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "size=65536k"] },
        ],
        "linux": {
            "namespaces": [ns("pid"), ns("mount"), ns("ipc"), ns("uts"), ns("network")],
            "cgroupsPath": cgroups_path,
            "resources": {
                "memory": { "limit": limits.mem_bytes },
                "cpu": { "quota": limits.cpus as u64 * CPU_PERIOD_US, "period": CPU_PERIOD_US },
                "devices": [{ "allow": false, "access": "rwm" }],
            },
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    })
}

/// Writes a bundle directory for one container: `config.json` pointing at the shared `rootfs`.
pub fn create_bundle(
    bundle: &Path,
    rootfs: &Path,
    args: &[String],
    limits: Limits,
    cgroups_path: &str,
) -> io::Result<()> {
    std::fs::create_dir_all(bundle)?;
    let cfg = config_json(args, rootfs, "ember-bench", limits, cgroups_path);
    std::fs::write(bundle.join("config.json"), serde_json::to_vec_pretty(&cfg).expect("JSON of plain values"))
}

/// Gives a bundle's process the image's environment and working directory.
pub fn set_process(bundle: &Path, env: &[String], cwd: &str) -> io::Result<()> {
    let path = bundle.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?).map_err(io::Error::other)?;
    cfg["process"]["env"] = serde_json::json!(env);
    cfg["process"]["cwd"] = serde_json::json!(cwd);
    std::fs::write(&path, serde_json::to_vec_pretty(&cfg).map_err(io::Error::other)?)
}

/// Creates cgroup `name` (a path relative to the hierarchy roots) in the memory hierarchy;
/// returns its directory.
pub fn create_memory_cgroup(name: &str) -> io::Result<PathBuf> {
    let mem = memory_root().ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no memory cgroup hierarchy"))?;
    let p = mem.join(name.trim_start_matches('/'));
    std::fs::create_dir_all(&p)?;
    Ok(p)
}

fn memory_root() -> Option<PathBuf> {
    cgroup_roots()
        .into_iter()
        .find(|r| r.join("memory.max_usage_in_bytes").exists() || r.join("cgroup.controllers").exists())
}

/// This process's cgroup in the memory hierarchy (e.g. `/user.slice/x`), where ember bench
/// makes its own cgroups, so launches stay under whatever limits this process has.
pub fn own_memory_cgroup() -> String {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let v1 = text.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
        ctrl.split(',').any(|c| c == "memory").then(|| path.to_string())
    });
    let v2 = || text.lines().find_map(|l| l.strip_prefix("0::").map(str::to_string));
    v1.or_else(v2).unwrap_or_else(|| "/".into()).trim_end_matches('/').to_string()
}

/// For `pre_exec`: moves the calling process into the cgroup whose `cgroup.procs` is `procs`
/// (writing "0" means "me"). Only async-signal-safe system calls.
pub fn join_cgroup(procs: &std::ffi::CStr) -> io::Result<()> {
    // SAFETY: open/write/close on a NUL-terminated path and a static buffer.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let r = libc::write(fd, c"0".as_ptr().cast(), 1);
        libc::close(fd);
        if r != 1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The peak memory charge of a cgroup, KiB (v1 `memory.max_usage_in_bytes`, v2 `memory.peak`).
pub fn cgroup_peak_kib(cg: &Path) -> Option<u64> {
    ["memory.max_usage_in_bytes", "memory.peak"]
        .iter()
        .find_map(|f| std::fs::read_to_string(cg.join(f)).ok()?.trim().parse::<u64>().ok())
        .map(|b| b >> 10)
}

/// Removes cgroup `name` (and a leftover child) from every hierarchy. Returns false if one remains.
pub fn remove_cgroup_everywhere(name: &str) -> bool {
    let mut clean = true;
    for root in cgroup_roots() {
        let p = root.join(name.trim_start_matches('/'));
        if !p.exists() {
            continue;
        }
        if let Ok(d) = std::fs::read_dir(&p) {
            for e in d.flatten() {
                if e.path().is_dir() {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
        if std::fs::remove_dir(&p).is_err() {
            clean = false;
        }
    }
    clean
}

/// Two timestamps the child writes around joining its cgroup (a shared page survives the
/// fork), so the launch's timings can leave out that cost: moving a task between cgroup v1
/// hierarchies waits for an RCU grace period (milliseconds), which no runtime pays normally.
pub struct JoinTimer {
    page: *mut i64,
}

// SAFETY: the page is only read and written with volatile accesses of whole i64 values, by the
// parent after the child wrote them.
unsafe impl Send for JoinTimer {}
// SAFETY: as above.
unsafe impl Sync for JoinTimer {}

impl JoinTimer {
    /// Maps the shared page.
    pub fn new() -> io::Result<JoinTimer> {
        // SAFETY: a fresh anonymous shared mapping; checked for failure below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(JoinTimer { page: p.cast() })
    }

    /// For `pre_exec`: records CLOCK_MONOTONIC in slot `i` (0 or 1). Async-signal-safe.
    pub fn record(&self, i: usize) {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime fills `ts`; the page has room for slots 0 and 1.
        unsafe {
            libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
            self.page.add(i.min(1)).write_volatile(ts.tv_sec * 1_000_000_000 + ts.tv_nsec);
        }
    }

    /// How long the join took (zero if the child did not record it).
    pub fn cost(&self) -> std::time::Duration {
        // SAFETY: reads two i64 slots of the live page.
        let (a, b) = unsafe { (self.page.read_volatile(), self.page.add(1).read_volatile()) };
        std::time::Duration::from_nanos(if a > 0 && b > a { (b - a) as u64 } else { 0 })
    }
}

impl Drop for JoinTimer {
    fn drop(&mut self) {
        // SAFETY: unmaps the page mapped in `new`, which nothing uses any more.
        unsafe { libc::munmap(self.page.cast(), 4096) };
    }
}

/// The directories of `base`'s components (e.g. `/a`, `/a/b`) that do not exist yet in some
/// hierarchy: a runtime creating a container's cgroup under `base` makes them, and ember bench
/// removes them again with [`remove_empty_dirs`].
pub fn missing_prefixes(base: &str) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for root in cgroup_roots() {
        let mut p = root.clone();
        for comp in base.split('/').filter(|c| !c.is_empty()) {
            p.push(comp);
            if !p.exists() {
                v.push(p.clone());
            }
        }
    }
    v
}

/// Removes every cgroup under `base` whose name starts with `prefix`, in every hierarchy
/// (what a run prepared but never launched, when it is interrupted).
pub fn sweep_cgroups(base: &str, prefix: &str) {
    for root in cgroup_roots() {
        let Ok(d) = std::fs::read_dir(root.join(base.trim_start_matches('/'))) else { continue };
        for e in d.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(prefix) {
                remove_cgroup_everywhere(&format!("{base}/{name}"));
            }
        }
    }
}

/// Removes these (empty) directories, deepest first.
pub fn remove_empty_dirs(dirs: &[PathBuf]) {
    let mut d = dirs.to_vec();
    d.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in d {
        let _ = std::fs::remove_dir(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_limits_and_namespaces() {
        let lim = Limits { cpus: 2, mem_bytes: 64 << 20 };
        let c = config_json(&["/bin/echo".into(), "hi".into()], Path::new("/r"), "h", lim, "/p/c");
        assert_eq!(c["process"]["args"][1], "hi");
        assert_eq!(c["linux"]["resources"]["cpu"]["quota"], 200_000);
        assert_eq!(c["linux"]["resources"]["memory"]["limit"], 64 << 20);
        let ns: Vec<&str> =
            c["linux"]["namespaces"].as_array().unwrap().iter().map(|n| n["type"].as_str().unwrap()).collect();
        assert_eq!(ns, ["pid", "mount", "ipc", "uts", "network"]);
        assert_eq!(c["linux"]["cgroupsPath"], "/p/c");
    }
}
