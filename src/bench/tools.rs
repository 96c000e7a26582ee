//! `ember bench --tier linux`: the workloads that need real tools, run after the timed rounds with
//! the programs of the tools image (guest-kernels/tools.sh: Debian's iperf3 and fio with their
//! libraries): the same binaries in every runtime, the image's tree bind-mounted at /opt/tools in
//! the containers, the image itself as a read-only virtio-blk disk in the VMs.
//!
//! Network: TCP throughput of an iperf3 client in the runtime to an iperf3 server in a network
//! namespace that ember bench creates, and deletes again on drop, also when a measurement fails.
//! Nothing is sent anywhere else. The namespaces and addresses (PID = ember bench's):
//! - `ember-bsrv-PID`: the server, `iperf3 -s`; veth `ebv0` 10.77.1.1/24 and tap `ebt0` 10.77.2.1/24.
//! - `ember-bcli-PID`: the veth's other end, `eth0` 10.77.1.2/24: where the host's client runs, and
//!   the network namespace the containers are given (their config.json names its path).
//! - a VM: ember runs inside `ember-bsrv-PID` with `--net tap=ebt0`; the guest is 10.77.2.2 and runs
//!   iperf3 from the tools disk (its only disk, /dev/vda).
//!
//! File I/O: fio's [`FIO_JOBS`] (sequential read, bs=1M, and 4 KiB random read at iodepth 16, libaio,
//! direct=1, read-only) on one 64 MiB data file in the temp dir: the file itself on the host, the
//! file bind-mounted at /data.img in the containers, the file as the VM's first disk (/dev/vda; the
//! tools are /dev/vdb). In the Linux lane the temp dir is the outer machine's 9p mount of the
//! host's, which is also what the inner ember's virtio-blk backend reads.
//!
//! qemu-microvm and docker are not measured yet.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::oci;
use super::runtimes::{Runtime, Setup};

/// Seconds of each iperf3 run.
pub const IPERF_SECS: u32 = 3;
const SERVER: &str = "10.77.1.1";
const TAP_SERVER: &str = "10.77.2.1";
/// Where the host's iperf3 makes its per-stream temporary file (`$TMPDIR`; a tmpfs: in the Linux
/// lane's outer machine /tmp is 9p, where that fails).
const TMPDIR: &str = "/dev/shm";

/// The fio jobs (terse v3 output, one line per job), run one after the other; `--filename` is
/// added per runtime.
pub const FIO_JOBS: &str = "--output-format=terse --terse-version=3 --readonly --direct=1 --ioengine=libaio \
    --size=64M --name=seqread --rw=read --bs=1M --runtime=20 --name=randread-qd16 --stonewall --rw=randread \
    --bs=4k --iodepth=16 --runtime=3 --time_based";
/// Size of the fio data file, MiB.
pub const FIO_FILE_MIB: usize = 64;

/// The tools, where each kind of runtime finds them.
#[derive(Clone, Debug)]
pub struct Tools {
    /// The ext4 image (the VMs' disk).
    pub image: PathBuf,
    /// Its tree (the host's programs, the containers' /opt/tools).
    pub tree: PathBuf,
}

impl Tools {
    /// The cached tools image, built if missing (progress on stderr).
    pub fn find() -> Result<Tools, String> {
        let image = crate::guest::default_tools().map_err(|e| format!("no tools image: {e}"))?;
        let tree = crate::guest::tools_tree(&image);
        Ok(Tools { image, tree })
    }
}

