//! The shape of the code: no import cycles between sibling modules (a module and its parent
//! referring to each other is how Rust modules work; two modules that are not each other's
//! ancestors and refer to each other are a cycle), in every package of the workspace.
#![allow(clippy::disallowed_methods)] // tests may block: clippy.toml's file-system rule is for src/
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `src/controller/engine/mod.rs` → ["controller", "engine"]; `lib.rs` → [].
fn module_of(root: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(root).expect("under root");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "bin") {
                rust_files(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The modules `text` (in module `me`) refers to through `crate::` and `super::` paths,
/// resolved to the longest known module prefix.
fn references(me: &[String], text: &str, known: &BTreeSet<Vec<String>>) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let bytes: Vec<char> = code.chars().collect();
    let is_ident = |c: char| c.is_alphanumeric() || c == '_' || c == ':';
    let mut i = 0;
    while i < bytes.len() {
        let rest: String = bytes[i..bytes.len().min(i + 7)].iter().collect();
        let at_word = i == 0 || !is_ident(bytes[i - 1]);
        if at_word && (rest.starts_with("crate::") || rest.starts_with("super::")) {
            let mut j = i;
            while j < bytes.len() && is_ident(bytes[j]) {
                j += 1;
            }
            let path: String = bytes[i..j].iter().collect();
            let mut segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
            let mut base: Vec<String> = Vec::new();
            if segs.first() == Some(&"crate") {
                segs.remove(0);
            } else {
                base = me.to_vec();
                while segs.first() == Some(&"super") {
                    segs.remove(0);
                    base.pop();
                }
            }
            let mut full = base;
            full.extend(segs.iter().map(|s| s.to_string()));
            while !full.is_empty() && !known.contains(&full) {
                full.pop();
            }
            out.insert(full);
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

fn cycles_in(root: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(root, &mut files);
    let known: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(root, f)).collect();
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for f in &files {
        let me = module_of(root, f);
        let text = std::fs::read_to_string(f).expect("source");
        for to in references(&me, &text, &known) {
            let related = to.starts_with(&me) || me.starts_with(&to);
            if !related {
                edges.entry(me.clone()).or_default().insert(to);
            }
        }
    }
    // A sibling cycle of any length shows as: a reaches b and b reaches a.
    let reach = |from: &Vec<String>| -> BTreeSet<Vec<String>> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.clone()];
        while let Some(m) = todo.pop() {
            for n in edges.get(&m).into_iter().flatten() {
                if seen.insert(n.clone()) {
                    todo.push(n.clone());
                }
            }
        }
        seen
    };
    let mut found = Vec::new();
    for (a, tos) in &edges {
        for b in tos {
            if reach(b).contains(a) {
                found.push(format!(
                    "{} -> {} -> … -> {}",
                    a.join("::"),
                    b.join("::"),
                    a.join("::")
                ));
            }
        }
    }
    found
}

#[test]
fn no_package_has_an_import_cycle_between_sibling_modules() {
    let mut all = Vec::new();
    for src in [
        "src",
        "api/src",
        "lab/src",
        "bench/src",
        "kubectl-guestcred/src",
    ] {
        let root = repo().join(src);
        if root.is_dir() {
            all.extend(cycles_in(&root).into_iter().map(|c| format!("{src}: {c}")));
        }
    }
    assert!(all.is_empty(), "import cycles:\n{}", all.join("\n"));
}

#[test]
fn the_cycle_check_sees_a_cycle() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("lib.rs"), "mod a;\nmod b;\n").expect("lib");
    std::fs::write(dir.path().join("a.rs"), "use crate::b::B;\npub struct A;\n").expect("a");
    std::fs::write(dir.path().join("b.rs"), "use super::a::A;\npub struct B;\n").expect("b");
    assert_eq!(cycles_in(dir.path()).len(), 2);
}
