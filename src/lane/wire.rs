//! The Linux lane's wire formats, kept free of I/O so they can be tested without a machine.
//!
//! - `KEY=value` lines printed by `guest-kernels/lane/build-outer.sh` ([`parse_kv`]).
//! - The per-invocation shell script the outer agent runs chrooted into the host root
//!   ([`render_run_script`]): single-quoted, so arguments are passed byte for byte.
//! - Control-port lines from the agent: `ready <release>`, `fail <reason>`, `done <id> <status>`, `pong`
//!   ([`AgentMessage::parse`]); `net <id> <mac> <tap>` from the host ([`net_line`]).
//! - The `--net` options of an `ember run` command line, which name host taps the outer machine must
//!   reach ([`host_taps`]), and the MAC its NIC on such a tap gets ([`outer_nic_mac`]).
//! - The end marker that closes a streamed stdout/stderr ([`MarkerStripper`]): the agent writes a random
//!   marker on each output port after the program exits, so the host knows it has every byte
//!   (virtio-serial ports are FIFO) and strips the marker before passing bytes on.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::config::{self, ConfigError};

/// `PATH` given to programs run inside the outer machine (the host's root, chrooted).
pub const INNER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Parses `KEY=value` lines; other lines are ignored. Later keys win.
pub fn parse_kv(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            continue;
        }
        out.retain(|(k, _)| k != key);
        out.push((key.to_string(), value.to_string()));
    }
    out
}

/// Appends `s` single-quoted for a POSIX shell: every byte is literal inside `'...'`, and `'` itself
/// becomes `'\''`.
pub fn shell_quote_into(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'\'');
    for &b in s {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
}

/// Where the script's standard streams go.
pub enum Redirect<'a> {
    /// To files `stdin`, `stdout`, `stderr` in this directory (batch runs).
    Files(&'a Path),
    /// Inherited from the agent (streamed runs: the agent connects them to virtio-serial ports).
    Inherit,
}

/// Renders the script `/bin/sh` runs inside the outer machine for one invocation: change to `cwd`
/// (falling back to `/`), clear the environment except `PATH`, `HOME` and `env`, then `exec` the
/// program so a timeout's SIGKILL reaches it directly.
pub fn render_run_script(
    cwd: &Path,
    env: &[(String, String)],
    program: &Path,
    args: &[impl AsRef<OsStr>],
    redirect: Redirect<'_>,
) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(b"cd ");
    shell_quote_into(&mut s, cwd.as_os_str().as_bytes());
    s.extend_from_slice(b" 2>/dev/null || cd /\nexec /usr/bin/env -i ");
    shell_quote_into(&mut s, format!("PATH={INNER_PATH}").as_bytes());
    s.extend_from_slice(b" HOME=/root");
    for (key, value) in env {
        s.push(b' ');
        shell_quote_into(&mut s, format!("{key}={value}").as_bytes());
    }
    s.push(b' ');
    shell_quote_into(&mut s, program.as_os_str().as_bytes());
    for arg in args {
        s.push(b' ');
        shell_quote_into(&mut s, arg.as_ref().as_bytes());
    }
    if let Redirect::Files(dir) = redirect {
        for (op, name) in [(&b" <"[..], "stdin"), (b" >", "stdout"), (b" 2>", "stderr")] {
            s.extend_from_slice(op);
            shell_quote_into(&mut s, dir.join(name).as_os_str().as_bytes());
        }
    }
    s.push(b'\n');
    s
}

/// A host tap named by `ember run --net tap=NAME[,...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostTap {
    /// The interface name, the same on the host and (for the inner ember) inside the outer machine.
    pub name: String,
    /// `,create`: the tap must not exist on the host; it is created for the run and removed after.
    pub create: bool,
}

/// Finds the `--net` options (`--net V` or `--net=V`, before `--`) of `ember run` arguments and parses
/// them with ember's own parser. Returns the host taps and the arguments for the inner ember: the same,
/// except that `,create` is dropped, because inside the machine the agent has already created the tap
/// (and bridged it to the host tap) when the inner ember opens it.
pub fn host_taps(args: &[OsString]) -> Result<(Vec<HostTap>, Vec<OsString>), ConfigError> {
    let mut taps = Vec::new();
    let mut inner = Vec::with_capacity(args.len());
    let mut it = args.iter();
    let mut take = |value: &OsStr| -> Result<OsString, ConfigError> {
        let text = value.to_str().ok_or_else(|| ConfigError::BadNet(value.to_string_lossy().into()))?;
        if text == "none" {
            return Ok(text.into());
        }
        let net = config::parse_net(text)?;
        let config::NetBackendConfig::Tap { name, create } = net.backend else {
            // user and stream are handed over by the caller (main.rs rewrites user to stream).
            return Ok(text.into());
        };
        taps.push(HostTap { name, create });
        Ok(text.split(',').filter(|o| *o != "create").collect::<Vec<_>>().join(",").into())
    };
    while let Some(a) = it.next() {
        if a == "--" {
            inner.push(a.clone());
            inner.extend(it.cloned());
            break;
        }
        if a == "--net" {
            inner.push(a.clone());
            if let Some(v) = it.next() {
                inner.push(take(v)?);
            }
        } else if let Some(v) = a.as_bytes().strip_prefix(b"--net=") {
            let mut rewritten = OsString::from("--net=");
            rewritten.push(take(OsStr::from_bytes(v))?);
            inner.push(rewritten);
        } else {
            inner.push(a.clone());
        }
    }
    Ok((taps, inner))
}