/// The two namespaces and the server; dropping it kills the server and deletes both namespaces
/// (and with them the veth and the tap).
pub struct TestNet {
    srv: String,
    cli: String,
    server: Option<std::process::Child>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let o = Command::new("ip").args(args).output().map_err(|e| format!("cannot run ip: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim()))
    }
}

impl TestNet {
    /// Creates the namespaces, links and addresses, and starts the server.
    pub fn create(tools: &Tools) -> Result<TestNet, String> {
        let pid = std::process::id();
        let mut net = TestNet { srv: format!("ember-bsrv-{pid}"), cli: format!("ember-bcli-{pid}"), server: None };
        let _ = Command::new("modprobe").arg("tun").stderr(Stdio::null()).status();
        let _ = Command::new("modprobe").arg("veth").stderr(Stdio::null()).status();
        let (srv, cli) = (net.srv.clone(), net.cli.clone());
        for ns in [&srv, &cli] {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        ip(&["-n", &srv, "link", "add", "ebv0", "type", "veth", "peer", "name", "eth0", "netns", &cli])?;
        ip(&["-n", &srv, "addr", "add", &format!("{SERVER}/24"), "dev", "ebv0"])?;
        ip(&["-n", &srv, "link", "set", "ebv0", "up"])?;
        ip(&["-n", &cli, "addr", "add", "10.77.1.2/24", "dev", "eth0"])?;
        ip(&["-n", &cli, "link", "set", "eth0", "up"])?;
        ip(&["-n", &srv, "tuntap", "add", "dev", "ebt0", "mode", "tap"])?;
        ip(&["-n", &srv, "addr", "add", &format!("{TAP_SERVER}/24"), "dev", "ebt0"])?;
        ip(&["-n", &srv, "link", "set", "ebt0", "up"])?;
        let server = Command::new("ip")
            .env("TMPDIR", TMPDIR)
            .args(["netns", "exec", &srv])
            .arg(tools.tree.join("bin/iperf3"))
            .arg("-s")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start the iperf3 server: {e}"))?;
        net.server = Some(server);
        std::thread::sleep(std::time::Duration::from_millis(500));
        Ok(net)
    }

    /// One measurement: Mbit/s of `rt`'s iperf3 client (the receiver's figure).
    pub fn measure(&self, rt: Runtime, setup: &Setup, tools: &Tools, seq: u64) -> Result<f64, String> {
        let client = |server: &str| format!("-c {server} -t {IPERF_SECS} -f m");
        let text = match rt {
            Runtime::Host => {
                let mut c = Command::new("ip");
                c.env("TMPDIR", TMPDIR);
                c.args(["netns", "exec", &self.cli]).arg(tools.tree.join("bin/iperf3"));
                c.args(client(SERVER).split(' '));
                output_of(&mut c)?
            }
            Runtime::Crun | Runtime::Runc => {
                let netns = format!("/var/run/netns/{}", self.cli);
                let sh = format!("/opt/tools/bin/iperf3 {}", client(SERVER));
                run_container(rt, setup, tools, seq, &sh, Some(&netns), None)?
            }
            Runtime::Ember => {
                let guest = format!(
                    "ip addr add 10.77.2.2/24 dev eth0 && ip link set eth0 up && mount -o ro /dev/vda /mnt && \
                     /mnt/bin/iperf3 {}",
                    client(TAP_SERVER)
                );
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &self.srv]).arg(&setup.ember);
                ember_args(&mut c, setup)?;
                c.arg("--disk").arg(format!("{},ro", tools.image.display())).args(["--net", "tap=ebt0"]);
                c.args(["--", "sh", "-c", &guest]);
                output_of(&mut c)?
            }
            _ => return Err("not measured for this runtime yet".into()),
        };
        receiver_mbits(&text).ok_or_else(|| format!("no iperf3 result: {}", tail(&text)))
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        for ns in [&self.srv, &self.cli] {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
        }
    }
}

