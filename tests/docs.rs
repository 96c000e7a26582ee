//! The docs' links stay true: every relative link in docs/*.md and README.md
//! points at an existing path, and every code reference exists in the file it
//! links to.
//!
//! Convention (docs/layers.md): a code reference is a link whose text is one
//! symbol in backticks, `[`Vcpu::run`](../src/vcpu.rs)`: a Rust path (`Type`,
//! `function`, `Type::method`, `CONSTANT`, optionally written `fn name`). The
//! last segment must be defined in the linked file (fn, struct, enum, trait,
//! type, const, static, mod, an enum variant or a field); a leading `Type::`
//! must be defined there too (struct, enum, trait or impl).

use std::path::{Path, PathBuf};

/// `[text](target)` links of a markdown text (inline links only).
fn links(md: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut in_fence = false;
    for line in md.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        let mut rest = line;
        while let Some(open) = rest.find('[') {
            let after = &rest[open + 1..];
            let Some(close) = after.find("](") else { break };
            let text = &after[..close];
            let tail = &after[close + 2..];
            let Some(end) = tail.find(')') else { break };
            // A `[` inside the text means this was not the link's opening bracket.
            if let Some(inner) = text.rfind('[') {
                rest = &after[inner..];
                continue;
            }
            out.push((text.to_string(), tail[..end].to_string()));
            rest = &tail[end + 1..];
        }
    }
    out
}

/// True when `name` is defined in `src` as an item, an enum variant or a field.
fn defines(src: &str, name: &str) -> bool {
    let items = ["fn", "struct", "enum", "trait", "type", "const", "static", "mod", "macro_rules!"];
    src.lines().any(|l| {
        let t = l.trim_start();
        let t = t.strip_prefix("pub(crate) ").or_else(|| t.strip_prefix("pub ")).unwrap_or(t);
        let item = items.iter().any(|kw| {
            t.strip_prefix(kw)
                .and_then(|r| r.strip_prefix(' '))
                .and_then(|r| r.strip_prefix(name))
                .is_some_and(|r| r.is_empty() || r.starts_with(['(', '<', ' ', ':', ';', '{', '!']))
        });
        let member = t.strip_prefix(name).is_some_and(|r| {
            r.starts_with(',') || r.starts_with('(') || r.starts_with(" {") || r.starts_with(':') || r.starts_with(" =")
        });
        item || member
    })
}

/// True when `ty` is a type or trait defined or implemented in `src`.
fn has_type(src: &str, ty: &str) -> bool {
    defines(src, ty)
        || src.lines().any(|l| {
            let t = l.trim_start();
            t.starts_with("impl")
                && (t.contains(&format!(" {ty} "))
                    || t.contains(&format!(" {ty}<"))
                    || t.contains(&format!(" {ty} {{")))
        })
}

/// Checks one code reference; Err says what is missing.
fn check_symbol(symbol: &str, file: &Path) -> Result<(), String> {
    let src = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let symbol = symbol.strip_prefix("fn ").unwrap_or(symbol);
    let parts: Vec<&str> = symbol.split("::").collect();
    let name = parts.last().expect("split yields one part");
    if parts.len() > 1 {
        let ty = parts[parts.len() - 2];
        if ty.starts_with(char::is_uppercase) && !has_type(&src, ty) {
            return Err(format!("`{ty}` is not defined in {}", file.display()));
        }
    }
    if !defines(&src, name) {
        return Err(format!("`{name}` is not defined in {}", file.display()));
    }
    Ok(())
}

fn is_rust_path(s: &str) -> bool {
    let s = s.strip_prefix("fn ").unwrap_or(s);
    !s.is_empty() && s.split("::").all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
}

fn doc_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    if let Ok(dir) = std::fs::read_dir(root.join("docs")) {
        for e in dir.flatten() {
            if e.path().extension().is_some_and(|x| x == "md") {
                files.push(e.path());
            }
        }
    }
    files.sort();
    files
}

#[test]
fn every_relative_link_and_code_reference_exists() {
    let mut problems = Vec::new();
    let mut checked_symbols = 0;
    for doc in doc_files() {
        let Ok(md) = std::fs::read_to_string(&doc) else { continue };
        let base = doc.parent().expect("a file has a parent");
        for (text, target) in links(&md) {
            if target.contains("://") || target.starts_with("mailto:") || target.starts_with('#') {
                continue;
            }
            let path = base.join(target.split('#').next().unwrap_or(""));
            if !path.exists() {
                problems.push(format!("{}: [{text}]({target}): no such path", doc.display()));
                continue;
            }
            let symbol = text.strip_prefix('`').and_then(|t| t.strip_suffix('`'));
            if let Some(sym) = symbol.filter(|s| is_rust_path(s) && path.is_file()) {
                checked_symbols += 1;
                if let Err(e) = check_symbol(sym, &path) {
                    problems.push(format!("{}: [{text}]({target}): {e}", doc.display()));
                }
            }
        }
    }
    assert!(problems.is_empty(), "broken doc links:\n{}", problems.join("\n"));
    assert!(checked_symbols >= 20, "only {checked_symbols} code references checked: is the convention still used?");
}

#[test]
fn the_checker_catches_mistakes() {
    let vcpu = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/vcpu.rs");
    assert!(check_symbol("Vcpu::run", &vcpu).is_ok());
    assert!(check_symbol("fn install_kick_handler", &vcpu).is_ok());
    assert!(check_symbol("ExitCounts", &vcpu).is_ok());
    assert!(check_symbol("Vcpu::fly", &vcpu).is_err());
    assert!(check_symbol("Nope::run", &vcpu).is_err());
    assert_eq!(
        links("see [`Vcpu::run`](../src/vcpu.rs) and [x](y#z)\n```\n[no](link)\n```"),
        vec![("`Vcpu::run`".to_string(), "../src/vcpu.rs".to_string()), ("x".to_string(), "y#z".to_string())]
    );
}