/// The MAC of the outer machine's NIC on host tap `tap`, `aa:bb:cc:dd:ee:ff`: stable per name, locally
/// administered (02:...) and distinct from the inner guest's default (52:54:00:..., see
/// `devices::virtio::net::default_mac`), so the agent can tell the NICs apart and the bridge never sees
/// one address on both sides.
pub fn outer_nic_mac(tap: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in tap.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let b = h.to_be_bytes();
    format!("02:65:6d:{:02x}:{:02x}:{:02x}", b[1], b[2], b[3] ^ b[0])
}

/// The control line asking the agent to bridge the NIC with `mac` to a new tap `tap` (request `id`).
pub fn net_line(id: u64, mac: &str, tap: &str) -> String {
    format!("net {id} {mac} {tap}")
}

/// A line the agent sends on the control port.
#[derive(Debug, PartialEq, Eq)]
pub enum AgentMessage {
    /// The outer machine is up: modules loaded, /dev/kvm present, host root mounted.
    Ready {
        /// `uname -r` of the outer kernel.
        release: String,
    },
    /// The outer machine cannot serve: why.
    Fail(String),
    /// The answer to the host's `ping`: the agent's loop still runs.
    Pong,
    /// Invocation `id` finished with shell exit status `status` (128+N when killed by signal N).
    Done {
        /// The invocation id the host sent.
        id: u64,
        /// The exit status.
        status: i32,
    },
}

impl AgentMessage {
    /// Parses one control line (without its newline); `None` for anything else.
    pub fn parse(line: &str) -> Option<AgentMessage> {
        let line = line.trim_end_matches(['\r', '\n']);
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            "ready" => Some(AgentMessage::Ready { release: rest.to_string() }),
            "fail" => Some(AgentMessage::Fail(rest.to_string())),
            "pong" => Some(AgentMessage::Pong),
            "done" => {
                let mut it = rest.split(' ');
                let id = it.next()?.parse().ok()?;
                let status = it.next()?.parse().ok()?;
                it.next().is_none().then_some(AgentMessage::Done { id, status })
            }
            _ => None,
        }
    }
}

/// Splits a byte stream into complete `\n`-terminated lines.
#[derive(Default)]
pub struct LineBuffer {
    pending: Vec<u8>,
}

impl LineBuffer {
    /// Adds bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    /// Takes the next complete line, without its `\n`.
    pub fn next_line(&mut self) -> Option<String> {
        let end = self.pending.iter().position(|&b| b == b'\n')?;
        let line: Vec<u8> = self.pending.drain(..=end).take(end).collect();
        Some(String::from_utf8_lossy(&line).into_owned())
    }
}

/// Passes a stream through until `marker`, which ends it. Bytes that could be the start of the marker
/// are held back until the next chunk shows whether they are.
pub struct MarkerStripper {
    marker: Vec<u8>,
    held: Vec<u8>,
    done: bool,
}

impl MarkerStripper {
    /// A stripper for `marker` (non-empty).
    pub fn new(marker: &[u8]) -> MarkerStripper {
        assert!(!marker.is_empty(), "empty end marker");
        MarkerStripper { marker: marker.to_vec(), held: Vec::new(), done: false }
    }