/// One fio run of [`FIO_JOBS`] in `rt` on `data`: (sequential read MiB/s, 4 KiB random-read IOPS).
pub fn measure_fio(rt: Runtime, setup: &Setup, tools: &Tools, data: &Path, seq: u64) -> Result<(f64, f64), String> {
    let text = match rt {
        Runtime::Host => {
            let mut c = Command::new(tools.tree.join("bin/fio"));
            c.arg(format!("--filename={}", data.display())).args(FIO_JOBS.split_whitespace());
            output_of(&mut c)?
        }
        Runtime::Crun | Runtime::Runc => {
            let sh = format!("/opt/tools/bin/fio --filename=/data.img {FIO_JOBS}");
            run_container(rt, setup, tools, seq, &sh, None, Some(data))?
        }
        Runtime::Ember => {
            let guest = format!("mount -o ro /dev/vdb /mnt && /mnt/bin/fio --filename=/dev/vda {FIO_JOBS}");
            let mut c = Command::new(&setup.ember);
            ember_args(&mut c, setup)?;
            c.arg("--disk").arg(format!("{},ro", data.display()));
            c.arg("--disk").arg(format!("{},ro", tools.image.display()));
            c.args(["--", "sh", "-c", &guest]);
            output_of(&mut c)?
        }
        _ => return Err("not measured for this runtime yet".into()),
    };
    fio_figures(&text).ok_or_else(|| format!("no fio result: {}", tail(&text)))
}

/// Writes the fio data file (not sparse, not zeros).
pub fn create_fio_file(path: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    for _ in 0..FIO_FILE_MIB {
        f.write_all(&chunk)?;
    }
    f.sync_all()
}

/// ember's arguments for the Linux tier's guest, as the timed runs use them.
fn ember_args(c: &mut Command, setup: &Setup) -> Result<(), String> {
    let g = setup.linux.as_ref().ok_or("no Linux guest")?;
    c.args(["run", "--memory", &setup.mem_arg, "--cpus", &setup.limits.cpus.to_string()]);
    c.arg("--no-fallback").arg("--kernel").arg(&g.vmlinux).arg("--initrd").arg(&g.initramfs);
    Ok(())
}

/// Runs `sh -c SH` in a crun/runc container with the tools at /opt/tools, in network namespace
/// `netns` (else a new one) and with `data` bind-mounted read-only at /data.img; its stdout.
fn run_container(
    rt: Runtime,
    setup: &Setup,
    tools: &Tools,
    seq: u64,
    sh: &str,
    netns: Option<&str>,
    data: Option<&Path>,
) -> Result<String, String> {
    let id = format!("ember-bench-tools-{}-{}-{seq}", std::process::id(), rt.name());
    let dir = setup.work.join("bundles").join(&id);
    let parent = format!("{}/ember-bench-{}-t{seq}", setup.cgroup_base, std::process::id());
    let payload = vec!["/bin/sh".to_string(), "-c".to_string(), sh.to_string()];
    let result = (|| {
        oci::create_bundle(&dir, &setup.rootfs, &payload, setup.limits, &format!("{parent}/{id}"))
            .map_err(|e| format!("bundle: {e}"))?;
        // Mount points in the (shared) rootfs.
        std::fs::create_dir_all(setup.rootfs.join("opt/tools")).map_err(|e| format!("rootfs: {e}"))?;
        if data.is_some() && !setup.rootfs.join("data.img").exists() {
            std::fs::write(setup.rootfs.join("data.img"), b"").map_err(|e| format!("rootfs: {e}"))?;
        }
        patch_bundle(&dir, tools, netns, data).map_err(|e| format!("bundle: {e}"))?;
        let mut c = Command::new(rt.name());
        c.args(["run", "-b"]).arg(&dir).arg(&id);
        output_of(&mut c)
    })();
    super::runtimes::delete_container(rt, &id);
    let _ = std::fs::remove_dir_all(&dir);
    oci::remove_cgroup_everywhere(&format!("{parent}/{id}"));
    oci::remove_cgroup_everywhere(&parent);
    result
}

