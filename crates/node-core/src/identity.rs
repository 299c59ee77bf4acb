//! The node's persistent libp2p identity.

use std::io::Write;
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;

/// Why the identity key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The key file exists but cannot be read.
    #[error("cannot read identity key {}: {source}", path.display())]
    Read {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The key file does not hold a protobuf-encoded libp2p keypair.
    #[error(
        "identity key {} is corrupt ({reason}); it was left untouched: restore it from a backup, \
         or move it away to have a new identity (and a new peer id) generated",
        path.display()
    )]
    Corrupt {
        /// The key file.
        path: PathBuf,
        /// What the decoder said.
        reason: String,
    },
    /// A new key could not be written.
    #[error("cannot write identity key {}: {source}", path.display())]
    Write {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Encoding a new key failed.
    #[error("cannot encode the new identity key: {0}")]
    Encode(String),
}

/// Largest key file we read; a protobuf ed25519 keypair is 68 bytes.
const MAX_KEY_FILE_BYTES: u64 = 16 * 1024;

/// Load the protobuf-encoded keypair at `path`, or, when no file is there,
/// generate an ed25519 keypair and save it with mode 0600 (creating the
/// parent directory with mode 0700). Returns the keypair and whether it was
/// created. A file that exists but does not decode is an error and is never
/// replaced.
///
/// # Errors
/// The file cannot be read, does not decode, or a new one cannot be written.
pub fn load_or_create_identity(path: &Path) -> Result<(Keypair, bool), IdentityError> {
    match std::fs::metadata(path) {
        Ok(meta) => {
            if meta.len() > MAX_KEY_FILE_BYTES {
                return Err(IdentityError::Corrupt {
                    path: path.to_owned(),
                    reason: format!("{} bytes, far larger than any key", meta.len()),
                });
            }
            let bytes = std::fs::read(path).map_err(|source| IdentityError::Read {
                path: path.to_owned(),
                source,
            })?;
            warn_if_readable_by_others(path, &meta);
            let keypair =
                Keypair::from_protobuf_encoding(&bytes).map_err(|e| IdentityError::Corrupt {
                    path: path.to_owned(),
                    reason: e.to_string(),
                })?;
            Ok((keypair, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let keypair = Keypair::generate_ed25519();
            if !save_new_key(path, &keypair)? {
                // Another process created the key first: use that one.
                return load_or_create_identity(path);
            }
            tracing::info!(path = %path.display(), peer_id = %keypair.public().to_peer_id(), "generated a new identity key");
            Ok((keypair, true))
        }
        Err(source) => Err(IdentityError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Write a new key file; `false` when a file appeared at `path` meanwhile
/// (it is never overwritten).
fn save_new_key(path: &Path, keypair: &Keypair) -> Result<bool, IdentityError> {
    let write_err = |source| IdentityError::Write {
        path: path.to_owned(),
        source,
    };
    let bytes = keypair
        .to_protobuf_encoding()
        .map_err(|e| IdentityError::Encode(e.to_string()))?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_private_dir(parent).map_err(write_err)?;
    }
    // Write a temporary file next to the target, then hard-link it into
    // place: a crash never leaves a half-written key, and a key another
    // process created meanwhile is never overwritten (link fails instead).
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut file = open_private(&tmp).map_err(write_err)?;
    let written = file
        .write_all(&bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    match written {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(write_err(e)),
    }
}

#[cfg(unix)]
fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path, meta: &std::fs::Metadata) {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "identity key is readable by other users; run chmod 600 on it");
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_: &Path, _: &std::fs::Metadata) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_then_reloads_the_same_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/identity.key");
        let (first, created) = load_or_create_identity(&path).unwrap();
        assert!(created);
        let (second, created) = load_or_create_identity(&path).unwrap();
        assert!(!created);
        assert_eq!(first.public().to_peer_id(), second.public().to_peer_id());
    }

    #[cfg(unix)]
    #[test]
    fn new_key_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        load_or_create_identity(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn corrupt_key_is_an_error_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        std::fs::write(&path, b"definitely not a key").unwrap();
        let err = load_or_create_identity(&path).unwrap_err();
        assert!(matches!(err, IdentityError::Corrupt { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("identity.key") && msg.contains("corrupt"),
            "{msg}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"definitely not a key");

        std::fs::write(&path, vec![0u8; 64 * 1024]).unwrap();
        assert!(matches!(
            load_or_create_identity(&path),
            Err(IdentityError::Corrupt { .. })
        ));
    }

    #[test]
    fn unreadable_location_is_a_write_error() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, b"x").unwrap();
        let err = load_or_create_identity(&blocker.join("identity.key")).unwrap_err();
        assert!(
            matches!(
                err,
                IdentityError::Read { .. } | IdentityError::Write { .. }
            ),
            "{err}"
        );
    }
}
