//! The command line's value parsers (`--memory`, `--disk`, `--net`,
//! `--serial`, an image reference) and the init's argv encoding, with
//! arbitrary text. Beyond "no panic", each accepted value must be what a
//! second parse of its canonical form gives back, and the argv encoding must
//! decode (the way guest-kernels/init does) to the arguments it was given.
#![no_main]

use ember::config::{self, SerialMode};
use ember::guest::encode_argv;
use ember::image::reference::{self, ImageRef};
use libfuzzer_sys::fuzz_target;

/// guest-kernels/init's `decode_arg` over `ember.argv=F,F,...`, in Rust.
fn decode(argv: &str) -> Option<Vec<Vec<u8>>> {
    let fields = argv.strip_prefix("ember.argv=")?;
    let mut out = Vec::new();
    for f in fields.split(',') {
        let hex = f.strip_prefix('x')?;
        if hex.len() % 2 != 0 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let bytes: Vec<u8> =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        if bytes.contains(&0) {
            return None;
        }
        out.push(bytes);
    }
    Some(out)
}

fn argv_round_trip(data: &[u8]) {
    // Arguments separated by 0xff (which UTF-8 text never holds, but argv may).
    let args: Vec<&[u8]> = data.split(|b| *b == 0xff).collect();
    match encode_argv(&args) {
        Ok(s) => {
            assert!(args.iter().all(|a| !a.contains(&0)), "NUL accepted");
            // Safe on a kernel command line: no space, quote or escape.
            assert!(s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".=,".contains(&b)), "{s}");
            let back = decode(&s).expect("the init decodes what ember encodes");
            assert_eq!(back.len(), args.len());
            assert!(back.iter().zip(&args).all(|(a, b)| a.as_slice() == *b), "round trip");
        }
        Err(_) => assert!(args.iter().any(|a| a.contains(&0)), "refused without a NUL"),
    }
}

fn size(text: &str) {
    let Ok(n) = config::parse_size(text) else { return };
    assert_eq!(config::parse_size(&n.to_string()).ok(), Some(n), "{text:?}");
    let t = text.trim().trim_end_matches(['b', 'B']).trim_end_matches('i');
    let unit = match t.chars().last() {
        Some('k' | 'K') => 1u64 << 10,
        Some('m' | 'M') => 1 << 20,
        Some('g' | 'G') => 1 << 30,
        Some('t' | 'T') => 1 << 40,
        _ => 1,
    };
    assert_eq!(n % unit, 0, "{text:?} -> {n}");
}

fn disk(text: &str) {
    let Ok(d) = config::parse_disk(text) else { return };
    let path = d.path.to_str().expect("from a str");
    assert!(!path.is_empty() && !path.contains(','), "{text:?}");
    if let Some(id) = &d.id {
        assert!(!id.is_empty() && id.len() <= 20 && !id.contains(','), "{text:?}");
    }
    let mut canon = path.to_string();
    if d.read_only {
        canon += ",ro";
    }
    if let Some(id) = &d.id {
        canon += &format!(",id={id}");
    }
    assert_eq!(config::parse_disk(&canon).ok(), Some(d), "{text:?} vs {canon:?}");
}

fn net(text: &str) {
    // `-p` values share the selector: a parsed one prints back as itself.
    if let Some(p) = config::Publish::parse(text) {
        assert_eq!(config::Publish::parse(&p.spec()), Some(p), "{text:?}");
    }
    let Ok(n) = config::parse_net(text) else { return };
    if let config::NetBackendConfig::Tap { name, .. } = &n.backend {
        assert!(ember::host::tap::valid_name(name), "{text:?}");
    }
    if let Some(m) = n.mac {
        assert_eq!(m[0] & 1, 0, "multicast MAC accepted: {text:?}");
    }
    let canon = config::render_net(&n);
    assert_eq!(config::parse_net(&canon).ok(), Some(n), "{text:?} vs {canon:?}");
}

fn serial(text: &str) {
    match config::parse_serial(text) {
        Ok(SerialMode::File(p)) => assert_eq!(format!("file:{}", p.display()), text),
        Ok(SerialMode::Stdio) => assert_eq!(text, "stdio"),
        Ok(SerialMode::None) => assert!(text == "none" || text == "off"),
        Err(_) => {}
    }
}

fn image(text: &str) {
    let Ok(r) = reference::parse(text) else { return };
    if let ImageRef::Registry(reg) = &r {
        assert!(!reg.registry.is_empty() && !reg.repository.is_empty(), "{text:?}");
        if let Some(d) = &reg.digest {
            assert!(reference::valid_digest(d), "{text:?}");
        }
        // The canonical form names the same image.
        assert_eq!(reference::parse(&r.to_string()).ok(), Some(r.clone()), "{text:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    if which % 6 == 0 {
        return argv_round_trip(rest);
    }
    let Ok(text) = std::str::from_utf8(rest) else { return };
    match which % 6 {
        1 => size(text),
        2 => disk(text),
        3 => net(text),
        4 => serial(text),
        _ => image(text),
    }
});
