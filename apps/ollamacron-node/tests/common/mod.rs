//! Helpers shared by the binary's integration tests.

#![allow(clippy::expect_used)] // test code: failing loudly is the point

use std::io::{BufRead, BufReader};
use std::process::Child;
use std::sync::mpsc;

/// Read the child's stderr line by line on a thread of its own; the lines
/// arrive on the returned channel (wait on it with `recv_timeout`).
///
/// # Panics
/// If the child's stderr was not piped.
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
