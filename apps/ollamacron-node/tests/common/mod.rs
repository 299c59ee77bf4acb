//! Helpers shared by the binary's integration tests.

#![allow(clippy::expect_used)] // test code: failing loudly is the point

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

/// Read the child's stderr line by line on a thread of its own; the lines
/// arrive on the returned channel (wait on it with `recv_timeout`).
///
/// # Panics
/// If the child's stderr was not piped.
#[allow(dead_code)] // the unit file's test starts no node
pub(crate) fn stderr_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stderr = child.stderr.take().expect("stderr must be piped");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    lines
}

/// Run `program ARGS`; the error names the command and what it said.
#[allow(dead_code)] // the network-namespace tests use it, the CLI tests do not
pub(crate) fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let shown = format!("`{program} {}`", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{shown}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A test cannot run here (no network namespaces, a tool missing): a loud
/// banner, or, under `CI=true` or `<require_var>=1` (where a skip would
/// hide a broken setup), a failure.
///
/// # Panics
/// When the skip is not allowed.
#[allow(clippy::print_stderr, clippy::panic)] // a skip must be seen
#[allow(dead_code)] // the CLI and trace tests skip nothing
pub(crate) fn skip_unless_required(message: &str, require_var: &str) {
    let required = std::env::var_os(require_var).is_some_and(|v| v == "1")
        || std::env::var("CI").is_ok_and(|v| v == "true");
    if required {
        panic!("{message}");
    }
    let bar = "!".repeat(78);
    eprintln!("\n{bar}\n{message}\n{bar}\n");
}
