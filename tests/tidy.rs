//! Checks the Architecture Invariants of ARCHITECTURE.md that can be checked by reading the
//! source, so that they stay true rather than claimed:
//!
//! - the decision core does no IO and reads no clock (it is `no_std`; this also rejects the
//!   names of clocks, files, sockets and runtimes in it);
//! - only `src/imap/` knows the IMAP library (`async_imap`, `imap_proto`);
//! - no `unwrap`/`expect` outside tests;
//! - every `unsafe` block says why it is sound (`SAFETY:` just above);
//! - the library depends on no CLI crate (clap, anyhow, tracing-subscriber);
//! - the `log` crate is capped below trace, so the IMAP library's wire trace (passwords,
//!   message bodies) can never be turned on.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The lines of a file before its `#[cfg(test)]` module (tests sit at the end of each file),
/// without `//` comments, numbered from 1.
fn product_lines(path: &Path) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("#[cfg(test)]") {
            break;
        }
        let code = match line.find("//") {
            Some(at) if !line[..at].contains('"') => &line[..at],
            _ => line,
        };
        out.push((i + 1, code.to_string()));
    }
    out
}

fn show(path: &Path) -> String {
    path.strip_prefix(root()).unwrap_or(path).display().to_string()
}

#[test]
fn the_core_does_no_io_and_reads_no_clock() {
    let lib = std::fs::read_to_string(root().join("crates/core/src/lib.rs")).unwrap();
    assert!(
        lib.contains("#![cfg_attr(not(test), no_std)]"),
        "inboxd-core must stay no_std"
    );
    let manifest = std::fs::read_to_string(root().join("crates/core/Cargo.toml")).unwrap();
    let deps = manifest
        .split("[dependencies]")
        .nth(1)
        .and_then(|rest| rest.split("\n[").next())
        .unwrap_or("");
    assert!(deps.trim().is_empty(), "inboxd-core has dependencies: {deps}");
    let forbidden = [
        "std::",
        "Instant",
        "SystemTime",
        "tokio",
        "std::fs",
        "std::net",
        "std::thread",
        "rand",
        "getrandom",
    ];
    let mut found = Vec::new();
    for file in rust_files(&root().join("crates/core/src")) {
        for (n, line) in product_lines(&file) {
            for word in forbidden {
                if line.contains(word) {
                    found.push(format!("{}:{n}: {word}: {}", show(&file), line.trim()));
                }
            }
        }
    }
    assert!(found.is_empty(), "IO or clock in the core:\n{}", found.join("\n"));
}

#[test]
fn only_the_imap_module_knows_the_imap_library() {
    let mut found = Vec::new();
    for file in rust_files(&root().join("src")) {
        if file.starts_with(root().join("src/imap")) {
            continue;
        }
        for (n, line) in product_lines(&file) {
            // The log filter names the library's module as a string.
            let line = line.replace("\"async_imap::imap_stream=off\"", "");
            if line.contains("async_imap") || line.contains("imap_proto") {
                found.push(format!("{}:{n}: {}", show(&file), line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "the IMAP library outside src/imap/:\n{}",
        found.join("\n")
    );
}

#[test]
fn no_unwrap_or_expect_outside_tests() {
    let mut found = Vec::new();
    for dir in ["src", "crates/core/src", "crates/cli/src"] {
        for file in rust_files(&root().join(dir)) {
            for (n, line) in product_lines(&file) {
                if line.contains(".unwrap()") || line.contains(".expect(") {
                    found.push(format!("{}:{n}: {}", show(&file), line.trim()));
                }
            }
        }
    }
    assert!(found.is_empty(), "unwrap/expect in product code:\n{}", found.join("\n"));
}

#[test]
fn every_unsafe_block_says_why_it_is_sound() {
    let mut found = Vec::new();
    for dir in ["src", "crates/core/src", "crates/cli/src", "crates/testbed/src"] {
        for file in rust_files(&root().join(dir)) {
            let text = std::fs::read_to_string(&file).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            for (i, line) in lines.iter().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                if !code.contains("unsafe {") && !code.contains("unsafe{") {
                    continue;
                }
                let above = lines[i.saturating_sub(4)..i].join("\n");
                if !above.contains("SAFETY:") && !line.contains("SAFETY:") {
                    found.push(format!("{}:{}: {}", show(&file), i + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "unsafe without a SAFETY comment:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_imap_wire_trace_can_never_be_enabled() {
    assert!(
        log::STATIC_MAX_LEVEL < log::LevelFilter::Trace,
        "the log crate must be capped below trace (Cargo.toml: log features max_level_debug)"
    );
}

#[test]
fn only_the_machines_commit_action_writes_the_checkpoint() {
    let mut sites = Vec::new();
    for file in rust_files(&root().join("src/watcher")) {
        let lines = product_lines(&file);
        for (i, (n, line)) in lines.iter().enumerate() {
            if line.contains(".commit(") {
                let before: String = lines[i.saturating_sub(6)..i].iter().map(|(_, l)| l.as_str()).collect();
                sites.push((format!("{}:{n}", show(&file)), before.contains("Action::Commit")));
            }
        }
    }
    assert_eq!(sites.len(), 1, "checkpoint writes in the watcher: {sites:?}");
    assert!(
        sites[0].1,
        "the one write is not the execution of Action::Commit: {sites:?}"
    );
}

#[test]
fn the_library_knows_no_cli_crates() {
    // The binary's concerns (arguments, error reports for people, log output) stay in
    // crates/cli; the library reports typed errors and emits `tracing` events only.
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let deps = manifest
        .split("\n[dependencies]\n")
        .nth(1)
        .and_then(|rest| rest.split("\n[").next())
        .unwrap();
    for name in ["clap", "anyhow", "tracing-subscriber"] {
        assert!(
            !deps
                .lines()
                .any(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}="))),
            "the library depends on {name}"
        );
    }
    assert!(deps.contains("tracing ="), "the [dependencies] section was not found");
}