/// Adds the bind mounts (and the network namespace's path) to a bundle's config.json.
fn patch_bundle(dir: &Path, tools: &Tools, netns: Option<&str>, data: Option<&Path>) -> std::io::Result<()> {
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?).map_err(std::io::Error::other)?;
    if let (Some(netns), Some(list)) = (netns, cfg.pointer_mut("/linux/namespaces").and_then(|v| v.as_array_mut())) {
        for ns in list.iter_mut().filter(|ns| ns["type"] == "network") {
            ns["path"] = netns.into();
        }
    }
    if let Some(mounts) = cfg.get_mut("mounts").and_then(|v| v.as_array_mut()) {
        let bind = |src: &Path, dst: &str| serde_json::json!({ "destination": dst, "type": "bind", "source": src, "options": ["rbind", "ro"] });
        mounts.push(bind(&tools.tree, "/opt/tools"));
        if let Some(d) = data {
            mounts.push(bind(d, "/data.img"));
        }
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&cfg).map_err(std::io::Error::other)?)
}

/// Runs `cmd` (stdin empty), killing it after two minutes; its stdout, `\r` removed, or why not.
fn output_of(cmd: &mut Command) -> Result<String, String> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start: {e}"))?;
    let id = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let r = child.wait_with_output();
        let _ = tx.send(());
        r
    });
    if rx.recv_timeout(std::time::Duration::from_secs(120)).is_err() {
        // SAFETY: kill on our child's pid, not yet reaped (the waiter has not returned).
        unsafe { libc::kill(id as libc::pid_t, libc::SIGKILL) };
    }
    let out = waiter.join().map_err(|_| "waiter panicked".to_string())?.map_err(|e| format!("waiting: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    if out.status.success() {
        Ok(text)
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(format!("status {:?}: {}", out.status.code(), tail(&format!("{err}\n{text}"))))
    }
}

/// The last few meaningful lines of some output, on one line.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty() && !l.starts_with("[{\"event\"")).collect();
    lines[lines.len().saturating_sub(4)..].join(" | ")
}

/// The Mbit/s of an iperf3 `... receiver` summary line (`-f m`).
pub fn receiver_mbits(out: &str) -> Option<f64> {
    let line = out.lines().find(|l| l.contains("receiver"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words.iter().position(|w| *w == "Mbits/sec")?;
    words.get(i.checked_sub(1)?)?.parse().ok()
}

/// (sequential read MiB/s, 4 KiB random-read IOPS) from fio's terse v3 lines
/// (`3;fio-3.33;JOB;...`: field 7 is the read bandwidth in KiB/s, field 8 the read IOPS).
pub fn fio_figures(out: &str) -> Option<(f64, f64)> {
    let job = |name: &str| -> Option<(f64, f64)> {
        out.lines().find_map(|l| {
            let f: Vec<&str> = l.trim().split(';').collect();
            (f.len() > 8 && f[0] == "3" && f[1].starts_with("fio-") && f[2] == name)
                .then(|| Some((f[6].parse().ok()?, f[7].parse().ok()?)))?
        })
    };
    Some((job("seqread")?.0 / 1024.0, job("randread-qd16")?.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iperf3_receiver_line_parses() {
        let out = "[ ID] Interval           Transfer     Bitrate         Retr\n\
                   [  5]   0.00-3.00   sec   337 MBytes   942 Mbits/sec    0             sender\n\
                   [  5]   0.00-3.04   sec   336 MBytes   927 Mbits/sec                  receiver\n";
        assert_eq!(receiver_mbits(out), Some(927.0));
        assert_eq!(receiver_mbits("iperf3: error - unable to connect"), None);
    }

    #[test]
    fn fio_terse_lines_parse() {
        let out =
            "noise\n3;fio-3.33;seqread;0;0;65536;1048576;1024;62;x\n3;fio-3.33;randread-qd16;0;0;1;2048;512;3000;y\n";
        assert_eq!(fio_figures(out), Some((1024.0, 512.0)));
        assert_eq!(fio_figures("3;fio-3.33;seqread;0;0;1;2;3;4;5"), None);
    }
}
