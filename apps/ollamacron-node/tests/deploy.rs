//! The systemd unit in `deploy/systemd`: systemd itself accepts it
//! (`systemd-analyze verify`, and `systemd-analyze security` rates its
//! exposure at most 2.0 of 10), and its command line is one this binary
//! accepts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod common;

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_ollamacron-node");
const UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../deploy/systemd/ollamacron-node.service"
);
/// Where the unit expects the binary.
const INSTALLED_BIN: &str = "/usr/local/bin/ollamacron-node";
/// The exposure `systemd-analyze security` may give the unit, in tenths
/// (its `--threshold`): 2.0 of 10.
const EXPOSURE_THRESHOLD: &str = "20";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The value of `key=` in the unit (the last one, as systemd reads it).
fn directive<'a>(unit: &'a str, key: &str) -> Option<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .next_back()
}

#[test]
fn the_systemd_unit_is_valid_hardened_and_runs_this_binary() {
    let unit = std::fs::read_to_string(UNIT).unwrap();
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("StateDirectory", "ollamacron"),
        ("ProtectSystem", "strict"),
        ("Restart", "on-failure"),
        ("KillSignal", "SIGTERM"),
        // A configuration error exits 2 (see `config check`): not retried.
        ("RestartPreventExitStatus", "2"),
    ] {
        assert_eq!(directive(&unit, key), Some(value), "{key}= in {UNIT}");
    }
    let exec: Vec<&str> = directive(&unit, "ExecStart")
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(exec[0], INSTALLED_BIN);
    assert_eq!(exec[1], "run");
    // The data directory is the one systemd makes for StateDirectory=.
    let data_dir = exec
        .windows(2)
        .find(|w| w[0] == "--data-dir")
        .map(|w| w[1])
        .unwrap();
    assert_eq!(data_dir, "/var/lib/ollamacron");

    // The same command line, with the files in a folder of ours, is one
    // the binary accepts: `config check` takes what `run` takes.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ollamacron.yaml");
    let init = Command::new(BIN)
        .args(["init", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", text(&init.stderr));
    let args: Vec<String> = exec[2..]
        .iter()
        .map(|a| match *a {
            "/etc/ollamacron/ollamacron.yaml" => config.to_string_lossy().into_owned(),
            "/var/lib/ollamacron" => dir.path().join("state").to_string_lossy().into_owned(),
            other => other.to_owned(),
        })
        .collect();
    let check = Command::new(BIN)
        .args(["config", "check"])
        .args(&args)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "the unit's `run {}` is refused: {}",
        args.join(" "),
        text(&check.stderr)
    );

    let analyze = Command::new("systemd-analyze").arg("--version").output();
    if !analyze.is_ok_and(|o| o.status.success()) {
        common::skip_unless_required(
            "systemd-analyze is missing (apt-get install systemd): the unit file is not verified",
            "OLLAMACRON_REQUIRE_SYSTEMD",
        );
        return;
    }
    // The unit as shipped, but for the binary's place: systemd checks
    // that the program exists.
    let checked = dir.path().join("ollamacron-node.service");
    std::fs::write(&checked, unit.replace(INSTALLED_BIN, BIN)).unwrap();
    let verify = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&checked)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let said = format!("{}{}", text(&verify.stdout), text(&verify.stderr));
    // It warns (and exits 0) for an unknown directive: any word fails.
    assert!(
        verify.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(format!("--threshold={EXPOSURE_THRESHOLD}"))
        .arg(&checked)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let report = text(&security.stdout);
    assert!(
        security.status.success(),
        "systemd-analyze security rates the unit above {EXPOSURE_THRESHOLD}/100: {}",
        report.lines().last().unwrap_or_default()
    );
    assert!(
        Path::new(&checked).exists() && report.contains("Overall exposure level"),
        "{report}"
    );
}
