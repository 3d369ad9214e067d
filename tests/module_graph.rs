//! The import graph, drawn from the sources: between the modules of each crate (`crate::x` and
//! `super::x` paths) there are no circles, and between the crates every arrow points the way
//! ARCHITECTURE.md draws them (`ir` <- `passes` <- `codegen` -> `bundle` <- `runtime`, all on
//! `ir`; the CLI on top). Run with `--nocapture` to print the edges.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module path of a source file relative to its crate's `src` (`sharding/localize.rs` ->
/// [sharding, localize]; `sharding/mod.rs` -> [sharding]; `lib.rs` -> []).
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = rel.iter().map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts
}

/// The first identifier of every path starting with `prefix` in `text` (outside line
/// comments), `use prefix{a, b::c}` groups included.
fn paths_after(text: &str, prefix: &str) -> Vec<String> {
    let ident = |s: &str| -> String { s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect() };
    let mut out = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find(prefix) {
            let before = rest[..i].chars().last();
            rest = &rest[i + prefix.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                let group = group.split('}').next().unwrap_or("");
                out.extend(group.split(',').map(|p| ident(p.trim())).filter(|n| !n.is_empty()));
            } else {
                let name = ident(rest);
                if !name.is_empty() {
                    out.push(name);
                }
            }
        }
    }
    out
}

/// Edges between sibling modules: for each directory-level scope (the crate root, then every
/// module with submodules), which of its child modules uses which.
fn edges(src: &Path) -> BTreeMap<Vec<String>, BTreeSet<(String, String)>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(src, f)).collect();
    let mut out: BTreeMap<Vec<String>, BTreeSet<(String, String)>> = BTreeMap::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let m = module_of(src, f);
        // Inline test modules may use anything.
        let text = text.split("#[cfg(test)]").next().unwrap_or("").to_string();
        let mut targets: Vec<Vec<String>> = paths_after(&text, "crate::").into_iter().map(|t| vec![t]).collect();
        if !m.is_empty() {
            let parent = &m[..m.len() - 1];
            for t in paths_after(&text, "super::") {
                let mut p = parent.to_vec();
                p.push(t);
                targets.push(p);
            }
        }
        for t in targets {
            // The scope where `m` and `t` part: their longest common prefix.
            let common = m.iter().zip(&t).take_while(|(a, b)| a == b).count();
            if common >= m.len() || common >= t.len() {
                continue;
            }
            let scope = m[..common].to_vec();
            let (a, b) = (m[common].clone(), t[common].clone());
            let mut target_module = scope.clone();
            target_module.push(b.clone());
            if modules.contains(&target_module) {
                out.entry(scope).or_default().insert((a, b));
            }
        }
    }
    out
}

fn find_cycle(edges: &BTreeSet<(String, String)>) -> Option<Vec<String>> {
    let mut next: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (a, b) in edges {
        next.entry(a).or_default().push(b);
    }
    fn dfs<'a>(
        n: &'a str,
        next: &BTreeMap<&'a str, Vec<&'a str>>,
        state: &mut BTreeMap<&'a str, u8>,
        stack: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        state.insert(n, 1);
        stack.push(n);
        for &m in next.get(n).into_iter().flatten() {
            match state.get(m) {
                Some(1) => {
                    let i = stack.iter().position(|&s| s == m).unwrap();
                    let mut c: Vec<String> = stack[i..].iter().map(|s| s.to_string()).collect();
                    c.push(m.to_string());
                    return Some(c);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = dfs(m, next, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(n, 2);
        None
    }
    let mut state = BTreeMap::new();
    let keys: Vec<&str> = next.keys().copied().collect();
    for n in keys {
        if !state.contains_key(n) {
            if let Some(c) = dfs(n, &next, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn no_module_imports_circle_back() {
    let mut cycles = Vec::new();
    for krate in ["ir/src", "passes/src", "runtime/src", "codegen/src", "bundle/src", "src"] {
        for (scope, e) in edges(&root().join(krate)) {
            let scope = if scope.is_empty() { krate.to_string() } else { format!("{krate}/{}", scope.join("/")) };
            for (a, b) in &e {
                println!("{scope}: {a} -> {b}");
            }
            if let Some(c) = find_cycle(&e) {
                cycles.push(format!("{scope}: {}", c.join(" -> ")));
            }
        }
    }
    assert!(cycles.is_empty(), "modules that import each other in a circle:\n{}", cycles.join("\n"));
}

/// The crates' own dependencies (`shardc-*` in each Cargo.toml) point down only.
#[test]
fn crate_arrows_point_down() {
    let allowed: &[(&str, &[&str])] = &[
        ("ir", &[]),
        ("passes", &["shardc-ir"]),
        ("codegen", &["shardc-ir", "shardc-passes", "shardc-bundle"]),
        ("bundle", &["shardc-ir"]),
        ("runtime", &["shardc-ir", "shardc-bundle"]),
    ];
    for (dir, ok) in allowed {
        let toml = std::fs::read_to_string(root().join(dir).join("Cargo.toml")).unwrap();
        let deps = toml.split("[dependencies]").nth(1).unwrap_or("");
        let deps = deps.split("\n[").next().unwrap_or("");
        for line in deps.lines() {
            let name = line.split(['=', '.']).next().unwrap_or("").trim();
            if name.starts_with("shardc") {
                assert!(ok.contains(&name), "{dir} depends on {name}: an arrow up or sideways (allowed: {ok:?})");
            }
        }
    }
}
