//! The pre-shared network key of a private network (libp2p pnet format).
//!
//! ```text
//! /key/swarm/psk/1.0.0/
//! /base16/
//! <64 hex digits>
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

use libp2p::pnet::PreSharedKey;
use rand::RngCore;

/// Why a network key cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum NetworkKeyError {
    /// The file cannot be read.
    #[error("cannot read the network key {}: {source} (create one with `ollamacron-node init --psk {}`)", path.display(), path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a pnet key.
    #[error(
        "the network key {} is not a libp2p pnet key ({reason}); expected three lines: \
         `/key/swarm/psk/1.0.0/`, `/base16/`, 64 hex digits",
        path.display()
    )]
    Format {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// Refusing to overwrite a key: every node of the network holds it.
    #[error("{} already exists; a network key is shared by every node, so it is never overwritten (remove it first to make a new network)", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// The file cannot be written.
    #[error("cannot write the network key {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Read and parse the network key at `path`.
///
/// # Errors
/// The file cannot be read or is not in the pnet format.
pub fn read_network_key(path: &Path) -> Result<PreSharedKey, NetworkKeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| NetworkKeyError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_network_key(&text).map_err(|reason| NetworkKeyError::Format {
        path: path.to_owned(),
        reason,
    })
}

/// Parse a network key file's text (the pnet format: the
/// `/key/swarm/psk/1.0.0/` line, `/base16/`, 64 hex digits), or say what
/// is wrong with it.
///
/// # Errors
/// The text is not in the pnet format.
pub fn parse_network_key(text: &str) -> Result<PreSharedKey, String> {
    // libp2p's parser slices the hex digits by byte offsets and panics on
    // a multi-byte character among them (found by `cargo xtask fuzz
    // network_key`): the format is ASCII, so anything else is refused here.
    if let Some((at, c)) = text.char_indices().find(|(_, c)| !c.is_ascii()) {
        return Err(format!(
            "the key holds the non-ASCII character {c:?} at byte {at}; a network key file is ASCII (create one with `ollamacron-node init --psk`)"
        ));
    }
    text.trim_end()
        .parse::<PreSharedKey>()
        .map_err(|e| e.to_string())
}

/// Write a new random network key to `path` (mode 0600, parent created),
/// never replacing an existing file.
///
/// # Errors
/// The file exists or cannot be written.
pub fn write_new_network_key(path: &Path) -> Result<PreSharedKey, NetworkKeyError> {
    let write_err = |source| NetworkKeyError::Write {
        path: path.to_owned(),
        source,
    };
    if path.exists() {
        return Err(NetworkKeyError::Exists {
            path: path.to_owned(),
        });
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(write_err)?;
    }
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let key = PreSharedKey::new(bytes);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            NetworkKeyError::Exists {
                path: path.to_owned(),
            }
        } else {
            write_err(e)
        }
    })?;
    file.write_all(format!("{key}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(write_err)?;
    Ok(key)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The input `cargo xtask fuzz network_key` found: a multi-byte
    /// character among the hex digits made libp2p's parser panic.
    #[test]
    fn a_non_ascii_character_in_the_key_is_an_error_not_a_panic() {
        let found = include_bytes!("../../../fuzz/regressions/network_key/non-ascii-hex");
        let text = String::from_utf8_lossy(found);
        let e = parse_network_key(&text).unwrap_err();
        assert!(e.contains("non-ASCII") && e.contains("byte 73"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("swarm.key");
        std::fs::write(&path, found).unwrap();
        let e = read_network_key(&path).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
    }

    #[test]
    fn a_written_key_reads_back_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/swarm.key");
        let key = write_new_network_key(&path).unwrap();
        assert_eq!(read_network_key(&path).unwrap(), key);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "/key/swarm/psk/1.0.0/");
        assert_eq!(lines[1], "/base16/");
        assert_eq!(lines[2].len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let again = write_new_network_key(&path).unwrap_err();
        assert!(matches!(again, NetworkKeyError::Exists { .. }), "{again}");
        assert_eq!(read_network_key(&path).unwrap(), key, "never overwritten");
    }

    #[test]
    fn bad_files_name_the_path_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.key");
        let e = read_network_key(&missing).unwrap_err().to_string();
        assert!(e.contains("none.key") && e.contains("init --psk"), "{e}");
        for bad in [
            "",
            "/key/swarm/psk/1.0.0/\n/base16/\nabc\n",
            "/key/swarm/psk/1.0.0/\n/base64/\n0000000000000000000000000000000000000000000000000000000000000000\n",
            "hello",
        ] {
            let path = dir.path().join("bad.key");
            std::fs::write(&path, bad).unwrap();
            let e = read_network_key(&path).unwrap_err();
            assert!(matches!(e, NetworkKeyError::Format { .. }), "{bad:?}: {e}");
            assert!(e.to_string().contains("bad.key"), "{e}");
        }
    }
}
