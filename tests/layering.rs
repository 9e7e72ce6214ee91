//! The modules of `src/` depend one way: each may use the modules below it in [`LAYERS`] (and
//! its own), never one above. This test reads every `crate::…` and `super::…` path outside the
//! files' `#[cfg(test)]` sections and fails on an upward one, naming the file, the line and the
//! two modules. A module not listed takes the layer of its closest listed parent (`origin::body`
//! is `origin`'s); a new top-level module must be placed in the list.

use std::path::{Path, PathBuf};

/// Top to bottom. A module may use its own layer and the layers after it.
const LAYERS: &[&str] = &[
    // The commands and the server: they start everything else.
    "demo",
    "server",
    "cachectl",
    // Parses the file and builds each owner's settings type.
    "config",
    "logging",
    "admin",
    // One request: routing, the access log, the rules.
    "proxy",
    "access_log",
    "rules",
    // The cache: the request path, then fills, the shared and local stores, verified reads.
    "cache",
    "cache::fill",
    "cache::shared",
    "cache::tier",
    "cache::read",
    "cache::store",
    "cache::entry",
    "cache::target",
    "cache::policy",
    "cache::validate",
    // The origin client and its connection pool.
    "origin",
    "pool",
    // Leaves: they use nothing above them.
    "sample_origin",
    "sendfile",
    "framing",
    "headers",
    "error",
    "metrics",
    "cache::status",
    "body",
    "fingerprint",
    "clock",
    "log_escape",
];

/// One upward use.
#[derive(Debug, PartialEq, Eq)]
struct Violation {
    file: String,
    line: usize,
    module: String,
    uses: String,
}

/// The layer of a module path (its closest listed ancestor), if any.
fn layer(module: &str) -> Option<usize> {
    let mut path = module;
    loop {
        if let Some(i) = LAYERS.iter().position(|l| *l == path) {
            return Some(i);
        }
        path = &path[..path.rfind("::")?];
    }
}

/// The module a source file defines: `src/cache/fill.rs` → `cache::fill`,
/// `src/server/mod.rs` → `server`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src").with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts.join("::")
}

/// Every module path the text uses through `crate::` or `super::` (resolved against
/// `module`), with its line: `use crate::cache::{entry::Entry, read}` gives `cache::entry::Entry`
/// and `cache::read`.
fn used_paths(module: &str, text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        for (start, root) in [("crate::", String::new()), ("super::", parent(module))] {
            let mut rest = code;
            while let Some(at) = rest.find(start) {
                // A path segment that only ends in `crate` or `super` (`notcrate::`) is not one.
                let before = rest[..at].chars().next_back();
                rest = &rest[at + start.len()..];
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                    continue;
                }
                for path in expand(rest) {
                    // `super::super::x` climbs once more per `super`.
                    let (mut root, mut path) = (root.clone(), path.as_str());
                    while let Some(up) = path.strip_prefix("super::") {
                        root = parent(&root);
                        path = up;
                    }
                    let full = if root.is_empty() { path.to_string() } else { format!("{root}::{path}") };
                    out.push((n + 1, full));
                }
            }
        }
    }
    out
}

fn parent(module: &str) -> String {
    module.rfind("::").map_or(String::new(), |i| module[..i].to_string())
}

/// The paths a use tree starting at `text` names: `a::b::{c, d::e}` → `a::b::c`, `a::b::d::e`.
fn expand(text: &str) -> Vec<String> {
    expand_from(Vec::new(), text)
}

fn expand_from(mut prefix: Vec<String>, mut rest: &str) -> Vec<String> {
    loop {
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut items = vec![String::new()];
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 1 => {
                        items.push(String::new());
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 {
                    break;
                }
                items.last_mut().expect("one item at least").push(c);
            }
            return items
                .iter()
                .map(|i| i.trim())
                .filter(|i| !i.is_empty())
                .flat_map(|i| match i {
                    "self" => vec![prefix.join("::")],
                    _ => expand_from(prefix.clone(), i),
                })
                .collect();
        }
        let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(rest.len());
        if end == 0 {
            return if prefix.is_empty() { Vec::new() } else { vec![prefix.join("::")] };
        }
        prefix.push(rest[..end].to_string());
        rest = &rest[end..];
        match rest.strip_prefix("::") {
            Some(after) => rest = after,
            None => return vec![prefix.join("::")],
        }
    }
}

/// The upward uses in one file's text (its `#[cfg(test)]` section and after excluded).
fn check(file: &str, module: &str, text: &str) -> Result<Vec<Violation>, String> {
    let own = layer(module).ok_or_else(|| format!("{file}: module `{module}` is not in LAYERS; place it"))?;
    let code = text.split("\n#[cfg(test)]").next().unwrap_or("");
    let mut violations = Vec::new();
    for (line, path) in used_paths(module, code) {
        let Some(theirs) = layer(&path) else {
            // An item of the crate root (`crate::Config`) or an unlisted module: the root
            // re-exports only what sits under `server` and `config`.
            if path.contains("::") {
                return Err(format!("{file}:{line}: `{path}` is in no listed module; place it in LAYERS"));
            }
            continue;
        };
        if theirs < own {
            violations.push(Violation { file: file.to_string(), line, module: module.to_string(), uses: path });
        }
    }
    Ok(violations)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_module_uses_a_module_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut problems = Vec::new();
    for file in &files {
        let name = file.strip_prefix(env!("CARGO_MANIFEST_DIR")).unwrap_or(file).display().to_string();
        // The binary sits above every module and uses the library as `lotecache::…`.
        if name.ends_with("src/main.rs") || name.ends_with("src/lib.rs") {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("readable source");
        match check(&name, &module_of(&src, file), &text) {
            Ok(v) => problems.extend(v.iter().map(|v| {
                format!("{}:{}: `{}` uses `{}`, which is above it in LAYERS", v.file, v.line, v.module, v.uses)
            })),
            Err(e) => problems.push(e),
        }
    }
    assert!(files.len() > 20, "the sources were found: {files:?}");
    assert!(problems.is_empty(), "layering broken:\n{}", problems.join("\n"));
}

#[test]
fn a_lower_module_importing_a_higher_one_is_reported_with_its_line() {
    let text = "//! doc\nuse crate::body::ProxyBody;\nuse crate::cache::{entry::Entry, Cache};\n\
                fn f() { crate::proxy::thing(); }\n#[cfg(test)]\nmod tests { use crate::server::X; }\n";
    let found = check("src/origin/mod.rs", "origin", text).unwrap();
    let uses: Vec<(usize, &str)> = found.iter().map(|v| (v.line, v.uses.as_str())).collect();
    // `body` is below `origin`; the cache and the proxy are above it; the tests' use is ignored.
    assert_eq!(uses, [(3, "cache::entry::Entry"), (3, "cache::Cache"), (4, "proxy::thing")]);
    // `super::` resolves against the file's module: `cache::store` using `super::fill` is upward.
    let text =
        "use super::fill::FillConfig;\nuse super::{entry::Entry, read};\nuse crate::{clock, proxy::{self, X}};\n";
    let found = check("src/cache/store.rs", "cache::store", text).unwrap();
    let uses: Vec<(usize, &str)> = found.iter().map(|v| (v.line, v.uses.as_str())).collect();
    assert_eq!(uses, [(1, "cache::fill::FillConfig"), (2, "cache::read"), (3, "proxy"), (3, "proxy::X")]);
}

#[test]
fn a_module_missing_from_the_layers_is_refused() {
    assert!(check("src/newthing.rs", "newthing", "").unwrap_err().contains("not in LAYERS"));
}
