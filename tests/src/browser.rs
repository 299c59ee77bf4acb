//! A headless Chromium for the dashboard's test: Debian's `chromium`
//! (installed by `cargo xtask ci`) driven by `playwright-core` from npm,
//! installed once into a folder of the test's.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The version of `playwright-core` the test drives Chromium with.
pub const PLAYWRIGHT_CORE: &str = "playwright-core@1.64.1";

/// Debian's Chromium.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// The `node_modules` folder under `dir` holding [`PLAYWRIGHT_CORE`],
/// installed with npm the first time; `Err` says why it cannot be.
///
/// # Errors
/// No Chromium at [`CHROMIUM`], no `node` or `npm`, or npm cannot install
/// the package (no registry).
pub fn playwright(dir: &Path) -> Result<PathBuf, String> {
    if !Path::new(CHROMIUM).exists() {
        return Err(format!(
            "no Chromium at {CHROMIUM} (apt-get install chromium; `cargo xtask ci` installs it as root)"
        ));
    }
    let modules = dir.join("node_modules");
    let stamp = dir.join(PLAYWRIGHT_CORE.replace('/', "_"));
    if stamp.exists() {
        return Ok(modules);
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let out = Command::new("npm")
        .args([
            "install",
            "--no-audit",
            "--no-fund",
            "--no-save",
            "--loglevel=error",
            "--prefix",
        ])
        .arg(dir)
        .arg(PLAYWRIGHT_CORE)
        .output()
        .map_err(|e| format!("cannot run npm (install Node.js and npm): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`npm install {PLAYWRIGHT_CORE}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    if !modules.join("playwright-core").exists() {
        return Err(format!(
            "npm installed no {PLAYWRIGHT_CORE} under {}",
            modules.display()
        ));
    }
    std::fs::write(&stamp, b"").map_err(|e| e.to_string())?;
    Ok(modules)
}
