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
    "cache::access",
    "cache::fill",
    "cache::compress",
    "cache::shared",
    "cache::tier",
    "cache::read",
    "cache::store",
    "cache::index",
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
    "cache::range",
    "cache::negotiate",
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

/// `text` as the compiler sees its code: comments removed, and the contents of string and
/// character literals blanked, newlines kept (so offsets keep their line numbers).
fn code_only(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
            continue;
        }
        if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
            continue;
        }
        let ident_before = i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_');
        // Raw strings: r"…", r#"…"#, br"…".
        if c == 'r' && matches!(next, Some('"') | Some('#')) && (!ident_before || chars[i - 1] == 'b') {
            let mut j = i + 1;
            while chars.get(j) == Some(&'#') {
                j += 1;
            }
            if chars.get(j) == Some(&'"') {
                let hashes = j - i - 1;
                out.push_str("r\"");
                i = j + 1;
                while i < chars.len() {
                    if chars[i] == '"' && (1..=hashes).all(|k| chars.get(i + k) == Some(&'#')) {
                        i += 1 + hashes;
                        break;
                    }
                    out.push(blank(chars[i]));
                    i += 1;
                }
                out.push('"');
                continue;
            }
        }
        if c == '"' {
            out.push('"');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < chars.len() {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
            out.push('"');
            i += 1;
            continue;
        }
        // A character literal ('x', '\n', '\u{…}'); a lifetime ('a) is code.
        if c == '\'' {
            let end = if next == Some('\\') {
                (i + 2..chars.len().min(i + 12)).find(|&j| chars[j] == '\'')
            } else {
                (chars.get(i + 2) == Some(&'\'')).then_some(i + 2)
            };
            if let Some(end) = end {
                out.push_str("' '");
                i = end + 1;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    out
}

/// `code` without its `#[cfg(test)] mod … { … }` blocks (blanked, newlines kept): tests may
/// reach anywhere. Other `#[cfg(test)]` items are checked like the rest.
fn without_test_modules(code: &str) -> String {
    let mut out = code.to_string();
    let mut from = 0;
    while let Some(at) = out[from..].find("#[cfg(test)]").map(|p| p + from) {
        let after = out[at + "#[cfg(test)]".len()..].trim_start();
        let is_mod = after.starts_with("mod ") || after.starts_with("pub mod ") || after.starts_with("pub(crate) mod ");
        let Some(open) = out[at..].find('{').map(|p| p + at).filter(|_| is_mod) else {
            from = at + 1;
            continue;
        };
        let mut depth = 0;
        let mut end = out.len();
        for (j, ch) in out[open..].char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + j + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        let blanked: String = out[at..end].chars().map(|c| if c == '\n' { '\n' } else { ' ' }).collect();
        out.replace_range(at..end, &blanked);
        from = end;
    }
    out
}

/// Every module path `code` uses through `crate::` or `super::` (resolved against `module`),
/// with its line: `use crate::cache::{entry::Entry, read}` gives `cache::entry::Entry` and
/// `cache::read`, over as many lines as the group spans; a glob gives its module with `::*`.
fn used_paths(module: &str, code: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (start, root) in [("crate::", String::new()), ("super::", parent(module))] {
        let mut from = 0;
        while let Some(at) = code[from..].find(start).map(|p| p + from) {
            from = at + start.len();
            // A segment that only ends in `crate` or `super` (`notcrate::`) is not one.
            if code[..at].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let line = code[..at].matches('\n').count() + 1;
            for path in expand(&code[from..]) {
                // `super::super::x` climbs once more per `super`.
                let (mut root, mut path) = (root.clone(), path.as_str());
                while let Some(up) = path.strip_prefix("super::") {
                    root = parent(&root);
                    path = up;
                }
                let full = if root.is_empty() { path.to_string() } else { format!("{root}::{path}") };
                out.push((line, full));
            }
        }
    }
    out.sort();
    out
}

fn parent(module: &str) -> String {
    module.rfind("::").map_or(String::new(), |i| module[..i].to_string())
}

/// The paths a use tree starting at `text` names: `a::b::{c, d::e}` → `a::b::c`, `a::b::d::e`;
/// `a::*` → `a::*`.
fn expand(text: &str) -> Vec<String> {
    expand_from(Vec::new(), text)
}

fn expand_from(mut prefix: Vec<String>, mut rest: &str) -> Vec<String> {
    loop {
        rest = rest.trim_start();
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
        if rest.starts_with('*') {
            prefix.push("*".into());
            return vec![prefix.join("::")];
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

/// The crate root's re-exports (`pub use config::Config;` in lib.rs): item → its module.
fn root_reexports(lib: &str) -> Vec<(String, String)> {
    code_only(lib)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub use ")?.strip_suffix(';').map(str::to_string))
        .filter_map(|path| {
            let (module, item) = path.rsplit_once("::")?;
            Some((item.to_string(), module.to_string()))
        })
        .collect()
}

/// The upward uses in one file's text (its `#[cfg(test)]` modules excluded).
fn check(file: &str, module: &str, text: &str, reexports: &[(String, String)]) -> Result<Vec<Violation>, String> {
    let own = layer(module).ok_or_else(|| format!("{file}: module `{module}` is not in LAYERS; place it"))?;
    let code = without_test_modules(&code_only(text));
    let mut violations = Vec::new();
    for (line, path) in used_paths(module, &code) {
        let path = path.strip_suffix("::*").unwrap_or(&path).to_string();
        if path == "*" || path.is_empty() {
            return Err(format!("{file}:{line}: a glob import of the crate root hides what it uses"));
        }
        // An item of the crate root (`crate::Config`) stands for the module it re-exports.
        let target = match reexports.iter().find(|(item, _)| *item == path) {
            Some((_, module)) => module.clone(),
            None => path.clone(),
        };
        let Some(theirs) = layer(&target) else {
            return Err(format!("{file}:{line}: `{path}` is in no listed module; place it in LAYERS"));
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
    let reexports = root_reexports(&std::fs::read_to_string(src.join("lib.rs")).expect("lib.rs"));
    let mut problems = Vec::new();
    for file in &files {
        let name = file.strip_prefix(env!("CARGO_MANIFEST_DIR")).unwrap_or(file).display().to_string();
        // The binary sits above every module and uses the library as `lotecache::…`.
        if name.ends_with("src/main.rs") || name.ends_with("src/lib.rs") {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("readable source");
        match check(&name, &module_of(&src, file), &text, &reexports) {
            Ok(v) => problems.extend(v.iter().map(|v| {
                format!("{}:{}: `{}` uses `{}`, which is above it in LAYERS", v.file, v.line, v.module, v.uses)
            })),
            Err(e) => problems.push(e),
        }
    }
    assert!(files.len() > 20, "the sources were found: {files:?}");
    assert!(problems.is_empty(), "layering broken:\n{}", problems.join("\n"));
}

/// The crate's re-exports as tests see them.
fn reexports() -> Vec<(String, String)> {
    root_reexports("pub use config::Config;\npub use server::RunningProxy;\n")
}

#[test]
fn a_lower_module_importing_a_higher_one_is_reported_with_its_line() {
    let text = "//! doc\nuse crate::body::ProxyBody;\nuse crate::cache::{entry::Entry, Cache};\n\
                fn f() { crate::proxy::thing(); }\n#[cfg(test)]\nmod tests { use crate::server::X; }\n";
    let found = check("src/origin/mod.rs", "origin", text, &reexports()).unwrap();
    let uses: Vec<(usize, &str)> = found.iter().map(|v| (v.line, v.uses.as_str())).collect();
    // `body` is below `origin`; the cache and the proxy are above it; the tests' use is ignored.
    assert_eq!(uses, [(3, "cache::Cache"), (3, "cache::entry::Entry"), (4, "proxy::thing")]);
    // `super::` resolves against the file's module: `cache::store` using `super::fill` is upward.
    let text =
        "use super::fill::FillConfig;\nuse super::{entry::Entry, read};\nuse crate::{clock, proxy::{self, X}};\n";
    let found = check("src/cache/store.rs", "cache::store", text, &reexports()).unwrap();
    let uses: Vec<(usize, &str)> = found.iter().map(|v| (v.line, v.uses.as_str())).collect();
    assert_eq!(uses, [(1, "cache::fill::FillConfig"), (2, "cache::read"), (3, "proxy"), (3, "proxy::X")]);
}

#[test]
fn wrapped_groups_globs_root_reexports_and_test_helpers_outside_test_modules_are_all_seen() {
    let text = "use crate::{\n    body::ProxyBody,\n    server::RunningProxy,\n};\n\
                use super::*;\n\
                fn f() -> crate::Config { todo!() }\n\
                fn g() { let _ = format!(\"http://{}\", crate::proxy::X); } // crate::admin::Y\n\
                #[cfg(test)]\nfn helper() { crate::demo::run(); }\n\
                /* crate::server::Z */ const C: char = '\"'; fn h() { crate::rules::R; }\n";
    let found = check("src/cache/store.rs", "cache::store", text, &reexports()).unwrap();
    let uses: Vec<(usize, &str)> = found.iter().map(|v| (v.line, v.uses.as_str())).collect();
    assert_eq!(
        uses,
        [(1, "server::RunningProxy"), (5, "cache"), (6, "Config"), (7, "proxy::X"), (9, "demo::run"), (10, "rules::R")]
    );
    assert!(check("src/clock.rs", "clock", "use crate::*;\n", &reexports()).unwrap_err().contains("glob"));
}

#[test]
fn a_module_missing_from_the_layers_is_refused() {
    assert!(check("src/newthing.rs", "newthing", "", &reexports()).unwrap_err().contains("not in LAYERS"));
}
