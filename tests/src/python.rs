//! Python tools from PyPI for the tests (clients, schemathesis), each in a
//! virtualenv of its own created once.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The Python of a virtualenv at `dir` with `packages` (pinned `name==x`)
/// installed, created the first time (a stamp file names the packages);
/// `Err` says why it cannot be.
///
/// # Errors
/// No `python3` with `venv`, or pip cannot install the packages (no PyPI).
pub fn venv(dir: &Path, packages: &[&str]) -> Result<PathBuf, String> {
    let python = dir.join("bin/python");
    let stamp = dir.join(packages.join("+"));
    if stamp.exists() {
        return Ok(python);
    }
    let run = |program: &Path, args: &[&str]| -> Result<(), String> {
        let out = Command::new(program)
            .args(args)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "`{} {}` failed: {}",
                program.display(),
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    let dir_arg = dir.to_string_lossy().into_owned();
    run(Path::new("python3"), &["-m", "venv", "--clear", &dir_arg])?;
    let mut pip = vec![
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ];
    pip.extend(packages);
    run(&python, &pip)?;
    std::fs::write(&stamp, b"").map_err(|e| e.to_string())?;
    Ok(python)
}

/// A test that needs a Python tool it could not install: a loud banner,
/// or under `CI=true` (where a skip would hide a broken setup) a failure.
///
/// # Panics
/// Under `CI=true`.
#[allow(clippy::print_stderr)] // a skip must be seen
pub fn skip_without(message: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    assert!(!ci, "{message} (CI=true requires it)");
    let bar = "!".repeat(78);
    eprintln!("\n{bar}\n{message}\n{bar}\n");
}