    /// Feeds a chunk; returns the bytes safe to pass on. After the marker, everything is dropped.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        if self.done {
            return Vec::new();
        }
        self.held.extend_from_slice(chunk);
        if let Some(pos) = find(&self.held, &self.marker) {
            self.done = true;
            let out = self.held[..pos].to_vec();
            self.held.clear();
            return out;
        }
        // Keep the longest suffix that is a proper prefix of the marker.
        let max = self.held.len().min(self.marker.len() - 1);
        let keep = (1..=max).rev().find(|&n| self.held.ends_with(&self.marker[..n])).unwrap_or(0);
        let out = self.held[..self.held.len() - keep].to_vec();
        self.held.drain(..self.held.len() - keep);
        out
    }

    /// Whether the marker has been seen.
    pub fn is_done(&self) -> bool {
        self.done
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;
    use std::process::Command;

    #[test]
    fn kv_lines() {
        let kv = parse_kv("noise\nLANE_KERNEL=/boot/vmlinuz\nA=b=c\n=x\nbad key=1\nA=d\n");
        assert_eq!(kv, vec![("LANE_KERNEL".into(), "/boot/vmlinuz".into()), ("A".into(), "d".into())]);
    }

    #[test]
    fn quoting_survives_a_real_shell() {
        let nasty: Vec<OsString> = vec![
            "plain".into(),
            "it's".into(),
            "".into(),
            "$HOME `id` \"q\" \\ \n newline".into(),
            OsString::from_vec(vec![0xff, b'\'', 0x80, b' ']),
        ];
        let script = render_run_script(
            Path::new("/"),
            &[("X".into(), "a'b c".into())],
            Path::new("/usr/bin/printf"),
            &[&["%s\\0".into()][..], &nasty[..]].concat(),
            Redirect::Inherit,
        );
        let out = Command::new("/bin/sh").arg("-c").arg(OsString::from_vec(script)).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let mut expected = Vec::new();
        for a in &nasty {
            expected.extend_from_slice(a.as_bytes());
            expected.push(0);
        }
        assert_eq!(out.stdout, expected);
    }

    #[test]
    fn script_sets_env_and_redirects() {
        let script = render_run_script(
            Path::new("/no such dir"),
            &[("K".into(), "v".into())],
            Path::new("/bin/sh"),
            &["-c", "pwd; echo $K; echo $HOME"],
            Redirect::Files(Path::new("/r/7")),
        );
        let text = String::from_utf8(script).unwrap();
        assert!(text.starts_with("cd '/no such dir' 2>/dev/null || cd /\nexec /usr/bin/env -i "));
        assert!(text.ends_with(" <'/r/7/stdin' >'/r/7/stdout' 2>'/r/7/stderr'\n"), "{text}");
        let inherit = render_run_script(
            Path::new("/no such dir"),
            &[("K".into(), "v".into())],
            Path::new("/bin/sh"),
            &["-c", "pwd; echo $K; echo $HOME"],
            Redirect::Inherit,
        );
        let out = Command::new("/bin/sh").arg("-c").arg(OsString::from_vec(inherit)).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "/\nv\n/root\n");
    }

    #[test]
    fn host_taps_are_found_and_create_is_dropped_for_the_inner_ember() {
        let args: Vec<OsString> = [
            "run",
            "--net",
            "tap=a0,create,mac=52:54:00:00:00:01",
            "--memory",
            "1G",
            "--net=tap=b1",
            "--",
            "--net",
            "tap=not-an-option",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let (taps, inner) = host_taps(&args).unwrap();
        assert_eq!(
            taps,
            vec![HostTap { name: "a0".into(), create: true }, HostTap { name: "b1".into(), create: false }]
        );
        let inner: Vec<&str> = inner.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            inner,
            [
                "run",
                "--net",
                "tap=a0,mac=52:54:00:00:00:01",
                "--memory",
                "1G",
                "--net=tap=b1",
                "--",
                "--net",
                "tap=not-an-option"
            ]
        );
        assert!(host_taps(&["run".into(), "--net".into(), "bogus".into()]).is_err());
        let mac = outer_nic_mac("embt0");
        assert!(mac.starts_with("02:65:6d:") && mac.len() == 17, "{mac}");
        assert_ne!(mac, outer_nic_mac("embt1"));
        assert_eq!(net_line(3, &mac, "embt0"), format!("net 3 {mac} embt0"));
    }

    #[test]
    fn agent_messages() {
        assert_eq!(
            AgentMessage::parse("ready 6.1.0-56-amd64"),
            Some(AgentMessage::Ready { release: "6.1.0-56-amd64".into() })
        );
        assert_eq!(AgentMessage::parse("done 12 3\n"), Some(AgentMessage::Done { id: 12, status: 3 }));
        assert_eq!(AgentMessage::parse("fail no /dev/kvm"), Some(AgentMessage::Fail("no /dev/kvm".into())));
        assert_eq!(AgentMessage::parse("done x 3"), None);
        assert_eq!(AgentMessage::parse("done 1 2 3"), None);
        assert_eq!(AgentMessage::parse("hello"), None);
        assert_eq!(AgentMessage::parse("pong"), Some(AgentMessage::Pong));
    }

    #[test]
    fn lines_split_across_reads() {
        let mut lb = LineBuffer::default();
        lb.push(b"rea");
        assert_eq!(lb.next_line(), None);
        lb.push(b"dy 6.1\ndone 1 0\ndo");
        assert_eq!(lb.next_line().as_deref(), Some("ready 6.1"));
        assert_eq!(lb.next_line().as_deref(), Some("done 1 0"));
        assert_eq!(lb.next_line(), None);
    }

    #[test]
    fn marker_stripped_across_chunk_boundaries() {
        let marker = b"#END-1234#";
        let data = b"binary \x00\xff #END-12 not yet #E";
        let mut stream = data.to_vec();
        stream.extend_from_slice(marker);
        stream.extend_from_slice(b"after");
        for split in 1..8 {
            let mut s = MarkerStripper::new(marker);
            let mut out = Vec::new();
            for chunk in stream.chunks(split) {
                out.extend(s.feed(chunk));
            }
            assert!(s.is_done());
            assert_eq!(out, data, "chunk size {split}");
        }
    }

    #[test]
    fn marker_prefix_is_released_when_it_turns_out_not_to_be() {
        let mut s = MarkerStripper::new(b"ABC");
        assert_eq!(s.feed(b"xA"), b"x");
        assert_eq!(s.feed(b"B"), b"");
        assert_eq!(s.feed(b"x"), b"ABx");
        assert!(!s.is_done());
    }
}
