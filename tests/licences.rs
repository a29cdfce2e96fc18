//! Every crate nxknock builds with is under a permissive licence (MIT, Apache,
//! BSD and friends): no GPL crate, and none that links a GPL library (`nftnl`,
//! `ipset`, `rustables` are refused by name as well). The licence expressions come
//! from `cargo metadata` for the locked dependency graph and are evaluated as SPDX
//! (`OR`: one permissive choice suffices; `AND`: every part must be permissive).

use std::process::Command;

const PERMISSIVE: &[&str] = &[
    "MIT",
    "MIT-0",
    "Apache-2.0",
    "BSD-2-Clause",
    "BSD-3-Clause",
    "0BSD",
    "ISC",
    "Zlib",
    "Unicode-3.0",
    "Unicode-DFS-2016",
    "CC0-1.0",
    "Unlicense",
    "BSL-1.0",
    "CDLA-Permissive-2.0",
];
/// Exceptions that only widen what a licence allows.
const EXCEPTIONS: &[&str] = &["LLVM-exception"];
/// Crates that wrap GPL code, whatever their own metadata says.
const REFUSED: &[&str] = &["nftnl", "nftnl-sys", "ipset", "rustables", "mnl", "mnl-sys"];

/// Is the SPDX expression satisfiable with permissive licences only?
fn permissive(expr: &str) -> bool {
    let spaced = expr.replace('(', " ( ").replace(')', " ) ").replace('/', " OR ");
    let tokens: Vec<&str> = spaced.split_whitespace().collect();
    let mut at = 0;
    let ok = or_expr(&tokens, &mut at);
    ok && at == tokens.len()
}

fn or_expr(t: &[&str], at: &mut usize) -> bool {
    let mut any = and_expr(t, at);
    while t.get(*at) == Some(&"OR") {
        *at += 1;
        any |= and_expr(t, at);
    }
    any
}

fn and_expr(t: &[&str], at: &mut usize) -> bool {
    let mut all = term(t, at);
    while t.get(*at) == Some(&"AND") {
        *at += 1;
        all &= term(t, at);
    }
    all
}

fn term(t: &[&str], at: &mut usize) -> bool {
    let Some(tok) = t.get(*at) else { return false };
    *at += 1;
    let mut ok = if *tok == "(" {
        let inner = or_expr(t, at);
        let closed = t.get(*at) == Some(&")");
        *at += 1;
        inner && closed
    } else {
        PERMISSIVE.contains(tok)
    };
    if t.get(*at) == Some(&"WITH") {
        ok &= t.get(*at + 1).is_some_and(|e| EXCEPTIONS.contains(e));
        *at += 2;
    }
    ok
}

#[test]
fn spdx_expressions_are_read_as_spdx() {
    assert!(permissive("MIT OR Apache-2.0"));
    assert!(permissive("(MIT OR Apache-2.0) AND Unicode-3.0"));
    assert!(permissive("Apache-2.0 WITH LLVM-exception OR Apache-2.0 OR MIT"));
    assert!(permissive("MIT/Apache-2.0"));
    assert!(permissive("GPL-3.0 OR MIT"), "a permissive choice suffices");
    assert!(!permissive("GPL-3.0"));
    assert!(!permissive("MIT AND GPL-2.0-only"));
    assert!(!permissive("LGPL-2.1-or-later"));
    assert!(!permissive("MIT AND"));
}

#[test]
fn every_dependency_is_permissively_licensed() {
    // The graph for the platform we build on (other platforms' crates need not be downloaded).
    let rustc = Command::new("rustc").arg("-vV").output().expect("run rustc -vV");
    let version = String::from_utf8_lossy(&rustc.stdout).into_owned();
    let host = version.lines().find_map(|l| l.strip_prefix("host: ")).expect("rustc names its host").to_owned();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked", "--offline", "--filter-platform", &host])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let packages = meta["packages"].as_array().expect("packages");
    assert!(packages.len() > 50, "the whole graph is checked ({} packages)", packages.len());
    let mut bad = Vec::new();
    for p in packages {
        let name = p["name"].as_str().unwrap_or("?");
        let version = p["version"].as_str().unwrap_or("?");
        if REFUSED.contains(&name) {
            bad.push(format!("{name} {version}: wraps GPL code"));
            continue;
        }
        match p["license"].as_str() {
            Some(expr) if permissive(expr) => {}
            Some(expr) => bad.push(format!("{name} {version}: {expr}")),
            None => bad.push(format!("{name} {version}: no SPDX licence expression")),
        }
    }
    assert!(bad.is_empty(), "not permissively licensed:\n{}", bad.join("\n"));
}
